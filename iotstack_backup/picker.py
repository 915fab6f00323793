"""restore.py with no FILENAME: offer the backups, numbered, and take one.

On a terminal the backups (dated and rolling, newest first, with size and
age; with --from, those at the destination) are listed with numbers and the
user types one; the usual confirmation follows.  Without a terminal there
is nobody to choose, so the run stops (exit 2) naming the newest backups
and how to pass one.  Listing, ordering, formatting and reading the typed
choice are pure functions; pick() is the thin terminal part.
"""
from __future__ import annotations

import datetime

from . import progress, run

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Sequence, TextIO, Tuple, TypeVar, Union

    # A backup offered: (relative name, size, mtime), or with a fourth
    # element, the note shown after its age ("" for none).
    Entry = Union[Tuple[str, int, float], Tuple[str, int, float, str]]
    AnyEntry = TypeVar("AnyEntry", bound=Entry)


def newest_first(entries: Sequence[AnyEntry]) -> List[AnyEntry]:
    """(relative name, size, mtime) entries, newest first, name breaking ties."""
    return sorted(entries, key=lambda e: (-e[2], e[0]))


def age(seconds: float) -> str:
    """How long ago, in the largest whole unit: "just now", "5 min ago"..."""
    seconds = max(int(seconds), 0)
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if seconds >= size:
            n = seconds // size
            return "%d %s%s ago" % (n, unit, "s" if n > 1 and unit != "min" else "")
    return "just now"


def menu_lines(entries: Sequence[Entry], now: float) -> List[str]:
    """The numbered list: one line per backup.  An entry may carry a fourth
    element, a note ("incomplete: 10 files could not be read"), shown after
    its age."""
    width = max([len(entry[0]) for entry in entries] + [10])
    lines = []
    for n, entry in enumerate(entries, 1):
        rel, size, mtime = entry[:3]
        note = entry[3] if len(entry) > 3 and entry[3] else ""
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        lines.append("%3d) %-*s %10s  %s (%s)%s" % (n, width, rel, progress.human_size(size),
                                                   when, age(now - mtime),
                                                   "  " + note if note else ""))
    return lines


def parse_choice(text: str, count: int) -> Optional[int]:
    """The index chosen (0-based), None to give up, or ValueError saying why."""
    text = text.strip().lower()
    if text in ("", "q", "quit", "n", "no"):
        return None
    if not text.isdigit() or not 1 <= int(text) <= count:
        raise ValueError("type a number from 1 to %d, or press Enter to stop" % count)
    return int(text) - 1


def no_terminal_message(entries: Sequence[Entry], where: str, shown: int = 3) -> str:
    """The exit 2 line when no FILENAME was given and nobody can choose."""
    if not entries:
        return "no FILENAME given, and there are no backups in %s" % where
    names = ", ".join(entry[0] for entry in entries[:shown])
    return ("no FILENAME given and no terminal to choose on; the newest backups in %s: %s; "
            "pass one, e.g. restore.py %s noask" % (where, names, entries[0][0]))


def pick(entries: Sequence[Entry], where: str, now: float, ask: Callable[[str], str],
         out: TextIO) -> Optional[str]:
    """List entries and read a choice with ask(prompt); the chosen relative
    name, or None when the user gave up (nothing typed, q, end of input)."""
    if not entries:
        raise run.UserError("there are no backups in %s to restore" % where, run.EXIT_USAGE)
    out.write("Backups in %s, newest first:\n" % where)
    for line in menu_lines(entries, now):
        out.write(line + "\n")
    out.flush()
    while True:
        try:
            text = ask("Restore which backup [1-%d, Enter to stop]? " % len(entries))
        except EOFError:
            return None
        try:
            index = parse_choice(text, len(entries))
        except ValueError as e:
            out.write("%s\n" % e)
            continue
        return None if index is None else entries[index][0]
