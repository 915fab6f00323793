"""Table tests for the pure decisions of the iotstack_backup package."""
import datetime
import errno
import gzip
import io
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
from unittest import mock
from iotstack_backup import archive_writer, backup, iotstack, restore, settings, tarformat, unpack



def member(name, kind="file", linkname=""):
    m = tarformat.TarMember()
    m.name, m.type, m.linkname = name, kind, linkname
    m.mode, m.uid, m.gid, m.size, m.mtime = 0o644, 0, 0, 0, 0
    return m


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


class TarFormatTest(unittest.TestCase):
    def read_back(self, data):
        with tarfile.open(fileobj=io.BytesIO(data + bytes(1024)), mode="r:") as tf:
            return tf.getmembers()

    def test_header_is_read_by_tarfile_and_our_reader(self):
        long_dir = "volumes/" + "d" * 90 + "/" + "e" * 90
        table = [
            (b"volumes/a.txt", tarformat.TYPE_FILE, 0o4755, 1000, 472, 5, 1_700_000_000, b""),
            (long_dir.encode() + b"/f.txt", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 1, b""),
            (b"v/" + b"x" * 300, tarformat.TYPE_FILE, 0o600, 3_000_000, 4_000_000, 0, 0, b""),
            (b"v/link", tarformat.TYPE_SYMLINK, 0o777, 1, 2, 0, 5, b"/" + b"t" * 150),
            ("v/ünï cödé".encode(), tarformat.TYPE_DIR, 0o1777, 0, 0, 0, 7, b""),
            (b"v/old", tarformat.TYPE_FILE, 0o644, 0, 0, 0, -86400, b""),
        ]
        for name, kind, mode, uid, gid, size, mtime, link in table:
            data = tarformat.tar_header(name, kind, mode, uid, gid, size, mtime, link)
            data += b"a" * size + bytes(-size % 512)
            self.assertEqual(len(data) % 512, 0)
            (info,) = self.read_back(data)
            self.assertEqual(info.name, name.decode().rstrip("/"))
            self.assertEqual((info.mode, info.uid, info.gid, info.size, int(info.mtime)),
                             (mode, uid, gid, size, mtime))
            self.assertEqual((info.uname, info.gname), ("", ""))
            self.assertEqual(info.linkname, link.decode())
            (ours,) = list(tarformat.TarReader([data, bytes(1024)]))
            self.assertEqual((ours.name, ours.mode, ours.uid, ours.gid, ours.size, ours.mtime,
                              ours.linkname), (name.decode(), mode, uid, gid, size, mtime,
                                               link.decode()))

    def test_header_checksum_forms(self):
        def with_checksum(header, text):
            return header[:148] + text + header[156:]

        header = tarformat.tar_header("volumes/é".encode(), tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
        field = header[148:156]
        self.assertRegex(field, rb"^[0-7]{6}\0 $")  # what GNU tar writes
        unsigned = int(field[:6], 8)
        # é is two bytes above 127: a tar summing signed bytes gets 512 less.
        table = [
            (field, True),
            (b"%07o\0" % unsigned, True),
            (b"%6o\0 " % unsigned, True),
            (b"%06o\0 " % (unsigned - 512), True),
            (b"%06o\0 " % (unsigned + 1), False),
            (b"%06o\0 " % (unsigned - 256), False),
            (b"        ", False),
        ]
        for text, ok in table:
            self.assertEqual(tarformat.header_checksum_ok(with_checksum(header, text)), ok, text)

    def test_gnu_tar_reads_long_names(self):
        name = ("volumes/" + "n" * 120 + "/" + "m" * 140).encode()
        data = tarformat.tar_header(name, tarformat.TYPE_FILE, 0o640, 1883, 1883, 3, 0) + b"abc" + bytes(509)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.tar")
            with open(path, "wb") as f:
                f.write(data + bytes(1024))
            listing = subprocess.run(["tar", "-tvf", path, "--numeric-owner"],
                                     stdout=subprocess.PIPE, check=True).stdout.decode()
        self.assertIn("1883/1883", listing)
        self.assertIn(name.decode(), listing)

    def test_split_ustar_name(self):
        self.assertEqual(tarformat.split_ustar_name(b"a/b"), (b"", b"a/b"))
        prefix, rest = tarformat.split_ustar_name(b"p" * 150 + b"/" + b"n" * 99)
        self.assertEqual((len(prefix), len(rest)), (150, 99))
        self.assertIsNone(tarformat.split_ustar_name(b"x" * 101))
        self.assertIsNone(tarformat.split_ustar_name(b"p" * 156 + b"/n"))

    def test_pax_record_length_counts_itself(self):
        for value in (b"", b"x" * 5, b"x" * 93, b"x" * 994, b"x" * 9995):
            record = tarformat.pax_record(b"path", value)
            self.assertEqual(int(record.split(b" ", 1)[0]), len(record))

    def test_parse_number(self):
        table = [(b"0000644\0", 0o644), (b"       \0", 0), (b"\0" * 8, 0),
                 (b"\x80" + bytes(6) + b"\x10", 16), (b"  17 \0", 0o17)]
        for field, value in table:
            self.assertEqual(tarformat.parse_number(field), value)
        for bad in (b"12x\0", b"-1\0", b"+7\0", b"7_7\0"):
            with self.assertRaises(tarformat.ArchiveError, msg=bad):
                tarformat.parse_number(bad)

    def test_hostile_pax_numbers_are_archive_errors(self):
        for record in (b"uid=abc", b"gid=-5", b"size=1e3", b"mtime=nan", b"mtime=inf",
                       b"uid=99999999999999999999999999x", b"uid=4294967295",
                       b"gid=99999999999999999999", b"mtime=1e300"):
            key, value = record.split(b"=")
            data = tarformat.pax_record(key, value)
            pax = tarformat.tar_header(b"PaxHeaders/a", b"x", 0o644, 0, 0, len(data), 0)
            member = tarformat.tar_header(b"volumes/a", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
            stream = pax + data + bytes(-len(data) % 512) + member + bytes(1024)
            with self.assertRaises(tarformat.ArchiveError, msg=record):
                list(tarformat.TarReader([stream]))

    def test_reader_refuses_damaged_headers(self):
        good = tarformat.tar_header(b"a", tarformat.TYPE_FILE, 0o644, 0, 0, 0, 0)
        flipped = bytearray(good)
        flipped[10] ^= 0x01
        with self.assertRaisesRegex(tarformat.ArchiveError, "corrupt tar header"):
            list(tarformat.TarReader([bytes(flipped)]))
        with self.assertRaisesRegex(tarformat.ArchiveError, "truncated"):
            list(tarformat.TarReader([good[:300]]))
        data_member = tarformat.tar_header(b"a", tarformat.TYPE_FILE, 0o644, 0, 0, 1000, 0) + b"x" * 600
        with self.assertRaisesRegex(tarformat.ArchiveError, "truncated"):
            list(tarformat.TarReader([data_member]))
        odd = bytearray(tarformat.tar_header(b"a", b"S", 0o644, 0, 0, 0, 0))
        with self.assertRaisesRegex(tarformat.ArchiveError, "unsupported"):
            list(tarformat.TarReader([bytes(odd)]))


class FileSinkTest(unittest.TestCase):
    def sink(self, **kwargs):
        holder = tempfile.TemporaryDirectory()
        self.addCleanup(holder.cleanup)
        fd = os.open(os.path.join(holder.name, "out"), os.O_WRONLY | os.O_CREAT)
        self.addCleanup(os.close, fd)
        self.path = os.path.join(holder.name, "out")
        return archive_writer.FileSink(fd, **kwargs)

    def test_syncs_on_its_thread_and_reports_what_is_durable(self):
        calls, durable = [], []
        real = os.fdatasync

        def fdatasync(fd):
            calls.append(threading.current_thread().name)
            real(fd)

        sink = self.sink(on_durable=durable.append, sync_every=1000)
        with mock.patch("os.fdatasync", fdatasync):
            for _ in range(50):
                sink.write(b"x" * 300)
                time.sleep(0.001)
            deadline = time.monotonic() + 10
            while not durable and time.monotonic() < deadline:
                time.sleep(0.01)
            sink.close()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"x" * 15000)
        self.assertEqual(sink.written, 15000)
        self.assertTrue(calls)
        self.assertEqual(set(calls), {"archive-sync"})
        self.assertEqual(len(durable), len(calls))
        self.assertEqual(durable, sorted(durable))
        self.assertTrue(all(1000 <= d <= 15000 for d in durable), durable)
        self.assertFalse(sink._thread.is_alive())

    def test_no_thread_below_one_step(self):
        sink = self.sink(sync_every=1000)
        sink.write(b"x" * 999)
        sink.close()
        self.assertIsNone(sink._thread)

    def test_a_sync_error_is_raised_by_the_next_call(self):
        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        with mock.patch("os.fdatasync", failing):
            sink = self.sink(sync_every=10)
            sink.write(b"x" * 10)
            sink._thread.join(5)
            with self.assertRaisesRegex(OSError, "Input/output error"):
                sink.write(b"y")
            with self.assertRaisesRegex(OSError, "Input/output error"):
                sink.close()


class FollowingVerifierTest(unittest.TestCase):
    def archive_bytes(self, members):
        body = b"".join(tarformat.tar_header(b"volumes/f%d" % i, tarformat.TYPE_FILE, 0o644, 0, 0, 3, 0)
                        + b"abc" + bytes(509) for i in range(members))
        return gzip.compress(body + bytes(1024))

    def test_reads_only_what_is_durable_and_counts_members(self):
        data = self.archive_bytes(300)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.tar.gz")
            with open(path, "wb") as f:
                f.write(data[:1000])
                f.flush()
                verifier = archive_writer.FollowingVerifier(path)
                verifier.advance(1000)
                f.write(data[1000:])
            self.assertEqual(verifier.finish(len(data), 300), 300)

    def test_damage_and_wrong_counts_fail(self):
        data = bytearray(self.archive_bytes(50))
        data[len(data) // 2] ^= 0xFF
        cases = [(bytes(data), 50, "CRC|invalid|corrupt"),
                 (self.archive_bytes(50), 51, "50 members, 51 were written"),
                 (self.archive_bytes(50)[:-20], 50, "truncated")]
        with tempfile.TemporaryDirectory() as tmp:
            for content, members, message in cases:
                path = os.path.join(tmp, "a.tar.gz")
                with open(path, "wb") as f:
                    f.write(content)
                verifier = archive_writer.FollowingVerifier(path)
                with self.assertRaisesRegex(tarformat.ArchiveError, message):
                    verifier.finish(len(content), members)

    def test_cancel_while_waiting(self):
        with tempfile.NamedTemporaryFile() as f:
            verifier = archive_writer.FollowingVerifier(f.name)
            verifier.cancel()
        self.assertFalse(verifier._thread.is_alive())


class MemberPolicyTest(unittest.TestCase):
    def test_normalize_member_name(self):
        ok = [("./volumes/a", "volumes/a"), ("volumes//a/./b/", "volumes/a/b"), ("./", ""),
              ("services", "services")]
        for name, rel in ok:
            self.assertEqual(unpack.normalize_member_name(name), rel)
        for bad in ("/etc/passwd", "../x", "volumes/../../x", "a/..", "", "a\0b"):
            with self.assertRaises(tarformat.ArchiveError, msg=bad):
                unpack.normalize_member_name(bad)

    def test_policy(self):
        def run(members):
            policy = unpack.MemberPolicy()
            return [policy.check(m) for m in members]

        self.assertEqual(run([member("volumes/l", "symlink", "/etc"), member("volumes/m")]),
                         ["volumes/l", "volumes/m"])
        refused = [
            [member("volumes/l", "symlink", "/etc"), member("volumes/l/passwd")],
            [member("volumes/l", "symlink", "x"), member("volumes/x", "symlink", "/"),
             member("volumes/l/y/z")],
            [member("volumes/h", "hardlink", "/etc/passwd")],
            [member("volumes/h", "hardlink", "volumes/later"), member("volumes/later")],
            [member("volumes/l", "symlink", "f"), member("volumes/h", "hardlink", "volumes/l")],
            [member("./", "file")],
            # A folder already passed, then made a symlink: its next member
            # must not pass on the strength of the first.
            [member("volumes/d/a"), member("volumes/d", "symlink", "/etc"),
             member("volumes/d/b")],
            [member("volumes/d/e/a"), member("volumes/d", "symlink", "/etc"),
             member("volumes/d/e/b")],
            [member("volumes/d/f"), member("volumes/d", "symlink", "/etc"),
             member("volumes/h", "hardlink", "volumes/d/f")],
        ]
        for members in refused:
            with self.assertRaises(tarformat.ArchiveError, msg=[m.name for m in members]):
                run(members)
        self.assertEqual(run([member("volumes/f"), member("volumes/h", "hardlink",
                                                           "./volumes/f")]),
                         ["volumes/f", "volumes/h"])

    def test_link_targets_are_checked_even_when_files_are_not_tracked(self):
        # The staging restore leaves "is it an earlier file" to the disk, but
        # never the path: a link through an archive symlink reaches outside.
        for track in (True, False):
            policy = unpack.MemberPolicy(track_files=track)
            policy.check(member("volumes/l", "symlink", "/etc"))
            policy.check(member("volumes/f"))
            for target in ("volumes/l/passwd", "volumes/l", "/etc/passwd", "../x", "a/../../x"):
                with self.assertRaises(tarformat.ArchiveError, msg=(track, target)):
                    policy.check(member("volumes/h", "hardlink", target))
            self.assertEqual(policy.check(member("volumes/h", "hardlink", "volumes/f")),
                             "volumes/h")
        self.assertEqual(unpack.MemberPolicy(track_files=False).files, set())

    def test_restorable_and_units(self):
        self.assertTrue(unpack.restorable("volumes/a", []))
        self.assertFalse(unpack.restorable("menu.sh", []))
        self.assertFalse(unpack.restorable("backups/x", []))
        self.assertTrue(unpack.restorable("volumes/a/b", ["volumes/a"]))
        self.assertFalse(unpack.restorable("volumes/ab", ["volumes/a"]))
        self.assertFalse(unpack.restorable("volumes", ["volumes/a"]))
        self.assertEqual(restore.replaced_units({"volumes", "services"}, []),
                         ["services", "volumes"])
        self.assertEqual(restore.replaced_units({"volumes"}, ["volumes/b", "volumes/a"]),
                         ["volumes/a", "volumes/b"])
        self.assertEqual(unpack.staging_ancestors("volumes/a/b"), ["volumes", "volumes/a"])
        self.assertEqual(unpack.staging_ancestors("volumes"), [])


class InstallTest(unittest.TestCase):
    def test_the_files_the_readme_says_to_copy_are_all_it_needs(self):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
            line = re.search(r"^cp -r (.*) ~/IOTstack/$", f.read(), re.M)
        listed = line.group(1).split()
        top = sorted(os.path.basename(path) for path in glob.glob(os.path.join(repo, "*.py")))
        self.assertEqual(sorted(listed), sorted(top + ["iotstack_backup"]))
        package = sorted(os.path.basename(path)[:-3] for path in
                         glob.glob(os.path.join(repo, "iotstack_backup", "*.py")))
        with tempfile.TemporaryDirectory() as tmp:
            for name in listed:
                source = os.path.join(repo, name)
                if os.path.isdir(source):
                    shutil.copytree(source, os.path.join(tmp, name),
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(source, tmp)
            env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
            imports = "; ".join("import iotstack_backup.%s" % name for name in package)
            done = subprocess.run([sys.executable, "-c", imports], cwd=tmp, env=env,
                                  stderr=subprocess.PIPE, universal_newlines=True)
            self.assertEqual(done.returncode, 0, done.stderr)
            for script in ("backup.py", "restore.py"):
                # From another folder, as cron runs it: the package is found
                # beside the script.
                done = subprocess.run([sys.executable, os.path.join(tmp, script), "--help"],
                                      cwd="/", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, universal_newlines=True)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn("exit codes:", done.stdout)


if __name__ == "__main__":
    unittest.main()
