"""Power cuts during `restore.py NAME noask` onto a stack with a second disk
mounted inside it (issue 22): volumes/influxdb is the mount point of a
second power-cut file system, with its own backing folder, record and
durability (tests/powercut/disks.py).

The stack and the archive are those of test_powercut_restore, and the
second disk's data changed since the backup too; the disk has its own
lost+found, which no archive holds.  The restore is recorded once on both
file systems; at every cut point of the two records' merged order each
combination of states the two disks may show is built (the stack's disk in
a plain folder where it was mounted, the other on a tmpfs mounted at
volumes/influxdb there), `restore.py --recover` runs, and then:

- the stack's items, both disks together, are entry by entry all exactly
  as before the restore or all exactly as in the archive: never a mix
  (nor one disk old and the other new);
- nothing of the other disk is lost: its lost+found is as it was, and no
  staging or aside folder of ours is left on it;
- nothing was written under the mount point onto the stack's disk;
- the excluded data and the archives are untouched, nothing of the
  restore's own is left in .tmp/ (as test_powercut_restore checks).

The recovery is swept the same way: a cut at every point of a recovery (of
the state a cut in the middle of the swap left, the other disk's new data
already in place), then another recovery.
"""
import os
import subprocess
import sys
import unittest

from tests.powercut import disks, harness, model
from tests.powercut.stack import MISSING, SMALL_SAMPLE
from tests.support import write
from tests.test_powercut_restore import RestoreCutCase

POINT = "volumes/influxdb"
LOST = "lost+found"


@unittest.skipIf(MISSING, MISSING)
class RestoreOntoTwoDisksTest(RestoreCutCase):
    def setUp(self):
        super().setUp()
        # The second disk: what was under volumes/influxdb moves to its own
        # backing folder; its root keeps the folder's mode, owner and times
        # (a mount point shows its file system's root).
        self.backing2 = os.path.join(self.tmp, "backing2")
        point = os.path.join(self.stack, POINT)
        st, volumes = os.lstat(point), os.lstat(os.path.dirname(point))
        os.rename(point, self.backing2)
        os.mkdir(point, 0o755)
        os.utime(self.backing2, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.utime(os.path.dirname(point), ns=(volumes.st_atime_ns, volumes.st_mtime_ns))
        self.point = os.path.join(self.live, POINT)  # where it is mounted
        self.layout = disks.Layout(self.mount, [self.point])
        self.addCleanup(self.layout.unmount)
        self.lost = self.lost_found(self.backing2)

    def change_the_stack(self):
        super().change_the_stack()
        data = os.path.join(self.stack, POINT, "data")
        write(os.path.join(data, "meta/meta.db"), b"changed meta " * 50)
        write(os.path.join(data, "wal/new-since-backup.wal"), b"w" * 3000)
        os.unlink(os.path.join(data, "orphan.dat"))
        lost = os.path.join(self.stack, POINT, LOST)
        os.mkdir(lost, 0o700)
        write(os.path.join(lost, "#1234"), b"what fsck found")

    def lost_found(self, root):
        return harness.listing(os.path.join(root, LOST))

    def both_disks(self):
        """items() of the stack's backing with the second disk's backing
        bind-mounted at its point: the tree as the restore left it."""
        point = os.path.join(self.stack, POINT)
        subprocess.run(["mount", "--bind", self.backing2, point], check=True)
        try:
            return self.items(self.stack)
        finally:
            subprocess.run(["umount", point], check=True)

    def recorded_restore(self):
        """(the new tree, [the record of each disk]) of a whole restore."""
        (code, out, err), records = disks.record_runs(
            [(self.backing, self.mount), (self.backing2, self.point)],
            os.path.join(self.tmp, "disk"),
            lambda mount: self.restore_whole(os.path.join(mount, "IOTstack")))
        self.assertEqual(code, 0, err + out)
        with open(os.path.join(self.stack, "backups/logs/restore_2026-11-26_0200.log")) as f:
            self.assertIn("volumes/influxdb is a mount point: its data goes back onto", f.read())
        new = self.both_disks()
        self.assertNotEqual(new, self.old)
        self.assertTrue(any(op[0] == "rename" for op in records[1]["ops"]))
        return new, records

    def other_disk_problems(self, new):
        problems = []
        now = self.items(self.live).get(POINT)
        if now not in (self.old[POINT], new[POINT]):
            fields = ("type", "mode", "uid", "gid", "mtime", "content", "link")
            problems.append("the mount point's own %s differ from the old and the new one" % [
                (f, a, b, c) for f, a, b, c in zip(fields, now or (), self.old[POINT], new[POINT])
                if a not in (b, c)])
        if self.lost_found(self.point) != self.lost:
            problems.append("the other disk's lost+found changed")
        ours = [name for name in os.listdir(self.point) if name.startswith(".iotstack-restore-")]
        if ours:
            problems.append("left on the other disk: %s" % ours)
        return problems

    def test_nothing_is_written_under_the_mount_point_onto_the_stacks_disk(self):
        _new, (stack_disk, _other) = self.recorded_restore()
        below = stack_disk["initial"][0]
        for name in ("IOTstack", "volumes", "influxdb"):
            ident = below["entries"][name]
            below = stack_disk["initial"][ident]
        touched = [op for op in stack_disk["ops"] if op[0] in model.NAMES
                   and (op[1] == ident or op[0] == "rename" and op[3] == ident)]
        self.assertEqual(touched, [])
        self.assertEqual(os.listdir(os.path.join(self.stack, POINT)), [])

    def test_a_finished_restore_is_durable_on_both_disks(self):
        new, records = self.recorded_restore()
        trees = [model.replay(r, model.kept_strict(r["ops"], model.durable_at(r["ops"]),
                                                   len(r["ops"]) - 1), len(r["ops"]) - 1)
                 for r in records]
        self.layout.build(trees)
        self.assertEqual(self.items(self.live), new)

    def recovered_at(self, new, sweep, cut, combo):
        self.layout.build(sweep.trees(cut, combo))
        return self.recovered_problems(new, "restore.py --recover") + \
            self.other_disk_problems(new)

    def test_a_cut_while_staging_on_the_other_disk(self):
        # Found by the sweep: the recovery removed the staging folder on the
        # other disk but left the mount point's mtime changed.
        new, records = self.recorded_restore()
        sweep = disks.DiskSweep(records, self.layout)
        cut = sweep.find(1, "create", ".iotstack-restore-staging.")
        self.assertEqual(self.recovered_at(new, sweep, cut, ["names", "names"]), [])

    def test_a_cut_after_the_restore_forgot_its_folders_on_the_other_disk(self):
        # Found by the sweep: the journal and the record of the folders on
        # the other disk were removed durably before those folders' removal
        # was: a staging folder no record names stayed there.
        new, records = self.recorded_restore()
        sweep = disks.DiskSweep(records, self.layout)
        for name in ("restore-journal.json", "restore-foreign."):
            cut = sweep.find(0, "unlink", name)
            for combo in (["names", "strict"], ["strict", "strict"]):
                self.assertEqual(self.recovered_at(new, sweep, cut, combo), [], (name, combo))

    def test_a_cut_while_the_old_data_is_deleted_on_the_other_disk(self):
        # Found by the full sweep: a cut after the aside folder's rmdir,
        # before the mount point's times were put back; the recovery took
        # the rmdir's mtime for the one to keep.
        new, records = self.recorded_restore()
        sweep = disks.DiskSweep(records, self.layout)
        cut = sweep.find(1, "rmdir", ".iotstack-restore-old.")
        self.assertEqual(self.recovered_at(new, sweep, cut, ["names", "names"]), [])

    def recorded_recovery(self):
        """(the new tree, [the record of each disk]) of a recovery from a
        cut in the middle of the swap (names kept on both disks: the
        journal says "swapping", the other disk's new data is in place)."""
        new, records = self.recorded_restore()
        sweep = disks.DiskSweep(records, self.layout)
        into_place = [g for g, (d, i) in enumerate(sweep.order) if d == 1 and
                      records[1]["ops"][i][0] == "rename" and records[1]["ops"][i][3:5] == (0, "data")]
        self.assertEqual(len(into_place), 1)
        stack_disk, other_disk = sweep.trees(into_place[0], ["names", "names"])
        model.materialize(stack_disk, self.backing)
        model.materialize(other_disk, self.backing2)
        (code, out, err), recovery = disks.record_runs(
            [(self.backing, self.mount), (self.backing2, self.point)],
            os.path.join(self.tmp, "disk"),
            lambda mount: self.restore(os.path.join(mount, "IOTstack"), "--recover"))
        self.assertEqual(code, 0, err + out)
        self.assertIn("Rolled back an interrupted restore", out)
        self.assertTrue(any(op[0] == "rename" for op in recovery[1]["ops"]))
        return new, recovery

    def sweep_disks(self, records, label, next_run):
        sample = None if harness.heavy() else SMALL_SAMPLE
        sweep = disks.DiskSweep(records, self.layout, seed=22)
        sweep.run(disks.global_cut_points(records, sweep.order, sample), next_run)
        note = "" if sample is None else " (a sample: the full sweep runs where IOTSTACK_HEAVY=1)"
        print("\n%s: %d cuts, %d distinct states, of %d calls (%d on the stack's disk, %d on "
              "the other)%s" % (label, sweep.cuts, len(sweep.seen), len(sweep.order),
                                len(records[0]["ops"]), len(records[1]["ops"]), note),
              file=sys.stderr)
        kinds = {}
        for problem in sweep.problems:
            kinds.setdefault(problem.split(": ", 1)[1], problem)
        self.maxDiff = None
        self.assertEqual(sorted(kinds.values())[:20], [], "%d problems" % len(sweep.problems))

    def each_rename_alone(self, records, new, label):
        """Cut after each rename of either disk, keeping it and nothing
        else unsynced on either: [problems] of the recovery that follows."""
        sweep = disks.DiskSweep(records, self.layout)
        problems = []
        renames = [(g, d, i) for g, (d, i) in enumerate(sweep.order)
                   if records[d]["ops"][i][0] == "rename" and sweep.durable[d][i] > i]
        self.assertTrue({d for _g, d, _i in renames} == {0, 1}, renames)
        for g, d, i in renames:
            local = disks.local_cuts(sweep.order, 2, g)
            trees = []
            for e, record in enumerate(records):
                kept = model.kept_strict(record["ops"], sweep.durable[e], local[e])
                trees.append(model.replay(record, kept | ({i} if e == d else set()), local[e]))
            self.layout.build(trees)
            problems += ["rename %d of disk %d alone: %s" % (i, d, p) for p in
                         self.recovered_problems(new, label) + self.other_disk_problems(new)]
        return problems

    def test_each_rename_alone_on_two_disks(self):
        new, records = self.recorded_restore()
        self.assertEqual(self.each_rename_alone(records, new, "--recover"), [])

    def test_each_rename_of_a_roll_back_alone_on_two_disks(self):
        new, recovery = self.recorded_recovery()
        self.assertEqual(self.each_rename_alone(recovery, new, "a second --recover"), [])

    def test_a_cut_during_recovery_on_two_disks_then_recovery(self):
        new, recovery = self.recorded_recovery()
        self.sweep_disks(recovery, "restore.py --recover, %s on a second disk (cut during "
                         "recovery)" % POINT,
                         lambda cut, kind: self.recovered_problems(new, "a second --recover")
                         + self.other_disk_problems(new))

    def test_restore_onto_two_disks(self):
        new, records = self.recorded_restore()
        self.sweep_disks(records, "restore.py NAME noask, %s on a second disk" % POINT,
                         lambda cut, kind: self.recovered_problems(new, "restore.py --recover")
                         + self.other_disk_problems(new))


if __name__ == "__main__":
    unittest.main()
