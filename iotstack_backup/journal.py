"""The restore journal: swapping staged items in, rolling back, recovering.

After restore has unpacked and checked a whole archive in a staging folder,
swap_in renames each item being replaced aside and its staged copy into its
place.  How it keeps data safe: a journal in .tmp/, fsynced before the first
rename and after the last, says what is under way; roll_back undoes a swap
from any point (a unit whose staged copy is gone was swapped in, so it goes
back); recover, which every run does first, completes a committed swap or
rolls back an interrupted one, so a crash at any step leaves either the old
tree or the new one, never a mix.  Old items are deleted only after commit.
"""
import contextlib
import json
import os
import shutil

from . import iotstack
from .unpack import staging_ancestors

STAGING_PREFIX = "restore-staging."


ASIDE_PREFIX = "restore-old."


def journal_path(stack):
    return os.path.join(stack, iotstack.JOURNAL_NAME)


def write_journal(stack, journal):
    iotstack.write_json_atomically(journal_path(stack), journal)


def read_journal(stack):
    try:
        with open(journal_path(stack), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def swap_in(stack, journal):
    """Rename each unit aside and its staged copy in; the journal says how far."""
    staging = os.path.join(stack, journal["staging"])
    aside = os.path.join(stack, journal["aside"])
    write_journal(stack, journal)
    for parent in journal["created_parents"]:
        os.mkdir(os.path.join(stack, parent))
    for unit in journal["units"]:
        live = os.path.join(stack, unit)
        if os.path.lexists(live):
            os.rename(live, os.path.join(aside, unit))
        os.rename(os.path.join(staging, unit), live)
    keep_parent_times(stack, journal)
    for folder in {os.path.dirname(os.path.join(stack, unit)) for unit in journal["units"]}:
        iotstack.fsync_dir(folder)
    journal["state"] = "committed"
    write_journal(stack, journal)


def roll_back(stack, journal):
    """Undo swap_in from any point: a unit whose staged copy is gone was
    swapped in, so it goes back to staging and the old one returns."""
    staging = os.path.join(stack, journal["staging"])
    aside = os.path.join(stack, journal["aside"])
    for unit in reversed(journal["units"]):
        live = os.path.join(stack, unit)
        new = os.path.join(staging, unit)
        old = os.path.join(aside, unit)
        if not os.path.lexists(new) and os.path.lexists(live):
            os.makedirs(os.path.dirname(new), exist_ok=True)
            os.rename(live, new)
        if os.path.lexists(old):
            os.rename(old, live)
    for parent in reversed(journal["created_parents"]):
        try:
            os.rmdir(os.path.join(stack, parent))
        except OSError:
            pass
    keep_parent_times(stack, journal)
    iotstack.fsync_dir(stack)


def parent_times(stack, units):
    """Times of the folders above --only units (volumes/ for volumes/nodered):
    the renames and mkdirs of a swap must not change their mtime."""
    times = {}
    for unit in units:
        for parent in staging_ancestors(unit):
            path = os.path.join(stack, parent)
            if parent != ".tmp" and os.path.isdir(path) and not os.path.islink(path):
                st = os.stat(path)
                times[parent] = [st.st_atime_ns, st.st_mtime_ns]
    return times


def keep_parent_times(stack, journal):
    for parent, times in journal.get("parent_times", {}).items():
        with contextlib.suppress(OSError):
            os.utime(os.path.join(stack, parent), ns=tuple(times), follow_symlinks=False)


def clean_up(stack, journal):
    """After commit or roll back: drop staging (and aside unless kept)."""
    shutil.rmtree(os.path.join(stack, journal["staging"]), ignore_errors=True)
    if not journal.get("keep_old") or journal["state"] != "committed":
        shutil.rmtree(os.path.join(stack, journal["aside"]), ignore_errors=True)
    os.unlink(journal_path(stack))
    iotstack.fsync_dir(os.path.dirname(journal_path(stack)))


def recover(stack, log, out):
    """Finish what an interrupted run left: roll back or complete."""
    journal = read_journal(stack)
    tmp = os.path.join(stack, ".tmp")
    with_journal = set()
    if journal is not None:
        with_journal = {journal["staging"], journal["aside"]}
        if journal["state"] == "committed":
            clean_up(stack, journal)
            message = ("Completed an interrupted restore of %s: its files are in place"
                       % journal["archive"])
            if os.path.isfile(os.path.join(stack, "post_restore.sh")):
                message += "; post_restore.sh may not have run: run it by hand if needed"
        else:
            roll_back(stack, journal)
            clean_up(stack, journal)
            message = ("Rolled back an interrupted restore of %s: every item is as it was "
                       "before it" % journal["archive"])
        log.line(message)
        out.write(message + "\n")
    for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
        rel = ".tmp/" + name
        if name.startswith(STAGING_PREFIX) and rel not in with_journal:
            # Unpacked before any swap began: nothing live was touched.
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            log.line("Removed the staging folder of an interrupted restore: %s" % rel)
        elif name.startswith(ASIDE_PREFIX) and rel not in with_journal:
            # Made just before a journal that was never written; one that
            # holds files was kept on purpose (--keep-old).
            remove_empty_tree(os.path.join(tmp, name))
    if os.path.exists(journal_path(stack) + ".new"):
        os.unlink(journal_path(stack) + ".new")
    return journal is not None


def remove_empty_tree(path):
    for folder, _dirs, files in os.walk(path, topdown=False):
        if not files:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def prepare_journal(stack, archive, units, staging_rel, aside_rel, keep_old):
    aside = os.path.join(stack, aside_rel)
    created = []
    for unit in units:
        for ancestor in staging_ancestors(unit):
            os.makedirs(os.path.join(aside, ancestor), exist_ok=True)
            if not os.path.lexists(os.path.join(stack, ancestor)) and ancestor not in created:
                created.append(ancestor)
    os.makedirs(aside, exist_ok=True)
    return {"version": 1, "state": "swapping", "archive": archive, "staging": staging_rel,
            "aside": aside_rel, "units": units, "created_parents": created,
            "keep_old": keep_old, "parent_times": parent_times(stack, units)}
