"""Threads for a session's work that may wait on the disk for long.

A receiver's end makes its files and directories durable (fsyncs), renames
them into place and deletes; on a file system another program is writing
to, one fsync waits for that program's data too (ext4's ordered journal:
seconds, measured beside a ``dd``). Done on the event loop, that stalled
every other transfer, the API and the metrics of a daemon at once. The
transport hands such work (``Session.run_blocking``) to these threads and
takes the session up again, on its loop, when the work is over.
"""
from __future__ import annotations

import asyncio
import threading

DISK_WORKERS = 8      # transfers whose end runs at once (fsyncs of many transfers share the journal's commits)

_pool = None
_pool_lock = threading.Lock()


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max_workers=DISK_WORKERS, thread_name_prefix="resync-disk")
        return _pool


def attach(session, drive) -> None:
    """Run ``session``'s blocking work on the disk workers; ``drive()``: what
    sends what the session has once the work is over (the link's).
    ``session.blocking(job, back)`` returns the job's future."""
    loop = asyncio.get_running_loop()

    def blocking(job, back) -> None:
        future = _executor().submit(job)

        def over() -> None:
            back(future)
            drive()

        def returned(_) -> None:
            try:
                loop.call_soon_threadsafe(over)
            except RuntimeError:                # the loop has closed: the process is stopping
                pass
        future.add_done_callback(returned)
        return future
    session.blocking = blocking
