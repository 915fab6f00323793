"""Making durable what a run wrote, and only that.

os.sync() flushes every file system of the machine and waits for every
other process's writes too: on a Pi whose database is writing, or a
machine with a busy USB disk, the restore then pays for all of them.
syncfs(2) flushes one file system, with the same guarantee for it as
sync() (every dirty page, inode and directory entry of that file system is
on disk when it returns, the journal committed), so a restore syncs the
file systems it wrote to, one call each.  Python has no os.syncfs, so it is
called through ctypes from the C library.

How it keeps data safe: syncfs is used only where the C library has it
and the kernel answers; where it does not (no ctypes, no such symbol,
ENOSYS, a file system that refuses it) the fallback is os.sync(), slower
and never less safe.  An I/O error syncfs reports (EIO, ENOSPC: data that
could not be written) is raised, never taken as success.
"""
from __future__ import annotations

import errno
import os
from typing import Callable, Iterable, List, Optional

# Errors that mean "this way of syncing is not available here", not "your
# data could not be written": the whole-machine sync then does the job.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY}

_syncfs_function: Optional[Callable[[int], int]] = None
_looked_up = False


def _libc_syncfs() -> Optional[Callable[[int], int]]:
    """The C library's syncfs, or None (not Linux, no ctypes, old libc)."""
    global _syncfs_function, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.syncfs
            function.argtypes = [ctypes.c_int]
            function.restype = ctypes.c_int

            def call(fd: int) -> int:
                if function(fd) == 0:
                    return 0
                return ctypes.get_errno() or errno.EIO
            _syncfs_function = call
        except (ImportError, OSError, AttributeError):
            _syncfs_function = None
    return _syncfs_function


def sync_filesystem(path: str) -> str:
    """Flush the file system holding path; returns "syncfs" or, when that
    is not available here, "sync" (the whole machine was flushed)."""
    function = _libc_syncfs()
    if function is None:
        os.sync()
        return "sync"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        error = function(fd)
    finally:
        os.close(fd)
    if error == 0:
        return "syncfs"
    if error in _UNSUPPORTED:
        os.sync()
        return "sync"
    raise OSError(error, "syncing the file system of %s: %s" % (path, os.strerror(error)))


def distinct_filesystems(paths: Iterable[str]) -> List[str]:
    """One existing path per file system among paths, in their order."""
    seen, chosen = set(), []
    for path in paths:
        try:
            device = os.stat(path).st_dev
        except FileNotFoundError:
            continue
        if device not in seen:
            seen.add(device)
            chosen.append(path)
    return chosen


def sync_filesystems(paths: Iterable[str]) -> List[str]:
    """Flush each file system holding one of paths, once; the ways used."""
    return [sync_filesystem(path) for path in distinct_filesystems(paths)]
