"""How a run of backup.py or restore.py ends: exit codes, errors, signals.

Both commands end the same way, through run_command: a problem the user can
fix (UserError) is one line on stderr and its own exit code; SIGTERM, SIGHUP
and Ctrl-C unwind the run (every `finally` runs, so stopped services are
started again and temporary files go) and exit 128 + the signal; any other
exception, an OSError from a disk that filled or a folder we may not write
included, is one line naming what failed, with the traceback appended to the
run's log, never shown to the user as a wall of Python.  The exit codes have
one table, which --help prints.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

# What signal.signal takes and returns: a function (its value is ignored),
# SIG_DFL or SIG_IGN, or None for a handler not set from Python.
SignalHandler = Union[Callable[[int, Optional[FrameType]], object], int, signal.Handlers, None]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_WARNINGS = 3
EXIT_BUSY = 4
EXIT_SIGHUP = 128 + signal.SIGHUP
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class UserError(Exception):
    """A problem the user can fix; printed as one line, then exit `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """Raised from a signal handler so that every `finally` still runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code_help(meanings: Mapping[int, str]) -> str:
    """The "exit codes:" text of --help: meanings is {code: text}."""
    lines = ["exit codes:"]
    for code in sorted(meanings):
        text = meanings[code].split("\n")
        lines.append("  %-3d %s" % (code, text[0]))
        lines.extend("      %s" % more for more in text[1:])
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted once; later ones are ignored so
    that the clean-up they triggered (restarting services) can finish."""
    def handler(signum: int, frame: Optional[FrameType]) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP wait until the block is over, then act as
    they would have: a `docker compose stop` or `start` under way is never
    cut short, and the run still unwinds (and starts its services) after it.
    A handler only records the signal, so a thread of ours cannot take it
    and let it through early.  Outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous: Dict[int, SignalHandler] = {}
    for sig in DEFERRED_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            _act_on(caught[0], previous[caught[0]])


def _act_on(signum: int, handler: SignalHandler) -> None:
    """What handler would have done with signum."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def say_error(prog: str, message: str) -> None:
    global _last_error
    _last_error = message
    sys.stderr.write("%s: error: %s\n" % (prog, message))
    sys.stderr.flush()


# The last error line said, for the report of a run that failed before it
# had a log of its own (failure_report).
_last_error: Optional[str] = None


def last_error() -> Optional[str]:
    return _last_error


# The log file of the run under way, once one is open: where the details of
# an unexpected error go (RunLog sets it).
_log_path: Optional[str] = None


def remember_log(path: Optional[str]) -> None:
    global _log_path
    _log_path = path


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    path = error.filename
    what = error.strerror or str(error)
    where = "%s: %s" % (path, what) if path else what
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "%s: the disk is full; free some space and run again" % where
    if error.errno in (errno.EACCES, errno.EPERM) and path:
        return "%s; %s" % (where, fix_for(path))
    if error.errno == errno.EROFS:
        return "%s: the file system is read-only" % where
    return where


def foreign_owned(path: str, uid: int, owner_of: Callable[[str], Optional[int]],
                  ) -> Optional[str]:
    """The folder to give back when `path` may not be written: the highest
    of its existing ancestors (path included) in the unbroken chain owned by
    someone else, stopping below the first one that is ours (so never
    /home or /).  owner_of(path) is the uid or None when it does not exist.
    Returns None when nothing on the way belongs to anybody else."""
    path = os.path.abspath(path)
    chain: List[str] = []
    while True:
        owner = owner_of(path)
        if owner is not None:
            if owner == uid:
                break
            chain.append(path)
        elif chain:
            break
        parent = os.path.dirname(path)
        if parent == path:
            # Nothing on the way is ours: only the nearest one is worth naming.
            return chain[0] if chain else None
        path = parent
    return chain[-1] if chain else None


def _owner_of(path: str) -> Optional[int]:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def fix_for(path: str) -> str:
    """What to do when `path` may not be written or read: the chown that
    gives back a folder left to root by an earlier run, or sudo."""
    if os.geteuid() == 0:
        return "check its permissions and the disk it is on"
    folder = foreign_owned(path, os.geteuid(), _owner_of)
    if folder is None:
        return "check its permissions, or run this with sudo"
    return ("if it was left to root by an earlier run, give it back with "
            "'sudo chown -R %s: %s', or run this with sudo" % (_user_name(), folder))


def user_name() -> str:
    """The running user's name (for messages)."""
    return _user_name()


def _user_name() -> str:
    with contextlib.suppress(Exception):
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    return "$USER"


def record_details(prog: str, error: BaseException) -> Optional[str]:
    """Append the traceback to the run's log; where it went, or None."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if _log_path is not None:
        with contextlib.suppress(OSError):
            with open(_log_path, "a", encoding="utf-8", errors="replace") as f:
                f.write("Details of the error:\n" + text)
            return _log_path
    if os.environ.get("IOTSTACK_BACKUP_DEBUG"):
        sys.stderr.write(text)
    return None


def run_command(prog: str, parser: argparse.ArgumentParser,
                command: Callable[[argparse.Namespace], int],
                argv: Optional[Sequence[str]], after_interrupt: str) -> int:
    """Parse argv, run command(args), and turn however it ends into an exit
    code and at most one line on stderr.  after_interrupt says what a
    signal left behind ("no new backup was written")."""
    global _last_error
    remember_log(None)
    _last_error = None
    args = parser.parse_intermixed_args(argv)
    try:
        return command(args)
    except UserError as e:
        say_error(prog, str(e))
        return e.code
    except Interrupted as e:
        # A command may say what the signal left (e.outcome): the state on disk.
        say_error(prog, "interrupted by %s; %s" % (e, getattr(e, "outcome", after_interrupt)))
        return 128 + e.signum
    except KeyboardInterrupt as e:
        say_error(prog, "interrupted; %s" % getattr(e, "outcome", after_interrupt))
        return EXIT_SIGINT
    except BrokenPipeError:
        # `backup.py --dry-run | head`: the reader has gone; say nothing more
        # to it, and keep Python from complaining at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as e:
        where = record_details(prog, e)
        say_error(prog, describe_os_error(e) + ("" if where is None else " (details in %s)" % where))
        return EXIT_FAILED
    except Exception as e:  # a bug: still one line, the traceback in the log
        where = record_details(prog, e)
        say_error(prog, "unexpected error: %s: %s%s" % (
            type(e).__name__, e, "" if where is None
            else " (details in %s)" % where))
        return EXIT_FAILED
