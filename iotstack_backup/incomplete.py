"""What a backup could not read: the record in the archive, and how it is told.

A live tree holds files the running user may not read (a container's
private files, as `pi`), entries that vanish between listing and reading,
and files that change while they are read.  The backup goes on without
them, but the archive must not pass for a complete one: it records each
such entry in a member beside the excludes record
(.tmp/iotstack-backup-incomplete.json, which GNU tar and IOTstack's
restore.sh just put in .tmp/), and the counts in its gzip header's extra
field (a fixed-size note rewritten once the archive is written), which
restore.py --list and the picker read from the first bytes of the file.
How it keeps data safe: restore.py leaves the live copies of what the
archive lacks exactly as they are (as it does with excluded data), and a
backup that lacks something never takes the name of a complete one nor
counts as a good backup.  The decisions here are pure functions.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# The member that lists what the backup lacks or holds torn.
MEMBER = ".tmp/iotstack-backup-incomplete.json"

# Kinds of entries, in the order they are described.
UNREADABLE = "unreadable"          # a file that could not be opened
UNREADABLE_FOLDER = "folder"       # a folder that could not be listed
VANISHED = "vanished"              # gone between listing and reading
CHANGED = "changed"                # changed (or shrank) while it was read
KINDS = (UNREADABLE, UNREADABLE_FOLDER, VANISHED, CHANGED)

# Kinds whose live copy a restore keeps: the archive holds nothing for them.
LACKED = (UNREADABLE, UNREADABLE_FOLDER, VANISHED)

Counts = Dict[str, int]
Entries = List[Tuple[str, str]]


class Unread(str):
    """A warning or note (its text) that also says which entry the archive
    lacks and why: the walk reports these in its usual lists, so a part of
    the archive that is cut back and read again forgets them with the rest."""

    rel: str
    kind: str

    def __new__(cls, text: str, rel: str, kind: str) -> "Unread":
        self = super().__new__(cls, text)
        self.rel, self.kind = rel, kind
        return self


def entries_of(messages: Iterable[str]) -> Entries:
    """[(rel, kind)] of the Unread messages, each entry once, in order."""
    seen, found = set(), []
    for message in messages:
        if isinstance(message, Unread) and message.rel not in seen:
            seen.add(message.rel)
            found.append((message.rel, message.kind))
    return found


def counts_of(entries: Sequence[Tuple[str, str]]) -> Counts:
    counts = {kind: 0 for kind in KINDS}
    for _rel, kind in entries:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def total(counts: Optional[Counts]) -> int:
    return sum(counts.values()) if counts else 0


def _plural(n: int, word: str) -> str:
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def describe(counts: Optional[Counts]) -> str:
    """"incomplete: 10 files could not be read", or "" for a complete one."""
    if counts is None or not total(counts):
        return ""
    unread = [_plural(counts[kind], word) for kind, word in
              ((UNREADABLE, "file"), (UNREADABLE_FOLDER, "folder")) if counts.get(kind)]
    parts = [" and ".join(unread) + " could not be read"] if unread else []
    if counts.get(VANISHED):
        parts.append("%s vanished while read" % _plural(counts[VANISHED], "file"))
    if counts.get(CHANGED):
        parts.append("%s changed while read" % _plural(counts[CHANGED], "file"))
    return "incomplete: " + ", ".join(parts)


def record(entries: Entries) -> bytes:
    """The member's content."""
    return (json.dumps({"version": 1, "counts": counts_of(entries),
                        "entries": [{"path": rel, "kind": kind} for rel, kind in entries]},
                       indent=1) + "\n").encode()


def parse_record(data: bytes) -> Entries:
    """[(rel, kind)] of a record; an unreadable record lacks at least
    something unknown, so it is one entry of kind unreadable at ""."""
    try:
        raw = json.loads(data.decode("utf-8")).get("entries", [])
        found = [(e["path"], e["kind"]) for e in raw
                 if isinstance(e.get("path"), str) and e.get("kind") in KINDS]
    except (ValueError, AttributeError, UnicodeDecodeError, KeyError, TypeError):
        return [("", UNREADABLE)]
    return found


# The note in the gzip header: one subfield of the extra field, fixed size,
# written as "unknown" when the archive is begun and rewritten with the
# counts before the archive is fsynced and named.
NOTE_ID = b"IB"
NOTE_SIZE = 64
NOTE_MAGIC = b"iotstack-backup 1"
NOTE_OFFSET = 10 + 2 + 4  # the gzip header, XLEN, the subfield's id and length


def header_extra(counts: Optional[Counts] = None) -> bytes:
    """The extra field's bytes: the note, its counts or "unknown"."""
    return NOTE_ID + struct.pack("<H", NOTE_SIZE) + note(counts)


def note(counts: Optional[Counts]) -> bytes:
    if counts is None:
        text = NOTE_MAGIC + b" unknown"
    else:
        text = NOTE_MAGIC + b" " + b" ".join(b"%d" % counts.get(kind, 0) for kind in KINDS)
    return text.ljust(NOTE_SIZE)[:NOTE_SIZE]


def parse_note(head: bytes) -> Optional[Counts]:
    """The counts in the first bytes of an archive; None when it has no
    note (an older backup, GNU tar's) or its counts were never written."""
    if len(head) < NOTE_OFFSET + NOTE_SIZE or head[:2] != b"\x1f\x8b" or not head[3] & 4:
        return None
    if head[12:14] != NOTE_ID or struct.unpack("<H", head[14:16])[0] != NOTE_SIZE:
        return None
    words = head[NOTE_OFFSET:NOTE_OFFSET + NOTE_SIZE].split()
    if b" ".join(words[:2]) != NOTE_MAGIC or len(words) != 2 + len(KINDS):
        return None
    try:
        return {kind: int(word) for kind, word in zip(KINDS, words[2:])}
    except ValueError:
        return None


def read_note(path: str) -> Optional[Counts]:
    """parse_note of a file; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return parse_note(f.read(NOTE_OFFSET + NOTE_SIZE))
    except OSError:
        return None


def write_note(fd: int, counts: Counts) -> None:
    """Rewrite the note of the archive open on fd (before its fsync)."""
    os.pwrite(fd, note(counts), NOTE_OFFSET)


def lacked_here(stack: str, units: Sequence[str], entries: Entries,
                exists: Callable[[str], bool] = os.path.lexists,
                ) -> Tuple[List[str], List[str]]:
    """(kept, missing): the entries the archive lacks that lie in the
    units being replaced, split by whether a live copy exists (a restore
    keeps it as it is) or not (the restore says the archive lacks it)."""
    kept: List[str] = []
    missing: List[str] = []
    for rel, kind in entries:
        if kind not in LACKED or not rel:
            continue
        if not any(rel == unit or rel.startswith(unit + "/") for unit in units):
            continue
        (kept if exists(os.path.join(stack, rel)) else missing).append(rel)
    return sorted(kept), sorted(missing)
