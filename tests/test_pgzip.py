"""Tests for iotstack_backup.pgzip: gzip compatibility, error propagation, checks."""

import array
import errno
import fcntl
import gc
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
from iotstack_backup.pgzip import (
    CorruptGzipError,
    EmptyArchiveError,
    GzipError,
    NotGzipError,
    ParallelGzipWriter,
    TruncatedGzipError,
    iter_gunzip,
)

GZIP = shutil.which("gzip")
TAR = shutil.which("tar")
PIGZ = shutil.which("pigz")

SMALL_BLOCK = 16 * 1024


def text_like(size, seed=1):
    """Log-file-like lines: compressible about 3:1."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]
    lines = []
    length = 0
    while length < size:
        line = "2024-05-%02d %02d:%02d sensor=%s value=%d %s\n" % (
            rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), rng.choice(words),
            rng.randint(0, 10 ** 6), " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))))
        lines.append(line)
        length += len(line)
    return "".join(lines).encode()[:size]


def random_bytes(size, seed=2):
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") if size else b""


def semi_compressible(size, seed=3):
    """Per 4 KiB: 35% random bytes, then a run of one byte."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += random_bytes(1434, rng.randrange(10 ** 9))
        out += bytes([rng.randrange(256)]) * (4096 - 1434)
    return bytes(out[:size])


def repeated_tokens(size, seed=5):
    """Random 16-byte tokens drawn from a vocabulary of 300: strings repeat,
    but no slow search finds longer matches than a quick one does."""
    rng = random.Random(seed)
    vocabulary = [random_bytes(16, rng.randrange(10 ** 9)) for _ in range(300)]
    return b"".join(rng.choice(vocabulary) for _ in range(size // 16 + 1))[:size]


def mixed(size, seed=4):
    rng = random.Random(seed)
    makers = [text_like, text_like, semi_compressible, semi_compressible, random_bytes]
    parts = []
    length = 0
    while length < size:
        part = rng.choice(makers)(rng.randint(10_000, 100_000), rng.randrange(10 ** 9))
        parts.append(part)
        length += len(part)
    return b"".join(parts)[:size]


def compress(data, writes=None, **options):
    """Gzip data through a ParallelGzipWriter; return (output, writer)."""
    output = io.BytesIO()
    writer = ParallelGzipWriter(output, **options)
    for piece in writes if writes is not None else [data]:
        writer.write(piece)
    writer.close()
    return output.getvalue(), writer


def run(command, data=None):
    return subprocess.run(command, input=data, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=True).stdout


def non_daemon_threads(ignore=()):
    return [thread for thread in threading.enumerate()
            if not thread.daemon and thread is not threading.main_thread()
            and thread not in ignore]


def live_reader_threads(ignore=()):
    return [thread for thread in threading.enumerate()
            if thread.name == "gzip-reader" and thread.is_alive() and thread not in ignore]


SAMPLES = {
    "empty": b"",
    "one byte": b"x",
    "block - 1": text_like(SMALL_BLOCK - 1),
    "block": text_like(SMALL_BLOCK),
    "block + 1": text_like(SMALL_BLOCK + 1),
    "3 blocks": text_like(3 * SMALL_BLOCK),
    "random": random_bytes(5 * SMALL_BLOCK + 7),
    "zeros": bytes(6 * SMALL_BLOCK),
    "mixed": mixed(10 * SMALL_BLOCK),
}


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


@unittest.skipUnless(GZIP and TAR, "GNU gzip and tar are required")
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
