"""End-to-end tests of backup.py: main([...]) on a built tree and assertions on
the files, the archive, the log and the exit code.  Classes with engine = True
run real compose projects on the real engine (nodered and mosquitto running);
the others run as on a machine without Docker, where nothing is stopped."""
import contextlib
import fcntl
import glob
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import unittest
from unittest import mock

from iotstack_backup import (
    archive_writer,
    backup,
    iotstack,
    progress,
    run,
    tarformat,
)
from tests import real_stack
from tests.backup_case import StackTestCase, read_log
from tests.stacktree import IS_ROOT, diff_snapshots, snapshot
from tests.support import BACKUP_PY, REPO, USER_ARGS, run_main


def archive_names(path):
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def manifest_snapshot(root):
    """The part of a tree a backup holds."""
    tree = snapshot(root, skip=("backups", ".tmp", "menu.sh"))
    dumps = os.path.join(root, ".tmp", "databases_backup")
    for rel, entry in snapshot(dumps).items():
        tree[".tmp/databases_backup/" + rel] = entry
    return tree


def only_failure_logs(backups):
    """How many logs of failed runs (NAME.failed.log) backups/ holds, after
    checking it holds nothing else: no archive, no other log."""
    found = []
    for folder, _dirs, files in os.walk(backups):
        found += [os.path.relpath(os.path.join(folder, name), backups) for name in files]
    assert not [rel for rel in found if rel.endswith(".tar.gz")], found
    logs = [rel for rel in found if rel.startswith("logs/")]
    assert all(rel.startswith("logs/backup_") and rel.endswith(".failed.log") for rel in logs), logs
    return len(logs)

class NamesTest(StackTestCase):
    def test_type_3_writes_both_names_from_one_write(self):
        code, out, err = self.backup("3", *USER_ARGS)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(os.path.samefile(self.dated, self.rolling))
        self.assert_verifies(self.dated)
        self.assertIn("Backup complete: ./backups/backup/backup_2026-11-26_0200.tar.gz", out)
        log = read_log(self.stack)
        for field in ("Started At:", "Current Directory: %s" % self.stack, "Backup Type: 3",
                      "Backup File: ./backups/backup/backup_2026-11-26_0200.tar.gz",
                      "Rolling File: ./backups/rolling/backup_4.tar.gz",
                      "Rolling Overwritten: False", "Backup Size (bytes): %d"
                      % os.path.getsize(self.dated), "Verified: OK", "Finished At:",
                      "Duration (s):", "Items backed up:", "Items Excluded:"):
            self.assertIn(field, log)

    def test_type_1_and_2(self):
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        self.assertTrue(os.path.exists(self.dated))
        self.assertFalse(os.path.exists(self.rolling))
        shutil.rmtree(self.backups)
        self.assertEqual(self.backup("2", *USER_ARGS)[0], 0)
        self.assertTrue(os.path.exists(self.rolling))
        self.assertEqual(self.archives("backup"), [])

    def test_default_type_is_3(self):
        self.assertEqual(self.backup(*(["3"] + USER_ARGS if USER_ARGS else []))[0], 0)
        shutil.rmtree(self.backups)
        code, _out, _err = run_main(backup, ["--dir", self.stack] + (["3", "root"] if IS_ROOT else []))
        self.assertEqual(code, 0)
        self.assertTrue(os.path.exists(self.dated) and os.path.exists(self.rolling))

    def test_bad_type_is_refused_before_anything(self):
        for bad in ("0", "4", "daily"):
            code, out, err = self.backup(bad)
            self.assertEqual(code, 2)
            self.assertIn("1, 2 or 3", err)
        self.assertEqual(only_failure_logs(self.backups), 3)

    def test_same_minute_never_overwrites(self):
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        with open(self.dated, "rb") as f:
            first = f.read()
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        second = self.dated.replace("0200.tar.gz", "0200-2.tar.gz")
        self.assertTrue(os.path.exists(second))
        with open(self.dated, "rb") as f:
            self.assertEqual(f.read(), first)
        logs = sorted(os.listdir(os.path.join(self.backups, "logs")))
        self.assertEqual(logs, ["backup_2026-11-26_0200-2.log", "backup_2026-11-26_0200.log"])

    def test_rolling_is_replaced_by_the_new_archive(self):
        os.makedirs(os.path.dirname(self.rolling))
        with open(self.rolling, "wb") as f:
            f.write(b"last week")
        self.assertEqual(self.backup("2", *USER_ARGS)[0], 0)
        self.assert_verifies(self.rolling)
        self.assertIn("Rolling Overwritten: True", read_log(self.stack))

    def test_stale_partial_files_are_removed(self):
        folder = os.path.join(self.backups, "backup")
        stale = os.path.join(folder, ".backup_2026-11-25_0200.tar.gz.999.partial")
        with open(stale, "wb") as f:
            f.write(b"half")
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        self.assertFalse(os.path.exists(stale))
        self.assertIn("Removed an unfinished archive", read_log(self.stack))


class ProgressTest(StackTestCase):
    def test_progress_only_on_a_terminal(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True
        terminal = Terminal()
        with mock.patch("sys.stderr", terminal), mock.patch.object(progress.time, "monotonic",
                                                                   side_effect=range(10 ** 6)):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = backup.main(["1", "--dir", self.stack] + USER_ARGS)
        self.assertEqual(code, 0)
        self.assertIn("Backup complete: ", out.getvalue())
        self.assertIn("\rBacking up: ", terminal.getvalue())
        self.assertIn("files", terminal.getvalue())
        # From cron (not a terminal) stderr stays empty: see the other tests' err == "".


class LocationTest(StackTestCase):
    def test_outside_iotstack_is_an_error_and_writes_nothing(self):
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        cwd = os.getcwd()
        os.chdir(elsewhere)
        self.addCleanup(os.chdir, cwd)
        code, out, err = run_main(backup, ["3"] + USER_ARGS)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("not an IOTstack directory", err)
        self.assertEqual(os.listdir(elsewhere), [])

    def test_found_from_cwd_and_from_environment(self):
        cwd = os.getcwd()
        os.chdir(self.stack)
        self.addCleanup(os.chdir, cwd)
        self.assertEqual(run_main(backup, ["1"] + USER_ARGS)[0], 0)
        os.chdir(self.tmp)
        with mock.patch.dict(os.environ, {"IOTSTACK": self.stack}):
            self.assertEqual(run_main(backup, ["2"] + USER_ARGS)[0], 0)
        self.assertTrue(os.path.exists(self.rolling))


class ArchiveContentTest(StackTestCase):
    def test_manifest(self):
        self.write_hook("post_restore.sh", "true")
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        names = archive_names(self.dated)
        tops = {name.split("/")[0] for name in names}
        self.assertEqual(tops, {"services", "volumes", "docker-compose.yml",
                                "docker-compose.override.yml", "compose-override.yml", ".env",
                                "extra", ".tmp", "post_restore.sh"})
        self.assertIn(".tmp/databases_backup/influxdb-backup.tar", names)
        self.assertFalse([n for n in names if n.startswith((".tmp/cache", "backups"))])

    def test_missing_volumes_is_noted_not_fatal(self):
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        code, _out, _err = self.backup("1", *USER_ARGS)
        self.assertEqual(code, 0)
        self.assertIn("./volumes/ is missing", read_log(self.stack))

    def test_exclude(self):
        code, _out, _err = self.backup("1", "--exclude", "volumes/influxdb",
                                       "--exclude", "*.fifo", *USER_ARGS)
        self.assertEqual(code, 0)
        names = archive_names(self.dated)
        self.assertFalse([n for n in names if n.startswith("volumes/influxdb") or
                          n.endswith(".fifo")])
        log = read_log(self.stack)
        excluded = log.split("Items Excluded:\n", 1)[1]
        self.assertIn("./volumes/influxdb\n", excluded)
        self.assertIn("./volumes/nodered/data/control.fifo\n", excluded)

    def test_gnu_tar_extracts_the_tree_exactly(self):
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        out = os.path.join(self.tmp, "extracted")
        os.mkdir(out)
        subprocess.run(["tar", "-xzf", self.dated, "-C", out, "--numeric-owner", "-p"],
                       check=True)
        ignore = () if IS_ROOT else ("uid", "gid")
        self.assertEqual(diff_snapshots(manifest_snapshot(self.stack), manifest_snapshot(out),
                                        ignore=ignore), [])

    def test_owners_are_numbers_only(self):
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        with tarfile.open(self.dated) as tf:
            members = tf.getmembers()
        self.assertEqual({(m.uname, m.gname) for m in members}, {("", "")})
        if IS_ROOT:
            self.assertIn(54321, {m.uid for m in members})

    def test_sockets_are_skipped_with_a_note(self):
        path = os.path.join(self.stack, "volumes", "mosquitto", "broker.sock")
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(path)
        self.assertEqual(self.backup("1", *USER_ARGS)[0], 0)
        self.assertNotIn("volumes/mosquitto/broker.sock", archive_names(self.dated))
        self.assertIn("skipped socket volumes/mosquitto/broker.sock", read_log(self.stack))

    def test_dry_run_writes_nothing(self):
        before = snapshot(self.stack)
        code, out, err = self.backup("3", "--dry-run")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        self.assertIn("Would write: ./backups/backup/backup_2026-11-26_0200.tar.gz", out)
        self.assertIn("  ./docker-compose.override.yml", out)
        # What it says about real services: StackControlTest.test_dry_run_stops_nothing.


class StackHandlingTest(StackTestCase):
    engine = True

    def test_stops_and_starts_exactly_the_running_services(self):
        self.write_hook("pre_backup.sh", "docker compose ps --services --filter status=running "
                                         "| sort | tr '\\n' ' '; echo")
        self.write_hook("post_backup.sh", "echo post: $(docker compose ps --services "
                                          "--filter status=running | sort)")
        with real_stack.E.EventWatcher(self.project) as events:
            code, out, _err = self.backup("1", *USER_ARGS)
        self.assertEqual(code, 0)
        for name in ("mosquitto", "nodered"):
            actions = events.actions(name, only=("die", "start", "create", "destroy"))
            self.assertEqual(actions, ["die", "start"], name)  # stop/start, never down/up
        self.assertEqual(events.events("grafana") + events.events("influxdb"), [])
        self.assert_as_before()  # grafana and influxdb stay stopped
        log = read_log(self.stack)
        self.assertIn("pre_backup.sh: mosquitto nodered", log)
        self.assertIn("post_backup.sh: post: mosquitto nodered", log)
        self.assertIn("Services Stopped: mosquitto, nodered", log)
        self.assertIn("Services Started: mosquitto, nodered", log)
        self.assertIn("Services Left Alone: grafana (exited), influxdb (exited)", log)
        self.assertIn("Services stopped and started again: mosquitto, nodered", out)

    def test_failing_pre_backup_stops_before_anything(self):
        self.write_hook("pre_backup.sh", "echo dump failed; exit 3")
        with real_stack.E.EventWatcher(self.project) as events:
            code, _out, err = self.backup("3", *USER_ARGS)
        self.assertEqual(code, 1)
        self.assertIn("pre_backup.sh failed with status 3", err)
        self.assertEqual(events.stop(), [])
        self.assertEqual(self.archives("backup"), [])
        self.assertIn("pre_backup.sh: dump failed", read_log(self.stack))

    def test_no_stop(self):
        with real_stack.E.EventWatcher(self.project) as events:
            self.assertEqual(self.backup("1", "--no-stop", *USER_ARGS)[0], 0)
        self.assertEqual(events.stop(), [])
        self.assert_as_before()

    def test_no_daemon_the_backup_is_taken_live_with_exit_3(self):
        with real_stack.E.EventWatcher(self.project) as events, mock.patch.dict(
                os.environ, {"DOCKER_HOST": "unix://%s/nothing.sock" % self.tmp}):
            code, out, _err = self.backup("1", *USER_ARGS)
        self.assertEqual(code, run.EXIT_WARNINGS)
        self.assertIn("Cannot connect to the Docker daemon", read_log(self.stack))
        self.assertIn("Warning: services were not stopped (the backup was taken live): "
                      "Cannot connect to the Docker daemon", out)
        self.assert_verifies(self.dated)
        self.assertEqual(events.stop(), [])
        self.assert_as_before()

    def test_services_restarted_when_verify_fails(self):
        def broken(verifier, size, expected):
            verifier.cancel()
            raise tarformat.ArchiveError("simulated read error")
        with real_stack.E.EventWatcher(self.project) as events, mock.patch.object(
                archive_writer.FollowingVerifier, "finish", broken):
            code, _out, err = self.backup("3", *USER_ARGS)
        self.assertEqual(code, 1)
        self.assertIn("verification of the new archive failed", err)
        self.assertEqual(self.archives("backup") + self.archives("rolling"), [])
        for name in ("mosquitto", "nodered"):
            self.assertEqual(events.actions(name, only=("die", "start")), ["die", "start"])
        self.assert_as_before()
        self.assertIn("Verified: FAILED: simulated read error", read_log(self.stack))


class NoDockerTest(StackTestCase):
    def test_no_docker_at_all(self):
        code, _out, _err = self.backup("1", *USER_ARGS)
        self.assertEqual(code, 0)
        self.assertIn("Docker is not installed", read_log(self.stack))
        self.assertIn("Services Stopped: none", read_log(self.stack))


class ConcurrencyTest(StackTestCase):
    def test_second_run_exits_at_once(self):
        os.makedirs(os.path.join(self.stack, ".tmp"), exist_ok=True)
        with open(os.path.join(self.stack, iotstack.LOCK_NAME), "w") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            code, _out, err = self.backup("3", *USER_ARGS)
        self.assertEqual(code, run.EXIT_BUSY)
        self.assertIn("another backup or restore is running", err)
        # Only the log of that failure (issue 21: every failure is logged).
        self.assertEqual(only_failure_logs(self.backups), 1)
        # Nothing stopped: test_stack_control.BackupRefusalTest.

    def test_pending_restore_journal_blocks_backup(self):
        with open(os.path.join(self.stack, iotstack.JOURNAL_NAME), "w") as f:
            f.write("{}")
        code, _out, err = self.backup("1", *USER_ARGS)
        self.assertEqual(code, 1)
        self.assertIn("restore.py --recover", err)


@unittest.skipUnless(IS_ROOT, "ownership needs root")
class OwnershipTest(StackTestCase):
    def user_with_foreign_group(self):
        # 'sync' has the primary group 'nogroup' on Debian: defect 8's case.
        try:
            entry = pwd.getpwnam("sync")
        except KeyError:
            self.skipTest("no user 'sync' on this system")
        return entry

    def test_outputs_belong_to_user_and_primary_group(self):
        user = self.user_with_foreign_group()
        self.assertEqual(os.stat(self.backups).st_uid, 0)  # root's, as the old script left it
        self.assertEqual(self.backup("3", "sync")[0], 0)
        paths = [self.backups, self.dated, self.rolling, os.path.join(self.backups, "backup"),
                 os.path.join(self.backups, "rolling"), os.path.join(self.backups, "logs")]
        paths += glob.glob(os.path.join(self.backups, "logs", "*"))
        for path in paths:
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid), (user.pw_uid, user.pw_gid), path)
        self.assertEqual(os.stat(self.dated).st_mode & 0o777, 0o640)

    def test_unknown_user_fails_before_anything(self):
        code, _out, err = self.backup("3", "no-such-user-xyz")
        self.assertEqual(code, 2)
        self.assertIn("unknown user 'no-such-user-xyz'", err)
        self.assertEqual(only_failure_logs(self.backups), 1)
        # Nothing stopped: test_stack_control.BackupRefusalTest.

    def test_no_user_from_cron_takes_sudo_user_without_asking(self):
        user = self.user_with_foreign_group()
        with mock.patch.dict(os.environ, {"SUDO_USER": "sync"}), \
                mock.patch("sys.stdin", io.StringIO("")):
            code, _out, _err = self.backup("1")
        self.assertEqual(code, 0)
        self.assertEqual(os.stat(self.dated).st_uid, user.pw_uid)
        self.assertIn("Backup Owner: sync (default ($SUDO_USER), no terminal to ask)",
                      read_log(self.stack))

    def test_on_a_terminal_root_is_asked_with_the_default_offered(self):
        user = self.user_with_foreign_group()

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        for typed, expected_uid in (("\n", user.pw_uid), ("root\n", 0)):
            shutil.rmtree(self.backups, ignore_errors=True)
            with mock.patch.dict(os.environ, {"SUDO_USER": "sync"}), \
                    mock.patch("sys.stdin", Terminal(typed)):
                code, out, _err = self.backup("1")
            self.assertEqual(code, 0)
            self.assertIn("Owner of the backup files [sync]: ", out)
            self.assertEqual(os.stat(self.dated).st_uid, expected_uid, typed)

    def test_no_user_defaults_to_the_owner_of_the_stack(self):
        user = self.user_with_foreign_group()
        os.chown(self.stack, user.pw_uid, user.pw_gid)
        with mock.patch("sys.stdin", io.StringIO("")):
            self.assertEqual(self.backup("1")[0], 0)
        self.assertEqual(os.stat(self.dated).st_uid, user.pw_uid)


def python_runs_as(exe, demote):
    """Whether exe is a Python 3.9+ that the demoted user can run."""
    try:
        return subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 9)"],
                              preexec_fn=demote, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


@unittest.skipUnless(IS_ROOT, "needs root to run the backup as another user")
class NormalUserTest(StackTestCase):
    """As a normal user: USER is ignored, unreadable files are warnings."""

    def test_unreadable_file_gives_exit_3_and_a_complete_archive(self):
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user 'nobody'")
        os.chmod(self.tmp, 0o755)
        for folder, dirs, files in os.walk(self.stack):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), nobody.pw_uid, nobody.pw_gid)
        os.chown(self.stack, nobody.pw_uid, nobody.pw_gid)
        secret = os.path.join(self.stack, "volumes", "mosquitto", "pwfile", "pwfile")
        os.chown(secret, 0, 0)
        os.chmod(secret, 0o600)
        os.chmod(os.path.dirname(secret), 0o755)

        def as_nobody():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        # nobody may not reach this checkout or pyenv's Python under /root.
        code = os.path.join(self.tmp, "code")
        os.mkdir(code)
        shutil.copy(BACKUP_PY, code)
        shutil.copytree(os.path.join(REPO, "iotstack_backup"), os.path.join(code, "iotstack_backup"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        python = next((exe for exe in (sys.executable, "/usr/bin/python3")
                       if python_runs_as(exe, as_nobody)), None)
        if python is None:
            self.skipTest("no Python 3.9+ that the user nobody can run")
        result = subprocess.run([python, os.path.join(code, "backup.py"), "1", "pi",
                                 "--dir", self.stack],
                                preexec_fn=as_nobody, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin", "HOME": self.tmp})
        self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stderr)
        self.assertIn(b"Warning: cannot read volumes/mosquitto/pwfile/pwfile", result.stdout)
        (archive,) = glob.glob(os.path.join(self.backups, "backup", "backup_*.tar.gz"))
        self.assert_verifies(archive)
        names = archive_names(archive)
        self.assertNotIn("volumes/mosquitto/pwfile/pwfile", names)
        self.assertIn("volumes/mosquitto/pwfile", names)
        self.assertEqual(os.stat(archive).st_uid, nobody.pw_uid)
        log = read_log(self.stack)
        self.assertIn("USER pi ignored: not running as root", log)
        self.assertIn("Warning: cannot read volumes/mosquitto/pwfile/pwfile", log)


@unittest.skipUnless(IS_ROOT, "mounting a small tmpfs needs root")
class FullDiskTest(StackTestCase):
    scale = 1.0
    engine = True

    def test_disk_full_removes_the_partial_and_keeps_earlier_backups(self):
        shutil.rmtree(self.backups)
        os.makedirs(self.backups)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", self.backups],
                          stderr=subprocess.DEVNULL).returncode != 0:
            self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", self.backups])
        os.makedirs(os.path.dirname(self.rolling))
        with open(self.rolling, "wb") as f:
            f.write(b"earlier backup")
        code, _out, err = self.backup("3", *USER_ARGS)
        self.assertEqual(code, 1)
        self.assertIn("disk full", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        with open(self.rolling, "rb") as f:
            self.assertEqual(f.read(), b"earlier backup")
        leftovers = [n for d in ("backup", "rolling")
                     for n in os.listdir(os.path.join(self.backups, d)) if n.endswith(".partial")]
        self.assertEqual(leftovers, [])
        self.assertEqual(self.archives("backup"), [])
        self.assert_as_before()


def strace_available():
    return shutil.which("strace") is not None and IS_ROOT


@unittest.skipUnless(strace_available(), "needs strace and root (ptrace)")
class KillTest(StackTestCase):
    """Kill the real process at its Nth rename: names only hold complete archives.

    strace follows threads (-f) but docker runs in its own process, which
    strace would follow too: its renames would shift the counts, so docker's
    children are not traced (--detach-on=execve)."""

    scale = 0.1
    engine = True

    def run_script(self, strace_args, *args):
        cmd = ["strace", "-f", "--detach-on=execve", "-qq", "-o", "/dev/null"] + strace_args + [
            sys.executable, BACKUP_PY] + list(args) + ["--dir", self.stack] + USER_ARGS
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=real_stack.script_env(), timeout=300)

    def archives(self):
        return sorted(glob.glob(os.path.join(self.backups, "*", "*.tar.gz")))

    def test_kill_9_at_every_rename(self):
        self.assertEqual(self.backup("2", *USER_ARGS)[0], 0)  # last week's rolling archive
        with open(self.rolling, "rb") as f:
            previous = f.read()
        renames = "rename,renameat,renameat2"
        for n in range(1, 20):
            result = self.run_script(["-e", "trace=" + renames, "-e",
                                      "inject=%s:signal=SIGKILL:when=%d" % (renames, n)], "3")
            for path in self.archives():
                self.assert_verifies(path)
            with open(self.rolling, "rb") as f:
                current = f.read()
            if result.returncode == 0:
                break
            self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
            if current != previous:
                previous = current  # replaced whole by a complete archive
        else:
            self.fail("the backup never completed")
        self.assertGreater(n, 2)
        # The next run cleans up and restarts what a killed run left stopped.
        self.assertEqual(self.backup("3", *USER_ARGS)[0], 0)
        partials = glob.glob(os.path.join(self.backups, "*", ".*.partial"))
        self.assertEqual(partials, [])
        self.assert_as_before()

    def test_sigterm_while_writing_restarts_services_and_leaves_no_archive(self):
        # strace counts the writes of every thread, so several points are
        # tried; each must end in a clean state.
        interrupted = 0
        for n in (5, 20, 60):
            shutil.rmtree(self.backups, ignore_errors=True)
            result = self.run_script(["-e", "trace=write", "-e",
                                      "inject=write:signal=SIGTERM:when=%d" % n], "3")
            self.assert_as_before()
            self.assertEqual(glob.glob(os.path.join(self.backups, "*", ".*.partial")), [])
            if result.returncode == 0:
                continue
            self.assertEqual(result.returncode, 128 + signal.SIGTERM, result.stderr)
            self.assertIn(b"interrupted by SIGTERM", result.stderr)
            for path in glob.glob(os.path.join(self.backups, "*", "*.tar.gz")):
                self.assert_verifies(path)
            interrupted += 1
        self.assertGreater(interrupted, 0)

if __name__ == "__main__":
    unittest.main()
