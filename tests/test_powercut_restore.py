"""Power cuts during `restore.py NAME noask` of a whole stack (issue 22),
and during the recovery that follows one.

The live stack differs from the archive in every way a restore must undo
(a changed, a new and a deleted file, a mode, a whole new folder, the
compose file).  The restore is recorded once on the power-cut fs; at every
cut point each state a disk may show is built where the stack was, then
`restore.py --recover` runs there (as the next run of any command does
first) and must leave:

- the stack's items, entry by entry (type, content, mode, owner, mtime,
  link target, hard links), all exactly as before the restore or all
  exactly as in the archive: never a mix;
- the data the backup excluded (`.tmp/cache`) and the archives untouched;
- nothing of the restore's own under .tmp/ (staging, aside folders,
  journal, records) nor anything else left behind.

`restore.py NAME --only volumes/nodered noask` is swept the same way
(old or new is then that one folder, all else as before).  The recovery
is swept too: a cut at every point of a recovery
(of the state a cut in the middle of the swap left), then another
recovery, with the same invariants.
"""
import os
import unittest

from tests.powercut import harness, model
from tests.powercut.stack import MISSING, NOW, StackCutCase
from tests.support import write

ARCHIVE = "backup/backup_2026-11-26_0200.tar.gz"
# Outside the items: what a restore must never touch.
NOT_ITEMS = ("backups", ".tmp/cache", ".tmp/iotstack-backup.lock")


@unittest.skipIf(MISSING, MISSING)
class RestoreCutCase(StackCutCase):
    """A stack changed since its backup; the restores and recoveries of
    it, recorded, and the invariants checked after each cut."""

    def setUp(self):
        super().setUp()
        code, _out, err = self.backup(self.stack, NOW)
        self.assertEqual(code, 0, err)
        self.change_the_stack()
        self.old = self.items(self.stack)
        self.untouched = self.outside(self.stack)

    def change_the_stack(self):
        s = self.stack
        write(os.path.join(s, "volumes/nodered/data/flows.json"), "changed flows")
        write(os.path.join(s, "volumes/nodered/data/new-since-backup.txt"), "new")
        os.unlink(os.path.join(s, "extra/notes.txt"))
        os.chmod(os.path.join(s, "docker-compose.override.yml"), 0o600)
        write(os.path.join(s, "volumes/newservice/data/db"), b"\0" * 5000)
        write(os.path.join(s, "docker-compose.yml"), "services: {}\n")

    def items(self, stack):
        """Every entry of the stack but backups/ and what .tmp/ holds
        outside the items."""
        tree = harness.listing(stack, skip=NOT_ITEMS + (".tmp",))
        tmp_items = harness.listing(os.path.join(stack, ".tmp"),
                                    skip=("cache", "iotstack-backup.lock"))
        tree.update({".tmp/" + rel: entry for rel, entry in tmp_items.items()
                     if rel == "databases_backup" or rel.startswith("databases_backup/")})
        return tree

    def outside(self, stack):
        """The excluded data and the archives: a restore never touches them."""
        return {top + "/" + rel: entry[:6] for top in (".tmp/cache", "backups/backup",
                                                       "backups/rolling")
                for rel, entry in harness.listing(os.path.join(stack, top)).items()}

    def restore_whole(self, stack):
        return self.restore(stack, ARCHIVE, "noask")

    def recovered_problems(self, new, label):
        """--recover, then the invariants; [] when they hold."""
        code, out, err = self.restore(self.live, "--recover")
        problems = []
        if code != 0:
            problems.append("%s failed (%d): %s" % (label, code, (err or out).strip()[-300:]))
        now = self.items(self.live)
        if now != self.old and now != new:
            problems.append("after %s the items are neither the old tree nor the new one: %s"
                            % (label, describe_mix(now, self.old, new)))
        if self.outside(self.live) != self.untouched:
            problems.append("after %s the excluded data or the archives changed" % label)
        tmp = set(os.listdir(os.path.join(self.live, ".tmp")))
        extra = tmp - {"cache", "databases_backup", "iotstack-backup.lock"}
        if extra:
            problems.append("left behind in .tmp after %s: %s" % (label, sorted(extra)))
        return problems

    def recorded_restore(self):
        """(the new tree, the record of a whole restore)."""
        (code, out, err), record = self.record(self.restore_whole)
        self.assertEqual(code, 0, err + out)
        new = self.items(self.stack)
        self.assertNotEqual(new, self.old)
        return new, record

    def recorded_recovery(self):
        """(the new tree, the record of a recovery from a cut in the middle
        of the swap, names kept: the journal says "swapping" and some items
        are already in place)."""
        new, record = self.recorded_restore()
        cut = middle_of_swap(record)
        ops = record["ops"]
        kept = model.kept_names(ops, model.durable_at(ops), cut)
        model.materialize(model.replay(record, kept, cut), self.backing)
        self.assertTrue(os.path.exists(os.path.join(self.stack, ".tmp/restore-journal.json")))
        (code, out, err), recovery = self.record(lambda stack: self.restore(stack, "--recover"))
        self.assertEqual(code, 0, err + out)
        self.assertIn("Rolled back an interrupted restore", out)
        return new, recovery

    def each_rename_alone(self, record, new, label):
        """Cut after each rename, keeping it and nothing else unsynced:
        [problems] of the recovery that follows."""
        ops = record["ops"]
        durable = model.durable_at(ops)
        problems = []
        renames = [k for k, op in enumerate(ops) if op[0] == "rename" and durable[k] > k]
        self.assertTrue(renames)
        for k in renames:
            kept = model.kept_strict(ops, durable, k) | {k}
            model.materialize(model.replay(record, kept, k), self.mount)
            problems += ["rename %d alone: %s" % (k, p)
                         for p in self.recovered_problems(new, label)]
        return problems


class RestorePowerCutTest(RestoreCutCase):
    def test_a_finished_restore_is_durable(self):
        new, record = self.recorded_restore()
        harness.build_strict(record, len(record["ops"]) - 1, self.mount)
        self.assertEqual(diff(self.items(self.live), new), [])

    def test_each_rename_of_a_swap_alone_survives(self):
        # Found by the sweep: a rename into an aside folder whose own name
        # was not durable yet (the old item in an orphan), and a staged
        # item renamed over a live name whose rename aside was lost.
        new, record = self.recorded_restore()
        self.assertEqual(self.each_rename_alone(record, new, "--recover"), [])

    def test_each_rename_of_a_roll_back_alone_survives(self):
        # Found by the sweep: an old item's return over its live name kept
        # while the new one's way back to staging was lost.
        new, recovery = self.recorded_recovery()
        self.assertEqual(self.each_rename_alone(recovery, new, "a second --recover"), [])

    def test_a_cut_while_a_roll_back_cleans_up(self):
        # Found by the sweep (and a kill -9 does it too): a cut while the
        # staged copies are deleted after a roll back; the next recovery
        # took each old item whose staged copy was gone for a new one.
        new, recovery = self.recorded_recovery()
        ops = recovery["ops"]
        durable = model.durable_at(ops)
        unlinks = [k for k, op in enumerate(ops) if op[0] == "unlink" and "restore-journal"
                   not in op[2]]
        self.assertTrue(unlinks)
        for k in unlinks[:3] + unlinks[-3:]:
            model.materialize(model.replay(recovery, model.kept_names(ops, durable, k), k),
                              self.mount)
            self.assertEqual(self.recovered_problems(new, "a second --recover"), [], k)

    def test_restore_of_a_whole_stack(self):
        new, record = self.recorded_restore()
        self.sweep(record, "restore.py NAME noask",
                   lambda cut, kind: self.recovered_problems(new, "restore.py --recover"))

    def test_restore_only_one_service(self):
        (code, out, err), record = self.record(
            lambda stack: self.restore(stack, ARCHIVE, "--only", "volumes/nodered", "noask"))
        self.assertEqual(code, 0, err + out)
        new = self.items(self.stack)
        changed = {rel for rel in set(new) | set(self.old) if new.get(rel) != self.old.get(rel)}
        self.assertTrue(changed)
        self.assertFalse([rel for rel in changed if not rel.startswith("volumes/nodered")
                          and rel != "volumes"], changed)
        self.sweep(record, "restore.py NAME --only volumes/nodered noask",
                   lambda cut, kind: self.recovered_problems(new, "restore.py --recover"))

    def test_a_cut_during_recovery_then_recovery(self):
        new, recovery = self.recorded_recovery()
        self.sweep(recovery, "restore.py --recover (cut during recovery)",
                   lambda cut, kind: self.recovered_problems(new, "a second --recover"))


def middle_of_swap(record):
    """The call after the first rename of a staged item into place."""
    renames = [i for i, op in enumerate(record["ops"])
               if op[0] == "rename" and "restore-staging" not in str(op[4])
               and op[4] in ("services", "volumes")]
    assert renames, "no swap in the record"
    return renames[-1]


def diff(now, expected):
    """What differs, shortly: [(rel, field names)]."""
    fields = ("type", "mode", "uid", "gid", "mtime", "content", "link")
    return sorted((rel, [f for f, a, b in zip(fields, now.get(rel, ()), expected.get(rel, ()))
                         if a != b] if rel in now and rel in expected else
                   "missing" if rel in expected else "extra")
                  for rel in set(now) | set(expected) if now.get(rel) != expected.get(rel))


def describe_mix(now, old, new):
    as_old = sorted(rel for rel in now if old.get(rel) == now[rel] and new.get(rel) != now[rel])
    as_new = sorted(rel for rel in now if new.get(rel) == now[rel] and old.get(rel) != now[rel])
    neither = sorted(rel for rel in set(now) | set(old) | set(new)
                     if now.get(rel) not in (old.get(rel), new.get(rel)))
    return "old: %s; new: %s; neither: %s" % (as_old[:3], as_new[:3], neither[:5])


if __name__ == "__main__":
    unittest.main()
