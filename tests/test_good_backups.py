"""Issue 20, Must 1: the size guard guards the good backups.

The guard compares with the last good backup (good_backups.json), never the
newest file; while it is tripped nothing is pruned, here or at rsync and
rclone copies, for as many nights as it lasts; a missing, empty or dangling
services/ or volumes/ that the last good backup held is a warning (exit 3);
--accept-smaller says once that the data shrank on purpose.  Real backups of
a built tree with --no-stop; real rsync and rclone (local remote)."""
import json
import os
import shutil
import unittest
from unittest import mock

from iotstack_backup import good_backups, iotstack
from iotstack_backup.good_backups import (
    ACCEPTED, ADOPTED, DANGLING, EMPTY, FIRST, MISSING, PASSED, PRESENT, TRIPPED,
    BackupRecord, judge, last_good_backup, retention_allowed, with_entry, withhold_rolling)
from tests.plainstack import NOW, PlainStackTestCase

ALL_THERE = {"services": (PRESENT, None), "volumes": (PRESENT, None)}


def entry(name, size, guard=PASSED, held=("services", "volumes"), complete=True):
    return BackupRecord(names=(name,), size=size, finished="2026-11-25T02:00:00", held=held,
                        complete=complete, guard=guard)


class JudgeTest(unittest.TestCase):
    GOOD = entry("backup/backup_2026-11-25_0200.tar.gz", 1000)

    def test_table(self):
        cases = [
            # (what, size, states, reference, accept, guard, warnings that must appear)
            ("first backup", 10, ALL_THERE, None, False, FIRST, []),
            ("same size", 900, ALL_THERE, self.GOOD, False, PASSED, []),
            ("half is fine", 500, ALL_THERE, self.GOOD, False, PASSED, []),
            ("less than half", 499, ALL_THERE, self.GOOD, False, TRIPPED,
             ["less than half the size of the last good backup, backup/backup_2026-11-25"]),
            ("accepted", 10, ALL_THERE, self.GOOD, True, ACCEPTED, []),
            ("volumes missing, held before", 900,
             dict(ALL_THERE, volumes=(MISSING, None)), self.GOOD, False, TRIPPED,
             ["volumes/ is missing, though the last good backup", "not mounted"]),
            ("services empty, held before", 900,
             dict(ALL_THERE, services=(EMPTY, None)), self.GOOD, False, TRIPPED,
             ["services/ is empty"]),
            ("volumes dangling, held before", 900,
             dict(ALL_THERE, volumes=(DANGLING, "/mnt/ssd/volumes")), self.GOOD, False,
             TRIPPED, ["volumes/ is a symlink to /mnt/ssd/volumes, which does not exist"]),
            ("volumes missing, never held: a note", 900,
             dict(ALL_THERE, volumes=(MISSING, None)),
             entry("backup/a.tar.gz", 1000, held=("services",)), False, PASSED, []),
            ("volumes missing, adopted (unknown): a note", 900,
             dict(ALL_THERE, volumes=(MISSING, None)),
             entry("backup/a.tar.gz", 1000, guard=ADOPTED, held=None), False, PASSED, []),
            ("dangling with no history is still a warning", 10,
             dict(ALL_THERE, volumes=(DANGLING, "/mnt/ssd/v")), None, False, TRIPPED,
             ["symlink to /mnt/ssd/v, which does not exist"]),
        ]
        for what, size, states, reference, accept, guard, warnings in cases:
            with self.subTest(what):
                verdict = judge(size, states, reference, accept)
                self.assertEqual(verdict.guard, guard)
                text = "\n".join(verdict.warnings)
                for expected in warnings:
                    self.assertIn(expected, text)
                self.assertEqual(bool(verdict.warnings), guard == TRIPPED)
                if guard == TRIPPED:
                    self.assertIn("--accept-smaller", text)
                    # one line per thing gone
                    self.assertTrue(all("\n" not in w for w in verdict.warnings))

    def test_last_good_skips_tripped_and_incomplete(self):
        entries = [entry("backup/a.tar.gz", 1000), entry("backup/b.tar.gz", 10, guard=TRIPPED),
                   entry("backup/c.tar.gz", 990, complete=False)]
        self.assertEqual(last_good_backup(entries).names, ("backup/a.tar.gz",))
        self.assertIsNone(last_good_backup(entries[1:]))

    def test_history_never_drops_the_reference(self):
        entries = [entry("backup/good.tar.gz", 1000)]
        for n in range(10):
            entries = with_entry(entries, entry("backup/small%d.tar.gz" % n, 1, guard=TRIPPED),
                                 limit=4)
        self.assertEqual(len(entries), 4)
        self.assertEqual(last_good_backup(entries).names, ("backup/good.tar.gz",))

    def test_rolling_and_retention_rules(self):
        tripped, passed = good_backups.Verdict(TRIPPED), good_backups.Verdict(PASSED)
        self.assertTrue(withhold_rolling(tripped, True, True))
        self.assertTrue(withhold_rolling(passed, False, True))  # incomplete (issue 21)
        self.assertFalse(withhold_rolling(tripped, True, False))
        self.assertFalse(withhold_rolling(passed, True, True))
        self.assertIsNone(retention_allowed(passed, True, True))
        self.assertIn("size guard", retention_allowed(tripped, True, True))
        self.assertIn("--no-verify", retention_allowed(passed, False, True))
        self.assertIn("incomplete", retention_allowed(passed, True, False))


def name(stamp):
    return "backup_%s.tar.gz" % stamp


class GuardRunTest(PlainStackTestCase):
    """End to end: nights of an unmounted disk, then the disk back."""

    OLD = ["2026-11-20_0200", "2026-11-21_0200", "2026-11-22_0200"]

    def at(self, day, hour=2):
        return mock.patch.object(iotstack, "now_local",
                                 return_value=NOW.replace(day=day, hour=hour))

    def dated_names(self, folder=None):
        folder = folder or os.path.join(self.backups, "backup")
        return sorted(n for n in os.listdir(folder) if n.startswith("backup_"))

    def record(self):
        with open(os.path.join(self.backups, good_backups.RECORD_NAME)) as f:
            return json.load(f)["backups"]

    def unmount_volumes(self):
        """volumes/ on an "SSD" that is not mounted: a dangling symlink."""
        ssd = os.path.join(self.tmp, "ssd")
        os.makedirs(ssd)
        shutil.move(os.path.join(self.stack, "volumes"), os.path.join(ssd, "volumes"))
        os.symlink(os.path.join(ssd, "volumes"), os.path.join(self.stack, "volumes"))
        hidden = os.path.join(self.tmp, "ssd-unmounted")
        os.rename(ssd, hidden)
        return lambda: os.rename(hidden, ssd)

    def test_two_nights_unmounted_prune_nothing_here_or_off_site(self):
        if not (shutil.which("rsync") and shutil.which("rclone")):
            self.skipTest("needs rsync and rclone")
        usb, nas = os.path.join(self.tmp, "usb"), os.path.join(self.tmp, "nas")
        os.makedirs(usb)
        os.makedirs(nas)
        copies = ["--copy-to", "rsync:" + usb, "--copy-to", "rclone::local:" + nas]
        keep = ["--keep", "1"]
        for day in (20, 21, 22):  # three good nights, pruned to one as asked
            with self.at(day):
                code, _out, err = self.backup("3", *keep + copies)
            self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.dated_names(), [name("2026-11-22_0200")])
        remount = self.unmount_volumes()
        host = iotstack.host_folder()
        for day in (23, 24):  # two nights with the SSD gone
            with self.at(day):
                code, out, err = self.backup("3", *keep + copies)
            self.assertEqual(code, 3, err)
            self.assertIn("volumes/ is a symlink to %s, which does not exist, though the last "
                          "good backup (backup/%s) held it" % (
                              os.path.join(self.tmp, "ssd", "volumes"), name("2026-11-22_0200")),
                          out)
            self.assertIn("less than half the size of the last good backup", out)
            # Nothing pruned anywhere: the good backup is still here and off-site.
            for folder in (os.path.join(self.backups, "backup"),
                           os.path.join(usb, host, "backup"), os.path.join(nas, host, "backup")):
                self.assertIn(name("2026-11-22_0200"), self.dated_names(folder), folder)
        self.assertEqual(self.dated_names(), [name(s) for s in (
            "2026-11-22_0200", "2026-11-23_0200", "2026-11-24_0200")])
        self.assertEqual([e["guard"] for e in self.record()][-2:], [TRIPPED, TRIPPED])
        remount()  # the disk is back: a good backup, and only now --keep prunes
        with self.at(25):
            code, out, err = self.backup("3", *keep + copies)
        self.assertEqual((code, err), (0, ""), out)
        for folder in (os.path.join(self.backups, "backup"), os.path.join(usb, host, "backup"),
                       os.path.join(nas, host, "backup")):
            self.assertEqual(self.dated_names(folder), [name("2026-11-25_0200")], folder)

    def test_a_good_rolling_archive_is_not_replaced_by_a_tripped_one(self):
        with self.at(19):  # Thursday: rolling/backup_4
            code, _out, err = self.backup("3")
        self.assertEqual((code, err), (0, ""))
        rolling = os.path.join(self.backups, "rolling", "backup_4.tar.gz")
        good = os.stat(rolling)
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        with self.at(26):  # Thursday again, TYPE 3: the dated name only
            code, out, _err = self.backup("3")
        self.assertEqual(code, 3)
        self.assertEqual(os.stat(rolling).st_ino, good.st_ino)
        self.assertNotIn("Rolling copy", out)
        with self.at(26, 3):  # TYPE 2: the dated name instead of the rolling one
            code, out, _err = self.backup("2")
        self.assertEqual(code, 3)
        self.assertEqual(os.stat(rolling).st_ino, good.st_ino)
        self.assertIn("Backup complete: ./backups/backup/backup_2026-11-26_0300.tar.gz", out)
        with open(self.newest_log()) as f:
            self.assertIn("Rolling File: rolling/backup_4.tar.gz not replaced", f.read())

    def newest_log(self):
        logs = os.path.join(self.backups, "logs")
        return max((os.path.join(logs, n) for n in os.listdir(logs)), key=os.path.getmtime)

    def test_missing_and_empty_items_are_warnings_when_held(self):
        with self.at(20):
            self.assertEqual(self.backup("1")[0], 0)
        os.rename(os.path.join(self.stack, "services"), os.path.join(self.tmp, "services"))
        with self.at(21):
            code, out, _err = self.backup("1")
        self.assertEqual(code, 3)
        self.assertIn("services/ is missing, though the last good backup (backup/%s) held it: "
                      "is the disk that holds it not mounted" % name("2026-11-20_0200"), out)
        os.mkdir(os.path.join(self.stack, "services"))
        with self.at(22):
            code, out, _err = self.backup("1")
        self.assertEqual(code, 3)
        self.assertIn("services/ is empty, though the last good backup (backup/%s)"
                      % name("2026-11-20_0200"), out)

    def test_accept_smaller_is_said_once(self):
        for day in (20, 21):
            with self.at(day):
                self.assertEqual(self.backup("1")[0], 0)
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        with self.at(22):
            code, out, _err = self.backup("1", "--keep", "1", "--accept-smaller")
        self.assertEqual(code, 0, out)
        self.assertNotIn("Warning", out)
        self.assertEqual(self.dated_names(), [name("2026-11-22_0200")])
        self.assertEqual(self.record()[-1]["guard"], ACCEPTED)
        for day in (23, 24):
            with self.at(day):
                code, out, _err = self.backup("1", "--keep", "1")
            self.assertEqual((code, out.count("Warning")), (0, 0), out)
        self.assertEqual(self.dated_names(), [name("2026-11-24_0200")])

    def test_archives_from_before_the_record_are_adopted(self):
        folder = os.path.join(self.backups, "backup")
        os.makedirs(folder, exist_ok=True)
        big = os.path.join(folder, name("2026-11-01_0200"))
        with open(big, "wb") as f:
            f.write(os.urandom(4 << 20))
        for day in (20, 21):  # both small nights compare with the adopted archive
            with self.at(day):
                code, out, _err = self.backup("1", "--keep", "1")
            self.assertEqual(code, 3, out)
            self.assertIn("last good backup, backup/%s" % name("2026-11-01_0200"), out)
            self.assertTrue(os.path.exists(big))
        self.assertEqual([e["guard"] for e in self.record()], [ADOPTED, TRIPPED, TRIPPED])

    def test_a_damaged_record_is_set_aside(self):
        with self.at(20):
            self.assertEqual(self.backup("1")[0], 0)
        with open(os.path.join(self.backups, good_backups.RECORD_NAME), "w") as f:
            f.write("{not json")
        with self.at(21):
            code, _out, err = self.backup("1")
        self.assertEqual((code, err), (0, ""))
        with open(self.newest_log()) as f:
            log = f.read()
        self.assertIn("good-backups.json could not be read", log)
        self.assertIn("comparing with the newest archive, backup/%s" % name("2026-11-20_0200"),
                      log)
        self.assertEqual([e["guard"] for e in self.record()], [ADOPTED, PASSED])
        mode = os.stat(os.path.join(self.backups, good_backups.RECORD_NAME)).st_mode & 0o777
        self.assertEqual(mode, 0o640)

    def test_no_verify_prunes_nothing(self):
        """Issue 20, item 10: retention follows only a verified archive."""
        for day in (20, 21):
            with self.at(day):
                self.assertEqual(self.backup("1")[0], 0)
        with self.at(22):
            code, _out, err = self.backup("1", "--keep", "1", "--no-verify")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(self.dated_names()), 3)
        with open(self.newest_log()) as f:
            self.assertIn("Retention: no old backup removed, here or at the copies: this backup "
                          "was not verified (--no-verify)", f.read())
        with self.at(23):
            self.assertEqual(self.backup("1", "--keep", "1")[0], 0)
        self.assertEqual(self.dated_names(), [name("2026-11-23_0200")])

    def test_dry_run_warns_as_the_run_would(self):
        with self.at(20):
            self.assertEqual(self.backup("1")[0], 0)
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        with self.at(21):
            code, out, _err = self.backup("1", "--dry-run")
        self.assertEqual(code, 3)
        self.assertIn("Warning: volumes/ is missing, though the last good backup", out)


if __name__ == "__main__":
    unittest.main()
