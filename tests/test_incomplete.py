"""An incomplete backup is never mistaken for a complete one (issue 21, Musts 1-3).

A backup run as `pi` cannot read a container's private files (owned by the
container's uid, mode 0600 or 0700).  The archive records what it lacks
(.tmp/iotstack-backup-incomplete.json, and the counts in its gzip header),
is named NAME.incomplete.tar.gz so that it never replaces a complete one,
prunes nothing and is no measure for the size guard; restore.py --list,
the picker, --verify, --dry-run and the question say so; a restore keeps the
live copies of what it lacks and names what is missing on a new Pi.  The
tree holds real files of root and of the containers' uids; the backups run
as `pi` (runuser) and the restores as root, as on a Pi."""
import datetime
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import unittest

from iotstack_backup import archive_writer, incomplete, iotstack, picker, unpack
from tests import terminal
from tests.support import BACKUP_PY, RESTORE_PY, IsolatedCase, read, read_bytes, write

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
# A Python another user may run (pyenv's live under /root, mode 0700).
SYSTEM_PYTHON = "/usr/bin/python3"
MOSQUITTO_UID, GRAFANA_UID = 1883, 472
# pi cannot reach the tools folder of root (tools_dir is 0700); IOTSTACK_NO_DOCKER
# keeps docker out of these runs.
PI_PATH = "/usr/bin:/bin"


class PureTests(unittest.TestCase):
    def test_describe(self):
        table = [
            ({}, ""),
            ({"unreadable": 10}, "incomplete: 10 files could not be read"),
            ({"unreadable": 1, "folder": 2}, "incomplete: 1 file and 2 folders could not be read"),
            ({"vanished": 1, "changed": 3},
             "incomplete: 1 file vanished while read, 3 files changed while read"),
            ({"folder": 1, "changed": 1},
             "incomplete: 1 folder could not be read, 1 file changed while read"),
        ]
        for counts, text in table:
            full = dict({kind: 0 for kind in incomplete.KINDS}, **counts)
            self.assertEqual(incomplete.describe(full), text)

    def test_header_note_round_trip(self):
        import gzip
        import io
        from iotstack_backup.pgzip import ParallelGzipWriter
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=1)
        gz.set_extra(incomplete.header_extra())
        gz.write(b"data" * 1000)
        gz.close()
        data = bytearray(out.getvalue())
        self.assertIsNone(incomplete.parse_note(bytes(data)))  # "unknown" until written
        counts = {"unreadable": 10, "folder": 1, "vanished": 0, "changed": 2}
        note = incomplete.note(counts)
        data[incomplete.NOTE_OFFSET:incomplete.NOTE_OFFSET + len(note)] = note
        self.assertEqual(incomplete.parse_note(bytes(data)), counts)
        self.assertEqual(gzip.decompress(bytes(data)), b"data" * 1000)  # any reader skips it
        plain = gzip.compress(b"x")
        self.assertIsNone(incomplete.parse_note(plain))

    def test_lacked_here(self):
        entries = [("volumes/a/pw", "unreadable"), ("volumes/b", "folder"),
                   ("volumes/c/log", "changed"), ("services/x", "unreadable"),
                   ("volumes/d/gone", "vanished")]
        live = {"/s/volumes/a/pw", "/s/volumes/c/log", "/s/services/x"}
        kept, missing = incomplete.lacked_here("/s", ["volumes"], entries, live.__contains__)
        self.assertEqual(kept, ["volumes/a/pw"])  # changed: the archive holds it
        self.assertEqual(missing, ["volumes/b", "volumes/d/gone"])  # services/ not restored

    def test_record_round_trip_and_damage(self):
        entries = [("volumes/a/pw", "unreadable"), ("volumes/b", "folder")]
        self.assertEqual(incomplete.parse_record(incomplete.record(entries)), entries)
        self.assertEqual(incomplete.parse_record(b"{not json"), [("", "unreadable")])

    def test_retention_counts_only_complete_backups(self):
        names = ["backup_2026-12-01_0200.tar.gz", "backup_2026-12-02_0200.incomplete.tar.gz",
                 "backup_2026-12-03_0200.incomplete.tar.gz",
                 "backup_2026-12-03_0200.incomplete.tar.gz.gpg", "notes.txt"]
        # --keep 1 after two incomplete nights: the complete one is kept, and
        # the incomplete ones newer than it stay too.
        self.assertEqual(iotstack.dated_backups_to_remove(names, keep_last=1), [])
        # A new complete backup supersedes every older incomplete one.
        doomed = iotstack.dated_backups_to_remove(
            names, keep_last=2, just_written="backup_2026-12-04_0200.tar.gz")
        self.assertEqual(sorted(doomed), ["backup_2026-12-02_0200.incomplete.tar.gz",
                                          "backup_2026-12-03_0200.incomplete.tar.gz",
                                          "backup_2026-12-03_0200.incomplete.tar.gz.gpg"])

    def test_menu_lines_carry_the_note(self):
        now = 1_800_000_000
        lines = picker.menu_lines([("backup/a.tar.gz", 10, now, ""),
                                   ("backup/b.incomplete.tar.gz", 10, now,
                                    "incomplete: 10 files could not be read")], now)
        self.assertFalse(lines[0].endswith("read"))
        self.assertTrue(lines[1].endswith("incomplete: 10 files could not be read"))

    def test_a_part_read_again_forgets_what_its_live_read_missed(self):
        stats = archive_writer.ArchiveStats()
        stats.warnings.append(archive_writer.walk_warning(
            "volumes/a", PermissionError(13, "Permission denied")))
        stats.notes.append(archive_writer.vanished("volumes/b"))
        self.assertEqual(stats.unread, [("volumes/a", "unreadable"), ("volumes/b", "vanished")])
        del stats.warnings[0:]  # what TarStream.rewind does
        self.assertEqual(stats.incomplete_counts["unreadable"], 0)


def pi_user():
    try:
        return pwd.getpwnam("pi")
    except KeyError:
        return None


class AsPiCase(IsolatedCase):
    """A stack of pi's with a container's private files in it; backups as
    pi, restores as root."""

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.skipTest("needs root, to own files as the containers and run as pi")
        self.pi = pi_user()
        if self.pi is None:
            self.skipTest("needs a user pi (useradd -m pi)")
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest("no %s for pi" % SYSTEM_PYTHON)
        self.stack = os.path.join(self.make_tmp("i21-"), "IOTstack")
        s = self.stack
        write(os.path.join(s, "docker-compose.yml"), "services: {}\n")
        write(os.path.join(s, "services/nodered/Dockerfile"), "FROM x\n")
        write(os.path.join(s, "volumes/nodered/data/flows.json"), "[flows]\n")
        write(os.path.join(s, "volumes/mosquitto/config/mosquitto.conf"), "listener 1883\n")
        self.pwfile = os.path.join(s, "volumes/mosquitto/pwfile/pwfile")
        write(self.pwfile, "backup:$7$secret\n", 0o600)
        self.grafana = os.path.join(s, "volumes/grafana/data")
        write(os.path.join(self.grafana, "grafana.db"), "SQLite grafana\n", 0o600)
        for folder, _dirs, files in os.walk(s):
            for name in [folder] + [os.path.join(folder, f) for f in files]:
                os.chown(name, self.pi.pw_uid, self.pi.pw_gid)
        os.chown(os.path.dirname(self.pwfile), MOSQUITTO_UID, MOSQUITTO_UID)
        os.chown(self.pwfile, MOSQUITTO_UID, MOSQUITTO_UID)
        os.chmod(self.grafana, 0o700)
        os.chown(self.grafana, GRAFANA_UID, GRAFANA_UID)
        os.chown(os.path.join(self.grafana, "grafana.db"), GRAFANA_UID, GRAFANA_UID)
        tools = terminal.tools_dir(("runuser",))
        self.addCleanup(tools.cleanup)
        self.env = terminal.no_docker_env(tools.name)

    def as_pi(self, script, *argv):
        return subprocess.run([RUNUSER, "-u", "pi", "--", SYSTEM_PYTHON, script] + list(argv),
                              cwd=self.stack, env=dict(self.env, HOME=self.pi.pw_dir, PATH=PI_PATH),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def as_root(self, script, *argv):
        return subprocess.run([sys.executable, script] + list(argv), cwd=self.stack,
                              env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def backups(self, folder):
        return sorted(glob.glob(os.path.join(self.stack, "backups", folder, "*.tar.gz")))

    def pi_backup(self, *argv):
        result = self.as_pi(BACKUP_PY, "3", "--no-stop", *argv)
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        return result

    def rolling(self, incomplete_name=False):
        path = iotstack.rolling_archive_path(os.path.join(self.stack, "backups"),
                                             datetime.datetime.now())
        return iotstack.incomplete_path(path) if incomplete_name else path


class BackupAsPiTests(AsPiCase):
    def test_the_archive_records_what_it_could_not_read(self):
        result = self.pi_backup()
        dated = self.backups("backup")
        self.assertEqual(len(dated), 1)
        self.assertTrue(dated[0].endswith(".incomplete.tar.gz"), dated)
        self.assertTrue(os.path.isfile(self.rolling(incomplete_name=True)))
        self.assertFalse(os.path.exists(self.rolling()))
        summary = unpack.read_archive(dated[0], [])
        self.assertEqual(summary.incomplete, [("volumes/grafana/data", "folder"),
                                              ("volumes/mosquitto/pwfile/pwfile", "unreadable")])
        # GNU tar reads the record as an ordinary file.
        record = subprocess.run(["tar", "-xzOf", dated[0], incomplete.MEMBER],
                                stdout=subprocess.PIPE, check=True).stdout
        self.assertEqual(json.loads(record.decode())["counts"]["unreadable"], 1)
        self.assertEqual(incomplete.read_note(dated[0]),
                         {"unreadable": 1, "folder": 1, "vanished": 0, "changed": 0})
        subprocess.run(["gzip", "-t", dated[0]], check=True)
        log = read(glob.glob(os.path.join(self.stack, "backups/logs/*.log"))[0])
        self.assertIn("Incomplete: 2 (incomplete: 1 file and 1 folder could not be read", log)
        self.assertIn("incomplete: 1 file and 1 folder could not be read", result.stdout)
        self.assertIn("Backup written, incomplete: 1 file and 1 folder could not be read: "
                      "./backups/backup/", result.stdout)
        self.assertNotIn("Backup complete", result.stdout)

    def test_it_never_replaces_a_complete_rolling_archive_nor_prunes(self):
        first = self.as_root(BACKUP_PY, "3", "pi", "--no-stop")
        self.assertEqual(first.returncode, 0, first.stderr)
        complete_rolling = read_bytes(self.rolling())
        complete_dated = self.backups("backup")
        result = self.pi_backup("--keep", "1")
        self.assertEqual(read_bytes(self.rolling()), complete_rolling)
        self.assertTrue(os.path.isfile(self.rolling(incomplete_name=True)))
        self.assertIn("rolling/backup_%d.incomplete.tar.gz" % iotstack.rolling_weekday(
            datetime.datetime.now()), result.stdout)
        dated = self.backups("backup")
        self.assertEqual(len(dated), 2)
        self.assertTrue(set(complete_dated) < set(dated))
        log = read(max(glob.glob(os.path.join(self.stack, "backups/logs/*.log")),
                       key=os.path.getmtime))
        self.assertIn("no old backup removed, here or at the copies: this backup is "
                      "incomplete", log)
        # The size guard compares with the complete one, never the incomplete.
        newest = iotstack.newest_archive(os.path.join(self.stack, "backups"))[0]
        complete = {os.path.relpath(p, os.path.join(self.stack, "backups"))
                    for p in complete_dated + [self.rolling()]}
        self.assertIn(newest, complete)
        # The next complete backup (root, --keep 1) supersedes the incomplete ones.
        again = self.as_root(BACKUP_PY, "3", "pi", "--no-stop", "--keep", "1")
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertFalse(os.path.exists(self.rolling(incomplete_name=True)))
        self.assertEqual([p for p in self.backups("backup")
                          if iotstack.is_incomplete_name(os.path.basename(p))], [])


class RestoreOfAnIncompleteBackupTests(AsPiCase):
    def setUp(self):
        super().setUp()
        self.pi_backup("--no-verify")
        self.archive = self.backups("backup")[0]
        self.name = os.path.relpath(self.archive, os.path.join(self.stack, "backups"))

    def test_list_verify_and_dry_run_say_incomplete(self):
        for run in (self.as_root, self.as_pi):
            listed = run(RESTORE_PY, "--list")
            self.assertEqual(listed.returncode, 0, listed.stderr)
            line = [l for l in listed.stdout.splitlines() if l.startswith(self.name)][0]
            self.assertIn("incomplete: 1 file and 1 folder could not be read", line)
            verified = run(RESTORE_PY, "--verify", self.name)
            self.assertEqual(verified.returncode, 0, verified.stderr)
            self.assertIn("incomplete: 1 file and 1 folder could not be read", verified.stdout)
            self.assertIn("volumes/mosquitto/pwfile/pwfile (unreadable)", verified.stdout)
        dry = self.as_root(RESTORE_PY, self.name, "--dry-run", "--no-stop")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("Would keep as it is (the backup could not read it): "
                      "volumes/mosquitto/pwfile/pwfile", dry.stdout)
        self.assertIn("Would keep as it is (the backup could not read it): volumes/grafana/data",
                      dry.stdout)

    def test_a_restore_keeps_the_live_files_the_archive_lacks(self):
        before = read_bytes(self.pwfile)
        write(os.path.join(self.stack, "volumes/nodered/data/flows.json"), "[changed]\n")
        result = self.as_root(RESTORE_PY, self.name, "noask", "--no-stop")
        self.assertIn(result.returncode, (0, 3), result.stderr)
        self.assertEqual(read_bytes(self.pwfile), before)
        st = os.stat(self.pwfile)
        self.assertEqual((st.st_uid, st.st_mode & 0o777), (MOSQUITTO_UID, 0o600))
        self.assertEqual(read(os.path.join(self.grafana, "grafana.db")), "SQLite grafana\n")
        self.assertEqual(os.stat(self.grafana).st_uid, GRAFANA_UID)
        self.assertEqual(read(os.path.join(self.stack, "volumes/nodered/data/flows.json")),
                         "[flows]\n")
        self.assertIn("Kept as they are: 2 live entries the backup could not read",
                      result.stdout)
        log = read(glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))[0])
        self.assertIn("Kept as it is (the backup could not read it): "
                      "volumes/mosquitto/pwfile/pwfile", log)

    def test_in_place_keeps_them_too(self):
        before = read_bytes(self.pwfile)
        result = self.as_root(RESTORE_PY, self.name, "noask", "--no-stop", "--in-place")
        self.assertIn(result.returncode, (0, 3), result.stderr)
        self.assertEqual(read_bytes(self.pwfile), before)
        self.assertEqual(read(os.path.join(self.grafana, "grafana.db")), "SQLite grafana\n")

    def test_on_a_new_pi_the_restore_names_what_the_archive_lacks(self):
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        dry = self.as_root(RESTORE_PY, self.name, "--dry-run", "--no-stop")
        self.assertIn("Would be missing (not in the backup, not here either): "
                      "volumes/mosquitto/pwfile/pwfile", dry.stdout)
        result = self.as_root(RESTORE_PY, self.name, "noask", "--no-stop")
        self.assertIn(result.returncode, (0, 3), result.stderr)
        self.assertIn("This backup lacks 2 entries that are not here either", result.stdout)
        self.assertIn("volumes/grafana/data, volumes/mosquitto/pwfile/pwfile", result.stdout)
        self.assertFalse(os.path.exists(self.pwfile))
        self.assertEqual(read(os.path.join(self.stack, "volumes/nodered/data/flows.json")),
                         "[flows]\n")

    def test_the_question_and_the_picker_say_so_before_y(self):
        env = dict(self.env, TERM="dumb")
        code, shown = terminal.run_pty([sys.executable, RESTORE_PY, self.name, "--no-stop"],
                                       self.stack, [("Continue [y/N]? ", "n\n")], env)
        self.assertEqual(code, 2, shown)
        question = shown[:shown.index("Continue [y/N]?")]
        self.assertIn("This backup is incomplete: 1 file and 1 folder could not be read", question)
        self.assertIn("the live copies of those are kept", question)
        code, shown = terminal.run_pty([sys.executable, RESTORE_PY, "--no-stop"], self.stack,
                                       [("Restore which backup", "\n")], env)
        menu = [l for l in shown.splitlines() if self.name in l]
        self.assertTrue(menu and menu[0].endswith("incomplete: 1 file and 1 folder could not "
                                                  "be read"), shown)


class ToldEarlyTests(AsPiCase):
    """Must 4: whoever runs it is told early."""

    def add_private_files(self, count=8):
        """More files of the containers' uids, in folders pi can list."""
        for n in range(count):
            path = os.path.join(self.stack, "volumes/homeassistant/.storage/core.%d" % n)
            write(path, "secret %d\n" % n, 0o600)
            os.chown(path, 0 if n % 2 else MOSQUITTO_UID, 0)

    def unreadable_in(self, text):
        return sorted(line.split()[3].rstrip(":") for line in text.splitlines()
                      if line.startswith("Warning: cannot read "))

    def test_dry_run_finds_every_file_the_real_run_skips(self):
        self.add_private_files()
        dry = self.as_pi(BACKUP_PY, "--dry-run", "--no-stop")
        self.assertEqual(dry.returncode, 3, dry.stderr)
        real = self.pi_backup()
        self.assertEqual(len(self.unreadable_in(real.stdout)), 10, real.stdout)
        self.assertEqual(self.unreadable_in(dry.stdout), self.unreadable_in(real.stdout))
        self.assertIn("this backup would be incomplete: 9 files and 1 folder could not be read",
                      dry.stdout)
        # The real run said so first, before anything else.
        self.assertTrue(real.stdout.startswith("Warning: pi cannot read some of the "
                                               "containers' files"), real.stdout)
        self.assertIn("sudo python3 backup.py", real.stdout.splitlines()[0])

    def test_install_cron_as_pi_warns_with_the_sudo_line(self):
        if not shutil.which("crontab"):
            self.skipTest("needs crontab (Debian's cron)")
        before = subprocess.run(["crontab", "-u", "pi", "-l"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, universal_newlines=True)
        if before.returncode == 0:
            self.addCleanup(subprocess.run, ["crontab", "-u", "pi", "-"], input=before.stdout,
                            universal_newlines=True)
        else:
            self.addCleanup(subprocess.run, ["crontab", "-u", "pi", "-r"],
                            stderr=subprocess.DEVNULL)
        result = self.as_pi(BACKUP_PY, "--install-cron")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("pi cannot read some of the containers' files", result.stdout)
        self.assertIn("sudo python3 %s --install-cron" % BACKUP_PY, result.stdout)

    def test_a_restore_as_pi_refuses_before_the_pick_the_question_or_unpacking(self):
        first = self.as_root(BACKUP_PY, "1", "pi", "--no-stop")
        self.assertEqual(first.returncode, 0, first.stderr)
        name = os.path.relpath(self.backups("backup")[0], os.path.join(self.stack, "backups"))
        env = dict(self.env, HOME=self.pi.pw_dir, TERM="dumb", PATH=PI_PATH)
        for argv in ([], [name]):
            code, shown = terminal.run_pty(
                [RUNUSER, "-u", "pi", "--", SYSTEM_PYTHON, RESTORE_PY] + argv, self.stack,
                [("Continue [y/N]? ", "y\n"), ("Restore which backup", "1\n")], env)
            self.assertEqual(code, 1, shown)
            self.assertIn("cannot replace volumes without root", shown)
            self.assertNotIn("Continue [y/N]?", shown)
            self.assertNotIn("Restore which backup", shown)
        tmp = os.listdir(os.path.join(self.stack, ".tmp"))
        self.assertEqual([n for n in tmp if n.startswith("restore-")], [])
        self.assertEqual(glob.glob(os.path.join(self.stack, "backups/logs/restore_*")), [])
        # --only a folder of pi's own is allowed.
        result = self.as_pi(RESTORE_PY, name, "noask", "--only", "volumes/nodered", "--no-stop")
        self.assertIn(result.returncode, (0, 3), result.stderr)


class OnTheEngineTests(IsolatedCase):
    """The same on a real compose project: mosquitto runs with its
    password file owned by its uid; pi's backup is incomplete, root's
    restore stops mosquitto, keeps that file and starts it again."""

    def test_a_restore_on_the_engine_keeps_the_containers_private_file(self):
        from tests import real_stack
        if os.geteuid() != 0 or pi_user() is None or not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest("needs root, a user pi and %s" % SYSTEM_PYTHON)
        pi = pi_user()
        project = real_stack.iotstack_project(self, services={"mosquitto": {}},
                                              running=("mosquitto",), tree=False,
                                              stopped_too=False)
        stack = project.stack_dir
        os.chmod(os.path.dirname(stack), 0o755)
        write(os.path.join(stack, "volumes/mosquitto/config/mosquitto.conf"), "listener 1883\n")
        pwfile = os.path.join(stack, "volumes/mosquitto/pwfile")
        write(pwfile, "backup:$7$secret\n", 0o600)
        for folder, dirs, files in os.walk(stack):
            for name in [folder] + [os.path.join(folder, f) for f in files]:
                os.lchown(name, pi.pw_uid, pi.pw_gid)
        os.chown(pwfile, MOSQUITTO_UID, MOSQUITTO_UID)
        env = real_stack.script_env(HOME=pi.pw_dir)
        backup = subprocess.run([RUNUSER, "-u", "pi", "--", SYSTEM_PYTHON, BACKUP_PY, "1"],
                                cwd=stack, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=180)
        self.assertEqual(backup.returncode, 3, backup.stdout + backup.stderr)
        archive = glob.glob(os.path.join(stack, "backups/backup/*.incomplete.tar.gz"))
        self.assertEqual(len(archive), 1, backup.stdout)
        write(os.path.join(stack, "volumes/mosquitto/config/mosquitto.conf"), "changed\n")
        restore = subprocess.run([sys.executable, RESTORE_PY, archive[0], "noask"], cwd=stack,
                                 env=real_stack.script_env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True, timeout=180)
        self.assertEqual(restore.returncode, 0, restore.stdout + restore.stderr)
        self.assertIn("Services stopped and started again: mosquitto", restore.stdout)
        self.assertEqual(read(pwfile), "backup:$7$secret\n")
        self.assertEqual(os.stat(pwfile).st_uid, MOSQUITTO_UID)
        self.assertEqual(read(os.path.join(stack, "volumes/mosquitto/config/mosquitto.conf")),
                         "listener 1883\n")
        project.wait_for({"mosquitto": "running"})


if __name__ == "__main__":
    unittest.main()
