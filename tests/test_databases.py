"""Real databases backed up under load and restored onto a fresh folder (issue 24).

InfluxDB 1.x, MariaDB, PostgreSQL, an SQLite application and Mosquitto with
persistence (Debian's packages) run as services of one IOTstack compose
project on the test engine (tests/databases.py).  Writers insert numbered
rows, 20 a second each, and note each acknowledgement with its time; while
they write, backup.py runs (default mode, then --stop all); restore.py puts
the archive into a fresh IOTstack folder, where each database must start,
pass its own integrity check (mariadb-check --extended, pg_amcheck
--heapallindexed, PRAGMA integrity_check, full scans of InfluxDB and of
Mosquitto's queue), show no sign of crash recovery, and hold every row
acknowledged before its container's `die` event.

Heavy: runs only where IOTSTACK_HEAVY=1 (CI's 3.11 pass), as root, with the
packages installed; elsewhere it skips with the reason.  Row counts are
small here; `bench/bench.py --databases` runs the large ones.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from iotstack_backup import iotstack
from tests import databases as D
from tests import engine as E
from tests.support import IsolatedCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 20          # rows a second per database, as the trial
PRELOAD = 2000     # rows already there before the writers start
WRITE_FIRST = 2    # seconds of writing before the backup starts


class CheckTableTests(unittest.TestCase):
    """The pure parts of the checks, which run everywhere."""

    def test_missing_rows_counts_only_what_was_acknowledged_before_the_die(self):
        acks = {"mariadb": [D.Ack(1, 10.0), D.Ack(2, 11.0), D.Ack(3, 12.5)],
                "sqlite": [D.Ack(7, 9.0)], "postgres": []}
        deaths = {"mariadb": 12.0, "sqlite": 20.0, "postgres": 1.0}
        cases = [
            ({"mariadb": {1, 2}, "sqlite": {7}, "postgres": set()}, {}),
            # 3 was acknowledged after the die: the restarted server took it.
            ({"mariadb": {1}, "sqlite": {7}, "postgres": set()}, {"mariadb": [2]}),
            ({"mariadb": set(), "sqlite": set(), "postgres": set()},
             {"mariadb": [1, 2], "sqlite": [7]}),
        ]
        for stored, missing in cases:
            with self.subTest(stored=stored):
                self.assertEqual(D.missing_rows(acks, deaths, stored), missing)

    def test_crash_lines(self):
        cases = [
            ("postgres", "LOG:  database system was shut down at 2026-12-04", []),
            ("postgres", "LOG:  database system was not properly shut down; automatic recovery "
                         "in progress", ["not properly"]),
            ("mariadb", "[Note] InnoDB: Starting crash recovery from checkpoint LSN=1",
             ["crash recovery"]),
            ("mariadb", "[Note] /usr/sbin/mariadbd: ready for connections.", []),
            ("influxdb", 'lvl=info msg="Opened file"', []),
            ("mosquitto", "Error: Unable to restore persistent database.", ["Error"]),
        ]
        for service, line, expected in cases:
            with self.subTest(line=line):
                found = D.crash_lines(service, "start\n" + line + "\nend")
                self.assertEqual(len(found), len(expected))


class DatabaseBackupTests(IsolatedCase):
    """One stack for the class (building it costs ~20 s); each test numbers
    its rows after the previous test's."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        reason = D.skip_reason()
        if reason:
            raise unittest.SkipTest(reason)
        cls.engine = E.engine()
        os.environ.pop("IOTSTACK_NO_DOCKER", None)
        D.ensure_open_image(cls.engine)
        cls.tmp = tempfile.mkdtemp(prefix="db24-")
        os.chmod(cls.tmp, 0o755)
        cls.stack = os.path.join(cls.tmp, "IOTstack-" + os.path.basename(cls.tmp)[5:].lower())
        try:
            D.build_stack(cls.stack, RATE)
            D.preload_sqlite(cls.stack, PRELOAD)
            cls.project = E.ComposeProject(cls.stack)
            cls.project.up()
            D.wait_ready(cls.stack)
            D.create_schema(cls.stack, preload=PRELOAD)
        except BaseException:
            cls.tearDownClass()
            raise
        cls.next_row = 1

    @classmethod
    def tearDownClass(cls):
        if hasattr(cls, "stack"):
            try:
                E.ComposeProject(cls.stack).remove()
            finally:
                shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def env(self):
        env = dict(os.environ, DOCKER_HOST=self.engine.docker_host, PYTHONDONTWRITEBYTECODE="1")
        env.pop("IOTSTACK_NO_DOCKER", None)
        return env

    def run_script(self, *argv):
        return subprocess.run([sys.executable] + list(argv), env=self.env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=600)

    def backup_under_load(self, *options):
        """Run backup.py while every database is written to; returns
        (archive, acknowledgements, each service's die time: with --no-stop,
        the backup's end)."""
        writers = D.start_writers(self.stack, RATE, first=type(self).next_row)
        try:
            time.sleep(WRITE_FIRST)
            watcher = E.EventWatcher(self.project).start()
            try:
                done = self.run_script(os.path.join(REPO, "backup.py"), "1", "root",
                                       "--dir", self.stack, *options)
                ended = time.time()
                time.sleep(1)  # rows written after the restart are not in the archive
            finally:
                watcher.stop()
        finally:
            for writer in writers:
                writer.stop()
        type(self).next_row += 100000
        if "--no-stop" in options:
            # Files changing as they are read are warnings (exit 3).
            self.assertIn(done.returncode, (0, 3), done.stdout + done.stderr)
            self.assertEqual(watcher.events(), [])
            # A file that changed while read makes the backup incomplete
            # (issue 21): "Backup written, incomplete: ...: ./NAME".
            archive = re.search(r"^Backup (?:complete|written, incomplete: .*?): \./(\S+)",
                                done.stdout, re.M).group(1)
            return (os.path.join(self.stack, archive), D.acknowledged(writers, self.stack),
                    {s: ended for s in D.SERVICES})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        outages = {s: watcher.outages(s) for s in D.SERVICES}
        for service, spans in outages.items():
            self.assertEqual(len(spans), 1, "%s: %s" % (service, watcher.events(service)))
            self.assertIsNotNone(spans[0][1], "%s did not start again" % service)
        self.assertEqual(set(self.project.states().values()), {"running"})
        deaths = {s: spans[0][0] / 1e9 for s, spans in outages.items()}
        acks = D.acknowledged(writers, self.stack)
        for service in D.SERVICES:
            # The test means something only if each database was written to
            # right up to its stop.
            before = [a for a in acks[service] if a.time < deaths[service]]
            self.assertGreater(len(before), RATE, "%s: too few rows before its stop" % service)
        archive = re.search(r"Backup complete: \./(\S+)", done.stdout).group(1)
        return os.path.join(self.stack, archive), acks, deaths

    def restore_fresh(self, archive, name):
        fresh = os.path.join(self.tmp, "IOTstack-%s-%s" % (name, os.path.basename(self.tmp)[5:].lower()))
        os.mkdir(fresh)
        done = self.run_script(os.path.join(REPO, "restore.py"), archive, "noask", "--dir", fresh)
        self.assertEqual((done.returncode, done.stderr), (0, ""), done.stdout)
        self.addCleanup(lambda: E.ComposeProject(fresh).remove())
        return fresh

    def assert_reused_the_live_read(self, archive):
        """The databases read again after their stop copied compressed
        blocks of their live read (issue 24 Must 4): at the least the files
        a busy database does not touch (PostgreSQL's catalogs, MariaDB's
        system tables) come out the same."""
        stem = os.path.basename(archive)[:-len(".tar.gz")]
        with open(iotstack.log_path(os.path.dirname(os.path.dirname(archive)), stem)) as f:
            log = f.read()
        reread = re.findall(r"^Changed since read, read again stopped: .*$", log, re.M)
        copied = re.findall(r"^Read again: ([\d.]+ [KMG]?B) of ([\d.]+ [KMG]?B) copied from "
                            r"the live read's compressed blocks", log, re.M)
        self.assertTrue(reread, log)
        self.assertTrue(copied, log)
        self.assertTrue(any(done != "0 B" for done, _total in copied), copied)
        print("\n%s: %s" % (self.id(), "; ".join("%s of %s copied" % pair for pair in copied)),
              file=sys.stderr)

    def check_mode(self, name, *options):
        archive, acks, deaths = self.backup_under_load(*options)
        self.assert_reused_the_live_read(archive)
        fresh = self.restore_fresh(archive, name)
        verdicts = D.check_restored(fresh, acks, deaths)
        self.assertEqual(sorted(verdicts), sorted(D.SERVICES))

    def test_default_mode_under_load(self):
        self.check_mode("each")

    def test_stop_all_under_load(self):
        self.check_mode("all", "--stop", "all")

    def test_the_checks_catch_a_backup_taken_live(self):
        # The control: read under load with nothing stopped, PostgreSQL's
        # files say it was running (crash recovery at the next start), so
        # the same checks must fail.
        archive, acks, deaths = self.backup_under_load("--no-stop")
        fresh = self.restore_fresh(archive, "live")
        with self.assertRaisesRegex(D.DatabaseError, "postgres") as caught:
            D.check_restored(fresh, acks, deaths)
        print("\n%s: the checks found, as they must:\n%s" % (self.id(), caught.exception),
              file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
