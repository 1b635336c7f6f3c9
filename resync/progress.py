"""A transfer's progress: bytes and files done of those queued, rate and ETA
(``Counts``: what a daemon's API shows), and a one-line display of them on a
terminal (``Progress``, -P: a daemon thread redraws the line a few times a
second). Counters are updated from any thread."""
from __future__ import annotations

import sys
import threading
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Counts:
    """Bytes and files queued and done, since ``reset`` (the counters a
    session's sender or receiver updates as a meter)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_queued = self.bytes_done = 0
        self.files_queued = self.files_done = 0
        self.scanning = True
        self._start = time.monotonic()

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

    def snapshot(self) -> dict:
        """files_done, files_total, bytes_done, bytes_total (None while the
        source is still being listed), rate_bytes_per_second since the
        (last) start, eta_seconds (None while unknown)."""
        with self._lock:
            done, total = self.bytes_done, self.bytes_queued
            fdone, ftotal = self.files_done, self.files_queued
        rate = done / max(time.monotonic() - self._start, 1e-6)
        listed = not self.scanning
        return {"files_done": fdone, "files_total": ftotal if listed else None, "bytes_done": done,
                "bytes_total": total if listed else None, "rate_bytes_per_second": round(rate),
                "eta_seconds": round((total - done) / rate, 1) if listed and rate > 0 and total > done else
                (0.0 if listed and total <= done else None)}


class Progress(Counts):
    """Counts shown on a terminal's one line (-P)."""

    def __init__(self, stream=None, interval: float = 0.25):
        super().__init__()
        self._stream = stream or sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._width = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="resync-progress")
        self._thread.start()

    def line(self) -> str:
        from .cli.options import human
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
