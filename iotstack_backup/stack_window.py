"""The adapter between the backup's stop windows and stack control.

service_groups.StopWindows needs a small interface, for one run: `running`
(the services in state running when the run began), `stop(services)` and
`start(services)` (a subset, callable several times for different groups;
StackUnavailable on failure), `close()` (start everything this run stopped
and has not started again, whatever happened), and `command` (the compose
argv prefix, for service_groups' `ps -q`).  This module gives it over
today's docker_compose.Compose; docker_compose is being rewritten (real
engine, per-service starts, stops that finish through a signal) with a class
of its own offering the same, and open_control is the one place to rewire
to it.  How it keeps the stack up: before each stop the marker of
docker_compose (.tmp/iotstack-stopped-services.json) names every service
stopped and not yet started, so the next run of either command starts them
after a kill -9; it goes when the last of them was started.
"""
import contextlib
import os
import signal

from . import docker_compose
from .iotstack import write_json_atomically


class ComposeControl:
    def __init__(self, compose, stack):
        self._compose = compose
        self._marker = os.path.join(stack, docker_compose.STOPPED_MARKER)
        self.command = compose.command
        self.running = compose.running_services()
        self.down = []

    def _mark(self):
        if self.down:
            write_json_atomically(self._marker, {"services": self.down})
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker)

    def stop(self, services):
        # Counted as down before the call: a stop that fails half way, or
        # is interrupted, may have stopped some of them.
        self.down = sorted(set(self.down) | set(services))
        self._mark()
        with signals_wait():
            self._compose.stop(list(services))

    def start(self, services):
        self._compose.start(list(services))
        self.down = [s for s in self.down if s not in services]
        self._mark()

    def close(self):
        if self.down:
            self.start(self.down)


# Signals that end a run; see signals_wait.
ENDING_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


@contextlib.contextmanager
def signals_wait():
    """Hold back SIGTERM, SIGHUP and SIGINT until the block is over.  A
    `stop` cut short leaves the engine stopping the container after its
    client is gone, and the `start` of the clean-up then races it: the
    service could end up down.  So the stop completes, then the held
    signal unwinds the run, which starts everything again.  (Blocked in
    this thread only: one arriving on another thread waits for the main
    thread, which is in the stop, just the same.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def open_control(stack, log):
    """A ComposeControl for the stack, or None (logged) when docker cannot be used."""
    compose = docker_compose.open_compose(stack, log)
    if compose is None:
        return None
    try:
        return ComposeControl(compose, stack)
    except docker_compose.StackUnavailable as e:
        log.line("Docker: %s; carrying on without stopping services" % e)
        return None
