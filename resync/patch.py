"""Patch stage: rebuild the new file from the basis and a delta, atomically.

Before anything is renamed into place, the result must hash to the target's
BLAKE3, which proves it is the target whatever the basis was; on a mismatch
the basis is hashed too, so that the error can say whether the basis was not
the one the delta was made against, and the output path keeps its old contents.
Output is assembled in bounded windows, so memory does not grow with file size.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from . import formats
from .errors import FormatError, NoSpaceError, VerificationError
from .fs import MappedFile, StreamWriter, atomic_output
from .parallel import thread_count
from .signature import HashInBackground

WINDOW = 8 << 20


@dataclass
class PatchStats:
    target_bytes: int
    copied_bytes: int
    literal_bytes: int
    instructions: int

    def as_dict(self) -> dict:
        return asdict(self)


class LiteralStream:
    """Decodes the delta's literal chunks in order and hands out contiguous
    windows of the literal stream (requests must move forward)."""

    def __init__(self, buf, parsed: formats.ParsedDelta, name: str):
        self._buf = buf
        self._chunks = parsed.chunks
        self._name = name
        self._next = 0
        self._offset = parsed.data_offset
        self._data = np.empty(0, np.uint8)
        self._base = 0

    def _decode_next(self) -> np.ndarray:
        import lz4.block

        codec, raw, stored = (int(x) for x in self._chunks[self._next])
        payload = memoryview(self._buf)[self._offset:self._offset + stored]
        self._offset += stored
        self._next += 1
        if codec == formats.CODEC_RAW:
            return np.frombuffer(payload, np.uint8)
        try:
            out = lz4.block.decompress(payload, uncompressed_size=raw)
        except Exception:   # lz4 raises its own error types for malformed input
            raise FormatError(self._name, "resync delta", f"corrupt LZ4 literal chunk {self._next - 1}") from None
        if len(out) != raw:
            raise FormatError(self._name, "resync delta", f"LZ4 literal chunk {self._next - 1} has the wrong size")
        return np.frombuffer(out, np.uint8)

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Return (array, base) with array[i] = literal byte base + i, covering [lo, hi)."""
        drop = lo - self._base
        parts = [self._data[drop:]]
        have = self._data.shape[0] - drop
        while have < hi - lo and self._next < self._chunks.shape[0]:
            part = self._decode_next()
            parts.append(part)
            have += part.shape[0]
        self._data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._base = lo
        return self._data, self._base


def _check_space(path: str, need: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NoSpaceError(path, f"needs {need} bytes, {free} free")


def apply_delta(basis_path: str | None, delta_path: str, out_path: str,
                threads: int | None = None, durable: bool = True) -> PatchStats:
    """Rebuild the delta's target from ``basis_path`` into ``out_path``,
    replaced atomically (durably unless ``durable`` is False). BASIS may be
    None or absent when the delta was made from an empty signature.
    VerificationError (nothing written) when the result's BLAKE3 differs."""
    with MappedFile(delta_path) as delta:
        parsed = formats.unpack_delta(delta.buffer, delta_path)
        _check_space(out_path, parsed.header.target_len)
        with atomic_output(out_path, durable) as fd:
            stats, _ = patch_into(basis_path, delta, parsed, fd, out_path, threads)
    return stats


def assemble_in_memory(basis: np.ndarray, kinds: np.ndarray, sources: np.ndarray, lengths: np.ndarray,
                       literals: np.ndarray, target_len: int) -> np.ndarray:
    """The target of checked instructions (``protocol.encodings.delta_from_wire``:
    COPY sources within ``basis``, INSERT sources offsets in ``literals``,
    lengths adding up to ``target_len``) as a new uint8 array: the small files
    of a network transfer, rebuilt without a delta file or writer threads."""
    from .kernels.native import get
    out = np.empty(target_len, np.uint8)
    if target_len:
        _, _, filled = get("assemble")(basis, literals, 0, kinds, sources, lengths, 0, 0, out)
        if filled != target_len:
            raise ValueError("instructions do not fill their target")
    return out


def _write_whole(fd: int, basis, literals: LiteralStream, h, kinds, sources, lengths, hasher, sparse: bool) -> None:
    """The whole target (at most WINDOW bytes) assembled in one buffer, hashed
    and written with one write (or its runs of data, ``sparse``)."""
    from .fs import pwrite_sparse, write_all
    from .kernels.native import get
    out = np.empty(h.target_len, np.uint8)
    lit, lit_base = literals.window(0, h.literal_len)
    get("assemble")(basis, lit, lit_base, kinds, sources, lengths, 0, 0, out)   # (a short fill fails the hash)
    hasher.update(out)
    if sparse:
        pwrite_sparse(fd, out, 0)
        os.ftruncate(fd, h.target_len)
    else:
        write_all(fd, out)


def _write_streamed(fd: int, basis, literals: LiteralStream, h, kinds, sources, lengths, literal_before, hasher,
                    sparse: bool) -> None:
    """The target assembled a window at a time, written and hashed by a
    StreamWriter's threads while the next window is filled."""
    from .kernels.native import get
    assemble = get("assemble")
    writer = StreamWriter(fd, WINDOW, hasher=hasher, sparse=sparse)
    try:
        index, skip, written = 0, 0, 0
        while written < h.target_len:
            window = writer.get()
            lit_lo = int(literal_before[index]) + (skip if kinds[index] == formats.INSERT else 0)
            lit_hi = min(lit_lo + window.shape[0], h.literal_len)
            lit, lit_base = literals.window(lit_lo, lit_hi)
            index, skip, filled = assemble(basis, lit, lit_base, kinds, sources, lengths, index, skip, window)
            writer.put(window, filled)
            written += filled
        writer.finish()
    finally:
        writer.close()


def patch_into(basis_path: str | None, delta: MappedFile, parsed: formats.ParsedDelta, fd: int, out_name: str,
               threads: int | None = None, sparse: bool = False) -> tuple[PatchStats, str]:
    """Write the target of the parsed delta (``delta`` holds its file) into
    the empty file open at ``fd``, from the basis at ``basis_path`` (a path
    the caller reached safely, e.g. /proc/self/fd/N/NAME); ``sparse``: its
    blocks of zeros are left as holes (fs.pwrite_sparse). Returns the stats
    and the result's BLAKE3 (hex), checked: VerificationError if it is not
    the delta's target (the error then says whether the basis was the one
    the delta was made against)."""
    threads = threads or thread_count()
    h = parsed.header
    basis = None
    if basis_path is not None and not (h.basis_len == 0 and not os.path.exists(basis_path)):
        basis = MappedFile(basis_path, populate=True)
    try:
        basis_data = basis.array if basis is not None else np.empty(0, np.uint8)
        if basis_data.shape[0] != h.basis_len:
            raise VerificationError(basis_path, f"basis is {basis_data.shape[0]} bytes, the delta "
                                    f"was made against {h.basis_len} bytes: wrong basis file")
        kinds = parsed.instructions["kind"].copy()
        lengths = parsed.instructions["length"].astype(np.int64)
        sources = parsed.instructions["source"].astype(np.int64)
        is_insert = kinds == formats.INSERT
        literal_before = np.cumsum(np.where(is_insert, lengths, 0)) - np.where(is_insert, lengths, 0)
        sources[is_insert] = literal_before[is_insert]
        literals = LiteralStream(delta.buffer, parsed, delta.name)

        import blake3
        hasher = blake3.blake3()
        if h.target_len <= WINDOW:              # one window: built here, written once (no writer threads)
            _write_whole(fd, basis_data, literals, h, kinds, sources, lengths, hasher, sparse)
        else:
            _write_streamed(fd, basis_data, literals, h, kinds, sources, lengths, literal_before, hasher,
                            sparse)
        # The result's BLAKE3 alone proves it is the target, whatever
        # the basis was; the basis is hashed only to say which went wrong.
        if hasher.digest() != h.target_hash:
            if h.basis_len and HashInBackground(basis_data, threads).result() != h.basis_hash:
                raise VerificationError(basis_path, "basis does not match the signature the "
                                        "delta was made against (BLAKE3 differs); nothing written")
            raise VerificationError(out_name, "result does not match the delta's target "
                                    "BLAKE3 (corrupt delta or basis changed); nothing written")
    finally:
        if basis is not None:
            basis.close()
    copied = int(lengths[~is_insert].sum()) if h.count else 0
    return PatchStats(h.target_len, copied, h.literal_len, h.count), hasher.hexdigest()
