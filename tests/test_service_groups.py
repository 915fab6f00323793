"""Tests of the pure parts of --stop each/all: grouping services by shared
data and dependencies, the archive roots each group holds, the stop
windows, the archive order of archive_writer's segments, and the order in
which StopWindows asks the run's service window to stop and start.  No
engine needed: tests/test_downtime.py runs the same against a real one."""
import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import unittest

from iotstack_backup import archive_writer, docker_compose, settings, stack_paths
from iotstack_backup import service_groups as sg
from iotstack_backup.docker_compose import StackUnavailable
from iotstack_backup.service_groups import Group, Window

ITEMS = ("services", "volumes", "docker-compose.yml", ".env", "extra", ".tmp/databases_backup")


class PathRulesTest(unittest.TestCase):
    def test_parse_depends_on(self):
        for label, expected in [
                (None, ()), ("", ()),
                ("db:service_started:false", ("db",)),
                ("mqtt:service_healthy:true,db:service_started:false", ("db", "mqtt")),
                ("db:service_started:false, db:service_healthy:true", ("db",))]:
            self.assertEqual(sg.parse_depends_on(label), expected, label)

    def test_data_key(self):
        for rel, expected in [("volumes/nodered/data", "volumes/nodered"),
                              ("volumes/nodered", "volumes/nodered"),
                              ("volumes", "volumes"),
                              ("services/nodered/config", "services/nodered/config"),
                              ("docker-compose.yml", "docker-compose.yml"), ("", "")]:
            self.assertEqual(sg.data_key(rel), expected, rel)

    def test_overlaps(self):
        for a, b, expected in [("volumes/a", "volumes/a", True),
                               ("volumes/a", "volumes/a/b", True),
                               ("volumes/a/b", "volumes/a", True),
                               ("volumes/a", "volumes/ab", False),
                               ("volumes/a", "services/a", False),
                               ("", "volumes/a", True),
                               ("volumes", "volumes/x", True)]:
            self.assertEqual(sg.overlaps(a, b), expected, (a, b))



class KernelPaths:
    """A machine's paths for the pure decisions of stack_paths: realpath
    resolves `links` (a prefix that is a symlink), identity gives a folder's
    (dev, ino), the same for two paths of one folder (`aliases`, a bind
    mount of it elsewhere)."""

    def __init__(self, folders, links=None, aliases=None):
        self.links = links or {}
        self.aliases = aliases or {}
        self.ids = {path: (1, n) for n, path in enumerate(sorted(folders), 1)}

    def realpath(self, path):
        path = os.path.normpath(path)
        resolved = None
        while resolved != path:
            resolved = path
            for link, target in sorted(self.links.items(), key=lambda lt: -len(lt[0])):
                if path == link or path.startswith(link + "/"):
                    path = target + path[len(link):]
                    break
        return path

    def identity(self, path):
        path = self.realpath(path)
        for alias, real in self.aliases.items():
            if path == alias or path.startswith(alias + "/"):
                path = real + path[len(alias):]
        return self.ids.get(path)


# /home/pi/IOTstack is a symlink to /ssd/stack; its volumes/influxdb one to
# /hdd/influx; /srv/stack is a bind mount of /ssd/stack.
MACHINE = KernelPaths(
    ["/", "/home", "/home/pi", "/ssd", "/ssd/stack", "/ssd/stack/volumes", "/ssd/stack/services",
     "/ssd/stack/volumes/nodered", "/ssd/stack/volumes/nodered/data", "/hdd", "/hdd/influx",
     "/etc", "/etc/localtime", "/ssd/other", "/srv", "/srv/stack"],
    links={"/home/pi/IOTstack": "/ssd/stack", "/ssd/stack/volumes/influxdb": "/hdd/influx"},
    aliases={"/srv/stack": "/ssd/stack"})


class StackPathsTest(unittest.TestCase):
    def places(self):
        return stack_paths.places_of("/home/pi/IOTstack", ["services", "volumes"],
                                     MACHINE.identity, MACHINE.realpath,
                                     lambda path: ["influxdb", "nodered"])

    def test_locate(self):
        places = self.places()
        for source, expected in [
                ("/home/pi/IOTstack/volumes/nodered/data", ("volumes/nodered/data",)),
                ("/ssd/stack/volumes/nodered/data", ("volumes/nodered/data",)),
                ("/ssd/stack/volumes/nodered/data/", ("volumes/nodered/data",)),
                ("/srv/stack/volumes/nodered", ("volumes/nodered",)),   # a bind mount of it
                ("/hdd/influx", ("volumes/influxdb",)),                 # the symlink's target
                ("/hdd/influx/wal", ("volumes/influxdb/wal",)),          # not there yet
                ("/ssd/stack/volumes/new/x", ("volumes/new/x",)),
                ("/ssd/stack", ("",)),
                ("/ssd", ("",)),                                         # holds it from above
                ("/home/pi", ()),               # holds the symlink, not what it leads to
                ("/hdd", ("volumes/influxdb",)),
                ("/", ("",)),
                ("/ssd/other", ()),
                ("/etc/localtime", ()),
                ("/var/run/docker.sock", ())]:
            self.assertEqual(stack_paths.locate(source, places, MACHINE.identity,
                                                MACHINE.realpath), expected, source)

    def test_volume_source(self):
        for driver, options, expected in [
                ("local", None, ("path", "/var/lib/docker/volumes/v/_data")),
                ("local", {}, ("path", "/var/lib/docker/volumes/v/_data")),
                ("local", {"type": "none", "o": "bind", "device": "/s/volumes/x"},
                 ("path", "/s/volumes/x")),
                ("local", {"o": "rbind,ro", "device": "/s"}, ("path", "/s")),
                ("local", {"type": "none", "o": "bind", "device": "volumes/x"},
                 ("unknown", "bind of a relative device volumes/x")),
                ("local", {"type": "nfs", "o": "addr=nas", "device": ":/export"},
                 ("outside", None)),
                ("local", {"type": "tmpfs", "device": "tmpfs"}, ("outside", None)),
                ("local", {"type": "ext4", "device": "/dev/sda1"},
                 ("unknown", "a ext4 file system on /dev/sda1")),
                ("rclone", {}, ("unknown", "volume driver rclone")),
                (None, None, ("unknown", "docker could not describe the volume"))]:
            self.assertEqual(stack_paths.volume_source(
                driver, options, "/var/lib/docker/volumes/v/_data"), expected, (driver, options))


class GroupingTest(unittest.TestCase):
    def groups(self, running, keys, deps=None):
        return [(g.services, g.keys) for g in sg.group_services(running, keys, deps or {})]

    def test_table(self):
        cases = [
            # (running, keys, deps, expected groups)
            ("alone", ["a", "b"], {"a": ("volumes/a",), "b": ("volumes/b",)}, {},
             [(("a",), ("volumes/a",)), (("b",), ("volumes/b",))]),
            ("same folder", ["a", "b"], {"a": ("volumes/shared",), "b": ("volumes/shared",)}, {},
             [(("a", "b"), ("volumes/shared",))]),
            ("one inside the other", ["a", "b"],
             {"a": ("services/x",), "b": ("services/x/conf",)}, {},
             [(("a", "b"), ("services/x", "services/x/conf"))]),
            ("a dependency", ["app", "db"], {"app": (), "db": ("volumes/db",)},
             {"app": ("db",)}, [(("app", "db"), ("volumes/db",))]),
            ("dependency on a stopped service is ignored", ["app"], {"app": ("volumes/app",)},
             {"app": ("db",)}, [(("app",), ("volumes/app",))]),
            ("transitive: a-b by data, b-c by dependency", ["a", "b", "c", "d"],
             {"a": ("volumes/x",), "b": ("volumes/x",), "c": ("volumes/c",),
              "d": ("volumes/d",)}, {"c": ("b",)},
             [(("a", "b", "c"), ("volumes/c", "volumes/x")), (("d",), ("volumes/d",))]),
            ("a late service joins two groups", ["a", "b", "z"],
             {"a": ("volumes/a",), "b": ("volumes/b",), "z": ("volumes/a", "volumes/b")}, {},
             [(("a", "b", "z"), ("volumes/a", "volumes/b"))]),
            ("the whole stack mounted", ["a", "b", "portainer"],
             {"a": ("volumes/a",), "b": ("volumes/b",), "portainer": ("",)}, {},
             [(("a", "b", "portainer"), ("", "volumes/a", "volumes/b"))]),
            ("no data", ["a", "idle"], {"a": ("volumes/a",), "idle": ()}, {},
             [(("idle",), ()), (("a",), ("volumes/a",))]),
        ]
        for name, running, keys, deps, expected in cases:
            self.assertEqual(self.groups(running, keys, deps), expected, name)

    def test_order_of_running_does_not_matter(self):
        keys = {"a": ("volumes/x",), "b": ("volumes/y",), "c": ("volumes/x", "volumes/y")}
        self.assertEqual(self.groups(["c", "b", "a"], keys), self.groups(["a", "b", "c"], keys))


class RootsAndWindowsTest(unittest.TestCase):
    def test_archive_roots(self):
        for keys, expected in [
                (("volumes/nodered",), ("volumes/nodered",)),
                (("volumes/a", "volumes/a/b"), ("volumes/a",)),
                (("volumes",), ("volumes",)),
                (("",), (".env", ".tmp/databases_backup", "docker-compose.yml", "extra",
                         "services", "volumes")),
                ((".tmp",), (".tmp/databases_backup",)),
                (("backups/x", "logs"), ()),
                (("docker-compose.yml",), ("docker-compose.yml",)),
                (("services/x/conf", "volumes/x"), ("services/x/conf", "volumes/x"))]:
            self.assertEqual(sg.archive_roots(keys, ITEMS), expected, keys)

    def test_plan_windows(self):
        groups = [Group(["db", "app"], ["volumes/db"]), Group(["idle"], []),
                  Group(["mq"], ["volumes/mq"]), Group(["logger"], ["logs"])]
        running = ["app", "db", "idle", "logger", "mq"]
        self.assertEqual(sg.plan_windows(groups, "each", running, ITEMS),
                         [Window(["app", "db"], ["volumes/db"]), Window(["mq"], ["volumes/mq"])])
        # all: one window, a part per group, each confirmed or read again alone.
        self.assertEqual(sg.plan_windows(groups, "all", running, ITEMS),
                         [Window(running, ["volumes/db", "volumes/mq"],
                                 [("volumes/db",), ("volumes/mq",)])])
        self.assertEqual(sg.plan_windows(groups, "none", running, ITEMS), [])
        self.assertEqual(sg.plan_windows(groups, "each", [], ITEMS), [])
        # Mounts unknown: everything, with every running service stopped.
        self.assertEqual(sg.plan_windows(None, "each", running, ITEMS),
                         [Window(running, sorted(ITEMS), [(item,) for item in sorted(ITEMS)])])
        self.assertEqual(Window(["a"], ["volumes/a", "services/a"]).parts,
                         (("volumes/a", "services/a"),))
        self.assertEqual(sg.left_running(sg.plan_windows(groups, "each", running, ITEMS),
                                         running), ["idle", "logger"])

    def test_windows_follow_archive_order(self):
        groups = [Group(["z"], ["volumes/a"]), Group(["a"], ["volumes/z"]),
                  Group(["s"], ["services/s"])]
        self.assertEqual([w.services for w in sg.plan_windows(groups, "each", ["a", "s", "z"],
                                                               ITEMS)],
                         [("s",), ("z",), ("a",)])


def container(service, mounts, depends=None):
    """mounts: (kind, source) or (kind, source, writable) or, for a named
    volume, ("volume", name, writable)."""
    labels = {docker_compose.SERVICE_LABEL: service}
    if depends is not None:
        labels[docker_compose.DEPENDS_LABEL] = depends
    infos = []
    for kind, source, *rw in mounts:
        info = {"Type": kind, "Source": source, "RW": rw[0] if rw else True}
        if kind == "volume":
            info.update(Name=source, Source="/var/lib/docker/volumes/%s/_data" % source)
        infos.append(info)
    return docker_compose.Container({
        "State": {"Status": "running"}, "Config": {"Labels": labels}, "Mounts": infos})


class InspectTest(unittest.TestCase):
    def facts(self, containers, volumes=None, writable_only=True):
        places = stack_paths.places_of("/home/pi/IOTstack", ["services", "volumes"],
                                       MACHINE.identity, MACHINE.realpath,
                                       lambda path: ["influxdb", "nodered"])
        return sg.facts_from_containers(containers, sg.MountFacts(places, volumes or {}),
                                        writable_only, MACHINE.identity, MACHINE.realpath)

    def test_facts_v2(self):
        keys, deps, labelled, unknown = self.facts([
            container("db", [("bind", "/ssd/stack/volumes/db/data"),
                             ("volume", "dbcache")], ""),
            container("app", [("bind", "/home/pi/IOTstack/volumes/app"),
                              ("bind", "/etc/localtime")], "db:service_started:false"),
        ], {"dbcache": ("local", None, "/var/lib/docker/volumes/dbcache/_data")})
        self.assertEqual(keys, {"db": ("volumes/db",), "app": ("volumes/app",)})
        self.assertEqual(deps, {"db": (), "app": ("db",)})
        self.assertTrue(labelled)
        self.assertEqual(unknown, {})

    def test_facts_v1_have_no_dependencies(self):
        keys, deps, labelled, _unknown = self.facts(
            [container("db", [("bind", "/ssd/stack/volumes/db")])])
        self.assertEqual((keys, deps, labelled), ({"db": ("volumes/db",)}, {"db": ()}, False))

    def test_ancestors_bound_volumes_read_only_and_unknown(self):
        containers = [
            container("browser", [("bind", "/ssd")]),
            container("viewer", [("bind", "/ssd", False)]),
            container("sync", [("volume", "data")]),
            container("plugin", [("volume", "cloud")]),
            container("influx", [("bind", "/hdd/influx/data")])]
        volumes = {"data": ("local", {"type": "none", "o": "bind",
                                      "device": "/srv/stack/volumes/nodered"}, ""),
                   "cloud": ("rclone", {}, "")}
        keys, _deps, _labelled, unknown = self.facts(containers, volumes)
        self.assertEqual(keys, {"browser": ("",), "viewer": (), "sync": ("volumes/nodered",),
                                "plugin": ("",), "influx": ("volumes/influxdb",)})
        self.assertEqual(unknown, {"plugin": "volume cloud: volume driver rclone"})
        # A restore --only counts read-only mounts: the viewer would keep
        # showing the old folder.
        keys, _deps, _labelled, _unknown = self.facts(containers, volumes, writable_only=False)
        self.assertEqual(keys["viewer"], ("",))


class Log:
    def __init__(self):
        self.lines = []

    def line(self, text):
        self.lines.append(text)

    def text(self):
        return "\n".join(self.lines)


def write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


class SegmentOrderTest(unittest.TestCase):
    """archive_writer's segments: same members, new order, callbacks in
    place.  Into a plain file (no rewinding) a segment is read between its
    callbacks; archive_writer's own tests cover reading live and confirming."""

    def setUp(self):
        self.stack = tempfile.mkdtemp(prefix="segments-")
        self.addCleanup(shutil.rmtree, self.stack)
        for rel in ("services/a/Dockerfile", "volumes/a/data/1", "volumes/a/data/2",
                    "volumes/b/db", "volumes/c/x", "docker-compose.yml", "extra/e"):
            write(os.path.join(self.stack, rel))
        os.makedirs(os.path.join(self.stack, "volumes/empty"))
        os.symlink("a", os.path.join(self.stack, "volumes/link"))
        self.items = ["services/", "volumes/", "docker-compose.yml", "extra/"]

    def walk(self, segments=(), patterns=()):
        """The archive's member names with "before X"/"after X" where each
        callback came (by the number of members written by then)."""
        stats = archive_writer.ArchiveStats()
        calls = []

        def marked(seg, name):
            return archive_writer.Segment(
                seg, lambda: calls.append((stats.members, "before " + name)),
                lambda: calls.append((stats.members, "after " + name)))
        segs = [marked(roots, name) for name, roots in segments]
        out = io.BytesIO()
        archive_writer.write_tar(out, self.stack, self.items, list(patterns),
                                 archive_writer_progress(), stats, segs)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
            names = tf.getnames()
        self.assertEqual(len(names), stats.members)
        events = list(names)
        for count, call in reversed(calls):
            events.insert(count, call)
        return events, stats

    def test_plain_walk_unchanged(self):
        events, _ = self.walk()
        plain = [e.rel for e in archive_writer.iter_entries(self.stack, self.items, [], [], [])]
        self.assertEqual(events, plain)

    def test_segments_move_to_the_end_between_their_callbacks(self):
        events, _ = self.walk([("A", ["volumes/a", "services/a"]), ("B", ["volumes/b"])])
        self.assertEqual(events, [
            "services", "volumes", "volumes/c", "volumes/c/x", "volumes/empty", "volumes/link",
            "docker-compose.yml", "extra", "extra/e",
            "before A", "services/a", "services/a/Dockerfile", "volumes/a", "volumes/a/data",
            "volumes/a/data/1", "volumes/a/data/2", "after A",
            "before B", "volumes/b", "volumes/b/db", "after B"])
        plain, _ = self.walk()
        self.assertEqual(sorted(e for e in events if " " not in e), sorted(plain))

    def test_whole_items_as_roots(self):
        events, _ = self.walk([("V", ["volumes"])])
        self.assertEqual(events[:5], ["services", "services/a", "services/a/Dockerfile",
                                      "docker-compose.yml", "extra"])
        self.assertEqual(events[6], "before V")
        self.assertEqual(events[-1], "after V")

    def test_excluded_or_missing_roots_stop_nothing(self):
        events, stats = self.walk([("A", ["volumes/a"]), ("M", ["volumes/missing"])],
                                  patterns=["volumes/"])
        self.assertEqual([e for e in events if " " in e], [])
        self.assertEqual(stats.excluded, ["volumes"])

    def test_root_behind_a_symlink_is_not_followed(self):
        events, _ = self.walk([("L", ["volumes/link/data"])])
        self.assertNotIn("before L", events)
        self.assertNotIn("volumes/link/data", events)

    def test_gnu_tar_extracts_the_reordered_archive(self):
        if not shutil.which("tar"):
            self.skipTest("no GNU tar")
        stats = archive_writer.ArchiveStats()
        path = os.path.join(self.stack, "..", os.path.basename(self.stack) + ".tar")
        self.addCleanup(os.unlink, path)
        with open(path, "wb") as f:
            archive_writer.write_tar(f, self.stack, self.items, [], archive_writer_progress(),
                                     stats, [archive_writer.Segment(["volumes/a"])])
        target = tempfile.mkdtemp(prefix="segments-x-")
        self.addCleanup(shutil.rmtree, target)
        subprocess.run(["tar", "-xf", path, "-C", target], check=True)
        for rel in ("volumes/a/data/2", "volumes/b/db", "extra/e"):
            self.assertTrue(os.path.isfile(os.path.join(target, rel)), rel)
        self.assertEqual(os.readlink(os.path.join(target, "volumes/link")), "a")


def archive_writer_progress():
    from iotstack_backup import progress
    return progress.NoProgress()


class RecordingWindow:
    """What StopWindows asks of the run's docker_compose.ServiceWindow:
    stop, start and the downtime so far; records the calls (the window
    itself is tested against the engine in test_stack_control)."""

    def __init__(self, fail_stop=()):
        self.fail_stop, self.calls, self.down = fail_stop, [], {}

    def stop(self, services):
        self.calls.append(("stop", tuple(services)))
        if set(services) & set(self.fail_stop):
            raise StackUnavailable("could not stop %s: refused" % ", ".join(services))

    def start(self, services):
        self.calls.append(("start", tuple(services)))
        self.down.update((s, 3.0) for s in services)

    def downtime(self):
        return dict(self.down)


class StopWindowsTest(unittest.TestCase):
    def drive(self, window, groups):
        log = Log()
        stops = sg.StopWindows(window, log)
        for seg in stops.segments(groups):
            seg.before()
            seg.report([])
            seg.after()
        return log, stops

    def test_each_window_in_turn(self):
        window = RecordingWindow()
        log, stops = self.drive(window, [Window(["a", "b"], ["volumes/a"]),
                                         Window(["c"], ["volumes/c"])])
        self.assertEqual(window.calls, [("stop", ("a", "b")), ("start", ("a", "b")),
                                        ("stop", ("c",)), ("start", ("c",))])
        self.assertIn("Stop window: a, b (volumes/a)", log.text())
        self.assertIn("Stop window over: a, b down 3.0 s", log.text())
        self.assertIn("Checked after the stop, unchanged since read: volumes/a", log.text())
        self.assertEqual(stops.warnings, [])

    def test_a_failing_stop_is_a_warning_and_the_data_is_still_read(self):
        window = RecordingWindow(fail_stop=["a"])
        log, stops = self.drive(window, [Window(["a"], ["volumes/a"]),
                                         Window(["c"], ["volumes/c"])])
        self.assertEqual(window.calls, [("stop", ("a",)), ("start", ("a",)),
                                        ("stop", ("c",)), ("start", ("c",))])
        self.assertEqual(stops.warnings,
                         ["could not stop a: refused; their data was read with them running"])

    def test_longest_outage(self):
        self.assertEqual(sg.longest_outage({"a": 1.5, "b": 2.5, "c": 2.5}), ("b", 2.5))
        self.assertIsNone(sg.longest_outage({}))


class StopSettingTest(unittest.TestCase):
    def resolve(self, given_stop, ini):
        args = argparse.Namespace(**{attr: None for attr, *_ in settings.SETTINGS.values()})
        args.stop = given_stop
        return settings.resolve_no_stop(args, settings.merge_settings(args, ini)), args.stop

    def test_stop_and_no_stop(self):
        for given, ini, expected in [
                (None, {}, "each"),
                ("all", {}, "all"),
                ("none", {}, "none"),                    # --no-stop or --stop none
                (None, {"no-stop": True}, "none"),
                (None, {"no-stop": True, "stop": "all"}, "all"),
                ("each", {"no-stop": True}, "each"),     # the command line wins
                (None, {"stop": "all"}, "all")]:
            self.assertEqual(self.resolve(given, ini)[1], expected, (given, ini))

    def test_bad_value_on_the_command_line(self):
        import contextlib

        from iotstack_backup import backup
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = backup.main(["--stop", "some"])  # returned: the failure is reported too
        self.assertEqual(code, 2)
        self.assertIn("backup.py: error: argument --stop: 'some' is not each, all or none",
                      err.getvalue().splitlines())

    def test_bad_value_in_backup_ini(self):
        from iotstack_backup import run
        with self.assertRaises(run.UserError) as caught:
            settings.parse_config("[backup]\nstop = some\n", "backup.ini")
        self.assertIn("bad value for 'stop'", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
