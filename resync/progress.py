"""A one-line progress display on a terminal: bytes done of bytes queued, rate,
ETA and files. Counters are updated from any thread; a daemon thread redraws
the line a few times a second. Silent when the stream is not a terminal."""
from __future__ import annotations

import sys
import threading
import time

from .cli.options import human


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, stream=None, interval: float = 0.25):
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._interval = interval
        self.bytes_queued = self.bytes_done = 0
        self.files_queued = self.files_done = 0
        self.scanning = True
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._width = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="resync-progress")
        self._thread.start()

    def queued(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_queued += nbytes
            self.files_queued += 1

    def done(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_done += nbytes
            self.files_done += 1

    def partial(self, nbytes: int) -> None:
        """Bytes of a file still in progress (content arriving in pieces);
        its ``done`` then adds only the rest."""
        with self._lock:
            self.bytes_done += nbytes

    def reset(self) -> None:
        """Counting starts over (a retried transfer lists and queues again)."""
        with self._lock:
            self.bytes_queued = self.bytes_done = 0
            self.files_queued = self.files_done = 0
            self.scanning = True
            self._start = time.monotonic()

    def scanned(self) -> None:
        self.scanning = False

    def line(self) -> str:
        with self._lock:
            done, total = self.bytes_done, self.bytes_queued
            fdone, ftotal = self.files_done, self.files_queued
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = done / elapsed
        pct = 100.0 * done / total if total else 100.0
        if self.scanning:
            eta = "scanning"
        elif rate > 0 and total > done:
            eta = f"ETA {_clock((total - done) / rate)}"
        else:
            eta = f"{_clock(elapsed)}"
        return (f"{human(done):>10} / {human(total):<10} {pct:5.1f}%  {human(rate):>10}/s  {eta}  "
                f"{fdone}/{ftotal} files")

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self._stream.write("\r" + text + " " * pad)
        self._stream.flush()
        self._width = len(text)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw(self.line())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(self.line())
        self._stream.write("\n")
        self._stream.flush()
