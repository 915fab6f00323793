"""Power cuts during `backup.py --install-cron` (issue 22).

The crontab is cron's file, /var/spool/cron/crontabs/root, written by
Debian's `crontab -` (a temporary file in that folder, fsynced, renamed
over the old one).  To put it on the power-cut fs without touching the
machine's crontab, every run here is made in a private mount namespace
(`unshare -m`, root only) where the power-cut fs (or, for the next run,
the plain folder a cut state was built in) is bind-mounted over
/var/spool/cron/crontabs; the run starts only once a marker file that only
that folder holds is seen there.  The machine's own spool is never written.

--install-cron is recorded once (root's crontab, holding lines of its own,
gets our line), and --uninstall-cron (which takes it out again); at every
cut point each state a disk may show is built, and then:

- root's crontab is the old one or the new one, whole (bytes, with the
  header crontab writes, mode and owner);
- the same option runs again there and succeeds, and root's crontab then
  holds the other lines and our line once (none after --uninstall-cron);
- a cut after the last call (the run said it succeeded) keeps the new one:
  it did not before make_durable (crontab does not fsync its folder).

Besides, only crontab's own temporary file (`tmp.XXXXXX`, which names no
user, so cron runs nothing from it) may be left in the folder; the count
of such states is printed with the cuts.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import unittest

from iotstack_backup import schedule
from tests.powercut import harness, model
from tests.powercut.stack import MISSING, SMALL_SAMPLE
from tests.support import IsolatedCase, write

REPO = harness.REPO
MARKER = ".powercut-spool-marker"
OLD = b"# root's own\nMAILTO=\"\"\n0 4 * * 0 /usr/sbin/logrotate-ish\n"
# Run in the namespace: backup.main with the sync hook on the power-cut fs.
RUNNER = """
import contextlib, sys
from iotstack_backup import backup, disk_sync
from tests.powercut import harness
mount, argv = sys.argv[1], sys.argv[2:]
with harness.sync_hook(mount) if mount else contextlib.nullcontext():
    code = backup.main(argv)
sys.exit(code)
"""


def why_not() -> str:
    if MISSING:
        return MISSING
    for tool in ("crontab", "unshare", "mount"):
        if shutil.which(tool) is None:
            return "the --install-cron power-cut test needs %s (the cron package, util-linux)" % tool
    if not os.path.isdir(schedule.SPOOL_DIR):
        return "the --install-cron power-cut test needs cron's folder %s" % schedule.SPOOL_DIR
    return ""


def in_spool(folder: str, argv: list, data: bytes | None = None) -> subprocess.CompletedProcess:
    """argv run with `folder` bind-mounted over cron's spool folder in a
    private mount namespace, data on its stdin; never run unless the
    marker is seen there."""
    script = ('mount --bind "$1" "$2" && test -e "$2/%s" && shift 2 && exec "$@"' % MARKER)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                           "sh", folder, schedule.SPOOL_DIR] + argv, cwd=REPO, input=data,
                          stdin=subprocess.DEVNULL if data is None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def crontab_file(folder: str) -> tuple | None:
    """(bytes, mode, uid, gid) of root's crontab in folder, or None."""
    path = os.path.join(folder, "root")
    try:
        st = os.lstat(path)
        with open(path, "rb") as f:
            return f.read(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        return None


@unittest.skipIf(why_not(), why_not())
class InstallCronPowerCutTest(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.tmp = harness.fast_tmp("powercut-cron-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.backing = os.path.join(self.tmp, "backing")
        self.mount = os.path.join(self.tmp, "mnt")
        self.stack = os.path.join(self.tmp, "IOTstack")
        write(os.path.join(self.stack, "docker-compose.yml"), "services: {}\n")
        write(os.path.join(self.stack, "volumes/nodered/flows.json"), "[]\n")
        # cron's folder as Debian makes it, holding root's crontab (written
        # by crontab itself, header included).
        os.mkdir(self.backing)
        write(os.path.join(self.backing, MARKER), "")
        st = os.stat(schedule.SPOOL_DIR)
        os.chown(self.backing, st.st_uid, st.st_gid)
        os.chmod(self.backing, stat.S_IMODE(st.st_mode))
        made = in_spool(self.backing, ["crontab", "-"], OLD)
        self.assertEqual(made.returncode, 0, made.stderr)
        self.old = crontab_file(self.backing)

    def run_tool(self, folder: str, option: str, mount: str = ""):
        return in_spool(folder, [sys.executable, "-c", RUNNER, mount, option,
                                 "--dir", self.stack])

    def recorded(self, option: str):
        """(the tool's result, the record) of one run on the power-cut fs;
        the machine's own spool folder is checked untouched."""
        before = set(os.listdir(schedule.SPOOL_DIR))
        with harness.Mount(self.backing, self.mount, allow_other=True) as fs:
            try:
                result = self.run_tool(self.mount, option, self.mount)
            finally:
                record = fs.stop()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(set(os.listdir(schedule.SPOOL_DIR)), before, "the machine's spool")
        return result, record

    def sweep(self, option: str, record: dict) -> None:
        """Every cut of the recorded run: the crontab old or new, whole;
        the same option run again succeeds and leaves the new body."""
        new = crontab_file(self.backing)
        self.assertNotEqual(new, self.old)
        # The cut that found make_durable: the tool said it was done.
        harness.build_strict(record, len(record["ops"]) - 1, self.mount)
        self.assertEqual(crontab_file(self.mount), new, "a finished %s is durable" % option)
        body = schedule.spool_body(new[0])
        temporary = set()

        def next_run(cut, kind):
            problems = []
            now = crontab_file(self.mount)
            if now not in (self.old, new):
                problems.append("root's crontab is neither the old nor the new one: %r"
                                % (now,))
            left = [n for n in os.listdir(self.mount) if n not in (MARKER, "root")]
            temporary.update((cut, kind) for n in left if n.startswith("tmp."))
            problems += ["left in cron's folder: %s" % n for n in left if not n.startswith("tmp.")]
            again = self.run_tool(self.mount, option)
            if again.returncode != 0:
                problems.append("the next %s failed (%d): %s" % (
                    option, again.returncode, again.stderr.decode(errors="replace")))
            now = crontab_file(self.mount)
            if now is None or schedule.spool_body(now[0]) != body or now[1:] != new[1:]:
                problems.append("after the next %s root's crontab is %r" % (option, now))
            return problems

        ops = record["ops"]
        sample = None if harness.heavy() else SMALL_SAMPLE
        sweep = harness.Sweep(record, self.mount, seed=22)
        sweep.run(model.cut_points(ops, minimum=100, seed=22, sample=sample), next_run)
        print("\n" + sweep.summary("backup.py " + option) + " of %d calls; %d with crontab's "
              "temporary file left" % (len(ops), len(temporary)), file=sys.stderr)
        self.assertEqual(sweep.problems[:5], [])

    def test_install_cron(self):
        result, record = self.recorded("--install-cron")
        self.assertIn(b"Added the backup line in root's crontab", result.stdout)
        body = schedule.spool_body(crontab_file(self.backing)[0])
        self.assertTrue(body.startswith(OLD) and body.count(b"# iotstack-backup") == 1, body)
        self.sweep("--install-cron", record)

    def test_uninstall_cron(self):
        installed = self.run_tool(self.backing, "--install-cron")
        self.assertEqual(installed.returncode, 0, installed.stderr)
        self.old = crontab_file(self.backing)
        result, record = self.recorded("--uninstall-cron")
        self.assertIn(b"Removed the backup line from root's crontab", result.stdout)
        self.assertEqual(schedule.spool_body(crontab_file(self.backing)[0]), OLD)
        self.sweep("--uninstall-cron", record)


if __name__ == "__main__":
    unittest.main()
