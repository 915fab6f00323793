"""Retention (--keep), backup.ini and --notify-url: table tests for the pure
decisions, end-to-end runs of backup.main for the rest."""
import http.server
import os
import shutil
import socket
import tarfile
import threading
import unittest

from iotstack_backup import iotstack, restore, run
from tests.backup_case import StackTestCase, read_log
from tests.stacktree import diff_snapshots, snapshot
from tests.support import USER_ARGS, Recorder, run_main


class RetentionDecisionTest(unittest.TestCase):
    def test_table(self):
        a, b, c = ("backup_2026-11-24_0200.tar.gz", "backup_2026-11-25_0200.tar.gz",
                   "backup_2026-11-26_0200.tar.gz")
        c2, c3 = "backup_2026-11-26_0200-2.tar.gz", "backup_2026-11-26_0200-3.tar.gz"
        foreign = ["notes.txt", "backup_4.tar.gz", "backup_2026-11-20.tar.gz",
                   ".backup_2026-11-19_0200.tar.gz.7.partial", "mybackup_2026-11-01_0200.tar.gz"]
        table = [
            ([a, b, c], None, None, []),                  # default: keep all
            ([a, b, c], 5, None, []),                     # fewer than N
            ([a, b, c], 3, None, []),
            ([c, a, b], 2, None, [a]),                    # by name, not listing order
            ([a, b, c], 1, None, [b, a]),
            ([c, c3, c2, b], 2, None, [c, b]),            # -2, -3 are newer than the plain name
            (foreign + [a, b], 1, None, [a]),             # foreign files never chosen
            ([a, b, c], 2, a, [b]),                       # the new one (clock set back) stays
            ([a, b, c], 1, a, [c, b]),
        ]
        for names, keep, just_written, expected in table:
            self.assertEqual(iotstack.dated_backups_to_remove(names, keep, just_written), expected,
                             (names, keep, just_written))


class RetentionTest(StackTestCase):
    def make_old(self, stamps):
        for stamp in stamps:
            for path in (os.path.join(self.backups, "backup", "backup_%s.tar.gz" % stamp),
                         os.path.join(self.backups, "logs", "backup_%s.log" % stamp)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write("old")

    def test_keep_n_removes_older_backups_and_their_logs(self):
        self.make_old(["2026-11-20_0200", "2026-11-21_0200", "2026-11-22_0200",
                       "2026-11-23_0200"])
        code, _out, _err = self.backup("3", "--keep", "3", *USER_ARGS)
        self.assertEqual(code, 0)
        self.assertEqual(self.archives("backup"), [
            "backup_2026-11-22_0200.tar.gz", "backup_2026-11-23_0200.tar.gz",
            "backup_2026-11-26_0200.tar.gz"])
        logs = sorted(os.listdir(os.path.join(self.backups, "logs")))
        self.assertEqual(logs, ["backup_2026-11-22_0200.log", "backup_2026-11-23_0200.log",
                                "backup_2026-11-26_0200.log"])
        self.assertTrue(os.path.exists(os.path.join(self.backups, "backup", "old_note.txt")))
        self.assertIn("Removed old backup (--keep 3): backup/backup_2026-11-20_0200.tar.gz",
                      read_log(self.stack))

    def test_nothing_is_removed_when_the_backup_fails(self):
        self.make_old(["2026-11-20_0200", "2026-11-21_0200"])
        self.write_hook("pre_backup.sh", "exit 1")
        self.assertEqual(self.backup("1", "--keep", "1", *USER_ARGS)[0], 1)
        self.assertEqual(len(self.archives("backup")), 2)

    def test_keep_must_be_a_positive_number(self):
        for bad in ("0", "-1", "many"):
            code, _out, err = self.backup("1", "--keep", bad)
            self.assertEqual(code, 2)
            self.assertIn("--keep", err)


class ConfigTest(StackTestCase):
    def write_config(self, text):
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write(text)

    def test_settings_from_file_and_command_line(self):
        self.write_config("[backup]\ntype = 1\nkeep = 7\nexclude = *.fifo\n"
                          "    volumes/influxdb\nno-verify = yes\n")
        code, out, err = self.backup("--print-config", "--keep", "2")
        self.assertEqual((code, err), (0, ""))
        lines = {line.split("=")[0].strip(): line for line in out.splitlines()}
        self.assertRegex(lines["type"], r"= 1 +\(backup\.ini\)")
        self.assertRegex(lines["keep"], r"= 2 +\(command line\)")
        self.assertRegex(lines["exclude"], r"= \*\.fifo, volumes/influxdb +\(backup\.ini\)")
        self.assertRegex(lines["no-verify"], r"= true +\(backup\.ini\)")
        self.assertRegex(lines["level"], r"= 6 +\(default\)")
        # The user the files would belong to, and why (issue 14), and the file read.
        self.assertRegex(lines["user"], r"= \w+ +\(default: (\$SUDO_USER|owner of .*)\)")
        self.assertRegex(lines["file"], r"= .*/backup\.ini +\(read\)")

    def test_the_cron_line_uses_the_file(self):
        self.write_config("[backup]\nexclude = volumes/influxdb\nno-stop = true\n")
        self.assertEqual(self.backup("3", *USER_ARGS)[0], 0)
        with tarfile.open(self.dated) as tf:
            names = tf.getnames()
        self.assertIn("backup.ini", names)  # the settings travel with the backup
        self.assertFalse([n for n in names if n.startswith("volumes/influxdb")])
        self.assertIn("Services: left running (--stop none)", read_log(self.stack))
        # On a real engine: test_stack_control.RefusalTest.test_no_stop_in_backup_ini.

    def test_command_line_type_wins(self):
        self.write_config("[backup]\ntype = 1\n")
        self.assertEqual(self.backup("2", *USER_ARGS)[0], 0)
        self.assertEqual(self.archives("backup"), [])
        self.assertTrue(os.path.exists(self.rolling))

    def test_errors_name_the_key_and_the_file(self):
        path = os.path.join(self.stack, "backup.ini")
        table = [
            ("[backup]\nkeeep = 3\n", "unknown key 'keeep'"),
            ("[backup]\nkeep = three\n", "bad value for 'keep'"),
            ("[backup]\ntype = 5\n", "bad value for 'type'"),
            ("[backup]\nno-stop = maybe\n", "bad value for 'no-stop'"),
            ("[backup]\ncopy-to = ftp:host:/x\n", "bad value for 'copy-to'"),
            ("[backup]\nnotify-url = example.com\n", "bad value for 'notify-url'"),
            ("[backup]\nkeep = 1\n  2\n", "key 'keep' takes one value"),
            ("[backups]\nkeep = 1\n", "unknown section [backups]"),
            ("keep = 1\n", "backup.ini"),
        ]
        for text, message in table:
            self.write_config(text)
            code, _out, err = self.backup("3", *USER_ARGS)
            self.assertEqual(code, 2, text)
            self.assertIn(message, err, text)
            self.assertIn(path, err, text)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(self.archives("backup"), [])


@unittest.skipUnless(shutil.which("rsync") and shutil.which("rclone"), "needs rsync and rclone")
class CopyTest(StackTestCase):
    """backup.py --copy-to end to end; offsite's own tests cover ssh."""

    def setUp(self):
        super().setUp()
        self.dest = os.path.join(self.tmp, "usb")
        os.mkdir(self.dest)
        self.host_dir = os.path.join(self.dest, iotstack.host_folder())

    def test_copies_to_two_destinations_with_retention_there(self):
        old = os.path.join(self.host_dir, "backup")
        os.makedirs(old)
        for stamp in ("2026-11-20_0200", "2026-11-21_0200", "2026-11-22_0200"):
            with open(os.path.join(old, "backup_%s.tar.gz" % stamp), "w") as f:
                f.write("old")
        other = os.path.join(self.tmp, "nas")
        os.mkdir(other)
        code, _out, err = self.backup("3", "--keep", "2", "--copy-to", "rsync:" + self.dest,
                                      "--copy-to", "rclone::local:" + other, *USER_ARGS)
        self.assertEqual((code, err), (0, ""))
        with open(self.dated, "rb") as f:
            data = f.read()
        for root in (self.host_dir, os.path.join(other, iotstack.host_folder())):
            for rel in ("backup/backup_2026-11-26_0200.tar.gz", "rolling/backup_4.tar.gz"):
                with open(os.path.join(root, rel), "rb") as f:
                    self.assertEqual(f.read(), data, (root, rel))
        self.assertEqual(sorted(os.listdir(old)), ["backup_2026-11-22_0200.tar.gz",
                                                   "backup_2026-11-26_0200.tar.gz"])
        log = read_log(self.stack)
        self.assertIn("Copied backup/backup_2026-11-26_0200.tar.gz to rsync:%s" % self.dest, log)
        self.assertIn("Removed old backup at rsync:%s (--keep 2): "
                      "backup/backup_2026-11-20_0200.tar.gz" % self.dest, log)

    def test_failed_copy_fails_the_run_and_keeps_the_local_backup(self):
        missing = os.path.join(self.tmp, "unmounted-usb")
        code, _out, err = self.backup("1", "--copy-to", "rsync:" + self.dest,
                                      "--copy-to", "rsync:" + missing, *USER_ARGS)
        self.assertEqual(code, 1)
        self.assertIn("copy to rsync:%s failed" % missing, err)
        self.assertIn("the local backup is kept", err)
        self.assert_verifies(self.dated)
        self.assertTrue(os.path.exists(os.path.join(self.host_dir, "backup",
                                                    os.path.basename(self.dated))))
        self.assertIn("ERROR: copy to rsync:%s failed" % missing, read_log(self.stack))
        self.assertFalse(os.path.exists(missing))  # never created: it may be a mount point


@unittest.skipUnless(shutil.which("rsync") and shutil.which("rclone"), "needs rsync and rclone")
class RestoreFromCopyTest(StackTestCase):
    """The bare-metal story: the SD card died, the copy is all there is."""

    def test_list_and_restore_from_each_method(self):
        usb, nas = os.path.join(self.tmp, "usb"), os.path.join(self.tmp, "nas")
        os.mkdir(usb)
        os.mkdir(nas)
        self.assertEqual(self.backup("3", "--copy-to", "rsync:" + usb,
                                     "--copy-to", "rclone::local:" + nas, *USER_ARGS)[0], 0)
        before = snapshot(self.stack, skip=("backups", ".tmp", "menu.sh"))
        for source in ("rsync:" + usb, "rclone::local:" + nas):
            shutil.rmtree(self.backups)
            shutil.rmtree(os.path.join(self.stack, "volumes"))
            code, out, err = run_main(restore, ["--list", "--from", source, "--dir", self.stack])
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(sorted(line.split()[0] for line in out.splitlines()),
                             ["backup/backup_2026-11-26_0200.tar.gz", "rolling/backup_4.tar.gz"])
            code, out, err = run_main(restore, ["backup/backup_2026-11-26_0200.tar.gz", "noask",
                                                "--from", source, "--dir", self.stack])
            self.assertEqual((code, err), (0, ""), out)
            self.assertIn("Fetched backup/backup_2026-11-26_0200.tar.gz from %s" % source, out)
            self.assert_verifies(self.dated)
            self.assertEqual(diff_snapshots(before, snapshot(
                self.stack, skip=("backups", ".tmp", "menu.sh"))), [])

    def test_missing_copy_is_one_clear_error_and_changes_nothing(self):
        usb = os.path.join(self.tmp, "usb")
        os.mkdir(usb)
        before = snapshot(self.stack)
        code, _out, err = run_main(restore, ["backup/backup_2026-01-01_0000.tar.gz", "noask",
                                             "--from", "rsync:" + usb, "--dir", self.stack])
        self.assertEqual(code, 1)
        self.assertIn("cannot fetch backup/backup_2026-01-01_0000.tar.gz from rsync:", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])

    def test_other_host_folder(self):
        usb = os.path.join(self.tmp, "usb")
        os.makedirs(os.path.join(usb, "oldpi", "rolling"))
        self.assertEqual(self.backup("2", *USER_ARGS)[0], 0)
        shutil.copy(self.rolling, os.path.join(usb, "oldpi", "rolling", "backup_4.tar.gz"))
        code, out, err = run_main(restore, ["--list", "--from", "rsync:" + usb,
                                            "--from-host", "oldpi", "--dir", self.stack])
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("rolling/backup_4.tar.gz"))


class NotifyTest(StackTestCase):
    def setUp(self):
        super().setUp()
        Recorder.paths = []
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = "http://127.0.0.1:%d/ping/abc" % self.server.server_address[1]

    def test_success_and_failure(self):
        self.assertEqual(self.backup("1", "--notify-url", self.url, *USER_ARGS)[0], 0)
        self.assertEqual(Recorder.paths, ["/ping/abc"])
        self.assertIn("Notified %s: HTTP 200" % self.url, read_log(self.stack))
        self.write_hook("pre_backup.sh", "exit 1")
        self.assertEqual(self.backup("1", "--notify-url", self.url, *USER_ARGS)[0], 1)
        self.assertEqual(Recorder.paths, ["/ping/abc", "/ping/abc/fail"])

    def test_failure_before_the_log_exists_is_notified_too(self):
        import fcntl
        os.makedirs(os.path.join(self.stack, ".tmp"), exist_ok=True)
        with open(os.path.join(self.stack, iotstack.LOCK_NAME), "w") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            code, _out, _err = self.backup("1", "--notify-url", self.url, *USER_ARGS)
        self.assertEqual(code, run.EXIT_BUSY)
        self.assertEqual(Recorder.paths, ["/ping/abc/fail"])

    def test_unreachable_url_is_logged_never_fatal(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = "http://127.0.0.1:%d/ping" % port
        code, _out, _err = self.backup("1", "--notify-url", url, *USER_ARGS)
        self.assertEqual(code, 0)
        self.assertIn("Warning: notification to %s failed" % url, read_log(self.stack))


if __name__ == "__main__":
    unittest.main()
