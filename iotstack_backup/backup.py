"""Back up an IOTstack directory: the interface of scripts/backup.sh, made safe.

    python3 backup.py [TYPE] [USER]

The archive is written under a temporary name that no glob of backups
matches, fsynced, read back in full, and only then given its dated and/or
rolling name, so a name only ever holds a complete archive and the previous
rolling archive survives a failed run.  Services are paused with `stop` and
resumed with `start` (never `down`/`up`), exactly those that were running,
also after errors, Ctrl-C and SIGTERM.
"""
import argparse
import errno
import os
import shutil
import stat
import sys
import time

from . import (archive_writer, docker_compose, iotstack, progress, run, service_groups,
               stack_window, tarformat)
from .archive_writer import write_archive
from .settings import (
    backup_type,
    destination,
    gzip_level,
    jobs_count,
    keep_count,
    load_settings,
    notify_url,
    print_config,
    stop_mode,
)

PROG = "backup.py"


EPILOG = """\
exit codes:
  0  backup written and verified
  1  failed: no new backup (see the message and the log); also when the
     backup was written but the stopped services could not be started again
  2  bad arguments or unknown user
  3  backup written and verified, with warnings (unreadable files, files
     that changed while read, services that could not be stopped)
  4  another backup or restore of this stack is running

backups go to backups/backup/ (TYPE 1 and 3) and backups/rolling/ (TYPE 2
and 3), logs to backups/logs/.
"""


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Back up the IOTstack directory (compose files, services/, volumes/, "
                    "hooks) to a .tar.gz, the way scripts/backup.sh did, but safely.  Every "
                    "option except --dir, --dry-run and --print-config can also be set in "
                    "backup.ini (see the README); the command line wins.")
    p.add_argument("type", nargs="?", type=backup_type, metavar="TYPE",
                   help="1 = dated backups/backup/backup_YYYY-MM-DD_HHMM.tar.gz, "
                        "2 = rolling backups/rolling/backup_N.tar.gz (N = weekday, "
                        "Sunday 0), 3 = both (default)")
    p.add_argument("user", nargs="?", metavar="USER",
                   help="as root: the user (and that user's primary group) that owns "
                        "the archives, logs and backup folders; default $SUDO_USER, "
                        "else the owner of the IOTstack directory (asked on a terminal)")
    p.add_argument("--dir", metavar="DIR",
                   help="the IOTstack directory (default: $IOTSTACK, else the current "
                        "directory, else the one holding backup.py)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave out paths matching PATTERN (shell glob on the path "
                        "relative to IOTstack, or on a file name); repeatable")
    p.add_argument("--stop", type=stop_mode, metavar="each|all|none",
                   help="each (default): stop each group of services that share data only "
                        "while its data is read; all: stop every running service until the "
                        "last file is read; none: leave the stack running")
    p.add_argument("--no-stop", dest="stop", action="store_const", const="none",
                   help="the same as --stop none (for pre_backup.sh that dumps databases)")
    p.set_defaults(no_stop=None)  # backup.ini's no-stop; the command line sets stop
    p.add_argument("--no-verify", action="store_true", default=None,
                   help="skip reading the archive back after writing it")
    p.add_argument("--keep", type=keep_count, metavar="N",
                   help="keep the newest N dated backups (and their logs), here and at "
                        "rclone and rsync copies; default: keep all")
    p.add_argument("--copy-to", action="append", type=destination, metavar="METHOD:TARGET",
                   help="after a verified backup, copy it to rclone:REMOTE:PATH, "
                        "rsync:[USER@HOST:]PATH or scp:USER@HOST:PATH, under a folder "
                        "named after this host; repeatable")
    p.add_argument("--notify-url", type=notify_url, metavar="URL",
                   help="after each run, GET URL (URL/fail when the run failed)")
    p.add_argument("--level", type=gzip_level, metavar="0-9",
                   help="gzip compression level (default 6)")
    p.add_argument("--jobs", type=jobs_count, metavar="N",
                   help="compression threads (default: all cores)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be saved, written and stopped; write nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print the settings in force and where each came from")
    return p


class Plan:
    """What a run will write: decided before anything is written."""

    def __init__(self, stem, dated, rolling, log):
        self.stem, self.dated, self.rolling, self.log = stem, dated, rolling, log

    @property
    def targets(self):
        return [path for path in (self.dated, self.rolling) if path]


def plan_backup(backup_kind, now, backups, exists):
    """Names of the archive(s) and log; a second run in a minute gets -2, -3..."""
    stem = iotstack.first_free_stem(
        "backup_" + iotstack.archive_stamp(now),
        lambda s: exists(iotstack.dated_archive_path(backups, s)) or exists(iotstack.log_path(backups, s)))
    dated = iotstack.dated_archive_path(backups, stem) if backup_kind in (1, 3) else None
    rolling = iotstack.rolling_archive_path(backups, now) if backup_kind in (2, 3) else None
    return Plan(stem, dated, rolling, iotstack.log_path(backups, stem))


def relative(stack, path):
    return "./" + os.path.relpath(path, stack)


def ask(prompt, default):
    try:
        return input(prompt).strip() or default
    except EOFError:
        return default


def remove_stale_partials(backups, log):
    """Temporary files left by a run that was killed: we hold the lock, so
    no live run owns them."""
    for folder in ("backup", "rolling"):
        path = os.path.join(backups, folder)
        for name in sorted(os.listdir(path)):
            if iotstack.is_partial_name(name):
                os.unlink(os.path.join(path, name))
                log.line("Removed an unfinished archive from an interrupted run: %s/%s"
                         % (folder, name))


def give_second_name(source, final, owner):
    """The TYPE 3 rolling copy: a hard link when possible, else a copy."""
    temp = iotstack.partial_path(final)
    try:
        os.link(source, temp)
        return temp
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    with open(source, "rb") as src, open(temp, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.chmod(temp, iotstack.ARCHIVE_MODE)
    iotstack.chown_to(temp, owner)
    return temp


def make_backup(stack, plan, items, args, owner, log, result, segments=()):
    """Write, verify and name the archive(s).  On any failure no final name
    changes and the temporary files are gone.  segments: the parts read
    with services stopped (archive_writer.iter_segments)."""
    temps = []
    try:
        bar = progress.NoProgress()
        if sys.stderr.isatty():
            total, files = archive_writer.tree_totals(stack, items, args.exclude)
            bar = progress.TerminalProgress(total, files, label="Backing up: ")
        stats = archive_writer.ArchiveStats()
        result["stats"] = stats
        first = plan.targets[0]
        temps.append(iotstack.partial_path(first))
        try:
            result["size"] = write_archive(stack, items, args, owner, temps[0], bar, stats,
                                           segments)
        except tarformat.ArchiveError as e:
            log.field("Verified", "FAILED: %s" % e)
            raise run.UserError("verification of the new archive failed: %s" % e) from None
        bar.finish()
        iotstack.fsync_dir(os.path.dirname(first))
        if args.no_verify:
            log.field("Verified", "skipped (--no-verify)")
        else:
            log.field("Verified", "OK (read back from disk: gzip CRC, %d tar headers)"
                      % stats.members)
            result["verified"] = True
        for final in plan.targets[1:]:
            temps.append(give_second_name(temps[0], final, owner))
        for temp, final in zip(temps, plan.targets):
            if final == plan.rolling:
                result["rolling_overwritten"] = os.path.exists(final)
            os.rename(temp, final)
            iotstack.fsync_dir(os.path.dirname(final))
        temps = []
        result["published"] = True
    finally:
        for temp in temps:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass


def dry_run(stack, args):
    backups = os.path.join(stack, "backups")
    plan = plan_backup(args.type, iotstack.now_local(), backups, os.path.exists)
    items, missing = iotstack.manifest_items(lambda rel: os.path.lexists(os.path.join(stack, rel)))
    out = sys.stdout
    out.write("IOTstack directory: %s\n" % stack)
    for target in plan.targets:
        note = " (replacing the existing one)" if os.path.exists(target) else ""
        out.write("Would write: %s%s\n" % (relative(stack, target), note))
    out.write("Log: %s\n" % relative(stack, plan.log))
    if args.stop == "none":
        out.write("Services: left running (--stop none)\n")
    else:
        log = iotstack.RunLog()
        control = stack_window.open_control(stack, log)
        if control is not None:
            windows = service_groups.plan_for(control, stack, items, args.stop, log)
            stopped = sorted({s for w in windows for s in w.services})
            out.write("Would stop and start again: %s\n" % (", ".join(stopped) or "none"))
        for line in log.lines:
            out.write(line + "\n")
    for item in missing:
        out.write("Missing: ./%s (noted in the log, not an error)\n" % item)
    out.write("Items backed up:\n")
    for item in items:
        out.write("  ./%s\n" % item)
    excluded, notes = [], []
    count = size = 0
    for entry in archive_writer.iter_entries(stack, items, args.exclude, excluded, notes):
        count += 1
        if stat.S_ISREG(entry.st.st_mode):
            size += entry.st.st_size
    out.write("Entries: %d, %s of file data\n" % (count, progress.human_size(size)))
    if excluded:
        out.write("Items Excluded:\n")
        for rel in excluded:
            out.write("  ./%s\n" % rel)
    for note in notes:
        out.write("Note: %s\n" % note)
    folder = os.path.join(backups, "backup")
    if args.keep and os.path.isdir(folder):
        for name in iotstack.dated_backups_to_remove(os.listdir(folder), args.keep - 1):
            out.write("Would remove (--keep %d): backup/%s\n" % (args.keep, name))
    for dest in args.copy_to:
        out.write("Would copy to: %s under %s/\n" % (dest, iotstack.host_folder()))
    out.write("Dry run: nothing was written.\n")
    return run.EXIT_OK


def run_backup(stack, args, owner, owner_how, outcome):
    started = time.monotonic()
    backups = os.path.join(stack, "backups")
    with iotstack.stack_lock(stack, owner):
        for folder in ("", "backup", "rolling", "logs"):
            iotstack.ensure_dir(os.path.join(backups, folder), owner)
        if os.path.lexists(os.path.join(stack, iotstack.JOURNAL_NAME)):
            raise run.UserError("an interrupted restore is pending; run restore.py --recover "
                                "before backing up")
        now = iotstack.now_local()
        plan = plan_backup(args.type, now, backups, os.path.exists)
        log = iotstack.RunLog(plan.log)
        iotstack.chown_to(plan.log, owner)
        try:
            try:
                code = backup_with_log(stack, args, owner, owner_how, plan, log, now, started)
            except BaseException:
                notify_once(args, outcome, ok=False, log=log)
                raise
            notify_once(args, outcome, ok=code in (run.EXIT_OK, run.EXIT_WARNINGS), log=log)
            return code
        finally:
            log.close()


def backup_with_log(stack, args, owner, owner_how, plan, log, now, started):
    result = {}
    log.field("Started At", now.isoformat(timespec="seconds"))
    log.field("Current Directory", stack)
    log.field("Backup Type", args.type)
    if owner is not None:
        log.field("Backup Owner", "%s (%s)" % (owner.name, owner_how))
    elif args.user:
        log.line("USER %s ignored: not running as root" % args.user)
    if plan.dated:
        log.field("Backup File", relative(stack, plan.dated))
    if plan.rolling:
        log.field("Rolling File", relative(stack, plan.rolling))
    remove_stale_partials(os.path.join(stack, "backups"), log)
    docker_compose.restart_left_stopped(stack, log, sys.stdout)
    items, missing = iotstack.manifest_items(lambda rel: os.path.lexists(os.path.join(stack, rel)))
    for item in missing:
        log.line("Note: ./%s is missing; backing up the rest" % item)

    status = iotstack.run_hook(stack, "pre_backup.sh", log)
    if status:
        raise run.UserError("pre_backup.sh failed with status %d; nothing was stopped or "
                            "written (see %s)" % (status, relative(stack, plan.log)))
    report = {}
    control = None
    if args.stop == "none":
        log.line("Services: left running (--stop none)")
    else:
        control = stack_window.open_control(stack, log)
    error = None
    try:
        with service_groups.StopWindows(control, log, report) as windows:
            plan_windows = service_groups.plan_for(control, stack, items, args.stop, log)
            make_backup(stack, plan, items, args, owner, log, result,
                        windows.segments(plan_windows))
    except OSError as e:
        if iotstack.is_disk_full(e):
            error = run.UserError("disk full while writing the backup; earlier backups are "
                                  "untouched (%s)" % e.strerror)
        else:
            error = run.UserError("backup failed: %s" % e)
    except run.UserError as e:
        error = e
    except (run.Interrupted, KeyboardInterrupt) as e:
        log.line("Interrupted (%s): no new archive was written" % (e or "Ctrl-C"))
        finish_log(stack, log, plan, items, result, report, started)
        raise

    if error is None:
        status = iotstack.run_hook(stack, "post_backup.sh", log)
        if status:
            error = run.UserError("post_backup.sh failed with status %d (the backup itself is "
                                  "complete)" % status)
    if result.get("published"):
        # Only a complete, verified archive makes older ones expendable.
        remove_old_backups(os.path.join(stack, "backups"), plan, args.keep, log)
        failures = copy_offsite(os.path.join(stack, "backups"), plan, args, log)
        if failures and error is None:
            error = run.UserError("%s; the local backup is kept" % "; ".join(failures))
    finish_log(stack, log, plan, items, result, report, started)
    if error is not None:
        log.line("ERROR: %s" % error)
        if report.get("restart_error"):
            run.say_error(PROG, "services could not be started again: %s"
                          % report["restart_error"])
        raise error
    if report.get("restart_error"):
        raise run.UserError("backup complete, but services could not be started again: %s"
                            % report["restart_error"])
    print_summary(stack, plan, result, report)
    warnings = result["stats"].warnings + report.get("warnings", [])
    return run.EXIT_WARNINGS if warnings else run.EXIT_OK


def remove_old_backups(backups, plan, keep, log):
    folder = os.path.join(backups, "backup")
    just_written = os.path.basename(plan.dated) if plan.dated else None
    for name in iotstack.dated_backups_to_remove(os.listdir(folder), keep, just_written):
        os.unlink(os.path.join(folder, name))
        old_log = iotstack.log_path(backups, name[:-len(".tar.gz")])
        if os.path.exists(old_log):
            os.unlink(old_log)
        log.line("Removed old backup (--keep %d): backup/%s" % (keep, name))


def copy_offsite(backups, plan, args, log):
    """Copy the new archive(s) to every destination; a list of failures."""
    if not args.copy_to:
        return []
    from . import offsite
    host = iotstack.host_folder()
    failures = []
    for dest in args.copy_to:
        try:
            for path in plan.targets:
                rel = os.path.relpath(path, backups)
                checked = offsite.upload(dest, path, rel, host)
                log.line("Copied %s to %s under %s/ (%s)" % (rel, dest, host, checked))
            if args.keep and dest.method in ("rclone", "rsync"):
                names = [rel.split("/", 1)[1] for rel, _size, _mtime
                         in offsite.list_backups(dest, host) if rel.startswith("backup/")]
                just_written = os.path.basename(plan.dated) if plan.dated else None
                doomed = iotstack.dated_backups_to_remove(names, args.keep, just_written)
                if doomed:
                    offsite.delete(dest, host, ["backup/" + name for name in doomed])
                    for name in doomed:
                        log.line("Removed old backup at %s (--keep %d): backup/%s"
                                 % (dest, args.keep, name))
        except offsite.CopyError as e:
            failures.append("copy to %s failed: %s" % (dest, e))
            log.line("ERROR: copy to %s failed: %s" % (dest, e))
    return failures


def finish_log(stack, log, plan, items, result, report, started):
    stats = result.get("stats")
    if "rolling_overwritten" in result:
        log.field("Rolling Overwritten", result["rolling_overwritten"])
    if "size" in result:
        log.field("Backup Size (bytes)", result["size"])
    if stats is not None:
        log.field("Members", stats.members)
        log.field("Data Size (bytes)", stats.bytes)
    log.field("Services Stopped", ", ".join(report.get("stopped", [])) or "none")
    log.field("Services Started", ", ".join(report.get("started", [])) or "none")
    longest = service_groups.longest_outage(report.get("outages"))
    if longest:
        log.field("Longest Outage (s)", "%.1f (%s)" % (longest[1], ", ".join(longest[0])))
    log.field("Duration (s)", "%.1f" % (time.monotonic() - started))
    log.field("Finished At", iotstack.now_local().isoformat(timespec="seconds"))
    log.line("Items backed up:")
    for item in items:
        log.line("./%s" % item)
    log.line("Items Excluded:")
    for rel in (stats.excluded if stats else []):
        log.line("./%s" % rel)
    for note in (stats.notes if stats else []):
        log.line("Note: %s" % note)
    for warning in (stats.warnings if stats else []) + report.get("warnings", []):
        log.line("Warning: %s" % warning)


def print_summary(stack, plan, result, report):
    stats = result["stats"]
    verified = "verified" if result.get("verified") else "not verified"
    lines = ["Backup complete: %s (%s, %d items, %s)" % (
        relative(stack, plan.targets[0]), progress.human_size(result["size"]), stats.members, verified)]
    if plan.dated and plan.rolling:
        lines.append("Rolling copy: %s" % relative(stack, plan.rolling))
    if report.get("stopped"):
        lines.append("Services stopped and started again: %s" % ", ".join(report["stopped"]))
    longest = service_groups.longest_outage(report.get("outages"))
    if longest:
        lines.append("Longest outage: %.1f s (%s)" % (longest[1], ", ".join(longest[0])))
    for warning in stats.warnings + report.get("warnings", []):
        lines.append("Warning: %s" % warning)
    lines.append("Log: %s" % relative(stack, plan.log))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    return run.run_command(PROG, build_parser(), backup_command, argv,
                           "no new backup was written")


def backup_command(args):
    outcome = {}
    stack = iotstack.locate_stack(args.dir)
    sources = load_settings(stack, args)
    if args.print_config:
        print_config(args, sources, sys.stdout)
        return run.EXIT_OK
    if args.dry_run:
        return dry_run(stack, args)
    try:
        owner, how = iotstack.choose_owner(args.user, stack, ask)
        with run.signals_raise():
            code = run_backup(stack, args, owner, how, outcome)
    except BaseException:
        notify_once(args, outcome, ok=False)
        raise
    notify_once(args, outcome, ok=code in (run.EXIT_OK, run.EXIT_WARNINGS))
    return code


def notify_once(args, outcome, ok, log=None):
    """GET the notify URL (URL/fail on failure); a failure here is logged,
    never fatal.  Done inside the run when its log is open, else here."""
    if not getattr(args, "notify_url", None) or outcome.get("notified"):
        return
    outcome["notified"] = True
    url = args.notify_url if ok else args.notify_url.rstrip("/") + "/fail"
    # Imported here: it takes longer to import than a small backup takes to
    # start, and most runs notify nobody.
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            message = "Notified %s: HTTP %d" % (url, response.status)
    except (OSError, ValueError) as e:
        message = "Warning: notification to %s failed: %s" % (url, e)
        if log is None:
            sys.stderr.write("%s: %s\n" % (PROG, message))
    if log is not None:
        log.line(message)


if __name__ == "__main__":
    raise SystemExit(main())
