"""backup.py --install-cron / --uninstall-cron, with Debian's real crontab.

The pure part (the line, the crontab's new text) is tested on strings; the
rest with the `crontab` command of the cron package: the user pi's crontab
through `crontab -u pi` and `runuser -u pi`, and root's crontab, which is
put back exactly as it was after each test."""
import argparse
import os
import pwd
import shutil
import subprocess
import sys
import unittest

from iotstack_backup import schedule
from tests.support import IsolatedCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKUP_PY = os.path.join(REPO, "backup.py")
IS_ROOT = os.geteuid() == 0
CRONTAB = shutil.which("crontab")
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
# A Python another user may run (pyenv's live under /root, mode 0700).
SYSTEM_PYTHON = "/usr/bin/python3"


def pi_user():
    try:
        return pwd.getpwnam("pi")
    except KeyError:
        return None


def crontab(*args, text=None):
    return subprocess.run(["crontab"] + list(args), input=None if text is None else text.encode(),
                          stdin=subprocess.DEVNULL if text is None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def current(user):
    result = crontab("-u", user, "-l")
    return result.stdout.decode() if result.returncode == 0 else None


def put_back(user, text):
    if text is None:
        crontab("-u", user, "-r")
    else:
        crontab("-u", user, "-", text=text)


class PureTests(unittest.TestCase):
    def test_schedules(self):
        self.assertEqual(schedule.parse_schedule(" 30 3  * * 1-5 "), "30 3 * * 1-5")
        self.assertEqual(schedule.parse_schedule("@daily"), "@daily")
        for bad in ("", "0 2 * *", "0 2 * * * *", "0 2 * * ; rm", "@sometimes"):
            with self.subTest(bad=bad), self.assertRaises(argparse.ArgumentTypeError):
                schedule.parse_schedule(bad)

    def test_line_has_absolute_paths_and_escapes_percent(self):
        line = schedule.cron_line("0 2 * * *", "/usr/bin/python3", "/opt/b 1%/backup.py",
                                  "/home/pi/IOTstack", ["3", "pi"])
        self.assertEqual(line, "0 2 * * * cd /home/pi/IOTstack && /usr/bin/python3 "
                               "'/opt/b 1\\%/backup.py' --dir /home/pi/IOTstack 3 pi "
                               "# iotstack-backup")

    def test_replace_append_remove_and_nothing_else(self):
        mine = "0 2 * * * cd /x && python3 /x/backup.py --dir /x # iotstack-backup"
        others = "MAILTO=me@example.org\n# a comment # iotstack-backup\n5 * * * * other job\n"
        added = schedule.with_line(others, mine)
        self.assertEqual(added, others + mine + "\n")
        again = schedule.with_line(added, mine.replace("0 2", "30 4"))
        self.assertEqual(again, others + mine.replace("0 2", "30 4") + "\n")
        self.assertEqual(schedule.without_line(again), others)
        self.assertEqual(schedule.with_line("", mine), mine + "\n")
        self.assertEqual(schedule.without_line(mine + "\n"), "")


@unittest.skipUnless(CRONTAB and IS_ROOT, "needs the cron package's crontab, run as root")
class CrontabTests(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.stack = os.path.join(self.make_tmp("cron-test-"), "IOTstack")
        os.makedirs(os.path.join(self.stack, "volumes/nodered"))
        os.mkdir(os.path.join(self.stack, "services"))
        with open(os.path.join(self.stack, "docker-compose.yml"), "w") as f:
            f.write("services: {}\n")
        with open(os.path.join(self.stack, "volumes/nodered/flows.json"), "w") as f:
            f.write("[]\n")
        # make_tmp leaves the folder 0755: pi reaches the stack in it.
        self.pi = pi_user()
        if self.pi is None:
            self.skipTest("needs a user pi (useradd -m pi)")
        for root, dirs, files in os.walk(self.stack):
            for name in dirs + files + [""]:
                os.chown(os.path.join(root, name), self.pi.pw_uid, self.pi.pw_gid)
        for user in ("pi", "root"):
            self.addCleanup(put_back, user, current(user))
        # No Docker: what is tested is the schedule, not the stack (pi is
        # not in group docker here).
        self.env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1",
                    "LANG": "C.UTF-8", "IOTSTACK_NO_DOCKER": "1"}

    def as_pi(self, *argv):
        return subprocess.run([RUNUSER, "-u", "pi", "--"] + list(argv), cwd="/",
                              env=dict(self.env, HOME=self.pi.pw_dir),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def test_the_user_pi_installs_runs_and_uninstalls(self):
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest("no %s for pi" % SYSTEM_PYTHON)
        before = "MAILTO=\"\"\n15 * * * * echo keep me\n"
        put_back("pi", before)
        result = self.as_pi(SYSTEM_PYTHON, BACKUP_PY, "--install-cron", "--dir", self.stack)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Added the backup line in pi's crontab", result.stdout)
        text = current("pi")
        self.assertTrue(text.startswith(before), text)
        line = text[len(before):].rstrip("\n")
        self.assertEqual(line, "0 2 * * * cd %s && %s %s --dir %s # iotstack-backup"
                         % (self.stack, SYSTEM_PYTHON, BACKUP_PY, self.stack))
        # Again, another time and TYPE 1: the line is replaced, not added.
        result = self.as_pi(SYSTEM_PYTHON, BACKUP_PY, "1", "--install-cron", "30 3 * * *",
                            "--dir", self.stack)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Replaced", result.stdout)
        text = current("pi")
        self.assertEqual(text.count("iotstack-backup"), 1, text)
        self.assertIn("30 3 * * * cd %s && " % self.stack, text)
        self.assertIn(" --dir %s 1 # iotstack-backup" % self.stack, text)
        # The line's command, run as cron runs it (sh, cron's PATH, from HOME):
        command = text.splitlines()[-1].split(" ", 5)[5]
        ran = self.as_pi("/bin/sh", "-c", command)
        self.assertEqual(ran.returncode, 0, ran.stdout + ran.stderr)
        self.assertTrue(os.listdir(os.path.join(self.stack, "backups/backup")))
        result = self.as_pi(SYSTEM_PYTHON, BACKUP_PY, "--uninstall-cron", "--dir", self.stack)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(current("pi"), before)
        result = self.as_pi(SYSTEM_PYTHON, BACKUP_PY, "--uninstall-cron", "--dir", self.stack)
        self.assertIn("no backup line", result.stdout)
        self.assertEqual(current("pi"), before)

    def test_root_names_the_owner_of_the_stack(self):
        before = "# root's own\n0 4 * * 0 /usr/sbin/logrotate-ish\n"
        put_back("root", before)
        pi_before = current("pi")
        env = dict(self.env, SUDO_USER="pi")
        run = subprocess.run([sys.executable, BACKUP_PY, "--install-cron", "--dir", self.stack],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stderr)
        text = current("root")
        self.assertTrue(text.startswith(before), text)
        self.assertTrue(text.endswith(" --dir %s pi # iotstack-backup\n" % self.stack), text)
        self.assertEqual(current("pi"), pi_before)  # untouched by root's install
        run = subprocess.run([sys.executable, BACKUP_PY, "--uninstall-cron", "--dir", self.stack],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(current("root"), before)

    def test_a_bad_schedule_changes_nothing(self):
        before = current("root")
        run = subprocess.run([sys.executable, BACKUP_PY, "--install-cron", "2am", "--dir",
                              self.stack], env=self.env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=60)
        self.assertEqual(run.returncode, 2)
        self.assertIn("is not a cron schedule", run.stderr)
        self.assertEqual(current("root"), before)


if __name__ == "__main__":
    unittest.main()
