"""The base of backup's end-to-end tests (test_backup.py, test_settings.py):
a fresh tree with a fixed clock (NOW, a Thursday: rolling backup_4); with
engine = True its services are a real compose project.  read_log() gives
the newest backup log."""
import glob
import os
import subprocess
from unittest import mock

from iotstack_backup import backup, docker_compose, iotstack
from tests import real_stack
from tests.plainstack import NOW
from tests.stacktree import build_stack
from tests.support import IsolatedCase, run_main


def read_log(stack):
    logs = glob.glob(os.path.join(stack, "backups", "logs", "backup_*.log"))
    path = max(logs, key=os.path.getmtime)
    with open(path, encoding="utf-8") as f:
        return f.read()


class StackTestCase(IsolatedCase):
    """A fresh tree; with engine = True, its services are a real compose
    project with nodered and mosquitto running (influxdb, grafana stopped)."""

    scale = 0.3
    engine = False

    def setUp(self):
        super().setUp()
        if self.engine:
            self.project = real_stack.iotstack_project(self, scale=self.scale)
            self.stack = self.project.stack_dir
            self.tmp = os.path.dirname(self.stack)
        else:
            real_stack.without_docker(self)
            self.tmp = self.make_tmp("backup-test-")
            self.stack = os.path.join(self.tmp, "IOTstack")
            build_stack(self.stack, scale=self.scale)
        os.environ.pop("IOTSTACK", None)
        os.environ.pop("SUDO_USER", None)
        clock = mock.patch.object(iotstack, "now_local", return_value=NOW)
        clock.start()
        self.addCleanup(clock.stop)
        self.backups = os.path.join(self.stack, "backups")
        self.dated = os.path.join(self.backups, "backup", "backup_2026-11-26_0200.tar.gz")
        self.rolling = os.path.join(self.backups, "rolling", "backup_4.tar.gz")

    def backup(self, *args):
        return run_main(backup, list(args) + ["--dir", self.stack])

    def states(self):
        return self.project.states()

    def assert_as_before(self):
        """nodered and mosquitto run, influxdb and grafana stay stopped, no marker."""
        self.assertEqual(self.states(), {"nodered": "running", "mosquitto": "running",
                                         "influxdb": "exited", "grafana": "exited"})
        self.assertFalse(os.path.exists(os.path.join(self.stack, docker_compose.STOPPED_MARKER)))

    def write_hook(self, name, body):
        path = os.path.join(self.stack, name)
        with open(path, "w") as f:
            f.write("#!/bin/bash\n" + body + "\n")
        os.chmod(path, 0o755)

    def archives(self, folder):
        return sorted(n for n in os.listdir(os.path.join(self.backups, folder))
                      if n.endswith(".tar.gz"))

    def assert_verifies(self, path):
        subprocess.run(["gzip", "-t", path], check=True)
        subprocess.run(["tar", "-tzf", path], check=True, stdout=subprocess.DEVNULL)
