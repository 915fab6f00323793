"""Issue 20, Must 7: the read never follows what the walk did not follow.

Anyone who may write in volumes/ (the user pi, a container with a bind
mount) can swap a folder for a symlink while a backup runs as root.  The
read opens every entry in the folder the walk opened, without following a
symlink: what was a folder and is a symlink when read is archived as that
symlink, with a warning, and nothing of the folder it points to (here a
root-only folder) gets into the archive.  The races are made real: a swap
while a big file before the folder is being read (the progress line is the
hook), a swap before a deferred part is read (a segment's callback, and on
the real engine a process of pi's that swaps a group's folder while
another group is stopped).  Root only: the point is what root can read.
"""
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import unittest
import uuid
from unittest import mock

from iotstack_backup import archive_writer, docker_compose, run
from tests import engine as E
from tests import real_stack
from tests.support import BACKUP_PY, write
from tests.user_stack import IS_ROOT, StackCase, chown_tree, demote_to, python_for_pi

SECRET = b"root-only secret 7f3a\n"


class SwapCase(StackCase):
    def setUp(self):
        if not IS_ROOT:
            self.skipTest("the race matters as root (reading what pi may not): needs root")
        super().setUp()
        self.secret_dir = os.path.join(self.make_tmp("root-only-"), "private")
        write(os.path.join(self.secret_dir, "secret.txt"), SECRET, 0o600)
        os.chmod(self.secret_dir, 0o700)
        write(self.path("volumes/nodered/aaa.bin"), os.urandom(3 << 20))
        write(self.path("volumes/nodered/sub/own.txt"), b"own\n")
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)

    def swap_for_symlink(self, rel, target=None):
        """What pi can do to a folder of its own: move it aside, put a symlink
        to `target` (the root-only folder) in its place."""
        path = self.path(rel)
        subprocess.run(["sh", "-c", 'mv "$1" "$1.old" && ln -s "$2" "$1"', "sh", path,
                        target or self.secret_dir], check=True, preexec_fn=demote_to(self.pi))

    def members(self, data):
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            return {m.name: m for m in tf.getmembers()}

    def assert_not_followed(self, data, rel, warnings):
        members = self.members(data)
        self.assertTrue(members[rel].issym(), members[rel])
        self.assertEqual(members[rel].linkname, self.secret_dir)
        self.assertNotIn(rel + "/secret.txt", members)
        self.assertNotIn(SECRET, gzip.decompress(data))
        self.assertIn("%s was a folder when the backup began and is a symlink now: saved as "
                      "the symlink, not followed (something replaced it while the backup ran)"
                      % rel, warnings)


class Progress:
    def __init__(self, on_update):
        self.on_update = on_update

    def update(self, done, files):
        self.on_update(done)


class WalkRaceTest(SwapCase):
    def write_tar(self, items, progress, segments=()):
        out = io.BytesIO()
        self.stats = archive_writer.ArchiveStats()
        archive_writer.write_tar(out, self.stack, items, [], progress, self.stats, segments)
        return gzip.compress(out.getvalue())

    def test_a_folder_swapped_while_the_walk_runs_is_archived_as_the_symlink(self):
        # While aaa.bin (3 MiB) is read, pi swaps the folder after it,
        # volumes/nodered/sub, for a symlink to root's folder.
        swapped = []

        def on_update(done):
            if not swapped and done == archive_writer.READ_CHUNK:
                self.swap_for_symlink("volumes/nodered/sub")
                swapped.append(True)
        data = self.write_tar(["volumes/"], Progress(on_update))
        self.assertTrue(swapped)
        members = self.members(data)
        self.assertTrue(members["volumes/nodered/sub"].issym())
        self.assertNotIn("volumes/nodered/sub/secret.txt", members)
        self.assertNotIn(SECRET, gzip.decompress(data))

    def test_a_race_helper_swapping_all_the_time_never_gets_root_files_in(self):
        # pi swaps volumes/nodered/sub for a symlink and back, as fast as it
        # can, while the folder is walked and read again and again: the
        # archive holds the folder or the symlink, never what it points to.
        os.unlink(self.path("volumes/nodered/aaa.bin"))
        for i in range(20):
            write(self.path("volumes/nodered/sub/f%02d" % i), b"x")
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        sub = self.path("volumes/nodered/sub")
        loop = ("import os\n"
                "while True:\n"
                "    os.rename(%r, %r)\n"
                "    os.symlink(%r, %r)\n"
                "    os.unlink(%r)\n"
                "    os.rename(%r, %r)\n" % (sub, sub + ".x", self.secret_dir, sub, sub,
                                             sub + ".x", sub))
        helper = subprocess.Popen([python_for_pi(), "-c", loop], preexec_fn=demote_to(self.pi),
                                  stderr=subprocess.DEVNULL)
        self.addCleanup(helper.wait)
        self.addCleanup(helper.kill)
        seen = set()
        deadline = time.monotonic() + 20
        rounds = 0
        while rounds < 400 and time.monotonic() < deadline:
            data = self.write_tar(["volumes/nodered/"], Progress(lambda done: None))
            members = self.members(data)
            self.assertNotIn(SECRET, gzip.decompress(data))
            self.assertFalse([m for m in members if m.endswith("secret.txt")])
            if "volumes/nodered/sub" in members:
                seen.add("symlink" if members["volumes/nodered/sub"].issym() else "folder")
            for warning in self.stats.warnings:
                if "is a symlink now" in warning:
                    seen.add("warned")
            rounds += 1
        self.assertIsNone(helper.poll(), "the race helper stopped")
        self.assertIn("folder", seen)
        self.assertIn("symlink", seen)

    def test_a_deferred_folder_swapped_before_its_part_is_read(self):
        # Two groups: influxdb's part is read after nodered's window; pi
        # swaps volumes/influxdb while nodered is stopped.
        def before():
            self.swap_for_symlink("volumes/influxdb")
        segments = [archive_writer.Segment(["volumes/nodered"], before),
                    archive_writer.Segment(["volumes/influxdb"])]
        data = self.write_tar(["volumes/"], archive_writer_progress(), segments)
        self.assert_not_followed(data, "volumes/influxdb", self.stats.warnings)
        self.assertIn("volumes/nodered/sub/own.txt", self.members(data))

    def test_a_folder_swapped_at_the_stop_is_not_followed_when_read_again(self):
        # write_archive, with the stat walk after the stop: the part changed
        # and is read again, as the symlink it now is.
        def before():
            self.swap_for_symlink("volumes/nodered")
        stats = archive_writer.ArchiveStats()
        archive = os.path.join(self.tmp, "a.tar.gz")
        args = type("Args", (), {"no_verify": False, "level": 6, "jobs": 2, "exclude": []})()
        archive_writer.write_archive(self.stack, ["volumes/"], args, None, archive,
                                     archive_writer_progress(), stats,
                                     [archive_writer.Segment(["volumes/nodered"], before)])
        with open(archive, "rb") as f:
            data = f.read()
        self.assert_not_followed(data, "volumes/nodered", stats.warnings)

    def test_a_file_swapped_after_its_listing_is_never_read_through(self):
        # Between the walk's lstat and the read, pi replaces a file by a
        # symlink to root's secret, another by a fifo: each is archived as
        # what it is now, and neither is read.
        write(self.path("volumes/nodered/zz-file"), b"plain\n")
        write(self.path("volumes/nodered/zz-pipe"), b"plain\n")
        real_iter = archive_writer.iter_entries

        def swapping(*args, **kwargs):
            for entry in real_iter(*args, **kwargs):
                if entry.rel == "volumes/nodered/zz-file":
                    os.unlink(self.path("volumes/nodered/zz-file"))
                    os.symlink(os.path.join(self.secret_dir, "secret.txt"),
                               self.path("volumes/nodered/zz-file"))
                if entry.rel == "volumes/nodered/zz-pipe":
                    os.unlink(self.path("volumes/nodered/zz-pipe"))
                    os.mkfifo(self.path("volumes/nodered/zz-pipe"))
                yield entry
        with mock.patch.object(archive_writer, "iter_entries", swapping):
            data = self.write_tar(["volumes/"], Progress(lambda done: None))
        members = self.members(data)
        self.assertTrue(members["volumes/nodered/zz-file"].issym())
        self.assertTrue(members["volumes/nodered/zz-pipe"].isfifo())
        self.assertNotIn(SECRET, gzip.decompress(data))
        for rel in ("volumes/nodered/zz-file", "volumes/nodered/zz-pipe"):
            self.assertIn("%s was replaced while the backup ran: saved as it is now, not read"
                          % rel, self.stats.notes)


def archive_writer_progress():
    return Progress(lambda done: None)


class EngineRaceTest(SwapCase):
    """On the real engine, `backup.py --stop each` as root: while the first
    group (a) is stopped, a process of pi's swaps the second group's folder
    (volumes/b) for a symlink to a root-only folder."""

    def setUp(self):
        super().setUp()
        real_stack.use_engine(self)
        # A project name of its own: the engine is shared, and remove()
        # removes every container of the project's name.
        self.new_stack("IOTstack-" + uuid.uuid4().hex[:10])
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        E.write_compose(self.stack, [{"name": "a", "volumes": ["./volumes/a:/data"]},
                                     {"name": "b", "volumes": ["./volumes/b:/data"]}])
        write(self.path("volumes/a/a.txt"), b"a\n")
        write(self.path("volumes/b/b.txt"), b"b\n")
        chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        self.project = E.ComposeProject(self.stack)
        self.addCleanup(self.project.remove)
        self.project.up()
        self.project.wait_for({"a": "running", "b": "running"})

    def swap_when_stopped(self, service, rel, done):
        marker = os.path.join(self.stack, docker_compose.STOPPED_MARKER)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with open(marker) as f:
                    if service in json.load(f)["services"]:
                        self.swap_for_symlink(rel)
                        done.append(True)
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)

    def test_a_group_folder_swapped_during_another_window(self):
        done = []
        helper = threading.Thread(target=self.swap_when_stopped, args=("a", "volumes/b", done))
        helper.start()
        env = dict(os.environ, PATH=os.environ.get("PATH", ""))
        result = subprocess.run([sys.executable, BACKUP_PY, "1", "--dir",
                                 self.stack, "--stop", "each", "pi"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        helper.join()
        self.assertEqual(done, [True], "the marker never named a")
        self.assertEqual(result.returncode, run.EXIT_WARNINGS, result.stdout + result.stderr)
        self.assertIn("volumes/b was a folder when the backup began and is a symlink now",
                      result.stdout)
        (archive,) = self.archives()
        with open(archive, "rb") as f:
            data = f.read()
        self.assert_not_followed(data, "volumes/b", [
            line.split("Warning: ", 1)[1] for line in result.stdout.splitlines()
            if "Warning: " in line])
        self.assertEqual(self.project.states(), {"a": "running", "b": "running"})


if __name__ == "__main__":
    unittest.main()
