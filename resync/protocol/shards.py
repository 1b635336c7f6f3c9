"""A file's content as Reed-Solomon stripes, one shard per QUIC datagram.

The content (a file, or a delta) is cut into stripes of ``k`` data shards of
``size`` bytes. The last stripe is shortened rather than padded: with ``r``
bytes left it has ``d = ceil(r / size)`` data shards of ``ceil(r / d)`` bytes
each (only the last one zero-padded, by fewer than d bytes), so a 100-byte file
is one 100-byte data shard, not k shards of ``size`` (``geometry``).

Shard indexes ``0 .. d-1`` of a stripe are its data shards; index ``d + j`` is
parity row ``j`` of resync's Cauchy matrix for ``d`` data shards
(``resync.erasure``; row j does not depend on how many rows are sent, so a
repair simply sends the next rows). Any ``d`` shards rebuild the stripe.

Datagram layout (little-endian)::

    u8 0xD5 | u32 file id | u32 stripe | u16 shard index | 8s check | shard bytes

A datagram whose first byte is 0x50 (``PROBE``) is the padding that fills a
path MTU probe to its size (resync.net.pmtu): the receiver drops it.

``check`` is the first 8 bytes of BLAKE3 over the 11 header bytes before it
and the shard: QUIC already protects packets on the wire, this catches a shard
corrupted above the transport (a bad relay, a test hook) — it is dropped and
counted as lost, and parity makes up for it. On the TLS stream (a reliable
transport: no parity to make up for a dropped shard, and TLS authenticates
every record end to end) ``check`` is zero and not looked at.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .frames import ProtocolError

if TYPE_CHECKING:                                # numpy is imported where content moves (70 ms of a
    import numpy as np                           # no-change run's start otherwise)

MAGIC = 0xD5
PROBE = b"\x50"                          # the first byte of a path MTU probe's padding datagram
HEAD = struct.Struct("<BIIH")
CHECK = 8
HEADER = HEAD.size + CHECK               # 19 bytes
NO_CHECK = bytes(CHECK)                  # the check on a reliable stream
MAX_INDEX = 256                          # k + all parity rows: GF(2^8)


def _check(head: bytes, payload) -> bytes:
    import blake3
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest(CHECK)


def stripe_count(length: int, k: int, size: int) -> int:
    return -(-length // (k * size))


def geometry(length: int, k: int, size: int, stripe: int) -> tuple[int, int]:
    """(data shards, shard bytes) of ``stripe`` of ``length`` bytes of content:
    (k, size) for every stripe but a shortened last one (see the module)."""
    left = length - stripe * k * size
    if left >= k * size:
        return k, size
    d = -(-left // size)
    return d, -(-left // d)


def parse(datagram: bytes, checked: bool = True) -> tuple[int, int, int, memoryview] | None:
    """(file id, stripe, index, payload) of a shard datagram, or None if it
    is not one or its check fails (a corrupt shard is a lost shard; not
    looked at unless ``checked``: see the module)."""
    if len(datagram) < HEADER or datagram[0] != MAGIC:
        return None
    _, file_id, stripe, index = HEAD.unpack_from(datagram, 0)
    view = memoryview(datagram)
    if checked and _check(view[:HEAD.size], view[HEADER:]) != datagram[HEAD.size:HEADER]:
        return None
    return file_id, stripe, index, view[HEADER:]


class StripeEncoder:
    """Shards of one file's content. ``content``: a uint8 array (a memory map
    of the file or of the delta), read a stripe at a time; or, unchecked,
    bytes (a pack's content on a reliable stream: cut without NumPy, so a
    first copy of small files never imports it). ``checked``: each shard
    carries its check (False on a reliable stream: zeros)."""

    def __init__(self, file_id: int, content, k: int, size: int, checked: bool = True):
        self.file_id, self.k, self.size, self.checked = file_id, k, size, checked
        self.content = content
        self.length = len(content) if isinstance(content, bytes) else int(content.shape[0])
        if isinstance(content, bytes) and checked and content:
            raise ValueError("a content of bytes is for an unchecked (reliable) stream")
        self.stripes = stripe_count(self.length, k, size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}      # stripe -> (data, parity rows so far)

    def geometry(self, stripe: int) -> tuple[int, int]:
        """(data shards, shard bytes) of ``stripe``."""
        return geometry(self.length, self.k, self.size, stripe)

    def _data(self, stripe: int) -> np.ndarray:
        import numpy as np                      # (imported when content moves: a run with none needs none)
        d, size = self.geometry(stripe)
        lo = stripe * self.k * self.size
        chunk = self.content[lo:lo + d * size]
        if chunk.shape[0] < d * size:
            chunk = np.concatenate([chunk, np.zeros(d * size - chunk.shape[0], np.uint8)])
        return np.ascontiguousarray(chunk).reshape(d, size)

    def shards(self, stripe: int, indexes) -> list[bytes]:
        """Datagrams for ``indexes`` of ``stripe`` (< d: data, >= d: parity rows)."""
        if isinstance(self.content, bytes):
            return self._plain(stripe, indexes)
        import numpy as np
        if stripe in self._cache:
            data, parity = self._cache[stripe]
        else:
            data = self._data(stripe)
            parity = np.zeros((0, data.shape[1]), np.uint8)
        d = data.shape[0]
        top = max(indexes, default=0) - d + 1
        if top > parity.shape[0]:
            from ..erasure import ReedSolomon
            if d + top > MAX_INDEX:
                raise ProtocolError(f"stripe {stripe}: more parity than GF(2^8) allows")
            parity = ReedSolomon(d, top).encode(data)
        self._cache[stripe] = (data, parity)
        out = []
        for i in indexes:
            payload = data[i] if i < d else parity[i - d]
            head = HEAD.pack(MAGIC, self.file_id, stripe, i)
            if self.checked:                    # (bytes: what QUIC's DATAGRAM frames take)
                out.append(head + _check(head, payload) + payload.tobytes())
                continue
            datagram = bytearray(HEADER + payload.shape[0])     # (one copy of a 1 MiB shard, not two)
            datagram[:HEAD.size] = head
            datagram[HEADER:] = memoryview(payload)
            out.append(datagram)
        return out

    def _plain(self, stripe: int, indexes) -> list[bytearray]:
        """Unchecked data shards of a bytes content: row i of the stripe, the
        last one padded with zeros (parity is never asked for on the
        reliable stream these are for)."""
        d, size = self.geometry(stripe)
        lo = stripe * self.k * self.size
        out = []
        for i in indexes:
            if i >= d:
                raise ProtocolError(f"stripe {stripe}: parity of a content sent without any")
            piece = self.content[lo + i * size:lo + (i + 1) * size]
            datagram = bytearray(HEADER + size)
            datagram[:HEAD.size] = HEAD.pack(MAGIC, self.file_id, stripe, i)
            datagram[HEADER:HEADER + len(piece)] = piece
            out.append(datagram)
        return out

    def forget(self, stripe: int) -> None:
        """The stripe was acknowledged: drop what was kept for repairs."""
        self._cache.pop(stripe, None)


class StripeAssembler:
    """Puts one file's content back together from shards: ``add`` each one;
    a stripe is decoded as soon as k of its shards are in and handed to
    ``sink(offset, bytes)``. Memory: the shards of incomplete stripes only.
    ``direct`` (a reliable transport: no parity, every data shard comes):
    each data shard goes to the sink at its own offset as it arrives,
    nothing is held, and a stripe is done when all its data shards are in."""

    def __init__(self, file_id: int, length: int, k: int, size: int, sink, direct: bool = False):
        self.file_id, self.length, self.k, self.size, self.sink = file_id, length, k, size, sink
        self.direct = direct
        self.stripes = stripe_count(length, k, size)
        self.done: set[int] = set()
        self._parts: dict[int, dict[int, bytes]] = {}
        self._written: dict[int, set[int]] = {}     # direct: stripe -> data shards written
        self.received = 0                   # shards taken
        self.duplicates = 0
        self.repaired = 0                   # stripes rebuilt with parity
        self.rebuilt = 0                    # data shards rebuilt from parity (missing when their stripe decoded)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.stripes

    def add(self, stripe: int, index: int, payload) -> bool:
        """Take one shard; True when it completed its stripe. ProtocolError
        for a shard that cannot belong to this file."""
        if stripe >= self.stripes or index >= MAX_INDEX:
            raise ProtocolError(f"file {self.file_id}: shard {stripe}/{index} does not fit its file")
        d, size = geometry(self.length, self.k, self.size, stripe)
        if len(payload) != size:
            raise ProtocolError(f"file {self.file_id}: shard {stripe}/{index} has {len(payload)} bytes, "
                                f"not {size}")
        if stripe in self.done:
            self.duplicates += 1
            return False
        if self.direct:
            return self._write(stripe, index, d, size, payload)
        parts = self._parts.setdefault(stripe, {})
        if index in parts:
            self.duplicates += 1
            return False
        parts[index] = bytes(payload)
        self.received += 1
        if len(parts) < d:
            return False
        data = self._decode(parts, d)
        lo = stripe * self.k * self.size
        self.sink(lo, data.reshape(-1)[:min(d * size, self.length - lo)])
        del self._parts[stripe]
        self.done.add(stripe)                   # only once it is written: a checkpoint lists done stripes
        return True

    def _write(self, stripe: int, index: int, d: int, size: int, payload) -> bool:
        written = self._written.setdefault(stripe, set())
        if index >= d or index in written:      # (no parity on a reliable transport)
            self.duplicates += 1
            return False
        lo = stripe * self.k * self.size + index * size
        self.sink(lo, payload[:min(size, self.length - lo)])
        written.add(index)
        self.received += 1
        if len(written) < d:
            return False
        del self._written[stripe]
        self.done.add(stripe)
        return True

    def mark_done(self, stripes) -> int:
        """Stripes already in the sink (kept from a cut transfer): done
        without shards. Returns their bytes of content."""
        total = 0
        for s in stripes:
            if 0 <= s < self.stripes and s not in self.done:
                self.done.add(s)
                self._parts.pop(s, None)
                self._written.pop(s, None)
                lo = s * self.k * self.size
                total += min(self.k * self.size, self.length - lo)
        return total

    def _decode(self, parts: dict[int, bytes], d: int) -> np.ndarray:
        import numpy as np
        if all(i in parts for i in range(d)):
            return np.frombuffer(b"".join(parts[i] for i in range(d)), np.uint8)
        from ..erasure import ReedSolomon
        self.repaired += 1
        self.rebuilt += sum(1 for i in range(d) if i not in parts)
        rs = ReedSolomon(d, max(max(parts) - d + 1, 1))
        return rs.decode([parts.get(i) for i in range(rs.n)])

    def need(self, stripe: int) -> int:
        """Shards still needed to rebuild ``stripe`` (0 when it is done)."""
        if stripe in self.done:
            return 0
        # (0, not less, for a stripe with all its shards whose write failed: the next shard retries it)
        return max(0, geometry(self.length, self.k, self.size, stripe)[0] - len(self._parts.get(stripe, ())))

    def short(self) -> list[tuple[int, int]]:
        """(stripe, shards still needed) of every incomplete stripe that lacks shards."""
        return [(s, n) for s in range(self.stripes) if s not in self.done and (n := self.need(s)) > 0]

    def lagging(self, below: int) -> list[tuple[int, int]]:
        """(stripe, shards still needed) of incomplete stripes that some
        shards arrived for, numbered below ``below``: stripes later ones have
        overtaken, whose missing shards are most likely lost."""
        return [(s, n) for s in self._parts if s < below and (n := self.need(s)) > 0]

    def highest_seen(self) -> int:
        """The highest stripe any shard arrived for (-1: none yet)."""
        top = max(self.done, default=-1)
        return max(top, max(self._parts, default=-1))
