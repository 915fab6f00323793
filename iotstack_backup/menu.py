"""IOTstack's menu runs the new tools: backup.py --install-menu / --uninstall-menu.

IOTstack's menu (and old cron lines) run `./scripts/backup.sh` and
`./scripts/restore.sh` from the IOTstack directory.  Installing replaces
those two tracked files of the IOTstack git checkout with small wrappers
that run backup.py and restore.py (wherever they are installed) with the
same arguments; uninstalling puts IOTstack's own files back from git, so
`git status` of scripts/ is clean again.

How this lives with IOTstack's self-update (`git pull`): the wrappers are
honest local changes, visible in `git status`; nothing hides them from git
(skip-worktree or assume-unchanged would make a pull fail obscurely or
overwrite them without a word).  A pull that does not touch the two
scripts keeps the wrappers.  A pull that changes them is refused by git,
naming the files; so that this never comes as a surprise, each wrapper
checks, every time it runs, whether the fetched upstream changes the two
scripts, and if so says what to do (uninstall, update, install again).  If
the wrappers disappear (`git checkout .`, `git stash`, `git reset --hard`),
every run of backup.py or restore.py says so, from a marker kept in .git/
(where no git command touches it).

The decisions are pure functions (wrapper_text, is_ours, plan_install,
plan_uninstall); install and uninstall are the thin I/O around them.
"""
from __future__ import annotations

import os
import subprocess
import sys

from . import run
from .iotstack import fsync_dir

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Literal, Mapping, Optional, TextIO, Tuple

    # What a script of the checkout is, for plan_install and plan_uninstall.
    State = Literal["ours", "clean", "modified", "untracked"]

SCRIPTS = {"backup": "scripts/backup.sh", "restore": "scripts/restore.sh"}

# The Python the wrappers run: python3 as found on the PATH of whoever runs
# the menu (sudo's secure_path as root), never the interpreter that ran
# --install-menu (root's own, say under /root/.pyenv, which pi may not run).
PYTHON = "python3"
MARK = "# iotstack-backup wrapper"
STATE_NAME = "iotstack-backup-menu"  # in the checkout's git directory


def wrapper_text(kind: str, python: str, tool: str, other_tool: str) -> str:
    """The shell text of scripts/KIND.sh that runs TOOL with the arguments
    IOTstack's own script took, in the IOTstack directory that holds it.

    As the originals ran `sudo tar`, a user who may sudo without a password
    runs the tool as root (owning the output with $SUDO_USER); else as
    themselves."""
    args = "[TYPE] [USER]" if kind == "backup" else "[FILENAME] [noask]"
    return """\
#!/usr/bin/env bash
{mark}: installed by 'backup.py --install-menu' in place of
# IOTstack's own scripts/{kind}.sh.  It runs {tool}
# with the same arguments ({args}).  To put IOTstack's script back:
#   {python} {other} --uninstall-menu
here=$(cd "$(dirname "$0")/.." && pwd) || exit 1
git -C "$here" rev-parse -q --verify '@{{upstream}}' >/dev/null 2>&1 &&
  {{ git -C "$here" diff --quiet HEAD '@{{upstream}}' -- {scripts} 2>/dev/null; [ $? = 1 ]; }} &&
  echo "Note: IOTstack's update changes scripts/backup.sh or scripts/restore.sh, which" \\
       "backup.py --install-menu replaced: git pull will refuse to update until you run" \\
       "'{python} {other} --uninstall-menu'; after the update, run it with" \\
       "--install-menu again." >&2
if [ ! -f {tool_q} ]; then
  echo "scripts/{kind}.sh: {tool} is gone; 'git -C $here checkout HEAD -- {scripts}'" \\
       "puts IOTstack's own scripts back" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then
  exec sudo -n -- {python_q} {tool_q} --dir "$here" "$@"
fi
exec {python_q} {tool_q} --dir "$here" "$@"
""".format(mark=MARK, kind=kind, tool=tool, args=args, python=python, other=other_tool,
           scripts=" ".join(SCRIPTS.values()), tool_q=quote(tool), python_q=quote(python))


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def is_ours(text: Optional[str]) -> bool:
    """True for the text of our wrapper: the mark on its second line."""
    lines = (text or "").split("\n", 2)
    return len(lines) > 1 and lines[1].startswith(MARK)


def plan_install(states: Mapping[str, State]) -> List[str]:
    """states: {path: "ours" | "clean" | "modified" | "untracked"}.  The
    paths to write, or UserError naming what stands in the way."""
    for path, state in sorted(states.items()):
        if state == "untracked":
            raise run.UserError("%s is not a file of this IOTstack git checkout; --install-menu "
                                "replaces IOTstack's own scripts only" % path)
        if state == "modified":
            raise run.UserError("%s has local changes of your own; commit them, or undo them "
                                "with 'git checkout HEAD -- %s', then run --install-menu again "
                                "(it will not overwrite them)" % (path, path))
    return sorted(states)


def plan_uninstall(states: Mapping[str, State]) -> Tuple[List[str], List[str]]:
    """(paths to put back from git, notes about the paths left alone)."""
    restore: List[str] = []
    notes: List[str] = []
    for path, state in sorted(states.items()):
        if state == "ours":
            restore.append(path)
        elif state == "modified":
            notes.append("%s has changes that are not ours: left as it is" % path)
        elif state == "clean":
            notes.append("%s is already IOTstack's own" % path)
    return restore, notes


class Git:
    """git in the IOTstack checkout, also when root runs it in a user's
    checkout (safe.directory on the command line)."""

    def __init__(self, stack: str) -> None:
        self.stack = stack

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        try:
            result = subprocess.run(
                ["git", "-c", "safe.directory=" + self.stack, "-C", self.stack] + list(args),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise run.UserError("cannot run git: %s; IOTstack's menu needs its git checkout"
                                % e.strerror) from None
        if check and result.returncode != 0:
            cause = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise run.UserError("git %s failed in %s: %s" % (
                args[0], self.stack, cause[-1] if cause else "status %d" % result.returncode))
        return result

    def is_checkout(self) -> bool:
        result = self.run("rev-parse", "--show-toplevel", check=False)
        if result.returncode != 0:
            return False
        top = result.stdout.decode("utf-8", "replace").strip()
        return os.path.realpath(top) == os.path.realpath(self.stack)

    def state(self, path: str) -> State:
        if self.run("ls-files", "--error-unmatch", "--", path, check=False).returncode != 0:
            return "untracked"
        if is_ours(read_text(os.path.join(self.stack, path))):
            return "ours"
        clean = self.run("diff", "--quiet", "HEAD", "--", path, check=False).returncode == 0
        return "clean" if clean else "modified"

    def state_file(self) -> str:
        rel = self.run("rev-parse", "--git-path", STATE_NAME).stdout.decode().strip()
        return os.path.join(self.stack, rel)


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None


def tool_paths(install_dir: str) -> Tuple[str, str]:
    return (os.path.join(install_dir, "backup.py"), os.path.join(install_dir, "restore.py"))


def open_checkout(stack: str) -> Git:
    git = Git(stack)
    if not git.is_checkout():
        raise run.UserError("%s is not an IOTstack git checkout (cloned with git); the menu's "
                            "scripts can only be replaced there" % stack)
    return git


def install(stack: str, install_dir: str, python: str, out: TextIO) -> List[str]:
    git = open_checkout(stack)
    states = {path: git.state(path) for path in SCRIPTS.values()}
    paths = plan_install(states)
    backup_py, restore_py = tool_paths(install_dir)
    tools = {"backup": backup_py, "restore": restore_py}
    for kind, path in SCRIPTS.items():
        write_like(os.path.join(stack, path), wrapper_text(kind, python, tools[kind], backup_py))
    with open(git.state_file(), "w", encoding="utf-8") as f:
        f.write("%s\n" % install_dir)
    out.write("IOTstack's menu now runs the new tools: %s runs %s, %s runs %s.\n"
              % (SCRIPTS["backup"], backup_py, SCRIPTS["restore"], restore_py))
    out.write("git status shows both scripts as modified, on purpose. When an IOTstack update "
              "changes them, git pull refuses and names them, and the scripts say so before: "
              "then run '%s %s --uninstall-menu', update, and --install-menu again.\n"
              % (python, backup_py))
    return paths


def uninstall(stack: str, out: TextIO) -> List[str]:
    git = open_checkout(stack)
    states = {path: git.state(path) for path in SCRIPTS.values()}
    restore, notes = plan_uninstall(states)
    if restore:
        owner = os.stat(os.path.join(stack, "scripts"))
        git.run("checkout", "HEAD", "--", *restore)
        for path in restore:
            full = os.path.join(stack, path)
            if os.geteuid() == 0 and os.lstat(full).st_uid != owner.st_uid:
                os.chown(full, owner.st_uid, owner.st_gid)
        out.write("Put back IOTstack's own %s.\n" % " and ".join(restore))
    for note in notes:
        out.write(note + "\n")
    try:
        os.unlink(git.state_file())
    except FileNotFoundError:
        pass
    return restore


def write_like(path: str, text: str) -> None:
    """Replace path's content atomically, keeping its mode and owner."""
    st = os.stat(path)
    temp = path + ".iotstack-backup.new"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.chmod(temp, (st.st_mode & 0o7777) | 0o111)
        if os.geteuid() == 0:
            os.chown(temp, st.st_uid, st.st_gid)
        # Durable before the rename, and the rename after it: after a power
        # cut the script is the old one or the new one, never empty.
        os.fsync(f.fileno())
    os.rename(temp, path)
    fsync_dir(os.path.dirname(path))


def warn_if_gone(stack: str, err: Optional[TextIO] = None) -> Optional[str]:
    """After --install-menu, a git reset or stash may have put IOTstack's
    own scripts back: say so on every run, until --install-menu or
    --uninstall-menu."""
    state = os.path.join(stack, ".git", STATE_NAME)
    if not os.path.isfile(state):
        return None
    gone = [path for kind, path in SCRIPTS.items()
            if not is_ours(read_text(os.path.join(stack, path)))]
    if not gone:
        return None
    message = ("Note: %s no longer runs the new tools (put back by git?): IOTstack's menu runs "
               "the old script. Run backup.py --install-menu again, or --uninstall-menu to "
               "stop this note." % " and ".join(gone))
    (err or sys.stderr).write(message + "\n")
    return message
