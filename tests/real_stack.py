"""IOTstack trees whose services are real compose projects on the real engine.

``iotstack_project(testcase, ...)`` builds a small IOTstack tree (stacktree.build_stack)
in a folder whose name is unique, so its compose project name is too (the engine is
shared with other test runs), replaces its docker-compose.yml by busybox services
(tests/engine.py), brings them up and stops the ones that should not run.  The
process's DOCKER_HOST points at the engine for the test's duration, so backup.main()
and restore.main() in this process, and scripts run with ``script_env()``, use it.

``without_docker(testcase)`` is a machine where Docker is not installed: for the
tests of archives and swaps, where no service runs and stack control stays out of
the way (it is tested on the real engine, never against a stand-in).
"""
import concurrent.futures
import os
import tempfile
from unittest import mock

from iotstack_backup import docker_compose
from tests import engine as E
from tests.stacktree import build_stack

# influxdb and grafana are stopped on purpose; nodered and mosquitto run.
SERVICES = {"nodered": {}, "mosquitto": {}, "influxdb": {}, "grafana": {}}
RUNNING = ("mosquitto", "nodered")


def use_engine(testcase):
    """DOCKER_HOST of the engine in os.environ while testcase runs; the Engine."""
    eng = E.engine()
    if os.environ.get("DOCKER_HOST") == eng.docker_host and \
            "COMPOSE_PROJECT_NAME" not in os.environ:
        return eng
    patcher = mock.patch.dict(os.environ, {"DOCKER_HOST": eng.docker_host})
    patcher.start()
    testcase.addCleanup(patcher.stop)
    os.environ.pop("COMPOSE_PROJECT_NAME", None)
    return eng


def unique_dir(testcase, prefix="i11-"):
    tmp = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(E._rmtree, tmp)
    return tmp


def iotstack_project(testcase, flavour="v2", services=None, running=RUNNING, scale=0.05,
                     tree=True, stopped_too=True, cleanup=True, up=True):
    """A ComposeProject in a fresh IOTstack tree (tree=False: a bare folder with
    services/), `running` up and the other services created and stopped
    (stopped_too=False: never created; up=False: no container at all).
    cleanup=False: the caller removes it."""
    use_engine(testcase)
    E.require_flavour(flavour)
    tmp = unique_dir(testcase)
    stack = os.path.join(tmp, "IOTstack-" + os.path.basename(tmp)[len("i11-"):].lower())
    if tree:
        build_stack(stack, scale=scale)
    else:
        os.makedirs(os.path.join(stack, "services"))
    E.write_compose(stack, with_own_volumes(SERVICES if services is None else services))
    project = E.ComposeProject(stack, flavour=flavour)
    if cleanup:
        testcase.addCleanup(project.remove)
    if not up:
        return project
    project.up(*([] if stopped_too else running))
    others = sorted(set(project.states()) - set(running))
    if others:
        project.stop(*others, timeout=0)
    return project


def with_own_volumes(services):
    """IOTstack's shape: a service that names no bind mount keeps its data
    in volumes/<service> (so a backup stops it while reading that folder)."""
    specs = services if isinstance(services, dict) else {
        (s if isinstance(s, str) else s["name"]): ({} if isinstance(s, str) else s)
        for s in services}
    return {name: dict(spec, volumes=spec.get("volumes") or ["./volumes/%s:/data" % name])
            for name, spec in specs.items()}


def without_docker(testcase):
    """This process finds no docker command: a machine without Docker."""
    patcher = mock.patch.object(docker_compose, "installed", return_value=False)
    patcher.start()
    testcase.addCleanup(patcher.stop)


def script_env(**extra):
    """The environment for backup.py/restore.py as scripts: the engine's
    DOCKER_HOST (already in os.environ), no .pyc writes, no SUDO_USER."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("SUDO_USER", None)
    return env


def remove_all(projects, workers=3):
    """Remove many projects side by side (each takes about a second)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda project: project.remove(), projects))
