"""Writing an archive: walk the tree, stream it as tar.gz, read it back.

write_archive walks the manifest items depth first in name order (segments,
when given, move some subtrees to the end, each read between two callbacks:
backup.py stops a group of services only while its data is read), encodes
each entry with tarformat, compresses the stream with pgzip's parallel
writer and writes it to a new temporary file.  How it keeps data safe: the
file is created with O_EXCL under a name no glob of backups matches; a
background thread fdatasyncs it every 16 MiB, and a FollowingVerifier reads
each synced stretch back from the disk (page cache dropped) and checks the
gzip CRC and every tar header while the rest is still being written, so an
archive is only ever reported good after its bytes were read from the disk.
Files that cannot be read, or that shrink while read, become warnings, never
a short archive.
"""
import contextlib
import errno
import os
import stat
import threading
import time

from . import iotstack
from .iotstack import is_excluded
from .pgzip import GzipError, ParallelGzipWriter, gunzip_chunks
from .tarformat import (
    BLOCK,
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_FILE,
    TYPE_HARDLINK,
    TYPE_SYMLINK,
    ZERO_BLOCK,
    ArchiveError,
    TarReader,
    tar_header,
)


class Entry:
    __slots__ = ("rel", "path", "st")

    def __init__(self, rel, path, st):
        self.rel, self.path, self.st = rel, path, st


def iter_entries(stack, items, patterns, excluded, notes, warnings=None, defer=frozenset(),
                 deferred=None):
    """Every entry below the manifest items, depth first in name order.

    Symlinks are never followed, except a top-level directory item that is a
    symlink (a volumes/ moved to an SSD): the original's "./volumes/" made tar
    follow it, and a backup of a bare link would hold no data.  A live tree
    changes and holds folders of other users: a folder that cannot be read
    is a warning naming it (its entry is kept, its contents are not), an
    entry gone between listing and reading is a note.  Entries whose path is
    in defer are not yielded nor entered: they go, as the walk met them,
    into the list deferred, for iter_segments to read later.
    """
    if warnings is None:
        warnings = notes
    for item in items:
        rel = item.rstrip("/")
        path = os.path.join(stack, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            notes.append("%s vanished before it was read: not saved" % rel)
            continue
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
        if rel in defer:
            deferred.append(Entry(rel, path, st))
            continue
        yield Entry(rel, path, st)
        if stat.S_ISDIR(st.st_mode):
            yield from _iter_dir(rel, path, patterns, excluded, notes, warnings, defer, deferred)


def _iter_dir(rel, path, patterns, excluded, notes, warnings, defer=frozenset(), deferred=None):
    # A stack of directory listings rather than recursion: each entry is
    # yielded once, not passed up through a generator per level of depth.
    listings = [(rel, _sorted_listing(path, rel, notes, warnings))]
    while listings:
        parent, children = listings[-1]
        for child in children:
            child_rel = parent + "/" + child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                notes.append("%s vanished before it was read: not saved" % child_rel)
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if patterns and is_excluded(child_rel + "/" if is_dir else child_rel, patterns):
                excluded.append(child_rel)
                continue
            if defer and child_rel in defer:
                deferred.append(Entry(child_rel, child.path, st))
                continue
            yield Entry(child_rel, child.path, st)
            if is_dir:
                listings.append((child_rel, _sorted_listing(child.path, child_rel, notes,
                                                            warnings)))
                break
        else:
            listings.pop()


def _sorted_listing(path, rel, notes, warnings):
    try:
        with os.scandir(path) as it:
            return iter(sorted(it, key=lambda e: e.name))
    except FileNotFoundError:
        notes.append("%s vanished before it was read: not saved" % rel)
    except OSError as e:
        warnings.append(walk_warning(rel, e))
    return iter(())


def walk_warning(rel, error):
    """The warning for an entry of the tree that cannot be read."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return ("cannot read %s: %s (not saved; a container's private folder: run the "
                "backup with sudo to include it)" % (rel, error.strerror))
    return "cannot read %s: %s (not saved)" % (rel, error.strerror or error)


def changed_while_read(before, after):
    """Whether a file changed while it was read (GNU tar's "file changed as
    we read it"): its size or mtime is not what it was when it was listed."""
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


class Segment:
    """A part of the archive written after the rest: the entries at roots
    (paths relative to the stack) and everything below them, read between
    before() and after().  The writer knows nothing of what the callbacks
    do (backup.py stops and starts services with them)."""

    __slots__ = ("roots", "before", "after")

    def __init__(self, roots, before=None, after=None):
        self.roots, self.before, self.after = frozenset(roots), before, after


def iter_segments(stack, items, patterns, stats, segments=()):
    """The entries of iter_entries, reordered: first everything outside the
    segments' roots, then each segment's subtrees in turn, with before()
    called just before its first entry is yielded and after() as soon as
    the caller has asked for the entry after its last (so has read the
    last).  A segment whose roots the walk never met (excluded, missing,
    behind a symlink) is skipped, callbacks and all.  The same entries as
    iter_entries, so the same members; only their order changes, and a
    parent directory always comes before what it holds."""
    defer = frozenset(root for segment in segments for root in segment.roots)
    deferred = []
    yield from iter_entries(stack, items, patterns, stats.excluded, stats.notes, stats.warnings,
                            defer, deferred)
    for segment in segments:
        found = [entry for entry in deferred if entry.rel in segment.roots]
        if not found:
            continue
        if segment.before is not None:
            segment.before()
        for entry in found:
            fresh = _restat(entry, stats)
            if fresh is None:
                continue
            yield fresh
            if stat.S_ISDIR(fresh.st.st_mode):
                yield from _iter_dir(fresh.rel, fresh.path, patterns, stats.excluded, stats.notes,
                                     stats.warnings)
        if segment.after is not None:
            segment.after()


def _restat(entry, stats):
    """The entry as it is now: it was met by the walk, maybe seconds before
    its segment is read (and before its service stopped)."""
    try:
        st = os.lstat(entry.path)
        if stat.S_ISLNK(st.st_mode) and stat.S_ISDIR(entry.st.st_mode):
            st = os.stat(entry.path)  # a top-level item the walk followed
    except FileNotFoundError:
        stats.warnings.append("%s disappeared before it was read" % entry.rel)
        return None
    return Entry(entry.rel, entry.path, st)


class ArchiveStats:
    def __init__(self):
        self.members = 0
        self.bytes = 0
        self.excluded = []
        self.notes = []
        self.warnings = []


# Small members are gathered and handed on in batches of about this size:
# one call per member would cost more than the member's own bytes.
WRITE_BATCH = 128 * 1024


READ_CHUNK = 1 << 20


def write_tar(out, stack, items, patterns, progress, stats, segments=()):
    """Write the tar stream of the manifest items to out, in the order of
    iter_segments; fill stats."""
    first_of_inode = {}
    batch = bytearray()
    batch_bytes = batch_files = 0
    for entry in iter_segments(stack, items, patterns, stats, segments):
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
            except FileNotFoundError:
                stats.notes.append("%s vanished before it was read: not saved" % entry.rel)
                continue
            except OSError as e:
                stats.warnings.append(walk_warning(entry.rel, e))
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
                    # A large file reports as it goes, so the line keeps moving.
                    progress.update(len(data), 0)
                    _copy_rest(out, fd, size - len(data), entry.rel, stats, progress)
                    batch_bytes -= size  # already reported
                batch += bytes(-size % BLOCK)
                if changed_while_read(st, os.fstat(fd)):
                    stats.warnings.append("%s changed while it was read: the backup holds "
                                          "its first %d bytes" % (entry.rel, size))
            finally:
                os.close(fd)
            if st.st_nlink > 1:
                first_of_inode[key] = name
            stats.bytes += size
            batch_bytes += size
            batch_files += 1
        elif fmt == stat.S_IFDIR:
            batch += tar_header(name + b"/", TYPE_DIR, mode, st.st_uid, st.st_gid, 0, mtime)
        elif fmt == stat.S_IFLNK:
            try:
                target = os.fsencode(os.readlink(entry.path))
            except FileNotFoundError:
                stats.notes.append("%s vanished before it was read: not saved" % entry.rel)
                continue
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
    if patterns:
        # What was left out, for restore.py to leave in place.
        record = iotstack.excludes_record(patterns, stats.excluded)
        batch += tar_header(os.fsencode(iotstack.EXCLUDES_MEMBER), TYPE_FILE, 0o644,
                            os.geteuid(), os.getegid(), len(record), int(time.time()))
        batch += record + bytes(-len(record) % BLOCK)
        stats.members += 1
    batch += ZERO_BLOCK * 2
    out.write(batch)
    progress.update(batch_bytes, batch_files)


def _copy_rest(out, fd, remaining, rel, stats, progress):
    """Copy a large file's remaining bytes in chunks, reporting each; a file
    that shrank since it was stat'ed is padded with zeros to the size in its
    header."""
    while remaining:
        chunk = os.read(fd, min(remaining, READ_CHUNK))
        if not chunk:
            stats.warnings.append("%s shrank while being read: padded with zeros" % rel)
            out.write(bytes(remaining))
            progress.update(remaining, 0)
            return
        out.write(chunk)
        progress.update(len(chunk), 0)
        remaining -= len(chunk)


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
        self._held = False
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

    def hold(self):
        """Pause reading back (until release or finish): while a segment is
        read the CPU goes to reading and compressing, so it ends sooner;
        the verifier catches up afterwards."""
        with self._cond:
            self._held = True

    def release(self):
        with self._cond:
            self._held = False
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
            while ((self._offset >= self._durable or self._held)
                   and not self._finished and not self._cancelled):
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
        try:
            reader = TarReader(gunzip_chunks(self._read, 256 * 1024))
            for _member in reader:
                pass
            self.members = reader.members
        except GzipError as e:
            self.error = ArchiveError(str(e))
        except (ArchiveError, OSError) as e:
            self.error = e if isinstance(e, ArchiveError) else ArchiveError(str(e))


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


def _both(first, then):
    """A callback calling first() then then(), either of them None."""
    def both():
        for call in (first, then):
            if call is not None:
                call()
    return both


def tree_totals(stack, items, patterns):
    """(bytes, files) under the items: a quick pass for the progress ETA."""
    total = files = 0
    for entry in iter_entries(stack, items, patterns, [], []):
        if stat.S_ISREG(entry.st.st_mode):
            total += entry.st.st_size
            files += 1
    return total, files


def write_archive(stack, items, args, owner, temp, progress, stats, segments=()):
    """Write the tar.gz to temp, fsynced and owned; unless --no-verify, read
    it back from disk as it goes.  segments: see iter_segments.  Returns its
    size."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, iotstack.ARCHIVE_MODE)
    verifier = sink = None
    try:
        if not args.no_verify:
            verifier = FollowingVerifier(temp)
        sink = FileSink(fd, verifier.advance if verifier else None)
        if verifier is not None:
            segments = [Segment(seg.roots, _both(verifier.hold, seg.before),
                                _both(seg.after, verifier.release)) for seg in segments]
        gz = ParallelGzipWriter(sink, level=args.level, jobs=args.jobs)
        try:
            write_tar(gz, stack, items, args.exclude, progress, stats, segments)
            gz.close()
        except BaseException:
            gz.abort()
            raise
        sink.close()  # its last report must not follow the verifier's finish
        os.fsync(fd)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, iotstack.ARCHIVE_MODE)
        if verifier is not None:
            finishing, verifier = verifier, None
            finishing.finish(sink.written, stats.members)
        return sink.written
    finally:
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.close()  # no thread syncs a closed (or reused) descriptor
        if verifier is not None:
            verifier.cancel()
        os.close(fd)
