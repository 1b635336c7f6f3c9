"""Binary layouts of signature and delta files (little-endian, versioned).

Every length, count and offset is checked against the file's real size and the
format's caps before anything is allocated or indexed, so a truncated or hostile
file yields ``FormatError`` and never an exception from NumPy, struct or LZ4.

Signature file, version 1::

    0   8  magic b"RSYNCSIG"
    8   2  version = 1
    10  1  weak kind = 1 (Adler-32 + keyed 32-bit check)
    11  1  strong hash length in bytes (16..32; truncated keyed BLAKE3)
    12  4  block length (8 .. 1 MiB)
    16  8  basis length
    24  8  block count = ceil(basis length / block length)
    32  32 salt (BLAKE3 key of the block hashes; seeds the check weights)
    64  32 BLAKE3 of the whole basis
    96     weak u32[count], check u32[count], strong u8[count][strong length]

Delta file, version 1::

    0   8  magic b"RSYNCDLT"
    8   2  version = 1
    10  2  flags = 0
    12  4  reserved = 0
    16  8  basis length         24  32 BLAKE3 of the basis
    56  8  target length        64  32 BLAKE3 of the target
    96  8  instruction count    104 8  literal length (uncompressed)
    112 8  literal chunk count
    120    instructions: {kind u8 (0 COPY, 1 INSERT), source u64, length u64}[count]
           (COPY source: basis offset; INSERT source: 0, bytes come from the
           literal stream in order)
           chunks: {codec u8 (0 raw, 1 LZ4 block), raw length u32,
           stored length u32}[chunk count], then the stored chunk bytes
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import FormatError

SIG_MAGIC = b"RSYNCSIG"
DELTA_MAGIC = b"RSYNCDLT"
SIG_VERSION = 1
DELTA_VERSION = 1
WEAK_ADLER32_CHECK32 = 1

MIN_BLOCK_LEN = 8
MAX_BLOCK_LEN = 1 << 20
MIN_STRONG_LEN = 16
MAX_STRONG_LEN = 32
MAX_FILE_LEN = 1 << 62
MAX_CHUNK_LEN = 4 << 20

CODEC_RAW = 0
CODEC_LZ4 = 1

SIG_HEADER = struct.Struct("<8sHBBIQQ32s32s")
DELTA_HEADER = struct.Struct("<8sHHIQ32sQ32sQQQ")
INSTRUCTION = np.dtype([("kind", "u1"), ("source", "<u8"), ("length", "<u8")])
CHUNK = np.dtype([("codec", "u1"), ("raw", "<u4"), ("stored", "<u4")])
COPY = 0
INSERT = 1

assert SIG_HEADER.size == 96 and DELTA_HEADER.size == 120
assert INSTRUCTION.itemsize == 17 and CHUNK.itemsize == 9


def block_count(file_len: int, block_len: int) -> int:
    return -(-file_len // block_len)


@dataclass(frozen=True)
class SigHeader:
    strong_len: int
    block_len: int
    file_len: int
    count: int
    salt: bytes
    file_hash: bytes

    def body_size(self) -> int:
        return self.count * (8 + self.strong_len)


def pack_sig_header(h: SigHeader) -> bytes:
    return SIG_HEADER.pack(SIG_MAGIC, SIG_VERSION, WEAK_ADLER32_CHECK32, h.strong_len,
                           h.block_len, h.file_len, h.count, h.salt, h.file_hash)


def unpack_sig(buf, name: str = "signature") -> tuple[SigHeader, np.ndarray, np.ndarray, np.ndarray]:
    """Parse a whole signature file held in ``buf`` (bytes-like or mmap).

    Returns (header, weak, check, strong) where the arrays are views of ``buf``.
    """
    size = len(buf)

    def bad(why: str):
        raise FormatError(name, "resync signature", why)

    if size < SIG_HEADER.size:
        if bytes(buf[:8]) != SIG_MAGIC[: min(size, 8)]:
            bad("bad magic")
        bad("truncated header")
    magic, version, weak_kind, strong_len, block_len, file_len, count, salt, file_hash = \
        SIG_HEADER.unpack_from(buf, 0)
    if magic != SIG_MAGIC:
        bad("bad magic")
    if version != SIG_VERSION:
        bad(f"unsupported version {version}")
    if weak_kind != WEAK_ADLER32_CHECK32:
        bad(f"unknown weak checksum kind {weak_kind}")
    if not MIN_STRONG_LEN <= strong_len <= MAX_STRONG_LEN:
        bad(f"strong hash length {strong_len} outside {MIN_STRONG_LEN}..{MAX_STRONG_LEN}")
    if not MIN_BLOCK_LEN <= block_len <= MAX_BLOCK_LEN:
        bad(f"block length {block_len} outside {MIN_BLOCK_LEN}..{MAX_BLOCK_LEN}")
    if file_len > MAX_FILE_LEN:
        bad(f"basis length {file_len} too large")
    if count != block_count(file_len, block_len):
        bad(f"block count {count} does not match basis length {file_len}")
    header = SigHeader(strong_len, block_len, file_len, count, salt, file_hash)
    if size != SIG_HEADER.size + header.body_size():
        bad(f"size {size} does not match {count} blocks (truncated or trailing data)")
    off = SIG_HEADER.size
    weak = np.frombuffer(buf, dtype="<u4", count=count, offset=off)
    check = np.frombuffer(buf, dtype="<u4", count=count, offset=off + 4 * count)
    strong = np.frombuffer(buf, dtype=np.uint8, count=count * strong_len,
                           offset=off + 8 * count).reshape(count, strong_len)
    return header, weak, check, strong


@dataclass(frozen=True)
class DeltaHeader:
    basis_len: int
    basis_hash: bytes
    target_len: int
    target_hash: bytes
    count: int
    literal_len: int
    chunks: int


def pack_delta_header(h: DeltaHeader) -> bytes:
    return DELTA_HEADER.pack(DELTA_MAGIC, DELTA_VERSION, 0, 0, h.basis_len, h.basis_hash,
                             h.target_len, h.target_hash, h.count, h.literal_len, h.chunks)


def _sum_u64(values: np.ndarray) -> int:
    """Exact sum of uint64 values (no wrap-around), for up to 2**32 values."""
    values = values.astype(np.uint64, copy=False)
    high = int(np.sum(values >> np.uint64(32), dtype=np.uint64))
    low = int(np.sum(values & np.uint64(0xFFFFFFFF), dtype=np.uint64))
    return (high << 32) + low


@dataclass(frozen=True)
class ParsedDelta:
    header: DeltaHeader
    instructions: np.ndarray   # INSTRUCTION records (view of the file)
    chunks: np.ndarray         # CHUNK records (view of the file)
    data_offset: int           # where the first stored chunk starts


def unpack_delta(buf, name: str = "delta") -> ParsedDelta:
    """Parse and validate a whole delta file held in ``buf`` (bytes-like or mmap)."""
    return parse_delta(buf, len(buf), name)


def delta_tables_size(head, size: int, name: str = "delta") -> int:
    """How many bytes of a delta of ``size`` bytes ``parse_delta`` needs (the
    header, instructions and chunk table), from its first DELTA_HEADER.size
    bytes ``head``. FormatError if the counts cannot fit in ``size``."""
    if len(head) < DELTA_HEADER.size or size < DELTA_HEADER.size:
        raise FormatError(name, "resync delta", "truncated header")
    count, _, nchunks = struct.unpack_from("<QQQ", head, 96)
    need = DELTA_HEADER.size + count * INSTRUCTION.itemsize + nchunks * CHUNK.itemsize
    if need > size:
        raise FormatError(name, "resync delta", "instruction or chunk count exceeds the delta's size")
    return need


def parse_delta(buf, size: int, name: str = "delta") -> ParsedDelta:
    """Parse and validate a delta file of ``size`` bytes (its stored length)
    of which ``buf`` holds at least the header, instructions and chunk table
    (``delta_tables_size``): everything but the chunk bytes is checked,
    including that the chunks' stored lengths add up to ``size``."""

    def bad(why: str):
        raise FormatError(name, "resync delta", why)

    if size < DELTA_HEADER.size or len(buf) < DELTA_HEADER.size:
        if bytes(buf[:8]) != DELTA_MAGIC[: min(len(buf), 8)]:
            bad("bad magic")
        bad("truncated header")
    (magic, version, flags, reserved, basis_len, basis_hash, target_len, target_hash,
     count, literal_len, nchunks) = DELTA_HEADER.unpack_from(buf, 0)
    if magic != DELTA_MAGIC:
        bad("bad magic")
    if version != DELTA_VERSION:
        bad(f"unsupported version {version}")
    if flags != 0 or reserved != 0:
        bad("unknown flags")
    for what, value in (("basis", basis_len), ("target", target_len), ("literal", literal_len)):
        if value > MAX_FILE_LEN:
            bad(f"{what} length {value} too large")
    if literal_len > target_len:
        bad("literal length exceeds target length")
    off = DELTA_HEADER.size
    room = min(size, len(buf)) - off
    if count > room // INSTRUCTION.itemsize:
        bad(f"instruction count {count} exceeds the file size")
    if (count == 0) != (target_len == 0):
        bad("instruction count does not match target length")
    ins = np.frombuffer(buf, dtype=INSTRUCTION, count=count, offset=off)
    off += count * INSTRUCTION.itemsize
    room = min(size, len(buf)) - off
    if nchunks > room // CHUNK.itemsize:
        bad(f"literal chunk count {nchunks} exceeds the file size")
    chunks = np.frombuffer(buf, dtype=CHUNK, count=nchunks, offset=off)
    off += nchunks * CHUNK.itemsize

    kind, source, length = ins["kind"], ins["source"], ins["length"]
    if count:
        if np.any(kind > INSERT):
            bad("unknown instruction kind")
        if np.any(length == 0):
            bad("zero-length instruction")
        is_copy = kind == COPY
        if np.any(source[~is_copy] != 0):
            bad("INSERT with a source offset")
        cs, cl = source[is_copy], length[is_copy]
        if np.any(cs > np.uint64(basis_len)) or np.any(cl > np.uint64(basis_len) - cs):
            bad("COPY outside the basis")
        if np.any(length > np.uint64(target_len)):
            bad("instruction longer than the target")
        if _sum_u64(length) != target_len:
            bad("instruction lengths do not add up to the target length")
        if _sum_u64(length[~is_copy]) != literal_len:
            bad("INSERT lengths do not add up to the literal length")
    if nchunks:
        codec, raw, stored = chunks["codec"], chunks["raw"], chunks["stored"]
        if np.any(codec > CODEC_LZ4):
            bad("unknown literal codec")
        if np.any(raw == 0) or np.any(raw > MAX_CHUNK_LEN):
            bad(f"literal chunk length outside 1..{MAX_CHUNK_LEN}")
        if np.any((codec == CODEC_RAW) & (stored != raw)) or np.any(stored > raw) or np.any(stored == 0):
            bad("literal chunk stored length inconsistent with its codec")
        if _sum_u64(raw) != literal_len:
            bad("literal chunks do not add up to the literal length")
        if off + _sum_u64(stored) != size:
            bad("literal data does not match the file size (truncated or trailing data)")
    else:
        if literal_len != 0:
            bad("literal length without literal chunks")
        if off != size:
            bad("trailing data")
    return ParsedDelta(DeltaHeader(basis_len, basis_hash, target_len, target_hash, count,
                                   literal_len, nchunks), ins, chunks, off)
