"""Parity-protected shard files: a byte stream cut into Reed-Solomon stripes.

A shard file holds a payload (any byte stream) as stripes of k data shards
and m parity shards, all of one size S, written back to back::

    stripe 0: D0 D1 ... D(k-1) P0 ... P(m-1)   stripe 1: ...   last stripe: D0..D(d-1) P0..P(m-1)

The last stripe stores only the d data shards the payload reaches (the rest
are zeros, implied). Each shard is a 64-byte header and S payload bytes; the
header is self-describing, so every shard can be checked and placed on its
own and damage is located, not just detected (little-endian)::

    0  8s   magic "RSYNCSHD"                  20  u32 shard size S
    8  u16  format version (1)                24  u64 payload length (whole stream)
    10 u16  k                                 32  16s bundle id
    12 u16  m                                 48  16s check: BLAKE3(bytes 0..47 ||
    14 u16  index (0..k-1 data, k.. parity)           BLAKE3(the S payload bytes))[:16]
    16 u32  stripe

Shard positions follow from k, m, S and the payload length alone, so a reader
that finds any one intact header can locate every other shard, however
damaged their headers are.

Writing streams: stripes are emitted as the payload arrives (one stripe in
memory), and when the payload turns out longer than one stripe, the headers
written before its length was known are rewritten at the end. Payloads that
fit in one stripe get a shard size that fits them.
"""
from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import FileError, FormatError, UnrecoverableError, UsageError
from ..fs import pwrite_all
from ..erasure import MAX_SHARDS, ReedSolomon, multiply

SHARD_MAGIC = b"RSYNCSHD"
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct("<8sHHHHIIQ16s")   # then the 16-byte check
HEADER_SIZE = 64
HASH_LEN = 16
DEFAULT_K = 50
DEFAULT_M = 10
DEFAULT_SHARD = 64 << 10
MIN_SHARD = 64
MAX_SHARD = 16 << 20
MAX_PAYLOAD = 1 << 50
_FIND_WINDOW = 64 << 20         # how far into a damaged file to look for an intact header

assert SHARD_HEADER.size == HEADER_SIZE - HASH_LEN


def _digest(payload) -> bytes:
    import blake3
    return blake3.blake3(payload, max_threads=1).digest()


def _check(header: bytes, digest: bytes) -> bytes:
    import blake3
    return blake3.blake3(header + digest, max_threads=1).digest(HASH_LEN)


@dataclass(frozen=True)
class Layout:
    """Where every shard of a shard file lies."""
    k: int
    m: int
    shard_size: int
    payload_len: int
    bundle_id: bytes

    @property
    def stripe_data(self) -> int:
        return self.k * self.shard_size

    @property
    def stripes(self) -> int:
        return max(1, -(-self.payload_len // self.stripe_data))

    @property
    def slot(self) -> int:
        return HEADER_SIZE + self.shard_size

    def data_shards(self, stripe: int) -> int:
        """Data shards stored in ``stripe`` (the last one may hold fewer than k)."""
        if stripe < self.stripes - 1:
            return self.k
        rest = self.payload_len - stripe * self.stripe_data
        return max(1, -(-rest // self.shard_size))

    def stored(self, stripe: int) -> list[int]:
        """Indexes of the shards stored for ``stripe``, in file order."""
        return list(range(self.data_shards(stripe))) + list(range(self.k, self.k + self.m))

    def stripe_offset(self, stripe: int) -> int:
        return stripe * (self.k + self.m) * self.slot

    def stripe_bytes(self, stripe: int) -> int:
        return len(self.stored(stripe)) * self.slot

    def stripe_payload(self, stripe: int) -> int:
        """Payload bytes in ``stripe``."""
        return min(self.stripe_data, self.payload_len - stripe * self.stripe_data)

    @property
    def file_size(self) -> int:
        last = self.stripes - 1
        return self.stripe_offset(last) + self.stripe_bytes(last)

    def header(self, stripe: int, index: int) -> bytes:
        return SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.k, self.m, index, stripe,
                                 self.shard_size, self.payload_len, self.bundle_id)


def check_parameters(k: int, m: int, shard_size: int = DEFAULT_SHARD) -> None:
    if not 1 <= k or m < 1 or k + m > MAX_SHARDS:
        raise UsageError(f"parity K,M needs K >= 1, M >= 1 and K + M <= {MAX_SHARDS} (got {k},{m})")
    if not MIN_SHARD <= shard_size <= MAX_SHARD or shard_size % MIN_SHARD:
        raise UsageError(f"shard size must be a multiple of {MIN_SHARD} between {MIN_SHARD} and {MAX_SHARD}")


class ShardWriter:
    """Write a payload stream as a shard file to the open descriptor ``fd``
    (positioned at 0). ``write()`` the payload, then ``close()``."""

    def __init__(self, fd: int, bundle_id: bytes, k: int = DEFAULT_K, m: int = DEFAULT_M,
                 shard_size: int = DEFAULT_SHARD):
        check_parameters(k, m, shard_size)
        if len(bundle_id) != 16:
            raise UsageError("bundle id must be 16 bytes")
        self.fd = fd
        self.bundle_id = bundle_id
        self.k, self.m, self.max_shard = k, m, shard_size
        self.rs = ReedSolomon(k, m)
        self._buf = np.zeros(k * shard_size, np.uint8)
        self._fill = 0
        self._total = 0
        self._stripes = 0
        # digests of shards written before the payload length was known: their
        # headers are rewritten at the end (just the 64 header bytes each)
        self._provisional: list[list[bytes]] = []
        self.layout: Layout | None = None

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self._buf.shape[0] - self._fill)
            self._buf[self._fill:self._fill + n] = np.frombuffer(view[:n], np.uint8)
            self._fill += n
            self._total += n
            view = view[n:]
            if self._fill == self._buf.shape[0]:
                digests = self._emit(Layout(self.k, self.m, self.max_shard, 0, self.bundle_id), self.k)
                self._provisional.append(digests)

    def _emit(self, layout: Layout, data_shards: int) -> list[bytes]:
        """Write the buffered payload as stripe ``self._stripes``; returns the
        digests of its stored shards."""
        s, slot, k, m = layout.shard_size, layout.slot, self.k, self.m
        used = data_shards * s
        self._buf[self._fill:k * s] = 0          # padding and implied zero shards
        out = np.empty((data_shards + m) * slot, np.uint8)
        rows = out.reshape(data_shards + m, slot)
        rows[:data_shards, HEADER_SIZE:] = self._buf[:used].reshape(data_shards, s)
        self.rs.encode_into(self._buf[:k * s], np.arange(k, dtype=np.int64) * s, out,
                            np.arange(data_shards, data_shards + m, dtype=np.int64) * slot + HEADER_SIZE, s)
        stripe = self._stripes
        digests = []
        for pos, index in enumerate(list(range(data_shards)) + list(range(k, k + m))):
            digest = _digest(rows[pos, HEADER_SIZE:])
            header = layout.header(stripe, index)
            rows[pos, :HEADER_SIZE] = np.frombuffer(header + _check(header, digest), np.uint8)
            digests.append(digest)
        pwrite_all(self.fd, out, layout.stripe_offset(stripe))
        self._stripes += 1
        self._fill = 0
        return digests

    def close(self) -> Layout:
        """Write the last stripe and the final headers; returns the layout."""
        if self._stripes == 0:
            # the whole payload is in memory: a shard size that fits it
            s = -(-max(1, -(-self._total // self.k)) // MIN_SHARD) * MIN_SHARD
            layout = Layout(self.k, self.m, min(s, self.max_shard), self._total, self.bundle_id)
        else:
            layout = Layout(self.k, self.m, self.max_shard, self._total, self.bundle_id)
        if self._fill or self._total == 0:
            self._emit(layout, layout.data_shards(self._stripes))
        for stripe, digests in enumerate(self._provisional):
            base = layout.stripe_offset(stripe)
            for pos, (index, digest) in enumerate(zip(layout.stored(stripe), digests)):
                header = layout.header(stripe, index)
                pwrite_all(self.fd, header + _check(header, digest), base + pos * layout.slot)
        self._provisional = []
        self.layout = layout
        return layout


def _read_exact(fd: int, offset: int, size: int) -> bytes:
    out = os.pread(fd, size, offset)
    while len(out) < size:
        more = os.pread(fd, size - len(out), offset + len(out))
        if not more:
            break
        out += more
    return out


@dataclass(frozen=True)
class StripeHealth:
    stripe: int
    stored: int             # shards the layout says are stored
    bad: tuple[int, ...]    # indexes of missing or damaged shards
    m: int

    @property
    def repairable(self) -> bool:
        return len(self.bad) <= self.m


class ShardReader:
    """Read a shard file: find its layout from any intact header, check each
    stripe's shards, and give back the payload, reconstructed where needed."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name
        self.size = os.fstat(fd).st_size
        self.layout = self._find_layout()
        self.rs = ReedSolomon(self.layout.k, self.layout.m)

    def _bad(self, why: str):
        raise FormatError(self.name, "resync bundle", why)

    def _layout_at(self, offset: int) -> Layout | None:
        """The layout declared by an intact shard at ``offset``, if there is one
        and it lies where its own fields say it should."""
        head = _read_exact(self.fd, offset, HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            return None
        magic, version, k, m, index, stripe, shard_size, payload_len, bundle_id = \
            SHARD_HEADER.unpack_from(head, 0)
        if magic != SHARD_MAGIC or version != SHARD_VERSION:
            return None
        if not (1 <= k and 1 <= m and k + m <= MAX_SHARDS and index < k + m
                and MIN_SHARD <= shard_size <= MAX_SHARD and shard_size % MIN_SHARD == 0
                and payload_len <= MAX_PAYLOAD):
            return None
        layout = Layout(k, m, shard_size, payload_len, bundle_id)
        if stripe >= layout.stripes or index not in layout.stored(stripe):
            return None
        if offset != layout.stripe_offset(stripe) + layout.stored(stripe).index(index) * layout.slot:
            return None
        payload = _read_exact(self.fd, offset + HEADER_SIZE, shard_size)
        if len(payload) < shard_size or _check(head[:HEADER_SIZE - HASH_LEN], _digest(payload)) != \
                head[HEADER_SIZE - HASH_LEN:]:
            return None
        return layout

    def _find_layout(self) -> Layout:
        """From the first shard; if its header is damaged, from the first
        intact one found scanning the start of the file (a piece at a time)."""
        if self.size == 0:
            self._bad("empty file")
        layout = self._layout_at(0)
        if layout is not None:
            return layout
        piece = 1 << 20
        seen_magic = False
        for base in range(0, min(self.size, _FIND_WINDOW), piece):
            window = _read_exact(self.fd, base, piece + len(SHARD_MAGIC) - 1)
            pos = window.find(SHARD_MAGIC)
            while 0 <= pos < piece:
                seen_magic = True
                layout = self._layout_at(base + pos)
                if layout is not None:
                    return layout
                pos = window.find(SHARD_MAGIC, pos + 1)
        head = _read_exact(self.fd, 0, len(SHARD_MAGIC))
        if seen_magic or (len(head) < len(SHARD_MAGIC) and SHARD_MAGIC.startswith(head)):
            # a bundle (it has resync shards), but not one shard can be checked: truncated or destroyed
            raise UnrecoverableError(self.name, "no intact shard left (truncated or damaged beyond repair)")
        self._bad("bad magic (no resync shard found)")

    def _shard_ok(self, block: bytes, pos: int, stripe: int, index: int) -> bool:
        lay = self.layout
        if len(block) < pos + lay.slot:
            return False
        header = lay.header(stripe, index)
        if block[pos:pos + HEADER_SIZE - HASH_LEN] != header:
            return False
        return _check(header, _digest(block[pos + HEADER_SIZE:pos + lay.slot])) == \
            block[pos + HEADER_SIZE - HASH_LEN:pos + HEADER_SIZE]

    def read_stripe(self, stripe: int) -> tuple[bytes, list[int]]:
        """The stripe's stored bytes as on disk (short if the file is) and the
        indexes of its missing or damaged shards."""
        lay = self.layout
        block = _read_exact(self.fd, lay.stripe_offset(stripe), lay.stripe_bytes(stripe))
        bad = [index for pos, index in enumerate(lay.stored(stripe))
               if not self._shard_ok(block, pos * lay.slot, stripe, index)]
        return block, bad

    def health(self):
        """StripeHealth of every stripe, in order."""
        for s in range(self.layout.stripes):
            _, bad = self.read_stripe(s)
            yield StripeHealth(s, len(self.layout.stored(s)), tuple(bad), self.layout.m)

    @property
    def trailing_bytes(self) -> int:
        """Bytes past the end the layout implies (appended junk)."""
        return max(0, self.size - self.layout.file_size)

    def stripe_shards(self, stripe: int) -> np.ndarray:
        """All k + m shards of ``stripe`` as a (k + m, S) array, damaged ones
        rebuilt from the others. UnrecoverableError beyond m bad shards."""
        lay = self.layout
        block, bad = self.read_stripe(stripe)
        s, slot, k, m = lay.shard_size, lay.slot, lay.k, lay.m
        stored = lay.stored(stripe)
        full = np.zeros((k + m, s), np.uint8)       # implied data shards stay zero
        present = []
        raw = np.frombuffer(block, np.uint8)
        for pos, index in enumerate(stored):
            if index in bad:
                continue
            full[index] = raw[pos * slot + HEADER_SIZE:(pos + 1) * slot]
            present.append(index)
        present += [i for i in range(lay.data_shards(stripe), k)]      # implied zeros are known
        if bad:
            if len(bad) > m:
                raise UnrecoverableError(
                    f"{self.name}: stripe {stripe}",
                    f"{len(bad)} of {len(stored)} shards damaged or missing, parity repairs {m}")
            chosen, recover = self.rs.plan(present, bad)
            flat = full.reshape(-1)
            # the rows rebuilt are not among the rows read: one buffer is safe
            multiply(recover, flat, np.array(chosen, np.int64) * s, flat,
                     np.array(bad, np.int64) * s, s)
        return full

    def stripe_payload(self, stripe: int) -> memoryview:
        """The payload bytes held by ``stripe``, reconstructed where needed."""
        full = self.stripe_shards(stripe)
        n = self.layout.stripe_payload(stripe)
        return memoryview(full[:self.layout.k].reshape(-1)[:n])

    def payload(self):
        """The whole payload, stripe by stripe (memoryviews)."""
        for s in range(self.layout.stripes):
            yield self.stripe_payload(s)


def rewrite(reader: ShardReader, fd: int) -> int:
    """Write the shard file ``reader`` holds, every damaged shard rebuilt, to
    ``fd``: byte-identical to the file as written. One pass: UnrecoverableError
    at the first stripe with more than m bad shards (the caller writes to a
    temp file, which is then dropped). Returns the number of shards rebuilt."""
    lay = reader.layout
    rebuilt = 0
    for stripe in range(lay.stripes):
        block, bad = reader.read_stripe(stripe)
        if bad:
            full = reader.stripe_shards(stripe)          # raises beyond m bad shards
            out = bytearray()
            for index in lay.stored(stripe):
                header = lay.header(stripe, index)
                out += header + _check(header, _digest(full[index])) + full[index].tobytes()
            block = bytes(out)
            rebuilt += len(bad)
        pwrite_all(fd, block, lay.stripe_offset(stripe))
    return rebuilt


@contextmanager
def open_bundle(path: str):
    """A ShardReader on the file at ``path`` (closed afterwards)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FileError.from_os(path, exc) from None
    try:
        yield ShardReader(fd, path)
    finally:
        os.close(fd)
