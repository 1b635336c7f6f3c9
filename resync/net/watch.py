"""A watch on the daemon's event loop.

Every transfer, the API and the metrics share the one asyncio loop aioquic
runs on: anything that blocks it (a file system's fsync waiting behind
another program's writes, a long computation) stalls all of them at once,
and from outside it only looks like a slow daemon. The loop beats a timer
every ``BEAT`` seconds; how late each beat runs is its lag (the metric
``resync_event_loop_lag_seconds``). A thread of its own looks at the last
beat: once the loop has been blocked for ``STALL_LOG`` seconds it samples the
loop thread's stack (``sys._current_frames``) and logs where it is blocked,
once per stall, and how long the stall lasted when the loop runs again. The
same idea as Syncthing's deadlock detector (lib/model), for a loop.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback

BEAT = 0.05           # s between the loop's heartbeats
STALL_LOG = 0.5       # s the loop may be blocked before the log says where it is
FRAMES = 6            # innermost frames of the loop's stack logged


class LoopWatch:
    """Watch ``loop`` (call ``start`` from the loop's own thread; ``stop``
    from it too). ``log(line)``: a stall's lines; ``lag(seconds)``: each
    beat's lateness, for the metric (None: not measured)."""

    def __init__(self, loop, log, lag=None, stall_log: float = STALL_LOG):
        self.loop, self.log, self.lag, self.stall_log = loop, log, lag, stall_log
        self._last = time.monotonic()
        self._reported = 0.0                    # when the stall now logged began (0: none)
        self._ident = None
        self._timer = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="resync-loop-watch", daemon=True)

    def start(self) -> None:
        self._ident = threading.get_ident()
        self._last = time.monotonic()
        self._timer = self.loop.call_later(BEAT, self._beat)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()

    def _beat(self) -> None:
        now = time.monotonic()
        late = max(0.0, now - self._last - BEAT)
        if self.lag is not None:
            self.lag(late)
        began = self._reported
        if began:
            self._reported = 0.0
            self.log(f"the event loop ran again after {now - began:.1f} s blocked")
        self._last = now
        self._timer = self.loop.call_later(BEAT, self._beat)

    def _watch(self) -> None:
        while not self._stopped.wait(self.stall_log / 4):
            last = self._last
            blocked = time.monotonic() - last - BEAT
            if blocked < self.stall_log or self._reported == last:
                continue
            frame = sys._current_frames().get(self._ident)
            if frame is None:
                return
            where = " <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}"
                                for f in reversed(traceback.extract_stack(frame)[-FRAMES:]))
            del frame
            if self._last != last:                  # it ran again meanwhile: not this stall's stack
                continue
            self._reported = last
            self.log(f"the event loop is blocked ({blocked:.1f} s so far), at {where}")


def _short(path: str) -> str:
    """``.../resync/apply/tree.py`` -> ``resync/apply/tree.py``."""
    i = path.rfind("/resync/")
    if i >= 0:
        return path[i + 1:]
    i = path.rfind("/site-packages/")
    return path[i + len("/site-packages/"):] if i >= 0 else path
