"""The power-cut file system itself (tests/powercut/): what a cut keeps.

Each test runs a few calls on the mounted fs, then builds the state of a
cut from the record and looks at it: a write not fsynced is gone, a rename
without a directory fsync may be undone, what was fsynced (file and
folder) survives, a sync() makes everything before it durable, and with
every call kept the rebuilt tree is the backing tree, entry by entry.
"""
import os
import shutil
import unittest

from tests.powercut import harness, model

MISSING = harness.missing()


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@unittest.skipIf(MISSING, MISSING)
class PowerCutFsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = harness.fast_tmp("powercut-fs-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.backing = os.path.join(self.tmp, "backing")
        self.mount = os.path.join(self.tmp, "mnt")
        os.mkdir(self.backing)
        with open(os.path.join(self.backing, "old"), "w") as f:
            f.write("old data")

    def record(self, calls):
        _result, record = harness.record_run(self.backing, self.mount, calls)
        return record

    def state(self, record, kept=None, cut=None):
        """The listing of the cut after `cut` (the last call by default)
        keeping `kept` (default: the strictest state)."""
        ops = record["ops"]
        cut = len(ops) - 1 if cut is None else cut
        durable = model.durable_at(ops)
        kept = model.kept_strict(ops, durable, cut) if kept is None else kept(ops, durable, cut)
        model.materialize(model.replay(record, kept, cut), self.mount)
        return harness.listing(self.mount)

    def test_a_write_not_fsynced_is_gone_after_a_cut(self):
        def calls(mnt):
            with open(os.path.join(mnt, "old"), "r+") as f:
                f.write("NEW")
        state = self.state(self.record(calls))
        self.assertEqual(state["old"][5], b"old data")

    def test_a_fsynced_write_survives(self):
        def calls(mnt):
            with open(os.path.join(mnt, "old"), "r+") as f:
                f.write("NEW")
                f.flush()
                os.fdatasync(f.fileno())
                f.write("lost")
        state = self.state(self.record(calls))
        self.assertEqual(state["old"][5], b"NEW data")

    def test_a_new_file_needs_its_folder_fsynced(self):
        def calls(mnt):
            os.mkdir(os.path.join(mnt, "d"))
            with open(os.path.join(mnt, "d", "f"), "w") as f:
                f.write("kept")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(os.path.join(mnt, "d"))
        record = self.record(calls)
        self.assertNotIn("d", self.state(record))  # d's own name was never made durable
        shutil.rmtree(os.path.join(self.backing, "d"))
        record = self.record(lambda mnt: (calls(mnt), fsync_path(mnt)))
        self.assertEqual(self.state(record)["d/f"][5], b"kept")

    def test_a_fsynced_file_and_folder_survive(self):
        def calls(mnt):
            with open(os.path.join(mnt, "f"), "w") as f:
                f.write("kept")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(mnt)
        state = self.state(self.record(calls))
        self.assertEqual(state["f"][5], b"kept")

    def test_a_rename_without_a_folder_fsync_may_be_undone(self):
        def calls(mnt):
            with open(os.path.join(mnt, "tmp"), "w") as f:
                f.write("new")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(mnt)
            os.rename(os.path.join(mnt, "tmp"), os.path.join(mnt, "old"))
        record = self.record(calls)
        strict = self.state(record)
        self.assertEqual(strict["old"][5], b"old data")
        self.assertEqual(strict["tmp"][5], b"new")
        names = self.state(record, model.kept_names)
        self.assertEqual(names["old"][5], b"new")
        self.assertNotIn("tmp", names)

    def test_a_rename_is_atomic_in_every_state(self):
        def calls(mnt):
            os.mkdir(os.path.join(mnt, "a"))
            os.mkdir(os.path.join(mnt, "b"))
            fsync_path(mnt)
            with open(os.path.join(mnt, "a", "x"), "w") as f:
                f.write("x")
            fsync_path(os.path.join(mnt, "a"))
            os.rename(os.path.join(mnt, "a", "x"), os.path.join(mnt, "b", "y"))
            fsync_path(os.path.join(mnt, "b"))  # a not fsynced: not yet durable
        record = self.record(calls)
        strict = self.state(record)
        self.assertIn("a/x", strict)
        self.assertNotIn("b/y", strict)
        for seed in range(20):
            state = self.state(record, lambda o, d, c: model.kept_random(o, d, c, seed))
            self.assertEqual(("a/x" in state) + ("b/y" in state), 1, state)

    def test_names_kept_data_lost_gives_empty_files(self):
        def calls(mnt):
            with open(os.path.join(mnt, "f"), "w") as f:
                f.write("unsynced")
        state = self.state(self.record(calls), model.kept_names)
        self.assertEqual(state["f"][5], b"")

    def test_sync_makes_everything_before_it_durable(self):
        def calls(mnt):
            with open(os.path.join(mnt, "f"), "w") as f:
                f.write("synced")
            os.sync()
            with open(os.path.join(mnt, "g"), "w") as f:
                f.write("after")
        state = self.state(self.record(calls))
        self.assertEqual(state["f"][5], b"synced")
        self.assertNotIn("g", state)

    def test_every_call_kept_rebuilds_the_backing_tree(self):
        def calls(mnt):
            os.makedirs(os.path.join(mnt, "d", "e"))
            with open(os.path.join(mnt, "d", "f"), "wb") as f:
                f.write(b"x" * 300000)
            os.truncate(os.path.join(mnt, "d", "f"), 1000)
            os.link(os.path.join(mnt, "d", "f"), os.path.join(mnt, "d", "e", "hard"))
            os.symlink("../f", os.path.join(mnt, "d", "e", "sym"))
            os.chmod(os.path.join(mnt, "d", "f"), 0o600)
            os.chown(os.path.join(mnt, "d", "f"), 1000, 1000)
            os.utime(os.path.join(mnt, "d", "f"), ns=(1, 1234567890123456789))
            os.rename(os.path.join(mnt, "old"), os.path.join(mnt, "d", "moved"))
            os.mkdir(os.path.join(mnt, "gone"))
            os.rmdir(os.path.join(mnt, "gone"))
            os.utime(os.path.join(mnt, "d"), ns=(5, 6000000000))
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "d"))), ["e", "f", "moved"])
            self.assertEqual(os.stat(os.path.join(mnt, "d", "e", "hard")).st_ino,
                             os.stat(os.path.join(mnt, "d", "f")).st_ino)
        record = self.record(calls)
        every = self.state(record, lambda ops, durable, cut: set(range(cut + 1)))
        self.assertEqual(every, harness.listing(self.backing))
        self.assertEqual(every["d/e/hard"][6], "d/f")
        self.assertEqual(every["d/f"][1:5], (0o100600, 1000, 1000, 1234567890123456789))


class ModelTest(unittest.TestCase):
    """The durability model on hand-made records (no FUSE needed)."""

    T = (0, 0)

    def test_durable_at(self):
        node = {"kind": "file", "mode": 0o100644, "uid": 0, "gid": 0, "atime": 0, "mtime": 0,
                "rdev": 0, "data": b"", "target": None, "entries": {}, "xattrs": {}}
        ops = [("create", 0, "f", 1, node, self.T),      # 0: durable at the folder's fsync (5)
               ("write", 1, 0, b"abc", self.T),           # 1: at the file's fdatasync (3)
               ("chmod", 1, 0o600),                        # 2: at the file's fsync (6) only
               ("fsync", 1, True),                         # 3: fdatasync
               ("rename", 0, "f", 2, "g", 1, self.T, self.T),  # 4: needs 0 and 2 (7)
               ("fsyncdir", 0),                            # 5
               ("fsync", 1, False),                        # 6
               ("fsyncdir", 2),                            # 7
               ("unlink", 2, "g", 1, self.T),              # 8: at the sync's end (11)
               ("syncbegin", "t"), ("write", 1, 0, b"x", self.T), ("syncend", "t")]
        durable = model.durable_at(ops)
        self.assertEqual(durable[:9], [5, 3, 6, 3, 7, 5, 6, 7, 11])
        self.assertEqual(durable[10], model.NEVER)  # written after the sync began
        self.assertEqual(model.kept_strict(ops, durable, 5), {0, 1, 3, 5})

    def test_cut_points(self):
        ops = [("write", 1, 0, b"", self.T)] * 300 + [("fsync", 1, False)]
        cuts = model.cut_points(ops, minimum=100, seed=1)
        self.assertEqual(len(cuts), 100)
        self.assertEqual((cuts[0], cuts[-1]), (-1, 300))
        self.assertEqual(cuts, model.cut_points(ops, minimum=100, seed=1))
        few = model.cut_points(ops[:20], minimum=100)
        self.assertEqual(few, list(range(-1, 20)))
        sample = model.cut_points(ops, minimum=100, seed=1, sample=12)
        self.assertEqual((len(sample), sample[0], sample[-1]), (12, -1, 300))


if __name__ == "__main__":
    unittest.main()
