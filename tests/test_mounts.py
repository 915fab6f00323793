"""Issue 13 with real mounts: tmpfs file systems mounted inside a temporary
IOTstack tree (root only: mount needs it), the commands run as root and as
the user pi, and every mount unmounted in the clean-up."""
import os
import shutil
import subprocess
import unittest

from iotstack_backup import run, unpack
from tests.test_hostile import IS_ROOT, StackCase, chown_tree, one_error_line, read, users, write


class MountCase(StackCase):
    def setUp(self):
        if not IS_ROOT:
            self.skipTest("mounting a tmpfs needs root")
        super().setUp()

    def mount_tmpfs(self, path, size="4m", extra=""):
        os.makedirs(path, exist_ok=True)
        options = "size=%s,mode=0755,uid=%d,gid=%d%s" % (size, self.pi.pw_uid, self.pi.pw_gid,
                                                       extra)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                                stderr=subprocess.PIPE, universal_newlines=True)
        if result.returncode != 0:
            self.skipTest("cannot mount a tmpfs: %s" % result.stderr.strip())
        self.addCleanup(subprocess.run, ["umount", "-l", path])
        return path

    def snapshot(self, root):
        """{rel: (type, bytes or link)} of a tree."""
        tree = {}
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)
                if os.path.islink(path):
                    tree[rel] = ("link", os.readlink(path))
                elif os.path.isdir(path):
                    tree[rel] = ("dir", None)
                else:
                    tree[rel] = ("file", read(path))
        return tree


class InPlaceTest(MountCase):
    """Must 6: --in-place checks the space before deleting; when it still
    fails, it names the items left incomplete."""

    def setUp(self):
        super().setUp()
        self.disk = os.path.join(self.tmp, "disk")
        self.outside = os.path.join(self.tmp, "archives")
        os.mkdir(self.outside)
        os.chown(self.outside, self.pi.pw_uid, self.pi.pw_gid)

    def make_archive(self, user, big):
        """An archive (kept outside the small disk) of the stack with `big`
        extra bytes of InfluxDB data and 300 small Node-RED files."""
        write(self.path("volumes/influxdb/data/big.bin"), os.urandom(big))
        for i in range(300):
            write(self.path("volumes/nodered/lib/f%03d.js" % i), b"x")
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        result = self.backup(user)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        (archive,) = self.archives()
        moved = os.path.join(self.outside, "%s-%d.tar.gz" % (user, big))
        shutil.move(archive, moved)
        shutil.rmtree(self.stack)
        return moved

    def test_not_enough_space_changes_nothing(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("big-" + user)
                archive = self.make_archive(user, 3 << 20)
                self.mount_tmpfs(self.disk + user, "2m")
                self.stack = os.path.join(self.disk + user, "IOTstack")
                self.new_stack(os.path.join(self.disk + user, "IOTstack"))
                before = self.snapshot(self.stack)
                result = self.restore(user, "--in-place", archive)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                one_error_line(self, result.stderr, "not enough space to restore in place",
                               "nothing was changed")
                after = self.snapshot(self.stack)
                for rel in ("backups", ".tmp"):
                    after = {k: v for k, v in after.items() if not k.startswith(rel)}
                    before = {k: v for k, v in before.items() if not k.startswith(rel)}
                self.assertEqual(after, before)

    def test_running_out_anyway_names_the_incomplete_items(self):
        # Room enough for the bytes, but too few inodes for the files: the
        # check cannot see that, the unpacking fails in volumes/.
        for user in users():
            with self.subTest(user=user):
                self.new_stack("inodes-" + user)
                archive = self.make_archive(user, 1000)
                self.mount_tmpfs(self.disk + user, "8m", ",nr_inodes=120")
                self.new_stack(os.path.join(self.disk + user, "IOTstack"))
                result = self.restore(user, "--in-place", archive)
                self.assertEqual(result.returncode, run.EXIT_FAILED)
                line = one_error_line(self, result.stderr, "unpacking in place failed",
                                      "incomplete or missing now: .env, docker-compose.yml, "
                                      "volumes; complete: services", archive)
                self.assertIn("No space left on device", line)
                self.assertIn("ERROR: " + line.split("error: ", 1)[1], self.newest_log("restore"))
                # services/ is complete, as the message says.
                self.assertEqual(read(self.path("services/nodered/Dockerfile")), b"FROM nodered\n")

    def test_shortfall_table(self):
        self.assertEqual(unpack.in_place_shortfall(100, 50, 50), 0)
        self.assertEqual(unpack.in_place_shortfall(100, 50, 20), 30)
        self.assertEqual(unpack.in_place_shortfall(0, 0, 0), 0)
        tracker = unpack.UnitTracker(["services", "volumes", "docker-compose.yml"])
        for rel in ("services", "services/a", "volumes", "volumes/x/y"):
            tracker.saw(rel)
        self.assertEqual(tracker.outcome(), (["services"], ["volumes", "docker-compose.yml"]))
        self.assertEqual(unpack.UnitTracker(["a", "b"]).outcome(), ([], ["a", "b"]))


if __name__ == "__main__":
    unittest.main()
