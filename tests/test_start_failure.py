"""Issue 20, item 10: a start that fails inside a stop window, on the real engine.

Settled by this test: `docker compose start` that does not return (here it
waits for a dependency's health check that never passes again after the
stop) used to escape as an exception out of the window: the archive was
abandoned, the later groups were never read, and the run ended as a bug.
Now the group's compose call is bounded (START_TIMEOUT, shortened here),
each service still down is started on its own with `docker start` of the
containers the run stopped (no dependency wait), the other groups are read
and started as usual, and the run ends with exit 3 and a warning naming the
compose call.  A service that cannot start at all (its mount's folder
became a file) ends the run with exit 1 naming exactly what is still down
and the command that starts it; the marker keeps it for the next run.
"""
import json
import os
import re
import subprocess
import threading
import time
import unittest
from unittest import mock

from iotstack_backup import backup, docker_compose, run
from tests import engine as E
from tests import real_stack
from tests.support import IsolatedCase, call, write

ON_TERM = "trap 'exit 0' TERM\nwhile :; do sleep 1 & wait $!; done"


class ComposeTimeoutTest(IsolatedCase):
    def setUp(self):
        super().setUp()
        real_stack.use_engine(self)
        E.require_flavour("v2")
        self.stack = self.make_tmp("startfail-")
        E.write_compose(self.stack, {"db": {"volumes": ["./volumes/db:/data"]},
                                     "app": {"volumes": ["./volumes/app:/data"]},
                                     "other": {"volumes": ["./volumes/other:/data"]}})
        # db is healthy while /data/healthy exists; app needs it healthy.
        with open(os.path.join(self.stack, "docker-compose.yml")) as f:
            text = f.read()
        text = text.replace('  app:\n', '  app:\n    depends_on: {"db": {"condition": '
                                        '"service_healthy"}}\n')
        text = text.replace('  db:\n', '  db:\n    healthcheck: {"test": ["CMD", "test", "-f", '
                                       '"/data/healthy"], "interval": "1s", "timeout": "1s", '
                                       '"retries": 10000}\n')
        with open(os.path.join(self.stack, "docker-compose.yml"), "w") as f:
            f.write(text)
        self.healthy = os.path.join(self.stack, "volumes/db/healthy")
        write(self.healthy, b"")
        write(os.path.join(self.stack, "volumes/other/o.txt"), b"other\n")
        self.project = E.ComposeProject(self.stack)
        self.addCleanup(self.project.remove)
        self.project.up()
        self.project.wait_for({"db": "running", "app": "running", "other": "running"})

    def test_a_compose_start_that_hangs_leaves_nothing_down(self):
        # From now on db's health check fails; running, it stays "healthy"
        # (10000 retries), but once restarted it is "starting" for good, and
        # `compose start app db` waits for it, past START_TIMEOUT.
        os.unlink(self.healthy)
        watcher = E.EventWatcher(self.project).start()
        with mock.patch.object(docker_compose, "START_TIMEOUT", 5):
            code, out, err = call(backup.main, ["1", "--dir", self.stack, "--stop", "each"]
                                  + (["root"] if os.geteuid() == 0 else []))
        watcher.stop()
        self.assertEqual(code, run.EXIT_WARNINGS, out + err)
        self.assertEqual(err, "")
        # Every service that ran runs again: app was started by docker start,
        # which does not wait for db's health.
        self.assertEqual(self.project.states(), {"db": "running", "app": "running",
                                                 "other": "running"})
        log = self.newest_log()
        self.assertIn("Warning: 'docker compose start app db' did not finish (docker compose "
                      "timed out after 5 s: a dependency's health check failing?); each "
                      "service was started with docker start\n", log)
        self.assertIn("Warning: 'docker compose start app db' did not finish", out)
        # The later group was read and its window came and went.
        self.assertIn("Stop window: other (volumes/other)", log)
        for service in ("app", "db", "other"):
            self.assertEqual(watcher.actions(service, only=("die", "start")), ["die", "start"])
        self.assertEqual(len(os.listdir(os.path.join(self.stack, "backups/backup"))), 1)
        self.assertFalse(os.path.exists(os.path.join(self.stack, docker_compose.STOPPED_MARKER)))

    def test_a_service_that_cannot_start_is_named_with_its_command(self):
        # While other is stopped, its folder becomes a file: docker cannot
        # mount it and refuses to start it.  The run names it, says how to
        # start it, keeps it in the marker, and the rest runs.
        folder = os.path.join(self.stack, "volumes/other")
        marker = os.path.join(self.stack, docker_compose.STOPPED_MARKER)
        broke = []

        def break_when_stopped():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not broke:
                try:
                    with open(marker) as f:
                        if "other" in json.load(f)["services"]:
                            os.rename(folder, folder + ".moved")
                            write(folder, b"not a folder\n")
                            broke.append(True)
                except (OSError, ValueError, KeyError):
                    time.sleep(0.005)
        helper = threading.Thread(target=break_when_stopped)
        helper.start()
        code, out, err = call(backup.main, ["1", "--dir", self.stack, "--stop", "each"]
                              + (["root"] if os.geteuid() == 0 else []))
        helper.join()
        self.assertTrue(broke)
        self.assertEqual(code, run.EXIT_FAILED, out + err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        container = self.project.container_name("other")
        self.assertRegex(err, r"backup complete, but could not start again: other \(.+\); to "
                              r"start it: docker start %s\n$" % re.escape(container))
        self.assertEqual(self.project.states(), {"db": "running", "app": "running",
                                                 "other": "exited"})
        with open(marker) as f:
            self.assertEqual(sorted(json.load(f)["services"]), ["other"])
        os.unlink(folder)
        os.rename(folder + ".moved", folder)
        subprocess.run(["docker", "start", container], check=True, stdout=subprocess.DEVNULL)
        self.project.wait_for({"other": "running"})

    def newest_log(self):
        logs = os.path.join(self.stack, "backups/logs")
        newest = max((os.path.join(logs, n) for n in os.listdir(logs)), key=os.path.getmtime)
        with open(newest) as f:
            return f.read()


if __name__ == "__main__":
    unittest.main()
