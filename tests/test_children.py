"""Tests of children: a forked child's data pipe and how its end is reported."""
import errno
import os
import signal
import unittest
from unittest import mock

from iotstack_backup import children


class Refused(Exception):
    pass


def run_child(body, parent_reads=True):
    """(data the child sent, the exception its status stands for or None)."""
    pid, data_fd, status_fd = children.fork_piped_child(body, parent_reads=parent_reads)
    try:
        data = b""
        while True:
            more = os.read(data_fd, 65536)
            if not more:
                break
            data += more
        status = children.read_child_status(status_fd)
    finally:
        os.close(data_fd)
        os.close(status_fd)
        os.waitpid(pid, 0)
    if status == b"ok":
        return data, None
    return data, children.child_failure(
        status, {"Refused": Refused},
        unknown=lambda message: RuntimeError("unknown: %s" % message),
        unfinished=lambda: RuntimeError("unfinished"))


class ChildTests(unittest.TestCase):
    def test_data_then_ok(self):
        data, error = run_child(lambda out, _status: children.write_all_fd(out, b"x" * 3_000_000))
        self.assertEqual(data, b"x" * 3_000_000)
        self.assertIsNone(error)

    def test_os_error_keeps_its_errno(self):
        def body(out, _status):
            children.write_all_fd(out, b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        data, error = run_child(body)
        self.assertEqual(data, b"partial")
        self.assertIsInstance(error, OSError)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertIn("No space left", str(error))

    def test_known_and_unknown_exceptions(self):
        def refuse(_out, _status):
            raise Refused("no thanks")

        def crash(_out, _status):
            raise KeyError("boom")

        self.assertEqual((type(run_child(refuse)[1]), str(run_child(refuse)[1])),
                         (Refused, "no thanks"))
        self.assertEqual(str(run_child(crash)[1]), "unknown: 'boom'")

    def test_a_killed_child_is_never_a_success(self):
        def die(_out, _status):
            os.kill(os.getpid(), signal.SIGKILL)

        self.assertEqual(str(run_child(die)[1]), "unfinished")

    def test_the_child_holds_no_other_descriptor(self):
        spare_read, spare_write = os.pipe()
        self.addCleanup(os.close, spare_read)
        try:
            def report_fds(out, _status):
                children.write_all_fd(out, " ".join(sorted(os.listdir("/proc/self/fd"))).encode())

            data, error = run_child(report_fds)
        finally:
            os.close(spare_write)
        self.assertIsNone(error)
        # stdin/out/err, the data and status ends, and the one listdir opens.
        self.assertLessEqual(len(data.split()), 6, data)
        # The parent's spare write end was closed in the child: reading now
        # sees the end of the pipe instead of waiting for a writer.
        self.assertEqual(os.read(spare_read, 1), b"")

    def test_a_write_that_takes_nothing_is_an_error_not_a_spin(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        with mock.patch.object(children.os, "write", return_value=0) as write:
            with self.assertRaisesRegex(children.NoProgressError,
                                        "writing x made no progress") as caught:
                children.write_all_fd(write_end, b"data", "writing x")
        self.assertEqual(write.call_count, 1)
        self.assertEqual(caught.exception.errno, errno.EIO)


if __name__ == "__main__":
    unittest.main()
