"""Table tests of unpack's member policy: what may be written where."""
import unittest

from iotstack_backup import restore, tarformat, unpack
from tests.support import tar_member as member


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

        self.assertEqual(run([member("volumes/l", "symlink", "/etc"), member("volumes/m")]),
                         ["volumes/l", "volumes/m"])
        refused = [
            [member("volumes/l", "symlink", "/etc"), member("volumes/l/passwd")],
            [member("volumes/l", "symlink", "x"), member("volumes/x", "symlink", "/"),
             member("volumes/l/y/z")],
            [member("volumes/h", "hardlink", "/etc/passwd")],
            [member("volumes/h", "hardlink", "volumes/later"), member("volumes/later")],
            [member("volumes/l", "symlink", "f"), member("volumes/h", "hardlink", "volumes/l")],
            [member("./", "file")],
            # A folder already passed, then made a symlink: its next member
            # must not pass on the strength of the first.
            [member("volumes/d/a"), member("volumes/d", "symlink", "/etc"),
             member("volumes/d/b")],
            [member("volumes/d/e/a"), member("volumes/d", "symlink", "/etc"),
             member("volumes/d/e/b")],
            [member("volumes/d/f"), member("volumes/d", "symlink", "/etc"),
             member("volumes/h", "hardlink", "volumes/d/f")],
        ]
        for members in refused:
            with self.assertRaises(tarformat.ArchiveError, msg=[m.name for m in members]):
                run(members)
        self.assertEqual(run([member("volumes/f"), member("volumes/h", "hardlink",
                                                           "./volumes/f")]),
                         ["volumes/f", "volumes/h"])

    def test_link_targets_are_checked_even_when_files_are_not_tracked(self):
        # The staging restore leaves "is it an earlier file" to the disk, but
        # never the path: a link through an archive symlink reaches outside.
        for track in (True, False):
            policy = unpack.MemberPolicy(track_files=track)
            policy.check(member("volumes/l", "symlink", "/etc"))
            policy.check(member("volumes/f"))
            for target in ("volumes/l/passwd", "volumes/l", "/etc/passwd", "../x", "a/../../x"):
                with self.assertRaises(tarformat.ArchiveError, msg=(track, target)):
                    policy.check(member("volumes/h", "hardlink", target))
            self.assertEqual(policy.check(member("volumes/h", "hardlink", "volumes/f")),
                             "volumes/h")
        untracked = unpack.MemberPolicy(track_files=False)
        untracked.check(member("volumes/f"))
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
            policy.check(member("volumes/f%d" % i))
        policy.check(member("volumes/link9", "hardlink", "volumes/f9"))
        with self.assertRaises(tarformat.ArchiveError):
            policy.check(member("volumes/bad", "hardlink", "volumes/f10"))
        policy.files.close()
