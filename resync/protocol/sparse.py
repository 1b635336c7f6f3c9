"""Sparse files over the network: a file's data runs as one content, its
holes left out (docs/protocol.md: Sparse files). The sender reads the runs
through ``DataRuns`` (no copy of the file); the receiver writes each piece
of content back at its file offset (``scatter``) into a temp file cut to
the file's size, so the holes stay holes. With -S the runs leave out the
file's blocks of zeros as well (``zero_free_runs``)."""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from ..fs import nonzero_runs, pread_all, pwrite_all

if TYPE_CHECKING:
    import numpy as np

SCAN_STEP = 8 << 20         # bytes of a file read at a time to find its blocks of zeros


class DataRuns:
    """The data runs ``runs`` ((offset, length), sorted) of the file mapped
    as ``array``, seen as one content: ``view[lo:hi]`` gathers the bytes of
    content offsets lo..hi (what StripeEncoder reads a stripe at a time)."""

    def __init__(self, array: np.ndarray, runs):
        self.array, self.runs = array, list(runs)
        self.starts = [0]
        for _, n in self.runs:
            self.starts.append(self.starts[-1] + n)
        self.shape = (self.starts[-1],)

    def __getitem__(self, sl: slice) -> np.ndarray:
        import numpy as np
        lo, hi = max(0, sl.start or 0), min(self.shape[0], self.shape[0] if sl.stop is None else sl.stop)
        parts = []
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi and i < len(self.runs):
            off, n = self.runs[i]
            skip = lo - self.starts[i]
            take = min(n - skip, hi - lo)
            parts.append(self.array[off + skip:off + skip + take])
            lo += take
            i += 1
        if not parts:
            return np.zeros(0, np.uint8)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def blake3(self) -> bytes:
        """BLAKE3 of the content (the runs' bytes in order)."""
        import blake3
        h = blake3.blake3()
        for off, n in self.runs:
            h.update(self.array[off:off + n])
        return h.digest()


def scatter(fd: int, runs, starts: list[int], off: int, data) -> None:
    """Write ``data`` (content bytes from content offset ``off``) at the file
    offsets of the runs holding them."""
    import numpy as np
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    i = bisect.bisect_right(starts, off) - 1
    while view and i < len(runs):
        roff, n = runs[i]
        skip = off - starts[i]
        take = min(n - skip, len(view))
        pwrite_all(fd, view[:take], roff + skip)
        view, off, i = view[take:], off + take, i + 1


def content_starts(runs) -> list[int]:
    starts = [0]
    for _, n in runs:
        starts.append(starts[-1] + n)
    return starts


def zero_free_runs(fd: int, size: int, extents) -> list[tuple[int, int]] | None:
    """-S: the (offset, length) runs of the file open at ``fd`` that hold
    something other than zeros (fs.nonzero_runs, block-aligned), within its
    data ``extents`` (content.data_extents; None: the whole file). None when
    the file has no block of zeros (it is sent as it is)."""
    runs: list[tuple[int, int]] = []
    for offset, length in ([(0, size)] if extents is None else extents):
        for lo in range(offset, offset + length, SCAN_STEP):
            data = pread_all(fd, min(SCAN_STEP, offset + length - lo), lo)
            for a, b in nonzero_runs(data, lo):
                if runs and runs[-1][0] + runs[-1][1] == lo + a:
                    runs[-1] = (runs[-1][0], runs[-1][1] + b - a)
                else:
                    runs.append((lo + a, b - a))
    if extents is None and runs == [(0, size)]:
        return None
    return runs
