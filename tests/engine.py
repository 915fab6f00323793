"""Helpers for tests that drive REAL compose projects on a real Docker engine.

No fakes: the tests get the engine named by DOCKER_HOST (or /var/run/docker.sock),
usually the private one that ``bash .ci/engine start`` runs (no registry, no
network: every service uses image ``iotbase:1``, busybox imported locally, and
``network_mode: none``).  ``engine()`` finds it or raises ``unittest.SkipTest``
with the reason, and makes sure ``iotbase:1`` exists; ``write_compose`` writes a
docker-compose.yml of small busybox ``sh`` loops (idle or writing a counter
every 20 ms, fast or slow to stop, exiting at once, ...); ``ComposeProject``
runs compose v2 (``docker compose``) or v1 (``docker-compose``) for one project
and reads its containers' states; ``EventWatcher`` records the project's
container events so a test can assert their order and measure each service's
downtime.  ``stack()`` ties these together for a TestCase, cleanup included.

Every subprocess has a timeout and its output is captured, never printed.
Set IOTSTACK_REQUIRE_ENGINE=1 (e.g. in CI) to make a missing engine an error
instead of a skip.  Stdlib only; Python 3.9+.
"""

import collections
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import unittest

IMAGE = "iotbase:1"
CI_ROOT = os.environ.get("IOTSTACK_CI_DOCKER", "/var/tmp/iotstack-ci-docker")
CI_DOCKER_HOST = "unix://" + os.path.join(CI_ROOT, "docker.sock")
DEFAULT_SOCKET = "/var/run/docker.sock"
START_HINT = ("start one with `bash .ci/engine start` and export DOCKER_HOST=%s"
              % CI_DOCKER_HOST)
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"
QUERY_TIMEOUT = 30     # seconds for docker queries (ps, inspect, events --until)
COMPOSE_TIMEOUT = 90   # seconds for one compose command (up, stop, down...)
FLAVOURS = ("v2", "v1")
WRITER_FILE = "/data/counter.log"


class EngineError(RuntimeError):
    """A docker/compose command failed or timed out; carries its output."""

    def __init__(self, message, cmd=None, returncode=None, stdout="", stderr=""):
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        detail = "".join("\n--- %s ---\n%s" % (k, v.strip()) for k, v in
                         (("stdout", stdout or ""), ("stderr", stderr or "")) if v and v.strip())
        super().__init__(message + detail)


def run(args, *, timeout=QUERY_TIMEOUT, check=True, input=None, cwd=None, env=None):
    """Run a command with captured text output and a timeout; raise EngineError on failure."""
    try:
        proc = subprocess.run(
            list(args), input=input, cwd=cwd, env=env, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=not isinstance(input, bytes))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise EngineError("%s timed out after %ss" % (" ".join(args), timeout), list(args),
                          None, out, err) from None
    except OSError as e:
        raise EngineError("cannot run %s: %s" % (args[0], e), list(args)) from None
    if check and proc.returncode != 0:
        out, err = proc.stdout, proc.stderr
        if isinstance(out, bytes):
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        raise EngineError("%s exited %d" % (" ".join(args), proc.returncode), list(args),
                          proc.returncode, out, err)
    return proc


# ---------------------------------------------------------------------------
# The engine


class Engine:
    """The Docker engine that answers at docker_host, and the compose flavours it can use."""

    def __init__(self, docker_host, server_version, api_version, compose_v2, compose_v1):
        self.docker_host = docker_host          # e.g. unix:///var/tmp/iotstack-ci-docker/docker.sock
        self.server_version = server_version    # e.g. 20.10.24+dfsg1
        self.api_version = api_version          # e.g. 1.41
        self.compose_v2 = compose_v2            # version string of `docker compose`, or None
        self.compose_v1 = compose_v1            # version string of `docker-compose` (1.x), or None
        self.env = dict(os.environ, DOCKER_HOST=docker_host)
        self.env.pop("IOTSTACK_NO_DOCKER", None)

    def __repr__(self):
        return ("Engine(%r, server=%s, api=%s, compose_v2=%s, compose_v1=%s)"
                % (self.docker_host, self.server_version, self.api_version,
                   self.compose_v2, self.compose_v1))

    def flavours(self):
        """The compose flavours available here, "v2" before "v1"."""
        return [f for f, v in (("v2", self.compose_v2), ("v1", self.compose_v1)) if v]

    def compose_command(self, flavour):
        """argv prefix for a flavour: ["docker", "compose"] or ["docker-compose"]; SkipTest if absent."""
        if flavour == "v2":
            if not self.compose_v2:
                _skip("compose v2 is not available (`docker compose version` fails); "
                      "`bash .ci/engine start` installs it")
            return ["docker", "compose"]
        if flavour == "v1":
            if not self.compose_v1:
                _skip("compose v1 is not available (no docker-compose 1.x on PATH); "
                      "apt-get install docker-compose")
            return ["docker-compose"]
        raise ValueError("flavour must be 'v2' or 'v1', not %r" % (flavour,))

    def docker(self, *args, timeout=QUERY_TIMEOUT, check=True, input=None):
        """Run `docker ARGS` against this engine; returns the CompletedProcess."""
        return run(["docker", *args], timeout=timeout, check=check, input=input, env=self.env)


_engines = {}   # DOCKER_HOST (or None) -> Engine or the skip reason (str)


def _skip(reason):
    if os.environ.get("IOTSTACK_REQUIRE_ENGINE", "") not in ("", "0"):
        raise RuntimeError("IOTSTACK_REQUIRE_ENGINE is set but: " + reason)
    raise unittest.SkipTest(reason)


def engine():
    """The Engine for this process (cached), or raise unittest.SkipTest saying why there is none.

    A test that gets the engine uses Docker: the IOTSTACK_NO_DOCKER=1 that
    support.IsolatedCase sets (inside the test's own copy of os.environ) is
    taken away."""
    key = os.environ.get("DOCKER_HOST") or None
    found = _engines.get(key)
    if found is None:
        found = _engines[key] = _find_engine(key)
    if isinstance(found, str):
        _skip(found)
    os.environ.pop("IOTSTACK_NO_DOCKER", None)
    return found


def _find_engine(docker_host):
    if not shutil.which("docker"):
        return "no docker CLI on PATH"
    if docker_host is None:
        if not os.path.exists(DEFAULT_SOCKET):
            return ("DOCKER_HOST is unset and %s does not exist; %s" % (DEFAULT_SOCKET, START_HINT))
        docker_host = "unix://" + DEFAULT_SOCKET
    env = dict(os.environ, DOCKER_HOST=docker_host)
    try:
        out = run(["docker", "version", "--format", "{{.Server.Version}} {{.Server.APIVersion}}"],
                  timeout=15, env=env).stdout.split()
    except EngineError as e:
        why = (e.stderr or str(e)).strip().splitlines()
        return "no Docker engine answers at %s (%s); %s" % (
            docker_host, why[-1] if why else "no answer", START_HINT)
    if len(out) != 2:
        return "no Docker engine answers at %s (docker version said %r); %s" % (
            docker_host, " ".join(out), START_HINT)
    v2 = _version(["docker", "compose", "version", "--short"], env)
    v1 = _version(["docker-compose", "version", "--short"], env) if shutil.which("docker-compose") else None
    if v1 and not v1.startswith("1."):
        v1 = None       # a compose v2 binary installed as docker-compose is not v1
    eng = Engine(docker_host, out[0], out[1], v2, v1)
    try:
        ensure_image(eng)
    except EngineError as e:
        return "the engine at %s has no image %s and importing it failed: %s" % (
            docker_host, IMAGE, str(e).splitlines()[0])
    return eng


def _version(argv, env):
    try:
        return run(argv, timeout=15, env=env).stdout.strip().lstrip("v") or None
    except EngineError:
        return None


def compose_flavours():
    """The compose flavours this engine can use, e.g. ["v2", "v1"] (SkipTest without an engine)."""
    return engine().flavours()


def require_flavour(flavour):
    """argv prefix of a compose flavour, or raise SkipTest saying it is missing."""
    return engine().compose_command(flavour)


def _is_static_elf(path):
    """True when the ELF at path has no program interpreter, so it runs alone in an image."""
    with open(path, "rb") as f:
        h = f.read(64)
        if h[:4] != b"\x7fELF":
            return False
        end = "<" if h[5] == 1 else ">"
        if h[4] == 2:
            phoff, = struct.unpack(end + "Q", h[32:40])
            phentsize, phnum = struct.unpack(end + "HH", h[54:58])
        else:
            phoff, = struct.unpack(end + "I", h[28:32])
            phentsize, phnum = struct.unpack(end + "HH", h[42:46])
        f.seek(phoff)
        for _ in range(phnum):
            if struct.unpack(end + "I", f.read(phentsize)[:4])[0] == 3:  # PT_INTERP
                return False
    return True


def ensure_image(eng=None, busybox="/bin/busybox"):
    """Import image iotbase:1 (busybox and its applet links) unless the engine has it."""
    eng = eng or engine()
    if eng.docker("image", "inspect", IMAGE, check=False).returncode == 0:
        return
    if not os.path.exists(busybox) or not _is_static_elf(busybox):
        raise EngineError("%s is missing or not static; apt-get install busybox-static" % busybox)
    applets = run([busybox, "--list"], timeout=10).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, target="", data=None):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.linkname, ti.mtime = kind, mode, target, int(time.time())
            ti.size = len(data) if data is not None else 0
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
        for d in ("bin", "etc", "data", "root", "var", "proc", "sys", "dev"):
            add(d)
        add("tmp", mode=0o1777)
        with open(busybox, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, 0o755, data=f.read())
        for a in applets:
            if a != "busybox" and "/" not in a:
                add("bin/" + a, tarfile.SYMTYPE, 0o777, target="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, data=b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, data=b"root:x:0:\n")
    eng.docker("import",
               "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "-c", 'CMD ["/bin/sh"]', "-c", "LABEL org.iotstack.test-image=busybox",
               "-", IMAGE, input=buf.getvalue(), timeout=60)


# ---------------------------------------------------------------------------
# Compose files


def _q(value):
    """A YAML scalar or flow sequence/mapping (JSON is valid YAML for both compose flavours)."""
    return json.dumps(value, ensure_ascii=False)


def service_command(writer=False, trap=True, exit=None, writer_file=WRITER_FILE, period=None):
    """The sh script of a test service (plain shell; write_compose escapes $ for compose).

    exit=N: exits at once with code N.  Otherwise loops forever: writer=True appends
    a counter line ("1", "2", ...) to writer_file every 20 ms; trap=True exits 0 at
    once on SIGTERM, trap=False ignores it (sh as PID 1), so `stop` waits for
    stop_grace_period and then SIGKILLs.
    """
    if exit is not None:
        return "exit %d" % int(exit)
    period = period if period is not None else (0.02 if writer else 1)
    lines = []
    if trap:
        lines.append("trap 'exit 0' TERM")
    lines.append("i=0")
    body = "i=$((i+1)); " if writer else ""
    if writer:
        body += 'echo "$i" >> %s; ' % writer_file
    lines.append("while :; do %ssleep %s & wait $!; done" % (body, period))
    return "\n".join(lines)


def _normalize_services(services):
    if isinstance(services, dict):
        items = [(name, dict(spec or {})) for name, spec in services.items()]
    else:
        items = []
        for spec in services:
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            items.append((spec.pop("name"), spec))
    return items


def write_compose(stack_dir, services, filename="docker-compose.yml", version="3.6"):
    """Write stack_dir/docker-compose.yml for services; returns its path.

    services: {name: spec} or [spec with "name", or a bare name].  Spec keys, all optional:
      writer (bool)              append a counter line to /data/counter.log every 20 ms
      trap (bool, default True)  exit at once on SIGTERM; False: ignore it (slow stop)
      exit (int)                 exit at once with this code (for the exited/restarting states)
      volumes (list of str)      bind mounts, e.g. "./volumes/x:/data" (host dirs are made);
                                 a writer without volumes gets "./volumes/<name>:/data"
      depends_on (list), stop_grace_period (e.g. "2s"), restart (e.g. "unless-stopped"),
      container_name, user, environment (dict), labels (dict),
      command (str)              a sh script replacing the generated one (write $ as $)
    Every service uses image iotbase:1 and network_mode none.
    """
    lines = ["version: %s" % _q(version)] if version else []
    lines.append("services:")
    known = {"writer", "trap", "exit", "volumes", "depends_on", "stop_grace_period", "restart",
             "container_name", "user", "environment", "labels", "command", "writer_file", "period"}
    for name, spec in _normalize_services(services):
        unknown = set(spec) - known
        if unknown:
            raise ValueError("service %s: unknown keys %s" % (name, sorted(unknown)))
        volumes = list(spec.get("volumes") or [])
        if spec.get("writer") and not volumes:
            volumes = ["./volumes/%s:/data" % name]
        script = spec.get("command")
        if script is None:
            script = service_command(writer=bool(spec.get("writer")), trap=spec.get("trap", True),
                                     exit=spec.get("exit"),
                                     writer_file=spec.get("writer_file", WRITER_FILE),
                                     period=spec.get("period"))
        lines += ["  %s:" % name, "    image: %s" % _q(IMAGE), "    network_mode: \"none\""]
        if spec.get("container_name"):
            lines.append("    container_name: %s" % _q(spec["container_name"]))
        lines.append("    command: %s" % _q(["/bin/sh", "-c", script.replace("$", "$$")]))
        for key in ("restart", "stop_grace_period", "user"):
            if spec.get(key) is not None:
                lines.append("    %s: %s" % (key, _q(str(spec[key]))))
        if spec.get("depends_on"):
            lines.append("    depends_on: %s" % _q(list(spec["depends_on"])))
        for key in ("environment", "labels"):
            if spec.get(key):
                lines.append("    %s: %s" % (key, _q({k: str(v) for k, v in spec[key].items()})))
        if volumes:
            lines.append("    volumes: %s" % _q(volumes))
            for v in volumes:
                host = v.split(":", 1)[0]
                if host.startswith("./") or host.startswith("../"):
                    os.makedirs(os.path.join(stack_dir, host), exist_ok=True)
    path = os.path.join(stack_dir, filename)
    os.makedirs(stack_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------
# Compose projects

_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def normalize_project_name(name):
    """Compose's rule for a directory name: lowercase, drop chars not in [a-z0-9_-] (and leading _/-)."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower()).lstrip("_-")


def project_name(stack_dir, environ=None):
    """The project name compose gives stack_dir: COMPOSE_PROJECT_NAME from environ or
    stack_dir/.env, else the normalized basename of stack_dir.  (v1 keeps a leading
    _ or - that v2 drops: give stack dirs names that start with a letter or digit.)"""
    environ = os.environ if environ is None else environ
    name = environ.get("COMPOSE_PROJECT_NAME")
    if not name:
        try:
            with open(os.path.join(stack_dir, ".env"), encoding="utf-8") as f:
                for line in f:
                    k, sep, v = line.strip().partition("=")
                    if sep and k.strip() == "COMPOSE_PROJECT_NAME":
                        name = v.strip().strip("'\"")
        except OSError:
            pass
    if not name:
        name = normalize_project_name(os.path.basename(os.path.abspath(stack_dir)))
    return name


class ComposeProject:
    """One compose project in stack_dir, run with compose v2 or v1 against engine().

    Every compose command gets `-p NAME` with the name compose itself would pick
    (see project_name), and runs in stack_dir, so compose's default files and
    .env apply.  Raises SkipTest when there is no engine or no such flavour.
    """

    def __init__(self, stack_dir, name=None, flavour="v2", timeout=COMPOSE_TIMEOUT):
        self.engine = engine()
        self.flavour = flavour
        self.command = self.engine.compose_command(flavour)
        self.stack_dir = os.path.abspath(stack_dir)
        self.name = name or project_name(self.stack_dir)
        if not _NAME_OK.match(self.name):
            raise ValueError("project name %r is not one compose accepts" % self.name)
        self.timeout = timeout

    def __repr__(self):
        return "ComposeProject(%r, name=%r, flavour=%r)" % (self.stack_dir, self.name, self.flavour)

    def compose(self, *args, check=True, timeout=None):
        """Run `<compose> -p NAME ARGS` in stack_dir; returns the CompletedProcess."""
        return run([*self.command, "-p", self.name, *args], cwd=self.stack_dir,
                   env=self.engine.env, check=check, timeout=timeout or self.timeout)

    def up(self, *services):
        """`up -d [services]`."""
        return self.compose("up", "-d", *services)

    def create(self, *services):
        """Create containers without starting them: v2 `create`, v1 `up --no-start`."""
        if self.flavour == "v1":
            return self.compose("up", "--no-start", *services)
        return self.compose("create", *services)

    def start(self, *services):
        """`start [services]`."""
        return self.compose("start", *services)

    def stop(self, *services, timeout=None):
        """`stop [-t timeout] [services]` (timeout None: each service's stop_grace_period)."""
        extra = ["-t", str(int(timeout))] if timeout is not None else []
        return self.compose("stop", *extra, *services)

    def pause(self, *services):
        """`pause [services]`."""
        return self.compose("pause", *services)

    def unpause(self, *services):
        """`unpause [services]`."""
        return self.compose("unpause", *services)

    def down(self):
        """`down -v --remove-orphans`."""
        return self.compose("down", "-v", "--remove-orphans")

    def containers(self):
        """This project's containers (one-off `run` ones excluded): a list of dicts with
        keys id, name, service, state (running, exited, paused, restarting, created...)."""
        fmt = '{{.ID}}\t{{.Names}}\t{{.Label "%s"}}\t{{.State}}\t{{.Label "%s"}}' % (
            SERVICE_LABEL, ONEOFF_LABEL)
        out = self.engine.docker("ps", "-a", "--no-trunc", "--filter",
                                 "label=%s=%s" % (PROJECT_LABEL, self.name),
                                 "--format", fmt).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 5 and parts[4].lower() != "true":
                rows.append({"id": parts[0], "name": parts[1], "service": parts[2],
                             "state": parts[3]})
        return sorted(rows, key=lambda r: (r["service"], r["name"]))

    def states(self):
        """{service: state} of this project's containers (no entry: no container)."""
        return {r["service"]: r["state"] for r in self.containers()}

    def container_name(self, service):
        """The name of the service's container (v2: NAME-svc-1, v1: NAME_svc_1, or container_name)."""
        for r in self.containers():
            if r["service"] == service:
                return r["name"]
        raise KeyError("service %s of %s has no container" % (service, self.name))

    def wait_for(self, expected, timeout=15, interval=0.1):
        """Poll states() until it contains expected ({service: state}); returns states()."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.states()
            if all(now.get(s) == st for s, st in expected.items()):
                return now
            if time.monotonic() >= deadline:
                raise AssertionError("%s: waited %ss for %s, states are %s"
                                     % (self.name, timeout, expected, now))
            time.sleep(interval)

    def remove(self):
        """Remove every trace of the project: containers (`docker rm -f -v` by label, so it
        works without a compose file), then `down -v --remove-orphans` when the file is
        still there, networks and volumes by label.  Safe to call twice; for addCleanup."""
        label = "label=%s=%s" % (PROJECT_LABEL, self.name)
        ids = self.engine.docker("ps", "-aq", "--filter", label, check=False).stdout.split()
        if ids:
            self.engine.docker("rm", "-f", "-v", *ids, check=False, timeout=COMPOSE_TIMEOUT)
        if any(os.path.exists(os.path.join(self.stack_dir, f)) for f in
               ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml")):
            self.compose("down", "-v", "--remove-orphans", "-t", "0", check=False)
        for kind in ("network", "volume"):
            names = self.engine.docker(kind, "ls", "-q", "--filter", label,
                                       check=False).stdout.split()
            if names:
                self.engine.docker(kind, "rm", *names, check=False)
        left = self.engine.docker("ps", "-aq", "--filter", label, check=False).stdout.split()
        if left:
            raise EngineError("containers of %s survive remove(): %s" % (self.name, left))


def reclaim(path):
    """Give path (and all below it) back to the current user, via a throwaway container,
    so that a non-root test can delete files its containers wrote as root."""
    eng = engine()
    eng.docker("run", "--rm", "--network", "none", "-v", "%s:/x" % os.path.abspath(path), IMAGE,
               "chown", "-R", "%d:%d" % (os.getuid(), os.getgid()), "/x",
               check=False, timeout=COMPOSE_TIMEOUT)


def stack(testcase, services, flavour="v2", prefix="iotstack-", basename=None):
    """A ComposeProject in a fresh temp dir with a compose file for services, removed
    (project and dir) when testcase ends.  Skips when no engine/flavour.

    basename: the stack dir is <tempdir>/<basename> (e.g. "IOTstack") instead of the
    unique temp dir itself; the project name then is not unique: avoid parallel runs.
    """
    eng = engine()
    eng.compose_command(flavour)
    tmp = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(_rmtree, tmp)
    stack_dir = os.path.join(tmp, basename) if basename else tmp
    write_compose(stack_dir, services)
    project = ComposeProject(stack_dir, flavour=flavour)
    testcase.addCleanup(project.remove)
    return project


def _rmtree(path):
    if os.path.exists(path) and os.geteuid() != 0:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            reclaim(path)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Events

Event = collections.namedtuple("Event", "time_nano action service")


class EventWatcher:
    """Records the container events of one compose project while a test acts on it.

        w = EventWatcher(project).start()   # before the action
        ...                                 # the action
        events = w.stop()                   # [(time_nano, action, service)], in order

    A background `docker events --since <start time>` collects them live (see
    wait_for); stop() also asks the daemon for the whole [start, stop] window, so no
    event is lost to the stream's start-up or shutdown.  Also a context manager.
    """

    def __init__(self, project):
        self.name = project.name if isinstance(project, ComposeProject) else str(project)
        self.engine = engine()
        self.raw = []                # the parsed JSON objects, as received
        self._seen = set()
        self._lock = threading.Condition()
        self._proc = self._thread = None
        self._since = self._until = None

    def _argv(self, since, until=None):
        argv = ["docker", "events", "--format", "{{json .}}",
                "--filter", "label=%s=%s" % (PROJECT_LABEL, self.name),
                "--filter", "type=container", "--since", "%.9f" % since]
        if until is not None:
            argv += ["--until", "%.9f" % until]
        return argv

    def start(self):
        """Start watching (events from now on); returns self."""
        if self._proc is not None:
            raise RuntimeError("EventWatcher already started")
        self._since = time.time()
        self._proc = subprocess.Popen(self._argv(self._since), env=self.engine.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, universal_newlines=True)
        self._thread = threading.Thread(target=self._read, args=(self._proc.stdout,),
                                        name="EventWatcher-%s" % self.name, daemon=True)
        self._thread.start()
        return self

    def _read(self, stream):
        for line in stream:
            self._add(line)

    def _add(self, line):
        try:
            ev = json.loads(line)
        except ValueError:
            return
        key = (ev.get("timeNano"), ev.get("id"), ev.get("Action"))
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                self.raw.append(ev)
                self._lock.notify_all()

    def stop(self):
        """Stop watching; returns events(). Safe to call twice."""
        if self._proc is None:
            return self.events()
        if self._until is None:
            self._until = time.time()
            try:   # the daemon's own record of the window (it keeps the last 256 events)
                out = run(self._argv(self._since, self._until), env=self.engine.env,
                          timeout=QUERY_TIMEOUT).stdout
                for line in out.splitlines():
                    self._add(line)
            except EngineError:
                pass
            if self._proc.poll() is None:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._thread.join(timeout=10)
            self._proc.stdout.close()
        return self.events()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def events(self, service=None):
        """[(time_nano, action, service)] so far, in time order (only service's if given)."""
        with self._lock:
            evs = self._events_locked()
        return [e for e in evs if service is None or e.service == service]

    def actions(self, service, only=None):
        """The service's actions in order, e.g. ["kill", "die", "stop", "start"]; only: keep these."""
        return [e.action for e in self.events(service) if only is None or e.action in only]

    def wait_for(self, action, service=None, timeout=15):
        """Wait until an event `action` (of service) has arrived; returns it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for e in self._events_locked():
                    if e.action == action and (service is None or e.service == service):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %r event for %s within %ss; got %s"
                                         % (action, service or self.name, timeout,
                                            self._events_locked()))
                self._lock.wait(left)

    def _events_locked(self):
        evs = [Event(int(e.get("timeNano") or 0), e.get("Action") or e.get("status") or "",
                     (e.get("Actor") or {}).get("Attributes", {}).get(SERVICE_LABEL, ""))
               for e in self.raw]
        evs.sort(key=lambda e: e.time_nano)
        return evs

    def outages(self, service, down=("die",), up=("start",)):
        """[(down_ns, up_ns or None)]: each time the service went down and came back."""
        spans, went = [], None
        for e in self.events(service):
            if e.action in down and went is None:
                went = e.time_nano
            elif e.action in up and went is not None:
                spans.append((went, e.time_nano))
                went = None
        if went is not None:
            spans.append((went, None))
        return spans

    def downtime(self, service, down=("die",), up=("start",)):
        """Seconds the service was down (die -> start, summed); None if it never came back."""
        spans = self.outages(service, down, up)
        if any(b is None for _, b in spans):
            return None
        return sum(b - a for a, b in spans) / 1e9

    def downtimes(self, down=("die",), up=("start",)):
        """{service: downtime(service)} for every service that has events."""
        return {s: self.downtime(s, down, up) for s in sorted({e.service for e in self.events()})}
