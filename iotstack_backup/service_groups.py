"""Which running services must be down while which part of the archive is read.

A backup only needs a service stopped while its own files are read.  Two
services share data when a bind mount of one and a bind mount of the other
fall in the same top-level folder of volumes/ (or one lies inside the
other), and a service that depends on another goes down with it; services
linked that way, directly or through others, form a group.  The archive is
written in an order that keeps each group's data together (archive_writer's
segments): the group's data is read while it runs, then the group is
stopped, a stat walk confirms that nothing changed since it was read (what
did is read again), and the group starts again, while the other services
run; data no running container mounts is read first, with nothing stopped.

How it keeps data safe: mounts and dependencies come from the engine
(`docker inspect` of the project's containers: `.Mounts` and compose v2's
`com.docker.compose.depends_on` label), never from reading YAML by hand; when
they cannot be learned, every running service is stopped together around
all of the data (the old behaviour), so not knowing never means reading a
running database.  The decisions are pure functions, table-tested; the query
is one thin function at the end.
"""
import os

from .archive_writer import Segment
from .docker_compose import StackUnavailable

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
    """Services stopped while the archive checks `roots` (paths relative to
    the stack, walk entries of the backup) and everything below them.
    parts: the roots split into pieces the archive confirms (or reads
    again) one at a time; by default the roots are one part."""

    __slots__ = ("services", "roots", "parts")

    def __init__(self, services, roots, parts=None):
        self.services = tuple(services)
        self.roots = tuple(roots)
        self.parts = (self.roots,) if parts is None else tuple(tuple(p) for p in parts)

    def __eq__(self, other):
        return ((self.services, self.roots, self.parts)
                == (other.services, other.roots, other.parts))

    def __repr__(self):
        return "Window(%r, %r, %r)" % (self.services, self.roots, self.parts)


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
    running service around all their data, a part per group.  none: no
    window.  groups None means the mounts could not be learned: one window
    of every running service around every item, as the old script did, a
    part per item.
    """
    if mode == "none" or not running:
        return []
    if groups is None:
        roots = minimal_paths(item_names)
        return [Window(sorted(running), roots, [(root,) for root in roots])]
    windows = [Window(g.services, archive_roots(g.keys, item_names)) for g in groups]
    windows = sorted((w for w in windows if w.roots), key=lambda w: w.roots)
    if mode == "all":
        roots = minimal_paths([r for w in windows for r in w.roots])
        return [Window(sorted(running), roots, [w.roots for w in windows])] if roots else []
    return windows


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


def facts_from_containers(containers, bases):
    """({service: data keys}, {service: dependencies}, whether any container
    carries compose v2's depends_on label) from the running containers
    (docker_compose.Container: service, mounts, depends_on)."""
    names = sorted({c.service for c in containers})
    keys = {name: tuple(sorted({data_key(rel) for c in containers if c.service == name
                                for rel in (relative_to_stack(source, bases)
                                            for source in c.mounts)
                                if rel is not None}))
            for name in names}
    deps = {name: tuple(sorted({d for c in containers if c.service == name
                                for d in parse_depends_on(c.depends_on)}))
            for name in names}
    return keys, deps, any(c.depends_on is not None for c in containers)


def services_using(containers, stack, paths):
    """The services with a bind mount under, or holding, one of `paths`
    (relative to stack): those a restore --only of them must stop."""
    bases = path_bases(stack, [p.split("/", 1)[0] for p in paths])
    return sorted({c.service for c in containers for source in c.mounts
                   for rel in [relative_to_stack(source, bases)]
                   if rel is not None and any(overlaps(rel, path) for path in paths)})


def describe_window(window):
    return "%s (%s)" % (", ".join(window.services), ", ".join(window.roots))


def learn_groups(window, stack, running, item_names, log):
    """The groups of the running services, from what the engine said of
    their containers when the window was made."""
    containers = window.running_containers()
    keys, deps, labelled = facts_from_containers(containers, path_bases(stack, item_names))
    if not labelled:
        log.line("Dependencies between services are not known (compose v1 labels no "
                 "depends_on): services are grouped by shared data only")
    return group_services(running, keys, deps)


def plan_for(window, stack, items, mode, log):
    """The stop windows of this run (logged), from the service window's
    running services and what the engine said they mount."""
    if window is None or window.unavailable or mode == "none":
        return []
    running = list(window.running)
    if not running:
        return []
    item_names = [item.rstrip("/") for item in items]
    groups = learn_groups(window, stack, running, item_names, log)
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
    """The archive's segments for the stop windows: each window's services
    are stopped (through the run's docker_compose.ServiceWindow, which
    records them, holds signals back during the stop and starts whatever is
    still down however the run ends) once the archive has read their data
    live, and started again as soon as it has confirmed that data (or read
    again what changed), while the other services run.  A stop that fails
    is a warning: the data is read with them running, as with Docker not
    answering."""

    def __init__(self, window, log):
        self.window, self.log = window, log
        self.warnings = []

    def segments(self, windows):
        return [self._segment(window) for window in windows]

    def _segment(self, group):
        def before():
            self.log.line("Stop window: %s" % describe_window(group))
            try:
                self.window.stop(group.services)
            except StackUnavailable as e:
                self.warnings.append("%s; their data was read with them running" % e)
                self.log.line("Warning: %s" % e)

        def report(reread):
            # reread: the roots of the parts read again (those that changed,
            # and those holding hard links into them).
            checked = [root for root in group.roots if root not in reread]
            if checked:
                self.log.line("Checked after the stop, unchanged since read: %s"
                              % ", ".join(checked))
            if reread:
                self.log.line("Changed since read, read again stopped: %s" % ", ".join(reread))

        def after():
            self.window.start(group.services)
            down = self.window.downtime()
            seconds = max((down[s] for s in group.services if s in down), default=0.0)
            self.log.line("Stop window over: %s down %.1f s" % (", ".join(group.services),
                                                                seconds))

        return Segment(group.roots, before, after, group.parts, report)


def longest_outage(downtimes):
    """(service, seconds) of the longest outage in {service: seconds}, or None."""
    if not downtimes:
        return None
    return max(sorted(downtimes.items()), key=lambda pair: pair[1])
