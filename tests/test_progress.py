"""Tests of progress: the one line a terminal shows, and when it is redrawn."""
import io
import time
import unittest

from iotstack_backup import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class ProgressTests(unittest.TestCase):
    def test_percentage_eta_and_finishing(self):
        clock = FakeClock()
        bar = progress.TerminalProgress(10_000_000, 10, stream=io.StringIO(),
                                        label="Backing up: ", tick=0, clock=clock)
        bar.bytes = 2_500_000
        clock.now += 5  # 0.5 MB/s: 15 s left
        self.assertEqual(bar.line(clock.now), "Backing up: 2.5 MB  0 files  25% of 10.0 MB  "
                                              "500.0 KB/s  ETA 0:15")
        clock.now += 5  # nothing came in: the rate falls, the ETA grows; it never freezes
        self.assertIn("ETA 0:30", bar.line(clock.now))
        bar.bytes = 10_000_000
        self.assertIn("100% of 10.0 MB", bar.line(clock.now))
        self.assertIn("finishing 0:00", bar.line(clock.now))
        clock.now += 65  # the sync and verify after the last byte
        self.assertIn("finishing 1:05", bar.line(clock.now))
        self.assertNotIn("ETA", bar.line(clock.now))
        bar.finish()  # the estimate was 10% high (hard links, unreadable files): no "90%"
        self.assertTrue(bar.stream.getvalue().endswith(
            "\rBacking up: 10.0 MB  0 files  133.3 KB/s  done in 1:15\033[K\n"))

    def test_the_line_is_redrawn_while_no_update_comes(self):
        stream = io.StringIO()
        bar = progress.TerminalProgress(1_000_000, 1, stream=stream, tick=0.05)
        bar.update(100_000, 0)
        time.sleep(0.4)
        redraws = stream.getvalue().count("\r")
        bar.stop()
        self.assertGreaterEqual(redraws, 3)
        after = stream.getvalue()
        time.sleep(0.15)
        self.assertEqual(stream.getvalue(), after)  # stopped: nothing more is drawn
        bar.finish()
        self.assertTrue(stream.getvalue().endswith("\n"))

    def test_the_line_names_bytes_files_rate_and_eta(self):
        stream = io.StringIO()
        bar = progress.TerminalProgress(total_bytes=2_000_000, total_files=4, stream=stream,
                                        label="Backing up: ")
        bar.last -= 1  # draw on the first update
        bar.update(1_000_000, 2)
        bar.finish()
        lines = stream.getvalue().split("\r")
        self.assertIn("Backing up: 1.0 MB  2 files", lines[1])
        self.assertIn("/s  ETA ", lines[1])
        self.assertTrue(stream.getvalue().endswith("\n"))


if __name__ == "__main__":
    unittest.main()
