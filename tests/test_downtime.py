"""--stop each and --stop all against a REAL Docker engine (tests/engine.py).

A writer container appends a counter line to volumes/writer/counter.log
every 20 ms: the archived file must end exactly where the container stopped
(the live file goes on with the restarted counter's "1"), so it was read
while the writer was down.  Two services mounting sub-folders of one
volumes/ folder are down together; services that share nothing are never
down at the same time; with --stop all every one is down together; every
outage ends before the run does.  The guarantees of a backup hold in both
modes: SIGTERM or kill -9 while a group is down, a start that fails, a full
disk, a verification that fails.  Without an engine these tests skip with
the reason (`bash .ci/engine start` and export DOCKER_HOST).
"""
import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
from unittest import mock

from iotstack_backup import archive_writer, backup, docker_compose, tarformat
from tests import engine as E
from tests.support import BACKUP_PY, USER_ARGS, IsolatedCase

SERVICES = [
    {"name": "writer", "writer": True},
    {"name": "shared1", "volumes": ["./volumes/shared/a:/data"]},
    {"name": "shared2", "volumes": ["./volumes/shared/b:/data"]},
    {"name": "alone", "volumes": ["./volumes/alone:/data"]},
    {"name": "app", "depends_on": ["alone"]},
    {"name": "idle"},
]


def overlap(a, b):
    """Do two outages [(down_ns, up_ns)] share a moment?"""
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


def archive_member(path, name):
    with tarfile.open(path) as tf:
        return tf.extractfile(name).read()


def archive_names(path):
    with tarfile.open(path) as tf:
        return sorted(tf.getnames())


class DowntimeTestCase(IsolatedCase):
    flavour = "v2"
    services = SERVICES

    def setUp(self):
        super().setUp()
        self.project = E.stack(self, self.services, flavour=self.flavour, prefix="iotstack-dt-")
        self.stack = self.project.stack_dir
        for rel in ("volumes/shared/a/a.txt", "volumes/shared/b/b.txt", "services/x/conf"):
            path = os.path.join(self.stack, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("data\n")
        os.makedirs(os.path.join(self.stack, "volumes/alone"), exist_ok=True)
        with open(os.path.join(self.stack, "volumes/alone/blob"), "wb") as f:
            f.write(os.urandom(1 << 20))
        self.project.up()
        self.project.wait_for({s["name"]: "running" for s in self.services})
        time.sleep(0.3)  # a few counter lines

    def env(self):
        return dict(os.environ, DOCKER_HOST=E.engine().docker_host)

    def backup(self, *args):
        return subprocess.run([sys.executable, BACKUP_PY, "1", "--dir", self.stack]
                              + list(args) + USER_ARGS, env=self.env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)

    def watched_backup(self, *args):
        watcher = E.EventWatcher(self.project).start()
        try:
            result = self.backup(*args)
        finally:
            watcher.stop()
        return result, watcher

    def sigterm_once_stopping(self, mode, service=None, delay=0.2):
        """Run a backup and SIGTERM it `delay` s after the marker first names
        service (any, when None): while that stop is under way or done.
        Returns (exit code, stderr)."""
        proc = subprocess.Popen([sys.executable, BACKUP_PY, "1", "--dir", self.stack,
                                 "--stop", mode] + USER_ARGS, env=self.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        marker = os.path.join(self.stack, docker_compose.STOPPED_MARKER)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                with open(marker) as f:
                    if service is None or service in json.load(f)["services"]:
                        break
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
        return proc.returncode, err

    def archives(self):
        return sorted(glob.glob(os.path.join(self.stack, "backups", "backup", "*.tar.gz")))

    def log_text(self):
        logs = sorted(glob.glob(os.path.join(self.stack, "backups", "logs", "*.log")),
                      key=os.path.getmtime)
        with open(logs[-1], encoding="utf-8") as f:
            return f.read()

    def live_counter(self):
        with open(os.path.join(self.stack, "volumes/writer/counter.log"), "rb") as f:
            return f.read()

    def assert_all_running(self):
        self.project.wait_for({s["name"]: "running" for s in self.services}, timeout=20)
        self.assertFalse(os.path.exists(os.path.join(self.stack, docker_compose.STOPPED_MARKER)))

    def assert_read_while_stopped(self, archive):
        """The archived counter ends where the writer stopped: the live file
        holds it whole, then the restarted counter's first lines."""
        archived = archive_member(archive, "volumes/writer/counter.log")
        self.assertTrue(archived.endswith(b"\n") and len(archived) > 2, archived[-20:])
        deadline = time.monotonic() + 10
        while len(self.live_counter()) < len(archived) + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = self.live_counter()
        self.assertTrue(live.startswith(archived), "the archived file is not a prefix")
        self.assertTrue(live[len(archived):].startswith(b"1\n2\n"),
                        "the writer wrote after it was read: %r" % live[len(archived) - 12:
                                                                        len(archived) + 8])


class EachModeTest(DowntimeTestCase):
    def test_groups_down_one_at_a_time(self):
        result, watcher = self.watched_backup()
        self.assertEqual(result.returncode, 0, result.stderr)
        out = {s["name"]: watcher.outages(s["name"]) for s in SERVICES}
        for name in ("writer", "shared1", "shared2", "alone", "app"):
            self.assertEqual(len(out[name]), 1, (name, watcher.events(name)))
            self.assertIsNotNone(out[name][0][1], "%s never came back" % name)
        self.assertEqual(out["idle"], [])  # no data in the backup: never stopped
        # Sharing volumes/shared: down together; depending: down together.
        self.assertTrue(overlap(out["shared1"], out["shared2"]))
        self.assertTrue(overlap(out["alone"], out["app"]))
        # Sharing nothing: never down at the same moment.
        for a, b in (("writer", "shared1"), ("writer", "alone"), ("shared1", "alone")):
            self.assertFalse(overlap(out[a], out[b]), (a, b))
        self.assert_all_running()
        self.assert_read_while_stopped(self.archives()[0])
        log = self.log_text()
        self.assertIn("Stop window (--stop each): shared1, shared2 (volumes/shared)", log)
        self.assertIn("Left running, no data of theirs in the backup: idle", log)
        self.assertRegex(log, r"Stop window over: writer down \d+\.\d s")
        self.assertIn("Longest Outage (s):", log)
        self.assertRegex(result.stdout, r"Longest outage: \d+\.\d s")

    def test_same_members_as_a_live_backup_and_gnu_tar_extracts_them(self):
        # Live, the writer's file may change while it is read: a warning, exit 3.
        self.assertIn(self.backup("--stop", "none").returncode, (0, 3))
        live = self.archives()[0]
        result = self.backup()
        self.assertEqual(result.returncode, 0, result.stderr)
        ordered = [a for a in self.archives() if a != live][0]
        self.assertEqual(archive_names(ordered), archive_names(live))
        with tarfile.open(ordered) as tf:
            order = tf.getnames()
        self.assertGreater(order.index("volumes/writer/counter.log"), order.index("services/x/conf"))
        target = tempfile.mkdtemp(prefix="iotstack-dt-x-")
        self.addCleanup(subprocess.run, ["rm", "-rf", target])
        tar = subprocess.run(["tar", "-xzf", ordered, "-C", target], stderr=subprocess.PIPE,
                             universal_newlines=True)
        self.assertEqual((tar.returncode, tar.stderr), (0, ""))
        with open(os.path.join(target, "volumes/shared/b/b.txt")) as f:
            self.assertEqual(f.read(), "data\n")

    def test_sigterm_while_a_group_is_down(self):
        for mode in ("each", "all"):
            with self.subTest(mode=mode):
                self.sigterm_while_down(mode)

    def sigterm_while_down(self, mode):
        code, err = self.sigterm_once_stopping(mode)
        self.assertEqual(code, 128 + signal.SIGTERM, err)
        self.assert_all_running()
        self.assertEqual(self.archives(), [])
        self.assertEqual(glob.glob(os.path.join(self.stack, "backups", "*", ".*.partial")), [])

    def test_kill_9_while_a_group_is_down_then_the_next_run_starts_it(self):
        proc = subprocess.Popen([sys.executable, BACKUP_PY, "1", "--dir", self.stack]
                                + USER_ARGS, env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if "exited" in self.project.states().values():
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        down = {s for s, st in self.project.states().items() if st != "running"}
        self.assertTrue(down, "nothing was down when the run was killed")
        with open(os.path.join(self.stack, docker_compose.STOPPED_MARKER)) as f:
            marked = json.load(f)["services"]
        self.assertLessEqual(down, set(marked))  # a stop under way counts as down
        self.assertNotIn("writer" if "writer" not in marked else "idle", marked)
        result = self.backup()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Started %s again" % ", ".join(marked), result.stdout)
        self.assert_all_running()


class SlowStopTest(DowntimeTestCase):
    """alone ignores SIGTERM: its stop takes its 2 s grace period."""

    services = SERVICES[:3] + [dict(SERVICES[3], trap=False, stop_grace_period="2s")] + SERVICES[4:]

    def test_sigterm_during_a_slow_stop_still_leaves_it_running(self):
        for mode in ("each", "all"):
            with self.subTest(mode=mode):
                code, err = self.sigterm_once_stopping(mode, "alone", delay=0.5)  # in the 2 s
                self.assertEqual(code, 128 + signal.SIGTERM, err)
                self.assert_all_running()


class EachModeV1Test(DowntimeTestCase):
    flavour = "v1"

    def test_grouped_by_shared_data(self):
        result, watcher = self.watched_backup()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(overlap(watcher.outages("shared1"), watcher.outages("shared2")))
        self.assertFalse(overlap(watcher.outages("writer"), watcher.outages("alone")))
        self.assertIn("Dependencies between services are not known", self.log_text())
        self.assert_all_running()
        self.assert_read_while_stopped(self.archives()[0])


class AllModeTest(DowntimeTestCase):
    def test_every_service_down_together(self):
        result, watcher = self.watched_backup("--stop", "all")
        self.assertEqual(result.returncode, 0, result.stderr)
        names = [s["name"] for s in SERVICES]
        outages = {name: watcher.outages(name) for name in names}
        for name in names:
            self.assertEqual(len(outages[name]), 1, name)
        for a in names:
            for b in names:
                self.assertTrue(overlap(outages[a], outages[b]), (a, b))
        self.assert_all_running()
        self.assert_read_while_stopped(self.archives()[0])
        self.assertIn("Stop window (--stop all)", self.log_text())


class LiveReadTest(DowntimeTestCase):
    """Each group's data is read while it runs, then checked by a stat walk
    once it is stopped: a quiet group is not read again; a group that wrote
    while read (the writer) or at its stop (a database flushing on SIGTERM)
    is, so the archive holds what was there once it was down.  In-process,
    with RACY_NS at 0: the fixture's files are younger than a minute,
    which would send every group to be read again."""

    services = [
        {"name": "writer", "writer": True},
        {"name": "quiet", "volumes": ["./volumes/quiet:/data"]},
        {"name": "flusher", "volumes": ["./volumes/flusher:/data"],
         "command": "trap 'echo flushed-at-stop >> /data/state; exit 0' TERM; "
                    "while true; do sleep 0.1; done"},
    ]

    def setUp(self):
        super().setUp()
        with open(os.path.join(self.stack, "volumes/quiet/data"), "w") as f:
            f.write("quiet\n")

    def test_quiet_groups_are_checked_changed_ones_read_again(self):
        for number, mode in enumerate(("each", "all"), 1):
            with self.subTest(mode=mode):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                        mock.patch.object(archive_writer, "RACY_NS", 0):
                    code = backup.main(["1", "--dir", self.stack, "--stop", mode] + USER_ARGS)
                self.assertEqual(code, 0, err.getvalue())
                self.assert_all_running()
                archive = self.archives()[-1]
                self.assert_read_while_stopped(archive)
                self.assertEqual(archive_member(archive, "volumes/flusher/state"),
                                 b"flushed-at-stop\n" * number)
                self.assertEqual(archive_member(archive, "volumes/quiet/data"), b"quiet\n")
                log = self.log_text()
                self.assertIn("Checked after the stop, unchanged since read: volumes/quiet", log)
                self.assertRegex(log, r"Changed since read, read again stopped: "
                                      r"[^\n]*volumes/flusher")
                self.assertRegex(log, r"Changed since read, read again stopped: "
                                      r"[^\n]*volumes/writer")
                # What was read again says how much of it was copied from
                # the live read's compressed blocks (issue 24 Must 4).
                self.assertRegex(log, r"Read again: [\d.]+ [KMG]?B of [\d.]+ [KMG]?B copied "
                                      r"from the live read's compressed blocks, [\d.]+ [KMG]?B "
                                      r"compressed again")
                os.unlink(archive)


    @unittest.skipUnless(shutil.which("strace") and os.geteuid() == 0,
                         "needs strace and root (ptrace)")
    def test_killed_or_stopped_as_the_second_read_is_moved_into_place(self):
        """strace signals the run at its second ftruncate (the first empties
        the lock file): a group's data read again after its stop, written
        after its live read, is being moved over it, with the group running
        again (issue 24 Must 4).  SIGTERM: no archive, exit 143.  kill -9:
        the partial file is left; the next run removes it and writes a good
        archive.  Every service runs throughout."""
        def at_first_cut(sig):
            return subprocess.run(
                ["strace", "-f", "--detach-on=execve", "-qq", "-o", "/dev/null",
                 "-e", "trace=ftruncate", "-e", "inject=ftruncate:signal=%s:when=2" % sig,
                 sys.executable, BACKUP_PY, "1", "--dir", self.stack] + USER_ARGS,
                env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        partials = os.path.join(self.stack, "backups", "*", ".*.partial")
        result = at_first_cut("SIGTERM")
        self.assertEqual(result.returncode, 128 + signal.SIGTERM, result.stderr)
        self.assertIn("Stopped: flusher", self.log_text())
        self.assert_all_running()
        self.assertEqual((self.archives(), glob.glob(partials)), ([], []))
        result = at_first_cut("SIGKILL")
        self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
        self.assert_all_running()
        self.assertEqual(len(glob.glob(partials)), 1)
        result = self.backup()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("again", result.stdout)
        self.assert_all_running()
        self.assertEqual(glob.glob(partials), [])
        self.assert_read_while_stopped(self.archives()[0])


class GuaranteesTest(DowntimeTestCase):
    """In-process runs (backup.main) so that a fault can be injected."""

    def main(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = backup.main(["1", "--dir", self.stack] + list(args) + USER_ARGS)
        return code, out.getvalue(), err.getvalue()

    def test_a_start_that_fails_does_not_keep_the_others_down(self):
        real_stop = docker_compose.ServiceWindow.stop
        alone_blob = os.path.join(self.stack, "volumes/alone")

        def stop_then_break_alone(window, services):
            real_stop(window, services)
            if "alone" in services:
                # The bind mount's source becomes a file: docker cannot
                # mount it on the container's /data and refuses to start.
                os.rename(alone_blob, alone_blob + ".moved")
                with open(alone_blob, "w") as f:
                    f.write("not a directory\n")

        def restore():
            if os.path.exists(alone_blob + ".moved"):
                os.unlink(alone_blob)
                os.rename(alone_blob + ".moved", alone_blob)
        self.addCleanup(restore)
        for mode in ("each", "all"):
            with self.subTest(mode=mode):
                restore()
                with mock.patch.object(docker_compose.ServiceWindow, "stop", stop_then_break_alone):
                    code, _out, err = self.main("--stop", mode)
                self.assertEqual(code, 1)
                self.assertIn("could not start again: alone", err)
                states = self.project.states()
                if mode == "each":
                    # Only alone's group stays down; every other group came back.
                    self.assertEqual(states["writer"], "running")
                    self.assertEqual(states["shared1"], "running")
                # The marker keeps what could not start, for the next run.
                marker = os.path.join(self.stack, docker_compose.STOPPED_MARKER)
                with open(marker) as f:
                    self.assertIn("alone", json.load(f)["services"])
                os.unlink(marker)
                restore()
                self.project.start()
                self.assert_all_running()

    def test_verification_failing_after_the_services_are_back(self):
        def broken(verifier, size, expected):
            verifier.cancel()
            raise tarformat.ArchiveError("simulated read error")
        for mode in ("each", "all"):
            with self.subTest(mode=mode):
                with mock.patch.object(archive_writer.FollowingVerifier, "finish", broken):
                    code, _out, err = self.main("--stop", mode)
                self.assertEqual(code, 1)
                self.assertIn("verification of the new archive failed", err)
                self.assertEqual(self.archives(), [])
                self.assert_all_running()

    @unittest.skipUnless(os.geteuid() == 0, "mounting a small tmpfs needs root")
    def test_full_disk(self):
        backups = os.path.join(self.stack, "backups")
        os.makedirs(backups)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", backups],
                          stderr=subprocess.DEVNULL).returncode != 0:
            self.skipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", backups])
        for mode in ("each", "all"):
            with self.subTest(mode=mode):
                code, _out, err = self.main("--stop", mode)
                self.assertEqual(code, 1)
                self.assertIn("disk full", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assert_all_running()


if __name__ == "__main__":
    unittest.main()
