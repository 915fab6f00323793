"""--encrypt-to and restore --from of .gpg copies, against the real gpg: two
throwaway keys in a temporary GNUPGHOME (one without a passphrase, one with),
and real rsync and rclone destinations.  The argv builders are table-tested."""
import os
import stat
import shutil
import subprocess
import tempfile
import unittest
from unittest import mock

from iotstack_backup import encryption, iotstack, run
from tests.gpg_keyring import PASSPHRASE, PLAIN_KEY, SECRET_KEY, drop_keyring, gpg, make_keyring
from tests.plainstack import PlainStackTestCase
from tests.stacktree import diff_snapshots, snapshot

DATED = "backup/backup_2026-11-26_0200.tar.gz"
HAVE_TOOLS = all(shutil.which(tool) for tool in ("gpg", "gpgconf", "rsync", "rclone"))


class ArgvTest(unittest.TestCase):
    def test_encrypt_and_check(self):
        self.assertEqual(
            encryption.encrypt_argv(["a@b", "0xABCD"], "/x/a.tar.gz", "/x/.a.gpg"),
            ["gpg", "--batch", "--no-tty", "--yes", "--auto-key-locate", "local",
             "--trust-model", "always", "--compress-algo", "none", "--encrypt", "--recipient", "a@b", "--recipient", "0xABCD",
             "--output", "/x/.a.gpg", "--", "/x/a.tar.gz"])
        check = encryption.check_argv(["a@b"])
        self.assertEqual(check[-4:], ["--output", os.devnull, "--", "-"])  # stdin: /dev/null

    def test_decrypt(self):
        table = [
            ((None, True), ["gpg", "--batch", "--no-tty", "--yes", "--decrypt"]),
            ((None, False), ["gpg", "--no-tty", "--yes", "--decrypt"]),  # pinentry may ask
            (("/p", False), ["gpg", "--batch", "--no-tty", "--yes", "--pinentry-mode",
                             "loopback", "--passphrase-file", "/p", "--decrypt"]),
        ]
        for (passphrase, batch), head in table:
            self.assertEqual(encryption.decrypt_argv("/b/x.gpg", "/b/.x.partial", passphrase,
                                                     batch),
                             head + ["--output", "/b/.x.partial", "--", "/b/x.gpg"])

    def test_recipients_and_names(self):
        self.assertEqual(encryption.check_recipient(" a@b "), "a@b")
        for bad in ("", "  ", "--homedir=/tmp", "a\nb"):
            with self.assertRaises(ValueError):
                encryption.check_recipient(bad)
        self.assertEqual(encryption.plain_name("backup/x.tar.gz.gpg"), "backup/x.tar.gz")
        self.assertEqual(encryption.plain_name("backup/x.tar.gz"), "backup/x.tar.gz")

    def test_the_cause_is_the_line_that_says_it(self):
        stderr = ("gpg: nobody@example.invalid: skipped: No public key\n"
                  "gpg: [stdin]: encryption failed: No public key\n")
        self.assertEqual(encryption.gpg_cause(stderr, 2),
                         "nobody@example.invalid: skipped: No public key")
        self.assertEqual(encryption.gpg_cause("", 2), "gpg exit status 2")


@unittest.skipUnless(HAVE_TOOLS, "needs gpg, rsync and rclone")
def changes_beside_logs(before, after):
    """What changed, but for backups/ itself (a failure's log was added in
    backups/logs/, which the snapshots skip)."""
    return [line for line in diff_snapshots(before, after) if not line.startswith("backups:")]


class EncryptedCopyTest(PlainStackTestCase):
    @classmethod
    def setUpClass(cls):
        cls.gnupghome = make_keyring()

    @classmethod
    def tearDownClass(cls):
        drop_keyring(cls.gnupghome)

    def setUp(self):
        super().setUp()
        os.environ["GNUPGHOME"] = self.gnupghome
        os.environ.pop(encryption.PASSPHRASE_ENV, None)
        self.usb, self.nas = os.path.join(self.tmp, "usb"), os.path.join(self.tmp, "nas")
        os.mkdir(self.usb)
        os.mkdir(self.nas)
        self.host = iotstack.host_folder()

    def backup_encrypted(self, key=PLAIN_KEY, *more):
        code, out, err = self.backup("3", "--encrypt-to", key, "--copy-to", "rsync:" + self.usb,
                                     "--copy-to", "rclone::local:" + self.nas, *more)
        self.assertEqual((code, err), (0, ""), out)

    def decrypted(self, path):
        return gpg(self.gnupghome, "--decrypt", path).stdout

    def test_copies_are_gpg_and_the_local_archive_stays_plain(self):
        self.backup_encrypted()
        with open(self.dated, "rb") as f:
            data = f.read()
        self.assertEqual(data[:2], b"\x1f\x8b")
        for root in (self.usb, self.nas):
            folder = os.path.join(root, self.host)
            self.assertEqual(sorted(os.listdir(os.path.join(folder, "backup"))),
                             ["backup_2026-11-26_0200.tar.gz.gpg"], root)
            self.assertEqual(os.listdir(os.path.join(folder, "rolling")),
                             ["backup_4.tar.gz.gpg"], root)
            for rel in (DATED + ".gpg", "rolling/backup_4.tar.gz.gpg"):
                with open(os.path.join(folder, rel), "rb") as f:
                    self.assertNotEqual(f.read(2), b"\x1f\x8b")
                self.assertEqual(self.decrypted(os.path.join(folder, rel)), data, (root, rel))
                # Issue 21: the copies keep the archive's mode, .gpg ones too.
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(folder, rel)).st_mode),
                                 0o640, (root, rel))
        # No ciphertext or plaintext left beside the archives.
        for folder in ("backup", "rolling"):
            self.assertEqual([n for n in os.listdir(os.path.join(self.backups, folder))
                              if n.startswith(".") or n.endswith(".gpg")], [])
        log = self.log()
        self.assertIn("Encrypted with gpg to %s" % PLAIN_KEY, log)
        self.assertIn("Copied %s.gpg to rsync:%s under %s/ (size and rsync checksum checked)"
                      % (DATED, self.usb, self.host), log)
        self.assertRegex(log, r"Copied rolling/backup_4\.tar\.gz\.gpg to rclone::local:\S+ "
                              r"under \S+/ \(size and \w+ checked\)")

    def local_files(self):
        """What a fetch left in backups/backup/ (the tree has a note of its own there)."""
        return sorted(n for n in os.listdir(os.path.join(self.backups, "backup"))
                      if n != "old_note.txt")

    def log(self):
        logs = os.path.join(self.backups, "logs")
        with open(os.path.join(logs, sorted(os.listdir(logs))[-1]), encoding="utf-8") as f:
            return f.read()

    def test_an_unknown_recipient_stops_before_anything(self):
        # Nothing but a log of the failure (issue 21: every failure is logged).
        before = snapshot(self.stack, skip=("backups/logs",))
        for more in ([], ["--dry-run"]):
            code, out, err = self.backup("3", "--encrypt-to", "nobody@example.invalid",
                                         "--copy-to", "rsync:" + self.usb, *more)
            self.assertEqual(code, run.EXIT_USAGE)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn("nobody@example.invalid", err)
            self.assertIn("skipped", err)
            self.assertIn("gpg --import", err)
            self.assertNotIn("Traceback", err)
        self.assertEqual(changes_beside_logs(before, snapshot(self.stack,
                                                              skip=("backups/logs",))), [])
        self.assertIn("nobody@example.invalid", self.log())  # the real run's, not the dry run's
        self.assertEqual(os.listdir(self.usb), [])

    def test_backup_ini_and_a_missing_gpg(self):
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nencrypt-to = %s\n    %s\n" % (PLAIN_KEY, SECRET_KEY))
        code, out, _err = self.backup("--print-config")
        self.assertRegex(out, r"encrypt-to += %s, %s +\(backup\.ini\)" % (PLAIN_KEY, SECRET_KEY))
        before = snapshot(self.stack, skip=("backups/logs",))
        empty = os.path.join(self.tmp, "nobin")
        os.mkdir(empty)
        with mock.patch.dict(os.environ, {"PATH": empty}):
            code, _out, err = self.backup("1")
        self.assertEqual(code, run.EXIT_USAGE)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("gpg is not installed", err)
        self.assertIn("apt install gnupg", err)
        self.assertEqual(changes_beside_logs(before, snapshot(self.stack,
                                                              skip=("backups/logs",))), [])
        self.assertIn("ERROR: --encrypt-to: gpg is not installed", self.log())
        # Both recipients: either secret key decrypts the copy.
        self.assertEqual(self.backup("1", "--copy-to", "rsync:" + self.usb)[0], 0)
        copy = os.path.join(self.usb, self.host, DATED + ".gpg")
        packets = gpg(self.gnupghome, "--list-packets", "--pinentry-mode", "loopback",
                      "--passphrase", "wrong", copy, check=False)
        self.assertEqual(packets.stdout.decode().count(":pubkey enc packet:"), 2)

    def test_list_and_bare_metal_restore_from_each_method(self):
        self.backup_encrypted()
        before = snapshot(self.stack, skip=("backups", ".tmp", "menu.sh"))
        for source in ("rsync:" + self.usb, "rclone::local:" + self.nas):
            shutil.rmtree(self.backups)
            shutil.rmtree(os.path.join(self.stack, "volumes"))
            code, out, err = self.restore("--list", "--from", source)
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(sorted(line.split()[0] for line in out.splitlines()),
                             [DATED + ".gpg", "rolling/backup_4.tar.gz.gpg"])
            code, out, err = self.restore(DATED, "noask", "--from", source)
            self.assertEqual((code, err), (0, ""), out)
            self.assertIn("Fetched %s.gpg from %s" % (DATED, source), out)
            self.assertIn("Decrypted it with gpg\nKept as backups/%s" % DATED, out)
            after = snapshot(self.stack, skip=("backups", ".tmp", "menu.sh"))
            self.assertEqual(diff_snapshots(before, after), [], source)
            # The plain archive stays, as after a plain fetch; no .gpg, no partial.
            self.assertEqual(os.listdir(os.path.join(self.backups, "backup")),
                             [os.path.basename(DATED)])
        # Naming the .gpg works too.
        code, out, err = self.restore("rolling/backup_4.tar.gz.gpg", "noask", "--from",
                                      "rsync:" + self.usb)
        self.assertEqual((code, err), (0, ""), out)
        self.assertTrue(os.path.isfile(os.path.join(self.backups, "rolling", "backup_4.tar.gz")))

    def reset_agent(self):
        # The agent caches a passphrase once used: forget it between tries.
        subprocess.run(["gpgconf", "--reload", "gpg-agent"], check=True,
                       env=dict(os.environ, GNUPGHOME=self.gnupghome))

    def test_a_passphrase_file(self):
        self.backup_encrypted(SECRET_KEY)
        good, bad = os.path.join(self.tmp, "good"), os.path.join(self.tmp, "bad")
        for path, text in ((good, PASSPHRASE + "\n"), (bad, "wrong\n")):
            with open(path, "w") as f:
                f.write(text)
        source = "rsync:" + self.usb
        before = snapshot(self.stack, skip=("backups", ".tmp", "menu.sh"))
        os.unlink(self.dated)

        self.reset_agent()
        code, out, err = self.restore(DATED, "noask", "--from", source, "--passphrase-file", bad)
        self.assertEqual(code, run.EXIT_FAILED, out)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("Bad passphrase", err)
        self.assertEqual(self.local_files(), [])  # nothing left

        code, _out, err = self.restore(DATED, "noask", "--from", source,
                                       "--passphrase-file", os.path.join(self.tmp, "nope"))
        self.assertEqual(code, run.EXIT_USAGE)
        self.assertIn("--passphrase-file", err)

        self.reset_agent()
        shutil.rmtree(os.path.join(self.stack, "volumes"))
        os.environ[encryption.PASSPHRASE_ENV] = good
        code, out, err = self.restore(DATED, "noask", "--from", source)
        self.assertEqual((code, err), (0, ""), out)
        after = snapshot(self.stack, skip=("backups", ".tmp", "menu.sh"))
        self.assertEqual(diff_snapshots(before, after), [])

    def test_no_secret_key_or_a_damaged_copy_changes_nothing(self):
        self.backup_encrypted()
        source = "rsync:" + self.usb
        before = snapshot(self.stack, skip=("backups", ".tmp"))
        os.unlink(self.dated)
        # A Pi with the public key only (the state of the Pi that made it).
        public_only = tempfile.mkdtemp(prefix="gpg-")
        self.addCleanup(drop_keyring, public_only)
        exported = gpg(self.gnupghome, "--export", PLAIN_KEY).stdout
        gpg(public_only, "--import", input=exported)
        os.environ["GNUPGHOME"] = public_only
        code, out, err = self.restore(DATED, "noask", "--from", source)
        self.assertEqual(code, run.EXIT_FAILED, out)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("No secret key", err)
        self.assertIn("emergency kit", err)
        os.environ["GNUPGHOME"] = self.gnupghome
        # Flip a byte in the middle of the ciphertext: gpg's MDC refuses it.
        copy = os.path.join(self.usb, self.host, DATED + ".gpg")
        with open(copy, "r+b") as f:
            f.seek(os.path.getsize(copy) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
        code, out, err = self.restore(DATED, "noask", "--from", source)
        self.assertEqual(code, run.EXIT_FAILED, out)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(diff_snapshots(before, snapshot(self.stack, skip=("backups", ".tmp"))),
                         [])
        self.assertEqual(self.local_files(), [])

    def test_retention_at_the_destination_counts_gpg_copies(self):
        folder = os.path.join(self.usb, self.host, "backup")
        os.makedirs(folder)
        for stamp in ("2026-11-23_0200", "2026-11-24_0200", "2026-11-25_0200"):
            for suffix in (".tar.gz", ".tar.gz.gpg"):
                with open(os.path.join(folder, "backup_%s%s" % (stamp, suffix)), "w") as f:
                    f.write("old")
        code, _out, err = self.backup("1", "--keep", "2", "--encrypt-to", PLAIN_KEY,
                                      "--copy-to", "rsync:" + self.usb)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(sorted(os.listdir(folder)), ["backup_2026-11-25_0200.tar.gz",
                                                      "backup_2026-11-25_0200.tar.gz.gpg",
                                                      "backup_2026-11-26_0200.tar.gz.gpg"])


if __name__ == "__main__":
    unittest.main()
