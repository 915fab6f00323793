"""The databases part of the benchmark (`bench.py --databases`, issue 24).

The five real databases of tests/databases.py (InfluxDB 1.x, MariaDB,
PostgreSQL, an SQLite application, Mosquitto with persistence; Debian's
packages) run as one compose project on the Docker engine DOCKER_HOST
names, each preloaded with --rows rows (Mosquitto: a tenth as retained
messages).  Writers insert --rate numbered rows a second into each while
`backup.py 1` runs, in each mode (`--stop each`, then `--stop all`), for
--rounds rounds.  For each database the report gives its outage (die to
start, from the engine's events), the rows its writer could not write while
it was down (and that as rows a second of the outage), and, per run, the
archive's size beside `tar -czf` of the same items, taken right after it.
Every row acknowledged before a database's die event is in the archive
only if the restore tests say so: this measures, tests/test_databases.py
proves.  Needs root, the packages and an engine; otherwise it says why and
measures nothing.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import unittest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPO)

from iotstack_backup import iotstack  # noqa: E402
from tests import databases as D  # noqa: E402
from tests import engine as E  # noqa: E402

BACKUP = os.path.join(REPO, "backup.py")
MODES = ("each", "all")
WRITE_FIRST = 3  # seconds of writing before each backup


def why_not() -> str | None:
    """Why the databases cannot be measured here, or None."""
    if os.geteuid() != 0:
        return "the databases' data belongs to their own uids: run as root"
    missing = [tool for tools in D.TOOLS.values() for tool in tools if not os.path.exists(tool)]
    if missing:
        return "missing %s: apt-get install %s" % (", ".join(missing), D.APT_PACKAGES)
    try:
        E.engine()
    except unittest.SkipTest as e:
        return "no Docker engine: %s" % e
    return None


def folder_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def preload_mosquitto(stack: str, count: int) -> None:
    """`count` retained messages (QoS 0, pipelined; one QoS 1 at the end to
    know the broker has them all)."""
    client = D.Mqtt(D.sockets(stack)["mosquitto"], "preload", clean=True, timeout=60)
    try:
        batch = []
        for i in range(1, count + 1):
            topic = b"old/%d" % i
            batch.append(b"\x31" + _length(len(topic) + 2 + len(D.PAD)) + len(topic).to_bytes(2, "big")
                         + topic + D.PAD.encode())
            if len(batch) == 1000:
                client.sock.sendall(b"".join(batch))
                batch = []
        client.sock.sendall(b"".join(batch))
        client.publish("old/done", b"done", 1)
    finally:
        client.close()


def _length(n: int) -> bytes:
    out = b""
    while True:
        n, digit = divmod(n, 128)
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def set_up(stack: str, rows: int, rate: float, out) -> E.ComposeProject:
    D.ensure_open_image()
    started = time.monotonic()
    D.build_stack(stack, rate)
    D.preload_sqlite(stack, rows)
    project = E.ComposeProject(stack, name="iotstackdbbench%d" % os.getpid())
    project.up()
    D.wait_ready(stack)
    D.create_schema(stack, preload=rows)
    preload_mosquitto(stack, rows // 10)
    out("databases: %d rows each loaded in %.0f s; %s" % (rows, time.monotonic() - started, ", ".join(
        "%s %.0f MB" % (s, folder_bytes(os.path.join(stack, "volumes", s)) / 1e6)
        for s in D.SERVICES)))
    return project


def lost_while_down(writer_lost: list, sqlite_acks: list, span: tuple, service: str,
                    rate: float) -> int:
    """Rows not written while a database was down (die to start, seconds
    since the epoch): the writer's failed inserts in that span and just
    after it (the reconnection); for the SQLite application, which is down
    itself, the rows it would have written in the gap of its acknowledgements."""
    down, up = span
    if service != "sqlite":
        return sum(1 for t in writer_lost if down - 1 <= t <= up + 5)
    before = [a.time for a in sqlite_acks if a.time < down]
    after = [a.time for a in sqlite_acks if a.time > down]
    if not before or not after:
        return 0
    return max(0, int(round((min(after) - max(before)) * rate)) - 1)


def one_backup(stack: str, project, mode: str, rate: float, first: int, env: dict) -> dict:
    """Run `backup.py 1 --stop MODE` under load; the outages, lost rows,
    archive and reference sizes and the run's wall time."""
    shutil.rmtree(os.path.join(stack, "backups"), ignore_errors=True)
    sqlite_before = len(D.sqlite_acks(stack))
    writers = D.start_writers(stack, rate, first)
    try:
        time.sleep(WRITE_FIRST)
        watcher = E.EventWatcher(project).start()
        try:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, BACKUP, "1", "root", "--dir", stack,
                                   "--stop", mode], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=3600)
            wall = time.perf_counter() - started
            time.sleep(6)
        finally:
            watcher.stop()
    finally:
        for writer in writers:
            writer.stop()
    if done.returncode != 0:
        raise RuntimeError("backup.py --stop %s exited %d: %s" % (mode, done.returncode, done.stderr))
    archive = [os.path.join(root, name) for root, _d, names in
               os.walk(os.path.join(stack, "backups", "backup")) for name in names]
    size = os.path.getsize(archive[0])
    reference = reference_size(stack, env)
    sqlite_acks = D.sqlite_acks(stack)[sqlite_before:]
    lost_times = {w.service: w.lost for w in writers}
    result = {"wall": wall, "size": size, "reference": reference, "services": {}}
    for service in D.SERVICES:
        spans = [(a / 1e9, b / 1e9) for a, b in watcher.outages(service) if b is not None]
        if not spans:
            raise RuntimeError("%s was not stopped and started once" % service)
        span = spans[0]
        lost = lost_while_down(lost_times.get(service, []), sqlite_acks, span, service, rate)
        result["services"][service] = (span[1] - span[0], lost)
    return result


def reference_size(stack: str, env: dict) -> int:
    """The size of `tar -czf` of the same items, taken now."""
    items, _missing = iotstack.manifest_items(lambda rel: os.path.lexists(os.path.join(stack, rel)))
    target = stack + ".reference.tar.gz"
    done = subprocess.run(["tar", "-czf", target, "-C", stack] + [i.rstrip("/") for i in items],
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=3600)
    if done.returncode not in (0, 1):  # 1: a file changed as tar read it
        raise RuntimeError("tar -czf exited %d: %s" % (done.returncode, done.stderr))
    size = os.path.getsize(target)
    os.unlink(target)
    return size


def measure(workdir: str, rows: int, rate: float, rounds: int, out=print) -> list:
    """Markdown lines for the README, or a line saying why nothing was measured."""
    reason = why_not()
    if reason:
        out("databases: not measured: %s" % reason)
        return ["Databases: not measured (%s)." % reason]
    stack = os.path.join(workdir, "IOTstack-databases")
    os.chmod(workdir, 0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("IOTSTACK", "SUDO_USER")}
    env.update(DOCKER_HOST=E.engine().docker_host)
    env.pop("IOTSTACK_NO_DOCKER", None)
    project = set_up(stack, rows, rate, out)
    env["COMPOSE_PROJECT_NAME"] = project.name
    results = {mode: [] for mode in MODES}
    try:
        first = 1
        for number in range(1, rounds + 1):
            for mode in MODES:
                found = one_backup(stack, project, mode, rate, first, env)
                first += 1_000_000
                results[mode].append(found)
                out("databases round %d/%d --stop %s: run %.1f s, archive %.1f MB (tar -czf %.1f MB); %s"
                    % (number, rounds, mode, found["wall"], found["size"] / 1e6,
                       found["reference"] / 1e6, ", ".join(
                           "%s down %.2f s lost %d" % (s, d, l)
                           for s, (d, l) in found["services"].items())))
        # After the runs: Mosquitto writes its file only as it stops.
        sizes = {s: folder_bytes(os.path.join(stack, "volumes", s)) for s in D.SERVICES}
    finally:
        project.remove()
    return report(results, sizes, rows, rate, rounds)


def report(results: dict, sizes: dict, rows: int, rate: float, rounds: int) -> list:
    med = statistics.median
    lines = ["Real databases (Debian's packages) on a real engine, %d rows preloaded in each "
             "(Mosquitto: %d retained messages), writers inserting %g rows a second into each "
             "during `backup.py 1`; outages from the engine's events (die to start); medians "
             "of %d round(s)." % (rows, rows // 10, rate, rounds), "",
             "| database | data | `--stop each` outage | rows lost | lost/s | `--stop all` outage "
             "| rows lost | lost/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for service in D.SERVICES:
        cells = []
        for mode in MODES:
            down = med([r["services"][service][0] for r in results[mode]])
            lost = med([r["services"][service][1] for r in results[mode]])
            cells += ["%.2f s" % down, "%d" % lost, "%.0f" % (lost / down if down else 0)]
        lines.append("| %s | %.0f MB | %s |" % (service, sizes[service] / 1e6, " | ".join(cells)))
    lines += ["", "| `backup.py 1` | whole run | archive | `tar -czf` of the same items | ratio |",
              "| --- | --- | --- | --- | --- |"]
    for mode in MODES:
        found = results[mode]
        lines.append("| `--stop %s` | %.1f s | %.1f MB | %.1f MB | %.3f |" % (
            mode, med([r["wall"] for r in found]), med([r["size"] for r in found]) / 1e6,
            med([r["reference"] for r in found]) / 1e6,
            med([r["size"] / r["reference"] for r in found])))
    return lines
