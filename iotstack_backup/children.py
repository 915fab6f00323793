"""Forked child processes that do one job and report how it ended.

Restore runs two helpers beside the reading process: the gzip decompressor
(pgzip) and the file writer (file_writer).  fork_piped_child gives either a
data pipe and a status pipe.  How it keeps data safe: a child closes every
descriptor it was not given (a lock must not outlive its owner), resets the
signal handlers, and leaves with os._exit so none of the parent's clean-up
runs twice; it reports success only as its last act, so a child that was
killed or crashed is an error (child_failure), never a silent success.
No loop here or in the children's callers calls again a write that moved
nothing: that is a NoProgressError, not a spin at 100% CPU.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import warnings

# typing is only read by the type checker (mypy treats this name as True):
# the annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Iterable, Mapping, Union

    # What os.write and memoryview take; a status, a chunk or a piece of one.
    Bytes = Union[bytes, bytearray, memoryview]

# Linux lets any process grow a pipe to 1 MiB: fewer, larger reads.
# (fcntl names F_SETPIPE_SZ from Python 3.10 on; 1031 is Linux's value.)
PIPE_SIZE = 1 << 20


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def fork_piped_child(body: Callable[[int, int], object], parent_reads: bool,
                     keep: Iterable[int] = ()) -> tuple[int, int, int]:
    """Fork a child joined to this process by a data pipe (grown to
    PIPE_SIZE; from child to parent when parent_reads, else the other way)
    and a status pipe.  Returns (pid, data_fd, status_fd): the parent's ends.

    In the child, body(data_fd, status_fd) runs with SIGINT, SIGTERM and
    SIGHUP at their defaults and no descriptor open but its two and keep;
    then the data end is closed and the status written after anything body
    wrote there: b"ok", or child_status() of what body raised.  The child
    leaves by os._exit, running no code of the parent's (no atexit
    handlers, no buffered output flushed twice).
    Python 3.12+ warns about fork() beside other threads; body must take no
    lock another thread may hold (plain system calls and zlib take none).
    """
    data_read, data_write = os.pipe()
    status_read, status_write = os.pipe()
    try:
        fcntl.fcntl(data_write, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only means more switches
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except BaseException:
        for fd in (data_read, data_write, status_read, status_write):
            os.close(fd)
        raise
    child_end, parent_end = (data_write, data_read) if parent_reads else (data_read, data_write)
    if pid == 0:
        status = b"error\nError\nthe child process failed"
        try:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            os.close(parent_end)
            os.close(status_read)
            _close_other_fds((child_end, status_write) + tuple(keep))
            body(child_end, status_write)
            status = b"ok"
        except BaseException as error:
            status = child_status(error)
        finally:
            try:
                os.close(child_end)
                write_all_fd(status_write, status)
            finally:
                os._exit(0)
    os.close(child_end)
    os.close(status_write)
    return pid, parent_end, status_read


def child_status(error: BaseException) -> bytes:
    """How a child says it failed: the errno of an OSError, else the name
    of the exception's class; then the message."""
    if isinstance(error, OSError):
        text = "oserror\n%d\n%s" % (error.errno or errno.EIO, error.strerror or error)
    else:
        text = "error\n%s\n%s" % (type(error).__name__, error)
    return text.encode("utf-8", "replace")


def read_child_status(fd: int) -> bytes:
    """All a child wrote on its status pipe: empty if it was killed."""
    status = b""
    while True:
        more = os.read(fd, 4096)
        if not more:
            return status
        status += more


def _close_other_fds(keep: tuple[int, ...]) -> None:
    # The child must not hold the parent's other files open: a lock held
    # through an inherited descriptor would outlive a killed parent.
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class NoProgressError(OSError):
    """A write that should have moved data moved none: raised instead of
    calling it again for ever."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, "%s made no progress (0 bytes written)" % what)


def write_all_fd(fd: int, data: Bytes, what: str = "a write") -> None:
    """os.write until all of data is written; NoProgressError if a write
    takes none of it."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise NoProgressError(what)
        view = view[written:]


def child_failure(status: bytes, known: Mapping[str, Callable[[str], BaseException]],
                  unknown: Callable[[str], BaseException],
                  unfinished: Callable[[], BaseException]) -> BaseException:
    """The exception a child's status other than b"ok" stands for: an
    OSError with its errno, a class of `known` (by name) with its message,
    else unknown(message); unfinished() if the child said nothing (it was
    killed: out of memory, say)."""
    kind, _, rest = status.decode("utf-8", "replace").partition("\n")
    if kind == "oserror":
        number, _, message = rest.partition("\n")
        return OSError(int(number), message)
    if kind == "error":
        name, _, message = rest.partition("\n")
        return known[name](message) if name in known else unknown(message)
    return unfinished()
