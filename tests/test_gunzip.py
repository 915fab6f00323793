"""Tests for iotstack_backup.pgzip's checked reader, iter_gunzip: in this
process and in a forked child (for a regular file), damaged and hostile
input refused with the right error, no thread or child left behind."""

import errno
import fcntl
import gc
import gzip
import io
import os
import shutil
import tempfile
import threading
import unittest
from unittest import mock

from iotstack_backup import pgzip
from iotstack_backup.pgzip import (
    CorruptGzipError,
    EmptyArchiveError,
    GzipError,
    NotGzipError,
    TruncatedGzipError,
    iter_gunzip,
)
from tests.gzip_samples import SMALL_BLOCK, SAMPLES, compress, mixed, random_bytes, text_like


def live_reader_threads(ignore=()):
    return [thread for thread in threading.enumerate()
            if thread.name == "gzip-reader" and thread.is_alive() and thread not in ignore]


def gunzip(data, **options):
    return b"".join(iter_gunzip(io.BytesIO(data), **options))


class ReaderTests(unittest.TestCase):
    """Each test checks that no thread is left running."""

    def setUp(self):
        self.earlier_threads = set(threading.enumerate())

    def tearDown(self):
        gc.collect()
        for thread in self.reader_threads():
            thread.join(5)
        self.assertEqual(self.reader_threads(), [])

    def reader_threads(self):
        return live_reader_threads(ignore=self.earlier_threads)

    def test_round_trip(self):
        for name, data in SAMPLES.items():
            with self.subTest(sample=name):
                output, _ = compress(data, jobs=2, block_size=SMALL_BLOCK)
                self.assertEqual(gunzip(output), data)
                self.assertEqual(gunzip(gzip.compress(data)), data)

    def test_chunks_respect_chunk_size(self):
        data = bytes(5_000_000)  # compresses about 1000:1
        compressed = gzip.compress(data)
        chunks = list(iter_gunzip(io.BytesIO(compressed), chunk_size=4096))
        self.assertLessEqual(max(len(chunk) for chunk in chunks), 4096)
        self.assertEqual(b"".join(chunks), data)

    def test_header_with_optional_fields(self):
        data = text_like(50_000)
        output = io.BytesIO()
        with gzip.GzipFile("backup.tar", "wb", fileobj=output, mtime=1) as handle:
            handle.write(data)
        self.assertEqual(gunzip(output.getvalue()), data)

    def test_multiple_members(self):
        first, second = text_like(70_000), random_bytes(30_000)
        members = gzip.compress(first) + gzip.compress(b"") + compress(second)[0]
        self.assertEqual(gunzip(members, chunk_size=1000), first + second)

    def test_trailing_zeros_are_accepted(self):
        data = text_like(10_000)
        for padding in (1, 2, 1000, 300_000):
            with self.subTest(padding=padding):
                self.assertEqual(gunzip(gzip.compress(data) + bytes(padding)), data)

    def test_trailing_garbage_is_an_error(self):
        compressed = gzip.compress(text_like(10_000))
        for garbage in (b"x", b"\x1f", b"garbage", bytes(100) + b"x", bytes(200_000) + b"\x01"):
            with self.subTest(garbage=garbage[-10:]):
                with self.assertRaises(CorruptGzipError) as caught:
                    gunzip(compressed + garbage)
                self.assertEqual(str(caught.exception), "trailing garbage after gzip data")

    def test_truncation_anywhere(self):
        compressed, _ = compress(mixed(40_000), jobs=2, block_size=SMALL_BLOCK)
        offsets = set(range(1, 40)) | set(range(len(compressed) - 40, len(compressed)))
        offsets |= set(range(40, len(compressed) - 40, 997))
        for offset in sorted(offsets):
            with self.subTest(offset=offset):
                with self.assertRaises(TruncatedGzipError) as caught:
                    gunzip(compressed[:offset], chunk_size=8192)
                self.assertIn("truncated", str(caught.exception))

    def test_flipped_bytes_in_deflate_data_are_detected(self):
        compressed = gzip.compress(text_like(2000), mtime=0)
        # The last deflate byte may hold unused padding bits.
        for position in range(10, len(compressed) - 9, 3):
            for mask in (0x01, 0x80):
                damaged = bytearray(compressed)
                damaged[position] ^= mask
                with self.subTest(position=position, mask=mask):
                    with self.assertRaises(GzipError):
                        gunzip(bytes(damaged))

    def test_flipped_crc_and_length(self):
        data = text_like(20_000)
        compressed = bytearray(compress(data)[0])
        damaged = bytearray(compressed)
        damaged[-6] ^= 0x10
        with self.assertRaisesRegex(CorruptGzipError, "CRC"):
            gunzip(bytes(damaged))
        damaged = bytearray(compressed)
        damaged[-2] ^= 0x10
        with self.assertRaisesRegex(CorruptGzipError, "length"):
            gunzip(bytes(damaged))

    def test_corrupt_stored_block(self):
        compressed = bytearray(compress(random_bytes(100_000))[0])
        compressed[11] ^= 0xFF  # the LEN field of the first stored block
        with self.assertRaises(CorruptGzipError):
            gunzip(bytes(compressed))

    def test_not_gzip(self):
        for data in (b"x", b"hello world", b"PK\x03\x04" + bytes(100), b"\x1f\x8c" + bytes(20)):
            with self.subTest(data=data[:8]):
                with self.assertRaises(NotGzipError) as caught:
                    gunzip(data)
                self.assertEqual(str(caught.exception), "not a gzip file")

    def test_bad_header_is_corrupt(self):
        with self.assertRaises(CorruptGzipError):
            gunzip(b"\x1f\x8b\x07\x00" + bytes(20))  # compression method 7

    def test_empty_archive(self):
        with self.assertRaises(EmptyArchiveError) as caught:
            gunzip(b"")
        self.assertIsInstance(caught.exception, NotGzipError)
        self.assertEqual(str(caught.exception), "archive is empty")

    def test_read_errors_propagate(self):
        compressed = gzip.compress(random_bytes(500_000))
        with self.assertRaises(OSError) as caught:
            list(iter_gunzip(FailingReader(compressed)))
        self.assertEqual(caught.exception.errno, errno.EIO)

    def test_early_stop_of_generator(self):
        compressed = gzip.compress(bytes(20_000_000), compresslevel=1)
        chunks = iter_gunzip(io.BytesIO(compressed), chunk_size=1024)
        self.assertEqual(next(chunks), bytes(1024))
        chunks.close()
        self.assertEqual(self.reader_threads(), [])

    def test_break_out_of_loop(self):
        compressed = gzip.compress(bytes(20_000_000), compresslevel=1)
        for count, _ in enumerate(iter_gunzip(io.BytesIO(compressed), chunk_size=1024)):
            if count == 3:
                break
        # tearDown checks that no thread was left behind


class ChildProcessReaderTests(unittest.TestCase):
    """iter_gunzip on a regular file: decompressed by a forked child."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="gunzip-child-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.children = []
        real_fork = os.fork

        def recording_fork():
            pid = real_fork()
            if pid:
                self.children.append(pid)
            return pid

        patcher = mock.patch.object(pgzip.os, "fork", recording_fork)
        patcher.start()
        self.addCleanup(patcher.stop)

    def tearDown(self):
        # Every child has been waited for: none is left running or a zombie.
        for pid in self.children:
            with self.assertRaises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def file(self, data, name="archive.tar.gz"):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def gunzip_file(self, data, skip=0):
        forks = len(self.children)
        with open(self.file(data), "rb") as f:
            f.seek(skip)
            try:
                return b"".join(iter_gunzip(f))
            finally:
                self.assertEqual(len(self.children), forks + 1)  # not the thread

    def error_of(self, data):
        """The exception each path raises, as (type, message)."""
        outcomes = []
        for reader in (gunzip, self.gunzip_file):
            with self.assertRaises(GzipError) as caught:
                reader(data)
            outcomes.append((type(caught.exception), str(caught.exception)))
        return outcomes

    def test_round_trip(self):
        for name, data in SAMPLES.items():
            with self.subTest(sample=name):
                output, _ = compress(data, jobs=2, block_size=SMALL_BLOCK)
                self.assertEqual(self.gunzip_file(output), data)
        big = mixed(3_000_000)
        self.assertEqual(self.gunzip_file(compress(big, jobs=2)[0]), big)

    def test_starts_where_the_file_is_positioned(self):
        data = text_like(100_000)
        self.assertEqual(self.gunzip_file(b"junk" + gzip.compress(data), skip=4), data)

    def test_errors_are_the_threads_errors(self):
        compressed = compress(text_like(200_000), block_size=SMALL_BLOCK)[0]
        crc = bytearray(compressed)
        crc[-6] ^= 0x10
        cases = {
            "empty": (b"", EmptyArchiveError),
            "not gzip": (b"PK\x03\x04" + bytes(100), NotGzipError),
            "truncated": (compressed[:len(compressed) // 2], TruncatedGzipError),
            "truncated trailer": (compressed[:-3], TruncatedGzipError),
            "crc": (bytes(crc), CorruptGzipError),
            "garbage": (compressed + b"garbage", CorruptGzipError),
        }
        for name, (data, expected) in cases.items():
            with self.subTest(name):
                thread, child = self.error_of(data)
                self.assertEqual(child, thread)
                self.assertIs(child[0], expected)

    def test_read_error_in_the_child_is_raised(self):
        path = self.file(gzip.compress(b"data"))
        with open(path, "ab") as f:  # a regular file the child cannot read
            with self.assertRaises(OSError) as caught:
                list(pgzip.gunzip_file_in_child(f))
        self.assertEqual(caught.exception.errno, errno.EBADF)

    def test_stopping_early_ends_the_child(self):
        path = self.file(gzip.compress(bytes(50_000_000), compresslevel=1))
        with open(path, "rb") as f:
            chunks = iter_gunzip(f)
            self.assertEqual(next(chunks)[:10], bytes(10))
            chunks.close()
        # tearDown checks that the child was waited for

    def test_child_holds_no_other_descriptor(self):
        # A lock taken before the child was forked must go with the parent's
        # descriptor, not live on in the child.
        lock_path = self.file(b"", "lock")
        lock = os.open(lock_path, os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = self.file(gzip.compress(bytes(50_000_000), compresslevel=1))
        with open(path, "rb") as f:
            chunks = iter_gunzip(f)
            next(chunks)
            os.close(lock)
            other = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(other)
                chunks.close()


class FailingReader(io.RawIOBase):
    """Input file whose second read fails with EIO."""

    def __init__(self, data):
        self.data = data
        self.reads = 0

    def readable(self):
        return True

    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.data[:size]


if __name__ == "__main__":
    unittest.main()
