"""Issue 20, Must 3 and Must 4: a fetch never replaces a local file, and the
newest copy wins.

restore.py --from with real rsync (a local path, and over a throwaway sshd
on 127.0.0.1), real rclone (a local remote) and real gpg: a week-old remote
rolling/backup_4 never replaces this week's local one (the fetched copy is
kept apart and the run says it restores that); --dry-run writes nothing
under backups/; where a destination holds NAME and NAME.gpg the newer is
taken, said, and --list shows both with their times; a rolling copy of one
form makes the other form of that weekday go at the destination."""
import datetime
import os
import shutil
import subprocess
import unittest
from unittest import mock

from iotstack_backup import encryption, fetch, iotstack
from tests.gpg_keyring import PLAIN_KEY, drop_keyring, make_keyring
from tests.plainstack import NOW, PlainStackTestCase
from tests.sshd_server import start_sshd

ROLLING = "rolling/backup_4.tar.gz"
DATED = "backup/backup_2026-11-26_0200.tar.gz"
HAVE = {tool: bool(shutil.which(tool)) for tool in ("rsync", "rclone", "gpg", "gpgconf")}


def tree_state(root):
    """{relative path: (inode, size, mtime_ns)} of every file below root."""
    state = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state[os.path.relpath(path, root)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return state


def read(path):
    with open(path, "rb") as f:
        return f.read()


class ChooseTest(unittest.TestCase):
    def test_table(self):
        name = ROLLING
        gpg = name + ".gpg"
        cases = [
            ({name: (1, 100.0)}, name, False),
            ({gpg: (1, 100.0)}, gpg, False),
            ({name: (1, 100.0), gpg: (1, 200.0)}, gpg, True),
            ({name: (1, 300.0), gpg: (1, 200.0)}, name, True),
            ({name: (1, 200.0), gpg: (1, 200.0)}, gpg, True),  # a tie: the encrypted one
            ({}, None, False),
        ]
        for listed, taken, said in cases:
            with self.subTest(listed=listed):
                remote, note = fetch.choose_remote(name, listed)
                self.assertEqual(remote, taken)
                self.assertEqual(bool(note), said)
                if said:
                    self.assertIn("taking %s, the newer" % taken, note)
        self.assertEqual(fetch.choose_remote(gpg, {name: (1, 9.0), gpg: (1, 1.0)})[0], gpg)

    def test_apart_names(self):
        taken = {"/b/rolling/backup_4.fetched.tar.gz"}
        self.assertEqual(fetch.apart_path("/b/rolling/backup_4.tar.gz", lambda p: False),
                         "/b/rolling/backup_4.fetched.tar.gz")
        self.assertEqual(fetch.apart_path("/b/rolling/backup_4.tar.gz", taken.__contains__),
                         "/b/rolling/backup_4.fetched-2.tar.gz")


class FetchTestCase(PlainStackTestCase):
    def setUp(self):
        super().setUp()
        self.host = iotstack.host_folder()
        self.marker = os.path.join(self.stack, "volumes", "marker.txt")

    def later(self, days):
        return mock.patch.object(iotstack, "now_local",
                                 return_value=NOW + datetime.timedelta(days=days))

    def mark(self, text):
        with open(self.marker, "w") as f:
            f.write(text)

    def two_weeks(self, *copy_to):
        """Week 1 copied to copy_to; week 2 (same rolling name) only here."""
        self.mark("week 1")
        code, out, err = self.backup("3", *copy_to)
        self.assertEqual((code, err), (0, ""), out)
        self.mark("week 2")
        with self.later(7):
            code, out, err = self.backup("3")
        self.assertEqual((code, err), (0, ""), out)

    def restored(self, *args):
        code, out, err = self.restore(*args)
        self.assertIn(code, (0, 3), err)  # 3: --no-stop with no engine to ask
        self.assertIn("Restored", out)
        return out


@unittest.skipUnless(HAVE["rsync"] and HAVE["rclone"], "needs rsync and rclone")
class NeverReplacedTest(FetchTestCase):
    def test_a_different_local_file_is_never_replaced(self):
        usb, nas = os.path.join(self.tmp, "usb"), os.path.join(self.tmp, "nas")
        os.mkdir(usb)
        os.mkdir(nas)
        self.two_weeks("--copy-to", "rsync:" + usb, "--copy-to", "rclone::local:" + nas)
        local = os.path.join(self.backups, ROLLING)
        week2 = read(local)
        inode = os.stat(local).st_ino
        for n, source in enumerate(("rsync:" + usb, "rclone::local:" + nas), 1):
            out = self.restored(ROLLING, "noask", "--from", source)
            apart = "rolling/backup_4.fetched%s.tar.gz" % ("" if n == 1 else "-%d" % n)
            self.assertIn("backups/%s differs from the fetched copy and is left as it is; the "
                          "fetched copy is kept as backups/%s: restoring the fetched copy"
                          % (ROLLING, apart), out)
            self.assertEqual((read(local), os.stat(local).st_ino), (week2, inode))
            self.assertEqual(read(os.path.join(self.backups, apart)),
                             read(os.path.join(usb, self.host, ROLLING)))
            with open(self.marker) as f:
                self.assertEqual(f.read(), "week 1")  # the fetched one was restored

    def test_an_identical_local_file_is_used(self):
        usb = os.path.join(self.tmp, "usb")
        os.mkdir(usb)
        self.two_weeks("--copy-to", "rsync:" + usb)
        before = tree_state(self.backups)
        out = self.restored(DATED, "noask", "--from", "rsync:" + usb)
        self.assertIn("backups/%s is already here, identical to the fetched copy: restoring it"
                      % DATED, out)
        after = tree_state(self.backups)
        # Only the restore's log is new: no archive appeared or changed.
        self.assertEqual({k: v for k, v in after.items() if not k.startswith("logs/")},
                         {k: v for k, v in before.items() if not k.startswith("logs/")})

    def test_dry_run_writes_nothing_under_backups(self):
        usb = os.path.join(self.tmp, "usb")
        os.mkdir(usb)
        self.two_weeks("--copy-to", "rsync:" + usb)
        os.unlink(os.path.join(self.backups, DATED))  # a bare name, not here at all
        before = tree_state(self.backups)
        for name in (ROLLING, DATED):
            code, out, err = self.restore(name, "--dry-run", "--from", "rsync:" + usb)
            self.assertEqual((code, err), (0, ""), out)
            self.assertIn("Dry run: nothing was changed.", out)
            self.assertIn("nothing is written under backups/", out)
        self.assertEqual(tree_state(self.backups), before)
        self.assertEqual([n for n in os.listdir(os.path.join(self.stack, ".tmp"))
                          if n.startswith("fetch.")], [])


@unittest.skipUnless(HAVE["rsync"], "needs rsync")
class OverSshTest(FetchTestCase):
    def test_over_ssh_too(self):
        server = start_sshd()
        self.addCleanup(server.close)
        os.environ.update(server.env)
        far = os.path.join(self.tmp, "far")
        os.mkdir(far)
        spec = "rsync:%s:%s" % (server.user_host, far)
        self.two_weeks("--copy-to", spec)
        local = os.path.join(self.backups, ROLLING)
        week2 = read(local)
        out = self.restored(ROLLING, "noask", "--from", spec)
        self.assertIn("kept as backups/rolling/backup_4.fetched.tar.gz", out)
        self.assertEqual(read(local), week2)


@unittest.skipUnless(all(HAVE.values()), "needs gpg, rsync and rclone")
class NewestCopyWinsTest(FetchTestCase):
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
        self.usb = os.path.join(self.tmp, "usb")
        os.mkdir(self.usb)

    def remote(self, rel):
        return os.path.join(self.usb, self.host, rel)

    def test_the_newer_of_name_and_name_gpg(self):
        # A plain copy from before --encrypt-to, then an encrypted one.
        self.mark("plain")
        self.assertEqual(self.backup("2", "--copy-to", "rsync:" + self.usb)[0], 0)
        plain = self.remote(ROLLING)
        os.utime(plain, (1_700_000_000, 1_700_000_000))  # the older
        self.mark("encrypted")
        with self.later(7):
            code, out, err = self.backup("1", "--copy-to", "rsync:" + self.usb,
                                         "--encrypt-to", PLAIN_KEY)
        self.assertEqual((code, err), (0, ""), out)
        # Put that encrypted archive in place as the .gpg of the same weekday.
        shutil.copy2(self.remote("backup/backup_2026-12-03_0200.tar.gz.gpg"),
                     self.remote(ROLLING + ".gpg"))
        code, out, err = self.restore("--list", "--from", "rsync:" + self.usb)
        self.assertEqual((code, err), (0, ""))
        lines = {line.split()[0]: line for line in out.splitlines()}
        self.assertIn("(--from takes this one: newer)", lines[ROLLING + ".gpg"])
        self.assertIn("(older copy)", lines[ROLLING])
        self.assertIn("2023-11-14", lines[ROLLING])  # its time is shown
        os.unlink(os.path.join(self.backups, ROLLING))
        out = self.restored(ROLLING, "noask", "--from", "rsync:" + self.usb)
        self.assertIn("%s and %s.gpg are both there: taking %s.gpg, the newer"
                      % (ROLLING, ROLLING, ROLLING), out)
        with open(self.marker) as f:
            self.assertEqual(f.read(), "encrypted")
        # The plain one made newer: it is taken.
        os.utime(plain, None)
        os.utime(self.remote(ROLLING + ".gpg"), (1_700_000_000, 1_700_000_000))
        os.unlink(os.path.join(self.backups, ROLLING))
        out = self.restored(ROLLING, "noask", "--from", "rsync:" + self.usb)
        self.assertIn("taking %s, the newer" % ROLLING, out)
        with open(self.marker) as f:
            self.assertEqual(f.read(), "plain")

    def test_old_plain_copies_are_pruned_at_the_destination(self):
        copies = ["--copy-to", "rsync:" + self.usb, "--copy-to",
                  "rclone::local:" + os.path.join(self.tmp, "nas")]
        os.mkdir(os.path.join(self.tmp, "nas"))
        self.assertEqual(self.backup("3", *copies)[0], 0)  # plain copies
        with self.later(7):  # the same weekday, encrypted now, --keep 1
            code, out, err = self.backup("3", "--encrypt-to", PLAIN_KEY, "--keep", "1", *copies)
        self.assertEqual((code, err), (0, ""), out)
        for root in (self.usb, os.path.join(self.tmp, "nas")):
            folder = os.path.join(root, self.host)
            self.assertEqual(sorted(os.listdir(os.path.join(folder, "rolling"))),
                             ["backup_4.tar.gz.gpg"], root)
            self.assertEqual(sorted(os.listdir(os.path.join(folder, "backup"))),
                             ["backup_2026-12-03_0200.tar.gz.gpg"], root)
        logs = os.path.join(self.backups, "logs")
        with open(max((os.path.join(logs, n) for n in os.listdir(logs)),
                      key=os.path.getmtime)) as f:
            self.assertIn("Removed the older copy rolling/backup_4.tar.gz at rsync:", f.read())


if __name__ == "__main__":
    unittest.main()
