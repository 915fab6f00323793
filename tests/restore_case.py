"""The base of restore's end-to-end tests, and what they share.

RestoreCase builds a small IOTstack tree (tests/stacktree.py) in a temporary
directory, backs it up with backup.py and restores with restore.main()
in-process.  With engine = True the tree's services run as a real compose
project (RUNNING up, watched from the start); otherwise it runs as on a
machine without Docker.  The helpers snapshot what a restore may replace
(items), what it must never touch (others), and build archives member by
member (member, tar_gz).
"""
import glob
import gzip
import os
import re
import shutil

from iotstack_backup import backup, iotstack, journal, restore, tarformat
from tests import real_stack
from tests.engine import EventWatcher
from tests.stacktree import IS_ROOT, P, build_stack, snapshot
from tests.support import IsolatedCase, call

SCALE = 0.1
RUNNING = ("mosquitto", "nodered")  # influxdb and grafana are stopped on purpose
TMP_OWN = {"cache", "databases_backup", "iotstack-backup.lock"}  # .tmp of a fresh tree
MTIME = 1_700_000_000


# ---------------------------------------------------------------------------
# Helpers

def items(stack):
    """The backup items only: what a restore may replace."""
    return {rel: e for rel, e in snapshot(stack).items() if iotstack.item_of(rel)}


def whole(stack):
    """Everything but the restore's own log and the lock file.  .tmp's own
    mtime is left out: the staging folder is made and removed inside it."""
    snap = snapshot(stack, skip=("backups/logs", iotstack.LOCK_NAME))
    if ".tmp" in snap:
        snap[".tmp"] = snap[".tmp"]._replace(mtime=None)
    return snap


def others(stack):
    """What a restore must never touch: all of whole() but the backup items."""
    return {rel: e for rel, e in whole(stack).items() if not iotstack.item_of(rel)}


def member(name, typeflag=tarformat.TYPE_FILE, data=b"", linkname=b"", mode=0o644, dev=(0, 0)):
    header = tarformat.tar_header(name, typeflag, mode, 0, 0, len(data), MTIME, linkname, *dev)
    return header + data + bytes(-len(data) % tarformat.BLOCK)


def tar_gz(*members):
    return gzip.compress(b"".join(members) + bytes(2 * tarformat.BLOCK))


def change_tree(stack):
    """What a user does between backup and restore."""
    shutil.rmtree(os.path.join(stack, "volumes/grafana"))
    with open(os.path.join(stack, "docker-compose.yml"), "a") as f:
        f.write("  portainer-ce:\n    image: portainer/portainer-ce\n")
    with open(os.path.join(stack, "volumes/nodered/data/flows.json"), "w") as f:
        f.write("[]\n")
    os.chmod(os.path.join(stack, P["pwfile"]), 0o644)
    os.makedirs(os.path.join(stack, "volumes/stray/deeper"))
    with open(os.path.join(stack, "volumes/stray/deeper/junk"), "w") as f:
        f.write("not in the backup\n")
    os.unlink(os.path.join(stack, ".env"))  # an item the backup holds and the tree lacks
    with open(os.path.join(stack, P["db_dump"]), "wb") as f:
        f.write(b"newer dump")
    if IS_ROOT:
        os.lchown(os.path.join(stack, P["orphan_owner"]), 0, 0)
    # Things a restore must leave alone.
    with open(os.path.join(stack, "menu.sh"), "a") as f:
        f.write("# local change\n")
    with open(os.path.join(stack, ".tmp/cache/x"), "w") as f:
        f.write("newer cache\n")


class RestoreCase(IsolatedCase):
    """A fresh tree in a temporary directory; with engine = True its services
    run on the real engine, RUNNING up, watched from the start."""

    engine = False

    def setUp(self):
        super().setUp()
        if self.engine:
            self.project = real_stack.iotstack_project(self, scale=SCALE)
            self.stack = self.project.stack_dir
            self.tmp = os.path.dirname(self.stack)
            self.events = EventWatcher(self.project).start()
            self.addCleanup(self.events.stop)
            return
        real_stack.without_docker(self)
        self.tmp = self.make_tmp("restore-test-")
        self.stack = os.path.join(self.tmp, "IOTstack")
        build_stack(self.stack, scale=SCALE)

    def make_backup(self, kind="3"):
        argv = [kind, "root"] if IS_ROOT else [kind]
        # --no-stop: the backup is not under test, and each docker call costs time.
        code, out, err = call(backup.main, argv + ["--no-stop", "--dir", self.stack])
        self.assertEqual(code, 0, out + err)
        return os.path.join(self.stack, re.search(r"Backup complete: \./(\S+)", out).group(1))

    def restore(self, *argv):
        return call(restore.main, list(argv) + ["--dir", self.stack])

    def running_now(self):
        return {name for name, state in self.project.states().items() if state == "running"}

    def assert_services_untouched(self):
        """Nothing was stopped or started: on the engine, no such event and
        RUNNING still up; without Docker, no run got as far as the services."""
        if self.engine:
            self.assertEqual([e for e in self.events.events()
                              if e.action in ("kill", "die", "stop", "start")], [])
            self.assertEqual(self.running_now(), set(RUNNING))
            return
        logs = glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log"))
        for path in logs:
            with open(path, encoding="utf-8") as f:
                self.assertNotRegex(f.read(), "Docker is not installed|Services running")

    def assert_stopped_and_started(self):
        """RUNNING were stopped and started once each; nothing created or removed."""
        for name in RUNNING:
            self.assertEqual(self.events.actions(name, only=("die", "start", "create",
                                                             "destroy")), ["die", "start"])
        self.assertEqual(self.events.events("influxdb") + self.events.events("grafana"), [])
        self.assertEqual(self.running_now(), set(RUNNING))

    def restore_log(self):
        """The text of the restore logs, oldest name first."""
        paths = sorted(glob.glob(os.path.join(self.stack, "backups/logs/restore_*.log")))
        self.assertTrue(paths, "no restore log")
        texts = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        return "\n".join(texts)

    def assert_no_leftovers(self, stack=None):
        names = os.listdir(os.path.join(stack or self.stack, ".tmp"))
        left = [n for n in names if n.startswith(("restore-", journal.STAGING_PREFIX,
                                                   journal.ASIDE_PREFIX))]
        self.assertEqual(left, [], "left in .tmp/")
