"""End-to-end tests of restore.py: real trees, real archives, real containers.

Each test builds a small IOTstack tree (tests/restore_case.py), backs it up
with backup.py, changes the tree, runs restore.main() in-process and compares
snapshots.  The promise under test: a restore either puts the backup in
place exactly, or leaves the IOTstack directory exactly as it was.

Here: the command itself: the round trip, options and errors, archives of
the old backup.sh and GNU tar, the lock, owners, and too little space.  The
stopping and starting of services is in test_restore_stack.py, kills and
signals in test_restore_kills.py, the unpacking in test_unpack.py.
"""
import fcntl
import glob
import io
import os
import pwd
import re
import shutil
import subprocess
import sys
import unittest
import warnings
from unittest import mock

from iotstack_backup import backup, iotstack, journal, progress, restore, tarformat
from tests.restore_case import (
    MTIME,
    SCALE,
    TMP_OWN,
    RestoreCase,
    change_tree,
    items,
    member,
    others,
    tar_gz,
    whole,
)
from tests.stacktree import IS_ROOT, P, build_stack, diff_snapshots, snapshot
from tests.support import call


def some_user():
    """A named user other than root, 1000 when there is one."""
    try:
        return pwd.getpwuid(1000)
    except KeyError:
        return next(e for e in pwd.getpwall() if e.pw_uid != 0)


# ---------------------------------------------------------------------------
# Round trip

class RoundTripTests(RestoreCase):
    def test_round_trip_is_exact(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        # An item the archive does not hold: left alone.
        with open(os.path.join(self.stack, "post_backup.sh"), "w") as f:
            f.write("echo not in the archive\n")
        expected["post_backup.sh"] = snapshot(self.stack)["post_backup.sh"]
        kept = others(self.stack)
        self.assertNotEqual(diff_snapshots(expected, items(self.stack)), [])

        code, out, err = self.restore(archive, "noask")

        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertFalse(os.path.lexists(os.path.join(self.stack, "volumes/stray")))
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        with open(os.path.join(self.stack, "menu.sh")) as f:
            self.assertTrue(f.read().endswith("# local change\n"))
        self.assertTrue(os.path.isfile(os.path.join(self.stack, "post_backup.sh")))
        self.assert_no_leftovers()
        self.assertEqual(set(os.listdir(os.path.join(self.stack, ".tmp"))), TMP_OWN)
        self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
        self.assertIn("Restored %s" % os.path.basename(archive), out)
        self.assertIn("docker compose up -d", out)
        log = self.restore_log()
        self.assertIn("Verified: OK", log)
        self.assertIn("Finished At:", log)

    def test_restore_of_an_unchanged_tree_changes_nothing(self):
        archive = self.make_backup()
        before = items(self.stack)
        code, out, err = self.restore(archive, "--yes")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(diff_snapshots(before, items(self.stack)), [])
        self.assertNotIn("docker compose up -d", out)

    def test_default_file_name_is_backup_tar_gz_under_backups(self):
        archive = self.make_backup()
        shutil.copy(archive, os.path.join(self.stack, "backups/backup.tar.gz"))
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore("--yes")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])


# ---------------------------------------------------------------------------
# Options and errors

class OptionTests(RestoreCase):
    def test_refuses_without_a_terminal(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        with mock.patch.object(sys, "stdin", io.StringIO("y\n")):
            code, out, err = self.restore(archive)
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("noask", err)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        self.assert_services_untouched()

    def test_asks_on_a_terminal(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True

        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        before = snapshot(self.stack)
        with mock.patch.object(sys, "stdin", Terminal("n\n")):
            code, out, err = self.restore(archive)
        self.assertEqual(code, 2)
        self.assertIn("Continue [y/N]?", out)
        self.assertIn("Nothing was changed", out)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        with mock.patch.object(sys, "stdin", Terminal("y\n")):
            code, out, err = self.restore(archive)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_missing_file(self):
        self.make_backup()
        before = snapshot(self.stack)
        for name in ("backup/nothere.tar.gz", os.path.join(self.tmp, "nothere.tar.gz")):
            with self.subTest(name=name):
                code, out, err = self.restore(name, "noask")
                self.assertEqual((code, out), (2, ""))
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("nothere.tar.gz not found", err)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])

    def test_names_under_backups_and_absolute_paths(self):
        archive = self.make_backup()
        expected = items(self.stack)
        elsewhere = os.path.join(self.tmp, "copy.tar.gz")
        shutil.copy(archive, elsewhere)
        rolling = os.path.relpath(glob.glob(os.path.join(self.stack, "backups/rolling/*"))[0],
                                  os.path.join(self.stack, "backups"))
        for name in ("backup/" + os.path.basename(archive), rolling, archive, elsewhere):
            with self.subTest(name=name):
                change_tree(self.stack)
                code, out, err = self.restore(name, "noask")
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_relative_name_from_the_current_directory(self):
        archive = self.make_backup()
        expected = items(self.stack)
        shutil.copy(archive, os.path.join(self.tmp, "here.tar.gz"))
        change_tree(self.stack)
        cwd = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, cwd)
        code, out, err = self.restore("here.tar.gz", "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_only_restores_just_that_subtree(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        changed = items(self.stack)

        code, out, err = self.restore(archive, "noask", "--only", "volumes/nodered/")

        self.assertEqual((code, err), (0, ""), out)
        inside = lambda rel: rel == "volumes/nodered" or rel.startswith("volumes/nodered/")
        now = items(self.stack)
        self.assertEqual(diff_snapshots({k: v for k, v in expected.items() if inside(k)},
                                        {k: v for k, v in now.items() if inside(k)}), [])
        # Everything else stays as changed, volumes/ itself too: the rename
        # of a child must not give it a new mtime.
        self.assertEqual(diff_snapshots(
            {k: v for k, v in changed.items() if not inside(k)},
            {k: v for k, v in now.items() if not inside(k)}), [])
        self.assertTrue(os.path.isdir(os.path.join(self.stack, "volumes/stray")))
        self.assertFalse(os.path.lexists(os.path.join(self.stack, "volumes/grafana")))
        self.assertFalse(os.path.lexists(os.path.join(self.stack, ".env")))
        self.assert_no_leftovers()

    def test_only_repeated(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask", "--only", "volumes/grafana",
                                      "--only", ".env")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        for rel in expected:
            if rel == ".env" or rel.startswith("volumes/grafana"):
                self.assertEqual(expected[rel], now.get(rel), rel)
        self.assertTrue(os.path.isdir(os.path.join(self.stack, "volumes/stray")))

    def test_only_errors(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = whole(self.stack)
        code, out, err = self.restore(archive, "noask", "--only", "volumes/nothere")
        self.assertEqual(code, 2, out + err)  # a typo is a bad argument (issue 21)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("--only volumes/nothere: the archive holds nothing under it", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        for path in ("menu.sh", "backups", ".tmp/cache", "../outside", "/etc"):
            with self.subTest(only=path):
                code, out, err = self.restore(archive, "noask", "--only", path)
                self.assertEqual(code, 2, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("--only", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])

    def test_only_under_a_symlink_on_disk_goes_onto_that_disk(self):
        # Issue 13: a symlink to another disk keeps its place and the data
        # goes back through it (it used to be refused).
        archive = self.make_backup()
        outside = os.path.join(self.tmp, "outside")
        os.mkdir(outside)
        nodered = os.path.join(self.stack, "volumes/nodered")
        shutil.move(nodered, os.path.join(outside, "nodered"))
        os.symlink(os.path.join(outside, "nodered"), nodered)
        before, beyond = whole(self.stack), snapshot(outside)
        flows = os.path.join(outside, "nodered", "data", "flows.json")
        with open(flows, "ab") as f:
            f.write(b"changed since the backup")
        code, out, err = self.restore(archive, "noask", "--only", "volumes/nodered/data")
        self.assertEqual(code, 0, out + err)
        self.assertTrue(os.path.islink(nodered))
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assertEqual(diff_snapshots(beyond, snapshot(outside)), [])
        self.assert_no_leftovers()

    def test_list(self):
        old = self.make_backup("1")
        newest = self.make_backup("3")
        rolling = glob.glob(os.path.join(self.stack, "backups/rolling/*.tar.gz"))[0]
        os.utime(old, (MTIME, MTIME))
        os.unlink(rolling)  # a rolling archive of its own, newer than both
        shutil.copy(old, rolling)
        os.utime(newest, (MTIME + 3600, MTIME + 3600))
        os.utime(rolling, (MTIME + 7200, MTIME + 7200))
        before = snapshot(self.stack)
        code, out, err = self.restore("--list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual([line.split()[0] for line in lines],
                         ["rolling/" + os.path.basename(rolling),
                          "backup/" + os.path.basename(newest),
                          "backup/" + os.path.basename(old)])
        for line, path in zip(lines, (rolling, newest, old)):
            self.assertIn(progress.human_size(os.path.getsize(path)), line)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])

    def test_verify(self):
        archive = self.make_backup()
        with open(archive, "rb") as f:
            data = f.read()
        truncated = os.path.join(self.tmp, "truncated.tar.gz")
        with open(truncated, "wb") as f:
            f.write(data[:len(data) // 2])
        before = snapshot(self.stack)
        code, out, err = call(restore.main, ["--verify", archive])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("OK", out)
        code, out, err = self.restore("--verify", "backup/" + os.path.basename(archive))
        self.assertEqual((code, err), (0, ""))
        code, out, err = call(restore.main, ["--verify", truncated])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("truncated", err)
        code, out, err = call(restore.main, ["--verify", os.path.join(self.tmp, "nothere")])
        self.assertEqual(code, 2)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])  # not even a log
        self.assert_services_untouched()

    def test_dry_run(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        code, out, err = self.restore(archive, "--dry-run")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Would replace: volumes", out)
        self.assertIn("Would create: .env", out)
        self.assertIn("nothing was changed", out)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
        self.assert_services_untouched()
        code, out, err = self.restore(os.path.join(self.tmp, "nothere.tar.gz"), "--dry-run")
        self.assertEqual(code, 2)

    def test_in_place_says_when_the_compose_file_changed(self):
        archive = self.make_backup()
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask", "--in-place")
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("docker compose up -d", out)

    def test_in_place_refuses_a_damaged_archive_before_deleting(self):
        archive = self.make_backup()
        change_tree(self.stack)
        with open(archive, "rb") as f:
            data = f.read()
        for name, damaged in (("cut", data[:-100]), ("evil", tar_gz(
                member(b"volumes/", tarformat.TYPE_DIR, mode=0o755),
                member(b"volumes/../evil", data=b"x")))):
            with self.subTest(name):
                path = os.path.join(self.tmp, name + ".tar.gz")
                with open(path, "wb") as f:
                    f.write(damaged)
                before = whole(self.stack)
                code, out, err = self.restore(path, "noask", "--in-place")
                self.assertEqual(code, 1, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
                self.assert_services_untouched()
        self.assertFalse(os.path.lexists(os.path.join(self.tmp, "evil")))

    def test_keep_old(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        old = items(self.stack)
        code, out, err = self.restore(archive, "noask", "--keep-old")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        where = re.search(r"kept in (\.tmp/%s\S+)" % re.escape(journal.ASIDE_PREFIX), out)
        self.assertTrue(where, out)
        kept = os.path.join(self.stack, where.group(1))
        # The old items, exactly, under the same relative paths.
        aside = {rel: e for rel, e in snapshot(kept).items() if iotstack.item_of(rel)}
        self.assertEqual(diff_snapshots(old, aside), [])
        self.assertIn("Replaced items kept in", self.restore_log())
        # Another run (or recovery) does not take the kept folder away.
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isdir(kept))

    def test_hook_pipe_is_closed(self):
        # Bug in backuplib (not restore.py): run_hook reads proc.stdout to the
        # end but never closes it, so each hook leaks a pipe until the garbage
        # collector finds it ("ResourceWarning: unclosed file").
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hello\n")
        archive = self.make_backup()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, ResourceWarning)], [])

    def test_log_is_appended_to(self):
        archive = self.make_backup()
        logs = os.path.join(self.stack, "backups/logs")
        # Two runs in the same minute get two logs; a log that exists is never
        # rewritten.
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        (first,) = glob.glob(os.path.join(logs, "restore_*.log"))
        with open(first, "a") as f:
            f.write("a line of the user's\n")
        with open(first) as f:
            text = f.read()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)
        with open(first) as f:
            self.assertTrue(f.read().startswith(text))
        self.assertEqual(len(glob.glob(os.path.join(logs, "restore_*.log"))), 2)

    def test_into_an_empty_directory(self):
        # --dir is taken as given: a fresh, empty IOTstack directory is fine.
        archive = self.make_backup()
        expected = items(self.stack)
        empty = os.path.join(self.tmp, "empty")
        os.mkdir(empty)
        code, out, err = call(restore.main, [archive, "noask", "--dir", empty])
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(empty)), [])
        self.assert_no_leftovers(empty)

    def test_not_an_iotstack_directory(self):
        archive = self.make_backup()
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        cwd = os.getcwd()
        os.chdir(elsewhere)
        self.addCleanup(os.chdir, cwd)
        code, out, err = call(restore.main, [archive, "noask"])
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("not an IOTstack directory", err)
        self.assertEqual(os.listdir(elsewhere), [])


# ---------------------------------------------------------------------------
# Interoperability with the old backup.sh and GNU tar

class InteropTests(RestoreCase):
    def test_archive_of_the_old_backup_sh(self):
        expected = {rel: e for rel, e in items(self.stack).items()
                    if iotstack.item_of(rel) in ("services", "volumes", "docker-compose.yml")}
        archive = os.path.join(self.stack, "backups/backup/backup_old.tar.gz")
        subprocess.run(["tar", "-czf", archive, "./services/", "./volumes/",
                        "./docker-compose.yml", "./menu.sh"], cwd=self.stack, check=True)
        change_tree(self.stack)
        untouched = {rel: e for rel, e in items(self.stack).items()
                     if iotstack.item_of(rel) not in ("services", "volumes", "docker-compose.yml")}
        code, out, err = self.restore("backup/backup_old.tar.gz", "noask")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        self.assertEqual(diff_snapshots(expected, {
            rel: e for rel, e in now.items()
            if iotstack.item_of(rel) in ("services", "volumes", "docker-compose.yml")}), [])
        # Items the archive does not hold are left alone, and so is menu.sh.
        self.assertEqual(diff_snapshots(untouched, {
            rel: e for rel, e in now.items()
            if iotstack.item_of(rel) not in ("services", "volumes", "docker-compose.yml")}), [])
        with open(os.path.join(self.stack, "menu.sh")) as f:
            self.assertTrue(f.read().endswith("# local change\n"))
        self.assertIn("Skipped 1 member(s) that are not part of an IOTstack backup, e.g. "
                      "menu.sh", self.restore_log())

    def test_gnu_tar_extracts_our_archives(self):
        archive = self.make_backup()
        expected = items(self.stack)
        dest = os.path.join(self.tmp, "extracted")
        os.mkdir(dest)
        argv = ["tar", "-xzf", archive, "-p", "-C", dest]
        if IS_ROOT:
            argv.insert(1, "--numeric-owner")
        subprocess.run(argv, check=True)
        self.assertEqual(diff_snapshots(expected, items(dest)), [])


# ---------------------------------------------------------------------------
# Lock

class LockTests(RestoreCase):
    def test_busy_while_another_run_holds_the_lock(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = snapshot(self.stack)
        fd = os.open(os.path.join(self.stack, iotstack.LOCK_NAME), os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for argv in ([archive, "noask"], ["--recover"]):
            with self.subTest(argv=argv):
                code, out, err = self.restore(*argv)
                self.assertEqual(code, 4, out + err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("another backup or restore is running", err)
                self.assertEqual(diff_snapshots(before, snapshot(self.stack)), [])
                self.assert_services_untouched()
        fcntl.flock(fd, fcntl.LOCK_UN)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 0, err)


# ---------------------------------------------------------------------------
# Ownership

@unittest.skipUnless(IS_ROOT, "owners can only be restored as root")
class OwnershipTests(RestoreCase):
    def test_numeric_owners_and_modes_as_archived(self):
        archive = self.make_backup()
        expected = items(self.stack)
        self.assertEqual(expected[P["orphan_owner"]][2:4], (54321, 54321))
        for rel in (P["orphan_owner"], P["grafana_dir"], P["symlink_abs"], P["setuid"],
                    P["setgid"], P["mixed_owner"]):
            os.lchown(os.path.join(self.stack, rel), 0, 0)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        now = items(self.stack)
        self.assertEqual(diff_snapshots(expected, now), [])
        self.assertEqual(now[P["orphan_owner"]][2:4], (54321, 54321))
        self.assertEqual((now[P["setuid"]].mode, now[P["setuid"]].uid), (0o4755, 1000))
        self.assertEqual((now[P["setgid"]].mode, now[P["setgid"]].gid), (0o2755, 1000))
        self.assertEqual(now[P["mixed_owner"]][2:4], (1000, 472))

    def test_set_group_id_folders_do_not_change_restored_groups(self):
        # A new file takes the group of a set-group-ID folder it is made in;
        # root-owned members must still come back with group 0, whether the
        # staging folder inherits the bit (.tmp has it) or --in-place
        # unpacks into a folder that has it.
        rel = "services/mosquitto/service.yml"
        self.assertEqual(items(self.stack)[rel][2:4], (0, 0))
        archive = self.make_backup()
        for folder in (".tmp", "services", "services/mosquitto"):
            path = os.path.join(self.stack, folder)
            os.chown(path, 0, 472)
            os.chmod(path, 0o2775)
        for options in (["noask"], ["noask", "--in-place", "--only", "services/mosquitto"]):
            with self.subTest(options=options):
                os.chown(os.path.join(self.stack, rel), 1000, 1000)
                code, out, err = self.restore(archive, *options)
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(items(self.stack)[rel][2:4], (0, 0))

    def test_log_owned_like_backup_logs(self):
        user = some_user()
        os.chown(self.stack, user.pw_uid, user.pw_gid)
        # No USER: the default owner, as from cron.
        code, out, err = call(backup.main, ["3", "--no-stop", "--dir", self.stack])
        self.assertEqual(code, 0, err)
        archive = os.path.join(self.stack, re.search(r"Backup complete: \./(\S+)", out).group(1))
        (backup_log,) = glob.glob(os.path.join(self.stack, "backups/logs/backup_*.log"))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        (restore_log,) = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        st_backup, st_restore = os.stat(backup_log), os.stat(restore_log)
        self.assertEqual((st_restore.st_uid, st_restore.st_gid), (user.pw_uid, user.pw_gid))
        self.assertEqual((st_restore.st_uid, st_restore.st_gid),
                         (st_backup.st_uid, st_backup.st_gid))
        logs = os.stat(os.path.join(self.stack, "backups/logs"))
        self.assertEqual((logs.st_uid, logs.st_gid), (user.pw_uid, user.pw_gid))

    def test_log_owned_by_sudo_user(self):
        user = some_user()
        archive = self.make_backup()  # the stack belongs to root
        os.environ["SUDO_USER"] = user.pw_name
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        (restore_log,) = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        st = os.stat(restore_log)
        self.assertEqual((st.st_uid, st.st_gid), (user.pw_uid, user.pw_gid))


# ---------------------------------------------------------------------------
# Not enough space to stage

@unittest.skipUnless(IS_ROOT, "mounting a tmpfs needs root")
class NoSpaceTests(RestoreCase):
    def setUp(self):
        super().setUp()
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", self.mnt],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except (OSError, subprocess.CalledProcessError) as e:
            self.skipTest("cannot mount a tmpfs: %s" % (getattr(e, "stderr", b"") or e))
        self.addCleanup(subprocess.run, ["umount", "-l", self.mnt], check=False)

    def stack_and_archive(self, scale):
        """A backup made elsewhere, and the same tree built in the tmpfs."""
        template = os.path.join(self.tmp, "template")
        build_stack(template, scale=scale)
        code, out, err = call(backup.main, ["1", "root", "--no-stop", "--dir", template])
        self.assertEqual(code, 0, err)
        archive = os.path.join(self.tmp, "backup.tar.gz")
        shutil.copy(os.path.join(template, re.search(r"Backup complete: \./(\S+)", out)
                                 .group(1)), archive)
        stack = os.path.join(self.mnt, "IOTstack")
        build_stack(stack, scale=scale)
        os.makedirs(os.path.join(stack, "backups/logs"))
        with open(os.path.join(stack, "docker-compose.yml"), "a") as f:
            f.write("# changed\n")
        return stack, archive, items(template)

    def assert_no_space_then_in_place(self, stack, archive, expected):
        before = whole(stack)
        code, out, err = call(restore.main, [archive, "noask", "--dir", stack])
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("free space", err)
        self.assertIn("--in-place", err)
        self.assertEqual(diff_snapshots(before, whole(stack)), [])
        self.assert_no_leftovers(stack)
        self.assert_services_untouched()
        code, out, err = call(restore.main, [archive, "noask", "--in-place", "--dir", stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(stack)), [])

    def test_said_before_unpacking(self):
        # The data fits once, not twice.
        stack, archive, expected = self.stack_and_archive(0.5)
        self.assertGreater(restore.estimated_size(archive), iotstack.free_bytes(self.mnt))
        self.assert_no_space_then_in_place(stack, archive, expected)

    def test_disk_full_while_unpacking(self):
        # The estimate (the tar size) fits, the staged files (whole 4 KiB
        # pages each on a tmpfs) do not: the disk fills while unpacking.
        stack, archive, expected = self.stack_and_archive(SCALE)
        need = restore.estimated_size(archive)
        pages = sum(-(-e.size // 4096) * 4096 for e in expected.values()
                    if e.type == "file" and e.link_group in (None, P["hardlink"]))
        self.assertGreater(pages - need, 64 * 1024)
        filler = iotstack.free_bytes(self.mnt) - (need + pages) // 2
        with open(os.path.join(self.mnt, "filler"), "wb") as f:
            f.write(bytes(filler // 4096 * 4096))
        self.assertGreater(iotstack.free_bytes(self.mnt), need)
        self.assert_no_space_then_in_place(stack, archive, expected)


if __name__ == "__main__":
    unittest.main()
