"""Power cuts during `backup.py 3 --keep 2 --copy-to rsync:USB --encrypt-to
KEY` (issue 22): a local rsync destination (a USB disk) and gpg, real.

USB is on the power-cut fs beside the stack.  Besides the local invariants
of test_powercut_backup, every file at the destination with a final name
(no leading dot) must be a whole .gpg copy: gpg decrypts it to an archive
that passes restore.py --verify.  The next run (the same command) must
succeed and leave no temporary file at the destination or in backups/.
"""
import hashlib
import os
import shutil
import subprocess
import unittest

from iotstack_backup import iotstack
from tests.powercut import harness
from tests.powercut.stack import MISSING, NOW
from tests.test_powercut_backup import BackupPowerCutTest

HAVE_TOOLS = all(shutil.which(tool) for tool in ("gpg", "gpgconf", "rsync"))
KEY = "backup-test@example.invalid"


@unittest.skipIf(MISSING, MISSING)
@unittest.skipUnless(HAVE_TOOLS, "needs gpg and rsync")
class CopiesPowerCutTest(BackupPowerCutTest):
    def setUp(self):
        super().setUp()
        self.gnupghome = harness.fast_tmp("powercut-gpg-")
        os.chmod(self.gnupghome, 0o700)
        self.addCleanup(self.drop_keyring)
        self.gpg("--passphrase", "", "--quick-gen-key", "Test <%s>" % KEY,
                 "future-default", "default", "never")
        os.environ["GNUPGHOME"] = self.gnupghome
        os.makedirs(os.path.join(self.backing, "usb"))
        self.usb_live = os.path.join(self.mount, "usb")
        self.good_copies = set()

    def drop_keyring(self):
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=dict(os.environ, GNUPGHOME=self.gnupghome))
        shutil.rmtree(self.gnupghome, ignore_errors=True)

    def gpg(self, *args, **kwargs):
        return subprocess.run(["gpg", "--batch", "--no-tty"] + list(args),
                              env=dict(os.environ, GNUPGHOME=self.gnupghome),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

    def copy_args(self):
        return ["--keep", "2", "--copy-to", "rsync:" + self.usb_live, "--encrypt-to", KEY]

    def copy_problems(self, after_next_run):
        """Each copy with a final name whole; after the next run, no
        temporary file either."""
        problems = []
        for folder, _dirs, files in os.walk(self.usb_live):
            for name in files:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, self.usb_live)
                if name.startswith("."):
                    if after_next_run:
                        problems.append("a temporary file at the destination: %s" % rel)
                    continue
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if digest in self.good_copies:
                    continue
                plain = os.path.join(self.tmp, "decrypted.tar.gz")
                result = self.gpg("--yes", "--output", plain, "--decrypt", path)
                code = self.restore(self.live, "--verify", plain)[0] if not result.returncode \
                    else None
                if os.path.exists(plain):
                    os.unlink(plain)
                if code != 0:
                    problems.append("the copy %s is not whole (gpg %d, --verify %s)"
                                    % (rel, result.returncode, code))
                else:
                    self.good_copies.add(digest)
        return problems

    def test_backup_3_keep_2_with_a_rolling_archive(self):
        (code, _out, err), record = self.record(
            lambda stack: self.backup(stack, NOW, *self.copy_args()))
        self.assertEqual(code, 0, err)
        after = harness.listing(os.path.join(self.stack, "backups"))
        may_go = {rel for rel in self.before if rel not in after}
        reference = os.path.join(self.tmp, "reference")
        subprocess.run(["cp", "-a", self.stack, reference], check=True)
        self.assertEqual(self.backup(reference, NOW, "--keep", "2")[0], 0)
        twice = harness.listing(os.path.join(reference, "backups"))
        may_go |= {rel for rel in self.before if rel not in twice}
        allowed = {"backups/" + rel for rel in self.before} | {
            ".tmp/" + rel for rel in harness.listing(os.path.join(self.stack, ".tmp"))}
        copies = [os.path.join(folder, name) for folder, _d, names in
                  os.walk(os.path.join(self.backing, "usb")) for name in names]
        self.assertEqual(len(copies), 2, copies)
        harness.build_strict(record, len(record["ops"]) - 1, self.mount)
        self.assertEqual(self.copy_problems(True), [])
        self.assertEqual(len([1 for _f, _d, names in os.walk(self.usb_live) for _ in names]), 2,
                         "a finished run's copies are durable")

        def next_run(cut, kind):
            before = self.state_problems(self.live, may_go) + self.copy_problems(False)
            problems = ["before the next run: %s" % p for p in before]
            code, out, err = self.backup(self.live, NOW, *self.copy_args())
            if code != 0:
                problems.append("the next backup failed (%d): %s" % (code, err.strip()[-300:]))
            after = self.state_problems(self.live, may_go) + self.copy_problems(True)
            problems += ["after the next run: %s" % p for p in after]
            return problems + self.leftover_problems(self.live, allowed)

        self.sweep(record, "backup.py 3 --keep 2 --copy-to rsync: --encrypt-to", next_run)


del BackupPowerCutTest  # run once, in its own module

if __name__ == "__main__":
    unittest.main()
