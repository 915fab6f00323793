#!/usr/bin/env python3
"""A fake ``docker`` / ``docker-compose`` CLI for tests (no Docker engine needed).

Used two ways:

* as a module: ``install_fake_docker(bin_dir, state_dir, ...)`` writes ``bin_dir/docker``
  (and ``bin_dir/docker-compose``), small ``/bin/sh`` wrappers that run this file with the
  current interpreter, and returns an env fragment to put into ``os.environ`` (e.g. with
  ``unittest.mock.patch.dict``) or into a subprocess env.  ``read_calls``/``read_state``/
  ``set_mode``/``set_state`` inspect and steer the fake.  ``path_without_docker`` builds
  a PATH on which no ``docker`` can be found at all.
* as a program (via the wrappers): emulates Docker Compose v2 (``docker compose ...``)
  and v1 (``docker-compose ...``) for ONE compose project whose state is kept in
  ``<state_dir>/state.json``.

Files in state_dir:
  state.json          {"mode", "services" (defined, in order), "created" (services with a
                      container), "running", "stop_delay", "down_count", "start_count",
                      "stop_count"} - lists are sorted except "services".
  calls.jsonl         one JSON array per call: [program, *argv], program being "docker"
                      or "docker-compose"; appended with O_APPEND in one write.
  calls_detail.jsonl  one JSON object per call: {"argv": [...], "cwd": ..., "pid": ...,
                      "time": float}
  state.lock          flock()ed while state.json is updated.

Modes: "ok", "no-daemon", "no-compose-plugin", "v2-only", "fail-start", "slow-stop"
(see install_fake_docker).  Stdlib only; Python 3.9+.
"""

import json
import os
import shlex
import shutil
import signal
import sys
import time

STATE_NAME = "state.json"
CALLS_NAME = "calls.jsonl"
DETAIL_NAME = "calls_detail.jsonl"
LOCK_NAME = "state.lock"

DEFAULT_SERVICES = ("nodered", "mosquitto", "influxdb", "grafana")
MODES = ("ok", "no-daemon", "no-compose-plugin", "v2-only", "fail-start", "slow-stop")

COMPOSE_V2_VERSION = "v2.24.0"
COMPOSE_V1_VERSION = "1.29.2"
ENGINE_VERSION = "24.0.7"

DAEMON_ERR = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
              "Is the docker daemon running?")
V1_DAEMON_ERR = ("Couldn't connect to Docker daemon at http+docker://localhost - "
                 "is it running?\n\nIf it's at a non-standard location, specify the URL "
                 "with the DOCKER_HOST environment variable.")
NO_PLUGIN_ERR = "docker: 'compose' is not a docker command.\nSee 'docker --help'"
START_ERR = ("Error response from daemon: driver failed programming external connectivity "
             "on endpoint {svc}: Bind for 0.0.0.0:1880 failed: port is already allocated")

# Tools linked by path_without_docker() when they exist on the current PATH.
ESSENTIAL_TOOLS = (
    "env", "bash", "sh", "dash", "tar", "gzip", "gunzip", "zcat", "pigz", "unpigz", "xz",
    "zstd", "bzip2", "strace", "sudo", "rsync", "ssh", "scp", "sftp", "rclone", "cat",
    "true", "false", "sleep", "ls", "id", "cp", "mv", "rm", "mkdir", "rmdir", "chmod",
    "chown", "ln", "touch", "date", "hostname", "df", "du", "find", "xargs", "sort",
    "head", "tail", "grep", "sed", "awk", "stat", "tee", "mktemp", "dirname", "basename",
    "readlink", "realpath", "uname", "whoami", "nproc", "sync", "test", "echo", "printf",
    "wc", "tr", "cut", "flock", "timeout", "kill", "ps", "nice", "ionice", "getent",
    "sha256sum", "md5sum", "diff", "cmp", "mount", "findmnt", "logger", "git",
)


# =====================================================================================
# helpers used by tests


def _state_path(state_dir):
    return os.path.join(os.fspath(state_dir), STATE_NAME)


def _write_state_file(path, state):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class _Locked:
    """flock() on state.lock; yields the state dict, writes it back on exit."""

    def __init__(self, state_dir):
        self.state_dir = os.fspath(state_dir)

    def __enter__(self):
        import fcntl
        self.fd = os.open(os.path.join(self.state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        with open(_state_path(self.state_dir)) as f:
            self.state = json.load(f)
        return self.state

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                st = self.state
                for key in ("created", "running"):
                    st[key] = sorted(set(st[key]))
                _write_state_file(_state_path(self.state_dir), st)
        finally:
            os.close(self.fd)  # releases the lock
        return False


def install_fake_docker(bin_dir, state_dir, running=("nodered", "mosquitto"), services=None,
                        mode="ok", with_v1=True, stop_delay=2.0):
    """Install the fake CLI and return the env fragment to use.

    bin_dir/state_dir are created if missing.  ``services``: the compose services
    (default nodered, mosquitto, influxdb, grafana); all have a container ("created");
    ``running`` the ones running.  ``mode`` one of MODES; ``"v2-only"`` (or
    ``with_v1=False``) does not write ``bin_dir/docker-compose``.  ``stop_delay``: seconds
    ``stop`` sleeps in "slow-stop" mode.  Resets the recorded calls.

    Returns {"PATH": "<bin_dir>:<current PATH>", "FAKE_DOCKER_STATE": <state.json path>,
    "FAKE_DOCKER_DIR": <state_dir>}.  The wrappers also have the state path built in,
    so they work even if the code under test drops FAKE_DOCKER_* from the environment.
    """
    if mode not in MODES:
        raise ValueError("unknown fake docker mode %r" % (mode,))
    bin_dir = os.path.abspath(os.fspath(bin_dir))
    state_dir = os.path.abspath(os.fspath(state_dir))
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(state_dir, exist_ok=True)
    services = list(DEFAULT_SERVICES if services is None else services)
    unknown = set(running) - set(services)
    if unknown:
        raise ValueError("running services not defined: %s" % sorted(unknown))
    state = {
        "mode": mode,
        "services": services,
        "created": sorted(services),
        "running": sorted(set(running)),
        "stop_delay": float(stop_delay),
        "down_count": 0,
        "start_count": 0,
        "stop_count": 0,
    }
    state_file = _state_path(state_dir)
    _write_state_file(state_file, state)
    clear_calls(state_dir)

    script = os.path.abspath(__file__)
    if script.endswith((".pyc", ".pyo")):  # pragma: no cover
        script = script[:-1]
    progs = ["docker"]
    if with_v1 and mode != "v2-only":
        progs.append("docker-compose")
    else:
        try:
            os.unlink(os.path.join(bin_dir, "docker-compose"))
        except FileNotFoundError:
            pass
    for prog in progs:
        path = os.path.join(bin_dir, prog)
        text = (
            "#!/bin/sh\n"
            "# fake %s for tests (tests/fake_docker.py)\n"
            ": \"${FAKE_DOCKER_STATE:=%s}\"\n"
            "export FAKE_DOCKER_STATE\n"
            "FAKE_DOCKER_PROG=%s\n"
            "export FAKE_DOCKER_PROG\n"
            "exec %s -S %s \"$@\"\n"
        ) % (prog, shlex.quote(state_file), prog, shlex.quote(sys.executable),
             shlex.quote(script))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return {
        "PATH": "%s:%s" % (bin_dir, os.environ.get("PATH", "")),
        "FAKE_DOCKER_STATE": state_file,
        "FAKE_DOCKER_DIR": state_dir,
    }


def read_calls(state_dir):
    """All recorded calls in order, e.g. [["docker", "compose", "stop", "nodered"], ...]."""
    path = os.path.join(os.fspath(state_dir), CALLS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def read_call_details(state_dir):
    """Like read_calls but dicts {"argv": [program, ...], "cwd", "pid", "time"}."""
    path = os.path.join(os.fspath(state_dir), DETAIL_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def clear_calls(state_dir):
    """Forget all recorded calls."""
    for name in (CALLS_NAME, DETAIL_NAME):
        with open(os.path.join(os.fspath(state_dir), name), "w"):
            pass


def read_state(state_dir):
    """The project state: {"mode": str, "services": [defined, in order],
    "created": set, "running": set, "stop_delay": float, "down_count": int,
    "start_count": int, "stop_count": int}."""
    with open(_state_path(state_dir)) as f:
        st = json.load(f)
    st["created"] = set(st["created"])
    st["running"] = set(st["running"])
    return st


def set_state(state_dir, **changes):
    """Change state fields, e.g. set_state(d, running=["nodered"], stop_delay=5)."""
    with _Locked(state_dir) as st:
        for key, value in changes.items():
            if key not in st:
                raise KeyError("unknown fake docker state field %r" % (key,))
            if key == "mode" and value not in MODES:
                raise ValueError("unknown fake docker mode %r" % (value,))
            if key in ("created", "running", "services"):
                value = list(value)
            st[key] = value


def set_mode(state_dir, mode):
    """Switch the fake to another mode (takes effect on the next call).

    Note: switching to "v2-only" makes an installed docker-compose wrapper behave like
    a missing program (message on stderr, exit 127); it is still on PATH though.
    """
    set_state(state_dir, mode=mode)


def path_without_docker(bin_dir):
    """Return a PATH value on which neither docker nor docker-compose can be found.

    Creates ``bin_dir`` with symlinks to the essential tools found on the current PATH
    (ESSENTIAL_TOOLS: sh, bash, tar, gzip, pigz, rsync, ssh, ..., whichever exist) and
    ``python3``/``python`` -> sys.executable, and returns "<bin_dir>:/nonexistent".
    Tests using it must pass it explicitly (env={"PATH": ...} or patch.dict(os.environ)).
    """
    bin_dir = os.path.abspath(os.fspath(bin_dir))
    os.makedirs(bin_dir, exist_ok=True)
    search = os.environ.get("PATH", os.defpath)
    for tool in ESSENTIAL_TOOLS:
        found = shutil.which(tool, path=search)
        if not found:
            continue
        found = os.path.abspath(found)
        if os.path.dirname(found) == bin_dir:
            continue
        link = os.path.join(bin_dir, tool)
        if not os.path.lexists(link):
            os.symlink(found, link)
    for name in ("python3", "python"):
        link = os.path.join(bin_dir, name)
        if not os.path.lexists(link):
            os.symlink(sys.executable, link)
    for name in ("docker", "docker-compose"):  # paranoia
        if os.path.lexists(os.path.join(bin_dir, name)):
            os.unlink(os.path.join(bin_dir, name))
    return bin_dir + ":/nonexistent"


# =====================================================================================
# the fake CLI


class _Exit(Exception):
    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


def _err(msg):
    sys.stderr.write(msg.rstrip("\n") + "\n")
    sys.stderr.flush()


def _out(msg):
    sys.stdout.write(msg)
    sys.stdout.flush()


def _fail(msg, code=1):
    _err(msg)
    raise _Exit(code)


def _append_line(path, obj):
    data = (json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write on an O_APPEND fd: lines never interleave
    finally:
        os.close(fd)


class _Fake:
    def __init__(self, prog, state_file):
        self.prog = prog
        self.state_file = state_file
        self.state_dir = os.path.dirname(state_file)
        with open(state_file) as f:
            self.state = json.load(f)
        self.mode = self.state.get("mode", "ok")

    # -- option parsing ------------------------------------------------------------
    @staticmethod
    def _strip_globals(args, value_opts):
        """Drop leading global options (recorded in calls anyway)."""
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                i += 1
                break
            if not a.startswith("-") or a == "-":
                break
            if "=" not in a and a in value_opts:
                i += 2
            else:
                i += 1
        return args[i:]

    @staticmethod
    def _split(args, value_opts):
        """-> (options dict name->list of values (None for flags), positionals)."""
        opts, pos = {}, []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                pos.extend(args[i + 1:])
                break
            if a.startswith("--") and "=" in a:
                name, value = a.split("=", 1)
                opts.setdefault(name, []).append(value)
            elif a.startswith("-") and a != "-":
                if a in value_opts and i + 1 < len(args):
                    opts.setdefault(a, []).append(args[i + 1])
                    i += 1
                elif len(a) > 2 and not a.startswith("--") and a[:2] in value_opts:
                    opts.setdefault(a[:2], []).append(a[2:])  # -t10
                else:
                    opts.setdefault(a, []).append(None)
            else:
                pos.append(a)
            i += 1
        return opts, pos

    def _need_daemon(self, v1=False):
        if self.mode == "no-daemon":
            _fail(V1_DAEMON_ERR if v1 else DAEMON_ERR)

    def _check_services(self, names, v1):
        for n in names:
            if n not in self.state["services"]:
                _fail(("No such service: %s" if v1 else "no such service: %s") % n)

    # -- entry points -------------------------------------------------------------
    def docker(self, args):
        args = self._strip_globals(args, {"-H", "--host", "-c", "--context", "-l",
                                          "--log-level", "--config", "--tlscacert",
                                          "--tlscert", "--tlskey"})
        if not args:
            _out("Usage:  docker [OPTIONS] COMMAND\n")
            return 0
        cmd, rest = args[0], args[1:]
        if cmd == "compose":
            if self.mode == "no-compose-plugin":
                _fail(NO_PLUGIN_ERR)
            return self.compose(rest, v1=False)
        if cmd == "version":
            opts, _ = self._split(rest, {"-f", "--format"})
            fmt = (opts.get("--format") or opts.get("-f") or [None])[-1]
            if fmt:
                if self.mode == "no-daemon" and "Server" in fmt:
                    _fail(DAEMON_ERR)
                _out(ENGINE_VERSION + "\n")
                return 0
            _out("Client: Docker Engine - Community\n Version:           %s\n"
                 " API version:       1.43\n OS/Arch:           linux/arm64\n\n"
                 % ENGINE_VERSION)
            self._need_daemon()
            _out("Server: Docker Engine - Community\n Engine:\n  Version:          %s\n"
                 % ENGINE_VERSION)
            return 0
        if cmd == "info":
            self._need_daemon()
            opts, _ = self._split(rest, {"-f", "--format"})
            if opts.get("--format") or opts.get("-f"):
                _out(ENGINE_VERSION + "\n")
            else:
                _out("Client:\n Context:    default\n\nServer:\n Containers: %d\n"
                     "  Running: %d\n Server Version: %s\n"
                     % (len(self.state["created"]), len(self.state["running"]),
                        ENGINE_VERSION))
            return 0
        if cmd in ("ps", "container") and (cmd == "ps" or rest[:1] in (["ls"], ["ps"])):
            if cmd == "container":
                rest = rest[1:]
            self._need_daemon()
            return self._docker_ps(rest)
        if cmd in ("stop", "start", "restart"):
            self._need_daemon()
            _, names = self._split(rest, {"-t", "--time", "--timeout", "-s", "--signal"})
            for n in names:
                if n not in self.state["created"]:
                    _fail("Error response from daemon: No such container: %s" % n)
            if cmd != "stop" and self.mode == "fail-start":
                _fail(START_ERR.format(svc=names[0] if names else "?"))
            if cmd == "stop":
                self._slow_stop()
            with _Locked(self.state_dir) as st:
                if cmd == "stop":
                    st["running"] = [s for s in st["running"] if s not in names]
                    st["stop_count"] += 1
                else:
                    st["running"] = st["running"] + names
                    st["start_count"] += 1
            for n in names:
                _out(n + "\n")
            return 0
        if cmd == "exec":
            self._need_daemon()
            _, pos = self._split(rest, {"-e", "--env", "-u", "--user", "-w", "--workdir",
                                        "--env-file", "--detach-keys"})
            if not pos:
                _fail("\"docker exec\" requires at least 2 arguments.")
            if pos[0] not in self.state["created"]:
                _fail("Error response from daemon: No such container: %s" % pos[0])
            if pos[0] not in self.state["running"]:
                _fail("Error response from daemon: Container %s is not running" % pos[0])
            return 0
        _fail("docker: '%s' is not a docker command.\nSee 'docker --help'" % cmd)

    def _docker_ps(self, rest):
        opts, _ = self._split(rest, {"-f", "--filter", "--format", "-n", "--last"})
        names = self.state["created"] if ("-a" in opts or "--all" in opts) \
            else self.state["running"]
        for flt in (opts.get("--filter", []) + opts.get("-f", [])):
            if flt and flt.startswith("name="):
                names = [n for n in names if flt[5:] in n]
            elif flt and flt.startswith("status="):
                want = flt[7:]
                names = [n for n in names if self._status(n) == want]
        fmt = (opts.get("--format") or [None])[-1]
        for n in sorted(names):
            if "-q" in opts or "--quiet" in opts:
                _out(self._cid(n) + "\n")
            elif fmt:
                _out(self._render(fmt, n) + "\n")
            else:
                _out("%s   %s   %s\n" % (self._cid(n), n, self._status(n)))
        return 0

    def _status(self, svc):
        if svc in self.state["running"]:
            return "running"
        return "exited" if svc in self.state["created"] else "none"

    @staticmethod
    def _cid(svc):
        import hashlib
        return hashlib.sha256(svc.encode()).hexdigest()[:12]

    def _render(self, fmt, svc):
        if fmt == "json":
            return json.dumps({"Name": svc, "Service": svc, "State": self._status(svc),
                               "ID": self._cid(svc), "Project": "iotstack"})
        running = svc in self.state["running"]
        repl = {"Names": svc, "Name": svc, "Service": svc, "State": self._status(svc),
                "Status": "Up 2 hours" if running else "Exited (0) 1 minute ago",
                "ID": self._cid(svc), "Image": svc, "Project": "iotstack"}
        out = fmt.replace("\\t", "\t").replace("\\n", "\n")
        for key, value in repl.items():
            for variant in ("{{.%s}}" % key, "{{ .%s }}" % key):
                out = out.replace(variant, value)
        return out

    def _slow_stop(self):
        if self.mode == "slow-stop":
            time.sleep(float(self.state.get("stop_delay", 2.0)))

    def compose(self, args, v1):
        args = self._strip_globals(args, {"-f", "--file", "-p", "--project-name",
                                          "--project-directory", "--env-file", "--ansi",
                                          "--progress", "--profile", "--parallel",
                                          "-H", "--host", "--context"})
        if not args:
            _out("Usage:  docker compose [OPTIONS] COMMAND\n" if not v1 else
                 "Define and run multi-container applications with Docker.\n")
            return 0
        sub, rest = args[0], args[1:]
        if sub == "version":
            opts, _ = self._split(rest, {"-f", "--format"})
            short = "--short" in opts
            fmt = (opts.get("--format") or opts.get("-f") or [None])[-1]
            if v1:
                _out(COMPOSE_V1_VERSION + "\n" if short else
                     "docker-compose version %s, build 5becea4c\n" % COMPOSE_V1_VERSION)
            elif short:
                _out(COMPOSE_V2_VERSION.lstrip("v") + "\n")
            elif fmt == "json":
                _out(json.dumps({"version": COMPOSE_V2_VERSION}) + "\n")
            else:
                _out("Docker Compose version %s\n" % COMPOSE_V2_VERSION)
            return 0
        if sub == "config":
            opts, _ = self._split(rest, {"-o", "--output", "--format"})
            if "--services" in opts:
                for s in self.state["services"]:
                    _out(s + "\n")
            else:
                _out("name: iotstack\nservices:\n")
                for s in self.state["services"]:
                    _out("  %s:\n    container_name: %s\n" % (s, s))
            return 0
        handler = {
            "ps": self._c_ps, "stop": self._c_stop, "start": self._c_start,
            "restart": self._c_restart, "up": self._c_up, "down": self._c_down,
            "exec": self._c_exec,
        }.get(sub)
        if handler is None:
            if v1:
                _fail("No such command: %s" % sub)
            _fail('unknown docker command: "compose %s"' % sub)
        self._need_daemon(v1)
        return handler(rest, v1)

    def _c_ps(self, rest, v1):
        opts, pos = self._split(rest, {"--filter", "--status", "--format", "-f"})
        self._check_services(pos, v1)
        statuses = [f[7:] for f in opts.get("--filter", []) if f and f.startswith("status=")]
        statuses += [s for s in opts.get("--status", []) if s]
        if statuses:
            names = [n for n in self.state["created"]
                     if any(self._status(n) == s or (s in ("exited", "stopped") and
                                                      self._status(n) == "exited")
                            for s in statuses)]
        elif v1 or "-a" in opts or "--all" in opts:
            names = list(self.state["created"])
        else:  # compose v2 lists running containers only unless -a
            names = list(self.state["running"])
        if pos:
            names = [n for n in names if n in pos]
        names = sorted(names)
        fmt = (opts.get("--format") or [None])[-1]
        if "--services" in opts:
            for n in names:
                _out(n + "\n")
        elif "-q" in opts or "--quiet" in opts:
            for n in names:
                _out(self._cid(n) + "\n")
        elif fmt:
            for n in names:
                _out(self._render(fmt, n) + "\n")
        else:
            _out("NAME        IMAGE       SERVICE     STATUS\n")
            for n in names:
                _out("%-11s %-11s %-11s %s\n" % (n, n, n, self._render("{{.Status}}", n)))
        return 0

    def _targets(self, pos, v1):
        self._check_services(pos, v1)
        return list(pos) if pos else list(self.state["services"])

    def _c_stop(self, rest, v1):
        _, pos = self._split(rest, {"-t", "--timeout"})
        names = self._targets(pos, v1)
        self._slow_stop()
        with _Locked(self.state_dir) as st:
            running = set(st["running"])
            st["running"] = [s for s in running if s not in names]
            st["stop_count"] += 1
        for n in names:
            if n in running:
                _err(" Container %s  Stopping" % n)
                _err(" Container %s  Stopped" % n)
        return 0

    def _start(self, names, create, verb="Started"):
        if self.mode == "fail-start":
            for n in names:
                _err(" Container %s  Starting" % n)
            _fail(START_ERR.format(svc=names[0] if names else "?"))
        with _Locked(self.state_dir) as st:
            if not create:
                missing = [n for n in names if n not in st["created"]]
                if missing:
                    _fail('service "%s" has no container to start' % missing[0])
            was = set(st["running"])
            st["created"] = st["created"] + names
            st["running"] = st["running"] + names
            st["start_count"] += 1
        for n in names:
            if n not in was:
                _err(" Container %s  Starting" % n)
                _err(" Container %s  %s" % (n, verb))
        return 0

    def _c_start(self, rest, v1):
        _, pos = self._split(rest, {"--wait-timeout"})
        return self._start(self._targets(pos, v1), create=False)

    def _c_restart(self, rest, v1):
        _, pos = self._split(rest, {"-t", "--timeout"})
        names = self._targets(pos, v1)
        self._slow_stop()
        with _Locked(self.state_dir) as st:
            st["running"] = [s for s in st["running"] if s not in names]
            st["stop_count"] += 1
        return self._start(names, create=False, verb="Restarted")

    def _c_up(self, rest, v1):
        _, pos = self._split(rest, {"-t", "--timeout", "--scale", "--wait-timeout",
                                    "--pull", "--exit-code-from", "--attach",
                                    "--no-attach", "--pull"})
        return self._start(self._targets(pos, v1), create=True)

    def _c_down(self, rest, v1):
        self._split(rest, {"-t", "--timeout", "--rmi"})
        with _Locked(self.state_dir) as st:
            gone = list(st["created"])
            st["created"] = []
            st["running"] = []
            st["down_count"] += 1
        for n in gone:
            _err(" Container %s  Stopping" % n)
            _err(" Container %s  Removed" % n)
        _err(" Network iotstack_default  Removed")
        return 0

    def _c_exec(self, rest, v1):
        _, pos = self._split(rest, {"-e", "--env", "-u", "--user", "-w", "--workdir",
                                    "--index"})
        if not pos:
            _fail("exec requires at least 2 arguments")
        self._check_services(pos[:1], v1)
        if pos[0] not in self.state["running"]:
            _fail('service "%s" is not running' % pos[0])
        return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.environ.get("FAKE_DOCKER_PROG") or os.path.basename(sys.argv[0])
    if prog not in ("docker", "docker-compose"):
        prog = "docker"
    state_file = os.environ.get("FAKE_DOCKER_STATE")
    if not state_file:
        _err("fake docker: FAKE_DOCKER_STATE is not set")
        return 2
    state_dir = os.path.dirname(state_file)

    def on_signal(signum, frame):
        raise _Exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _append_line(os.path.join(state_dir, CALLS_NAME), [prog] + argv)
        _append_line(os.path.join(state_dir, DETAIL_NAME),
                     {"argv": [prog] + argv, "cwd": os.getcwd(), "pid": os.getpid(),
                      "time": time.time()})
        fake = _Fake(prog, state_file)
        if prog == "docker-compose":
            if fake.mode == "v2-only":
                _fail("sh: 1: docker-compose: not found", 127)
            return fake.compose(argv, v1=True)
        return fake.docker(argv)
    except _Exit as e:
        return e.code


if __name__ == "__main__":
    sys.exit(main())
