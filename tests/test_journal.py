"""Tests of journal: the swap of staged items, its roll back, and recovery
after a crash at any rename."""
import io
import os
import unittest
from unittest import mock

from iotstack_backup import iotstack, journal
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


if __name__ == "__main__":
    unittest.main()
