"""Stack control against the real engine: issue 11's Must items, for backup and restore.

Every test runs real compose projects (tests/engine.py, tests/real_stack.py) and
judges by the containers' states and the engine's events, never by what our code
says it did.  Without an engine they skip with the reason (an error when
IOTSTACK_REQUIRE_ENGINE=1, as in CI).  Services are busybox loops: `slow` ignores
SIGTERM, so `stop` waits for its stop_grace_period, which gives a signal time
to arrive while a stop is under way.
"""
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest
from unittest import mock

from iotstack_backup import backup, docker_compose, iotstack, restore
from tests import engine as E
from tests import real_stack
from tests.support import BACKUP_PY, IS_ROOT, RESTORE_PY, USER_ARGS, IsolatedCase

GRACE = 2  # seconds `slow` takes to stop
SLOW = {"slow": {"trap": False, "stop_grace_period": "%ds" % GRACE}, "fast": {}}


def call(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def read_logs(stack, kind):
    texts = []
    for path in sorted(glob.glob(os.path.join(stack, "backups/logs/%s_*.log" % kind))):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)


def marker(stack):
    return os.path.join(stack, docker_compose.STOPPED_MARKER)


class WithoutDockerTests(IsolatedCase):
    """No docker command at all (IOTSTACK_NO_DOCKER=1, as on a machine
    whose Docker was uninstalled) with a killed run's marker left."""

    def test_a_marker_left_without_docker_is_a_warning_not_a_crash(self):
        stack = self.make_tmp()
        marker = os.path.join(stack, docker_compose.STOPPED_MARKER)
        os.makedirs(os.path.dirname(marker))
        with open(marker, "w") as f:
            json.dump({"services": {"nodered": {"containers": ["abc"], "stopped_at": 1.0}}}, f)
        out = io.StringIO()
        window = docker_compose.restart_left_stopped(stack, iotstack.RunLog(), out)
        self.assertIsNotNone(window)
        self.assertEqual(window.failed,
                         [("nodered", "Docker is not installed (no docker command)")])
        self.assertIn("Warning: an interrupted run left services stopped, and they cannot be "
                      "started now: Docker is not installed", out.getvalue())
        self.assertTrue(os.path.exists(marker), "the marker stays for a run that can start them")


class EngineCase(IsolatedCase):
    """Helpers over a project made by real_stack.iotstack_project."""

    def make(self, services, running=None, flavour="v2", **kw):
        running = tuple(services) if running is None else running
        self.project = real_stack.iotstack_project(
            self, flavour=flavour, services=services, running=running, tree=False, **kw)
        self.stack = self.project.stack_dir
        return self.project

    def watch(self):
        events = E.EventWatcher(self.project).start()
        self.addCleanup(events.stop)
        return events

    def all_running(self, names):
        states = self.project.states()
        self.assertEqual({n: states.get(n) for n in names}, {n: "running" for n in names})

    def backup_args(self, *argv):
        return ["1"] + USER_ARGS + list(argv) + ["--dir", self.stack]

    def archive_of(self, services):
        """An archive of this stack holding a compose file of services (the
        live compose file is put back afterwards)."""
        live = os.path.join(self.stack, "docker-compose.yml")
        with open(live, "rb") as f:
            keep = f.read()
        E.write_compose(self.stack, services)
        code, out, err = call(backup.main, self.backup_args("--no-stop"))
        self.assertEqual(code, 0, out + err)
        with open(live, "wb") as f:
            f.write(keep)
        return os.path.join(self.stack, re.search(r"Backup complete: \./(\S+)", out).group(1))

    def start_script(self, script, *argv, env=None, cwd=None):
        proc = subprocess.Popen([sys.executable, script] + list(argv), cwd=cwd or self.stack,
                                env=env or real_stack.script_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is not None or proc.kill())
        return proc

    def finish(self, proc):
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err


# ---------------------------------------------------------------------------
# Must 2: never left down

class SignalTests(EngineCase):
    """SIGTERM, SIGINT, SIGHUP while `slow` is being stopped: the stop
    completes, then everything runs again, exit 128 + the signal."""

    def signal_during_stop(self, sig, flavour="v2"):
        self.make(SLOW, flavour=flavour)
        events = self.watch()
        # --stop all: slow and fast go down in one stop, which the signal meets.
        proc = self.start_script(BACKUP_PY, *self.backup_args("--stop", "all"))
        events.wait_for("kill", "slow", timeout=30)  # compose is stopping it
        proc.send_signal(sig)
        code, out, err = self.finish(proc)
        self.assertEqual(code, 128 + sig, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("interrupted", err)
        self.all_running(["slow", "fast"])
        # The stop was completed (slow died after its grace period), then started.
        self.assertEqual(events.actions("slow", only=("die", "start")), ["die", "start"])
        self.assertEqual(events.actions("fast", only=("die", "start")), ["die", "start"])
        died = events.outages("slow")[0][0]
        kill = events.wait_for("kill", "slow").time_nano
        self.assertGreaterEqual((died - kill) / 1e9, GRACE - 0.5)
        self.assertFalse(os.path.exists(marker(self.stack)))
        return out, err

    def test_backup_sigterm_sigint_sighup_during_a_slow_stop(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with self.subTest(signal=sig.name):
                self.signal_during_stop(sig)
                self.doCleanups()

    def test_backup_sigterm_during_a_slow_stop_v1(self):
        self.signal_during_stop(signal.SIGTERM, flavour="v1")

    def test_restore_sigterm_and_sigint_during_a_slow_stop(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig.name):
                self.make(SLOW)
                archive = self.archive_of(SLOW)
                events = self.watch()
                proc = self.start_script(RESTORE_PY, archive, "noask", "--dir", self.stack)
                events.wait_for("kill", "slow", timeout=30)
                proc.send_signal(sig)
                code, out, err = self.finish(proc)
                self.assertEqual(code, 128 + sig, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.all_running(["slow", "fast"])
                self.assertEqual(events.actions("slow", only=("die", "start")), ["die", "start"])
                self.assertFalse(os.path.exists(marker(self.stack)))
                self.assertFalse(os.path.exists(os.path.join(self.stack, ".tmp/restore.journal")))
                self.doCleanups()

    def test_backup_sigint_while_the_archive_is_written(self):
        self.make({"a": {}, "b": {}})
        # Enough text that writing it takes a few seconds at level 9.
        with open(os.path.join(self.stack, "services", "big.txt"), "w") as f:
            for _ in range(12):
                f.write(os.urandom(2 << 20).hex())
        events = self.watch()
        proc = self.start_script(BACKUP_PY, *self.backup_args("--level", "9"))
        events.wait_for("die", "a", timeout=30)
        events.wait_for("die", "b", timeout=30)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        code, out, err = self.finish(proc)
        self.assertEqual(code, 130, out + err)
        self.all_running(["a", "b"])
        self.assertEqual(glob.glob(os.path.join(self.stack, "backups/backup/*.tar.gz")), [])
        self.assertIn("Interrupted", read_logs(self.stack, "backup"))
        self.assertFalse(os.path.exists(marker(self.stack)))

    def test_backup_sigterm_while_services_start(self):
        # A chain: compose starts them one after the other.
        chain = {"s1": {}, "s2": {"depends_on": ["s1"]}, "s3": {"depends_on": ["s2"]},
                 "s4": {"depends_on": ["s3"]}, "s5": {"depends_on": ["s4"]}}
        self.make(chain)
        events = self.watch()
        proc = self.start_script(BACKUP_PY, *self.backup_args())
        events.wait_for("die", "s5", timeout=30)
        events.wait_for("start", "s1", timeout=30)  # the start is under way
        proc.send_signal(signal.SIGTERM)
        code, out, err = self.finish(proc)
        self.assertIn(code, (143,), out + err)
        self.all_running(list(chain))
        self.assertFalse(os.path.exists(marker(self.stack)))


class KilledRunTests(EngineCase):
    """kill -9 while stopped: the next run starts only what the killed run
    stopped and nobody started since."""

    def kill_during_stop(self):
        self.make({"slow": SLOW["slow"], "fast": {}, "mine": {}}, running=("slow", "fast", "mine"))
        self.project.stop("mine", timeout=0)  # stopped by the user before: not ours
        events = self.watch()
        # --stop all: slow and fast go down in one stop, which is killed.
        proc = self.start_script(BACKUP_PY, *self.backup_args("--stop", "all"))
        events.wait_for("kill", "slow", timeout=30)
        proc.kill()
        proc.communicate(timeout=30)
        self.project.wait_for({"slow": "exited", "fast": "exited"}, timeout=30)
        with open(marker(self.stack)) as f:
            record = json.load(f)
        self.assertEqual(sorted(record["services"]), ["fast", "slow"])
        # The user starts fast and stops it again: it is theirs now.
        self.project.start("fast")
        self.project.stop("fast", timeout=0)
        return events

    def assert_only_slow_started(self, out):
        self.assertIn("Started slow again: an interrupted run had stopped them", out)
        self.assertIn("Left fast as it is: it was started and stopped again", out)
        states = self.project.states()
        self.assertEqual((states["slow"], states["fast"], states["mine"]),
                         ("running", "exited", "exited"))

    def test_next_backup_starts_only_what_the_killed_run_stopped(self):
        self.kill_during_stop()
        code, out, err = call(backup.main, self.backup_args())
        self.assertEqual(code, 0, out + err)
        self.assert_only_slow_started(out)
        self.assertFalse(os.path.exists(marker(self.stack)))

    def test_next_restore_recover_starts_only_what_the_killed_run_stopped(self):
        self.kill_during_stop()
        code, out, err = call(restore.main, ["--recover", "--dir", self.stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assert_only_slow_started(out)
        self.assertFalse(os.path.exists(marker(self.stack)))

    def test_recover_keeps_its_record_until_every_service_started(self):
        cfg = {"cfg": {"volumes": ["./volumes/cfg/settings.conf:/etc/settings.conf"]},
               "slow": SLOW["slow"]}
        project = real_stack.iotstack_project(self, services={"cfg": {}}, running=(),
                                              tree=False, up=False)
        self.stack = project.stack_dir
        E.write_compose(self.stack, cfg)  # makes the mount's source: a folder
        os.rmdir(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        with open(os.path.join(self.stack, "volumes/cfg/settings.conf"), "w") as f:
            f.write("x=1\n")
        self.project = project
        project.up()
        events = self.watch()
        proc = self.start_script(BACKUP_PY, *self.backup_args("--stop", "all"))
        events.wait_for("kill", "slow", timeout=30)
        proc.kill()
        proc.communicate(timeout=30)
        project.wait_for({"slow": "exited", "cfg": "exited"}, timeout=30)
        # The file cfg mounts became a folder: cfg cannot start.
        os.unlink(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        os.mkdir(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        code, out, err = call(restore.main, ["--recover", "--dir", self.stack])
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("still stopped: cfg", err)
        self.assertEqual(project.states(), {"slow": "running", "cfg": "exited"})
        with open(marker(self.stack)) as f:
            self.assertEqual(list(json.load(f)["services"]), ["cfg"])
        # A backup in between stops and starts slow, and keeps cfg's record.
        code, out, err = call(backup.main, self.backup_args())
        self.assertEqual(code, 3, out + err)
        self.assertIn("cfg, stopped by an interrupted run, is still stopped", out)
        with open(marker(self.stack)) as f:
            self.assertEqual(list(json.load(f)["services"]), ["cfg"])
        os.rmdir(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        with open(os.path.join(self.stack, "volumes/cfg/settings.conf"), "w") as f:
            f.write("x=1\n")
        code, out, err = call(restore.main, ["--recover", "--dir", self.stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Started cfg again", out)
        self.assertEqual(project.states(), {"slow": "running", "cfg": "running"})
        self.assertFalse(os.path.exists(marker(self.stack)))


# ---------------------------------------------------------------------------
# Must 3 and 4: compose files that change; exactly the running ones; a failing start

class ChangingComposeTests(EngineCase):
    def test_restore_of_a_compose_file_that_lost_and_gained_services(self):
        self.make({"a": {}, "b": {}, "gone": {}})
        archive = self.archive_of({"a": {}, "b": {}, "new": {}})
        events = self.watch()
        code, out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
        self.assertEqual((code, err), (0, ""), out)
        states = self.project.states()
        self.assertEqual((states["a"], states["b"], states["gone"]),
                         ("running", "running", "exited"))
        self.assertNotIn("new", states)  # never created: `up -d` is the user's call
        container = self.project.container_name("gone")
        for text in (out, read_logs(self.stack, "restore")):
            self.assertIn("gone no longer in the compose file, so it stays stopped: start its "
                          "old container with 'docker start %s', or remove it with 'docker "
                          "compose up -d --remove-orphans'" % container, text)
            self.assertIn("docker-compose.yml changed: run 'docker compose up -d'", text)
        self.assertEqual(events.actions("a", only=("die", "start")), ["die", "start"])
        self.assertFalse(os.path.exists(marker(self.stack)))

    def test_a_service_whose_start_fails_never_stops_the_others(self):
        services = {"cfg": {"volumes": ["./volumes/cfg/settings.conf:/etc/settings.conf"]},
                    "a": {}, "b": {}}
        self.project = real_stack.iotstack_project(self, services={"a": {}}, tree=False,
                                                   up=False)
        self.stack = self.project.stack_dir
        os.makedirs(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        archive = self.archive_of(services)  # a folder where the live stack has a file
        E.write_compose(self.stack, services)
        os.rmdir(os.path.join(self.stack, "volumes/cfg/settings.conf"))
        with open(os.path.join(self.stack, "volumes/cfg/settings.conf"), "w") as f:
            f.write("x=1\n")
        self.project.up()
        code, out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertRegex(err, r"restored, but could not start again: cfg \(.*not a directory")
        states = self.project.states()
        self.assertEqual((states["a"], states["b"], states["cfg"]),
                         ("running", "running", "exited"))
        self.assertIn("ERROR: cfg could not be started again", read_logs(self.stack, "restore"))

    def test_backup_names_a_service_that_cannot_start_again(self):
        services = {"cfg": {"volumes": ["./volumes/cfg:/etc/cfg"]}, "a": {}}
        self.make(services)
        real = docker_compose.ServiceWindow.stop

        def then_remove_the_mount(window, services):
            real(window, services)
            if "cfg" in services:  # down while its data is read: its mount goes
                shutil.rmtree(os.path.join(self.stack, "volumes/cfg"))
                with open(os.path.join(self.stack, "volumes/cfg"), "w") as f:
                    f.write("not a folder\n")

        with mock.patch.object(docker_compose.ServiceWindow, "stop", then_remove_the_mount):
            code, out, err = call(backup.main, self.backup_args())
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("backup complete, but could not start again: cfg (", err)
        self.assertEqual(self.project.states(), {"a": "running", "cfg": "exited"})

    def test_paused_created_exited_are_left_alone_v2_and_v1(self):
        for flavour in ("v2", "v1"):
            with self.subTest(flavour=flavour):
                self.make({"run": {}, "paused": {}, "exited": {}, "created": {}},
                          running=("run", "paused", "exited"), flavour=flavour,
                          stopped_too=False)
                self.project.pause("paused")
                self.project.stop("exited", timeout=0)
                self.project.create("created") if flavour == "v2" else \
                    self.project.compose("up", "--no-start", "created")
                before = self.project.states()
                events = self.watch()
                code, out, err = call(backup.main, self.backup_args())
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(self.project.states(), before)
                for name in ("paused", "exited", "created"):
                    self.assertEqual(events.actions(name, only=("die", "start", "kill")), [],
                                     name)
                self.assertEqual(events.actions("run", only=("die", "start")), ["die", "start"])
                log = read_logs(self.stack, "backup")
                self.assertIn("Services Left Alone: created (created), exited (exited), "
                              "paused (paused)", log)
                self.assertIn("Services Stopped: run", log)
                self.assertRegex(log, r"Downtime \(s\): run \d+\.\d")
                self.assertIn("Services left alone: created (created), exited (exited), "
                              "paused (paused)", out)
                if flavour == "v1":
                    self.assertIn("docker-compose)", log)
                self.doCleanups()


# ---------------------------------------------------------------------------
# Must 5: docker not answering

# The Python that another user may run (pyenv's lives under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


@unittest.skipUnless(IS_ROOT, "switching to a user outside group docker needs root")
@unittest.skipUnless(os.access(SYSTEM_PYTHON, os.X_OK), "no %s for user pi" % SYSTEM_PYTHON)
class PermissionTests(EngineCase):
    """The socket is root:docker 0660; user pi is not in group docker."""

    def setUp(self):
        super().setUp()
        real_stack.use_engine(self)
        import pwd
        try:
            self.pi = pwd.getpwnam("pi")
        except KeyError:
            subprocess.run(["useradd", "-m", "pi"], check=True)
            self.pi = pwd.getpwnam("pi")
        import grp
        if "pi" in grp.getgrnam("docker").gr_mem:
            self.skipTest("user pi is in group docker here")

    def as_pi(self, script, *argv):
        result = subprocess.run([SYSTEM_PYTHON, script] + list(argv) + ["--dir", self.stack],
                                cwd="/", env=real_stack.script_env(HOME=self.pi.pw_dir),
                                user=self.pi.pw_uid, group=self.pi.pw_gid, extra_groups=[],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        return result.returncode, result.stdout, result.stderr

    def test_backup_live_exit_3_and_restore_refuses(self):
        self.make({"a": {}})
        archive = self.archive_of({"a": {}})
        os.chmod(os.path.dirname(self.stack), 0o755)
        subprocess.run(["chown", "-R", "pi:", self.stack], check=True)
        events = self.watch()
        code, out, err = self.as_pi(BACKUP_PY, "1")
        self.assertEqual(code, 3, out + err)
        self.assertRegex(out, r"Warning: services were not stopped \(the backup was taken "
                              r"live\): .*permission denied")
        code, out, err = self.as_pi(RESTORE_PY, os.path.relpath(archive, os.path.join(
            self.stack, "backups")), "noask")
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertRegex(err, "permission denied.*nothing was changed")
        self.assertEqual(events.stop(), [])
        self.assertEqual(self.project.states(), {"a": "running"})


# ---------------------------------------------------------------------------
# Must 6: the right project

class ProjectTests(EngineCase):
    def assert_stopped_and_started(self, events, names):
        for name in names:
            self.assertEqual(events.actions(name, only=("die", "start")), ["die", "start"])
        self.all_running(names)

    def test_compose_project_name_in_the_environment(self):
        tmp = real_stack.unique_dir(self)
        real_stack.use_engine(self)
        self.stack = os.path.join(tmp, "IOTstack")
        os.makedirs(os.path.join(self.stack, "services"))
        E.write_compose(self.stack, real_stack.with_own_volumes({"a": {}}))
        name = "i11env" + os.path.basename(tmp)[4:].lower().replace("_", "")
        self.project = E.ComposeProject(self.stack, name=name)
        self.addCleanup(self.project.remove)
        self.project.up()
        events = self.watch()
        with mock.patch.dict(os.environ, {"COMPOSE_PROJECT_NAME": name}):
            code, out, err = call(backup.main, self.backup_args())
        self.assertEqual((code, err), (0, ""), out)
        self.assert_stopped_and_started(events, ["a"])
        self.assertIn("project %s" % name, read_logs(self.stack, "backup"))

    def test_compose_project_name_in_dot_env_v2_and_v1(self):
        for flavour in ("v2", "v1"):
            with self.subTest(flavour=flavour):
                tmp = real_stack.unique_dir(self)
                real_stack.use_engine(self)
                self.stack = os.path.join(tmp, "IOTstack")
                os.makedirs(os.path.join(self.stack, "services"))
                E.write_compose(self.stack, real_stack.with_own_volumes({"a": {}}))
                name = "i11dot" + flavour + os.path.basename(tmp)[4:].lower().replace("_", "")
                with open(os.path.join(self.stack, ".env"), "w") as f:
                    f.write("TZ=Etc/UTC\nCOMPOSE_PROJECT_NAME=%s\n" % name)
                self.project = E.ComposeProject(self.stack, flavour=flavour)
                self.assertEqual(self.project.name, name)
                self.addCleanup(self.project.remove)
                self.project.up()
                events = self.watch()
                archive = self.archive_of({"a": {}})
                code, out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
                self.assertEqual((code, err), (0, ""), out)
                self.assert_stopped_and_started(events, ["a"])
                self.doCleanups()

    def test_dir_from_elsewhere_with_crons_path(self):
        self.make({"a": {}, "b": {}})
        events = self.watch()
        env = real_stack.script_env(PATH="/usr/bin:/bin")
        proc = self.start_script(BACKUP_PY, *self.backup_args(), env=env, cwd="/")
        code, out, err = self.finish(proc)
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Services stopped and started again: a, b", out)
        self.assert_stopped_and_started(events, ["a", "b"])


# ---------------------------------------------------------------------------
# Nothing stopped when a run refuses early; the dry run stops nothing

class RefusalTests(EngineCase):
    def setUp(self):
        super().setUp()
        self.make({"a": {}})
        self.events = self.watch()

    def tearDown(self):
        self.assertEqual([e for e in self.events.stop() if e.action in ("die", "start")], [])
        self.assertEqual(self.project.states(), {"a": "running"})

    def test_busy(self):
        archive = self.archive_of({"a": {}})
        os.makedirs(os.path.join(self.stack, ".tmp"), exist_ok=True)
        import fcntl

        from iotstack_backup import iotstack
        with open(os.path.join(self.stack, iotstack.LOCK_NAME), "w") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            self.assertEqual(call(backup.main, self.backup_args())[0], 4)
            self.assertEqual(call(restore.main, [archive, "noask", "--dir", self.stack])[0], 4)

    def test_unknown_user_failing_pre_backup_and_a_damaged_archive(self):
        if IS_ROOT:
            code, _out, _err = call(backup.main, ["1", "no-such-user-xyz", "--dir", self.stack])
            self.assertEqual(code, 2)
        with open(os.path.join(self.stack, "pre_backup.sh"), "w") as f:
            f.write("exit 3\n")
        self.assertEqual(call(backup.main, self.backup_args())[0], 1)
        os.unlink(os.path.join(self.stack, "pre_backup.sh"))
        damaged = os.path.join(self.stack, "backups", "damaged.tar.gz")
        os.makedirs(os.path.dirname(damaged), exist_ok=True)
        with open(damaged, "wb") as f:
            f.write(b"\x1f\x8b\x08\x00not really gzip")
        code, out, err = call(restore.main, ["damaged.tar.gz", "noask", "--dir", self.stack])
        self.assertEqual(code, 1, out + err)

    def test_no_stop_in_backup_ini(self):
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nno-stop = true\n")
        code, out, err = call(backup.main, self.backup_args())
        self.assertEqual((code, err), (0, ""), out)

    def test_dry_run_stops_nothing(self):
        code, out, err = call(backup.main, self.backup_args("--dry-run"))
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Would stop and start again: a", out)


if __name__ == "__main__":
    unittest.main()
