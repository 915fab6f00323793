"""A new user's first hour (issue 14, Must 4): each thing found by trying.

The progress line keeps moving with a percentage and an ETA; --print-config
names backup.ini and the real USER default; a failed copy still names the
archive and the log; --help lists every exit code; restore --dry-run names
the services it would stop; --only stops only the services whose data lies
under it (against a real Docker engine when one answers, else skipped); no
empty "Interrupted ()"; restore logs are never truncated."""
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
from unittest import mock

from iotstack_backup import backup, docker_compose, restore, service_groups
from tests import engine, terminal
from tests.support import BACKUP_PY, IS_ROOT, RESTORE_PY, IsolatedCase, call, read, write

ENGINE_SOCKET = "/var/tmp/iotstack-ci-docker/docker.sock"


class StackCase(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.tmp = self.make_tmp("first-hour-")
        self.stack = os.path.join(self.tmp, "IOTstack")
        write(os.path.join(self.stack, "docker-compose.yml"), "services: {}\n")
        write(os.path.join(self.stack, "services/nodered/Dockerfile"), "FROM x\n")
        self.flows = os.path.join(self.stack, "volumes/nodered/data/flows.json")
        write(self.flows, "[first]\n")
        write(os.path.join(self.stack, "volumes/grafana/grafana.db"), "grafana\n")
        tools = terminal.tools_dir()
        self.addCleanup(tools.cleanup)
        self.env = terminal.no_docker_env(tools.name)

    def script(self, path, *argv, env=None):
        return subprocess.run([sys.executable, path] + list(argv), cwd=self.stack,
                              env=env or self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)

    def make_backup(self, *argv):
        result = self.script(BACKUP_PY, "1", "--no-stop", *argv)
        self.assertEqual(result.returncode, 0, result.stderr)
        return glob.glob(os.path.join(self.stack, "backups/backup/*.tar.gz"))[0]


class FirstHourTests(StackCase):
    def test_print_config_names_the_file_and_the_real_user_default(self):
        write(os.path.join(self.stack, "backup.ini"), "[backup]\nkeep = 3\n")
        result = self.script(BACKUP_PY, "--print-config")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"file += %s/backup\.ini " % re.escape(self.stack))
        self.assertIn("(read)", result.stdout)
        me = pwd.getpwuid(os.geteuid()).pw_name
        if not IS_ROOT:
            self.assertRegex(result.stdout, r"user += %s " % re.escape(me))
            return
        try:
            pi = pwd.getpwnam("pi")
        except KeyError:
            self.skipTest("needs a user pi")
        os.chown(self.stack, pi.pw_uid, pi.pw_gid)
        result = self.script(BACKUP_PY, "--print-config")
        self.assertRegex(result.stdout, r"user += pi +\(default: owner of %s\)"
                         % re.escape(self.stack))
        result = self.script(BACKUP_PY, "--print-config", env=dict(self.env, SUDO_USER="nobody"))
        self.assertRegex(result.stdout, r"user += nobody +\(default: \$SUDO_USER\)")

    def test_a_failed_copy_still_names_the_archive_and_the_log(self):
        result = self.script(BACKUP_PY, "1", "--no-stop", "--copy-to",
                             "rsync:" + os.path.join(self.tmp, "unmounted-usb"))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("copy to rsync:", result.stderr)
        archive = re.search(r"Backup complete: \./(backups/backup/\S+\.tar\.gz)", result.stdout)
        log = re.search(r"Log: \./(backups/logs/\S+\.log)", result.stdout)
        self.assertTrue(archive and log, result.stdout)
        self.assertTrue(os.path.isfile(os.path.join(self.stack, archive.group(1))))
        self.assertIn("ERROR: copy to rsync:", read(os.path.join(self.stack, log.group(1))))

    def test_help_lists_every_exit_code(self):
        for module, codes in ((backup, (0, 1, 2, 3, 4, 129, 130, 143)),
                              (restore, (0, 1, 2, 3, 4, 129, 130, 143))):
            code, out, _err = call(module.main, ["--help"])
            self.assertEqual(code, 0)
            listed = [int(n) for n in re.findall(r"^  (\d+) ", out.split("exit codes:")[1], re.M)]
            self.assertEqual(listed, list(codes), module.PROG)
            self.assertEqual(sorted(module.EXIT_CODES), list(codes))

    def test_dry_run_says_it_cannot_tell_without_docker(self):
        archive = self.make_backup()
        result = self.script(RESTORE_PY, archive, "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        # No docker command at all: nothing can be running.
        self.assertIn("Services to stop: none running", result.stdout)
        docker = shutil.which("docker")
        if docker is None:
            self.skipTest("no docker command")
        # A docker whose daemon does not answer: it cannot tell.
        dead = {k: v for k, v in self.env.items() if k != "IOTSTACK_NO_DOCKER"}
        dead.update(PATH=self.env["PATH"] + os.pathsep + os.path.dirname(docker),
                    DOCKER_HOST="unix://%s/no-daemon.sock" % self.tmp)
        result = self.script(RESTORE_PY, archive, "--dry-run", env=dead)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Services: cannot tell which are running (docker does not answer); the "
                      "restore changes nothing unless you add --no-stop", result.stdout)
        result = self.script(RESTORE_PY, archive, "--dry-run", "--no-stop")
        self.assertIn("Services: left running (--no-stop)", result.stdout)

    def test_no_empty_interrupted_in_the_logs(self):
        os.environ.pop("SUDO_USER", None)
        user = ["root"] if IS_ROOT else []
        with mock.patch.object(backup, "make_backup", side_effect=KeyboardInterrupt):
            code, _out, err = call(backup.main, ["1", "--no-stop", "--dir", self.stack] + user)
        self.assertEqual(code, 130, err)
        text = read(glob.glob(os.path.join(self.stack, "backups/logs/backup_*.log"))[0])
        self.assertIn("Interrupted (Ctrl-C): no new archive was written", text)
        self.assertNotIn("()", text)
        archive = self.make_backup()
        with mock.patch.object(restore, "restore_with_log", side_effect=KeyboardInterrupt):
            code, _out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
        self.assertEqual(code, 130, err)
        text = read(glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))[0])
        self.assertIn("Interrupted (Ctrl-C): nothing was changed\n", text)
        self.assertNotRegex(text, r"ERROR: *\n")

    def test_restore_logs_are_written_as_they_go_and_never_truncated(self):
        archive = self.make_backup()
        write(os.path.join(self.stack, "post_restore.sh"), "echo hook says hello\n")
        result = self.script(RESTORE_PY, archive, "noask")
        self.assertEqual(result.returncode, 0, result.stderr)
        logs = sorted(glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log")))
        self.assertEqual(len(logs), 1)
        first = read(logs[0])
        # The lines from before the hook are still there after it (the old
        # script's '>' truncated them), and the end of the run follows.
        self.assertLess(first.index("Started At:"), first.index("hook says hello"))
        self.assertLess(first.index("hook says hello"), first.index("Finished At:"))
        result = self.script(RESTORE_PY, archive, "noask")
        self.assertEqual(result.returncode, 0, result.stderr)
        later = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        # Its own log (restore_..._HHMM-2.log in the same minute); the first untouched.
        self.assertEqual(len(later), 2)
        self.assertEqual(read(logs[0]), first)


def engine_env():
    """The environment for the tests' Docker engine (tests/engine.py: skips,
    or fails under IOTSTACK_REQUIRE_ENGINE=1, when none answers)."""
    env = dict(engine.engine().env, PYTHONDONTWRITEBYTECODE="1")
    env.pop("SUDO_USER", None)
    env.pop("IOTSTACK_NO_DOCKER", None)
    return env


class ServiceMountTests(unittest.TestCase):
    def test_services_using(self):
        def container(service, *sources):
            return docker_compose.Container({
                "Config": {"Labels": {docker_compose.SERVICE_LABEL: service}},
                "State": {"Status": "running"},
                "Mounts": [{"Type": "bind", "Source": s} for s in sources]})
        home = tempfile.mkdtemp(prefix="first-hour-")
        self.addCleanup(shutil.rmtree, home)
        stack = os.path.join(home, "IOTstack")
        for folder in ("volumes/nodered/data", "volumes/grafana", "volumes/nodered-old"):
            os.makedirs(os.path.join(stack, folder))
        containers = [
            container("nodered", stack + "/volumes/nodered/data"),
            container("grafana", stack + "/volumes/grafana"),
            container("whole", stack + "/volumes"),
            container("elsewhere", "/srv/media"),
            container("noderedish", stack + "/volumes/nodered-old"),
        ]
        self.assertEqual(service_groups.services_using(containers, stack, ["volumes/nodered"]),
                         ["nodered", "whole"])
        self.assertEqual(service_groups.services_using(containers, stack, ["volumes"]),
                         ["grafana", "nodered", "noderedish", "whole"])
        self.assertEqual(service_groups.services_using(containers, stack,
                                                       ["docker-compose.yml"]), [])


class RealEngineTests(StackCase):
    """restore --only against real containers with bind mounts."""

    def setUp(self):
        super().setUp()
        self.env = engine_env()
        name = "i14only" + uuid.uuid4().hex[:8]  # never another engineer's project
        write(os.path.join(self.stack, "docker-compose.yml"), """\
name: {name}
services:
  nodered:
    image: iotbase:1
    command: ["sleep", "600"]
    volumes: ["./volumes/nodered/data:/data"]
  grafana:
    image: iotbase:1
    command: ["sleep", "600"]
    volumes: ["./volumes/grafana:/var/lib/grafana"]
""".format(name=name))
        self.addCleanup(self.compose, "down", "-t", "0")
        up = self.compose("up", "-d")
        self.assertEqual(up.returncode, 0, up.stderr)

    def compose(self, *argv):
        return subprocess.run(["docker", "compose"] + list(argv), cwd=self.stack, env=self.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def started_at(self):
        ids = self.compose("ps", "-q").stdout.split()
        found = subprocess.run(["docker", "inspect"] + ids, env=self.env, stdout=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
        return {c["Config"]["Labels"][docker_compose.SERVICE_LABEL]: c["State"]["StartedAt"]
                for c in json.loads(found.stdout)}

    def test_dry_run_and_only_stop_just_the_services_with_data_there(self):
        archive = self.make_backup()
        write(self.flows, "[changed]\n")
        result = self.script(RESTORE_PY, archive, "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Would stop and start again: grafana, nodered\n", result.stdout)
        result = self.script(RESTORE_PY, archive, "--dry-run", "--only", "volumes/nodered")
        self.assertIn("Would stop and start again: nodered\n", result.stdout)
        before = self.started_at()
        time.sleep(1.1)  # StartedAt has whole seconds at worst
        result = self.script(RESTORE_PY, archive, "noask", "--only", "volumes/nodered")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Services stopped and started again: nodered\n", result.stdout)
        self.assertEqual(read(self.flows), "[first]\n")
        after = self.started_at()
        self.assertEqual(after["grafana"], before["grafana"])  # never stopped
        self.assertNotEqual(after["nodered"], before["nodered"])
        running = self.compose("ps", "--services", "--filter", "status=running").stdout.split()
        self.assertEqual(sorted(running), ["grafana", "nodered"])


if __name__ == "__main__":
    unittest.main()
