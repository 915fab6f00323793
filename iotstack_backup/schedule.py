"""Nightly backups from cron: backup.py --install-cron [SCHEDULE] / --uninstall-cron.

One line in the invoking user's crontab (root's under sudo), marked with a
comment so that installing again replaces it and uninstalling removes it;
every other line of the crontab stays exactly as it was.  The line runs
backup.py with absolute paths (cron's PATH and working directory are not
the user's: IOTstackBackup #3) and, as root, names the user who owns the
IOTstack directory, so the backups belong to that user.

The crontab's new text is decided by pure functions (cron_line, with_line,
without_line); reading and writing it is `crontab -l` and `crontab -`.
"""
import argparse
import os
import pwd
import re
import shlex
import subprocess

from . import run

MARK = "# iotstack-backup"
DEFAULT_SCHEDULE = "0 2 * * *"
_FIELD = re.compile(r"^[0-9A-Za-z*/,-]+$")
_NICKNAMES = ("@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily",
              "@midnight", "@hourly")


def parse_schedule(text):
    """Five cron fields ("30 3 * * *") or a nickname (@daily)."""
    fields = text.split()
    if len(fields) == 1 and fields[0] in _NICKNAMES:
        return fields[0]
    if len(fields) == 5 and all(_FIELD.match(f) for f in fields):
        return " ".join(fields)
    raise argparse.ArgumentTypeError(
        "%r is not a cron schedule: give five fields in quotes, like \"0 2 * * *\" "
        "(minute hour day month weekday), or @daily" % text)


def cron_quote(word):
    """Shell-quoted, with cron's % (a newline to cron) escaped."""
    return shlex.quote(word).replace("%", "\\%")


def cron_line(schedule, python, backup_py, stack, args=()):
    command = "cd %s && %s %s --dir %s" % (cron_quote(stack), cron_quote(python),
                                           cron_quote(backup_py), cron_quote(stack))
    for arg in args:
        command += " " + cron_quote(arg)
    return "%s %s %s" % (schedule, command, MARK)


def is_ours(line):
    return line.rstrip().endswith(MARK) and not line.lstrip().startswith("#")


def with_line(text, line):
    """The crontab with our line in place of the old one (or appended)."""
    lines = text.splitlines()
    out, placed = [], False
    for old in lines:
        if is_ours(old):
            if not placed:
                out.append(line)
                placed = True
            continue
        out.append(old)
    if not placed:
        out.append(line)
    return "\n".join(out) + "\n"


def without_line(text):
    lines = [line for line in text.splitlines() if not is_ours(line)]
    return "\n".join(lines) + "\n" if lines else ""


def line_user(stack, given):
    """The USER of the line when root's crontab runs it: the one given,
    else the owner of the IOTstack directory (none when that is root)."""
    if given:
        return given
    try:
        name = pwd.getpwuid(os.stat(stack).st_uid).pw_name
    except KeyError:
        return None
    return None if name == "root" else name


def _crontab(args, text=None):
    try:
        return subprocess.run(["crontab"] + args, input=None if text is None else text.encode(),
                              stdin=subprocess.DEVNULL if text is None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise run.UserError("cannot run crontab: %s (install the cron package)" % e.strerror) \
            from None


def read_crontab(user=None):
    result = _crontab((["-u", user] if user else []) + ["-l"])
    if result.returncode == 0:
        return result.stdout.decode("utf-8", "replace")
    err = result.stderr.decode("utf-8", "replace").strip()
    if "no crontab" in err:
        return ""
    raise run.UserError("crontab -l failed: %s" % (err or "status %d" % result.returncode))


def write_crontab(text, user=None):
    result = _crontab((["-u", user] if user else []) + ["-"], text)
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise run.UserError("crontab - failed: %s" % (err[-1] if err else result.returncode))


def whose():
    return pwd.getpwuid(os.geteuid()).pw_name


def install(stack, schedule, python, backup_py, args, out, user=None):
    line = cron_line(schedule, python, backup_py, stack, args)
    old = read_crontab(user)
    write_crontab(with_line(old, line), user)
    verb = "Replaced" if any(is_ours(x) for x in old.splitlines()) else "Added"
    out.write("%s the backup line in %s's crontab:\n%s\n" % (verb, user or whose(), line))
    return line


def uninstall(out, user=None):
    old = read_crontab(user)
    if not any(is_ours(x) for x in old.splitlines()):
        out.write("%s's crontab has no backup line; nothing to remove.\n" % (user or whose()))
        return False
    write_crontab(without_line(old), user)
    out.write("Removed the backup line from %s's crontab.\n" % (user or whose()))
    return True
