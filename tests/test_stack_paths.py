"""Issue 20, Must 2, on the real engine: paths compared as the kernel sees them.

The stack lives in an "SSD" folder (data-XXXX) and is reached through a
symlink (IOTstack-XXXX), the way many users move ~/IOTstack to an SSD.
Compose is started through the symlink (its containers record that path,
and their mounts point through it); the backup runs with the real path
(what `cd` in a cron line gives Python's getcwd, or --dir), and the other
way round.  Either way the same groups are stopped and started, and
restore --only stops the same services.  Containers that hold the stack from
above (a file browser on its parent folder) are stopped with the data;
read-only ones are not; a named volume whose driver options bind a folder
of the stack is stopped with that folder's group; a volume that cannot be
told (an ext4 file system on a loop device) makes --stop each fall back to
all.  As root, and as the user pi with the docker group (as on a Pi).
"""
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import unittest

from iotstack_backup import run
from tests import engine as E
from tests import real_stack
from tests.support import BACKUP_PY, IS_ROOT, RESTORE_PY, IsolatedCase, write

SYSTEM_PYTHON = "/usr/bin/python3"


class SymlinkedStackCase(IsolatedCase):
    extra = {}          # more services: {name: spec}
    volumes = {}        # top-level named volumes: {name: spec}, "@LINK@" replaced

    def setUp(self):
        super().setUp()
        real_stack.use_engine(self)
        E.require_flavour("v2")
        self.base = self.make_tmp("stackpaths-")
        tag = os.path.basename(self.base).split("-", 1)[1].lower().replace("_", "")
        self.real = os.path.join(self.base, "ssd", "data-" + tag)
        self.link = os.path.join(self.base, "IOTstack-" + tag)
        os.makedirs(self.real)
        os.symlink(self.real, self.link)
        services = {"writer": {"writer": True, "volumes": ["./volumes/writer:/data"]},
                    "other": {"volumes": ["./volumes/other:/data"]}}
        services.update({name: dict(spec, volumes=[v.replace("@BASE@", self.base)
                                                   for v in spec.get("volumes", [])])
                         for name, spec in self.extra.items()})
        E.write_compose(self.real, services)
        write(os.path.join(self.real, "volumes/other/o.txt"), b"other\n")
        write(os.path.join(self.real, "services/x/conf"), b"conf\n")
        if self.volumes:
            text = json.dumps(self.volumes).replace("@LINK@", self.link)
            with open(os.path.join(self.real, "docker-compose.yml"), "a") as f:
                f.write("volumes: %s\n" % text)
        self.project = self.up_through(self.link)
        self.addCleanup(self.project.remove)
        self.project.wait_for({name: "running" for name in services})

    def up_through(self, path):
        """`docker compose up -d` typed in a shell that cd'd to path (PWD
        names it, so compose records it rather than the real path)."""
        env = dict(E.engine().env, PWD=path)
        E.run(["docker", "compose", "up", "-d"], cwd=path, env=env, timeout=E.COMPOSE_TIMEOUT)
        name = E.normalize_project_name(os.path.basename(path))
        project = E.ComposeProject(path, name=name)
        labels = json.loads(E.engine().docker(
            "inspect", project.container_name("writer")).stdout)[0]["Config"]["Labels"]
        self.assertEqual(labels["com.docker.compose.project.working_dir"], path)
        return project

    def backup(self, stack, *args, user="root"):
        """backup.py 1 --dir stack as root, or as pi with the docker group."""
        argv = [BACKUP_PY, "1", "--dir", stack] + list(args)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("SUDO_USER", None)
        kwargs = {}
        python = sys.executable
        if user == "pi":
            pi = pi_user(self)
            python = SYSTEM_PYTHON
            env["HOME"] = pi.pw_dir
            kwargs = dict(user=pi.pw_uid, group=pi.pw_gid,
                          extra_groups=[grp.getgrnam("docker").gr_gid])
        result = subprocess.run([python] + argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=300, **kwargs)
        return result, self.newest_log()

    def newest_log(self):
        logs = os.path.join(self.real, "backups", "logs")
        if not os.path.isdir(logs):
            return ""
        newest = max((os.path.join(logs, n) for n in os.listdir(logs)), key=os.path.getmtime)
        with open(newest) as f:
            return f.read()

    def windows(self, log):
        """["each: other, sync (volumes/other)", ...] from "Stop window (--stop
        each): other, sync (volumes/other)" lines."""
        prefix = "Stop window (--stop "
        return sorted(line[len(prefix):].replace("): ", ": ", 1) for line in log.splitlines()
                      if line.startswith(prefix))

    def watched(self, *args, **kwargs):
        watcher = E.EventWatcher(self.project).start()
        try:
            result, log = self.backup(*args, **kwargs)
        finally:
            events = watcher.stop()
        return result, log, watcher, events


def pi_user(test):
    if not IS_ROOT:
        test.skipTest("running the backup as pi needs root")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        test.skipTest("no %s for the user pi" % SYSTEM_PYTHON)
    try:
        return pwd.getpwnam("pi")
    except KeyError:
        subprocess.run(["useradd", "-m", "pi"], check=True)
        return pwd.getpwnam("pi")


class SymlinkTest(SymlinkedStackCase):
    extra = {"sync": {"volumes": ["otherdata:/data"]}}
    volumes = {"otherdata": {"driver": "local", "driver_opts": {
        "type": "none", "o": "bind", "device": "@LINK@/volumes/other"}}}

    def test_same_groups_by_the_real_path_and_by_the_symlink(self):
        expected = ["other, sync (volumes/other)", "writer (volumes/writer)"]
        for stack in (self.real, self.link):
            with self.subTest(stack=stack):
                result, log, watcher, _events = self.watched(stack)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stdout + result.stderr)
                self.assertEqual(self.windows(log), ["each: " + w for w in expected], log)
                self.assertNotIn("Left running", log)
                for service in ("writer", "other", "sync"):
                    self.assertEqual(watcher.actions(service, only=("die", "start")),
                                     ["die", "start"], service)
                self.assertEqual(set(self.project.states().values()), {"running"})

    def test_as_pi_with_the_docker_group(self):
        subprocess.run(["chown", "-R", "pi:pi", self.real], check=True)
        os.chmod(self.base, 0o755)
        result, log, watcher, _events = self.watched(self.real, user="pi")
        self.assertEqual(result.returncode, run.EXIT_OK, result.stdout + result.stderr)
        self.assertEqual(self.windows(log), ["each: other, sync (volumes/other)",
                                             "each: writer (volumes/writer)"], log)
        self.assertEqual(watcher.actions("writer", only=("die", "start")), ["die", "start"])

    def test_restore_only_stops_the_same_services(self):
        result, _log = self.backup(self.link)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        archive = "backup/" + os.listdir(os.path.join(self.real, "backups/backup"))[0]
        for stack in (self.real, self.link):
            with self.subTest(stack=stack):
                out = subprocess.run(
                    [sys.executable, RESTORE_PY, archive, "--dir", stack,
                     "--only", "volumes/other", "--dry-run"], stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                    timeout=120)
                self.assertEqual(out.returncode, run.EXIT_OK, out.stdout + out.stderr)
                self.assertIn("Would stop and start again: other, sync\n", out.stdout)


class AboveTheStackTest(SymlinkedStackCase):
    # browser may write the folder holding the stack; viewer only reads it.
    extra = {"browser": {"volumes": ["@BASE@/ssd:/srv"]},
             "viewer": {"volumes": ["@BASE@/ssd:/srv:ro"]}}

    def test_a_writer_from_above_is_stopped_with_everything_it_holds(self):
        result, log, watcher, _events = self.watched(self.real)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stdout + result.stderr)
        (window,) = self.windows(log)
        self.assertTrue(window.startswith("each: browser, other, writer ("), window)
        for item in ("services", "volumes", "docker-compose.yml"):
            self.assertIn(item, window)
        self.assertIn("Left running, no data of theirs in the backup: viewer", log)
        self.assertEqual(watcher.actions("viewer", only=("die", "start")), [])
        self.assertEqual(watcher.actions("browser", only=("die", "start")), ["die", "start"])


@unittest.skipUnless(IS_ROOT, "a loop device needs root")
class UnknownVolumeTest(SymlinkedStackCase):
    """A volume on an ext4 file system of a loop device: the stack could be
    on it, so what its service writes cannot be told."""

    def setUp(self):
        if not shutil.which("losetup") or not shutil.which("mkfs.ext4"):
            self.skipTest("losetup and mkfs.ext4 are needed")
        image = os.path.join(tempfile.mkdtemp(prefix="loopimg-"), "disk.img")
        self.addCleanup(shutil.rmtree, os.path.dirname(image), True)
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        found = subprocess.run(["losetup", "-f", "--show", image], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
        if found.returncode != 0:
            self.skipTest("no loop device: %s" % found.stderr.strip())
        device = found.stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", device])
        self.extra = {"blk": {"volumes": ["blkdata:/data"]}, "idle": {"volumes": []}}
        self.volumes = {"blkdata": {"driver": "local", "driver_opts": {
            "type": "ext4", "device": device}}}
        self.device = device
        super().setUp()

    def test_each_falls_back_to_all(self):
        result, log, watcher, _events = self.watched(self.real)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stdout + result.stderr)
        self.assertIn("Cannot tell what blk can write (volume %s_blkdata: a ext4 file system "
                      "on %s): --stop each falls back to all for this run"
                      % (self.project.name, self.device), log)
        (window,) = self.windows(log)
        self.assertTrue(window.startswith("all: blk, idle, other, writer ("), window)
        for service in ("blk", "idle", "other", "writer"):
            self.assertEqual(watcher.actions(service, only=("die", "start")), ["die", "start"])


if __name__ == "__main__":
    unittest.main()
