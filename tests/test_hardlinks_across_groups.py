"""Issue 20, Must 6: a hard link across two stop groups.

An inode with a name in group a's folder and one in group b's is read in
a's window first.  b may write it after that window (through its own
name): the archive holds the inode as read in b's window, under b's name,
and a's name again after it, as a hard link to that member (tar, GNU tar
and restore.py alike take the last member of a name).  A restore gives both
names that content, still one inode.  Tested with segments (the writer's
callbacks) and with real engine groups, where b writes the shared file as
it stops.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
from unittest import mock

from iotstack_backup import archive_writer, progress, restore, run
from tests import engine as E
from tests import real_stack
from tests.support import BACKUP_PY, IsolatedCase, call, read_bytes, write


def last_members(archive):
    """{name: the last member of that name} and the names in order."""
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        last = {m.name: m for m in members}
        data = {m.name: tf.extractfile(m).read() for m in last.values() if m.isreg()}
    return last, data, [m.name for m in members]


class RestoreCheck:
    def assert_restores_linked(self, archive, names, content):
        """GNU tar and restore.py each give every name the content, one inode."""
        if shutil.which("tar"):
            target = self.make_tmp("hl-tar-")
            subprocess.run(["tar", "-xzf", archive, "-C", target], check=True)
            self.assert_linked(target, names, content)
        fresh = self.make_tmp("hl-restore-")
        write(os.path.join(fresh, "docker-compose.yml"), b"services: {}\n")
        real_stack.without_docker(self)
        code, out, err = call(restore.main, [archive, "noask", "--dir", fresh])
        self.assertEqual(code, run.EXIT_OK, out + err)
        self.assert_linked(fresh, names, content)

    def assert_linked(self, root, names, content):
        for name in names:
            self.assertEqual(read_bytes(os.path.join(root, name)), content, name)
        inodes = {os.stat(os.path.join(root, name)).st_ino for name in names}
        self.assertEqual(len(inodes), 1, "the names are no longer one inode")


class SegmentsTest(IsolatedCase, RestoreCheck):
    def setUp(self):
        super().setUp()
        self.stack = self.make_tmp("hl-stack-")
        write(os.path.join(self.stack, "volumes/a/shared.db"), b"as read in a's window\n")
        write(os.path.join(self.stack, "volumes/b/own"), b"b\n")
        os.link(os.path.join(self.stack, "volumes/a/shared.db"),
                os.path.join(self.stack, "volumes/b/shared.db"))
        write(os.path.join(self.stack, "docker-compose.yml"), b"services: {}\n")
        self.archive = os.path.join(self.make_tmp("hl-out-"), "a.tar.gz")

    def write_archive(self, segments, trust_recent=True):
        stats = archive_writer.ArchiveStats()
        args = argparse.Namespace(no_verify=False, level=6, jobs=2, exclude=[])
        with mock.patch.object(archive_writer, "RACY_NS",
                               0 if trust_recent else archive_writer.RACY_NS):
            archive_writer.write_archive(self.stack, ["volumes/", "docker-compose.yml"], args,
                                         None, self.archive, progress.NoProgress(), stats,
                                         segments)
        return stats

    def b_writes_at_its_stop(self):
        with open(os.path.join(self.stack, "volumes/b/shared.db"), "ab") as f:
            f.write(b"written by b as it stopped\n")

    def test_a_later_group_writes_the_inode_at_its_stop(self):
        stats = self.write_archive([archive_writer.Segment(["volumes/a"]),
                                    archive_writer.Segment(["volumes/b"],
                                                           self.b_writes_at_its_stop)])
        last, data, order = last_members(self.archive)
        content = b"as read in a's window\nwritten by b as it stopped\n"
        self.assertEqual(data["volumes/b/shared.db"], content)
        self.assertTrue(last["volumes/a/shared.db"].islnk())
        self.assertEqual(last["volumes/a/shared.db"].linkname, "volumes/b/shared.db")
        # a's name: first its content as read in a's window, then the link.
        self.assertEqual(order.count("volumes/a/shared.db"), 2)
        self.assertGreater(order.index("volumes/b/shared.db"),
                           order.index("volumes/a/shared.db"))
        self.assertIn("volumes/b/shared.db: read again in a later stop window than its other "
                      "names (volumes/a/shared.db), which are archived again as links to it",
                      stats.notes)
        self.assert_restores_linked(self.archive, ["volumes/a/shared.db", "volumes/b/shared.db"],
                                    content)

    def test_restore_only_of_the_earlier_name_says_to_add_the_later(self):
        self.write_archive([archive_writer.Segment(["volumes/a"]),
                            archive_writer.Segment(["volumes/b"], self.b_writes_at_its_stop)])
        fresh = self.make_tmp("hl-only-")
        write(os.path.join(fresh, "docker-compose.yml"), b"services: {}\n")
        real_stack.without_docker(self)
        code, out, err = call(restore.main, [self.archive, "noask", "--dir", fresh,
                                             "--only", "volumes/a"])
        self.assertEqual(code, run.EXIT_FAILED, out + err)
        self.assertIn("volumes/a/shared.db is a hard link to volumes/b/shared.db, which --only "
                      "leaves out: restore both (add --only volumes/b)", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(os.path.exists(os.path.join(fresh, "volumes")))
        code, out, err = call(restore.main, [self.archive, "noask", "--dir", fresh,
                                             "--only", "volumes/a", "--only", "volumes/b"])
        self.assertEqual(code, run.EXIT_OK, out + err)
        self.assert_linked(fresh, ["volumes/a/shared.db", "volumes/b/shared.db"],
                           b"as read in a's window\nwritten by b as it stopped\n")

    def test_links_in_one_group_stay_single_members(self):
        os.link(os.path.join(self.stack, "volumes/b/shared.db"),
                os.path.join(self.stack, "volumes/b/shared2.db"))
        self.write_archive([archive_writer.Segment(["volumes/a", "volumes/b"])])
        last, data, order = last_members(self.archive)
        self.assertEqual(len(order), len(set(order)), order)
        self.assertTrue(last["volumes/b/shared.db"].islnk())
        self.assertTrue(last["volumes/b/shared2.db"].islnk())
        self.assertEqual(data["volumes/a/shared.db"], b"as read in a's window\n")

    def test_read_again_after_a_change_relinks_once(self):
        # b's part changes at its stop and is read again: the rewind takes
        # back the first read's link records, and the archive still has
        # a's name once as a file and once as a link.
        self.write_archive([archive_writer.Segment(["volumes/a"]),
                            archive_writer.Segment(["volumes/b"], self.b_writes_at_its_stop)],
                           trust_recent=False)
        last, data, order = last_members(self.archive)
        self.assertEqual(order.count("volumes/a/shared.db"), 2)
        self.assertEqual(order.count("volumes/b/shared.db"), 1)
        self.assertTrue(last["volumes/a/shared.db"].islnk())


class EngineGroupsTest(IsolatedCase, RestoreCheck):
    """backup.py --stop each on the real engine: a and b are two groups
    (their folders share nothing but the inode); b appends to the shared
    file when it gets SIGTERM, so only a read in b's window holds that."""

    def setUp(self):
        super().setUp()
        real_stack.use_engine(self)
        self.stack = self.make_tmp("hl-engine-")  # a unique project name
        on_stop = ("trap 'echo written by b as it stopped >> /data/shared.db; exit 0' TERM\n"
                   "while :; do sleep 1 & wait $!; done")
        E.write_compose(self.stack, [{"name": "a", "volumes": ["./volumes/a:/data"]},
                                     {"name": "b", "volumes": ["./volumes/b:/data"],
                                      "command": on_stop}])
        write(os.path.join(self.stack, "volumes/a/shared.db"), b"as read in a's window\n")
        os.link(os.path.join(self.stack, "volumes/a/shared.db"),
                os.path.join(self.stack, "volumes/b/shared.db"))
        os.makedirs(os.path.join(self.stack, "volumes/b"), exist_ok=True)
        self.project = E.ComposeProject(self.stack)
        self.addCleanup(self.project.remove)
        self.project.up()
        self.project.wait_for({"a": "running", "b": "running"})

    def test_the_later_group_stop_is_what_both_names_get(self):
        result = subprocess.run([sys.executable, BACKUP_PY, "1", "--dir",
                                 self.stack, "--stop", "each"]
                                + (["root"] if os.geteuid() == 0 else []),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        self.assertEqual(result.returncode, run.EXIT_OK, result.stdout + result.stderr)
        folder = os.path.join(self.stack, "backups/backup")
        (name,) = os.listdir(folder)
        archive = os.path.join(folder, name)
        log = read_bytes(os.path.join(self.stack, "backups/logs", name[:-len(".tar.gz")]
                                      + ".log")).decode()
        self.assertIn("Stop window: a (volumes/a)", log)
        self.assertIn("Stop window: b (volumes/b)", log)
        content = b"as read in a's window\nwritten by b as it stopped\n"
        self.assertEqual(read_bytes(os.path.join(self.stack, "volumes/b/shared.db")), content)
        last, data, _order = last_members(archive)
        self.assertEqual(data["volumes/b/shared.db"], content)
        self.assertEqual(last["volumes/a/shared.db"].linkname, "volumes/b/shared.db")
        self.assert_restores_linked(archive, ["volumes/a/shared.db", "volumes/b/shared.db"],
                                    content)
        self.assertEqual(self.project.states(), {"a": "running", "b": "running"})


if __name__ == "__main__":
    unittest.main()
