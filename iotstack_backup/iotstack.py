"""The IOTstack directory: what is in a backup, what things are called, who owns them.

This is the small helper the two commands share.  It finds the stack
(--dir, $IOTSTACK, the working directory, then where backup.py lives),
lists the manifest items, names archives and logs (dated, rolling, and -2,
-3... for runs in the same minute), decides which old backups --keep,
--keep-daily, --keep-weekly and --keep-monthly remove (by retention.py),
picks the owner of the output when running as root, holds the lock that
lets one backup or restore run at a time, runs the hooks, and keeps
the run's log.  How it keeps data safe: names are decided by pure functions
so that nothing is overwritten except the rolling archive; retention never
picks the archive just written or a file it did not write; the log is
opened for appending and never truncated.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from typing import (IO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

from .run import EXIT_BUSY, EXIT_USAGE, UserError, fix_for, remember_log

# Items of a backup, in archive order.  services/ and volumes/ are expected;
# the rest are saved when present.  Directory items end in "/".
REQUIRED_ITEMS = ("services/", "volumes/")


OPTIONAL_ITEMS = (
    "docker-compose.yml", "docker-compose.override.yml", "compose-override.yml",
    ".env", "backup.ini", "extra/", ".tmp/databases_backup/", "postbuild.sh",
    "pre_backup.sh", "post_backup.sh", "post_restore.sh",
)


MANIFEST_ITEMS = REQUIRED_ITEMS + OPTIONAL_ITEMS


ITEM_NAMES = tuple(item.rstrip("/") for item in MANIFEST_ITEMS)


LOCK_NAME = ".tmp/iotstack-backup.lock"


JOURNAL_NAME = ".tmp/restore-journal.json"


PARTIAL_SUFFIX = ".partial"


ARCHIVE_MODE = 0o640  # archives hold secrets (.env, password files)


LOG_MODE = 0o640  # logs are not for every user of the Pi either


def is_stack_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "docker-compose.yml"))
            or os.path.isfile(os.path.join(path, "menu.sh")))


def find_stack_dir(option: Optional[str], environ: Mapping[str, str], cwd: Optional[str],
                   script_dir: Optional[str]) -> Optional[str]:
    """The IOTstack directory: --dir, $IOTSTACK, the cwd, then the script's."""
    if option:
        return os.path.abspath(option) if os.path.isdir(option) else None
    if environ.get("IOTSTACK"):
        path = environ["IOTSTACK"]
        return os.path.abspath(path) if os.path.isdir(path) else None
    for candidate in (cwd, script_dir):
        if candidate and is_stack_dir(candidate):
            return os.path.abspath(candidate)
    return None


# Where backup.py and restore.py are installed: beside this package.
INSTALL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def locate_stack(option: Optional[str]) -> str:
    stack = find_stack_dir(option, os.environ, os.getcwd(), INSTALL_DIR)
    if stack is None:
        where = option or os.environ.get("IOTSTACK") or os.getcwd()
        raise UserError(
            "%s is not an IOTstack directory (no docker-compose.yml or menu.sh); "
            "cd into IOTstack or pass --dir" % where)
    return stack


def archive_stamp(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%d_%H%M")


def rolling_weekday(now: datetime.datetime) -> int:
    """Day of the week with Sunday as 0, as the documentation always said."""
    return now.isoweekday() % 7


def first_free_stem(stem: str, taken: Callable[[str], bool]) -> str:
    """stem, then stem-2, stem-3...: the first for which taken() is false."""
    candidate, n = stem, 1
    while taken(candidate):
        n += 1
        candidate = "%s-%d" % (stem, n)
    return candidate


def dated_archive_path(backups: str, stem: str) -> str:
    return os.path.join(backups, "backup", "%s.tar.gz" % stem)


def rolling_archive_path(backups: str, now: datetime.datetime) -> str:
    return os.path.join(backups, "rolling", "backup_%d.tar.gz" % rolling_weekday(now))


def log_path(backups: str, stem: str) -> str:
    return os.path.join(backups, "logs", "%s.log" % stem)


def partial_path(final: str) -> str:
    folder, name = os.path.split(final)
    return os.path.join(folder, ".%s.%d%s" % (name, os.getpid(), PARTIAL_SUFFIX))


def is_partial_name(name: str) -> bool:
    return name.startswith(".backup_") and name.endswith(PARTIAL_SUFFIX)


DATED_NAME = re.compile(
    r"^(backup_(\d{4}-\d{2}-\d{2}_\d{4})(?:-(\d+))?)(?:\.incomplete)?\.tar\.gz(?:\.gpg)?$")


# An archive that lacks what could not be read (incomplete.py) is named
# NAME.incomplete.tar.gz: it never takes the name of a complete one.
INCOMPLETE_TAG = ".incomplete"


def incomplete_path(path: str) -> str:
    """backups/rolling/backup_5.tar.gz -> backups/rolling/backup_5.incomplete.tar.gz"""
    assert path.endswith(".tar.gz")
    return path[:-len(".tar.gz")] + INCOMPLETE_TAG + ".tar.gz"


def is_incomplete_name(name: str) -> bool:
    return name.endswith((INCOMPLETE_TAG + ".tar.gz", INCOMPLETE_TAG + ".tar.gz.gpg"))


# retention.py's rules and the options (and attributes of args) that set them.
RETENTION_OPTIONS = (("keep_last", "--keep", "keep"),
                     ("keep_daily", "--keep-daily", "keep_daily"),
                     ("keep_weekly", "--keep-weekly", "keep_weekly"),
                     ("keep_monthly", "--keep-monthly", "keep_monthly"))


def retention_policy(args: argparse.Namespace) -> Dict[str, int]:
    """{rule: count} of retention.py's rules from --keep, --keep-daily...;
    empty when every rule is off (then nothing is ever removed)."""
    return {rule: getattr(args, attr) for rule, _option, attr in RETENTION_OPTIONS
            if getattr(args, attr, None)}


def describe_policy(policy: Mapping[str, int]) -> str:
    """"--keep 3, --keep-daily 7": the options behind a removal, for the log."""
    return ", ".join("%s %d" % (option, policy[rule])
                     for rule, option, _attr in RETENTION_OPTIONS if policy.get(rule))


def dated_backup(name: str) -> Optional[Tuple[str, datetime.datetime, int]]:
    """(stem, datetime, n) of a dated backup's file name (the archive, or its
    .gpg copy off-site), None for any other name.  n is 1 for the plain name
    and 2, 3... for the -2, -3 of a second run in the same minute."""
    match = DATED_NAME.match(name)
    if not match:
        return None
    try:
        stamp = datetime.datetime.strptime(match.group(2), "%Y-%m-%d_%H%M")
    except ValueError:
        return None
    return match.group(1), stamp, int(match.group(3) or 1)


def dated_backups_to_remove(names: Iterable[str], keep_last: Optional[int] = None,
                            just_written: Optional[str] = None,
                            keep_daily: Optional[int] = None, keep_weekly: Optional[int] = None,
                            keep_monthly: Optional[int] = None) -> List[str]:
    """The names of the dated backups that retention.py's rules (--keep is
    keep_last; daily, weekly, monthly; united) do not keep, newest first.

    Backups are ordered by the time in their name (not mtime, which a copy
    can change); -2, -3... of one minute are newer than the plain name.  A
    backup is its stem: an archive and its .gpg copy are one backup, and
    both names are returned when it goes.  Other files are never chosen.
    The archive just written counts as the newest backup whatever its name
    says (a clock set back can make it look old) and is never chosen.
    Incomplete backups (NAME.incomplete.tar.gz) count for no rule: each
    goes once a complete backup newer than it is kept."""
    from . import retention
    stems: Dict[str, Tuple[datetime.datetime, float]] = {}  # n, or inf for the one just written
    by_stem: Dict[str, List[str]] = {}
    unfinished: Dict[str, Tuple[datetime.datetime, int, List[str]]] = {}
    for name in names:
        parsed = dated_backup(name)
        if parsed and is_incomplete_name(name):
            unfinished.setdefault(parsed[0], (parsed[1], parsed[2], []))[2].append(name)
        elif parsed:
            stems[parsed[0]] = parsed[1:]
            by_stem.setdefault(parsed[0], []).append(name)
    new = dated_backup(just_written) if just_written else None
    if new:
        newest = max([stamp for stamp, _n in stems.values()] + [new[1]])
        stems[new[0]] = (newest, float("inf"))
    pairs = sorted(((stem, stamp) for stem, (stamp, _n) in stems.items()),
                   key=lambda pair: (pair[1], stems[pair[0]][1]))
    doomed = retention.backups_to_remove(pairs, keep_last, keep_daily, keep_weekly, keep_monthly)
    kept = [stems[stem] for stem in stems if stem not in doomed]
    newest_kept = max(kept) if kept else None
    superseded = sorted((stamp, n, stem) for stem, (stamp, n, _names) in unfinished.items()
                        if new is None or stem != new[0])
    doomed_unfinished = [stem for stamp, n, stem in superseded
                         if newest_kept is not None and (stamp, n) < newest_kept]
    return ([name for stem in reversed(doomed) if not (new and stem == new[0])
             for name in sorted(by_stem.get(stem, []))]
            + [name for stem in reversed(doomed_unfinished)
               for name in sorted(unfinished[stem][2])])


def newest_archive(backups: str) -> Optional[Tuple[str, int]]:
    """(name relative to backups, size) of the newest complete archive in
    backup/ and rolling/ (by mtime), or None: what the size guard adopts as
    the last good backup while good_backups.json holds none (an incomplete
    one, NAME.incomplete.tar.gz, is no measure of what a backup holds)."""
    newest = None
    for folder in ("backup", "rolling"):
        with contextlib.suppress(OSError), os.scandir(os.path.join(backups, folder)) as it:
            for entry in it:
                if entry.name.endswith(".tar.gz") and not entry.name.startswith(".") \
                        and not is_incomplete_name(entry.name) \
                        and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if newest is None or st.st_mtime > newest[0]:
                        newest = (st.st_mtime, folder + "/" + entry.name, st.st_size)
    return None if newest is None else newest[1:]


def manifest_items(exists: Callable[[str], bool]) -> Tuple[List[str], List[str]]:
    """(items to archive, required items that are missing), in archive order."""
    items = [item for item in MANIFEST_ITEMS if exists(item.rstrip("/"))]
    missing = [item for item in REQUIRED_ITEMS if item not in items]
    return items, missing


def is_excluded(rel: str, patterns: Iterable[str]) -> bool:
    """True when a pattern matches the path relative to the stack, or its name.

    A pattern ending in "/" matches directories only: the caller passes
    directory paths with a trailing "/".
    """
    name = rel.rstrip("/").rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/") and not rel.endswith("/"):
            continue
        bare = pattern.rstrip("/") if pattern.endswith("/") else pattern
        target = rel.rstrip("/")
        if fnmatch.fnmatchcase(target, bare.lstrip("./") if bare.startswith("./") else bare):
            return True
        if "/" not in bare and fnmatch.fnmatchcase(name, bare):
            return True
    return False


# The member that records a backup's --exclude patterns: outside every
# item, so GNU tar and the original restore.sh just put it in .tmp/.
EXCLUDES_MEMBER = ".tmp/iotstack-backup-excludes.json"


def excludes_record(patterns: Iterable[str], excluded: Iterable[str]) -> bytes:
    return (json.dumps({"version": 1, "patterns": list(patterns), "excluded": list(excluded)},
                       indent=1) + "\n").encode()


def parse_excludes(data: bytes) -> List[str]:
    """The patterns of an excludes record; [] when it cannot be read."""
    try:
        patterns = json.loads(data.decode("utf-8")).get("patterns", [])
    except (ValueError, AttributeError, UnicodeDecodeError):
        return []
    return [p for p in patterns if isinstance(p, str)] if isinstance(patterns, list) else []


# Items by their first path component: item_of runs once per member.
_ITEMS_BY_TOP: Dict[str, List[str]] = {}


for _item in ITEM_NAMES:
    _ITEMS_BY_TOP.setdefault(_item.partition("/")[0], []).append(_item)


def item_of(path: str) -> Optional[str]:
    """The manifest item a member path belongs to, or None."""
    for item in _ITEMS_BY_TOP.get(path.partition("/")[0], ()):
        if path == item or path.startswith(item + "/"):
            return item
    return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, owner: Optional[Owner]) -> bool:
    """Create a folder of ours if needed; as root give it to the owner.

    Folders left to root by the old script are given back too (IOTstack #254).
    """
    created = False
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        problem = not_a_folder(path, os.path.lexists(path), os.path.islink(path),
                               os.readlink(path) if os.path.islink(path) else None)
        if problem:
            raise UserError(problem)
        os.makedirs(path, exist_ok=True)
        created = True
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    return created


def not_a_folder(path: str, exists: bool, is_link: bool, target: Optional[str]) -> Optional[str]:
    """Why a folder we need cannot be made at path (it is not a folder), or
    None: a symlink whose target is missing is most often a USB disk that
    is not mounted, and the backup must not go to the SD card instead."""
    if is_link:
        return ("%s is a symlink to %s, which does not exist: mount that disk (or create "
                "the folder), or remove the link" % (path, target))
    if exists:
        return "%s is not a folder: move it out of the way and run again" % path
    return None


def chown_to(path: str, owner: Optional[Owner]) -> None:
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


class Owner:
    def __init__(self, name: str, uid: int, gid: int) -> None:
        self.name, self.uid, self.gid = name, uid, gid

    def __repr__(self) -> str:
        return "Owner(%r, %d, %d)" % (self.name, self.uid, self.gid)


def lookup_owner(name: str) -> Owner:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UserError("unknown user %r" % name, EXIT_USAGE) from None
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid)


def default_owner_name(stack: str, environ: Mapping[str, str]) -> Tuple[str, str]:
    """$SUDO_USER, else the owner of the IOTstack directory."""
    sudo_user = environ.get("SUDO_USER")
    if sudo_user and sudo_user != "root":
        return sudo_user, "$SUDO_USER"
    uid = os.stat(stack).st_uid
    try:
        return pwd.getpwuid(uid).pw_name, "owner of %s" % stack
    except KeyError:
        return "root", "default"


def choose_owner(requested: Optional[str], stack: str,
                 ask: Optional[Callable[[str, str], str]] = None,
                 ) -> Tuple[Optional[Owner], str]:
    """The user the output belongs to when running as root; None otherwise.

    ask(prompt, default), when given, is called only on a terminal with no
    user given.  Returns (Owner or None, how it was chosen).
    """
    if os.geteuid() != 0:
        return None, "not root: files belong to the running user"
    if requested:
        return lookup_owner(requested), "given"
    name, source = default_owner_name(stack, os.environ)
    if ask is not None and sys.stdin is not None and sys.stdin.isatty():
        answer = ask("Owner of the backup files [%s]: " % name, name)
        if answer and answer != name:
            return lookup_owner(answer), "typed"
        return lookup_owner(name), "default (%s), confirmed" % source
    return lookup_owner(name), "default (%s), no terminal to ask" % source


@contextlib.contextmanager
def stack_lock(stack: str, owner: Optional[Owner] = None) -> Iterator[None]:
    """One backup or restore per stack.  flock dies with the process."""
    tmp = os.path.join(stack, ".tmp")
    if not os.path.isdir(tmp):
        os.makedirs(tmp, exist_ok=True)
        if owner is not None:
            os.chown(tmp, owner.uid, owner.gid)
    path = os.path.join(stack, LOCK_NAME)
    fd, writable = open_lock_file(path)
    try:
        if owner is not None:
            # Whoever runs next (root from cron, or the user) can open it.
            with contextlib.suppress(OSError):
                os.fchown(fd, owner.uid, owner.gid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise UserError("another backup or restore is running on %s%s"
                            % (stack, " (%s)" % holder if holder else ""), EXIT_BUSY) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, ("%s pid %d since %s\n" % (os.path.basename(sys.argv[0]), os.getpid(),
                                                      time.strftime("%H:%M:%S"))).encode(), 0)
        yield
    finally:
        os.close(fd)


def open_lock_file(path: str) -> Tuple[int, bool]:
    """(fd, writable): the lock file opened for writing, else, when another
    user (root, from an earlier run) owns it, for reading: flock works on
    either, so the lock holds whoever created the file."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError as e:
            error = e
    except OSError as e:
        error = e
    raise UserError("cannot open the lock file %s: %s; %s"
                    % (path, error.strerror, fix_for(os.path.dirname(path)))) from None


def run_hook(stack: str, name: str, log: RunLog) -> Optional[int]:
    """Run ./name with bash if present; its output goes to the log.

    Returns None when there is no hook, else the exit status.
    """
    path = os.path.join(stack, name)
    if not os.path.isfile(path):
        return None
    log.line("Running %s" % name)
    with subprocess.Popen(["bash", "./" + name], cwd=stack, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for raw in proc.stdout:
            log.line("  %s: %s" % (name, raw.decode("utf-8", "replace").rstrip("\n")))
    status = proc.returncode
    log.line("%s exited with status %d" % (name, status))
    return status


def write_json_atomically(path: str, data: object) -> None:
    temp = path + ".new"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)
    fsync_dir(os.path.dirname(path))


class RunLog:
    """Lines for the log file; opened in append mode, so never truncated."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self.lines: List[str] = []
        self._file: Optional[IO[str]] = None
        if path is not None:
            # 0640 like the archives: a log names files, services and hosts.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size == 0:
                    os.fchmod(fd, LOG_MODE)
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
            remember_log(path)

    def line(self, text: str) -> None:
        self.lines.append(text)
        if self._file is not None:
            try:
                self._file.write(text + "\n")
                self._file.flush()
            except OSError:
                pass  # a full disk must not hide the real error

    def field(self, name: str, value: object) -> None:
        self.line("%s: %s" % (name, value))

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def host_folder() -> str:
    """The per-host folder at a copy's destination, so Pis can share one."""
    return socket.gethostname().split(".")[0] or "localhost"


def now_local() -> datetime.datetime:
    return datetime.datetime.now()


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
