"""restore.py with no FILENAME: the numbered list of backups, on a terminal.

restore.py runs on a pseudo-terminal; the test reads the list, types a
number and answers the question, as a user does.  Without a terminal it
must stop with exit 2 naming the newest backups.  No docker is used."""
import datetime
import glob
import os
import shutil
import subprocess
import sys
import time
import unittest

from iotstack_backup import picker, run
from tests import terminal
from tests.support import BACKUP_PY, RESTORE_PY, IsolatedCase, read, write

_BIN = None


def setUpModule():
    global _BIN
    _BIN = terminal.tools_dir()


def tearDownModule():
    _BIN.cleanup()


def env():
    return terminal.no_docker_env(_BIN.name)


class PureTests(unittest.TestCase):
    def test_age(self):
        self.assertEqual(picker.age(5), "just now")
        self.assertEqual(picker.age(-30), "just now")  # a clock set back
        self.assertEqual(picker.age(61), "1 min ago")
        self.assertEqual(picker.age(3 * 3600 + 5), "3 hours ago")
        self.assertEqual(picker.age(86400), "1 day ago")
        self.assertEqual(picker.age(9 * 86400), "9 days ago")

    def test_order_and_lines(self):
        now = time.mktime(datetime.datetime(2026, 11, 26, 12, 0).timetuple())
        entries = picker.newest_first([
            ("rolling/backup_4.tar.gz", 2_000_000, now - 7200),
            ("backup/backup_2026-11-25_0200.tar.gz", 1_500_000, now - 86400 - 36000),
            ("backup/backup_2026-11-26_0200.tar.gz", 2_000_000, now - 7200),
        ])
        self.assertEqual([e[0] for e in entries], [
            "backup/backup_2026-11-26_0200.tar.gz", "rolling/backup_4.tar.gz",
            "backup/backup_2026-11-25_0200.tar.gz"])
        lines = picker.menu_lines(entries, now)
        self.assertEqual(lines[0], "  1) backup/backup_2026-11-26_0200.tar.gz     2.0 MB  "
                                   "2026-11-26 10:00 (2 hours ago)")
        self.assertTrue(lines[2].startswith("  3) backup/backup_2026-11-25_0200.tar.gz"))
        self.assertTrue(lines[2].endswith("(1 day ago)"))

    def test_parse_choice(self):
        self.assertEqual(picker.parse_choice(" 2 \n", 3), 1)
        for text in ("", "q", "n"):
            self.assertIsNone(picker.parse_choice(text, 3))
        for text in ("0", "4", "x", "-1", "1.5"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                picker.parse_choice(text, 3)

    def test_no_terminal_message(self):
        entries = [("backup/b%d.tar.gz" % n, 1, 1) for n in range(5)]
        text = picker.no_terminal_message(entries, "/x/backups")
        self.assertIn("backup/b0.tar.gz, backup/b1.tar.gz, backup/b2.tar.gz;", text)
        self.assertNotIn("b3", text)
        self.assertIn("restore.py backup/b0.tar.gz noask", text)
        self.assertIn("no backups in /x/backups", picker.no_terminal_message([], "/x/backups"))

    def test_pick_asks_again_after_a_wrong_number(self):
        answers = iter(["7", "2"])
        out = []

        class Out:
            def write(self, text):
                out.append(text)

            def flush(self):
                pass

        chosen = picker.pick([("a.tar.gz", 1, 1), ("b.tar.gz", 1, 1)], "here", 10,
                             lambda prompt: next(answers), Out())
        self.assertEqual(chosen, "b.tar.gz")
        self.assertIn("type a number from 1 to 2, or press Enter to stop\n", out)
        with self.assertRaises(run.UserError):
            picker.pick([], "here", 10, input, Out())


class PickerCase(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.tmp = self.make_tmp("picker-test-")
        self.stack = os.path.join(self.tmp, "IOTstack")
        write(os.path.join(self.stack, "docker-compose.yml"), "services: {}\n")
        write(os.path.join(self.stack, "services/nodered/Dockerfile"), "FROM x\n")
        self.flows = os.path.join(self.stack, "volumes/nodered/data/flows.json")
        write(self.flows, "[first]\n")
        self.first = self.backup("1")
        write(self.flows, "[second]\n")
        self.second = self.backup("3")
        # Newest first by time: make the first backup clearly older.
        old = time.time() - 3 * 86400
        os.utime(self.first, (old, old))
        write(self.flows, "[changed since]\n")

    def backup(self, kind, *extra):
        result = subprocess.run([sys.executable, BACKUP_PY, kind, "--dir", self.stack] +
                                list(extra), env=env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        names = sorted(glob.glob(os.path.join(self.stack, "backups/backup/*.tar.gz")),
                       key=os.path.getmtime)
        return names[-1]

    def restore(self, *argv, answers=()):
        return terminal.run_pty([sys.executable, RESTORE_PY] + list(argv), self.stack,
                                answers, env())

    def restore_no_terminal(self, *argv):
        return subprocess.run([sys.executable, RESTORE_PY] + list(argv), cwd=self.stack,
                              env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)


class PickerTests(PickerCase):
    def test_pick_a_number_and_confirm(self):
        code, shown = self.restore(answers=[("Restore which backup", "9\n"),
                                            ("Restore which backup", "3\n"),
                                            ("Continue [y/N]?", "y\n")])
        self.assertEqual(code, 0, shown)
        listed = [line for line in shown.splitlines() if line[4:5] == " " and line[3:4] == ")"]
        self.assertEqual(len(listed), 3, shown)  # two dated, one rolling
        self.assertIn("1) backup/" + os.path.basename(self.second), listed[0])
        self.assertIn("2) rolling/backup_", listed[1])
        self.assertIn("3) backup/" + os.path.basename(self.first), listed[2])
        self.assertIn("(3 days ago)", listed[2])
        self.assertIn("type a number from 1 to 3", shown)
        self.assertIn("Restore %s into %s" % (self.first, self.stack), shown)
        self.assertIn("Services to stop: none running", shown)
        self.assertEqual(read(self.flows), "[first]\n")

    def test_answer_no_or_enter_changes_nothing(self):
        for answers in ([("Restore which backup", "1\n"), ("Continue [y/N]?", "\n")],
                        [("Restore which backup", "\n")]):
            with self.subTest(answers=answers):
                code, shown = self.restore(answers=answers)
                self.assertEqual(code, 2, shown)
                self.assertIn("Nothing was changed.", shown)
                self.assertEqual(read(self.flows), "[changed since]\n")

    def test_without_a_terminal_exit_2_naming_the_newest(self):
        result = self.restore_no_terminal()
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("no terminal to choose on", result.stderr)
        self.assertIn("backup/%s" % os.path.basename(self.second), result.stderr)
        self.assertIn("noask", result.stderr)
        self.assertEqual(read(self.flows), "[changed since]\n")

    def test_bare_names_are_found_in_backup_and_rolling(self):
        result = self.restore_no_terminal(os.path.basename(self.first), "noask")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(read(self.flows), "[first]\n")
        rolling = os.path.basename(glob.glob(os.path.join(self.stack,
                                                          "backups/rolling/*.tar.gz"))[0])
        result = self.restore_no_terminal(rolling, "noask")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(read(self.flows), "[second]\n")

    @unittest.skipUnless(shutil.which("rsync"), "needs rsync")
    def test_pick_from_a_copy(self):
        target = os.path.join(self.tmp, "usb")
        os.mkdir(target)
        write(self.flows, "[third]\n")
        third = self.backup("1", "--copy-to", "rsync:" + target)
        shutil.rmtree(os.path.join(self.stack, "backups"))
        write(self.flows, "[changed since]\n")
        code, shown = self.restore("--from", "rsync:" + target,
                                   answers=[("Restore which backup", "1\n"),
                                            ("Continue [y/N]?", "y\n")])
        self.assertEqual(code, 0, shown)
        self.assertIn("Backups in rsync:%s under " % target, shown)
        self.assertIn("1) backup/" + os.path.basename(third), shown)
        self.assertEqual(read(self.flows), "[third]\n")
        self.assertTrue(os.path.isfile(third))  # fetched back into backups/


if __name__ == "__main__":
    unittest.main()
