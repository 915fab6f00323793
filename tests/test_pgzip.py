"""Tests for iotstack_backup.pgzip's writer: gzip compatibility (GNU gzip,
pigz, tar read what it writes), error propagation, checkpoints and rewind,
and the reuse of compressed blocks.  The checked reader (iter_gunzip) is
tested in test_gunzip.py."""

import array
import errno
import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
import unittest
import zlib
from unittest import mock

from iotstack_backup import pgzip
from iotstack_backup.pgzip import GzipError, ParallelGzipWriter, iter_gunzip
from tests.gzip_samples import (
    SMALL_BLOCK,
    SAMPLES,
    compress,
    mixed,
    random_bytes,
    repeated_tokens,
    semi_compressible,
    text_like,
)

GZIP = shutil.which("gzip")
TAR = shutil.which("tar")
PIGZ = shutil.which("pigz")


def run(command, data=None):
    return subprocess.run(command, input=data, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=True).stdout


def non_daemon_threads(ignore=()):
    return [thread for thread in threading.enumerate()
            if not thread.daemon and thread is not threading.main_thread()
            and thread not in ignore]


class WriterFormatTests(unittest.TestCase):

    def test_round_trip_through_zlib_and_gzip_module(self):
        for name, data in SAMPLES.items():
            for jobs in (1, 4):
                for level in (0, 1, 6, 9):
                    with self.subTest(sample=name, jobs=jobs, level=level):
                        output, writer = compress(data, level=level, jobs=jobs,
                                                  block_size=SMALL_BLOCK)
                        self.assertEqual(zlib.decompress(output, 31), data)
                        self.assertEqual(gzip.decompress(output), data)
                        self.assertEqual(writer.compressed_size, len(output))

    def test_trailer_and_attributes(self):
        for name, data in SAMPLES.items():
            with self.subTest(sample=name):
                output, writer = compress(data, jobs=2, block_size=SMALL_BLOCK)
                crc, size = struct.unpack("<II", output[-8:])
                self.assertEqual(crc, zlib.crc32(data))
                self.assertEqual(size, len(data) % 2 ** 32)
                self.assertEqual(writer.crc, zlib.crc32(data))
                self.assertEqual(writer.size, len(data))

    def test_header(self):
        for level, extra_flags in ((0, 4), (1, 4), (6, 0), (9, 2)):
            with self.subTest(level=level):
                output, _ = compress(b"data", level=level, mtime=1700000000)
                magic, method, flags, mtime, xfl, os_byte = struct.unpack("<2sBBIBB", output[:10])
                self.assertEqual((magic, method, flags), (b"\x1f\x8b", 8, 0))
                self.assertEqual((mtime, xfl, os_byte), (1700000000, extra_flags, 3))

    def test_default_block_size_and_jobs(self):
        data = mixed(3 * pgzip.DEFAULT_BLOCK_SIZE + 100)
        output, _ = compress(data)
        self.assertEqual(gzip.decompress(output), data)

    def test_blocks_smaller_than_the_deflate_window(self):
        for block_size, size in ((1, 3000), (1000, 200_000), (40_000, 200_000)):
            data = text_like(size)
            with self.subTest(block_size=block_size):
                output, _ = compress(data, jobs=3, block_size=block_size)
                self.assertEqual(gzip.decompress(output), data)

    def test_many_tiny_writes(self):
        rng = random.Random(5)
        data = mixed(600_000)
        writes = []
        position = 0
        while position < len(data):
            step = rng.randint(1, 10)
            writes.append(data[position:position + step])
            position += step
        self.assertGreater(len(writes), 100_000)
        output, writer = compress(data, writes, jobs=4, block_size=SMALL_BLOCK)
        self.assertEqual(gzip.decompress(output), data)
        self.assertEqual(writer.crc, zlib.crc32(data))

    def test_mixed_write_sizes(self):
        rng = random.Random(6)
        data = mixed(400_000)
        writes = []
        position = 0
        while position < len(data):
            step = rng.choice([1, 511, 512, SMALL_BLOCK - 1, SMALL_BLOCK, 3 * SMALL_BLOCK + 5])
            writes.append(data[position:position + step])
            position += step
        output, _ = compress(data, writes, jobs=2, block_size=SMALL_BLOCK)
        self.assertEqual(gzip.decompress(output), data)

    def test_accepts_bytes_like_objects(self):
        numbers = array.array("I", range(1000))
        pieces = [bytearray(b"abc"), memoryview(b"defgh"), numbers]
        output = io.BytesIO()
        with ParallelGzipWriter(output, jobs=2) as writer:
            self.assertEqual([writer.write(piece) for piece in pieces], [3, 5, 4000])
        self.assertEqual(gzip.decompress(output.getvalue()), b"abcdefgh" + numbers.tobytes())

    def test_level_0_stores(self):
        data = text_like(300_000)
        output, _ = compress(data, level=0, block_size=SMALL_BLOCK)
        self.assertLess(len(output), len(data) + 18 + 5 * (len(data) // 65535 + 20))
        self.assertEqual(gzip.decompress(output), data)

    def test_incompressible_data_is_stored_not_expanded(self):
        data = random_bytes(8 * SMALL_BLOCK)
        for level in (1, 6, 9):
            with self.subTest(level=level):
                output, _ = compress(data, level=level, block_size=SMALL_BLOCK)
                self.assertLess(len(output), len(data) + 200)
                self.assertEqual(gzip.decompress(output), data)

    def test_block_encoding_spends_cpu_only_where_it_pays(self):
        block = 128 * 1024
        part = random_bytes(80 * 1024) + text_like(48 * 1024)
        stored, runs, fast = pgzip.STORED, pgzip.RUNS, pgzip.FAST
        level = lambda n: (n, zlib.Z_DEFAULT_STRATEGY)  # noqa: E731
        table = [
            (random_bytes(block), 6, stored),      # deflate cannot shrink it
            (random_bytes(block), 1, stored),
            (text_like(block), 6, level(6)),       # level 6 pays on text
            (text_like(block), 9, level(9)),
            (text_like(block), 1, fast),
            (text_like(block), 0, stored),
            (semi_compressible(block), 6, runs),   # noise and runs: Z_RLE is enough
            (semi_compressible(block), 1, runs),
            (repeated_tokens(block), 6, fast),     # strings repeat: level 6 gains < 1%
            (bytes(block), 6, runs),
            (b"", 6, level(6)),
        ]
        for data, asked, expected in table:
            with self.subTest(size=len(data), level=asked, expected=expected):
                self.assertEqual(pgzip.block_encoding(data, asked), expected)
        # Compressible data in one third of a block is enough not to store it.
        self.assertNotEqual(pgzip.block_encoding(part, 6), stored)

    def test_every_encoding_round_trips_in_one_stream(self):
        # RUNS blocks are deflated without the preceding 32 KiB as dictionary;
        # the stream must still decode when they sit between primed blocks.
        data = (text_like(150_000) + semi_compressible(150_000) + repeated_tokens(150_000)
                + random_bytes(150_000) + text_like(150_000, seed=9))
        output, _ = compress(data, level=6, jobs=3, block_size=SMALL_BLOCK)
        self.assertEqual(gzip.decompress(output), data)
        self.assertEqual(zlib.decompress(output, 16 + zlib.MAX_WBITS), data)

    def test_stored_deflate_blocks_decode(self):
        for size in (0, 1, 65535, 65536, 200_000):
            data = random_bytes(size)
            with self.subTest(size=size):
                raw = pgzip.stored_deflate(data, last=True)
                self.assertEqual(zlib.decompress(raw, -15), data)

    def test_compressed_size_close_to_gzip(self):
        if not GZIP:
            self.skipTest("gzip is not installed")
        data = mixed(2_000_000, seed=7)
        reference = len(run([GZIP, "-6", "-c"], data))
        output, _ = compress(data, level=6, jobs=2)
        self.assertLess(len(output), reference * 1.02)

    def test_tarfile_in_non_stream_mode(self):
        content = mixed(100_000)
        output = io.BytesIO()
        with ParallelGzipWriter(output, jobs=2, block_size=SMALL_BLOCK) as writer:
            with tarfile.open(fileobj=writer, mode="w") as tar:
                info = tarfile.TarInfo("data.bin")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            self.assertEqual(writer.tell(), writer.size)
        output.seek(0)
        with tarfile.open(fileobj=output, mode="r:gz") as tar:
            self.assertEqual(tar.extractfile("data.bin").read(), content)

    def test_invalid_arguments(self):
        for options in ({"level": 10}, {"level": -1}, {"level": 1.5}, {"jobs": 0},
                        {"block_size": 0}):
            with self.subTest(options=options):
                with self.assertRaises(ValueError):
                    ParallelGzipWriter(io.BytesIO(), **options)


class WriterLifecycleTests(unittest.TestCase):
    """Each test checks that no worker thread outlives its writer."""

    def setUp(self):
        # Threads other test modules may have left running are not ours.
        self.earlier_threads = set(threading.enumerate())

    def tearDown(self):
        self.assertEqual(self.leftover_threads(), [])

    def leftover_threads(self):
        return non_daemon_threads(ignore=self.earlier_threads)

    def test_close_is_idempotent_and_leaves_fileobj_open(self):
        output = io.BytesIO()
        writer = ParallelGzipWriter(output, jobs=2)
        writer.write(b"hello")
        writer.close()
        length = len(output.getvalue())
        writer.close()
        self.assertFalse(output.closed)
        self.assertEqual(len(output.getvalue()), length)
        self.assertTrue(writer.closed)
        with self.assertRaises(ValueError):
            writer.write(b"more")

    def test_context_manager_closes_on_success(self):
        output = io.BytesIO()
        with ParallelGzipWriter(output, jobs=2) as writer:
            writer.write(b"payload")
        self.assertEqual(gzip.decompress(output.getvalue()), b"payload")

    def test_context_manager_aborts_on_exception(self):
        output = io.BytesIO()
        with self.assertRaises(KeyError):
            with ParallelGzipWriter(output, jobs=2, block_size=SMALL_BLOCK) as writer:
                writer.write(mixed(20 * SMALL_BLOCK))
                raise KeyError("boom")
        written = len(output.getvalue())
        self.assertEqual(written, writer.compressed_size)
        writer.abort()
        writer.close()
        self.assertEqual(len(output.getvalue()), written)
        with self.assertRaises(zlib.error):
            zlib.decompress(output.getvalue(), 31)

    def test_pipeline_stays_bounded(self):
        jobs = 3
        writer = ParallelGzipWriter(io.BytesIO(), jobs=jobs, block_size=SMALL_BLOCK)
        data = mixed(40 * SMALL_BLOCK)
        for start in range(0, len(data), 5000):
            writer.write(data[start:start + 5000])
            self.assertLessEqual(len(writer._in_flight), 2 * jobs)
            self.assertLess(len(writer._buffer), SMALL_BLOCK)
        writer.write(data)
        self.assertLessEqual(len(writer._in_flight), 2 * jobs)
        writer.close()

    def test_disk_full_propagates_from_write(self):
        data = random_bytes(SMALL_BLOCK)
        for jobs in (1, 4):
            with self.subTest(jobs=jobs):
                writer = ParallelGzipWriter(DiskFull(limit=50_000), jobs=jobs,
                                            block_size=SMALL_BLOCK)
                with self.assertRaises(OSError) as caught:
                    for _ in range(100):
                        writer.write(data)
                    self.fail("the disk never filled up")
                self.assertEqual(caught.exception.errno, errno.ENOSPC)
                self.assertEqual(self.leftover_threads(), [])
                with self.assertRaises(OSError) as again:
                    writer.write(data)
                self.assertEqual(again.exception.errno, errno.ENOSPC)
                with self.assertRaises(OSError) as again:
                    writer.close()
                self.assertEqual(again.exception.errno, errno.ENOSPC)
                writer.abort()
                writer.abort()
                writer.close()

    def test_disk_full_propagates_from_close(self):
        output = DiskFull(limit=12)
        writer = ParallelGzipWriter(output, jobs=2)
        writer.write(b"small enough to stay buffered until close")
        with self.assertRaises(OSError) as caught:
            writer.close()
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(self.leftover_threads(), [])

    def test_disk_full_inside_context_manager(self):
        with self.assertRaises(OSError) as caught:
            with ParallelGzipWriter(DiskFull(limit=1000), jobs=2, block_size=SMALL_BLOCK) as writer:
                writer.write(random_bytes(10 * SMALL_BLOCK))
        self.assertEqual(caught.exception.errno, errno.ENOSPC)

    def test_worker_exception_propagates_unchanged(self):
        original = pgzip.compress_block
        calls = []

        def failing_compress_block(*args):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("worker failed")
            return original(*args)

        with mock.patch.object(pgzip, "compress_block", failing_compress_block):
            writer = ParallelGzipWriter(io.BytesIO(), jobs=2, block_size=SMALL_BLOCK)
            with self.assertRaisesRegex(MemoryError, "worker failed"):
                for _ in range(50):
                    writer.write(text_like(SMALL_BLOCK))
                writer.close()
        self.assertEqual(self.leftover_threads(), [])

    def test_partial_writes_are_completed(self):
        output = ShortWrites()
        data = mixed(6 * SMALL_BLOCK)
        with ParallelGzipWriter(output, jobs=2, block_size=SMALL_BLOCK) as writer:
            writer.write(data)
        self.assertEqual(gzip.decompress(bytes(output.data)), data)

    def test_an_output_that_takes_nothing_is_an_error_not_a_spin(self):
        output = TakesNothing()
        with self.assertRaisesRegex(pgzip.NoProgressError,
                                    "writing the archive made no progress"):
            pgzip.write_all(output, b"abc")
        self.assertEqual(output.calls, 1)


class CheckpointTests(unittest.TestCase):
    """checkpoint() and rewind(): what was written after a checkpoint is
    taken back; the file, cut to the offset rewind() returns, goes on as if
    it had never been written."""

    DATA = os.urandom(70000) + b"sensor,reading=21.5 " * 30000

    def rewound(self, jobs, block_size, before, taken_back, after):
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=jobs, block_size=block_size)
        gz.write(before)
        checkpoint = gz.checkpoint()
        gz.write(taken_back)
        offset = gz.rewind(checkpoint)
        self.assertLessEqual(offset, len(out.getvalue()))
        out.truncate(offset)
        out.seek(offset)
        gz.write(after)
        gz.close()
        return out.getvalue()

    def test_rewind_takes_back_what_followed(self):
        for jobs in (1, 2, 4):
            for block_size in (4096, 65536, pgzip.DEFAULT_BLOCK_SIZE):
                for cut in (0, 1, 5000, 400000):
                    data = self.rewound(jobs, block_size, self.DATA[:cut], b"garbage" * 50000,
                                        self.DATA[cut:])
                    self.assertEqual(gzip.decompress(data), self.DATA, (jobs, block_size, cut))
                    self.assertEqual(subprocess.run(["gzip", "-t"], input=data).returncode
                                     if shutil.which("gzip") else 0, 0)

    def test_members_can_be_dropped_without_the_ones_after_them(self):
        # Issue 24: each part its own member, so one can be taken out of the
        # middle and the rest still reads as one stream.
        for jobs, block_size in ((1, 4096), (2, 8192), (4, pgzip.DEFAULT_BLOCK_SIZE)):
            with self.subTest(jobs=jobs, block_size=block_size):
                out = io.BytesIO()
                gz = ParallelGzipWriter(out, jobs=jobs, block_size=block_size)
                parts = [self.DATA[:70000], b"", os.urandom(50000), self.DATA[70000:200000]]
                offsets = [gz.end_member()]
                for part in parts:
                    gz.write(part)
                    offsets.append(gz.end_member())
                self.assertEqual(offsets[0], 0)
                self.assertEqual(offsets[-1], len(out.getvalue()))
                self.assertEqual(offsets[1], offsets[2], "an empty part makes no member")
                whole = out.getvalue()
                for part, start, end in zip(parts, offsets, offsets[1:]):
                    self.assertEqual(gzip.decompress(whole[start:end]) if end > start else b"",
                                     part)
                # Drop the third part, keep the fourth, write on after it.
                kept = whole[:offsets[2]] + whole[offsets[3]:offsets[4]]
                out.seek(0)
                out.truncate(0)
                out.write(kept)
                gz.moved_to(len(kept))
                gz.write(b"tail" * 1000)
                gz.close()
                data = out.getvalue()
                expected = parts[0] + parts[3] + b"tail" * 1000
                self.assertEqual(gzip.decompress(data), expected)
                self.assertEqual(b"".join(pgzip.gunzip_chunks(io.BytesIO(data).read, 65536)),
                                 expected)
                self.assertEqual(gz.tell(), sum(map(len, parts)) + 4000)
                if shutil.which("gzip"):
                    self.assertEqual(subprocess.run(["gzip", "-dc"], input=data,
                                                    stdout=subprocess.PIPE).stdout, expected)

    def test_rewind_inside_a_later_member(self):
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=2, block_size=8192)
        gz.write(b"a" * 30000)
        early = gz.checkpoint()
        start = gz.end_member()
        at_start = gz.checkpoint()
        gz.write(os.urandom(30000))
        with self.assertRaisesRegex(ValueError, "before the member under way"):
            gz.rewind(early)
        self.assertEqual(gz.rewind(at_start), start)
        out.truncate(start)
        out.seek(start)
        gz.write(b"b" * 10)
        gz.close()
        self.assertEqual(gzip.decompress(out.getvalue()), b"a" * 30000 + b"b" * 10)
        unended = ParallelGzipWriter(io.BytesIO(), jobs=1)
        self.addCleanup(unended.abort)
        unended.write(b"x")
        with self.assertRaisesRegex(ValueError, "end of a member"):
            unended.moved_to(0)

    def test_rewind_to_an_earlier_of_two_checkpoints(self):
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=2, block_size=8192)
        gz.write(b"a" * 30000)
        first = gz.checkpoint()
        gz.write(b"b" * 30000)
        gz.checkpoint()
        gz.write(os.urandom(30000))
        offset = gz.rewind(first)
        out.truncate(offset)
        out.seek(offset)
        gz.write(b"c" * 10)
        gz.close()
        self.assertEqual(gzip.decompress(out.getvalue()), b"a" * 30000 + b"c" * 10)
        self.assertEqual((gz.size, gz.crc), (30010, zlib.crc32(b"a" * 30000 + b"c" * 10)))

    def test_rewind_to_the_start_writes_the_header_again(self):
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=2, block_size=4096)
        checkpoint = gz.checkpoint()
        gz.write(os.urandom(100000))
        self.assertEqual(gz.rewind(checkpoint), 0)
        out.truncate(0)
        out.seek(0)
        gz.write(b"hello")
        gz.close()
        self.assertEqual(gzip.decompress(out.getvalue()), b"hello")


class DiskFull(io.RawIOBase):
    """Output file that fails with ENOSPC once limit bytes are written."""

    def __init__(self, limit):
        self.limit = limit
        self.written = 0

    def writable(self):
        return True

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return len(data)


class TakesNothing:
    """Raw-file-like output that accepts nothing and says so (returns 0)."""

    calls = 0

    def write(self, data):
        self.calls += 1
        return 0


class ShortWrites:
    """Raw-file-like output that accepts at most 1000 bytes per call."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        accepted = bytes(data[:1000])
        self.data += accepted
        return len(accepted)


class FirstPass:
    """A BlockReuse source over a BytesIO output: its bytes (through
    damage), and spools as temporary files, counted."""

    def __init__(self, out, damage=bytes):
        self.out, self.damage, self.spools = out, damage, 0

    def read_back(self, offset, length):
        return self.damage(self.out.getvalue()[offset:offset + length])

    def spool(self):
        self.spools += 1
        return tempfile.TemporaryFile()


class BlockReuseTests(unittest.TestCase):
    """record_blocks(), then a second pass over the same stretch (after a
    checkpoint, or as a new member) copies the compressed bytes of every
    block whose data and 32 KiB of history are unchanged, and compresses
    the rest: the output is the gzip of what the second pass wrote, byte
    for byte as gzip readers see it (issue 24 Must 4)."""

    DATA = mixed(600_000, seed=24)

    def second_pass(self, before, first, second, jobs=2, damage=bytes):
        """before, a checkpoint, first (recorded), then second written over
        first again (64 KiB blocks; a reused block's bytes pass through
        damage); the second pass moved down as ArchiveOutput.settle()
        does.  Returns (the whole output, the counts)."""
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=jobs, block_size=65536)
        gz.write(before)
        checkpoint = gz.checkpoint()
        gz.record_blocks()
        for piece in first:
            gz.cut_block()
            gz.write(piece)
        base, start = gz.second_pass(checkpoint, FirstPass(out, damage))
        for piece in second:
            gz.cut_block()
            gz.write(piece)
        # Deferred: nothing of the second pass is written before drain().
        self.assertEqual(len(out.getvalue()), start)
        end = gz.drain()
        whole = out.getvalue()
        moved = whole[:base] + whole[start:end]
        out.seek(0)
        out.truncate()
        out.write(moved)
        gz.moved_to(len(moved))
        reuse = gz.forget_blocks()
        gz.write(b"after")
        gz.close()
        return out.getvalue(), reuse

    def assert_gzip_of(self, data, expected):
        self.assertEqual(gzip.decompress(data), expected)
        self.assertEqual(b"".join(pgzip.gunzip_chunks(io.BytesIO(data).read, 65536)), expected)
        if GZIP:
            self.assertEqual(run([GZIP, "-dc"], data), expected)

    def test_an_unchanged_stretch_is_copied_whole(self):
        for jobs in (1, 2, 4):
            for before in (b"", self.DATA[:100_000]):
                with self.subTest(jobs=jobs, before=len(before)):
                    data, reuse = self.second_pass(before, [self.DATA], [self.DATA], jobs)
                    self.assert_gzip_of(data, before + self.DATA + b"after")
                    self.assertEqual((reuse.reused_bytes, reuse.compressed_bytes),
                                     (len(self.DATA), 0))

    def test_only_the_block_that_changed_is_compressed_again(self):
        # A byte changed early in the fourth 64 KiB block: that block alone
        # differs; the next one's history (the last 32 KiB) is unchanged.
        changed = bytearray(self.DATA)
        changed[3 * 65536 + 1000] ^= 0xFF
        data, reuse = self.second_pass(b"head", [self.DATA], [bytes(changed)])
        self.assert_gzip_of(data, b"head" + bytes(changed) + b"after")
        self.assertEqual(reuse.compressed_bytes, 65536)
        self.assertEqual(reuse.reused_bytes, len(self.DATA) - 65536)
        # Changed in its last 32 KiB, it is also the next block's history.
        changed = bytearray(self.DATA)
        changed[4 * 65536 - 10] ^= 0xFF
        data, reuse = self.second_pass(b"head", [self.DATA], [bytes(changed)])
        self.assert_gzip_of(data, b"head" + bytes(changed) + b"after")
        self.assertEqual(reuse.compressed_bytes, 2 * 65536)

    def test_a_cut_keeps_a_large_file_aligned_when_what_precedes_it_grew(self):
        wal, database = self.DATA[:50_000], self.DATA[50_000:]
        data, reuse = self.second_pass(b"", [wal, database], [wal + b"appended" * 100, database])
        self.assert_gzip_of(data, wal + b"appended" * 100 + database + b"after")
        # The grown stretch and the database's first block (its history is
        # the grown end) are compressed again; the rest is copied.
        self.assertEqual(reuse.compressed_bytes, len(wal) + 800 + 65536)
        self.assertEqual(reuse.reused_bytes, len(database) - 65536)

    def test_a_new_member_reuses_the_blocks_of_an_earlier_one(self):
        # --stop all: a part read again is written as a member after the
        # others, reusing the blocks of its first read.
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=2, block_size=65536)
        gz.record_blocks()
        gz.write(self.DATA)
        first_end = gz.end_member()
        gz.reuse_blocks(FirstPass(out))
        changed = bytearray(self.DATA)
        changed[200_000] ^= 1
        gz.write(bytes(changed))
        second_end = gz.end_member()
        reuse = gz.forget_blocks()
        gz.close()
        whole = out.getvalue()
        self.assert_gzip_of(whole[first_end:second_end], bytes(changed))
        self.assertEqual(reuse.compressed_bytes, 65536 + len(self.DATA) % 65536,
                         "the changed block and the member's last (final) block")
        self.assertEqual(reuse.reused_bytes, len(self.DATA) - reuse.compressed_bytes)

    def test_a_reused_block_that_lies_fails_the_crc(self):
        # The trailer's CRC is always of the data written: a copied block
        # whose bytes are not what its digest promised is caught by any
        # gzip reader, never passed off as the data.
        def damaged(compressed):
            data = bytearray(compressed)
            data[len(data) // 2] ^= 0x01
            return bytes(data)
        text = text_like(300_000)
        data, reuse = self.second_pass(b"", [text], [text], damage=damaged)
        self.assertGreater(reuse.reused_blocks, 0)
        with self.assertRaises(GzipError):
            b"".join(pgzip.gunzip_chunks(io.BytesIO(data).read, 65536))

    def test_nothing_is_compressed_until_the_deferred_pass_is_written_out(self):
        # The services are down while the second pass is written: it only
        # looks blocks up and spools those that differ; compressing them
        # waits for drain(), after the services start again.
        calls = []
        real = pgzip.compress_block

        def counting(*args):
            calls.append(len(args[0]))
            return real(*args)
        out = io.BytesIO()
        gz = ParallelGzipWriter(out, jobs=2, block_size=65536)
        checkpoint = gz.checkpoint()
        gz.record_blocks()
        gz.write(self.DATA)
        source = FirstPass(out)
        with mock.patch.object(pgzip, "compress_block", counting):
            base, start = gz.second_pass(checkpoint, source)
            changed = bytearray(self.DATA)
            changed[70_000] ^= 1  # early in the second block: it alone differs
            calls.clear()
            gz.write(bytes(changed))
            gz.cut_block()
            self.assertEqual(calls, [], "compressed while deferred")
            self.assertEqual(source.spools, 1)
            end = gz.drain()
            self.assertEqual(calls, [65536])
        whole = out.getvalue()
        out.seek(0)
        out.truncate()
        out.write(whole[:base] + whole[start:end])
        gz.moved_to(out.tell())
        gz.close()
        self.assert_gzip_of(out.getvalue(), bytes(changed))

    def test_the_digest_covers_the_split_between_history_and_block(self):
        self.assertNotEqual(pgzip.block_digest(b"ab", b"c"), pgzip.block_digest(b"a", b"bc"))
        self.assertEqual(pgzip.block_digest(b"ab", b"c"), pgzip.block_digest(b"ab", b"c"))
        self.assertEqual(len(pgzip.block_digest(b"", b"")), 16)


@unittest.skipUnless(GZIP and TAR, "GNU gzip and tar are required")
class ExternalToolTests(unittest.TestCase):

    def test_gnu_gzip_reads_output(self):
        for name, data in SAMPLES.items():
            for level in (0, 6, 9):
                with self.subTest(sample=name, level=level):
                    output, _ = compress(data, level=level, jobs=4, block_size=SMALL_BLOCK)
                    run([GZIP, "-t"], output)
                    self.assertEqual(run([GZIP, "-dc"], output), data)

    def test_pigz_reads_output(self):
        if not PIGZ:
            self.skipTest("pigz is not installed")
        for name, data in SAMPLES.items():
            with self.subTest(sample=name):
                output, _ = compress(data, jobs=4, block_size=SMALL_BLOCK)
                run([PIGZ, "-t"], output)
                self.assertEqual(run([PIGZ, "-dc"], output), data)

    def test_tar_stream_through_writer(self):
        files = {
            "docker-compose.yml": text_like(3000),
            "volumes/db/data.bin": mixed(300_000),
            "volumes/random.jpg": random_bytes(70_000),
            "empty": b"",
        }
        with tempfile.TemporaryDirectory() as directory:
            archive = os.path.join(directory, "backup.tar.gz")
            with open(archive, "wb") as target:
                with ParallelGzipWriter(target, jobs=2, block_size=SMALL_BLOCK) as writer:
                    with tarfile.open(fileobj=writer, mode="w|") as tar:
                        for name, content in files.items():
                            info = tarfile.TarInfo(name)
                            info.size = len(content)
                            tar.addfile(info, io.BytesIO(content))
            listing = run([TAR, "-tzf", archive]).decode().split()
            self.assertEqual(sorted(listing), sorted(files))
            extracted = os.path.join(directory, "out")
            os.mkdir(extracted)
            run([TAR, "-xzf", archive, "-C", extracted])
            for name, content in files.items():
                with open(os.path.join(extracted, name), "rb") as handle:
                    self.assertEqual(handle.read(), content)
            with tarfile.open(archive, mode="r:gz") as tar:
                for name, content in files.items():
                    self.assertEqual(tar.extractfile(name).read(), content)
            with open(archive, "rb") as source:
                tar_bytes = io.BytesIO(b"".join(iter_gunzip(source)))
                with tarfile.open(fileobj=tar_bytes, mode="r|") as tar:
                    if True:
                        seen = {member.name: tar.extractfile(member).read()
                                for member in tar if member.isfile()}
            self.assertEqual(seen, files)


if __name__ == "__main__":
    unittest.main()
