"""Two throwaway gpg keys in a temporary GNUPGHOME, quick to make
(ed25519/cv25519): PLAIN_KEY without a passphrase, SECRET_KEY with
PASSPHRASE.  Used by test_encryption.py and test_fetch.py."""
import os
import shutil
import subprocess
import tempfile

PLAIN_KEY = "backup-test@example.invalid"
SECRET_KEY = "passphrase-test@example.invalid"
PASSPHRASE = "correct horse battery staple"


def gpg(home, *args, **kwargs):
    env = dict(os.environ, GNUPGHOME=home)
    kwargs.setdefault("check", True)
    return subprocess.run(["gpg", "--batch", "--no-tty"] + list(args), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def make_keyring():
    """A GNUPGHOME with the two test keys (ed25519/cv25519: quick to make)."""
    home = tempfile.mkdtemp(prefix="gpg-")
    os.chmod(home, 0o700)
    gpg(home, "--passphrase", "", "--quick-gen-key", "Test <%s>" % PLAIN_KEY,
        "future-default", "default", "never")
    gpg(home, "--pinentry-mode", "loopback", "--passphrase", PASSPHRASE, "--quick-gen-key",
        "Test <%s>" % SECRET_KEY, "future-default", "default", "never")
    return home


def drop_keyring(home):
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=dict(os.environ, GNUPGHOME=home),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(home, ignore_errors=True)
