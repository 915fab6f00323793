"""The record of good backups: what the size guard compares with, and what
lets retention remove anything.

A disk that is not mounted makes a small backup; two nights of it, and a
guard that compared with the newest archive would let the second one pass
and `--keep` prune every good backup, here and off-site.  So each run
appends one entry to `backups/good-backups.json` (written atomically,
0640, owned like the archives; the last HISTORY entries are kept): the
names it got, its size, which of `services/` and `volumes/` it held (present
and not empty), whether it was verified and complete, and what the guard
said.  A backup is *good* when it is complete (issue 21: an archive that
could not read some files marks `complete` false) and passed the guard, or
the user accepted it (`--accept-smaller`).  The guard compares a new backup
with the last good one (never with the newest file): less than half its
size, or a `services/`/`volumes/` it held now missing, empty or a dangling
symlink, trips it, for as many nights as that lasts.  Retention runs only
after a good, verified backup, which is then newer than everything it
prunes; a backup that is not good never takes the name of an existing
rolling archive.

With no record yet (the first run of this version) the newest archive
present is adopted as the last good backup, as the guard did before, and
written into the record with the first entry, so that a second small night
still compares with it.  A record that cannot be read is set aside the same
way (the log says so); one that cannot be written is a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Optional

RECORD_NAME = "good-backups.json"
RECORD_MODE = 0o640
HISTORY = 60

# What the guard said of a backup.
PASSED = "passed"        # checked, and not much smaller than the last good one
ACCEPTED = "accepted"    # smaller, but --accept-smaller: the new reference
ADOPTED = "adopted"      # an archive from before the record: taken as good
TRIPPED = "tripped"      # smaller, or missing what the last good one held
FIRST = "first"          # nothing to compare with

# The items whose loss a backup must notice, and the states of one live.
WATCHED_ITEMS = ("services", "volumes")
PRESENT, MISSING, EMPTY, DANGLING, NOT_A_FOLDER = (
    "present", "missing", "empty", "dangling", "not a folder")


@dataclasses.dataclass(frozen=True)
class BackupRecord:
    """One backup as the record keeps it.  names are relative to backups/
    ("backup/backup_2026-11-26_0200.tar.gz", "rolling/backup_4.tar.gz");
    held: the watched items it held, None when not known (adopted)."""

    names: tuple[str, ...]
    size: int
    finished: str
    held: Optional[tuple[str, ...]] = None
    verified: bool = True
    complete: bool = True
    guard: str = PASSED

    @property
    def good(self) -> bool:
        return self.complete and self.guard != TRIPPED

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["names"] = list(self.names)
        data["held"] = None if self.held is None else list(self.held)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupRecord:
        held = data.get("held")
        return cls(names=tuple(str(n) for n in data["names"]), size=int(data["size"]),
                   finished=str(data.get("finished", "")),
                   held=None if held is None else tuple(str(h) for h in held),
                   verified=bool(data.get("verified", True)),
                   complete=bool(data.get("complete", True)),
                   guard=str(data.get("guard", PASSED)))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The guard's answer for a new backup: its guard state, the warning
    lines (one per thing gone), and whether retention may run after it."""

    guard: str
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.guard != TRIPPED


def record_path(backups: str) -> str:
    return os.path.join(backups, RECORD_NAME)


def is_temporary_name(name: str) -> bool:
    """The record's temporary name while it is written (record_good_backup)."""
    return name.startswith(RECORD_NAME + ".") and name.endswith(".new")


def parse_record(text: str) -> list[BackupRecord]:
    """The entries of the record's text, oldest first; ValueError when it
    is not a record."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("backups"), list):
        raise ValueError("not a record of backups")
    try:
        return [BackupRecord.from_json(entry) for entry in data["backups"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError("a bad entry: %s" % e) from None


def load_record(backups: str) -> tuple[list[BackupRecord], str | None]:
    """(entries oldest first, None) or ([], why the record was set aside)."""
    try:
        with open(record_path(backups), encoding="utf-8") as f:
            return parse_record(f.read()), None
    except FileNotFoundError:
        return [], None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return [], "%s could not be read (%s); it is started again" % (RECORD_NAME, e)


def last_good_backup(entries: list[BackupRecord]) -> Optional[BackupRecord]:
    """The newest good backup of the record, or None."""
    for entry in reversed(entries):
        if entry.good:
            return entry
    return None


def with_entry(entries: list[BackupRecord], entry: BackupRecord,
               limit: int = HISTORY) -> list[BackupRecord]:
    """The record's entries with entry appended, the oldest dropped beyond
    limit, but never the last good backup (the guard's reference)."""
    entries = list(entries) + [entry]
    while len(entries) > limit:
        reference = last_good_backup(entries)
        drop = 0 if entries[0] is not reference else 1
        del entries[drop]
    return entries


def record_good_backup(backups: str, entries: list[BackupRecord], entry: BackupRecord,
                       owner: Any = None) -> list[BackupRecord]:
    """Append entry (good or not: `good` is computed from it) to the record
    and write it atomically; returns the entries written.  OSError when it
    cannot be written."""
    entries = with_entry(entries, entry)
    path = record_path(backups)
    temp = "%s.%d.new" % (path, os.getpid())
    data = json.dumps({"version": 1, "backups": [e.to_json() for e in entries]}, indent=1)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, RECORD_MODE)
    try:
        # fdopen owns fd from here: closing f closes it, on any error too.
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data + "\n")
            f.flush()
            os.fchmod(f.fileno(), RECORD_MODE)
            if owner is not None:
                os.fchown(f.fileno(), owner.uid, owner.gid)
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(backups, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return entries


def adopted(newest: "tuple[str, int] | None", finished: str) -> Optional[BackupRecord]:
    """The archive from before the record (newest_archive's answer) taken
    as the last good backup; what it held is not known."""
    if newest is None:
        return None
    name, size = newest
    return BackupRecord(names=(name,), size=size, finished=finished, held=None,
                        guard=ADOPTED)


def item_state(path: str) -> "tuple[str, str | None]":
    """(state, symlink target) of a watched item of the live stack."""
    target = os.readlink(path) if os.path.islink(path) else None
    if not os.path.lexists(path):
        return MISSING, None
    if not os.path.exists(path):
        return DANGLING, target
    if not os.path.isdir(path):
        return NOT_A_FOLDER, target
    try:
        with os.scandir(path) as it:
            empty = next(it, None) is None
    except OSError:
        return PRESENT, target  # unreadable: the walk warns about it
    return (EMPTY if empty else PRESENT), target


def item_states(stack: str) -> dict[str, tuple[str, str | None]]:
    """{item: (state, symlink target)} of services/ and volumes/."""
    return {item: item_state(os.path.join(stack, item)) for item in WATCHED_ITEMS}


def held_items(states: dict[str, tuple[str, str | None]]) -> tuple[str, ...]:
    return tuple(item for item in WATCHED_ITEMS if states[item][0] == PRESENT)


def gone_line(item: str, state: str, target: "str | None", reference: BackupRecord) -> str:
    """One line: what is gone, and the likeliest cause."""
    held = "the last good backup (%s) held it" % reference.names[0]
    if state == DANGLING:
        return ("%s/ is a symlink to %s, which does not exist, though %s: is the disk that "
                "holds it not mounted?" % (item, target, held))
    what = {MISSING: "is missing", EMPTY: "is empty",
            NOT_A_FOLDER: "is not a folder"}.get(state, "is gone")
    return ("%s/ %s, though %s: is the disk that holds it not mounted (or was it deleted)?"
            % (item, what, held))


def size_line(size: int, reference: BackupRecord) -> str:
    return ("this backup (%d bytes) is less than half the size of the last good backup, %s "
            "(%d bytes, %s): is a disk not mounted, or a volume gone?"
            % (size, reference.names[0], reference.size, reference.finished or "adopted"))


ADVICE = ("The backup is kept; no old backup is removed, here or at the copies, until a "
          "backup passes this check. If the data shrank on purpose, run backup.py "
          "--accept-smaller once.")


def judge_items(states: dict[str, tuple[str, str | None]],
                reference: Optional[BackupRecord]) -> tuple[list[str], list[str]]:
    """(warnings, notes) about services/ and volumes/.  A dangling symlink
    is always a warning; missing or empty is a warning when the last good
    backup held the item, else a note as before."""
    warnings, notes = [], []
    for item in WATCHED_ITEMS:
        state, target = states[item]
        if state == PRESENT:
            continue
        if reference is not None and reference.held is not None and item in reference.held:
            warnings.append(gone_line(item, state, target, reference))
        elif state == DANGLING:
            warnings.append("%s/ is a symlink to %s, which does not exist: is the disk that "
                            "holds it not mounted? Only the link is saved" % (item, target))
        else:
            notes.append("./%s/ is %s; backing up the rest" % (item, state))
    return warnings, notes


def judge(size: int, states: dict[str, tuple[str, str | None]],
          reference: Optional[BackupRecord],
          accept_smaller: bool = False) -> Verdict:
    """The guard: compare a new backup of `size` bytes and live items
    `states` with the last good backup (reference)."""
    warnings, notes = judge_items(states, reference)
    if reference is not None and size * 2 < reference.size:
        warnings.insert(0, size_line(size, reference))
    if not warnings:
        return Verdict(FIRST if reference is None else PASSED, tuple(warnings), tuple(notes))
    if accept_smaller:
        return Verdict(ACCEPTED, (), tuple(notes) + tuple(
            "Accepted (--accept-smaller): %s" % w for w in warnings))
    return Verdict(TRIPPED, tuple(warnings[:-1]) + (warnings[-1] + " " + ADVICE,), tuple(notes))


def withhold_rolling(verdict: Verdict, complete: bool, rolling_exists: bool) -> bool:
    """A backup that is not good never takes the name of an existing
    rolling archive (the one it would replace may be the good one)."""
    return rolling_exists and (not verdict.passed or not complete)


def retention_allowed(verdict: Verdict, verified: bool, complete: bool) -> "str | None":
    """None when retention may run after this backup, else why not (a line
    for the log)."""
    if not verdict.passed:
        return "the size guard is tripped"
    if not complete:
        return "this backup is incomplete"
    if not verified:
        return "this backup was not verified (--no-verify)"
    return None

