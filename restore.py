#!/usr/bin/env python3
"""Restore an IOTstack backup: the interface of scripts/restore.sh, all or nothing.

    python3 restore.py [FILENAME] [noask]

The archive is unpacked into a staging folder inside the IOTstack directory
while every header, every member's safety and the gzip CRC are checked;
nothing live changes until all of that has passed.  Then, with the stack
stopped, each item being replaced is renamed aside and its staged copy
renamed in, under a journal in .tmp/: if anything fails the old items are
renamed back, and a run killed at any point is rolled back or completed by
the next run.  The old items are deleted only after the restore succeeded.
"""
import argparse
import contextlib
import datetime
import json
import os
import shutil
import stat
import sys
import time

import backuplib as lib
import file_writer
import parallel_gzip

PROG = "restore.py"
# Files sent to the writer process before the Stager waits for it to catch
# up, whatever comes: this bounds the memory that remembers them.
SENT_LIMIT = 4096
# Bytes unpacked between two background syncs (see EarlyWriteback).
WRITEBACK_STEP = 16 << 20
STAGING_PREFIX = "restore-staging."
ASIDE_PREFIX = "restore-old."

EPILOG = """\
exit codes:
  0  restored (or: verified, listed, recovered)
  1  failed: the archive is damaged or unsafe, or a step failed; the IOTstack
     directory is as it was (post_restore.sh failing also gives 1, with the
     files restored)
  2  bad arguments, archive not found, or no confirmation
  4  another backup or restore of this stack is running
"""


def destination(text):
    import offsite
    try:
        return offsite.parse_destination(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Restore an IOTstack backup made by backup.py or by IOTstack's "
                    "scripts/backup.sh: checked in full first, then swapped in all at once.")
    p.add_argument("filename", nargs="?", default="backup.tar.gz", metavar="FILENAME",
                   help="the archive, looked up under ./backups/ first (so "
                        "backup/backup_x.tar.gz works), then as given; default backup.tar.gz")
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
    p.add_argument("--from", dest="source", type=destination, metavar="METHOD:TARGET",
                   help="fetch FILENAME (e.g. backup/backup_x.tar.gz) from a copy made with "
                        "backup.py --copy-to into ./backups/, then restore it; with --list, "
                        "list the backups there")
    p.add_argument("--from-host", metavar="HOST",
                   help="the host folder to fetch from (default: this host's name)")
    return p


# ---------------------------------------------------------------------------
# Deciding (pure)

def normalize_member_name(name):
    """The member's path relative to the stack, or ArchiveError if unsafe."""
    if not name or "\0" in name:
        raise lib.ArchiveError("unsafe member %r: empty name or NUL byte" % name)
    if name.startswith("/"):
        raise lib.ArchiveError("unsafe member %r: absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise lib.ArchiveError("unsafe member %r: '..' in the path" % name)
    return "/".join(parts)


class MemberPolicy:
    """Refuses members that could write outside their place: every check is
    ours, so the result does not depend on tarfile's filters or Python's
    version."""

    def __init__(self, track_files=True):
        # Unpacking into a fresh staging folder, a hard link's target can be
        # checked on disk (the Stager does), and memory then stays flat
        # however many files the archive holds.
        self.track_files = track_files
        self.symlinks = set()
        self.files = set()
        # A folder just found to have no symlink on its path: members come
        # folder by folder, so most need only this comparison.  A new symlink
        # could lie on that path, so adding one forgets it.
        self.clear_folder = None

    def check(self, member):
        rel = normalize_member_name(member.name)
        if rel == "" and member.type != "dir":
            raise lib.ArchiveError("unsafe member %r: not a directory" % member.name)
        self._refuse_symlink_on_path(rel, member)
        if member.type == "hardlink":
            self._check_link_target(member)
        if member.type == "symlink":
            self.symlinks.add(rel)
            self.files.discard(rel)
            self.clear_folder = None
        elif member.type in ("file", "hardlink"):
            if self.track_files:
                self.files.add(rel)
        elif self.files:
            self.files.discard(rel)
        return rel

    def _refuse_symlink_on_path(self, rel, member):
        folder = rel.rpartition("/")[0]
        if folder == self.clear_folder:
            return
        parent = rel
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in self.symlinks:
                raise lib.ArchiveError("unsafe member %r: its path goes through the symlink %r"
                                       % (member.name, parent))
        self.clear_folder = folder

    def _check_link_target(self, member):
        """A hard link's target is checked like a member's own path, always;
        whether it is an earlier file is checked here or, when files are not
        tracked, on disk by the Stager."""
        refusal = lib.ArchiveError("unsafe member %r: hard link to %r, which is not an earlier "
                                   "file of this archive" % (member.name, member.linkname))
        try:
            target = normalize_member_name(member.linkname)
        except lib.ArchiveError:
            raise refusal from None
        if target in self.symlinks:
            raise refusal
        try:
            self._refuse_symlink_on_path(target, member)
        except lib.ArchiveError:
            raise refusal from None
        if self.track_files and target not in self.files:
            raise refusal


def restorable(rel, only):
    """Whether a member path is restored: inside a backup item, and inside
    one of the --only subtrees when there are any."""
    if lib.item_of(rel) is None:
        return False
    return not only or any(rel == path or rel.startswith(path + "/") for path in only)


def replaced_units(held_items, only):
    """What is swapped as a whole: the --only paths, else the items held."""
    return sorted(only) if only else sorted(held_items)


def staging_ancestors(unit):
    """Ancestors of a unit below the stack directory, outermost first."""
    parts = unit.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def list_backups(backups):
    """(relative name, size, mtime) of every archive, newest first."""
    found = []
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


def resolve_archive(stack, filename):
    """Under ./backups/ first, as documented; then as given."""
    for candidate in (os.path.join(stack, "backups", filename), filename):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


# ---------------------------------------------------------------------------
# Reading and unpacking

class Summary:
    def __init__(self):
        self.members = 0
        self.bytes = 0
        self.items = set()
        self.found_only = set()
        self.skipped = []
        self.warnings = []


def read_archive(path, only, unpack=None, progress=None):
    """Read the whole archive with every check; unpack what is restorable
    into unpack (a Stager) when given.  Raises ArchiveError."""
    summary = Summary()
    policy = MemberPolicy(track_files=unpack is None or not unpack.fresh_root)
    with open(path, "rb") as f:
        reader = lib.TarReader(lib.open_archive_chunks(f))
        for member in reader:
            rel = policy.check(member)
            summary.members += 1
            item = lib.item_of(rel)
            if item is None or (only and not restorable(rel, only)):
                if rel and item is None and len(summary.skipped) < 1000:
                    summary.skipped.append(rel)
                continue
            if member.type in ("chardev", "blockdev"):
                # Before it counts: an item that holds nothing else is not
                # staged, so it must not be swapped in (for nothing).
                summary.warnings.append("skipped device node %s" % rel)
                continue
            summary.items.add(item)
            for path_ in only:
                if rel == path_ or rel.startswith(path_ + "/"):
                    summary.found_only.add(path_)
            if member.type == "file":
                summary.bytes += member.size
            if unpack is not None:
                unpack.add(member, rel, reader)
            if progress is not None:
                progress.update(member.size if member.type == "file" else 0, 1)
    if unpack is not None:
        unpack.finish()
    return summary


class EarlyWriteback(lib.BackgroundSync):
    """Keeps the disk writing the staged files while unpacking goes on.

    Restore syncs before the swap, so that the new files are on disk before
    the old ones can go.  A sync that starts only then waits for every byte
    at once, after the unpacking: on an SD card that can be as long as the
    unpacking itself.  Here os.sync() runs in the background whenever
    another `step` bytes were unpacked.  It is only a speed-up: the final
    sync is what makes the files durable, and a sync changes no data."""

    thread_name = "early-writeback"

    def __init__(self, step=None):
        super().__init__(WRITEBACK_STEP if step is None else step, lambda done: os.sync())


class Stager:
    """Creates members below root, which holds nothing but what this archive
    put there: never follows a link, never writes through one.

    With writer=True regular files are created by a child process
    (file_writer), on another core, while this one reads and checks the
    archive; everything else is created here, after waiting for the child
    whenever a member touches a path it may not have written yet, so that
    members take effect in archive order either way."""

    def __init__(self, root, as_root, fresh_root=False, writeback=None, writer=False):
        self.root = root
        self.writeback = writeback  # an EarlyWriteback, told each file's size
        self.as_root = as_root
        # True when root was made empty for this archive: everything in it
        # then comes from earlier members.
        self.fresh_root = fresh_root
        self.made = {""}
        self.dirs = []
        # A new file has the mode it was opened with less the umask, and our
        # ids, unless a set-group-ID folder gives it that folder's group:
        # only a fresh root without that bit (whose new folders then lack it
        # too) lets chown be skipped for members owned like us.
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.ids = None
        if fresh_root and not os.stat(root).st_mode & stat.S_ISGID:
            self.ids = (os.geteuid(), os.getegid())
        # Regular files are created by a writer process when asked (and
        # fork exists); sent holds those sent since it last caught up.
        self.sent = set()
        self.writer = None
        if writer and hasattr(os, "fork"):
            self.writer = file_writer.FileWriterProcess(self.create_file,
                                                        raisable=(lib.ArchiveError,))

    def _wait_for_writer(self):
        self.writer.wait()
        self.sent.clear()

    def close(self):
        """Stops the writer, if any: nothing is written after this."""
        if self.writer is not None:
            self.writer.close()

    def _prepare(self, rel):
        parent = rel.rpartition("/")[0]
        if parent not in self.made:
            if self.sent and any(folder in self.sent
                                 for folder in staging_ancestors(parent) + [parent]):
                self._wait_for_writer()  # an error about that file comes first
            try:
                os.makedirs(os.path.join(self.root, parent), exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                # An earlier member put a file where this one needs a folder:
                # a damaged archive, said in one line like the others.
                raise lib.ArchiveError("member %r: %r is not a directory in this archive"
                                       % (rel, parent)) from None
            while parent not in self.made:
                self.made.add(parent)
                parent = parent.rpartition("/")[0]
        return os.path.join(self.root, rel)

    @staticmethod
    def _clear(path, rel):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise lib.ArchiveError("member %r would replace a directory" % rel)
        os.unlink(path)

    def _meta(self, member, path):
        mtime = member.mtime * 1_000_000_000
        if self.as_root:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if member.type != "symlink":
            os.chmod(path, member.mode)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def create_file(self, rel, mode, uid, gid, mtime, pieces):
        """Runs in the writer process when there is one."""
        path = os.path.join(self.root, rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        # The staging root is private (0700), so a file may have its
        # final permissions while it is being written.
        try:
            fd = os.open(path, flags, mode & 0o777)
        except FileExistsError:
            self._clear(path, rel)
            fd = os.open(path, flags, mode & 0o777)
        try:
            for piece in pieces:
                while piece:
                    piece = piece[os.write(fd, piece):]
            if self.as_root and (uid, gid) != self.ids:
                os.fchown(fd, uid, gid)
            # After chown, which clears set-id bits; those need chmod anyway.
            if mode & ~0o777 or mode & self.umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime * 1_000_000_000, mtime * 1_000_000_000))
        finally:
            os.close(fd)

    def add(self, member, rel, reader):
        if rel == "":
            return
        path = self._prepare(rel)
        kind = member.type
        if kind == "file":
            if self.writer is not None:
                self.writer.send(rel, member.mode, member.uid, member.gid, member.mtime,
                                 member.size, reader.data(member))
                self.sent.add(rel)
                if len(self.sent) >= SENT_LIMIT:
                    self._wait_for_writer()
            else:
                self.create_file(rel, member.mode, member.uid, member.gid, member.mtime,
                                 reader.data(member))
            if self.writeback is not None:
                self.writeback.wrote(member.size)
            return
        if rel in self.sent:
            # The writer may not have created that file yet: what replaces
            # it must come after it, as in the archive.
            self._wait_for_writer()
        if kind == "dir":
            if rel not in self.made:
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    if not os.path.isdir(path) or os.path.islink(path):
                        self._clear(path, rel)
                        os.mkdir(path, 0o700)
                self.made.add(rel)
            self.dirs.append((rel.count("/"), rel, member))
        elif kind == "hardlink":
            target_rel = normalize_member_name(member.linkname)
            if target_rel in self.sent:
                self._wait_for_writer()
            # The policy made sure no folder on the way is a symlink; lstat
            # makes sure the target itself is not one.
            target = os.path.join(self.root, target_rel)
            try:
                is_file = stat.S_ISREG(os.lstat(target).st_mode)
            except FileNotFoundError:
                is_file = False
            if not is_file:
                raise lib.ArchiveError("unsafe member %r: hard link to %r, which is not an "
                                       "earlier file of this archive, or is not restored with "
                                       "it" % (member.name, member.linkname))
            try:
                os.link(target, path, follow_symlinks=False)
            except FileExistsError:
                self._clear(path, rel)
                os.link(target, path, follow_symlinks=False)
        elif kind == "symlink":
            try:
                os.symlink(member.linkname, path)
            except FileExistsError:
                self._clear(path, rel)
                os.symlink(member.linkname, path)
            self._meta(member, path)
        elif kind == "fifo":
            try:
                os.mkfifo(path, 0o600)
            except FileExistsError:
                self._clear(path, rel)
                os.mkfifo(path, 0o600)
            self._meta(member, path)

    def finish(self):
        # Deepest first, after their contents: a read-only directory must not
        # stop its children from being written, and writing them changes mtimes.
        if self.writer is not None:
            self.writer.finish()
            self.sent.clear()
        self.dirs.sort(key=lambda entry: -entry[0])
        for _depth, rel, member in self.dirs:
            self._meta(member, os.path.join(self.root, rel))
        self.dirs = []


# ---------------------------------------------------------------------------
# The journaled swap

def journal_path(stack):
    return os.path.join(stack, lib.JOURNAL_NAME)


def write_journal(stack, journal):
    lib.write_json_atomically(journal_path(stack), journal)


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
        lib.fsync_dir(folder)
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
    lib.fsync_dir(stack)


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
    lib.fsync_dir(os.path.dirname(journal_path(stack)))


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
    lib.restart_left_stopped(stack, log, out)
    return journal is not None


def remove_empty_tree(path):
    for folder, _dirs, files in os.walk(path, topdown=False):
        if not files:
            try:
                os.rmdir(folder)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# The run

def ask_yes(archive, stack):
    try:
        answer = input("Restore %s into %s, replacing what it holds. Continue [y/N]? "
                       % (archive, stack))
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def estimated_size(path):
    """The gzip trailer's length (mod 4 GiB), at least the file's size."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
    except OSError:
        isize = 0
    return max(isize, size)


def check_units(stack, units):
    """Refuse units whose place on disk lies behind a symlink."""
    for unit in units:
        for ancestor in staging_ancestors(unit):
            path = os.path.join(stack, ancestor)
            if os.path.islink(path):
                raise lib.UserError("cannot restore %s: %s is a symlink on disk, and the "
                                    "restore never writes through one" % (unit, ancestor))
            if os.path.lexists(path) and not os.path.isdir(path):
                raise lib.UserError("cannot restore %s: %s is not a directory" % (unit, ancestor))


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


def compose_bytes(stack):
    """docker-compose.yml's content, or None when there is none."""
    try:
        with open(os.path.join(stack, "docker-compose.yml"), "rb") as f:
            return f.read()
    except OSError:
        return None


def run_restore(stack, archive, args, owner):
    started = time.monotonic()
    now = lib.now_local()
    backups = os.path.join(stack, "backups")
    out = sys.stdout
    with lib.stack_lock(stack, owner):
        for folder in ("", "logs"):
            lib.ensure_dir(os.path.join(backups, folder), owner)
        stem = lib.first_free_stem("restore_" + lib.archive_stamp(now),
                                   lambda s: os.path.exists(lib.log_path(backups, s)))
        log = lib.RunLog(lib.log_path(backups, stem))
        lib.chown_to(log.path, owner)
        try:
            log.field("Started At", now.isoformat(timespec="seconds"))
            log.field("Current Directory", stack)
            recover(stack, log, out)
            if args.recover:
                out.write("Nothing else to do (--recover).\n")
                return lib.EXIT_OK
            log.field("Archive", archive)
            code = restore_with_log(stack, archive, args, log, out)
            log.field("Duration (s)", "%.1f" % (time.monotonic() - started))
            log.field("Finished At", lib.now_local().isoformat(timespec="seconds"))
            out.write("Log: %s\n" % os.path.relpath(log.path, stack))
            return code
        except BaseException as e:
            log.line("ERROR: %s" % (e or type(e).__name__))
            log.field("Finished At", lib.now_local().isoformat(timespec="seconds"))
            raise
        finally:
            log.close()


def restore_with_log(stack, archive, args, log, out):
    as_root = os.geteuid() == 0
    tmp = os.path.join(stack, ".tmp")
    # A folder kept by --keep-old must never be reused: a second run in the
    # same minute and process would rename the items over the kept ones.
    token = lib.first_free_stem(
        "%s.%d" % (lib.archive_stamp(lib.now_local()), os.getpid()),
        lambda t: any(os.path.lexists(os.path.join(tmp, prefix + t))
                      for prefix in (STAGING_PREFIX, ASIDE_PREFIX)))
    staging_rel = ".tmp/" + STAGING_PREFIX + token
    aside_rel = ".tmp/" + ASIDE_PREFIX + token
    staging = os.path.join(stack, staging_rel)

    # 1. Read, check and (unless --in-place) unpack: nothing live changes.
    if args.in_place:
        summary = checked(archive, args.only, None)
    else:
        need, free = estimated_size(archive), lib.free_bytes(tmp)
        if need > free:
            raise lib.UserError(
                "not enough free space to unpack beside the current files (about %s needed, "
                "%s free); free some space or use --in-place" % (lib.human_size(need),
                                                                 lib.human_size(free)))
        os.mkdir(staging, 0o700)
        try:
            progress = lib.NoProgress()
            if sys.stderr.isatty():
                progress = lib.TerminalProgress(need, label="Unpacking: ")
            # On one core a writer process would only add copying.
            writer = parallel_gzip.default_jobs() > 1
            with EarlyWriteback() as writeback, contextlib.closing(
                    Stager(staging, as_root, fresh_root=True, writeback=writeback,
                           writer=writer)) as stager:
                summary = checked(archive, args.only, stager, progress, staging)
            progress.finish()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.field("Members", summary.members)
    log.field("Data Size (bytes)", summary.bytes)
    log.line("Verified: OK (gzip CRC, %d tar headers, every member's path)" % summary.members)
    for warning in summary.warnings:
        log.line("Warning: %s" % warning)
    if summary.skipped:
        log.line("Skipped %d member(s) that are not part of an IOTstack backup, e.g. %s"
                 % (len(summary.skipped), ", ".join(summary.skipped[:5])))
    missing = sorted(set(args.only) - summary.found_only)
    units = replaced_units(summary.items, args.only)
    try:
        if missing:
            raise lib.UserError("the archive holds nothing under %s" % ", ".join(missing))
        if not units:
            raise lib.UserError("the archive holds no IOTstack items (services/, volumes/, "
                                "docker-compose.yml...)")
        check_units(stack, units)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.line("Replacing: %s" % ", ".join(units))
    if not args.in_place:
        os.sync()  # the staged files are on disk before the old ones can go

    # 2. Swap, with the stack stopped.
    compose = None if args.no_stop else lib.open_compose(stack, log)
    report = {}
    hook_status = None
    old_compose = compose_bytes(stack)  # read now: --in-place deletes it
    with lib.services_stopped(compose, log, report, stack):
        if args.in_place:
            replace_in_place(stack, archive, args.only, units, as_root, log)
        else:
            journal = prepare_journal(stack, archive, units, staging_rel, aside_rel,
                                      args.keep_old)
            try:
                swap_in(stack, journal)
            except BaseException:
                roll_back(stack, journal)
                clean_up(stack, journal)
                log.line("The swap failed; every item was put back as it was")
                raise
            clean_up(stack, journal)
            if args.keep_old and any(os.path.lexists(os.path.join(stack, aside_rel, unit))
                                     for unit in units):
                out.write("The replaced items are kept in %s\n" % aside_rel)
                log.line("Replaced items kept in %s" % aside_rel)
        if old_compose is not None and compose_bytes(stack) != old_compose:
            message = ("docker-compose.yml changed: run 'docker compose up -d' to apply it")
            out.write(message + "\n")
            log.line(message)
        hook_status = lib.run_hook(stack, "post_restore.sh", log)
    if report.get("restart_error"):
        raise lib.UserError("restored, but services could not be started again: %s"
                            % report["restart_error"])
    out.write("Restored %s: %s (%d members, %s)\n" % (
        os.path.basename(archive), ", ".join(units), summary.members,
        lib.human_size(summary.bytes)))
    if report.get("stopped"):
        out.write("Services stopped and started again: %s\n" % ", ".join(report["stopped"]))
    if hook_status:
        raise lib.UserError("post_restore.sh failed with status %d; the files are restored "
                            "(see the log)" % hook_status)
    return lib.EXIT_OK


def checked(archive, only, stager, progress=None, staging=None):
    try:
        return read_archive(archive, only, stager, progress)
    except lib.ArchiveError as e:
        raise lib.UserError("%s: %s; nothing was changed" % (os.path.basename(archive), e)) from None
    except OSError as e:
        if staging is None:
            raise
        if lib.is_disk_full(e):
            raise lib.UserError("not enough free space to unpack beside the current files; "
                                "nothing was changed; free some space or use --in-place") from None
        raise lib.UserError("unpacking failed: %s; nothing was changed"
                            % (e.strerror or e)) from None


def replace_in_place(stack, archive, only, units, as_root, log):
    """The original's delete-then-extract, after the full check has passed."""
    for unit in units:
        path = os.path.join(stack, unit)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    log.line("In place: deleted %s, unpacking over them" % ", ".join(units))
    try:
        read_archive(archive, only, Stager(stack, as_root))
    except lib.ArchiveError as e:
        raise lib.UserError("the archive changed or failed while unpacking in place: %s" % e) \
            from None


def print_list(stack, out, source=None, host=None):
    if source is None:
        where = os.path.join(stack, "backups")
        entries = list_backups(where)
    else:
        import offsite
        where = "%s under %s/" % (source, host)
        try:
            entries = offsite.list_backups(source, host)
        except offsite.CopyError as e:
            raise lib.UserError("cannot list %s: %s" % (where, e)) from None
    if not entries:
        out.write("No backups in %s\n" % where)
        return
    for rel, size, mtime in entries:
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        out.write("%-44s %10s  %s\n" % (rel, lib.human_size(size), when))


def verify_only(stack, filename, out):
    archive = resolve_archive(stack, filename) if stack else None
    archive = archive or (os.path.abspath(filename) if os.path.isfile(filename) else None)
    if archive is None:
        raise lib.UserError("archive %s not found (looked in ./backups/ and as given)"
                            % filename, lib.EXIT_USAGE)
    try:
        summary = read_archive(archive, [])
    except lib.ArchiveError as e:
        raise lib.UserError("%s: %s" % (filename, e)) from None
    out.write("%s: OK (%d members, %s of data, items: %s)\n" % (
        filename, summary.members, lib.human_size(summary.bytes),
        ", ".join(sorted(summary.items)) or "none"))
    return lib.EXIT_OK


def dry_run(stack, archive, args, out):
    summary = checked(archive, args.only, None)
    units = replaced_units(summary.items, args.only)
    out.write("Archive: %s: OK (%d members, %s of data)\n" % (
        archive, summary.members, lib.human_size(summary.bytes)))
    for unit in units:
        state = "replace" if os.path.lexists(os.path.join(stack, unit)) else "create"
        out.write("Would %s: %s\n" % (state, unit))
    for warning in summary.warnings:
        out.write("Warning: %s\n" % warning)
    out.write("Dry run: nothing was changed.\n")
    return lib.EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    out = sys.stdout
    try:
        if args.verify:
            stack = lib.find_stack_dir(args.dir, os.environ, os.getcwd(),
                                       os.path.dirname(os.path.abspath(__file__)))
            return verify_only(stack, args.verify, out)
        stack = lib.locate_stack(args.dir, __file__)
        args.only = [normalize_only(path) for path in args.only]
        host = args.from_host or lib.host_folder()
        if args.list:
            print_list(stack, out, args.source, host)
            return lib.EXIT_OK
        owner = None
        if os.geteuid() == 0:
            owner = lib.lookup_owner(lib.default_owner_name(stack, os.environ)[0])
        if args.recover:
            with lib.signals_raise():
                return run_restore(stack, None, args, owner)
        if args.source is not None:
            fetch(stack, args.source, host, args.filename, owner, out)
        archive = resolve_archive(stack, args.filename)
        if archive is None:
            raise lib.UserError("backup file %s not found (looked in %s and as given)"
                                % (args.filename, os.path.join(stack, "backups")), lib.EXIT_USAGE)
        if args.dry_run:
            return dry_run(stack, archive, args, out)
        if not (args.noask or args.yes):
            if sys.stdin is None or not sys.stdin.isatty():
                raise lib.UserError("not on a terminal, so nobody can confirm: add 'noask' "
                                    "or --yes to restore without asking", lib.EXIT_USAGE)
            if not ask_yes(archive, stack):
                out.write("Nothing was changed.\n")
                return lib.EXIT_USAGE
        with lib.signals_raise():
            return run_restore(stack, archive, args, owner)
    except lib.UserError as e:
        lib.say_error(PROG, str(e))
        return e.code
    except lib.Interrupted as e:
        lib.say_error(PROG, "interrupted by %s; the next run of restore.py finishes or rolls "
                            "back what was under way" % e)
        return 128 + e.signum
    except KeyboardInterrupt:
        lib.say_error(PROG, "interrupted; the next run of restore.py finishes or rolls back "
                            "what was under way")
        return 130


def fetch(stack, source, host, name, owner, out):
    """Download NAME from a copy into ./backups/NAME (atomically: a
    half-fetched archive never takes the name)."""
    import offsite
    local = os.path.join(stack, "backups", name)
    try:
        offsite.download(source, host, name, local)
    except (offsite.CopyError, ValueError) as e:
        raise lib.UserError("cannot fetch %s from %s (host %s): %s" % (name, source, host, e)) \
            from None
    for path in (os.path.join(stack, "backups"), os.path.dirname(local), local):
        lib.chown_to(path, owner)
    out.write("Fetched %s from %s into %s\n" % (name, source, os.path.relpath(local, stack)))


def normalize_only(path):
    try:
        rel = normalize_member_name(path.rstrip("/"))
    except lib.ArchiveError:
        raise lib.UserError("--only %s: give a path inside IOTstack, like volumes/nodered"
                            % path, lib.EXIT_USAGE) from None
    if lib.item_of(rel) is None:
        raise lib.UserError("--only %s: not part of a backup (services/, volumes/, the compose "
                            "files, the hooks...)" % path, lib.EXIT_USAGE)
    return rel


if __name__ == "__main__":
    raise SystemExit(main())
