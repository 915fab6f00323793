"""Stopping and starting the stack's services with Docker Compose.

Compose finds `docker compose` (v2) or `docker-compose` (v1) and runs it in
the IOTstack directory.  How it keeps the stack up: services_stopped stops
exactly the services that were running, with `stop` (never `down`, which
recreates containers), and starts exactly those again however the block
inside ends: an error, Ctrl-C or SIGTERM.  Before it stops anything it
writes a marker in .tmp/ naming them, removed only after they were started,
so that the next run of either command starts what a killed run (kill -9, a
power cut) left stopped.
"""
import contextlib
import json
import os
import shutil
import subprocess

from .iotstack import write_json_atomically

STOPPED_MARKER = ".tmp/iotstack-stopped-services.json"


class StackUnavailable(Exception):
    """docker or its daemon cannot be used; the caller goes on without it."""


def _last_line(text):
    """The last line that says something: where docker puts the cause."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def compose_command(run=subprocess.run):
    """["docker", "compose"] (v2), ["docker-compose"] (v1), or StackUnavailable."""
    if shutil.which("docker"):
        try:
            probe = run(["docker", "compose", "version"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            probe = None
        if probe is not None and probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise StackUnavailable("neither 'docker compose' nor 'docker-compose' was found")


class Compose:
    """The compose project in the stack directory."""

    def __init__(self, stack, command):
        self.stack = stack
        self.command = command

    def _run(self, *args, timeout=600):
        try:
            result = subprocess.run(self.command + list(args), cwd=self.stack,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StackUnavailable("%s %s: %s" % (" ".join(self.command), args[0], e)) from None
        if result.returncode != 0:
            cause = _last_line(result.stderr.decode("utf-8", "replace"))
            raise StackUnavailable("%s %s failed: %s" % (" ".join(self.command), args[0], cause))
        return result.stdout.decode("utf-8", "replace")

    def running_services(self):
        out = self._run("ps", "--services", "--filter", "status=running", timeout=120)
        return sorted({line.strip() for line in out.splitlines() if line.strip()})

    def stop(self, services):
        if services:
            self._run("stop", *services)

    def start(self, services):
        if services:
            self._run("start", *services)


def open_compose(stack, log):
    """A Compose for the stack, or None (logged) when docker cannot be used."""
    try:
        return Compose(stack, compose_command())
    except StackUnavailable as e:
        log.line("Docker: %s; carrying on without stopping services" % e)
        return None


def restart_left_stopped(stack, log, out=None):
    """Start the services that a killed run stopped and could not restart.

    The marker is written before `stop` and removed after `start`, so only a
    run that died in between (kill -9, power cut) leaves it behind.
    """
    marker = os.path.join(stack, STOPPED_MARKER)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker + ".new")  # killed before its rename: never in force
    try:
        with open(marker, encoding="utf-8") as f:
            services = json.load(f)["services"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):
        services = []
    if services:
        compose = open_compose(stack, log)
        try:
            if compose is None:
                raise StackUnavailable("docker cannot be used")
            compose.start(services)
            message = "Started %s again: an interrupted run had stopped them" % ", ".join(services)
        except StackUnavailable as e:
            message = ("Warning: an interrupted run left %s stopped and they could not be "
                       "started: %s" % (", ".join(services), e))
        log.line(message)
        if out is not None:
            out.write(message + "\n")
    os.unlink(marker)


@contextlib.contextmanager
def services_stopped(compose, log, report, stack=None):
    """Stop the running services; start exactly those again on the way out,
    whatever happens inside (errors, Ctrl-C, SIGTERM).  report is a dict that
    receives 'stopped', 'started' and 'restart_error'.  With stack given, a
    marker in .tmp/ lets the next run restart them after a kill -9."""
    report.setdefault("stopped", [])
    report.setdefault("started", [])
    if compose is None:
        yield
        return
    try:
        running = compose.running_services()
    except StackUnavailable as e:
        log.line("Docker: %s; carrying on without stopping services" % e)
        yield
        return
    log.line("Services running: %s" % (", ".join(running) or "none"))
    stopped = []
    marker = os.path.join(stack, STOPPED_MARKER) if stack else None
    try:
        if running:
            if marker:
                write_json_atomically(marker, {"services": running})
            try:
                compose.stop(running)
                stopped = running
            except StackUnavailable as e:
                # Some may have stopped: start them all again afterwards.
                stopped = running
                report.setdefault("warnings", []).append("could not stop services: %s" % e)
                log.line("Warning: could not stop services: %s" % e)
            report["stopped"] = stopped
            log.line("Services stopped: %s" % ", ".join(stopped))
        yield
    finally:
        if stopped:
            try:
                compose.start(stopped)
                report["started"] = stopped
                log.line("Services started again: %s" % ", ".join(stopped))
                if marker:
                    os.unlink(marker)
            except StackUnavailable as e:
                report["restart_error"] = str(e)
                log.line("ERROR: services could not be started again (%s): %s"
                         % (", ".join(stopped), e))
