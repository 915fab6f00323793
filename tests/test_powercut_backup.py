"""Power cuts during `backup.py 3 --keep 2` (issue 22), on the power-cut fs.

The stack has history: dated archives of four earlier days (retention
deletes the oldest two of them and their logs) and today's rolling archive
from a week ago.  The run is recorded once; at every cut point each state
a disk may show is built where the stack was, checked, then the same
command is run again there and the state checked once more:

- every file with a final archive name passes restore.py --verify;
- the archives and logs from before the run are all there and unchanged
  (the ones retention deletes: whole or gone);
- today's rolling archive exists (old or new);
- a cut after the last call (the run said it succeeded) keeps its new
  archives whole, with their mode and owner (USER pi where it exists);
- the stack's own files are untouched;
- after the next run (which must succeed): nothing under backups/ or .tmp/
  but final names and what was there before.
"""
import datetime
import os
import subprocess
import unittest

from tests.powercut import harness
from tests.powercut.stack import MISSING, NOW, StackCutCase

DAY = datetime.timedelta(days=1)
ROLLING = "rolling/backup_4.tar.gz"
DATED = "backup/backup_2026-11-26_0200.tar.gz"
RECORD = "good-backups.json"


@unittest.skipIf(MISSING, MISSING)
class BackupPowerCutTest(StackCutCase):
    def setUp(self):
        super().setUp()
        for when in (NOW - 7 * DAY, NOW - 3 * DAY, NOW - 2 * DAY, NOW - DAY):
            code, out, err = self.backup(self.stack, when)
            self.assertEqual(code, 0, err)
        self.before = harness.listing(os.path.join(self.stack, "backups"))
        self.before_stack = self.stack_files(self.stack)

    def stack_files(self, stack):
        return {rel: entry for rel, entry in harness.listing(stack).items()
                if not (rel.startswith("backups") or rel.startswith(".tmp/iotstack-backup"))
                and rel != ".tmp"}

    def state_problems(self, stack, may_go):
        problems = self.archive_problems(stack)
        # The record of good backups (issue 20) is rewritten by every run.
        problems += self.kept_problems(stack, self.before, may_go, {ROLLING, RECORD})
        if not os.path.isfile(os.path.join(stack, "backups", ROLLING)):
            problems.append("today's rolling archive is missing")
        if self.stack_files(stack) != self.before_stack:
            problems.append("the stack's own files changed")
        return problems

    def promise_problems(self, record, promised):
        """A run that said it succeeded, cut after its last call: its
        archives are durable, whole, with their mode and owner."""
        harness.build_strict(record, len(record["ops"]) - 1, self.mount)
        state = harness.listing(os.path.join(self.live, "backups"))
        return ["the finished run's %s is not durable as it was written" % rel
                for rel, entry in sorted(promised.items())
                if rel not in state or state[rel][:6] != entry]

    def test_backup_3_keep_2_with_a_rolling_archive(self):
        (code, _out, err), record = self.record(
            lambda stack: self.backup(stack, NOW, "--keep", "2"))
        self.assertEqual(code, 0, err)
        after = harness.listing(os.path.join(self.stack, "backups"))
        may_go = {rel for rel in self.before if rel not in after}
        self.assertEqual(len([rel for rel in may_go if rel.endswith(".tar.gz")]), 3, may_go)
        # A next run in the same minute makes a second archive of today, so
        # --keep 2 may then delete one more from before: what two whole
        # runs delete may go too.
        reference = os.path.join(self.tmp, "reference")
        subprocess.run(["cp", "-a", self.stack, reference], check=True)
        self.assertEqual(self.backup(reference, NOW, "--keep", "2")[0], 0)
        twice = harness.listing(os.path.join(reference, "backups"))
        may_go |= {rel for rel in self.before if rel not in twice}
        allowed = {"backups/" + rel for rel in self.before} | {
            ".tmp/" + rel for rel in harness.listing(os.path.join(self.stack, ".tmp"))}

        promised = {rel: after[rel][:6] for rel in (DATED, ROLLING)}
        self.assertEqual(self.promise_problems(record, promised), [])

        def next_run(cut, kind):
            problems = ["before the next run: %s" % p
                        for p in self.state_problems(self.live, may_go)]
            code, out, err = self.backup(self.live, NOW, "--keep", "2")
            if code != 0:
                problems.append("the next backup failed (%d): %s" % (code, err.strip()[-300:]))
            problems += ["after the next run: %s" % p
                         for p in self.state_problems(self.live, may_go)]
            return problems + self.leftover_problems(self.live, allowed)

        self.sweep(record, "backup.py 3 --keep 2", next_run)


if __name__ == "__main__":
    unittest.main()
