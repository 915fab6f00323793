"""A built IOTstack tree and a fixed clock, for end-to-end tests that run
backup.py with --no-stop: no docker (real or fake) is involved."""
import datetime
import os
from unittest import mock

from iotstack_backup import backup, iotstack, restore
from tests.stacktree import build_stack
from tests.support import USER_ARGS, IsolatedCase, run_main

NOW = datetime.datetime(2026, 11, 26, 2, 0)  # a Thursday: rolling backup_4


class PlainStackTestCase(IsolatedCase):
    scale = 0.05

    def setUp(self):
        super().setUp()
        self.tmp = self.make_tmp("plainstack-test-")
        self.stack = os.path.join(self.tmp, "IOTstack")
        build_stack(self.stack, scale=self.scale)
        clock = mock.patch.object(iotstack, "now_local", return_value=NOW)
        clock.start()
        self.addCleanup(clock.stop)
        self.backups = os.path.join(self.stack, "backups")
        self.dated = os.path.join(self.backups, "backup", "backup_2026-11-26_0200.tar.gz")
        self.rolling = os.path.join(self.backups, "rolling", "backup_4.tar.gz")

    def backup(self, *args):
        """backup.py ARGS --no-stop; as root, with USER root after a TYPE."""
        args = list(args)
        if args and args[0] in ("1", "2", "3"):
            args[1:1] = USER_ARGS
        return run_main(backup, args + ["--no-stop", "--dir", self.stack])

    def restore(self, *args):
        return run_main(restore, list(args) + ["--no-stop", "--dir", self.stack])
