"""A small IOTstack tree owned by the normal user `pi` (created when the
tests run as root), in a folder pi can reach, and backup.py and restore.py
run on it in a subprocess as root or as pi, with a PATH without docker.
StackCase is the base of test_hostile.py, test_mounts.py and
test_no_follow.py."""
import glob
import os
import pwd
import shutil
import subprocess
import sys

from tests.support import IS_ROOT, REPO, IsolatedCase, write

TOOLS = ("bash", "sh", "rclone", "rsync", "tar", "gzip", "cat", "sha256sum")


def pi_user():
    """The normal user the tests run the commands as: `pi` (created when
    missing and we are root), else the user running the tests."""
    if not IS_ROOT:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam("pi")
    except KeyError:
        subprocess.run(["useradd", "-m", "pi"], check=True)
        return pwd.getpwnam("pi")


def users():
    """Who runs the commands: root and pi as root, else only ourselves."""
    return ["root", "pi"] if IS_ROOT else ["pi"]


def demote_to(entry):
    def demote():
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return demote


_python_for_pi = None


def python_for_pi():
    """A Python 3.9+ that pi can run (pyenv's under /root is out of reach)."""
    global _python_for_pi
    if _python_for_pi is None:
        if not IS_ROOT:
            _python_for_pi = sys.executable
        else:
            demote = demote_to(pi_user())
            for exe in (sys.executable, "/usr/bin/python3"):
                try:
                    if subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 9)"],
                                      preexec_fn=demote, stderr=subprocess.DEVNULL).returncode == 0:
                        _python_for_pi = exe
                        break
                except OSError:
                    pass
            else:
                _python_for_pi = ""
    return _python_for_pi


def chown_tree(path, uid, gid):
    os.lchown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), uid, gid)


def one_error_line(test, stderr, *needles):
    """stderr is exactly one "PROG: error: ..." line holding every needle."""
    lines = stderr.splitlines()
    test.assertEqual(len(lines), 1, stderr)
    test.assertNotIn("Traceback", stderr)
    test.assertRegex(lines[0], r"^(backup|restore)\.py: error: ")
    for needle in needles:
        test.assertIn(needle, lines[0])
    return lines[0]


class StackCase(IsolatedCase):
    """A small IOTstack tree owned by pi, in a folder pi can reach."""

    def setUp(self):
        super().setUp()
        self.pi = pi_user()
        if IS_ROOT and not python_for_pi():
            self.skipTest("no Python 3.9+ that the user pi can run")
        self.tmp = self.make_tmp("hostile-")
        self.bin = os.path.join(self.tmp, "bin")  # no docker in it
        os.mkdir(self.bin)
        for tool in TOOLS:
            found = shutil.which(tool)
            if found:
                os.symlink(found, os.path.join(self.bin, tool))
        self.new_stack()

    def new_stack(self, name="IOTstack"):
        self.stack = os.path.join(self.tmp, name)
        self.backups = os.path.join(self.stack, "backups")
        write(self.path("docker-compose.yml"), b"services: {}\n")
        write(self.path(".env"), b"SECRET=1\n", 0o600)
        write(self.path("services/nodered/Dockerfile"), b"FROM nodered\n")
        write(self.path("volumes/nodered/flows.json"), b"[]\n")
        write(self.path("volumes/influxdb/data/db.bin"), os.urandom(20000))
        write(self.path("volumes/influxdb/data/wal.log"), b"wal\n")
        if IS_ROOT:
            chown_tree(self.stack, self.pi.pw_uid, self.pi.pw_gid)
        return self.stack

    def path(self, rel):
        return os.path.join(self.stack, rel)

    def run_as(self, user, script, *args, stdout=subprocess.PIPE):
        """Run backup.py or restore.py on the stack as `user`."""
        env = {"PATH": self.bin, "HOME": self.tmp, "LANG": "C.UTF-8", "IOTSTACK_NO_DOCKER": "1"}
        demote = None
        python = sys.executable
        if user == "pi" and IS_ROOT:
            demote = demote_to(self.pi)
            python = python_for_pi()
            env["HOME"] = self.pi.pw_dir
        return subprocess.run([python, os.path.join(REPO, script), "--dir", self.stack] + list(args),
                              preexec_fn=demote, stdin=subprocess.DEVNULL, stdout=stdout,
                              stderr=subprocess.PIPE, env=env, universal_newlines=True,
                              timeout=300)

    def backup(self, user, *args):
        extra = ["pi"] if user == "root" else []
        return self.run_as(user, "backup.py", "1", *extra, "--no-stop", *args)

    def restore(self, user, *args):
        return self.run_as(user, "restore.py", "--no-stop", "--yes", *args)

    def archives(self):
        return sorted(glob.glob(os.path.join(self.backups, "backup", "backup_*.tar.gz")))

    def newest_log(self, kind="backup"):
        logs = glob.glob(os.path.join(self.backups, "logs", kind + "_*.log"))
        with open(max(logs, key=os.path.getmtime), encoding="utf-8") as f:
            return f.read()
