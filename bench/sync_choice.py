#!/usr/bin/env python3
"""How a restore makes its files durable: three ways, measured side by side.

    python3 bench/sync_choice.py --tree DIR [--rounds 3] [--workdir DIR]

Issue 23 asks to sync only what a restore wrote and to measure the ways
of doing it.  Each round copies the regular files of a tree (built by
bench/stack_builder.py, read from the page cache after an untimed first
pass) into a fresh folder on the --workdir file system the way restore's
writer child creates them (O_CREAT|O_EXCL, one write per MiB, close), then
makes every file and name durable, in one of three ways, alternating:

- syncfs: what restore does today (unpack.EarlyWriteback): syncfs(2) of
  the one file system in the background every 16 MiB written, and once
  at the end;
- fdatasync: each file fdatasynced as it is complete, then every folder
  created fsynced (their entries);
- sync_file_range: writeback of each file started as it is complete
  (SYNC_FILE_RANGE_WRITE: no waiting), then one syncfs at the end.

The time is taken from the first file created to the end of the last
sync.  os.sync() runs before every copy, outside the timing; the copies
are deleted after the last round.  The medians are printed as a Markdown
table.  Linux only (syncfs, sync_file_range through ctypes); stdlib only.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))

from iotstack_backup import disk_sync  # noqa: E402

CHUNK = 1 << 20
STEP = 16 << 20
SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                             ctypes.c_uint]


def tree_files(tree: str) -> list:
    """(relative folder, [(name, size)]) of every folder, in walk order."""
    listing = []
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        rel = os.path.relpath(root, tree)
        regular = [(name, os.lstat(os.path.join(root, name)).st_size) for name in sorted(files)
                   if os.path.isfile(os.path.join(root, name))
                   and not os.path.islink(os.path.join(root, name))]
        listing.append((rel, regular))
    return listing


class Background:
    """syncfs of one file system on a thread each time STEP more bytes
    were written (as unpack.EarlyWriteback)."""

    def __init__(self, folder: str):
        self.folder, self.written, self.asked = folder, 0, 0
        self.wanted, self.closing = threading.Event(), False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def wrote(self, n: int) -> None:
        self.written += n
        if self.written - self.asked >= STEP:
            self.asked = self.written
            self.wanted.set()

    def run(self) -> None:
        while True:
            self.wanted.wait()
            if self.closing:
                return
            self.wanted.clear()
            disk_sync.sync_filesystem(self.folder)

    def close(self) -> None:
        self.closing = True
        self.wanted.set()
        self.thread.join()


def copy(tree: str, listing: list, target: str, way: str) -> float:
    """Copy the files into target and make them durable the given way;
    seconds taken."""
    os.sync()
    start = time.perf_counter()
    background = Background(target) if way == "syncfs" else None
    folders = []
    for rel, files in listing:
        folder = os.path.normpath(os.path.join(target, rel))
        os.makedirs(folder, exist_ok=True)
        folders.append(folder)
        for name, size in files:
            with open(os.path.join(tree, rel, name), "rb") as source:
                fd = os.open(os.path.join(folder, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    while True:
                        data = source.read(CHUNK)
                        if not data:
                            break
                        os.write(fd, data)
                    if way == "fdatasync":
                        os.fdatasync(fd)
                    elif way == "sync_file_range":
                        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
                finally:
                    os.close(fd)
            if background is not None:
                background.wrote(size)
    if background is not None:
        background.close()
    if way == "fdatasync":
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    else:
        disk_sync.sync_filesystem(target)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    listing = tree_files(args.tree)
    files = sum(len(f) for _rel, f in listing)
    size = sum(s for _rel, f in listing for _n, s in f)
    work = tempfile.mkdtemp(prefix="sync-choice.", dir=args.workdir)
    ways = ("syncfs", "fdatasync", "sync_file_range")
    times = {way: [] for way in ways}
    try:
        warm = os.path.join(work, "warm")
        copy(args.tree, listing, warm, "syncfs")  # the tree into the page cache
        for number in range(args.rounds):
            for way in ways:
                seconds = copy(args.tree, listing, os.path.join(work, "%s-%d" % (way, number)),
                               way)
                times[way].append(seconds)
                print("round %d: %s %.2f s" % (number + 1, way, seconds), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["syncfs"])
    print("\n%d files, %.1f MB, %d rounds, medians\n" % (files, size / 1e6, args.rounds))
    print("| way | median s | min-max s | ratio to syncfs |")
    print("| --- | --- | --- | --- |")
    for way in ways:
        median = statistics.median(times[way])
        print("| %s | %.2f | %.2f-%.2f | %.2f |" % (way, median, min(times[way]),
                                                     max(times[way]), median / base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
