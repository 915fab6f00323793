"""Progress output: one line on the terminal, kept apart from the work.

The writer and the unpacker report bytes and files done through update();
TerminalProgress redraws one line on stderr at most five times a second
(and once a second while no update comes) and NoProgress (cron, pipes,
the menu's log) ignores it, so no logic depends on whether anyone watches.
"""
from __future__ import annotations

import sys
import threading
import time

# typing is only read by the type checker (mypy treats this name as True):
# the annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Protocol, TextIO

    class Progress(Protocol):
        """What the work reports to: NoProgress or TerminalProgress (a
        caller annotates `bar: progress.Progress`)."""

        def update(self, nbytes: int, nfiles: int) -> None: ...

        def finish(self) -> None: ...

        def stop(self) -> None: ...


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1000.0
    return "%.1f TB" % n


class NoProgress:
    def update(self, nbytes: int, nfiles: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def stop(self) -> None:
        pass


class TerminalProgress:
    """One line on stderr: done, percentage, rate and ETA.  Redrawn at most
    five times a second on updates, and once a second by a ticker thread
    when no update comes (a large file being read, the final sync and
    verify), so the line never freezes: the ETA follows the rate over the
    whole run, and past the estimate it says "finishing" with the time
    spent since, instead of standing at 0:00."""

    def __init__(self, total_bytes: int = 0, total_files: int = 0,
                 stream: Optional[TextIO] = None, label: str = "", tick: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.total_bytes, self.total_files = total_bytes, total_files
        self.bytes = self.files = 0
        self.clock = clock
        self.start = self.last = clock()
        self.done_at: Optional[float] = None
        self.finished = False  # then the estimate no longer matters
        self.label = label
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        if tick:
            self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self._ticker.start()

    def update(self, nbytes: int, nfiles: int) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += nfiles
            now = self.clock()
            if now - self.last >= 0.2:
                self.last = now
                self._draw(now)

    def _tick(self, tick: float) -> None:
        while not self._stopped.wait(tick):
            with self._lock:
                now = self.clock()
                if now - self.last >= tick and not self._stopped.is_set():
                    self.last = now
                    self._draw(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = self.bytes / elapsed
        text = "%s%s  %d files" % (self.label, human_size(self.bytes), self.files)
        if self.total_bytes and not self.finished:
            percent = min(100, 100 * self.bytes // self.total_bytes)
            text += "  %d%% of %s" % (percent, human_size(self.total_bytes))
        text += "  %s/s" % human_size(rate)
        if self.finished:
            text += "  done in %d:%02d" % divmod(int(elapsed), 60)
        elif self.total_bytes and self.bytes >= self.total_bytes:
            if self.done_at is None:
                self.done_at = now
            text += "  finishing %d:%02d" % divmod(int(now - self.done_at), 60)
        elif self.total_bytes and rate > 0:
            text += "  ETA %d:%02d" % divmod(int((self.total_bytes - self.bytes) / rate), 60)
        return text

    def _draw(self, now: float) -> None:
        self.stream.write("\r%s\033[K" % self.line(now))
        self.stream.flush()

    def stop(self) -> None:
        """End the ticker; the line stays as it is."""
        self._stopped.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()

    def finish(self) -> None:
        self.stop()
        with self._lock:
            self.finished = True
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
