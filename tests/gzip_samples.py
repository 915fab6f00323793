"""Data the gzip tests compress: text-like, random, mixed and repeated
samples of chosen sizes around the test block size, and compress(), which
gzips through a ParallelGzipWriter.  Shared by test_pgzip.py (the writer)
and test_gunzip.py (the checked reader)."""
import io
import random

from iotstack_backup.pgzip import ParallelGzipWriter

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
