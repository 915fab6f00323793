"""gpg encryption of off-site copies: --encrypt-to on backup, decrypt on restore.

backup.py keeps its local archive a plain .tar.gz and sends only an
encrypted copy, NAME.tar.gz.gpg, to each --copy-to destination; restore.py
--from fetches the .gpg and decrypts it with the user's gpg (the agent, or a
passphrase file) before its usual full check.  The gpg command lines are
built by pure functions; the thin layer below runs them.

How it keeps data safe: the recipients are checked before the backup stops
or writes anything, by encrypting nothing to them (which fails exactly as
the real encryption would: a missing or expired key, no encryption subkey);
gpg reads the archive and writes the ciphertext itself (streaming, no
compression on top of gzip); no plaintext copy of an archive is ever
written anywhere but beside the local archive, and there only under a
temporary name that becomes the archive by one rename after an fsync; a
decryption that fails (wrong key, damaged or tampered file: gpg checks its
MDC) leaves no file behind.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Iterable, List, Mapping, Optional, Sequence

from . import run

GPG = "gpg"
SUFFIX = ".gpg"

# Encrypting or decrypting a multi-gigabyte archive on a Pi takes minutes;
# checking the keys does not.
CHECK_TIMEOUT = 60
CRYPT_TIMEOUT = 6 * 3600

INSTALL_HINT = "install it with: sudo apt install gnupg"

PASSPHRASE_ENV = "IOTSTACK_GPG_PASSPHRASE_FILE"


class EncryptionError(Exception):
    """gpg failed; str(e) is one line naming what and why."""


# ---------------------------------------------------------------------------
# Command lines (pure)

def check_recipient(text: str) -> str:
    """A recipient as given to --encrypt-to: a key id, fingerprint or e-mail.
    ValueError for what gpg would take as an option or cannot be one key."""
    recipient = text.strip()
    if not recipient:
        raise ValueError("an --encrypt-to recipient cannot be empty")
    if recipient.startswith("-"):
        raise ValueError("%r is not a key id, fingerprint or e-mail address" % text)
    if any(ord(c) < 32 or ord(c) == 127 for c in recipient):
        raise ValueError("%r contains control characters" % text)
    return recipient


def _common(batch: bool = True) -> List[str]:
    # --no-tty and --batch: never a question on the terminal of a cron job.
    argv = [GPG, "--no-tty", "--yes"]
    if batch:
        argv.insert(1, "--batch")
    return argv


def encrypt_argv(recipients: Iterable[str], source: str, output: str) -> List[str]:
    """Encrypt source to every recipient into output.  --trust-model always:
    the user put these public keys in the keyring to be used unattended;
    without it gpg refuses an imported key it has not been told to trust.
    --compress-algo none: the archive is gzip already.  --auto-key-locate
    local: the keyring only, never a lookup of an e-mail address on the
    network (WKD) in the middle of a backup."""
    argv = _common() + ["--auto-key-locate", "local", "--trust-model", "always",
                        "--compress-algo", "none", "--encrypt"]
    for recipient in recipients:
        argv += ["--recipient", recipient]
    return argv + ["--output", output, "--", source]


def check_argv(recipients: Iterable[str]) -> List[str]:
    """Encrypt nothing (stdin /dev/null) to the recipients, output discarded:
    fails exactly where the encryption of an archive would."""
    return encrypt_argv(recipients, "-", os.devnull)


def decrypt_argv(source: str, output: str, passphrase_file: Optional[str] = None,
                 batch: bool = True) -> List[str]:
    """Decrypt source into output.  With a passphrase file, gpg asks no
    agent or pinentry (loopback); without, the agent supplies the key's
    passphrase or asks for it (batch=False on a terminal)."""
    argv = _common(batch=batch or passphrase_file is not None)
    if passphrase_file is not None:
        argv += ["--pinentry-mode", "loopback", "--passphrase-file", passphrase_file]
    return argv + ["--decrypt", "--output", output, "--", source]


def encrypted_name(name: str) -> str:
    return name + SUFFIX


def plain_name(name: str) -> str:
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


# gpg's stderr lines look like "gpg: bob@example.com: skipped: No public key".
GPG_PREFIX_RE = re.compile(r"^gpg: ")
NOISE_RE = re.compile(r"^(encrypted with |\s+\"|using |WARNING: unsafe |"
                      r"[A-Z0-9]+/[A-F0-9]+ \d{4}-\d\d-\d\d)")


def gpg_cause(stderr: str, returncode: int) -> str:
    """The line of gpg's stderr that says what went wrong."""
    lines = [GPG_PREFIX_RE.sub("", line.strip()) for line in stderr.splitlines()]
    lines = [line for line in lines if line and not NOISE_RE.match(line)]
    for line in lines:
        if "skipped" in line or "No secret key" in line or "Bad passphrase" in line \
                or "No public key" in line or "unusable public key" in line:
            return line
    return lines[-1] if lines else "gpg exit status %d" % returncode


# ---------------------------------------------------------------------------
# Running gpg

def _run(argv: Sequence[str], timeout: int, what: str, interactive: bool = False) -> None:
    """Run gpg; EncryptionError (one line) on a failure, a missing gpg, a
    timeout.  interactive: stdin and the terminal stay gpg's, so that
    pinentry can ask for a passphrase."""
    try:
        proc = subprocess.Popen(
            argv, stdin=None if interactive else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=not interactive)
    except FileNotFoundError:
        raise EncryptionError("%s: gpg is not installed (not found on PATH); %s"
                              % (what, INSTALL_HINT)) from None
    try:
        _out, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, interactive)
        raise EncryptionError("%s: gpg took longer than %d seconds and was stopped"
                              % (what, timeout)) from None
    except BaseException:
        _kill(proc, interactive)
        raise
    if proc.returncode != 0:
        raise EncryptionError("%s: %s" % (what, " ".join(
            gpg_cause(stderr.decode("utf-8", "replace"), proc.returncode).split())))


def _kill(proc: subprocess.Popen[bytes], interactive: bool) -> None:
    try:
        if interactive:
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.communicate()


def check_recipients(recipients: Iterable[str]) -> None:
    """UserError (exit 2) unless gpg is there and can encrypt to every
    recipient: called before anything is stopped or written."""
    try:
        _run(check_argv(recipients), CHECK_TIMEOUT, "--encrypt-to")
    except EncryptionError as e:
        message = str(e)
        if "not installed" not in message:
            message += ("; import the public key as the user that runs the backup "
                        "(gpg --import KEY.asc; root for root's crontab)")
        raise run.UserError(message, run.EXIT_USAGE) from None


def encrypt(recipients: Iterable[str], source: str, output: str) -> None:
    """Write the encrypted copy of source to output (gpg streams it), with
    the archive's mode (gpg makes it 0644; the copies keep the mode)."""
    from .iotstack import ARCHIVE_MODE
    try:
        _run(encrypt_argv(recipients, source, output), CRYPT_TIMEOUT,
             "encrypting %s" % os.path.basename(source))
        os.chmod(output, ARCHIVE_MODE)
    except BaseException:
        _remove_quietly(output)
        raise


def passphrase_file_from(option: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """--passphrase-file, else $IOTSTACK_GPG_PASSPHRASE_FILE, else None;
    UserError (exit 2) for a file that cannot be read."""
    path = option or environ.get(PASSPHRASE_ENV) or None
    if path is None:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        source = "--passphrase-file" if option else "$" + PASSPHRASE_ENV
        raise run.UserError("%s %s: no such readable file" % (source, path), run.EXIT_USAGE)
    return os.path.abspath(path)


def decrypt(source: str, target: str, passphrase_file: Optional[str] = None) -> None:
    """Decrypt source into target: into a temporary name beside target,
    fsynced, then renamed; nothing is left behind on failure."""
    from .iotstack import ARCHIVE_MODE, fsync_dir, partial_path
    temp = partial_path(target)
    interactive = passphrase_file is None and sys.stdin is not None and sys.stdin.isatty()
    if interactive and "GPG_TTY" not in os.environ:
        try:
            os.environ["GPG_TTY"] = os.ttyname(sys.stdin.fileno())
        except (OSError, ValueError):
            pass
    try:
        _run(decrypt_argv(source, temp, passphrase_file, batch=not interactive), CRYPT_TIMEOUT,
             "decrypting %s" % os.path.basename(source), interactive=interactive)
        os.chmod(temp, ARCHIVE_MODE)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target)
        fsync_dir(os.path.dirname(target) or ".")
    except BaseException:
        _remove_quietly(temp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
