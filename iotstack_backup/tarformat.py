"""The tar format: encoding headers and reading members, nothing else.

Names are stored relative to the stack directory, owners by number,
mtimes in whole seconds; POSIX ustar, with pax records only where a field
does not fit, so GNU tar, Python's tarfile and IOTstack's old restore.sh
read what we write.  TarReader is our own parser, so that every header is
checked the same way on every Python version (3.9's tarfile has no
extraction filters, 3.14 changed the default): checksums, numbers, sizes,
owners and times out of range, truncation, each an ArchiveError.  Nothing
here knows about IOTstack, and nothing here writes a file.
"""
from __future__ import annotations

import re
import struct
import zlib

# typing is only read by the type checker (mypy treats this name as True):
# the annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Iterator, Optional


class ArchiveError(Exception):
    """An archive that cannot be read, is damaged, or is unsafe."""


BLOCK = 512


ZERO_BLOCK = bytes(BLOCK)


TYPE_FILE, TYPE_HARDLINK, TYPE_SYMLINK = b"0", b"1", b"2"


TYPE_CHAR, TYPE_BLOCK, TYPE_DIR, TYPE_FIFO = b"3", b"4", b"5", b"6"


_MAX_OCTAL7 = 0o7777777


_MAX_OCTAL11 = 0o77777777777


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def split_ustar_name(name: bytes) -> Optional[tuple[bytes, bytes]]:
    """(prefix, name) fitting ustar's 155 + 100 bytes, or None."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    slash = name.find(b"/", len(name) - 101)
    while slash != -1:
        if slash <= 155 and 0 < len(name) - slash - 1 <= 100:
            return name[:slash], name[slash + 1:]
        slash = name.find(b"/", slash + 1)
    return None


_USTAR_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12s")


def header_checksum(header: bytes) -> int:
    """The sum of the 512 bytes of a header, computed in C: Adler-32's low
    half is 1 + the sum of the bytes modulo 65521, exact for 256 bytes (at
    most 65280), so two halves give the whole sum."""
    return ((zlib.adler32(header[:256]) & 0xFFFF) - 1
            + (zlib.adler32(header[256:]) & 0xFFFF) - 1)


def _ustar_block(name: bytes, prefix: bytes, typeflag: bytes, mode: int, uid: int, gid: int,
                 size: int, mtime: int, linkname: bytes, devmajor: int = 0,
                 devminor: int = 0) -> bytes:
    header = _USTAR_FIELDS.pack(
        name, b"%07o" % mode, b"%07o" % uid, b"%07o" % gid, b"%011o" % size,
        b"%011o" % mtime, b"        ", typeflag, linkname, b"ustar\x0000", b"", b"",
        b"%07o" % devmajor, b"%07o" % devminor, prefix, b"")
    return b"%s%06o\0 %s" % (header[:148], header_checksum(header), header[156:])


def tar_header(name: bytes, typeflag: bytes, mode: int, uid: int, gid: int, size: int,
               mtime: int, linkname: bytes = b"", devmajor: int = 0,
               devminor: int = 0) -> bytes:
    """The header block(s) of one member: a pax header first when needed."""
    records: list[bytes] = []
    split = split_ustar_name(name)
    if split is None:
        records.append(pax_record(b"path", name))
        split = (b"", name[-100:].lstrip(b"/") or b"x")
    if len(linkname) > 100:
        records.append(pax_record(b"linkpath", linkname))
        linkname = linkname[:100]
    if uid > _MAX_OCTAL7:
        records.append(pax_record(b"uid", b"%d" % uid))
        uid = 0
    if gid > _MAX_OCTAL7:
        records.append(pax_record(b"gid", b"%d" % gid))
        gid = 0
    if size > _MAX_OCTAL11:
        records.append(pax_record(b"size", b"%d" % size))
        size = 0
    if not 0 <= mtime <= _MAX_OCTAL11:
        records.append(pax_record(b"mtime", b"%d" % mtime))
        mtime = 0 if mtime < 0 else _MAX_OCTAL11
    block = _ustar_block(split[1], split[0], typeflag, mode, uid, gid, size,
                         mtime, linkname, devmajor, devminor)
    if not records:
        return block
    data = b"".join(records)
    pax_name = (b"PaxHeaders/" + split[1])[:100]
    return (_ustar_block(pax_name, b"", b"x", 0o644, 0, 0, len(data), max(mtime, 0), b"")
            + data + bytes(-len(data) % BLOCK) + block)


class TarMember:
    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime",
                 "linkname", "devmajor", "devminor", "offset")
    name: str
    type: str  # "file", "hardlink", "symlink", "chardev", "blockdev", "dir" or "fifo"
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str
    devmajor: int
    devminor: int
    offset: int  # of the member's first header in the tar stream

    def __repr__(self) -> str:
        return "TarMember(%r, %r)" % (self.name, self.type)


_OCTAL = re.compile(rb"[0-7]+")


_MAX_MTIME = 1 << 40  # about 35,000 years either side of 1970


_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink",
          b"3": "chardev", b"4": "blockdev", b"5": "dir", b"6": "fifo"}


# The numeric fields of almost every header GNU tar (or backup.py) writes:
# mode, uid, gid, size and mtime as zero-padded octal, each NUL-terminated.
# One match reads all five; anything else takes parse_number field by field.
_PLAIN_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0")


def parse_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field, "big")
        if field[0] & 0x40:
            value -= 1 << (8 * len(field))
        else:
            value &= (1 << (8 * len(field) - 1)) - 1
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if _OCTAL.fullmatch(text) is None:  # int() would also take "-1", "+7", "7_7"
        raise ArchiveError("invalid number %r in a tar header" % text)
    return int(text, 8)


def pax_number(records: dict[bytes, bytes], key: bytes, default: int) -> int:
    """A whole number from a pax record, or ArchiveError."""
    if key not in records:
        return default
    text = records[key]
    value: Optional[int]
    try:
        value = int(float(text)) if key == b"mtime" else int(text)
    except (ValueError, OverflowError):
        value = None
    if value is None or (value < 0 and key != b"mtime"):
        raise ArchiveError("invalid pax %s %r" % (key.decode(), text))
    return value


def header_checksum_ok(block: bytes) -> bool:
    """Unsigned sums are the standard; old tars summed signed bytes."""
    field = block[148:156]
    unsigned = header_checksum(block) - sum(field) + 8 * 32
    if field == b"%06o\0 " % unsigned:  # as GNU tar, tarfile and backup.py write it
        return True
    stored = parse_number(field)
    if stored == unsigned:
        return True
    high = sum(1 for b in block if b > 127) - sum(1 for b in field if b > 127)
    return stored == unsigned - 256 * high


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space == -1:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError("invalid pax header") from None
        if length <= 0 or pos + length > len(data):
            raise ArchiveError("invalid pax header")
        record = data[space + 1:pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep:
            raise ArchiveError("invalid pax header")
        records[key] = value
        pos += length
    return records


class ChunkStream:
    """Bytes from an iterator of chunks, read exactly or skipped."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf, self._pos = chunk, 0
                return True
        return False

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the stream."""
        if len(self._buf) - self._pos >= n:
            data = self._buf[self._pos:self._pos + n]
            self._pos += n
            self.offset += n
            return data
        parts = []
        while n:
            if self._pos >= len(self._buf) and not self._fill():
                break
            piece = self._buf[self._pos:self._pos + n]
            self._pos += len(piece)
            n -= len(piece)
            parts.append(piece)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def pieces(self, n: int) -> Iterable[memoryview]:
        """Memoryviews totalling n bytes; ArchiveError if the stream ends."""
        if len(self._buf) - self._pos >= n:
            # A small member lies in the current chunk: one slice, no generator.
            view = memoryview(self._buf)[self._pos:self._pos + n]
            self._pos += n
            self.offset += n
            return (view,)
        return self._pieces(n)

    def _pieces(self, n: int) -> Iterator[memoryview]:
        while n:
            if self._pos >= len(self._buf) and not self._fill():
                raise ArchiveError("archive is truncated: the tar data ends early")
            take = min(n, len(self._buf) - self._pos)
            view = memoryview(self._buf)[self._pos:self._pos + take]
            self._pos += take
            self.offset += take
            n -= take
            yield view

    def skip(self, n: int) -> None:
        for _ in self.pieces(n):
            pass

    def drain(self) -> None:
        for _ in self._chunks:
            pass


class TarReader:
    """Iterate over members; data() yields a member's bytes while it is current."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._stream = ChunkStream(chunks)
        self._pending = 0  # unread data + padding of the current member
        self.members = 0

    def __iter__(self) -> Iterator[TarMember]:
        stream = self._stream
        overrides: dict[bytes, bytes] = {}
        while True:
            if self._pending:
                stream.skip(self._pending)
                self._pending = 0
            offset = stream.offset
            block = stream.read(BLOCK)
            if not block:
                break  # no end-of-archive blocks: accepted, as GNU tar does
            if len(block) < BLOCK:
                raise ArchiveError("archive is truncated: a tar header is cut short")
            if block == ZERO_BLOCK:
                break
            if not header_checksum_ok(block):
                raise ArchiveError("corrupt tar header at byte %d of the tar stream" % offset)
            typeflag = block[156:157]
            plain = _PLAIN_NUMBERS.match(block, 100)
            size = int(plain.group(4), 8) if plain else parse_number(block[124:136])
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > 16 << 20:
                    raise ArchiveError("oversized extended header at byte %d" % offset)
                data = stream.read(size)
                if len(data) < size:
                    raise ArchiveError("archive is truncated: the tar data ends early")
                stream.skip(-size % BLOCK)
                if typeflag == b"x":
                    overrides.update(parse_pax(data))
                elif typeflag == b"L":
                    overrides[b"path"] = data.split(b"\0", 1)[0]
                elif typeflag == b"K":
                    overrides[b"linkpath"] = data.split(b"\0", 1)[0]
                continue  # global pax headers carry nothing we apply
            member = self._member(block, typeflag, size, overrides, offset, plain)
            overrides = {}
            self._pending = (member.size + -member.size % BLOCK) if member.type == "file" else 0
            self.members += 1
            yield member
        self._pending = 0
        stream.drain()

    @staticmethod
    def _member(block: bytes, typeflag: bytes, size: int, overrides: dict[bytes, bytes],
                offset: int, plain: Optional[re.Match[bytes]]) -> TarMember:
        kind = _KINDS.get(typeflag)
        if kind is None:
            raise ArchiveError("unsupported tar member type %r at byte %d" % (typeflag, offset))
        m = TarMember()
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        name = overrides.get(b"path", name)
        if kind == "file" and name.endswith(b"/"):
            kind = "dir"
        m.name = name.decode("utf-8", "surrogateescape")
        m.type = kind
        if plain:
            mode, uid, gid, _size, mtime = [int(group, 8) for group in plain.groups()]
        else:
            mode, uid, gid, mtime = [parse_number(block[start:end]) for start, end in
                                     ((100, 108), (108, 116), (116, 124), (136, 148))]
        m.mode = mode & 0o7777
        if overrides:
            m.uid = pax_number(overrides, b"uid", uid)
            m.gid = pax_number(overrides, b"gid", gid)
            m.size = pax_number(overrides, b"size", size)
            m.mtime = pax_number(overrides, b"mtime", mtime)
        else:
            m.uid, m.gid, m.size, m.mtime = uid, gid, size, mtime
        link = overrides.get(b"linkpath", block[157:257].split(b"\0", 1)[0])
        m.linkname = link.decode("utf-8", "surrogateescape")
        if kind in ("chardev", "blockdev"):
            m.devmajor = parse_number(block[329:337])
            m.devminor = parse_number(block[337:345])
        else:
            m.devmajor = m.devminor = 0
        m.offset = offset
        if m.size < 0:
            raise ArchiveError("negative size in tar header at byte %d" % offset)
        # Values the kernel cannot take would fail later as a traceback.
        if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF
                and -_MAX_MTIME < m.mtime < _MAX_MTIME):
            raise ArchiveError("owner or time out of range in tar header at byte %d" % offset)
        return m

    def data(self, member: TarMember) -> Iterable[memoryview]:
        """The member's bytes as memoryview pieces; only while it is current."""
        self._pending = -member.size % BLOCK
        return self._stream.pieces(member.size)
