"""Stopping and starting the stack's services with Docker Compose, never leaving them down.

A ServiceWindow is made once per run, in the IOTstack directory.  It finds
the compose project by compose's own rules (`COMPOSE_PROJECT_NAME` in the
environment, then in `.env`, then the directory's name; compose v2 is asked
directly, so its `name:` key counts too), and reads the state of each of the
project's containers from the engine (`docker inspect`, never the YAML):

    window = ServiceWindow(stack, log)      # finds what runs; never raises
    window.unavailable                      # None, or why docker cannot be used
    with window:                            # close() on the way out, always
        window.stop(["influxdb"])           # any number of groups, any order
        ...                                 # read influxdb's data
        window.start(["influxdb"])          # each service on its own
        window.stop(["nodered", "grafana"])
        ...
    # every service stopped above runs again here, whatever happened inside

How it keeps the stack up:
- only services with a container in state `running` are ever stopped;
  paused, restarting, exited and created ones are left as they are, and
  named in the log (`left_alone`);
- `stop()` first writes a marker in .tmp/ naming every service this run has
  stopped and not yet started again, with their container ids and when the
  stop began; a kill -9 leaves it, and the next run of either command
  (restart_left_stopped) starts exactly those containers, unless they were
  started (or removed, or recreated) by someone since;
- SIGTERM, SIGINT and SIGHUP wait while `stop` or `start` runs (compose runs
  in a session of its own, so Ctrl-C never cuts it short either), then
  unwind the run, whose `close()` starts everything again;
- `start()` never lets one service cost another its start: one compose call
  for all, then each service that is still not running on its own; a
  service the compose file no longer has is reported (`missing`) with what
  to do, never passed to compose, where it would fail the whole call;
- `close()` removes the marker only when everything it had to start runs.

What it exposes for the log and the summary: `running`, `left_alone`
[(service, state)], `stopped`, `started`, `failed` [(service, reason)],
`missing` [(service, what to do)], `outstanding` (stopped, not started),
`downtime()` {service: seconds from the stop's start to the start's end}.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, cast

from . import run
from .iotstack import write_json_atomically
from .stack_paths import same_folder

if TYPE_CHECKING:
    from typing import (Any, Collection, Dict, Iterable, List, Literal, Mapping, Optional,
                        Sequence, Set, TextIO, Tuple, TypedDict)

    from .iotstack import RunLog

    # Any: docker's JSON (inspect, volume inspect) and a marker read back
    # from disk, whose fields are read with .get and checked where used.
    Json = Dict[str, Any]
    # A named volume: (driver, options, mountpoint), as docker says.
    VolumeInfo = Tuple[Optional[str], Optional[Dict[str, str]], str]

    class StoppedEntry(TypedDict, total=False):
        """A service in the marker: the containers stopped, and when."""
        containers: List[str]
        stopped_at: Optional[float]

STOPPED_MARKER = ".tmp/iotstack-stopped-services.json"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"
WORKDIR_LABEL = "com.docker.compose.project.working_dir"
VERSION_LABEL = "com.docker.compose.version"
DEPENDS_LABEL = "com.docker.compose.depends_on"
# Where docker usually lives: cron's PATH (/usr/bin:/bin) lacks /usr/local/bin,
# where Docker's convenience script and many Pi guides put it.
USUAL_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin",
              "/snap/bin")
QUERY_TIMEOUT = 60
ACTION_TIMEOUT = 900  # a stop waits for every stop_grace_period
# A start waits for dependencies' health checks: one that never passes
# again must not keep the services down for long.
START_TIMEOUT = 300


class StackUnavailable(Exception):
    """docker or its daemon cannot be used: the message says why."""


def _last_line(text: str) -> str:
    """The last line that says something: where docker puts the cause."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _daemon_error(text: str) -> str:
    """Why docker failed: the daemon's own words when it gave them (`docker
    start` ends with a line that only names the container)."""
    said = [line.strip() for line in text.splitlines() if "Error response from daemon" in line]
    return said[0] if said else _last_line(text)


def find_program(name: str, path: Optional[str] = None) -> Optional[str]:
    """The program on PATH, else in the usual places, else None; always
    None with IOTSTACK_NO_DOCKER=1 (a stack without Docker, or a test that
    must not touch one, though the machine has it)."""
    if os.environ.get("IOTSTACK_NO_DOCKER") == "1":
        return None
    found = shutil.which(name, path=path)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(USUAL_DIRS))


def _run(argv: List[str], cwd: Optional[str] = None,
         timeout: float = QUERY_TIMEOUT) -> Tuple[int, str, str]:
    """(returncode, stdout, stderr) as text.  In a session of its own, so
    that Ctrl-C or a closed terminal never interrupts docker half-way, and
    writing to files rather than pipes: if this process is killed (kill -9)
    during a `stop`, compose does not die of a broken pipe with half the
    services stopped, but finishes, and the record names what it stopped."""
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, timeout=timeout, start_new_session=True)
            out.seek(0)
            err.seek(0)
            return (result.returncode, out.read().decode("utf-8", "replace"),
                    err.read().decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        raise StackUnavailable("%s timed out after %d s" % (
            " ".join([os.path.basename(argv[0])] + argv[1:2]), timeout)) from None
    except OSError as e:
        raise StackUnavailable("%s: %s" % (" ".join(argv[:2]), e)) from None


def installed(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether a docker command exists (on PATH or in the usual places)."""
    environ = os.environ if environ is None else environ
    return bool(find_program("docker", environ.get("PATH"))
                or find_program("docker-compose", environ.get("PATH")))


def compose_command(docker: Optional[str]) -> List[str]:
    """["<docker>", "compose"] (v2) or ["<docker-compose>"] (v1), or StackUnavailable."""
    if docker:
        with contextlib.suppress(StackUnavailable):
            if _run([docker, "compose", "version"])[0] == 0:
                return [docker, "compose"]
    v1 = find_program("docker-compose", os.environ.get("PATH"))
    if v1:
        return [v1]
    raise StackUnavailable("neither 'docker compose' nor 'docker-compose' was found")


def dotenv_value(stack: str, key: str) -> Optional[str]:
    """KEY's value in the stack's .env, as compose reads it, or None."""
    try:
        with open(os.path.join(stack, ".env"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    value = None
    for line in lines:
        name, sep, text = line.strip().partition("=")
        if sep and name.strip() == key:
            value = text.strip().strip("'\"")
    return value


def project_name_by_rules(stack: str, environ: Mapping[str, str], v1: bool = False) -> str:
    """Compose's rules: COMPOSE_PROJECT_NAME (environment, then .env), else
    the folder's name, lowercased with what compose drops dropped."""
    name = (environ.get("COMPOSE_PROJECT_NAME") or dotenv_value(stack, "COMPOSE_PROJECT_NAME")
            or os.path.basename(os.path.abspath(stack)))
    name = re.sub(r"[^-_a-z0-9]", "", name.lower())
    return name if v1 else name.lstrip("-_")


def docker_time(text: Optional[str]) -> Optional[float]:
    """Seconds since the epoch of docker's "2026-12-01T15:31:11.715982374Z"."""
    match = re.match(r"(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    parts = [int(p) for p in match.groups()[:6]]
    fraction = float("0." + match.group(7)) if match.group(7) else 0.0
    if parts[0] < 1970:
        return 0.0  # "0001-01-01T00:00:00Z": never
    # Six numbers (the regex's first six groups), which mypy cannot count in a list.
    utc = datetime.timezone.utc
    moment = datetime.datetime(*parts, tzinfo=utc)  # type: ignore[misc, arg-type]
    return moment.timestamp() + fraction


class Container:
    """One container of the project, as `docker inspect` describes it."""

    def __init__(self, info: Json) -> None:
        labels = info.get("Config", {}).get("Labels") or {}
        state = info.get("State") or {}
        self.id: str = info.get("Id", "")
        self.name: str = info.get("Name", "").lstrip("/")
        self.service: str = labels.get(SERVICE_LABEL, "")
        self.oneoff: bool = labels.get(ONEOFF_LABEL, "").lower() == "true"
        self.working_dir: Optional[str] = labels.get(WORKDIR_LABEL)
        self.made_by_v1: bool = labels.get(VERSION_LABEL, "").startswith("1.")
        self.state: str = state.get("Status", "unknown")
        self.started_at = docker_time(state.get("StartedAt"))
        self.project: str = labels.get(PROJECT_LABEL, "")
        # What it may keep in the stack (bind mounts, named volumes) and whom
        # it needs (compose v2's label; None from v1, which writes none).
        self.mounts = [Mount(m) for m in info.get("Mounts") or ()
                       if m.get("Type") in ("bind", "volume")]
        self.depends_on: Optional[str] = labels.get(DEPENDS_LABEL)


class Mount:
    """One bind mount or named volume of a container, as `docker inspect`
    gives it: kind ("bind" or "volume"), source (the host path; for a
    volume, docker's folder of it), writable, and a volume's name."""

    __slots__ = ("kind", "source", "writable", "volume")

    def __init__(self, info: Json) -> None:
        self.kind: Optional[str] = info.get("Type")
        self.source: str = info.get("Source") or ""
        self.writable: bool = info.get("RW", True) is not False
        self.volume: Optional[str] = info.get("Name") if self.kind == "volume" else None

    def __repr__(self) -> str:
        return "Mount(%s %s%s)" % (self.kind, self.volume or self.source,
                                   "" if self.writable else " ro")


class Engine:
    """The docker CLI, the compose command and the project of one stack."""

    def __init__(self, stack: str, environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        self.stack = stack
        docker = find_program("docker", environ.get("PATH"))
        self.compose = compose_command(docker)
        self.v1 = len(self.compose) == 1
        if not docker:
            raise StackUnavailable("no docker command (looked on PATH and in %s)"
                                   % ", ".join(USUAL_DIRS))
        self.docker = docker
        self.project = self._project_name(environ)

    @property
    def compose_words(self) -> str:
        """How a user types our compose command: "docker compose" or "docker-compose"."""
        return "docker-compose" if self.v1 else "docker compose"

    def follow_creator(self, containers: Sequence[Container]) -> None:
        """Use compose v1 for containers v1 made, when it is here: v1 and v2
        name and find containers differently."""
        v1 = find_program("docker-compose", os.environ.get("PATH"))
        if v1 and not self.v1 and containers and all(c.made_by_v1 for c in containers):
            self.compose, self.v1 = [v1], True

    def _project_name(self, environ: Mapping[str, str]) -> str:
        if not self.v1:
            # v2 knows its rules best (a `name:` in the file included).
            code, out, _err = _run(self.compose + ["config", "--format", "json"], cwd=self.stack)
            if code == 0:
                with contextlib.suppress(ValueError, AttributeError):
                    name: Optional[str] = json.loads(out).get("name")
                    if name:
                        return name
        return project_name_by_rules(self.stack, environ, self.v1)

    def containers(self, ids: Optional[Sequence[str]] = None) -> List[Container]:
        """The project's containers (one-off `run` ones aside), or those of ids
        that still exist.  StackUnavailable when the daemon does not answer."""
        if ids is None:
            code, out, err = _run([self.docker, "ps", "-a", "-q", "--no-trunc", "--filter",
                                   "label=%s=%s" % (PROJECT_LABEL, self.project)])
            if code != 0:
                raise StackUnavailable(_last_line(err))
            ids = out.split()
        if not ids:
            return []
        code, out, err = _run([self.docker, "inspect", "--type", "container"] + list(ids))
        found: Optional[List[Container]]
        try:
            found = [Container(info) for info in json.loads(out or "[]")]
        except (ValueError, AttributeError):
            found = None
        if found is None or (code != 0 and not found and "No such" not in err):
            raise StackUnavailable(_last_line(err))
        return [c for c in found if not c.oneoff and c.service]

    def volumes(self, names: Collection[str]) -> Dict[str, VolumeInfo]:
        """{name: (driver, options, mountpoint)} of named volumes, as `docker
        volume inspect` says; a volume it cannot describe is left out."""
        if not names:
            return {}
        code, out, _err = _run([self.docker, "volume", "inspect"] + sorted(set(names)))
        try:
            found = json.loads(out or "[]")
        except ValueError:
            return {}
        return {v["Name"]: (v.get("Driver"), v.get("Options"), v.get("Mountpoint") or "")
                for v in found if isinstance(v, dict) and v.get("Name")}

    def containers_by_folder(self, stack: str) -> List[Container]:
        """Compose's containers (any project) made from this folder, by
        whatever path compose was run from: found when the project name of
        the rules finds none (compose started through a symlink whose name
        differs from the folder's)."""
        code, out, err = _run([self.docker, "ps", "-a", "-q", "--no-trunc", "--filter",
                               "label=" + PROJECT_LABEL])
        if code != 0:
            raise StackUnavailable(_last_line(err))
        found = self.containers(out.split())
        return [c for c in found if c.working_dir and same_folder(c.working_dir, stack)]

    def compose_run(self, *args: str, timeout: Optional[float] = None) -> Tuple[int, str, str]:
        return _run(self.compose + ["-p", self.project] + list(args), cwd=self.stack,
                    timeout=ACTION_TIMEOUT if timeout is None else timeout)

    def services_in_file(self) -> Optional[Set[str]]:
        """The services the compose file names now, or None when compose cannot read it."""
        code, out, _err = self.compose_run("config", "--services", timeout=QUERY_TIMEOUT)
        return set(out.split()) if code == 0 else None


def split_by_folder(containers: Sequence[Container], stack: str,
                    ) -> Tuple[List[Container], List[Container]]:
    """(ours, foreign): containers compose made from this folder, by any
    path to it (or that do not say where from), and those made from another
    one."""
    ours = [c for c in containers if not c.working_dir or same_folder(c.working_dir, stack)]
    return ours, [c for c in containers if c not in ours]


def by_service(containers: Iterable[Container]) -> Dict[str, List[Container]]:
    """{service: [Container]}."""
    grouped: Dict[str, List[Container]] = {}
    for container in containers:
        grouped.setdefault(container.service, []).append(container)
    return grouped


def service_state(containers: Iterable[Container]) -> str:
    """"running" when one of the service's containers runs, else their states."""
    states = sorted({c.state for c in containers})
    return "running" if "running" in states else "/".join(states)


class ServiceWindow:
    """The services of one run: which ran, which this run stopped, and getting
    every one of those running again.  See the module's docstring."""

    def __init__(self, stack: str, log: RunLog,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        self.stack = stack
        self.log = log
        self.marker = os.path.join(stack, STOPPED_MARKER)
        self.unavailable: Optional[str] = None
        self.running: List[str] = []
        self.left_alone: List[Tuple[str, str]] = []
        self.stopped: List[str] = []
        self.started: List[str] = []
        self.failed: List[Tuple[str, str]] = []
        self.missing: List[Tuple[str, str]] = []
        self.start_notes: List[str] = []  # starts that needed docker start (a compose call failed)
        self._notes_logged = 0
        self.held = False   # hold(): close() starts nothing
        # service -> {"containers": [ids], "stopped_at": time}
        self._record: Dict[str, StoppedEntry] = {}
        # service -> [monotonic stop begin, start end or None]
        self._down: Dict[str, List[Optional[float]]] = {}
        self._containers: Dict[str, List[Container]] = {}
        # A killed run's entries not (yet) taken over.
        self._inherited: Dict[str, StoppedEntry] = {}
        # The services the compose file names, when the caller knows that
        # answer is still current (a restore that left the compose files
        # as they were): start() then need not ask compose while they are down.
        self.compose_services: Optional[Collection[str]] = None
        self.engine: Optional[Engine] = None
        if not installed(environ):
            # No docker command anywhere: no container can run from here.
            log.line("Docker is not installed (no docker command on PATH or in %s): no "
                     "service runs, none to stop" % ", ".join(USUAL_DIRS))
            return
        try:
            self.engine = Engine(stack, environ)
            found = self.engine.containers()
        except StackUnavailable as e:
            self.unavailable = str(e)
            log.line("Docker: %s; no service was stopped" % e)
            return
        self._inherited = entries(read_record(self.marker))
        ours, foreign = split_by_folder(found, stack)
        if not ours:
            ours = self._project_by_folder(log)
        self.engine.follow_creator(ours)
        if foreign:
            # Same project name, another folder: compose would mix them up;
            # we never stop another stack's containers.
            log.line("Left alone, same project name but created from another folder: %s"
                     % ", ".join("%s (%s)" % (c.name, c.working_dir) for c in foreign))
        services = by_service(ours)
        states = {name: service_state(group) for name, group in services.items()}
        self.running = sorted(name for name, state in states.items() if state == "running")
        self.left_alone = sorted((name, state) for name, state in states.items()
                                 if state != "running")
        self._containers = services
        log.line("Services running (project %s, %s): %s"
                 % (self.engine.project, self.compose_words, ", ".join(self.running) or "none"))
        if self.left_alone:
            log.line("Services left alone: %s" % describe(self.left_alone))

    def _project_by_folder(self, log: RunLog) -> List[Container]:
        """The containers compose made from this folder under another project
        name (started through another path to it), the engine then naming
        that project; [] when there are none or they are of several."""
        assert self.engine is not None  # asked only once the engine answered
        try:
            found = self.engine.containers_by_folder(self.stack)
        except StackUnavailable:
            return []
        projects = sorted({c.project for c in found if c.project})
        if len(projects) != 1:
            if projects:
                log.line("Containers of several compose projects were made from this folder "
                         "(%s), none named %s: none is touched" % (", ".join(projects),
                                                                   self.engine.project))
            return []
        log.line("Compose project %s: its containers were made from this folder through %s"
                 % (projects[0], sorted({c.working_dir or "" for c in found})[0]))
        self.engine.project = projects[0]
        return found

    @property
    def compose_words(self) -> str:
        return self.engine.compose_words if self.engine else "docker compose"

    @property
    def outstanding(self) -> List[str]:
        """Stopped by this run and not started again, in the order stopped."""
        return [name for name in self.stopped if name in self._record]

    def running_containers(self) -> List[Container]:
        """The containers of the running services, as found at the start."""
        return [c for name in self.running for c in self._containers.get(name, [])
                if c.state == "running"]

    def container_names(self, services: Iterable[str]) -> List[str]:
        """The names of these services' containers (as found at the start)."""
        return [c.name for name in services for c in self._containers.get(name, [])]

    def downtime(self) -> Dict[str, float]:
        """{service: seconds down} for every service this run stopped (so far)."""
        now = time.monotonic()
        # The begin is always set (stop, adopt); only the end may be None.
        return {name: (end if end is not None else now) - cast(float, begin)
                for name, (begin, end) in self._down.items()}

    def stop(self, services: Iterable[str]) -> None:
        """Stop these services (those among `running`, not stopped yet) in one
        compose call.  The marker names them before the call; a signal waits
        until the call is over.  Raises StackUnavailable naming those still
        running afterwards; the ones that did stop are started by close()."""
        group = [s for s in services if s in self.running and s not in self.stopped]
        if not group or self.engine is None:
            return
        with run.signals_deferred():
            begin = time.monotonic()
            stamp = time.time()
            for name in group:
                self._record[name] = {"containers": self._running_ids(name),
                                      "stopped_at": stamp}
                self._down[name] = [begin, None]
            self.stopped.extend(group)
            self._write_marker()
            self.log.line("Stopping: %s" % ", ".join(group))
            code, _out, err = self.engine.compose_run("stop", *group)
            still = self._still_running(group)
            if still is None:
                still = group if code != 0 else []
            self.log.line("Stopped: %s (%.1f s)" % (
                ", ".join(s for s in group if s not in still) or "none",
                time.monotonic() - begin))
        if still:
            reason = _last_line(err) if code != 0 else "still running after stop"
            raise StackUnavailable("could not stop %s: %s" % (", ".join(still), reason))

    def _running_ids(self, name: str) -> List[str]:
        """The ids of the service's containers that ran when the window was made."""
        return [c.id for c in self._containers[name] if c.state == "running"]

    def _still_running(self, group: Sequence[str]) -> Optional[List[str]]:
        """Which of group run now, or None when docker does not answer."""
        try:
            now = self._ours()
        except StackUnavailable:
            return None
        return [s for s in group if service_state(now.get(s, [])) == "running"]

    def start(self, services: Collection[str]) -> None:
        """Start again those of services this run stopped.  Each ends up in
        `started`, `failed` (with the reason) or `missing` (with what to do);
        the marker keeps only the failed ones.  Never raises for docker's
        sake: a compose call that fails or times out leaves each service to
        `docker start`, and what still does not run is named in `failed`."""
        group = [s for s in self.outstanding if s in services]
        if not group or self.engine is None:
            return
        with run.signals_deferred():
            in_file = self.compose_services
            if in_file is None:
                in_file = self._services_in_file()
            absent = [s for s in group if in_file is not None and s not in in_file]
            present = [s for s in group if s not in absent]
            self._settle(present, self._start_each(present))
            for name in absent:
                self.missing.append((name, self._advice(name)))
                self._record.pop(name)
            self._write_marker()
        self._log_start(present, absent)

    def _settle(self, names: Iterable[str], errors: Mapping[str, str]) -> None:
        """Each of names, started: in `started`, else in `failed` (once, with
        errors' reason, or its state)."""
        now = self._states()
        for name in names:
            self.failed = [pair for pair in self.failed if pair[0] != name]
            if now.get(name) == "running":
                self.started.append(name)
                self._record.pop(name)
                self._down[name][1] = time.monotonic()
            else:
                self.failed.append((name, errors.get(name) or describe_exit(now.get(name))))

    def _services_in_file(self) -> Optional[Set[str]]:
        assert self.engine is not None  # start() asks only with an engine
        try:
            return self.engine.services_in_file()
        except StackUnavailable:
            return None

    def _start_each(self, names: Sequence[str]) -> Dict[str, str]:
        """One compose call for the services not failed yet (bounded by
        START_TIMEOUT: compose waits for dependencies' health checks); each
        one still not running then gets `docker start` of the containers
        this run stopped, which waits for nothing, so one that cannot start
        never holds back another.  Returns {service: the error docker gave}."""
        if not names:
            return {}
        assert self.engine is not None  # start() asks only with an engine
        failed = {name for name, _why in self.failed}
        first = [name for name in names if name not in failed]
        if first:
            try:
                code, _out, err = self.engine.compose_run("start", *first,
                                                          timeout=START_TIMEOUT)
                if code != 0:  # (v1 may say "error" and exit 0: docker start follows)
                    self.start_notes.append("'%s start %s' failed: %s" % (
                        self.compose_words, " ".join(first), _last_line(err)))
            except StackUnavailable as e:
                self.start_notes.append("'%s start %s' did not finish (%s: a dependency's "
                                        "health check failing?); each service was started "
                                        "with docker start" % (self.compose_words,
                                                               " ".join(first), e))
        now = self._states()
        errors: Dict[str, str] = {}
        for name in names:
            if now.get(name) != "running":
                error = self._docker_start(name)
                if error:
                    errors[name] = error
        return errors

    def _docker_start(self, name: str) -> Optional[str]:
        """`docker start` of the service's containers this run stopped; the
        error docker gave, or None."""
        assert self.engine is not None  # start() asks only with an engine
        ids = self._record.get(name, {}).get("containers") or [
            c.id for c in self._containers.get(name, [])]
        if not ids:
            return "no container"
        try:
            code, _out, err = _run([self.engine.docker, "start"] + ids, timeout=QUERY_TIMEOUT)
        except StackUnavailable as e:
            return str(e)
        return _daemon_error(err) if code != 0 else None

    def _ours(self) -> Dict[str, List[Container]]:
        """{service: [Container]} of this folder's containers, now."""
        assert self.engine is not None  # stop() and start() ask only with an engine
        return by_service(split_by_folder(self.engine.containers(), self.stack)[0])

    def _states(self) -> Dict[str, str]:
        try:
            return {name: service_state(group) for name, group in self._ours().items()}
        except StackUnavailable:
            return {}

    def _advice(self, name: str) -> str:
        containers = self._containers.get(name, [])
        names = " ".join(c.name for c in containers) or name
        return ("no longer in the compose file, so it stays stopped: start its old "
                "container with 'docker start %s', or remove it with '%s up -d "
                "--remove-orphans'" % (names, self.compose_words))

    def _log_start(self, present: Collection[str], absent: Collection[str]) -> None:
        for note in self.start_notes[self._notes_logged:]:
            self.log.line("Warning: %s" % note)
        self._notes_logged = len(self.start_notes)
        started = [s for s in present if s in self.started]
        if started:
            self.log.line("Started again: %s" % ", ".join(started))
        for name, reason in self.failed:
            if name in present:
                self.log.line("ERROR: %s could not be started again: %s" % (name, reason))
        for name, advice in self.missing:
            if name in absent:
                self.log.line("Warning: %s %s" % (name, advice))

    def _write_marker(self) -> None:
        """The marker names what is stopped now (with what a killed run left
        and nobody could start yet); gone when nothing is."""
        assert self.engine is not None  # written only by stop, start and adopt
        services = dict(self._inherited, **self._record)
        if services:
            write_json_atomically(self.marker, {"version": 2, "project": self.engine.project,
                                                "services": services})
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.marker)

    def close(self) -> None:
        """Start everything this run stopped and has not started again
        (unless held)."""
        if self.held:
            return
        with run.signals_deferred():
            self.start(self.outstanding)

    def hold(self) -> None:
        """Start nothing on close: the files under the services are not
        whole (a restore's journal is pending).  The record of what was
        stopped stays, so the run that finishes the swap (restore.py
        --recover) starts them."""
        self.held = True

    def adopt(self, record: Json) -> Tuple[List[str], List[Tuple[str, str]]]:
        """Take over a killed run's marker: the services whose containers are
        still stopped since that run stopped them become this window's to start.
        Returns (due, gone): names, and (name, why) of those left alone."""
        due: List[str] = []
        gone: List[Tuple[str, str]] = []
        self._inherited = {}
        assert self.engine is not None  # see restart_left_stopped
        if isinstance(record.get("project"), str) and record["project"]:
            # The project it stopped, even if .env or the environment differ now.
            self.engine.project = record["project"]
        for name, entry in sorted(entries(record).items()):
            ids = entry.get("containers") or []
            stamp = entry.get("stopped_at")
            found = self.engine.containers(ids) if ids else self._containers.get(name, [])
            if not found:
                gone.append((name, "its container was removed or recreated"))
            elif any(c.state != "exited" for c in found):
                gone.append((name, "it is %s" % service_state(found)))
            elif stamp is not None and any((c.started_at or 0) > stamp for c in found):
                gone.append((name, "it was started and stopped again"))
            else:
                due.append(name)
                self._containers[name] = found
                self._record[name] = {"containers": [c.id for c in found], "stopped_at": stamp}
                self._down[name] = [time.monotonic(), None]
                self.stopped.append(name)
        self._write_marker()
        return due, gone

    def __enter__(self) -> ServiceWindow:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False


def log_fields(log: RunLog, window: Optional[ServiceWindow]) -> None:
    """The log's Services fields: who was stopped, started, left alone, and
    how long each was down (window None: nothing was touched)."""
    stopped = window.stopped if window else []
    log.field("Services Stopped", ", ".join(stopped) or "none")
    log.field("Services Started", ", ".join(window.started if window else []) or "none")
    log.field("Services Left Alone", describe(window.left_alone)
              if window and window.left_alone else "none")
    if stopped and window:  # (a window stopped them)
        log.field("Downtime (s)", downtimes(window))


def downtimes(window: ServiceWindow) -> str:
    """"influxdb 3.2, nodered 3.1"."""
    return ", ".join("%s %.1f" % item for item in sorted(window.downtime().items()))


def describe(pairs: Iterable[Tuple[str, str]]) -> str:
    """"a (paused), b (exited)"."""
    return ", ".join("%s (%s)" % pair for pair in pairs)


def describe_failed(window: ServiceWindow) -> str:
    """"app (why); to start it: docker start NAME" for each service the
    window could not start again: the command works once the cause is fixed."""
    return "; ".join("%s (%s); to start it: docker start %s"
                     % (name, why, " ".join(window.container_names([name])) or name)
                     for name, why in window.failed)


def describe_exit(state: Optional[str]) -> str:
    return "not running after start (%s)" % (state or "no container")


def restart_left_stopped(stack: str, log: RunLog, out: Optional[TextIO] = None,
                         environ: Optional[Mapping[str, str]] = None,
                         ) -> Optional[ServiceWindow]:
    """Start what a killed run stopped and never started again (its marker
    says which containers, and when).  A container started by anyone since,
    removed or recreated is left as it is.  The marker stays until every
    service it names has started or left the compose file.  Returns the
    ServiceWindow used (its `failed` says what is still down), or None."""
    marker = os.path.join(stack, STOPPED_MARKER)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker + ".new")  # killed before its rename: never in force
    record = read_record(marker)
    if record is None:
        return None
    window = ServiceWindow(stack, log, environ)
    # No docker command at all leaves no engine and no reason either.
    unavailable = window.unavailable or (
        "Docker is not installed (no docker command)" if window.engine is None else None)
    if unavailable:
        say(log, out, "Warning: an interrupted run left services stopped, and they cannot be "
                      "started now: %s" % unavailable)
        window.failed = [(name, unavailable) for name in entries(record)]
        return window
    try:
        _due, gone = window.adopt(record)
    except StackUnavailable as e:
        window.failed = [(name, str(e)) for name in entries(record)]
        say(log, out, "Warning: an interrupted run left services stopped, and they cannot be "
                      "started now: %s" % e)
        return window
    for name, why in gone:
        say(log, out, "Left %s as it is: %s since an interrupted run stopped it" % (name, why))
    window.close()
    if window.started:
        say(log, out, "Started %s again: an interrupted run had stopped them"
            % ", ".join(window.started))
    for name, reason in window.failed:
        say(log, out, "Warning: %s, stopped by an interrupted run, could not be started: %s"
            % (name, reason))
    for name, advice in window.missing:
        say(log, out, "Warning: %s (stopped by an interrupted run) is %s" % (name, advice))
    return window


def read_record(marker: str) -> Optional[Json]:
    """The marker's content (a dict), {} when unreadable, None when absent."""
    try:
        with open(marker, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def entries(record: Optional[Json]) -> Dict[str, StoppedEntry]:
    services = record.get("services") if isinstance(record, dict) else None
    if isinstance(services, list):  # the first marker format: names only
        return {name: {} for name in services if isinstance(name, str)}
    return services if isinstance(services, dict) else {}


def say(log: RunLog, out: Optional[TextIO], message: str) -> None:
    log.line(message)
    if out is not None:
        out.write(message + "\n")
