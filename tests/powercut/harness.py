"""Mounting the power-cut file system, running a command on it, and
sweeping its cut points (see tests/powercut/__init__.py)."""
from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

from . import model

# Lookups of these names (then a token) tell fs.py a sync began or returned.
SYNC_BEGIN = ".powercut-sync-begin-"
SYNC_END = ".powercut-sync-end-"

HEAVY_REASON = "full power-cut sweep: runs where IOTSTACK_HEAVY=1 (CI's 3.11 pass)"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def missing() -> str | None:
    """Why the power-cut tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the power-cut file system needs root (FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "the power-cut file system needs /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "the power-cut file system needs fuse3 (fusermount3): apt-get install fuse3"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return "the power-cut file system needs mfusepy (pip install mfusepy): %s" % e
    return None


def fast_tmp(prefix: str) -> str:
    """A new folder on a RAM file system where there is one (/dev/shm):
    each cut state is written and removed there, and a folder made or
    removed on a busy disk costs a hundred times more."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o755)
    return path


def heavy() -> bool:
    return os.environ.get("IOTSTACK_HEAVY") == "1"


class Mount:
    """fs.py serving `backing` at `mount` in a child process; stop()
    unmounts it and returns the record.  The record and the server's log
    are kept at `files` (a path prefix; default: beside the mount), which
    must not be on a power-cut fs (a mount inside another one);
    allow_other: for a setgid program (see fs.serve)."""

    def __init__(self, backing: str, mount: str, files: str | None = None,
                 allow_other: bool = False):
        self.backing, self.mount = backing, mount
        files = files or mount.rstrip("/")
        self.record_path = files + ".powercut-record"
        os.makedirs(mount, exist_ok=True)
        self.log = open(files + ".powercut-log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.powercut.fs", backing, mount, self.record_path]
            + (["allow_other"] if allow_other else []),
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.ismount(mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.log.seek(0)
                raise RuntimeError("the power-cut file system did not mount: %s"
                                   % self.log.read().decode(errors="replace")[-2000:])
            time.sleep(0.02)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", self.mount], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                subprocess.run(["fusermount3", "-uz", self.mount], check=False)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with open(self.record_path, "rb") as f:
            record = pickle.load(f)
        os.unlink(self.record_path)
        os.unlink(self.log.name)
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-uz", self.mount], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.log.close()


_tokens = itertools.count()

# The functions that flush a whole file system: the fs cannot see them, so
# the hook tells it when each began and when it returned.
SYNC_FUNCTIONS = [("os", "sync"), ("iotstack_backup.iotstack", "syncfs"),
                  ("iotstack_backup.disk_sync", "sync_filesystem")]


@contextlib.contextmanager
def sync_hook(mounts):
    """While a command runs on the mounts (one path, or a list): each
    sync() it calls is recorded on every mount as a global durable point
    (begin and end), each syncfs of a path on the mount that holds it."""
    mounts = [mounts] if isinstance(mounts, str) else list(mounts)
    devices = {mount: os.stat(mount).st_dev for mount in mounts}
    patches = []
    for module_name, attr in SYNC_FUNCTIONS:
        module = sys.modules.get(module_name)
        if module is None or not callable(getattr(module, attr, None)):
            continue
        reach = (lambda *args: mounts) if (module_name, attr) == ("os", "sync") else \
            _mounts_of(devices)
        patches.append(mock.patch.object(module, attr, _hooked(getattr(module, attr), reach)))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _mounts_of(devices: dict):
    """The mounts a syncfs(path) flushes: the one on path's device (every
    mount when path cannot be looked at: the call then fails anyway)."""
    def reach(path="/", *args, **kwargs):
        try:
            device = os.stat(path).st_dev
        except (OSError, TypeError, ValueError):
            return list(devices)
        return [mount for mount, dev in devices.items() if dev == device]
    return reach


def _hooked(real, reach):
    def flush(*args, **kwargs):
        token = next(_tokens)
        mounts = reach(*args, **kwargs)
        for mount in mounts:
            os.path.lexists(os.path.join(mount, SYNC_BEGIN + str(token)))
        try:
            return real(*args, **kwargs)
        finally:
            for mount in mounts:
                os.path.lexists(os.path.join(mount, SYNC_END + str(token)))
    return flush


def record_run(backing: str, mount: str, run):
    """Mount, run(mount) with the sync hook, unmount: (its result, record)."""
    with Mount(backing, mount) as fs:
        try:
            with sync_hook(mount):
                result = run(mount)
        finally:
            record = fs.stop()
    return result, record


def build_strict(record: dict, cut: int, dest: str) -> None:
    """Materialize the strictest state of the cut after call `cut` at dest."""
    kept = model.kept_strict(record["ops"], model.durable_at(record["ops"]), cut)
    model.materialize(model.replay(record, kept, cut), dest)


class Sweep:
    """The states of every cut point, each distinct state once.

    For each cut the strictest state, the every-name-kept-data-lost state
    and `randoms` seeded random states are built; next_run(cut, kind) is
    called with the state materialized at `dest` and returns a list of
    problems (empty when the invariants hold)."""

    def __init__(self, record: dict, dest: str, seed: int = 22, randoms: int = 1):
        self.record, self.dest, self.seed, self.randoms = record, dest, seed, randoms
        self.ops = record["ops"]
        self.durable = model.durable_at(self.ops)
        self.seen: dict = {}
        self.cuts = 0
        self.problems: list = []

    def states(self, cut: int):
        yield "strict", model.kept_strict(self.ops, self.durable, cut)
        yield "names kept, data lost", model.kept_names(self.ops, self.durable, cut)
        for n in range(self.randoms):
            yield "random %d" % n, model.kept_random(self.ops, self.durable, cut,
                                                      self.seed * 1000 + n)

    def run(self, cuts: list, next_run) -> None:
        for cut in cuts:
            self.cuts += 1
            for kind, kept in self.states(cut):
                tree = model.replay(self.record, kept, cut)
                key = model.fingerprint(tree)
                if key in self.seen:
                    continue
                self.seen[key] = (cut, kind)
                model.materialize(tree, self.dest)
                for problem in next_run(cut, kind):
                    self.problems.append("cut after call %d %s (%s): %s"
                                         % (cut, self.describe(cut), kind, problem))

    def describe(self, cut: int) -> str:
        if cut < 0:
            return "(before any call)"
        op = self.ops[cut]
        shown = [repr(x)[:60] for x in op[1:] if not isinstance(x, (dict, bytes, tuple))]
        return "[%s %s]" % (op[0], " ".join(shown))

    def summary(self, label: str) -> str:
        return "%s: %d cuts, %d distinct states" % (label, self.cuts, len(self.seen))


def listing(root: str, skip=()) -> dict:
    """{rel: (type, mode, uid, gid, mtime_ns, content or link target,
    hard link)} of every entry below root (directory mtimes included);
    hard link is the first rel of a file's other names ("" for the first);
    `skip` names entries (relative paths) to leave out with what is below."""
    entries: dict = {}
    firsts: dict = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel in skip or any(rel.startswith(s + "/") for s in skip):
                continue
            st = os.lstat(path)
            link = ""
            if os.path.islink(path):
                what = ("symlink", os.readlink(path))
            elif os.path.isdir(path):
                what = ("dir", "")
            elif os.path.isfile(path):
                if st.st_nlink > 1:
                    link = firsts.setdefault((st.st_dev, st.st_ino), rel)
                    link = "" if link == rel else link
                with open(path, "rb") as f:
                    what = ("file", f.read())
            else:
                what = ("special", st.st_rdev)
            entries[rel] = (what[0], st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what[1],
                            link)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return entries
