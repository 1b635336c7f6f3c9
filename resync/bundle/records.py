"""A bundle's payload as a reader sees it: the stream behind the shards, the
checked header, trailer and records, and the two content writers that put a
record's file into a destination (``bundle-whole``: LZ4 chunks decoded;
``bundle-delta``: a delta applied to the destination's current file).

Every length is checked before it is used (a whole-file record's length is
the file's logical size, its chunks delimit themselves; a delta record's is
its stored size), and every whole file is checked against its BLAKE3 as it is
decoded. ``check_bundle`` reads everything unpack will, without a destination:
``verify BUNDLE`` and pack's read-back use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..content import writer
from ..errors import FormatError, UnrecoverableError, VerificationError
from . import payload as P
from .manifest import MAX_SIZE, NONE
from .shards import ShardReader


class PayloadStream:
    """Random access to the payload of a shard file, one stripe cached."""

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self.layout = reader.layout
        self._stripe = -1
        self._data = memoryview(b"")

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.layout.payload_len:
            raise FormatError(self.reader.name, P.WHAT, "a record runs past the end of the payload")
        out = bytearray()
        per = self.layout.stripe_data
        while n:
            s = offset // per
            if s != self._stripe:
                self._data = self.reader.stripe_payload(s)
                self._stripe = s
            lo = offset - s * per
            take = min(n, len(self._data) - lo)
            out += self._data[lo:lo + take]
            offset += take
            n -= take
        return bytes(out)


@dataclass
class BundleInfo:
    bundle_id: bytes
    against_id: bytes | None
    created_ns: int
    trailer: P.Trailer
    trailer_offset: int
    version: int = P.VERSION


def read_bundle(reader: ShardReader) -> tuple[PayloadStream, BundleInfo]:
    """The payload stream and the checked header, footer and trailer."""
    import blake3
    name = reader.name
    stream = PayloadStream(reader)
    size = reader.layout.payload_len
    if size < P.HEADER.size + P.FOOTER.size:
        raise FormatError(name, P.WHAT, "payload too short")
    magic, version, flags, _, bundle_id, against_id, created = P.HEADER.unpack(stream.read(0, P.HEADER.size))
    if magic != P.MAGIC:
        raise FormatError(name, P.WHAT, "bad payload magic")
    if version not in P.VERSIONS:
        raise FormatError(name, P.WHAT, f"unsupported payload version {version}")
    if bundle_id != reader.layout.bundle_id:
        raise FormatError(name, P.WHAT, "payload and shards belong to different bundles")
    if flags & ~P.FLAG_AGAINST:
        raise FormatError(name, P.WHAT, f"unknown flags {flags:#x}")
    t_off, t_len, raw_len, t_hash, end = P.FOOTER.unpack(stream.read(size - P.FOOTER.size, P.FOOTER.size))
    if end != P.END_MAGIC:
        raise FormatError(name, P.WHAT, "bad end magic (truncated?)")
    if t_off < P.HEADER.size or t_off + t_len != size - P.FOOTER.size:
        raise FormatError(name, P.WHAT, "trailer offset or length out of range")
    if raw_len > P.MAX_TRAILER or raw_len > t_len * P.LZ4_MAX_RATIO + 16:
        raise FormatError(name, P.WHAT, f"trailer length {raw_len} out of range")
    stored = stream.read(t_off, t_len)
    if blake3.blake3(stored).digest() != t_hash:
        raise FormatError(name, P.WHAT, "trailer checksum mismatch")
    import lz4.block
    try:
        raw = lz4.block.decompress(stored, uncompressed_size=raw_len) if raw_len else b""
    except lz4.block.LZ4BlockError:
        raise FormatError(name, P.WHAT, "corrupt trailer (LZ4)") from None
    if len(raw) != raw_len:
        raise FormatError(name, P.WHAT, "trailer expands to the wrong size")
    against = bool(flags & P.FLAG_AGAINST)
    trailer = P.unpack_trailer(raw, name, t_off, against, version)
    return stream, BundleInfo(bundle_id, against_id if against else None, created, trailer, t_off, version)


def check_health(reader: ShardReader) -> list:
    """Health of every stripe; UnrecoverableError if any has more than m bad shards."""
    health = list(reader.health())
    for h in health:
        if not h.repairable:
            raise UnrecoverableError(
                f"{reader.name}: stripe {h.stripe}",
                f"{len(h.bad)} of {h.stored} shards damaged or missing, parity repairs {reader.layout.m}; "
                f"nothing applied")
    return health


def check_bundle(reader: ShardReader) -> tuple[list, BundleInfo]:
    """Everything unpack checks before it touches a destination: the health
    of every stripe (UnrecoverableError beyond parity), then the payload's
    header, trailer and every record (``check_records``). Returns the stripes'
    health and the bundle's BundleInfo."""
    health = check_health(reader)
    stream, info = read_bundle(reader)
    check_records(stream, info, reader.name)
    return health, info


def record_header(stream: PayloadStream, info: BundleInfo, index: int, e: P.Entry,
                  name: str) -> tuple[int, int, int, int]:
    """(kind, body offset, length, flags) of manifest entry ``index``'s
    record, checked.

    ``length`` is a logical size for a whole-file record (the file's size; its
    chunks, each with its stored length, delimit themselves) and the stored
    size for a delta record (the delta file's length). ``flags``: RECORD_SPARSE
    or 0 (version 3; always 0 before)."""
    kind, flags, rec_index, length = P.RECORD.unpack(stream.read(e.record, P.RECORD.size))
    body = e.record + P.RECORD.size
    if rec_index != index or kind not in (P.WHOLE, P.DELTA) \
            or flags & ~(P.RECORD_SPARSE if info.version >= 3 else 0):
        raise FormatError(name, P.WHAT, f"{e.path}: bad record header")
    if kind == P.WHOLE and length != e.size:
        raise FormatError(name, P.WHAT, f"{e.path}: record size differs from the manifest")
    if kind == P.DELTA and length > info.trailer_offset - body:
        raise FormatError(name, P.WHAT, f"{e.path}: delta record runs into the trailer")
    return kind, body, length, flags


def delta_header(stream: PayloadStream, body: int, length: int, e: P.Entry, name: str):
    """The parsed tables of a delta record (everything but its literal bytes),
    checked against the manifest entry it must produce."""
    from .. import formats
    where = f"{name}: {e.path}"
    head = stream.read(body, min(length, formats.DELTA_HEADER.size))
    tables = stream.read(body, formats.delta_tables_size(head, length, where))
    parsed = formats.parse_delta(tables, length, where)
    if parsed.header.target_hash != e.blake3 or parsed.header.target_len != e.size:
        raise FormatError(name, P.WHAT, f"{e.path}: delta does not produce the manifest's file")
    return parsed


def check_records(stream: PayloadStream, info: BundleInfo, name: str) -> None:
    """Read every record as unpack will: whole files decoded and checked
    against their BLAKE3, deltas parsed and their literal chunks decoded.
    What this accepts, unpack applies (given the destination it was made for).
    Records must also tile the payload between its header and the trailer,
    in manifest order, with no gap or overlap (a writer that miscounted a
    length shows here even where a reader would not notice); the only thing
    allowed between them is the well-formed record of a file that changed
    while pack read it (written, then left out of the manifest)."""
    expected = P.HEADER.size
    for index, e in enumerate(info.trailer.entries):
        if e.record == NONE:
            continue
        expected = _skip_abandoned(stream, expected, e.record, info.trailer_offset, name)
        if e.record != expected:
            raise FormatError(name, P.WHAT, f"{e.path}: record at {e.record}, where the previous one ends "
                                            f"at {expected}")
        kind, body, length, _ = record_header(stream, info, index, e, name)
        if kind == P.WHOLE:
            expected = decode_whole(stream, body, info.trailer_offset, e, None, name, info.version)
            continue
        expected = body + length
        parsed = delta_header(stream, body, length, e, name)
        pos = body + parsed.data_offset
        for codec, raw, stored in parsed.chunks.tolist():
            _decode_chunk(stream.read(pos, stored), codec, raw, name, f"{e.path}: delta's")
            pos += stored
    expected = _skip_abandoned(stream, expected, info.trailer_offset, info.trailer_offset, name)
    if expected != info.trailer_offset:
        raise FormatError(name, P.WHAT, f"{info.trailer_offset - expected} bytes between the last record "
                                        "and the trailer")


def _decode_chunk(data: bytes, codec: int, raw: int, name: str, where: str) -> bytes:
    """A chunk's raw bytes (LZ4 blocks decompressed, and checked to expand to
    exactly ``raw`` bytes)."""
    import lz4.block
    if codec != P.CODEC_LZ4:
        return data
    try:
        out = lz4.block.decompress(data, uncompressed_size=raw)
    except lz4.block.LZ4BlockError:
        raise FormatError(name, P.WHAT, f"{where} corrupt LZ4 chunk") from None
    if len(out) != raw:
        raise FormatError(name, P.WHAT, f"{where} LZ4 chunk expands to the wrong size")
    return out


def _skip_abandoned(stream: PayloadStream, pos: int, target: int, end: int, name: str) -> int:
    """Step over abandoned records from ``pos`` towards ``target``: each must
    be a well-formed record (its framing is checked, not its content).
    Returns where the last one ends (``target`` unless something else is there)."""
    while pos < target and target - pos >= P.RECORD.size:
        kind, _, _, length = P.RECORD.unpack(stream.read(pos, P.RECORD.size))
        body = pos + P.RECORD.size
        if kind == P.DELTA and length <= end - body:
            nxt = body + length
        elif kind == P.WHOLE and length <= MAX_SIZE:
            nxt, done = body, 0
            while done < length and nxt + P.CHUNK.size <= end:
                codec, raw_len, stored = P.CHUNK.unpack(stream.read(nxt, P.CHUNK.size))
                if not _chunk_ok(codec, raw_len, stored, length - done, end - nxt - P.CHUNK.size):
                    return pos
                nxt += P.CHUNK.size + stored
                done += raw_len
            if done != length:
                return pos
        else:
            return pos
        if nxt > target:
            return pos
        pos = nxt
    return pos


def _chunk_ok(codec: int, raw_len: int, stored: int, left: int, room: int, version: int = P.VERSION) -> bool:
    """Is a whole-file chunk header sound: a known codec, a raw length within
    its limit and the ``left`` bytes of the file, a stored length that fits
    the ``room`` before the trailer and matches its codec?"""
    if codec == P.CODEC_HOLE:
        return version >= 3 and 0 < raw_len <= min(P.MAX_HOLE, left) and stored == 0
    return (codec in (P.CODEC_RAW, P.CODEC_LZ4) and 0 < raw_len <= min(P.MAX_CHUNK, left) and stored <= room
            and (stored == raw_len if codec == P.CODEC_RAW else stored <= raw_len))


def decode_whole(stream: PayloadStream, pos: int, end: int, e: P.Entry, out_fd: int | None, name: str,
                 version: int = P.VERSION, sparse: bool = False) -> int:
    """Decode a whole-file record body at ``pos`` into the new file
    ``out_fd`` (None: only check it); returns the position after it. Checks
    every chunk header before decompressing, and the content against the
    entry's BLAKE3. Hole chunks are left unwritten (holes: the file is cut to
    its size at the end); with ``sparse`` so are blocks of zeros in data."""
    import blake3

    from ..fs import pwrite_all, pwrite_sparse
    h = blake3.blake3()
    done = 0
    put = pwrite_sparse if sparse else pwrite_all
    while done < e.size:
        codec, raw_len, stored = P.CHUNK.unpack(stream.read(pos, P.CHUNK.size))
        pos += P.CHUNK.size
        if not _chunk_ok(codec, raw_len, stored, e.size - done, end - pos, version):
            raise FormatError(name, P.WHAT, f"{e.path}: bad chunk header")
        if codec == P.CODEC_HOLE:
            P.hash_zeros(h, raw_len)
        else:
            data = _decode_chunk(stream.read(pos, stored), codec, raw_len, name, f"{e.path}:")
            pos += stored
            h.update(data)
            if out_fd is not None:
                put(out_fd, data, done)
        done += raw_len
    if h.digest() != e.blake3:
        raise VerificationError(name, f"{e.path}: content does not match its BLAKE3; nothing applied")
    if out_fd is not None:
        os.ftruncate(out_fd, e.size)        # (a hole at the end)
    return pos


# -- content writers (see resync.content) -------------------------------------------

@writer("bundle-whole")
def write_whole(fd: int, dir_fd: int, name: str, stream: PayloadStream, body: int, end: int, e: P.Entry,
                bundle: str, version: int = P.VERSION, sparse: bool = False, *, options) -> tuple:
    """A whole-file record decoded into ``fd`` (checked against its BLAKE3;
    ``sparse``: the record's flag, blocks of zeros written as holes)."""
    decode_whole(stream, body, end, e, fd, bundle, version, sparse or options.sparse)
    return e.size, 0, e.blake3.hex(), e.mode, e.mtime_ns, e.uid, e.gid


@writer("bundle-delta")
def write_delta(fd: int, dir_fd: int, name: str, stream: PayloadStream, body: int, length: int, e: P.Entry,
                bundle: str, root_fd: int, parent: str, basis: str, scratch_fd: int, sparse: bool = False,
                *, options) -> tuple:
    """A delta record applied to the destination's current file ``parent``/
    ``basis`` (reached from ``root_fd`` without following a symlink) into
    ``fd``; the record is copied to a scratch file in ``scratch_fd`` first.
    ``sparse``: the record's flag, blocks of zeros written as holes."""
    from ..content import write_delta_file
    delta_header(stream, body, length, e, bundle)         # checked before anything is written
    scratch = f".delta-{body}"
    dfd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=scratch_fd)
    try:
        for lo in range(0, length, P.CHUNK_RAW):
            data = stream.read(body + lo, min(P.CHUNK_RAW, length - lo))
            view = memoryview(data)
            while len(view):
                view = view[os.write(dfd, view):]
        return write_delta_file(fd, dir_fd, name, dfd, root_fd, parent, basis,
                                (e.mode, e.mtime_ns, e.uid, e.gid), f"{bundle}: {e.path}", sparse,
                                options=options)
    finally:
        os.close(dfd)
        try:
            os.unlink(scratch, dir_fd=scratch_fd)
        except OSError:
            pass
