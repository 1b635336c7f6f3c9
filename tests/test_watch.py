"""net.watch: a blocked event loop is found out, said in the log with where
it was blocked, and its lag measured."""
from __future__ import annotations

import asyncio
import time

from resync.net.watch import LoopWatch


def _blocking_callback() -> None:
    time.sleep(1.2)                             # (as an fsync waiting behind another program's writes)


def test_a_blocked_loop_is_logged_with_where_it_was_blocked_and_how_long():
    lines: list[str] = []
    lags: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = LoopWatch(loop, lines.append, lags.append, stall_log=0.5)
        watch.start()
        await asyncio.sleep(0.3)
        loop.call_soon(_blocking_callback)
        await asyncio.sleep(0.4)
        watch.stop()
    asyncio.run(main())
    blocked = [line for line in lines if "is blocked" in line]
    assert len(blocked) == 1, lines                         # once per stall, not once per look
    assert "tests/test_watch.py:" in blocked[0] and "_blocking_callback" in blocked[0], blocked
    again = [line for line in lines if "ran again after" in line]
    assert len(again) == 1 and 1.1 <= float(again[0].split("after ")[1].split()[0]) <= 2.0, lines
    assert max(lags) >= 1.1 and sorted(lags)[len(lags) // 2] < 0.05, lags


def test_a_loop_that_runs_on_time_logs_nothing():
    lines: list[str] = []
    lags: list[float] = []

    async def main() -> None:
        watch = LoopWatch(asyncio.get_running_loop(), lines.append, lags.append, stall_log=0.5)
        watch.start()
        for _ in range(20):
            await asyncio.sleep(0.02)
            time.sleep(0.01)                    # short work between awaits: no stall
        watch.stop()
    asyncio.run(main())
    assert lines == [] and len(lags) >= 3
