"""The recording FUSE file system: a passthrough over a backing directory.

Run as `python3 -m tests.powercut.fs BACKING MOUNT RECORD [allow_other]`
(harness.py does).  Every call that changes something is done on BACKING and appended
to the record, in the order this single-threaded server handled it (the
order the kernel completed them), with what model.py needs to replay it:
inode ids (our own, stable across renames and hard links, new for each
inode created), names, data, modes, owners and times.  fsync, fdatasync
and fsync of a directory (fsyncdir) are recorded as the durable points
they are; a lookup of `/.powercut-sync-begin-T` or `/.powercut-sync-end-T`
(harness.py's hook around sync()/syncfs()) is recorded as a global one.
Each call is stamped with the moment it was done (CLOCK_MONOTONIC, one
clock for every process of the machine), after it was done on BACKING and
before the kernel hears it returned: the records of two file systems
mounted at once (one inside the other) then fall into one order, so that a
cut after a call is one instant on both (disks.py).  On unmount the record
is pickled to RECORD: {"initial": the tree as it was at mount, "ops":
[...], "stamps": [the moment of each call]}.

The backing directory itself is never fsynced: it is thrown away after the
run, and only the record says what a disk would have kept.
"""
from __future__ import annotations

import errno
import os
import pickle
import stat
import sys
import time

import mfusepy

from .harness import SYNC_BEGIN, SYNC_END
_NO_ID = 0xFFFFFFFF  # chown's "leave as it is", as FUSE passes it


def snapshot(root: str) -> dict:
    """{id: inode dict} of the tree at root (id 0), and the ino -> id map."""
    ids: dict = {}
    inodes: dict = {}

    def visit(path: str) -> int:
        st = os.lstat(path)
        if st.st_ino in ids:
            return ids[st.st_ino]
        ident = ids[st.st_ino] = len(ids)
        node = inode_of(path, st)
        inodes[ident] = node
        if node["kind"] == "dir":
            node["entries"] = {name: visit(os.path.join(path, name))
                               for name in sorted(os.listdir(path))}
        return ident

    visit(root)
    return {"inodes": inodes, "ids": ids}


def inode_of(path: str, st: os.stat_result) -> dict:
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "special")
    node = {"kind": kind, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "atime": st.st_atime_ns, "mtime": st.st_mtime_ns, "rdev": st.st_rdev,
            "data": b"", "target": None, "entries": {}, "xattrs": {}}
    if kind == "file":
        with open(path, "rb") as f:
            node["data"] = f.read()
    elif kind == "symlink":
        node["target"] = os.readlink(path)
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            node["xattrs"][name] = os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        pass
    return node


class StampedCalls(list):
    """The recorded calls; `stamps` holds the moment each was appended."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list = []

    def append(self, op: tuple) -> None:
        super().append(op)
        self.stamps.append(time.monotonic_ns())


class RecordingFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: str):
        self.root = os.path.realpath(backing)
        initial = snapshot(self.root)
        self.initial = initial["inodes"]
        self.ids = initial["ids"]
        self.next_id = len(self.ids)
        self.ops = StampedCalls()

    # -- helpers
    def _real(self, path: str) -> str:
        return self.root + path if path != "/" else self.root

    def _id(self, st: os.stat_result) -> int:
        if st.st_ino not in self.ids:  # made outside the mount: should not happen
            self._assign(st)
        return self.ids[st.st_ino]

    def _assign(self, st: os.stat_result) -> int:
        ident = self.ids[st.st_ino] = self.next_id
        self.next_id += 1
        return ident

    def _path_id(self, path: str) -> int:
        return self._id(os.lstat(self._real(path)))

    def _fd_id(self, fh: int) -> int:
        return self._id(os.fstat(fh))

    def _times(self, path: str) -> tuple:
        st = os.lstat(self._real(path))
        return st.st_atime_ns, st.st_mtime_ns

    def _parent(self, path: str) -> tuple:
        parent, name = os.path.split(path)
        return parent or "/", name

    def _made(self, path: str, target: str | None = None) -> None:
        """Record a new inode at path (create, mkdir, mknod, symlink), owned
        by the caller as a passthrough file system must."""
        real = self._real(path)
        uid, gid, _pid = mfusepy.fuse_get_context()
        os.lchown(real, uid, gid)
        st = os.lstat(real)
        ident = self._assign(st)
        parent, name = self._parent(path)
        node = inode_of(real, st)
        node["target"] = target
        self.ops.append(("create", self._path_id(parent), name, ident, node,
                         self._times(parent)))

    # -- reading
    def getattr(self, path, fh=None):
        name = path[1:]
        if name.startswith(SYNC_BEGIN) or name.startswith(SYNC_END):
            kind = "syncbegin" if name.startswith(SYNC_BEGIN) else "syncend"
            self.ops.append((kind, name.rsplit("-", 1)[1]))
            raise mfusepy.FuseOSError(errno.ENOENT)
        # A directory's handle is 0 (opendir's default): only a file that
        # is open and unlinked has no path.
        st = os.fstat(fh) if path is None else os.lstat(self._real(path))
        attrs = {key: getattr(st, key) for key in (
            "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev",
            "st_blocks", "st_blksize")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path, fh):
        # With use_ino an entry needs its inode number (0 means "no entry").
        real = self._real(path)
        st = os.lstat(real)
        entries = [(".", {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0),
                   ("..", {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0)]
        with os.scandir(real) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries.append((entry.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
        return entries

    def readlink(self, path):
        return os.readlink(self._real(path))

    def open(self, path, flags):
        fh = os.open(self._real(path), flags & ~os.O_CREAT)
        if flags & os.O_TRUNC:
            self.ops.append(("truncate", self._fd_id(fh), 0, self._times(path)))
        return fh

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def statfs(self, path):
        sv = os.statvfs(self._real(path))
        return {key: getattr(sv, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}

    def getxattr(self, path, name, position=0):
        try:
            return os.getxattr(self._real(path), name, follow_symlinks=False)
        except OSError as e:
            raise mfusepy.FuseOSError(e.errno)

    def listxattr(self, path):
        return os.listxattr(self._real(path), follow_symlinks=False)

    def release(self, path, fh):
        os.close(fh)
        return 0

    # -- data
    def create(self, path, mode, flags=os.O_WRONLY):
        fh = os.open(self._real(path), flags | os.O_CREAT | os.O_EXCL, mode)
        self._made(path)
        return fh

    def write(self, path, data, offset, fh):
        written = os.pwrite(fh, data, offset)
        st = os.fstat(fh)
        self.ops.append(("write", self._id(st), offset, bytes(data[:written]),
                         (st.st_atime_ns, st.st_mtime_ns)))
        return written

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
            st = os.fstat(fh)
        else:
            os.truncate(self._real(path), length)
            st = os.lstat(self._real(path))
        self.ops.append(("truncate", self._id(st), length, (st.st_atime_ns, st.st_mtime_ns)))
        return 0

    def fsync(self, path, datasync, fh):
        self.ops.append(("fsync", self._fd_id(fh), bool(datasync)))
        return 0

    def fsyncdir(self, path, datasync, fh):
        self.ops.append(("fsyncdir", self._path_id(path)))
        return 0

    # -- names
    def mkdir(self, path, mode):
        os.mkdir(self._real(path), mode)
        self._made(path)
        return 0

    def mknod(self, path, mode, dev):
        os.mknod(self._real(path), mode, dev)
        self._made(path)
        return 0

    def symlink(self, target, source):
        os.symlink(source, self._real(target))
        self._made(target, source)
        return 0

    def link(self, target, source):
        os.link(self._real(source), self._real(target), follow_symlinks=False)
        parent, name = self._parent(target)
        self.ops.append(("link", self._path_id(parent), name, self._path_id(source),
                         self._times(parent)))
        return 0

    def unlink(self, path):
        ident = self._path_id(path)
        os.unlink(self._real(path))
        parent, name = self._parent(path)
        self.ops.append(("unlink", self._path_id(parent), name, ident, self._times(parent)))
        return 0

    def rmdir(self, path):
        ident = self._path_id(path)
        os.rmdir(self._real(path))
        parent, name = self._parent(path)
        self.ops.append(("rmdir", self._path_id(parent), name, ident, self._times(parent)))
        return 0

    def rename(self, old, new):
        ident = self._path_id(old)
        os.rename(self._real(old), self._real(new))
        src, src_name = self._parent(old)
        dst, dst_name = self._parent(new)
        self.ops.append(("rename", self._path_id(src), src_name, self._path_id(dst), dst_name,
                         ident, self._times(src), self._times(dst)))
        return 0

    # -- attributes
    def chmod(self, path, mode):
        os.chmod(self._real(path), stat.S_IMODE(mode))
        self.ops.append(("chmod", self._path_id(path), stat.S_IMODE(mode)))
        return 0

    def chown(self, path, uid, gid):
        uid = -1 if uid == _NO_ID else uid
        gid = -1 if gid == _NO_ID else gid
        os.lchown(self._real(path), uid, gid)
        st = os.lstat(self._real(path))
        self.ops.append(("chown", self._id(st), st.st_uid, st.st_gid))
        return 0

    def utimens(self, path, times=None):
        real = self._real(path)
        if times is None:
            os.utime(real, follow_symlinks=False)
        else:
            os.utime(real, ns=tuple(int(t) for t in times), follow_symlinks=False)
        st = os.lstat(real)
        self.ops.append(("utimens", self._id(st), st.st_atime_ns, st.st_mtime_ns))
        return 0

    def setxattr(self, path, name, value, options, position=0):
        os.setxattr(self._real(path), name, value, options, follow_symlinks=False)
        self.ops.append(("setxattr", self._path_id(path), name, bytes(value)))
        return 0

    def removexattr(self, path, name):
        try:
            os.removexattr(self._real(path), name, follow_symlinks=False)
        except OSError as e:
            raise mfusepy.FuseOSError(e.errno)
        self.ops.append(("removexattr", self._path_id(path), name))
        return 0


def serve(backing: str, mount: str, record: str, allow_other: str = "") -> None:
    """allow_other: "allow_other" lets a process whose ids are not all the
    mounter's use the fs too (root running a setgid program: crontab)."""
    os.umask(0)  # the kernel applied the caller's umask already
    operations = RecordingFS(backing)
    extra = {"allow_other": True} if allow_other == "allow_other" else {}
    try:
        mfusepy.FUSE(operations, mount, foreground=True, nothreads=True, use_ino=True,
                     hard_remove=True, **extra,
                     default_permissions=True, fsname="powercut", attr_timeout=0,
                     entry_timeout=0, negative_timeout=0)
    finally:
        temp = record + ".new"
        with open(temp, "wb") as f:
            pickle.dump({"initial": operations.initial, "ops": list(operations.ops),
                         "stamps": operations.ops.stamps}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.rename(temp, record)


if __name__ == "__main__":
    serve(*sys.argv[1:5])
