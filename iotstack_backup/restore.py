"""Restore an IOTstack backup: the interface of scripts/restore.sh, all or nothing.

    python3 restore.py [FILENAME] [noask]

The archive is unpacked into a staging folder inside the IOTstack directory
while every header, every member's safety and the gzip CRC are checked;
nothing live changes until all of that has passed.  Then, with the stack
stopped, each item being replaced is renamed aside and its staged copy
renamed in, under a journal in .tmp/: if anything fails the old items are
renamed back, and a run killed at any point is rolled back or completed by
the next run.  The services are down only for the renames, the hook and
the start: the old items are deleted only after the restore succeeded and
the services run again (or by the next run, if this one is cut).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import shutil
import sys
import time

from . import (
    disk_sync,
    docker_compose,
    incomplete,
    iotstack,
    journal,
    pgzip,
    picker,
    progress,
    run,
    service_groups,
    settings,
    tarformat,
    unpack,
)
from .journal import (
    ASIDE_PREFIX,
    STAGING_PREFIX,
    OtherDisks,
    clean_up,
    prepare_journal,
    recover,
    roll_back,
    swap_in,
)
from .unpack import (
    EarlyWriteback,
    Stager,
    check_units,
    live_excluded,
    normalize_member_name,
    read_archive,
)

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import (Collection, Dict, Iterable, Iterator, List, Mapping, Optional,
                        Sequence, Set, TextIO, Tuple)

    from .docker_compose import ServiceWindow
    from .iotstack import Owner, RunLog
    from .offsite import Destination
    from .tarformat import TarMember, TarReader
    from .unpack import Summary

    # A backup listed: (relative name, size, mtime); Noted adds its note.
    Listed = Tuple[str, int, float]
    Noted = Tuple[str, int, float, str]
    Swaps = List[Tuple[str, str]]

PROG = "restore.py"


EXIT_CODES = {
    run.EXIT_OK: "restored (or: verified, listed, recovered)",
    run.EXIT_FAILED: "failed: the archive is damaged or unsafe, or a step failed; the IOTstack\n"
                     "directory is as it was (post_restore.sh failing also gives 1, with the\n"
                     "files restored)",
    run.EXIT_USAGE: "bad arguments, archive not found, no FILENAME and no terminal to pick\n"
                    "one on, or no confirmation",
    run.EXIT_WARNINGS: "restored with --no-stop: the containers named still hold the old\n"
                       "files until restarted (the command is printed)",
    run.EXIT_BUSY: "another backup or restore of this stack is running",
    run.EXIT_SIGHUP: "interrupted by SIGHUP (terminal closed); the last line says what is\n"
                     "on disk (nothing changed, rolled back, complete, or what finishes it)",
    run.EXIT_SIGINT: "interrupted by Ctrl-C; the last line says what is on disk",
    run.EXIT_SIGTERM: "interrupted by SIGTERM; the last line says what is on disk",
}


EPILOG = run.exit_code_help(EXIT_CODES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Restore an IOTstack backup made by backup.py or by IOTstack's "
                    "scripts/backup.sh: checked in full first, then swapped in all at once.")
    p.add_argument("filename", nargs="?", metavar="FILENAME",
                   help="the archive, looked up under ./backups/ first (so "
                        "backup/backup_x.tar.gz works), then a bare name in backups/backup/ "
                        "and backups/rolling/, then as given; none: pick one from a "
                        "numbered list (on a terminal)")
    p.add_argument("noask", nargs="?", metavar="noask",
                   help="any second argument skips the confirmation question")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dir", metavar="DIR",
                   help="the IOTstack directory (default: $IOTSTACK, else the current "
                        "directory, else the one holding restore.py)")
    p.add_argument("--only", action="append", default=[], metavar="PATH",
                   help="restore only this subtree, e.g. volumes/nodered; repeatable")
    p.add_argument("--keep-old", action="store_true",
                   help="keep the replaced items in .tmp/ instead of deleting them")
    p.add_argument("--in-place", action="store_true",
                   help="when there is no room to stage: after the same checks, delete the "
                        "items and unpack over them (the original's way; no rollback)")
    p.add_argument("--no-stop", action="store_true",
                   help="do not stop the running services during the swap")
    p.add_argument("--list", action="store_true", help="list the backups present, newest first")
    p.add_argument("--verify", metavar="FILE",
                   help="check an archive in full (gzip CRC, headers, safety); change nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="check the archive and say what would be replaced; change nothing")
    p.add_argument("--recover", action="store_true",
                   help="only finish or roll back an interrupted restore, then stop")
    p.add_argument("--from", dest="source", type=settings.destination, metavar="METHOD:TARGET",
                   help="fetch FILENAME (e.g. backup/backup_x.tar.gz) from a copy made with "
                        "backup.py --copy-to into ./backups/, then restore it; with --list, "
                        "list the backups there")
    p.add_argument("--from-host", metavar="HOST",
                   help="the host folder to fetch from (default: this host's name)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="with --from, for a copy made with backup.py --encrypt-to: the file "
                        "holding your gpg key's passphrase (default: "
                        "$IOTSTACK_GPG_PASSPHRASE_FILE, else gpg's agent asks)")
    return p


class Progress:
    """How far a restore got.  An interruption's last line must match what
    is on disk: nothing changed, rolled back, complete, or pending (then
    with the command that finishes it)."""

    def __init__(self) -> None:
        self.phase = "nothing"  # nothing, swapping, rolled back, in place, complete
        self.archive: Optional[str] = None
        self.units: List[str] = []
        self.leftover: Optional[str] = None  # a staging folder that could not be removed
        # Replaced items an interruption left to delete (journal.empty_trash).
        self.trash: List[str] = []


# The restore under way in this process (restore_command sets a new one).
PROGRESS = Progress()


def interrupted_outcome(progress: Progress, pending: Optional[str],
                        recover_command: str) -> str:
    """What an interruption left, in one line.  pending: the state of a
    journal still on disk ("swapping", "committed", "damaged") or None."""
    what = os.path.basename(progress.archive or "the backup")
    if pending == "committed":
        said = ("%s is in place, but the restore is not finished and its services are left "
                "stopped: run '%s' to finish it and start them" % (what, recover_command))
    elif pending is not None:
        said = ("the swap of %s was cut short and could not be undone; its services are left "
                "stopped: run '%s' to roll it back and start them" % (what, recover_command))
    elif progress.phase == "complete":
        said = "%s had been restored completely (see the log)" % what
    elif progress.phase == "rolled back":
        said = "the swap was under way and every item was put back as it was: nothing was changed"
    elif progress.phase == "in place":
        said = ("%s may be incomplete now (unpacked in place, without roll back): restore "
                "them again from %s" % (", ".join(progress.units), what))
    else:
        said = "nothing was changed"
    if progress.leftover:
        said += "; the staging folder %s could not be removed: delete it" % progress.leftover
    if progress.trash:
        said += ("; the replaced items wait in %s, deleted by the next run of backup.py or "
                 "restore.py" % ", ".join(progress.trash))
    return said


def pending_state(stack: str) -> Optional[str]:
    """The state of a journal left on disk, or None."""
    try:
        record = journal.read_journal(stack)
    except (OSError, ValueError):
        return "damaged"
    if record is None:
        return None
    return record.get("state", "damaged") if isinstance(record, dict) else "damaged"


def recover_command(stack: str) -> str:
    return "cd %s && %spython3 restore.py --recover" % (stack, "" if os.geteuid() == 0
                                                         else "sudo ")


def replaced_units(held_items: Iterable[str], only: Sequence[str]) -> List[str]:
    """What is swapped as a whole: the --only paths, else the items held."""
    return sorted(only) if only else sorted(held_items)


def archive_note(path: str) -> str:
    """"incomplete: 10 files could not be read" for a local archive that
    lacks what its backup could not read (from its first bytes), else ""."""
    counts = incomplete.read_note(path)
    if counts is None and iotstack.is_incomplete_name(os.path.basename(path)):
        return "incomplete (see its log)"
    return incomplete.describe(counts)


def with_notes(entries: Iterable[Listed], backups: Optional[str] = None) -> List[Noted]:
    """The listing's entries with archive_note as a fourth element; at a
    --from destination (backups None) only the name can tell."""
    noted: List[Noted] = []
    for rel, size, mtime in entries:
        if backups is not None:
            note = archive_note(os.path.join(backups, rel))
        else:
            note = "incomplete" if iotstack.is_incomplete_name(os.path.basename(rel)) else ""
        noted.append((rel, size, mtime, note))
    return noted


def list_backups(backups: str) -> List[Listed]:
    """(relative name, size, mtime) of every archive, newest first."""
    found: List[Listed] = []
    for folder in ("backup", "rolling", ""):
        path = os.path.join(backups, folder)
        if not os.path.isdir(path):
            continue
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if name.endswith((".tar.gz", ".tgz")) and not name.startswith(".") \
                    and os.path.isfile(full):
                st = os.stat(full)
                found.append((os.path.join(folder, name) if folder else name,
                              st.st_size, st.st_mtime))
    found.sort(key=lambda entry: (-entry[2], entry[0]))
    return found


def resolve_archive(stack: str, filename: str) -> Optional[str]:
    """Under ./backups/ first, as documented; a bare name in backup/ or
    rolling/; then as given."""
    backups = os.path.join(stack, "backups")
    for candidate in (os.path.join(backups, filename), os.path.join(backups, "backup", filename),
                      os.path.join(backups, "rolling", filename), filename):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def ask_yes(archive: str, stack: str, services: str = "") -> bool:
    lacks = archive_note(archive)
    if lacks:
        lacks = ("This backup is %s when it was made: the live copies of those are kept "
                 "as they are.\n" % lacks)
    try:
        answer = input("Restore %s into %s, replacing what it holds.\n%s%sContinue [y/N]? "
                       % (archive, stack, lacks, services + "\n" if services else ""))
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def estimated_size(path: str) -> int:
    """The gzip trailer's length (mod 4 GiB), at least the file's size."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
    except OSError:
        isize = 0
    return max(isize, size)


def compose_bytes(stack: str) -> Optional[bytes]:
    """docker-compose.yml's content, or None when there is none."""
    try:
        with open(os.path.join(stack, "docker-compose.yml"), "rb") as f:
            return f.read()
    except OSError:
        return None


def run_restore(stack: str, archive: Optional[str], args: argparse.Namespace,
                owner: Optional[Owner]) -> int:
    started = time.monotonic()
    now = iotstack.now_local()
    backups = os.path.join(stack, "backups")
    out = sys.stdout
    with iotstack.stack_lock(stack, owner):
        for folder in ("", "logs"):
            iotstack.ensure_dir(os.path.join(backups, folder), owner)
        stem = iotstack.first_free_stem("restore_" + iotstack.archive_stamp(now),
                                   lambda s: os.path.exists(iotstack.log_path(backups, s)))
        log_file = iotstack.log_path(backups, stem)
        log = iotstack.RunLog(log_file)
        iotstack.chown_to(log_file, owner)
        try:
            log.field("Started At", now.isoformat(timespec="seconds"))
            log.field("Current Directory", stack)
            recover(stack, log, out, trash=False)
            leftover = docker_compose.restart_left_stopped(stack, log, out)
            journal.empty_trash(stack, log, out)  # with what a cut run stopped running again
            if args.recover:
                if leftover is not None and leftover.failed:
                    raise run.UserError(
                        "still stopped: %s; the record stays, so the next run tries again"
                        % "; ".join("%s (%s)" % pair for pair in leftover.failed))
                out.write("Nothing else to do (--recover).\n")
                return run.EXIT_OK
            assert archive is not None  # only --recover runs without one
            log.field("Archive", archive)
            code = restore_with_log(stack, archive, args, log, out)
            log.field("Duration (s)", "%.1f" % (time.monotonic() - started))
            log.field("Finished At", iotstack.now_local().isoformat(timespec="seconds"))
            out.write("Log: %s\n" % os.path.relpath(log_file, stack))
            return code
        except (run.Interrupted, KeyboardInterrupt) as e:
            PROGRESS.trash = [os.path.relpath(path, stack) if path.startswith(stack + "/")
                              else path for record in journal.trash_records(stack)
                              for path in journal.trash_folders(record)]
            # run_command reads it with getattr; the exceptions do not declare it.
            e.outcome = interrupted_outcome(  # type: ignore[union-attr]
                PROGRESS, pending_state(stack), recover_command(stack))
            log.line("Interrupted (%s): %s" % (str(e) or "Ctrl-C",
                                               e.outcome))  # type: ignore[union-attr]
            log.field("Finished At", iotstack.now_local().isoformat(timespec="seconds"))
            raise
        except BaseException as e:
            log.line("ERROR: %s" % (str(e) or type(e).__name__))
            log.field("Finished At", iotstack.now_local().isoformat(timespec="seconds"))
            raise
        finally:
            log.close()


class Places(collections.namedtuple("Places", "token staging_rel aside_rel staging")):
    """Where this restore stages the new items and puts the old ones aside."""


def places_for(stack: str) -> Places:
    """Staging and aside folders of this run in .tmp/.  A folder kept by
    --keep-old is never reused: a second run in the same minute and process
    would rename the items over the kept ones."""
    tmp = os.path.join(stack, ".tmp")
    token = iotstack.first_free_stem(
        "%s.%d" % (iotstack.archive_stamp(iotstack.now_local()), os.getpid()),
        lambda t: any(os.path.lexists(os.path.join(tmp, prefix + t))
                      for prefix in (STAGING_PREFIX, ASIDE_PREFIX)))
    staging_rel = ".tmp/" + STAGING_PREFIX + token
    return Places(token, staging_rel, ".tmp/" + ASIDE_PREFIX + token,
                  os.path.join(stack, staging_rel))


def restore_with_log(stack: str, archive: str, args: argparse.Namespace, log: RunLog,
                     out: TextIO) -> int:
    places = places_for(stack)
    disks = OtherDisks(stack, args.only, places.token, places.staging_rel)
    # 1. Read, check and (unless --in-place) unpack: nothing live changes.
    summary = read_and_stage(stack, archive, args, places, disks)
    log_summary(log, summary)
    units, swaps = units_to_replace(stack, args, summary, places, disks, log)
    log.line("Replacing: %s" % ", ".join(units))
    PROGRESS.archive, PROGRESS.units = archive, units
    try:
        if not args.in_place:
            sync_staged(places, disks, log)
        # 2. Swap, with the services that use the data stopped.
        window = docker_compose.ServiceWindow(stack, log)
        hook_status = swap_with_services_stopped(stack, archive, args, summary, units, swaps,
                                                 places, disks, window, log, out)
    except BaseException:
        drop_staging(stack, places, disks)
        raise
    # 3. Say what happened; delete the replaced items, with the services running again.
    docker_compose.log_fields(log, window)
    journal.empty_trash(stack, log, out)
    if window.failed:
        raise run.UserError("restored, but could not start again: %s"
                            % docker_compose.describe_failed(window))
    out.write("Restored %s: %s (%d members, %s)\n" % (
        os.path.basename(archive), ", ".join(units), summary.restored,
        progress.human_size(summary.bytes)))
    print_services(window, out)
    if hook_status:
        raise run.UserError("post_restore.sh failed with status %d; the files are restored "
                            "(see the log)" % hook_status)
    if args.no_stop:
        return warn_still_running(stack, window, log, out)
    return run.EXIT_OK


def read_and_stage(stack: str, archive: str, args: argparse.Namespace, places: Places,
                   disks: OtherDisks) -> Summary:
    """Read the whole archive with every check; unless --in-place, unpack
    it into the staging folder (or onto the other disks' staging).  Returns
    the archive's Summary; on any failure nothing staged is left."""
    if args.in_place:
        summary = checked(archive, args.only, None)
        unpack.check_room_in_place(stack, summary, replaced_units(summary.items, args.only))
        return summary
    need, free = estimated_size(archive), iotstack.free_bytes(os.path.join(stack, ".tmp"))
    if need > free:
        raise run.UserError(
            "not enough free space to unpack beside the current files (about %s needed, "
            "%s free); free some space or use --in-place" % (progress.human_size(need),
                                                             progress.human_size(free)))
    os.mkdir(places.staging, 0o700)
    bar: progress.Progress = progress.NoProgress()
    try:
        if sys.stderr.isatty():
            bar = progress.TerminalProgress(need, label="Unpacking: ")
        # On one core a writer process would only add copying.
        writer = pgzip.default_jobs() > 1
        with EarlyWriteback(lambda: staging_folders(places, disks)) as writeback, \
                contextlib.closing(
                Stager(places.staging, os.geteuid() == 0, fresh_root=True, writeback=writeback,
                       writer=writer, **disks.stager_options())) as stager:
            summary = checked(archive, args.only, stager, bar, places.staging)
        bar.finish()
        disks.staged(stager)
    except BaseException:
        bar.stop()
        shutil.rmtree(places.staging, ignore_errors=True)
        disks.drop()
        raise
    return summary


def staging_folders(places: Places, disks: OtherDisks) -> List[str]:
    """One folder on each file system this restore unpacks onto."""
    return [places.staging] + disks.staging_folders()


def sync_staged(places: Places, disks: OtherDisks, log: RunLog) -> None:
    """Every staged file, folder and name on disk before the old items can
    go: syncfs of the file systems written (the stack's, and each other
    disk staged onto), never the whole machine."""
    started = time.monotonic()
    ways = disk_sync.sync_filesystems(staging_folders(places, disks))
    log.line("Synced the unpacked files to disk (%s of %d file system%s) in %.1f s" % (
        "syncfs" if set(ways) == {"syncfs"} else "sync", len(ways),
        "" if len(ways) == 1 else "s", time.monotonic() - started))


def log_summary(log: RunLog, summary: Summary) -> None:
    log.field("Members", summary.members)
    log.field("Data Size (bytes)", summary.bytes)
    log.line("Verified: OK (gzip CRC, %d tar headers, every member's path)" % summary.members)
    for warning in summary.warnings:
        log.line("Warning: %s" % warning)
    if summary.skipped:
        log.line("Skipped %d member(s) that are not part of an IOTstack backup, e.g. %s"
                 % (len(summary.skipped), ", ".join(summary.skipped[:5])))


def units_to_replace(stack: str, args: argparse.Namespace, summary: Summary, places: Places,
                     disks: OtherDisks, log: RunLog) -> Tuple[List[str], Optional[Swaps]]:
    """(units, swaps): what is replaced as a whole and, unless --in-place,
    how each is swapped (what excludes keep live, what lies on other
    disks).  Refuses, leaving nothing staged, when the archive lacks what
    --only asks for or a unit's place lies behind a symlink."""
    missing = sorted(set(args.only) - summary.found_only)
    units = replaced_units(summary.items, args.only)
    try:
        if missing:
            raise run.UserError(only_missing(missing), run.EXIT_USAGE)
        if not units:
            raise run.UserError("the archive holds no IOTstack items (services/, volumes/, "
                                "docker-compose.yml...)")
        check_units(stack, units, disks.points)
        if args.in_place:
            return units, None
        keep = kept_live(stack, units, summary, log)
        return units, disks.swaps(units, keep, places.staging, log)
    except BaseException:
        shutil.rmtree(places.staging, ignore_errors=True)
        disks.drop()
        raise


def kept_live(stack: str, units: Sequence[str], summary: Summary, log: RunLog,
              out: TextIO = sys.stdout) -> Set[str]:
    """The live entries a restore leaves exactly as they are: what the
    backup excluded, and what it could not read (an incomplete backup lacks
    them, so their live copies are kept).  Says which, and which of the
    latter are missing here too (a new Pi): those the restore cannot give."""
    keep = live_excluded(stack, units, summary.excludes)
    for rel in sorted(keep):
        log.line("Kept as it is (excluded from the backup): %s" % rel)
    lacked, missing = incomplete.lacked_here(stack, units, summary.incomplete)
    for rel in lacked:
        log.line("Kept as it is (the backup could not read it): %s" % rel)
    if lacked:
        out.write("Kept as they are: %d live entries the backup could not read (listed in "
                  "the log)\n" % len(lacked))
    if missing:
        message = ("This backup lacks %d entries that are not here either (they could not "
                   "be read when it was made), so they will be missing: %s"
                   % (len(missing), ", ".join(missing)))
        log.line("Warning: " + message)
        out.write("Warning: " + message + "\n")
    return keep | set(lacked)


def only_missing(missing: Sequence[str]) -> str:
    """The exit-2 line for --only paths the archive holds nothing under
    (most often a typo: volumes/noderd)."""
    return ("--only %s: the archive holds nothing under %s; nothing was changed (see what it "
            "holds with --verify)" % (", ".join(missing), "it" if len(missing) == 1 else "them"))


def drop_staging(stack: str, places: Places, disks: OtherDisks) -> None:
    """On the way out of a restore that did not swap (or rolled back): its
    staging folders go, here and on other disks; one that cannot go is
    named in the last line (PROGRESS.leftover).  Nothing is removed while a
    journal is pending: recovery needs the staged copies."""
    if pending_state(stack) is not None:
        return
    shutil.rmtree(places.staging, ignore_errors=True)
    disks.drop()
    journal.remove_empty_tree(os.path.join(stack, places.aside_rel))
    if os.path.lexists(places.staging):
        PROGRESS.leftover = places.staging_rel


@contextlib.contextmanager
def whole_before_start(stack: str, window: ServiceWindow, log: RunLog,
                       out: TextIO) -> Iterator[None]:
    """The services start again only over a whole tree, old or new: a swap
    an interruption left pending is finished (or rolled back) first, with
    signals held; if that fails, the services stay stopped (window.hold),
    and the last line says to run --recover."""
    try:
        yield
    finally:
        state = pending_state(stack)
        if state is not None:
            try:
                with run.signals_deferred():
                    recover(stack, log, out)
                    PROGRESS.phase = "complete" if state == "committed" else "rolled back"
            except Exception as e:  # noqa: BLE001 - whatever it is, nothing may start
                log.line("ERROR: the swap could not be finished (%s); services left stopped"
                         % e)
                window.hold()


def swap_with_services_stopped(stack: str, archive: str, args: argparse.Namespace,
                               summary: Summary, units: List[str], swaps: Optional[Swaps],
                               places: Places,
                               disks: OtherDisks, window: ServiceWindow, log: RunLog,
                               out: TextIO) -> Optional[int]:
    """Stop the services that use the data, put the new items in place
    (journaled swap, or --in-place), run post_restore.sh, and start the
    services again whatever happens.  Returns the hook's exit status."""
    services = services_to_stop(window, stack, args, log)
    old_compose = compose_bytes(stack)  # read now: --in-place deletes it
    old_inputs = compose_inputs(stack)
    # Asked now, with the services up: if the swap leaves the compose files
    # as they are, the start needs no compose call of its own to know them.
    in_file = window.engine.services_in_file() if services and window.engine else None
    with window, whole_before_start(stack, window, log, out):
        if not args.no_stop:
            stop_or_refuse(window, services, places.staging)
        if args.in_place:
            keep = kept_live(stack, units, summary, log, out)
            PROGRESS.phase = "in place"
            replace_in_place(stack, archive, args.only, units, os.geteuid() == 0, log, keep)
            PROGRESS.phase = "complete"
        else:
            swap_staged(stack, archive, args, units, swaps, places, disks, log, out)
        if old_compose is not None and compose_bytes(stack) != old_compose:
            message = ("docker-compose.yml changed: run 'docker compose up -d' to apply it")
            out.write(message + "\n")
            log.line(message)
        status = iotstack.run_hook(stack, "post_restore.sh", log)
        if in_file is not None and old_inputs is not None and compose_inputs(stack) == old_inputs:
            window.compose_services = in_file
        return status


# What `compose config --services` reads in the stack's folder.
COMPOSE_NAMES = ("docker-compose.yml", "docker-compose.yaml", "docker-compose.override.yml",
                 "docker-compose.override.yaml", "compose.yml", "compose.yaml",
                 "compose.override.yml", "compose.override.yaml", ".env")


def compose_inputs(stack: str) -> Optional[Dict[str, bytes]]:
    """The bytes of the files compose reads to list the services, or None
    when they may name others (include, extends: files we do not follow)."""
    found: Dict[str, bytes] = {}
    for name in COMPOSE_NAMES:
        try:
            with open(os.path.join(stack, name), "rb") as f:
                found[name] = f.read()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if name != ".env" and (b"include" in found[name] or b"extends" in found[name]):
            return None
    if b"COMPOSE_FILE" in found.get(".env", b""):
        return None
    return found


def swap_staged(stack: str, archive: str, args: argparse.Namespace, units: List[str],
                swaps: Optional[Swaps], places: Places, disks: OtherDisks, log: RunLog,
                out: TextIO) -> None:
    """The journaled swap: every unit in, or (on any error) every one back."""
    record = prepare_journal(stack, archive, units, places.staging_rel, places.aside_rel,
                             args.keep_old, swaps, disks.domains)
    record["parent_times"].update(disks.times)
    PROGRESS.phase = "swapping"
    try:
        swap_in(stack, record)
    except BaseException:
        with run.signals_deferred():  # a second Ctrl-C must not cut the roll back short
            if pending_state(stack) is not None:  # else no rename was made
                roll_back(stack, record)
                clean_up(stack, record)
            PROGRESS.phase = "rolled back"
            log.line("The swap failed; every item was put back as it was")
        raise
    PROGRESS.phase = "complete"  # committed: a cut from here on completes it
    with run.signals_deferred():
        moved = clean_up(stack, record)  # nothing written between the commit and this
        for entry in record["entries"]:
            log.line("Swapped in: %s" % entry["rel"])
        log.line("Swap complete: every item is in place")
    if moved is not None:
        log.line("Replaced items moved aside to %s, deleted once the services run again"
                 % ", ".join([places.aside_rel] + record["foreign"]["aside"]))
    if args.keep_old and any(os.path.lexists(os.path.join(stack, places.aside_rel, unit))
                             for unit in units):
        out.write("The replaced items are kept in %s\n" % places.aside_rel)
        log.line("Replaced items kept in %s" % places.aside_rel)


def stop_or_refuse(window: ServiceWindow, services: Optional[List[str]], staging: str) -> None:
    """Stop the services, or change nothing: files swapped under a running
    database are what restore exists to avoid."""
    if window.unavailable:
        reason = "cannot tell which services run: %s" % window.unavailable
    else:
        assert services is not None  # None only when the window is unavailable
        try:
            window.stop(services)
            return
        except docker_compose.StackUnavailable as e:
            reason = str(e)
    shutil.rmtree(staging, ignore_errors=True)
    raise run.UserError("%s; nothing was changed (fix Docker, or restore under running "
                        "containers with --no-stop)" % reason)


def print_services(window: ServiceWindow, out: TextIO) -> None:
    if window.started:
        out.write("Services stopped and started again: %s\n" % ", ".join(window.started))
        out.write("Downtime (s): %s\n" % docker_compose.downtimes(window))
    if window.left_alone:
        out.write("Services left alone: %s\n" % docker_compose.describe(window.left_alone))
    for name, advice in window.missing:
        out.write("Warning: %s %s\n" % (name, advice))


def warn_still_running(stack: str, window: ServiceWindow, log: RunLog, out: TextIO) -> int:
    """--no-stop: the running containers keep the replaced files open until
    they restart.  Exit 3 naming them and the command, or 0 if none ran."""
    if window.unavailable:
        message = ("Warning: could not check which containers still use the old files (%s); "
                   "restart the running ones: cd %s && docker compose restart"
                   % (window.unavailable, stack))
    elif window.running:
        message = ("Warning: these containers still hold the old files: %s; restart them: "
                   "cd %s && %s restart %s" % (
                       ", ".join(window.container_names(window.running)), stack,
                       window.compose_words, " ".join(window.running)))
    else:
        return run.EXIT_OK
    log.line(message)
    out.write(message + "\n")
    return run.EXIT_WARNINGS


def checked(archive: str, only: Sequence[str], stager: Optional[Stager],
            progress: Optional[progress.Progress] = None,
            staging: Optional[str] = None) -> Summary:
    try:
        return read_archive(archive, only, stager, progress)
    except tarformat.ArchiveError as e:
        raise run.UserError("%s: %s; nothing was changed" % (os.path.basename(archive), e)) from None
    except OSError as e:
        if staging is None:
            raise
        if iotstack.is_disk_full(e):
            raise run.UserError("not enough free space to unpack beside the current files; "
                                "nothing was changed; free some space or use --in-place") from None
        raise run.UserError("unpacking failed: %s; nothing was changed"
                            % run.describe_os_error(e)) from None


def replace_in_place(stack: str, archive: str, only: Sequence[str], units: List[str],
                     as_root: bool, log: RunLog, keep: Collection[str] = frozenset()) -> None:
    """The original's delete-then-extract, after the full check has passed;
    what keep names (kept_live) is neither deleted nor replaced."""
    points = unpack.live_points(stack, units)
    for unit in units:
        unpack.delete_except(stack, unit, points, keep)
    log.line("In place: deleted %s, unpacking over them" % ", ".join(units))
    tracker = unpack.UnitTracker(units)
    stager = Stager(stack, as_root)
    adding = stager.add

    def add(member: TarMember, rel: str, reader: TarReader) -> None:
        tracker.saw(rel)
        adding(member, rel, reader)
    # The one Stager whose add also tracks the units reached.
    stager.add = add  # type: ignore[method-assign]
    try:
        read_archive(archive, only, stager)
    except (tarformat.ArchiveError, OSError) as e:
        complete, incomplete = tracker.outcome()
        cause = e if isinstance(e, tarformat.ArchiveError) else run.describe_os_error(e)
        message = ("unpacking in place failed: %s; incomplete or missing now: %s%s; restore "
                   "them again from %s" % (cause, ", ".join(incomplete),
                                           "; complete: %s" % ", ".join(complete)
                                           if complete else "", archive))
        log.line("ERROR: " + message)
        raise run.UserError(message) from None


def backups_at(stack: str, source: Optional[Destination] = None,
               host: Optional[str] = None) -> Tuple[List[Listed], str]:
    """(entries, where): the backups here, or at the --from destination."""
    if source is None:
        where = os.path.join(stack, "backups")
        return list_backups(where), where
    from . import offsite
    assert host is not None  # given with a source
    where = "%s under %s/" % (source, host)
    try:
        return offsite.list_backups(source, host), where
    except offsite.CopyError as e:
        raise run.UserError("cannot list %s: %s" % (where, e)) from None


def print_list(stack: str, out: TextIO, source: Optional[Destination] = None,
               host: Optional[str] = None) -> None:
    entries, where = backups_at(stack, source, host)
    if not entries:
        out.write("No backups in %s\n" % where)
        return
    times = {rel: mtime for rel, _size, mtime in entries}
    local = os.path.join(stack, "backups") if source is None else None
    for rel, size, mtime, note in with_notes(entries, local):
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        out.write("%-44s %10s  %s%s%s\n" % (rel, progress.human_size(size), when,
                                           pair_note(rel, times) if source else "",
                                           "  " + note if note else ""))


def pair_note(rel: str, times: Mapping[str, float]) -> str:
    """For a name whose plain and .gpg copies are both at a destination:
    which one --from takes (the newer; fetch.choose_remote)."""
    from . import encryption, fetch
    plain = encryption.plain_name(rel)
    encrypted = encryption.encrypted_name(plain)
    if plain not in times or encrypted not in times:
        return ""
    taken, _note = fetch.choose_remote(plain, {name: (0, times[name]) for name in (plain, encrypted)})
    return "  (--from takes this one: newer)" if rel == taken else "  (older copy)"


def verify_only(stack: Optional[str], filename: str, out: TextIO) -> int:
    archive = resolve_archive(stack, filename) if stack else None
    archive = archive or (os.path.abspath(filename) if os.path.isfile(filename) else None)
    if archive is None:
        raise run.UserError("archive %s not found (looked in ./backups/ and as given)"
                            % filename, run.EXIT_USAGE)
    try:
        summary = read_archive(archive, [])
    except tarformat.ArchiveError as e:
        raise run.UserError("%s: %s" % (filename, e)) from None
    out.write("%s: OK (%d members, %s of data, items: %s)\n" % (
        filename, summary.members, progress.human_size(summary.bytes),
        ", ".join(sorted(summary.items)) or "none"))
    write_incomplete(summary, out)
    return run.EXIT_OK


def write_incomplete(summary: Summary, out: TextIO) -> None:
    """What an incomplete archive lacks, for --verify and --dry-run."""
    if not summary.incomplete:
        return
    out.write("This backup is %s when it was made:\n"
              % incomplete.describe(incomplete.counts_of(summary.incomplete)))
    for rel, kind in summary.incomplete:
        out.write("  %s (%s)\n" % (rel or "(its record is damaged)", kind))


def dry_run(stack: str, archive: str, args: argparse.Namespace, out: TextIO) -> int:
    summary = checked(archive, args.only, None)
    missing = sorted(set(args.only) - summary.found_only)
    if missing:
        raise run.UserError(only_missing(missing), run.EXIT_USAGE)
    units = replaced_units(summary.items, args.only)
    out.write("Archive: %s: OK (%d members, %s of data)\n" % (
        archive, summary.members, progress.human_size(summary.bytes)))
    write_incomplete(summary, out)
    for unit in units:
        state = "replace" if os.path.lexists(os.path.join(stack, unit)) else "create"
        out.write("Would %s: %s\n" % (state, unit))
    for rel in sorted(live_excluded(stack, units, summary.excludes)):
        out.write("Would keep as it is (excluded from the backup): %s\n" % rel)
    lacked, missing = incomplete.lacked_here(stack, units, summary.incomplete)
    for rel in lacked:
        out.write("Would keep as it is (the backup could not read it): %s\n" % rel)
    for rel in missing:
        out.write("Would be missing (not in the backup, not here either): %s\n" % rel)
    for point, kind in sorted(unpack.live_points(stack, units).items()):
        out.write("Would keep the %s %s; its data goes back onto that disk\n"
                  % ("mount point" if kind == "mount" else "symlink", point))
    for warning in summary.warnings:
        out.write("Warning: %s\n" % warning)
    out.write(stop_text(args, planned_stops(stack, args), would=True) + "\n")
    out.write("Dry run: nothing was changed.\n")
    return run.EXIT_OK


def services_to_stop(window: ServiceWindow, stack: str, args: argparse.Namespace,
                     log: RunLog) -> Optional[List[str]]:
    """The running services the swap stops, or None when docker cannot
    tell.  With --only, only those with a bind mount under (or holding)
    what is restored."""
    if args.no_stop:
        return []
    if window.unavailable:
        return None
    if not args.only:
        return list(window.running)
    containers = window.running_containers()
    # service_groups.py is not annotated yet (and not this change's to edit).
    using = service_groups.services_using(  # type: ignore[no-untyped-call]
        containers, stack, args.only, service_groups.volumes_of(window, containers), log)
    log.line("Services with data under %s: %s" % (", ".join(args.only), ", ".join(using) or "none"))
    return [service for service in window.running if service in using]


def planned_stops(stack: str, args: argparse.Namespace) -> Optional[List[str]]:
    """services_to_stop for a question or a dry run: asks the engine, changes nothing."""
    log = iotstack.RunLog()
    return services_to_stop(docker_compose.ServiceWindow(stack, log), stack, args, log)


def stop_text(args: argparse.Namespace, services: Optional[Sequence[str]],
              would: bool = False) -> str:
    if args.no_stop:
        return "Services: left running (--no-stop)"
    if services is None:
        return ("Services: cannot tell which are running (docker does not answer); the "
                "restore changes nothing unless you add --no-stop")
    if not services:
        return "Services to stop: none" + (" with data under %s" % ", ".join(args.only)
                                            if args.only else " running")
    return "%s: %s" % ("Would stop and start again" if would else
                       "Will stop during the swap and start again", ", ".join(services))


def choose(stack: str, args: argparse.Namespace, host: str, out: TextIO) -> Optional[str]:
    """No FILENAME: the backup picked from a numbered list on a terminal;
    without one, exit 2 naming the newest backups."""
    listed, where = backups_at(stack, args.source, host)
    entries = with_notes(picker.newest_first(listed),
                         os.path.join(stack, "backups") if args.source is None else None)
    if sys.stdin is None or not sys.stdin.isatty():
        raise run.UserError(picker.no_terminal_message(entries, where), run.EXIT_USAGE)
    return picker.pick(entries, where, time.time(), input, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run.run_command(PROG, build_parser(), restore_command, argv,
                           "nothing was changed")


def restore_command(args: argparse.Namespace) -> int:
    """restore_steps, with the last line of an interruption before any
    swap: nothing was changed (run_restore says what one during it left)."""
    global PROGRESS
    PROGRESS = Progress()
    try:
        return restore_steps(args)
    except (run.Interrupted, KeyboardInterrupt) as e:
        if not hasattr(e, "outcome"):
            # run_command reads it with getattr; the exceptions do not declare it.
            e.outcome = interrupted_outcome(PROGRESS, None, "")  # type: ignore[union-attr]
        raise


def restore_steps(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.verify:
        stack = iotstack.find_stack_dir(args.dir, os.environ, os.getcwd(), iotstack.INSTALL_DIR)
        journal.recover_first(stack, out, warn)
        return verify_only(stack, args.verify, out)
    stack = iotstack.locate_stack(args.dir)
    from . import menu
    menu.warn_if_gone(stack)
    if args.list or args.dry_run:
        journal.recover_first(stack, out, warn)
    args.only = [normalize_only(path) for path in args.only]
    host = args.from_host or iotstack.host_folder()
    if args.list:
        print_list(stack, out, args.source, host)
        return run.EXIT_OK
    owner, _how = iotstack.choose_owner(None, stack)
    if args.recover:
        with run.signals_raise():
            return run_restore(stack, None, args, owner)
    if not args.dry_run:
        refuse_early(stack, args.only)
    if args.filename is None and args.source is None and \
            os.path.isfile(os.path.join(stack, "backups", "backup.tar.gz")):
        args.filename = "backup.tar.gz"  # the original restore.sh's default
    if args.filename is None:
        args.filename = choose(stack, args, host, out)
        if args.filename is None:
            out.write("Nothing was changed.\n")
            return run.EXIT_USAGE
    if args.source is not None:
        return restore_fetched(stack, args, host, owner, out)
    archive = resolve_archive(stack, args.filename)
    if archive is None:
        raise run.UserError("backup file %s not found (looked in %s and as given)"
                            % (args.filename, os.path.join(stack, "backups")), run.EXIT_USAGE)
    return restore_archive(stack, archive, args, owner, out)


def restore_fetched(stack: str, args: argparse.Namespace, host: str, owner: Optional[Owner],
                    out: TextIO) -> int:
    """--from: fetch (never over a local file; see fetch.py), then restore
    it; a dry run's temporary copy is removed afterwards."""
    from . import encryption, fetch
    args.owner = owner
    args.passphrase_file = encryption.passphrase_file_from(args.passphrase_file, os.environ)
    fetched = fetch.fetch(stack, host, args.filename, out, args)
    try:
        return restore_archive(stack, fetched.path, args, owner, out)
    finally:
        if fetched.temporary_dir is not None:
            shutil.rmtree(fetched.temporary_dir, ignore_errors=True)


def restore_archive(stack: str, archive: str, args: argparse.Namespace, owner: Optional[Owner],
                    out: TextIO) -> int:
    """Dry run, or ask, then restore archive."""
    if args.dry_run:
        return dry_run(stack, archive, args, out)
    if not (args.noask or args.yes):
        if sys.stdin is None or not sys.stdin.isatty():
            raise run.UserError("not on a terminal, so nobody can confirm: add 'noask' "
                                "or --yes to restore without asking", run.EXIT_USAGE)
        services = planned_stops(stack, args)
        if not ask_yes(archive, stack, stop_text(args, services)):
            out.write("Nothing was changed.\n")
            return run.EXIT_USAGE
    with run.signals_raise():
        return run_restore(stack, archive, args, owner)


def refuse_early(stack: str, only: Sequence[str]) -> None:
    """As a normal user, before the pick, the question or any unpacking:
    live items holding another user's files (a container's) cannot be
    replaced, whatever the archive holds; the same check as check_units,
    on every item present here (or the --only paths)."""
    if os.geteuid() == 0:
        return
    units = only or [item for item in iotstack.ITEM_NAMES
                     if os.path.lexists(os.path.join(stack, item))]
    unpack.check_units(stack, units)


def warn(message: str) -> None:
    sys.stderr.write("%s: warning: %s\n" % (PROG, message))
    sys.stderr.flush()


def normalize_only(path: str) -> str:
    try:
        rel = normalize_member_name(path.rstrip("/"))
    except tarformat.ArchiveError:
        raise run.UserError("--only %s: give a path inside IOTstack, like volumes/nodered"
                            % path, run.EXIT_USAGE) from None
    if iotstack.item_of(rel) is None:
        raise run.UserError("--only %s: not part of a backup (services/, volumes/, the compose "
                            "files, the hooks...)" % path, run.EXIT_USAGE)
    return rel


if __name__ == "__main__":
    raise SystemExit(main())
