"""End-to-end tests of restore.py: real trees, real archives, real containers.

Each test builds a small IOTstack tree (tests/restore_case.py), backs it up
with backup.py, changes the tree, runs restore.main() in-process and compares
snapshots.  The promise under test: a restore either puts the backup in
place exactly, or leaves the IOTstack directory exactly as it was.

Here: restore.py run as a script and killed: kill -9 (by strace's fault
injection) at every rename and at sampled unlinks, then --recover; and
SIGTERM, SIGINT and SIGHUP after the swap.
"""
import collections
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from iotstack_backup import backup, docker_compose, iotstack, journal, restore
from tests import real_stack
from tests.engine import EventWatcher
from tests.restore_case import RUNNING, SCALE, RestoreCase, change_tree, items, others, whole
from tests.stacktree import IS_ROOT, build_stack, diff_snapshots
from tests.support import RESTORE_PY, call

STRACE = shutil.which("strace")
# Left in .tmp/ by a run killed while writing the stopped-services marker:
# see KillTests.test_no_marker_litter_after_a_kill (a known backuplib bug).
MARKER_NEW = getattr(docker_compose, "STOPPED_MARKER", ".tmp/iotstack-stopped-services.json") + ".new"


# ---------------------------------------------------------------------------
# kill -9 at every rename and at sampled unlinks; SIGTERM

RENAMES = "rename,renameat,renameat2"
UNLINKS = "unlink,unlinkat"
MKDIRS = "mkdir,mkdirat"

# One changed tree, with its own compose project, and what it held before.
Run = collections.namedtuple("Run", "stack env project old kept services")


@unittest.skipUnless(STRACE, "strace is not installed")
@unittest.skipUnless(IS_ROOT, "strace's fault injection needs ptrace; run as root")
class KillTests(unittest.TestCase):
    """restore.py killed by strace at the Nth rename/unlink, then recovered.

    strace runs without -f: its injection counters are per process, and
    docker's own processes must not count.  Each attempt has a tree and a
    compose project of its own on the real engine, so attempts run side by
    side.
    """

    @classmethod
    def setUpClass(cls):
        holder = tempfile.TemporaryDirectory(prefix="restore-kill-")
        cls.addClassCleanup(holder.cleanup)
        cls.tmp = holder.name
        template = os.path.join(cls.tmp, "template")
        build_stack(template, scale=SCALE)
        # The services' compose file, as fresh_run's trees have it.
        real_stack.E.write_compose(template, real_stack.SERVICES)
        code, out, err = call(backup.main, ["1", "root", "--no-stop", "--dir", template])
        assert code == 0, out + err
        cls.archive = os.path.join(cls.tmp, "backup.tar.gz")
        shutil.copy(os.path.join(template, re.search(r"Backup complete: \./(\S+)", out)
                                 .group(1)), cls.archive)
        cls.new = items(template)
        cls.count = 0
        cls.traces = {}

    def setUp(self):
        real_stack.use_engine(self)
        # The tests that kill at every call of a kind run dozens of attempts:
        # their services have no containers (each costs seconds here), so
        # they check the journal and that nothing is started; the others,
        # and test_stack_control, check the services at the points that
        # matter (the marker, the stop, the swap, the start).
        self.services = True
        self.projects = []
        # Removed side by side, at the end: one at a time costs minutes.
        self.addCleanup(real_stack.remove_all, self.projects)

    def fresh_run(self):
        """A changed tree at a new path, its services RUNNING on the engine
        (influxdb and grafana, stopped, have no containers: they cost time)."""
        type(self).count += 1
        project = real_stack.iotstack_project(self, scale=SCALE, stopped_too=False,
                                              cleanup=False, up=self.services)
        self.projects.append(project)
        stack = project.stack_dir
        os.makedirs(os.path.join(stack, "backups/logs"))  # as a backup leaves it
        change_tree(stack)
        # No .pyc writes: their renames would shift the counts when another
        # Python version or an edit made them stale.
        return Run(stack, real_stack.script_env(), project, items(stack), others(stack),
                   self.services)

    def script(self, run, *argv, trace=None, inject=None):
        """restore.py on run's tree; under strace, which sends a signal at a
        syscall, when trace is given."""
        argv = [sys.executable, RESTORE_PY] + list(argv) + ["--dir", run.stack]
        if trace:
            argv = [STRACE, "-qq", "-o", "/dev/null", "-e", "trace=" + trace,
                    "-e", "inject=%s:%s" % (trace, inject)] + argv
        return subprocess.run(argv, cwd=run.stack, env=run.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)

    def trace_of(self, trace):
        """The calls of one undisturbed restore of a fresh tree, as (name,
        first path argument); the same for every fresh tree, so made once."""
        key = (trace, self.services)
        if key not in self.traces:
            run = self.fresh_run()
            log = os.path.join(self.tmp, "trace-%d.txt" % self.count)
            argv = [STRACE, "-qq", "-s", "4096", "-o", log, "-e", "trace=" + trace,
                    sys.executable, RESTORE_PY, self.archive, "noask", "--dir", run.stack]
            subprocess.run(argv, cwd=run.stack, env=run.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, check=True, timeout=120)
            with open(log) as f:
                self.traces[key] = [
                    re.match(r'(\w+)\((?:[^"]*)"([^"]*)"', line).groups()
                    for line in f if not line.startswith(("---", "+++"))]
        return self.traces[key]

    def killed(self, trace, ns, then):
        """For each n: a fresh run, restore.py killed at its nth call of
        trace, then restore.py with the arguments then (if it was killed).
        Yields (n, run, killed, then's result), attempts side by side."""
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            runs = list(pool.map(lambda _n: self.fresh_run(), ns))

        def attempt(run, n):
            result = self.script(run, self.archive, "noask", trace=trace,
                                 inject="signal=SIGKILL:when=%d" % n)
            after = self.script(run, *then) if result.returncode != 0 else None
            return result, after

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(attempt, runs, ns))
        for n, run, (result, after) in zip(ns, runs, results):
            yield n, run, result, after

    def assert_recovered(self, run, said):
        """Exactly the old or the new state, the one recovery said; nothing
        else touched, nothing left behind, the services running again."""
        now = items(run.stack)
        if "Completed an interrupted restore" in said:
            self.assertEqual(diff_snapshots(self.new, now), [])
            outcome = "new"
        elif "Rolled back an interrupted restore" in said:
            self.assertEqual(diff_snapshots(run.old, now), [])
            outcome = "old"
        else:
            # No journal: killed before it was written, or after the restore
            # was done and the journal gone.  Still exactly one of the two.
            outcome = "new" if not diff_snapshots(self.new, now) else "old"
            self.assertEqual(diff_snapshots(run.old if outcome == "old" else self.new, now),
                             [])
        left = others(run.stack)
        left.pop(MARKER_NEW, None)  # a known backuplib bug, tested on its own
        self.assertEqual(diff_snapshots(run.kept, left), [])
        self.assert_no_journal(run)
        return outcome

    def assert_no_journal(self, run):
        self.assertFalse(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME)))
        self.assertFalse(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME + ".new")))
        names = os.listdir(os.path.join(run.stack, ".tmp"))
        self.assertEqual([n for n in names if n.startswith("restore-")], [])
        running = {"nodered": "running", "mosquitto": "running"}
        self.assertEqual(run.project.states(), running if run.services else {})

    def assert_killed(self, result):
        self.assertIn(result.returncode, (-9, 137), result.stderr)

    def counts(self, trace):
        """How often an undisturbed run makes each call of trace.  strace
        counts when=N for each syscall of a set on its own."""
        return collections.Counter(name for name, _ in self.trace_of(trace))

    def test_kill_at_every_rename(self):
        self.services = False
        # N = 1, 2, 3... until a run is no longer killed: the undisturbed
        # run's count says where that is.
        counts = self.counts(RENAMES)
        self.assertEqual(len(counts), 1, counts)  # rename, or renameat on arm64
        total = sum(counts.values())
        units = restore.replaced_units({iotstack.item_of(rel) for rel in self.new}, [])
        self.assertGreaterEqual(total, 2 * len(units))  # each item renamed under the journal
        outcomes = []
        for n, run, result, after in self.killed(RENAMES, range(1, total + 2),
                                                 ["--recover"]):
            with self.subTest(rename=n, total=total):
                outcomes.append(self.judge_attempt(n, total, run, result, after))
        self.assertIn("old", outcomes)

    def test_kill_at_sampled_unlinks(self):
        self.services = False
        # unlinkat: shutil.rmtree of the staging and aside folders (after the
        # commit); unlink: the journal and the stopped-services marker.
        counts = self.counts(UNLINKS)
        self.assertGreater(sum(counts.values()), 5)
        outcomes = []
        for syscall, total in sorted(counts.items()):
            ns = sorted({n for n in (1, 2, 5, 20, 100, total - 1, total) if n >= 1}
                        | {total + 1})
            for n, run, result, after in self.killed(syscall, ns, ["--recover"]):
                with self.subTest(syscall=syscall, n=n, total=total):
                    outcomes.append(self.judge_attempt(n, total, run, result, after))
        self.assertIn("new", outcomes)

    def judge_attempt(self, n, total, run, result, after):
        """One attempt killed at the nth call: past the last call it simply
        completes; otherwise --recover must give exactly the old or the new
        tree.  Returns "old", "new", or None for a completed run."""
        if n > total:
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(diff_snapshots(self.new, items(run.stack)), [])
            return None
        self.assert_killed(result)
        self.assertEqual((after.returncode, after.stderr), (0, ""), after.stdout)
        return self.assert_recovered(run, after.stdout)

    def test_recover_in_process(self):
        # restore.main(["--recover"]) in this process, after a kill mid-swap.
        renames = self.trace_of(RENAMES)
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGKILL:when=%d" % (len(renames) // 2))
        self.assert_killed(result)
        self.assertTrue(os.path.lexists(os.path.join(run.stack, iotstack.JOURNAL_NAME)))
        with mock.patch.dict(os.environ, {"PATH": run.env["PATH"]}):
            code, out, err = call(restore.main, ["--recover", "--dir", run.stack])
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("Rolled back an interrupted restore", out)
        self.assertEqual(self.assert_recovered(run, out), "old")
        texts = []
        for path in glob.glob(os.path.join(run.stack, "backups/logs/restore_*.log")):
            with open(path) as f:
                texts.append(f.read())  # the killed run's log, and this one's
        self.assertIn("Rolled back an interrupted restore", "\n".join(texts))

    def test_next_normal_run_recovers_first_then_restores(self):
        total = sum(self.counts(RENAMES).values())
        for n, run, result, after in self.killed(RENAMES, (2, total // 2, total - 1),
                                                 [self.archive, "noask"]):
            with self.subTest(rename=n, total=total):
                self.assert_killed(result)
                self.assertEqual((after.returncode, after.stderr), (0, ""), after.stdout)
                # Said first: a swap rolled back or completed, or (killed
                # before the journal existed) the services it had stopped.
                said = re.search("(Rolled back|Completed) an interrupted restore|"
                                 "an interrupted run had stopped them", after.stdout)
                self.assertTrue(said, after.stdout)
                self.assertLess(said.start(), after.stdout.index("Restored "))
                self.assertEqual(diff_snapshots(self.new, items(run.stack)), [])
                self.assert_no_journal(run)

    def test_kill_during_an_only_restore_of_a_missing_subtree(self):
        self.services = False
        # change_tree() removed volumes/grafana: the swap makes it, and a roll
        # back must take it away again.
        inside = lambda snap: {k: v for k, v in snap.items()
                               if k.startswith("volumes/grafana/data")}
        outer = lambda snap: {k: v for k, v in snap.items()
                              if not k.startswith("volumes/grafana")}
        for n in range(1, 50):
            run = self.fresh_run()
            self.assertNotIn("volumes/grafana", run.old)
            result = self.script(run, self.archive, "noask", "--only", "volumes/grafana/data",
                                 trace=RENAMES, inject="signal=SIGKILL:when=%d" % n)
            said = ""
            if result.returncode != 0:
                self.assert_killed(result)
                recovered = self.script(run, "--recover")
                self.assertEqual((recovered.returncode, recovered.stderr), (0, ""))
                said = recovered.stdout
            now = items(run.stack)
            with self.subTest(rename=n):
                self.assertEqual(diff_snapshots(outer(run.old), outer(now)), [])
                if result.returncode == 0 or "Completed an interrupted" in said:
                    self.assertEqual(diff_snapshots(inside(self.new), inside(now)), [])
                else:
                    self.assertNotIn("volumes/grafana", now)
                self.assert_no_journal(run)
            if result.returncode == 0:
                break
        else:
            self.fail("restore.py was still being killed after 50 renames")
        self.assertGreater(n, 2)

    def test_sigterm_during_the_swap_rolls_back(self):
        renames = self.trace_of(RENAMES)
        # The first rename of an item, after the journal was written.
        journal = [i for i, (_, src) in enumerate(renames)
                   if src.endswith(iotstack.JOURNAL_NAME + ".new")][0]
        n = journal + 2
        self.assertLess(n, len(renames))  # not the journal's commit
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGTERM:when=%d" % n)
        self.assertEqual(result.returncode, 143, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("interrupted by SIGTERM", result.stderr)
        self.assertEqual(diff_snapshots(run.old, items(run.stack)), [])
        self.assertEqual(diff_snapshots(run.kept, others(run.stack)), [])
        self.assert_no_journal(run)  # and the services run again

    def test_sigterm_while_unpacking_changes_nothing(self):
        self.assertEqual(len(self.counts(MKDIRS)), 1)  # mkdir, or mkdirat on arm64
        mkdirs = self.trace_of(MKDIRS)
        # The first folder made inside the staging folder.
        n = 2 + [i for i, (_, path) in enumerate(mkdirs)
                 if os.path.basename(path).startswith(journal.STAGING_PREFIX)][0]
        self.assertLessEqual(n, len(mkdirs))
        run = self.fresh_run()
        before = whole(run.stack)
        with EventWatcher(run.project) as events:
            result = self.script(run, self.archive, "noask", trace=MKDIRS,
                                 inject="signal=SIGTERM:when=%d" % n)
        self.assertEqual(result.returncode, 143, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("interrupted by SIGTERM", result.stderr)
        self.assertEqual(diff_snapshots(before, whole(run.stack)), [])
        self.assertEqual(events.stop(), [])  # the services were never touched

    def test_no_marker_litter_after_a_kill(self):
        # Bug in backuplib (not restore.py): write_json_atomically leaves
        # STOPPED_MARKER + ".new" behind when killed before its rename, and
        # nothing (restart_left_stopped, recovery) ever removes it.
        marker = [i for i, (_, src) in enumerate(self.trace_of(RENAMES))
                  if src.endswith(MARKER_NEW)]
        if not marker:
            self.skipTest("docker_compose no longer writes %s" % MARKER_NEW)
        n = 1 + marker[0]
        run = self.fresh_run()
        result = self.script(run, self.archive, "noask", trace=RENAMES,
                             inject="signal=SIGKILL:when=%d" % n)
        self.assert_killed(result)
        recovered = self.script(run, "--recover")
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertEqual(diff_snapshots(run.kept, others(run.stack)), [])


def script_env():
    """The environment of restore.py run as a script: the test engine's
    DOCKER_HOST (already in os.environ), and no .pyc writes."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("SUDO_USER", None)
    return env


class SignalTests(RestoreCase):
    """Signals at a point reached without strace: from post_restore.sh."""

    engine = True

    def run_script(self, *argv):
        return subprocess.run([sys.executable, RESTORE_PY] + list(argv), cwd=self.stack,
                              env=script_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)

    def test_sigterm_and_ctrl_c_after_the_swap(self):
        for sig, code in (("TERM", 143), ("INT", 130), ("HUP", 129)):
            with self.subTest(signal=sig):
                hook = os.path.join(self.stack, "post_restore.sh")
                with open(hook, "w") as f:
                    f.write("kill -%s $PPID\necho after the signal\n" % sig)
                archive = self.make_backup()
                expected = items(self.stack)
                change_tree(self.stack)
                result = self.run_script(archive, "noask")
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
                self.assertIn(b"interrupted", result.stderr)
                # The swap was complete: the files stay restored; the
                # replaced items wait in the trash for the next run.
                self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
                self.assertTrue(glob.glob(os.path.join(self.stack, ".tmp",
                                                       journal.TRASH_RECORD + "*.json")))
                self.assertEqual(self.run_script("--list").returncode, 0)
                self.assert_no_leftovers()
                self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
                self.assertEqual(self.running_now(), set(RUNNING))
                # The last line and the log say the restore was complete (issue 21).
                self.assertIn(b"had been restored completely", result.stderr)
                self.assertIn("Interrupted (%s): " % ("Ctrl-C" if sig == "INT" else "SIG" + sig),
                              self.restore_log())
                os.unlink(hook)
                shutil.rmtree(os.path.join(self.stack, "backups/logs"))


if __name__ == "__main__":
    unittest.main()
