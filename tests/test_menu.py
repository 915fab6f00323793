"""IOTstack's menu path: backup.py --install-menu / --uninstall-menu.

A temporary folder laid out like an IOTstack checkout (a git repository
with scripts/backup.sh, scripts/restore.sh and menu.sh committed, cloned
from an "upstream" bare repository) is driven as IOTstack's menu drives it:
./scripts/backup.sh through a shell with no arguments, ./scripts/restore.sh
on a pseudo-terminal, picking a number and answering the question.  The
results are checked on disk and in `git status`.  No docker is used: the
commands find none on PATH and carry on, as they document."""
import glob
import os
import pwd
import shutil
import subprocess
import sys
import unittest

from iotstack_backup import menu, run
from tests import terminal
from tests.support import BACKUP_PY, IsolatedCase, read, write

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"

ORIGINAL = {
    "scripts/backup.sh": "#!/bin/bash\necho \"old backup.sh $*\" > old-backup-ran\n",
    "scripts/restore.sh": "#!/bin/bash\necho \"old restore.sh $*\" > old-restore-ran\n",
    "menu.sh": "#!/bin/bash\necho menu\n",
    ".gitignore": "/volumes/\n/services/\n/backups/\n/.tmp/\n/docker-compose.yml\n",
}


def env():
    """No docker on PATH (the tests must not depend on one), a git identity."""
    return terminal.no_docker_env(
        _BIN.name, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
        HOME=os.environ.get("HOME", "/root"))


_BIN = None


def setUpModule():
    global _BIN
    _BIN = terminal.tools_dir(("python3",))  # the wrappers run python3 from PATH


def tearDownModule():
    _BIN.cleanup()


def run_pty(argv, cwd, answers, timeout=60):
    return terminal.run_pty(argv, cwd, answers, env(), timeout)


def git(cwd, *args, check=True):
    result = subprocess.run(["git"] + list(args), cwd=cwd, env=env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and result.returncode:
        raise AssertionError("git %s: %s" % (args, result.stderr.decode()))
    return result


class MenuCase(IsolatedCase):
    def setUp(self):
        super().setUp()
        self.tmp = self.make_tmp("menu-test-")
        self.upstream = os.path.join(self.tmp, "upstream.git")
        work = os.path.join(self.tmp, "upstream-work")
        git(self.tmp, "init", "-q", "--bare", "-b", "master", self.upstream)
        git(self.tmp, "clone", "-q", self.upstream, work)
        for rel, text in ORIGINAL.items():
            write(os.path.join(work, rel), text, 0o755 if rel.endswith(".sh") else 0o644)
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", "IOTstack")
        git(work, "push", "-q", "origin", "HEAD:master")
        self.work = work
        self.stack = os.path.join(self.tmp, "IOTstack")
        git(self.tmp, "clone", "-q", self.upstream, self.stack)
        write(os.path.join(self.stack, "docker-compose.yml"), "services:\n  nodered:\n"
              "    image: nodered/node-red\n")
        write(os.path.join(self.stack, "services/nodered/Dockerfile"), "FROM node-red\n")
        write(os.path.join(self.stack, "volumes/nodered/data/flows.json"), "[1]\n")

    def tool(self, *argv, cwd=None):
        return subprocess.run([sys.executable, BACKUP_PY] + list(argv), cwd=cwd or self.stack,
                              env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def status(self):
        return git(self.stack, "status", "--porcelain").stdout.decode()

    def install(self):
        result = self.tool("--install-menu")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        return result

    def upstream_changes(self, rel, text):
        write(os.path.join(self.work, rel), text, 0o755)
        git(self.work, "commit", "-q", "-am", "upstream changes " + rel)
        git(self.work, "push", "-q", "origin", "HEAD:master")


class PureTests(unittest.TestCase):
    def test_wrapper_is_recognised_and_runs_the_tool_with_the_arguments(self):
        text = menu.wrapper_text("restore", "/usr/bin/python3", "/opt/it's/restore.py",
                                 "/opt/it's/backup.py")
        self.assertTrue(menu.is_ours(text))
        self.assertFalse(menu.is_ours(ORIGINAL["scripts/backup.sh"]))
        self.assertFalse(menu.is_ours(None))
        self.assertIn("exec '/usr/bin/python3' '/opt/it'\\''s/restore.py' --dir \"$here\" \"$@\"",
                      text)
        check = subprocess.run(["bash", "-n"], input=text.encode(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        self.assertEqual(check.returncode, 0, check.stderr)

    def test_plans(self):
        paths = menu.plan_install({"scripts/backup.sh": "clean", "scripts/restore.sh": "ours"})
        self.assertEqual(paths, ["scripts/backup.sh", "scripts/restore.sh"])
        for state in ("modified", "untracked"):
            with self.assertRaises(run.UserError):
                menu.plan_install({"scripts/backup.sh": state, "scripts/restore.sh": "clean"})
        restore, notes = menu.plan_uninstall({"scripts/backup.sh": "ours",
                                              "scripts/restore.sh": "modified"})
        self.assertEqual(restore, ["scripts/backup.sh"])
        self.assertIn("left as it is", notes[0])


class InstallTests(MenuCase):
    def test_menu_backup_and_restore_then_uninstall(self):
        out = self.install().stdout
        self.assertIn("git status shows both scripts as modified", out)
        self.assertEqual(self.status(), " M scripts/backup.sh\n M scripts/restore.sh\n")
        # The menu's "Run backup": ./scripts/backup.sh through a shell, no arguments.
        backup = subprocess.run("./scripts/backup.sh", shell=True, cwd=self.stack, env=env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(backup.returncode, 0, backup.stdout + backup.stderr)
        self.assertIn("Backup complete", backup.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.stack, "old-backup-ran")))
        dated = glob.glob(os.path.join(self.stack, "backups/backup/backup_*.tar.gz"))
        rolling = glob.glob(os.path.join(self.stack, "backups/rolling/backup_*.tar.gz"))
        self.assertEqual((len(dated), len(rolling)), (1, 1))  # TYPE 3, the default

        # The menu's "Restore from backup": ./scripts/restore.sh on a terminal.
        flows = os.path.join(self.stack, "volumes/nodered/data/flows.json")
        write(flows, "[2] changed after the backup\n")
        code, shown = run_pty(["/bin/sh", "-c", "./scripts/restore.sh"], self.stack,
                              [("Restore which backup", "1\n"), ("Continue [y/N]?", "y\n")])
        self.assertEqual(code, 0, shown)
        self.assertIn("  1) backup/%s" % os.path.basename(dated[0]), shown)
        self.assertIn("  2) rolling/%s" % os.path.basename(rolling[0]), shown)
        self.assertIn("Services to stop: none running", shown)
        self.assertEqual(read(flows), "[1]\n")
        self.assertFalse(os.path.exists(os.path.join(self.stack, "old-restore-ran")))

        # Arguments pass through as the originals took them.
        code, shown = run_pty(["/bin/sh", "-c", "./scripts/restore.sh %s noask"
                               % os.path.basename(dated[0])], self.stack, [])
        self.assertEqual(code, 0, shown)
        self.assertNotIn("Continue", shown)

        result = self.tool("--uninstall-menu")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.status(), "")
        for rel in ("scripts/backup.sh", "scripts/restore.sh"):
            self.assertEqual(read(os.path.join(self.stack, rel)), ORIGINAL[rel])
        self.assertFalse(os.path.exists(os.path.join(self.stack, ".git", menu.STATE_NAME)))

    def test_the_wrappers_run_python3_of_the_path_as_root_and_as_pi(self):
        """Issue 21, Must 7: installed as root, whose Python may be private
        (pyenv's under /root, mode 0700), the menu still works for pi."""
        self.install()
        for rel in ("scripts/backup.sh", "scripts/restore.sh"):
            text = read(os.path.join(self.stack, rel))
            self.assertIn("exec 'python3' ", text)
            self.assertNotIn(sys.executable, text)
        as_root = subprocess.run("./scripts/backup.sh 1", shell=True, cwd=self.stack, env=env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(as_root.returncode, 0, as_root.stdout + as_root.stderr)
        if os.geteuid() != 0:
            self.skipTest("the run as pi needs root (runuser)")
        try:
            pi = pwd.getpwnam("pi")
        except KeyError:
            self.skipTest("needs a user pi (useradd -m pi)")
        if not os.access("/usr/bin/python3", os.X_OK):
            self.skipTest("needs a python3 on pi's PATH (/usr/bin/python3)")
        shutil.rmtree(os.path.join(self.stack, "backups"))
        for folder, dirs, files in os.walk(self.stack):
            for name in [folder] + [os.path.join(folder, f) for f in dirs + files]:
                os.lchown(name, pi.pw_uid, pi.pw_gid)
        pi_env = dict(env(), PATH="/usr/bin:/bin", HOME=pi.pw_dir)
        as_pi = subprocess.run([RUNUSER, "-u", "pi", "--", "bash", "-c", "./scripts/backup.sh 1"],
                               cwd=self.stack, env=pi_env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=120)
        self.assertEqual(as_pi.returncode, 0, as_pi.stdout + as_pi.stderr)
        dated = glob.glob(os.path.join(self.stack, "backups/backup/backup_*.tar.gz"))
        self.assertEqual(len(dated), 1, as_pi.stdout)
        self.assertEqual(os.stat(dated[0]).st_uid, pi.pw_uid)
        code, shown = terminal.run_pty(
            [RUNUSER, "-u", "pi", "--", "bash", "-c",
             "./scripts/restore.sh %s noask" % os.path.basename(dated[0])],
            self.stack, [], pi_env)
        self.assertEqual(code, 0, shown)
        self.assertIn("Restored", shown)

    def test_install_twice_is_the_same_and_works_from_elsewhere(self):
        self.install()
        first = read(os.path.join(self.stack, "scripts/backup.sh"))
        result = self.tool("--install-menu", "--dir", self.stack, cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(read(os.path.join(self.stack, "scripts/backup.sh")), first)
        self.assertTrue(os.access(os.path.join(self.stack, "scripts/backup.sh"), os.X_OK))
        # An old cron line: cd elsewhere, bash with a path.
        dry = subprocess.run(["bash", os.path.join(self.stack, "scripts/backup.sh"), "1",
                              "--dry-run"], cwd=self.tmp, env=env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=60)
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("IOTstack directory: %s" % self.stack, dry.stdout)

    def test_refuses_to_overwrite_local_changes(self):
        path = os.path.join(self.stack, "scripts/backup.sh")
        write(path, "#!/bin/bash\necho my own edit\n", 0o755)
        result = self.tool("--install-menu")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("local changes of your own", result.stderr)
        self.assertEqual(read(path), "#!/bin/bash\necho my own edit\n")
        self.assertEqual(read(os.path.join(self.stack, "scripts/restore.sh")),
                         ORIGINAL["scripts/restore.sh"])

    def test_not_a_git_checkout(self):
        shutil.rmtree(os.path.join(self.stack, ".git"))
        result = self.tool("--install-menu")
        self.assertEqual(result.returncode, 1)
        self.assertIn("not an IOTstack git checkout", result.stderr)
        self.assertEqual(read(os.path.join(self.stack, "scripts/backup.sh")),
                         ORIGINAL["scripts/backup.sh"])


class UpdateTests(MenuCase):
    """IOTstack's self-update is git pull: the user is told, nothing is lost."""

    def test_an_update_that_leaves_the_scripts_alone_keeps_the_wrappers(self):
        self.install()
        self.upstream_changes("menu.sh", "#!/bin/bash\necho new menu\n")
        pull = git(self.stack, "pull", "-q", check=False)
        self.assertEqual(pull.returncode, 0, pull.stderr)
        self.assertTrue(menu.is_ours(read(os.path.join(self.stack, "scripts/backup.sh"))))
        self.assertEqual(read(os.path.join(self.stack, "menu.sh")), "#!/bin/bash\necho new menu\n")

    def test_an_update_of_the_scripts_is_announced_refused_by_git_then_done(self):
        self.install()
        self.upstream_changes("scripts/backup.sh", "#!/bin/bash\necho newer backup.sh\n")
        git(self.stack, "fetch", "-q")  # as IOTstack's menu does to look for updates
        dry = subprocess.run("./scripts/backup.sh 1 --dry-run", shell=True, cwd=self.stack,
                             env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("git pull will refuse to update until you run", dry.stderr)
        self.assertIn("--uninstall-menu", dry.stderr)
        pull = git(self.stack, "pull", "-q", check=False)
        self.assertNotEqual(pull.returncode, 0)
        self.assertIn("scripts/backup.sh", pull.stderr.decode())  # git names it
        self.assertTrue(menu.is_ours(read(os.path.join(self.stack, "scripts/backup.sh"))))
        # What the note says to do works:
        self.assertEqual(self.tool("--uninstall-menu").returncode, 0)
        self.assertEqual(git(self.stack, "pull", "-q", check=False).returncode, 0)
        self.install()
        self.assertEqual(self.status(), " M scripts/backup.sh\n M scripts/restore.sh\n")
        self.assertEqual(git(self.stack, "show", "HEAD:scripts/backup.sh").stdout.decode(),
                         "#!/bin/bash\necho newer backup.sh\n")

    def test_wrappers_put_back_by_git_are_reported_on_each_run(self):
        self.install()
        git(self.stack, "checkout", "--", "scripts/")
        result = self.tool("1", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("no longer runs the new tools", result.stderr)
        self.assertEqual(self.tool("--uninstall-menu").returncode, 0)
        self.assertNotIn("no longer", self.tool("1", "--dry-run").stderr)


if __name__ == "__main__":
    unittest.main()
