"""Which running services must be down while which part of the archive is read.

A backup only needs a service stopped while its own files are read.  Two
services share data when a bind mount of one and a bind mount of the other
fall in the same top-level folder of volumes/ (or one lies inside the
other), and a service that depends on another goes down with it; services
linked that way, directly or through others, form a group.  The archive is
written in an order that keeps each group's data together (archive_writer's
segments), so the group is stopped just before its first entry is read and
started again as soon as its last one was, while the other services run;
data no running container mounts is read first, with nothing stopped.

How it keeps data safe: mounts and dependencies come from the engine
(`docker inspect` of the project's containers: `.Mounts` and compose v2's
`com.docker.compose.depends_on` label), never from reading YAML by hand; when
they cannot be learned, every running service is stopped together around
all of the data (the old behaviour), so not knowing never means reading a
running database.  The decisions are pure functions, table-tested; the query
is one thin function at the end.
"""
import json
import os
import subprocess
import time

from .archive_writer import Segment
from .docker_compose import StackUnavailable

SERVICE_LABEL = "com.docker.compose.service"
DEPENDS_LABEL = "com.docker.compose.depends_on"

STOP_MODES = ("each", "all", "none")


class Group:
    """Running services that go down together, and the stack-relative paths
    (data keys) their bind mounts cover."""

    __slots__ = ("services", "keys")

    def __init__(self, services, keys):
        self.services = tuple(sorted(services))
        self.keys = tuple(sorted(keys))

    def __eq__(self, other):
        return (self.services, self.keys) == (other.services, other.keys)

    def __repr__(self):
        return "Group(%r, %r)" % (self.services, self.keys)


class Window:
    """Services stopped while the archive reads `roots` (paths relative to
    the stack, walk entries of the backup) and everything below them."""

    __slots__ = ("services", "roots")

    def __init__(self, services, roots):
        self.services = tuple(services)
        self.roots = tuple(roots)

    def __eq__(self, other):
        return (self.services, self.roots) == (other.services, other.roots)

    def __repr__(self):
        return "Window(%r, %r)" % (self.services, self.roots)


# ---------------------------------------------------------------------------
# Pure decisions


def parse_depends_on(label):
    """Service names from compose v2's depends_on label,
    "db:service_started:false,mqtt:service_healthy:true"."""
    return tuple(sorted({part.split(":", 1)[0].strip()
                         for part in (label or "").split(",") if part.strip()}))


def relative_to_stack(source, bases):
    """The stack-relative path of a mount's host path, or None when it lies
    outside the stack.  bases: (absolute prefix, relative prefix) pairs, e.g.
    the stack itself, its real path, and a volumes/ that is a symlink."""
    source = os.path.normpath(source)
    for prefix, rel in bases:
        if source == prefix:
            return rel
        if source.startswith(prefix.rstrip("/") + "/"):
            below = source[len(prefix.rstrip("/")) + 1:]
            return rel + "/" + below if rel else below
    return None


def data_key(rel):
    """What a mount shares: volumes/x for anything in volumes/x (services
    that mount different sub-folders of one service folder still share it),
    otherwise the path itself."""
    parts = rel.split("/")
    if parts[0] == "volumes" and len(parts) > 2:
        return "/".join(parts[:2])
    return rel


def overlaps(a, b):
    """True when one path is the other or lies inside it ("" is the whole stack)."""
    return a == b or a == "" or b == "" or a.startswith(b + "/") or b.startswith(a + "/")


def _linked(a, b, deps):
    """Do groups a and b share data, or does a service of one depend on one of the other?"""
    if any(overlaps(x, y) for x in a.keys for y in b.keys):
        return True
    return (any(d in b.services for s in a.services for d in deps.get(s, ()))
            or any(d in a.services for s in b.services for d in deps.get(s, ())))


def group_services(running, keys, deps):
    """Groups of the running services: linked by shared data or by a
    dependency, directly or through others (connected components: each new
    service absorbs every group it touches).  keys: {service: data keys};
    deps: {service: services it depends on}; services that are not running
    are ignored (nothing stops them)."""
    groups = []
    for service in sorted(running):
        new = Group([service], keys.get(service, ()))
        touching = [g for g in groups if _linked(g, new, deps)]
        merged = Group([s for g in touching + [new] for s in g.services],
                       {k for g in touching + [new] for k in g.keys})
        groups = [g for g in groups if g not in touching] + [merged]
    return sorted(groups, key=lambda g: (g.keys[:1], g.services))


def minimal_paths(paths):
    """The paths none of the others contains, sorted."""
    unique = sorted(set(paths))
    return tuple(p for p in unique if not any(q != p and overlaps(q, p) and len(q) < len(p)
                                              for q in unique))


def archive_roots(keys, item_names):
    """The entries of the backup that hold a group's data: a key inside a
    manifest item is itself a root; a key holding whole items (the stack, or
    .tmp for .tmp/databases_backup) makes those items roots; a key outside
    every item (backups/, a log folder) holds nothing the backup reads."""
    roots = [key if key.startswith(item + "/") or key == item else item
             for key in keys for item in item_names
             if overlaps(key, item)]
    return minimal_paths(roots)


def plan_windows(groups, mode, running, item_names):
    """The stop windows, in archive order.

    each: one window per group with data in the backup; a group without any
    (no bind mount in the stack) is never stopped.  all: one window of every
    running service around all their data.  none: no window.  groups None
    means the mounts could not be learned: one window of every running
    service around every item, as the old script did.
    """
    if mode == "none" or not running:
        return []
    if groups is None:
        return [Window(sorted(running), minimal_paths(item_names))]
    windows = [Window(g.services, archive_roots(g.keys, item_names)) for g in groups]
    windows = [w for w in windows if w.roots]
    if mode == "all":
        roots = minimal_paths([r for w in windows for r in w.roots])
        return [Window(sorted(running), roots)] if roots else []
    return sorted(windows, key=lambda w: w.roots)


def left_running(windows, running):
    """The running services no window stops."""
    stopped = {s for w in windows for s in w.services}
    return [s for s in sorted(running) if s not in stopped]


def path_bases(stack, item_names, realpath=os.path.realpath, islink=os.path.islink,
               listdir=os.listdir):
    """Where mounts of the stack may point: the stack as given and as its real
    path, each top-level item that is a symlink (volumes/ on an SSD), and
    each folder of volumes/ that is one (a database moved alone), longest
    first so the most specific prefix wins."""
    stack = os.path.abspath(stack)
    bases = [(stack, ""), (realpath(stack), "")]
    linked = [item for item in item_names if "/" not in item]
    if "volumes" in item_names:
        try:
            linked += ["volumes/" + name for name in listdir(os.path.join(stack, "volumes"))]
        except OSError:
            pass
    bases += [(realpath(os.path.join(stack, rel)), rel) for rel in linked
              if islink(os.path.join(stack, rel))]
    return sorted(set(bases), key=lambda b: -len(b[0]))


def facts_from_inspect(containers, bases):
    """({service: data keys}, {service: dependencies}, whether any container
    carries compose v2's depends_on label) from `docker inspect` output of
    the project's running containers."""
    running = [c for c in containers
               if (c.get("State") or {}).get("Running")
               and ((c.get("Config") or {}).get("Labels") or {}).get(SERVICE_LABEL)]

    def service(c):
        return c["Config"]["Labels"][SERVICE_LABEL]

    def keys_of(c):
        rels = [relative_to_stack(m.get("Source") or "", bases) for m in c.get("Mounts") or ()
                if m.get("Type") == "bind"]
        return {data_key(r) for r in rels if r is not None}

    names = sorted({service(c) for c in running})
    keys = {name: tuple(sorted(set().union(*[keys_of(c) for c in running if service(c) == name])))
            for name in names}
    labels = [c["Config"]["Labels"].get(DEPENDS_LABEL) for c in running]
    deps = {name: tuple(sorted({d for c in running if service(c) == name
                                for d in parse_depends_on(c["Config"]["Labels"].get(DEPENDS_LABEL))}))
            for name in names}
    return keys, deps, any(label is not None for label in labels)


def describe_window(window):
    return "%s (%s)" % (", ".join(window.services), ", ".join(window.roots))


# ---------------------------------------------------------------------------
# The query


class FactsUnavailable(Exception):
    """The engine did not say what the containers mount."""


def _run(argv, cwd, timeout=120):
    try:
        result = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FactsUnavailable("%s: %s" % (" ".join(argv[:3]), e)) from None
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise FactsUnavailable("%s failed: %s" % (" ".join(argv[:3]),
                                                   lines[-1] if lines else "no output"))
    return result.stdout.decode("utf-8", "replace")


def inspect_project(compose_command, stack):
    """`docker inspect` of the compose project's containers (compose finds the
    project: directory name, COMPOSE_PROJECT_NAME, .env)."""
    ids = _run(list(compose_command) + ["ps", "-q"], stack).split()
    if not ids:
        return []
    try:
        containers = json.loads(_run(["docker", "inspect"] + ids, stack))
    except ValueError as e:
        raise FactsUnavailable("docker inspect printed no JSON: %s" % e) from None
    if not isinstance(containers, list):
        raise FactsUnavailable("docker inspect printed no list")
    return containers


def learn_groups(compose_command, stack, running, item_names, log):
    """The groups of the running services, or None (logged) when the engine
    would not say what they mount."""
    try:
        containers = inspect_project(compose_command, stack)
        keys, deps, labelled = facts_from_inspect(containers, path_bases(stack, item_names))
    except (FactsUnavailable, KeyError, TypeError, AttributeError) as e:
        log.line("Could not learn the services' mounts (%s): stopping all running services "
                 "together" % e)
        return None
    missing = [s for s in running if s not in keys]
    if missing:
        log.line("No running container found for %s: stopping all running services together"
                 % ", ".join(missing))
        return None
    if not labelled:
        log.line("Dependencies between services are not known (compose v1 labels no "
                 "depends_on): services are grouped by shared data only")
    return group_services(running, keys, deps)


def plan_for(control, stack, items, mode, log):
    """The stop windows of this run (logged), from the control's running
    services and what the engine says they mount."""
    if control is None or mode == "none":
        return []
    running = list(control.running)
    log.line("Services running: %s" % (", ".join(running) or "none"))
    if not running:
        return []
    item_names = [item.rstrip("/") for item in items]
    groups = learn_groups(control.command, stack, running, item_names, log)
    windows = plan_windows(groups, mode, running, item_names)
    for window in windows:
        log.line("Stop window (--stop %s): %s" % (mode, describe_window(window)))
    left = left_running(windows, running)
    if left:
        log.line("Left running, no data of theirs in the backup: %s" % ", ".join(left))
    return windows


# ---------------------------------------------------------------------------
# Stopping and starting around the segments


class StopWindows:
    """Stops each window's services just before the archive reads its data
    and starts them as soon as the last entry was read, through control
    (see stack_window), timing and logging each outage in report:
    "stopped", "started", "outages" [(services, seconds)], "warnings",
    "restart_error".  A start that fails never keeps the next window from
    being read; on the way out (with / close) everything still down is
    started, whatever ended the run.  The downtime is measured from the
    stop command to the return of the start command: what the user's
    services saw, at most."""

    def __init__(self, control, log, report, clock=time.monotonic):
        self.control, self.log, self.report, self.clock = control, log, report, clock
        report.setdefault("stopped", [])
        report.setdefault("started", [])
        report.setdefault("outages", [])
        self.down = []  # stopped by a window and not started again

    def segments(self, windows):
        return [self._segment(window) for window in windows]

    def _segment(self, window):
        since = []  # when this window's stop began; set by before()

        def before():
            self.log.line("Stopping %s to read %s" % (", ".join(window.services),
                                                      ", ".join(window.roots)))
            since.append(self.clock())
            self.down += [s for s in window.services if s not in self.down]
            self.report["stopped"] += [s for s in window.services
                                       if s not in self.report["stopped"]]
            try:
                self.control.stop(window.services)
                self.log.line("Stopped %s (%.1f s)" % (", ".join(window.services),
                                                       self.clock() - since[0]))
            except StackUnavailable as e:
                # Read anyway (a warning, exit 3), and start them after:
                # some may have stopped.
                self.report.setdefault("warnings", []).append(
                    "could not stop %s: %s" % (", ".join(window.services), e))
                self.log.line("Warning: could not stop %s: %s" % (", ".join(window.services), e))

        def after():
            read = self.clock()
            try:
                self.control.start(window.services)
            except StackUnavailable as e:
                self._start_failed(window.services, e)
                return
            started = self.clock()
            seconds = started - since[0]
            self.down = [s for s in self.down if s not in window.services]
            self.report["started"] += [s for s in window.services
                                       if s not in self.report["started"]]
            self.report["outages"].append((window.services, seconds))
            self.log.line("Started %s again (%.1f s): down %.1f s"
                          % (", ".join(window.services), started - read, seconds))

        return Segment(window.roots, before, after)

    def _start_failed(self, services, error):
        self.report["restart_error"] = "%s: %s" % (", ".join(services), error)
        self.log.line("ERROR: %s could not be started again: %s" % (", ".join(services), error))

    def close(self):
        if self.control is None:
            return
        still_down = self.down
        try:
            self.control.close()
        except StackUnavailable as e:
            self._start_failed(still_down, e)
            return
        self.down = []
        if still_down:
            self.report["started"] += [s for s in still_down if s not in self.report["started"]]
            self.log.line("Services started again: %s" % ", ".join(still_down))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def longest_outage(outages):
    """(services, seconds) of the longest outage, or None."""
    return max(outages, key=lambda o: o[1]) if outages else None
