"""End-to-end tests of restore.py: real trees, real archives, real containers.

Each test builds a small IOTstack tree (tests/restore_case.py), backs it up
with backup.py, changes the tree, runs restore.main() in-process and compares
snapshots.  The promise under test: a restore either puts the backup in
place exactly, or leaves the IOTstack directory exactly as it was.

Here: the stack side: which services a restore stops and starts on the real
engine, its hooks, and a restore on a machine without Docker.
"""
import contextlib
import os
import re
import unittest
import warnings
from unittest import mock

from iotstack_backup import iotstack, journal, restore
from tests.restore_case import RUNNING, RestoreCase, change_tree, items, others, whole
from tests.stacktree import diff_snapshots
from tests.support import call


@contextlib.contextmanager
def hook_pipe_warnings_ignored():
    """iotstack.run_hook leaves the hook's pipe to the garbage collector; see
    test_restore.OptionTests.test_hook_pipe_is_closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield


# ---------------------------------------------------------------------------
# The stack

class StackTests(RestoreCase):
    engine = True

    def test_stops_and_starts_exactly_the_running_services(self):
        archive = self.make_backup()
        change_tree(self.stack)
        during = []
        real_swap = journal.swap_in

        def spy(stack, journal, on_entry=None):
            during.append(self.running_now())
            return real_swap(stack, journal, on_entry)

        with mock.patch.object(restore, "swap_in", spy):
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(during, [set()])  # nothing ran during the swap
        self.assert_stopped_and_started()  # stop/start, never down/up
        self.assertEqual(self.project.states(), {"nodered": "running", "mosquitto": "running",
                                                 "influxdb": "exited", "grafana": "exited"})
        self.assertIn("Services stopped and started again: %s" % ", ".join(RUNNING), out)
        self.assertIn("Services left alone: grafana (exited), influxdb (exited)", out)

    def test_no_stop_names_the_containers_that_hold_the_old_files(self):
        archive = self.make_backup()
        code, out, err = self.restore(archive, "noask", "--no-stop")
        self.assertEqual((code, err), (3, ""), out)
        self.assert_services_untouched()
        names = [self.project.container_name(name) for name in RUNNING]
        self.assertIn("these containers still hold the old files: %s" % ", ".join(names), out)
        self.assertIn("cd %s && docker compose restart %s" % (self.stack, " ".join(RUNNING)),
                      out)
        self.assertIn("restart %s" % " ".join(RUNNING), self.restore_log())

    def test_without_daemon_nothing_is_changed(self):
        archive = self.make_backup()
        change_tree(self.stack)
        before = whole(self.stack)
        with mock.patch.dict(os.environ, {"DOCKER_HOST": "unix://%s/nothing.sock" % self.tmp}):
            code, out, err = self.restore(archive, "noask")
            self.assertEqual(code, 1, out + err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertRegex(err, "Cannot connect to the Docker daemon.*nothing was changed.*"
                                  "--no-stop")
            self.assertEqual(diff_snapshots(before, whole(self.stack)), [])
            self.assert_no_leftovers()
            code, out, err = self.restore(archive, "noask", "--no-stop")
        self.assertEqual((code, err), (3, ""), out)
        self.assertRegex(out, "could not check which containers still use the old files "
                              "\\(Cannot connect to the Docker daemon.*\\); restart the running "
                              "ones: cd %s && docker compose restart" % re.escape(self.stack))
        self.assert_services_untouched()

    def test_says_when_the_compose_file_changed(self):
        archive = self.make_backup()
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("docker compose up -d", out)
        with open(os.path.join(self.stack, "docker-compose.yml"), "a") as f:
            f.write("# changed\n")
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("docker compose up -d", out)
        self.assertIn("docker compose up -d", self.restore_log())

    def test_a_failing_swap_is_rolled_back(self):
        archive = self.make_backup()
        change_tree(self.stack)
        old, kept = items(self.stack), others(self.stack)
        real_rename = os.rename
        renames = []

        def failing_rename(src, dst, *args, **kwargs):
            renames.append(src)
            if os.path.basename(os.fspath(src)) == "services" and journal.STAGING_PREFIX \
                    not in os.fspath(src):
                raise OSError(5, "Input/output error (injected)")
            return real_rename(src, dst, *args, **kwargs)

        with mock.patch.object(os, "rename", failing_rename):
            code, _out, err = call(restore.main, [archive, "noask", "--dir", self.stack])
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("Input/output error (injected)", err)
        self.assertNotIn("Traceback", err)
        self.assertTrue(any(os.path.basename(src) == "services" for src in renames))
        self.assertEqual(diff_snapshots(old, items(self.stack)), [])
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        self.assertFalse(os.path.lexists(os.path.join(self.stack, iotstack.JOURNAL_NAME)))
        self.assert_no_leftovers()
        self.assert_stopped_and_started()
        self.assertIn("every item was put back", self.restore_log())
        self.assertIn("Details of the error:", self.restore_log())

    def test_in_place(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        kept = others(self.stack)
        code, out, err = self.restore(archive, "noask", "--in-place")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertEqual(diff_snapshots(kept, others(self.stack)), [])
        self.assert_no_leftovers()
        self.assert_stopped_and_started()

    def test_failing_post_restore_hook(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo hook says hello\necho hook error >&2\nexit 3\n")
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        with hook_pipe_warnings_ignored():
            code, out, err = self.restore(archive, "noask")
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("post_restore.sh failed with status 3", err)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])  # files restored
        log = self.restore_log()
        self.assertIn("post_restore.sh: hook says hello", log)
        self.assertIn("post_restore.sh: hook error", log)
        self.assertIn("post_restore.sh exited with status 3", log)
        self.assertIn("ERROR: post_restore.sh failed", log)
        self.assertIn("Finished At:", log)
        self.assert_stopped_and_started()

    def test_post_restore_hook_output_is_in_the_log_never_truncated(self):
        with open(os.path.join(self.stack, "post_restore.sh"), "w") as f:
            f.write("echo restored in $(pwd)\nls docker-compose.yml\n")
        archive = self.make_backup()
        change_tree(self.stack)
        with hook_pipe_warnings_ignored():
            code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        log = self.restore_log()
        lines = log.splitlines()
        self.assertTrue(lines[0].startswith("Started At:"), lines[0])
        hook = lines.index("  post_restore.sh: restored in %s" % self.stack)
        self.assertIn("  post_restore.sh: docker-compose.yml", lines)
        self.assertIn("post_restore.sh exited with status 0", lines)
        finished = [i for i, line in enumerate(lines) if line.startswith("Finished At:")]
        self.assertEqual(len(finished), 1, log)
        self.assertGreater(finished[0], hook)
        # The hook ran after the files were in place, with the services stopped.
        stopped = [i for i, line in enumerate(lines)
                   if line.startswith("Stopped: %s (" % ", ".join(RUNNING))]
        self.assertLess(stopped[0], hook)
        self.assertGreater(lines.index("Started again: %s" % ", ".join(RUNNING)), hook)


class WithoutDockerTests(RestoreCase):
    def test_without_docker(self):
        archive = self.make_backup()
        expected = items(self.stack)
        change_tree(self.stack)
        code, out, err = self.restore(archive, "noask")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(diff_snapshots(expected, items(self.stack)), [])
        self.assertRegex(self.restore_log(), "Docker is not installed .*: no service runs")


if __name__ == "__main__":
    unittest.main()
