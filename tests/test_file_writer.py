"""The writer process: files created in order, errors carried back, no
process or descriptor left behind; a restore of many empty files through
it (issue 24)."""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import unittest
from unittest import mock

from iotstack_backup import children, file_writer, pgzip, restore
from tests.restore_case import RestoreCase, items
from tests.stacktree import diff_snapshots
from tests.support import REPO, IsolatedCase, call


class Refused(Exception):
    pass


def exists(pid):
    """Whether pid is a live process (a zombie is not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def deadline(seconds):
    """Raise TimeoutError in this process after seconds: a test of a former
    endless loop fails instead of hanging the suite.  (A forked child does
    not inherit the timer.)"""
    def expired(signum, frame):
        raise TimeoutError("still running after %d s: the writer spins" % seconds)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class UnwrittenTests(unittest.TestCase):
    def test_table(self):
        a, b, e = b"abc", b"de", b""
        cases = [
            ([], 0, []),
            ([e], 0, []),                 # the batch that hung: only an empty buffer left
            ([e, e, a], 0, [a]),
            ([a, e], 3, []),
            ([a, e, b], 3, [b]),
            ([a, b], 1, [b"bc", b]),
            ([a, b], 4, [b"e"]),
            ([a, e, b, e], 5, []),
        ]
        for buffers, written, left in cases:
            with self.subTest(buffers=buffers, written=written):
                rest = file_writer.unwritten(list(buffers), written)
                self.assertEqual([bytes(piece) for piece in rest], left)


class FileWriterTests(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.root = self.make_tmp("file-writer-test-")
        self.log = os.path.join(self.root, "order.log")

    def create_file(self, rel, mode, uid, gid, mtime, pieces):
        """Runs in the child: writes the file and notes its place in order."""
        if rel.startswith("refuse"):
            raise Refused("refused %s" % rel)
        if rel.startswith("full"):
            raise OSError(errno.ENOSPC, "No space left on device")
        if rel.startswith("bug"):
            raise ValueError("a bug")
        if rel.startswith("partly"):
            next(iter(pieces), None)  # reads one piece and leaves the rest
            return
        with open(os.path.join(self.root, rel), "wb") as f:
            for piece in pieces:
                f.write(piece)
        os.utime(os.path.join(self.root, rel), (mtime, mtime))
        with open(self.log, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write("%s %o %d %d\n" % (rel, mode, uid, gid))

    def writer(self):
        writer = file_writer.FileWriterProcess(self.create_file, raisable=(Refused,))
        self.addCleanup(writer.close)
        return writer

    def read(self, rel):
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()

    def test_files_arrive_whole_and_in_order(self):
        block = file_writer.BATCH_BYTES
        sizes = [0, 1, 511, block - 1, block, block + 1, 3 * (1 << 20) + 7]
        writer = self.writer()
        expected = {}
        for i, size in enumerate(sizes):
            data = (bytes(range(i, 251)) * (size // 240 + 1))[:size]
            # Given in uneven pieces, as the tar reader hands them over.
            cut = [data[:size // 3], data[size // 3:size // 2], data[size // 2:]]
            writer.send("f%d" % i, 0o640, i, 2 * i, 1_000_000 + i, size,
                        [memoryview(piece) for piece in cut])
            expected["f%d" % i] = data
        for i in range(2000):  # many tiny ones: more buffers than one writev takes
            writer.send("t%d" % i, 0o600, 0, 0, 5, 2, [b"%02d" % (i % 100)])
            expected["t%d" % i] = b"%02d" % (i % 100)
        writer.send("named \udcff é", 0o644, 0, 0, 6, 1, [b"x"])
        expected["named \udcff é"] = b"x"
        writer.finish()
        for rel, data in expected.items():
            self.assertEqual(self.read(rel), data, rel)
        self.assertEqual(os.stat(os.path.join(self.root, "f2")).st_mtime, 1_000_002)
        with open(self.log, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
        self.assertEqual([line.rsplit(" ", 3)[0] for line in lines], list(expected))
        self.assertEqual(lines[3], "f3 640 3 6")

    def test_wait_returns_when_every_file_sent_exists(self):
        writer = self.writer()
        for i in range(300):
            writer.send("w%d" % i, 0o644, 0, 0, 0, 5, [b"hello"])
            if i % 100 == 99:
                writer.wait()
                self.assertTrue(os.path.exists(os.path.join(self.root, "w%d" % i)))
        writer.finish()

    def test_data_not_matching_the_size_is_refused(self):
        writer = self.writer()
        with self.assertRaisesRegex(ValueError, "2 bytes given for a file of 3"):
            writer.send("a", 0o644, 0, 0, 0, 3, [b"ab"])
        self.assertIsNone(writer.pid)

    def test_unread_data_is_skipped(self):
        writer = self.writer()
        writer.send("partly", 0o644, 0, 0, 0, 300_000, [bytes(100_000), bytes(200_000)])
        writer.send("after", 0o644, 0, 0, 0, 3, [b"abc"])
        writer.finish()
        self.assertEqual(self.read("after"), b"abc")

    def test_errors_come_back_as_they_were(self):
        cases = [("refuse-me", Refused, "refused refuse-me", None),
                 ("full", OSError, "No space left on device", errno.ENOSPC),
                 ("bug", OSError, "creating the files failed: a bug", errno.EIO)]
        for rel, kind, message, number in cases:
            for ending in ("wait", "finish"):
                with self.subTest(rel=rel, ending=ending):
                    writer = self.writer()
                    pid = writer.pid
                    writer.send("ok", 0o644, 0, 0, 0, 1, [b"1"])
                    writer.send(rel, 0o644, 0, 0, 0, 1, [b"1"])
                    with self.assertRaises(kind) as caught:
                        getattr(writer, ending)()
                    self.assertIn(message, str(caught.exception))
                    if number is not None:
                        self.assertEqual(caught.exception.errno, number)
                    self.assertEqual(self.read("ok"), b"1")
                    writer.close()
                    self.assertFalse(exists(pid))

    def test_an_error_stops_the_sender_too(self):
        # The child stops reading: a sender with much more to send gets the
        # child's error, not a broken pipe or a hang.
        writer = self.writer()
        writer.send("refuse-early", 0o644, 0, 0, 0, 1, [b"1"])
        with self.assertRaisesRegex(Refused, "refuse-early"):
            for i in range(200):
                writer.send("big%d" % i, 0o644, 0, 0, 0, 1 << 20, [bytes(1 << 20)])
        self.assertFalse(os.path.exists(os.path.join(self.root, "big0")))

    def test_a_killed_child_is_an_error(self):
        writer = self.writer()
        writer.send("a", 0o644, 0, 0, 0, 1, [b"1"])
        writer.wait()
        os.kill(writer.pid, signal.SIGKILL)
        with self.assertRaisesRegex(OSError, "ended without finishing"):
            writer.send("b", 0o644, 0, 0, 0, 4 << 20, [bytes(4 << 20)])
            writer.finish()

    def test_close_kills_and_reaps(self):
        writer = self.writer()
        pid = writer.pid
        writer.send("a", 0o644, 0, 0, 0, 1, [b"1"])
        writer.close()
        self.assertIsNone(writer.pid)
        with self.assertRaises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        writer.close()  # twice is harmless

    def test_child_holds_no_other_descriptor(self):
        with open(self.log, "w") as held:
            writer = self.writer()
            writer.wait()
            fds = os.listdir("/proc/%d/fd" % writer.pid)
            targets = [os.readlink("/proc/%d/fd/%s" % (writer.pid, fd)) for fd in fds]
            self.assertNotIn(os.path.realpath(held.name), targets)
            # stdin, stdout, stderr, the job pipe and the status pipe.
            self.assertLessEqual(len(fds), 5, targets)
        writer.finish()

    def check_batch(self, files):
        """Send files ((name, [pieces])) and finish, under a deadline; each
        file must then hold its pieces, empty ones empty."""
        if os.path.exists(self.log):
            os.unlink(self.log)
        writer = self.writer()
        with deadline(20):
            for rel, pieces in files:
                writer.send(rel, 0o644, 0, 0, 7, sum(map(len, pieces)),
                            [memoryview(piece) for piece in pieces])
            writer.finish()
        for rel, pieces in files:
            self.assertEqual(self.read(rel), b"".join(pieces), rel)
        with open(self.log) as f:
            self.assertEqual(len(f.read().splitlines()), len(files))

    def test_the_batch_that_hung(self):
        # 166 one-byte files are 498 buffers; an empty file's record and name
        # make 500 and its empty piece 501: the batch is flushed with the
        # empty piece last.  Before the fix, writev([b""]) returned 0 for ever.
        files = [("one%d" % i, [b"x"]) for i in range(166)]
        files += [("empty", [b""]), ("after", [b"y"])]
        self.check_batch(files)

    def test_an_empty_piece_at_every_place_of_a_full_batch(self):
        # A first file of 1 to 4 pieces shifts where the empty piece falls:
        # the 500th, 501st or 502nd buffer, with files after it too.
        for extra in range(4):
            with self.subTest(extra=extra):
                files = [("lead%d" % extra, [b"p"] * (1 + extra))]
                files += [("one%d-%d" % (extra, i), [b"x"]) for i in range(165)]
                files += [("empty%d-%d" % (extra, i), [b""]) for i in range(3)]
                files += [("after%d" % extra, [b"y"])]
                self.check_batch(files)

    def test_an_empty_file_that_crosses_64_kib(self):
        # The empty file's record and name take the batch over BATCH_BYTES:
        # it is flushed right after the empty piece.
        record = file_writer._RECORD.size
        for short in range(0, 2 * record, 7):
            with self.subTest(short=short):
                size = file_writer.BATCH_BYTES - 2 * record - len("big") - short
                files = [("big", [bytes(size)]), ("empty", [b""]), ("after", [b"z"])]
                self.check_batch(files)
                for rel in ("big", "empty", "after"):
                    os.unlink(os.path.join(self.root, rel))

    def test_a_write_that_makes_no_progress_is_an_error(self):
        # No kernel call here returns 0 for a pipe with room, so the guard
        # is shown with writev made to: the writer raises, kills its child
        # and does not call writev again.
        writer = self.writer()
        pid = writer.pid
        writer.send("a", 0o644, 0, 0, 0, 1, [b"1"])
        with deadline(20), mock.patch.object(file_writer.os, "writev",
                                             return_value=0) as writev:
            with self.assertRaisesRegex(children.NoProgressError,
                                        "creating the files made no progress"):
                writer.finish()
        self.assertEqual(writev.call_count, 1)
        self.assertIsNone(writer.pid)
        self.assertFalse(exists(pid))

    def test_child_ends_when_the_parent_dies(self):
        script = textwrap.dedent("""
            import os, sys
            sys.path.insert(0, %r)
            from iotstack_backup import file_writer
            writer = file_writer.FileWriterProcess(lambda *args: None)
            print(writer.pid, flush=True)
            os.kill(os.getpid(), 9)
        """ % REPO)
        done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              universal_newlines=True)
        self.assertEqual(done.returncode, -signal.SIGKILL)
        pid = int(done.stdout)
        deadline = time.monotonic() + 10
        while exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(exists(pid))


class EmptyFilesTests(RestoreCase):
    """Issue 24: an archive holding many empty files beside one-byte ones
    hung the restore at 100% CPU (1 in 15 to 1 in 30 runs with 172 empty
    files), when an empty file's piece ended a batch of the writer process.
    Here one file in three is empty, so that many batches end on one."""

    def add_empty_files(self):
        folder = os.path.join(self.stack, "volumes", "sparse")
        os.mkdir(folder)
        expected = {}
        for i in range(3000):
            data = b"" if i % 3 == 2 else b"%d" % (i % 10)
            with open(os.path.join(folder, "f%04d" % i), "wb") as f:
                f.write(data)
            expected["volumes/sparse/f%04d" % i] = data
        return expected

    def test_many_empty_files_restore_whole(self):
        expected_data = self.add_empty_files()
        archive = self.make_backup()
        expected = items(self.stack)
        self.assertGreater(pgzip.default_jobs(), 1, "restore uses the writer process "
                                                     "only with more than one core")
        for attempt in range(2):
            with self.subTest(attempt=attempt):
                fresh = os.path.join(self.tmp, "fresh%d" % attempt)
                os.mkdir(fresh)
                with deadline(60):
                    code, out, err = call(restore.main, [archive, "noask", "--dir", fresh])
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(diff_snapshots(expected, items(fresh)), [])
                for rel, data in expected_data.items():
                    with open(os.path.join(fresh, rel), "rb") as f:
                        self.assertEqual(f.read(), data, rel)
                self.assertEqual(sum(1 for data in expected_data.values() if not data), 1000)
                self.assert_no_leftovers(fresh)


if __name__ == "__main__":
    unittest.main()
