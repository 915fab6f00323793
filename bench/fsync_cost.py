#!/usr/bin/env python3
"""What durability costs: backup.py and restore.py with and without their
fsyncs, on the same tree, side by side with GNU tar in the same run.

    python3 bench/fsync_cost.py [--scale 0.25] [--rounds 3] [--workdir DIR]

The tool has no switch to skip its fsyncs and never will: for the "without"
runs this bench starts the command in a child Python in which os.fsync,
os.fdatasync, os.sync and the package's syncfs wrapper (if present) are
replaced by calls that do nothing (BENCH ONLY: such a run is not safe
against a power cut).  Each round runs, alternating: backup.py 1 (with,
without), tar -czf; restore.py ARCHIVE noask into a fresh folder (with,
without), tar -xzf, and tar -xzf && sync (tar paying the same durability).
os.sync() runs before every command, outside the timing.  Medians are
printed as a Markdown table and written to bench/out/fsync_cost.md.
Stdlib only, Python 3.9+.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
OUT = os.path.join(BENCH_DIR, "out", "fsync_cost.md")

# The child that runs a command with every flush to disk made a no-op.
NO_FSYNC = """
import os, runpy, sys
sys.path.insert(0, %r)
def _nothing(*args, **kwargs):
    return None
os.fsync = os.fdatasync = os.sync = _nothing
try:
    from iotstack_backup import disk_sync
    disk_sync.sync_filesystem = lambda path: "sync"
except ImportError:
    pass
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % REPO


def timed(argv: list, env: dict) -> float:
    os.sync()
    start = time.monotonic()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def fresh(path: str) -> str:
    """A freshly cloned IOTstack as restore.py recognises it: menu.sh only."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, "menu.sh"), "w") as f:
        f.write("#!/bin/bash\n")
    return path


class Bench:
    def __init__(self, workdir: str, scale: float):
        self.workdir = workdir
        self.stack = os.path.join(workdir, "IOTstack")
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "stack_builder.py"),
                        self.stack, "--scale", str(scale)], check=True,
                       stdout=subprocess.DEVNULL)
        self.archive = os.path.join(workdir, "archive.tar.gz")
        self.env = dict(os.environ, IOTSTACK_NO_DOCKER="1")
        self.user = ["root"] if os.geteuid() == 0 else []
        self.times: dict = {}

    def python(self, script: str, durable: bool) -> list:
        path = os.path.join(REPO, script)
        return [sys.executable, path] if durable else [sys.executable, "-c", NO_FSYNC, path]

    def record(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def backup(self, durable: bool) -> None:
        backups = os.path.join(self.stack, "backups")
        shutil.rmtree(backups, ignore_errors=True)
        argv = self.python("backup.py", durable) + ["1"] + self.user + [
            "--no-stop", "--dir", self.stack]
        self.record(("backup", durable), timed(argv, self.env))
        made = os.listdir(os.path.join(backups, "backup"))
        os.replace(os.path.join(backups, "backup", made[0]), self.archive)
        shutil.rmtree(backups)

    def restore(self, durable: bool) -> None:
        target = fresh(os.path.join(self.workdir, "target"))
        argv = self.python("restore.py", durable) + [self.archive, "noask", "--no-stop",
                                                     "--dir", target]
        self.record(("restore", durable), timed(argv, self.env))

    def tar(self) -> None:
        out = os.path.join(self.workdir, "tar.tar.gz")
        items = sorted(os.listdir(self.stack))
        self.record("tar -czf", timed(["tar", "-czf", out, "-C", self.stack] + items, self.env))
        os.unlink(out)
        for label, then_sync in (("tar -xzf", False), ("tar -xzf && sync", True)):
            target = fresh(os.path.join(self.workdir, "target"))
            argv = ["tar", "-xzf", self.archive, "-C", target]
            if then_sync:
                argv = ["sh", "-c", 'tar -xzf "$1" -C "$2" && sync', "sh", self.archive, target]
            self.record(label, timed(argv, self.env))

    def round(self) -> None:
        for durable in (True, False):
            self.backup(durable)
        for durable in (True, False):
            self.restore(durable)
        self.tar()


def report(bench: Bench, rounds: int, scale: float) -> str:
    med = {key: statistics.median(values) for key, values in bench.times.items()}
    lines = ["fsync cost, scale %s, %d rounds (medians, wall seconds), %s" % (
        scale, rounds, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), "",
             "| command | with fsync | without (bench only) | cost of durability | GNU tar |",
             "| --- | --- | --- | --- | --- |"]
    for name, ref in (("backup", "tar -czf"), ("restore", "tar -xzf")):
        with_, without = med[(name, True)], med[(name, False)]
        tar = "%.2f (`%s`)" % (med[ref], ref)
        if name == "restore":
            tar += ", %.2f (`tar -xzf && sync`)" % med["tar -xzf && sync"]
        lines.append("| %s.py | %.2f | %.2f | %+.2f s (%+.0f%%) | %s |" % (
            name, with_, without, with_ - without, 100 * (with_ - without) / without, tar))
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", help="a folder on the disk to measure (default: a temporary "
                                     "folder in the current directory)")
    args = p.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="fsync-cost-", dir=".")
    os.makedirs(workdir, exist_ok=True)
    try:
        bench = Bench(workdir, args.scale)
        bench.round()  # untimed: the page cache alike for all
        bench.times.clear()
        for _ in range(args.rounds):
            bench.round()
        text = report(bench, args.rounds, args.scale)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
