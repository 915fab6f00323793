"""The restore journal: swapping staged items in, rolling back, recovering.

After restore has unpacked and checked a whole archive in a staging folder,
swap_in renames each item being replaced aside and its staged copy into its
place.  How it keeps data safe: a journal in .tmp/, fsynced before the first
rename and after the last, says what is under way; roll_back undoes a swap
from any point (a unit whose staged copy is gone was swapped in, so it goes
back); recover, which every run does first, completes a committed swap or
rolls back an interrupted one, so a crash at any step leaves either the old
tree or the new one, never a mix.  Old items are deleted only after commit,
and not while the services are down: at commit the folders holding them
(in .tmp/ and on each other disk: the same file system as the items, so
the swap is renames only) are listed in a trash record, and empty_trash
deletes them once the services run again; a run cut before that leaves
the record, and the next run's recovery empties it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import TYPE_CHECKING, cast

from . import iotstack
from .progress import human_size
from .run import EXIT_BUSY, UserError, describe_os_error
from .unpack import live_points, staging_ancestors

if TYPE_CHECKING:
    from typing import (Callable, Collection, Dict, Iterable, List, Optional, Sequence, Set,
                        TextIO, Tuple, TypedDict)

    from .unpack import Stager

    # What swap_in renames: (live, staged, aside, old, new), the paths
    # absolute, old and new whether that side exists.
    Entry = Tuple[str, str, str, bool, bool]
    # (live folder, staging folder, aside folder) of a point on another disk.
    Place = Tuple[str, str, str]
    # {folder: [atime_ns, mtime_ns]}, as the journal's JSON keeps them.
    Times = Dict[str, List[int]]

    class JournalEntry(TypedDict):
        rel: str
        live: str
        staged: str
        aside: str
        old: bool
        new: bool

    class Foreign(TypedDict):
        staging: List[str]
        aside: List[str]

    class ForeignRecord(Foreign):
        times: Times

    class Journal(TypedDict, total=False):
        """The journal in .tmp/; a version 1 journal (one staging and one
        aside folder) has no entries, foreign or parent_times."""
        version: int
        state: str
        archive: str
        staging: str
        aside: str
        units: List[str]
        entries: List[JournalEntry]
        foreign: Foreign
        created_parents: List[str]
        keep_old: bool
        parent_times: Times

    class StagerOptions(TypedDict):
        """The keyword arguments of unpack.Stager for the points."""
        redirect: Dict[str, str]
        link_points: List[str]
        on_new_point: Callable[[str], None]

STAGING_PREFIX = "restore-staging."


ASIDE_PREFIX = "restore-old."

# A journal's states: "swapping", then "committed" or, once a roll back is
# done and durable, this.
ROLLED_BACK = "rolled back"


def journal_path(stack: str) -> str:
    return os.path.join(stack, iotstack.JOURNAL_NAME)


def write_journal(stack: str, journal: Journal) -> None:
    iotstack.write_json_atomically(journal_path(stack), journal)


def read_journal(stack: str) -> Optional[Journal]:
    try:
        with open(journal_path(stack), encoding="utf-8") as f:
            journal: Journal = json.load(f)
            return journal
    except FileNotFoundError:
        return None


# Inside a folder on another disk (a mount point, or a symlink out of the
# stack), the staged copies and the replaced entries wait in these folders,
# on that disk: a rename never crosses disks, and nothing is written under
# a mount point onto the disk below it.
FOREIGN_STAGING = ".iotstack-restore-staging."
FOREIGN_ASIDE = ".iotstack-restore-old."

# .tmp/restore-foreign.TOKEN.json lists those folders from before the
# journal exists, so that recovery finds them after a crash.
FOREIGN_RECORD = "restore-foreign."

# .tmp/restore-trash.TOKEN.json lists the folders holding the items a
# committed restore replaced: deleted after the services start again, or by
# the next run's recovery.
TRASH_RECORD = "restore-trash."


def split_units(units: Iterable[str], points: Collection[str], keep: Collection[str],
                children: Callable[[str], Iterable[str]]) -> List[Tuple[str, str]]:
    """The swaps that restore `units` and leave in place what must stay:
    the points (mount points and symlinks to other disks: the folder stays,
    its contents are swapped on that disk) and `keep` (live entries the
    backup excluded: left exactly as they are).  A unit holding neither is
    one swap, as always; one holding some is opened, its entries swapped
    one by one.  children(rel) lists the names below rel, live and staged.
    Returns [(rel, domain)], domain the innermost point holding rel ("" for
    the stack itself)."""
    inner = set(points) | set(keep)
    swaps: List[Tuple[str, str]] = []

    def visit(rel: str, domain: str) -> None:
        if rel in keep:
            return
        if rel in points:
            for name in children(rel):
                visit(rel + "/" + name, rel)
        elif any(other.startswith(rel + "/") for other in inner):
            for name in children(rel):
                visit(rel + "/" + name, domain)
        else:
            swaps.append((rel, domain))

    for unit in units:
        above = [point for point in points if unit.startswith(point + "/")]
        visit(unit, max(above, key=len) if above else "")
    return swaps


def journal_entries(stack: str, journal: Journal) -> List[Entry]:
    """[(live, staged, aside, old, new)] absolute paths: what swap_in renames.
    A version 1 journal (one staging and aside folder) says it per unit."""
    if "entries" in journal:
        return [(e["live"], e["staged"], e["aside"], e["old"], e["new"])
                for e in journal["entries"]]
    staging = os.path.join(stack, journal["staging"])
    aside = os.path.join(stack, journal["aside"])
    return [(os.path.join(stack, unit), os.path.join(staging, unit), os.path.join(aside, unit),
             True, True) for unit in journal["units"]]


def swap_in(stack: str, journal: Journal,
            on_entry: Optional[Callable[[str], object]] = None) -> None:
    """Rename each entry aside, then each staged copy in; the journal says
    how far.  All the old entries go aside, durably, before any new one
    takes a name: a rename into place must never survive a power cut that
    the rename freeing its name did not (the old entry would be lost), and
    the journal says committed only once every rename is durable.
    on_entry(live path), when given, hears each entry once its new copy is
    in place (the restore log records them)."""
    write_journal(stack, journal)
    for parent in journal["created_parents"]:
        os.mkdir(os.path.join(stack, parent))
    entries = journal_entries(stack, journal)
    # The aside folders prepare_journal made hold the old entries: their
    # names durable first, or a cut could keep a rename into an orphan.
    fsync_folders(aside_folders(entries))
    for live, _staged, aside, old, _new in entries:
        if old and os.path.lexists(live):
            os.rename(live, aside)
    fsync_folders(swap_folders(stack, entries))
    for live, staged, _aside, _old, new in entries:
        if new:
            os.rename(staged, live)
        if on_entry is not None:
            on_entry(live)
    keep_parent_times(stack, journal)
    fsync_folders(swap_folders(stack, entries))
    journal["state"] = "committed"
    write_journal(stack, journal)


def aside_folders(entries: Iterable[Entry]) -> List[str]:
    """The folders the old entries are renamed into, and those above them
    up to the one in .tmp/ (or on the other disk) and the folder holding
    it: fsynced, their names are durable."""
    folders: Set[str] = set()
    for _live, _staged, aside, _old, _new in entries:
        folder = os.path.dirname(aside)
        while folder != os.path.dirname(folder):
            folders.add(folder)
            name = os.path.basename(folder)
            if name.startswith(ASIDE_PREFIX) or name.startswith(FOREIGN_ASIDE):
                folders.add(os.path.dirname(folder))
                break
            folder = os.path.dirname(folder)
    return sorted(folders)


def swap_folders(stack: str, entries: Sequence[Entry]) -> List[str]:
    """The folders whose fsync makes a swap's renames durable: both sides
    of each rename, with the aside folders."""
    folders = {stack}.union(aside_folders(entries))
    for live, staged, _aside, _old, _new in entries:
        folders.update((os.path.dirname(live), os.path.dirname(staged)))
    return sorted(folders)


def fsync_folders(folders: Iterable[str]) -> None:
    for folder in folders:
        if os.path.isdir(folder):
            iotstack.fsync_dir(folder)


def roll_back(stack: str, journal: Journal) -> None:
    """Undo swap_in from any point: an entry whose staged copy is gone was
    swapped in, so it goes back to staging; once all of those are back,
    durably, the old ones return.  (In one pass, a power cut could keep an
    old entry's return over its live name but lose the new one's way back
    to staging: the next roll back would then take the old entry for the
    new one and send it to staging, to be deleted.)"""
    entries = list(reversed(journal_entries(stack, journal)))
    for live, staged, _aside, _old, new in entries:
        if new and not os.path.lexists(staged) and os.path.lexists(live):
            os.makedirs(os.path.dirname(staged), exist_ok=True)
            os.rename(live, staged)
    fsync_folders(swap_folders(stack, entries))
    for live, _staged, aside, old, _new in entries:
        if old and os.path.lexists(aside):
            os.rename(aside, live)
    for parent in reversed(journal["created_parents"]):
        try:
            os.rmdir(os.path.join(stack, parent))
        except OSError:
            pass
    keep_parent_times(stack, journal)
    # Durable before clean_up deletes the aside folders: the old entries'
    # way back must not be lost while their folders' removal is not.
    fsync_folders(swap_folders(stack, journal_entries(stack, journal)))
    # Then said, before clean_up deletes staged copies: a run cut while it
    # does must not roll back again, or it would take each old entry whose
    # staged copy is already deleted for a new one and send it to staging.
    journal["state"] = ROLLED_BACK
    write_journal(stack, journal)


def parent_times(stack: str, units: Iterable[str]) -> Times:
    """Times of the folders above --only units (volumes/ for volumes/nodered):
    the renames and mkdirs of a swap must not change their mtime."""
    times: Times = {}
    for unit in units:
        for parent in staging_ancestors(unit):
            path = os.path.join(stack, parent)
            if parent != ".tmp" and os.path.isdir(path) and not os.path.islink(path):
                st = os.stat(path)
                times[parent] = [st.st_atime_ns, st.st_mtime_ns]
    return times


def keep_parent_times(stack: str, journal: Journal) -> None:
    for parent, times in journal.get("parent_times", {}).items():
        with contextlib.suppress(OSError):
            # Two numbers, as parent_times wrote them.
            os.utime(os.path.join(stack, parent), ns=cast("Tuple[int, int]", tuple(times)),
                     follow_symlinks=False)


def clean_up(stack: str, journal: Journal) -> Optional[str]:
    """After commit or roll back: drop staging on every disk; after a roll
    back the aside folders too (empty by then).  After commit, unless kept,
    the aside folders go into a trash record (see empty_trash) instead of
    being deleted now.  Returns the trash record's path, or None."""
    committed = journal["state"] == "committed"
    keep = journal.get("keep_old") and committed
    none_foreign: Foreign = {"staging": [], "aside": []}
    foreign = journal.get("foreign", none_foreign)
    asides = [os.path.join(stack, journal["aside"])] + foreign["aside"]
    trash = None
    if committed and not keep:
        trash = trash_record_path(stack, journal["staging"])
        iotstack.write_json_atomically(trash, {"archive": journal["archive"], "folders": asides,
                                               "times": foreign_times(journal)})
    for path in [os.path.join(stack, journal["staging"])] + foreign["staging"]:
        shutil.rmtree(path, ignore_errors=True)
    if not committed:
        for path in asides:
            shutil.rmtree(path, ignore_errors=True)
    if foreign["staging"]:
        keep_parent_times(stack, journal)  # our folders in them are gone
        # Their removal durable before the journal's: only the journal (and
        # the foreign record) names a folder of ours on another disk, and a
        # cut must not keep one that nothing names (found by
        # test_powercut_mount).
        fsync_folders(parents(foreign["staging"] + ([] if committed else foreign["aside"])))
    os.unlink(journal_path(stack))
    iotstack.fsync_dir(os.path.dirname(journal_path(stack)))
    remove_foreign_record(stack, journal)
    return trash


def trash_record_path(stack: str, staging_rel: str) -> str:
    token = os.path.basename(staging_rel)[len(STAGING_PREFIX):]
    return os.path.join(stack, ".tmp", TRASH_RECORD + token + ".json")


def trash_records(stack: str) -> List[str]:
    """The trash records in .tmp/, oldest name first."""
    tmp = os.path.join(stack, ".tmp")
    try:
        names = os.listdir(tmp)
    except OSError:
        return []
    return [os.path.join(tmp, name) for name in sorted(names)
            if name.startswith(TRASH_RECORD) and name.endswith(".json")]


def trash_folders(record: str) -> List[str]:
    """The folders a trash record lists that are ours to delete (by name:
    a damaged record never makes us delete anything else)."""
    try:
        with open(record, encoding="utf-8") as f:
            folders = json.load(f).get("folders", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [path for path in folders if isinstance(path, str) and os.path.isabs(path)
            and os.path.basename(path).startswith((ASIDE_PREFIX, FOREIGN_ASIDE))]


def foreign_times(journal: Journal) -> Times:
    """The times, from before the restore, of the folders (mount points)
    that hold its aside folders on other disks."""
    kept = journal.get("parent_times", {})
    folders = {os.path.dirname(path) for path in journal.get("foreign", {"aside": []})["aside"]}
    return {folder: kept[folder] for folder in sorted(folders) if folder in kept}


def trash_times(record: str) -> Dict[str, Tuple[int, int]]:
    """A trash record's times of the folders holding its folders on other
    disks, put back after each deletion: a recovery of a deletion cut after
    its rmdir, before its utime, must not keep the rmdir's mtime (found by
    test_powercut_mount)."""
    try:
        with open(record, encoding="utf-8") as f:
            times = json.load(f).get("times", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(times, dict):
        return {}
    return {path: (pair[0], pair[1]) for path, pair in times.items()
            if isinstance(pair, list) and len(pair) == 2
            and all(isinstance(n, int) for n in pair)}


def delete_tree(path: str) -> Tuple[int, int, int]:
    """Delete path, never following a link.  Returns (entries deleted,
    bytes freed, entries left): what could not be deleted stays, and the
    caller keeps its record so that the next run tries again.  A loop, not
    recursion: an archive may hold folders thousands deep."""
    counts = [0, 0, 0]  # deleted, freed, left
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            _unlink_counted(path, os.lstat(path), counts)
            return cast("Tuple[int, int, int]", tuple(counts))
    except FileNotFoundError:
        return 0, 0, 0
    pending = [(path, False)]
    while pending:
        folder, emptied = pending.pop()
        if emptied:
            _rmdir_counted(folder, counts)
            continue
        pending.append((folder, True))
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue  # its rmdir fails and counts it as left
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, False))
            else:
                with contextlib.suppress(FileNotFoundError):
                    _unlink_counted(entry.path, entry.stat(follow_symlinks=False), counts)
    return cast("Tuple[int, int, int]", tuple(counts))  # three counts


def _unlink_counted(path: str, st: os.stat_result, counts: List[int]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError:
        counts[2] += 1
        return
    counts[0] += 1
    if st.st_nlink <= 1:  # a hard link's blocks go with its last name
        counts[1] += st.st_blocks * 512


def _rmdir_counted(folder: str, counts: List[int]) -> None:
    try:
        os.rmdir(folder)
        counts[0] += 1
    except FileNotFoundError:
        pass
    except OSError:
        counts[2] += 1


def delete_in_place(folder: str, kept: Optional[Tuple[int, int]] = None) -> Tuple[int, int, int]:
    """delete_tree(folder); a folder of ours inside a mount point or a
    linked folder on another disk leaves that folder's times as they were
    (`kept`, from before the restore, when the trash record has them)."""
    parent = os.path.dirname(folder)
    times: Optional[Tuple[int, int]] = None
    if os.path.basename(folder).startswith(FOREIGN_ASIDE):
        times = kept
    if times is None and os.path.basename(folder).startswith(FOREIGN_ASIDE):
        with contextlib.suppress(OSError):
            st = os.stat(parent)
            times = (st.st_atime_ns, st.st_mtime_ns)
    counts = delete_tree(folder)
    if times is not None:
        with contextlib.suppress(OSError):
            os.utime(parent, ns=times)
    return counts


def empty_trash(stack: str, log: iotstack.RunLog, out: Optional[TextIO] = None) -> None:
    """Delete the replaced items every trash record lists, saying in the log
    where the space went; a record goes only once its folders are gone."""
    for record in trash_records(stack):
        folders = trash_folders(record)
        times = trash_times(record)
        deleted = freed = left = 0
        started = time.monotonic()
        for folder in folders:
            log.line("Deleting the replaced items in %s" % folder)
            counts = delete_in_place(folder, times.get(os.path.dirname(folder)))
            deleted, freed, left = deleted + counts[0], freed + counts[1], left + counts[2]
        if left:
            message = ("Warning: %d replaced entries could not be deleted from %s; the next run "
                       "tries again" % (left, ", ".join(folders)))
            log.line(message)
            if out is not None:
                out.write(message + "\n")
            continue
        log.line("Deleted the replaced items: %d entries, %s freed, in %.1f s"
                 % (deleted, human_size(freed), time.monotonic() - started))
        # The folders' removal durable before the record's: a cut must not
        # keep a folder that no record names any more.
        for parent in sorted({os.path.dirname(folder) for folder in folders}):
            with contextlib.suppress(OSError):
                iotstack.fsync_dir(parent)
        os.unlink(record)
        iotstack.fsync_dir(os.path.dirname(record))


def foreign_record_path(stack: str, staging_rel: str) -> str:
    token = os.path.basename(staging_rel)[len(STAGING_PREFIX):]
    return os.path.join(stack, ".tmp", FOREIGN_RECORD + token + ".json")


def write_foreign_record(stack: str, staging_rel: str, folders: ForeignRecord) -> None:
    """Before a folder of ours is made on another disk: where it will be."""
    iotstack.write_json_atomically(foreign_record_path(stack, staging_rel), folders)


def remove_foreign_record(stack: str, journal: Journal) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(foreign_record_path(stack, journal["staging"]))


def remove_foreign_folders(record: str) -> None:
    """Staging and aside folders of a run that died before its journal: only
    folders of ours (by name), and an aside one only when it holds nothing."""
    try:
        with open(record, encoding="utf-8") as f:
            folders = json.load(f)
        staging, aside = folders.get("staging", []), folders.get("aside", [])
        times = folders.get("times", {})
    except (OSError, ValueError, AttributeError):
        staging, aside, times = [], [], {}
    remove_foreign(staging, aside, times)
    os.unlink(record)


def remove_foreign(staging: list[str], aside: list[str], times: object) -> None:
    """Remove our folders on other disks (staging ones, and aside ones that
    hold nothing), give the folders holding them back their times (taken
    before ours were made in them: {path: [atime, mtime]}), and make that
    durable: the record that names them goes next, and a cut must not keep
    a folder of ours that nothing names any more, nor the mount point's
    mtime changed (both found by test_powercut_mount)."""
    staging = [p for p in staging if isinstance(p, str)
               and os.path.basename(p).startswith(FOREIGN_STAGING)]
    aside = [p for p in aside if isinstance(p, str)
             and os.path.basename(p).startswith(FOREIGN_ASIDE)]
    for path in staging:
        shutil.rmtree(path, ignore_errors=True)
    for path in aside:
        remove_empty_tree(path)
    folders = parents(staging + aside)
    if isinstance(times, dict):
        for folder in folders:
            with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
                os.utime(folder, ns=tuple(times[folder]), follow_symlinks=False)
    fsync_folders(folders)


def parents(paths: list[str]) -> list[str]:
    return sorted({os.path.dirname(path) for path in paths})


def recover(stack: str, log: iotstack.RunLog, out: TextIO, trash: bool = True) -> bool:
    """Finish what an interrupted run left: roll back or complete; with
    trash, also delete the replaced items a restore left to delete (a
    restore does that itself once it has started what a cut run stopped)."""
    journal = read_journal(stack)
    tmp = os.path.join(stack, ".tmp")
    with_journal: Set[str] = set()
    if journal is not None:
        with_journal = {journal["staging"], journal["aside"]}
        if journal["state"] == "committed":
            clean_up(stack, journal)
            message = ("Completed an interrupted restore of %s: its files are in place"
                       % journal["archive"])
            if os.path.isfile(os.path.join(stack, "post_restore.sh")):
                message += "; post_restore.sh may not have run: run it by hand if needed"
        else:
            if journal["state"] != ROLLED_BACK:
                roll_back(stack, journal)
            clean_up(stack, journal)
            message = ("Rolled back an interrupted restore of %s: every item is as it was "
                       "before it" % journal["archive"])
        log.line(message)
        out.write(message + "\n")
    for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
        rel = ".tmp/" + name
        if name.startswith(FOREIGN_RECORD):
            remove_foreign_folders(os.path.join(tmp, name))
            log.line("Removed the folders of an interrupted restore on other disks")
        elif name.startswith(STAGING_PREFIX) and rel not in with_journal:
            # Unpacked before any swap began: nothing live was touched.
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            log.line("Removed the staging folder of an interrupted restore: %s" % rel)
        elif name.startswith(ASIDE_PREFIX) and rel not in with_journal:
            # Made just before a journal that was never written; one that
            # holds files was kept on purpose (--keep-old).
            remove_empty_tree(os.path.join(tmp, name))
    if os.path.exists(journal_path(stack) + ".new"):
        os.unlink(journal_path(stack) + ".new")
    if trash:
        empty_trash(stack, log, out)
    return journal is not None


def pending(stack: str) -> bool:
    """Whether an interrupted restore left a journal, a staging folder or
    replaced items to delete."""
    if os.path.lexists(journal_path(stack)):
        return True
    tmp = os.path.join(stack, ".tmp")
    with contextlib.suppress(OSError):
        return any(name.startswith((STAGING_PREFIX, TRASH_RECORD)) for name in os.listdir(tmp))
    return False


def recover_first(stack: Optional[str], out: TextIO, warn: Callable[[str], object],
                  owner: Optional[iotstack.Owner] = None) -> None:
    """What every run does first, --list, --verify and --dry-run included:
    finish or roll back an interrupted restore, saying which on out; when
    this user may not (files of root), warn(line) says how to finish it.
    A restore still running (it holds the lock) is left alone."""
    if stack is None or not pending(stack):
        return
    try:
        with iotstack.stack_lock(stack, owner):
            recover(stack, iotstack.RunLog(), out)
    except UserError as e:
        if e.code == EXIT_BUSY:
            return
        error = str(e)
    except OSError as e:
        error = describe_os_error(e)
    except (ValueError, KeyError, TypeError) as e:
        error = "%s is damaged: %s %s" % (journal_path(stack), type(e).__name__, e)
    else:
        return
    warn("an interrupted restore of %s is pending and could not be finished (%s): run "
         "'sudo python3 restore.py --recover' in %s" % (stack, error, stack))


def remove_empty_tree(path: str) -> None:
    for folder, _dirs, files in os.walk(path, topdown=False):
        if not files:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def prepare_journal(stack: str, archive: str, units: List[str], staging_rel: str,
                    aside_rel: str, keep_old: bool,
                    swaps: Optional[Sequence[Tuple[str, str]]] = None,
                    domains: Optional[Dict[str, Place]] = None) -> Journal:
    """The journal of a swap.  swaps: split_units' answer (default: each
    unit whole); domains: {point: (live folder, staging folder, aside
    folder)} for the points on other disks."""
    aside = os.path.join(stack, aside_rel)
    staging = os.path.join(stack, staging_rel)
    if swaps is None:
        swaps = [(unit, "") for unit in units]
    places: Dict[str, Place] = {"": (stack, staging, aside)}
    places.update(domains or {})
    created: List[str] = []
    entries: List[JournalEntry] = []
    for rel, domain in swaps:
        live_root, staging_root, aside_root = places[domain]
        inner = rel[len(domain) + 1:] if domain else rel
        live = os.path.join(live_root, inner)
        staged = os.path.join(staging_root, inner)
        old_path = os.path.join(aside_root, inner)
        os.makedirs(os.path.dirname(old_path), exist_ok=True)
        if not domain:
            for ancestor in staging_ancestors(rel):
                if not os.path.lexists(os.path.join(stack, ancestor)) and ancestor not in created:
                    created.append(ancestor)
        entries.append({"rel": rel, "live": live, "staged": staged, "aside": old_path,
                        "old": os.path.lexists(live), "new": os.path.lexists(staged)})
    times = parent_times(stack, units)
    for entry in entries:
        # The folders that stay while their entries are swapped (a mount
        # point, a folder opened around one) keep their times too.
        folder = os.path.dirname(entry["live"])
        if folder != stack and folder not in times and os.path.isdir(folder):
            st = os.stat(folder)
            times[folder] = [st.st_atime_ns, st.st_mtime_ns]
    os.makedirs(aside, exist_ok=True)
    foreign: Foreign = {"staging": [place[1] for point, place in sorted((domains or {}).items())],
               "aside": [place[2] for point, place in sorted((domains or {}).items())]}
    return {"version": 2, "state": "swapping", "archive": archive, "staging": staging_rel,
            "aside": aside_rel, "units": units, "entries": entries, "foreign": foreign,
            "created_parents": created, "keep_old": keep_old, "parent_times": times}


class OtherDisks:
    """The mount points and symlinks to other disks in what is restored
    (live_points): their members are staged in a folder on that
    disk, and their contents swapped there, so the mount or link stays,
    the data goes back onto its disk and no rename crosses disks.  A point
    the archive holds nothing for is left as it is."""

    def __init__(self, stack: str, only: Optional[List[str]], token: str,
                 staging_rel: str) -> None:
        self.stack, self.staging_rel = stack, staging_rel
        self.found = live_points(stack, only or list(iotstack.ITEM_NAMES))
        self.places: Dict[str, Place] = {}
        self.times: Times = {}  # of the points' folders, before ours are made in them
        for point in self.found:
            real = os.path.realpath(os.path.join(stack, point))
            st = os.stat(real)
            self.times[real] = [st.st_atime_ns, st.st_mtime_ns]
            self.places[point] = (real, os.path.join(real, FOREIGN_STAGING + token),
                                  os.path.join(real, FOREIGN_ASIDE + token))
        self.made: List[str] = []
        self.points: Dict[str, str] = {}    # the points whose data is restored
        self.untouched: List[str] = []  # the points the archive holds nothing for
        self.domains: Dict[str, Place] = {}

    def stager_options(self) -> StagerOptions:
        return {"redirect": {point: place[1] for point, place in self.places.items()},
                "link_points": [p for p, kind in self.found.items() if kind == "link"],
                "on_new_point": self._new_point}

    def _new_point(self, point: str) -> None:
        self.made.append(point)
        write_foreign_record(self.stack, self.staging_rel, {
            "staging": [self.places[p][1] for p in self.made],
            "aside": [self.places[p][2] for p in self.made],
            "times": {self.places[p][0]: self.times[self.places[p][0]] for p in self.made}})

    def staging_folders(self) -> List[str]:
        """The staging folders made so far on other disks."""
        return [self.places[point][1] for point in self.made]

    def staged(self, stager: Stager) -> None:
        for point, kind in self.found.items():
            if point in stager.redirect and point in stager.made_points:
                self.points[point] = kind
                self.domains[point] = self.places[point]
            elif point in stager.redirect:
                self.untouched.append(point)

    def drop(self) -> None:
        """Remove what was staged on other disks (nothing live changed)."""
        # On the way out of a failed restore: a disk that fails its fsync
        # must not hide the error that brought us here.
        with contextlib.suppress(OSError):
            remove_foreign([self.places[p][1] for p in self.made], [], self.times)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(foreign_record_path(self.stack, self.staging_rel))

    def swaps(self, units: Iterable[str], keep: Iterable[str], staging: str,
              log: iotstack.RunLog) -> Optional[List[Tuple[str, str]]]:
        for point in self.untouched:
            log.line("Kept as it is: %s (a %s the backup holds nothing for)"
                     % (point, "mount point" if self.found[point] == "mount" else
                        "symlink to another disk"))
        for point, kind in sorted(self.points.items()):
            log.line("%s is a %s: its data goes back onto %s" % (
                point, "mount point" if kind == "mount" else "symlink", self.places[point][0]))
        if not self.points and not keep and not self.untouched:
            return None

        def where(rel: str) -> Tuple[str, str]:
            above = [p for p in self.points if rel == p or rel.startswith(p + "/")]
            if not above:
                return os.path.join(self.stack, rel), os.path.join(staging, rel)
            point = max(above, key=len)
            live, staged, _aside = self.places[point]
            return live + rel[len(point):], staged + rel[len(point):]

        def children(rel: str) -> List[str]:
            names: Set[str] = set()
            for path in where(rel):
                if os.path.isdir(path) and (not os.path.islink(path) or rel in self.points):
                    names.update(os.listdir(path))
            return sorted(name for name in names if not name.startswith(".iotstack-restore-")
                          and not (name == "lost+found" and self.found.get(rel) == "mount"))

        return split_units(units, self.points, set(keep) | set(self.untouched),
                                   children)
