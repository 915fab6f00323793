"""Table tests of iotstack: names, manifest, exclusions."""
import datetime
import os
import unittest

from iotstack_backup import (
    backup,
    iotstack,
    settings,
)


class NamesTest(unittest.TestCase):
    def test_rolling_weekday_is_sunday_zero(self):
        # 2026-11-22 is a Sunday.
        for day, expected in [(22, 0), (23, 1), (24, 2), (25, 3), (26, 4), (27, 5), (28, 6)]:
            now = datetime.datetime(2026, 11, day, 2, 0)
            self.assertEqual(iotstack.rolling_weekday(now), expected)

    def test_archive_stamp(self):
        self.assertEqual(iotstack.archive_stamp(datetime.datetime(2026, 1, 2, 3, 4)), "2026-01-02_0304")

    def test_first_free_stem(self):
        table = [
            (set(), "b"),
            ({"b"}, "b-2"),
            ({"b", "b-2"}, "b-3"),
            ({"b-2"}, "b"),
        ]
        for taken, expected in table:
            self.assertEqual(iotstack.first_free_stem("b", taken.__contains__), expected)

    def test_plan_backup(self):
        now = datetime.datetime(2026, 11, 26, 2, 0)
        existing = {"/s/backups/backup/backup_2026-11-26_0200.tar.gz"}
        plan = backup.plan_backup(3, now, "/s/backups", existing.__contains__)
        self.assertEqual(plan.dated, "/s/backups/backup/backup_2026-11-26_0200-2.tar.gz")
        self.assertEqual(plan.rolling, "/s/backups/rolling/backup_4.tar.gz")
        self.assertEqual(plan.log, "/s/backups/logs/backup_2026-11-26_0200-2.log")
        only_rolling = backup.plan_backup(2, now, "/s/backups", set().__contains__)
        self.assertIsNone(only_rolling.dated)
        self.assertEqual(only_rolling.targets, ["/s/backups/rolling/backup_4.tar.gz"])
        # A log left by a failed run also takes the name.
        logs = {"/s/backups/logs/backup_2026-11-26_0200.log"}
        self.assertTrue(backup.plan_backup(1, now, "/s/backups", logs.__contains__)
                        .dated.endswith("0200-2.tar.gz"))

    def test_partial_names_never_look_like_backups(self):
        temp = iotstack.partial_path("/s/backups/rolling/backup_4.tar.gz")
        name = os.path.basename(temp)
        self.assertTrue(name.startswith("."))
        self.assertTrue(name.endswith(".partial"))
        self.assertFalse(name.endswith(".tar.gz"))
        self.assertTrue(iotstack.is_partial_name(name))
        self.assertFalse(iotstack.is_partial_name("backup_4.tar.gz"))

    def test_backup_type_argument(self):
        for text in ("0", "4", "x", "", "33"):
            with self.assertRaisesRegex(Exception, "1, 2 or 3"):
                settings.backup_type(text)
        self.assertEqual([settings.backup_type(t) for t in "123"], [1, 2, 3])


class ManifestTest(unittest.TestCase):
    def test_manifest_items(self):
        table = [
            ({"services", "volumes"}, ["services/", "volumes/"], []),
            ({"volumes", "docker-compose.yml", "docker-compose.override.yml"},
             ["volumes/", "docker-compose.yml", "docker-compose.override.yml"], ["services/"]),
            ({"services", "volumes", "extra", ".tmp/databases_backup", "post_restore.sh", ".env"},
             ["services/", "volumes/", ".env", "extra/", ".tmp/databases_backup/",
              "post_restore.sh"], []),
            (set(), [], ["services/", "volumes/"]),
        ]
        for present, items, missing in table:
            self.assertEqual(iotstack.manifest_items(present.__contains__), (items, missing), present)

    def test_manifest_never_holds_backups_or_tmp(self):
        everything = {"backups", ".tmp", "menu.sh", "services", "volumes"}
        items, _ = iotstack.manifest_items(everything.__contains__)
        self.assertEqual(items, ["services/", "volumes/"])

    def test_is_excluded(self):
        table = [
            ("volumes/influxdb/data/x.tsm", ["*.tsm"], True),
            ("volumes/influxdb/data/x.tsm", ["volumes/influxdb/*"], True),
            ("volumes/influxdb/", ["volumes/influxdb"], True),
            ("volumes/influxdb/", ["influxdb/"], True),
            ("volumes/influxdb", ["influxdb/"], False),  # a file, pattern wants a dir
            ("volumes/nodered/data", ["volumes/influxdb"], False),
            ("volumes/a/log.txt", ["*.log"], False),
            ("volumes/a/b.log", ["./volumes/a/*"], True),
            ("volumes/a/b.log", [], False),
        ]
        for rel, patterns, expected in table:
            self.assertEqual(iotstack.is_excluded(rel, patterns), expected, (rel, patterns))

    def test_item_of(self):
        table = [
            ("volumes/a/b", "volumes"), ("volumes", "volumes"), ("volumesX", None),
            (".tmp/databases_backup/x.sql", ".tmp/databases_backup"), (".tmp/other", None),
            ("docker-compose.yml", "docker-compose.yml"), ("menu.sh", None),
            ("backups/backup/x.tar.gz", None), ("backup.ini", "backup.ini"),
            (".tmp", None), (".tmp/databases_backupX", None), ("", None),
            ("extra", "extra"), ("extra/a", "extra"), ("extras/a", None),
        ]
        for path, item in table:
            self.assertEqual(iotstack.item_of(path), item, path)


if __name__ == "__main__":
    unittest.main()
