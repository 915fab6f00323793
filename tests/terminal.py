"""Test helpers: a command on a pseudo-terminal, and a PATH without docker."""
import os
import pty
import select
import shutil
import signal
import tempfile
import time


def tools_dir(extra=()):
    """A temporary folder of links to the tools a stack's scripts use,
    without docker: PATH for tests that must not depend on a docker."""
    holder = tempfile.TemporaryDirectory(prefix="test-bin-")
    for tool in ("git", "bash", "sh", "env", "dirname", "id", "sudo", "cat", "echo",
                 "crontab", "rsync") + tuple(extra):
        path = shutil.which(tool)
        if path:
            os.symlink(path, os.path.join(holder.name, tool))
    return holder


def no_docker_env(bin_dir, **extra):
    """os.environ with PATH=bin_dir (see tools_dir), no docker, stack or sudo
    variables, and no .pyc writes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOCKER_", "IOTSTACK", "SUDO_"))}
    env.update(PATH=bin_dir, PYTHONDONTWRITEBYTECODE="1", IOTSTACK_NO_DOCKER="1", **extra)
    return env


def run_pty(argv, cwd, answers, env, timeout=60, settle=0.0):
    """Run argv on a new pseudo-terminal; for each (prompt, reply) wait for
    the prompt, then (settle seconds later: a Ctrl-C typed while readline
    is still setting up the terminal can be lost) type the reply.
    (exit status, everything shown)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the user's terminal session
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    seen = b""
    pos = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0].encode() in seen[pos:]:
                pos = seen.index(pending[0][0].encode(), pos) + len(pending[0][0])
                time.sleep(settle)
                os.write(fd, pending.pop(0)[1].encode())
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = (status >> 8) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return code, seen.decode("utf-8", "replace").replace("\r\n", "\n")
