"""Nightly backups from cron: backup.py --install-cron [SCHEDULE] / --uninstall-cron.

One line in the invoking user's crontab (root's under sudo), marked with a
comment so that installing again replaces it and uninstalling removes it;
every other line of the crontab stays exactly as it was.  The line runs
backup.py with absolute paths (cron's PATH and working directory are not
the user's: IOTstackBackup #3) and, as root, names the user who owns the
IOTstack directory, so the backups belong to that user.

The crontab's new text is decided by pure functions (cron_line, with_line,
without_line) on bytes, cut at "\n" only: a byte that is not UTF-8, a \r
or a form feed in someone else's line comes back exactly as it was.
Reading and writing it is `crontab -l` and `crontab -`, then a fsync of
cron's folder, which crontab itself leaves out (see make_durable).
"""
from __future__ import annotations

import argparse
import os
import pwd
import re
import shlex
import subprocess

from . import disk_sync, run

# typing is only read by the type checker (mypy treats this name as True):
# the annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional, TextIO

MARK = "# iotstack-backup"
DEFAULT_SCHEDULE = "0 2 * * *"
_FIELD = re.compile(r"^[0-9A-Za-z*/,-]+$")
_NICKNAMES = ("@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily",
              "@midnight", "@hourly")


def parse_schedule(text: str) -> str:
    """Five cron fields ("30 3 * * *") or a nickname (@daily)."""
    fields = text.split()
    if len(fields) == 1 and fields[0] in _NICKNAMES:
        return fields[0]
    if len(fields) == 5 and all(_FIELD.match(f) for f in fields):
        return " ".join(fields)
    raise argparse.ArgumentTypeError(
        "%r is not a cron schedule: give five fields in quotes, like \"0 2 * * *\" "
        "(minute hour day month weekday), or @daily" % text)


def cron_quote(word: str) -> str:
    """Shell-quoted, with cron's % (a newline to cron) escaped."""
    return shlex.quote(word).replace("%", "\\%")


def cron_line(schedule: str, python: str, backup_py: str, stack: str,
              args: Iterable[str] = ()) -> str:
    command = "cd %s && %s %s --dir %s" % (cron_quote(stack), cron_quote(python),
                                           cron_quote(backup_py), cron_quote(stack))
    for arg in args:
        command += " " + cron_quote(arg)
    return "%s %s %s" % (schedule, command, MARK)


MARK_BYTES = MARK.encode()


def is_ours(line: bytes) -> bool:
    """Our marked line (a line commented out by the user is not ours)."""
    return line.rstrip(b" \t\r").endswith(MARK_BYTES) and not line.lstrip().startswith(b"#")


def split_lines(data: bytes) -> tuple[list[bytes], bool]:
    """(lines, ended): the crontab cut at b"\n" only -- cron's own line
    end -- so that \r, a form feed or bytes that are not UTF-8 stay inside
    their line as they were; ended: whether it ended with b"\n"."""
    if not data:
        return [], True
    ended = data.endswith(b"\n")
    lines = data.split(b"\n")
    return (lines[:-1] if ended else lines), ended


def join_lines(lines: list[bytes], ended: bool) -> bytes:
    if not lines:
        return b""
    return b"\n".join(lines) + (b"\n" if ended else b"")


def with_line(data: bytes, line: bytes) -> bytes:
    """The crontab with our line in place of the old one (or appended);
    every other byte as it was."""
    lines, ended = split_lines(data)
    out: list[bytes] = []
    placed = False
    for old in lines:
        if is_ours(old):
            if not placed:
                out.append(line)
                placed = True
            continue
        out.append(old)
    if not placed:
        out.append(line)
        ended = True  # cron needs a newline after its last line
    return join_lines(out, ended)


def without_line(data: bytes) -> bytes:
    lines, ended = split_lines(data)
    return join_lines([line for line in lines if not is_ours(line)], ended)


def line_user(stack: str, given: Optional[str]) -> Optional[str]:
    """The USER of the line when root's crontab runs it: the one given,
    else the owner of the IOTstack directory (none when that is root)."""
    if given:
        return given
    try:
        name = pwd.getpwuid(os.stat(stack).st_uid).pw_name
    except KeyError:
        return None
    return None if name == "root" else name


def _crontab(args: list[str], data: Optional[bytes] = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["crontab"] + args, input=data,
                              stdin=subprocess.DEVNULL if data is None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise run.UserError("cannot run crontab: %s (install the cron package)" % e.strerror) \
            from None


# Debian's crontab: the spool file, with the three header lines it adds.
SPOOL_DIR = "/var/spool/cron/crontabs"
HEADER_PREFIXES = (b"# DO NOT EDIT THIS FILE", b"# (")


def spool_body(spool: bytes) -> bytes:
    """The crontab in a spool file, without the header crontab added."""
    lines = spool.split(b"\n")
    skip = 0
    while skip < 3 and skip < len(lines) - 1 and lines[skip].startswith(HEADER_PREFIXES):
        skip += 1
    return b"\n".join(lines[skip:])


def exact_crontab(listed: bytes, spool: Optional[bytes]) -> bytes:
    """The crontab's true bytes.  Debian's `crontab -l` shows a carriage
    return as the two characters \\r, which a literal \\r in a command
    also is: where the listing holds one, the spool file (readable as
    root) settles it; else the crontab is left alone rather than given
    back changed."""
    if b"\\r" not in listed:
        return listed
    if spool is not None:
        body = spool_body(spool)
        if body.replace(b"\r", b"\\r") == listed:
            return body
    raise run.UserError(
        "the crontab holds \\r (a carriage return, or those two characters), which "
        "'crontab -l' cannot give back exactly; nothing was changed: run this with sudo, or "
        "edit the line with 'crontab -e'")


def read_spool(user: str) -> Optional[bytes]:
    try:
        with open(os.path.join(SPOOL_DIR, user), "rb") as f:
            return f.read()
    except OSError:
        return None


def read_crontab(user: Optional[str] = None) -> bytes:
    """The crontab's bytes, exactly as they are (see exact_crontab)."""
    result = _crontab((["-u", user] if user else []) + ["-l"])
    if result.returncode == 0:
        return exact_crontab(result.stdout, read_spool(user or whose()))
    err = result.stderr.decode("utf-8", "replace").strip()
    if "no crontab" in err:
        return b""
    raise run.UserError("crontab -l failed: %s" % (err or "status %d" % result.returncode))


def write_crontab(data: bytes, user: Optional[str] = None) -> None:
    result = _crontab((["-u", user] if user else []) + ["-"], data)
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise run.UserError("crontab - failed: %s" % (err[-1] if err else result.returncode))
    try:
        make_durable()
    except OSError as e:
        raise run.UserError("the crontab was written, but could not be made durable (a power "
                            "cut now could bring the old one back): %s" % e) from None


def make_durable() -> None:
    """Debian's crontab fsyncs its new file but renames it into place
    without fsyncing the folder: a power cut soon after may bring the old
    crontab back after we said the new one is there (found by
    test_powercut_cron).  Root fsyncs cron's folder; a user, who may not
    open it (mode 1730), flushes the file system holding it; where there is
    no such folder (another cron), the whole machine."""
    try:
        fd = os.open(SPOOL_DIR, os.O_RDONLY | os.O_DIRECTORY)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        try:
            disk_sync.sync_filesystem(os.path.dirname(SPOOL_DIR))
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            os.sync()
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def whose() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def install(stack: str, schedule: str, python: str, backup_py: str, args: Iterable[str],
            out: TextIO, user: Optional[str] = None) -> str:
    line = cron_line(schedule, python, backup_py, stack, args)
    old = read_crontab(user)
    # os.fsencode: a path that is not UTF-8 goes back as the bytes it was.
    write_crontab(with_line(old, os.fsencode(line)), user)
    verb = "Replaced" if any(is_ours(x) for x in split_lines(old)[0]) else "Added"
    shown = os.fsencode(line).decode("utf-8", "replace")
    out.write("%s the backup line in %s's crontab:\n%s\n" % (verb, user or whose(), shown))
    return line


def uninstall(out: TextIO, user: Optional[str] = None) -> bool:
    old = read_crontab(user)
    if not any(is_ours(x) for x in split_lines(old)[0]):
        out.write("%s's crontab has no backup line; nothing to remove.\n" % (user or whose()))
        return False
    write_crontab(without_line(old), user)
    out.write("Removed the backup line from %s's crontab.\n" % (user or whose()))
    return True
