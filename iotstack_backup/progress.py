"""Progress output: one line on the terminal, kept apart from the work.

The writer and the unpacker report bytes and files done through update();
TerminalProgress redraws one line on stderr at most five times a second and
NoProgress (cron, pipes, the menu's log) ignores it, so no logic depends on
whether anyone watches.
"""
import sys
import time


def human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1000.0
    return "%.1f TB" % n


class NoProgress:
    def update(self, nbytes, nfiles):
        pass

    def finish(self):
        pass


class TerminalProgress:
    """One line on stderr, redrawn at most five times a second."""

    def __init__(self, total_bytes=0, total_files=0, stream=None, label=""):
        self.stream = stream or sys.stderr
        self.total_bytes, self.total_files = total_bytes, total_files
        self.bytes = self.files = 0
        self.start = self.last = time.monotonic()
        self.label = label

    def update(self, nbytes, nfiles):
        self.bytes += nbytes
        self.files += nfiles
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        elapsed = max(now - self.start, 1e-6)
        rate = self.bytes / elapsed
        eta = ""
        if self.total_bytes and rate > 0:
            left = max(self.total_bytes - self.bytes, 0) / rate
            eta = "  ETA %d:%02d" % divmod(int(left), 60)
        self.stream.write("\r%s%s  %d files  %s/s%s\033[K" % (
            self.label, human_size(self.bytes), self.files, human_size(rate), eta))
        self.stream.flush()

    def finish(self):
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
