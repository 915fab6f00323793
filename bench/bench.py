#!/usr/bin/env python3
"""Benchmark backup.py and restore.py against GNU tar, gzip and pigz.

    python3 bench/bench.py [--scale S] [--entries N] [--tree DIR] [--rounds N]
                           [--workdir DIR] [--keep] [--memory-scales 0.25,2] [--profile]
                           [--downtime | --restore-downtime | --no-downtime]
    python3 bench/bench.py --databases [--rows N] [--rate R] [--rounds N]

On a tree built by bench/stack_builder.py, every command runs once untimed
(so the page cache is alike for all), then once per round, ours and the
references alternating; the report, a Markdown table printed and written to
bench/out/results.md, gives medians, ratios of medians and the targets of the
performance issue. Wall time is taken around each child process; its CPU time
and peak RSS come from os.wait4. For fairness os.sync() runs before every
command, outside the timing, each restore and tar -xzf gets a fresh target,
and restored trees are deleted only after the last round: ext4 avoids
reusing inodes freed in the last few minutes, and creating files soon after
deleting many can be 2-10 times slower, so start a run at least 5 minutes
after deleting a large tree (an earlier run's work directory), or give
--workdir on a freshly made filesystem. A fake
`docker` on PATH (prints nothing, exits 0) leaves stack handling idle.
--memory-scales reports peak RSS at other tree sizes; --profile runs backup
and restore under cProfile (main thread only) and prints the top functions;
--rounds 0 skips the timing. After the timing, when a Docker engine answers
(DOCKER_HOST), bench/downtime.py measures how long services are down with
--stop each and --stop all against tar -czf, and during a restore against
tar -xzf (--downtime, --restore-downtime: that alone; --no-downtime: not
at all). --entries N adds small files until the tree holds N entries;
--tree DIR uses a tree built before (on a fresh file system, once).
--databases runs only bench/databases.py: five
real databases (tests/databases.py) backed up under load in both modes,
each one's outage and lost rows, the archive beside tar -czf (report in
bench/out/databases.md). Stdlib only, Python 3.9+.
"""
import argparse
import datetime
import glob
import os
import platform
import resource
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
OUT_DIR = os.path.join(BENCH_DIR, "out")
sys.path.insert(0, REPO)

from iotstack_backup import iotstack  # noqa: E402

BACKUP = os.path.join(REPO, "backup.py")
RESTORE = os.path.join(REPO, "restore.py")
BUILDER = os.path.join(BENCH_DIR, "stack_builder.py")
RSS_LIMIT_MB = 40
RSS_GROWTH_LIMIT_MB = 4  # "not growing with the number of files": 10% of the budget
FAKE_DOCKER = "#!/bin/sh\n# benchmark stand-in: no daemon, no services running\nexit 0\n"


class BenchError(Exception):
    pass


class Run:
    """One finished child process: wall and CPU seconds, peak RSS in MB."""

    def __init__(self, wall, cpu, rss_mb):
        self.wall, self.cpu, self.rss_mb = wall, cpu, rss_mb


class Bench:
    """The work directory and the commands run in it."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.logs = os.path.join(workdir, "logs")
        bin_dir = os.path.join(workdir, "bin")
        os.makedirs(self.logs)
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "docker"), "w") as f:
            f.write(FAKE_DOCKER)
        os.chmod(os.path.join(bin_dir, "docker"), 0o755)
        # Python caches compiled modules in __pycache__ on a user's machine;
        # a PYTHONDONTWRITEBYTECODE of the caller's would make every run of
        # ours compile them again.
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("IOTSTACK", "SUDO_USER", "PYTHONDONTWRITEBYTECODE")}
        self.env["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        self.count = 0

    def run(self, name, argv, stdout_to_null=False):
        """Run argv to completion in the work directory; BenchError if it fails."""
        self.count += 1
        base = os.path.join(self.logs, "%04d-%s" % (self.count, name))
        with open(base + ".out", "wb") as out, open(base + ".err", "wb") as err:
            stdout = subprocess.DEVNULL if stdout_to_null else out
            started = time.perf_counter()
            try:
                proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=stdout, stderr=err)
            except OSError as e:
                raise BenchError("%s: cannot run %s: %s" % (name, argv[0], e)) from None
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                stop_child(proc)
                raise
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            with open(base + ".err", "rb") as f:
                stderr = f.read().decode("utf-8", "replace")
            raise BenchError("%s failed with exit code %d: %s\n--- stderr ---\n%s"
                             % (name, proc.returncode, " ".join(argv), stderr.rstrip()))
        return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e6)

    @staticmethod
    def rss_floor_mb():
        """Our own peak RSS.  Linux folds the spawning process's memory into a
        child's ru_maxrss at exec, so no child can report less than this: the
        bench stays small (trees are built in a subprocess) to keep it low."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def stop_child(proc):
    if proc.returncode is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def fresh_iotstack(path):
    """A freshly cloned IOTstack as restore.py recognises it: menu.sh only."""
    remove(path)
    os.makedirs(path)
    with open(os.path.join(path, "menu.sh"), "w") as f:
        f.write("#!/bin/bash\n")


def tree_totals(root):
    """(entries, bytes of regular files, a hard-linked file counted once)."""
    entries = size = 0
    for folder, dirs, files in os.walk(root):
        entries += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode):
                size += st.st_size / st.st_nlink
    return entries, int(size)


def build_tree(bench, path, scale, seed, entries=0):
    started = time.perf_counter()
    bench.run("build-%g" % scale, [sys.executable, BUILDER, path, "--scale", str(scale),
                                   "--seed", str(seed)]
              + (["--entries", str(entries)] if entries else []))
    entries, size = tree_totals(path)
    print("built %s: scale %g, %d entries, %.1f MB in %.1f s"
          % (path, scale, entries, size / 1e6, time.perf_counter() - started), flush=True)
    return entries, size


class Commands:
    """The benchmarked commands on one tree, and the clean-up after each."""

    def __init__(self, bench, stack):
        self.bench, self.stack = bench, stack
        work = bench.workdir
        self.archive = stack + ".tar.gz"  # our latest archive: what verify and restore read
        self.tar_out = os.path.join(work, "reference.tar.gz")
        self.restored = []  # targets of restore and tar -xzf, deleted by remove_restored()
        items, _missing = iotstack.manifest_items(
            lambda rel: os.path.lexists(os.path.join(stack, rel)))
        self.items = [item.rstrip("/") for item in items]
        self.user = ["root"] if os.geteuid() == 0 else []
        self.sizes = {}

    def backup(self, name, extra, profile=None):
        remove(os.path.join(self.stack, "backups"))
        python = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
        run = self.bench.run(name, python + [BACKUP, "1"] + extra
                             + ["--dir", self.stack] + self.user)
        made = glob.glob(os.path.join(self.stack, "backups", "backup", "*.tar.gz"))
        if len(made) != 1:
            raise BenchError("%s: expected one archive in backups/backup, found %r" % (name, made))
        self.sizes["ours"] = os.path.getsize(made[0])
        os.replace(made[0], self.archive)
        remove(os.path.join(self.stack, "backups"))
        return run

    def tar_create(self, name, compressor):
        run = self.bench.run(name, ["tar"] + compressor + [self.tar_out, "-C", self.stack]
                             + self.items)
        self.sizes[name] = os.path.getsize(self.tar_out)
        remove(self.tar_out)
        return run

    def new_target(self, name):
        path = os.path.join(self.bench.workdir, "target-%d-%s" % (len(self.restored) + 1, name))
        self.restored.append(path)
        return path

    def remove_restored(self):
        for path in self.restored:
            remove(path)
        self.restored = []

    def restore(self, name, profile=None):
        target = self.new_target(name)
        fresh_iotstack(target)
        python = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
        run = self.bench.run(name, python + [RESTORE, self.archive, "noask", "--dir", target])
        if not os.path.isdir(os.path.join(target, "volumes", "nodered")):
            raise BenchError("%s exited 0 but volumes/nodered was not restored" % name)
        return run

    def tar_extract(self, name, then_sync=False):
        target = self.new_target(name)
        os.makedirs(target)
        argv = ["tar", "-xzf", self.archive, "-C", target]
        if then_sync:
            # restore.py syncs before it swaps; this is tar paying the same.
            argv = ["sh", "-c", 'tar -xzf "$1" -C "$2" && sync', "sh", self.archive, target]
        return self.bench.run(name, argv)

    def sequence(self, with_pigz):
        """(label, action) in timing order: ours and the references alternate."""
        steps = [
            ("backup --no-verify", lambda: self.backup("backup-no-verify", ["--no-verify"])),
            ("tar -czf", lambda: self.tar_create("tar-czf", ["-czf"])),
            ("backup (default)", lambda: self.backup("backup-default", [])),
        ]
        if with_pigz:
            steps.append(("tar -I pigz -cf",
                          lambda: self.tar_create("tar-pigz", ["-I", "pigz", "-cf"])))
        steps += [
            ("restore.py --verify", lambda: self.bench.run(
                "verify", [sys.executable, RESTORE, "--verify", self.archive])),
            ("gzip -t", lambda: self.bench.run("gzip-t", ["gzip", "-t", self.archive])),
            ("tar -tzf", lambda: self.bench.run("tar-tzf", ["tar", "-tzf", self.archive],
                                                stdout_to_null=True)),
            ("restore", lambda: self.restore("restore")),
            ("tar -xzf", lambda: self.tar_extract("tar-xzf")),
            ("tar -xzf && sync", lambda: self.tar_extract("tar-xzf-sync", then_sync=True)),
        ]
        return steps


def time_commands(commands, rounds, with_pigz, tree_bytes):
    """{label: [Run per round]} after one untimed warm-up of each."""
    need = (rounds + 1) * 3 * tree_bytes + 4 * tree_bytes // 10 + (200 << 20)
    free = iotstack.free_bytes(commands.bench.workdir)
    if need > free:
        raise BenchError("the restored trees are kept until the last round: about %.1f GB "
                         "needed, %.1f GB free in %s; use fewer --rounds, a smaller --scale "
                         "or a --workdir on a bigger disk"
                         % (need / 1e9, free / 1e9, commands.bench.workdir))
    steps = commands.sequence(with_pigz)
    print("warm-up: one untimed run of each command", flush=True)
    for _label, action in steps:
        os.sync()
        action()
    runs = {label: [] for label, _action in steps}
    for number in range(1, rounds + 1):
        for label, action in steps:
            os.sync()
            runs[label].append(action())
        print("round %d/%d: %s" % (number, rounds, ", ".join(
            "%s %.2fs" % (label, runs[label][-1].wall) for label, _action in steps)), flush=True)
    commands.remove_restored()
    return runs


def median_wall(runs):
    return statistics.median(run.wall for run in runs)


def verdict(ok):
    return "PASS" if ok else "MISS"


def rss_text(mb, floor):
    """A figure at the measurement floor is only an upper bound."""
    return "≤ %.1f" % mb if mb <= floor + 0.5 else "%.1f" % mb


def tool_version(argv):
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = result.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else "?"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_line(with_pigz, load_at_start):
    pigz = ", %s" % tool_version(["pigz", "--version"]) if with_pigz else ", no pigz"
    return ("Machine: %d cores (%s, %s), Linux %s, Python %s, %s%s; run as %s on %s; "
            "load average %.1f at the start, %.1f at the end."
            % (os.cpu_count() or 1, cpu_model(), platform.machine(), platform.release(),
               platform.python_version(), tool_version(["tar", "--version"]), pigz,
               "root" if os.geteuid() == 0 else "a normal user",
               datetime.date.today().isoformat(), load_at_start, os.getloadavg()[0]))


def timing_tables(runs, commands, with_pigz, floor):
    """Markdown lines: targets with PASS/MISS, then every command's figures."""
    def ratio(ours, reference):
        return median_wall(runs[ours]) / median_wall(runs[reference])

    def time_row(what, ours, reference, goal):
        value = ratio(ours, reference)
        return ("| %s | %.2f s / %.2f s = **%.2f** | %s | %s |"
                % (what, median_wall(runs[ours]), median_wall(runs[reference]), value,
                   "≤ %.2f" % goal if goal else "-",
                   verdict(value <= goal) if goal else "info"))

    lines = ["| measure | ours / reference | target | result |", "| --- | --- | --- | --- |",
             time_row("`backup.py 1 --no-verify` vs `tar -czf`", "backup --no-verify",
                      "tar -czf", 0.45)]
    if with_pigz:
        lines.append(time_row("`backup.py 1 --no-verify` vs `tar -I pigz -cf`",
                              "backup --no-verify", "tar -I pigz -cf", 0.90))
    else:
        lines.append("| `backup.py 1 --no-verify` vs `tar -I pigz -cf` | pigz not installed "
                     "| ≤ 0.90 | not measured |")
    lines.append(time_row("`backup.py 1` (verify included) vs `tar -czf`",
                          "backup (default)", "tar -czf", 0.60))
    size_ratio = commands.sizes["ours"] / commands.sizes["tar-czf"]
    lines.append("| compressed size vs gzip -6 (`tar -czf`) | %.1f MB / %.1f MB = **%.3f** "
                 "| ≤ 1.02 | %s |" % (commands.sizes["ours"] / 1e6,
                                      commands.sizes["tar-czf"] / 1e6, size_ratio,
                                      verdict(size_ratio <= 1.02)))
    lines.append(time_row("`restore.py ARCHIVE noask` (checks, staging, swap) vs `tar -xzf`",
                          "restore", "tar -xzf", 1.00))
    lines.append(time_row("`restore.py ARCHIVE noask` vs `tar -xzf && sync` (same durability)",
                          "restore", "tar -xzf && sync", None))
    for label in ("backup --no-verify", "backup (default)", "restore"):
        peak = max(run.rss_mb for run in runs[label])
        lines.append("| peak RSS of %s | %s MB | ≤ %d MB | %s |"
                     % (label, rss_text(peak, floor), RSS_LIMIT_MB,
                        verdict(peak <= RSS_LIMIT_MB)))
    lines.append(time_row("`restore.py --verify` vs `gzip -t`", "restore.py --verify",
                          "gzip -t", None))
    lines.append(time_row("`restore.py --verify` vs `tar -tzf`", "restore.py --verify",
                          "tar -tzf", None))
    lines += ["", "| command | median s | min s | max s | CPU s (median) | peak RSS MB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, label_runs in runs.items():
        walls = [run.wall for run in label_runs]
        lines.append("| %s | %.2f | %.2f | %.2f | %.2f | %s |" % (
            label, statistics.median(walls), min(walls), max(walls),
            statistics.median(run.cpu for run in label_runs),
            rss_text(max(run.rss_mb for run in label_runs), floor)))
    if with_pigz:
        lines += ["", "Archive sizes: ours %d B, tar -czf %d B, tar -I pigz -cf %d B." % (
            commands.sizes["ours"], commands.sizes["tar-czf"], commands.sizes["tar-pigz"])]
    lines += ["", "Peak RSS is the child's ru_maxrss from os.wait4, its waited-for children "
              "included (tar's gzip). Linux counts the spawning process's memory in it, so "
              "nothing can read below the bench's own %.1f MB: '≤' marks figures at that "
              "floor." % floor]
    return lines


def measure_memory(bench, scales, seed, main_scale_rows):
    """Markdown lines: peak RSS of backup (verify included) and restore per scale."""
    rows = list(main_scale_rows)
    for scale in scales:
        stack = os.path.join(bench.workdir, "memory-stack-%g" % scale)
        tree = build_tree(bench, stack, scale, seed)
        commands = Commands(bench, stack)
        backup = commands.backup("memory-backup-%g" % scale, [])
        restore = commands.restore("memory-restore-%g" % scale)
        rows.append((scale, tree[0], backup.rss_mb, restore.rss_mb))
        commands.remove_restored()
        remove(stack)
        remove(commands.archive)
    rows.sort()
    lines = ["| scale | entries | backup peak RSS MB | restore peak RSS MB |",
             "| --- | --- | --- | --- |"]
    floor = bench.rss_floor_mb()
    lines += ["| %g | %d | %s | %s |" % (scale, entries, rss_text(backup, floor),
                                         rss_text(restore, floor))
              for scale, entries, backup, restore in rows]
    if len(rows) > 1:
        for column, label in ((2, "backup"), (3, "restore")):
            growth = rows[-1][column] - rows[0][column]
            peak = max(row[column] for row in rows)
            ok = peak <= RSS_LIMIT_MB and growth <= RSS_GROWTH_LIMIT_MB
            lines.append("")
            lines.append("%s: peak %.1f MB, %+.1f MB from scale %g to %g (%.0f× the entries); "
                         "target ≤ %d MB and growth ≤ %d MB: **%s**"
                         % (label, peak, growth, rows[0][0], rows[-1][0],
                            rows[-1][1] / rows[0][1], RSS_LIMIT_MB, RSS_GROWTH_LIMIT_MB,
                            verdict(ok)))
    return lines


def profile(commands):
    """Run backup (verify included) and restore under cProfile; print the top 25."""
    import pstats  # here: loading profiles must not raise the RSS floor of measured runs
    os.makedirs(OUT_DIR, exist_ok=True)
    backup_prof = os.path.join(OUT_DIR, "backup.prof")
    restore_prof = os.path.join(OUT_DIR, "restore.prof")
    runs = [("backup", backup_prof, commands.backup("profile-backup", [], profile=backup_prof)),
            ("restore", restore_prof, commands.restore("profile-restore", profile=restore_prof))]
    commands.remove_restored()
    for name, path, run in runs:
        print("\n## %s under cProfile: %.2f s wall (profiling slows it down); %s"
              % (name, run.wall, os.path.relpath(path, REPO)))
        for order in ("cumulative", "tottime"):
            print("\n### top 25 by %s" % order, flush=True)
            pstats.Stats(path, stream=sys.stdout).strip_dirs().sort_stats(order).print_stats(25)
        sys.stdout.flush()


def parse_scales(text):
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("give scales like 0.25,2") from None


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="tree size (1: about 300 MB in 26,000 entries)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds after the warm-up (0: no timing)")
    parser.add_argument("--workdir", help="make the fresh work directory here (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--memory-scales", type=parse_scales, default=[], metavar="S,S",
                        help="also report peak RSS of backup and restore on trees at "
                             "these scales, e.g. 0.25,2")
    parser.add_argument("--profile", action="store_true",
                        help="run backup and restore once under cProfile, print the top 25")
    parser.add_argument("--entries", type=int, default=0, metavar="N",
                        help="add small files (a Nextcloud's data) until the tree holds N "
                             "entries, e.g. 1000000")
    parser.add_argument("--tree", metavar="DIR",
                        help="use this tree (built by stack_builder.py) instead of building "
                             "one; it is restored onto itself by the restore downtime")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--downtime", action="store_true",
                       help="only measure the services' downtime on a real Docker engine")
    which.add_argument("--restore-downtime", action="store_true",
                       help="only measure the services' outages during a restore, paired "
                            "with tar -xzf, on a real Docker engine")
    which.add_argument("--no-downtime", action="store_true",
                       help="do not measure downtime (it needs a Docker engine)")
    which.add_argument("--databases", action="store_true",
                       help="only back up five real databases under load (root, Debian's "
                            "packages and a Docker engine): outages, lost rows, sizes")
    parser.add_argument("--rows", type=int, default=100_000,
                        help="--databases: rows preloaded in each database")
    parser.add_argument("--rate", type=float, default=200,
                        help="--databases: rows a second each writer inserts")
    return parser


def databases_benchmark(args, bench):
    """--databases: bench/databases.py's report, printed and written."""
    from databases import measure  # beside this file; imports tests/databases.py
    load_at_start = os.getloadavg()[0]
    lines = measure(bench.workdir, args.rows, args.rate, max(1, args.rounds),
                    out=lambda text: print(text, flush=True))
    lines[:0] = ["## Benchmark: real databases backed up under load", "",
                 machine_line(shutil.which("pigz") is not None, load_at_start), ""]
    report = "\n".join(lines) + "\n"
    print("\n" + report, flush=True)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "databases.md"), "w", encoding="utf-8") as f:
        f.write(report)


def benchmark(args, bench):
    load_at_start = os.getloadavg()[0]
    with_pigz = shutil.which("pigz") is not None
    lines, main_rows = [], []
    if args.downtime or args.restore_downtime:
        args.memory_scales, args.profile, timing_rounds = [], False, 0
    else:
        timing_rounds = args.rounds
    downtime_rounds = args.rounds if not (args.no_downtime or args.restore_downtime) else 0
    restore_downtime_rounds = args.rounds if not (args.no_downtime or args.downtime) else 0
    if timing_rounds > 0 or args.profile or downtime_rounds > 0 or restore_downtime_rounds > 0:
        if args.tree:
            stack = os.path.abspath(args.tree)
            tree = tree_totals(stack)
            source = "the tree %s" % stack
        else:
            stack = os.path.join(bench.workdir, "stack")
            tree = build_tree(bench, stack, args.scale, args.seed, args.entries)
            source = "bench/stack_builder.py at scale %g (seed %d%s)" % (
                args.scale, args.seed, ", --entries %d" % args.entries if args.entries else "")
        commands = Commands(bench, stack)
        lines += ["Tree: %s, %d entries, %.1f MB." % (source, tree[0], tree[1] / 1e6)]
    if timing_rounds > 0:
        lines[-1] += (" %d rounds, medians (min-max in the second table). Docker: a fake "
                      "`docker` on PATH (no service running)." % args.rounds)
        runs = time_commands(commands, args.rounds, with_pigz, tree[1])
        lines += [""] + timing_tables(runs, commands, with_pigz, bench.rss_floor_mb())
        main_rows = [(args.scale, tree[0], max(run.rss_mb for run in runs["backup (default)"]),
                      max(run.rss_mb for run in runs["restore"]))]
    if args.memory_scales:
        lines += ["", "Peak RSS by tree size (backup with verify, restore; run once each):", ""]
        lines += measure_memory(bench, args.memory_scales, args.seed, main_rows)
    if args.profile:
        profile(commands)
    if downtime_rounds > 0:
        from downtime import measure  # beside this file; imports tests/engine.py
        lines += [""] + measure(stack, downtime_rounds, out=lambda text: print(text, flush=True))
    if restore_downtime_rounds > 0:
        from downtime import measure_restore
        lines += [""] + measure_restore(stack, restore_downtime_rounds, bench.workdir,
                                        out=lambda text: print(text, flush=True))
    lines[:0] = ["## Benchmark: backup.py and restore.py against GNU tar", "",
                 machine_line(with_pigz, load_at_start)]
    report = "\n".join(lines) + "\n"
    print("\n" + report, flush=True)
    if not (args.rounds > 0 or args.memory_scales):
        return  # nothing measured: keep the last results.md
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "results.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print("written to %s" % os.path.relpath(os.path.join(OUT_DIR, "results.md"), REPO))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.rounds < 0 or args.scale <= 0 or any(s <= 0 for s in args.memory_scales) \
            or args.entries < 0:
        sys.exit("bench: --rounds and --entries must be 0 or more, scales more than 0")
    if args.tree and not os.path.isdir(os.path.join(args.tree, "volumes")):
        sys.exit("bench: --tree %s: not a tree built by stack_builder.py" % args.tree)
    if args.rows < 0 or args.rate <= 0:
        sys.exit("bench: --rows must be 0 or more, --rate more than 0")

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="iotstack-bench.", dir=args.workdir)
    print("work directory: %s" % workdir, flush=True)
    try:
        (databases_benchmark if args.databases else benchmark)(args, Bench(workdir))
        return 0
    except BenchError as e:
        sys.stderr.write("bench: %s\n" % e)
        return 1
    finally:
        if args.keep:
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
