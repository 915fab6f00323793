"""backup.py --notify-mqtt end to end, against a real mosquitto started here
(with a password file): the retained report after ok, warning and failed
runs (an early failure too), Home Assistant discovery, and a broker that is
down, silent or refusing, which must cost the backup nothing but a warning
and a few seconds.  The password never shows in the log or --print-config."""
import json
import os
import shutil
import tempfile
import time
import unittest

from iotstack_backup import iotstack, mqtt, notify_mqtt
from tests.mosquitto_broker import (
    MISSING,
    PASSWORD,
    PASSWORD_IN_URL,
    USER,
    Mosquitto,
    free_port,
    silent_listener,
)
from tests.plainstack import PlainStackTestCase

TOPIC = "iotstack/backup/test"


class FactsTest(unittest.TestCase):
    def test_status(self):
        table = [((True, 0), "ok"), ((True, 3), "warning"), ((False, None), "failed"),
                 ((False, 1), "failed"), ((True, None), "ok")]
        for (ok, code), status in table:
            self.assertEqual(notify_mqtt.status_of(ok, code), status)

    def test_an_early_failure_has_nulls_and_the_error(self):
        from iotstack_backup import backup, run
        early = backup.Facts(time.monotonic())
        facts = notify_mqtt.report_facts(early, run.UserError("no luck"))
        self.assertEqual((facts["archive"], facts["size_bytes"], facts["downtime_seconds"],
                          facts["warnings"], facts["error"]), (None, None, None, [], "no luck"))
        self.assertGreaterEqual(facts["duration_seconds"], 0)
        self.assertEqual(notify_mqtt.report_facts(early, KeyboardInterrupt())["error"],
                         "interrupted")
        self.assertEqual(notify_mqtt.report_facts(early, None)["error"], None)


@unittest.skipIf(MISSING, "needs %s (Debian packages mosquitto, mosquitto-clients)"
                 % " and ".join(MISSING))
class NotifyMqttTest(PlainStackTestCase):
    def setUp(self):
        super().setUp()
        folder = tempfile.mkdtemp(prefix="mqtt-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.broker = Mosquitto(folder)
        self.addCleanup(self.broker.stop)
        self.broker.start()
        self.url = "mqtt://%s:%s@127.0.0.1:%d/%s" % (USER, PASSWORD_IN_URL, self.broker.port, TOPIC)
        self.shown = "mqtt://%s:***@127.0.0.1:%d/%s" % (USER, self.broker.port, TOPIC)

    def report(self):
        line = self.broker.subscribe(TOPIC)
        self.assertTrue(line.startswith(TOPIC.encode() + b" "), line)
        return json.loads(line[len(TOPIC) + 1:])

    def log(self):
        logs = os.path.join(self.backups, "logs")
        with open(os.path.join(logs, sorted(os.listdir(logs))[-1]), encoding="utf-8") as f:
            return f.read()

    def forget_run(self):
        """Remove the archive and log of the last run: the next takes their names."""
        os.unlink(self.dated)
        os.unlink(os.path.join(self.backups, "logs", "backup_2026-11-26_0200.log"))

    def assert_no_password(self, text):
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn(PASSWORD_IN_URL, text)

    def test_ok_report_and_discovery(self):
        code, out, err = self.backup("1", "--notify-mqtt", self.url)
        self.assertEqual((code, err), (0, ""))
        report = self.report()
        self.assertEqual(report["status"], "ok")
        self.assertEqual(report["host"], iotstack.host_folder())
        self.assertEqual(report["archive"], "backup/backup_2026-11-26_0200.tar.gz")
        self.assertEqual(report["size_bytes"], os.path.getsize(self.dated))
        self.assertEqual(report["downtime_seconds"], 0.0)  # --no-stop
        self.assertGreaterEqual(report["duration_seconds"], 0)
        self.assertEqual((report["warnings"], report["error"]), ([], None))
        configs = self.broker.subscribe("homeassistant/#", count=3).splitlines()
        expected = mqtt.discovery_messages(mqtt.parse_mqtt_url(self.url), iotstack.host_folder())
        self.assertEqual(sorted(configs), sorted(t.encode() + b" " + p for t, p in expected))
        log = self.log()
        self.assertIn("Reported ok to %s, with Home Assistant discovery configs" % self.shown, log)
        self.assert_no_password(log + out)

    def test_backup_ini_print_config_and_no_discovery(self):
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nnotify-mqtt = %s\nno-mqtt-discovery = yes\n" % self.url)
        code, out, err = self.backup("--print-config")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"notify-mqtt += %s +\(backup\.ini\)" % self.shown.replace(
            "*", r"\*"))
        self.assert_no_password(out)
        code, out, err = self.backup("1")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.report()["status"], "ok")
        self.assertEqual(self.broker.subscribe("homeassistant/#", wait=1), b"")
        self.assertIn("Reported ok to %s\n" % self.shown, self.log())

    def test_warning_run(self):
        # A file the backup cannot read gives a warning, and exit code 3.
        unreadable = os.path.join(self.stack, "volumes", "unreadable.txt")
        with open(unreadable, "w") as f:
            f.write("secret")
        os.chmod(unreadable, 0)
        expected = "cannot read volumes/unreadable.txt"
        if os.access(unreadable, os.R_OK):
            # Root reads every file: the size guard gives the warning
            # instead, against a far larger earlier backup.
            folder = os.path.join(self.stack, "backups", "backup")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "backup_2020-01-01_0000.tar.gz"), "wb") as f:
                f.write(os.urandom(8 << 20))
            expected = "less than half the size of the last good backup"
        code, _out, _err = self.backup("1", "--notify-mqtt", self.url)
        self.assertEqual(code, 3)
        report = self.report()
        self.assertEqual(report["status"], "warning")
        self.assertIn(expected, " ".join(report["warnings"]))

    def test_failed_run(self):
        with open(os.path.join(self.stack, "pre_backup.sh"), "w") as f:
            f.write("#!/bin/bash\nexit 7\n")
        code, _out, err = self.backup("1", "--notify-mqtt", self.url)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        report = self.report()
        self.assertEqual((report["status"], report["archive"], report["size_bytes"]),
                         ("failed", None, None))
        self.assertIn("pre_backup.sh failed with status 7", report["error"])
        self.assertIn("Reported failed to %s" % self.shown, self.log())

    def test_an_early_failure_is_reported_too(self):
        # Before the run has a log: a restore left unfinished.
        os.makedirs(os.path.join(self.stack, ".tmp"), exist_ok=True)
        with open(os.path.join(self.stack, iotstack.JOURNAL_NAME), "w") as f:
            f.write("{}")
        code, _out, err = self.backup("1", "--notify-mqtt", self.url)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)  # no line for a good report
        report = self.report()
        self.assertEqual(report["status"], "failed")
        self.assertIn("interrupted restore is pending", report["error"])

    def test_a_broker_down_silent_or_refusing_costs_a_warning(self):
        started = time.monotonic()
        self.assertEqual(self.backup("1")[0], 0)
        baseline = time.monotonic() - started
        self.forget_run()
        refusing = "mqtt://%s:wrong@127.0.0.1:%d/%s" % (USER, self.broker.port, TOPIC)
        with silent_listener() as silent_port:
            table = [
                ("mqtt://127.0.0.1:%d/%s" % (free_port(), TOPIC), "refused"),
                ("mqtt://127.0.0.1:%d/%s" % (silent_port, TOPIC), "5"),
                (refusing, "bad user name or password"),
            ]
            for url, why in table:
                started = time.monotonic()
                code, _out, err = self.backup("1", "--notify-mqtt", url)
                elapsed = time.monotonic() - started
                self.assertEqual((code, err), (0, ""), url)
                self.assertLess(elapsed, baseline + notify_mqtt.BUDGET + 2, url)
                log = self.log()
                self.assertRegex(log, r"Warning: MQTT report to mqtt://\S+ failed: .*%s" % why)
                self.assertNotIn("wrong", log)
                self.forget_run()
        # Failing early with the broker down: one warning line besides the error.
        os.makedirs(os.path.join(self.stack, ".tmp"), exist_ok=True)
        with open(os.path.join(self.stack, iotstack.JOURNAL_NAME), "w") as f:
            f.write("{}")
        code, _out, err = self.backup("1", "--notify-mqtt", refusing)
        self.assertEqual(code, 1)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 2, err)
        self.assertRegex(lines[0], r"^backup\.py: Warning: MQTT report to mqtt://backup:\*\*\*@")
        self.assertNotIn("wrong", err)


if __name__ == "__main__":
    unittest.main()
