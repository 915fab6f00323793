"""The base of the power-cut sweeps of backup.py and restore.py: a small
IOTstack built in a backing folder, history made before the recorded run,
the run recorded on the power-cut fs, and the invariants of issue 22 that
the backup and restore sweeps share (archives complete, old archives and
logs unchanged, nothing left behind)."""
from __future__ import annotations

import datetime
import hashlib
import os
import pwd
import re
import shutil
import sys
import unittest
from unittest import mock

from iotstack_backup import backup, iotstack, restore
from tests.powercut import harness, model
from tests.stacktree import build_stack
from tests.support import IsolatedCase, run_main

NOW = datetime.datetime(2026, 11, 26, 2, 0)  # a Thursday: rolling backup_4
MISSING = harness.missing()
FINAL_ARCHIVE = re.compile(r"^(backup/backup_\d{4}-\d\d-\d\d_\d{4}(-\d+)?\.tar\.gz"
                           r"|rolling/backup_[0-6]\.tar\.gz)$")
FINAL_LOG = re.compile(r"^logs/(backup|restore)_\d{4}-\d\d-\d\d_\d{4}(-\d+)?\.log$")
SMALL_SAMPLE = 12
try:
    pwd.getpwnam("pi")
    OWNER = "pi"
except KeyError:
    OWNER = "root"  # cut points checked where IOTSTACK_HEAVY is not 1


def at(when: datetime.datetime):
    return mock.patch.object(iotstack, "now_local", return_value=when)


@unittest.skipIf(MISSING, MISSING)
class StackCutCase(IsolatedCase):
    scale = 0.01

    def setUp(self):
        super().setUp()
        os.environ["IOTSTACK_NO_DOCKER"] = "1"
        self.tmp = harness.fast_tmp("powercut-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.backing = os.path.join(self.tmp, "backing")
        self.mount = os.path.join(self.tmp, "mnt")
        self.stack = os.path.join(self.backing, "IOTstack")
        self.live = os.path.join(self.mount, "IOTstack")  # where the commands run
        build_stack(self.stack, scale=self.scale)
        self.good_archives: set = set()

    # -- running
    def backup(self, stack: str, when=NOW, *extra):
        """backup.py 3 USER --no-stop EXTRA at `when` (USER pi where it
        exists: the archives' owner must be durable too)."""
        with at(when):
            return run_main(backup, ["3", OWNER, "--no-stop", "--dir", stack] + list(extra))

    def restore(self, stack: str, *args):
        with at(NOW):
            return run_main(restore, list(args) + ["--no-stop", "--dir", stack])

    def record(self, run):
        """Run run(stack on the mount) once on the power-cut fs: (result, record)."""
        return harness.record_run(self.backing, self.mount,
                                  lambda mount: run(os.path.join(mount, "IOTstack")))

    def sweep(self, record, label: str, next_run) -> harness.Sweep:
        """Build every cut's states at the mount's path and check each with
        next_run(cut, kind) -> problems; print and return the count."""
        ops = record["ops"]
        sample = None if harness.heavy() else SMALL_SAMPLE
        cuts = model.cut_points(ops, minimum=100, seed=22, sample=sample)
        sweep = harness.Sweep(record, self.mount, seed=22)
        sweep.run(cuts, next_run)
        note = "" if sample is None else " (a sample: the full sweep runs where IOTSTACK_HEAVY=1)"
        print("\n%s: %d cuts, %d distinct states, of %d calls%s"
              % (label, sweep.cuts, len(sweep.seen), len(ops), note), file=sys.stderr)
        self.maxDiff = None
        kinds = {}
        for problem in sweep.problems:
            kinds.setdefault(problem.split(": ", 1)[1], problem)
        self.assertEqual(sorted(kinds.values())[:20], [], "%d problems" % len(sweep.problems))
        self.maxDiff = None
        return sweep

    # -- invariants
    def archives(self, stack: str) -> dict:
        """{rel under backups/: path} of every file with a final archive name."""
        backups = os.path.join(stack, "backups")
        found = {}
        for folder in ("backup", "rolling"):
            path = os.path.join(backups, folder)
            for name in os.listdir(path) if os.path.isdir(path) else []:
                if FINAL_ARCHIVE.match(folder + "/" + name):
                    found[folder + "/" + name] = os.path.join(path, name)
        return found

    def archive_problems(self, stack: str) -> list:
        """Each final-named archive passes restore.py --verify (each content
        checked once)."""
        problems = []
        for rel, path in sorted(self.archives(stack).items()):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest in self.good_archives:
                continue
            code, out, err = self.restore(stack, "--verify", path)
            if code != 0:
                problems.append("%s has its final name but fails --verify (%d): %s"
                                % (rel, code, (err or out).strip()[-300:]))
            else:
                self.good_archives.add(digest)
        return problems

    def kept_problems(self, stack: str, before: dict, may_go: set, may_change=()) -> list:
        """The archives and logs under backups/ from before the run are all
        there, unchanged; those in may_go (retention's) whole or gone; those
        in may_change (today's rolling archive) old or new (new ones are
        checked by archive_problems)."""
        now = harness.listing(os.path.join(stack, "backups"))
        problems = []
        for rel, entry in sorted(before.items()):
            if entry[0] == "dir":
                continue
            if rel not in now:
                if rel not in may_go:
                    problems.append("backups/%s from before the run is gone" % rel)
            elif now[rel][:6] != entry[:6] and rel not in may_change:
                problems.append("backups/%s from before the run changed" % rel)
        return problems

    def leftover_problems(self, stack: str, allowed: set) -> list:
        """After the next run: under backups/ and .tmp/ only final names,
        and what was there before (allowed)."""
        problems = []
        for top in ("backups", ".tmp"):
            for rel in harness.listing(os.path.join(stack, top)):
                rel = top + "/" + rel
                short = rel[len("backups/"):]
                if rel in allowed or (top == "backups" and (
                        FINAL_ARCHIVE.match(short) or FINAL_LOG.match(short))):
                    continue
                problems.append("left behind after the next run: %s" % rel)
        return problems
