"""Every failed backup reaches the monitor, also one that fails before its run began.

A backup from cron that ends in error must leave a trace where the user
looks (a log in backups/logs/) and send the configured "failed"
notifications, or monitoring keeps showing the last "ok".  The run itself
logs and notifies once it has opened its log; this module covers what
fails before that: bad arguments, a bad backup.ini, an unknown USER,
another run holding the lock, a pending restore.  It writes a short log of
its own and finds the notification settings with what can still be read:
the command line's --notify-url/--notify-mqtt and backup.ini's keys, each
taken only when its own value is valid, whatever else is wrong.  Where no
log can be written it says why on stderr.  Never raises: reporting a
failure must not hide it.
"""
from __future__ import annotations

import argparse
import configparser
import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from . import iotstack, run, settings

# Runs that are not a backup: their failures are not the monitor's business.
NOT_A_BACKUP = ("--dry-run", "--print-config", "--install-menu", "--uninstall-menu",
                "--install-cron", "--uninstall-cron", "-h", "--help")

NOTIFY_KEYS = (("notify-url", "notify_url", settings.notify_url),
               ("notify-mqtt", "notify_mqtt", settings.mqtt_url))


def is_backup_run(argv: Sequence[str]) -> bool:
    return not any(word == flag or word.startswith(flag + "=")
                   for word in argv for flag in NOT_A_BACKUP if flag.startswith("--")) \
        and "-h" not in argv


def option_values(argv: Sequence[str], option: str) -> List[str]:
    """The values given to --option (as "--option V" or "--option=V")."""
    values = []
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif word.startswith(option + "="):
            values.append(word[len(option) + 1:])
    return values


Value = TypeVar("Value")


def valid(parse: Callable[[str], Value], text: str) -> Optional[Value]:
    """parse(text), or None when the value is not valid."""
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return None


def ini_values(text: str) -> Dict[str, str]:
    """backup.ini's [backup] keys as text, read as leniently as configparser
    allows (a bad key or value elsewhere does not matter here)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text)
    except configparser.Error:
        return {}
    if not parser.has_section("backup"):
        return {}
    return {key: value.strip() for key, value in parser.items("backup")}


def notify_settings(argv: Sequence[str], ini_text: Optional[str]) -> argparse.Namespace:
    """The notification settings that can be read: the command line wins,
    then backup.ini; each only when its value is valid."""
    ini = ini_values(ini_text) if ini_text else {}
    found = argparse.Namespace(notify_url=None, notify_mqtt=None,
                               no_mqtt_discovery="--no-mqtt-discovery" in argv)
    for key, attr, parse in NOTIFY_KEYS:
        given = [valid(parse, text) for text in option_values(argv, "--" + key)]
        given = [value for value in given if value is not None]
        if given:
            setattr(found, attr, given[-1])
        elif key in ini:
            setattr(found, attr, valid(parse, ini[key]))
    if not found.no_mqtt_discovery and ini.get("no-mqtt-discovery"):
        found.no_mqtt_discovery = bool(valid(settings.boolean, ini["no-mqtt-discovery"]))
    return found


def masked(word: str) -> str:
    """A word of the command line for the log: URLs and rclone connection
    strings with their secrets masked (redact.py)."""
    from . import redact
    if word.startswith("rclone:"):
        return "rclone:" + redact.rclone_target(word[len("rclone:"):])
    return redact.text(word)


def already_said(error: str, stack: Optional[str]) -> bool:
    """Whether the run's own error line already says why no log can be
    written (no stack; a backups folder that is no folder or not ours):
    then a second line would only repeat it."""
    if stack is None:
        return "not an IOTstack directory" in error
    return os.path.join(stack, "backups") in error


def stack_of(argv: Sequence[str]) -> Optional[str]:
    given = option_values(argv, "--dir")
    return iotstack.find_stack_dir(given[-1] if given else None, os.environ, os.getcwd(),
                                   iotstack.INSTALL_DIR)


def read_ini(stack: Optional[str]) -> Optional[str]:
    if stack is None:
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(os.path.join(stack, settings.CONFIG_NAME), encoding="utf-8") as f:
            return f.read()
    return None


def open_log(stack: Optional[str]) -> Tuple[Optional[iotstack.RunLog], str]:
    """(a new log in backups/logs/, "") or (None, why there is none)."""
    if stack is None:
        return None, "no IOTstack directory was found"
    backups = os.path.join(stack, "backups")
    logs = os.path.join(backups, "logs")
    try:
        owner = None
        if os.geteuid() == 0:
            st = os.stat(stack)
            owner = iotstack.Owner("", st.st_uid, st.st_gid)
        iotstack.ensure_dir(backups, owner)
        iotstack.ensure_dir(logs, owner)
        now = iotstack.now_local()
        # NAME.failed.log: it never takes the name of a later run's log
        # (backup_STAMP.log, whose archive shares its stem).
        stem = iotstack.first_free_stem(
            "backup_" + iotstack.archive_stamp(now),
            lambda s: os.path.exists(iotstack.log_path(backups, s + ".failed")))
        path = iotstack.log_path(backups, stem + ".failed")
        log = iotstack.RunLog(path)
        iotstack.chown_to(path, owner)
        return log, ""
    except (OSError, run.UserError) as e:
        return None, (run.describe_os_error(e) if isinstance(e, OSError) else str(e))
