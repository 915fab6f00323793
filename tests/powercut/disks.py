"""Several power-cut file systems at once: a second disk mounted inside the
first (a USB disk at volumes/influxdb), each with its own backing folder,
its own record and its own durability.

Why: a restore onto a stack with a mount point writes to two file systems;
after a power cut each keeps only what was made durable on it, and a sync
of one says nothing of the other.  fs.py stamps every call with one
machine-wide clock, so the records of the two disks fall into one order:
a cut after call g of that order is one instant on both disks (each cut
after its own last call at or before g).  Each disk's state is then built
with the model (strict, names kept and data lost, random), in every
combination that matters: both strict, both names kept, one names kept and
the other strict, both random (each with its own seed).  The first disk is
built in a plain folder where it was mounted, each other disk on a tmpfs of
its own mounted at its mount point there: the next run sees a mount point
(another device), as the recorded run did.
"""
from __future__ import annotations

import contextlib
import os
import subprocess

from . import harness, model


@contextlib.contextmanager
def mounted(disks: list, files: str):
    """Mount each (backing, mount) of disks in order (a later one may be
    mounted inside an earlier one); yields the Mounts, unmounted in reverse
    order on the way out.  Records and logs go to files + ".N"."""
    with contextlib.ExitStack() as stack:
        mounts = []
        for n, (backing, mount) in enumerate(disks):
            mounts.append(stack.enter_context(
                harness.Mount(backing, mount, files="%s.%d" % (files, n))))
        yield mounts


def record_runs(disks: list, files: str, run):
    """Mount the disks, run(first mount) with the sync hook on all of
    them, unmount: (its result, [record of each disk])."""
    with mounted(disks, files) as mounts:
        records = []
        try:
            with harness.sync_hook([mount for _backing, mount in disks]):
                result = run(disks[0][1])
        finally:
            for fs in reversed(mounts):
                records.insert(0, fs.stop())
    return result, records


def merged_order(records: list) -> list:
    """[(disk, index)] of every recorded call of every disk, in the order
    they were done."""
    calls = sorted((stamp, disk, i) for disk, record in enumerate(records)
                   for i, stamp in enumerate(record["stamps"]))
    return [(disk, i) for _stamp, disk, i in calls]


def local_cuts(order: list, disks: int, cut: int) -> list:
    """The cut after call `cut` of the merged order, on each disk: its own
    last call at or before it (-1: none yet)."""
    cuts = [-1] * disks
    for disk, i in order[:cut + 1]:
        cuts[disk] = i
    return cuts


def global_cut_points(records: list, order: list, sample: int | None) -> list:
    """model.cut_points over the merged order: every durable point of
    either disk, and a seeded sample of the calls between them."""
    ops = [records[disk]["ops"][i] for disk, i in order]
    return model.cut_points(ops, minimum=100, seed=22, sample=sample)


class Layout:
    """Where each disk's state is built: the first at `root` (a plain
    folder), each other at its mount point (an absolute path inside the
    first), on a tmpfs mounted there for the purpose."""

    def __init__(self, root: str, points: list):
        self.root, self.points = root, points
        self.mounted: list = []

    def build(self, trees: list) -> None:
        self.unmount()
        model.materialize(trees[0], self.root)
        for point, tree in zip(self.points, trees[1:]):
            if not os.path.isdir(point):
                raise RuntimeError("the mount point %s is not in the first disk's state" % point)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "powercut-disk", point],
                           check=True)
            self.mounted.append(point)
            model.materialize(tree, point, fresh=False)

    def unmount(self) -> None:
        while self.mounted:
            subprocess.run(["umount", self.mounted.pop()], check=True)


class DiskSweep:
    """harness.Sweep for several disks: for each global cut point, the
    combined states (see the module's text), each distinct one built once
    with the layout and checked by next_run(cut, kind) -> problems."""

    def __init__(self, records: list, layout: Layout, seed: int = 22):
        self.records, self.layout, self.seed = records, layout, seed
        self.order = merged_order(records)
        self.durable = [model.durable_at(record["ops"]) for record in records]
        self.seen: dict = {}
        self.cuts = 0
        self.problems: list = []

    def kept(self, disk: int, cut: int, kind: str) -> set:
        ops, durable = self.records[disk]["ops"], self.durable[disk]
        if kind == "strict":
            return model.kept_strict(ops, durable, cut)
        if kind == "names":
            return model.kept_names(ops, durable, cut)
        return model.kept_random(ops, durable, cut, self.seed * 1000 + disk)

    def combinations(self) -> list:
        """Per disk, the state to build: all strict, all names kept, each
        disk alone names kept, all random."""
        n = len(self.records)
        combos = [["strict"] * n, ["names"] * n]
        combos += [["names" if d == alone else "strict" for d in range(n)] for alone in range(n)]
        combos.append(["random"] * n)
        return combos

    def trees(self, cut: int, combo: list) -> list:
        """Each disk's state at the cut after global call `cut`, kept as
        combo says ("strict", "names" or "random" per disk)."""
        local = local_cuts(self.order, len(self.records), cut)
        return [model.replay(record, self.kept(d, local[d], combo[d]), local[d])
                for d, record in enumerate(self.records)]

    def find(self, disk: int, kind: str, name: str) -> int:
        """The global index of the first call of that kind on that disk
        whose name (its third field) starts with name."""
        for g, (d, i) in enumerate(self.order):
            op = self.records[d]["ops"][i]
            if d == disk and op[0] == kind and str(op[2]).startswith(name):
                return g
        raise LookupError("no %s of %s* on disk %d" % (kind, name, disk))

    def run(self, cuts: list, next_run) -> None:
        for cut in cuts:
            self.cuts += 1
            for combo in self.combinations():
                trees = self.trees(cut, combo)
                key = tuple(model.fingerprint(tree) for tree in trees)
                if key in self.seen:
                    continue
                kind = "/".join(combo)
                self.seen[key] = (cut, kind)
                self.layout.build(trees)
                for problem in next_run(cut, kind):
                    self.problems.append("cut after call %d %s (%s): %s"
                                         % (cut, self.describe(cut), kind, problem))

    def describe(self, cut: int) -> str:
        if cut < 0:
            return "(before any call)"
        disk, i = self.order[cut]
        op = self.records[disk]["ops"][i]
        shown = [repr(x)[:60] for x in op[1:] if not isinstance(x, (dict, bytes, tuple))]
        return "[disk %d: %s %s]" % (disk, op[0], " ".join(shown))
