"""--keep-daily, --keep-weekly, --keep-monthly with --keep: the one retention
path (names -> (stem, datetime) -> retention.backups_to_remove) as a table,
then end to end here and at rsync and rclone destinations."""
import os
import shutil
import unittest

from iotstack_backup import iotstack
from tests.plainstack import PlainStackTestCase


def name(stamp, suffix=".tar.gz"):
    return "backup_%s%s" % (stamp, suffix)


class CalendarDecisionTest(unittest.TestCase):
    def test_table(self):
        # Thu 26 Nov 2026 is the newest; 23 Nov is a Monday (ISO week 48).
        days = [name("2026-11-%02d_0200" % d) for d in (20, 21, 22, 23, 24, 25, 26)]
        evening = name("2026-11-25_2200")
        october = [name("2026-10-05_0200"), name("2026-10-30_0200")]
        september = [name("2026-09-15_0200")]
        everything = september + october + days + [evening]
        table = [
            # (names, rules, just_written, removed newest first)
            (everything, {}, None, []),
            (days, {"keep_daily": 7}, None, []),
            (days, {"keep_daily": 3}, None, days[:4][::-1]),
            # 25 Nov: the evening backup is that day's newest, the 02:00 one goes
            (days + [evening], {"keep_daily": 2}, None, days[:6][::-1]),
            # ISO weeks: 26, 25, 24, 23 Nov are week 48; 22, 21, 20 week 47
            (days, {"keep_weekly": 2}, None, days[3:6][::-1] + days[:2][::-1]),
            (everything, {"keep_monthly": 3}, None,
             [evening] + days[:6][::-1] + october[:1]),
            # the union: 2 last + 1 monthly for 3 months
            (everything, {"keep_last": 2, "keep_monthly": 3}, None,
             days[:6][::-1] + october[:1]),
            (everything, {"keep_last": 1, "keep_daily": 2, "keep_weekly": 2,
                          "keep_monthly": 2}, None,
             days[3:6][::-1] + days[:2][::-1] + october[:1] + september),
        ]
        for names, rules, just_written, expected in table:
            self.assertEqual(iotstack.dated_backups_to_remove(names, just_written=just_written,
                                                              **rules),
                             expected, (rules, just_written))

    def test_an_archive_and_its_gpg_copy_are_one_backup(self):
        old, new = "2026-11-24_0200", "2026-11-25_0200"
        names = [name(old), name(old, ".tar.gz.gpg"), name(new, ".tar.gz.gpg"),
                 "backup_4.tar.gz.gpg", "notes.gpg", name(old, ".tar.gz.gpg.partial")]
        self.assertEqual(iotstack.dated_backups_to_remove(names, keep_last=1),
                         [name(old), name(old, ".tar.gz.gpg")])

    def test_the_archive_just_written_is_never_chosen(self):
        # The clock was set back: by its name the new archive is the oldest.
        names = [name("2026-11-%02d_0200" % d) for d in (20, 21, 22)]
        new = name("2026-01-01_0000")
        for rules in ({"keep_last": 1}, {"keep_daily": 1}, {"keep_weekly": 1},
                      {"keep_monthly": 1}):
            doomed = iotstack.dated_backups_to_remove(names + [new], just_written=new, **rules)
            self.assertNotIn(new, doomed, rules)
            self.assertEqual(doomed, names[::-1], rules)

    def test_foreign_files_are_never_chosen(self):
        names = ["notes.txt", "backup_4.tar.gz", "backup_2026-11-20.tar.gz",
                 "backup_2026-13-40_0200.tar.gz", ".backup_2026-11-19_0200.tar.gz.7.partial",
                 "mybackup_2026-11-01_0200.tar.gz", name("2026-11-21_0200"),
                 name("2026-11-22_0200")]
        self.assertEqual(iotstack.dated_backups_to_remove(names, keep_daily=1),
                         [name("2026-11-21_0200")])


class CalendarRetentionTest(PlainStackTestCase):
    OLD = ["2026-09-15_0200", "2026-10-05_0200", "2026-10-30_0200", "2026-11-20_0200",
           "2026-11-24_0200", "2026-11-25_0200"]

    def make_old(self, folder, with_logs=True):
        for stamp in self.OLD:
            paths = [os.path.join(folder, name(stamp))]
            if with_logs:
                paths.append(os.path.join(self.backups, "logs", "backup_%s.log" % stamp))
            for path in paths:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write("old")
        with open(os.path.join(folder, "old_note.txt"), "w") as f:
            f.write("not a backup")

    def kept(self, folder):
        return sorted(n for n in os.listdir(folder) if n.startswith("backup_"))

    def test_local_backups_and_their_logs(self):
        self.make_old(os.path.join(self.backups, "backup"))
        code, _out, err = self.backup("1", "--keep", "2", "--keep-monthly", "3")
        self.assertEqual((code, err), (0, ""))
        # --keep 2: 26 and 25 Nov; monthly: Nov (26), Oct (30), Sep (15)
        expected = ["2026-09-15_0200", "2026-10-30_0200", "2026-11-25_0200", "2026-11-26_0200"]
        self.assertEqual(self.kept(os.path.join(self.backups, "backup")),
                         [name(s) for s in expected])
        self.assertEqual(self.kept(os.path.join(self.backups, "logs")),
                         ["backup_%s.log" % s for s in expected])
        self.assertTrue(os.path.exists(os.path.join(self.backups, "backup", "old_note.txt")))
        with open(max((os.path.join(self.backups, "logs", n) for n in
                       os.listdir(os.path.join(self.backups, "logs"))), key=os.path.getmtime)) as f:
            log = f.read()
        self.assertIn("Removed old backup (--keep 2, --keep-monthly 3): "
                      "backup/backup_2026-10-05_0200.tar.gz", log)

    def test_backup_ini_keys_and_dry_run(self):
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nkeep-daily = 2\nkeep-weekly = 1\n")
        self.make_old(os.path.join(self.backups, "backup"))
        code, out, err = self.backup("--print-config")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"keep-daily += 2 +\(backup\.ini\)")
        self.assertRegex(out, r"keep-monthly += \(none\) +\(default\)")
        code, out, err = self.backup("1", "--dry-run")
        self.assertEqual((code, err), (0, ""))
        # daily 2: 26 (new), 25; weekly 1: week 48 (26, new)
        for stamp in self.OLD[:-1]:
            self.assertIn("Would remove (--keep-daily 2, --keep-weekly 1): backup/%s"
                          % name(stamp), out)
        self.assertNotIn(name("2026-11-25_0200"), out)
        self.assertEqual(len(self.kept(os.path.join(self.backups, "backup"))), len(self.OLD))

    def test_bad_counts_are_refused(self):
        for option in ("--keep-daily", "--keep-weekly", "--keep-monthly"):
            code, _out, err = self.backup("1", option, "0")
            self.assertEqual(code, 2)
            self.assertIn(option, err)
        self.assertFalse(os.path.exists(self.dated))

    @unittest.skipUnless(shutil.which("rsync") and shutil.which("rclone"), "needs rsync and rclone")
    def test_at_rsync_and_rclone_destinations(self):
        usb, nas = os.path.join(self.tmp, "usb"), os.path.join(self.tmp, "nas")
        host = iotstack.host_folder()
        for root in (usb, nas):
            self.make_old(os.path.join(root, host, "backup"), with_logs=False)
        code, _out, err = self.backup("1", "--keep-daily", "1", "--keep-monthly", "2",
                                      "--copy-to", "rsync:" + usb,
                                      "--copy-to", "rclone::local:" + nas)
        self.assertEqual((code, err), (0, ""))
        expected = [name(s) for s in ("2026-10-30_0200", "2026-11-26_0200")]
        for root in (usb, nas):
            folder = os.path.join(root, host, "backup")
            self.assertEqual(self.kept(folder), expected, root)
            self.assertTrue(os.path.exists(os.path.join(folder, "old_note.txt")))


if __name__ == "__main__":
    unittest.main()
