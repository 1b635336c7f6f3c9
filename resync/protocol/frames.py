"""Control frames: pure encode/decode pairs (docs/protocol.md has the layouts).

Every frame on the control stream is ``u32 length | u8 type | body``,
little-endian, ``length`` counting the type byte and the body and at most
MAX_FRAME. Strings of bytes are ``u16 length | bytes`` (names, paths, short
messages) or ``u32 length | bytes`` (signatures, listings, statistics). A
decoder never allocates by a length it was sent before checking it against
what it holds, and raises ``ProtocolError`` (exit 12) for anything malformed:
an unknown type, a truncated body, trailing bytes, a value out of range, a
name that could escape a directory.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ResyncError

VERSION = 3                        # 2: Want.resume, File.content, Hello.bwlimit (session 6);
#                                    3: packs, wire signatures and deltas (protocol.encodings; session 10)
MAX_FRAME = 16 << 20
MAX_ENTRIES = 1 << 20           # entries in one directory frame
NAME_MAX = 255

_U8, _U16, _U32, _U64, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q", "<q"))
_HEAD = struct.Struct("<IB")
# fixed runs of fields, packed in one call (the same bytes as field by field)
_LISTED_FIXED = struct.Struct("<BIqIQIIQ")        # kind, mode, seconds, nanoseconds, size, uid, gid, rdev
_FILE_FIXED = struct.Struct("<IBBQ32sIqIQIIHHI")  # file id, status, delta, length, blake3, mode, seconds,
#                                                   nanoseconds, size, uid, gid, k, m, shard size


class ProtocolError(ResyncError):
    """protocol error: {}"""

    exit_code = 12


# -- the frames ----------------------------------------------------------------------

class Hello(NamedTuple):           # client -> server, first
    version: int
    push: bool                     # True: the client sends files; False: it receives them
    client_key: bytes              # 32-byte Ed25519 public key
    nonce: bytes                   # 16 bytes
    flags: int                     # FLAG_* below
    max_delete: int                # -1: no limit
    module: bytes
    path: bytes                    # relative to the module, "" for its root
    excludes: bytes                # newline-separated patterns
    bwlimit: int = 0               # bytes per second the sender may send (the client's --bwlimit); 0: no limit


FLAG_DELETE, FLAG_CHECKSUM, FLAG_DRY_RUN, FLAG_WHOLE_FILE, FLAG_ITEMIZE = 1, 2, 4, 8, 16


class Challenge(NamedTuple):       # server -> client
    nonce: bytes                   # 16 bytes


class Auth(NamedTuple):            # client -> server
    signature: bytes               # 64 bytes, see session.auth_message


class Welcome(NamedTuple):         # server -> client: authenticated; the transfer starts
    window: int                    # bytes of content the receiver takes before acknowledging


class Error(NamedTuple):           # either way; the connection ends
    code: int
    message: bytes


class Dir(NamedTuple):             # sender -> receiver: one directory's listing
    index: int
    rel: bytes
    attrs: "Listed"                # the directory itself (name empty)
    entries: tuple                 # of Listed, sorted by name
    gone: tuple                    # names that vanished while being listed


class Listed(NamedTuple):          # one entry of a Dir frame
    name: bytes
    kind: int                      # 1 file, 2 dir, 3 symlink, 4 device, 5 fifo/socket
    mode: int
    seconds: int
    nanoseconds: int
    size: int
    uid: int
    gid: int
    rdev: int
    target: bytes                  # symlinks
    blake3: bytes                  # 32 bytes with FLAG_CHECKSUM (files), else empty


class DirFailed(NamedTuple):       # sender -> receiver: a directory could not be listed
    index: int
    rel: bytes
    errno: int
    message: bytes


class ListEnd(NamedTuple):         # sender -> receiver: no more directories
    pass


class Want(NamedTuple):            # receiver -> sender: send this file
    file_id: int
    dir_index: int
    name: bytes
    signature: bytes               # the receiver's copy's block signature (delta), or empty (whole)
    resume: "Resume | None" = None  # content the receiver kept from a cut transfer


class Resume(NamedTuple):          # in a Want: stripes of earlier content the receiver holds
    content: bytes                 # 32: BLAKE3 of that content (File.content of the cut transfer)
    length: int                    # its length in bytes
    k: int                         # the stripe geometry it was cut into (File.k, File.shard_size)
    shard_size: int
    stripes: tuple                 # (first stripe, count) ranges held, checked and durable


class File(NamedTuple):            # sender -> receiver: a file's content follows as shards
    file_id: int
    status: int                    # FILE_OK, FILE_VANISHED, FILE_ERROR
    delta: bool                    # content is a resync delta (else the file itself)
    length: int                    # bytes of content
    blake3: bytes                  # 32: BLAKE3 of the file the content makes
    mode: int
    seconds: int
    nanoseconds: int
    size: int
    uid: int
    gid: int
    k: int
    m: int                         # parity shards sent with every stripe
    shard_size: int
    message: bytes
    content: bytes = bytes(32)     # 32: BLAKE3 of the content (the file itself, or the delta)


FILE_OK, FILE_VANISHED, FILE_ERROR = 0, 1, 2


class Ack(NamedTuple):             # receiver -> sender: these stripes are complete
    file_id: int
    stripes: tuple


class Repair(NamedTuple):          # receiver -> sender: these stripes need more shards
    file_id: int
    needs: tuple                   # of (stripe, shards needed)


class FileDone(NamedTuple):        # receiver -> sender: the file is in place (or failed)
    file_id: int
    ok: bool
    message: bytes


class Pack(NamedTuple):            # sender -> receiver: small files' contents follow as one content's shards
    pack_id: int                   # PACK_BASE and up (file ids are below it)
    codec: int                     # 0 raw, 1 LZ4 block
    raw_length: int                # bytes of members (encodings.decode_members) once decoded
    length: int                    # bytes of content as sent (the shards')
    k: int
    m: int
    shard_size: int


PACK_BASE = 0x80000000             # pack ids start here; a receiver's file ids stay below
PACK_MAX = 16 << 20                # the most member bytes a pack may hold


class Item(NamedTuple):            # receiver -> client: an itemized line or an error (push)
    kind: int                      # ITEM_LINE, ITEM_ERROR, ITEM_VANISHED
    text: bytes


ITEM_LINE, ITEM_ERROR, ITEM_VANISHED = 0, 1, 2


class Done(NamedTuple):            # receiver -> sender: finished; its statistics
    stats: bytes                   # JSON


class Bye(NamedTuple):             # sender -> receiver: seen; the connection may close
    pass


# -- the codec ---------------------------------------------------------------------------

class _W:
    __slots__ = ("b",)

    def __init__(self):
        self.b = bytearray()

    def u8(self, v): self.b += _U8.pack(v)
    def u16(self, v): self.b += _U16.pack(v)
    def u32(self, v): self.b += _U32.pack(v)
    def u64(self, v): self.b += _U64.pack(v)
    def i64(self, v): self.b += _I64.pack(v)
    def raw(self, v): self.b += v
    def fixed(self, st, *v): self.b += st.pack(*v)

    def s16(self, v: bytes):
        if len(v) > 0xFFFF:
            raise ProtocolError(f"a string of {len(v)} bytes does not fit a frame field")
        self.u16(len(v))
        self.b += v

    def s32(self, v: bytes):
        self.u32(len(v))
        self.b += v


class _R:
    __slots__ = ("b", "p", "what")

    def __init__(self, b, what: str):
        self.b, self.p, self.what = memoryview(b), 0, what

    def _take(self, st):
        if self.p + st.size > len(self.b):
            raise ProtocolError(f"{self.what}: truncated")
        (v,) = st.unpack_from(self.b, self.p)
        self.p += st.size
        return v

    def fixed(self, st) -> tuple:
        """The fields of the struct ``st``."""
        if self.p + st.size > len(self.b):
            raise ProtocolError(f"{self.what}: truncated")
        v = st.unpack_from(self.b, self.p)
        self.p += st.size
        return v

    def u8(self): return self._take(_U8)
    def u16(self): return self._take(_U16)
    def u32(self): return self._take(_U32)
    def u64(self): return self._take(_U64)
    def i64(self): return self._take(_I64)

    def raw(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.b):
            raise ProtocolError(f"{self.what}: truncated")
        v = bytes(self.b[self.p:self.p + n])
        self.p += n
        return v

    def s16(self) -> bytes:
        return self.raw(self.u16())

    def s32(self) -> bytes:
        return self.raw(self.u32())

    def end(self) -> None:
        if self.p != len(self.b):
            raise ProtocolError(f"{self.what}: {len(self.b) - self.p} bytes of trailing data")


def check_name(name: bytes, what: str) -> bytes:
    """A single path component a peer sent: not empty, not . or .., no / or NUL."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX:
        raise ProtocolError(f"{what}: bad name {name[:64]!r}")
    return name


def check_rel(rel: bytes, what: str) -> bytes:
    """A relative directory path a peer sent ("" for the root): components as check_name."""
    if rel:
        if len(rel) > 4095:
            raise ProtocolError(f"{what}: path too long")
        for part in rel.split(b"/"):
            check_name(part, what)
    return rel


def _listed(w: _W, e: Listed) -> None:
    w.s16(e.name)
    w.fixed(_LISTED_FIXED, e.kind, e.mode, e.seconds, e.nanoseconds, e.size, e.uid, e.gid, e.rdev)
    w.s16(e.target)
    w.s16(e.blake3)


def _read_listed(r: _R, own: bool = False) -> Listed:
    name = r.s16()
    if own:
        if name:
            raise ProtocolError("Dir: the directory's own entry has a name")
    else:
        check_name(name, "directory entry")
    fixed = r.fixed(_LISTED_FIXED)
    kind = fixed[0]
    if not 1 <= kind <= 5:
        raise ProtocolError(f"directory entry {name[:64]!r}: bad kind {kind}")
    e = Listed(name, *fixed, r.s16(), r.s16())
    if e.nanoseconds >= 10**9 or e.size > 1 << 62 or len(e.blake3) not in (0, 32) \
            or (kind == 3) != bool(e.target) or b"\0" in e.target:
        raise ProtocolError(f"directory entry {name[:64]!r}: bad field")
    return e


def encode(frame) -> bytes:
    """One frame, with its length prefix."""
    w = _W()
    t = type(frame)
    if t is Hello:
        w.u16(frame.version)
        w.u8(1 if frame.push else 2)
        w.raw(_fixed(frame.client_key, 32))
        w.raw(_fixed(frame.nonce, 16))
        w.u32(frame.flags)
        w.i64(frame.max_delete)
        w.s16(frame.module)
        w.s16(frame.path)
        w.s32(frame.excludes)
        w.u64(frame.bwlimit)
    elif t is Challenge:
        w.raw(_fixed(frame.nonce, 16))
    elif t is Auth:
        w.raw(_fixed(frame.signature, 64))
    elif t is Welcome:
        w.u64(frame.window)
    elif t is Error:
        w.u16(frame.code)
        w.s16(frame.message[:4000])
    elif t is Dir:
        import lz4.block
        body = _W()
        _listed(body, frame.attrs)
        body.u32(len(frame.entries))
        for e in frame.entries:
            _listed(body, e)
        body.u32(len(frame.gone))
        for name in frame.gone:
            body.s16(name)
        raw = bytes(body.b)
        packed = lz4.block.compress(raw, store_size=False)
        w.u32(frame.index)
        w.s16(frame.rel)
        if len(packed) < len(raw):
            w.u8(1)
            w.u32(len(raw))
            w.s32(packed)
        else:
            w.u8(0)
            w.u32(len(raw))
            w.s32(raw)
    elif t is DirFailed:
        w.u32(frame.index)
        w.s16(frame.rel)
        w.u16(frame.errno)
        w.s16(frame.message[:4000])
    elif t in (ListEnd, Bye):
        pass
    elif t is Want:
        w.u32(frame.file_id)
        w.u32(frame.dir_index)
        w.s16(frame.name)
        w.s32(frame.signature)
        if frame.resume is None:
            w.u8(0)
        else:
            w.u8(1)
            w.raw(_fixed(frame.resume.content, 32))
            w.u64(frame.resume.length)
            w.u16(frame.resume.k)
            w.u32(frame.resume.shard_size)
            w.u32(len(frame.resume.stripes))
            for first, count in frame.resume.stripes:
                w.u32(first)
                w.u32(count)
    elif t is File:
        w.fixed(_FILE_FIXED, frame.file_id, frame.status, 1 if frame.delta else 0, frame.length,
                _fixed(frame.blake3, 32), frame.mode, frame.seconds, frame.nanoseconds, frame.size, frame.uid,
                frame.gid, frame.k, frame.m, frame.shard_size)
        w.s16(frame.message[:4000])
        w.raw(_fixed(frame.content, 32))
    elif t is Pack:
        w.u32(frame.pack_id)
        w.u8(frame.codec)
        w.u32(frame.raw_length)
        w.u32(frame.length)
        w.u16(frame.k)
        w.u16(frame.m)
        w.u32(frame.shard_size)
    elif t is Ack:
        w.u32(frame.file_id)
        w.u32(len(frame.stripes))
        for s in frame.stripes:
            w.u32(s)
    elif t is Repair:
        w.u32(frame.file_id)
        w.u32(len(frame.needs))
        for s, need in frame.needs:
            w.u32(s)
            w.u16(need)
    elif t is FileDone:
        w.u32(frame.file_id)
        w.u8(1 if frame.ok else 0)
        w.s16(frame.message[:4000])
    elif t is Item:
        w.u8(frame.kind)
        w.s16(frame.text[:0xFFFF])
    elif t is Done:
        w.s32(frame.stats)
    else:
        raise TypeError(f"not a frame: {frame!r}")
    body = bytes(w.b)
    if len(body) + 1 > MAX_FRAME:
        raise ProtocolError(f"a {t.__name__} frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _HEAD.pack(len(body) + 1, _TYPES[t]) + body


def _fixed(v: bytes, n: int) -> bytes:
    if len(v) != n:
        raise ValueError(f"expected {n} bytes, got {len(v)}")
    return v


def decode(kind: int, body) -> object:
    """The frame of type ``kind`` from its body (without the length and type)."""
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown frame type {kind:#x}")
    r = _R(body, cls.__name__)
    if cls is Hello:
        version = r.u16()
        if version != VERSION:                 # before the rest: another version lays it out otherwise
            raise ProtocolError(f"version {version} not supported (this end speaks {VERSION})")
        direction = r.u8()
        if direction not in (1, 2):
            raise ProtocolError(f"Hello: bad direction {direction}")
        f = Hello(version, direction == 1, r.raw(32), r.raw(16), r.u32(), r.i64(), r.s16(), r.s16(), r.s32(),
                  r.u64())
        if len(f.excludes) > 1 << 20:
            raise ProtocolError("Hello: excludes too long")
    elif cls is Challenge:
        f = Challenge(r.raw(16))
    elif cls is Auth:
        f = Auth(r.raw(64))
    elif cls is Welcome:
        f = Welcome(r.u64())
    elif cls is Error:
        f = Error(r.u16(), r.s16())
    elif cls is Dir:
        import lz4.block
        index, rel, codec, raw_len, stored = r.u32(), check_rel(r.s16(), "Dir"), r.u8(), r.u32(), r.s32()
        if codec not in (0, 1) or raw_len > MAX_FRAME * 255 or (codec == 0 and raw_len != len(stored)):
            raise ProtocolError("Dir: bad listing header")
        if codec == 1:
            if raw_len > len(stored) * 255 + 16:
                raise ProtocolError("Dir: listing expands too far")
            try:
                stored = lz4.block.decompress(stored, uncompressed_size=raw_len)
            except lz4.block.LZ4BlockError:
                raise ProtocolError("Dir: corrupt listing (LZ4)") from None
            if len(stored) != raw_len:
                raise ProtocolError("Dir: listing expands to the wrong size")
        lr = _R(stored, "Dir listing")
        attrs = _read_listed(lr, own=True)
        if attrs.kind != 2:
            raise ProtocolError("Dir: the directory's own entry is not a directory")
        n = lr.u32()
        if n > MAX_ENTRIES or n * 43 > len(stored):
            raise ProtocolError(f"Dir: {n} entries do not fit")
        entries = tuple(_read_listed(lr) for _ in range(n))
        g = lr.u32()
        if g * 2 > len(stored):
            raise ProtocolError(f"Dir: {g} vanished names do not fit")
        gone = tuple(check_name(lr.s16(), "Dir") for _ in range(g))
        lr.end()
        names = [e.name for e in entries]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ProtocolError("Dir: names not sorted or repeated")
        f = Dir(index, rel, attrs, entries, gone)
    elif cls is DirFailed:
        f = DirFailed(r.u32(), check_rel(r.s16(), "DirFailed"), r.u16(), r.s16())
    elif cls is ListEnd:
        f = ListEnd()
    elif cls is Want:
        fid, index, name, signature = r.u32(), r.u32(), check_name(r.s16(), "Want"), r.s32()
        if fid >= PACK_BASE:
            raise ProtocolError(f"Want: file id {fid} is in the packs' range")
        resume = None
        if r.u8():
            content, length, k, shard_size, n = r.raw(32), r.u64(), r.u16(), r.u32(), r.u32()
            if n * 8 > len(body) or length > 1 << 62:
                raise ProtocolError("Want: resume ranges do not fit")
            ranges = tuple((r.u32(), r.u32()) for _ in range(n))
            end = 0
            for first, count in ranges:
                if first < end or count == 0:
                    raise ProtocolError("Want: resume ranges not sorted, overlapping or empty")
                end = first + count
            resume = Resume(content, length, k, shard_size, ranges)
        f = Want(fid, index, name, signature, resume)
    elif cls is File:
        fid, status, delta, *rest = r.fixed(_FILE_FIXED)
        f = File(fid, status, bool(delta), *rest, r.s16(), r.raw(32))
        if f.status not in (FILE_OK, FILE_VANISHED, FILE_ERROR) or f.nanoseconds >= 10**9 or f.size > 1 << 62 \
                or f.length > 1 << 62 or (f.status == FILE_OK and not (1 <= f.k and f.k + f.m <= 256
                                                                       and 64 <= f.shard_size <= 65536)):
            raise ProtocolError("File: field out of range")
    elif cls is Pack:
        f = Pack(r.u32(), r.u8(), r.u32(), r.u32(), r.u16(), r.u16(), r.u32())
        if f.pack_id < PACK_BASE or f.codec not in (0, 1) or not 0 < f.raw_length <= PACK_MAX \
                or not 0 < f.length <= f.raw_length + f.raw_length // 255 + 16 \
                or (f.codec == 0 and f.length != f.raw_length) \
                or not (1 <= f.k and f.k + f.m <= 256 and 64 <= f.shard_size <= 65536):
            raise ProtocolError("Pack: field out of range")
    elif cls is Ack:
        fid, n = r.u32(), r.u32()
        if n * 4 > len(body):
            raise ProtocolError("Ack: count does not fit")
        f = Ack(fid, tuple(r.u32() for _ in range(n)))
    elif cls is Repair:
        fid, n = r.u32(), r.u32()
        if n * 6 > len(body):
            raise ProtocolError("Repair: count does not fit")
        f = Repair(fid, tuple((r.u32(), r.u16()) for _ in range(n)))
    elif cls is FileDone:
        f = FileDone(r.u32(), bool(r.u8()), r.s16())
    elif cls is Item:
        f = Item(r.u8(), r.s16())
    elif cls is Done:
        f = Done(r.s32())
    else:
        f = Bye()
    r.end()
    return f


_TYPES = {Hello: 0x01, Challenge: 0x02, Auth: 0x03, Welcome: 0x04, Error: 0x05,
          Dir: 0x10, DirFailed: 0x11, ListEnd: 0x12,
          Want: 0x20, File: 0x21, Ack: 0x22, Repair: 0x23, FileDone: 0x24, Pack: 0x25,
          Item: 0x30, Done: 0x31, Bye: 0x32}
_CLASSES = {v: k for k, v in _TYPES.items()}


class FrameReader:
    """Cuts a byte stream into frames: ``feed(data)``, then ``frames()``.
    Holds at most one frame's bytes beyond what it was given."""

    def __init__(self, limit: int = MAX_FRAME):
        self._buf = bytearray()
        self.limit = limit                     # the longest frame taken now (a server lowers it
                                               # until the client has proved its key)

    def feed(self, data) -> None:
        self._buf += data

    def frames(self):
        while len(self._buf) >= _HEAD.size:
            length, kind = _HEAD.unpack_from(self._buf, 0)
            if not 1 <= length <= self.limit:
                raise ProtocolError(f"frame length {length} out of range (at most {self.limit} here)")
            if len(self._buf) < 4 + length:
                return
            body = bytes(self._buf[_HEAD.size:4 + length])
            del self._buf[:4 + length]
            yield decode(kind, body)

    @property
    def pending(self) -> int:
        return len(self._buf)
