"""restore.py --from: fetching an archive back from a copy, never over a local file.

Rolling names repeat every week and a destination can hold an old plain
copy beside a newer `.gpg` one, so a fetch decides with care what it takes
and where it puts it.  What it takes: where the destination holds both
NAME and NAME.gpg, the newer of the two (by the time the copy kept), and it
says which.  Where it puts it: the download goes to a temporary name
(`.NAME.PID.fetched.partial`, which the next backup removes if this run is
killed) and only then gets a name: NAME when nothing local has it; when a
local NAME exists, the fetched copy is compared with it byte for byte --
identical, the temporary file goes and the local one is restored; different,
the local file is left exactly as it is and the fetched copy is kept apart
as NAME-STEM.fetched.tar.gz (-2, -3... if taken), and the run says which
one it restores.  `--dry-run` fetches into `.tmp/` of the stack and removes
it after the check: nothing is written under `backups/`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import filecmp
import os
import shutil
from typing import Callable, Mapping, Optional, TextIO, Tuple

from . import encryption, iotstack, offsite, run

FETCHED_MARK = ".fetched"


@dataclasses.dataclass(frozen=True)
class Fetched:
    """The archive to restore, and the folder to remove after the run (a
    dry run's temporary copy), if any."""

    path: str
    temporary_dir: "str | None" = None


def choose_remote(name: str, listed: Mapping[str, Tuple[int, float]],
                  ) -> "tuple[str | None, str | None]":
    """(the remote name to fetch, a line saying why) from listed, the
    destination's {rel_name: (size, mtime)} for NAME and NAME.gpg.  A
    name given with .gpg is taken as it is.  Both there: the newer (a tie
    goes to the encrypted copy, made by the more careful setting)."""
    if name.endswith(encryption.SUFFIX):
        return (name if name in listed else None), None
    encrypted = encryption.encrypted_name(name)
    if name in listed and encrypted in listed:
        plain_time, gpg_time = listed[name][1], listed[encrypted][1]
        newer, older = (name, encrypted) if plain_time > gpg_time else (encrypted, name)
        return newer, ("%s and %s are both there: taking %s, the newer (%s; the other %s)"
                       % (name, encrypted, newer, when(listed[newer][1]),
                          when(listed[older][1])))
    for candidate in (name, encrypted):
        if candidate in listed:
            return candidate, None
    return None, None


def when(mtime: float) -> str:
    return datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")


def apart_path(local: str, exists: Callable[[str], bool]) -> str:
    """Where a fetched copy that differs from the local file goes: beside
    it, as STEM.fetched.tar.gz (then -2, -3...)."""
    folder, base = os.path.split(local)
    stem = base[:-len(".tar.gz")] if base.endswith(".tar.gz") else base
    chosen = iotstack.first_free_stem(stem + FETCHED_MARK,
                                      lambda s: exists(os.path.join(folder, s + ".tar.gz")))
    return os.path.join(folder, chosen + ".tar.gz")


def fetch(stack: str, host: str, name: str, out: TextIO,
          options: argparse.Namespace) -> Fetched:
    """Fetch NAME (or NAME.gpg) from options.source for a restore; see the
    module.  options: the restore's args (source, owner, passphrase_file,
    dry_run)."""
    source = options.source
    remote, note = pick(source, host, name)
    if note:
        out.write(note + "\n")
    plain = encryption.plain_name(name)
    backups = os.path.join(stack, "backups")
    local = os.path.join(backups, plain)
    if options.dry_run:
        folder = os.path.join(stack, ".tmp", "fetch.%d" % os.getpid())
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, os.path.basename(plain))
    else:
        folder = None
        iotstack.ensure_dir(os.path.dirname(local), options.owner)
        temp = os.path.join(os.path.dirname(local), ".%s.%d%s.partial" % (
            os.path.basename(plain), os.getpid(), FETCHED_MARK))
    try:
        decrypted = download(source, host, remote, temp, options.passphrase_file)
        out.write("Fetched %s from %s (host %s)\n" % (remote, source, host))
        if decrypted:
            out.write("Decrypted it with gpg\n")
        if folder is not None:
            out.write("Dry run: the fetched copy is checked in %s and removed; nothing is "
                      "written under backups/\n" % os.path.relpath(folder, stack))
            return Fetched(temp, folder)
        return Fetched(place(stack, temp, local, out, options.owner))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def pick(source: offsite.Destination, host: str, name: str) -> "tuple[str, str | None]":
    """The remote name to fetch (newer of NAME and NAME.gpg), or a UserError."""
    candidates = [name] if name.endswith(encryption.SUFFIX) else \
        [name, encryption.encrypted_name(name)]
    try:
        listed = offsite.find(source, host, candidates)
    except (offsite.CopyError, ValueError) as e:
        raise run.UserError("cannot fetch %s from %s (host %s): %s" % (name, source, host, e)) \
            from None
    remote, note = choose_remote(name, listed)
    if remote is None:
        raise run.UserError("cannot fetch %s from %s (host %s): it is not there (nor %s); "
                            "see restore.py --list --from %s" % (
                                name, source, host, " or ".join(candidates[1:]) or "a plain copy",
                                source))
    return remote, note


def download(source: offsite.Destination, host: str, remote: str, temp: str,
             passphrase_file: Optional[str]) -> bool:
    """remote into temp, decrypted when it is a .gpg copy (then True)."""
    encrypted = remote.endswith(encryption.SUFFIX)
    target = temp + encryption.SUFFIX if encrypted else temp
    try:
        offsite.download(source, host, remote, target)
    except (offsite.CopyError, ValueError) as e:
        raise run.UserError("cannot fetch %s from %s (host %s): %s" % (remote, source, host, e)) \
            from None
    if not encrypted:
        return False
    try:
        encryption.decrypt(target, temp, passphrase_file)
    except encryption.EncryptionError as e:
        raise run.UserError("%s; the restore needs the secret key of a recipient (gpg "
                            "--import it from your emergency kit) and its passphrase"
                            % e) from None
    finally:
        os.unlink(target)
    return True


def place(stack: str, temp: str, local: str, out: TextIO,
          owner: Optional[iotstack.Owner]) -> str:
    """Give the fetched temp a name that replaces nothing; the path to restore."""
    shown = os.path.relpath(local, stack)
    if not os.path.lexists(local):
        final = local
        out.write("Kept as %s\n" % shown)
    elif os.path.isfile(local) and filecmp.cmp(temp, local, shallow=False):
        os.unlink(temp)
        out.write("%s is already here, identical to the fetched copy: restoring it\n" % shown)
        return local
    else:
        final = apart_path(local, os.path.lexists)
        out.write("%s differs from the fetched copy and is left as it is; the fetched copy is "
                  "kept as %s: restoring the fetched copy\n"
                  % (shown, os.path.relpath(final, stack)))
    os.chmod(temp, iotstack.ARCHIVE_MODE)
    iotstack.chown_to(temp, owner)
    rename_no_replace(temp, final)
    iotstack.fsync_dir(os.path.dirname(final))
    return final


def rename_no_replace(source: str, final: str) -> None:
    """Rename source to final, never over an existing file: link then
    unlink (link fails if the name was taken meanwhile); on a filesystem
    without hard links (FAT), a check and a rename."""
    try:
        os.link(source, final)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "already there", final) from None
        os.rename(source, final)
        return
    os.unlink(source)
