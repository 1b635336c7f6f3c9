"""The bundle payload: what the shard file (``shards.py``) protects.

Little-endian throughout; a time is ``i64 seconds | u32 nanoseconds`` (see
``manifest.py``). Version 3 (version 2, still read, had no record flags and
no hole chunks; version 1, still read, stored every time as ``i64
nanoseconds`` and had no flags in tree-signature entries)::

    header   8s "RSYNCBDL" | u16 version 3 | u16 flags (1: made against a tree
             signature) | u32 0 | 16s bundle id | 32s tree signature id (or zeros)
             | i64 created (ns since the epoch)
    records  one per file whose content travels, in manifest order:
             u8 kind (1 whole, 2 delta) | u8 flags (1: sparse: the file's
             blocks of zeros are written as holes) | 2x 0 | u32 entry index
             | u64 length | body
             whole: length is the file's size (logical bytes, = the entry's
                    size); the body is chunks of u8 codec (0 raw, 1 LZ4 block,
                    2 hole) | u32 raw length (<= 4 MiB; a hole's <= 1 GiB) |
                    u32 stored length (a hole's: 0) | stored bytes, until the
                    raw lengths reach the file's size (each chunk's stored
                    length delimits it); a hole chunk stands for raw length
                    zeros, not stored and written as a hole (the source's
                    holes, and with pack -S its blocks of zeros)
             delta: length is the body's stored size; the body is a resync
                    delta against the destination's file at that path
    trailer  root: u32 mode | time mtime | u32 uid | u32 gid
             u64 n | n entries: path | u8 kind | u32 mode | time mtime | u64 size
                 | u32 uid | u32 gid | u64 rdev | 32s BLAKE3 (files) | u64 record
                 offset (2^64-1: content unchanged at the destination) | u16 +
                 symlink target
             u64 n | n tree-signature entries the destination must match:
                 path | u8 kind | u8 flags (1: unlisted, as in the tree
                 signature) | u64 size | time mtime
             u64 n | n paths to delete (in the tree signature, not in the source)
    footer   u64 trailer offset | u64 stored trailer length | u64 trailer length
             | 32s BLAKE3 of the stored trailer | 8s "RSYNCEND"

The trailer is stored as one LZ4 block (paths repeat their directories; this
makes it ~4x smaller); its length is capped by what LZ4 can expand to.

Manifest entries come parents first; the trailer is at the end so that pack
reads each source file once (its BLAKE3 is known after its record is written).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .manifest import (FLAG_UNLISTED, KIND_CODES, KINDS, MAX_PATH, MAX_SIZE, NONE, Cursor, ParentTracker,
                       join_time, mode_matches, pack_path, split_time)

MAGIC = b"RSYNCBDL"
END_MAGIC = b"RSYNCEND"
VERSION = 3
VERSIONS = (1, 2, 3)        # what this resync reads
FLAG_AGAINST = 1
RECORD_SPARSE = 1           # a record's flags (version 3)
HEADER = struct.Struct("<8sHHI16s32sq")
RECORD = struct.Struct("<BBxxIQ")
CHUNK = struct.Struct("<BII")
ENTRY = struct.Struct("<BIqIQIIQ32sQ")
AGAINST = struct.Struct("<BBQqI")
ROOT = struct.Struct("<IqIII")
ENTRY_V1 = struct.Struct("<BIqQIIQ32sQ")
AGAINST_V1 = struct.Struct("<BQq")
ROOT_V1 = struct.Struct("<IqII")
FOOTER = struct.Struct("<QQQ32s8s")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
WHOLE = 1
DELTA = 2
CODEC_RAW = 0
CODEC_LZ4 = 1
CODEC_HOLE = 2              # version 3: raw length zeros, nothing stored
MAX_CHUNK = 4 << 20
MAX_HOLE = 1 << 30          # a hole chunk's raw length, at most
CHUNK_RAW = 1 << 20          # what pack cuts files into
WHAT = "resync bundle"

_ZEROS = bytes(1 << 20)


def hash_zeros(hasher, n: int) -> None:
    """Feed ``n`` zero bytes to ``hasher`` (a hole chunk's share of its file's
    BLAKE3), a MiB at a time."""
    for lo in range(0, n, len(_ZEROS)):
        hasher.update(_ZEROS[:min(len(_ZEROS), n - lo)])


MAX_TRAILER = 1 << 34      # 16 GiB: far beyond any real tree, and checked before allocation
LZ4_MAX_RATIO = 255        # an LZ4 block cannot expand by more than this

assert HEADER.size == 72 and RECORD.size == 16 and FOOTER.size == 64


def store_trailer(raw: bytes) -> bytes:
    import lz4.block
    return lz4.block.compress(raw, store_size=False)


def footer(trailer_offset: int, raw: bytes, stored: bytes) -> bytes:
    import blake3
    return FOOTER.pack(trailer_offset, len(stored), len(raw), blake3.blake3(stored).digest(), END_MAGIC)


@dataclass(frozen=True)
class Entry:
    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int
    uid: int
    gid: int
    rdev: int
    blake3: bytes
    target: bytes
    record: int                 # payload offset of the record, NONE if no content travels

    @property
    def perms(self) -> int:
        return self.mode & 0o7777


@dataclass(frozen=True)
class Against:
    path: str
    kind: str
    size: int
    mtime_ns: int
    unlisted: bool = False          # a directory whose contents the tree signature does not describe


@dataclass(frozen=True)
class Root:
    """Attributes of the tree's root directory."""
    mode: int
    mtime_ns: int
    uid: int
    gid: int


@dataclass
class Trailer:
    root: Root
    entries: list[Entry]
    against: list[Against]
    deletions: list[str]


def pack_trailer(t: Trailer) -> bytes:
    """The trailer in the current version's layout."""
    seconds, nanoseconds = split_time(t.root.mtime_ns)
    out = bytearray(ROOT.pack(t.root.mode, seconds, nanoseconds, t.root.uid, t.root.gid))
    out += _U64.pack(len(t.entries))
    for e in t.entries:
        out += pack_path(e.path)
        out += ENTRY.pack(KIND_CODES[e.kind], e.mode, *split_time(e.mtime_ns), e.size, e.uid, e.gid, e.rdev,
                          e.blake3.ljust(32, b"\0"), e.record)
        out += _U16.pack(len(e.target)) + e.target
    out += _U64.pack(len(t.against))
    for a in t.against:
        out += pack_path(a.path) + AGAINST.pack(KIND_CODES[a.kind], FLAG_UNLISTED if a.unlisted else 0, a.size,
                                                *split_time(a.mtime_ns))
    out += _U64.pack(len(t.deletions))
    for path in t.deletions:
        out += pack_path(path)
    return bytes(out)


def unpack_trailer(buf, name: str, trailer_offset: int, against_flag: bool, version: int = VERSION) -> Trailer:
    """Parse and check a trailer (``buf`` holds just the trailer) of a
    payload of ``version``."""
    c = Cursor(buf, name, WHAT)
    v1 = version == 1
    if v1:
        mode, mtime_ns, uid, gid = c.unpack(ROOT_V1)
    else:
        mode, seconds, nanoseconds, uid, gid = c.unpack(ROOT)
        mtime_ns = join_time(seconds, nanoseconds, c, "the root")
    if not mode_matches("d", mode):
        c.bad(f"root mode {mode:o} is not a directory's")
    root = Root(mode, mtime_ns, uid, gid)
    entries: list[Entry] = []
    parents = ParentTracker(c)
    for _ in range(c.count(3 + ENTRY_V1.size + 2)):
        path = c.path()
        if v1:
            code, mode, mtime_ns, size, uid, gid, rdev, digest, record = c.unpack(ENTRY_V1)
        else:
            code, mode, seconds, nanoseconds, size, uid, gid, rdev, digest, record = c.unpack(ENTRY)
            mtime_ns = join_time(seconds, nanoseconds, c, path)
        (tlen,) = c.unpack(_U16)
        target = c.take(tlen)
        kind = KINDS.get(code)
        if kind is None or not mode_matches(kind, mode):
            c.bad(f"{path!r}: bad kind {code} or mode {mode:o}")
        if size > MAX_SIZE:
            c.bad(f"{path!r}: size {size} out of range")
        if kind == "L":
            if not 0 < tlen <= MAX_PATH or b"\0" in target:
                c.bad(f"{path!r}: bad symlink target")
        elif tlen:
            c.bad(f"{path!r}: only symlinks have a target")
        if record != NONE and (kind != "f" or not HEADER.size <= record < trailer_offset):
            c.bad(f"{path!r}: record offset {record} out of range")
        if kind == "f" and record == NONE and not against_flag:
            c.bad(f"{path!r}: file without content in a bundle made without a tree signature")
        parents.add(path, kind)
        entries.append(Entry(path, kind, mode, mtime_ns, size, uid, gid, rdev, digest, target, record))
    against: list[Against] = []
    against_parents = ParentTracker(c)
    for _ in range(c.count(3 + AGAINST_V1.size)):
        path = c.path()
        if v1:
            code, size, mtime_ns = c.unpack(AGAINST_V1)
            flags = 0
        else:
            code, flags, size, seconds, nanoseconds = c.unpack(AGAINST)
            mtime_ns = join_time(seconds, nanoseconds, c, path)
        kind = KINDS.get(code)
        if kind is None or size > MAX_SIZE or flags & ~FLAG_UNLISTED or (flags and kind != "d"):
            c.bad(f"{path!r}: bad tree signature entry")
        against_parents.add(path, kind, bool(flags))
        against.append(Against(path, kind, size, mtime_ns, bool(flags)))
    if against and not against_flag:
        c.bad("tree signature entries in a bundle made without one")
    old = {a.path: a for a in against}
    new = {e.path for e in entries}
    deletions = []
    for _ in range(c.count(3)):
        path = c.path()
        if path not in old or path in new:
            c.bad(f"deletion of {path!r} is not a path of the tree signature missing from the source")
        deletions.append(path)
    for e in entries:
        if e.kind == "f" and e.record == NONE:
            a = old.get(e.path)
            if a is None or a.kind != "f" or a.size != e.size:
                c.bad(f"{e.path!r}: no content, and the destination does not have it")
    if c.pos != c.end:
        c.bad("trailing data after the trailer")
    return Trailer(root, entries, against, deletions)
