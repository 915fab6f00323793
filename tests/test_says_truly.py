"""Every run says truly what it did (issue 21, Musts 6 and 8).

Must 6: a backup that fails before its run began (a bad backup.ini, bad
arguments, no IOTstack directory, another run holding the lock), run as
cron runs it (no terminal), writes a log in backups/logs/ (or says on
stderr why it cannot) and sends the "failed" notifications it can read the
settings of: a real HTTP server and a real mosquitto broker on 127.0.0.1
receive them.  Must 8: restore --only with a typo is exit 2, and counts
only its members."""
import glob
import http.server
import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import unittest

from iotstack_backup import failure_report
from tests import mosquitto_broker, terminal
from tests.support import BACKUP_PY, RESTORE_PY, IsolatedCase, Recorder, read, write

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
SYSTEM_PYTHON = "/usr/bin/python3"


class PureTests(unittest.TestCase):
    def test_notify_settings_take_what_is_valid(self):
        ini = "[backup]\nkep = 3\nnotify-url = https://hc.example/ping\nnotify-mqtt = nope\n"
        found = failure_report.notify_settings(["1", "--keep", "x"], ini)
        self.assertEqual(found.notify_url, "https://hc.example/ping")
        self.assertIsNone(found.notify_mqtt)
        found = failure_report.notify_settings(
            ["--notify-url=http://cli.example/x", "7"], ini)
        self.assertEqual(found.notify_url, "http://cli.example/x")  # the command line wins
        found = failure_report.notify_settings(["--notify-url", "ftp://bad"], "[broken")
        self.assertIsNone(found.notify_url)

    def test_which_runs_are_backups(self):
        for argv, expected in ((["1"], True), ([], True), (["--kep", "3"], True),
                               (["--dry-run"], False), (["--print-config"], False),
                               (["--install-cron=0 3 * * *"], False), (["-h"], False)):
            self.assertEqual(failure_report.is_backup_run(argv), expected, argv)


class CronCase(IsolatedCase):
    """A small stack, an HTTP monitor on 127.0.0.1, runs as cron runs them."""

    def setUp(self):
        super().setUp()
        self.stack = os.path.join(self.make_tmp("i21-says-"), "IOTstack")
        write(os.path.join(self.stack, "docker-compose.yml"), "services: {}\n")
        write(os.path.join(self.stack, "services/nodered/Dockerfile"), "FROM x\n")
        write(os.path.join(self.stack, "volumes/nodered/flows.json"), "[]\n")
        Recorder.paths = []
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = "http://127.0.0.1:%d/ping/abc" % self.server.server_address[1]
        tools = terminal.tools_dir()
        self.addCleanup(tools.cleanup)
        self.env = terminal.no_docker_env(tools.name)

    def cron_run(self, *argv, cwd=None):
        """As cron runs it: no terminal, the stack as the working directory."""
        return subprocess.run([sys.executable, BACKUP_PY] + list(argv), cwd=cwd or self.stack,
                              env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def logs(self):
        return sorted(glob.glob(os.path.join(self.stack, "backups/logs/backup_*.log")))


class FailureReachesTheMonitorTests(CronCase):

    def test_a_bad_backup_ini_is_logged_and_notified(self):
        write(os.path.join(self.stack, "backup.ini"),
              "[backup]\nkep = 3\nnotify-url = %s\n" % self.url)
        result = self.cron_run("3")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.count("error:"), 1, result.stderr)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])
        logs = self.logs()
        self.assertEqual(len(logs), 1)
        log = read(logs[0])
        self.assertIn("ERROR: %s: unknown key 'kep' in [backup]"
                      % os.path.join(self.stack, "backup.ini"), log)
        self.assertIn("Notified %s/fail: HTTP 200" % self.url, log)
        self.assertEqual(glob.glob(os.path.join(self.stack, "backups/backup/*")), [])

    def test_bad_arguments_from_cron_are_logged_and_notified(self):
        write(os.path.join(self.stack, "backup.ini"), "[backup]\nnotify-url = %s\n" % self.url)
        result = self.cron_run("7")
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage: backup.py", result.stderr)
        self.assertIn("TYPE can only be 1, 2 or 3", result.stderr)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])
        self.assertIn("ERROR: argument TYPE: TYPE can only be 1, 2 or 3", read(self.logs()[0]))
        # The URL on the command line counts even when another argument is bad.
        os.unlink(os.path.join(self.stack, "backup.ini"))
        result = self.cron_run("--keep", "x", "--notify-url", self.url + "/cli")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail", "/ping/abc/cli/fail"])
        self.assertEqual(len(self.logs()), 2)

    def test_an_unknown_user_is_logged_and_notified_once(self):
        if os.geteuid() != 0:
            self.skipTest("USER is read only as root")
        result = self.cron_run("1", "nosuchuser", "--notify-url", self.url)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])
        self.assertIn("ERROR: unknown user 'nosuchuser'", read(self.logs()[0]))

    def test_the_mqtt_report_says_failed_with_the_error(self):
        if mosquitto_broker.MISSING:
            self.skipTest("needs %s" % ", ".join(mosquitto_broker.MISSING))
        broker = mosquitto_broker.Mosquitto(self.make_tmp("i21-mqtt-"))
        broker.start()
        self.addCleanup(broker.stop)
        url = "mqtt://%s:%s@127.0.0.1:%d/iotstack/backup" % (
            mosquitto_broker.USER, mosquitto_broker.PASSWORD_IN_URL, broker.port)
        write(os.path.join(self.stack, "backup.ini"),
              "[backup]\nnotify-mqtt = %s\nno-mqtt-discovery = yes\nlevel = 11\n" % url)
        result = self.cron_run("1")
        self.assertEqual(result.returncode, 2, result.stderr)
        line = broker.subscribe("iotstack/backup").decode()
        report = json.loads(line.split(" ", 1)[1])
        self.assertEqual(report["status"], "failed")
        self.assertIn("bad value for 'level'", report["error"])

    def test_without_a_stack_stderr_says_why_there_is_no_log(self):
        elsewhere = self.make_tmp("i21-nostack-")
        result = self.cron_run("1", "--notify-url", self.url, cwd=elsewhere)
        self.assertEqual(result.returncode, 1)
        # Its one line says why there is no log: no IOTstack directory.
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("is not an IOTstack directory", result.stderr)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])

    def test_as_pi_where_the_logs_are_root_s_stderr_says_why(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to run as pi")
        try:
            pi = pwd.getpwnam("pi")
        except KeyError:
            self.skipTest("needs a user pi (useradd -m pi)")
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest("no %s for pi" % SYSTEM_PYTHON)
        os.makedirs(os.path.join(self.stack, "backups/logs"))  # root's, 0755
        write(os.path.join(self.stack, "backup.ini"), "[backup]\nkep = 3\n")
        result = subprocess.run(
            [RUNUSER, "-u", "pi", "--", SYSTEM_PYTHON, BACKUP_PY, "1", "--notify-url",
             self.url], cwd=self.stack, env=dict(self.env, HOME=pi.pw_dir, PATH="/usr/bin:/bin"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=120)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("no log was written: ", result.stderr)
        self.assertIn("Permission denied", result.stderr)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])

    def test_a_dry_run_that_fails_notifies_nobody(self):
        write(os.path.join(self.stack, "backup.ini"), "[backup]\nkep = 3\n")
        result = self.cron_run("--dry-run", "--notify-url", self.url)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(Recorder.paths, [])
        self.assertEqual(self.logs(), [])


class SummaryTests(CronCase):
    """Must 8: the terminal summary is the log's short form."""

    def test_copies_pruned_backups_and_failed_notifications_are_in_the_summary(self):
        if not shutil.which("rsync"):
            self.skipTest("needs rsync")
        usb = self.make_tmp("i21-usb-")
        dead = "http://127.0.0.1:9/nobody-listens"
        first = self.cron_run("1", "--no-stop", "--copy-to", "rsync:" + usb, "--keep", "1")
        self.assertEqual(first.returncode, 0, first.stderr)
        result = self.cron_run("1", "--no-stop", "--copy-to", "rsync:" + usb, "--keep", "1",
                               "--notify-url", dead)
        self.assertEqual(result.returncode, 0, result.stderr)
        new = os.path.basename(glob.glob(os.path.join(self.stack, "backups/backup/*"))[0])
        self.assertIn("Copied to rsync:%s: backup/%s\n" % (usb, new), result.stdout)
        self.assertIn("Old backups removed: 2 (see the log)\n", result.stdout)  # here and at usb
        self.assertIn("Warning: notification to %s failed" % dead, result.stdout)


class OnlyTests(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.stack = os.path.join(self.make_tmp("i21-only-"), "IOTstack")
        write(os.path.join(self.stack, "docker-compose.yml"), "services: {}\n")
        for n in range(5):
            write(os.path.join(self.stack, "volumes/nodered/data/f%d" % n), "%d\n" % n)
        write(os.path.join(self.stack, "volumes/grafana/grafana.db"), "g\n")
        tools = terminal.tools_dir()
        self.addCleanup(tools.cleanup)
        self.env = terminal.no_docker_env(tools.name)

    def run_tool(self, script, *argv):
        return subprocess.run([sys.executable, script] + list(argv), cwd=self.stack,
                              env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def test_a_typo_is_exit_2_and_the_count_is_only_its_members(self):
        made = self.run_tool(BACKUP_PY, "1", "--no-stop")
        self.assertEqual(made.returncode, 0, made.stderr)
        name = "backup/" + os.listdir(os.path.join(self.stack, "backups/backup"))[0]
        for extra in ([], ["--dry-run"]):
            typo = self.run_tool(RESTORE_PY, name, "noask", "--no-stop", "--only",
                                 "volumes/noderd", *extra)
            self.assertEqual(typo.returncode, 2, typo.stdout + typo.stderr)
            self.assertIn("--only volumes/noderd: the archive holds nothing under it",
                          typo.stderr)
        done = self.run_tool(RESTORE_PY, name, "noask", "--no-stop", "--only",
                             "volumes/nodered")
        self.assertIn(done.returncode, (0, 3), done.stderr)
        # volumes/nodered, data/ and five files: 7 of the archive's 11 members.
        self.assertIn("Restored %s: volumes/nodered (7 members" % os.path.basename(name),
                      done.stdout)


if __name__ == "__main__":
    unittest.main()
