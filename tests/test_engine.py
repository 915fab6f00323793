"""Tests of tests/engine.py itself, against the real Docker engine, with compose v2 and v1.

They prove the helpers that other tests rely on: a project comes up, its
containers' states (running, paused, exited, created, restarting) read back
right, a service that ignores SIGTERM takes its stop_grace_period to stop
while one that traps it stops at once, the events arrive in order with a
measurable downtime, and remove() leaves no container behind, even when the
compose file is gone.  Without an engine they skip with the reason
(``bash .ci/engine start`` and export DOCKER_HOST to run them).
"""
import os
import shutil
import tempfile
import time
import unittest

from tests import engine as E


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class OfflineTest(unittest.TestCase):
    """The parts that need no engine."""

    def test_project_name_follows_compose(self):
        self.assertEqual(E.normalize_project_name("IOTstack"), "iotstack")
        self.assertEqual(E.normalize_project_name("My Stack.v2_x-y"), "mystackv2_x-y")
        self.assertEqual(E.project_name("/tmp/x/IOTstack", environ={}), "iotstack")
        self.assertEqual(E.project_name("/tmp/x/IOTstack",
                                        environ={"COMPOSE_PROJECT_NAME": "other"}), "other")

    def test_missing_flavour_skips_with_reason(self):
        eng = E.Engine("unix:///nowhere.sock", "20.10", "1.41", "2.40.3", None)
        self.assertEqual(eng.flavours(), ["v2"])
        self.assertEqual(eng.compose_command("v2"), ["docker", "compose"])
        if os.environ.get("IOTSTACK_REQUIRE_ENGINE", "") in ("", "0"):
            with self.assertRaisesRegex(unittest.SkipTest, "compose v1 is not available"):
                eng.compose_command("v1")

    def test_dead_socket_gives_the_hint(self):
        reason = E._find_engine("unix:///nonexistent/docker.sock")
        self.assertIsInstance(reason, str)
        self.assertTrue("no docker CLI" in reason or
                        ("no Docker engine answers at unix:///nonexistent/docker.sock" in reason
                         and ".ci/engine start" in reason), reason)

    def test_write_compose_shape(self):
        d = tempfile.mkdtemp(prefix="iotstack-engine-")
        self.addCleanup(shutil.rmtree, d, True)
        path = E.write_compose(d, [{"name": "db", "writer": True, "trap": False,
                                    "stop_grace_period": "2s"},
                                   {"name": "app", "depends_on": ["db"], "restart": "no"}])
        text = _read(path)
        self.assertIn('image: "iotbase:1"', text)
        self.assertIn('network_mode: "none"', text)
        self.assertIn('stop_grace_period: "2s"', text)
        self.assertIn('restart: "no"', text)
        self.assertIn('depends_on: ["db"]', text)
        self.assertIn("$$((i+1))", text)              # $ escaped for compose
        self.assertTrue(os.path.isdir(os.path.join(d, "volumes", "db")))


class _EngineTests:
    flavour = None

    def setUp(self):
        E.engine()
        E.require_flavour(self.flavour)

    def test_states_and_cleanup(self):
        p = E.stack(self, {"idle": {}, "held": {}, "done": {"exit": 0},
                           "never": {}, "crashy": {"exit": 1, "restart": "always"}},
                    flavour=self.flavour)
        self.assertEqual(p.states(), {})
        p.create("never")
        self.assertEqual(p.states(), {"never": "created"})
        p.up("idle", "held", "done", "crashy")
        p.pause("held")
        states = p.wait_for({"idle": "running", "held": "paused", "done": "exited",
                             "never": "created"})
        self.assertIn(states["crashy"], ("restarting", "running", "exited"))
        p.wait_for({"crashy": "restarting"}, timeout=20)
        sep = "-" if self.flavour == "v2" else "_"
        self.assertEqual(p.container_name("idle"), sep.join([p.name, "idle", "1"]))
        p.remove()
        self.assertEqual(p.states(), {})
        p.remove()   # twice is fine

    def test_slow_stop_events_and_downtime(self):
        p = E.stack(self, {"db": {"writer": True},
                           "app": {"trap": False, "stop_grace_period": "2s",
                                   "depends_on": ["db"]}},
                    flavour=self.flavour)
        p.up()
        p.wait_for({"db": "running", "app": "running"})
        log = os.path.join(p.stack_dir, "volumes", "db", "counter.log")
        deadline = time.monotonic() + 10
        while not (os.path.exists(log) and os.path.getsize(log) > 0):
            self.assertLess(time.monotonic(), deadline, "the writer wrote nothing")
            time.sleep(0.05)

        w = E.EventWatcher(p).start()
        self.addCleanup(w.stop)
        t0 = time.monotonic()
        p.stop()
        took = time.monotonic() - t0
        self.assertEqual(p.states(), {"db": "exited", "app": "exited"})
        self.assertGreaterEqual(took, 1.8, "app ignores SIGTERM: stop waits its 2 s grace")
        size = os.path.getsize(log)
        time.sleep(0.2)
        self.assertEqual(os.path.getsize(log), size, "db still writes after stop")
        p.start()
        w.wait_for("start", "db")
        w.wait_for("start", "app")
        events = w.stop()

        self.assertTrue(all(isinstance(t, int) and a and s for t, a, s in events), events)
        for svc in ("db", "app"):
            self.assertEqual(w.actions(svc, only=("die", "stop", "start")),
                             ["die", "stop", "start"], svc)
        # compose stops dependants first; SIGTERM then SIGKILL for app, SIGTERM for db.
        die = {e.service: e.time_nano for e in events if e.action == "die"}
        self.assertLess(die["app"], die["db"])
        self.assertEqual(w.actions("app", only=("kill",)), ["kill", "kill"])
        exits = {e["Actor"]["Attributes"]["com.docker.compose.service"]:
                 e["Actor"]["Attributes"].get("exitCode") for e in w.raw if e["Action"] == "die"}
        self.assertEqual(exits, {"db": "0", "app": "137"})
        kills = [e.time_nano for e in w.events("app") if e.action == "kill"]
        self.assertGreaterEqual((kills[1] - kills[0]) / 1e9, 1.8)
        downtimes = w.downtimes()
        self.assertEqual(set(downtimes), {"db", "app"})
        for svc, secs in downtimes.items():
            self.assertIsNotNone(secs, svc)
            self.assertGreater(secs, 0, svc)
            self.assertLess(secs, took + 10, svc)
        self.assertEqual(len(w.outages("db")), 1)
        # The writer starts over at 1 after its restart and goes on counting.
        deadline = time.monotonic() + 10
        while _read(log).split().count("1") < 2 or os.path.getsize(log) == size:
            self.assertLess(time.monotonic(), deadline, "db did not write again after start")
            time.sleep(0.05)

    def test_remove_without_compose_file(self):
        p = E.stack(self, {"a": {"writer": True}, "b": {"trap": False}}, flavour=self.flavour)
        p.up()
        p.wait_for({"a": "running", "b": "running"})
        os.remove(os.path.join(p.stack_dir, "docker-compose.yml"))
        t0 = time.monotonic()
        p.remove()
        self.assertLess(time.monotonic() - t0, 8, "remove() must not wait for grace periods")
        self.assertEqual(p.states(), {})
        ids = p.engine.docker("ps", "-aq", "--filter",
                              "label=com.docker.compose.project=" + p.name).stdout.split()
        self.assertEqual(ids, [])


class ComposeV2Test(_EngineTests, unittest.TestCase):
    flavour = "v2"


class ComposeV1Test(_EngineTests, unittest.TestCase):
    flavour = "v1"


if __name__ == "__main__":
    unittest.main()
