"""Tests of the test fixtures: tests/stacktree.py."""

import os
import shutil
import tempfile
import unittest

from tests import stacktree
from tests.stacktree import IS_ROOT, P, build_stack, diff_snapshots, snapshot


class _TmpMixin:
    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="fixtures-test-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)


class StackTreeTests(_TmpMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.ctmp = tempfile.mkdtemp(prefix="fixtures-stack-")
        cls.stack = os.path.join(cls.ctmp, "IOTstack")
        build_stack(cls.stack)
        cls.snap = snapshot(cls.stack)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.ctmp, ignore_errors=True)

    def test_deterministic(self):
        other = self.path("again")
        build_stack(other, seed=1)
        self.assertEqual(diff_snapshots(self.snap, snapshot(other)), [])
        self.assertEqual(self.snap, snapshot(self.stack))  # snapshot itself is stable

    def test_other_seed_differs(self):
        other = self.path("seed2")
        build_stack(other, seed=2, scale=0.1)
        small = snapshot(other)
        self.assertNotEqual(diff_snapshots(self.snap, small), [])

    def test_size(self):
        # Small enough that every test can afford its own tree.
        n = len(self.snap)
        total = sum(e.size for e in self.snap.values() if e.size)
        self.assertTrue(300 <= n <= 600, n)
        self.assertTrue(2 << 20 <= total <= 4 << 20, total)

    def test_scale(self):
        small = self.path("small")
        build_stack(small, scale=0.1)
        s = snapshot(small)
        self.assertLess(len(s), len(self.snap) / 2)
        self.assertLess(sum(e.size or 0 for e in s.values()),
                        sum(e.size or 0 for e in self.snap.values()) / 4)

    def test_dest_must_be_new_or_empty(self):
        os.makedirs(self.path("full"))
        open(self.path("full", "x"), "w").close()
        with self.assertRaises(FileExistsError):
            build_stack(self.path("full"))
        os.makedirs(self.path("empty"))
        build_stack(self.path("empty"), scale=0.1)
        self.assertTrue(os.path.isfile(self.path("empty", "docker-compose.yml")))

    def test_promised_content(self):
        s = self.snap
        for rel in ("docker-compose.yml", "compose-override.yml", "docker-compose.override.yml",
                    ".env", "menu.sh", P["extra_file"], P["db_dump"], P["tmp_cache_file"],
                    P["old_backup_note"]):
            self.assertEqual(s[rel].type, "file", rel)
        for hook in ("pre_backup.sh", "post_backup.sh", "post_restore.sh"):
            self.assertNotIn(hook, s)
        self.assertEqual(s[".env"].mode, 0o600)
        self.assertEqual(s["menu.sh"].mode, 0o755)
        self.assertEqual(s[P["symlink_rel"]], s[P["symlink_rel"]]._replace(
            type="symlink", target="home-assistant_v2.db"))
        self.assertEqual(s[P["symlink_abs"]].target, "/usr/share/zoneinfo/Etc/UTC")
        self.assertEqual(s[P["symlink_dangling"]].type, "symlink")
        self.assertFalse(os.path.exists(os.path.join(self.stack, P["symlink_dangling"])))
        self.assertEqual(s[P["symlink_dir"]].target, "lib")
        self.assertGreater(len(s[P["symlink_long"]].target.encode()), 100)
        self.assertTrue(os.path.isfile(os.path.join(self.stack, P["symlink_long"])))
        # canonical id = smallest path: "hardlink.db" < "home-assistant_v2.db"
        self.assertEqual(s[P["ha_db"]].link_group, P["hardlink"])
        self.assertEqual(s[P["hardlink"]].link_group, P["hardlink"])
        self.assertEqual([r for r, e in s.items() if e.link_group], [P["hardlink"], P["ha_db"]])
        self.assertEqual([r for r, e in s.items() if e.type == "fifo"], [P["fifo"]])
        self.assertEqual(s[P["empty_nested"]].type, "dir")
        for rel in (P["empty_dir"], P["empty_nested"]):
            self.assertEqual(os.listdir(os.path.join(self.stack, rel)), [])
        self.assertGreater(len(P["long_name"].encode()), 255)
        self.assertGreater(len(P["long_name"].rsplit("/", 1)[1]), 120)
        self.assertEqual(s[P["long_name"]].type, "file")
        for key in ("unicode", "spaces", "dash", "glob", "quote_dollar", "colon"):
            self.assertEqual(s[P[key]].type, "file", key)
        self.assertEqual(s[P["setuid"]].mode, 0o4755)
        self.assertEqual(s[P["setgid"]].mode, 0o2755)
        self.assertEqual(s[P["readonly"]].mode, 0o444)
        self.assertEqual(s[P["group_writable"]].mode, 0o666)
        self.assertEqual(s[P["sticky_dir"]].mode, 0o1777)
        self.assertEqual(s[P["dir_0700"]].mode, 0o700)
        self.assertEqual(s[P["old_mtime"]].mtime, stacktree.OLD_MTIME)
        for rel, e in s.items():
            self.assertTrue(stacktree.BASE_MTIME <= e.mtime < stacktree.BASE_MTIME + 100_000
                            or rel == P["old_mtime"], rel)

    @unittest.skipUnless(IS_ROOT, "ownership needs root")
    def test_owners(self):
        s = self.snap
        self.assertEqual((s[P["grafana_dir"]].uid, s[P["grafana_dir"]].gid), (472, 472))
        self.assertEqual((s[P["grafana_db"]].uid, s[P["grafana_db"]].gid), (472, 472))
        self.assertEqual((s[P["pwfile"]].uid, s[P["pwfile"]].gid), (1883, 1883))
        self.assertEqual((s[P["orphan_owner"]].uid, s[P["orphan_owner"]].gid), (54321, 54321))
        self.assertEqual((s[P["mixed_owner"]].uid, s[P["mixed_owner"]].gid), (1000, 472))
        self.assertEqual((s[P["setuid"]].uid, s[P["setuid"]].mode), (1000, 0o4755))
        self.assertEqual((s[P["setgid"]].gid, s[P["setgid"]].mode), (1000, 0o2755))
        self.assertEqual(s["docker-compose.yml"].uid, 0)
        self.assertEqual({e.uid for e in s.values()}, {0, 472, 1000, 1883, 54321})

    def test_snapshot_skip(self):
        s = snapshot(self.stack, skip=stacktree.NOT_BACKED_UP)
        self.assertFalse([r for r in s if r == "backups" or r.startswith("backups/")])
        self.assertFalse([r for r in s if r.startswith(".tmp/cache")])
        self.assertIn(P["db_dump"], s)
        self.assertIn(".tmp", s)

    def test_diff_detects_changes(self):
        work = self.path("w")
        build_stack(work, scale=0.1)
        base = snapshot(work)

        def check(expect_field, rel):
            d = diff_snapshots(base, snapshot(work))
            self.assertTrue(d, "no difference detected for %s" % expect_field)
            self.assertTrue(all(line.startswith(rel + ":") for line in d), d)
            self.assertIn("%s differs" % expect_field, "\n".join(d))
            return d

        f = os.path.join(work, "extra/notes.txt")
        st = os.stat(f)
        with open(f, "r+b") as fh:  # same size, one byte changed
            fh.write(b"E")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        check("sha256", "extra/notes.txt")
        with open(f, "r+b") as fh:
            fh.write(b"e")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual(diff_snapshots(base, snapshot(work)), [])

        os.chmod(f, 0o600)
        d = check("mode", "extra/notes.txt")
        self.assertIn("0o644 != 0o600", d[0])
        os.chmod(f, 0o644)

        os.utime(f, (1, 1))
        check("mtime", "extra/notes.txt")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))

        link = os.path.join(work, P["symlink_rel"])
        lst = os.lstat(link)
        os.unlink(link)
        os.symlink("hardlink.db", link)
        os.utime(link, ns=(lst.st_atime_ns, lst.st_mtime_ns), follow_symlinks=False)
        ha = os.path.dirname(link)
        os.utime(ha, (base["volumes/homeassistant"].mtime,) * 2)
        check("target", P["symlink_rel"])

        d = diff_snapshots(base, snapshot(work), ignore=("target",))
        self.assertEqual(d, [])
        self.assertEqual(diff_snapshots(base, snapshot(work), ignore=("symlink:target",)), [])
        self.assertTrue(diff_snapshots(base, snapshot(work), ignore=("file:target",)))
        with self.assertRaises(ValueError):
            diff_snapshots(base, base, ignore=("colour",))

        # missing entries are reported
        os.unlink(os.path.join(work, P["tmp_cache_file"]))
        d = diff_snapshots(base, snapshot(work, skip=[".tmp/cache/"]))
        self.assertTrue(any("only in first" in x and ".tmp/cache" in x for x in d), d)

    def test_diff_hardlink_broken(self):
        work = self.path("w")
        build_stack(work, scale=0.1)
        base = snapshot(work)
        hl = os.path.join(work, P["hardlink"])
        tmpcopy = hl + ".copy"
        shutil.copy2(hl, tmpcopy)
        os.replace(tmpcopy, hl)
        ha = os.path.dirname(hl)
        os.utime(ha, (base["volumes/homeassistant"].mtime,) * 2)
        d = diff_snapshots(base, snapshot(work), ignore=("uid", "gid"))
        self.assertEqual(len(d), 2, d)
        self.assertTrue(all("link_group differs" in x for x in d), d)

    @unittest.skipUnless(IS_ROOT, "chown needs root")
    def test_diff_detects_owner(self):
        work = self.path("w")
        build_stack(work, scale=0.1)
        base = snapshot(work)
        os.lchown(os.path.join(work, P["grafana_db"]), 0, 472)
        d = diff_snapshots(base, snapshot(work))
        self.assertEqual(d, [P["grafana_db"] + ": uid differs: 472 != 0"])
        self.assertEqual(diff_snapshots(base, snapshot(work), ignore=("uid",)), [])


if __name__ == "__main__":
    unittest.main()
