"""Issue 13 with real mounts: tmpfs file systems mounted inside a temporary
IOTstack tree (root only: mount needs it), the commands run as root and as
the user pi, and every mount unmounted in the clean-up."""
import os
import shutil
import subprocess
import sys
import unittest

from iotstack_backup import run, unpack
from tests.support import RESTORE_PY, write
from tests.support import read_bytes as read
from tests.user_stack import IS_ROOT, StackCase, chown_tree, one_error_line, users


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
        self.addCleanup(subprocess.run, ["umount", "-l", path], stderr=subprocess.DEVNULL)
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


class OtherDiskTest(MountCase):
    """Must 4: a mount point or a symlink to another disk keeps its place
    through a restore, and its data goes back onto that disk."""

    def leftovers(self, *folders):
        found = []
        for folder in folders:
            for name in os.listdir(folder):
                if name.startswith((".iotstack-restore-", "restore-")):
                    found.append(os.path.join(folder, name))
        return found

    def backup_then_change(self, user, influx):
        """Backup, then change the data: on the other disk and off it."""
        write(os.path.join(influx, "data", "db.bin"), b"v1" * 1000)
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        result = self.backup(user)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
        write(os.path.join(influx, "data", "db.bin"), b"v2")
        write(os.path.join(influx, "data", "new-since"), b"new")
        write(self.path("volumes/nodered/flows.json"), b"[2]\n")
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        return "backup/" + os.path.basename(self.archives()[-1])

    def assert_backup_data(self, influx):
        self.assertEqual(read(os.path.join(influx, "data", "db.bin")), b"v1" * 1000)
        self.assertFalse(os.path.exists(os.path.join(influx, "data", "new-since")))
        self.assertEqual(read(self.path("volumes/nodered/flows.json")), b"[]\n")

    def test_tmpfs_at_volumes_influxdb(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("mount-" + user)
                influx = self.path("volumes/influxdb")
                shutil.rmtree(influx)
                self.mount_tmpfs(influx)
                device = os.stat(influx).st_dev
                name = self.backup_then_change(user, influx)
                result = self.restore(user, name)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                self.assertTrue(os.path.ismount(influx))
                self.assertEqual(os.stat(influx).st_dev, device)
                self.assertEqual(os.stat(os.path.join(influx, "data", "db.bin")).st_dev, device)
                self.assert_backup_data(influx)
                self.assertEqual(self.leftovers(influx, self.path(".tmp")), [])
                self.assertIn("volumes/influxdb is a mount point: its data goes back onto",
                              self.newest_log("restore"))
                # --only below the mount point works the same way.
                write(os.path.join(influx, "data", "db.bin"), b"v3")
                result = self.restore(user, "--only", "volumes/influxdb/data", name)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                self.assertTrue(os.path.ismount(influx))
                self.assertEqual(read(os.path.join(influx, "data", "db.bin")), b"v1" * 1000)
                self.assertEqual(self.leftovers(influx, self.path(".tmp")), [])
                # Nothing was written onto the SD card under the mount point.
                subprocess.run(["umount", influx], check=True)
                self.assertEqual(os.listdir(influx), [])

    def test_tmpfs_at_volumes_itself_and_in_place(self):
        # volumes/ a mount point: renaming it would be EBUSY.
        for user in users():
            for args in ([], ["--in-place"]):
                with self.subTest(user=user, args=args):
                    self.new_stack("volumes-%s-%d" % (user, len(args)))
                    volumes = self.path("volumes")
                    shutil.rmtree(volumes)
                    self.mount_tmpfs(volumes)
                    device = os.stat(volumes).st_dev
                    write(self.path("volumes/nodered/flows.json"), b"[]\n")
                    name = self.backup_then_change(user, self.path("volumes/influxdb"))
                    result = self.restore(user, *args, name)
                    self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                    self.assertTrue(os.path.ismount(volumes))
                    self.assertEqual(os.stat(self.path("volumes/nodered/flows.json")).st_dev,
                                     device)
                    self.assert_backup_data(self.path("volumes/influxdb"))
                    self.assertEqual(self.leftovers(volumes, self.path(".tmp")), [])
                    subprocess.run(["umount", volumes], check=True)
                    self.assertEqual(os.listdir(volumes), [])

    def test_volumes_symlinked_to_another_disk(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("link-" + user)
                ssd = self.mount_tmpfs(os.path.join(self.tmp, "ssd-" + user))
                target = os.path.join(ssd, "volumes")
                shutil.move(self.path("volumes"), target)
                os.symlink(target, self.path("volumes"))
                chown_tree(ssd, self.pi.pw_uid, self.pi.pw_gid)
                name = self.backup_then_change(user, os.path.join(target, "influxdb"))
                dry = self.run_as(user, "restore.py", "--dry-run", name)
                self.assertEqual(dry.returncode, run.EXIT_OK, dry.stderr)
                self.assertIn("Would keep the symlink volumes; its data goes back onto that disk",
                              dry.stdout)
                result = self.restore(user, name)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                self.assertEqual(os.readlink(self.path("volumes")), target)
                self.assert_backup_data(os.path.join(target, "influxdb"))
                self.assertEqual(self.leftovers(target, self.path(".tmp")), [])

    def test_a_mount_point_the_backup_does_not_hold_is_left_alone(self):
        for user in users():
            with self.subTest(user=user):
                self.new_stack("absent-" + user)
                result = self.backup(user)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                name = "backup/" + os.path.basename(self.archives()[-1])
                usb = self.mount_tmpfs(self.path("volumes/frigate"))
                write(os.path.join(usb, "clips", "a.mp4"), b"video")
                chown_tree(usb, self.pi.pw_uid, self.pi.pw_gid)
                result = self.restore(user, name)
                self.assertEqual(result.returncode, run.EXIT_OK, result.stderr)
                self.assertTrue(os.path.ismount(usb))
                self.assertEqual(read(os.path.join(usb, "clips", "a.mp4")), b"video")
                self.assertIn("Kept as it is: volumes/frigate (a mount point the backup holds "
                              "nothing for)", self.newest_log("restore"))

    def test_a_restore_that_fails_leaves_the_mount_point_as_it_was(self):
        # The archive's end is cut off: it fails its check after everything
        # was staged, on the other disk too; the staging folder there goes,
        # and the mount point keeps its mtime (it did not before
        # OtherDisks.drop put it back).
        influx = self.path("volumes/influxdb")
        shutil.rmtree(influx)
        self.mount_tmpfs(influx)
        name = self.backup_then_change("root", influx)
        archive = os.path.join(self.backups, name)
        with open(archive, "r+b") as f:
            f.truncate(os.path.getsize(archive) - 6)
        os.utime(influx, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        result = self.restore("root", name)
        self.assertNotEqual(result.returncode, run.EXIT_OK)
        self.assertTrue(os.path.ismount(influx))
        self.assertEqual(self.leftovers(influx, self.path(".tmp")), [])
        self.assertEqual(os.stat(influx).st_mtime_ns, 1_600_000_000_000_000_000)
        self.assertEqual(read(os.path.join(influx, "data", "db.bin")), b"v2")

    def test_killed_at_every_rename_with_a_mount_point(self):
        # strace kills the restore at its Nth rename; the next run (here
        # --list) rolls back or completes it: old or new, never a mix, on
        # both disks, and nothing of ours is left on either.
        if not shutil.which("strace"):
            self.skipTest("strace is not installed")
        influx = self.path("volumes/influxdb")
        shutil.rmtree(influx)
        self.mount_tmpfs(influx)
        name = self.backup_then_change("root", influx)
        archive = os.path.join(self.backups, name)
        outcomes = set()
        for n in range(1, 30):
            with self.subTest(rename=n):
                result = subprocess.run(
                    [shutil.which("strace"), "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
                     "-e", "inject=rename,renameat,renameat2:signal=KILL:when=%d" % n,
                     sys.executable, RESTORE_PY, "--dir", self.stack,
                     "--no-stop", "--yes", archive],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                    env={"PATH": self.bin, "IOTSTACK_NO_DOCKER": "1"}, timeout=120)
                listed = self.run_as("root", "restore.py", "--list")
                self.assertEqual(listed.returncode, run.EXIT_OK, listed.stderr)
                self.assertTrue(os.path.ismount(influx))
                new = read(os.path.join(influx, "data", "db.bin")) == b"v1" * 1000
                if new:
                    self.assert_backup_data(influx)
                else:
                    self.assertEqual(read(os.path.join(influx, "data", "db.bin")), b"v2")
                    self.assertEqual(read(os.path.join(influx, "data", "new-since")), b"new")
                    self.assertEqual(read(self.path("volumes/nodered/flows.json")), b"[2]\n")
                self.assertEqual(self.leftovers(influx, self.path(".tmp")), [])
                outcomes.add("new" if new else "old")
                if result.returncode == 0:
                    break
                # Back to the changed tree for the next attempt.
                write(os.path.join(influx, "data", "db.bin"), b"v2")
                write(os.path.join(influx, "data", "new-since"), b"new")
                write(self.path("volumes/nodered/flows.json"), b"[2]\n")
        self.assertEqual(outcomes, {"old", "new"})


if __name__ == "__main__":
    unittest.main()
