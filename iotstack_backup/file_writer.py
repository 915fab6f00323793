"""A child process that creates the unpacked files, beside the one that reads
the archive.

Restoring, one process reads the tar stream, checks each member and decides
where it goes; creating a small file then costs half a dozen system calls
(open, write, chown, chmod, utime, close), more than all the checks.
FileWriterProcess hands regular files to a forked child through a pipe, as
records of name, mode, owner, mtime and data batched into few writes, so
that those calls run on another core while the reader goes on (and gzip
decompresses on a third).  The child only carries out: it creates each file
with the caller's create_file, in the order sent, and decides nothing.

How it keeps data safe: records are handled strictly in order; wait()
returns only once the child has created every file sent before it, so the
caller can wait before it touches a path the child may still write; an
error in the child stops it, and the parent raises it, with its type,
message and errno, at the next send, wait or finish; a child that ends
without saying it succeeded is an error; close() kills and reaps the child,
so nothing writes into the staging folder after the caller has given up on
it.  The child holds no other descriptor of the parent's (a lock must not
outlive the parent) and leaves by os._exit, running none of its code.
No loop spins on a call that makes no progress: empty pieces (an empty
file's) are never queued, and a writev that takes nothing of what remains
is an error (children.NoProgressError), not a reason to try again.
"""
from __future__ import annotations

import errno
import os
import signal
import struct

from . import children
from .tarformat import ChunkStream

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Type

    from .children import Bytes

    # create_file(rel, mode, uid, gid, mtime, pieces); what it returns is unused.
    CreateFile = Callable[[str, int, int, int, int, Iterable[memoryview]], object]

# op, name length, mode, uid, gid, mtime, size; then the name and the data.
_RECORD = struct.Struct("<BIIIIqQ")
_FILE, _WAIT, _END = 1, 2, 3
# A batch is written at this size; os.writev takes at most 1024 buffers.
BATCH_BYTES = 64 * 1024
BATCH_BUFFERS = 500
# As the reader's: with 1 MiB reads, malloc kept more memory the more data
# went by.
_READ_SIZE = 256 * 1024
_OK = b"ok"


def unwritten(buffers: List[Bytes], written: int) -> List[Bytes]:
    """What is left of buffers once the first `written` bytes have gone:
    whole buffers dropped (empty ones too), the first left one cut."""
    index = 0
    while index < len(buffers) and written >= len(buffers[index]):
        written -= len(buffers[index])
        index += 1
    rest = buffers[index:]
    if written:
        rest[0] = memoryview(rest[0])[written:]
    return rest


class FileWriterProcess:
    """Parent side.  create_file(rel, mode, uid, gid, mtime, pieces) runs in
    the child, once per file sent; exceptions of the types in `raisable`
    come back as themselves, OSError with its errno, anything else as
    OSError(EIO)."""

    def __init__(self, create_file: CreateFile, raisable: Iterable[Type[Exception]] = ()) -> None:
        self.raisable: Dict[str, Type[Exception]] = {cls.__name__: cls for cls in raisable}
        pid, jobs_write, status_read = children.fork_piped_child(
            lambda jobs, status: _serve(create_file, jobs, status), parent_reads=False)
        self.pid: Optional[int] = pid
        self._jobs, self._status = jobs_write, status_read
        self._batch: List[Bytes] = []
        self._batched = 0

    def send(self, rel: str, mode: int, uid: int, gid: int, mtime: int, size: int,
             pieces: Iterable[Bytes]) -> None:
        """Queue a file; pieces (buffers totalling size bytes) may be read
        after this returns, until the next send, wait or finish."""
        name = rel.encode("utf-8", "surrogateescape")
        batch = self._batch
        batch.append(_RECORD.pack(_FILE, len(name), mode, uid, gid, mtime, size))
        batch.append(name)
        self._batched += _RECORD.size + len(name)
        given = 0
        for piece in pieces:
            if not len(piece):
                # An empty file's one empty piece: queued, it could end a
                # batch as all that is left to write, and writev of nothing
                # returns 0 for ever.
                continue
            batch.append(piece)
            given += len(piece)
            self._batched += len(piece)
            if self._batched >= BATCH_BYTES or len(batch) >= BATCH_BUFFERS:
                self._flush()
                batch = self._batch
        if given != size:
            # The child would take the next record's bytes as data.
            self.close()
            raise ValueError("%d bytes given for a file of %d" % (given, size))
        if self._batched >= BATCH_BYTES or len(batch) >= BATCH_BUFFERS:
            self._flush()

    def wait(self) -> None:
        """Return once every file sent so far exists, or raise its error."""
        self._batch.append(_RECORD.pack(_WAIT, 0, 0, 0, 0, 0, 0))
        self._flush()
        answer = os.read(self._status, len(_OK))
        if answer != _OK:
            self._raise_status(answer + self._read_status() if answer else answer)

    def finish(self) -> None:
        """Wait for every file, then end the child; raise its error if any."""
        self._batch.append(_RECORD.pack(_END, 0, 0, 0, 0, 0, 0))
        self._flush()
        status = self._read_status()
        self.close()
        if status != _OK:
            self._raise_status(status)

    def close(self) -> None:
        """Kill and reap the child; nothing it does can follow."""
        if self.pid is None:
            return
        os.close(self._jobs)
        os.close(self._status)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.pid = None
        self._batch = []

    def __enter__(self) -> FileWriterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _flush(self) -> None:
        buffers = self._batch
        self._batch = []
        self._batched = 0
        try:
            buffers = unwritten(buffers, 0)
            while buffers:
                written = os.writev(self._jobs, buffers)
                if not written:
                    self.close()
                    raise children.NoProgressError("writing to the process creating the files")
                # A pipe takes a whole write unless a signal cuts it short.
                buffers = unwritten(buffers, written)
        except BrokenPipeError:
            # The child stopped reading: it failed, and says why.
            self._raise_status(self._read_status())

    def _read_status(self) -> bytes:
        return children.read_child_status(self._status)

    def _raise_status(self, status: bytes) -> NoReturn:
        raise children.child_failure(
            status, self.raisable,
            unknown=lambda message: OSError(errno.EIO, "creating the files failed: %s" % message),
            unfinished=lambda: OSError(errno.EIO, "the process creating the files ended "
                                                  "without finishing"))


def _chunks_from(fd: int) -> Iterator[bytes]:
    """What the parent sends, as it comes; EOFError if it stops midway."""
    while True:
        more = os.read(fd, _READ_SIZE)
        if not more:
            # The parent went away without saying it was done.
            raise EOFError("the restoring process stopped sending")
        yield more


def _serve(create_file: CreateFile, jobs: int, status_out: int) -> None:
    records = ChunkStream(_chunks_from(jobs))
    while True:
        op, name_length, mode, uid, gid, mtime, size = _RECORD.unpack(records.read(_RECORD.size))
        if op == _END:
            return
        if op == _WAIT:
            os.write(status_out, _OK)
            continue
        rel = records.read(name_length).decode("utf-8", "surrogateescape")
        pieces = records.pieces(size)
        create_file(rel, mode, uid, gid, mtime, pieces)
        for _ in pieces:  # whatever create_file left unread
            pass
