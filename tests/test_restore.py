"""End-to-end tests of restore.py: real trees, real archives, real containers.

Each test builds a small IOTstack tree (tests/stacktree.py), backs it up with
backup.py, changes the tree, runs restore.main() in-process (or restore.py as
a subprocess, for strace's fault injection and signals) and compares
snapshots.  The promise under test: a restore either puts the backup in place
exactly, or leaves the IOTstack directory exactly as it was.  Classes with
engine = True run the tree's services as a real compose project (nodered and
mosquitto running); the others run as on a machine without Docker.
"""
import collections
import concurrent.futures
import contextlib
import fcntl
import glob
import gzip
import hashlib
import io
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest
import warnings
from unittest import mock

from iotstack_backup import (
    backup,
    disk_sync,
    docker_compose,
    file_writer,
    iotstack,
    journal,
    pgzip,
    progress,
    restore,
    tarformat,
    unpack,
)
from tests import real_stack
from tests.engine import EventWatcher
from tests.stacktree import IS_ROOT, P, build_stack, diff_snapshots, snapshot
from tests.support import IsolatedCase, call
from tests.test_file_writer import deadline

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTORE_PY = os.path.join(HERE, "restore.py")
STRACE = shutil.which("strace")
SCALE = 0.1
RUNNING = ("mosquitto", "nodered")  # influxdb and grafana are stopped on purpose
TMP_OWN = {"cache", "databases_backup", "iotstack-backup.lock"}  # .tmp of a fresh tree
MTIME = 1_700_000_000
# Left in .tmp/ by a run killed while writing the stopped-services marker:
# see KillTests.test_no_marker_litter_after_a_kill (a known backuplib bug).
MARKER_NEW = getattr(docker_compose, "STOPPED_MARKER", ".tmp/iotstack-stopped-services.json") + ".new"


# ---------------------------------------------------------------------------
# Helpers

def items(stack):
    """The backup items only: what a restore may replace."""
    return {rel: e for rel, e in snapshot(stack).items() if iotstack.item_of(rel)}


def whole(stack):
    """Everything but the restore's own log and the lock file.  .tmp's own
    mtime is left out: the staging folder is made and removed inside it."""
    snap = snapshot(stack, skip=("backups/logs", iotstack.LOCK_NAME))
    if ".tmp" in snap:
        snap[".tmp"] = snap[".tmp"]._replace(mtime=None)
    return snap


def others(stack):
    """What a restore must never touch: all of whole() but the backup items."""
    return {rel: e for rel, e in whole(stack).items() if not iotstack.item_of(rel)}


def member(name, typeflag=tarformat.TYPE_FILE, data=b"", linkname=b"", mode=0o644, dev=(0, 0)):
    header = tarformat.tar_header(name, typeflag, mode, 0, 0, len(data), MTIME, linkname, *dev)
    return header + data + bytes(-len(data) % tarformat.BLOCK)


def tar_gz(*members):
    return gzip.compress(b"".join(members) + bytes(2 * tarformat.BLOCK))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@contextlib.contextmanager
def hook_pipe_warnings_ignored():
    """iotstack.run_hook leaves the hook's pipe to the garbage collector; see
    OptionTests.test_hook_pipe_is_closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield


def some_user():
    """A named user other than root, 1000 when there is one."""
    try:
        return pwd.getpwuid(1000)
    except KeyError:
        return next(e for e in pwd.getpwall() if e.pw_uid != 0)


def change_tree(stack):
    """What a user does between backup and restore."""
    shutil.rmtree(os.path.join(stack, "volumes/grafana"))
    with open(os.path.join(stack, "docker-compose.yml"), "a") as f:
        f.write("  portainer-ce:\n    image: portainer/portainer-ce\n")
    with open(os.path.join(stack, "volumes/nodered/data/flows.json"), "w") as f:
        f.write("[]\n")
    os.chmod(os.path.join(stack, P["pwfile"]), 0o644)
    os.makedirs(os.path.join(stack, "volumes/stray/deeper"))
    with open(os.path.join(stack, "volumes/stray/deeper/junk"), "w") as f:
        f.write("not in the backup\n")
    os.unlink(os.path.join(stack, ".env"))  # an item the backup holds and the tree lacks
    with open(os.path.join(stack, P["db_dump"]), "wb") as f:
        f.write(b"newer dump")
    if IS_ROOT:
        os.lchown(os.path.join(stack, P["orphan_owner"]), 0, 0)
    # Things a restore must leave alone.
    with open(os.path.join(stack, "menu.sh"), "a") as f:
        f.write("# local change\n")
    with open(os.path.join(stack, ".tmp/cache/x"), "w") as f:
        f.write("newer cache\n")


class RestoreCase(IsolatedCase):
    """A fresh tree in a temporary directory; with engine = True its services
    run on the real engine, RUNNING up, watched from the start."""

    engine = False

    def setUp(self):
        super().setUp()
        if self.engine:
            self.project = real_stack.iotstack_project(self, scale=SCALE)
            self.stack = self.project.stack_dir
            self.tmp = os.path.dirname(self.stack)
            self.events = EventWatcher(self.project).start()
            self.addCleanup(self.events.stop)
            return
        real_stack.without_docker(self)
        self.tmp = self.make_tmp("restore-test-")
        self.stack = os.path.join(self.tmp, "IOTstack")
        build_stack(self.stack, scale=SCALE)

    def make_backup(self, kind="3"):
        argv = [kind, "root"] if IS_ROOT else [kind]
        # --no-stop: the backup is not under test, and each docker call costs time.
        code, out, err = call(backup.main, argv + ["--no-stop", "--dir", self.stack])
        self.assertEqual(code, 0, out + err)
        return os.path.join(self.stack, re.search(r"Backup complete: \./(\S+)", out).group(1))

    def restore(self, *argv):
        return call(restore.main, list(argv) + ["--dir", self.stack])

    def running_now(self):
        return {name for name, state in self.project.states().items() if state == "running"}

    def assert_services_untouched(self):
        """Nothing was stopped or started: on the engine, no such event and
        RUNNING still up; without Docker, no run got as far as the services."""
        if self.engine:
            self.assertEqual([e for e in self.events.events()
                              if e.action in ("kill", "die", "stop", "start")], [])
            self.assertEqual(self.running_now(), set(RUNNING))
            return
        logs = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        for path in logs:
            with open(path, encoding="utf-8") as f:
                self.assertNotRegex(f.read(), "Docker is not installed|Services running")

    def assert_stopped_and_started(self):
        """RUNNING were stopped and started once each; nothing created or removed."""
        for name in RUNNING:
            self.assertEqual(self.events.actions(name, only=("die", "start", "create",
                                                             "destroy")), ["die", "start"])
        self.assertEqual(self.events.events("influxdb") + self.events.events("grafana"), [])
        self.assertEqual(self.running_now(), set(RUNNING))

    def restore_log(self):
        """The text of the restore logs, oldest name first."""
        paths = sorted(glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log")))
        self.assertTrue(paths, "no restore log")
        texts = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        return "\n".join(texts)

    def assert_no_leftovers(self, stack=None):
        names = os.listdir(os.path.join(stack or self.stack, ".tmp"))
        left = [n for n in names if n.startswith(("restore-", journal.STAGING_PREFIX,
                                                   journal.ASIDE_PREFIX))]
        self.assertEqual(left, [], "left in .tmp/")



# ---------------------------------------------------------------------------
# 1. Round trip

class RoundTripTests(RestoreCase):
    def test_round_trip_is_exact(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        # An item the archive does not hold: left alone.
        with open(os.path.join(self.stack, "post_backup.sh"), "w") as f:
            f.write("echo not in the archive\n")
        expected["post_backup.sh"] = snapshot(self.stack)["post_backup.sh"]
        kept = others(self.stack)
        self.assertNotEqual(diff_snapshots(expected, items(self.stack)), [])

        code, out, err = self.restore(archive, "noask")

        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertFalse(os.path.lexists(os.path.join(self.stack, "volumes/stray")))
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        with open(os.path.join(self.stack, "menu.sh")) as f:
            self.assertTrue(f.read().endswith("# local change\n"))
        self.assertTrue(os.path.isfile(os.path.join(self.stack, "post_backup.sh")))
        self.assert_no_leftovers()
        self.assertEqual(set(os.listdir(os.path.join(self.stack, ".tmp"))), TMP_OWN)
        self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
        self.assertIn("Restored %s" % os.path.basename(archive), out)
        self.assertIn("docker compose up -d", out)
        log = self.restore_log()
        self.assertIn("Verified: OK", log)
        self.assertIn("Finished At:", log)

    def test_restore_of_an_unchanged_tree_changes_nothing(self):
        archive = self.make_backup()
        before = items(self.stack)
        code, out, err = self.restore(archive, "--yes")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(diff_snapshots(before, items(self.stack)), [])
        self.assertNotIn("docker compose up -d", out)

    def test_default_file_name_is_backup_tar_gz_under_backups(self):
        archive = self.make_backup()
        shutil.copy(archive, os.path.join(self.stack, "backups/backup.tar.gz"))
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore("--yes")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])


class UnpackHelperTests(RestoreCase):
    """What runs beside the unpacking: the thread that syncs in the
    background, and the process that creates the files."""

    def record_syncs(self):
        # Recorded, not run: what is under test is when and where they run,
        # and on what: the staging folder's file system, never the machine.
        calls = []
        self.synced = []

        def record(path):
            calls.append(threading.current_thread().name)
            self.synced.append(path)
            return "syncfs"
        patcher = mock.patch.object(disk_sync, "sync_filesystem", record)
        patcher.start()
        self.addCleanup(patcher.stop)
        step = mock.patch.object(unpack, "WRITEBACK_STEP", 1)
        step.start()
        self.addCleanup(step.stop)
        return calls

    def writeback_threads(self):
        return [t for t in threading.enumerate() if t.name == "early-writeback"]

    def test_syncs_while_unpacking_then_once_more_before_the_swap(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        calls = self.record_syncs()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertIn("early-writeback", calls)
        # The final sync comes after the thread's last: the thread is gone.
        self.assertEqual(calls[-1], threading.current_thread().name)
        self.assertEqual(self.writeback_threads(), [])
        staging = os.path.join(self.stack, ".tmp", journal.STAGING_PREFIX)
        self.assertTrue(self.synced and all(path.startswith(staging) for path in self.synced),
                        self.synced)

    def test_only_the_file_system_written_is_synced_never_the_machine(self):
        if disk_sync._libc_syncfs() is None:
            self.skipTest("no syncfs in this C library (not Linux)")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with mock.patch("os.sync", side_effect=AssertionError("os.sync() of the machine")):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertIn("Synced the unpacked files to disk (syncfs of 1 file system)",
                      self.restore_log())

    def test_thread_ends_when_unpacking_fails(self):
        archive = self.make_backup()
        before = items(self.stack)
        with open(archive, "rb") as f:
            data = f.read()
        with open(archive, "wb") as f:
            f.write(data[:len(data) * 2 // 3])
        calls = self.record_syncs()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out)
        self.assertRegex(err, "truncated.*nothing was changed")
        self.assertIn("early-writeback", calls)
        self.assertEqual(self.writeback_threads(), [])
        self.assertEqual(diff_snapshots(before, items(self.stack)), [])
        self.assert_no_leftovers()

    def test_a_killed_writer_process_fails_the_restore_and_changes_nothing(self):
        archive = self.make_backup()
        before = whole(self.stack)
        real_send = file_writer.FileWriterProcess.send
        sent = []

        def send(writer, *args):
            sent.append(writer.pid)
            if len(sent) == 50:
                os.kill(writer.pid, signal.SIGKILL)
            return real_send(writer, *args)

        with mock.patch.object(file_writer.FileWriterProcess, "send", send):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("ended without finishing; nothing was changed", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        with self.assertRaises(ChildProcessError):
            os.waitpid(sent[0], os.WNOHANG)

    def test_no_writer_process_on_one_core(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with mock.patch.object(pgzip, "default_jobs", return_value=1), \
                mock.patch.object(file_writer, "FileWriterProcess",
                                  side_effect=AssertionError("a writer process")):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_no_thread_below_one_step(self):
        calls = self.record_syncs()
        writeback = unpack.EarlyWriteback(lambda: [self.stack], step=100)
        writeback.wrote(60)
        writeback.wrote(39)
        self.assertEqual(self.writeback_threads(), [])
        writeback.close()
        self.assertEqual((calls, writeback.syncs), ([], 0))


# ---------------------------------------------------------------------------
# 2. Hostile and broken archives

class HostileArchiveTests(RestoreCase):
    def setUp(self):
        super().setUp()
        os.makedirs(os.path.join(self.stack, "backups/logs"))  # as a backup leaves it
        self.outside = os.path.join(self.tmp, "outside")
        os.mkdir(self.outside)
        self.target = os.path.join(self.outside, "target.txt")
        with open(self.target, "w") as f:
            f.write("outside, must not change\n")
        # Benign members first, so that unpacking has begun when the bad one comes.
        self.benign = [member(b"volumes/", tarformat.TYPE_DIR, mode=0o755),
                       member(b"volumes/ok.txt", data=b"fine\n")]

    def write(self, data, name="evil.tar.gz"):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assert_refused(self, data, pattern):
        archive = self.write(data)
        before = whole(self.stack)
        around = sorted(os.listdir(self.tmp))
        outside = {"target": sha256(self.target), "passwd": sha256("/etc/passwd"),
                   "nlink": (os.stat(self.target).st_nlink, os.stat("/etc/passwd").st_nlink)}

        code, out, err = self.restore(archive, "noask")

        self.assertEqual(code, 1, out + err)
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1, err)
        self.assertRegex(err, pattern)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        self.assertEqual(set(os.listdir(os.path.join(self.stack, ".tmp"))), TMP_OWN)
        self.assertEqual(os.listdir(self.outside), ["target.txt"])
        self.assertEqual(sorted(os.listdir(self.tmp)), around)
        self.assertEqual(outside, {
            "target": sha256(self.target), "passwd": sha256("/etc/passwd"),
            "nlink": (os.stat(self.target).st_nlink, os.stat("/etc/passwd").st_nlink)})
        # Refused before any service was touched.
        self.assert_services_untouched()
        self.assertIn("ERROR:", self.restore_log())
        return err

    def test_traversal(self):
        for name in (b"volumes/../../evil", b"../evil", b"volumes/a/../../../evil",
                     b"./../evil"):
            with self.subTest(name=name):
                self.assert_refused(tar_gz(*self.benign, member(name, data=b"x")), r"'\.\.'")
                self.assertFalse(os.path.lexists(os.path.join(self.tmp, "evil")))

    def test_absolute_name(self):
        name = os.path.join(self.outside, "evil").encode()
        self.assert_refused(tar_gz(*self.benign, member(name, data=b"x")), "absolute")
        # The same through a pax path record, which overrides the header's name.
        long_name = (self.outside + "/" + "p" * 200 + "/evil").encode()
        self.assert_refused(tar_gz(*self.benign, member(long_name, data=b"x")), "absolute")

    def test_write_through_a_symlink(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/l/x", data=b"x")), "symlink 'volumes/l'")

    def test_write_through_a_symlink_chain(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/a", tarformat.TYPE_SYMLINK, linkname=b"b"),
            member(b"volumes/b", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/a/x", data=b"x")), "symlink")

    def test_write_through_a_symlinked_directory_member(self):
        # A later directory member of the same name does not make it safe.
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/l/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/l/x", data=b"x")), "symlink")

    def test_hard_link_outside(self):
        for target in (b"/etc/passwd", self.target.encode(), b"../outside/target.txt",
                       b"volumes/../../outside/target.txt"):
            with self.subTest(target=target):
                self.assert_refused(tar_gz(
                    *self.benign, member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=target)),
                    "hard link")

    def test_hard_link_to_a_later_or_missing_member(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/later"),
            member(b"volumes/later", data=b"x")), "hard link")
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/nothere")),
            "hard link")
        # To an earlier symlink (whose target could be anything).
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.target.encode()),
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/l")), "hard link")

    def test_hard_link_through_a_symlink(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/l/target.txt")),
            "hard link")

    def test_member_below_a_file(self):
        # A later member needs a folder where an earlier one made a file.
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a", data=b"x"), member(b"volumes/a/b", data=b"y")),
            "not a directory")
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a", data=b"x"), member(b"volumes/a/b/c", data=b"y")),
            "not a directory")
        self.assert_refused(tar_gz(member(b"volumes", data=b"x"), member(b"volumes/a", data=b"y")),
                            "not a directory")
        # And the other way round.
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/a", data=b"x")), "would replace a directory")

    def test_device_node_is_skipped_with_a_warning(self):
        archive = self.write(tar_gz(
            *self.benign,
            member(b"volumes/dev/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/dev/null0", tarformat.TYPE_CHAR, mode=0o666, dev=(1, 3)),
            member(b"volumes/dev/sda9", tarformat.TYPE_BLOCK, mode=0o660, dev=(8, 9))))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(sorted(os.listdir(os.path.join(self.stack, "volumes"))),
                         ["dev", "ok.txt"])
        self.assertEqual(os.listdir(os.path.join(self.stack, "volumes/dev")), [])
        log = self.restore_log()
        self.assertIn("Warning: skipped device node volumes/dev/null0", log)
        self.assertIn("Warning: skipped device node volumes/dev/sda9", log)

    def test_item_holding_only_a_device_node_is_left_alone(self):
        # volumes/ holds nothing that is restored: it must not be replaced (by
        # nothing) and the run must not crash half-way through the swap.
        before = items(self.stack)
        archive = self.write(tar_gz(
            member(b"services/", tarformat.TYPE_DIR, mode=0o755),
            member(b"services/only.txt", data=b"x\n"),
            member(b"volumes/null0", tarformat.TYPE_CHAR, mode=0o666, dev=(1, 3))))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(os.listdir(os.path.join(self.stack, "services")), ["only.txt"])
        after = items(self.stack)
        self.assertEqual(diff_snapshots(
            {k: v for k, v in before.items() if not k.startswith("services")},
            {k: v for k, v in after.items() if not k.startswith("services")}), [])
        self.assertIn("Warning: skipped device node volumes/null0", self.restore_log())
        self.assert_no_leftovers()

    def test_damaged_archives(self):
        archive = self.make_backup()
        with open(archive, "rb") as f:
            good = f.read()
        size = len(good)
        for cut in (1, 2, 10, 100, 5000, size // 3, size // 2, size - 9, size - 8, size - 4,
                    size - 1):
            with self.subTest(cut=cut):
                self.assert_refused(good[:cut], "truncated")
        for where in (size // 2, size // 3, 2000):
            with self.subTest(flip=where):
                flipped = bytearray(good)
                flipped[where] ^= 0x10
                self.assert_refused(bytes(flipped), "corrupt|invalid")
        with self.subTest("not gzip"):
            self.assert_refused(random.Random(7).randbytes(5000), "not a gzip file")
            self.assert_refused(gzip.decompress(good), "not a gzip file")  # a plain .tar
        with self.subTest("empty"):
            self.assert_refused(b"", "empty")
        with self.subTest("trailing garbage"):
            self.assert_refused(good + b"garbage", "trailing garbage")
        with self.subTest("corrupt tar header"):
            tar = bytearray(gzip.decompress(good))
            tar[0] ^= 0x01  # the first header's name: its checksum no longer matches
            self.assert_refused(gzip.compress(bytes(tar)), "corrupt tar header")


# ---------------------------------------------------------------------------
# 3 and 4. kill -9 at every rename and at sampled unlinks; SIGTERM

RENAMES = "rename,renameat,renameat2"
UNLINKS = "unlink,unlinkat"
MKDIRS = "mkdir,mkdirat"

# One changed tree, with its own compose project, and what it held before.
Run = collections.namedtuple("Run", "stack env project old kept services")


@unittest.skipUnless(STRACE, "strace is not installed")
@unittest.skipUnless(IS_ROOT, "strace's fault injection needs ptrace; run as root")
class KillTests(unittest.TestCase):
    """restore.py killed by strace at the Nth rename/unlink, then recovered.

    strace runs without -f: its injection counters are per process, and
    docker's own processes must not count.  Each attempt has a tree and a
    compose project of its own on the real engine, so attempts run side by
    side.
    """

    @classmethod
    def setUpClass(cls):
        holder = tempfile.TemporaryDirectory(prefix="restore-kill-")
        cls.addClassCleanup(holder.cleanup)
        cls.tmp = holder.name
        template = os.path.join(cls.tmp, "template")
        build_stack(template, scale=SCALE)
        # The services' compose file, as fresh_run's trees have it.
        real_stack.E.write_compose(template, real_stack.SERVICES)
        code, out, err = call(backup.main, ["1", "root", "--no-stop", "--dir", template])
        assert code == 0, out + err
        cls.archive = os.path.join(cls.tmp, "backup.tar.gz")
        shutil.copy(os.path.join(template, re.search(r"Backup complete: \./(\S+)", out)
                                 .group(1)), cls.archive)
        cls.new = items(template)
        cls.count = 0
        cls.traces = {}

    def setUp(self):
        real_stack.use_engine(self)
        # The tests that kill at every call of a kind run dozens of attempts:
        # their services have no containers (each costs seconds here), so
        # they check the journal and that nothing is started; the others,
        # and test_stack_control, check the services at the points that
        # matter (the marker, the stop, the swap, the start).
        self.services = True
        self.projects = []
        # Removed side by side, at the end: one at a time costs minutes.
        self.addCleanup(real_stack.remove_all, self.projects)

    def fresh_run(self):
        """A changed tree at a new path, its services RUNNING on the engine
        (influxdb and grafana, stopped, have no containers: they cost time)."""
        type(self).count += 1
        project = real_stack.iotstack_project(self, scale=SCALE, stopped_too=False,
                                              cleanup=False, up=self.services)
        self.projects.append(project)
        stack = project.stack_dir
        os.makedirs(os.path.join(stack, "backups/logs"))  # as a backup leaves it
        change_tree(stack)
        # No .pyc writes: their renames would shift the counts when another
        # Python version or an edit made them stale.
        return Run(stack, real_stack.script_env(), project, items(stack), others(stack),
                   self.services)

    def script(self, run, *argv, trace=None, inject=None):
        """restore.py on run's tree; under strace, which sends a signal at a
        syscall, when trace is given."""
        argv = [sys.executable, RESTORE_PY] + list(argv) + ["--dir", run.stack]
        if trace:
            argv = [STRACE, "-qq", "-o", "/dev/null", "-e", "trace=" + trace,
                    "-e", "inject=%s:%s" % (trace, inject)] + argv
        return subprocess.run(argv, cwd=run.stack, env=run.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)

    def trace_of(self, trace):
        """The calls of one undisturbed restore of a fresh tree, as (name,
        first path argument); the same for every fresh tree, so made once."""
        key = (trace, self.services)
        if key not in self.traces:
            run = self.fresh_run()
            log = os.path.join(self.tmp, "trace-%d.txt" % self.count)
            argv = [STRACE, "-qq", "-s", "4096", "-o", log, "-e", "trace=" + trace,
                    sys.executable, RESTORE_PY, self.archive, "noask", "--dir", run.stack]
            subprocess.run(argv, cwd=run.stack, env=run.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, check=True, timeout=120)
            with open(log) as f:
                self.traces[key] = [
                    re.match(r'(\w+)\((?:[^"]*)"([^"]*)"', line).groups()
                    for line in f if not line.startswith(("---", "+++"))]
        return self.traces[key]

    def killed(self, trace, ns, then):
        """For each n: a fresh run, restore.py killed at its nth call of
        trace, then restore.py with the arguments then (if it was killed).
        Yields (n, run, killed, then's result), attempts side by side."""
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            runs = list(pool.map(lambda _n: self.fresh_run(), ns))

        def attempt(run, n):
            result = self.script(run, self.archive, "noask", trace=trace,
                                 inject="signal=SIGKILL:when=%d" % n)
            after = self.script(run, *then) if result.returncode != 0 else None
            return result, after

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, runs, ns))
        for n, run, (result, after) in zip(ns, runs, results):
            yield n, run, result, after

    def assert_recovered(self, run, said):
        """Exactly the old or the new state, the one recovery said; nothing
        else touched, nothing left behind, the services running again."""
        now = items(run.stack)
        if "Completed an interrupted restore" in said:
            self.assertEqual(diff_snapshots(self.new, now), [])
            outcome = "new"
        elif "Rolled back an interrupted restore" in said:
            self.assertEqual(diff_snapshots(run.old, now), [])
            outcome = "old"
        else:
            # No journal: killed before it was written, or after the restore
            # was done and the journal gone.  Still exactly one of the two.
            outcome = "new" if not diff_snapshots(self.new, now) else "old"
            self.assertEqual(diff_snapshots(run.old if outcome == "old" else self.new, now),
                             [])
        left = others(run.stack)
        left.pop(MARKER_NEW, None)  # a known backuplib bug, tested on its own
        self.assertEqual(diff_snapshots(run.kept, left), [])
        self.assert_no_journal(run)
        return outcome

    def assert_no_journal(self, run):
        self.assertFalse(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME)))
        self.assertFalse(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME + ".new")))
        names = os.listdir(os.path.join(run.stack, ".tmp"))
        self.assertEqual([n for n in names if n.startswith("restore-")], [])
        running = {"nodered": "running", "mosquitto": "running"}
        self.assertEqual(run.project.states(), running if run.services else {})

    def assert_killed(self, result):
        self.assertIn(result.returncode, (-9, 137), result.stderr)

    def counts(self, trace):
        """How often an undisturbed run makes each call of trace.  strace
        counts when=N for each syscall of a set on its own."""
        return collections.Counter(name for name, _ in self.trace_of(trace))

    def test_kill_at_every_rename(self):
        self.services = False
        # N = 1, 2, 3... until a run is no longer killed: the undisturbed
        # run's count says where that is.
        counts = self.counts(RENAMES)
        self.assertEqual(len(counts), 1, counts)  # rename, or renameat on arm64
        total = sum(counts.values())
        units = restore.replaced_units({iotstack.item_of(rel) for rel in self.new}, [])
        self.assertGreaterEqual(total, 2 * len(units))  # each item renamed under the journal
        outcomes = []
        for n, run, result, after in self.killed(RENAMES, range(1, total + 2),
                                                 ["--recover"]):
            with self.subTest(rename=n, total=total):
                outcomes.append(self.judge_attempt(n, total, run, result, after))
        self.assertIn("old", outcomes)

    def test_kill_at_sampled_unlinks(self):
        self.services = False
        # unlinkat: shutil.rmtree of the staging and aside folders (after the
        # commit); unlink: the journal and the stopped-services marker.
        counts = self.counts(UNLINKS)
        self.assertGreater(sum(counts.values()), 5)
        outcomes = []
        for syscall, total in sorted(counts.items()):
            ns = sorted({n for n in (1, 2, 5, 20, 100, total - 1, total) if n >= 1}
                        | {total + 1})
            for n, run, result, after in self.killed(syscall, ns, ["--recover"]):
                with self.subTest(syscall=syscall, n=n, total=total):
                    outcomes.append(self.judge_attempt(n, total, run, result, after))
        self.assertIn("new", outcomes)

    def judge_attempt(self, n, total, run, result, after):
        """One attempt killed at the nth call: past the last call it simply
        completes; otherwise --recover must give exactly the old or the new
        tree.  Returns "old", "new", or None for a completed run."""
        if n > total:
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(diff_snapshots(self.new, items(run.stack)), [])
            return None
        self.assert_killed(result)
        self.assertEqual((after.returncode, after.stderr), (0, ""), after.stdout)
        return self.assert_recovered(run, after.stdout)

    def test_recover_in_process(self):
        # restore.main(["--recover"]) in this process, after a kill mid-swap.
        renames = self.trace_of(RENAMES)
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGKILL:when=%d" % (len(renames) // 2))
        self.assert_killed(result)
        self.assertTrue(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME)))
        with mock.patch.dict(os.environ, {"PATH": run.env["PATH"]}):
            code, out, err = call(restore.main, ["--recover", "--dir", run.stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Rolled back an interrupted restore", out)
        self.assertEqual(self.assert_recovered(run, out), "old")
        texts = []
        for path in glob.glob(os.path.join(run.stack, "backups/logs/restore_*.log")):
            with open(path) as f:
                texts.append(f.read())  # the killed run's log, and this one's
        self.assertIn("Rolled back an interrupted restore", "\n".join(texts))

    def test_next_normal_run_recovers_first_then_restores(self):
        total = sum(self.counts(RENAMES).values())
        for n, run, result, after in self.killed(RENAMES, (2, total // 2, total - 1),
                                                 [self.archive, "noask"]):
            with self.subTest(rename=n, total=total):
                self.assert_killed(result)
                self.assertEqual((after.returncode, after.stderr), (0, ""), after.stdout)
                # Said first: a swap rolled back or completed, or (killed
                # before the journal existed) the services it had stopped.
                said = re.search("(Rolled back|Completed) an interrupted restore|"
                                 "an interrupted run had stopped them", after.stdout)
                self.assertTrue(said, after.stdout)
                self.assertLess(said.start(), after.stdout.index("Restored "))
                self.assertEqual(diff_snapshots(self.new, items(run.stack)), [])
                self.assert_no_journal(run)

    def test_kill_during_an_only_restore_of_a_missing_subtree(self):
        self.services = False
        # change_tree() removed volumes/grafana: the swap makes it, and a roll
        # back must take it away again.
        inside = lambda snap: {k: v for k, v in snap.items()
                               if k.startswith("volumes/grafana/data")}
        outer = lambda snap: {k: v for k, v in snap.items()
                              if not k.startswith("volumes/grafana")}
        for n in range(1, 50):
            run = self.fresh_run()
            self.assertNotIn("volumes/grafana", run.old)
            result = self.script(run, self.archive, "noask", "--only", "volumes/grafana/data",
                                 trace=RENAMES, inject="signal=SIGKILL:when=%d" % n)
            said = ""
            if result.returncode != 0:
                self.assert_killed(result)
                recovered = self.script(run, "--recover")
                self.assertEqual((recovered.returncode, recovered.stderr), (0, ""))
                said = recovered.stdout
            now = items(run.stack)
            with self.subTest(rename=n):
                self.assertEqual(diff_snapshots(outer(run.old), outer(now)), [])
                if result.returncode == 0 or "Completed an interrupted" in said:
                    self.assertEqual(diff_snapshots(inside(self.new), inside(now)), [])
                else:
                    self.assertNotIn("volumes/grafana", now)
                self.assert_no_journal(run)
            if result.returncode == 0:
                break
        else:
            self.fail("restore.py was still being killed after 50 renames")
        self.assertGreater(n, 2)

    def test_sigterm_during_the_swap_rolls_back(self):
        renames = self.trace_of(RENAMES)
        # The first rename of an item, after the journal was written.
        journal = [i for i, (_, src) in enumerate(renames)
                   if src.endswith(iotstack.JOURNAL_NAME + ".new")][0]
        n = journal + 2
        self.assertLess(n, len(renames))  # not the journal's commit
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGTERM:when=%d" % n)
        self.assertEqual(result.returncode, 143, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("interrupted by SIGTERM", result.stderr)
        self.assertEqual(diff_snapshots(run.old, items(run.stack)), [])
        self.assertEqual(diff_snapshots(run.kept, others(run.stack)), [])
        self.assert_no_journal(run)  # and the services run again

    def test_sigterm_while_unpacking_changes_nothing(self):
        self.assertEqual(len(self.counts(MKDIRS)), 1)  # mkdir, or mkdirat on arm64
        mkdirs = self.trace_of(MKDIRS)
        # The first folder made inside the staging folder.
        n = 2 + [i for i, (_, path) in enumerate(mkdirs)
                 if os.path.basename(path).startswith(journal.STAGING_PREFIX)][0]
        self.assertLessEqual(n, len(mkdirs))
        run = self.fresh_run()
        before = whole(run.stack)
        with EventWatcher(run.project) as events:
            result = self.script(run, self.archive, "noask", trace=MKDIRS,
                                 inject="signal=SIGTERM:when=%d" % n)
        self.assertEqual(result.returncode, 143, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("interrupted by SIGTERM", result.stderr)
        self.assertEqual(diff_snapshots(before, whole(run.stack)), [])
        self.assertEqual(events.stop(), [])  # the services were never touched

    def test_no_marker_litter_after_a_kill(self):
        # Bug in backuplib (not restore.py): write_json_atomically leaves
        # STOPPED_MARKER + ".new" behind when killed before its rename, and
        # nothing (restart_left_stopped, recovery) ever removes it.
        marker = [i for i, (_, src) in enumerate(self.trace_of(RENAMES))
                  if src.endswith(MARKER_NEW)]
        if not marker:
            self.skipTest("docker_compose no longer writes %s" % MARKER_NEW)
        n = 1 + marker[0]
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGKILL:when=%d" % n)
        self.assert_killed(result)
        recovered = self.script(run, "--recover")
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertEqual(diff_snapshots(run.kept, others(run.stack)), [])


def script_env():
    """The environment of restore.py run as a script: the test engine's
    DOCKER_HOST (already in os.environ), and no .pyc writes."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("SUDO_USER", None)
    return env


class SignalTests(RestoreCase):
    """Signals at a point reached without strace: from post_restore.sh."""

    engine = True

    def run_script(self, *argv):
        return subprocess.run([sys.executable, RESTORE_PY] + list(argv), cwd=self.stack,
                              env=script_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)

    def test_sigterm_and_ctrl_c_after_the_swap(self):
        for sig, code in (("TERM", 143), ("INT", 130), ("HUP", 129)):
            with self.subTest(signal=sig):
                hook = os.path.join(self.stack, "post_restore.sh")
                with open(hook, "w") as f:
                    f.write("kill -%s $PPID\necho after the signal\n" % sig)
                archive = self.make_backup()
                expected = items(self.stack)
                change_tree(self.stack)
                result = self.run_script(archive, "noask")
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
                self.assertIn(b"interrupted", result.stderr)
                # The swap was complete: the files stay restored; the
                # replaced items wait in the trash for the next run.
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
                self.assertTrue(glob.glob(os.path.join(self.stack, ".tmp",
                                                       journal.TRASH_RECORD + "*.json")))
                self.assertEqual(self.run_script("--list").returncode, 0)
                self.assert_no_leftovers()
                self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
                self.assertEqual(self.running_now(), set(RUNNING))
                # The last line and the log say the restore was complete (issue 21).
                self.assertIn(b"had been restored completely", result.stderr)
                self.assertIn("Interrupted (%s): " % ("Ctrl-C" if sig == "INT" else "SIG" + sig),
                              self.restore_log())
                os.unlink(hook)
                shutil.rmtree(os.path.join(self.stack, "backups/logs"))


class PowerCut(BaseException):
    """Raised where a power cut would stop the run: nothing catches it."""


class TrashTests(RestoreCase):
    """Down only for the swap: the replaced items are moved aside in the
    swap and deleted once the services run again; a cut leaves a trash
    record that the next run empties."""

    engine = True

    def trash_left(self):
        tmp = os.path.join(self.stack, ".tmp")
        return sorted(n for n in os.listdir(tmp) if n.startswith((journal.TRASH_RECORD,
                                                                   journal.ASIDE_PREFIX)))

    def test_old_items_deleted_only_once_every_service_runs_again(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hook ran\n")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        seen = []
        deleting = journal.delete_tree

        def observed(path):
            # The moment deletion begins: the engine's states, and the old
            # tree still there (the stray file only the live tree had).
            seen.append((path, self.running_now(), os.path.isfile(
                os.path.join(path, "volumes/stray/deeper/junk"))))
            return deleting(path)
        with mock.patch.object(journal, "delete_tree", observed):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assert_stopped_and_started()
        self.assertTrue(seen)
        path, running, old_there = seen[0]  # the top; delete_tree recurses
        self.assertTrue(os.path.basename(path).startswith(journal.ASIDE_PREFIX), path)
        self.assertEqual(running, set(RUNNING))
        self.assertTrue(old_there)
        self.assertEqual(self.trash_left(), [])
        self.assert_no_leftovers()
        log = self.restore_log()
        order = ["Replaced items moved aside to .tmp/" + journal.ASIDE_PREFIX, "hook ran",
                 "Services Started", "Deleting the replaced items in ",
                 "Deleted the replaced items: "]
        where = [log.find(line) for line in order]
        self.assertNotIn(-1, where, log)
        self.assertEqual(where, sorted(where), log)
        self.assertRegex(log, r"Deleted the replaced items: \d+ entries, [\d.]+ [KMG]?B freed")

    def test_no_compose_call_between_stop_and_start_when_the_compose_file_stays(self):
        archive = self.make_backup()
        calls = []
        running = docker_compose.Engine.compose_run

        def recorded(engine, *args, **kwargs):
            calls.append(args[0])
            return running(engine, *args, **kwargs)
        with mock.patch.object(docker_compose.Engine, "compose_run", recorded):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertNotIn("docker-compose.yml changed", out)
        self.assertEqual(calls[calls.index("stop"):], ["stop", "start"], calls)
        self.assertIn("config", calls[:calls.index("stop")])
        self.assert_stopped_and_started()

    def test_cut_after_the_start_next_run_deletes_them(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)

        def cut(path):
            raise KeyboardInterrupt  # Ctrl-C while deleting: as a cut, the record stays
        with mock.patch.object(journal, "delete_tree", cut):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 130, err)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(self.running_now(), set(RUNNING))
        left = self.trash_left()
        self.assertEqual(len(left), 2, left)  # the record and the folder it lists
        for run_again in (["--list"], ["--recover"]):
            with self.subTest(run=run_again[0]):
                code, out, err = self.restore(*run_again)
                self.assertEqual(code, 0, err)
                self.assertEqual(self.trash_left(), [])
                self.assert_no_leftovers()
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
                change_tree(self.stack)
                with mock.patch.object(journal, "delete_tree", cut):
                    self.restore(archive, "noask")
        self.assertEqual(self.running_now(), set(RUNNING))

    def test_cut_after_commit_recovery_completes_then_deletes(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)

        def cut_after_commit(stack, record, *more):
            swap_in(stack, record, *more)
            raise PowerCut()  # nothing after it runs: no roll back, no clean up
        swap_in = journal.swap_in
        with mock.patch.object(restore, "swap_in", cut_after_commit), \
                mock.patch.object(restore, "roll_back"), mock.patch.object(restore, "clean_up"):
            with self.assertRaises(PowerCut):
                self.restore(archive, "noask")
        code, out, err = self.restore("--recover")
        self.assertEqual(code, 0, err)
        self.assertNotIn("Rolled back", out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(self.trash_left(), [])
        self.assert_no_leftovers()
        self.assertEqual(self.running_now(), set(RUNNING))


class DeleteTreeTests(unittest.TestCase):
    def test_counts_what_goes_never_follows_a_link(self):
        with tempfile.TemporaryDirectory() as tmp:
            outside = os.path.join(tmp, "outside")
            os.mkdir(outside)
            with open(os.path.join(outside, "keep"), "wb") as f:
                f.write(b"k" * 5000)
            tree = os.path.join(tmp, journal.ASIDE_PREFIX + "x")
            os.makedirs(os.path.join(tree, "a/b"))
            with open(os.path.join(tree, "a/b/file"), "wb") as f:
                f.write(os.urandom(100000))
            os.link(os.path.join(tree, "a/b/file"), os.path.join(tree, "a/hard"))
            os.symlink(outside, os.path.join(tree, "a/link"))
            deleted, freed, left = journal.delete_tree(tree)
            self.assertFalse(os.path.lexists(tree))
            self.assertEqual(os.listdir(outside), ["keep"])
            # a, b, file, hard, link and the tree itself; the file's blocks once.
            self.assertEqual((deleted, left), (6, 0))
            self.assertGreaterEqual(freed, 100000)
            self.assertLess(freed, 200000)
            self.assertEqual(journal.delete_tree(tree), (0, 0, 0))

    def test_a_damaged_record_deletes_nothing_else(self):
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, ".tmp"))
            precious = os.path.join(tmp, "volumes")
            os.mkdir(precious)
            record = os.path.join(tmp, ".tmp", journal.TRASH_RECORD + "t.json")
            for content in ('{"folders": ["%s", "relative/restore-old.x"]}' % precious, "{",
                            '["%s"]' % precious):
                with open(record, "w") as f:
                    f.write(content)
                journal.empty_trash(tmp, iotstack.RunLog())
                self.assertTrue(os.path.isdir(precious))


# ---------------------------------------------------------------------------
# 5. Options and errors

class OptionTests(RestoreCase):
    def test_refuses_without_a_terminal(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        with mock.patch.object(sys, "stdin", io.StringIO("y\n")):
            code, out, err = self.restore(archive)
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("noask", err)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        self.assert_services_untouched()

    def test_asks_on_a_terminal(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True

        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        before = snapshot(self.stack)
        with mock.patch.object(sys, "stdin", Terminal("n\n")):
            code, out, err = self.restore(archive)
        self.assertEqual(code, 2)
        self.assertIn("Continue [y/N]?", out)
        self.assertIn("Nothing was changed", out)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        with mock.patch.object(sys, "stdin", Terminal("y\n")):
            code, out, err = self.restore(archive)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_missing_file(self):
        self.make_backup()
        before = snapshot(self.stack)
        for name in ("backup/nothere.tar.gz", os.path.join(self.tmp, "nothere.tar.gz")):
            with self.subTest(name=name):
                code, out, err = self.restore(name, "noask")
                self.assertEqual((code, out), (2, ""))
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("nothere.tar.gz not found", err)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])

    def test_names_under_backups_and_absolute_paths(self):
        archive = self.make_backup()
        expected = items(self.stack)
        elsewhere = os.path.join(self.tmp, "copy.tar.gz")
        shutil.copy(archive, elsewhere)
        rolling = os.path.relpath(glob.glob(os.path.join(self.stack, "backups/rolling/*"))[0],
                                  os.path.join(self.stack, "backups"))
        for name in ("backup/" + os.path.basename(archive), rolling, archive, elsewhere):
            with self.subTest(name=name):
                change_tree(self.stack)
                code, out, err = self.restore(name, "noask")
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_relative_name_from_the_current_directory(self):
        archive = self.make_backup()
        expected = items(self.stack)
        shutil.copy(archive, os.path.join(self.tmp, "here.tar.gz"))
        change_tree(self.stack)
        cwd = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, cwd)
        code, out, err = self.restore("here.tar.gz", "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_only_restores_just_that_subtree(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        changed = items(self.stack)

        code, out, err = self.restore(archive, "noask", "--only", "volumes/nodered/")

        self.assertEqual((code, err), (0, ""), out)
        inside = lambda rel: rel == "volumes/nodered" or rel.startswith("volumes/nodered/")
        now = items(self.stack)
        self.assertEqual(diff_snapshots({k: v for k, v in expected.items() if inside(k)},
                                        {k: v for k, v in now.items() if inside(k)}), [])
        # Everything else stays as changed, volumes/ itself too: the rename
        # of a child must not give it a new mtime.
        self.assertEqual(diff_snapshots(
            {k: v for k, v in changed.items() if not inside(k)},
            {k: v for k, v in now.items() if not inside(k)}), [])
        self.assertTrue(os.path.isdir(os.path.join(self.stack, "volumes/stray")))
        self.assertFalse(os.path.lexists(os.path.join(self.stack, "volumes/grafana")))
        self.assertFalse(os.path.lexists(os.path.join(self.stack, ".env")))
        self.assert_no_leftovers()

    def test_only_repeated(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask", "--only", "volumes/grafana",
                                      "--only", ".env")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        for rel in expected:
            if rel == ".env" or rel.startswith("volumes/grafana"):
                self.assertEqual(expected[rel], now.get(rel), rel)
        self.assertTrue(os.path.isdir(os.path.join(self.stack, "volumes/stray")))

    def test_only_errors(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = whole(self.stack)
        code, out, err = self.restore(archive, "noask", "--only", "volumes/nothere")
        self.assertEqual(code, 2, out + err)  # a typo is a bad argument (issue 21)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("--only volumes/nothere: the archive holds nothing under it", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        for path in ("menu.sh", "backups", ".tmp/cache", "../outside", "/etc"):
            with self.subTest(only=path):
                code, out, err = self.restore(archive, "noask", "--only", path)
                self.assertEqual(code, 2, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("--only", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])

    def test_only_under_a_symlink_on_disk_goes_onto_that_disk(self):
        # Issue 13: a symlink to another disk keeps its place and the data
        # goes back through it (it used to be refused).
        archive = self.make_backup()
        outside = os.path.join(self.tmp, "outside")
        os.mkdir(outside)
        nodered = os.path.join(self.stack, "volumes/nodered")
        shutil.move(nodered, os.path.join(outside, "nodered"))
        os.symlink(os.path.join(outside, "nodered"), nodered)
        before, beyond = whole(self.stack), snapshot(outside)
        flows = os.path.join(outside, "nodered", "data", "flows.json")
        with open(flows, "ab") as f:
            f.write(b"changed since the backup")
        code, out, err = self.restore(archive, "noask", "--only", "volumes/nodered/data")
        self.assertEqual(code, 0, out + err)
        self.assertTrue(os.path.islink(nodered))
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assertEqual(diff_snapshots(beyond, snapshot(outside)), [])
        self.assert_no_leftovers()

    def test_list(self):
        old = self.make_backup("1")
        newest = self.make_backup("3")
        rolling = glob.glob(os.path.join(self.stack, "backups/rolling/*.tar.gz"))[0]
        os.utime(old, (MTIME, MTIME))
        os.unlink(rolling)  # a rolling archive of its own, newer than both
        shutil.copy(old, rolling)
        os.utime(newest, (MTIME + 3600, MTIME + 3600))
        os.utime(rolling, (MTIME + 7200, MTIME + 7200))
        before = snapshot(self.stack)
        code, out, err = self.restore("--list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual([line.split()[0] for line in lines],
                         ["rolling/" + os.path.basename(rolling),
                          "backup/" + os.path.basename(newest),
                          "backup/" + os.path.basename(old)])
        for line, path in zip(lines, (rolling, newest, old)):
            self.assertIn(progress.human_size(os.path.getsize(path)), line)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])

    def test_verify(self):
        archive = self.make_backup()
        with open(archive, "rb") as f:
            data = f.read()
        truncated = os.path.join(self.tmp, "truncated.tar.gz")
        with open(truncated, "wb") as f:
            f.write(data[:len(data) // 2])
        before = snapshot(self.stack)
        code, out, err = call(restore.main, ["--verify", archive])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("OK", out)
        code, out, err = self.restore("--verify", "backup/" + os.path.basename(archive))
        self.assertEqual((code, err), (0, ""))
        code, out, err = call(restore.main, ["--verify", truncated])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("truncated", err)
        code, out, err = call(restore.main, ["--verify", os.path.join(self.tmp, "nothere")])
        self.assertEqual(code, 2)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])  # not even a log
        self.assert_services_untouched()

    def test_dry_run(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        code, out, err = self.restore(archive, "--dry-run")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Would replace: volumes", out)
        self.assertIn("Would create: .env", out)
        self.assertIn("nothing was changed", out)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        self.assert_services_untouched()
        code, out, err = self.restore(os.path.join(self.tmp, "nothere.tar.gz"), "--dry-run")
        self.assertEqual(code, 2)

    def test_in_place_says_when_the_compose_file_changed(self):
        archive = self.make_backup()
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask", "--in-place")
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("docker compose up -d", out)

    def test_in_place_refuses_a_damaged_archive_before_deleting(self):
        archive = self.make_backup()
        change_tree(self.stack)
        with open(archive, "rb") as f:
            data = f.read()
        for name, damaged in (("cut", data[:-100]), ("evil", tar_gz(
                member(b"volumes/", tarformat.TYPE_DIR, mode=0o755),
                member(b"volumes/../evil", data=b"x")))):
            with self.subTest(name):
                path = os.path.join(self.tmp, name + ".tar.gz")
                with open(path, "wb") as f:
                    f.write(damaged)
                before = whole(self.stack)
                code, out, err = self.restore(path, "noask", "--in-place")
                self.assertEqual(code, 1, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
                self.assert_services_untouched()
        self.assertFalse(os.path.lexists(os.path.join(self.tmp, "evil")))

    def test_keep_old(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        old = items(self.stack)
        code, out, err = self.restore(archive, "noask", "--keep-old")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        where = re.search(r"kept in (\.tmp/%s\S+)" % re.escape(journal.ASIDE_PREFIX), out)
        self.assertTrue(where, out)
        kept = os.path.join(self.stack, where.group(1))
        # The old items, exactly, under the same relative paths.
        aside = {rel: e for rel, e in snapshot(kept).items() if iotstack.item_of(rel)}
        self.assertEqual(diff_snapshots(old, aside), [])
        self.assertIn("Replaced items kept in", self.restore_log())
        # Another run (or recovery) does not take the kept folder away.
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isdir(kept))

    def test_hook_pipe_is_closed(self):
        # Bug in backuplib (not restore.py): run_hook reads proc.stdout to the
        # end but never closes it, so each hook leaks a pipe until the garbage
        # collector finds it ("ResourceWarning: unclosed file").
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hello\n")
        archive = self.make_backup()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, ResourceWarning)], [])

    def test_log_is_appended_to(self):
        archive = self.make_backup()
        logs = os.path.join(self.stack, "backups/logs")
        # Two runs in the same minute get two logs; a log that exists is never
        # rewritten.
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        (first,) = glob.glob(os.path.join(logs, "restore_*.log"))
        with open(first, "a") as f:
            f.write("a line of the user's\n")
        with open(first) as f:
            text = f.read()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        with open(first) as f:
            self.assertTrue(f.read().startswith(text))
        self.assertEqual(len(glob.glob(os.path.join(logs, "restore_*.log"))), 2)

    def test_into_an_empty_directory(self):
        # --dir is taken as given: a fresh, empty IOTstack directory is fine.
        archive = self.make_backup()
        expected = items(self.stack)
        empty = os.path.join(self.tmp, "empty")
        os.mkdir(empty)
        code, out, err = call(restore.main, [archive, "noask", "--dir", empty])
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(empty)), [])
        self.assert_no_leftovers(empty)

    def test_not_an_iotstack_directory(self):
        archive = self.make_backup()
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        cwd = os.getcwd()
        os.chdir(elsewhere)
        self.addCleanup(os.chdir, cwd)
        code, out, err = call(restore.main, [archive, "noask"])
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("not an IOTstack directory", err)
        self.assertEqual(os.listdir(elsewhere), [])


# ---------------------------------------------------------------------------
# 6. The stack

class StackTests(RestoreCase):
    engine = True

    def test_stops_and_starts_exactly_the_running_services(self):
        archive = self.make_backup()
        change_tree(self.stack)
        during = []
        real_swap = journal.swap_in

        def spy(stack, journal, on_entry=None):
            during.append(self.running_now())
            return real_swap(stack, journal, on_entry)

        with mock.patch.object(restore, "swap_in", spy):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(during, [set()])  # nothing ran during the swap
        self.assert_stopped_and_started()  # stop/start, never down/up
        self.assertEqual(self.project.states(), {"nodered": "running", "mosquitto": "running",
                                                 "influxdb": "exited", "grafana": "exited"})
        self.assertIn("Services stopped and started again: %s" % ", ".join(RUNNING), out)
        self.assertIn("Services left alone: grafana (exited), influxdb (exited)", out)

    def test_no_stop_names_the_containers_that_hold_the_old_files(self):
        archive = self.make_backup()
        code, out, err = self.restore(archive, "noask", "--no-stop")
        self.assertEqual((code, err), (3, ""), out)
        self.assert_services_untouched()
        names = [self.project.container_name(name) for name in RUNNING]
        self.assertIn("these containers still hold the old files: %s" % ", ".join(names), out)
        self.assertIn("cd %s && docker compose restart %s" % (self.stack, " ".join(RUNNING)),
                      out)
        self.assertIn("restart %s" % " ".join(RUNNING), self.restore_log())

    def test_without_daemon_nothing_is_changed(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = whole(self.stack)
        with mock.patch.dict(os.environ, {"DOCKER_HOST": "unix://%s/nothing.sock" % self.tmp}):
            code, out, err = self.restore(archive, "noask")
            self.assertEqual(code, 1, out + err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertRegex(err, "Cannot connect to the Docker daemon.*nothing was changed.*"
                                  "--no-stop")
            self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
            self.assert_no_leftovers()
            code, out, err = self.restore(archive, "noask", "--no-stop")
        self.assertEqual((code, err), (3, ""), out)
        self.assertRegex(out, "could not check which containers still use the old files "
                              "\\(Cannot connect to the Docker daemon.*\\); restart the running "
                              "ones: cd %s && docker compose restart" % re.escape(self.stack))
        self.assert_services_untouched()

    def test_says_when_the_compose_file_changed(self):
        archive = self.make_backup()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("docker compose up -d", out)
        with open(os.path.join(self.stack, "docker-compose.yml"), "a") as f:
            f.write("# changed\n")
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("docker compose up -d", out)
        self.assertIn("docker compose up -d", self.restore_log())

    def test_a_failing_swap_is_rolled_back(self):
        archive = self.make_backup()
        change_tree(self.stack)
        old, kept = items(self.stack), others(self.stack)
        real_rename = os.rename
        renames = []

        def failing_rename(src, dst, *args, **kwargs):
            renames.append(src)
            if os.path.basename(os.fspath(src)) == "services" and journal.STAGING_PREFIX \
                    not in os.fspath(src):
                raise OSError(5, "Input/output error (injected)")
            return real_rename(src, dst, *args, **kwargs)

        with mock.patch.object(os, "rename", failing_rename):
            code, _out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("Input/output error (injected)", err)
        self.assertNotIn("Traceback", err)
        self.assertTrue(any(os.path.basename(src) == "services" for src in renames))
        self.assertEqual(diff_snapshots(old, items(self.stack)), [])
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
        self.assert_no_leftovers()
        self.assert_stopped_and_started()
        self.assertIn("every item was put back", self.restore_log())
        self.assertIn("Details of the error:", self.restore_log())

    def test_in_place(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        kept = others(self.stack)
        code, out, err = self.restore(archive, "noask", "--in-place")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        self.assert_no_leftovers()
        self.assert_stopped_and_started()

    def test_failing_post_restore_hook(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hook says hello\necho hook error >&2\nexit 3\n")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with hook_pipe_warnings_ignored():
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("post_restore.sh failed with status 3", err)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])  # files restored
        log = self.restore_log()
        self.assertIn("post_restore.sh: hook says hello", log)
        self.assertIn("post_restore.sh: hook error", log)
        self.assertIn("post_restore.sh exited with status 3", log)
        self.assertIn("ERROR: post_restore.sh failed", log)
        self.assertIn("Finished At:", log)
        self.assert_stopped_and_started()

    def test_post_restore_hook_output_is_in_the_log_never_truncated(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo restored in $(pwd)\nls docker-compose.yml\n")
        archive = self.make_backup()
        change_tree(self.stack)
        with hook_pipe_warnings_ignored():
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        log = self.restore_log()
        lines = log.splitlines()
        self.assertTrue(lines[0].startswith("Started At:"), lines[0])
        hook = lines.index("  post_restore.sh: restored in %s" % self.stack)
        self.assertIn("  post_restore.sh: docker-compose.yml", lines)
        self.assertIn("post_restore.sh exited with status 0", lines)
        finished = [i for i, line in enumerate(lines) if line.startswith("Finished At:")]
        self.assertEqual(len(finished), 1, log)
        self.assertGreater(finished[0], hook)
        # The hook ran after the files were in place, with the services stopped.
        stopped = [i for i, line in enumerate(lines)
                   if line.startswith("Stopped: %s (" % ", ".join(RUNNING))]
        self.assertLess(stopped[0], hook)
        self.assertGreater(lines.index("Started again: %s" % ", ".join(RUNNING)), hook)



class WithoutDockerTests(RestoreCase):
    def test_without_docker(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertRegex(self.restore_log(), "Docker is not installed .*: no service runs")


class EmptyFilesTests(RestoreCase):
    """Issue 24: an archive holding many empty files beside one-byte ones
    hung the restore at 100% CPU (1 in 15 to 1 in 30 runs with 172 empty
    files), when an empty file's piece ended a batch of the writer process.
    Here one file in three is empty, so that many batches end on one."""

    def add_empty_files(self):
        folder = os.path.join(self.stack, "volumes", "sparse")
        os.mkdir(folder)
        expected = {}
        for i in range(3000):
            data = b"" if i % 3 == 2 else b"%d" % (i % 10)
            with open(os.path.join(folder, "f%04d" % i), "wb") as f:
                f.write(data)
            expected["volumes/sparse/f%04d" % i] = data
        return expected

    def test_many_empty_files_restore_whole(self):
        expected_data = self.add_empty_files()
        archive = self.make_backup()
        expected = items(self.stack)
        self.assertGreater(pgzip.default_jobs(), 1, "restore uses the writer process "
                                                     "only with more than one core")
        for attempt in range(2):
            with self.subTest(attempt=attempt):
                fresh = os.path.join(self.tmp, "fresh%d" % attempt)
                os.mkdir(fresh)
                with deadline(60):
                    code, out, err = call(restore.main, [archive, "noask", "--dir", fresh])
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(diff_snapshots(expected, items(fresh)), [])
                for rel, data in expected_data.items():
                    with open(os.path.join(fresh, rel), "rb") as f:
                        self.assertEqual(f.read(), data, rel)
                self.assertEqual(sum(1 for data in expected_data.values() if not data), 1000)
                self.assert_no_leftovers(fresh)


# ---------------------------------------------------------------------------
# 7. Interoperability with the old backup.sh and GNU tar

class WriterOrderTests(unittest.TestCase):
    """With the writer process, members that reuse a path still take effect
    in archive order: the result, or the error, is the one of the serial
    Stager."""

    def unpack(self, data, writer):
        with tempfile.TemporaryDirectory(prefix="writer-order-") as tmp:
            archive = os.path.join(tmp, "a.tar.gz")
            with open(archive, "wb") as f:
                f.write(data)
            root = os.path.join(tmp, "root")
            os.mkdir(root, 0o700)
            stager = unpack.Stager(root, IS_ROOT, fresh_root=True, writer=writer)
            self.assertEqual(stager.writer is not None, writer)
            try:
                unpack.read_archive(archive, [], stager)
            except tarformat.ArchiveError as e:
                return "error: %s" % e
            finally:
                stager.close()
            return snapshot(root)

    def test_same_result_as_without_the_writer(self):
        d = member(b"volumes/", tarformat.TYPE_DIR, mode=0o755)
        cases = {
            "file then symlink": [d, member(b"volumes/p", data=b"1"),
                                  member(b"volumes/p", tarformat.TYPE_SYMLINK, linkname=b"x")],
            "file then folder": [d, member(b"volumes/p", data=b"1"),
                                 member(b"volumes/p/", tarformat.TYPE_DIR, mode=0o755)],
            "file then fifo": [d, member(b"volumes/p", data=b"1"),
                               member(b"volumes/p", tarformat.TYPE_FIFO)],
            "file twice": [d, member(b"volumes/p", data=b"1"), member(b"volumes/p", data=b"2")],
            "symlink then file": [d, member(b"volumes/p", tarformat.TYPE_SYMLINK, linkname=b"x"),
                                  member(b"volumes/p", data=b"1")],
            "hard link to a file just sent": [
                d, member(b"volumes/t", data=b"1" * 5000),
                member(b"volumes/l", tarformat.TYPE_HARDLINK, linkname=b"volumes/t")],
            "hard link over a file just sent": [
                d, member(b"volumes/t", data=b"1"), member(b"volumes/l", data=b"2"),
                member(b"volumes/l", tarformat.TYPE_HARDLINK, linkname=b"volumes/t")],
            "file then a file below it": [d, member(b"volumes/p", data=b"1"),
                                          member(b"volumes/p/q/r", data=b"2")],
            "folder then file": [d, member(b"volumes/p/", tarformat.TYPE_DIR, mode=0o755),
                                 member(b"volumes/p", data=b"1")],
            "many files then a symlink over the first": (
                [d] + [member(b"volumes/f%d" % i, data=b"%d" % i) for i in range(300)]
                + [member(b"volumes/f0", tarformat.TYPE_SYMLINK, linkname=b"f1")]),
        }
        for name, members in cases.items():
            with self.subTest(name):
                serial = self.unpack(tar_gz(*members), writer=False)
                self.assertEqual(self.unpack(tar_gz(*members), writer=True), serial)
        self.assertRegex(self.unpack(tar_gz(*cases["folder then file"]), True),
                         "^error: .*would replace a directory")
        self.assertRegex(self.unpack(tar_gz(*cases["file then a file below it"]), True),
                         "^error: .*is not a directory")
        self.assertEqual(self.unpack(tar_gz(*cases["file then symlink"]), True)["volumes/p"].type,
                         "symlink")

    def test_waits_for_the_writer_every_so_many_files(self):
        members = [member(b"volumes/", tarformat.TYPE_DIR, mode=0o755)]
        members += [member(b"volumes/f%d" % i, data=b"x") for i in range(25)]
        with mock.patch.object(unpack, "SENT_LIMIT", 10), \
                mock.patch.object(unpack.Stager, "_wait_for_writer", autospec=True,
                                  side_effect=unpack.Stager._wait_for_writer) as waited:
            result = self.unpack(tar_gz(*members), writer=True)
        self.assertEqual(len(result), 26)
        self.assertEqual(waited.call_count, 2)


class InteropTests(RestoreCase):
    def test_archive_of_the_old_backup_sh(self):
        expected = {rel: e for rel, e in items(self.stack).items()
                    if iotstack.item_of(rel) in ("services", "volumes", "docker-compose.yml")}
        archive = os.path.join(self.stack, "backups/backup/backup_old.tar.gz")
        subprocess.run(["tar", "-czf", archive, "./services/", "./volumes/",
                        "./docker-compose.yml", "./menu.sh"], cwd=self.stack, check=True)
        change_tree(self.stack)
        untouched = {rel: e for rel, e in items(self.stack).items()
                     if iotstack.item_of(rel) not in ("services", "volumes", "docker-compose.yml")}
        code, out, err = self.restore("backup/backup_old.tar.gz", "noask")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        self.assertEqual(diff_snapshots(expected, {
            rel: e for rel, e in now.items()
            if iotstack.item_of(rel) in ("services", "volumes", "docker-compose.yml")}), [])
        # Items the archive does not hold are left alone, and so is menu.sh.
        self.assertEqual(diff_snapshots(untouched, {
            rel: e for rel, e in now.items()
            if iotstack.item_of(rel) not in ("services", "volumes", "docker-compose.yml")}), [])
        with open(os.path.join(self.stack, "menu.sh")) as f:
            self.assertTrue(f.read().endswith("# local change\n"))
        self.assertIn("Skipped 1 member(s) that are not part of an IOTstack backup, e.g. "
                      "menu.sh", self.restore_log())

    def test_gnu_tar_extracts_our_archives(self):
        archive = self.make_backup()
        expected = items(self.stack)
        dest = os.path.join(self.tmp, "extracted")
        os.mkdir(dest)
        argv = ["tar", "-xzf", archive, "-p", "-C", dest]
        if IS_ROOT:
            argv.insert(1, "--numeric-owner")
        subprocess.run(argv, check=True)
        self.assertEqual(diff_snapshots(expected, items(dest)), [])


# ---------------------------------------------------------------------------
# 8. Lock

class LockTests(RestoreCase):
    def test_busy_while_another_run_holds_the_lock(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        fd = os.open(os.path.join(self.stack, iotstack.LOCK_NAME), os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for argv in ([archive, "noask"], ["--recover"]):
            with self.subTest(argv=argv):
                code, out, err = self.restore(*argv)
                self.assertEqual(code, 4, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("another backup or restore is running", err)
                self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
                self.assert_services_untouched()
        fcntl.flock(fd, fcntl.LOCK_UN)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)


# ---------------------------------------------------------------------------
# 9. Ownership

@unittest.skipUnless(IS_ROOT, "owners can only be restored as root")
class OwnershipTests(RestoreCase):
    def test_numeric_owners_and_modes_as_archived(self):
        archive = self.make_backup()
        expected = items(self.stack)
        self.assertEqual(expected[P["orphan_owner"]][2:4], (54321, 54321))
        for rel in (P["orphan_owner"], P["grafana_dir"], P["symlink_abs"], P["setuid"],
                    P["setgid"], P["mixed_owner"]):
            os.lchown(os.path.join(self.stack, rel), 0, 0)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        self.assertEqual(diff_snapshots(expected, now), [])
        self.assertEqual(now[P["orphan_owner"]][2:4], (54321, 54321))
        self.assertEqual((now[P["setuid"]].mode, now[P["setuid"]].uid), (0o4755, 1000))
        self.assertEqual((now[P["setgid"]].mode, now[P["setgid"]].gid), (0o2755, 1000))
        self.assertEqual(now[P["mixed_owner"]][2:4], (1000, 472))

    def test_set_group_id_folders_do_not_change_restored_groups(self):
        # A new file takes the group of a set-group-ID folder it is made in;
        # root-owned members must still come back with group 0, whether the
        # staging folder inherits the bit (.tmp has it) or --in-place
        # unpacks into a folder that has it.
        rel = "services/mosquitto/service.yml"
        self.assertEqual(items(self.stack)[rel][2:4], (0, 0))
        archive = self.make_backup()
        for folder in (".tmp", "services", "services/mosquitto"):
            path = os.path.join(self.stack, folder)
            os.chown(path, 0, 472)
            os.chmod(path, 0o2775)
        for options in (["noask"], ["noask", "--in-place", "--only", "services/mosquitto"]):
            with self.subTest(options=options):
                os.chown(os.path.join(self.stack, rel), 1000, 1000)
                code, out, err = self.restore(archive, *options)
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(items(self.stack)[rel][2:4], (0, 0))

    def test_log_owned_like_backup_logs(self):
        user = some_user()
        os.chown(self.stack, user.pw_uid, user.pw_gid)
        # No USER: the default owner, as from cron.
        code, out, err = call(backup.main, ["3", "--no-stop", "--dir", self.stack])
        self.assertEqual(code, 0, err)
        archive = os.path.join(self.stack, re.search(r"Backup complete: \./(\S+)", out).group(1))
        (backup_log,) = glob.glob(os.path.join(self.stack, "backups/logs/backup_*.log"))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        (restore_log,) = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        st_backup, st_restore = os.stat(backup_log), os.stat(restore_log)
        self.assertEqual((st_restore.st_uid, st_restore.st_gid), (user.pw_uid, user.pw_gid))
        self.assertEqual((st_restore.st_uid, st_restore.st_gid),
                         (st_backup.st_uid, st_backup.st_gid))
        logs = os.stat(os.path.join(self.stack, "backups/logs"))
        self.assertEqual((logs.st_uid, logs.st_gid), (user.pw_uid, user.pw_gid))

    def test_log_owned_by_sudo_user(self):
        user = some_user()
        archive = self.make_backup()  # the stack belongs to root
        os.environ["SUDO_USER"] = user.pw_name
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        (restore_log,) = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        st = os.stat(restore_log)
        self.assertEqual((st.st_uid, st.st_gid), (user.pw_uid, user.pw_gid))


# ---------------------------------------------------------------------------
# 10. Not enough space to stage

@unittest.skipUnless(IS_ROOT, "mounting a tmpfs needs root")
class NoSpaceTests(RestoreCase):
    def setUp(self):
        super().setUp()
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", self.mnt],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except (OSError, subprocess.CalledProcessError) as e:
            self.skipTest("cannot mount a tmpfs: %s" % (getattr(e, "stderr", b"") or e))
        self.addCleanup(subprocess.run, ["umount", "-l", self.mnt], check=False)

    def stack_and_archive(self, scale):
        """A backup made elsewhere, and the same tree built in the tmpfs."""
        template = os.path.join(self.tmp, "template")
        build_stack(template, scale=scale)
        code, out, err = call(backup.main, ["1", "root", "--no-stop", "--dir", template])
        self.assertEqual(code, 0, err)
        archive = os.path.join(self.tmp, "backup.tar.gz")
        shutil.copy(os.path.join(template, re.search(r"Backup complete: \./(\S+)", out)
                                 .group(1)), archive)
        stack = os.path.join(self.mnt, "IOTstack")
        build_stack(stack, scale=scale)
        os.makedirs(os.path.join(stack, "backups/logs"))
        with open(os.path.join(stack, "docker-compose.yml"), "a") as f:
            f.write("# changed\n")
        return stack, archive, items(template)

    def assert_no_space_then_in_place(self, stack, archive, expected):
        before = whole(stack)
        code, out, err = call(restore.main, [archive, "noask", "--dir", stack])
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("free space", err)
        self.assertIn("--in-place", err)
        self.assertEqual(diff_snapshots(before, whole(stack)), [])
        self.assert_no_leftovers(stack)
        self.assert_services_untouched()
        code, out, err = call(restore.main, [archive, "noask", "--in-place", "--dir", stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(stack)), [])

    def test_said_before_unpacking(self):
        # The data fits once, not twice.
        stack, archive, expected = self.stack_and_archive(0.5)
        self.assertGreater(restore.estimated_size(archive), iotstack.free_bytes(self.mnt))
        self.assert_no_space_then_in_place(stack, archive, expected)

    def test_disk_full_while_unpacking(self):
        # The estimate (the tar size) fits, the staged files (whole 4 KiB
        # pages each on a tmpfs) do not: the disk fills while unpacking.
        stack, archive, expected = self.stack_and_archive(SCALE)
        need = restore.estimated_size(archive)
        pages = sum(-(-e.size // 4096) * 4096 for e in expected.values()
                    if e.type == "file" and e.link_group in (None, P["hardlink"]))
        self.assertGreater(pages - need, 64 * 1024)
        filler = iotstack.free_bytes(self.mnt) - (need + pages) // 2
        with open(os.path.join(self.mnt, "filler"), "wb") as f:
            f.write(bytes(filler // 4096 * 4096))
        self.assertGreater(iotstack.free_bytes(self.mnt), need)
        self.assert_no_space_then_in_place(stack, archive, expected)


if __name__ == "__main__":
    unittest.main()
