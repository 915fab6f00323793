"""offsite.py against the real tools: rsync, scp and rclone, on this machine only.

Every destination is a folder under a temporary directory: directly
(rsync:/path, rclone::local:), or through a throwaway sshd on 127.0.0.1
(rsync and scp over ssh, rclone's sftp backend).  So the tests can look at
what arrived, and place what a listing or download should find, with plain
file operations.
"""
import hashlib
import io
import os
import random
import shutil
import tempfile
import time
import unittest
from unittest import mock

from iotstack_backup import offsite
from tests.sshd_server import start_sshd

HOST = "pi4"
DATED = "backup/backup_2026-11-26_0200.tar.gz"
ROLLING = "rolling/backup_4.tar.gz"
# Whole seconds well away from any daylight-saving change.
T0 = 1795600000


def payload(seed, size=150000):
    return random.Random(seed).randbytes(size)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data, mtime=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def files_under(root):
    """Every file below root, as paths relative to it."""
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def require_tool(name):
    if shutil.which(name) is None:
        raise unittest.SkipTest("%s is not installed" % name)


class ParseDestinationTest(unittest.TestCase):
    def test_valid_specs(self):
        table = [
            # spec, method, target, remote, path
            ("rclone:dropbox:IOTstack", "rclone", "dropbox:IOTstack", None, None),
            ("rclone::local:/mnt/x", "rclone", ":local:/mnt/x", None, None),
            ("rclone:gdrive:", "rclone", "gdrive:", None, None),
            ("rclone:s3:bucket/iot stack", "rclone", "s3:bucket/iot stack", None, None),
            ("rsync:/mnt/usb/backups", "rsync", "/mnt/usb/backups", None, "/mnt/usb/backups"),
            ("rsync:pi@nas:/srv/backups", "rsync", "pi@nas:/srv/backups", "pi@nas", "/srv/backups"),
            ("rsync:nas:backups", "rsync", "nas:backups", "nas", "backups"),
            ("rsync:pi@nas:~/backups", "rsync", "pi@nas:~/backups", "pi@nas", "backups"),
            ("rsync:pi@nas:", "rsync", "pi@nas:", "pi@nas", ""),
            ("rsync:./usb:x", "rsync", "./usb:x", None, os.path.abspath("usb:x")),
            ("scp:pi@nas:/srv/backups", "scp", "pi@nas:/srv/backups", "pi@nas", "/srv/backups"),
            ("scp:nas:/srv/backups", "scp", "nas:/srv/backups", "nas", "/srv/backups"),
            ("scp:pi@[fe80::1]:/srv", "scp", "pi@[fe80::1]:/srv", "pi@[fe80::1]", "/srv"),
        ]
        for spec, method, target, remote, path in table:
            with self.subTest(spec=spec):
                dest = offsite.parse_destination(spec)
                self.assertEqual((dest.method, dest.target, dest.remote, dest.path),
                                 (method, target, remote, path))
                self.assertEqual(str(dest), spec)

    def test_invalid_specs(self):
        table = [
            ("ftp:host:/x", "unknown copy method"),
            ("rsync", "not METHOD:TARGET"),
            ("rsync:", "nothing after rsync:"),
            ("rclone:", "nothing after rclone:"),
            ("scp:  ", "nothing after scp:"),
            ("rclone:foo", "rclone needs REMOTE:PATH"),
            ("rclone::local", "rclone needs REMOTE:PATH"),
            ("rclone:./a:b", "rclone needs REMOTE:PATH"),
            ("rclone:-x:y", "cannot start with '-'"),
            ("scp:/srv/backups", "scp needs USER@HOST:PATH"),
            ("scp:pi@nas:/srv/my backups", "may only hold"),
            ("scp:pi@nas:/srv/$(reboot)", "may only hold"),
            ("scp:-oProxyCommand=x:/x", "not a valid"),
            ("rsync:-e:/x", "not a valid"),
            ("rsync:nas::module", "daemon"),
            ("rsync:rsync://nas/module", "daemon"),
            ("rsync:pi@nas:~other/x", "~USER"),
            ("rsync:/mnt/x\nrm", "control characters"),
        ]
        for spec, message in table:
            with self.subTest(spec=spec):
                with self.assertRaisesRegex(ValueError, message):
                    offsite.parse_destination(spec)


class NamesTest(unittest.TestCase):
    """Bad names and hosts are refused before any tool runs (nothing is reachable here)."""

    def test_bad_names_are_refused(self):
        dest = offsite.parse_destination("rsync:root@127.0.0.1:/nonexistent")
        for name in ["../x.tar.gz", "backup/../../x.tar.gz", "/etc/x.tar.gz", "backup/x.txt",
                     "backup/*.tar.gz", "backup//x.tar.gz", "backup/.x.tar.gz", "", "backup/x y.tar.gz",
                     "backup/-x.tar.gz"]:
            with self.subTest(name=name), mock.patch.object(offsite, "_run") as run:
                with self.assertRaises(ValueError):
                    offsite.delete(dest, HOST, ["backup/ok.tar.gz", name])
                with self.assertRaises(ValueError):
                    offsite.download(dest, HOST, name, "/tmp/never")
                run.assert_not_called()

    def test_bad_hosts_are_refused(self):
        dest = offsite.parse_destination("rclone::local:/nonexistent")
        for host in ["", "..", "../etc", "a/b", "-x", "a b", "*"]:
            with self.subTest(host=host), mock.patch.object(offsite, "_run") as run:
                with self.assertRaises(ValueError):
                    offsite.list_backups(dest, host)
                run.assert_not_called()

    def test_cause_is_the_telling_stderr_line(self):
        rsync = offsite._Result(255, "", "ssh: connect to host nas port 22: Connection refused\n"
                                "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]\n"
                                "rsync error: unexplained error (code 255) at io.c(232) [Receiver=3.2.7]\n")
        self.assertEqual(offsite._cause(rsync), "ssh: connect to host nas port 22: Connection refused")
        rclone = offsite._Result(1, "", "2026/11/26 11:19:54 NOTICE: Config file \"/x\" not found - using defaults\n"
                                 "2026/11/26 11:19:54 Failed to create file system for \"nope:x\": "
                                 "didn't find section in config file\n")
        self.assertEqual(offsite._cause(rclone),
                         "Failed to create file system for \"nope:x\": didn't find section in config file")
        missing = offsite._Result(23, "", 'rsync: [sender] change_dir "/x" failed: No such file or directory (2)\n'
                                  "rsync error: some files/attrs were not transferred (code 23) at main.c(1956)\n"
                                  "rsync: [Receiver] write error: Broken pipe (32)\n")
        self.assertEqual(offsite._cause(missing),
                         'rsync: [sender] change_dir "/x" failed: No such file or directory (2)')
        self.assertEqual(offsite._cause(offsite._Result(3, "", "")), "exit status 3")

    def test_rclone_modtime(self):
        self.assertEqual(offsite._rfc3339("2026-11-26T02:00:00Z"), 1795658400.0)
        self.assertAlmostEqual(offsite._rfc3339("2026-11-26T03:00:00.5+01:00"), 1795658400.5)
        self.assertAlmostEqual(offsite._rfc3339("2026-11-26T02:00:00.123456789Z"), 1795658400.123456789)
        self.assertEqual(offsite._rfc3339("yesterday"), 0.0)

    def test_dropbox_hash_matches_rclone_definition(self):
        # sha256 over the sha256 digests of 4 MiB blocks.
        data = payload("dropbox", 4 * 1024 * 1024 + 10)
        blocks = hashlib.sha256(data[:4 * 1024 * 1024]).digest() + hashlib.sha256(data[4 * 1024 * 1024:]).digest()
        self.assertEqual(offsite._dropbox_hash(io.BytesIO(data)), hashlib.sha256(blocks).hexdigest())


class RunTest(unittest.TestCase):
    def test_timeout_kills_the_whole_group(self):
        # The grandchild holds the pipes, as ssh under rsync does; a plain
        # subprocess.run timeout would wait for it.
        dest = offsite.parse_destination("rsync:/nonexistent")
        started = time.monotonic()
        with self.assertRaisesRegex(offsite.CopyError, "sh took longer than 1 seconds and was stopped"):
            offsite._run(dest, ["sh", "-c", "sleep 60 & sleep 60"], 1, "waiting")
        self.assertLess(time.monotonic() - started, 15)

    def test_missing_tool(self):
        dest = offsite.parse_destination("rclone:dropbox:IOTstack")
        with self.assertRaisesRegex(offsite.CopyError,
                                    "^rclone:dropbox:IOTstack: listing failed: no-such-tool-x is not installed"):
            offsite._run(dest, ["no-such-tool-x"], 5, "listing")


class MethodContract:
    """The behaviour every method must show; mixed into one TestCase per method.

    A subclass provides spec_for(folder), the destination spec that reaches
    that local folder, and sets EXPECT_CHECK (what upload() reports),
    TARGET_MUST_EXIST, and TRANSFER_HELPER / FETCH_HELPER, the offsite
    functions that move the bytes of an upload and a download (the tests
    wrap them to look at, or spoil, what they produced).
    """
    EXTRA_ENV = {}
    TRANSFER_HELPER = None
    FETCH_HELPER = None
    EXPECT_CHECK = None
    TARGET_MUST_EXIST = True

    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="offsite-test-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.root = os.path.join(self.work, "target")
        os.mkdir(self.root)
        self.local = os.path.join(self.work, "local")
        os.mkdir(self.local)
        self.dest = offsite.parse_destination(self.spec_for(self.root))
        env = mock.patch.dict(os.environ, self.EXTRA_ENV)
        env.start()
        self.addCleanup(env.stop)

    def remote(self, rel_name, host=HOST):
        return os.path.join(self.root, host, rel_name)

    def local_file(self, name, data, mtime=None):
        path = os.path.join(self.local, name)
        write(path, data, mtime)
        return path

    def assertOneLine(self, error):
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertIn(str(self.dest), text)

    # -- upload --------------------------------------------------------------

    def test_upload_creates_folders_copies_exactly_and_replaces(self):
        first = payload("first")
        source = self.local_file("a.tar.gz", first, T0)
        self.assertEqual(offsite.upload(self.dest, source, ROLLING, HOST), self.EXPECT_CHECK)
        self.assertEqual(read(self.remote(ROLLING)), first)
        # Same size, same mtime, other bytes: a quick check would skip it.
        second = payload("second")
        self.assertEqual(len(second), len(first))
        source = self.local_file("b.tar.gz", second, T0)
        self.assertEqual(offsite.upload(self.dest, source, ROLLING, HOST), self.EXPECT_CHECK)
        self.assertEqual(read(self.remote(ROLLING)), second)
        # No .partial or rsync temporary left anywhere.
        self.assertEqual(files_under(self.root), {os.path.join(HOST, ROLLING)})

    def test_copy_that_differs_after_transfer_is_an_error_and_removed(self):
        source = self.local_file("a.tar.gz", payload("good"), T0)
        folder = os.path.dirname(self.remote(DATED))
        name = os.path.basename(DATED)
        real_transfer = getattr(offsite, self.TRANSFER_HELPER)

        def transfer_then_flip_a_byte(*args):
            real_transfer(*args)
            # The copy is under its final or its .partial name, depending on the method.
            copy = next(os.path.join(folder, n) for n in os.listdir(folder) if name in n)
            with open(copy, "r+b") as f:
                f.seek(1000)
                byte = f.read(1)
                f.seek(1000)
                f.write(bytes([byte[0] ^ 0xFF]))

        with mock.patch.object(offsite, self.TRANSFER_HELPER, transfer_then_flip_a_byte):
            with self.assertRaisesRegex(offsite.CopyError, "check of %s/%s failed" % (HOST, DATED)) as caught:
                offsite.upload(self.dest, source, DATED, HOST)
        self.assertOneLine(caught.exception)
        self.assertIn("the copy was removed", str(caught.exception))
        self.assertEqual(os.listdir(folder), [])

    def test_upload_to_a_missing_target(self):
        source = self.local_file("a.tar.gz", payload("x", 1000))
        missing = offsite.parse_destination(self.spec_for(os.path.join(self.root, "not-mounted", "backups")))
        if not self.TARGET_MUST_EXIST:
            # rclone creates the whole path, as it must on bucket-based remotes.
            offsite.upload(missing, source, DATED, HOST)
            self.assertEqual(files_under(self.root), {os.path.join("not-mounted", "backups", HOST, DATED)})
            return
        # Most likely a disk that is not mounted: nothing may be created under the mount point.
        with self.assertRaisesRegex(offsite.CopyError, "it must exist") as caught:
            offsite.upload(missing, source, DATED, HOST)
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn(str(missing), str(caught.exception))
        self.assertEqual(os.listdir(self.root), [])

    # -- list ----------------------------------------------------------------

    def test_list_backups_newest_first(self):
        self.assertEqual(offsite.list_backups(self.dest, HOST), [])  # no host folder yet
        write(self.remote("backup/backup_2026-11-24_0200.tar.gz"), b"1" * 10, T0 + 100)
        write(self.remote("backup/backup_2026-11-26_0200.tar.gz"), b"3" * 30, T0 + 300)
        write(self.remote("rolling/backup_2.tar.gz"), b"2" * 20, T0 + 200)
        write(self.remote("rolling/backup_4.tar.gz"), b"4" * 40, T0 + 400)
        # None of these is a backup of this host.
        write(self.remote("backup/.backup_2026-11-27_0200.tar.gz.partial"), b"p", T0 + 900)
        write(self.remote("backup/notes.txt"), b"n", T0 + 900)
        write(self.remote("logs/backup_2026-11-26_0200.log"), b"l", T0 + 900)
        write(self.remote("backup/old/backup_2020-01-01_0200.tar.gz"), b"o", T0 + 900)
        write(self.remote("other.tar.gz"), b"t", T0 + 900)
        write(self.remote("backup/backup_2026-11-28_0200.tar.gz", host="pi3"), b"x", T0 + 900)
        os.makedirs(self.remote("rolling/backup_5.tar.gz"))
        listed = offsite.list_backups(self.dest, HOST)
        self.assertEqual([(name, size) for name, size, _ in listed], [
            ("rolling/backup_4.tar.gz", 40),
            ("backup/backup_2026-11-26_0200.tar.gz", 30),
            ("rolling/backup_2.tar.gz", 20),
            ("backup/backup_2026-11-24_0200.tar.gz", 10),
        ])
        for (_, _, mtime), expected in zip(listed, [T0 + 400, T0 + 300, T0 + 200, T0 + 100]):
            self.assertAlmostEqual(mtime, expected, delta=1)

    # -- delete --------------------------------------------------------------

    def test_delete_removes_only_the_named_files(self):
        for rel_name in ["backup/a.tar.gz", "backup/b.tar.gz", "rolling/backup_1.tar.gz", "logs/a.log"]:
            write(self.remote(rel_name), rel_name.encode())
        write(self.remote("backup/a.tar.gz", host="pi3"), b"other host")
        os.makedirs(self.remote("backup/folder.tar.gz"))
        write(self.remote("backup/folder.tar.gz/inside"), b"keep")
        with self.assertRaises(ValueError):
            offsite.delete(self.dest, HOST, ["backup/a.tar.gz", "../x.tar.gz"])
        self.assertTrue(os.path.exists(self.remote("backup/a.tar.gz")))
        offsite.delete(self.dest, HOST, ["backup/a.tar.gz", "rolling/backup_1.tar.gz",
                                         "backup/missing.tar.gz", "backup/folder.tar.gz"])
        self.assertEqual(files_under(self.root), {
            os.path.join(HOST, "backup/b.tar.gz"), os.path.join(HOST, "logs/a.log"),
            os.path.join(HOST, "backup/folder.tar.gz/inside"), os.path.join("pi3", "backup/a.tar.gz"),
        })

    # -- download ------------------------------------------------------------

    def test_download_is_byte_identical_and_atomic(self):
        data = payload("restore")
        write(self.remote(ROLLING), data, T0)
        target = os.path.join(self.work, "restore", "backup_4.tar.gz")
        write(target, b"old")
        real_fetch = getattr(offsite, self.FETCH_HELPER)
        seen = {}

        def fetch_and_look(*args):
            real_fetch(*args)
            # Fetched, not yet renamed: the final name still holds the old file.
            seen["final"] = read(target)
            seen["others"] = sorted(os.listdir(os.path.dirname(target)))

        with mock.patch.object(offsite, self.FETCH_HELPER, fetch_and_look):
            offsite.download(self.dest, HOST, ROLLING, target)
        self.assertEqual(seen["final"], b"old")
        self.assertEqual(seen["others"], [".backup_4.tar.gz.partial", "backup_4.tar.gz"])
        self.assertEqual(read(target), data)
        self.assertEqual(os.listdir(os.path.dirname(target)), ["backup_4.tar.gz"])

    def test_download_of_a_missing_file_is_an_error(self):
        target = os.path.join(self.work, "restore", "x.tar.gz")
        with self.assertRaisesRegex(offsite.CopyError, "not there") as caught:
            offsite.download(self.dest, HOST, "backup/backup_2000-01-01_0000.tar.gz", target)
        self.assertOneLine(caught.exception)
        self.assertFalse(os.path.exists(target))


def rsync_local_spec(folder):
    return "rsync:" + folder


class RsyncLocalTest(MethodContract, unittest.TestCase):
    TRANSFER_HELPER = "_rsync_transfer"
    FETCH_HELPER = "_rsync_fetch"
    EXPECT_CHECK = "size and rsync checksum checked"
    TARGET_MUST_EXIST = True

    @classmethod
    def setUpClass(cls):
        require_tool("rsync")

    def spec_for(self, folder):
        return rsync_local_spec(folder)

    def test_truncated_copy_fails_the_size_check(self):
        source = self.local_file("a.tar.gz", payload("good"), T0)
        real_transfer = offsite._rsync_transfer

        def transfer_then_truncate(*args):
            real_transfer(*args)
            os.truncate(self.remote(DATED), 100)

        with mock.patch.object(offsite, "_rsync_transfer", transfer_then_truncate):
            with self.assertRaisesRegex(offsite.CopyError, "the copy has 100 bytes, the local file 150000"):
                offsite.upload(self.dest, source, DATED, HOST)
        self.assertFalse(os.path.exists(self.remote(DATED)))

    def test_short_download_fails_the_size_check(self):
        write(self.remote(ROLLING), payload("restore"), T0)
        target = os.path.join(self.work, "restore", "backup_4.tar.gz")
        real_fetch = offsite._rsync_fetch

        def fetch_then_truncate(dest, host, rel_name, partial):
            real_fetch(dest, host, rel_name, partial)
            os.truncate(partial, 10)

        with mock.patch.object(offsite, "_rsync_fetch", fetch_then_truncate):
            with self.assertRaisesRegex(offsite.CopyError, "got 10 bytes, the destination lists 150000"):
                offsite.download(self.dest, HOST, ROLLING, target)
        self.assertEqual(os.listdir(os.path.dirname(target)), [])

    def test_missing_tool_is_an_error(self):
        with mock.patch.dict(os.environ, {"PATH": self.local}):
            with self.assertRaisesRegex(offsite.CopyError, "rsync is not installed"):
                offsite.list_backups(self.dest, HOST)


class RcloneLocalTest(MethodContract, unittest.TestCase):
    TRANSFER_HELPER = "_rclone_transfer"
    FETCH_HELPER = "_rclone_fetch"
    EXPECT_CHECK = "size and md5 checked"
    TARGET_MUST_EXIST = True  # a local folder: most likely a USB disk, as for rsync

    @classmethod
    def setUpClass(cls):
        require_tool("rclone")
        cls.config_dir = tempfile.mkdtemp(prefix="offsite-rclone-")
        config = os.path.join(cls.config_dir, "rclone.conf")
        open(config, "w").close()
        cls.EXTRA_ENV = {"RCLONE_CONFIG": config}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.config_dir, ignore_errors=True)

    def spec_for(self, folder):
        return "rclone::local:" + folder

    def test_unknown_remote_is_a_one_line_error(self):
        dest = offsite.parse_destination("rclone:nosuchremote:IOTstack")
        with self.assertRaisesRegex(offsite.CopyError, "didn't find section in config file") as caught:
            offsite.list_backups(dest, HOST)
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("rclone:nosuchremote:IOTstack", str(caught.exception))
        source = self.local_file("a.tar.gz", b"x")
        with self.assertRaisesRegex(offsite.CopyError, "didn't find section in config file"):
            offsite.upload(dest, source, DATED, HOST)

    def test_missing_tool_is_an_error(self):
        with mock.patch.dict(os.environ, {"PATH": self.local}):
            with self.assertRaisesRegex(offsite.CopyError, "rclone is not installed"):
                offsite.list_backups(self.dest, HOST)


class LoopbackSshd:
    """One throwaway sshd per test class; its PATH wrapper and rclone config in the environment."""

    @classmethod
    def setUpClass(cls):
        for tool in cls.TOOLS:
            require_tool(tool)
        cls.server = start_sshd()
        cls.EXTRA_ENV = dict(cls.server.env, **cls.server.rclone_env)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()


class RsyncSshTest(LoopbackSshd, MethodContract, unittest.TestCase):
    TOOLS = ("rsync",)
    TRANSFER_HELPER = "_rsync_transfer"
    FETCH_HELPER = "_rsync_fetch"
    EXPECT_CHECK = "size and rsync checksum checked"
    TARGET_MUST_EXIST = True

    def spec_for(self, folder):
        return "rsync:%s:%s" % (self.server.user_host, folder)


class ScpTest(LoopbackSshd, MethodContract, unittest.TestCase):
    TOOLS = ("scp",)
    TRANSFER_HELPER = "_scp_transfer"
    FETCH_HELPER = "_scp_fetch"
    EXPECT_CHECK = "size and sha256 checked"
    TARGET_MUST_EXIST = True

    def spec_for(self, folder):
        return "scp:%s:%s" % (self.server.user_host, folder)

    def test_without_sha256sum_the_size_is_still_checked(self):
        source = self.local_file("a.tar.gz", payload("plain"))
        with mock.patch.object(offsite, "REMOTE_SHA256", "no-such-sha256sum"):
            checked = offsite.upload(self.dest, source, DATED, HOST)
        self.assertEqual(checked, "size checked (no no-such-sha256sum on root@127.0.0.1)")
        self.assertEqual(read(self.remote(DATED)), payload("plain"))


class RcloneSftpTest(LoopbackSshd, MethodContract, unittest.TestCase):
    TOOLS = ("rclone",)
    TRANSFER_HELPER = "_rclone_transfer"
    FETCH_HELPER = "_rclone_fetch"
    EXPECT_CHECK = "size and md5 checked"
    TARGET_MUST_EXIST = False

    def spec_for(self, folder):
        return "rclone:%s:%s" % (self.server.rclone_remote, folder)


class StoppedSshdTest(unittest.TestCase):
    """A destination whose sshd is not running is a one-line CopyError, for every ssh method."""

    @classmethod
    def setUpClass(cls):
        cls.server = start_sshd()
        cls.server.stop()  # its port is now closed; configs and wrapper stay

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def assertFailsCleanly(self, tool, spec):
        require_tool(tool)
        work = tempfile.mkdtemp(prefix="offsite-test-")
        self.addCleanup(shutil.rmtree, work, True)
        source = os.path.join(work, "a.tar.gz")
        write(source, b"data")
        dest = offsite.parse_destination(spec)
        # rclone's default 10 low-level retries take 11 s per call against a closed port.
        env = dict(self.server.env, RCLONE_LOW_LEVEL_RETRIES="1", **self.server.rclone_env)
        with mock.patch.dict(os.environ, env):
            for name, action in [
                    ("list_backups", lambda: offsite.list_backups(dest, HOST)),
                    ("upload", lambda: offsite.upload(dest, source, DATED, HOST)),
                    ("download", lambda: offsite.download(dest, HOST, DATED, os.path.join(work, "b.tar.gz"))),
                    ("delete", lambda: offsite.delete(dest, HOST, [DATED]))]:
                with self.subTest(action=name):
                    with self.assertRaisesRegex(offsite.CopyError, "(?i)connection refused") as caught:
                        action()
                    self.assertNotIn("\n", str(caught.exception))
                    self.assertTrue(str(caught.exception).startswith(spec + ": "))
        self.assertEqual(os.listdir(work), ["a.tar.gz"])

    def test_rsync(self):
        self.assertFailsCleanly("rsync", "rsync:%s:/x" % self.server.user_host)

    def test_scp(self):
        self.assertFailsCleanly("scp", "scp:%s:/x" % self.server.user_host)

    def test_rclone_sftp(self):
        self.assertFailsCleanly("rclone", "rclone:%s:/x" % self.server.rclone_remote)

if __name__ == "__main__":
    unittest.main()
