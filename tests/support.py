"""Helpers every test file shares: running a command's main() in-process."""
import contextlib
import io


def call(main, argv):
    """(exit code, stdout, stderr) of an in-process main()."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
