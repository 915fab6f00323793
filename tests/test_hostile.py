"""Real trees and hostile environments (issue 13): every case runs the real
commands in a subprocess, as root and as the normal user `pi` (created when
the tests run as root), and asserts what is on disk, the exit code, the one
line on stderr and the log.  Docker is never used: the commands get a PATH
without it and --no-stop.  The disk cases with real mounts are in
tests/test_mounts.py."""
import fcntl
import glob
import io
import os
import shutil
import stat
import subprocess
import sys
import unittest
from unittest import mock

from iotstack_backup import archive_writer, iotstack, journal, offsite, run
from tests.support import BACKUP_PY, write
from tests.support import read_bytes as read
from tests.user_stack import (
    IS_ROOT,
    StackCase,
    chown_tree,
    demote_to,
    one_error_line,
    python_for_pi,
    users,
)


def root_only(test):
    if not IS_ROOT:
        test.skipTest("needs root to give a folder to another user")


class BackupsFolderTest(StackCase):
    """Must 1: the backups folder in every bad state: one line, no traceback."""

    def test_root_owned_backups_left_by_the_old_script(self):
        root_only(self)
        os.mkdir(self.backups, 0o755)  # root's, as sudo ./scripts/backup.sh left it
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "sudo chown -R pi: %s'" % self.backups)
        self.assertEqual(os.listdir(self.backups), [])
        # As root the same run gives the folder back to pi and succeeds.
        result = self.backup("root")
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        self.assertEqual(os.stat(self.backups).st_uid, self.pi.pw_uid)
        self.assertEqual(self.backup("pi").returncode, run.EXIT_OK)
        self.assertEqual(len(self.archives()), 2)

    def test_logs_folder_not_writable(self):
        root_only(self)
        os.makedirs(os.path.join(self.backups, "logs"))
        os.chown(self.backups, self.pi.pw_uid, self.pi.pw_gid)
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "sudo chown -R pi: %s'" % os.path.join(self.backups, "logs"))
        self.assertEqual(self.archives(), [])

    def test_backups_is_a_regular_file(self):
        for user in users():
            with self.subTest(user=user):
                write(self.backups, b"not a folder")
                result = self.backup(user)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                one_error_line(self, result.stderr, self.backups, "is not a folder")
                self.assertEqual(read(self.backups), b"not a folder")
                os.unlink(self.backups)

    def test_backups_is_a_symlink_to_an_unmounted_usb_disk(self):
        usb = os.path.join(self.tmp, "media", "usb")
        os.makedirs(usb)  # the mount point, with nothing mounted on it
        os.symlink(os.path.join(usb, "backups"), self.backups)
        for user in users():
            with self.subTest(user=user):
                result = self.backup(user)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                one_error_line(self, result.stderr, "symlink to %s/backups" % usb,
                               "mount that disk")
                self.assertEqual(os.listdir(usb), [])
                self.assertTrue(os.path.islink(self.backups))

    def test_dry_run_into_head(self):
        for user in users():
            with self.subTest(user=user):
                proc = subprocess.Popen(
                    [sys.executable if user == "root" or not IS_ROOT else python_for_pi(),
                     BACKUP_PY, "--dir", self.stack, "--dry-run",
                     "--no-stop"],
                    preexec_fn=demote_to(self.pi) if user == "pi" and IS_ROOT else None,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env={"PATH": self.bin, "HOME": self.tmp, "IOTSTACK_NO_DOCKER": "1"})
                self.assertTrue(proc.stdout.readline().startswith(b"IOTstack directory:"))
                proc.stdout.close()
                stderr = proc.stderr.read()
                proc.stderr.close()
                proc.wait(60)
                self.assertNotIn(b"Traceback", stderr)
                self.assertEqual(stderr, b"")
                self.assertFalse(os.path.exists(self.backups))


class UnreadableArchiveTest(StackCase):
    """Must 1 on restore's side: archives and folders pi may not read."""

    def setUp(self):
        super().setUp()
        self.assertEqual(self.backup("pi").returncode, run.EXIT_OK)
        (self.archive,) = self.archives()
        self.name = "backup/" + os.path.basename(self.archive)

    def test_verify_and_dry_run_of_an_unreadable_archive(self):
        root_only(self)
        os.chown(self.archive, 0, 0)
        os.chmod(self.archive, 0o600)
        for args in (["--verify", self.name], ["--dry-run", self.name], [self.name]):
            with self.subTest(args=args):
                result = self.run_as("pi", "restore.py", "--no-stop", "--yes", *args)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                one_error_line(self, result.stderr, self.archive, "Permission denied", "sudo")
        self.assertEqual(read(self.path("volumes/nodered/flows.json")), b"[]\n")
        # root can.
        result = self.run_as("root", "restore.py", "--verify", self.name)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)

    def test_list_with_an_unreadable_backup_folder(self):
        root_only(self)
        folder = os.path.join(self.backups, "backup")
        os.chown(folder, 0, 0)
        os.chmod(folder, 0o700)
        result = self.run_as("pi", "restore.py", "--list")
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "sudo chown -R pi: %s'" % folder)

    def test_restore_as_pi_over_root_owned_files(self):
        root_only(self)
        influx = self.path("volumes/influxdb")
        write(self.path("volumes/influxdb/data/new-since-backup"), b"live")
        chown_tree(influx, 0, 0)
        before = read(self.path("volumes/influxdb/data/new-since-backup"))
        result = self.restore("pi", self.name)
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "volumes/influxdb", "run restore.py with sudo")
        # Nothing changed, nothing left behind.
        self.assertEqual(read(self.path("volumes/influxdb/data/new-since-backup")), before)
        self.assertEqual(os.stat(influx).st_uid, 0)
        self.assertEqual(sorted(os.listdir(self.path(".tmp"))), ["iotstack-backup.lock"])
        # With sudo it works, and gives the files the owners they had.
        result = self.restore("root", self.name)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        self.assertFalse(os.path.exists(self.path("volumes/influxdb/data/new-since-backup")))
        self.assertEqual(os.stat(influx).st_uid, self.pi.pw_uid)


class WalkTest(StackCase):
    """Must 2: a live tree with unreadable, vanishing and growing entries."""

    def test_private_folder_of_a_container_is_a_warning(self):
        root_only(self)
        pg = self.path("volumes/postgres/data")
        write(os.path.join(pg, "PG_VERSION"), b"15\n")
        chown_tree(self.path("volumes/postgres"), 999, 999)
        os.chmod(pg, 0o700)
        result = self.run_as("pi", "backup.py", "--dry-run", "--no-stop")
        self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stderr)
        self.assertEqual(result.stderr, "")
        self.assertIn("Warning: cannot read volumes/postgres/data: Permission denied", result.stdout)
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stderr)
        self.assertEqual(result.stderr, "")
        self.assertIn("Warning: cannot read volumes/postgres/data", result.stdout)
        self.assertIn("Warning: cannot read volumes/postgres/data", self.newest_log())
        (archive,) = self.archives()
        names = subprocess.run(["tar", "-tzf", archive], stdout=subprocess.PIPE,
                               check=True, universal_newlines=True).stdout.split()
        self.assertIn("volumes/postgres/data/", names)
        self.assertNotIn("volumes/postgres/data/PG_VERSION", names)
        self.assertIn("volumes/influxdb/data/db.bin", names)
        # As root everything is read.
        result = self.backup("root")
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)

    def test_unreadable_file_as_the_user(self):
        secret = self.path("volumes/nodered/secret")
        write(secret, b"x", 0o000)
        if IS_ROOT:
            os.chown(secret, 0, 0)
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stderr)
        self.assertIn("Warning: cannot read volumes/nodered/secret", result.stdout)

    def walk(self, items, hook=None):
        excluded, notes, warnings = [], [], []
        rels = []
        for entry in archive_writer.iter_entries(self.stack, items, [], excluded, notes, warnings):
            rels.append(entry.rel)
            if hook:
                hook(entry.rel)
        return rels, notes, warnings

    def test_entries_that_vanish_are_noted(self):
        write(self.path("volumes/nodered/a"), b"x")
        write(self.path("volumes/nodered/b-gone"), b"x")
        os.mkdir(self.path("volumes/nodered/c-dir-gone"))

        def vanish(rel):
            if rel == "volumes/nodered/a":  # listed, not yet read
                os.unlink(self.path("volumes/nodered/b-gone"))
                os.rmdir(self.path("volumes/nodered/c-dir-gone"))
        rels, notes, warnings = self.walk(["volumes/"], vanish)
        self.assertIn("volumes/nodered/flows.json", rels)
        self.assertNotIn("volumes/nodered/b-gone", rels)
        self.assertEqual(warnings, [])
        self.assertEqual(notes, ["volumes/nodered/b-gone vanished before it was read: not saved",
                                 "volumes/nodered/c-dir-gone vanished before it was read: "
                                 "not saved"])

    def test_a_file_that_grows_while_read_is_a_warning(self):
        # A file that grows while it is read (here: once its first MiB is
        # read, as the progress line hears of it): the archive holds the
        # size of its header, and a warning names it.  (One that grew
        # between the listing and the read is read as it is when opened.)
        path = self.path("volumes/influxdb/data/wal.log")
        write(path, b"w" * (3 << 20))
        stats = archive_writer.ArchiveStats()

        class Growing(_NoProgress):
            def update(self, done, files):
                if done == archive_writer.READ_CHUNK and os.path.getsize(path) == 3 << 20:
                    with open(path, "ab") as f:
                        f.write(b"more\n")

        out = io.BytesIO()
        archive_writer.write_tar(out, self.stack, ["volumes/"], [], Growing(), stats)
        self.assertEqual(stats.warnings, ["volumes/influxdb/data/wal.log changed while it was "
                                          "read: the backup holds its first %d bytes" % (3 << 20)])

    def test_changed_while_read_table(self):
        class St:
            def __init__(self, size, mtime):
                self.st_size, self.st_mtime_ns = size, mtime
        for before, after, changed in [((4, 1), (4, 1), False), ((4, 1), (9, 1), True),
                                       ((4, 1), (4, 2), True), ((4, 1), (0, 1), True)]:
            self.assertEqual(archive_writer.changed_while_read(St(*before), St(*after)), changed)


class _NoProgress:
    def update(self, *args):
        pass


class LockTest(StackCase):
    """Must 3: the lock works whoever created it."""

    def test_lock_left_by_root_then_pi(self):
        root_only(self)
        self.assertEqual(self.backup("root").returncode, run.EXIT_OK)
        lock = self.path(iotstack.LOCK_NAME)
        self.assertEqual(os.stat(lock).st_uid, self.pi.pw_uid)  # given to the owner
        # One left by an older version: root's, 0644, in a root-owned .tmp.
        os.chown(lock, 0, 0)
        os.chown(os.path.dirname(lock), 0, 0)
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        self.assertEqual(len(self.archives()), 2)
        self.assertEqual(os.stat(lock).st_uid, 0)

    def test_lock_held_by_the_other_user_still_excludes(self):
        root_only(self)
        lock = self.path(iotstack.LOCK_NAME)
        os.makedirs(os.path.dirname(lock))
        write(lock, b"")
        fd = os.open(lock, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        for user in users():
            with self.subTest(user=user):
                result = self.backup(user)
                self.assertEqual(result.returncode, run.EXIT_BUSY)
                one_error_line(self, result.stderr, "another backup or restore is running")

    def test_lock_file_cannot_be_opened(self):
        root_only(self)
        lock = self.path(iotstack.LOCK_NAME)
        os.makedirs(os.path.dirname(lock))
        write(lock, b"")
        os.chown(lock, 0, 0)
        os.chmod(lock, 0o600)
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "cannot open the lock file %s" % lock)


class ForeignOwnedTest(unittest.TestCase):
    """The folder that the chown suggestion names: a table."""

    def test_table(self):
        owners = {"/": 0, "/home": 0, "/home/pi": 1000, "/home/pi/IOTstack": 1000,
                  "/home/pi/IOTstack/backups": 0, "/home/pi/IOTstack/backups/logs": 0,
                  "/srv": 0, "/srv/x": 0}
        for path, expected in [
                ("/home/pi/IOTstack/backups/logs/backup_x.log", "/home/pi/IOTstack/backups"),
                ("/home/pi/IOTstack/backups/backup", "/home/pi/IOTstack/backups"),
                ("/home/pi/IOTstack/volumes/x", None),
                ("/home/pi/IOTstack", None),
                ("/srv/x/file", "/srv/x")]:
            with self.subTest(path=path):
                self.assertEqual(run.foreign_owned(path, 1000, owners.get), expected)


class NotAFolderTest(unittest.TestCase):
    def test_table(self):
        self.assertIsNone(iotstack.not_a_folder("/b", False, False, None))
        self.assertIn("is not a folder", iotstack.not_a_folder("/b", True, False, None))
        self.assertIn("symlink to /mnt/usb/b, which does not exist",
                      iotstack.not_a_folder("/b", False, True, "/mnt/usb/b"))


class SizeGuardTest(StackCase):
    """Must 8 (and issue 20's Must 1): a backup far smaller than the last
    good one is kept, warned about, and retention removes nothing, for as
    long as it stays small."""

    def test_volume_gone(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("stack-" + user)
                for minute in range(2):
                    result = self.backup(user)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                shutil.rmtree(self.path("volumes/influxdb"))  # "an unmounted disk"
                before = self.archives()
                self.assertEqual(len(before), 2)
                for night in range(2):  # the second small night compares with the good one
                    result = self.backup(user, "--keep", "1")
                    self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stderr)
                    self.assertIn("less than half the size of the last good backup",
                                  result.stdout)
                    self.assertIn("no old backup removed", self.newest_log())
                    self.assertNotIn("Removed old backup", self.newest_log())
                    self.assertTrue(set(before) < set(self.archives()))
                self.assertEqual(len(self.archives()), 4)
                # Said once: the data shrank on purpose.  Then --keep works.
                result = self.backup(user, "--keep", "1", "--accept-smaller")
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                self.assertEqual(len(self.archives()), 1)
                result = self.backup(user, "--keep", "1")
                self.assertEqual((result.returncode, result.stdout.count("Warning")),
                                 (run.EXIT_OK, 0), result.stdout)


class CopyTest(StackCase):
    """Must 9: a local rclone target must exist; copies and fetched archives
    keep the archive's mode."""

    def setUp(self):
        super().setUp()
        if not shutil.which("rclone"):
            self.skipTest("rclone is not installed")

    def test_rclone_local_path_table(self):
        for target, expected in [(":local:/mnt/usb", "/mnt/usb"), (":local,nounc=true:/x", "/x"),
                                 ("usb:/mnt", None), (":sftp:/x", None), (":local:", ".")]:
            self.assertEqual(offsite.rclone_local_path(target), expected)

    def test_unmounted_usb_and_modes(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("stack-" + user)
                usb = os.path.join(self.tmp, "usb-" + user)
                os.mkdir(usb)  # an empty mount point
                if IS_ROOT:
                    os.chown(usb, self.pi.pw_uid, self.pi.pw_gid)
                target = os.path.join(usb, "backups")
                result = self.backup(user, "--copy-to", "rclone::local:" + target)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                line = one_error_line(self, result.stderr, target, "it must exist")
                self.assertIn("the local backup is kept", line)
                self.assertEqual(os.listdir(usb), [])
                self.assertEqual(len(self.archives()), 1)
                os.mkdir(target)
                if IS_ROOT:
                    os.chown(target, self.pi.pw_uid, self.pi.pw_gid)
                for spec in ("rclone::local:" + target, "rsync:" + target):
                    result = self.backup(user, "--copy-to", spec)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                copies = glob.glob(os.path.join(target, "*", "backup", "*.tar.gz"))
                self.assertEqual(len(copies), 2)
                for copy in copies:
                    self.assertEqual(stat.S_IMODE(os.stat(copy).st_mode), 0o640, copy)
                # Fetched back: 0640 too.
                name = "backup/" + os.path.basename(copies[0])
                shutil.rmtree(self.backups)
                host = os.path.basename(os.path.dirname(os.path.dirname(copies[0])))
                for spec in ("rclone::local:" + target, "rsync:" + target):
                    result = self.run_as(user, "restore.py", "--no-stop", "--yes", "--from", spec,
                                         "--from-host", host, name)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                    fetched = os.path.join(self.backups, name)
                    self.assertEqual(stat.S_IMODE(os.stat(fetched).st_mode), 0o640)
                    os.unlink(fetched)


class RecoveryFirstTest(StackCase):
    """Must 7: every run first finishes or rolls back an interrupted restore."""

    def interrupt_restore(self):
        """A restore killed between two renames: .env is aside, the staged
        one not yet in place."""
        token = "2026-12-01_0000.1"
        staging_rel = ".tmp/" + journal.STAGING_PREFIX + token
        aside_rel = ".tmp/" + journal.ASIDE_PREFIX + token
        write(self.path(staging_rel + "/.env"), b"SECRET=from-backup\n", 0o600)
        write(self.path(staging_rel + "/volumes/nodered/flows.json"), b"[1]\n")
        plan = journal.prepare_journal(self.stack, "x.tar.gz", [".env", "volumes"], staging_rel,
                                       aside_rel, False)
        journal.write_journal(self.stack, plan)
        os.rename(self.path(".env"), self.path(aside_rel + "/.env"))
        if IS_ROOT:
            chown_tree(self.path(".tmp"), self.pi.pw_uid, self.pi.pw_gid)
        self.assertFalse(os.path.exists(self.path(".env")))

    def assert_rolled_back(self):
        self.assertEqual(read(self.path(".env")), b"SECRET=1\n")
        self.assertEqual(read(self.path("volumes/nodered/flows.json")), b"[]\n")
        self.assertEqual(os.listdir(self.path(".tmp")), ["iotstack-backup.lock"])

    def test_every_command_recovers_first(self):
        self.assertEqual(self.backup("pi").returncode, run.EXIT_OK)
        name = "backup/" + os.path.basename(self.archives()[0])
        commands = [("restore.py", "--list"), ("restore.py", "--verify", name),
                    ("restore.py", "--dry-run", name), ("backup.py", "--dry-run", "--no-stop"),
                    ("backup.py", "--no-stop")]
        for user in users():
            for command in commands:
                with self.subTest(user=user, command=command):
                    self.interrupt_restore()
                    result = self.run_as(user, *command)
                    self.assertIn(result.returncode, (run.EXIT_OK,), result.stderr)
                    self.assertEqual(result.stderr, "")
                    self.assertIn("Rolled back an interrupted restore of x.tar.gz", result.stdout)
                    self.assert_rolled_back()

    def test_pending_where_it_may_not_write(self):
        root_only(self)
        self.assertEqual(self.backup("pi").returncode, run.EXIT_OK)
        self.interrupt_restore()
        chown_tree(self.path(".tmp"), 0, 0)
        result = self.run_as("pi", "restore.py", "--list")
        self.assertEqual(result.returncode, run.EXIT_OK)
        line = result.stderr.strip()
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(line.startswith("restore.py: warning: an interrupted restore of %s is "
                                        "pending" % self.stack), line)
        self.assertIn("sudo python3 restore.py --recover", line)
        self.assertIn("backup/backup_", result.stdout)  # the list is still given
        self.assertFalse(os.path.exists(self.path(".env")))
        # A backup would save a half-restored tree: it refuses, in one line.
        result = self.backup("pi")
        self.assertEqual(result.returncode, run.EXIT_FAILED)
        one_error_line(self, result.stderr, "restore.py --recover")
        self.assertEqual(len(self.archives()), 1)
        result = self.run_as("root", "restore.py", "--list")
        self.assertIn("Rolled back", result.stdout)
        self.assertEqual(read(self.path(".env")), b"SECRET=1\n")


class ExcludeTest(StackCase):
    """Must 5: the archive records what was excluded; a restore keeps the
    live data the backup excluded, exactly; --dry-run says so."""

    PATTERNS = ["--exclude", "volumes/influxdb/*", "--exclude", "*.log"]

    def live_state(self, rels):
        state = {}
        for rel in rels:
            st = os.lstat(self.path(rel))
            state[rel] = (read(self.path(rel)), stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid)
        return state

    def test_restore_keeps_what_the_backup_excluded(self):
        for user in users():
            for in_place in (False, True):
                with self.subTest(user=user, in_place=in_place):
                    self.new_stack("exclude-%s-%s" % (user, in_place))
                    write(self.path("services/nodered/build.log"), b"build\n")
                    if IS_ROOT:
                        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
                    result = self.backup(user, *self.PATTERNS)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                    (archive,) = self.archives()
                    names = subprocess.run(["tar", "-tzf", archive], stdout=subprocess.PIPE,
                                           check=True, universal_newlines=True).stdout.split()
                    self.assertIn(iotstack.EXCLUDES_MEMBER, names)
                    self.assertNotIn("volumes/influxdb/data/db.bin", names)
                    self.assertNotIn("services/nodered/build.log", names)
                    # GNU tar (and so restore.sh) takes it without a word.
                    out = os.path.join(self.tmp, "gnu-tar-%s-%s" % (user, in_place))
                    os.mkdir(out)
                    gnu = subprocess.run(["tar", "-xzf", archive, "-C", out],
                                         stderr=subprocess.PIPE, universal_newlines=True)
                    self.assertEqual((gnu.returncode, gnu.stderr), (0, ""))
                    # The live tree moves on.
                    write(self.path("volumes/influxdb/data/db.bin"), b"newer data", 0o600)
                    write(self.path("volumes/influxdb/data/shard-2"), b"more")
                    write(self.path("volumes/nodered/node-red.log"), b"log")
                    write(self.path("services/nodered/build.log"), b"build 2\n")
                    write(self.path("volumes/nodered/flows.json"), b"[2]\n")
                    if IS_ROOT:
                        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
                    kept = ["volumes/influxdb/data/db.bin", "volumes/influxdb/data/shard-2",
                            "volumes/influxdb/data/wal.log", "volumes/nodered/node-red.log",
                            "services/nodered/build.log"]
                    before = self.live_state(kept)
                    name = "backup/" + os.path.basename(archive)
                    dry = self.run_as(user, "restore.py", "--dry-run", name)
                    self.assertEqual(dry.returncode, run.EXIT_OK, dry.stderr)
                    for rel in ("volumes/influxdb/data", "volumes/nodered/node-red.log",
                                "services/nodered/build.log"):
                        self.assertIn("Would keep as it is (excluded from the backup): %s\n" % rel,
                                      dry.stdout)
                    args = ["--in-place"] if in_place else []
                    result = self.restore(user, *args, name)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                    self.assertEqual(self.live_state(kept), before)
                    self.assertEqual(read(self.path("volumes/nodered/flows.json")), b"[]\n")
                    self.assertEqual(os.listdir(self.path(".tmp")), ["iotstack-backup.lock"])
                    if not in_place:
                        self.assertIn("Kept as it is (excluded from the backup): "
                                      "volumes/influxdb/data", self.newest_log("restore"))

    def test_split_units_table(self):
        live = {"volumes": ["influxdb", "nodered"], "volumes/influxdb": ["data", "meta"],
                "volumes/nodered": ["flows.json", "x.log"], "services": ["a"]}
        children = lambda rel: live.get(rel, [])
        cases = [
            ((["services", "volumes"], {}, set()), [("services", ""), ("volumes", "")]),
            ((["volumes"], {"volumes/influxdb": "mount"}, set()),
             [("volumes/influxdb/data", "volumes/influxdb"),
              ("volumes/influxdb/meta", "volumes/influxdb"), ("volumes/nodered", "")]),
            ((["volumes"], {}, {"volumes/nodered/x.log"}),
             [("volumes/influxdb", ""), ("volumes/nodered/flows.json", "")]),
            ((["volumes"], {"volumes": "link"}, {"volumes/influxdb"}),
             [("volumes/nodered", "volumes")]),
            ((["volumes/influxdb/data"], {"volumes/influxdb": "mount"}, set()),
             [("volumes/influxdb/data", "volumes/influxdb")]),
            ((["volumes/influxdb"], {}, {"volumes/influxdb"}), []),
        ]
        for (units, points, keep), expected in cases:
            with self.subTest(units=units, points=points, keep=keep):
                self.assertEqual(journal.split_units(units, points, keep, children), expected)

    def test_excludes_record_table(self):
        record = iotstack.excludes_record(["volumes/influxdb/*"], ["volumes/influxdb/data"])
        self.assertEqual(iotstack.parse_excludes(record), ["volumes/influxdb/*"])
        for junk in (b"", b"[]", b"{\"patterns\": 3}", b"\xff"):
            self.assertEqual(iotstack.parse_excludes(junk), [])


if __name__ == "__main__":
    unittest.main()
