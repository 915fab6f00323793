"""The downtime part of the benchmark: how long services are down during a
backup (measure) and during a restore (measure_restore).

On a tree from stack_builder.py, a compose project on a real Docker engine
(the one DOCKER_HOST names, e.g. `bash .ci/engine start`): one container per
volumes/<service> folder, plus a writer that appends a line to
volumes/writer/counter.log every 20 ms (tests/engine.py's compose file:
busybox image iotbase:1, no network).  Each round runs `backup.py 1 --stop
each`, `backup.py 1 --stop all` and `tar -czf` of the same items, in turn
(once the tree is older than a minute: see wait_until_settled);
each service's outages come from the engine's events (die to start), and
the report gives, per mode, the longest outage of any service and the time
every service was down at once, each as a median of the paired ratios to
that round's `tar -czf`.  measure_restore does the same for `restore.py
ARCHIVE noask` of a backup of the tree, with the services running, paired
with `tar -xzf` of that archive into an empty folder.  Without an engine
it says so and measures nothing.
"""
import glob
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

from iotstack_backup import archive_writer, iotstack  # noqa: E402
from tests import engine as E  # noqa: E402

BACKUP = os.path.join(REPO, "backup.py")
RESTORE = os.path.join(REPO, "restore.py")
GOALS = {"each": (0.30, 0.02), "all": (0.45, None)}
RESTORE_GOAL = 0.10  # every service's outage during a restore, to tar -xzf's time
RACY_S = archive_writer.RACY_NS // 10**9


class NoEngine(Exception):
    pass


def find_engine():
    try:
        return E.engine()
    except unittest.SkipTest as e:
        raise NoEngine(str(e)) from None


def stack_services(stack):
    """One idle service per volumes/<service> folder, and the writer (whose
    folder an earlier run on the same --tree leaves behind)."""
    names = sorted(name for name in os.listdir(os.path.join(stack, "volumes"))
                   if os.path.isdir(os.path.join(stack, "volumes", name)) and name != "writer")
    return ([{"name": name, "volumes": ["./volumes/%s:/data" % name]} for name in names]
            + [{"name": "writer", "writer": True}])


def outage_spans(watcher, services):
    """{service: [(down_s, up_s)]}, seconds since the epoch."""
    spans = {s: watcher.outages(s) for s in services}
    never = [s for s, found in spans.items() if any(up is None for _down, up in found)]
    if never:
        raise RuntimeError("%s did not come back after the backup" % ", ".join(never))
    return {s: [(a / 1e9, b / 1e9) for a, b in found] for s, found in spans.items()}


def longest(spans):
    return max([b - a for found in spans.values() for a, b in found], default=0.0)


def all_down_at_once(spans):
    """Seconds during which every service was down at the same moment."""
    if not spans or any(not found for found in spans.values()):
        return 0.0
    edges = sorted([(a, 1) for found in spans.values() for a, _b in found]
                   + [(b, -1) for found in spans.values() for _a, b in found])
    total, down, since = 0.0, 0, None
    for moment, step in edges:
        if down == len(spans):
            total += moment - since
        down += step
        since = moment
    return total


def newest_change(root, skip):
    """The latest ctime of anything under root but the folders skip, in seconds."""
    newest = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in dirs + files:
            newest = max(newest, os.lstat(os.path.join(folder, name)).st_ctime)
    return newest


def wait_until_settled(stack, out):
    """Wait until the services' data in a freshly built tree (all of
    volumes/ but the writer's) is older than archive_writer.RACY_NS:
    a Pi's data mostly is (the writer's file stays young), and younger data
    is always read again with its service stopped.  In a full bench run the
    timing rounds have aged it already."""
    volumes = os.path.join(stack, "volumes")
    settled = newest_change(volumes, {os.path.join(volumes, "writer")}) + RACY_S + 1
    if time.time() < settled:
        out("downtime: waiting %.0f s until the new tree is older than %d s (on a Pi most "
            "data is; younger data is always read again stopped)" % (settled - time.time(),
                                                                       RACY_S))
        time.sleep(settled - time.time())


def timed(argv, env, cwd):
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=3600)
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0 and not changed_as_read(argv, result.returncode, stderr):
        raise RuntimeError("%s exited %d: %s" % (" ".join(argv[:4]), result.returncode, stderr))
    return time.perf_counter() - started


def changed_as_read(argv, returncode, stderr):
    """GNU tar's exit 1 for the writer's file, which changes as tar reads it
    (tar's own warning, not a failure of the reference)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return (argv[0] == "tar" and returncode == 1 and bool(lines)
            and all(line.endswith("file changed as we read it") for line in lines))


def measure(stack, rounds, out=print):
    """Markdown lines for the README, or a line saying why nothing was measured."""
    try:
        eng = find_engine()
    except NoEngine as e:
        out("downtime: skipped, no Docker engine: %s" % e)
        return ["Downtime: not measured (no Docker engine: %s)." % e]
    services = stack_services(stack)
    E.write_compose(stack, services)
    # A project name of this run's own: others may run the benchmark on
    # the same engine, from a folder also called "stack".
    name = "iotstackbench%d" % os.getpid()
    project = E.ComposeProject(stack, name=name, flavour=eng.flavours()[0])
    env = {k: v for k, v in os.environ.items() if k not in ("IOTSTACK", "SUDO_USER")}
    env.update(DOCKER_HOST=eng.docker_host, COMPOSE_PROJECT_NAME=name)
    items, _missing = iotstack.manifest_items(lambda rel: os.path.lexists(os.path.join(stack, rel)))
    tar_out = stack + ".reference.tar.gz"
    tar = ["tar", "-czf", tar_out, "-C", stack] + [i.rstrip("/") for i in items]
    user = ["root"] if os.geteuid() == 0 else []
    names = [s["name"] for s in services]
    rows = {mode: [] for mode in GOALS}
    try:
        project.up()
        project.wait_for({name: "running" for name in names}, timeout=60)

        def backup(mode):
            shutil.rmtree(os.path.join(stack, "backups"), ignore_errors=True)
            watcher = E.EventWatcher(project).start()
            try:
                wall = timed([sys.executable, BACKUP, "1", "--stop", mode, "--dir", stack] + user,
                             env, stack)
            finally:
                watcher.stop()
            project.wait_for({name: "running" for name in names}, timeout=60)
            return wall, outage_spans(watcher, names)

        wait_until_settled(stack, out)
        out("downtime: warm-up (untimed)")
        for mode in GOALS:
            backup(mode)
        timed(tar, env, stack)
        for number in range(1, rounds + 1):
            results = {mode: backup(mode) for mode in GOALS}
            os.sync()
            reference = timed(tar, env, stack)
            os.unlink(tar_out)
            for mode, (wall, spans) in results.items():
                rows[mode].append((reference, wall, longest(spans), all_down_at_once(spans)))
            out("downtime round %d/%d: tar -czf %.2fs; %s" % (number, rounds, reference, "; ".join(
                "%s: run %.2fs, longest %.2fs, all down %.2fs" % (mode, r[-1][1], r[-1][2], r[-1][3])
                for mode, r in rows.items())))
    finally:
        project.remove()
        shutil.rmtree(os.path.join(stack, "backups"), ignore_errors=True)
        if os.path.exists(tar_out):
            os.unlink(tar_out)
    return report(rows, rounds, len(names))


def report(rows, rounds, count):
    def med(values):
        return statistics.median(values)

    def verdict(value, goal):
        return "-" if goal is None else ("≤ %.2f: %s" % (goal, "PASS" if value <= goal else "MISS"))

    lines = ["Downtime on a real engine: %d services (one per volumes/ folder and a writer "
             "appending every 20 ms), outages from the engine's events (die to start); "
             "%d paired rounds, medians of the ratios to that round's `tar -czf`." % (count, rounds),
             "", "| `backup.py 1` | longest outage | ratio | goal | all down at once | ratio "
             "| goal | whole run | `tar -czf` |", "| --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- |"]
    for mode, found in rows.items():
        longest_goal, together_goal = GOALS[mode]
        ratio = med([r[2] / r[0] for r in found])
        together = med([r[3] / r[0] for r in found])
        lines.append("| `--stop %s` | %.2f s | **%.3f** | %s | %.2f s | **%.3f** | %s | %.2f s "
                     "| %.2f s |" % (mode, med([r[2] for r in found]), ratio,
                                     verdict(ratio, longest_goal), med([r[3] for r in found]),
                                     together, verdict(together, together_goal),
                                     med([r[1] for r in found]), med([r[0] for r in found])))
    return lines


def running_project(stack, eng, out):
    """(project, env, service names): the tree's services up on the engine."""
    services = stack_services(stack)
    E.write_compose(stack, services)
    name = "iotstackbench%d" % os.getpid()
    project = E.ComposeProject(stack, name=name, flavour=eng.flavours()[0])
    env = {k: v for k, v in os.environ.items() if k not in ("IOTSTACK", "SUDO_USER")}
    env.update(DOCKER_HOST=eng.docker_host, COMPOSE_PROJECT_NAME=name)
    names = [s["name"] for s in services]
    project.up()
    project.wait_for({n: "running" for n in names}, timeout=60)
    return project, env, names


def measure_restore(stack, rounds, workdir, out=print):
    """Markdown lines: each service's outages during `restore.py ARCHIVE
    noask` (services running) against `tar -xzf` of the same archive."""
    try:
        eng = find_engine()
    except NoEngine as e:
        out("restore downtime: skipped, no Docker engine: %s" % e)
        return ["Restore downtime: not measured (no Docker engine: %s)." % e]
    project, env, names = running_project(stack, eng, out)
    user = ["root"] if os.geteuid() == 0 else []
    archive = os.path.join(workdir, "restore-downtime.tar.gz")
    rows = []
    try:
        # Exit 3 is fine: the writer's file may change as it is read.
        made = subprocess.run([sys.executable, BACKUP, "1", "--no-stop", "--dir", stack] + user,
                              env=env, cwd=stack, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
        if made.returncode not in (0, 3):
            raise RuntimeError("backup.py exited %d: %s" % (made.returncode, made.stderr))
        made = glob.glob(os.path.join(stack, "backups", "backup", "*.tar.gz"))
        os.replace(made[0], archive)

        def restore():
            watcher = E.EventWatcher(project).start()
            try:
                wall = timed([sys.executable, RESTORE, archive, "noask", "--dir", stack],
                             env, stack)
            finally:
                watcher.stop()
            project.wait_for({n: "running" for n in names}, timeout=60)
            return wall, outage_spans(watcher, names)

        def tar_xzf(number):
            target = os.path.join(workdir, "restore-downtime-tar-%d" % number)
            os.makedirs(target)
            os.sync()
            return timed(["tar", "-xzf", archive, "-C", target], env, stack)

        out("restore downtime: warm-up (untimed)")
        restore()
        tar_xzf(0)
        for number in range(1, rounds + 1):
            os.sync()
            wall, spans = restore()
            reference = tar_xzf(number)
            rows.append((reference, wall, longest(spans), all_down_at_once(spans)))
            out("restore downtime round %d/%d: tar -xzf %.2fs; restore %.2fs, longest outage "
                "%.2fs, all down %.2fs" % ((number, rounds) + rows[-1]))
    finally:
        project.remove()
        for path in glob.glob(os.path.join(workdir, "restore-downtime-tar-*")):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(archive):
            os.unlink(archive)
    return restore_report(rows, rounds, len(names))


def restore_report(rows, rounds, count):
    med = statistics.median
    ratio = med([r[2] / r[0] for r in rows])
    return ["Restore downtime on a real engine: %d services running (one per volumes/ folder "
            "and a writer), `restore.py ARCHIVE noask` of a backup of the same tree, outages "
            "from the engine's events (die to start); %d paired rounds with `tar -xzf` of the "
            "archive into an empty folder, medians." % (count, rounds), "",
            "| `restore.py ARCHIVE noask` | longest outage | ratio to `tar -xzf` | goal "
            "| all down at once | whole run | `tar -xzf` |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            "| services running | %.2f s | **%.3f** | ≤ %.2f: %s | %.2f s | %.2f s | %.2f s |"
            % (med([r[2] for r in rows]), ratio, RESTORE_GOAL,
               "PASS" if ratio <= RESTORE_GOAL else "MISS", med([r[3] for r in rows]),
               med([r[1] for r in rows]), med([r[0] for r in rows]))]
