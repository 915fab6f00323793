"""Off-site copies of IOTstack backups: upload, list, fetch back and prune.

backup.py copies each new, verified archive to every `--copy-to` destination
and restore.py fetches one back for a bare-metal restore.  A destination is
`rclone:REMOTE:PATH` (any rclone remote, `:local:/mnt/x` too),
`rsync:[USER@HOST:]PATH` (over ssh, or a local path such as a USB disk or
NAS mount) or `scp:[USER@]HOST:PATH`; under it each Pi has a folder named
after its host holding the layout of the local `backups/` folder
(`backup/backup_YYYY-MM-DD_HHMM.tar.gz`, `rolling/backup_N.tar.gz`), so
several Pis can share one destination.

How the data is kept safe: a copy appears under its final name only
complete -- rsync writes a temporary name and renames it, scp and rclone
write `.NAME.partial` and rename it once checked (rclone to object stores,
which cannot rename, uploads straight: an object only shows once complete);
every upload is checked after the copy, size always and a checksum wherever
the method offers one, and a copy failing its check is removed so it never
passes for a backup; downloads go to a temporary name beside the target and
are fsynced and renamed; deletes take only plain validated names and touch
nothing outside TARGET/host.  ssh is whatever `ssh` is first on PATH, set up
(ports, keys, host aliases) in ~/.ssh/config; the rsync method runs nothing
but rsync on the far side, so keys restricted to rsync (rrsync) work.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import zlib

from .iotstack import ARCHIVE_MODE, fsync_dir

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

    # {rel_name: (size, mtime)} of the files a listing found.
    Entries = Dict[str, Tuple[int, float]]
    # Any: an item of rclone lsjson's JSON, read with .get and defaults.
    Json = Dict[str, Any]

METHODS = ("rclone", "rsync", "scp")

# Transfers of multi-gigabyte archives to a slow NAS or a cloud over a Pi's
# uplink can take hours; listings and small remote commands cannot.
TRANSFER_TIMEOUT = 6 * 3600
LIST_TIMEOUT = 120
COMMAND_TIMEOUT = 120

PARTIAL_SUFFIX = ".partial"
# .tar.gz.gpg: the copy backup.py --encrypt-to sends instead of the archive.
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.gz.gpg", ".log")
BACKUP_FOLDERS = ("backup", "rolling")

# The remote command that hashes an scp copy; a name so tests can make it "missing".
REMOTE_SHA256 = "sha256sum"

INSTALL_HINTS = {
    "rclone": "install it with: sudo apt install rclone (then configure a remote with: rclone config)",
    "rsync": "install it with: sudo apt install rsync",
    "scp": "install it with: sudo apt install openssh-client",
    "ssh": "install it with: sudo apt install openssh-client",
}


class CopyError(Exception):
    """A copy, listing, fetch or delete failed; str(e) is one clear line naming the destination and the cause (the tool's last stderr line)."""


class NotThere(CopyError):
    """download: the destination was reached, and the file is not there."""


class Destination:
    """A parsed METHOD:TARGET; str() gives the spec back as written.

    method: "rclone" | "rsync" | "scp"; target: the text after "METHOD:".
    remote: "[USER@]HOST" for rsync and scp over ssh, else None.
    path: rsync and scp: the folder on the destination ("" is the remote
    user's home); rclone: None (target is the rclone path).
    """

    method: str
    target: str

    def __init__(self, method: str, target: str, spec: Optional[str] = None,
                 remote: Optional[str] = None, path: Optional[str] = None) -> None:
        self.method = method
        self.target = target
        self.remote = remote
        self.path = path
        self._spec = spec if spec is not None else "%s:%s" % (method, target)

    def __str__(self) -> str:
        """The spec as written, with an rclone connection string's secrets
        masked: this is what logs and messages show."""
        if self.method == "rclone":
            from . import redact
            return "rclone:" + redact.rclone_target(self.target)
        return self._spec

    def __repr__(self) -> str:
        return "Destination(%r)" % str(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Destination) and self._spec == other._spec

    def __hash__(self) -> int:
        return hash(self._spec)


# ---------------------------------------------------------------------------
# Parsing and validation

USAGE = "use rclone:REMOTE:PATH, rsync:[USER@HOST:]PATH or scp:USER@HOST:PATH"

# scp paths end up both in scp's remote path (globbed by scp, split by the
# remote shell on old scp) and in shell commands; only plain characters
# mean the same in all of them.
SCP_PATH_RE = re.compile(r"^[A-Za-z0-9._/+=@%,:-]*$")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")


def parse_destination(spec: str) -> Destination:
    """METHOD:TARGET -> Destination; ValueError saying what is wrong."""
    if not isinstance(spec, str):
        raise ValueError("a destination must be text like rsync:/mnt/usb/backups, not %r" % (spec,))
    method, colon, target = spec.partition(":")
    if not colon:
        raise ValueError("%r is not METHOD:TARGET; %s" % (spec, USAGE))
    if method not in METHODS:
        raise ValueError("unknown copy method %r in %r; %s" % (method, spec, USAGE))
    if not target.strip():
        raise ValueError("%r has nothing after %s:; %s" % (spec, method, USAGE))
    if any(ord(c) < 32 or ord(c) == 127 for c in target):
        raise ValueError("%r contains control characters" % spec)
    return {"rclone": _parse_rclone, "rsync": _parse_rsync, "scp": _parse_scp}[method](spec, target)


def _parse_rclone(spec: str, target: str) -> Destination:
    needs = "rclone needs REMOTE:PATH (a remote from `rclone config`, or :BACKEND:PATH such as :local:/mnt/x)"
    if target.startswith(":"):
        backend, colon, _ = target[1:].partition(":")
        if not colon or not backend:
            raise ValueError("%r: %s" % (spec, needs))
    else:
        remote, colon, _ = target.partition(":")
        # Without a colon before any slash rclone would take it as a local path.
        if not colon or not remote or "/" in remote:
            raise ValueError("%r: %s" % (spec, needs))
        if remote.startswith("-"):
            raise ValueError("%r: an rclone remote name cannot start with '-'" % spec)
    return Destination("rclone", target, spec)


def _parse_rsync(spec: str, target: str) -> Destination:
    if target.startswith("rsync://") or re.match(r"^[^/]*::", target):
        raise ValueError("%r: rsync daemon destinations (HOST::MODULE, rsync://) are not supported; "
                         "use rsync:[USER@]HOST:PATH over ssh" % spec)
    split = _split_ssh_target(spec, target)
    if split is None:
        # A local folder: USB disk, NAS mount.  Absolute, so that rsync never
        # mistakes a colon in it for a host, and cwd changes do not move it.
        return Destination("rsync", target, spec, None, os.path.abspath(os.path.expanduser(target)))
    remote, path = split
    return Destination("rsync", target, spec, remote, path)


def _parse_scp(spec: str, target: str) -> Destination:
    split = _split_ssh_target(spec, target)
    if split is None:
        raise ValueError("%r: scp needs USER@HOST:PATH (for a local folder use rsync:PATH)" % spec)
    remote, path = split
    if not SCP_PATH_RE.match(path):
        raise ValueError("%r: an scp path may only hold letters, digits and ._/+=@%%,:- "
                         "(no spaces or shell characters); use rsync: for other paths" % spec)
    return Destination("scp", target, spec, remote, path)


def _split_ssh_target(spec: str, target: str) -> Optional[Tuple[str, str]]:
    """"[USER@]HOST:PATH" -> (remote, path); None for a local path.

    As rsync and scp decide it: remote when a colon comes before any slash
    (a bracketed IPv6 address counts as the host).
    """
    bracket = re.match(r"^((?:[^@/:\[\]]+@)?\[[^\]/]+\]):(.*)$", target)
    if bracket:
        remote, path = bracket.groups()
    else:
        head, colon, path = target.partition(":")
        if not colon or "/" in head:
            return None
        remote = head
    host = remote.rpartition("@")[2]
    if not host or host.startswith("-") or re.search(r"\s", remote) or remote.startswith("-"):
        raise ValueError("%r: %r is not a valid [USER@]HOST" % (spec, remote))
    # "~/x" is home-relative, which a relative path already is; a quoted "~"
    # would not expand in the shell commands run over ssh.
    if path == "~":
        path = ""
    elif path.startswith("~/"):
        path = path[2:].lstrip("/") or ""
    elif path.startswith("~"):
        raise ValueError("%r: ~USER paths are not supported; give the full path" % spec)
    return remote, path


def _check_host(host: object) -> None:
    if not isinstance(host, str) or not HOST_NAME_RE.match(host):
        raise ValueError("%r is not a usable host name (letters, digits, '.', '_', '-')" % (host,))


def _check_rel_name(rel_name: object) -> None:
    """Refuse anything that could name a file outside TARGET/host or a non-backup."""
    if not isinstance(rel_name, str) or not rel_name:
        raise ValueError("empty backup name")
    if rel_name.startswith("/"):
        raise ValueError("%r is an absolute path; give a name relative to the host folder" % rel_name)
    parts = rel_name.split("/")
    if ".." in parts:
        raise ValueError("%r contains '..'" % rel_name)
    if not all(NAME_PART_RE.match(part) for part in parts):
        raise ValueError("%r is not a plain relative name (letters, digits, '._+-' in each part)"
                         % rel_name)
    if not rel_name.endswith(ARCHIVE_SUFFIXES):
        raise ValueError("%r does not end in .tar.gz, .tar.gz.gpg or .log" % rel_name)


# ---------------------------------------------------------------------------
# Running the tools

class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(dest: Destination, argv: List[str], timeout: float, action: str) -> _Result:
    """Run argv with no stdin; a missing tool or a timeout is a CopyError.

    The child gets its own session so that on a timeout or an interrupt the
    whole group dies, ssh included: subprocess.run kills only the direct
    child and then waits for the pipes an orphaned ssh still holds.  A
    session without a terminal also makes ssh fail at once instead of
    prompting for a password nobody will type.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        tool = argv[0]
        raise CopyError("%s: %s failed: %s is not installed (not found on PATH); %s"
                        % (dest, action, tool, INSTALL_HINTS.get(tool, "install it"))) from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CopyError("%s: %s failed: %s took longer than %s and was stopped"
                        % (dest, action, argv[0], _duration(timeout))) from None
    except BaseException:
        _kill_group(proc)
        raise
    return _Result(proc.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))


def _run_ok(dest: Destination, argv: List[str], timeout: float, action: str) -> _Result:
    result = _run(dest, argv, timeout, action)
    if result.returncode != 0:
        raise _failure(dest, action, result)
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.communicate()


def _duration(seconds: float) -> str:
    return "%d hours" % (seconds // 3600) if seconds >= 3600 else "%d seconds" % seconds


# rclone prefixes its log lines with a timestamp; the summary lines rsync
# and rclone print last say nothing the line before them does not.
RCLONE_STAMP_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*: )?")
NOISE_RE = re.compile(r"^(rsync error: |rsync: connection unexpectedly closed|"
                      r"rsync: (\[\w+\] )?write error: Broken pipe|"
                      r"NOTICE: Config file .* not found|Config file .* not found - using defaults)")


def _cause(result: _Result) -> str:
    """The tool's last meaningful stderr line."""
    lines = [RCLONE_STAMP_RE.sub("", line.strip()) for line in result.stderr.splitlines()]
    lines = [line for line in lines if line]
    useful = [line for line in lines if not NOISE_RE.match(line)]
    if useful:
        return useful[-1]
    if lines:
        return lines[-1]
    return "exit status %d" % result.returncode


def _failure(dest: Destination, action: str, result: _Result) -> CopyError:
    text = "%s: %s failed: %s" % (dest, action, _cause(result))
    if dest.method == "rclone":  # the action names remote paths: no secret of a connection string
        from . import redact
        text = text.replace(dest.target, redact.rclone_target(dest.target))
    return CopyError(_one_line(text))


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Paths

def _join(base: Optional[str], *parts: str) -> str:
    """Join remote path parts with "/"; an empty base means relative (home)."""
    tail = "/".join(part for part in parts if part)
    if not base:
        return tail or "."
    if not tail:
        return base
    return base.rstrip("/") + "/" + tail if base.rstrip("/") else "/" + tail


def _as_dir(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def _partial_name(rel_name: str) -> str:
    folder, name = _split_rel(rel_name)
    return _join_rel(folder, "." + name + PARTIAL_SUFFIX)


def _split_rel(rel_name: str) -> Tuple[str, str]:
    folder, _, name = rel_name.rpartition("/")
    return folder, name


def _join_rel(folder: str, name: str) -> str:
    return folder + "/" + name if folder else name


# ---------------------------------------------------------------------------
# Public API

def upload(dest: Destination, local_path: str, rel_name: str, host: str) -> str:
    """Copy local_path to TARGET/host/rel_name, creating folders, then check it.

    Atomic at the destination: rsync writes a temporary dot-name in the
    same folder and renames it; scp uploads to `.NAME.partial`, checks it
    and renames it with `ssh mv`; rclone (`rclone copyto`) writes remotes
    that can rename (local, sftp, Dropbox, Google Drive...) in place under
    the name it is given -- rclone 1.60 does so for local and sftp, a cut
    connection leaves a truncated file -- so it is given `.NAME.partial`,
    which is checked and then renamed with `rclone moveto` (a server-side
    rename); object stores that cannot rename (S3, B2, Swift) only show an
    object once its upload completed, so there copyto goes straight to
    the final name.

    rsync and scp need TARGET to exist already (host/ and below are
    created): a missing TARGET usually means a disk that is not mounted,
    and filling the SD card under the empty mount point instead helps no one.

    The check: size always, plus rclone: the backend's md5/sha1/sha256/
    dropbox/crc32 hash (`rclone hashsum`) against the same hash computed
    here; rsync: a second `rsync --dry-run --checksum` pass must find
    nothing to transfer; scp: `sha256sum` on the far side (size only where
    it is missing).  A copy that fails its check is removed and CopyError
    raised.  Returns what was checked, e.g. "size and md5 checked".
    """
    _check_host(host)
    _check_rel_name(rel_name)
    local_path = os.path.abspath(local_path)
    if not os.path.isfile(local_path):
        raise CopyError("%s: upload of %s failed: %s is not a file" % (dest, rel_name, local_path))
    return {"rclone": _rclone_upload, "rsync": _rsync_upload, "scp": _scp_upload}[dest.method](
        dest, local_path, rel_name, host)


def list_backups(dest: Destination, host: str) -> "list[tuple[str, int, float]]":
    """[(rel_name, size, mtime)] of every *.tar.gz and *.tar.gz.gpg in TARGET/host/backup and /rolling, newest first.

    Missing host or backup folders are simply empty; an unreachable
    destination (and for rsync and scp a missing TARGET) is a CopyError.
    """
    _check_host(host)
    globs = [folder + "/*" + suffix for folder in BACKUP_FOLDERS
             for suffix in (".tar.gz", ".tar.gz.gpg")]
    entries = {"rclone": _rclone_list, "rsync": _rsync_list, "scp": _scp_list}[dest.method](
        dest, host, globs)
    backups = [(name, size, mtime) for name, (size, mtime) in entries.items()
               if _is_backup_entry(name)]
    backups.sort(key=lambda entry: (entry[2], entry[0]), reverse=True)
    return backups


def find(dest: Destination, host: str, rel_names: "list[str]") -> "dict[str, tuple[int, float]]":
    """{rel_name: (size, mtime)} of those of rel_names that are files at
    TARGET/host (validated plain names); CopyError when unreachable."""
    _check_host(host)
    for rel_name in rel_names:
        _check_rel_name(rel_name)
    listed = {"rclone": _rclone_list, "rsync": _rsync_list, "scp": _scp_list}[dest.method](
        dest, host, list(rel_names))
    return {name: listed[name] for name in rel_names if name in listed}


def delete(dest: Destination, host: str, rel_names: "list[str]") -> None:
    """Delete TARGET/host/NAME for each name; names not there are skipped.

    Only plain relative names ending in .tar.gz or .log are accepted
    (ValueError otherwise, before anything is deleted); only files are
    deleted, never folders.
    """
    _check_host(host)
    rel_names = list(rel_names)
    for rel_name in rel_names:
        _check_rel_name(rel_name)
    if not rel_names:
        return
    present = {"rclone": _rclone_list, "rsync": _rsync_list, "scp": _scp_list}[dest.method](
        dest, host, rel_names)
    doomed = [name for name in dict.fromkeys(rel_names) if name in present]
    if doomed:
        {"rclone": _rclone_delete, "rsync": _rsync_delete, "scp": _scp_delete}[dest.method](
            dest, host, doomed)


def download(dest: Destination, host: str, rel_name: str, local_path: str) -> None:
    """Fetch TARGET/host/rel_name to local_path atomically.

    The file is fetched to `.NAME.partial` beside local_path, its size
    compared with the destination's listing, fsynced and renamed; nothing
    is left behind on failure.  CopyError if it is missing or unreachable.
    """
    _check_host(host)
    _check_rel_name(rel_name)
    local_path = os.path.abspath(local_path)
    listed = {"rclone": _rclone_list, "rsync": _rsync_list, "scp": _scp_list}[dest.method](
        dest, host, [rel_name])
    if rel_name not in listed:
        raise NotThere("%s: download failed: %s/%s is not there" % (dest, host, rel_name))
    size = listed[rel_name][0]
    folder = os.path.dirname(local_path)
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, "." + os.path.basename(local_path) + PARTIAL_SUFFIX)
    _remove_quietly(partial)  # a stale one could make rclone or rsync skip the copy
    try:
        {"rclone": _rclone_fetch, "rsync": _rsync_fetch, "scp": _scp_fetch}[dest.method](
            dest, host, rel_name, partial)
        got = os.path.getsize(partial)
        if got != size:
            raise CopyError("%s: download of %s/%s failed: got %d bytes, the destination lists %d"
                            % (dest, host, rel_name, got, size))
        os.chmod(partial, ARCHIVE_MODE)  # rclone and scp make it 0644; it holds secrets
        _fsync_file(partial)
        os.replace(partial, local_path)
        fsync_dir(folder)
    except BaseException:
        _remove_quietly(partial)
        raise


def _is_backup_entry(rel_name: str) -> bool:
    folder, name = _split_rel(rel_name)
    return (folder in BACKUP_FOLDERS and name.endswith((".tar.gz", ".tar.gz.gpg"))
            and not name.startswith("."))


# ---------------------------------------------------------------------------
# Local files

def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _file_size(path: str) -> int:
    return os.stat(path).st_size


def _dropbox_hash(f: IO[bytes]) -> str:
    # Dropbox's content hash: sha256 over the sha256 of each 4 MiB block.
    blocks = hashlib.sha256()
    for block in iter(lambda: f.read(4 * 1024 * 1024), b""):
        blocks.update(hashlib.sha256(block).digest())
    return blocks.hexdigest()


def _crc32(f: IO[bytes]) -> str:
    crc = 0
    for chunk in iter(lambda: f.read(1024 * 1024), b""):
        crc = zlib.crc32(chunk, crc)
    return "%08x" % crc


def _hashlib_hash(name: str) -> Callable[[IO[bytes]], str]:
    def compute(f: IO[bytes]) -> str:
        digest = hashlib.new(name)
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
        return digest.hexdigest()
    return compute


# Hash types that can be computed here, in the order they are preferred, with
# the length of their hex form.
LOCAL_HASHES = {
    "md5": (_hashlib_hash("md5"), 32),
    "sha1": (_hashlib_hash("sha1"), 40),
    "sha256": (_hashlib_hash("sha256"), 64),
    "dropbox": (_dropbox_hash, 64),
    "crc32": (_crc32, 8),
}


def _local_hash(path: str, kind: str) -> str:
    with open(path, "rb") as f:
        return LOCAL_HASHES[kind][0](f)


# ---------------------------------------------------------------------------
# rsync: everything, folder creation and deletion included, is done by rsync
# itself, so a NAS account restricted to rsync (rrsync) works too.

RSYNC_LIST_RE = re.compile(
    r"^(?P<type>\S)\S*\s+(?P<size>[\d,.]+)\s+(?P<date>\d{4}/\d\d/\d\d)\s+(?P<time>\d\d:\d\d:\d\d)\s+(?P<name>.+)$")


def _rsync_location(dest: Destination, path: str) -> str:
    return dest.remote + ":" + path if dest.remote else path


def _rsync_root(dest: Destination) -> str:
    return _rsync_location(dest, _as_dir(dest.path or "."))


def _rsync_upload(dest: Destination, local_path: str, rel_name: str, host: str) -> str:
    # Listing first: an unreachable or missing TARGET fails here, before
    # rsync would create a missing TARGET under an unmounted mount point.
    _rsync_list(dest, host, [rel_name])
    stage = tempfile.mkdtemp(prefix=".offsite-")
    try:
        # The staged tree host/rel_name (a symlink, copied as the file it
        # points to) creates host/ and its folders at the destination in the
        # same rsync run that copies the file.
        staged = os.path.join(stage, host, rel_name)
        os.makedirs(os.path.dirname(staged))
        os.symlink(local_path, staged)
        # A failed transfer leaves nothing: rsync removes its temporary file.
        _remove_stale_rsync_temps(dest, host, rel_name)
        _rsync_transfer(dest, stage, host, rel_name)
        try:
            checked = _rsync_check(dest, stage, local_path, host, rel_name)
        except CopyError as error:
            raise _removed_bad_copy(error, lambda: _rsync_delete(dest, host, [rel_name]),
                                    _rsync_location(dest, _join(dest.path, host, rel_name)))
        _fsync_local_copy(dest, host, rel_name)
        return checked
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_local_copy(dest: Destination, host: str, rel_name: str) -> None:
    """rsync fsyncs nothing it writes: on a local TARGET (a USB disk) the
    copy and each folder from it up to TARGET are made durable here, or a
    power cut could leave an empty copy under its final name (issue 22)."""
    if dest.remote is not None:
        return
    assert dest.path is not None  # a local rsync target always has its folder
    path = _join(dest.path, host, rel_name)
    _fsync_file(path)
    top = os.path.abspath(dest.path)
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        fsync_dir(folder)
        if folder == top or folder == os.path.dirname(folder):
            break
        folder = os.path.dirname(folder)


def _rsync_transfer(dest: Destination, stage: str, host: str, rel_name: str) -> None:
    # -W: no delta algorithm (gzip data has no reusable blocks); -I: always
    # copy, even over a same-size same-time file; -O: leave folder times;
    # -K: keep a symlinked folder at the destination as it is.  --fsync (a
    # local TARGET, rsync 3.2.4 or later): the copy is durable before rsync
    # renames it to its final name (issue 22: a power cut, an empty copy).
    durable = ["--fsync"] if dest.remote is None and _rsync_can_fsync() else []
    _run_ok(dest, ["rsync", "-r", "-L", "-K", "-O", "-t", "-W", "-I"] + durable + [
                   "--", _as_dir(stage), _rsync_root(dest)],
            TRANSFER_TIMEOUT, "upload of %s/%s" % (host, rel_name))


_RSYNC_FSYNC: List[bool] = []


def _rsync_can_fsync() -> bool:
    """Whether this rsync has --fsync (3.2.4 and later; Bullseye has 3.2.3)."""
    if not _RSYNC_FSYNC:
        try:
            result = subprocess.run(["rsync", "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, timeout=LIST_TIMEOUT)
            _RSYNC_FSYNC.append(b"--fsync" in result.stdout)
        except (OSError, subprocess.SubprocessError):
            _RSYNC_FSYNC.append(False)
    return _RSYNC_FSYNC[0]


def _remove_stale_rsync_temps(dest: Destination, host: str, rel_name: str) -> None:
    """A local TARGET: the temporary files (.backup_NAME.XXXXXX) of an rsync
    that a power cut or kill stopped before its rename, removed before the
    new copy (this host's folder holds only our archives; the stack's lock
    keeps another run of ours from writing there now)."""
    if dest.remote is not None:
        return
    folder = os.path.dirname(_join(dest.path, host, rel_name))
    stale = re.compile(r"^\.backup_[^/]*\.tar\.gz(\.gpg)?\.[A-Za-z0-9]{6}$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for other in names:
        if stale.match(other) and os.path.isfile(os.path.join(folder, other)):
            _remove_quietly(os.path.join(folder, other))


def _rsync_check(dest: Destination, stage: str, local_path: str, host: str, rel_name: str) -> str:
    expected = _file_size(local_path)
    listed = _rsync_list(dest, host, [rel_name]).get(rel_name)
    _check_size(dest, host, rel_name, expected, listed[0] if listed else None)
    # With --checksum both sides read and hash their file; anything itemized
    # for it would mean a transfer is still needed, i.e. the copy differs.
    result = _run_ok(dest, ["rsync", "-r", "-L", "-K", "-O", "--checksum", "--dry-run",
                            "--itemize-changes", "--", _as_dir(stage), _rsync_root(dest)],
                     TRANSFER_TIMEOUT, "checksum check of %s/%s" % (host, rel_name))
    wanted = host + "/" + rel_name
    for line in result.stdout.splitlines():
        if line.split(" ", 1)[-1] == wanted:
            raise CopyError("%s: check of %s failed: the copy differs from %s (rsync --checksum: %s)"
                            % (dest, wanted, local_path, line.split(" ", 1)[0]))
    return "size and rsync checksum checked"


def _rsync_list(dest: Destination, host: str, globs: Sequence[str]) -> Entries:
    """{rel_name: (size, mtime)} of regular files matching globs under TARGET/host.

    One recursive listing of TARGET/ with filters: a missing host folder is
    simply empty, while a missing or unreachable TARGET fails.
    """
    filters = []
    for pattern in globs:
        parts = (host + "/" + pattern).split("/")
        for depth in range(1, len(parts)):
            filters.append("--include=/" + "/".join(parts[:depth]) + "/")
        filters.append("--include=/" + "/".join(parts))
    filters = list(dict.fromkeys(filters)) + ["--exclude=*"]
    result = _run(dest, ["rsync", "--list-only", "-r", "--no-h"] + filters + ["--", _rsync_root(dest)],
                  LIST_TIMEOUT, "listing")
    if result.returncode != 0:
        error = _failure(dest, "listing of %s" % _rsync_root(dest), result)
        if "No such file" in str(error):
            error = CopyError("%s (it must exist: create it once, or mount the disk)" % error)
        raise error
    entries = {}
    prefix = host + "/"
    for line in result.stdout.splitlines():
        match = RSYNC_LIST_RE.match(line)
        if not match or match.group("type") != "-" or not match.group("name").startswith(prefix):
            continue
        size = int(re.sub(r"[,.]", "", match.group("size")))
        mtime = time.mktime(time.strptime(match.group("date") + " " + match.group("time"),
                                          "%Y/%m/%d %H:%M:%S"))
        entries[match.group("name")[len(prefix):]] = (size, mtime)
    return entries


def _rsync_fetch(dest: Destination, host: str, rel_name: str, partial: str) -> None:
    source = _rsync_location(dest, _join(dest.path, host, rel_name))
    _run_ok(dest, ["rsync", "-t", "-W", "-I", "--", source, partial],
            TRANSFER_TIMEOUT, "download of %s/%s" % (host, rel_name))


def _rsync_delete(dest: Destination, host: str, rel_names: Sequence[str]) -> None:
    by_folder: Dict[str, List[str]] = {}
    for rel_name in rel_names:
        folder, name = _split_rel(rel_name)
        by_folder.setdefault(folder, []).append(name)
    with tempfile.TemporaryDirectory(prefix=".offsite-empty-") as empty:
        for folder, names in by_folder.items():
            # Syncing an empty folder with --delete removes what the filters
            # let through: exactly these names, and never a folder (*/ first).
            filters = ["--exclude=*/"] + ["--include=/" + name for name in names] + ["--exclude=*"]
            target = _rsync_location(dest, _as_dir(_join(dest.path, host, folder)))
            _run_ok(dest, ["rsync", "-r", "--delete"] + filters + ["--", _as_dir(empty), target],
                    LIST_TIMEOUT, "delete of %s" % ", ".join(host + "/" + _join_rel(folder, n)
                                                             for n in names))


# ---------------------------------------------------------------------------
# scp: the copy by scp, everything else by short shell commands over ssh.

def _ssh_host(dest: Destination) -> str:
    # scp wants [v6] brackets, ssh the bare address.
    assert dest.remote is not None  # an scp destination always names its host
    return dest.remote.replace("[", "").replace("]", "")


def _ssh(dest: Destination, command: str, timeout: float, action: str) -> _Result:
    return _run_ok(dest, ["ssh", "-o", "BatchMode=yes", "--", _ssh_host(dest), command], timeout, action)


def _scp(dest: Destination, source: str, target: str, action: str) -> None:
    _run_ok(dest, ["scp", "-q", "-B", "-p", "-S", "ssh", "--", source, target], TRANSFER_TIMEOUT, action)


def _q(path: str) -> str:
    return shlex.quote(path)


def _scp_target_test(dest: Destination) -> str:
    target = dest.path or "."
    return ("if [ ! -d %s ]; then echo %s >&2; exit 1; fi; "
            % (_q(target), _q("%s: no such folder on %s (it must exist: create it once)"
                              % (target, dest.remote))))


def _scp_upload(dest: Destination, local_path: str, rel_name: str, host: str) -> str:
    assert dest.remote is not None  # an scp destination always names its host
    base = _join(dest.path, host)
    final = _join(base, rel_name)
    partial = _join(base, _partial_name(rel_name))
    _ssh(dest, _scp_target_test(dest) + "mkdir -p -- %s" % _q(_join(base, _split_rel(rel_name)[0])),
         COMMAND_TIMEOUT, "creating the folder for %s/%s" % (host, rel_name))
    def remove_partial() -> None:
        _ssh(dest, "rm -f -- %s" % _q(partial), COMMAND_TIMEOUT, "removing " + partial)

    try:
        _scp_transfer(dest, local_path, partial, host, rel_name)
        checked = _scp_check(dest, local_path, partial, host, rel_name)
    except CopyError as error:
        raise _removed_bad_copy(error, remove_partial, dest.remote + ":" + partial)
    except BaseException:
        _try(remove_partial)
        raise
    # The checked copy takes the final name only now, in one rename.
    _ssh(dest, "mv -f -- %s %s" % (_q(partial), _q(final)), COMMAND_TIMEOUT,
         "renaming %s into place" % partial)
    return checked


def _scp_transfer(dest: Destination, local_path: str, remote_path: str, host: str,
                  rel_name: str) -> None:
    assert dest.remote is not None  # an scp destination always names its host
    _scp(dest, local_path, dest.remote + ":" + remote_path, "upload of %s/%s" % (host, rel_name))


def _scp_check(dest: Destination, local_path: str, remote_path: str, host: str,
               rel_name: str) -> str:
    quoted = _q(remote_path)
    result = _ssh(dest, "wc -c < %s && if command -v %s >/dev/null 2>&1; then %s < %s; fi"
                  % (quoted, REMOTE_SHA256, REMOTE_SHA256, quoted),
                  TRANSFER_TIMEOUT, "check of %s/%s" % (host, rel_name))
    lines = result.stdout.split("\n")
    try:
        remote_size = int(lines[0].strip())
    except ValueError:
        raise CopyError("%s: check of %s/%s failed: unexpected output from wc -c: %r"
                        % (dest, host, rel_name, lines[0][:80])) from None
    _check_size(dest, host, rel_name, _file_size(local_path), remote_size)
    remote_hash = lines[1].split()[0] if len(lines) > 1 and lines[1].split() else ""
    if not remote_hash:
        return "size checked (no %s on %s)" % (REMOTE_SHA256, dest.remote)
    _check_hash(dest, host, rel_name, "sha256", _local_hash(local_path, "sha256"), remote_hash)
    return "size and sha256 checked"


def _scp_list(dest: Destination, host: str, globs: Sequence[str]) -> Entries:
    """{rel_name: (size, mtime)} of regular files matching globs under TARGET/host."""
    patterns = []
    for pattern in globs:
        folder, name = _split_rel(pattern)
        # Names are validated plain; only the "*" of "*.tar.gz" must stay unquoted.
        quoted_name = "*" + _q(name[1:]) if name.startswith("*") else _q(name)
        patterns.append(_q(folder) + "/" + quoted_name if folder else quoted_name)
    base = _join(dest.path, host)
    script = (_scp_target_test(dest)
              + "if [ -d %s ]; then cd -- %s || exit 1; else exit 0; fi; " % (_q(base), _q(base))
              + "for f in %s; do " % " ".join(patterns)
              + '[ -f "$f" ] || continue; '
              # GNU stat, else BSD stat (a NAS need not run Linux).
              + "stat -c '%s %Y %n' -- \"$f\" 2>/dev/null || stat -f '%z %m %N' -- \"$f\" || exit 1; "
              + "done")
    result = _ssh(dest, script, LIST_TIMEOUT, "listing of %s" % base)
    entries = {}
    for line in result.stdout.splitlines():
        fields = line.split(" ", 2)
        if len(fields) == 3 and fields[0].isdigit():
            entries[fields[2]] = (int(fields[0]), float(fields[1]))
    return entries


def _scp_fetch(dest: Destination, host: str, rel_name: str, partial: str) -> None:
    assert dest.remote is not None  # an scp destination always names its host
    source = dest.remote + ":" + _join(dest.path, host, rel_name)
    _scp(dest, source, partial, "download of %s/%s" % (host, rel_name))


def _scp_delete(dest: Destination, host: str, rel_names: Sequence[str]) -> None:
    base = _join(dest.path, host)
    # rm without -r: a folder by any of these names is an error, not deleted.
    _ssh(dest, "cd -- %s && rm -f -- %s" % (_q(base), " ".join(_q(name) for name in rel_names)),
         COMMAND_TIMEOUT, "delete of %s" % ", ".join(host + "/" + name for name in rel_names))


# ---------------------------------------------------------------------------
# rclone

HASH_ALIASES = {"md5": "md5", "sha1": "sha1", "sha-1": "sha1", "sha256": "sha256",
                "sha-256": "sha256", "dropbox": "dropbox", "dropboxhash": "dropbox",
                "crc32": "crc32", "crc-32": "crc32"}
RFC3339_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?(Z|z|[+-]\d\d:\d\d)?$")


def _rclone_path(dest: Destination, *parts: str) -> str:
    root = dest.target
    tail = "/".join(part for part in parts if part)
    if not tail:
        return root
    return root + tail if root.endswith((":", "/")) else root + "/" + tail


def _rclone_features(dest: Destination) -> Tuple[List[str], bool]:
    """(hash names as rclone spells them, can rename server-side)."""
    result = _run_ok(dest, ["rclone", "backend", "features", dest.target], LIST_TIMEOUT,
                     "reaching the remote")
    try:
        features = json.loads(result.stdout)
        return list(features.get("Hashes") or []), bool(features.get("Features", {}).get("Move"))
    except (ValueError, AttributeError):
        raise CopyError("%s: reaching the remote failed: rclone backend features printed no JSON"
                        % dest) from None


def rclone_local_path(target: str) -> Optional[str]:
    """The folder of an rclone target on the local backend (":local:/mnt/usb"
    or ":local,opt=x:/mnt/usb"), else None."""
    if not target.startswith((":local:", ":local,")):
        return None
    return target.partition(":")[2].partition(":")[2] or "."


def _rclone_upload(dest: Destination, local_path: str, rel_name: str, host: str) -> str:
    local_target = rclone_local_path(dest.target)
    if local_target is not None and not os.path.isdir(local_target):
        # As for rsync: rclone would create it, on the SD card under the
        # mount point of a disk that is not mounted.
        raise CopyError("%s: %s does not exist (it must exist: create it once, or mount the disk)"
                        % (dest, local_target))
    checked = _rclone_copy(dest, local_path, rel_name, host)
    if local_target is not None:
        # rclone creates local files 0644: the copy keeps the archive's mode.
        os.chmod(os.path.join(local_target, host, rel_name),
                 stat.S_IMODE(os.stat(local_path).st_mode))
    return checked


def _rclone_copy(dest: Destination, local_path: str, rel_name: str, host: str) -> str:
    hashes, can_rename = _rclone_features(dest)
    final = _rclone_path(dest, host, rel_name)
    staged = _rclone_path(dest, host, _partial_name(rel_name)) if can_rename else final
    def remove_staged() -> None:
        _rclone_remove_if_present(dest, staged)

    try:
        _rclone_transfer(dest, local_path, staged, host, rel_name)
    except BaseException:
        # Only ever a .partial: a failed upload to an object store leaves the
        # previous object of that name untouched, and it must stay.
        if staged != final:
            _try(remove_staged)
        raise
    try:
        checked = _rclone_check(dest, local_path, staged, hashes, host, rel_name)
    except CopyError as error:
        raise _removed_bad_copy(error, remove_staged, staged)
    if staged != final:
        _run_ok(dest, ["rclone", "moveto", "--ignore-times", staged, final], TRANSFER_TIMEOUT,
                "renaming %s into place" % staged)
        item = _rclone_stat(dest, final)
        _check_size(dest, host, rel_name, _file_size(local_path), item and item[0])
    return checked


def _rclone_transfer(dest: Destination, local_path: str, remote_path: str, host: str,
                     rel_name: str) -> None:
    # --ignore-times: copy even over a same-size same-time file.
    _run_ok(dest, ["rclone", "copyto", "--ignore-times", local_path, remote_path], TRANSFER_TIMEOUT,
            "upload of %s/%s" % (host, rel_name))


def _rclone_check(dest: Destination, local_path: str, remote_path: str, hashes: Sequence[str],
                  host: str, rel_name: str) -> str:
    item = _rclone_stat(dest, remote_path)
    _check_size(dest, host, rel_name, _file_size(local_path), item and item[0])
    offered = {HASH_ALIASES.get(name.lower()): name for name in hashes}
    kind = next((kind for kind in LOCAL_HASHES if kind in offered), None)
    if kind is None:
        return "size checked (the remote offers no md5, sha1, sha256, dropbox or crc32 hash)"
    result = _run_ok(dest, ["rclone", "hashsum", offered[kind], remote_path], TRANSFER_TIMEOUT,
                     "%s check of %s/%s" % (kind, host, rel_name))
    words = result.stdout.split()
    remote_hash = words[0].lower() if words else ""
    if not re.match(r"^[0-9a-f]{%d}$" % LOCAL_HASHES[kind][1], remote_hash):
        # Some objects carry no hash (e.g. S3 multipart uploads by other tools).
        return "size checked (the remote has no %s for this file)" % kind
    _check_hash(dest, host, rel_name, kind, _local_hash(local_path, kind), remote_hash)
    return "size and %s checked" % kind


def _rclone_stat(dest: Destination, remote_path: str) -> Optional[Tuple[int, float]]:
    """(size, mtime) of one remote file, None if it is not there."""
    result = _run(dest, ["rclone", "lsjson", "--no-mimetype", remote_path], LIST_TIMEOUT, "listing")
    if result.returncode == 3:  # rclone: directory not found
        return None
    if result.returncode != 0:
        raise _failure(dest, "listing of %s" % remote_path, result)
    name = remote_path.rpartition("/")[2].rpartition(":")[2]
    for item in _json_list(dest, result.stdout):
        if item.get("Name") == name and not item.get("IsDir"):
            return int(item.get("Size", -1)), _rfc3339(item.get("ModTime", ""))
    return None


def _rclone_list(dest: Destination, host: str, globs: Sequence[str]) -> Entries:
    """{rel_name: (size, mtime)} of files matching globs under TARGET/host."""
    includes = []
    for pattern in globs:
        includes += ["--include", "/" + pattern]
    result = _run(dest, ["rclone", "lsjson", "-R", "--files-only", "--no-mimetype"] + includes
                  + [_rclone_path(dest, host)], LIST_TIMEOUT, "listing")
    if result.returncode == 3:  # rclone: directory not found, i.e. nothing there yet
        return {}
    if result.returncode != 0:
        raise _failure(dest, "listing of %s" % _rclone_path(dest, host), result)
    entries = {}
    for item in _json_list(dest, result.stdout):
        if not item.get("IsDir") and "Path" in item:
            entries[item["Path"]] = (int(item.get("Size", -1)), _rfc3339(item.get("ModTime", "")))
    return entries


def _rclone_fetch(dest: Destination, host: str, rel_name: str, partial: str) -> None:
    _run_ok(dest, ["rclone", "copyto", "--ignore-times", _rclone_path(dest, host, rel_name), partial],
            TRANSFER_TIMEOUT, "download of %s/%s" % (host, rel_name))


def _rclone_delete(dest: Destination, host: str, rel_names: Sequence[str]) -> None:
    for rel_name in rel_names:
        # deletefile removes one file and refuses folders.
        _run_ok(dest, ["rclone", "deletefile", _rclone_path(dest, host, rel_name)], COMMAND_TIMEOUT,
                "delete of %s/%s" % (host, rel_name))


def _rclone_remove_if_present(dest: Destination, remote_path: str) -> None:
    if _rclone_stat(dest, remote_path) is not None:
        _run_ok(dest, ["rclone", "deletefile", remote_path], COMMAND_TIMEOUT, "removing " + remote_path)


def _json_list(dest: Destination, text: str) -> List[Json]:
    try:
        items = json.loads(text)
    except ValueError:
        raise CopyError("%s: listing failed: rclone lsjson printed no JSON" % dest) from None
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _rfc3339(text: str) -> float:
    """rclone's ModTime (RFC 3339, nanoseconds) as epoch seconds; 0.0 if unreadable."""
    match = RFC3339_RE.match(text)
    if not match:
        return 0.0
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    epoch: float = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    fraction, zone = match.group(7), match.group(8)
    if fraction:
        epoch += float("0" + fraction)
    if zone and zone not in "Zz":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        epoch -= offset if zone[0] == "+" else -offset
    return float(epoch)


# ---------------------------------------------------------------------------
# Checks shared by the methods

def _check_size(dest: Destination, host: str, rel_name: str, expected: int,
                got: Optional[int]) -> None:
    if got is None:
        raise CopyError("%s: check of %s/%s failed: the copy is not there after the upload"
                        % (dest, host, rel_name))
    if got != expected:
        raise CopyError("%s: check of %s/%s failed: the copy has %d bytes, the local file %d"
                        % (dest, host, rel_name, got, expected))


def _check_hash(dest: Destination, host: str, rel_name: str, kind: str, expected: str,
                got: str) -> None:
    if expected.lower() != got.lower():
        raise CopyError("%s: check of %s/%s failed: %s of the copy %s, of the local file %s"
                        % (dest, host, rel_name, kind, got, expected))


def _removed_bad_copy(error: CopyError, remove: Callable[[], None], where: str) -> CopyError:
    """error, saying whether the copy that failed its check could be removed."""
    if _try(remove):
        return CopyError("%s; the copy was removed" % error)
    return CopyError("%s; the copy could not be removed, delete %s by hand" % (error, where))


def _try(action: Callable[[], None]) -> bool:
    try:
        action()
        return True
    except (CopyError, OSError):
        return False
