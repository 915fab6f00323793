"""Tests of unpack: the member policy (what may be written where, in table
tests), the unpacking of whole archives by a restore (hostile and broken
ones refused with nothing changed), the early writeback beside it, and the
writer process that keeps the archive's order."""
import gzip
import hashlib
import os
import random
import signal
import tempfile
import threading
import unittest
from unittest import mock

from iotstack_backup import disk_sync, file_writer, journal, pgzip, restore, tarformat, unpack
from tests.restore_case import TMP_OWN, RestoreCase, change_tree, items, member, tar_gz, whole
from tests.stacktree import IS_ROOT, diff_snapshots, snapshot
from tests.support import tar_member


class MemberPolicyTest(unittest.TestCase):
    def test_normalize_member_name(self):
        ok = [("./volumes/a", "volumes/a"), ("volumes//a/./b/", "volumes/a/b"), ("./", ""),
              ("services", "services")]
        for name, rel in ok:
            self.assertEqual(unpack.normalize_member_name(name), rel)
        for bad in ("/etc/passwd", "../x", "volumes/../../x", "a/..", "", "a\0b"):
            with self.assertRaises(tarformat.ArchiveError, msg=bad):
                unpack.normalize_member_name(bad)

    def test_policy(self):
        def run(members):
            policy = unpack.MemberPolicy()
            return [policy.check(m) for m in members]

        self.assertEqual(run([tar_member("volumes/l", "symlink", "/etc"), tar_member("volumes/m")]),
                         ["volumes/l", "volumes/m"])
        refused = [
            [tar_member("volumes/l", "symlink", "/etc"), tar_member("volumes/l/passwd")],
            [tar_member("volumes/l", "symlink", "x"), tar_member("volumes/x", "symlink", "/"),
             tar_member("volumes/l/y/z")],
            [tar_member("volumes/h", "hardlink", "/etc/passwd")],
            [tar_member("volumes/h", "hardlink", "volumes/later"), tar_member("volumes/later")],
            [tar_member("volumes/l", "symlink", "f"), tar_member("volumes/h", "hardlink", "volumes/l")],
            [tar_member("./", "file")],
            # A folder already passed, then made a symlink: its next member
            # must not pass on the strength of the first.
            [tar_member("volumes/d/a"), tar_member("volumes/d", "symlink", "/etc"),
             tar_member("volumes/d/b")],
            [tar_member("volumes/d/e/a"), tar_member("volumes/d", "symlink", "/etc"),
             tar_member("volumes/d/e/b")],
            [tar_member("volumes/d/f"), tar_member("volumes/d", "symlink", "/etc"),
             tar_member("volumes/h", "hardlink", "volumes/d/f")],
        ]
        for members in refused:
            with self.assertRaises(tarformat.ArchiveError, msg=[m.name for m in members]):
                run(members)
        self.assertEqual(run([tar_member("volumes/f"), tar_member("volumes/h", "hardlink",
                                                           "./volumes/f")]),
                         ["volumes/f", "volumes/h"])

    def test_link_targets_are_checked_even_when_files_are_not_tracked(self):
        # The staging restore leaves "is it an earlier file" to the disk, but
        # never the path: a link through an archive symlink reaches outside.
        for track in (True, False):
            policy = unpack.MemberPolicy(track_files=track)
            policy.check(tar_member("volumes/l", "symlink", "/etc"))
            policy.check(tar_member("volumes/f"))
            for target in ("volumes/l/passwd", "volumes/l", "/etc/passwd", "../x", "a/../../x"):
                with self.assertRaises(tarformat.ArchiveError, msg=(track, target)):
                    policy.check(tar_member("volumes/h", "hardlink", target))
            self.assertEqual(policy.check(tar_member("volumes/h", "hardlink", "volumes/f")),
                             "volumes/h")
        untracked = unpack.MemberPolicy(track_files=False)
        untracked.check(tar_member("volumes/f"))
        self.assertFalse(untracked.files)

    def test_restorable_and_units(self):
        self.assertTrue(unpack.restorable("volumes/a", []))
        self.assertFalse(unpack.restorable("menu.sh", []))
        self.assertFalse(unpack.restorable("backups/x", []))
        self.assertTrue(unpack.restorable("volumes/a/b", ["volumes/a"]))
        self.assertFalse(unpack.restorable("volumes/ab", ["volumes/a"]))
        self.assertFalse(unpack.restorable("volumes", ["volumes/a"]))
        self.assertEqual(restore.replaced_units({"volumes", "services"}, []),
                         ["services", "volumes"])
        self.assertEqual(restore.replaced_units({"volumes"}, ["volumes/b", "volumes/a"]),
                         ["volumes/a", "volumes/b"])
        self.assertEqual(unpack.staging_ancestors("volumes/a/b"), ["volumes", "volumes/a"])
        self.assertEqual(unpack.staging_ancestors("volumes"), [])


if __name__ == "__main__":
    unittest.main()


class NameSetTest(unittest.TestCase):
    """The file names a hard link may point to, in flat memory: past the
    in-memory part they go to a temporary file, and answer the same."""

    def test_in_memory_and_spilled_names_answer_alike(self):
        names = unpack.NameSet(in_memory=3)
        self.assertFalse(names)
        added = ["volumes/f%d" % i for i in range(50)]
        for name in added:
            names.add(name)
        self.assertTrue(names)
        self.assertEqual(len(names._recent), 3)  # the rest went to the file
        for name in added:
            self.assertIn(name, names)
        for name in ("volumes/f50", "volumes/f", "", "volumes/f1/x", "vølumes/f1"):
            self.assertNotIn(name, names)
        names.discard("volumes/f40")  # a later symlink of that name
        names.discard("volumes/f1")
        names.discard("never/added")
        self.assertNotIn("volumes/f40", names)
        self.assertNotIn("volumes/f1", names)
        self.assertIn("volumes/f41", names)
        names.add("volumes/f40")  # a file of that name again
        self.assertIn("volumes/f40", names)
        names.close()

    def test_a_digest_found_off_its_boundary_is_no_match(self):
        names = unpack.NameSet(in_memory=0)
        for name in ("a", "b", "c"):
            names.add(name)
        names._spill.seek(0)
        data = names._spill.read()
        record = unpack.NameSet.RECORD
        # The bytes straddling two records are no digest of theirs.
        self.assertIsNone(names._last_op(data[9:9 + 16]))
        self.assertEqual(names._last_op(data[record + 1:2 * record]), b"+")
        names.close()

    def test_policy_refuses_a_link_to_a_spilled_name_it_never_saw(self):
        policy = unpack.MemberPolicy()
        policy.files = unpack.NameSet(in_memory=2)
        for i in range(10):
            policy.check(tar_member("volumes/f%d" % i))
        policy.check(tar_member("volumes/link9", "hardlink", "volumes/f9"))
        with self.assertRaises(tarformat.ArchiveError):
            policy.check(tar_member("volumes/bad", "hardlink", "volumes/f10"))
        policy.files.close()


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------
# Beside the unpacking: the early writeback and the writer process

class UnpackHelperTests(RestoreCase):
    """What runs beside the unpacking: the thread that syncs in the
    background, and the process that creates the files."""

    def record_syncs(self):
        # Recorded, not run: what is under test is when and where they run,
        # and on what: the staging folder's file system, never the machine.
        calls = []
        self.synced = []

        def record(path):
            calls.append(threading.current_thread().name)
            self.synced.append(path)
            return "syncfs"
        patcher = mock.patch.object(disk_sync, "sync_filesystem", record)
        patcher.start()
        self.addCleanup(patcher.stop)
        step = mock.patch.object(unpack, "WRITEBACK_STEP", 1)
        step.start()
        self.addCleanup(step.stop)
        return calls

    def writeback_threads(self):
        return [t for t in threading.enumerate() if t.name == "early-writeback"]

    def test_syncs_while_unpacking_then_once_more_before_the_swap(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        calls = self.record_syncs()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertIn("early-writeback", calls)
        # The final sync comes after the thread's last: the thread is gone.
        self.assertEqual(calls[-1], threading.current_thread().name)
        self.assertEqual(self.writeback_threads(), [])
        staging = os.path.join(self.stack, ".tmp", journal.STAGING_PREFIX)
        self.assertTrue(self.synced and all(path.startswith(staging) for path in self.synced),
                        self.synced)

    def test_only_the_file_system_written_is_synced_never_the_machine(self):
        if disk_sync._libc_syncfs() is None:
            self.skipTest("no syncfs in this C library (not Linux)")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with mock.patch("os.sync", side_effect=AssertionError("os.sync() of the machine")):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertIn("Synced the unpacked files to disk (syncfs of 1 file system)",
                      self.restore_log())

    def test_thread_ends_when_unpacking_fails(self):
        archive = self.make_backup()
        before = items(self.stack)
        with open(archive, "rb") as f:
            data = f.read()
        with open(archive, "wb") as f:
            f.write(data[:len(data) * 2 // 3])
        calls = self.record_syncs()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out)
        self.assertRegex(err, "truncated.*nothing was changed")
        self.assertIn("early-writeback", calls)
        self.assertEqual(self.writeback_threads(), [])
        self.assertEqual(diff_snapshots(before, items(self.stack)), [])
        self.assert_no_leftovers()

    def test_a_killed_writer_process_fails_the_restore_and_changes_nothing(self):
        archive = self.make_backup()
        before = whole(self.stack)
        real_send = file_writer.FileWriterProcess.send
        sent = []

        def send(writer, *args):
            sent.append(writer.pid)
            if len(sent) == 50:
                os.kill(writer.pid, signal.SIGKILL)
            return real_send(writer, *args)

        with mock.patch.object(file_writer.FileWriterProcess, "send", send):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("ended without finishing; nothing was changed", err)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        with self.assertRaises(ChildProcessError):
            os.waitpid(sent[0], os.WNOHANG)

    def test_no_writer_process_on_one_core(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with mock.patch.object(pgzip, "default_jobs", return_value=1), \
                mock.patch.object(file_writer, "FileWriterProcess",
                                  side_effect=AssertionError("a writer process")):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])

    def test_no_thread_below_one_step(self):
        calls = self.record_syncs()
        writeback = unpack.EarlyWriteback(lambda: [self.stack], step=100)
        writeback.wrote(60)
        writeback.wrote(39)
        self.assertEqual(self.writeback_threads(), [])
        writeback.close()
        self.assertEqual((calls, writeback.syncs), ([], 0))


# ---------------------------------------------------------------------------
# Hostile and broken archives

class HostileArchiveTests(RestoreCase):
    def setUp(self):
        super().setUp()
        os.makedirs(os.path.join(self.stack, "backups/logs"))  # as a backup leaves it
        self.outside = os.path.join(self.tmp, "outside")
        os.mkdir(self.outside)
        self.target = os.path.join(self.outside, "target.txt")
        with open(self.target, "w") as f:
            f.write("outside, must not change\n")
        # Benign members first, so that unpacking has begun when the bad one comes.
        self.benign = [member(b"volumes/", tarformat.TYPE_DIR, mode=0o755),
                       member(b"volumes/ok.txt", data=b"fine\n")]

    def write(self, data, name="evil.tar.gz"):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assert_refused(self, data, pattern):
        archive = self.write(data)
        before = whole(self.stack)
        around = sorted(os.listdir(self.tmp))
        outside = {"target": sha256(self.target), "passwd": sha256("/etc/passwd"),
                   "nlink": (os.stat(self.target).st_nlink, os.stat("/etc/passwd").st_nlink)}

        code, out, err = self.restore(archive, "noask")

        self.assertEqual(code, 1, out + err)
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1, err)
        self.assertRegex(err, pattern)
        self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
        self.assert_no_leftovers()
        self.assertEqual(set(os.listdir(os.path.join(self.stack, ".tmp"))), TMP_OWN)
        self.assertEqual(os.listdir(self.outside), ["target.txt"])
        self.assertEqual(sorted(os.listdir(self.tmp)), around)
        self.assertEqual(outside, {
            "target": sha256(self.target), "passwd": sha256("/etc/passwd"),
            "nlink": (os.stat(self.target).st_nlink, os.stat("/etc/passwd").st_nlink)})
        # Refused before any service was touched.
        self.assert_services_untouched()
        self.assertIn("ERROR:", self.restore_log())
        return err

    def test_traversal(self):
        for name in (b"volumes/../../evil", b"../evil", b"volumes/a/../../../evil",
                     b"./../evil"):
            with self.subTest(name=name):
                self.assert_refused(tar_gz(*self.benign, member(name, data=b"x")), r"'\.\.'")
                self.assertFalse(os.path.lexists(os.path.join(self.tmp, "evil")))

    def test_absolute_name(self):
        name = os.path.join(self.outside, "evil").encode()
        self.assert_refused(tar_gz(*self.benign, member(name, data=b"x")), "absolute")
        # The same through a pax path record, which overrides the header's name.
        long_name = (self.outside + "/" + "p" * 200 + "/evil").encode()
        self.assert_refused(tar_gz(*self.benign, member(long_name, data=b"x")), "absolute")

    def test_write_through_a_symlink(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/l/x", data=b"x")), "symlink 'volumes/l'")

    def test_write_through_a_symlink_chain(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/a", tarformat.TYPE_SYMLINK, linkname=b"b"),
            member(b"volumes/b", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/a/x", data=b"x")), "symlink")

    def test_write_through_a_symlinked_directory_member(self):
        # A later directory member of the same name does not make it safe.
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/l/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/l/x", data=b"x")), "symlink")

    def test_hard_link_outside(self):
        for target in (b"/etc/passwd", self.target.encode(), b"../outside/target.txt",
                       b"volumes/../../outside/target.txt"):
            with self.subTest(target=target):
                self.assert_refused(tar_gz(
                    *self.benign, member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=target)),
                    "hard link")

    def test_hard_link_to_a_later_or_missing_member(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/later"),
            member(b"volumes/later", data=b"x")), "hard link")
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/nothere")),
            "hard link")
        # To an earlier symlink (whose target could be anything).
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.target.encode()),
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/l")), "hard link")

    def test_hard_link_through_a_symlink(self):
        self.assert_refused(tar_gz(
            *self.benign,
            member(b"volumes/l", tarformat.TYPE_SYMLINK, linkname=self.outside.encode()),
            member(b"volumes/h", tarformat.TYPE_HARDLINK, linkname=b"volumes/l/target.txt")),
            "hard link")

    def test_member_below_a_file(self):
        # A later member needs a folder where an earlier one made a file.
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a", data=b"x"), member(b"volumes/a/b", data=b"y")),
            "not a directory")
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a", data=b"x"), member(b"volumes/a/b/c", data=b"y")),
            "not a directory")
        self.assert_refused(tar_gz(member(b"volumes", data=b"x"), member(b"volumes/a", data=b"y")),
                            "not a directory")
        # And the other way round.
        self.assert_refused(tar_gz(
            *self.benign, member(b"volumes/a/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/a", data=b"x")), "would replace a directory")

    def test_device_node_is_skipped_with_a_warning(self):
        archive = self.write(tar_gz(
            *self.benign,
            member(b"volumes/dev/", tarformat.TYPE_DIR, mode=0o755),
            member(b"volumes/dev/null0", tarformat.TYPE_CHAR, mode=0o666, dev=(1, 3)),
            member(b"volumes/dev/sda9", tarformat.TYPE_BLOCK, mode=0o660, dev=(8, 9))))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(sorted(os.listdir(os.path.join(self.stack, "volumes"))),
                         ["dev", "ok.txt"])
        self.assertEqual(os.listdir(os.path.join(self.stack, "volumes/dev")), [])
        log = self.restore_log()
        self.assertIn("Warning: skipped device node volumes/dev/null0", log)
        self.assertIn("Warning: skipped device node volumes/dev/sda9", log)

    def test_item_holding_only_a_device_node_is_left_alone(self):
        # volumes/ holds nothing that is restored: it must not be replaced (by
        # nothing) and the run must not crash half-way through the swap.
        before = items(self.stack)
        archive = self.write(tar_gz(
            member(b"services/", tarformat.TYPE_DIR, mode=0o755),
            member(b"services/only.txt", data=b"x\n"),
            member(b"volumes/null0", tarformat.TYPE_CHAR, mode=0o666, dev=(1, 3))))
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(os.listdir(os.path.join(self.stack, "services")), ["only.txt"])
        after = items(self.stack)
        self.assertEqual(diff_snapshots(
            {k: v for k, v in before.items() if not k.startswith("services")},
            {k: v for k, v in after.items() if not k.startswith("services")}), [])
        self.assertIn("Warning: skipped device node volumes/null0", self.restore_log())
        self.assert_no_leftovers()

    def test_damaged_archives(self):
        archive = self.make_backup()
        with open(archive, "rb") as f:
            good = f.read()
        size = len(good)
        for cut in (1, 2, 10, 100, 5000, size // 3, size // 2, size - 9, size - 8, size - 4,
                    size - 1):
            with self.subTest(cut=cut):
                self.assert_refused(good[:cut], "truncated")
        for where in (size // 2, size // 3, 2000):
            with self.subTest(flip=where):
                flipped = bytearray(good)
                flipped[where] ^= 0x10
                self.assert_refused(bytes(flipped), "corrupt|invalid")
        with self.subTest("not gzip"):
            self.assert_refused(random.Random(7).randbytes(5000), "not a gzip file")
            self.assert_refused(gzip.decompress(good), "not a gzip file")  # a plain .tar
        with self.subTest("empty"):
            self.assert_refused(b"", "empty")
        with self.subTest("trailing garbage"):
            self.assert_refused(good + b"garbage", "trailing garbage")
        with self.subTest("corrupt tar header"):
            tar = bytearray(gzip.decompress(good))
            tar[0] ^= 0x01  # the first header's name: its checksum no longer matches
            self.assert_refused(gzip.compress(bytes(tar)), "corrupt tar header")


# ---------------------------------------------------------------------------
# The writer process keeps the archive's order

class WriterOrderTests(unittest.TestCase):
    """With the writer process, members that reuse a path still take effect
    in archive order: the result, or the error, is the one of the serial
    Stager."""

    def unpack(self, data, writer):
        with tempfile.TemporaryDirectory(prefix="writer-order-") as tmp:
            archive = os.path.join(tmp, "a.tar.gz")
            with open(archive, "wb") as f:
                f.write(data)
            root = os.path.join(tmp, "root")
            os.mkdir(root, 0o700)
            stager = unpack.Stager(root, IS_ROOT, fresh_root=True, writer=writer)
            self.assertEqual(stager.writer is not None, writer)
            try:
                unpack.read_archive(archive, [], stager)
            except tarformat.ArchiveError as e:
                return "error: %s" % e
            finally:
                stager.close()
            return snapshot(root)

    def test_same_result_as_without_the_writer(self):
        d = member(b"volumes/", tarformat.TYPE_DIR, mode=0o755)
        cases = {
            "file then symlink": [d, member(b"volumes/p", data=b"1"),
                                  member(b"volumes/p", tarformat.TYPE_SYMLINK, linkname=b"x")],
            "file then folder": [d, member(b"volumes/p", data=b"1"),
                                 member(b"volumes/p/", tarformat.TYPE_DIR, mode=0o755)],
            "file then fifo": [d, member(b"volumes/p", data=b"1"),
                               member(b"volumes/p", tarformat.TYPE_FIFO)],
            "file twice": [d, member(b"volumes/p", data=b"1"), member(b"volumes/p", data=b"2")],
            "symlink then file": [d, member(b"volumes/p", tarformat.TYPE_SYMLINK, linkname=b"x"),
                                  member(b"volumes/p", data=b"1")],
            "hard link to a file just sent": [
                d, member(b"volumes/t", data=b"1" * 5000),
                member(b"volumes/l", tarformat.TYPE_HARDLINK, linkname=b"volumes/t")],
            "hard link over a file just sent": [
                d, member(b"volumes/t", data=b"1"), member(b"volumes/l", data=b"2"),
                member(b"volumes/l", tarformat.TYPE_HARDLINK, linkname=b"volumes/t")],
            "file then a file below it": [d, member(b"volumes/p", data=b"1"),
                                          member(b"volumes/p/q/r", data=b"2")],
            "folder then file": [d, member(b"volumes/p/", tarformat.TYPE_DIR, mode=0o755),
                                 member(b"volumes/p", data=b"1")],
            "many files then a symlink over the first": (
                [d] + [member(b"volumes/f%d" % i, data=b"%d" % i) for i in range(300)]
                + [member(b"volumes/f0", tarformat.TYPE_SYMLINK, linkname=b"f1")]),
        }
        for name, members in cases.items():
            with self.subTest(name):
                serial = self.unpack(tar_gz(*members), writer=False)
                self.assertEqual(self.unpack(tar_gz(*members), writer=True), serial)
        self.assertRegex(self.unpack(tar_gz(*cases["folder then file"]), True),
                         "^error: .*would replace a directory")
        self.assertRegex(self.unpack(tar_gz(*cases["file then a file below it"]), True),
                         "^error: .*is not a directory")
        self.assertEqual(self.unpack(tar_gz(*cases["file then symlink"]), True)["volumes/p"].type,
                         "symlink")

    def test_waits_for_the_writer_every_so_many_files(self):
        members = [member(b"volumes/", tarformat.TYPE_DIR, mode=0o755)]
        members += [member(b"volumes/f%d" % i, data=b"x") for i in range(25)]
        with mock.patch.object(unpack, "SENT_LIMIT", 10), \
                mock.patch.object(unpack.Stager, "_wait_for_writer", autospec=True,
                                  side_effect=unpack.Stager._wait_for_writer) as waited:
            result = self.unpack(tar_gz(*members), writer=True)
        self.assertEqual(len(result), 26)
        self.assertEqual(waited.call_count, 2)


if __name__ == "__main__":
    unittest.main()
