"""Compact wire encodings of protocol 3: block signatures, deltas, pack members.

The file formats of ``resync.formats`` are made for files on disk: fixed
32-bit and 64-bit fields, a 32-byte salt and basis hash in every signature, a
128-byte delta header. Across the network, for thousands of small files,
those fixed costs were most of the bytes (a Want carried 24 bytes per 700-byte
block, a File frame and delta ~350 bytes of headers per file). The encodings
here carry the same information as rsync's protocol does:

- **Wire signature** (``signature_to_wire``): ``varint block length | varint
  file length | u8 strong length | u8 flags | [32 salt] | weak[n] u32 |
  check[n] u16 | strong[n]`` with n blocks (``formats.block_count``): 8 bytes a
  block with the usual 2-byte strong hash (rsync sends 6). The check is the
  keyed sum's high half, its weights cut to 16 bits so that the low half is
  always 0 (``Signature.check_bits``: both ends compute it so). The salt is there
  only with flag 1 (a signature kept from an earlier connection, offered to
  resume a delta); otherwise both ends derive it from the handshake
  (``session.signature_salt``). No basis hash (the receiver checks the
  result, not the basis). The strong hash is cut to what the file's size needs
  (``strong_len_for``: rsync's ``sum_sizes_sqroot``), because the file's
  whole BLAKE3 checks every result and a file that fails it is asked for
  again whole.
- **Basis hash** (``basis_hash_to_wire``): a wire signature with flag 2 and no
  blocks, ``varint 0 | varint file length | u8 0 | u8 2 | 16 hash``: the first
  16 bytes of the basis's BLAKE3 keyed with the transfer's salt. The receiver
  sends it instead of blocks for a small file (``common.PACK_FILE``) whose
  size has not changed, only its mtime: in a release update nearly every such
  file has the same content (3,645 of 3,646 in django 5.1.3 to 5.1.4), and
  its blocks would be hashed, sent and searched for nothing. The sender
  answers with a same-content member when its file hashes the same, else
  with the whole file (LZ4 in its pack; a small file of the same size whose
  content changed is rare: 2 of 1,474 files in sympy 1.12 to 1.13.1).
- **Wire delta** (``delta_to_wire``/``delta_from_wire``): ``varint count``, then
  per instruction ``varint (length << 1 | copy)`` and, for a COPY, ``varint
  zigzag(source - end of the previous COPY)`` (a run of blocks costs a byte or
  two), then the literal bytes of the INSERTs in order. Every length and
  source is checked against the basis and the target before use.
- **Pack members** (``Member``, ``encode_members``/``decode_members``): the
  content of a pack (protocol.md: packs) is ``varint n`` member records, each
  ``u32 file id | u8 status | u8 flags`` and, for a file sent, ``16 BLAKE3 of
  the file (its first 128 bits: the receiver computes the whole hash and
  compares; rsync's whole-file check is 128 bits too) | varint mode | varint zigzag(mtime seconds) | varint nanoseconds |
  varint size | varint uid | varint gid | varint content length | content``,
  else ``varint message length | message``. Flags: 1 the content is a wire
  delta, 2 the receiver's copy is the file (its basis hash matched; no
  content: the receiver checks the copy against the member's BLAKE3 and
  sets its attributes).

Varints are LEB128 (7 bits a byte, low first), at most 10 bytes; zigzag maps
signed to unsigned as protobuf does. Every decoder raises ProtocolError for
anything malformed: truncated, trailing bytes, out of range.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .frames import FILE_ERROR, FILE_OK, FILE_VANISHED, ProtocolError
from .frames import get_varint, put_varint, unzigzag, zigzag  # noqa: F401  (the varints: frames' own)

if TYPE_CHECKING:
    import numpy as np                  # (imported where used: a run that moves no content needs none)

MIN_STRONG, MAX_STRONG = 2, 16        # strong hash bytes per block on the wire
BLOCKSUM_BIAS = 10                    # rsync's bias in sum_sizes_sqroot (generator.c)
MEMBER_DELTA = 1                      # Member.flags: the content is a wire delta
MEMBER_SAME = 2                       # Member.flags: no content, the receiver's copy is the file
BASIS_HASH = 16                       # bytes of a basis hash (keyed BLAKE3, common.keyed_hash)
MEMBER_HASH = 16                      # bytes of a member's BLAKE3 (the first)


# -- signatures ------------------------------------------------------------------------

def strong_len_for(file_len: int, block_len: int) -> int:
    """Strong hash bytes per block for a basis of ``file_len`` bytes cut into
    ``block_len`` blocks: rsync's sum_sizes_sqroot (generator.c) — about
    BLOCKSUM_BIAS + 2 log2(file length) - log2(block length) bits beyond the
    32 of the rolling sum, so that a false match in the whole file stays
    unlikely — between 2 and 16 bytes. A false match the strong hash lets
    through is caught by the file's whole BLAKE3 (the file is then sent whole)."""
    bits = BLOCKSUM_BIAS + 2 * (max(file_len, 1).bit_length() - 1) - (max(block_len, 1).bit_length() - 1)
    return max(MIN_STRONG, min(MAX_STRONG, (bits + 1 - 32 + 7) // 8))


SIG_SALT = 1                          # wire signature flag: its salt follows the header
SIG_BASIS_HASH = 2                    # wire signature flag: no blocks, the basis's keyed hash instead


def signature_to_wire(sig, with_salt: bool = False) -> bytes:
    """A ``signature.Signature`` computed with ``check_bits=16`` as a Want
    carries it: no basis hash, and its salt only ``with_salt``."""
    import numpy as np
    if sig.check_bits != 16:
        raise ValueError("a wire signature's checks are 16-bit (compute_signature(check_bits=16))")
    head = bytearray()
    put_varint(head, sig.block_len)
    put_varint(head, sig.file_len)
    head += bytes((sig.strong_len, SIG_SALT if with_salt else 0))
    return b"".join((bytes(head), sig.salt if with_salt else b"", sig.weak.astype("<u4", copy=False).tobytes(),
                     (sig.check >> np.uint32(16)).astype("<u2").tobytes(),
                     np.ascontiguousarray(sig.strong[:, :sig.strong_len]).tobytes()))


def basis_hash_to_wire(file_len: int, digest: bytes) -> bytes:
    """A wire signature that is only the basis's length and keyed hash
    (``common.keyed_hash``, BASIS_HASH bytes)."""
    if len(digest) != BASIS_HASH:
        raise ValueError(f"a basis hash is {BASIS_HASH} bytes")
    head = bytearray(b"\0")
    put_varint(head, file_len)
    head += bytes((0, SIG_BASIS_HASH))
    return bytes(head) + digest


def basis_hash_of(buf) -> tuple[int, bytes] | None:
    """(file length, keyed hash) of a basis-hash wire signature; None for a
    signature of blocks (``signature_from_wire``). ProtocolError if malformed."""
    block_len, off = get_varint(buf, 0, "signature")
    file_len, off = get_varint(buf, off, "signature")
    if off + 2 > len(buf):
        raise ProtocolError("signature: truncated")
    if not buf[off + 1] & SIG_BASIS_HASH:
        return None
    if block_len or buf[off] or buf[off + 1] != SIG_BASIS_HASH or file_len > 1 << 62:
        raise ProtocolError("signature: basis hash field out of range")
    if len(buf) != off + 2 + BASIS_HASH:
        raise ProtocolError("signature: basis hash of the wrong length")
    return file_len, bytes(buf[off + 2:])


def signature_from_wire(buf, salt: bytes):
    """The Signature a Want carried, with this transfer's ``salt`` (or the
    one it carries). ProtocolError for a basis hash (``basis_hash_of``) or
    anything malformed."""
    import numpy as np
    from .. import formats
    from ..signature import Signature
    block_len, off = get_varint(buf, 0, "signature")
    file_len, off = get_varint(buf, off, "signature")
    if off + 2 > len(buf):
        raise ProtocolError("signature: truncated")
    strong_len, flags = buf[off], buf[off + 1]
    off += 2
    if not formats.MIN_BLOCK_LEN <= block_len <= formats.MAX_BLOCK_LEN or not MIN_STRONG <= strong_len <= MAX_STRONG \
            or file_len > 1 << 62 or flags & ~SIG_SALT:
        raise ProtocolError("signature: field out of range")
    if flags & SIG_SALT:
        if off + 32 > len(buf):
            raise ProtocolError("signature: truncated")
        salt = bytes(buf[off:off + 32])
        off += 32
    n = formats.block_count(file_len, block_len)
    if len(buf) != off + n * (6 + strong_len):
        raise ProtocolError("signature: length does not match its blocks")
    weak = np.frombuffer(buf, "<u4", n, off).astype(np.uint32)
    check = np.frombuffer(buf, "<u2", n, off + 4 * n).astype(np.uint32) << np.uint32(16)
    strong = np.frombuffer(buf, np.uint8, n * strong_len, off + 6 * n).reshape(n, strong_len).copy()
    return Signature(block_len, file_len, strong_len, salt, b"", weak, check, strong, 16)


# -- deltas ----------------------------------------------------------------------------

def delta_to_wire(kinds: np.ndarray, sources: np.ndarray, lengths: np.ndarray, literals) -> bytes:
    """Instructions (formats.COPY / INSERT, basis offsets, lengths) and the
    literal bytes of the INSERTs in order, as a wire delta."""
    from .. import formats
    out = bytearray()
    put_varint(out, int(kinds.shape[0]))
    expected = 0
    for kind, src, n in zip(kinds.tolist(), sources.tolist(), lengths.tolist()):
        if kind == formats.COPY:
            put_varint(out, n << 1 | 1)
            put_varint(out, zigzag(src - expected))
            expected = src + n
        else:
            put_varint(out, n << 1)
    out += literals
    return bytes(out)


def delta_from_wire(buf, basis_len: int, target_len: int):
    """(kinds, sources, lengths, literals) of a wire delta, for
    ``kernels.assemble`` (INSERT sources are offsets in ``literals``).
    ProtocolError unless it makes exactly ``target_len`` bytes from a basis of
    ``basis_len`` with the literal bytes it holds."""
    import numpy as np
    from .. import formats
    count, pos = get_varint(buf, 0, "delta")
    if count > len(buf):
        raise ProtocolError("delta: more instructions than bytes")
    kinds = np.empty(count, np.uint8)
    sources = np.empty(count, np.int64)
    lengths = np.empty(count, np.int64)
    expected = total = literal = 0
    for i in range(count):
        v, pos = get_varint(buf, pos, "delta")
        n = v >> 1
        if n == 0:
            raise ProtocolError("delta: empty instruction")
        if v & 1:
            d, pos = get_varint(buf, pos, "delta")
            src = expected + unzigzag(d)
            if src < 0 or src + n > basis_len:
                raise ProtocolError("delta: a copy outside the basis")
            kinds[i], sources[i] = formats.COPY, src
            expected = src + n
        else:
            kinds[i], sources[i] = formats.INSERT, literal
            literal += n
        lengths[i] = n
        total += n
        if total > target_len:
            raise ProtocolError("delta: longer than its target")
    if total != target_len or len(buf) - pos != literal:
        raise ProtocolError("delta: lengths do not add up")
    return kinds, sources, lengths, np.frombuffer(buf, np.uint8, literal, pos)


# -- pack members ----------------------------------------------------------------------

class Member(NamedTuple):
    """One file's content in a pack (or why there is none)."""
    file_id: int
    status: int                    # frames.FILE_OK, FILE_VANISHED, FILE_ERROR
    flags: int = 0                 # MEMBER_DELTA or MEMBER_SAME
    blake3: bytes = b""            # MEMBER_HASH: the first bytes of the BLAKE3 of the file the content makes
    mode: int = 0
    seconds: int = 0
    nanoseconds: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    content: bytes = b""           # the file, a wire delta (MEMBER_DELTA), or nothing (MEMBER_SAME)
    message: bytes = b""

    @property
    def delta(self) -> bool:
        return bool(self.flags & MEMBER_DELTA)

    @property
    def same(self) -> bool:
        return bool(self.flags & MEMBER_SAME)


def encode_member(out: bytearray, m: Member) -> None:
    out += m.file_id.to_bytes(4, "little")
    out.append(m.status)
    out.append(m.flags)
    if m.status != FILE_OK:
        put_varint(out, len(m.message))
        out += m.message
        return
    if len(m.blake3) != MEMBER_HASH:
        raise ValueError(f"a member's BLAKE3 is {MEMBER_HASH} bytes")
    out += m.blake3
    for v in (m.mode, zigzag(m.seconds), m.nanoseconds, m.size, m.uid, m.gid, len(m.content)):
        put_varint(out, v)
    out += m.content


def decode_members(buf) -> list[Member]:
    """The members of a pack's content (ProtocolError if malformed)."""
    view = memoryview(buf)
    n, pos = get_varint(view, 0, "pack")
    if n * 6 > len(view):
        raise ProtocolError("pack: more members than bytes")
    out = []
    for _ in range(n):
        if pos + 6 > len(view):
            raise ProtocolError("pack: truncated")
        fid, status, flags = int.from_bytes(view[pos:pos + 4], "little"), view[pos + 4], view[pos + 5]
        pos += 6
        if status not in (FILE_OK, FILE_VANISHED, FILE_ERROR) or flags & ~(MEMBER_DELTA | MEMBER_SAME) \
                or flags == MEMBER_DELTA | MEMBER_SAME or (flags and status != FILE_OK):
            raise ProtocolError("pack: bad member status or flags")
        if status != FILE_OK:
            length, pos = get_varint(view, pos, "pack")
            if pos + length > len(view) or length > 4000:
                raise ProtocolError("pack: truncated")
            out.append(Member(fid, status, flags, message=bytes(view[pos:pos + length])))
            pos += length
            continue
        if pos + MEMBER_HASH > len(view):
            raise ProtocolError("pack: truncated")
        digest = bytes(view[pos:pos + MEMBER_HASH])
        pos += MEMBER_HASH
        fields = []
        for _ in range(7):
            v, pos = get_varint(view, pos, "pack")
            fields.append(v)
        mode, seconds, ns, size, uid, gid, length = fields
        if ns >= 10**9 or size > 1 << 62 or mode > 0xFFFFFFFF or uid > 0xFFFFFFFF or gid > 0xFFFFFFFF \
                or pos + length > len(view) or (length and flags & MEMBER_SAME):
            raise ProtocolError("pack: member field out of range")
        out.append(Member(fid, status, flags, digest, mode, unzigzag(seconds), ns, size, uid, gid,
                          bytes(view[pos:pos + length])))
        pos += length
    if pos != len(view):
        raise ProtocolError(f"pack: {len(view) - pos} bytes of trailing data")
    return out
