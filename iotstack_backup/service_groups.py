"""Which running services must be down while which part of the archive is read.

A backup only needs a service stopped while its own files are read.  Two
services share data when a mount of one and a mount of the other fall in
the same top-level folder of volumes/ (or one lies inside the other: a
mount of the stack's parent folder holds all of it), and a service that
depends on another goes down with it; services
linked that way, directly or through others, form a group.  The archive is
written in an order that keeps each group's data together (archive_writer's
segments): the group's data is read while it runs, then the group is
stopped, a stat walk confirms that nothing changed since it was read (what
did is read again), and the group starts again, while the other services
run; data no running container mounts is read first, with nothing stopped.

How it keeps data safe: mounts and dependencies come from the engine
(`docker inspect` of the project's containers: `.Mounts` and compose v2's
`com.docker.compose.depends_on` label; `docker volume inspect` for what a
named volume's driver options bind), never from reading YAML by hand, and
their paths are compared as the kernel sees them (stack_paths: a stack
reached through a symlink, a mount from above the stack); for a backup only
what a service can write counts.  When they cannot be learned, every
running service is stopped together around all of the data (the old
behaviour); a mount that cannot be told (a volume driver other than
docker's local one, a block device) makes --stop each stop everything
together; so not knowing never means reading a running database.  The
decisions are pure functions, table-tested; the queries are thin functions
at the end.
"""
from __future__ import annotations

import os

from . import stack_paths
from .archive_writer import Segment
from .docker_compose import StackUnavailable
from .progress import human_size

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


class MountFacts:
    """What the engine said of the running containers' mounts, for
    mount_keys: the stack's Places and {volume: (driver, options,
    mountpoint)} of their named volumes."""

    __slots__ = ("places", "volumes")

    def __init__(self, places: stack_paths.Places, volumes: dict):
        self.places, self.volumes = places, volumes


def mount_keys(mount, facts: MountFacts, ident=stack_paths.identity,
               realpath=os.path.realpath):
    """(stack-relative paths the mount covers, why it cannot be told or
    None).  A named volume is followed to what its driver options bind."""
    source = mount.source
    if mount.kind == "volume":
        driver, options, mountpoint = facts.volumes.get(mount.volume, (None, None, source))
        how, found = stack_paths.volume_source(driver, options, mountpoint or source)
        if how == "unknown":
            return (), "volume %s: %s" % (mount.volume, found)
        if how == "outside":
            return (), None
        source = found
    return stack_paths.locate(source, facts.places, ident, realpath), None


def facts_from_containers(containers, facts: MountFacts, writable_only: bool = True,
                          ident=stack_paths.identity, realpath=os.path.realpath):
    """({service: data keys}, {service: dependencies}, whether any container
    carries compose v2's depends_on label, {service: why its mounts cannot be
    told}) from the running containers (docker_compose.Container).  For a
    backup only what a service can write counts (writable_only); a service
    whose mounts cannot be told gets the whole stack ("")."""
    names = sorted({c.service for c in containers})
    keys = {name: set() for name in names}
    unknown = {}
    for c in containers:
        for mount in c.mounts:
            if writable_only and not mount.writable:
                continue
            rels, why = mount_keys(mount, facts, ident, realpath)
            if why is not None:
                unknown.setdefault(c.service, why)
                rels = ("",)
            keys[c.service].update(data_key(rel) for rel in rels)
    deps = {name: tuple(sorted({d for c in containers if c.service == name
                                for d in parse_depends_on(c.depends_on)}))
            for name in names}
    return ({name: tuple(sorted(keys[name])) for name in names}, deps,
            any(c.depends_on is not None for c in containers), unknown)


def volumes_of(window, containers) -> dict:
    """{name: (driver, options, mountpoint)} of the containers' named
    volumes, as the engine describes them ({} when it does not answer)."""
    names = [m.volume for c in containers for m in c.mounts if m.volume]
    if not names or window.engine is None:
        return {}
    try:
        return window.engine.volumes(names)
    except StackUnavailable:
        return {}


def services_using(containers, stack, paths, volumes=None, log=None):
    """The services with a mount under, or holding, one of `paths` (relative
    to stack), read-only ones too: those a restore --only of them must stop;
    with those whose mounts cannot be told (logged).  volumes: see
    volumes_of."""
    facts = MountFacts(stack_paths.places_of(stack, sorted({p.split("/", 1)[0] for p in paths})),
                       volumes or {})
    keys, _deps, _labelled, unknown = facts_from_containers(containers, facts,
                                                            writable_only=False)
    if log is not None:
        for service, why in sorted(unknown.items()):
            log.line("Cannot tell what %s mounts (%s): it is stopped too" % (service, why))
    return sorted(name for name, rels in keys.items()
                  if any(overlaps(rel, path) for rel in rels for path in paths))


def describe_window(window):
    return "%s (%s)" % (", ".join(window.services), ", ".join(window.roots))


def learn_groups(window, stack, running, item_names, log):
    """(groups of the running services, {service: why its mounts cannot be
    told}), from what the engine said of their containers when the window
    was made."""
    containers = window.running_containers()
    facts = MountFacts(stack_paths.places_of(stack, item_names), volumes_of(window, containers))
    keys, deps, labelled, unknown = facts_from_containers(containers, facts)
    if not labelled:
        log.line("Dependencies between services are not known (compose v1 labels no "
                 "depends_on): services are grouped by shared data only")
    return group_services(running, keys, deps), unknown


def stop_mode(mode: str, unknown: dict, log) -> str:
    """--stop each falls back to all when a service's mounts cannot be told."""
    for service, why in sorted(unknown.items()):
        log.line("Cannot tell what %s can write (%s): %s" % (
            service, why, "--stop each falls back to all for this run" if mode == "each"
            else "it is stopped with everything"))
    return "all" if unknown and mode == "each" else mode


def plan_for(window, stack, items, mode, log):
    """The stop windows of this run (logged), from the service window's
    running services and what the engine said they mount."""
    if window is None or window.unavailable or mode == "none":
        return []
    running = list(window.running)
    if not running:
        return []
    item_names = [item.rstrip("/") for item in items]
    groups, unknown = learn_groups(window, stack, running, item_names, log)
    mode = stop_mode(mode, unknown, log)
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

        segment = Segment(group.roots, before, after, group.parts, report)
        segment.reused = self._log_reused
        return segment

    def _log_reused(self, reuse):
        total = reuse.reused_bytes + reuse.compressed_bytes
        if total:
            self.log.line("Read again: %s of %s copied from the live read's compressed blocks, "
                          "%s compressed again" % (human_size(reuse.reused_bytes),
                                                   human_size(total),
                                                   human_size(reuse.compressed_bytes)))


def longest_outage(downtimes):
    """(service, seconds) of the longest outage in {service: seconds}, or None."""
    if not downtimes:
        return None
    return max(sorted(downtimes.items()), key=lambda pair: pair[1])
