"""Helpers every test file shares: running a command's main() in-process."""
import contextlib
import io

from iotstack_backup import tarformat


def call(main, argv):
    """(exit code, stdout, stderr) of an in-process main()."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def tar_member(name, kind="file", linkname=""):
    """A TarMember as the reader would give it, for the policy's tables."""
    m = tarformat.TarMember()
    m.name, m.type, m.linkname = name, kind, linkname
    m.mode, m.uid, m.gid, m.size, m.mtime = 0o644, 0, 0, 0, 0
    return m
