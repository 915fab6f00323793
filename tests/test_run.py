"""Tests of run: how a command's run ends, for every kind of ending."""
import argparse
import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

from iotstack_backup import run
from tests.support import REPO, call


def parser():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("what")
    return p


def ending(what, log=None):
    """A command that ends as `what` says, with a log open when log is given."""
    def command(args):
        if log is not None:
            run.remember_log(log)
        raise what
    return command


class RunCommandTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.log = os.path.join(self.tmp, "run.log")
        self.addCleanup(run.remember_log, None)

    def tearDown(self):
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))
        os.rmdir(self.tmp)

    def end(self, what, log=None):
        return call(lambda argv: run.run_command("tool", parser(), ending(what, log), argv,
                                                 "nothing was changed"), ["x"])

    def read_log(self):
        with open(self.log, encoding="utf-8") as f:
            return f.read()

    def test_success_is_the_command_code(self):
        code, out, err = call(lambda argv: run.run_command(
            "tool", parser(), lambda args: run.EXIT_WARNINGS, argv, ""), ["x"])
        self.assertEqual((code, out, err), (3, "", ""))

    def test_user_error_is_one_line_and_its_code(self):
        code, _out, err = self.end(run.UserError("cannot do that", run.EXIT_USAGE))
        self.assertEqual((code, err), (2, "tool: error: cannot do that\n"))

    def test_signals(self):
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
            with self.subTest(signum=signum):
                got, _out, err = self.end(run.Interrupted(signum))
                self.assertEqual(got, code)
                self.assertEqual(err, "tool: error: interrupted by %s; nothing was changed\n"
                                 % signal.Signals(signum).name)
        code, _out, err = self.end(KeyboardInterrupt())
        self.assertEqual((code, err), (130, "tool: error: interrupted; nothing was changed\n"))

    def test_full_disk_names_the_path_and_the_traceback_goes_to_the_log(self):
        error = OSError(errno.ENOSPC, "No space left on device", "/mnt/usb/x")
        code, _out, err = self.end(error, log=self.log)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("/mnt/usb/x: No space left on device: the disk is full", err)
        self.assertIn("details in %s" % self.log, err)
        self.assertIn("Traceback (most recent call last)", self.read_log())

    def test_permission_denied_says_how_to_fix_it(self):
        path = "/home/pi/IOTstack/backups"
        error = OSError(errno.EACCES, "Permission denied", path)
        code, _out, err = self.end(error)
        self.assertEqual(code, 1)
        self.assertEqual(err, "tool: error: %s: Permission denied; %s\n" % (path, run.fix_for(path)))

    def test_a_bug_is_one_line_with_the_traceback_in_the_log(self):
        code, _out, err = self.end(RuntimeError("boom"), log=self.log)
        self.assertEqual(code, 1)
        self.assertEqual(err, "tool: error: unexpected error: RuntimeError: boom "
                              "(details in %s)\n" % self.log)
        self.assertIn("RuntimeError: boom", self.read_log())

    def test_a_bug_without_a_log_prints_no_traceback(self):
        with mock.patch.dict(os.environ, {"IOTSTACK_BACKUP_DEBUG": ""}):
            code, _out, err = self.end(ValueError("odd"))
        self.assertEqual((code, err), (1, "tool: error: unexpected error: ValueError: odd\n"))

    def test_a_closed_pipe_ends_quietly(self):
        script = textwrap.dedent("""
            import sys
            sys.path.insert(0, %r)
            from iotstack_backup import run
            import argparse
            def command(args):
                for n in range(100000):
                    print("line %%d" %% n)
                return 0
            raise SystemExit(run.run_command("tool", argparse.ArgumentParser(), command, [], ""))
        """ % REPO)
        done = subprocess.run("%s -c '%s' | head -n 1" % (sys.executable, script.replace("'", "'\\''")),
                              shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        self.assertEqual(done.stdout, "line 0\n")
        self.assertEqual(done.stderr, "")


class ExitCodeHelpTests(unittest.TestCase):
    def test_every_code_in_order_with_continuation_lines(self):
        text = run.exit_code_help({143: "SIGTERM", 0: "fine", 1: "failed\nsee the log"})
        self.assertEqual(text, "exit codes:\n  0   fine\n  1   failed\n      see the log\n"
                               "  143 SIGTERM\n")


if __name__ == "__main__":
    unittest.main()
