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
import collections
import contextlib
import errno
import os
import shutil
import stat
import sys
import time

from . import (
    archive_writer,
    docker_compose,
    failure_report,
    incomplete,
    iotstack,
    journal,
    menu,
    progress,
    run,
    schedule,
    service_groups,
    tarformat,
)
from . import good_backups
from .archive_writer import write_archive
from .settings import (
    backup_type,
    destination,
    gzip_level,
    jobs_count,
    keep_count,
    load_settings,
    mqtt_url,
    notify_url,
    print_config,
    recipient,
    stop_mode,
)

PROG = "backup.py"


EXIT_CODES = {
    run.EXIT_OK: "backup written and verified",
    run.EXIT_FAILED: "failed: no new backup (see the message and the log); also when the\n"
                     "backup was written but the stopped services could not be started\n"
                     "again, or a copy (--copy-to) failed",
    run.EXIT_USAGE: "bad arguments or unknown user",
    run.EXIT_WARNINGS: "backup written and verified, with warnings (unreadable files, files\n"
                       "that changed while read, services that could not be stopped)",
    run.EXIT_BUSY: "another backup or restore of this stack is running",
    run.EXIT_SIGHUP: "interrupted by SIGHUP (terminal closed): no new backup, services started\n"
                     "again",
    run.EXIT_SIGINT: "interrupted by Ctrl-C: no new backup, services started again",
    run.EXIT_SIGTERM: "interrupted by SIGTERM: no new backup, services started again",
}


EPILOG = run.exit_code_help(EXIT_CODES) + """
backups go to backups/backup/ (TYPE 1 and 3) and backups/rolling/ (TYPE 2
and 3), logs to backups/logs/.
"""


class BadArguments(run.UserError):
    """argparse's error, raised instead of exiting, so that a bad argument
    from cron is reported like any failure (failure_report)."""

    def __init__(self, message):
        super().__init__(message, run.EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        raise BadArguments(message)


def build_parser():
    p = ArgumentParser(
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
                   help="each (default): read each group of services that share data "
                        "while it runs, then stop it only to check that data (reading again "
                        "what changed); all: stop every running service together for that "
                        "check; none: leave the stack running")
    p.add_argument("--no-stop", dest="stop", action="store_const", const="none",
                   help="the same as --stop none (for pre_backup.sh that dumps databases)")
    p.set_defaults(no_stop=None)  # backup.ini's no-stop; the command line sets stop
    p.add_argument("--no-verify", action="store_true", default=None,
                   help="skip reading the archive back after writing it")
    p.add_argument("--keep", type=keep_count, metavar="N",
                   help="keep the newest N dated backups (and their logs), here and at "
                        "rclone and rsync copies; default: keep all")
    for unit in ("daily", "weekly", "monthly"):
        p.add_argument("--keep-" + unit, type=keep_count, metavar="N",
                       help="also keep the newest backup of each of the last N %s that "
                            "have backups (restic's rule), here and at rclone and rsync copies"
                            % {"daily": "days", "weekly": "ISO weeks", "monthly": "months"}[unit])
    p.add_argument("--accept-smaller", action="store_true",
                   help="the data shrank on purpose (a volume deleted, a new --exclude): take "
                        "this backup as good even though it is much smaller than the last good "
                        "one or lacks services/ or volumes/, so later runs compare with it "
                        "(command line only: say it once)")
    p.add_argument("--copy-to", action="append", type=destination, metavar="METHOD:TARGET",
                   help="after a verified backup, copy it to rclone:REMOTE:PATH, "
                        "rsync:[USER@HOST:]PATH or scp:USER@HOST:PATH, under a folder "
                        "named after this host; repeatable")
    p.add_argument("--encrypt-to", action="append", type=recipient, metavar="RECIPIENT",
                   help="encrypt every --copy-to copy with gpg to this public key (key id, "
                        "fingerprint or e-mail; repeatable); the copy's name ends in .gpg, "
                        "the local archive stays plain")
    p.add_argument("--notify-url", type=notify_url, metavar="URL",
                   help="after each run, GET URL (URL/fail when the run failed)")
    p.add_argument("--notify-mqtt", type=mqtt_url, metavar="URL",
                   help="mqtt://[USER:PASS@]HOST[:PORT]/TOPIC: after each run, publish a "
                        "retained JSON report (ok, warning, failed) to TOPIC, with Home "
                        "Assistant discovery configs")
    p.add_argument("--no-mqtt-discovery", action="store_true", default=None,
                   help="with --notify-mqtt: publish the report only, no Home Assistant configs")
    p.add_argument("--level", type=gzip_level, metavar="0-9",
                   help="gzip compression level (default 6)")
    p.add_argument("--jobs", type=jobs_count, metavar="N",
                   help="compression threads (default: all cores)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be saved, written and stopped; write nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print the settings in force and where each came from")
    p.add_argument("--install-menu", action="store_true",
                   help="make IOTstack's scripts/backup.sh and scripts/restore.sh (its menu) "
                        "run backup.py and restore.py")
    p.add_argument("--uninstall-menu", action="store_true",
                   help="put IOTstack's own scripts/backup.sh and scripts/restore.sh back")
    p.add_argument("--install-cron", nargs="?", const=schedule.DEFAULT_SCHEDULE,
                   type=schedule.parse_schedule, metavar="SCHEDULE",
                   help="add (or replace) the backup line in your crontab (root's with "
                        "sudo); SCHEDULE in quotes, default \"0 2 * * *\" (daily at 02:00)")
    p.add_argument("--uninstall-cron", action="store_true",
                   help="remove that line from the crontab")
    return p


class Plan:
    """What a run will write: decided before anything is written."""

    def __init__(self, stem, dated, rolling, log):
        self.stem, self.dated, self.rolling, self.log = stem, dated, rolling, log
        # The size guard, asked before the archive gets its names: a
        # function of its size giving a good_backups.Verdict.
        self.judge = None

    @property
    def targets(self):
        return [path for path in (self.dated, self.rolling) if path]

    def name_incomplete(self):
        """An archive that lacks what could not be read is written as
        NAME.incomplete.tar.gz: it never replaces a complete one."""
        self.dated = self.dated and iotstack.incomplete_path(self.dated)
        self.rolling = self.rolling and iotstack.incomplete_path(self.rolling)


def plan_backup(backup_kind, now, backups, exists):
    """Names of the archive(s) and log; a second run in a minute gets -2, -3..."""
    stem = iotstack.first_free_stem(
        "backup_" + iotstack.archive_stamp(now),
        lambda s: any(exists(path) for path in (
            iotstack.dated_archive_path(backups, s),
            iotstack.incomplete_path(iotstack.dated_archive_path(backups, s)),
            iotstack.log_path(backups, s))))
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
    no live run owns them (the good-backup record's too)."""
    for name in sorted(os.listdir(backups)):
        if good_backups.is_temporary_name(name):
            os.unlink(os.path.join(backups, name))
            log.line("Removed an unfinished record from an interrupted run: %s" % name)
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
        os.chmod(temp, iotstack.ARCHIVE_MODE)
        iotstack.chown_to(temp, owner)
        os.fsync(dst.fileno())  # after the mode and owner: all of it durable
    return temp


class Written(collections.namedtuple("Written",
                                     "size verified rolling_overwritten names verdict unread")):
    """A backup that has its final name(s): its size, whether it was read
    back, whether it replaced an older rolling archive, the paths it got
    (the first is the archive; a rolling name withheld by the guard is not
    among them), the size guard's good_backups.Verdict, and the counts of
    what it lacks (incomplete.py; all zero for a complete one)."""

    @property
    def complete(self):
        return not incomplete.total(self.unread)


def is_complete(stats) -> bool:
    """Whether the archive holds every file of the items (the good-backup
    record's `complete`): nothing it could not read, nothing that vanished
    or changed while read (incomplete.py)."""
    return not incomplete.total(stats.incomplete_counts)


def relative_to_backups(path):
    return "/".join(path.split(os.sep)[-2:])


def final_targets(plan, verdict, complete, exists):
    """The paths the new archive gets.  A backup the guard tripped on (or
    an incomplete one) never replaces an existing rolling archive: it keeps
    its dated name, or with TYPE 2 gets the dated name instead."""
    if plan.rolling is None or not good_backups.withhold_rolling(verdict, complete,
                                                                 exists(plan.rolling)):
        return plan.targets
    return [plan.dated or iotstack.dated_archive_path(os.path.dirname(os.path.dirname(
        plan.rolling)), plan.stem)]


def make_backup(stack, plan, items, args, owner, log, stats, segments=()):
    """Write, verify and name the archive(s); returns Written.  On any
    failure no final name changes and the temporary files are gone.  stats
    collects what the walk met; segments: the parts read with services
    stopped (archive_writer.write_tar)."""
    temps = []
    bar = progress.NoProgress()
    try:
        if sys.stderr.isatty():
            total, files = archive_writer.tree_totals(stack, items, args.exclude)
            bar = progress.TerminalProgress(total, files, label="Backing up: ")
        first = plan.targets[0]
        temps.append(iotstack.partial_path(first))
        try:
            size = write_archive(stack, items, args, owner, temps[0], bar, stats, segments)
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
        unread = stats.incomplete_counts
        if incomplete.total(unread):
            plan.name_incomplete()  # NAME.incomplete.tar.gz: never a complete one's name
            for path in plan.targets:
                log.field("Incomplete, written as", relative(stack, path))
        own = plan.targets[0]  # the name the temporary file was written for
        verdict = plan.judge(size) if plan.judge else good_backups.Verdict(good_backups.FIRST)
        # An incomplete archive's rolling name is already one of its own.
        targets = final_targets(plan, verdict, True, os.path.exists)
        if targets != plan.targets:
            log.line("Rolling File: %s not replaced: this backup %s, and the archive of that "
                     "name may be the good one; this one is %s" % (
                         relative_to_backups(plan.rolling),
                         "did not pass the size guard" if not verdict.passed else "is incomplete",
                         relative_to_backups(targets[0])))
        pairs = []
        for final in targets:
            if final != own:  # a second name, or TYPE 2's dated name in backup/
                temps.append(give_second_name(temps[0], final, owner))
            pairs.append((temps[0] if final == own else temps[-1], final))
        rolling_overwritten = None
        for temp, final in pairs:
            if final == plan.rolling:
                rolling_overwritten = os.path.exists(final)
            os.rename(temp, final)
            temps.remove(temp)
            iotstack.fsync_dir(os.path.dirname(final))
        if plan.rolling in targets and not incomplete.total(unread):
            drop_superseded(plan.rolling, log)
        return Written(size, not args.no_verify, rolling_overwritten, targets, verdict, unread)
    finally:
        bar.stop()
        for temp in temps:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass


def drop_superseded(rolling, log):
    """A complete rolling archive supersedes the incomplete one of its
    weekday (kept beside the complete one of the week before)."""
    stale = iotstack.incomplete_path(rolling)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stale)
        log.line("Removed %s: this complete backup replaces it"
                 % os.path.join("rolling", os.path.basename(stale)))


def planned_stops(stack, args, items):
    """What a run would stop, and when, as lines for --dry-run."""
    if args.stop == "none":
        return ["Services: left running (--stop none)"]
    log = iotstack.RunLog()
    window = docker_compose.ServiceWindow(stack, log)
    if window.unavailable:
        return ["Would not stop services: %s" % window.unavailable]
    windows = service_groups.plan_for(window, stack, items, args.stop, log)
    stopped = sorted({service for group in windows for service in group.services})
    lines = ["Would stop and start again: %s" % (", ".join(stopped) or "none")]
    lines += ["  %s while reading %s" % (", ".join(group.services), ", ".join(group.roots))
              for group in windows]
    if window.left_alone:
        lines.append("Would leave alone: %s" % docker_compose.describe(window.left_alone))
    return lines


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
    for line in planned_stops(stack, args, items):
        out.write(line + "\n")
    guard_warnings = dry_run_guard(backups, stack, out)
    out.write("Items backed up:\n")
    for item in items:
        out.write("  ./%s\n" % item)
    excluded, notes, warnings = [], [], []
    count = size = 0
    for entry in archive_writer.iter_entries(stack, items, args.exclude, excluded, notes,
                                             warnings):
        count += 1
        if stat.S_ISREG(entry.st.st_mode):
            size += entry.st.st_size
            # Checked as the real run would find it, opening nothing.
            if not archive_writer.can_read(os.path.join(stack, entry.rel), entry.st):
                warnings.append(archive_writer.walk_warning(entry.rel, PermissionError(
                    errno.EACCES, os.strerror(errno.EACCES))))
    out.write("Entries: %d, %s of file data\n" % (count, progress.human_size(size)))
    if excluded:
        out.write("Items Excluded:\n")
        for rel in excluded:
            out.write("  ./%s\n" % rel)
    for note in notes:
        out.write("Note: %s\n" % note)
    lacked = incomplete.counts_of(incomplete.entries_of(warnings + notes))
    if incomplete.total(lacked):
        warnings.append("this backup would be %s: it would be named NAME.incomplete.tar.gz; "
                        "%s" % (incomplete.describe(lacked), RUN_AS_ROOT))
    for warning in warnings:
        out.write("Warning: %s\n" % warning)
    folder = os.path.join(backups, "backup")
    policy = iotstack.retention_policy(args)
    if policy and guard_warnings:
        out.write("Would remove no old backup: the size guard is tripped\n")
    elif policy and os.path.isdir(folder):
        just_written = os.path.basename(plan.dated) if plan.dated else None
        for name in iotstack.dated_backups_to_remove(os.listdir(folder), just_written=just_written,
                                                     **policy):
            out.write("Would remove (%s): backup/%s\n" % (iotstack.describe_policy(policy), name))
    for dest in args.copy_to:
        out.write("Would copy to: %s under %s/%s\n" % (
            dest, iotstack.host_folder(), " (encrypted with gpg to %s)" % ", ".join(args.encrypt_to)
            if args.encrypt_to else ""))
    out.write("Dry run: nothing was written.\n")
    return run.EXIT_WARNINGS if warnings or guard_warnings else run.EXIT_OK


def dry_run_guard(backups, stack, out):
    """What the size guard will say of services/ and volumes/ (their size
    is known only once written); the warnings."""
    entries, _problem = good_backups.load_record(backups)
    reference = good_backups.last_good_backup(entries)
    if reference is None:
        reference = good_backups.adopted(iotstack.newest_archive(backups), "")
    warnings, notes = good_backups.judge_items(good_backups.item_states(stack), reference)
    for note in notes:
        out.write("Note: %s\n" % note)
    for warning in warnings:
        out.write("Warning: %s\n" % warning)
    return warnings


class Facts:
    """What a run has found so far, for the log's end, the summary and the
    reports (--notify-url, --notify-mqtt), which must be told however the
    run ends.  Steps return what they find; only the orchestration
    functions below record it here."""

    def __init__(self, started):
        self.started = started
        self.plan = None
        self.stats = None
        self.written = None
        self.window = None
        self.stack_warnings = []
        self.code = None
        self.notified = False
        self.logged = False  # the run's own log was opened
        self.error = None  # the error of a run reported by failure_report

    @property
    def warnings(self):
        return (self.stats.warnings if self.stats else []) + self.stack_warnings


def run_backup(stack, args, owner, owner_how, facts):
    backups = os.path.join(stack, "backups")
    with iotstack.stack_lock(stack, owner):
        for folder in ("", "backup", "rolling", "logs"):
            iotstack.ensure_dir(os.path.join(backups, folder), owner)
        if os.path.lexists(os.path.join(stack, iotstack.JOURNAL_NAME)):
            raise run.UserError("an interrupted restore is pending and could not be finished "
                                "as this user; run 'sudo python3 restore.py --recover' in %s "
                                "before backing up" % stack)
        now = iotstack.now_local()
        facts.plan = plan_backup(args.type, now, backups, os.path.exists)
        log = iotstack.RunLog(facts.plan.log)
        facts.logged = True
        iotstack.chown_to(facts.plan.log, owner)
        try:
            try:
                code = backup_with_log(stack, args, owner, owner_how, log, now, facts)
            except BaseException:
                notify_once(args, facts, ok=False, log=log)
                raise
            facts.code = code
            notify_once(args, facts, ok=code in (run.EXIT_OK, run.EXIT_WARNINGS), log=log)
            return code
        finally:
            log.close()


def backup_with_log(stack, args, owner, owner_how, log, now, facts):
    plan = facts.plan
    log_header(stack, args, owner, owner_how, plan, log, now)
    remove_stale_partials(os.path.join(stack, "backups"), log)
    leftover = docker_compose.restart_left_stopped(stack, log, sys.stdout)
    items = items_to_save(stack, log)
    guard = SizeGuard(stack, args, log)
    plan.judge = guard.judge
    early = unreadable_warning(stack, items, log)
    if early:
        sys.stdout.write(early + "\n")
        sys.stdout.flush()
    status = iotstack.run_hook(stack, "pre_backup.sh", log)
    if status:
        raise run.UserError("pre_backup.sh failed with status %d; nothing was stopped or "
                            "written (see %s)" % (status, relative(stack, plan.log)))
    facts.window = open_window(stack, args, log)
    facts.stack_warnings = leftover_warnings(leftover) + live_warnings(facts.window)
    facts.stats = archive_writer.ArchiveStats()
    stops = service_groups.StopWindows(facts.window, log)
    error = None
    try:
        facts.written = write_with_services_stopped(stack, plan, items, args, owner, log,
                                                    facts, stops)
    except (OSError, run.UserError) as e:
        error = failure_of(e)
    except (run.Interrupted, KeyboardInterrupt) as e:
        facts.stack_warnings += stops.warnings
        log.line("Interrupted (%s): no new archive was written" % (str(e) or "Ctrl-C"))
        finish_log(stack, log, items, facts)
        raise
    facts.stack_warnings += stops.warnings
    if facts.written is not None and not facts.written.complete:
        facts.stack_warnings.append(incomplete_warning(stack, facts))
    if error is None:
        error = post_backup_error(stack, log)
    if facts.written is not None:
        facts.stack_warnings += guard.record(facts.written, owner, is_complete(facts.stats))
        copy_error = keep_and_copy(stack, plan, args, log, facts)
        error = error or copy_error
    facts.stack_warnings += missing_warnings(facts.window)
    finish_log(stack, log, items, facts)
    return conclude(stack, log, facts, error)


def log_header(stack, args, owner, owner_how, plan, log, now):
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


def items_to_save(stack, log):
    """The manifest items present (a missing services/ or volumes/ is for
    the size guard to judge: a note, or a warning)."""
    return iotstack.manifest_items(lambda rel: os.path.lexists(os.path.join(stack, rel)))[0]


class SizeGuard:
    """The size guard of one run (good_backups): the live state of
    services/ and volumes/ and the last good backup, read before anything
    is written; judge(size) before the archive is named; record() after."""

    def __init__(self, stack, args, log):
        self.backups = os.path.join(stack, "backups")
        self.accept = bool(getattr(args, "accept_smaller", False))
        self.states = good_backups.item_states(stack)
        self.entries, problem = good_backups.load_record(self.backups)
        if problem:
            log.line("Note: %s" % problem)
        self.reference = good_backups.last_good_backup(self.entries)
        if self.reference is None:
            newest = iotstack.newest_archive(self.backups)
            self.reference = good_backups.adopted(newest, "")
            if self.reference is not None:
                self.entries = self.entries + [self.reference]
                log.line("Size guard: no good backup recorded yet; comparing with the newest "
                         "archive, %s (%d bytes)" % (self.reference.names[0], self.reference.size))
        for note in good_backups.judge_items(self.states, self.reference)[1]:
            log.line("Note: %s" % note)
        self.verdict = None
        self.log = log

    def judge(self, size):
        self.verdict = good_backups.judge(size, self.states, self.reference, self.accept)
        for note in self.verdict.notes:
            if note.startswith("Accepted"):
                self.log.line(note)
        return self.verdict

    def record(self, written, owner, complete):
        """Add the new backup to the record; the warnings of the run."""
        verdict = written.verdict
        entry = good_backups.BackupRecord(
            names=tuple(relative_to_backups(path) for path in written.names),
            size=written.size, finished=iotstack.now_local().isoformat(timespec="seconds"),
            held=good_backups.held_items(self.states), verified=written.verified,
            complete=complete, guard=verdict.guard)
        warnings = list(verdict.warnings)
        try:
            good_backups.record_good_backup(self.backups, self.entries, entry, owner)
        except OSError as e:
            warnings.append("the record of good backups (%s) could not be written: %s; the "
                            "next run compares with an older backup"
                            % (good_backups.RECORD_NAME, run.describe_os_error(e)))
        return warnings


def open_window(stack, args, log):
    """The run's ServiceWindow, or None with --stop none."""
    if args.stop == "none":
        log.line("Services: left running (--stop none)")
        return None
    return docker_compose.ServiceWindow(stack, log)


def write_with_services_stopped(stack, plan, items, args, owner, log, facts, stops):
    """make_backup, each group of services stopped only while its data is
    checked (or read again); all of them running again, whatever happens,
    when this returns."""
    with facts.window or contextlib.nullcontext():
        groups = service_groups.plan_for(facts.window, stack, items, args.stop, log)
        return make_backup(stack, plan, items, args, owner, log, facts.stats,
                           stops.segments(groups))


RUN_AS_ROOT = "for a complete backup run it as root: sudo python3 backup.py"


def unreadable_warning(stack, items, log=None):
    """Told first: a user who cannot read the containers' files makes an
    incomplete backup.  The line (also in the log), or None."""
    first = archive_writer.first_unreadable(stack, items)
    if first is None:
        return None
    line = ("Warning: %s cannot read some of the containers' files (%s, maybe more): this "
            "backup will be incomplete; %s" % (run.user_name(), first, RUN_AS_ROOT))
    if log is not None:
        log.line(line)
    return line


def incomplete_warning(stack, facts):
    """The line that says a backup is not whole, and what follows from it."""
    return ("this backup is %s; it is named %s (it replaces no complete backup and prunes "
            "none), and a restore of it keeps the live copies of what it lacks; run the "
            "backup as root (sudo) for a complete one" % (
                incomplete.describe(facts.written.unread),
                " and ".join(relative(stack, path) for path in facts.written.names)))


def failure_of(error):
    """The UserError a failed write ends the run with."""
    if isinstance(error, run.UserError):
        return error
    if iotstack.is_disk_full(error):
        return run.UserError("disk full while writing the backup; earlier backups are "
                             "untouched (%s)" % error.strerror)
    return run.UserError("backup failed: %s" % run.describe_os_error(error))


def post_backup_error(stack, log):
    status = iotstack.run_hook(stack, "post_backup.sh", log)
    if status:
        return run.UserError("post_backup.sh failed with status %d (the backup itself is "
                             "complete)" % status)
    return None


def keep_and_copy(stack, plan, args, log, facts):
    """Retention and copies, once an archive has its name; the UserError of
    failed copies, or None.  Only a good (complete, passed the size guard),
    verified archive makes older ones expendable, here and at the copies."""
    backups = os.path.join(stack, "backups")
    policy = iotstack.retention_policy(args)
    written = facts.written
    why_not = good_backups.retention_allowed(written.verdict, written.verified,
                                             is_complete(facts.stats))
    if policy and why_not:
        log.line("Retention: no old backup removed, here or at the copies: %s" % why_not)
        policy = None
    remove_old_backups(backups, plan, policy, log)
    failures = copy_offsite(backups, plan, args, log, policy, written)
    if failures:
        return run.UserError("%s; the local backup is kept" % "; ".join(failures))
    return None


def conclude(stack, log, facts, error):
    """The summary and the exit code, or the error to end with."""
    not_started = start_failures(facts.window)
    if error is not None:
        log.line("ERROR: %s" % error)
        if facts.written is not None:  # a failed copy or hook: the backup itself is there
            print_summary(stack, facts, log.lines)
        if not_started:
            run.say_error(PROG, not_started)
        raise error
    if not_started:
        raise run.UserError("backup complete, but %s" % not_started)
    print_summary(stack, facts, log.lines)
    return run.EXIT_WARNINGS if facts.warnings else run.EXIT_OK


def live_warnings(window):
    """When docker does not answer, the backup is taken with the services
    running: a warning that says why."""
    if window is None or not window.unavailable:
        return []
    return ["services were not stopped (the backup was taken live): %s" % window.unavailable]


def leftover_warnings(leftover):
    """What an interrupted run left stopped and could not be started now."""
    if leftover is None:
        return []
    return ["%s, stopped by an interrupted run, is still stopped: %s" % failure
            for failure in leftover.failed]


def missing_warnings(window):
    """Services gone from the compose file, and starts compose could not do."""
    if window is None:
        return []
    return ["%s %s" % pair for pair in window.missing] + list(window.start_notes)


def start_failures(window):
    """The one line for services that could not be started again, with the
    command that starts each once its cause is fixed, or ""."""
    if window is None or not window.failed:
        return ""
    return "could not start again: %s" % docker_compose.describe_failed(window)


def remove_old_backups(backups, plan, policy, log):
    if not policy:
        return
    folder = os.path.join(backups, "backup")
    just_written = os.path.basename(plan.dated) if plan.dated else None
    for name in iotstack.dated_backups_to_remove(os.listdir(folder), just_written=just_written,
                                                 **policy):
        os.unlink(os.path.join(folder, name))
        old_log = iotstack.log_path(backups, iotstack.dated_backup(name)[0])
        if os.path.exists(old_log):
            os.unlink(old_log)
        log.line("Removed old backup (%s): backup/%s" % (iotstack.describe_policy(policy), name))


def copy_names(backups, plan, written):
    """(local path, name at the destination) of each copy: the archive's
    names; a backup the guard tripped on replaces no rolling copy there
    either, and goes under its dated name."""
    sources = []
    for path in written.names:
        rel = os.path.relpath(path, backups).replace(os.sep, "/")
        if rel.startswith("rolling/") and not written.verdict.passed:
            rel = "backup/%s.tar.gz" % plan.stem
        if rel not in [r for _p, r in sources]:
            sources.append((path, rel))
    return sources


def copy_offsite(backups, plan, args, log, policy, written):
    """Copy the new archive's names to every destination, then apply the
    retention policy there; a list of failures."""
    if not args.copy_to:
        return []
    from . import encryption, offsite
    host = iotstack.host_folder()
    failures = []
    names = written.names
    sources = copy_names(backups, plan, written)
    encrypted = None
    if args.encrypt_to:
        # One ciphertext for every name and destination, under a partial
        # name beside the archive (a killed run's is removed by the next).
        encrypted = iotstack.partial_path(names[0] + encryption.SUFFIX)
        try:
            encryption.encrypt(args.encrypt_to, names[0], encrypted)
        except encryption.EncryptionError as e:
            log.line("ERROR: %s; nothing was copied" % e)
            return ["%s; nothing was copied" % e]
        log.line("Encrypted with gpg to %s: the copies are .gpg" % ", ".join(args.encrypt_to))
        sources = [(encrypted, rel + encryption.SUFFIX) for _path, rel in sources]
    try:
        for dest in args.copy_to:
            try:
                for path, rel in sources:
                    checked = offsite.upload(dest, path, rel, host)
                    log.line("Copied %s to %s under %s/ (%s)" % (rel, dest, host, checked))
                remove_other_rolling_copies(dest, host, [rel for _path, rel in sources], log)
                if policy and dest.method in ("rclone", "rsync"):
                    names = [rel.split("/", 1)[1] for rel, _size, _mtime
                             in offsite.list_backups(dest, host) if rel.startswith("backup/")]
                    just_written = os.path.basename(plan.dated) if plan.dated else None
                    doomed = iotstack.dated_backups_to_remove(names, just_written=just_written,
                                                              **policy)
                    if doomed:
                        offsite.delete(dest, host, ["backup/" + name for name in doomed])
                        for name in doomed:
                            log.line("Removed old backup at %s (%s): backup/%s"
                                     % (dest, iotstack.describe_policy(policy), name))
            except offsite.CopyError as e:
                failures.append("copy to %s failed: %s" % (dest, e))
                log.line("ERROR: copy to %s failed: %s" % (dest, e))
    finally:
        if encrypted is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(encrypted)
    return failures


def other_rolling_copies(uploaded):
    """The names a rolling copy just uploaded makes stale at its
    destination: the same weekday in the other form (the plain copy left
    from before --encrypt-to, or the .gpg one from before it was dropped),
    which restore --from could otherwise take."""
    from .encryption import SUFFIX
    return [rel[:-len(SUFFIX)] if rel.endswith(SUFFIX) else rel + SUFFIX
            for rel in uploaded if rel.startswith("rolling/")]


def remove_other_rolling_copies(dest, host, uploaded, log):
    from . import offsite
    stale = other_rolling_copies(uploaded)
    present = offsite.find(dest, host, stale) if stale else {}
    if present:
        offsite.delete(dest, host, list(present))
        for rel in present:
            log.line("Removed the older copy %s at %s: this run's copy of that weekday "
                     "replaces it" % (rel, dest))


def finish_log(stack, log, items, facts):
    stats, written, window = facts.stats, facts.written, facts.window
    if written is not None and written.rolling_overwritten is not None:
        log.field("Rolling Overwritten", written.rolling_overwritten)
    if written is not None:
        log.field("Backup Size (bytes)", written.size)
        log.field("Incomplete", "%d (%s)" % (incomplete.total(written.unread), incomplete.describe(
            written.unread) + "; listed in the archive's " + incomplete.MEMBER
            if not written.complete else "complete: every entry was read"))
    if stats is not None:
        log.field("Members", stats.members)
        log.field("Data Size (bytes)", stats.bytes)
    docker_compose.log_fields(log, window)
    longest = service_groups.longest_outage(window.downtime() if window else {})
    if longest:
        log.field("Longest Outage (s)", "%.1f (%s)" % (longest[1], longest[0]))
    log.field("Duration (s)", "%.1f" % (time.monotonic() - facts.started))
    log.field("Finished At", iotstack.now_local().isoformat(timespec="seconds"))
    log.line("Items backed up:")
    for item in items:
        log.line("./%s" % item)
    log.line("Items Excluded:")
    for rel in (stats.excluded if stats else []):
        log.line("./%s" % rel)
    for note in (stats.notes if stats else []):
        log.line("Note: %s" % note)
    for warning in facts.warnings:
        log.line("Warning: %s" % warning)


def log_outcomes(log_lines):
    """(copies, pruned): from the log's lines, where each copy went
    ("rsync:/mnt/usb: backup/x.tar.gz") and how many old backups were
    removed, here and at the destinations."""
    copies, pruned = [], 0
    for line in log_lines:
        if line.startswith("Copied ") and " to " in line and " under " in line:
            rel, _, rest = line[len("Copied "):].partition(" to ")
            copies.append("%s: %s" % (rest.split(" under ", 1)[0], rel))
        elif line.startswith("Removed old backup"):
            pruned += 1
    return copies, pruned


def summary_outcome_lines(log_lines):
    """The log's short form of what happened after the archive was named."""
    copies, pruned = log_outcomes(log_lines)
    lines = ["Copied to %s" % copy for copy in copies]
    if pruned:
        lines.append("Old backups removed: %d (see the log)" % pruned)
    return lines


def print_summary(stack, facts, log_lines=()):
    plan, written, window = facts.plan, facts.written, facts.window
    verified = "verified" if written.verified else "not verified"
    state = "complete" if written.complete else "written, " + incomplete.describe(written.unread)
    lines = ["Backup %s: %s (%s, %d items, %s)" % (
        state, relative(stack, written.names[0]), progress.human_size(written.size),
        facts.stats.members, verified)]
    for name in written.names[1:]:
        lines.append("Rolling copy: %s" % relative(stack, name))
    if window is not None and window.started:
        lines.append("Services stopped and started again: %s" % ", ".join(window.started))
        lines.append("Downtime (s): %s" % docker_compose.downtimes(window))
        longest = service_groups.longest_outage(window.downtime())
        lines.append("Longest outage: %.1f s (%s)" % (longest[1], longest[0]))
    if window is not None and window.left_alone:
        lines.append("Services left alone: %s" % docker_compose.describe(window.left_alone))
    lines += summary_outcome_lines(log_lines)
    for warning in facts.warnings:
        lines.append("Warning: %s" % warning)
    lines.append("Log: %s" % relative(stack, plan.log))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    facts = Facts(time.monotonic())
    try:
        code = run.run_command(PROG, build_parser(), lambda args: backup_command(args, facts),
                               argv, "no new backup was written")
    except BadArguments as e:
        run.say_error(PROG, str(e))
        code = e.code
    if code not in (run.EXIT_OK, run.EXIT_WARNINGS) and failure_report.is_backup_run(argv):
        report_failure(argv, facts, code)
    return code


def report_failure(argv, facts, code):
    """A failed backup that has not logged or notified yet (it failed
    before its log was open): a log of its own, or a line saying why
    there is none, and the "failed" notifications that can be read."""
    if facts.logged and facts.notified:
        return
    try:
        stack = failure_report.stack_of(argv)
        log = None
        message = run.last_error() or "exit code %d" % code
        if not facts.logged:
            log, why = failure_report.open_log(stack)
            if log is None:
                if not failure_report.already_said(message, stack):
                    sys.stderr.write("%s: no log was written: %s\n" % (PROG, why))
            else:
                log.field("Started At", iotstack.now_local().isoformat(timespec="seconds"))
                log.field("Current Directory", stack)
                from . import redact
                log.field("Command", " ".join([PROG] + [failure_report.masked(word)
                                                        for word in argv]))
                log.line("ERROR: %s (exit code %d)" % (redact.text(message), code))
        if not facts.notified:
            facts.code, facts.error = code, run.UserError(message, code)
            notify_once(failure_report.notify_settings(argv, failure_report.read_ini(stack)),
                        facts, ok=False, log=log)
        if log is not None:
            log.close()
    except Exception as e:  # noqa: BLE001 - reporting must never hide the failure
        sys.stderr.write("%s: the failure could not be reported: %s\n" % (PROG, e))


def backup_command(args, facts=None):
    facts = facts or Facts(time.monotonic())
    stack = iotstack.locate_stack(args.dir)
    if args.install_menu or args.uninstall_menu or args.install_cron or args.uninstall_cron:
        return set_up(stack, args)
    menu.warn_if_gone(stack)
    sources = load_settings(stack, args)
    if args.print_config:
        print_config(args, sources, sys.stdout, stack)
        return run.EXIT_OK
    if args.encrypt_to:
        from . import encryption
        encryption.check_recipients(args.encrypt_to)  # before anything is stopped or written
    # A real run that cannot recover refuses below, in one line of its own.
    journal.recover_first(stack, sys.stdout, lambda message: args.dry_run and sys.stderr.write(
        "%s: warning: %s\n" % (PROG, message)))
    if args.dry_run:
        return dry_run(stack, args)
    try:
        owner, how = iotstack.choose_owner(args.user, stack, ask)
        with run.signals_raise():
            code = run_backup(stack, args, owner, how, facts)
    except BaseException:
        notify_once(args, facts, ok=False)
        raise
    facts.code = code
    notify_once(args, facts, ok=code in (run.EXIT_OK, run.EXIT_WARNINGS))
    return code


def set_up(stack, args):
    """--install-menu, --uninstall-menu, --install-cron, --uninstall-cron."""
    backup_py = os.path.join(iotstack.INSTALL_DIR, "backup.py")
    if not os.path.isfile(backup_py):
        raise run.UserError("%s is missing: run this from a copy of backup.py" % backup_py)
    if args.install_menu and args.uninstall_menu or args.install_cron and args.uninstall_cron:
        raise run.UserError("install or uninstall, not both", run.EXIT_USAGE)
    if args.install_menu:
        menu.install(stack, iotstack.INSTALL_DIR, menu.PYTHON, sys.stdout)
    if args.uninstall_menu:
        menu.uninstall(stack, sys.stdout)
    if args.install_cron:
        words = [str(args.type)] if args.type else []
        user = schedule.line_user(stack, args.user) if os.geteuid() == 0 else None
        if user:
            iotstack.lookup_owner(user)
            words.append(user)
        schedule.install(stack, args.install_cron, sys.executable, backup_py, words, sys.stdout)
        warn_cron_user(stack, sys.stdout)
    if args.uninstall_cron:
        schedule.uninstall(sys.stdout)
    return run.EXIT_OK


def warn_cron_user(stack, out):
    """--install-cron as a user who cannot read the containers' files: its
    nightly backups would all be incomplete; say so, and the line that
    installs root's instead."""
    items, _missing = iotstack.manifest_items(
        lambda rel: os.path.lexists(os.path.join(stack, rel)))
    first = archive_writer.first_unreadable(stack, items)
    if first is None:
        return
    out.write("Warning: %s cannot read some of the containers' files (%s, maybe more), so "
              "every backup from this crontab will be incomplete. For complete backups use "
              "root's crontab instead:\n  python3 %s --uninstall-cron\n  cd %s && sudo python3 "
              "%s --install-cron\n" % (run.user_name(), first,
                                       os.path.join(iotstack.INSTALL_DIR, "backup.py"), stack,
                                       os.path.join(iotstack.INSTALL_DIR, "backup.py")))


def notify_once(args, facts, ok, log=None):
    """GET the notify URL (URL/fail on failure) and publish the MQTT report;
    a failure here is one "Warning:" line in the log, never fatal and never
    a change of the exit code, whatever goes wrong (a reply that is not
    HTTP, a socket that cannot be created...).  Done inside the run when its
    log is open, else here (the warning on stderr)."""
    url_set, mqtt_set = getattr(args, "notify_url", None), getattr(args, "notify_mqtt", None)
    if not (url_set or mqtt_set) or facts.notified:
        return
    facts.notified = True
    # The run's error, when called while it unwinds (or failure_report's).
    error = sys.exc_info()[1] or facts.error
    messages = []
    if url_set:
        messages.append(notify_url_once(args.notify_url, ok))
    if mqtt_set:
        messages.append(notify_mqtt_once(args, facts, ok, error))
    for message in messages:
        if log is not None:
            log.line(message)
            if message.startswith("Warning:"):
                # The summary is the log's short form: a failed notification too.
                sys.stdout.write(message + "\n")
        elif message.startswith("Warning:"):
            sys.stderr.write("%s: %s\n" % (PROG, message))


def notify_url_once(url: str, ok: bool) -> str:
    """GET url (url/fail when the run failed); one line for the log, the
    URL's secrets masked."""
    from . import redact
    url = url if ok else url.rstrip("/") + "/fail"
    try:
        # Imported here: it takes longer to import than a small backup takes
        # to start, and most runs notify nobody.
        import urllib.request
        with urllib.request.urlopen(url, timeout=15) as response:
            return "Notified %s: HTTP %d" % (redact.url(url), response.status)
    except Exception as e:  # noqa: BLE001 - nothing after the backup may change its code
        return "Warning: notification to %s failed: %s" % (redact.url(url), one_line(e))


def notify_mqtt_once(args, facts, ok: bool, error) -> str:
    """Publish the MQTT report (and discovery configs); one line for the log."""
    try:
        from . import notify_mqtt
        return notify_mqtt.publish_report(
            args.notify_mqtt, notify_mqtt.status_of(ok, facts.code), iotstack.host_folder(),
            notify_mqtt.report_facts(facts, error),
            discovery=not getattr(args, "no_mqtt_discovery", None))
    except Exception as e:  # noqa: BLE001 - nothing after the backup may change its code
        return "Warning: MQTT report to %s failed: %s" % (args.notify_mqtt, one_line(e))


def one_line(error: BaseException) -> str:
    """An exception as one line of text, its URLs masked."""
    from . import redact
    text = " ".join(str(error).split())
    return redact.text("%s: %s" % (type(error).__name__, text) if text else type(error).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
