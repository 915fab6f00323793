"""disk_sync: syncfs of the file systems written, the whole-machine sync
only where syncfs is not available, and I/O errors raised."""
import errno
import os
import tempfile
import unittest
from unittest import mock

from iotstack_backup import disk_sync


class DistinctFilesystemsTest(unittest.TestCase):
    def test_one_path_per_file_system_in_order_missing_ones_skipped(self):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
            os.mkdir(a)
            os.mkdir(b)
            chosen = disk_sync.distinct_filesystems([a, os.path.join(tmp, "gone"), b, tmp])
            self.assertEqual(chosen, [a])
            if os.path.isdir("/proc/self") and os.stat("/proc").st_dev != os.stat(tmp).st_dev:
                self.assertEqual(disk_sync.distinct_filesystems([a, "/proc", b]), [a, "/proc"])


class SyncFilesystemTest(unittest.TestCase):
    def test_linux_uses_syncfs_and_the_data_is_readable(self):
        if disk_sync._libc_syncfs() is None:
            self.skipTest("no syncfs in this C library (not Linux): the fallback is os.sync")
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "f"), "wb") as f:
                f.write(b"x" * 100000)
            self.assertEqual(disk_sync.sync_filesystems([tmp, os.path.join(tmp, "f")]),
                             ["syncfs"])

    def test_without_syncfs_the_whole_machine_is_synced(self):
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch.object(disk_sync, "_libc_syncfs", return_value=None), \
                mock.patch.object(os, "sync") as sync:
            self.assertEqual(disk_sync.sync_filesystem(tmp), "sync")
            sync.assert_called_once_with()

    def test_syncfs_refused_falls_back_to_sync(self):
        for code in (errno.ENOSYS, errno.EINVAL):
            with tempfile.TemporaryDirectory() as tmp, \
                    mock.patch.object(disk_sync, "_libc_syncfs", return_value=lambda fd: code), \
                    mock.patch.object(os, "sync") as sync:
                self.assertEqual(disk_sync.sync_filesystem(tmp), "sync")
                sync.assert_called_once_with()

    def test_an_io_error_is_raised_never_taken_as_success(self):
        for code in (errno.EIO, errno.ENOSPC):
            with tempfile.TemporaryDirectory() as tmp, \
                    mock.patch.object(disk_sync, "_libc_syncfs", return_value=lambda fd: code), \
                    mock.patch.object(os, "sync") as sync:
                with self.assertRaises(OSError) as raised:
                    disk_sync.sync_filesystem(tmp)
                self.assertEqual(raised.exception.errno, code)
                sync.assert_not_called()


if __name__ == "__main__":
    unittest.main()
