"""Unpacking an archive with every member checked: the only place that decides what is safe.

read_archive reads the whole tar.gz; MemberPolicy refuses any member that
could write outside its place (absolute names, "..", a path through a symlink
of the archive, a hard link to anything but an earlier file of the archive)
and the Stager creates what passes below a staging folder that holds
nothing else, never following or writing through a link.  How it keeps data
safe: nothing live is touched here; restore swaps the staged items in only
after every header, every member and the gzip CRC have passed; regular
files may be created by a writer process (file_writer) and a background
sync keeps the disk busy, but every file is on disk before the swap.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile

from . import archive_writer, children, disk_sync, file_writer, incomplete, iotstack, tarformat
from .pgzip import GzipError, iter_gunzip
from .progress import human_size
from .run import UserError
from .tarformat import ArchiveError

# typing is only read by the type checker (as in children.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import (IO, BinaryIO, Callable, Collection, Dict, Iterable, Iterator, List,
                        Mapping, Optional, Sequence, Set, Tuple)

    from .children import Bytes
    from .progress import Progress
    from .tarformat import TarMember, TarReader


def open_archive_chunks(fileobj: BinaryIO) -> Iterator[bytes]:
    """Decompressed chunks of a .tar.gz, with gzip problems as ArchiveError."""
    try:
        yield from iter_gunzip(fileobj)
    except GzipError as e:
        raise ArchiveError(str(e)) from None


# Files sent to the writer process before the Stager waits for it to catch
# up, whatever comes: this bounds the memory that remembers them.
SENT_LIMIT = 4096


# Bytes unpacked between two background syncs (see EarlyWriteback).
WRITEBACK_STEP = 16 << 20


def normalize_member_name(name: str) -> str:
    """The member's path relative to the stack, or ArchiveError if unsafe."""
    if not name or "\0" in name:
        raise tarformat.ArchiveError("unsafe member %r: empty name or NUL byte" % name)
    if name.startswith("/"):
        raise tarformat.ArchiveError("unsafe member %r: absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise tarformat.ArchiveError("unsafe member %r: '..' in the path" % name)
    return "/".join(parts)


# Names NameSet keeps in memory before it writes them to a temporary file.
NAMES_IN_MEMORY = 20000


class NameSet:
    """The names of the regular files read so far, for hard link checks,
    in flat memory however many there are: each name as a 16-byte keyed
    digest (the key is random per run, so an archive cannot be made to
    collide), the first NAMES_IN_MEMORY in a set; after that each add, and
    each name taken away again (a later member of another type), is a
    record appended to a temporary file, which a lookup scans (hard links
    are few): the last record of a name says whether it is there."""

    DIGEST = 16
    RECORD = DIGEST + 1
    _ADD, _REMOVE = b"+", b"-"

    def __init__(self, in_memory: int = NAMES_IN_MEMORY) -> None:
        self._key = os.urandom(16)
        self._recent: Set[bytes] = set()
        self._in_memory = in_memory
        self._spill: Optional[IO[bytes]] = None
        self._count = 0

    def _digest(self, name: str) -> bytes:
        return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), key=self._key,
                               digest_size=self.DIGEST).digest()

    def _append(self, op: bytes, digest: bytes) -> None:
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="iotstack-names-")
        self._spill.seek(0, os.SEEK_END)
        self._spill.write(op + digest)

    def add(self, name: str) -> None:
        digest = self._digest(name)
        self._count += 1
        if len(self._recent) < self._in_memory and self._spill is None:
            self._recent.add(digest)
        else:
            self._recent.discard(digest)
            self._append(self._ADD, digest)

    def discard(self, name: str) -> None:
        if not self._count:
            return
        digest = self._digest(name)
        self._recent.discard(digest)
        if self._spill is not None:
            self._append(self._REMOVE, digest)

    def __bool__(self) -> bool:
        return self._count > 0

    def __contains__(self, name: str) -> bool:
        digest = self._digest(name)
        if digest in self._recent:
            return True
        return self._spill is not None and self._last_op(digest) == self._ADD

    def _last_op(self, digest: bytes) -> Optional[bytes]:
        """The op of the last record of digest in the file, or None."""
        assert self._spill is not None  # asked only once names were spilled
        self._spill.seek(0)
        last = None
        while True:
            chunk = self._spill.read(self.RECORD << 16)
            if not chunk:
                return last
            at = chunk.find(digest)
            while at >= 0:
                if at % self.RECORD == 1:
                    last = chunk[at - 1:at]
                at = chunk.find(digest, at + 1)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


class MemberPolicy:
    """Refuses members that could write outside their place: every check is
    ours, so the result does not depend on tarfile's filters or Python's
    version."""

    def __init__(self, track_files: bool = True) -> None:
        # Unpacking into a fresh staging folder, a hard link's target can be
        # checked on disk (the Stager does), and memory then stays flat
        # however many files the archive holds.
        self.track_files = track_files
        self.symlinks: Set[str] = set()
        self.files = NameSet()
        # A folder just found to have no symlink on its path: members come
        # folder by folder, so most need only this comparison.  A new symlink
        # could lie on that path, so adding one forgets it.
        self.clear_folder: Optional[str] = None

    def check(self, member: TarMember) -> str:
        rel = normalize_member_name(member.name)
        if rel == "" and member.type != "dir":
            raise tarformat.ArchiveError("unsafe member %r: not a directory" % member.name)
        self._refuse_symlink_on_path(rel, member)
        if member.type == "hardlink":
            self._check_link_target(member)
        if member.type == "symlink":
            self.symlinks.add(rel)
            self.files.discard(rel)
            self.clear_folder = None
        elif member.type in ("file", "hardlink"):
            if self.track_files:
                self.files.add(rel)
        elif self.files:
            self.files.discard(rel)
        return rel

    def _refuse_symlink_on_path(self, rel: str, member: TarMember) -> None:
        folder = rel.rpartition("/")[0]
        if folder == self.clear_folder:
            return
        parent = rel
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in self.symlinks:
                raise tarformat.ArchiveError("unsafe member %r: its path goes through the symlink %r"
                                       % (member.name, parent))
        self.clear_folder = folder

    def _check_link_target(self, member: TarMember) -> None:
        """A hard link's target is checked like a member's own path, always;
        whether it is an earlier file is checked here or, when files are not
        tracked, on disk by the Stager."""
        refusal = tarformat.ArchiveError("unsafe member %r: hard link to %r, which is not an earlier "
                                   "file of this archive" % (member.name, member.linkname))
        try:
            target = normalize_member_name(member.linkname)
        except tarformat.ArchiveError:
            raise refusal from None
        if target in self.symlinks:
            raise refusal
        try:
            self._refuse_symlink_on_path(target, member)
        except tarformat.ArchiveError:
            raise refusal from None
        if self.track_files and target not in self.files:
            raise refusal


def restorable(rel: str, only: Sequence[str]) -> bool:
    """Whether a member path is restored: inside a backup item, and inside
    one of the --only subtrees when there are any."""
    if iotstack.item_of(rel) is None:
        return False
    return not only or any(rel == path or rel.startswith(path + "/") for path in only)


def staging_ancestors(unit: str) -> List[str]:
    """Ancestors of a unit below the stack directory, outermost first."""
    parts = unit.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


class Summary:
    def __init__(self) -> None:
        self.members = 0
        self.restored = 0  # the members restored (with --only: those under it)
        self.bytes = 0
        self.items: Set[str] = set()
        self.found_only: Set[str] = set()
        self.skipped: List[str] = []
        self.warnings: List[str] = []
        self.excludes: List[str] = []  # the backup's --exclude patterns
        self.incomplete: incomplete.Entries = []  # [(rel, kind)]: what the backup could not read


def read_archive(path: str, only: Sequence[str], unpack: Optional[Stager] = None,
                 progress: Optional[Progress] = None) -> Summary:
    """Read the whole archive with every check; unpack what is restorable
    into unpack (a Stager) when given.  Raises ArchiveError."""
    summary = Summary()
    policy = MemberPolicy(track_files=unpack is None or not unpack.fresh_root)
    with open(path, "rb") as f, contextlib.closing(policy.files):
        reader = tarformat.TarReader(open_archive_chunks(f))
        for member in reader:
            rel = policy.check(member)
            summary.members += 1
            if rel == iotstack.EXCLUDES_MEMBER and member.type == "file":
                summary.excludes = iotstack.parse_excludes(
                    b"".join(bytes(piece) for piece in reader.data(member)))
                continue
            if rel == incomplete.MEMBER and member.type == "file":
                summary.incomplete = incomplete.parse_record(
                    b"".join(bytes(piece) for piece in reader.data(member)))
                continue
            item = iotstack.item_of(rel)
            if item is None or (only and not restorable(rel, only)):
                if rel and item is None and len(summary.skipped) < 1000:
                    summary.skipped.append(rel)
                continue
            if member.type in ("chardev", "blockdev"):
                # Before it counts: an item that holds nothing else is not
                # staged, so it must not be swapped in (for nothing).
                summary.warnings.append("skipped device node %s" % rel)
                continue
            summary.items.add(item)
            summary.restored += 1
            for path_ in only:
                if rel == path_ or rel.startswith(path_ + "/"):
                    summary.found_only.add(path_)
            if member.type == "file":
                summary.bytes += member.size
            if only and member.type == "hardlink":
                refuse_link_out_of_only(member, only)
            if unpack is not None:
                unpack.add(member, rel, reader)
            if progress is not None:
                progress.update(member.size if member.type == "file" else 0, 1)
    if unpack is not None:
        unpack.finish()
    return summary


def refuse_link_out_of_only(member: TarMember, only: Sequence[str]) -> None:
    """A hard link whose target --only leaves out cannot be made (its data
    was never staged): one clear line, before anything changes.  A backup
    writes a name linked across stop groups as a link to its later name."""
    target = normalize_member_name(member.linkname)
    if not restorable(target, only):
        raise tarformat.ArchiveError(
            "%s is a hard link to %s, which --only leaves out: restore both (add --only %s)"
            % (member.name, member.linkname, target.rpartition("/")[0] or target))


class EarlyWriteback(archive_writer.BackgroundSync):
    """Keeps the disk writing the staged files while unpacking goes on.

    Restore syncs before the swap, so that the new files are on disk before
    the old ones can go.  A sync that starts only then waits for every byte
    at once, after the unpacking: on an SD card that can be as long as the
    unpacking itself.  Here the file systems being written (folders() names
    one folder on each: the staging folders) are synced in the background
    whenever another `step` bytes were unpacked, each with syncfs, never the
    whole machine.  It is only a speed-up: the final sync is what makes the
    files durable, and a sync changes no data."""

    thread_name = "early-writeback"

    def __init__(self, folders: Callable[[], Iterable[str]], step: Optional[int] = None) -> None:
        # archive_writer.py is not annotated yet (and not this change's to edit).
        super().__init__(  # type: ignore[no-untyped-call]
            WRITEBACK_STEP if step is None else step,
            lambda done: disk_sync.sync_filesystems(folders()))


class Stager:
    """Creates members below root, which holds nothing but what this archive
    put there: never follows a link, never writes through one.

    With writer=True regular files are created by a child process
    (file_writer), on another core, while this one reads and checks the
    archive; everything else is created here, after waiting for the child
    whenever a member touches a path it may not have written yet, so that
    members take effect in archive order either way."""

    def __init__(self, root: str, as_root: bool, fresh_root: bool = False,
                 writeback: Optional[EarlyWriteback] = None, writer: bool = False,
                 redirect: Optional[Mapping[str, str]] = None,
                 link_points: Optional[Iterable[str]] = None,
                 on_new_point: Optional[Callable[[str], object]] = None) -> None:
        self.root = root
        self.writeback = writeback  # an EarlyWriteback, told each file's size
        self.as_root = as_root
        # True when root was made empty for this archive: everything in it
        # then comes from earlier members.
        self.fresh_root = fresh_root
        self.made = {""}
        self.dirs: List[Tuple[int, str, TarMember]] = []
        # A new file has the mode it was opened with less the umask, and our
        # ids, unless a set-group-ID folder gives it that folder's group:
        # only a fresh root without that bit (whose new folders then lack it
        # too) lets chown be skipped for members owned like us.
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.ids: Optional[Tuple[int, int]] = None
        if fresh_root and not os.stat(root).st_mode & stat.S_ISGID:
            self.ids = (os.geteuid(), os.getegid())
        # Regular files are created by a writer process when asked (and
        # fork exists); sent holds those sent since it last caught up.
        self.sent: Set[str] = set()
        # {point: its staging folder on the other disk} (see restore's
        # points): members below a point are staged there, the folder made
        # when the first one comes; a point that the archive holds as a
        # symlink or file is an ordinary member.
        self.redirect = dict(redirect or {})
        self.link_points = set(link_points or ())
        self.made_points: Set[str] = set()
        self.on_new_point = on_new_point
        self.writer: Optional[file_writer.FileWriterProcess] = None
        if writer and hasattr(os, "fork"):
            self.writer = file_writer.FileWriterProcess(self.create_file,
                                                        raisable=(tarformat.ArchiveError,))

    def place(self, rel: str) -> str:
        """Where a member is staged: below root, or in a point's folder."""
        if self.redirect:
            point = rel
            while point:
                folder = self.redirect.get(point)
                if folder is not None:
                    if point not in self.made_points:
                        # Made by this process (the writer process finds
                        # it made: a file's folder is prepared here first).
                        if not os.path.isdir(folder):
                            if self.on_new_point is not None:
                                self.on_new_point(point)
                            os.mkdir(folder, 0o700)
                        self.made_points.add(point)
                    return folder + rel[len(point):]
                point = point.rpartition("/")[0]
        return os.path.join(self.root, rel)

    def _wait_for_writer(self) -> None:
        assert self.writer is not None  # called only once files were sent to it
        self.writer.wait()
        self.sent.clear()

    def close(self) -> None:
        """Stops the writer, if any: nothing is written after this."""
        if self.writer is not None:
            self.writer.close()

    def _prepare(self, rel: str) -> str:
        parent = rel.rpartition("/")[0]
        if parent not in self.made:
            if self.sent and any(folder in self.sent
                                 for folder in staging_ancestors(parent) + [parent]):
                self._wait_for_writer()  # an error about that file comes first
            try:
                os.makedirs(self.place(parent), exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                # An earlier member put a file where this one needs a folder:
                # a damaged archive, said in one line like the others.
                raise tarformat.ArchiveError("member %r: %r is not a directory in this archive"
                                       % (rel, parent)) from None
            while parent not in self.made:
                self.made.add(parent)
                parent = parent.rpartition("/")[0]
        return self.place(rel)

    @staticmethod
    def _clear(path: str, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise tarformat.ArchiveError("member %r would replace a directory" % rel)
        os.unlink(path)

    def _meta(self, member: TarMember, path: str) -> None:
        mtime = member.mtime * 1_000_000_000
        if self.as_root:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if member.type != "symlink":
            os.chmod(path, member.mode)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def create_file(self, rel: str, mode: int, uid: int, gid: int, mtime: int,
                    pieces: Iterable[Bytes]) -> None:
        """Runs in the writer process when there is one."""
        path = self.place(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        # The staging root is private (0700), so a file may have its
        # final permissions while it is being written.
        try:
            fd = os.open(path, flags, mode & 0o777)
        except FileExistsError:
            self._clear(path, rel)
            fd = os.open(path, flags, mode & 0o777)
        try:
            for piece in pieces:
                children.write_all_fd(fd, piece, "writing %s" % rel)
            if self.as_root and (uid, gid) != self.ids:
                os.fchown(fd, uid, gid)
            # After chown, which clears set-id bits; those need chmod anyway.
            if mode & ~0o777 or mode & self.umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime * 1_000_000_000, mtime * 1_000_000_000))
        finally:
            os.close(fd)

    def add(self, member: TarMember, rel: str, reader: TarReader) -> None:
        if rel == "":
            return
        kind = member.type
        if rel in self.redirect and kind != "dir":
            if rel not in self.link_points:
                raise tarformat.ArchiveError(
                    "member %r is not a folder, but %s is a mount point here: the restore "
                    "never replaces a mount point" % (rel, rel))
            # The archive holds the link itself: an ordinary member.
            del self.redirect[rel]
            if kind == "file":
                self._prepare(rel)
                self.create_file(rel, member.mode, member.uid, member.gid, member.mtime,
                                 reader.data(member))
                return
        path = self._prepare(rel)
        if kind == "file":
            if self.writer is not None:
                self.writer.send(rel, member.mode, member.uid, member.gid, member.mtime,
                                 member.size, reader.data(member))
                self.sent.add(rel)
                if len(self.sent) >= SENT_LIMIT:
                    self._wait_for_writer()
            else:
                self.create_file(rel, member.mode, member.uid, member.gid, member.mtime,
                                 reader.data(member))
            if self.writeback is not None:
                # archive_writer.py is not annotated yet (not this change's to edit).
                self.writeback.wrote(member.size)  # type: ignore[no-untyped-call]
            return
        if rel in self.sent:
            # The writer may not have created that file yet: what replaces
            # it must come after it, as in the archive.
            self._wait_for_writer()
        if kind == "dir":
            if rel not in self.made:
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    if not os.path.isdir(path) or os.path.islink(path):
                        self._clear(path, rel)
                        os.mkdir(path, 0o700)
                self.made.add(rel)
            self.dirs.append((rel.count("/"), rel, member))
        elif kind == "hardlink":
            target_rel = normalize_member_name(member.linkname)
            if target_rel in self.sent:
                self._wait_for_writer()
            # The policy made sure no folder on the way is a symlink; lstat
            # makes sure the target itself is not one.
            target = self.place(target_rel)
            try:
                is_file = stat.S_ISREG(os.lstat(target).st_mode)
            except FileNotFoundError:
                is_file = False
            if not is_file:
                raise tarformat.ArchiveError("unsafe member %r: hard link to %r, which is not an "
                                       "earlier file of this archive, or is not restored with "
                                       "it" % (member.name, member.linkname))
            try:
                os.link(target, path, follow_symlinks=False)
            except FileExistsError:
                self._clear(path, rel)
                os.link(target, path, follow_symlinks=False)
        elif kind == "symlink":
            try:
                os.symlink(member.linkname, path)
            except FileExistsError:
                self._clear(path, rel)
                os.symlink(member.linkname, path)
            self._meta(member, path)
        elif kind == "fifo":
            try:
                os.mkfifo(path, 0o600)
            except FileExistsError:
                self._clear(path, rel)
                os.mkfifo(path, 0o600)
            self._meta(member, path)

    def finish(self) -> None:
        # Deepest first, after their contents: a read-only directory must not
        # stop its children from being written, and writing them changes mtimes.
        if self.writer is not None:
            self.writer.finish()
            self.sent.clear()
        self.dirs.sort(key=lambda entry: -entry[0])
        for _depth, rel, member in self.dirs:
            self._meta(member, self.place(rel))
        self.dirs = []


# A member takes at most this much more room than its bytes (the last
# block of a file, a folder's block): what --in-place adds to the estimate.
MEMBER_OVERHEAD = 4096


def room_needed(summary: Summary) -> int:
    """Bytes the restored members may take on disk, at most."""
    return summary.bytes + summary.members * MEMBER_OVERHEAD


def used_bytes(path: str, device: int) -> int:
    """Bytes that deleting path frees on `device` (not what lies on other
    disks mounted below it)."""
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if st.st_dev == device:
        total += st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(folder, name))
                    if st.st_dev == device and (st.st_nlink == 1 or stat.S_ISDIR(st.st_mode)):
                        total += st.st_blocks * 512
    return total


def in_place_shortfall(needed: int, free: int, freed: int) -> int:
    """How many bytes --in-place would lack (0 when it fits)."""
    return max(0, needed - free - freed)


def check_room_in_place(stack: str, summary: Summary, units: Sequence[str]) -> None:
    """Before --in-place deletes anything: the archive must fit in the free
    space plus what deleting the items frees."""
    device = os.stat(stack).st_dev
    needed = room_needed(summary)
    free = iotstack.free_bytes(stack)
    freed = sum(used_bytes(os.path.join(stack, unit), device) for unit in units)
    short = in_place_shortfall(needed, free, freed)
    if short:
        raise UserError(
            "not enough space to restore in place: about %s needed, %s free plus %s freed by "
            "deleting %s; nothing was changed; free %s and run again"
            % (human_size(needed), human_size(free), human_size(freed),
               ", ".join(units), human_size(short)))


def delete_except(stack: str, rel: str, points: Mapping[str, str],
                  keep: Collection[str]) -> None:
    """Delete rel for --in-place, but never a mount point or a symlink to
    another disk (only what is in it) nor what the backup excluded."""
    path = os.path.join(stack, rel)
    if rel in keep or not os.path.lexists(path):
        return
    inner = [other for other in list(points) + list(keep) if other.startswith(rel + "/")]
    if rel in points or inner:
        for name in os.listdir(path):
            if not (name == "lost+found" and points.get(rel) == "mount"):
                delete_except(stack, rel + "/" + name, points, keep)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class UnitTracker:
    """Which units an unpacking in place reached, in archive order: when it
    fails, the last one is incomplete and those after it are missing."""

    def __init__(self, units: Iterable[str]) -> None:
        self.units = list(units)
        self.seen: List[str] = []

    def saw(self, rel: str) -> None:
        for unit in self.units:
            if rel == unit or rel.startswith(unit + "/"):
                if not self.seen or self.seen[-1] != unit:
                    self.seen.append(unit)
                return

    def outcome(self) -> Tuple[List[str], List[str]]:
        """(complete, incomplete) units after a failure."""
        complete = self.seen[:-1]
        return complete, [unit for unit in self.units if unit not in complete]


def live_points(stack: str, tops: Iterable[str]) -> Dict[str, str]:
    """{rel: "mount" | "link"}: the folders at, above or below the tops
    (items, or --only paths) that hold data on another disk: mount points,
    and symlinks to folders outside the stack.  A restore keeps them where
    they are and puts their data back onto that disk."""
    real_stack = os.path.realpath(stack)
    points: Dict[str, str] = {}

    def kind_of(rel: str, parent_dev: Optional[int]) -> Tuple[Optional[str], Optional[int]]:
        """("mount" | "link" | "dir" | None, device) of a live entry."""
        path = os.path.join(stack, rel)
        try:
            st = os.lstat(path)
        except OSError:
            return None, None
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if os.path.isdir(real) and real != real_stack \
                    and not real.startswith(real_stack + "/"):
                return "link", os.stat(real).st_dev
            return None, None
        if stat.S_ISDIR(st.st_mode):
            return ("mount" if st.st_dev != parent_dev else "dir"), st.st_dev
        return None, None

    for top in tops:
        dev: Optional[int] = os.stat(stack).st_dev
        kind: Optional[str] = "dir"
        for rel in staging_ancestors(top) + [top]:
            kind, dev = kind_of(rel, dev)
            if kind is None:
                break
            if kind != "dir":
                points[rel] = kind
        if kind is None:
            continue
        folders = [(top, dev)]
        while folders:
            rel, dev = folders.pop()
            try:
                with os.scandir(os.path.join(stack, rel)) as it:
                    names = [entry.name for entry in it
                             if entry.is_dir() and not entry.name.startswith(
                                 (".iotstack-restore-", "lost+found"))]
            except OSError:
                continue
            for name in names:
                child = rel + "/" + name
                kind, child_dev = kind_of(child, dev)
                if kind is None:
                    continue
                if kind != "dir":
                    points[child] = kind
                if kind != "link":  # never walk out of the stack below an item
                    folders.append((child, child_dev))
    return points


def live_excluded(stack: str, units: Iterable[str], patterns: Sequence[str]) -> Set[str]:
    """The live entries of the units that the backup's exclude patterns
    match (checked as the backup checks them): a restore leaves them as
    they are.  A folder matched is kept whole."""
    if not patterns:
        return set()
    keep: Set[str] = set()
    for unit in units:
        path = os.path.join(stack, unit)
        if not os.path.lexists(path):
            continue
        is_dir = os.path.isdir(path)
        if iotstack.is_excluded(unit + "/" if is_dir else unit, patterns):
            keep.add(unit)
            continue
        if not is_dir:
            continue
        for folder, dirs, files in os.walk(path):
            rel_folder = os.path.relpath(folder, stack)
            for name in list(dirs):
                rel = rel_folder + "/" + name
                if iotstack.is_excluded(rel + "/", patterns):
                    keep.add(rel)
                    dirs.remove(name)
                elif os.path.islink(os.path.join(folder, name)):
                    dirs.remove(name)
            for name in files:
                rel = rel_folder + "/" + name
                if iotstack.is_excluded(rel, patterns):
                    keep.add(rel)
    return keep


def not_ours(stack: str, units: Iterable[str], uid: int) -> Optional[Tuple[str, str]]:
    """(unit, path) of the first live entry of the units that belongs to
    another user (or a folder that cannot be read), or None: a restore
    without root could neither remove it nor give its replacement the
    owner it had."""
    for unit in units:
        top = os.path.join(stack, unit)
        try:
            if os.lstat(top).st_uid != uid:
                return unit, unit
        except FileNotFoundError:
            continue
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        for folder, dirs, files in os.walk(top):
            if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                return unit, os.path.relpath(folder, stack)
            for name in dirs + files:
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_uid != uid:
                        return unit, os.path.relpath(path, stack)
    return None


def check_units(stack: str, units: Iterable[str], points: Collection[str] = ()) -> None:
    """Refuse units whose place on disk lies behind a symlink, and, when not
    root, units holding what another user owns."""
    if os.geteuid() != 0:
        foreign = not_ours(stack, units, os.geteuid())
        if foreign is not None:
            raise UserError("cannot replace %s without root: %s belongs to another user or "
                            "cannot be read (a container's files); run restore.py with sudo"
                            % foreign)
    for unit in units:
        for ancestor in staging_ancestors(unit):
            path = os.path.join(stack, ancestor)
            if os.path.islink(path) and ancestor not in points:
                raise UserError("cannot restore %s: %s is a symlink on disk, and the "
                                    "restore never writes through one" % (unit, ancestor))
            if os.path.lexists(path) and not os.path.isdir(path):
                raise UserError("cannot restore %s: %s is not a directory" % (unit, ancestor))
