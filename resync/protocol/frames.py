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

import os
import struct
from typing import NamedTuple

from ..errors import ResyncError

VERSION = 6                        # 2: Want.resume, File.content, Hello.bwlimit (session 6);
#                                    3: packs, wire signatures and deltas (protocol.encodings), listings
#                                       as rsync's flist: fields that differ from the entry before (session 10);
#                                    4: sparse files kept through deltas (File sparse 2) and -S (Hello flag 32),
#                                       Want.update, Wants, 16-bit checks and varint headers in wire
#                                       signatures, 16-byte member hashes (session 11);
#                                    5: basis-hash signatures for small files of the basis's size, answered
#                                       by a same-content member (session 13);
#                                    6: a pushing client lists after its Auth, before the Welcome; the
#                                       server holds those frames until it has admitted the push (session 14)
MAX_FRAME = 16 << 20
MAX_VARINT = 10                  # bytes of a varint at most (64 bits)
MAX_ENTRIES = 1 << 20           # entries in one directory frame
NAME_MAX = 255

_U8, _U16, _U32, _U64, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q", "<q"))
_HEAD = struct.Struct("<IB")
# fixed runs of fields, packed in one call (the same bytes as field by field)
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


FLAG_DELETE, FLAG_CHECKSUM, FLAG_DRY_RUN, FLAG_WHOLE_FILE, FLAG_ITEMIZE, FLAG_SPARSE = 1, 2, 4, 8, 16, 32
FLAG_RELAY, FLAG_COLLECT = 64, 128  # a relay exchange (no module): sealed envelopes both ways; COLLECT: the
#                                     server offers what it holds for the client's device (its mailbox)


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
    signature: bytes               # the receiver's copy's block signature (delta), its basis hash (a small file
    #                                of the same size: protocol.encodings), or empty (whole)
    resume: "Resume | None" = None  # content the receiver kept from a cut transfer
    update: bool = False           # the receiver has an older entry at that path (else it is new there)


WANT_RESUME, WANT_UPDATE, WANT_SIGNATURE = 1, 2, 4    # a Want's flags (a Wants entry's: update, signature)


class Wants(NamedTuple):           # receiver -> sender: send these files of one directory (protocol 4)
    dir_index: int
    first_id: int                  # the file ids are first_id, first_id + 1, ... in order
    wants: tuple                   # of (name, update, signature): as Want's fields, no resume



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
    runs: tuple | None = None      # a sparse file: its data runs ((offset, length), sorted), the content
    #                                their bytes in order (the holes are not sent); None: not sparse
    holes: bool = False            # a delta whose result keeps its blocks of zeros as holes (the source
    #                                has holes, or -S)


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
MAX_SHARD_SIZE = 1 << 20           # shard bytes at most (QUIC: a datagram's 1,296; the TLS stream: 1 MiB)
MAX_STRIPE_BYTES = 256 << 16       # k x shard size at most: what a receiver holds of one stripe


def geometry_ok(k: int, m: int, shard_size: int) -> bool:
    """Whether a content cut into stripes of k data shards (and m parity)
    of ``shard_size`` bytes is within bounds: k + m <= 256 (GF(2^8)), a
    shard of 64 bytes to MAX_SHARD_SIZE, a stripe of at most
    MAX_STRIPE_BYTES (the memory a receiver gives an incomplete stripe)."""
    return 1 <= k and k + m <= 256 and 64 <= shard_size <= MAX_SHARD_SIZE and k * shard_size <= MAX_STRIPE_BYTES


class Item(NamedTuple):            # receiver -> client: an itemized line or an error (push)
    kind: int                      # ITEM_LINE, ITEM_ERROR, ITEM_VANISHED
    text: bytes


ITEM_LINE, ITEM_ERROR, ITEM_VANISHED = 0, 1, 2


class Done(NamedTuple):            # receiver -> sender: finished; its statistics
    stats: bytes                   # JSON


class Bye(NamedTuple):             # sender -> receiver: seen; the connection may close
    pass


# -- the codec ---------------------------------------------------------------------------

class RelayOffer(NamedTuple):      # either way in a relay exchange: an envelope this end would hand over
    envelope_id: bytes             # 32: BLAKE3 of its signed header and payload
    head: bytes                    # its first HEAD_SIZE bytes (magic, signed header, hop part as it would arrive)


class RelayTake(NamedTuple):       # the other end: send it, from this offset of its payload (a resume)
    envelope_id: bytes
    offset: int


class RelayRefuse(NamedTuple):     # the other end: not taken (the offering end keeps custody)
    envelope_id: bytes
    reason: bytes                  # a short word: expired, hop limit, duplicate, storage depleted, invalid ...
    detail: bytes


class RelayChunk(NamedTuple):      # payload bytes of an envelope taken, in order
    envelope_id: bytes
    offset: int
    data: bytes


class RelayCustody(NamedTuple):    # the receiving end holds it whole, verified and durable: the offering
    envelope_id: bytes             # end may delete its copy (never acknowledged in turn)


class RelayReceived(NamedTuple):   # the receiving end, each RECEIVED_EVERY bytes: how far it has the payload
    envelope_id: bytes             # (the sender sees the receiver alive on a slow link, and is woken to send on)
    offset: int


class RelayOver(NamedTuple):       # this end offers nothing more and every offer it made is settled
    pass


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


# -- Dir listings (protocol 3): each entry's fields only where they differ from the previous entry's

_L_SHARED, _L_MODE, _L_UID, _L_GID, _L_SECONDS, _L_NS, _L_BLAKE3 = 1, 2, 4, 8, 16, 32, 64
_NO_ENTRY = Listed(b"", 0, 0, 0, 0, 0, 0, 0, 0, b"", b"")
_KIND_OF_FMT = {0o100000: 1, 0o040000: 2, 0o120000: 3, 0o020000: 4, 0o060000: 4, 0o010000: 5, 0o140000: 5}


def put_varint(out: bytearray, v: int) -> None:
    """``v`` (>= 0) as a LEB128 varint: 7 bits a byte, low first."""
    if v < 0:
        raise ValueError("varint of a negative number")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def get_varint(buf, pos: int, what: str) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos`` of ``buf``
    (at most MAX_VARINT bytes; ProtocolError if cut short or longer)."""
    if pos < len(buf) and buf[pos] < 0x80:
        return buf[pos], pos + 1                # (most fields: one byte)
    v = shift = 0
    for i in range(MAX_VARINT):
        if pos + i >= len(buf):
            raise ProtocolError(f"{what}: truncated")
        b = buf[pos + i]
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos + i + 1
        shift += 7
    raise ProtocolError(f"{what}: varint too long")


def zigzag(v: int) -> int:
    return v * 2 if v >= 0 else -v * 2 - 1


def unzigzag(v: int) -> int:
    return v >> 1 if not v & 1 else -((v + 1) >> 1)


def _put_listed(out: bytearray, e: Listed, prev: Listed) -> None:
    name, kind, mode, seconds, ns, size, uid, gid, rdev, target, digest = e
    pname, _, pmode, pseconds, _, _, puid, pgid, _, _, _ = prev
    shared = min(len(os.path.commonprefix((name, pname))), 255) if pname and name[:1] == pname[:1] else 0
    flags = ((_L_SHARED if shared else 0) | (_L_MODE if mode == pmode else 0) | (_L_UID if uid == puid else 0)
             | (_L_GID if gid == pgid else 0) | (_L_SECONDS if seconds == pseconds else 0) | (_L_NS if ns else 0)
             | (_L_BLAKE3 if digest else 0))
    out.append(flags)
    if shared:
        out.append(shared)
    rest = name[shared:]
    out.append(len(rest)) if len(rest) < 0x80 else put_varint(out, len(rest))
    out += rest
    if not flags & _L_MODE:
        put_varint(out, mode)
    if not flags & _L_SECONDS:
        put_varint(out, zigzag(seconds - pseconds))
    if ns:
        put_varint(out, ns)
    if kind == 1 or kind == 3:
        out.append(size) if size < 0x80 else put_varint(out, size)
    if not flags & _L_UID:
        put_varint(out, uid)
    if not flags & _L_GID:
        put_varint(out, gid)
    if kind == 4:
        put_varint(out, rdev)
    if kind == 3:
        put_varint(out, len(target))
        out += target
    if digest:
        out += _fixed(digest, 32)


def _get_listed(buf, pos: int, prev: Listed, own: bool) -> tuple[Listed, int]:
    """One entry at ``pos`` of a listing, as it differs from ``prev``."""
    what = "Dir listing"
    end = len(buf)
    if pos >= end:
        raise ProtocolError(f"{what}: truncated")
    flags = buf[pos]
    pos += 1
    if flags & 0x80:
        raise ProtocolError(f"{what}: unknown entry flags")
    shared = 0
    if flags & _L_SHARED:
        if pos >= end:
            raise ProtocolError(f"{what}: truncated")
        shared = buf[pos]
        pos += 1
        if not shared or shared > len(prev.name):
            raise ProtocolError(f"{what}: bad shared name prefix")
    n, pos = get_varint(buf, pos, what)
    if n > NAME_MAX:
        raise ProtocolError(f"{what}: field out of range")
    if pos + n > end:
        raise ProtocolError(f"{what}: truncated")
    name = prev.name[:shared] + bytes(buf[pos:pos + n])
    pos += n
    if own:
        if name:
            raise ProtocolError("Dir: the directory's own entry has a name")
    else:
        check_name(name, "directory entry")
    mode = prev.mode
    if not flags & _L_MODE:
        mode, pos = get_varint(buf, pos, what)
    kind = _KIND_OF_FMT.get(mode & 0o170000) if mode <= 0xFFFFFFFF else None
    if kind is None:
        raise ProtocolError(f"directory entry {name[:64]!r}: mode {mode:o} of no known kind")
    seconds, ns, size, uid, gid, rdev, target, digest = prev.seconds, 0, 0, prev.uid, prev.gid, 0, b"", b""
    if not flags & _L_SECONDS:
        d, pos = get_varint(buf, pos, what)
        seconds += unzigzag(d)
    if flags & _L_NS:
        ns, pos = get_varint(buf, pos, what)
    if kind == 1 or kind == 3:
        size, pos = get_varint(buf, pos, what)
    if not flags & _L_UID:
        uid, pos = get_varint(buf, pos, what)
    if not flags & _L_GID:
        gid, pos = get_varint(buf, pos, what)
    if kind == 4:
        rdev, pos = get_varint(buf, pos, what)
    if ns >= 10**9 or size > 1 << 62 or uid > 0xFFFFFFFF or gid > 0xFFFFFFFF or rdev >= 1 << 64 \
            or not -(1 << 63) <= seconds < 1 << 63:
        raise ProtocolError(f"{what}: field out of range")
    if kind == 3:
        tlen, pos = get_varint(buf, pos, what)
        if not tlen or tlen > 4095:
            raise ProtocolError(f"directory entry {name[:64]!r}: bad symlink target")
        if pos + tlen > end:
            raise ProtocolError(f"{what}: truncated")
        target = bytes(buf[pos:pos + tlen])
        pos += tlen
        if b"\0" in target:
            raise ProtocolError(f"directory entry {name[:64]!r}: bad symlink target")
    if flags & _L_BLAKE3:
        if pos + 32 > end:
            raise ProtocolError(f"{what}: truncated")
        digest = bytes(buf[pos:pos + 32])
        pos += 32
    return Listed(name, kind, mode, seconds, ns, size, uid, gid, rdev, target, digest), pos


def encode_listing(attrs: Listed, entries, gone) -> bytes:
    """A Dir frame's listing before compression: the directory's own entry,
    ``varint n`` entries, ``varint g`` vanished names (``varint length |
    name``); each entry as it differs from the one before (rsync's flist)."""
    out = bytearray()
    _put_listed(out, attrs, _NO_ENTRY)
    put_varint(out, len(entries))
    prev = attrs
    for e in entries:
        _put_listed(out, e, prev)
        prev = e
    put_varint(out, len(gone))
    for name in gone:
        put_varint(out, len(name))
        out += name
    return bytes(out)


def decode_listing(buf) -> tuple[Listed, tuple, tuple]:
    """(own entry, entries, vanished names) of a listing (ProtocolError if malformed)."""
    view = memoryview(buf)
    attrs, pos = _get_listed(view, 0, _NO_ENTRY, own=True)
    if attrs.kind != 2:
        raise ProtocolError("Dir: the directory's own entry is not a directory")
    n, pos = get_varint(view, pos, "Dir listing")
    if n > MAX_ENTRIES or n * 3 > len(view):
        raise ProtocolError(f"Dir: {n} entries do not fit")
    entries, prev = [], attrs
    for _ in range(n):
        prev, pos = _get_listed(view, pos, prev, own=False)
        entries.append(prev)
    g, pos = get_varint(view, pos, "Dir listing")
    if g * 2 > len(view):
        raise ProtocolError(f"Dir: {g} vanished names do not fit")
    gone = []
    for _ in range(g):
        length, pos = get_varint(view, pos, "Dir listing")
        if pos + length > len(view):
            raise ProtocolError("Dir listing: truncated")
        gone.append(check_name(bytes(view[pos:pos + length]), "Dir"))
        pos += length
    if pos != len(view):
        raise ProtocolError(f"Dir listing: {len(view) - pos} bytes of trailing data")
    return attrs, tuple(entries), tuple(gone)


def _shared(a: bytes, b: bytes) -> int:
    n, limit = 0, min(len(a), len(b), 255)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def encode(frame, prev_rel: bytes = b"") -> bytes:
    """One frame, with its length prefix. ``prev_rel``: the path of the
    Dir frame sent before this one on the stream (a Dir's path is sent as
    what it shares with it and the rest, as rsync front-codes its names)."""
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
        raw = encode_listing(frame.attrs, frame.entries, frame.gone)
        packed = lz4.block.compress(raw, store_size=False) if len(raw) > 64 else raw
        shared = _shared(frame.rel, prev_rel)
        put_varint(w.b, frame.index)
        w.u8(shared)
        w.s16(frame.rel[shared:])
        codec, stored = (1, packed) if len(packed) < len(raw) else (0, raw)
        w.u8(codec)
        put_varint(w.b, len(raw))
        put_varint(w.b, len(stored))
        w.raw(stored)
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
        w.u8((WANT_RESUME if frame.resume is not None else 0) | (WANT_UPDATE if frame.update else 0))
        if frame.resume is not None:
            w.raw(_fixed(frame.resume.content, 32))
            w.u64(frame.resume.length)
            w.u16(frame.resume.k)
            w.u32(frame.resume.shard_size)
            w.u32(len(frame.resume.stripes))
            for first, count in frame.resume.stripes:
                w.u32(first)
                w.u32(count)
    elif t is Wants:
        w.u32(frame.dir_index)
        w.u32(frame.first_id)
        put_varint(w.b, len(frame.wants))
        for name, update, signature in frame.wants:
            put_varint(w.b, len(name))
            w.raw(name)
            w.u8((WANT_UPDATE if update else 0) | (WANT_SIGNATURE if signature else 0))
            if signature:
                put_varint(w.b, len(signature))
                w.raw(signature)
    elif t is File:
        w.fixed(_FILE_FIXED, frame.file_id, frame.status, 1 if frame.delta else 0, frame.length,
                _fixed(frame.blake3, 32), frame.mode, frame.seconds, frame.nanoseconds, frame.size, frame.uid,
                frame.gid, frame.k, frame.m, frame.shard_size)
        w.s16(frame.message[:4000])
        w.raw(_fixed(frame.content, 32))
        if frame.runs is None:
            w.u8(2 if frame.holes else 0)
        else:
            w.u8(1)
            w.u32(len(frame.runs))
            for off, n in frame.runs:
                w.u64(off)
                w.u64(n)
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
    elif t is RelayOffer:
        w.raw(_fixed(frame.envelope_id, 32))
        w.s16(frame.head)
    elif t is RelayTake:
        w.raw(_fixed(frame.envelope_id, 32))
        w.u64(frame.offset)
    elif t is RelayRefuse:
        w.raw(_fixed(frame.envelope_id, 32))
        w.s16(frame.reason[:200])
        w.s16(frame.detail[:4000])
    elif t is RelayChunk:
        w.raw(_fixed(frame.envelope_id, 32))
        w.u64(frame.offset)
        w.s32(frame.data)
    elif t is RelayCustody:
        w.raw(_fixed(frame.envelope_id, 32))
    elif t is RelayReceived:
        w.raw(_fixed(frame.envelope_id, 32))
        w.u64(frame.offset)
    elif t is RelayOver:
        pass
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


def decode(kind: int, body, prev_rel: bytes = b"") -> object:
    """The frame of type ``kind`` from its body (without the length and
    type); ``prev_rel``: the path of the Dir frame before it (see encode)."""
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
        index, r.p = get_varint(r.b, r.p, "Dir")
        shared = r.u8()
        if shared > len(prev_rel) or index > 0xFFFFFFFF:
            raise ProtocolError("Dir: bad path prefix or index")
        rel = check_rel(prev_rel[:shared] + r.s16(), "Dir")
        codec = r.u8()
        raw_len, r.p = get_varint(r.b, r.p, "Dir")
        length, r.p = get_varint(r.b, r.p, "Dir")
        stored = r.raw(length)
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
        attrs, entries, gone = decode_listing(stored)
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
        flags = r.u8()
        if flags & ~(WANT_RESUME | WANT_UPDATE):
            raise ProtocolError("Want: unknown flags")
        if flags & WANT_RESUME:
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
        f = Want(fid, index, name, signature, resume, bool(flags & WANT_UPDATE))
    elif cls is Wants:
        index, first = r.u32(), r.u32()
        n, r.p = get_varint(r.b, r.p, "Wants")
        if not 0 < n <= MAX_ENTRIES or n > len(body) or first + n > PACK_BASE:
            raise ProtocolError("Wants: bad count or file ids in the packs' range")
        wants = []
        for _ in range(n):
            length, r.p = get_varint(r.b, r.p, "Wants")
            name = check_name(r.raw(length), "Wants")
            flags = r.u8()
            if flags & ~(WANT_UPDATE | WANT_SIGNATURE):
                raise ProtocolError("Wants: unknown flags")
            signature = b""
            if flags & WANT_SIGNATURE:
                length, r.p = get_varint(r.b, r.p, "Wants")
                if not length:
                    raise ProtocolError("Wants: empty signature")
                signature = r.raw(length)
            wants.append((name, bool(flags & WANT_UPDATE), signature))
        f = Wants(index, first, tuple(wants))
    elif cls is File:
        fid, status, delta, *rest = r.fixed(_FILE_FIXED)
        f = File(fid, status, bool(delta), *rest, r.s16(), r.raw(32))
        sparse = r.u8()
        if sparse == 1:
            n = r.u32()
            if n * 16 > len(body):
                raise ProtocolError("File: data runs do not fit")
            runs, end, total = [], 0, 0
            for _ in range(n):
                off, length = r.u64(), r.u64()
                if off < end or length == 0 or off + length > f.size:
                    raise ProtocolError("File: data runs not sorted, overlapping, empty or past the file's end")
                runs.append((off, length))
                end, total = off + length, total + length
            if total != f.length or f.delta:
                raise ProtocolError("File: data runs do not add up to the content")
            f = f._replace(runs=tuple(runs))
        elif sparse == 2 and f.delta:
            f = f._replace(holes=True)
        elif sparse != 0:
            raise ProtocolError("File: bad sparse flag")
        if f.status not in (FILE_OK, FILE_VANISHED, FILE_ERROR) or f.nanoseconds >= 10**9 or f.size > 1 << 62 \
                or f.length > 1 << 62 or (f.status == FILE_OK and not geometry_ok(f.k, f.m, f.shard_size)):
            raise ProtocolError("File: field out of range")
    elif cls is Pack:
        f = Pack(r.u32(), r.u8(), r.u32(), r.u32(), r.u16(), r.u16(), r.u32())
        if f.pack_id < PACK_BASE or f.codec not in (0, 1) or not 0 < f.raw_length <= PACK_MAX \
                or not 0 < f.length <= f.raw_length + f.raw_length // 255 + 16 \
                or (f.codec == 0 and f.length != f.raw_length) \
                or not geometry_ok(f.k, f.m, f.shard_size):
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
    elif cls is RelayOffer:
        f = RelayOffer(r.raw(32), r.s16())
    elif cls is RelayTake:
        f = RelayTake(r.raw(32), r.u64())
    elif cls is RelayRefuse:
        f = RelayRefuse(r.raw(32), r.s16(), r.s16())
    elif cls is RelayChunk:
        f = RelayChunk(r.raw(32), r.u64(), r.s32())
    elif cls is RelayCustody:
        f = RelayCustody(r.raw(32))
    elif cls is RelayReceived:
        f = RelayReceived(r.raw(32), r.u64())
    elif cls is RelayOver:
        f = RelayOver()
    else:
        f = Bye()
    r.end()
    return f


_TYPES = {Hello: 0x01, Challenge: 0x02, Auth: 0x03, Welcome: 0x04, Error: 0x05,
          Dir: 0x10, DirFailed: 0x11, ListEnd: 0x12,
          Want: 0x20, File: 0x21, Ack: 0x22, Repair: 0x23, FileDone: 0x24, Pack: 0x25, Wants: 0x26,
          Item: 0x30, Done: 0x31, Bye: 0x32,
          RelayOffer: 0x40, RelayTake: 0x41, RelayRefuse: 0x42, RelayChunk: 0x43, RelayCustody: 0x44,
          RelayOver: 0x45, RelayReceived: 0x46}
_CLASSES = {v: k for k, v in _TYPES.items()}


class FrameReader:
    """Cuts a byte stream into frames: ``feed(data)``, then ``frames()``.
    Holds at most one frame's bytes beyond what it was given."""

    def __init__(self, limit: int = MAX_FRAME):
        self._buf = bytearray()
        self.prev_rel = b""                    # the path of the last Dir frame (Dir paths are front-coded)
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
            frame = decode(kind, body, self.prev_rel)
            if type(frame) is Dir:
                self.prev_rel = frame.rel
            yield frame

    @property
    def pending(self) -> int:
        return len(self._buf)
