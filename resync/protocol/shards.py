"""A file's content as Reed-Solomon stripes, one shard per QUIC datagram.

The content (a file, or a delta) is cut into stripes of ``k`` data shards of
``size`` bytes (the last stripe zero-padded); parity shard ``k + j`` is row
``j`` of resync's Cauchy matrix (``resync.erasure``; row j does not depend on
how many rows are sent, so a repair simply sends the next rows). Any k shards
of a stripe rebuild it.

Datagram layout (little-endian)::

    u8 0xD5 | u32 file id | u32 stripe | u16 shard index | 8s check | size bytes

``check`` is the first 8 bytes of BLAKE3 over the 11 header bytes before it
and the shard: QUIC already protects packets on the wire, this catches a shard
corrupted above the transport (a bad relay, a test hook) — it is dropped and
counted as lost, and parity makes up for it.
"""
from __future__ import annotations

import struct

import numpy as np

from .frames import ProtocolError

MAGIC = 0xD5
HEAD = struct.Struct("<BIIH")
CHECK = 8
HEADER = HEAD.size + CHECK               # 19 bytes
MAX_INDEX = 256                          # k + all parity rows: GF(2^8)


def _check(head: bytes, payload) -> bytes:
    import blake3
    h = blake3.blake3(head)
    h.update(payload)
    return h.digest(CHECK)


def stripe_count(length: int, k: int, size: int) -> int:
    return -(-length // (k * size))


def parse(datagram: bytes) -> tuple[int, int, int, memoryview] | None:
    """(file id, stripe, index, payload) of a shard datagram, or None if it
    is not one or its check fails (a corrupt shard is a lost shard)."""
    if len(datagram) < HEADER or datagram[0] != MAGIC:
        return None
    _, file_id, stripe, index = HEAD.unpack_from(datagram, 0)
    view = memoryview(datagram)
    if _check(view[:HEAD.size], view[HEADER:]) != datagram[HEAD.size:HEADER]:
        return None
    return file_id, stripe, index, view[HEADER:]


class StripeEncoder:
    """Shards of one file's content. ``content``: a uint8 array (a memory map
    of the file or of the delta), read a stripe at a time."""

    def __init__(self, file_id: int, content: np.ndarray, k: int, size: int):
        self.file_id, self.k, self.size = file_id, k, size
        self.content = content
        self.length = int(content.shape[0])
        self.stripes = stripe_count(self.length, k, size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}      # stripe -> (data, parity rows so far)

    def _data(self, stripe: int) -> np.ndarray:
        lo = stripe * self.k * self.size
        chunk = self.content[lo:lo + self.k * self.size]
        if chunk.shape[0] < self.k * self.size:
            chunk = np.concatenate([chunk, np.zeros(self.k * self.size - chunk.shape[0], np.uint8)])
        return np.ascontiguousarray(chunk).reshape(self.k, self.size)

    def shards(self, stripe: int, indexes) -> list[bytes]:
        """Datagrams for ``indexes`` of ``stripe`` (< k data, >= k parity rows)."""
        if stripe in self._cache:
            data, parity = self._cache[stripe]
        else:
            data, parity = self._data(stripe), np.zeros((0, self.size), np.uint8)
        top = max(indexes) - self.k + 1
        if top > parity.shape[0]:
            from ..erasure import ReedSolomon
            if self.k + top > MAX_INDEX:
                raise ProtocolError(f"stripe {stripe}: more parity than GF(2^8) allows")
            parity = ReedSolomon(self.k, top).encode(data)
        self._cache[stripe] = (data, parity)
        out = []
        for i in indexes:
            payload = data[i] if i < self.k else parity[i - self.k]
            head = HEAD.pack(MAGIC, self.file_id, stripe, i)
            out.append(head + _check(head, payload) + payload.tobytes())
        return out

    def forget(self, stripe: int) -> None:
        """The stripe was acknowledged: drop what was kept for repairs."""
        self._cache.pop(stripe, None)


class StripeAssembler:
    """Puts one file's content back together from shards: ``add`` each one;
    a stripe is decoded as soon as k of its shards are in and handed to
    ``sink(offset, bytes)``. Memory: the shards of incomplete stripes only."""

    def __init__(self, file_id: int, length: int, k: int, size: int, sink):
        self.file_id, self.length, self.k, self.size, self.sink = file_id, length, k, size, sink
        self.stripes = stripe_count(length, k, size)
        self.done: set[int] = set()
        self._parts: dict[int, dict[int, bytes]] = {}
        self.received = 0                   # shards taken
        self.duplicates = 0
        self.repaired = 0                   # stripes rebuilt with parity

    @property
    def complete(self) -> bool:
        return len(self.done) == self.stripes

    def add(self, stripe: int, index: int, payload) -> bool:
        """Take one shard; True when it completed its stripe."""
        if stripe >= self.stripes or index >= MAX_INDEX or len(payload) != self.size:
            raise ProtocolError(f"file {self.file_id}: shard {stripe}/{index} does not fit its file")
        if stripe in self.done:
            self.duplicates += 1
            return False
        parts = self._parts.setdefault(stripe, {})
        if index in parts:
            self.duplicates += 1
            return False
        parts[index] = bytes(payload)
        self.received += 1
        if len(parts) < self.k:
            return False
        data = self._decode(parts)
        del self._parts[stripe]
        self.done.add(stripe)
        lo = stripe * self.k * self.size
        n = min(self.k * self.size, self.length - lo)
        self.sink(lo, data.reshape(-1)[:n])
        return True

    def _decode(self, parts: dict[int, bytes]) -> np.ndarray:
        if all(i in parts for i in range(self.k)):
            return np.frombuffer(b"".join(parts[i] for i in range(self.k)), np.uint8)
        from ..erasure import ReedSolomon
        self.repaired += 1
        top = max(parts) - self.k + 1
        rs = ReedSolomon(self.k, max(top, 1))
        shards = [parts.get(i) for i in range(rs.n)]
        return rs.decode(shards)

    def have(self, stripe: int) -> int:
        """Shards held for ``stripe`` (k when it is done)."""
        return self.k if stripe in self.done else len(self._parts.get(stripe, ()))

    def short(self) -> list[tuple[int, int]]:
        """(stripe, shards still needed) of every incomplete stripe."""
        return [(s, self.k - len(self._parts.get(s, ()))) for s in range(self.stripes) if s not in self.done]

    def highest_seen(self) -> int:
        """The highest stripe any shard arrived for (-1: none yet)."""
        top = max(self.done, default=-1)
        return max(top, max(self._parts, default=-1))
