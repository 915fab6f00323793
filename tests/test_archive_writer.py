"""Tests of archive_writer: the syncing sink, the following verifier, and
segments read live, confirmed by a stat walk and read again when changed."""
import argparse
import errno
import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import unittest
from unittest import mock

from iotstack_backup import archive_writer, pgzip, progress, tarformat


class FileSinkTest(unittest.TestCase):
    def sink(self, **kwargs):
        holder = tempfile.TemporaryDirectory()
        self.addCleanup(holder.cleanup)
        fd = os.open(os.path.join(holder.name, "out"), os.O_WRONLY | os.O_CREAT)
        self.addCleanup(os.close, fd)
        self.path = os.path.join(holder.name, "out")
        return archive_writer.FileSink(fd, **kwargs)

    def test_syncs_on_its_thread_and_reports_what_is_durable(self):
        calls, durable = [], []
        real = os.fdatasync

        def fdatasync(fd):
            calls.append(threading.current_thread().name)
            real(fd)

        sink = self.sink(on_durable=durable.append, sync_every=1000)
        with mock.patch("os.fdatasync", fdatasync):
            for _ in range(50):
                sink.write(b"x" * 300)
                time.sleep(0.001)
            deadline = time.monotonic() + 10
            while not durable and time.monotonic() < deadline:
                time.sleep(0.01)
            sink.close()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"x" * 15000)
        self.assertEqual(sink.written, 15000)
        self.assertTrue(calls)
        self.assertEqual(set(calls), {"archive-sync"})
        self.assertEqual(len(durable), len(calls))
        self.assertEqual(durable, sorted(durable))
        self.assertTrue(all(1000 <= d <= 15000 for d in durable), durable)
        self.assertFalse(sink._thread.is_alive())

    def test_no_thread_below_one_step(self):
        sink = self.sink(sync_every=1000)
        sink.write(b"x" * 999)
        sink.close()
        self.assertIsNone(sink._thread)

    def test_truncate_writes_on_from_the_cut(self):
        durable = []
        sink = self.sink(on_durable=durable.append, sync_every=1000)
        sink.write(b"a" * 3000)
        sink.truncate(1200)
        sink.write(b"b" * 100)
        sink.close()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"a" * 1200 + b"b" * 100)
        self.assertEqual(sink.written, 1300)

    def test_a_write_that_moves_nothing_is_an_error_not_a_spin(self):
        # Issue 24 Must 1: no loop spins on a call that makes no progress.
        sink = self.sink()
        with mock.patch.object(archive_writer.os, "write", lambda fd, data: 0):
            with self.assertRaisesRegex(OSError, "writing the archive made no progress"):
                sink.write(b"abc")
        sink.close()

    def test_a_sync_error_is_raised_by_the_next_call(self):
        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        with mock.patch("os.fdatasync", failing):
            sink = self.sink(sync_every=10)
            sink.write(b"x" * 10)
            sink._thread.join(5)
            with self.assertRaisesRegex(OSError, "Input/output error"):
                sink.write(b"y")
            with self.assertRaisesRegex(OSError, "Input/output error"):
                sink.close()


class FollowingVerifierTest(unittest.TestCase):
    def archive_bytes(self, members):
        body = b"".join(tarformat.tar_header(b"volumes/f%d" % i, tarformat.TYPE_FILE, 0o644, 0, 0, 3, 0)
                        + b"abc" + bytes(509) for i in range(members))
        return gzip.compress(body + bytes(1024))

    def test_reads_only_what_is_durable_and_counts_members(self):
        data = self.archive_bytes(300)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.tar.gz")
            with open(path, "wb") as f:
                f.write(data[:1000])
                f.flush()
                verifier = archive_writer.FollowingVerifier(path)
                verifier.advance(1000)
                f.write(data[1000:])
            self.assertEqual(verifier.finish(len(data), 300), 300)

    def test_damage_and_wrong_counts_fail(self):
        data = bytearray(self.archive_bytes(50))
        data[len(data) // 2] ^= 0xFF
        cases = [(bytes(data), 50, "CRC|invalid|corrupt"),
                 (self.archive_bytes(50), 51, "50 members, 51 were written"),
                 (self.archive_bytes(50)[:-20], 50, "truncated")]
        with tempfile.TemporaryDirectory() as tmp:
            for content, members, message in cases:
                path = os.path.join(tmp, "a.tar.gz")
                with open(path, "wb") as f:
                    f.write(content)
                verifier = archive_writer.FollowingVerifier(path)
                with self.assertRaisesRegex(tarformat.ArchiveError, message):
                    verifier.finish(len(content), members)

    def test_held_reading_stops_at_the_offset(self):
        data = self.archive_bytes(300)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.tar.gz")
            with open(path, "wb") as f:
                f.write(data)
            verifier = archive_writer.FollowingVerifier(path)
            verifier.hold_at(100)
            verifier.advance(len(data))
            deadline = time.monotonic() + 5
            while verifier._offset < 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            self.assertEqual(verifier._offset, 100)
            verifier.rewind(50)  # never below where it is held: only what is durable moves
            self.assertEqual(verifier._durable, 50)
            verifier.release()
            self.assertEqual(verifier.finish(len(data), 300), 300)

    def test_cancel_while_waiting(self):
        with tempfile.NamedTemporaryFile() as f:
            verifier = archive_writer.FollowingVerifier(f.name)
            verifier.cancel()
        self.assertFalse(verifier._thread.is_alive())


class LiveSegmentTest(unittest.TestCase):
    """write_archive with segments, into a real file with the verifier on:
    each part is read while its 'services' run, then confirmed after
    before(), or cut off the file and read again when it changed."""

    def setUp(self):
        self.stack = tempfile.mkdtemp(prefix="live-segments-")
        self.addCleanup(shutil.rmtree, self.stack)
        self.files = {"services/a/conf": b"conf", "volumes/a/db": os.urandom(3 << 20),
                      "volumes/a/log": b"line\n" * 1000, "volumes/b/db": b"b" * 5000,
                      "volumes/c/db": b"c" * 5000, "docker-compose.yml": b"services: {}\n"}
        for rel, data in self.files.items():
            self.put(rel, data)
        os.link(self.path("volumes/a/log"), self.path("volumes/a/log.link"))
        self.items = ["services/", "volumes/", "docker-compose.yml"]
        self.archive = self.stack + ".tgz"
        self.addCleanup(lambda: os.path.exists(self.archive) and os.unlink(self.archive))
        self.calls = []

    def path(self, rel):
        return os.path.join(self.stack, rel)

    def put(self, rel, data):
        os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
        with open(self.path(rel), "wb") as f:
            f.write(data)

    def segment(self, name, roots, parts=None, at_stop=None):
        def before():
            self.calls.append(("before", name, self.stats.members))
            if at_stop is not None:
                at_stop()
        segment = archive_writer.Segment(
            roots, before, lambda: self.calls.append(("after", name)), parts,
            lambda reread: self.calls.append(("reread", name, reread)))
        segment.reused = lambda reuse: self.calls.append(("reused", name, reuse))
        return segment

    def write(self, segments, trust_recent=True):
        self.stats = archive_writer.ArchiveStats()
        args = argparse.Namespace(no_verify=False, level=6, jobs=2, exclude=[])
        # Files written by setUp are newer than RACY_NS: with trust_recent a
        # stat that did not change is believed, as it is for older files.
        # Syncs every 64 KiB, so the verifier follows closely and a rewind
        # cuts back over bytes already synced and reported durable.
        with mock.patch.object(archive_writer, "RACY_NS", 0 if trust_recent
                               else archive_writer.RACY_NS), \
                mock.patch.object(archive_writer.FileSink.__init__, "__defaults__",
                                  (None, 64 << 10)):
            archive_writer.write_archive(self.stack, self.items, args, None, self.archive,
                                         progress.NoProgress(), self.stats, segments(self))
        with tarfile.open(self.archive) as tf:
            members = tf.getmembers()
            contents = {m.name: tf.extractfile(m).read() for m in members if m.isreg()}
        names = [m.name for m in members]
        # A name is written twice only when a later part relinks it (a hard
        # link across parts, issue 20 Must 6).
        twice = {n for n in names if names.count(n) > 1}
        self.assertTrue(all(any(m.islnk() for m in members if m.name == n) for n in twice),
                        "a member written twice: %s" % sorted(twice))
        self.assertEqual(len(names), self.stats.members)
        links = {m.name: m.linkname for m in members if m.islnk()}
        return names, contents, links

    def test_unchanged_data_is_confirmed_not_read_again(self):
        names, contents, links = self.write(lambda t: [t.segment("A", ["volumes/a"])])
        self.assertEqual(self.calls, [("before", "A", len(names)), ("reread", "A", []),
                                      ("after", "A")])
        self.assertEqual(contents["volumes/a/db"], self.files["volumes/a/db"])
        self.assertEqual(links, {"volumes/a/log.link": "volumes/a/log"})

    def test_a_change_at_the_stop_is_cut_off_and_read_again(self):
        def at_stop():
            self.put("volumes/a/log", b"flushed at stop\n")  # same inode, link and all
            self.put("volumes/a/new", b"new")
        names, contents, links = self.write(
            lambda t: [t.segment("A", ["volumes/a", "services/a"], at_stop=at_stop),
                       t.segment("B", ["volumes/b"])])
        self.assertIn(("reread", "A", ["services/a", "volumes/a"]), self.calls)
        self.assertIn(("reread", "B", []), self.calls)
        self.assertEqual(contents["volumes/a/log"], b"flushed at stop\n")
        self.assertEqual(contents["volumes/a/new"], b"new")
        self.assertEqual(contents["volumes/a/db"], self.files["volumes/a/db"])
        self.assertEqual(links, {"volumes/a/log.link": "volumes/a/log"})
        self.assertEqual(names[-2:], ["volumes/b", "volumes/b/db"])
        if shutil.which("tar"):
            target = tempfile.mkdtemp(prefix="live-segments-x-")
            self.addCleanup(shutil.rmtree, target)
            subprocess.run(["tar", "-xzf", self.archive, "-C", target], check=True)
            with open(os.path.join(target, "volumes/a/log.link"), "rb") as f:
                self.assertEqual(f.read(), b"flushed at stop\n")

    def test_a_deleted_file_is_gone_from_the_archive(self):
        names, _contents, _links = self.write(lambda t: [t.segment(
            "A", ["volumes/a"], at_stop=lambda: os.unlink(self.path("volumes/a/db")))])
        self.assertNotIn("volumes/a/db", names)
        self.assertIn(("reread", "A", ["volumes/a"]), self.calls)

    def test_recently_changed_data_is_read_again_stopped(self):
        self.write(lambda t: [t.segment("A", ["volumes/a"])], trust_recent=False)
        self.assertIn(("reread", "A", ["volumes/a"]), self.calls)

    def opened_after_the_stop(self):
        """Patch os.open of the writer to note the files opened once a
        segment's before() has run: {rel}."""
        opened, real_open = set(), os.open
        stopped = lambda: any(call[0] == "before" for call in self.calls)  # noqa: E731

        def noting_open(path, flags, *args, dir_fd=None, **kwargs):
            # Folders are opened by the stat walk too: only files count.
            if stopped() and isinstance(path, str) and not flags & os.O_DIRECTORY:
                # The writer opens each entry in its folder's descriptor.
                full = path if dir_fd is None else os.path.join(
                    os.readlink("/proc/self/fd/%d" % dir_fd), path)
                if full.startswith(self.stack + "/"):
                    opened.add(os.path.relpath(full, self.stack))
            return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)
        patcher = mock.patch.object(archive_writer.os, "open", noting_open)
        patcher.start()
        self.addCleanup(patcher.stop)
        return opened

    def all_parts(self, t, at_stop):
        return [t.segment("ALL", ["volumes/a", "volumes/b", "volumes/c"],
                          [["volumes/a"], ["volumes/b"], ["volumes/c"]], at_stop)]

    def assert_read_by_gnu_tools(self):
        if shutil.which("gzip"):
            self.assertEqual(subprocess.run(["gzip", "-t", self.archive]).returncode, 0)
        if shutil.which("tar"):
            target = tempfile.mkdtemp(prefix="live-segments-x-")
            self.addCleanup(shutil.rmtree, target)
            subprocess.run(["tar", "-xzf", self.archive, "-C", target], check=True)
            return target
        return None

    def test_only_the_changed_part_is_read_again_whatever_its_place(self):
        # Issue 24, Must 3.  Parts are read in order of their newest change:
        # b, then a, then c; a changes at the stop; b before it and c after
        # it are confirmed by the stat walk and never opened again.
        for rel in ("volumes/a/log", "volumes/c/db"):
            time.sleep(0.05)
            self.put(rel, self.files[rel])

        def at_stop():
            self.put("volumes/a/log", b"A")
        opened = self.opened_after_the_stop()
        names, contents, links = self.write(lambda t: self.all_parts(t, at_stop))
        self.assertIn(("reread", "ALL", ["volumes/a"]), self.calls)
        self.assertEqual({rel.split("/")[1] for rel in opened if rel.startswith("volumes/")},
                         {"a"})
        # a's members were cut out of the middle and written again at the end.
        self.assertEqual(names[-4:], ["volumes/a", "volumes/a/db", "volumes/a/log",
                                      "volumes/a/log.link"])
        self.assertLess(names.index("volumes/c/db"), names.index("volumes/a"))
        self.assertEqual(contents["volumes/a/log"], b"A")
        self.assertEqual(contents["volumes/b/db"], self.files["volumes/b/db"])
        self.assertEqual(contents["volumes/c/db"], self.files["volumes/c/db"])
        self.assertEqual(links, {"volumes/a/log.link": "volumes/a/log"})
        target = self.assert_read_by_gnu_tools()
        if target:
            with open(os.path.join(target, "volumes/a/log.link"), "rb") as f:
                self.assertEqual(f.read(), b"A")

    def test_a_part_linking_into_a_changed_one_holds_the_content_itself(self):
        # c holds a hard link to a file of a: c, another part, reads that
        # inode's content itself and writes a's name again as a link to it,
        # so no link crosses parts; a changes and alone is read again, and
        # its reading writes c's name again as a link to a's.  b and c are
        # never opened after the stop (issue 24 Must 3, issue 20 Must 6).
        os.link(self.path("volumes/a/db"), self.path("volumes/c/db.link"))
        for rel in ("volumes/a/log", "volumes/c/db"):
            time.sleep(0.05)
            self.put(rel, self.files[rel])

        def at_stop():
            self.put("volumes/a/log", b"A")
        opened = self.opened_after_the_stop()
        names, contents, links = self.write(lambda t: self.all_parts(t, at_stop))
        self.assertIn(("reread", "ALL", ["volumes/a"]), self.calls)
        self.assertEqual({rel.split("/")[1] for rel in opened if rel.startswith("volumes/")},
                         {"a"})
        self.assertEqual(contents["volumes/c/db.link"], self.files["volumes/a/db"])
        # The last member of each name: a's file, c's link to it.
        last = {}
        with tarfile.open(self.archive) as tf:
            for member in tf.getmembers():
                last[member.name] = member
        self.assertTrue(last["volumes/a/db"].isreg())
        self.assertEqual(last["volumes/c/db.link"].linkname, "volumes/a/db")
        target = self.assert_read_by_gnu_tools()
        if target:
            self.assertEqual(os.stat(os.path.join(target, "volumes/a/db")).st_ino,
                             os.stat(os.path.join(target, "volumes/c/db.link")).st_ino)
            with open(os.path.join(target, "volumes/c/db.link"), "rb") as f:
                self.assertEqual(f.read(), self.files["volumes/a/db"])

    def test_every_part_changed_or_none(self):
        for label, at_stop, reread in [
                ("none", None, []),
                ("all", lambda: [self.put(rel, b"new") for rel in
                                 ("volumes/a/log", "volumes/b/db", "volumes/c/db")],
                 ["volumes/a", "volumes/b", "volumes/c"])]:
            with self.subTest(label):
                self.calls = []
                if os.path.exists(self.archive):
                    os.unlink(self.archive)
                names, contents, _links = self.write(lambda t: self.all_parts(t, at_stop))
                self.assertEqual(sorted(self.calls[1][2]), reread)
                self.assertEqual(len(names), self.stats.members)
                if reread:
                    self.assertEqual(contents["volumes/c/db"], b"new")
                self.assert_read_by_gnu_tools()

    ROWS = b"".join(b"row %08d sensor=%d value=%d\n" % (i, i % 17, i * 7919 % 10007)
                    for i in range(150_000))

    def database_at_the_stop(self):
        """A 5 MB database (compressible rows) and a small WAL before it;
        at the stop the WAL grows and one page of the database is written
        again, its size unchanged, as a database's shutdown does."""
        self.put("volumes/a/aa.wal", b"wal record\n" * 500)
        self.put("volumes/a/db", self.ROWS)
        expected = bytearray(self.ROWS)
        expected[2_000_000:2_004_096] = b"P" * 4096

        def at_stop():
            with open(self.path("volumes/a/aa.wal"), "ab") as f:
                f.write(b"checkpoint\n" * 30)
            with open(self.path("volumes/a/db"), "r+b") as f:
                f.seek(2_000_000)
                f.write(b"P" * 4096)
        return at_stop, bytes(expected)

    def assert_reused_all_but_the_changed_blocks(self, name):
        reuse = [call[2] for call in self.calls if call[0] == "reused" and call[1] == name]
        self.assertEqual(len(reuse), 1, self.calls)
        # Compressed again: the blocks around the WAL and the database's
        # header, the database's first block (its history changed) and the
        # block with the page (256 KiB each); everything else is copied.
        self.assertLessEqual(reuse[0].compressed_bytes, 4 * pgzip.DEFAULT_BLOCK_SIZE)
        self.assertGreaterEqual(reuse[0].reused_bytes,
                                len(self.ROWS) - 3 * pgzip.DEFAULT_BLOCK_SIZE)

    def test_a_group_read_again_reuses_the_blocks_that_did_not_change(self):
        # Issue 24 Must 4, --stop each: one part, read again after the stop
        # as a second pass that copies the live read's compressed blocks.
        at_stop, expected = self.database_at_the_stop()
        names, contents, links = self.write(lambda t: [
            t.segment("A", ["volumes/a"], at_stop=at_stop), t.segment("B", ["volumes/b"])])
        self.assertIn(("reread", "A", ["volumes/a"]), self.calls)
        self.assertEqual(contents["volumes/a/db"], expected)
        self.assertEqual(contents["volumes/a/aa.wal"],
                         b"wal record\n" * 500 + b"checkpoint\n" * 30)
        self.assertEqual(contents["volumes/b/db"], self.files["volumes/b/db"])
        self.assertEqual(links, {"volumes/a/log.link": "volumes/a/log"})
        self.assert_reused_all_but_the_changed_blocks("A")
        target = self.assert_read_by_gnu_tools()
        if target:
            with open(os.path.join(target, "volumes/a/db"), "rb") as f:
                self.assertEqual(f.read(), expected)

    def test_a_part_read_again_reuses_the_blocks_that_did_not_change(self):
        # The same with --stop all: the part's new members are written after
        # the others, then its first read is cut out.
        at_stop, expected = self.database_at_the_stop()
        names, contents, links = self.write(lambda t: self.all_parts(t, at_stop))
        self.assertIn(("reread", "ALL", ["volumes/a"]), self.calls)
        self.assertEqual(contents["volumes/a/db"], expected)
        self.assertEqual(contents["volumes/c/db"], self.files["volumes/c/db"])
        self.assert_reused_all_but_the_changed_blocks("ALL")
        self.assertEqual(names[-1], "volumes/a/log.link")
        self.assert_read_by_gnu_tools()

    def test_a_reused_block_that_does_not_hold_its_data_fails_the_backup(self):
        # Nothing copied is trusted: the read-back checks the CRC of the
        # data as read after the stop.
        at_stop, _expected = self.database_at_the_stop()
        real = archive_writer.ArchiveOutput.read_back

        def damaged(out, offset, length):
            data = bytearray(real(out, offset, length))
            data[-1] ^= 0x40
            return bytes(data)
        with mock.patch.object(archive_writer.ArchiveOutput, "read_back", damaged):
            with self.assertRaises(tarformat.ArchiveError):
                self.write(lambda t: [t.segment("A", ["volumes/a"], at_stop=at_stop)])

    def test_reading_order_puts_recent_changes_last(self):
        for newest, order in [([], []), ([5], [0]), ([3, 1, 2], [1, 2, 0]),
                              ([7, 7, 1], [2, 0, 1])]:
            self.assertEqual(archive_writer.reading_order(newest), order, newest)


if __name__ == "__main__":
    unittest.main()
