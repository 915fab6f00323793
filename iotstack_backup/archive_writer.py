"""Writing an archive: walk the tree, stream it as tar.gz, read it back.

write_archive walks the manifest items depth first in name order (segments,
when given, move some subtrees to the end, around two callbacks: backup.py
stops a group of services only while its data is checked), encodes each
entry with tarformat, compresses the stream with pgzip's parallel writer
and writes it to a new temporary file.  A segment is read while its
services run, then, once they are stopped, confirmed by a stat walk; a part
that changed is cut out of the file and read again with them stopped, so
the archive holds each group as it was when stopped.  A segment of several
parts (--stop all) writes each part as gzip members of its own: a changed
part's members are cut out and the confirmed ones after it moved down in
the file (compressed bytes, not the tree, are read), so a part the stat
walk confirms is never read again, whatever its place; gzip, GNU tar and
restore.sh read the members as one stream.  How it keeps data safe: the
file is created with O_EXCL under a name no glob of backups matches; a
background thread fdatasyncs it every 16 MiB, and a FollowingVerifier reads
each synced stretch back from the disk (page cache dropped) and checks the
gzip CRC and every tar header while the rest is still being written, so an
archive is only ever reported good after its bytes were read from the disk.
Files that cannot be read, or that shrink while read, become warnings, never
a short archive.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import threading
import time

from . import incomplete, iotstack
from .incomplete import Unread
from .iotstack import is_excluded
from .children import NoProgressError
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


# Every entry is opened relative to the directory the walk opened it in,
# never through a path: a directory swapped for a symlink between the
# listing and the read (by anyone who may write in volumes/) is never
# followed, so a run as root never pulls another folder into the archive.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Entry:
    """An entry of the tree as the walk met it: rel, its name in the
    archive; st, its lstat (for a directory, the fstat of the directory the
    walk opened); name in the directory open as dir_fd, where it is opened
    without following a symlink (the descriptor is valid while the entry is
    written; a deferred entry owns a copy until close_entries).  follow: a
    top-level item that is a symlink to a folder (volumes/ on an SSD),
    followed as planned, and only to the folder it led to then."""

    __slots__ = ("rel", "st", "dir_fd", "name", "follow")

    def __init__(self, rel: str, st: os.stat_result, dir_fd: int, name: str,
                 follow: bool = False):
        self.rel, self.st, self.dir_fd, self.name, self.follow = rel, st, dir_fd, name, follow


class WalkLog:
    """Where a walk puts what it leaves out and what it has to say."""

    __slots__ = ("excluded", "notes", "warnings")

    def __init__(self, excluded: list, notes: list, warnings: list):
        self.excluded, self.notes, self.warnings = excluded, notes, warnings

    def vanished(self, rel: str) -> None:
        self.notes.append(vanished(rel))


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
    into the list deferred (each holding a descriptor of its folder: see
    close_entries), for write_tar to read later.
    """
    log = WalkLog(excluded, notes, notes if warnings is None else warnings)
    root = os.open(stack, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for item in items:
            entry = _item_entry(root, stack, item, patterns, log)
            if entry is None:
                continue
            try:
                if entry.rel in defer:
                    deferred.append(_kept(entry))
                else:
                    yield from _walk(entry, patterns, log, defer, deferred)
            finally:
                if entry.dir_fd != root:
                    os.close(entry.dir_fd)
    finally:
        os.close(root)


def _item_entry(root: int, stack: str, item: str, patterns, log: WalkLog):
    """The Entry of a manifest item (None: missing or excluded).  Its
    folders inside the stack (.tmp of .tmp/databases_backup) are opened
    without following a symlink (the caller closes that descriptor, the
    entry's dir_fd, when it is not root); the item itself is followed when
    it is a top-level folder given with a slash (volumes/) and is a symlink
    to a folder."""
    rel = item.rstrip("/")
    parent, name = root, rel
    if "/" in rel:
        folder, name = rel.rsplit("/", 1)
        try:
            parent = _open_below(root, folder)
        except FileNotFoundError:
            log.vanished(rel)
            return None
        except OSError as e:
            log.warnings.append(walk_warning(rel, e))
            return None
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        follow = False
        if item.endswith("/") and stat.S_ISLNK(st.st_mode) and "/" not in rel:
            with contextlib.suppress(OSError):
                target = os.stat(name, dir_fd=parent)
                if stat.S_ISDIR(target.st_mode):
                    st, follow = target, True
                    log.notes.append("%s is a symlink to %s: its contents are saved as %s"
                                     % (rel, os.path.realpath(os.path.join(stack, rel)), item))
    except FileNotFoundError:
        log.vanished(rel)
        st = None
    if st is None or is_excluded(rel + "/" if stat.S_ISDIR(st.st_mode) else rel, patterns):
        if st is not None:
            log.excluded.append(rel)
        if parent != root:
            os.close(parent)
        return None
    return Entry(rel, st, parent, name, follow)


def _open_below(root: int, folder: str) -> int:
    """A descriptor of folder (relative to root), each component opened
    without following a symlink (ELOOP or ENOTDIR when one is)."""
    fd = root
    for part in folder.split("/"):
        try:
            fd_next = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            if fd != root:
                os.close(fd)
        fd = fd_next
    return fd


def _kept(entry: Entry) -> Entry:
    """entry with its own copy of its folder's descriptor, to read later."""
    return Entry(entry.rel, entry.st, os.dup(entry.dir_fd), entry.name, entry.follow)


def close_entries(entries) -> None:
    """Close the descriptors of entries made by _kept (the deferred ones)."""
    for entry in entries:
        with contextlib.suppress(OSError):
            os.close(entry.dir_fd)


def _walk(entry: Entry, patterns, log: WalkLog, defer=frozenset(), deferred=None):
    """entry and, when it is a folder, everything below it, depth first in
    name order (deferred entries aside).  A stack of open folders and their
    listings rather than recursion: each entry is yielded once, not passed
    up through a generator per level of depth."""
    if not stat.S_ISDIR(entry.st.st_mode):
        yield entry
        return
    fd, entry = _open_listed_dir(entry, log)
    if entry is not None:
        yield entry
    if fd is None:
        return
    listings = [(entry.rel, fd, _sorted_listing(fd, entry.rel, log))]
    try:
        while listings:
            parent, dir_fd, children = listings[-1]
            for child in children:
                found = _listed(child, parent, dir_fd, patterns, log)
                if found is None:
                    continue
                if defer and found.rel in defer:
                    deferred.append(_kept(found))
                    continue
                if not stat.S_ISDIR(found.st.st_mode):
                    yield found
                    continue
                sub, found = _open_listed_dir(found, log)
                if found is not None:
                    yield found
                if sub is not None:
                    listings.append((found.rel, sub, _sorted_listing(sub, found.rel, log)))
                    break
            else:
                listings.pop()
                os.close(dir_fd)
    finally:
        for _parent, dir_fd, _children in listings:
            os.close(dir_fd)


def _listed(child: os.DirEntry, parent: str, dir_fd: int, patterns, log: WalkLog):
    """The Entry of a folder's child (its lstat, relative to the folder's
    descriptor), or None when it is gone or excluded."""
    rel = parent + "/" + child.name
    try:
        st = child.stat(follow_symlinks=False)
    except FileNotFoundError:
        log.vanished(rel)
        return None
    if patterns and is_excluded(rel + "/" if stat.S_ISDIR(st.st_mode) else rel, patterns):
        log.excluded.append(rel)
        return None
    return Entry(rel, st, dir_fd, child.name)


def _open_listed_dir(entry: Entry, log: WalkLog):
    """(descriptor, entry as opened) for a folder the walk listed, opened
    without following a symlink (a followed item: only to the folder it
    led to when listed).  No longer a folder: (None, the entry as it is now,
    a symlink saved as one, with a warning), or (None, None) when gone.  A
    folder that cannot be opened: (None, entry), with a warning."""
    flags = DIR_FLAGS & ~os.O_NOFOLLOW if entry.follow else DIR_FLAGS
    try:
        fd = os.open(entry.name, flags, dir_fd=entry.dir_fd)
    except FileNotFoundError:
        log.vanished(entry.rel)
        return None, None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return None, _as_it_is_now(entry, log)
        log.warnings.append(walk_warning(entry.rel, e, incomplete.UNREADABLE_FOLDER))
        return None, entry
    st = os.fstat(fd)
    if entry.follow and (st.st_dev, st.st_ino) != (entry.st.st_dev, entry.st.st_ino):
        os.close(fd)
        return None, _as_it_is_now(entry, log)
    return fd, Entry(entry.rel, st, entry.dir_fd, entry.name, entry.follow)


def _as_it_is_now(entry: Entry, log: WalkLog):
    """The entry listed as a folder, now something else (lstat again, never
    followed), or None when it is gone."""
    try:
        st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        log.vanished(entry.rel)
        return None
    if stat.S_ISLNK(st.st_mode):
        log.warnings.append(became_symlink_warning(entry.rel, entry.follow))
    elif stat.S_ISDIR(st.st_mode):
        log.warnings.append(Unread("%s changed while it was listed: its contents are not "
                                   "saved" % entry.rel, entry.rel, incomplete.CHANGED))
    return Entry(entry.rel, st, entry.dir_fd, entry.name)


def became_symlink_warning(rel: str, followed: bool = False) -> str:
    if followed:
        return ("%s now leads to another folder than when the backup began: saved as the "
                "symlink, not followed" % rel)
    return ("%s was a folder when the backup began and is a symlink now: saved as the "
            "symlink, not followed (something replaced it while the backup ran)" % rel)


def _sorted_listing(fd: int, rel: str, log: WalkLog):
    try:
        with os.scandir(fd) as it:
            return iter(sorted(it, key=lambda e: e.name))
    except FileNotFoundError:
        log.vanished(rel)
    except OSError as e:
        log.warnings.append(walk_warning(rel, e, incomplete.UNREADABLE_FOLDER))
    return iter(())


def walk_warning(rel, error, kind=incomplete.UNREADABLE):
    """The warning for an entry of the tree that cannot be read (an
    Unread: the archive records that it lacks it)."""
    if error.errno in (errno.EACCES, errno.EPERM):
        what = "private folder" if kind == incomplete.UNREADABLE_FOLDER else "private file"
        return Unread("cannot read %s: %s (not saved; a container's %s: run the backup with "
                      "sudo to include it)" % (rel, error.strerror, what), rel, kind)
    return Unread("cannot read %s: %s (not saved)" % (rel, error.strerror or error), rel, kind)


def vanished(rel):
    return Unread("%s vanished before it was read: not saved" % rel, rel, incomplete.VANISHED)


def changed_while_read(before, after):
    """Whether a file changed while it was read (GNU tar's "file changed as
    we read it"): its size or mtime is not what it was when it was listed."""
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


class Segment:
    """A part of the archive written after the rest: the entries at roots
    (paths relative to the stack) and everything below them, read around
    before() and after().  parts splits the roots into pieces that are
    confirmed, or read again, one by one (by default all roots are one
    part); report(reread), when given, hears the roots of the parts that
    were read again after before(), and reused (set after construction)
    how much of them was copied from the live read.  The writer knows nothing of what the
    callbacks do (backup.py stops and starts services with them)."""

    __slots__ = ("roots", "before", "after", "parts", "report", "reused")

    def __init__(self, roots, before=None, after=None, parts=None, report=None):
        self.roots, self.before, self.after = frozenset(roots), before, after
        self.parts = (self.roots,) if parts is None else tuple(frozenset(p) for p in parts)
        self.report = report
        # reused(counts), when given, hears after after() how much of what
        # was read again reused the live read's compressed blocks
        # (pgzip.BlockReuse).
        self.reused = None


def iter_part(found, patterns, stats):
    """The entries at and below `found` (entries the first walk deferred),
    as they are now: the walk met them, maybe seconds before this part is
    read (and before its services stopped).  Each is looked at again in
    the folder the walk met it in, never through a symlink that was not
    there then."""
    log = WalkLog(stats.excluded, stats.notes, stats.warnings)
    for entry in found:
        fresh = _relisted(entry, stats)
        if fresh is not None:
            yield from _walk(fresh, patterns, log)


def _relisted(entry: Entry, stats):
    """A deferred entry as it is now (None: gone).  A followed item is
    followed again only to the folder it led to when listed; a folder that
    became a symlink is that symlink, with a warning."""
    try:
        if entry.follow:
            st = os.stat(entry.name, dir_fd=entry.dir_fd)
            if (st.st_dev, st.st_ino) == (entry.st.st_dev, entry.st.st_ino):
                return Entry(entry.rel, st, entry.dir_fd, entry.name, True)
        st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        stats.warnings.append(Unread("%s disappeared before it was read" % entry.rel,
                                     entry.rel, incomplete.VANISHED))
        return None
    if stat.S_ISLNK(st.st_mode) and stat.S_ISDIR(entry.st.st_mode):
        stats.warnings.append(became_symlink_warning(entry.rel, entry.follow))
    return Entry(entry.rel, st, entry.dir_fd, entry.name)


# An entry changed this shortly before it was read may change again, after
# the read, without its stat showing it: timestamps move in steps (a kernel
# tick, two seconds on FAT), and a file written through mmap (a database's
# pages) gets a new ctime only when a clean page is first written again,
# which the kernel's writeback makes of a dirty page within about 35
# seconds.  A part holding such an entry is never confirmed by its stat: it
# is read again with its services stopped.
RACY_NS = 60 * 10**9


def stat_key(entry):
    """What a confirmation compares of an entry: any write, rename, chmod,
    chown, link or unlink changes one of these (ctime at the least)."""
    st = entry.st
    return b"%s\0%o %d %d %d %d %d %d %d\n" % (
        os.fsencode(entry.rel), st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
        st.st_ctime_ns, st.st_uid, st.st_gid)


def fingerprint(entries):
    """A digest of the entries' stat_keys, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for entry in entries:
        digest.update(stat_key(entry))
    return digest.digest()


class LiveFingerprint:
    """The fingerprint of a part's entries as they were read while their
    services ran, and whether one was changed too recently (RACY_NS) for
    a later stat to prove it unchanged since."""

    def __init__(self):
        self._digest = hashlib.blake2b(digest_size=16)
        self.racy = False

    def track(self, entries):
        update = self._digest.update
        for entry in entries:
            if entry.st.st_ctime_ns > time.time_ns() - RACY_NS:
                self.racy = True
            update(stat_key(entry))
            yield entry

    def digest(self):
        return self._digest.digest()


def newest_change(found, patterns):
    """The latest ctime at or below the entries `found`: a stat walk."""
    return max((entry.st.st_ctime_ns for entry in iter_part(found, patterns, ArchiveStats())),
               default=0)


def reading_order(newest_changes):
    """The order to read parts in, by index: the least recently changed
    first, so the parts likeliest to change while read live come last and
    a change found after the stop takes back the least."""
    return sorted(range(len(newest_changes)), key=lambda i: (newest_changes[i], i))


def first_changed(reads, patterns):
    """The index of the first part, of (part, checkpoint, mark, live
    fingerprint) in archive order, that is not as it was read: racy, or
    its fingerprint now differs.  None when all are confirmed."""
    for index, (part, _checkpoint, _mark, live) in enumerate(reads):
        if live.racy or fingerprint(iter_part(part, patterns, ArchiveStats())) != live.digest():
            return index
    return None


# A part as it was read live: where its gzip member(s) lie in the output
# (start, end), the tar marks around it and its live fingerprint.
PartRead = collections.namedtuple("PartRead", "part start end mark end_mark live")


def parts_to_read_again(reads, patterns):
    """The indexes of the parts (PartReads, in archive order) to read again:
    those not as they were read (racy, or a fingerprint that differs now).
    No member of a part is a hard link into another part (TarStream reads
    an inode again in each part it meets it in), so a part cut out takes
    no link's target with it."""
    return [index for index, read in enumerate(reads)
            if read.live.racy or (fingerprint(iter_part(read.part, patterns, ArchiveStats()))
                                  != read.live.digest())]


def write_parts_apart(tar, out, segment, parts, patterns):
    """A segment of several parts, each written as gzip members of its own:
    all read live, then before(), a stat walk, and only the parts that
    changed are read again, as members after all the others, reusing the
    compressed blocks of their first read that did not change; after()
    comes first, then their first reads are cut out of the file (the
    members after them move down).  A part the walk confirms is never
    read again, whatever its place (issue 24)."""
    stats = tar.stats
    tar.flush()
    out.hold_verification()  # what follows may be moved or taken back
    reads = []
    start = out.end_member()
    out.record_blocks()
    for part in parts:
        mark, live = tar.mark(), LiveFingerprint()
        tar.begin_part()
        tar.write(live.track(iter_part(part, patterns, stats)))
        tar.flush()
        end = out.end_member()
        reads.append(PartRead(part, start, end, mark, tar.mark(), live))
        start = end
    _call(segment.before)
    again = parts_to_read_again(reads, patterns)
    reread = []
    if again:
        for index in reversed(again):
            tar.take_back(reads[index].mark, reads[index].end_mark)
        out.reuse_blocks()
        for index in again:
            tar.begin_part()
            tar.write(iter_part(reads[index].part, patterns, stats))
            reread += [entry.rel for entry in reads[index].part]
    if segment.report is not None:
        segment.report(reread)
    _call(segment.after)
    tar.flush()
    if again:
        kept = [(read.start, read.end) for index, read in enumerate(reads)
                if index > again[0] and index not in again]
        out.compact(reads[again[0]].start, kept + [(start, out.end_member())])
    _reused(segment, out.forget_blocks(), bool(again))
    out.release_verification()


def _reused(segment, reuse, reread):
    """Tell the segment how much of what it read again was copied."""
    if reread and reuse is not None and segment.reused is not None:
        segment.reused(reuse)


def write_segment(tar, out, segment, parts, patterns, stats):
    """A segment's parts (lists of deferred entries), around its callbacks.

    When out can take bytes back (checkpoint, rewind), each part is read
    live first, its entries' stats folded into a fingerprint; then before()
    is called, a stat walk confirms each part, and what changed (or was
    changed too recently to tell) is cut out and read again: before()
    leaves it still.  Several parts, with an out that ends gzip members,
    go to write_parts_apart (only the changed parts are read again); a
    single part is cut back to where it began.  So after() comes after a
    stat walk, and a full read only for what changed.  An output that
    cannot rewind gets the parts read between the callbacks."""
    if not hasattr(out, "checkpoint"):
        _call(segment.before)
        for part in parts:
            tar.begin_part()
            tar.write(iter_part(part, patterns, stats))
        _call(segment.after)
        return
    if len(parts) > 1:
        parts = [parts[i] for i in reading_order([newest_change(p, patterns) for p in parts])]
        if hasattr(out, "end_member"):
            write_parts_apart(tar, out, segment, parts, patterns)
            return
    tar.flush()
    out.hold_verification()  # what follows may be taken back
    reuses = hasattr(out, "second_pass")
    reads = []
    for part in parts:
        tar.flush()
        live = LiveFingerprint()
        reads.append((part, out.checkpoint(), tar.mark(), live))
        if reuses and len(reads) == 1:
            out.record_blocks()
        tar.begin_part()
        tar.write(live.track(iter_part(part, patterns, stats)))
    _call(segment.before)
    changed = first_changed(reads, patterns)
    reread = []
    if changed is not None:
        _part, checkpoint, mark, _live = reads[changed]
        tar.rewind(mark)
        if reuses:
            out.second_pass(checkpoint)
        else:
            out.rewind(checkpoint)
        for part, _checkpoint, _mark, _live in reads[changed:]:
            tar.begin_part()
            tar.write(iter_part(part, patterns, stats))
            reread += [entry.rel for entry in part]
    if segment.report is not None:
        segment.report(reread)
    _call(segment.after)
    tar.flush()
    if reuses:
        if changed is not None:
            out.settle()
        _reused(segment, out.forget_blocks(), changed is not None)
    out.release_verification()


def _call(callback):
    if callback is not None:
        callback()


class ArchiveStats:
    def __init__(self):
        self.members = 0
        self.bytes = 0
        self.excluded = []
        self.notes = []
        self.warnings = []

    @property
    def unread(self):
        """[(rel, kind)]: what the archive lacks or holds torn (incomplete.py)."""
        return incomplete.entries_of(self.warnings + self.notes)

    @property
    def incomplete_counts(self):
        return incomplete.counts_of(self.unread)


# Small members are gathered and handed on in batches of about this size:
# one call per member would cost more than the member's own bytes.
WRITE_BATCH = 128 * 1024


READ_CHUNK = 1 << 20


def write_tar(out, stack, items, patterns, progress, stats, segments=()):
    """Write the tar stream of the manifest items to out: everything
    outside the segments' roots, depth first in name order, then each
    segment's parts (write_segment); fill stats.  A segment whose roots the
    walk never met (excluded, missing, behind a symlink) is skipped,
    callbacks and all.  Only the order of members depends on the segments,
    and a parent directory always comes before what it holds."""
    tar = TarStream(out, progress, stats)
    defer = frozenset(root for segment in segments for root in segment.roots)
    deferred = []
    try:
        tar.write(iter_entries(stack, items, patterns, stats.excluded, stats.notes,
                               stats.warnings, defer, deferred))
        for segment in segments:
            parts = [[entry for entry in deferred if entry.rel in roots]
                     for roots in segment.parts]
            parts = [part for part in parts if part]
            if parts:
                write_segment(tar, out, segment, parts, patterns, stats)
    finally:
        close_entries(deferred)
    tar.finish(patterns)


def open_listed_file(entry: Entry, stats):
    """(descriptor, its fstat) of a regular file the walk listed, opened in
    its folder without following a symlink; (None, Entry) when it is no
    longer a regular file (a symlink, a device node: never read), (None,
    None) when it is gone or cannot be read (noted or warned)."""
    try:
        fd = os.open(entry.name, FILE_FLAGS, dir_fd=entry.dir_fd)
    except FileNotFoundError:
        stats.notes.append(vanished(entry.rel))
        return None, None
    except OSError as e:
        if e.errno != errno.ELOOP:
            stats.warnings.append(walk_warning(entry.rel, e))
            return None, None
        try:
            st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            stats.notes.append(vanished(entry.rel))
            return None, None
        return None, _replaced(entry, st, stats)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, _replaced(entry, st, stats)
    return fd, st


def _replaced(entry: Entry, st: os.stat_result, stats):
    """A file listed as regular that is something else now: that, as an
    Entry (a folder, which the walk never entered, is not saved)."""
    if stat.S_ISDIR(st.st_mode):
        stats.warnings.append(Unread("%s changed while it was read: not saved" % entry.rel,
                                     entry.rel, incomplete.CHANGED))
        return None
    stats.notes.append("%s was replaced while the backup ran: saved as it is now, not read"
                       % entry.rel)
    return Entry(entry.rel, st, entry.dir_fd, entry.name)


class TarStream:
    """Encodes walk entries as tar members onto out, small members gathered
    into batches.  mark() and rewind() take back what was encoded since a
    mark (with the stats, progress and hard-link records it added), for a
    caller that cuts its output back to the same point.

    Hard links: the names of an inode met in one part (begin_part: a group's
    data, read in its own stop window) are its first name's content and
    links to it.  Met again in a later part, whose services may have
    written it since, the inode is read again, whole, under the later name,
    and every earlier name follows as a link to that member (tar takes the
    last member of a name), so a restore gives every name the content as
    of the later part's stop, still linked."""

    def __init__(self, out, progress, stats):
        self.out, self.progress, self.stats = out, progress, stats
        # (st_dev, st_ino) -> (part, name of the member with its content,
        # ((part, name), ...) of every name archived for it).  A part taken
        # back (rewind, take_back) is dead: its number never comes again (a
        # part read again gets a new one), so nothing links to it, and its
        # names are left out when names are written again as links.
        self.inodes = {}
        self.part = 0
        self.dead = set()
        self.batch = bytearray()
        self.batch_bytes = self.batch_files = 0
        self.files = 0
        # Where a large file's data begins, a new compressed block begins
        # (an output that has blocks): a second pass after the stop lines
        # its blocks up with the first pass's, file by file, however much
        # the data before them grew or shrank (issue 24).
        self.cut_block = getattr(out, "cut_block", None) or (lambda: None)

    def begin_part(self) -> None:
        """What follows is read in another window than what came before."""
        self.part += 1

    def write(self, entries):
        """Encode the entries (the per-member hot loop: kept in one piece)."""
        out, progress, stats = self.out, self.progress, self.stats
        inodes, batch = self.inodes, self.batch
        batch_bytes, batch_files = self.batch_bytes, self.batch_files
        for entry in entries:
            if len(batch) >= WRITE_BATCH:
                out.write(batch)
                batch.clear()
                progress.update(batch_bytes, batch_files)
                batch_bytes = batch_files = 0
            st = entry.st
            fmt = stat.S_IFMT(st.st_mode)
            name = os.fsencode(entry.rel)
            if fmt == stat.S_IFREG:
                if st.st_nlink > 1:
                    known = inodes.get((st.st_dev, st.st_ino))
                    if known is not None and known[0] == self.part:
                        batch += tar_header(name, TYPE_HARDLINK, stat.S_IMODE(st.st_mode),
                                            st.st_uid, st.st_gid, 0,
                                            st.st_mtime_ns // 1_000_000_000, known[1])
                        inodes[(st.st_dev, st.st_ino)] = known[:2] + (
                            known[2] + ((self.part, name),),)
                        stats.members += 1
                        continue
                fd, now = open_listed_file(entry, stats)
                if fd is None:
                    if now is None:
                        continue
                    entry, st = now, now.st  # no longer a regular file: saved as it is now
                    fmt = stat.S_IFMT(st.st_mode)
                else:
                    try:
                        st = now
                        size = st.st_size
                        batch += tar_header(name, TYPE_FILE, stat.S_IMODE(st.st_mode), st.st_uid,
                                            st.st_gid, size, st.st_mtime_ns // 1_000_000_000)
                        data = os.read(fd, size) if size <= READ_CHUNK else b""
                        if len(data) == size:
                            batch += data  # most files: read whole, one copy into the batch
                        else:
                            out.write(batch)
                            batch.clear()
                            self.cut_block()
                            out.write(data)
                            # A large file reports as it goes, so the line keeps moving.
                            progress.update(len(data), 0)
                            _copy_rest(out, fd, size - len(data), entry.rel, stats, progress)
                            batch_bytes -= size  # already reported
                        batch += bytes(-size % BLOCK)
                        if changed_while_read(st, os.fstat(fd)):
                            stats.warnings.append(Unread(
                                "%s changed while it was read: the backup holds its first %d "
                                "bytes" % (entry.rel, size), entry.rel, incomplete.CHANGED))
                    finally:
                        os.close(fd)
                    stats.members += 1
                    if st.st_nlink > 1:
                        batch += self._linked_content(st, name)
                    stats.bytes += size
                    batch_bytes += size
                    batch_files += 1
                    self.files += 1
                    continue
            mode = stat.S_IMODE(st.st_mode)
            mtime = st.st_mtime_ns // 1_000_000_000
            if fmt == stat.S_IFDIR:
                batch += tar_header(name + b"/", TYPE_DIR, mode, st.st_uid, st.st_gid, 0, mtime)
            elif fmt == stat.S_IFLNK:
                try:
                    target = os.fsencode(os.readlink(entry.name, dir_fd=entry.dir_fd))
                except FileNotFoundError:
                    stats.notes.append(vanished(entry.rel))
                    continue
                except OSError as e:  # EINVAL: no longer a symlink
                    stats.warnings.append(Unread("%s changed while it was read: not saved (%s)"
                                                 % (entry.rel, e.strerror), entry.rel,
                                                 incomplete.CHANGED))
                    continue
                batch += tar_header(name, TYPE_SYMLINK, mode, st.st_uid, st.st_gid, 0, mtime,
                                    target)
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
        self.batch_bytes, self.batch_files = batch_bytes, batch_files

    def _linked_content(self, st: os.stat_result, name: bytes) -> bytes:
        """After the member `name` with the content of a linked inode: its
        record, and when earlier parts archived it under other names, those
        names again, as links to `name` (bytes to add to the batch)."""
        key = (st.st_dev, st.st_ino)
        known = self.inodes.get(key)
        if known is not None and known[0] == self.part:
            # Replaced by a link to it since listed: read in this window anyway.
            self.inodes[key] = known[:2] + (known[2] + ((self.part, name),),)
            return b""
        # Each earlier name of a living part, once, with the part that wrote it.
        alive = {}
        for part, old in known[2] if known is not None else ():
            if part not in self.dead and old != name:
                alive.setdefault(old, part)
        earlier = tuple(alive)
        self.inodes[key] = (self.part, name,
                            tuple((part, old) for old, part in alive.items())
                            + ((self.part, name),))
        if earlier:
            self.stats.notes.append(
                "%s: read again in a later stop window than its other names (%s), which are "
                "archived again as links to it" % (os.fsdecode(name),
                                                   ", ".join(map(os.fsdecode, earlier))))
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1_000_000_000
        self.stats.members += len(earlier)
        return b"".join(tar_header(old, TYPE_HARDLINK, mode, st.st_uid, st.st_gid, 0, mtime, name)
                        for old in earlier)

    def flush(self):
        if self.batch:
            self.out.write(self.batch)
            self.batch.clear()
        self.progress.update(self.batch_bytes, self.batch_files)
        self.batch_bytes = self.batch_files = 0

    def mark(self):
        """A point to rewind to; the batch must be empty (flushed)."""
        stats = self.stats
        return (stats.members, stats.bytes, self.files, len(stats.excluded), len(stats.notes),
                len(stats.warnings), self.part)

    def rewind(self, mark):
        stats = self.stats
        members, nbytes, files, excluded, notes, warnings, part = mark
        self.dead.update(range(part + 1, self.part + 1))
        self.progress.update(-(stats.bytes - nbytes - self.batch_bytes),
                             -(self.files - files - self.batch_files))
        stats.members, stats.bytes, self.files = members, nbytes, files
        del stats.excluded[excluded:], stats.notes[notes:], stats.warnings[warnings:]
        self.batch.clear()
        self.batch_bytes = self.batch_files = 0

    def take_back(self, start, end):
        """Forget what was encoded between two marks (flushed, and cut out
        of the output by the caller), with its stats, progress and inodes;
        spans are taken back from the last to the first."""
        stats = self.stats
        self.progress.update(-(end[1] - start[1]), -(end[2] - start[2]))
        stats.members -= end[0] - start[0]
        stats.bytes -= end[1] - start[1]
        self.files -= end[2] - start[2]
        del stats.excluded[start[3]:end[3]], stats.notes[start[4]:end[4]]
        del stats.warnings[start[5]:end[5]]
        self.dead.update(range(start[6] + 1, end[6] + 1))

    def finish(self, patterns):
        """The excludes record (when there are patterns), the record of what
        could not be read (when anything), and the end of the archive."""
        stats = self.stats
        if patterns:
            # What was left out, for restore.py to leave in place.
            self._add_record(iotstack.EXCLUDES_MEMBER,
                             iotstack.excludes_record(patterns, stats.excluded))
        unread = stats.unread
        if unread:
            # What is missing or torn: restore.py keeps the live copies.
            self._add_record(incomplete.MEMBER, incomplete.record(unread))
        self.batch += ZERO_BLOCK * 2
        self.flush()

    def _add_record(self, member, record):
        self.batch += tar_header(os.fsencode(member), TYPE_FILE, 0o644, os.geteuid(),
                                 os.getegid(), len(record), int(time.time()))
        self.batch += record + bytes(-len(record) % BLOCK)
        self.stats.members += 1


def _copy_rest(out, fd, remaining, rel, stats, progress):
    """Copy a large file's remaining bytes in chunks, reporting each; a file
    that shrank since it was stat'ed is padded with zeros to the size in its
    header."""
    while remaining:
        chunk = os.read(fd, min(remaining, READ_CHUNK))
        if not chunk:
            stats.warnings.append(Unread("%s shrank while being read: padded with zeros" % rel,
                                         rel, incomplete.CHANGED))
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
        self._limit = None
        self._offset = 0
        self.members = None
        self.error = None
        self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
        self._thread.start()

    def advance(self, durable, finished=False):
        with self._cond:
            self._durable = durable
            self._finished = finished
            if finished:
                self._limit = None
            self._cond.notify()

    def hold_at(self, offset):
        """Read no further than offset (until release or finish): what
        follows may still be taken back (rewind), and while services are
        down the CPU goes to reading and compressing, so they come back
        sooner; the verifier catches up afterwards."""
        with self._cond:
            self._limit = offset

    def release(self):
        with self._cond:
            self._limit = None
            self._cond.notify()

    def rewind(self, offset):
        """The file was cut back to offset (never below where reading is
        held): bytes past it are no longer known to be on the disk."""
        with self._cond:
            self._durable = min(self._durable, offset)

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
            while True:
                end = self._durable if self._limit is None else min(self._durable, self._limit)
                if self._offset < end or self._finished or self._cancelled:
                    break
                self._cond.wait()
            if self._cancelled:
                raise ArchiveError("verification cancelled")
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
        # Held through each sync, so a truncation waits for the one under way.
        self._lock = threading.Lock()

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
                with self._lock:
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
            if not n:
                raise NoProgressError("writing the archive")
            view = view[n:]
            # Counted as it goes: a sync reports only what it covers.
            self.reported += n
        self.wrote(0)
        return len(data)

    def flush(self):
        pass

    def move_down(self, base, ranges):
        """Copy the byte ranges [(start, end)] of the file, in order, to
        base and on (every start at or past base), cut the file after them
        and write on from there; returns that length.  A sync under way
        finishes first."""
        if self._error is not None:
            raise self._error
        with self._lock:
            at = base
            for start, end in ranges:
                while start < end:
                    chunk = os.pread(self.fd, min(end - start, READ_CHUNK), start)
                    if not chunk:
                        raise OSError(errno.EIO, "the archive is shorter than what was written")
                    view = memoryview(chunk)
                    while view:
                        moved = os.pwrite(self.fd, view, at)
                        if not moved:
                            raise NoProgressError("moving the archive's parts")
                        view, at = view[moved:], at + moved
                    start += len(chunk)
            os.ftruncate(self.fd, at)
            os.lseek(self.fd, at, os.SEEK_SET)
            self.reported = self._asked_at = at
        return at

    def truncate(self, length):
        """Cut the file back to length and write on from there.  A sync
        under way finishes first, so none reports bytes that are gone."""
        if self._error is not None:
            raise self._error
        with self._lock:
            os.ftruncate(self.fd, length)
            os.lseek(self.fd, length, os.SEEK_SET)
            self.reported = self._asked_at = length


class ArchiveOutput:
    """The archive file as write_tar sees it: the gzip writer's write(), and
    for the segments, checkpoint() and rewind() (the gzip stream, the file
    and the verifier cut back together) and holding the verifier back from
    what may still be taken back."""

    def __init__(self, gz, sink, verifier, spool_dir=None):
        self._gz, self._sink, self._verifier = gz, sink, verifier
        self.write = gz.write
        self._second_pass = None
        self._spool_dir = spool_dir  # beside the archive: the disk it may fill

    def checkpoint(self):
        return self._gz.checkpoint()

    def rewind(self, checkpoint):
        offset = self._gz.rewind(checkpoint)
        self._sink.truncate(offset)
        if self._verifier is not None:
            self._verifier.rewind(offset)

    def end_member(self):
        return self._gz.end_member()

    def compact(self, base, ranges):
        """Move the members at ranges down to base, one after another, and
        write on after them; the verifier reads them again from base."""
        self._gz.moved_to(self._sink.move_down(base, ranges))
        if self._verifier is not None:
            self._verifier.rewind(base)

    def cut_block(self):
        self._gz.cut_block()

    def record_blocks(self):
        """Remember the compressed blocks written from here on, for a
        second pass to reuse (pgzip's BlockReuse)."""
        self._gz.record_blocks()

    def reuse_blocks(self):
        """Reuse the recorded blocks in what is written from here on; the
        rest is kept in a spool until end_member() (pgzip.BlockReuse)."""
        self._gz.reuse_blocks(self)

    def second_pass(self, checkpoint):
        """Write the stretch after checkpoint again, after the first pass,
        reusing its blocks; settle() writes it out and puts it in place."""
        self._second_pass = self._gz.second_pass(checkpoint, self)

    def settle(self):
        """After second_pass(): the second pass moved down over the first,
        and writing goes on after it."""
        end = self._gz.drain()
        (base, start), self._second_pass = self._second_pass, None
        self.compact(base, [(start, end)])

    def forget_blocks(self):
        """Stop recording or reusing blocks; the counts of the blocks
        reused and compressed again (a BlockReuse), if any."""
        return self._gz.forget_blocks()

    def read_back(self, offset, length):
        """Bytes of the archive as written (for pgzip.BlockReuse)."""
        return os.pread(self._sink.fd, length, offset)

    def spool(self):
        """A new temporary file, gone once closed, for the data read again
        that the writer compresses once the services run (pgzip.BlockReuse).
        Where the file system cannot create it nameless, its name is one
        the next run removes (iotstack.is_partial_name), should a power cut
        come before it is unlinked."""
        return tempfile.TemporaryFile(dir=self._spool_dir, prefix=".backup_spool.",
                                      suffix=iotstack.PARTIAL_SUFFIX)

    def hold_verification(self):
        if self._verifier is not None:
            # What is on the file now lies before any later checkpoint.
            self._verifier.hold_at(self._sink.written)

    def release_verification(self):
        if self._verifier is not None:
            self._verifier.release()


def can_read(path, st):
    """Whether this process may read an entry, without opening it: what
    the backup's open (a file) or listing (a folder) would find."""
    if stat.S_ISDIR(st.st_mode):
        return _access(path, os.R_OK | os.X_OK)
    if stat.S_ISREG(st.st_mode):
        return _access(path, os.R_OK)
    return True


def _access(path, mode):
    effective = os.access in os.supports_effective_ids
    try:
        return os.access(path, mode, effective_ids=effective, follow_symlinks=False)
    except (NotImplementedError, OSError):
        return os.access(path, mode)


def unreadable_files(stack, items, patterns, warnings):
    """The files of the walk this process may not read (the folders it may
    not list are already in warnings, from the walk itself): each becomes
    the warning the real run would give, in warnings.  Opens nothing."""
    for entry in iter_entries(stack, items, patterns, [], [], warnings):
        if stat.S_ISREG(entry.st.st_mode) and not can_read(os.path.join(stack, entry.rel),
                                                           entry.st):
            warnings.append(walk_warning(entry.rel, PermissionError(
                errno.EACCES, os.strerror(errno.EACCES))))
        yield entry


def first_unreadable(stack, items):
    """The first entry below the items this process may not read (a
    container's private file or folder, for a normal user), or None.  Stops
    there; as root, answers None at once."""
    if os.geteuid() == 0:
        return None
    warnings = []
    for _entry in unreadable_files(stack, items, (), warnings):
        if warnings:
            return warnings[0].rel
    return warnings[0].rel if warnings else None


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
    it back from disk as it goes.  segments: see write_tar.  Returns its
    size."""
    # Read and write: parts confirmed after a changed one are moved down
    # in place (FileSink.move_down).
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, iotstack.ARCHIVE_MODE)
    verifier = sink = None
    try:
        if not args.no_verify:
            verifier = FollowingVerifier(temp)
        sink = FileSink(fd, verifier.advance if verifier else None)
        gz = ParallelGzipWriter(sink, level=args.level, jobs=args.jobs)
        gz.set_extra(incomplete.header_extra())
        try:
            write_tar(ArchiveOutput(gz, sink, verifier, os.path.dirname(temp)), stack, items, args.exclude, progress,
                      stats, segments)
            gz.close()
        except BaseException:
            gz.abort()
            raise
        sink.close()  # its last report must not follow the verifier's finish
        incomplete.write_note(fd, stats.incomplete_counts)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, iotstack.ARCHIVE_MODE)
        # Owner and mode before the fsync: one made after it may not survive
        # a power cut, leaving the user's archive root's (issue 22).
        os.fsync(fd)
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
