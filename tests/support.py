"""Helpers every test file shares: the repository's paths, and running a
command's main() in-process."""
import contextlib
import http.server
import io
import os
import shutil
import tempfile
import unittest
from unittest import mock

from iotstack_backup import tarformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKUP_PY = os.path.join(REPO, "backup.py")
RESTORE_PY = os.path.join(REPO, "restore.py")
IS_ROOT = os.geteuid() == 0
# backup.py's user argument for a run as root: the owner of what it writes.
USER_ARGS = ["root"] if IS_ROOT else []


def call(main, argv):
    """(exit code, stdout, stderr) of an in-process main(); argparse's own
    errors (SystemExit) give their code too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def write(path, data, mode=0o644):
    """Write text or bytes at path (its folders made), with mode."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def read(path):
    with open(path) as f:
        return f.read()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def run_main(module, argv):
    """call(module.main, argv)."""
    return call(module.main, argv)


def tar_member(name, kind="file", linkname=""):
    """A TarMember as the reader would give it, for the policy's tables."""
    m = tarformat.TarMember()
    m.name, m.type, m.linkname = name, kind, linkname
    m.mode, m.uid, m.gid, m.size, m.mtime = 0o644, 0, 0, 0, 0
    return m


class IsolatedCase(unittest.TestCase):
    """The one base of the suite's fixtures: each test runs in an
    environment of its own (os.environ comes back as it was, and IOTSTACK
    and SUDO_USER, which steer the commands, are gone) and gets temporary
    folders that are removed after it.

    A test never asks the host's Docker unless it asks for the test engine:
    IOTSTACK_NO_DOCKER=1 is set here, and tests.engine.engine() (through
    real_stack.use_engine and the like) takes it away again.  So the suite
    gives the same answers on a machine whose `docker` has no daemon (a Pi
    whose user is not in the docker group) and never touches a developer's
    own containers."""

    def setUp(self):
        super().setUp()
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in ("IOTSTACK", "SUDO_USER"):
            os.environ.pop(name, None)
        os.environ["IOTSTACK_NO_DOCKER"] = "1"

    def make_tmp(self, prefix="iotstack-test-"):
        """A new temporary folder, removed after the test; 0755, so that
        commands run as the user pi can reach what the test puts in it."""
        path = tempfile.mkdtemp(prefix=prefix)
        os.chmod(path, 0o755)
        self.addCleanup(shutil.rmtree, path, True)
        return path


class Recorder(http.server.BaseHTTPRequestHandler):
    """A notify URL's server for the tests: it answers 200 and keeps every
    path asked for in Recorder.paths (a test empties it first)."""

    paths = []

    def do_GET(self):
        Recorder.paths.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass
