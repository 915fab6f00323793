"""Tests of journal: the swap of staged items, its roll back, and recovery
after a crash at any rename; the trash of replaced items, deleted only once
the services run again (end to end, on the real engine), and delete_tree."""
import io
import os
import tempfile
import unittest
from unittest import mock

from iotstack_backup import docker_compose, iotstack, journal, restore
from tests.restore_case import RUNNING, RestoreCase, change_tree, items
from tests.stacktree import diff_snapshots
from tests.support import IsolatedCase, read, write

STAGING = ".tmp/" + journal.STAGING_PREFIX + "t"
ASIDE = ".tmp/" + journal.ASIDE_PREFIX + "t"
UNITS = [".env", "services", "volumes"]


class Crash(BaseException):
    """A kill -9 in the middle of the swap: nothing after it runs."""


class JournalTests(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.stack = os.path.join(self.make_tmp("journal-"), "IOTstack")
        for unit in UNITS:
            for root, version in (("", "old"), (STAGING, "new")):
                path = os.path.join(self.stack, root, unit)
                write(path if unit == ".env" else os.path.join(path, "data.txt"), version)

    def record(self):
        return journal.prepare_journal(self.stack, "backup_x.tar.gz", UNITS, STAGING, ASIDE,
                                       keep_old=False)

    def versions(self):
        return [read(os.path.join(self.stack, unit) if unit == ".env"
                     else os.path.join(self.stack, unit, "data.txt")) for unit in UNITS]

    def assert_tidy(self):
        self.assertEqual(os.listdir(os.path.join(self.stack, ".tmp")), [])

    def test_swap_then_clean_up(self):
        record = self.record()
        journal.swap_in(self.stack, record)
        self.assertEqual(record["state"], "committed")
        trash = journal.clean_up(self.stack, record)
        self.assertEqual(self.versions(), ["new"] * 3)
        # The old items wait for empty_trash, which a restore calls once the
        # services run again.
        self.assertEqual(journal.trash_folders(trash),
                         [os.path.join(self.stack, record["aside"])])
        journal.empty_trash(self.stack, iotstack.RunLog())
        self.assert_tidy()

    def test_roll_back_after_the_whole_swap(self):
        record = self.record()
        journal.swap_in(self.stack, record)
        journal.roll_back(self.stack, record)
        journal.clean_up(self.stack, record)
        self.assertEqual(self.versions(), ["old"] * 3)
        self.assert_tidy()

    def test_recovery_after_a_crash_at_every_rename(self):
        real_rename = os.rename
        total = 2 * len(UNITS) + 2  # each unit aside and in, and the journal's own renames
        for crash_at in range(1, total + 1):
            with self.subTest(crash_at=crash_at):
                self.setUp()
                renames = []

                def rename(src, dst, *args, **kwargs):
                    renames.append(src)
                    if len(renames) == crash_at:
                        raise Crash()
                    return real_rename(src, dst, *args, **kwargs)

                with mock.patch.object(os, "rename", rename):
                    try:
                        journal.swap_in(self.stack, self.record())
                    except Crash:
                        pass
                out = io.StringIO()
                journal.recover(self.stack, iotstack.RunLog(), out)
                # All old or all new, never a mix; and nothing left over.
                self.assertIn(self.versions(), (["old"] * 3, ["new"] * 3), out.getvalue())
                self.assert_tidy()

    def test_a_crash_while_a_roll_back_cleans_up_keeps_the_old_items(self):
        # A roll back done, then killed while its clean up deletes the
        # staged copies: the next recovery must not take an old item whose
        # staged copy is gone for a new one swapped in (found by the
        # power-cut sweep, tests/test_powercut_restore.py).
        record = self.record()
        journal.swap_in(self.stack, record)
        record["state"] = "swapping"  # as if killed just before the commit
        journal.write_journal(self.stack, record)
        journal.roll_back(self.stack, record)
        os.unlink(os.path.join(self.stack, STAGING, ".env"))  # where the kill came
        journal.recover(self.stack, iotstack.RunLog(), io.StringIO())
        self.assertEqual(self.versions(), ["old"] * 3)
        self.assert_tidy()


class PowerCut(BaseException):
    """Raised where a power cut would stop the run: nothing catches it."""


class TrashTests(RestoreCase):
    """Down only for the swap: the replaced items are moved aside in the
    swap and deleted once the services run again; a cut leaves a trash
    record that the next run empties."""

    engine = True

    def trash_left(self):
        tmp = os.path.join(self.stack, ".tmp")
        return sorted(n for n in os.listdir(tmp) if n.startswith((journal.TRASH_RECORD,
                                                                   journal.ASIDE_PREFIX)))

    def test_old_items_deleted_only_once_every_service_runs_again(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hook ran\n")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        seen = []
        deleting = journal.delete_tree

        def observed(path):
            # The moment deletion begins: the engine's states, and the old
            # tree still there (the stray file only the live tree had).
            seen.append((path, self.running_now(), os.path.isfile(
                os.path.join(path, "volumes/stray/deeper/junk"))))
            return deleting(path)
        with mock.patch.object(journal, "delete_tree", observed):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assert_stopped_and_started()
        self.assertTrue(seen)
        path, running, old_there = seen[0]  # the top; delete_tree recurses
        self.assertTrue(os.path.basename(path).startswith(journal.ASIDE_PREFIX), path)
        self.assertEqual(running, set(RUNNING))
        self.assertTrue(old_there)
        self.assertEqual(self.trash_left(), [])
        self.assert_no_leftovers()
        log = self.restore_log()
        order = ["Replaced items moved aside to .tmp/" + journal.ASIDE_PREFIX, "hook ran",
                 "Services Started", "Deleting the replaced items in ",
                 "Deleted the replaced items: "]
        where = [log.find(line) for line in order]
        self.assertNotIn(-1, where, log)
        self.assertEqual(where, sorted(where), log)
        self.assertRegex(log, r"Deleted the replaced items: \d+ entries, [\d.]+ [KMG]?B freed")

    def test_no_compose_call_between_stop_and_start_when_the_compose_file_stays(self):
        archive = self.make_backup()
        calls = []
        running = docker_compose.Engine.compose_run

        def recorded(engine, *args, **kwargs):
            calls.append(args[0])
            return running(engine, *args, **kwargs)
        with mock.patch.object(docker_compose.Engine, "compose_run", recorded):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertNotIn("docker-compose.yml changed", out)
        self.assertEqual(calls[calls.index("stop"):], ["stop", "start"], calls)
        self.assertIn("config", calls[:calls.index("stop")])
        self.assert_stopped_and_started()

    def test_cut_after_the_start_next_run_deletes_them(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)

        def cut(path):
            raise KeyboardInterrupt  # Ctrl-C while deleting: as a cut, the record stays
        with mock.patch.object(journal, "delete_tree", cut):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 130, err)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(self.running_now(), set(RUNNING))
        left = self.trash_left()
        self.assertEqual(len(left), 2, left)  # the record and the folder it lists
        for run_again in (["--list"], ["--recover"]):
            with self.subTest(run=run_again[0]):
                code, out, err = self.restore(*run_again)
                self.assertEqual(code, 0, err)
                self.assertEqual(self.trash_left(), [])
                self.assert_no_leftovers()
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
                change_tree(self.stack)
                with mock.patch.object(journal, "delete_tree", cut):
                    self.restore(archive, "noask")
        self.assertEqual(self.running_now(), set(RUNNING))

    def test_cut_after_commit_recovery_completes_then_deletes(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)

        def cut_after_commit(stack, record, *more):
            swap_in(stack, record, *more)
            raise PowerCut()  # nothing after it runs: no roll back, no clean up
        swap_in = journal.swap_in
        with mock.patch.object(restore, "swap_in", cut_after_commit), \
                mock.patch.object(restore, "roll_back"), mock.patch.object(restore, "clean_up"):
            with self.assertRaises(PowerCut):
                self.restore(archive, "noask")
        code, out, err = self.restore("--recover")
        self.assertEqual(code, 0, err)
        self.assertNotIn("Rolled back", out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(self.trash_left(), [])
        self.assert_no_leftovers()
        self.assertEqual(self.running_now(), set(RUNNING))


class DeleteTreeTests(unittest.TestCase):
    def test_counts_what_goes_never_follows_a_link(self):
        with tempfile.TemporaryDirectory() as tmp:
            outside = os.path.join(tmp, "outside")
            os.mkdir(outside)
            with open(os.path.join(outside, "keep"), "wb") as f:
                f.write(b"k" * 5000)
            tree = os.path.join(tmp, journal.ASIDE_PREFIX + "x")
            os.makedirs(os.path.join(tree, "a/b"))
            with open(os.path.join(tree, "a/b/file"), "wb") as f:
                f.write(os.urandom(100000))
            os.link(os.path.join(tree, "a/b/file"), os.path.join(tree, "a/hard"))
            os.symlink(outside, os.path.join(tree, "a/link"))
            deleted, freed, left = journal.delete_tree(tree)
            self.assertFalse(os.path.lexists(tree))
            self.assertEqual(os.listdir(outside), ["keep"])
            # a, b, file, hard, link and the tree itself; the file's blocks once.
            self.assertEqual((deleted, left), (6, 0))
            self.assertGreaterEqual(freed, 100000)
            self.assertLess(freed, 200000)
            self.assertEqual(journal.delete_tree(tree), (0, 0, 0))

    def test_a_damaged_record_deletes_nothing_else(self):
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, ".tmp"))
            precious = os.path.join(tmp, "volumes")
            os.mkdir(precious)
            record = os.path.join(tmp, ".tmp", journal.TRASH_RECORD + "t.json")
            for content in ('{"folders": ["%s", "relative/restore-old.x"]}' % precious, "{",
                            '["%s"]' % precious):
                with open(record, "w") as f:
                    f.write(content)
                journal.empty_trash(tmp, iotstack.RunLog())
                self.assertTrue(os.path.isdir(precious))


if __name__ == "__main__":
    unittest.main()
