"""Shared core of backup.py and restore.py for IOTstack.

This module decides what goes into a backup, what archives and logs are
called, and how a stack is paused; it also reads and writes the tar format
itself.  Data safety rests on a few rules kept here: an archive only ever
gets its final name after it was fsynced (and, by default, read back in
full); names are chosen so that nothing is overwritten except the rolling
archive, and that one only by a complete successor; services that were
stopped are started again whatever happens; and one lock serialises every
backup and restore of a stack.  Decisions are made by small pure functions
(names, manifest, exclusions, tar headers) so that they can be table-tested;
the I/O around them is kept thin.
"""
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_WARNINGS = 3
EXIT_BUSY = 4

# Items of a backup, in archive order.  services/ and volumes/ are expected;
# the rest are saved when present.  Directory items end in "/".
REQUIRED_ITEMS = ("services/", "volumes/")
OPTIONAL_ITEMS = (
    "docker-compose.yml", "docker-compose.override.yml", "compose-override.yml",
    ".env", "backup.ini", "extra/", ".tmp/databases_backup/", "postbuild.sh",
    "pre_backup.sh", "post_backup.sh", "post_restore.sh",
)
MANIFEST_ITEMS = REQUIRED_ITEMS + OPTIONAL_ITEMS
ITEM_NAMES = tuple(item.rstrip("/") for item in MANIFEST_ITEMS)

LOCK_NAME = ".tmp/iotstack-backup.lock"
JOURNAL_NAME = ".tmp/restore-journal.json"
STOPPED_MARKER = ".tmp/iotstack-stopped-services.json"
PARTIAL_SUFFIX = ".partial"
ARCHIVE_MODE = 0o640  # archives hold secrets (.env, password files)


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


class ArchiveError(Exception):
    """An archive that cannot be read, is damaged, or is unsafe."""


class Interrupted(BaseException):
    """Raised from a signal handler so that every `finally` still runs."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------
# Finding the stack

def is_stack_dir(path):
    return (os.path.isfile(os.path.join(path, "docker-compose.yml"))
            or os.path.isfile(os.path.join(path, "menu.sh")))


def find_stack_dir(option, environ, cwd, script_dir):
    """The IOTstack directory: --dir, $IOTSTACK, the cwd, then the script's."""
    if option:
        return os.path.abspath(option) if os.path.isdir(option) else None
    if environ.get("IOTSTACK"):
        path = environ["IOTSTACK"]
        return os.path.abspath(path) if os.path.isdir(path) else None
    for candidate in (cwd, script_dir):
        if candidate and is_stack_dir(candidate):
            return os.path.abspath(candidate)
    return None


def locate_stack(option, script_file):
    stack = find_stack_dir(option, os.environ, os.getcwd(),
                           os.path.dirname(os.path.abspath(script_file)))
    if stack is None:
        where = option or os.environ.get("IOTSTACK") or os.getcwd()
        raise UserError(
            "%s is not an IOTstack directory (no docker-compose.yml or menu.sh); "
            "cd into IOTstack or pass --dir" % where)
    return stack


# ---------------------------------------------------------------------------
# Names

def archive_stamp(now):
    return now.strftime("%Y-%m-%d_%H%M")


def rolling_weekday(now):
    """Day of the week with Sunday as 0, as the documentation always said."""
    return now.isoweekday() % 7


def first_free_stem(stem, taken):
    """stem, then stem-2, stem-3...: the first for which taken() is false."""
    candidate, n = stem, 1
    while taken(candidate):
        n += 1
        candidate = "%s-%d" % (stem, n)
    return candidate


def dated_archive_path(backups, stem):
    return os.path.join(backups, "backup", "%s.tar.gz" % stem)


def rolling_archive_path(backups, now):
    return os.path.join(backups, "rolling", "backup_%d.tar.gz" % rolling_weekday(now))


def log_path(backups, stem):
    return os.path.join(backups, "logs", "%s.log" % stem)


def partial_path(final):
    folder, name = os.path.split(final)
    return os.path.join(folder, ".%s.%d%s" % (name, os.getpid(), PARTIAL_SUFFIX))


def is_partial_name(name):
    return name.startswith(".backup_") and name.endswith(PARTIAL_SUFFIX)


DATED_NAME = re.compile(r"^backup_(\d{4}-\d{2}-\d{2}_\d{4})(?:-(\d+))?\.tar\.gz$")


def dated_backups_to_remove(names, keep, just_written=None):
    """The dated archives beyond the newest `keep`, by the time in their name
    (not mtime, which a copy can change); -2, -3... of one minute are newer
    than the plain name.  Other files are never chosen, and neither is the
    archive just written, even if a clock set back makes it look old."""
    if keep is None:
        return []
    dated = []
    for name in names:
        match = DATED_NAME.match(name)
        if match and name != just_written:
            dated.append((match.group(1), int(match.group(2) or 1), name))
    dated.sort(reverse=True)
    if just_written is not None and DATED_NAME.match(just_written):
        keep -= 1
    return [name for _stamp, _n, name in dated[max(keep, 0):]]


# ---------------------------------------------------------------------------
# Manifest and exclusions

def manifest_items(exists):
    """(items to archive, required items that are missing), in archive order."""
    items = [item for item in MANIFEST_ITEMS if exists(item.rstrip("/"))]
    missing = [item for item in REQUIRED_ITEMS if item not in items]
    return items, missing


def is_excluded(rel, patterns):
    """True when a pattern matches the path relative to the stack, or its name.

    A pattern ending in "/" matches directories only: the caller passes
    directory paths with a trailing "/".
    """
    name = rel.rstrip("/").rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/") and not rel.endswith("/"):
            continue
        bare = pattern.rstrip("/") if pattern.endswith("/") else pattern
        target = rel.rstrip("/")
        if fnmatch.fnmatchcase(target, bare.lstrip("./") if bare.startswith("./") else bare):
            return True
        if "/" not in bare and fnmatch.fnmatchcase(name, bare):
            return True
    return False


# Items by their first path component: item_of runs once per member.
_ITEMS_BY_TOP = {}
for _item in ITEM_NAMES:
    _ITEMS_BY_TOP.setdefault(_item.partition("/")[0], []).append(_item)


def item_of(path):
    """The manifest item a member path belongs to, or None."""
    for item in _ITEMS_BY_TOP.get(path.partition("/")[0], ()):
        if path == item or path.startswith(item + "/"):
            return item
    return None


# ---------------------------------------------------------------------------
# Tar format: writing.  Names are stored relative to the stack directory,
# owners by number with empty names, mtimes in whole seconds; POSIX ustar
# with pax records only where a field does not fit.

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
TYPE_FILE, TYPE_HARDLINK, TYPE_SYMLINK = b"0", b"1", b"2"
TYPE_CHAR, TYPE_BLOCK, TYPE_DIR, TYPE_FIFO = b"3", b"4", b"5", b"6"
_MAX_OCTAL7 = 0o7777777
_MAX_OCTAL11 = 0o77777777777


def pax_record(key, value):
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def split_ustar_name(name):
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


def header_checksum(header):
    """The sum of the 512 bytes of a header, computed in C: Adler-32's low
    half is 1 + the sum of the bytes modulo 65521, exact for 256 bytes (at
    most 65280), so two halves give the whole sum."""
    return ((zlib.adler32(header[:256]) & 0xFFFF) - 1
            + (zlib.adler32(header[256:]) & 0xFFFF) - 1)


def _ustar_block(name, prefix, typeflag, mode, uid, gid, size, mtime, linkname,
                 devmajor=0, devminor=0):
    header = _USTAR_FIELDS.pack(
        name, b"%07o" % mode, b"%07o" % uid, b"%07o" % gid, b"%011o" % size,
        b"%011o" % mtime, b"        ", typeflag, linkname, b"ustar\x0000", b"", b"",
        b"%07o" % devmajor, b"%07o" % devminor, prefix, b"")
    return b"%s%06o\0 %s" % (header[:148], header_checksum(header), header[156:])


def tar_header(name, typeflag, mode, uid, gid, size, mtime, linkname=b"",
               devmajor=0, devminor=0):
    """The header block(s) of one member: a pax header first when needed."""
    records = []
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


# ---------------------------------------------------------------------------
# Walking the tree

class Entry:
    __slots__ = ("rel", "path", "st")

    def __init__(self, rel, path, st):
        self.rel, self.path, self.st = rel, path, st


def iter_entries(stack, items, patterns, excluded, notes):
    """Every entry below the manifest items, depth first in name order.

    Symlinks are never followed, except a top-level directory item that is a
    symlink (a volumes/ moved to an SSD): the original's "./volumes/" made tar
    follow it, and a backup of a bare link would hold no data.
    """
    for item in items:
        rel = item.rstrip("/")
        path = os.path.join(stack, rel)
        st = os.lstat(path)
        if item.endswith("/") and stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except OSError:
                pass
            else:
                if stat.S_ISDIR(st.st_mode):
                    notes.append("%s is a symlink to %s: its contents are saved as %s"
                                 % (rel, os.path.realpath(path), item))
        if is_excluded(rel + "/" if stat.S_ISDIR(st.st_mode) else rel, patterns):
            excluded.append(rel)
            continue
        yield Entry(rel, path, st)
        if stat.S_ISDIR(st.st_mode):
            yield from _iter_dir(rel, path, patterns, excluded)


def _iter_dir(rel, path, patterns, excluded):
    # A stack of directory listings rather than recursion: each entry is
    # yielded once, not passed up through a generator per level of depth.
    listings = [(rel, _sorted_listing(path))]
    while listings:
        parent, children = listings[-1]
        for child in children:
            child_rel = parent + "/" + child.name
            st = child.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if patterns and is_excluded(child_rel + "/" if is_dir else child_rel, patterns):
                excluded.append(child_rel)
                continue
            yield Entry(child_rel, child.path, st)
            if is_dir:
                listings.append((child_rel, _sorted_listing(child.path)))
                break
        else:
            listings.pop()


def _sorted_listing(path):
    with os.scandir(path) as it:
        return iter(sorted(it, key=lambda e: e.name))


class ArchiveStats:
    def __init__(self):
        self.members = 0
        self.files = 0
        self.bytes = 0
        self.excluded = []
        self.notes = []
        self.warnings = []


# Small members are gathered and handed on in batches of about this size:
# one call per member would cost more than the member's own bytes.
WRITE_BATCH = 128 * 1024
READ_CHUNK = 1 << 20


def write_tar(out, stack, items, patterns, progress, stats):
    """Write the tar stream of the manifest items to out; fill stats."""
    first_of_inode = {}
    batch = bytearray()
    batch_bytes = batch_files = 0
    for entry in iter_entries(stack, items, patterns, stats.excluded, stats.notes):
        if len(batch) >= WRITE_BATCH:
            out.write(batch)
            batch.clear()
            progress.update(batch_bytes, batch_files)
            batch_bytes = batch_files = 0
        st = entry.st
        fmt = stat.S_IFMT(st.st_mode)
        name = os.fsencode(entry.rel)
        mode = stat.S_IMODE(st.st_mode)
        mtime = st.st_mtime_ns // 1_000_000_000
        if fmt == stat.S_IFREG:
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = first_of_inode.get(key)
                if first is not None:
                    batch += tar_header(name, TYPE_HARDLINK, mode, st.st_uid, st.st_gid,
                                        0, mtime, first)
                    stats.members += 1
                    continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                stats.warnings.append("cannot read %s: %s" % (entry.rel, e.strerror))
                continue
            try:
                size = st.st_size
                batch += tar_header(name, TYPE_FILE, mode, st.st_uid, st.st_gid, size, mtime)
                data = os.read(fd, size) if size <= READ_CHUNK else b""
                if len(data) == size:
                    batch += data  # most files: read whole, one copy into the batch
                else:
                    out.write(batch)
                    batch.clear()
                    out.write(data)
                    _copy_rest(out, fd, size - len(data), entry.rel, stats)
                batch += bytes(-size % BLOCK)
            finally:
                os.close(fd)
            if st.st_nlink > 1:
                first_of_inode[key] = name
            stats.files += 1
            stats.bytes += size
            batch_bytes += size
            batch_files += 1
        elif fmt == stat.S_IFDIR:
            batch += tar_header(name + b"/", TYPE_DIR, mode, st.st_uid, st.st_gid, 0, mtime)
        elif fmt == stat.S_IFLNK:
            target = os.fsencode(os.readlink(entry.path))
            batch += tar_header(name, TYPE_SYMLINK, mode, st.st_uid, st.st_gid, 0, mtime, target)
        elif fmt == stat.S_IFIFO:
            batch += tar_header(name, TYPE_FIFO, mode, st.st_uid, st.st_gid, 0, mtime)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            typeflag = TYPE_CHAR if fmt == stat.S_IFCHR else TYPE_BLOCK
            batch += tar_header(name, typeflag, mode, st.st_uid, st.st_gid, 0, mtime, b"",
                                os.major(st.st_rdev), os.minor(st.st_rdev))
        else:
            stats.notes.append("skipped socket %s" % entry.rel if fmt == stat.S_IFSOCK
                               else "skipped %s: unsupported file type" % entry.rel)
            continue
        stats.members += 1
    batch += ZERO_BLOCK * 2
    out.write(batch)
    progress.update(batch_bytes, batch_files)


def _copy_rest(out, fd, remaining, rel, stats):
    """Copy a large file's remaining bytes in chunks; a file that shrank
    since it was stat'ed is padded with zeros to the size in its header."""
    while remaining:
        chunk = os.read(fd, min(remaining, READ_CHUNK))
        if not chunk:
            stats.warnings.append("%s shrank while being read: padded with zeros" % rel)
            out.write(bytes(remaining))
            return
        out.write(chunk)
        remaining -= len(chunk)


# ---------------------------------------------------------------------------
# Tar format: reading.  Our own parser, so that every header is checked the
# same way on every Python version, and nothing is extracted by tarfile.

class TarMember:
    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime",
                 "linkname", "devmajor", "devminor", "offset")

    def __repr__(self):
        return "TarMember(%r, %r)" % (self.name, self.type)


_OCTAL = re.compile(rb"[0-7]+")
_MAX_MTIME = 1 << 40  # about 35,000 years either side of 1970
_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink",
          b"3": "chardev", b"4": "blockdev", b"5": "dir", b"6": "fifo"}


# The numeric fields of almost every header GNU tar (or backup.py) writes:
# mode, uid, gid, size and mtime as zero-padded octal, each NUL-terminated.
# One match reads all five; anything else takes parse_number field by field.
_PLAIN_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0")


def parse_number(field):
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


def pax_number(records, key, default):
    """A whole number from a pax record, or ArchiveError."""
    if key not in records:
        return default
    text = records[key]
    try:
        value = int(float(text)) if key == b"mtime" else int(text)
    except (ValueError, OverflowError):
        value = None
    if value is None or (value < 0 and key != b"mtime"):
        raise ArchiveError("invalid pax %s %r" % (key.decode(), text))
    return value


def header_checksum_ok(block):
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


def parse_pax(data):
    records = {}
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


class _ChunkStream:
    """Bytes from an iterator of chunks, read exactly or skipped."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _fill(self):
        for chunk in self._chunks:
            if chunk:
                self._buf, self._pos = chunk, 0
                return True
        return False

    def read(self, n):
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

    def pieces(self, n):
        """Memoryviews totalling n bytes; ArchiveError if the stream ends."""
        if len(self._buf) - self._pos >= n:
            # A small member lies in the current chunk: one slice, no generator.
            view = memoryview(self._buf)[self._pos:self._pos + n]
            self._pos += n
            self.offset += n
            return (view,)
        return self._pieces(n)

    def _pieces(self, n):
        while n:
            if self._pos >= len(self._buf) and not self._fill():
                raise ArchiveError("archive is truncated: the tar data ends early")
            take = min(n, len(self._buf) - self._pos)
            view = memoryview(self._buf)[self._pos:self._pos + take]
            self._pos += take
            self.offset += take
            n -= take
            yield view

    def skip(self, n):
        for _ in self.pieces(n):
            pass

    def drain(self):
        for _ in self._chunks:
            pass


class TarReader:
    """Iterate over members; data() yields a member's bytes while it is current."""

    def __init__(self, chunks):
        self._stream = _ChunkStream(chunks)
        self._pending = 0  # unread data + padding of the current member
        self.members = 0

    def __iter__(self):
        stream = self._stream
        overrides = {}
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
    def _member(block, typeflag, size, overrides, offset, plain):
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

    def data(self, member):
        """The member's bytes as memoryview pieces; only while it is current."""
        self._pending = -member.size % BLOCK
        return self._stream.pieces(member.size)


def open_archive_chunks(fileobj):
    """Decompressed chunks of a .tar.gz, with gzip problems as ArchiveError."""
    from parallel_gzip import GzipError, iter_gunzip
    try:
        yield from iter_gunzip(fileobj)
    except GzipError as e:
        raise ArchiveError(str(e)) from None


def drop_cache(fd, offset=0, length=0):
    """Ask the kernel to forget cached pages, so a read-back reads the disk."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class FollowingVerifier:
    """Reads an archive back from disk while it is still being written.

    The writer reports how far the file is fsynced; this thread drops those
    pages from the cache, reads them from the disk, inflates them (gzip CRC
    at the end) and parses every tar header, so most of the read-back is
    done by the time the last block is written.  finish() waits for the
    rest and checks the member count.
    """

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._durable = 0
        self._finished = False
        self._cancelled = False
        self._offset = 0
        self.members = None
        self.error = None
        self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
        self._thread.start()

    def advance(self, durable, finished=False):
        with self._cond:
            self._durable = durable
            self._finished = finished
            self._cond.notify()

    def finish(self, size, expected_members):
        self.advance(size, finished=True)
        self._thread.join()
        os.close(self._fd)
        if self.error is not None:
            raise self.error
        if self.members != expected_members:
            raise ArchiveError("archive holds %d members, %d were written"
                               % (self.members, expected_members))
        return self.members

    def cancel(self):
        with self._cond:
            self._cancelled = True
            self._cond.notify()
        self._thread.join()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _read(self, size):
        with self._cond:
            while self._offset >= self._durable and not self._finished and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise ArchiveError("verification cancelled")
            end = self._durable
        if self._offset >= end:
            return b""
        length = min(size, end - self._offset)
        drop_cache(self._fd, self._offset, length)
        data = os.pread(self._fd, length, self._offset)
        if not data:
            raise ArchiveError("the archive on disk is shorter than what was written")
        self._offset += len(data)
        return data

    def _run(self):
        from parallel_gzip import GzipError, gunzip_chunks
        try:
            reader = TarReader(gunzip_chunks(self._read, 256 * 1024))
            for _member in reader:
                pass
            self.members = reader.members
        except GzipError as e:
            self.error = ArchiveError(str(e))
        except (ArchiveError, OSError) as e:
            self.error = e if isinstance(e, ArchiveError) else ArchiveError(str(e))


# ---------------------------------------------------------------------------
# Files

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackgroundSync:
    """Runs sync(done) on a background thread each time another `step`
    bytes were reported by wrote() (never two at once: while one runs, the
    data keeps coming and the next takes it all), so the disk writes while
    the work goes on and a final sync finds little left.  done is how many
    bytes had been reported when that sync began.  The thread starts at the
    first step (small jobs need none); close() stops it after the sync it
    may be running, and must come before the final sync; an OSError from
    sync ends the thread and is raised by the next wrote() or close()."""

    thread_name = "background-sync"

    def __init__(self, step, sync):
        self.step = step
        self.reported = 0
        self.syncs = 0
        self._sync = sync
        self._asked_at = 0
        self._wanted = threading.Event()
        self._closing = False
        self._error = None
        self._thread = None

    def wrote(self, nbytes):
        if self._error is not None:
            raise self._error
        self.reported += nbytes
        if self.reported - self._asked_at >= self.step:
            self._asked_at = self.reported
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name,
                                                daemon=True)
                self._thread.start()
            self._wanted.set()

    def _run(self):
        while True:
            self._wanted.wait()
            if self._closing:
                return
            self._wanted.clear()
            try:
                self._sync(self.reported)
            except OSError as error:
                self._error = error
                return
            self.syncs += 1

    def close(self):
        self._closing = True
        if self._thread is not None:
            self._wanted.set()
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class FileSink(BackgroundSync):
    """An unbuffered, counting file writer (the gzip writer buffers) that
    fdatasyncs in the background every sync_every bytes; with on_durable it
    then reports how much of the file is on disk (what was written before
    the call), for a FollowingVerifier."""

    thread_name = "archive-sync"

    def __init__(self, fd, on_durable=None, sync_every=16 << 20):
        super().__init__(sync_every, self._fdatasync)
        self.fd = fd
        self.on_durable = on_durable

    @property
    def written(self):
        return self.reported

    def _fdatasync(self, done):
        os.fdatasync(self.fd)
        if self.on_durable is not None:
            self.on_durable(done)

    def write(self, data):
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            # Counted as it goes: a sync reports only what it covers.
            self.reported += n
        self.wrote(0)
        return len(data)

    def flush(self):
        pass


def ensure_dir(path, owner):
    """Create a folder of ours if needed; as root give it to the owner.

    Folders left to root by the old script are given back too (IOTstack #254).
    """
    created = False
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        created = True
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    return created


def chown_to(path, owner):
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


# ---------------------------------------------------------------------------
# Users

class Owner:
    def __init__(self, name, uid, gid):
        self.name, self.uid, self.gid = name, uid, gid

    def __repr__(self):
        return "Owner(%r, %d, %d)" % (self.name, self.uid, self.gid)


def lookup_owner(name):
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UserError("unknown user %r" % name, EXIT_USAGE) from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def default_owner_name(stack, environ):
    """$SUDO_USER, else the owner of the IOTstack directory."""
    sudo_user = environ.get("SUDO_USER")
    if sudo_user and sudo_user != "root":
        return sudo_user, "$SUDO_USER"
    uid = os.stat(stack).st_uid
    try:
        return pwd.getpwuid(uid).pw_name, "owner of %s" % stack
    except KeyError:
        return "root", "default"


def choose_owner(requested, stack, ask):
    """The user the output belongs to when running as root; None otherwise.

    ask(prompt, default) is called only on a terminal with no user given.
    Returns (Owner or None, how it was chosen).
    """
    if os.geteuid() != 0:
        return None, "not root: files belong to the running user"
    if requested:
        return lookup_owner(requested), "given"
    name, source = default_owner_name(stack, os.environ)
    if sys.stdin is not None and sys.stdin.isatty():
        answer = ask("Owner of the backup files [%s]: " % name, name)
        if answer and answer != name:
            return lookup_owner(answer), "typed"
        return lookup_owner(name), "default (%s), confirmed" % source
    return lookup_owner(name), "default (%s), no terminal to ask" % source


# ---------------------------------------------------------------------------
# Lock

@contextlib.contextmanager
def stack_lock(stack, owner=None):
    """One backup or restore per stack.  flock dies with the process."""
    tmp = os.path.join(stack, ".tmp")
    if not os.path.isdir(tmp):
        os.makedirs(tmp, exist_ok=True)
        if owner is not None:
            os.chown(tmp, owner.uid, owner.gid)
    path = os.path.join(stack, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError("cannot open the lock file %s: %s" % (path, e.strerror)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise UserError("another backup or restore is running on %s%s"
                            % (stack, " (%s)" % holder if holder else ""), EXIT_BUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, ("%s pid %d since %s\n" % (os.path.basename(sys.argv[0]), os.getpid(),
                                                  time.strftime("%H:%M:%S"))).encode(), 0)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Signals

@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGHUP raise Interrupted once; later ones are ignored so
    that the clean-up they triggered (restarting services) can finish."""
    def handler(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------
# Hooks

def run_hook(stack, name, log):
    """Run ./name with bash if present; its output goes to the log.

    Returns None when there is no hook, else the exit status.
    """
    path = os.path.join(stack, name)
    if not os.path.isfile(path):
        return None
    log.line("Running %s" % name)
    with subprocess.Popen(["bash", "./" + name], cwd=stack, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for raw in proc.stdout:
            log.line("  %s: %s" % (name, raw.decode("utf-8", "replace").rstrip("\n")))
    status = proc.returncode
    log.line("%s exited with status %d" % (name, status))
    return status


# ---------------------------------------------------------------------------
# Docker Compose

class StackUnavailable(Exception):
    """docker or its daemon cannot be used; the caller goes on without it."""


def _last_line(text):
    """The last line that says something: where docker puts the cause."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def compose_command(run=subprocess.run):
    """["docker", "compose"] (v2), ["docker-compose"] (v1), or StackUnavailable."""
    if shutil.which("docker"):
        try:
            probe = run(["docker", "compose", "version"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            probe = None
        if probe is not None and probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise StackUnavailable("neither 'docker compose' nor 'docker-compose' was found")


class Compose:
    """The compose project in the stack directory."""

    def __init__(self, stack, command):
        self.stack = stack
        self.command = command

    def _run(self, *args, timeout=600):
        try:
            result = subprocess.run(self.command + list(args), cwd=self.stack,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StackUnavailable("%s %s: %s" % (" ".join(self.command), args[0], e)) from None
        if result.returncode != 0:
            cause = _last_line(result.stderr.decode("utf-8", "replace"))
            raise StackUnavailable("%s %s failed: %s" % (" ".join(self.command), args[0], cause))
        return result.stdout.decode("utf-8", "replace")

    def running_services(self):
        out = self._run("ps", "--services", "--filter", "status=running", timeout=120)
        return sorted({line.strip() for line in out.splitlines() if line.strip()})

    def stop(self, services):
        if services:
            self._run("stop", *services)

    def start(self, services):
        if services:
            self._run("start", *services)


def open_compose(stack, log):
    """A Compose for the stack, or None (logged) when docker cannot be used."""
    try:
        return Compose(stack, compose_command())
    except StackUnavailable as e:
        log.line("Docker: %s; carrying on without stopping services" % e)
        return None


def write_json_atomically(path, data):
    temp = path + ".new"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)
    fsync_dir(os.path.dirname(path))


def restart_left_stopped(stack, log, out=None):
    """Start the services that a killed run stopped and could not restart.

    The marker is written before `stop` and removed after `start`, so only a
    run that died in between (kill -9, power cut) leaves it behind.
    """
    marker = os.path.join(stack, STOPPED_MARKER)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker + ".new")  # killed before its rename: never in force
    try:
        with open(marker, encoding="utf-8") as f:
            services = json.load(f)["services"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):
        services = []
    if services:
        compose = open_compose(stack, log)
        try:
            if compose is None:
                raise StackUnavailable("docker cannot be used")
            compose.start(services)
            message = "Started %s again: an interrupted run had stopped them" % ", ".join(services)
        except StackUnavailable as e:
            message = ("Warning: an interrupted run left %s stopped and they could not be "
                       "started: %s" % (", ".join(services), e))
        log.line(message)
        if out is not None:
            out.write(message + "\n")
    os.unlink(marker)


@contextlib.contextmanager
def services_stopped(compose, log, report, stack=None):
    """Stop the running services; start exactly those again on the way out,
    whatever happens inside (errors, Ctrl-C, SIGTERM).  report is a dict that
    receives 'stopped', 'started' and 'restart_error'.  With stack given, a
    marker in .tmp/ lets the next run restart them after a kill -9."""
    report.setdefault("stopped", [])
    report.setdefault("started", [])
    if compose is None:
        yield
        return
    try:
        running = compose.running_services()
    except StackUnavailable as e:
        log.line("Docker: %s; carrying on without stopping services" % e)
        yield
        return
    log.line("Services running: %s" % (", ".join(running) or "none"))
    stopped = []
    marker = os.path.join(stack, STOPPED_MARKER) if stack else None
    try:
        if running:
            if marker:
                write_json_atomically(marker, {"services": running})
            try:
                compose.stop(running)
                stopped = running
            except StackUnavailable as e:
                # Some may have stopped: start them all again afterwards.
                stopped = running
                report.setdefault("warnings", []).append("could not stop services: %s" % e)
                log.line("Warning: could not stop services: %s" % e)
            report["stopped"] = stopped
            log.line("Services stopped: %s" % ", ".join(stopped))
        yield
    finally:
        if stopped:
            try:
                compose.start(stopped)
                report["started"] = stopped
                log.line("Services started again: %s" % ", ".join(stopped))
                if marker:
                    os.unlink(marker)
            except StackUnavailable as e:
                report["restart_error"] = str(e)
                log.line("ERROR: services could not be started again (%s): %s"
                         % (", ".join(stopped), e))


# ---------------------------------------------------------------------------
# Log and progress

class RunLog:
    """Lines for the log file; opened in append mode, so never truncated."""

    def __init__(self, path=None):
        self.path = path
        self.lines = []
        self._file = None
        if path is not None:
            self._file = open(path, "a", encoding="utf-8", errors="replace")

    def line(self, text):
        self.lines.append(text)
        if self._file is not None:
            try:
                self._file.write(text + "\n")
                self._file.flush()
            except OSError:
                pass  # a full disk must not hide the real error

    def field(self, name, value):
        self.line("%s: %s" % (name, value))

    def close(self):
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1000.0
    return "%.1f TB" % n


class NoProgress:
    def update(self, nbytes, nfiles):
        pass

    def finish(self):
        pass


class TerminalProgress:
    """One line on stderr, redrawn at most five times a second."""

    def __init__(self, total_bytes=0, total_files=0, stream=None, label=""):
        self.stream = stream or sys.stderr
        self.total_bytes, self.total_files = total_bytes, total_files
        self.bytes = self.files = 0
        self.start = self.last = time.monotonic()
        self.label = label

    def update(self, nbytes, nfiles):
        self.bytes += nbytes
        self.files += nfiles
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        elapsed = max(now - self.start, 1e-6)
        rate = self.bytes / elapsed
        eta = ""
        if self.total_bytes and rate > 0:
            left = max(self.total_bytes - self.bytes, 0) / rate
            eta = "  ETA %d:%02d" % divmod(int(left), 60)
        self.stream.write("\r%s%s  %d files  %s/s%s\033[K" % (
            self.label, human_size(self.bytes), self.files, human_size(rate), eta))
        self.stream.flush()

    def finish(self):
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def tree_totals(stack, items, patterns):
    """(bytes, files) under the items: a quick pass for the progress ETA."""
    total = files = 0
    for entry in iter_entries(stack, items, patterns, [], []):
        if stat.S_ISREG(entry.st.st_mode):
            total += entry.st.st_size
            files += 1
    return total, files


def host_folder():
    """The per-host folder at a copy's destination, so Pis can share one."""
    return socket.gethostname().split(".")[0] or "localhost"


def now_local():
    return datetime.datetime.now()


def say_error(prog, message):
    sys.stderr.write("%s: error: %s\n" % (prog, message))


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(error):
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
