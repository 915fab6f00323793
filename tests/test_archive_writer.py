"""Tests of archive_writer: the syncing sink and the following verifier."""
import errno
import gzip
import os
import tempfile
import threading
import time
import unittest
from unittest import mock

from iotstack_backup import archive_writer, tarformat


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

    def test_cancel_while_waiting(self):
        with tempfile.NamedTemporaryFile() as f:
            verifier = archive_writer.FollowingVerifier(f.name)
            verifier.cancel()
        self.assertFalse(verifier._thread.is_alive())


if __name__ == "__main__":
    unittest.main()
