"""Delta stage: COPY/INSERT instructions turning the basis into a new file.

Flow: rolling scan of the new file against the signature (Numba, tentative
matches) -> BLAKE3 of every tentative match in batch (a refuted match becomes
literal data, so the result is correct whatever the weak sums say) -> adjacent
COPYs merged -> literals cut into chunks, LZ4-compressed when that saves bytes.
The new file is scanned in pieces on all cores; its whole-file BLAKE3 runs
alongside and is recorded so ``patch`` can verify its result.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from . import formats
from .fs import MappedFile, atomic_output, write_all
from .parallel import thread_count
from .signature import HashInBackground, Signature, hash_blocks, read_signature

MAX_CHAIN = 64                 # blocks sharing one weak sum tried per position
_PIECE_BYTES = 64 << 20        # scan work unit
LITERAL_CHUNK = 1 << 20


@dataclass
class Matches:
    pos: np.ndarray      # int64 positions in the new file
    src: np.ndarray      # int64 basis offsets
    length: np.ndarray   # int64 lengths


@dataclass
class DeltaStats:
    target_bytes: int
    basis_bytes: int
    block_len: int
    matched_bytes: int
    literal_bytes: int
    literal_stored_bytes: int
    copy_instructions: int
    insert_instructions: int
    delta_bytes: int

    @property
    def savings_pct(self) -> float:
        if self.target_bytes == 0:
            return 0.0
        return 100.0 * (1.0 - self.delta_bytes / self.target_bytes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["savings_pct"] = round(self.savings_pct, 3)
        return d


_MAX_FILTER_BITS = 26          # filter of at most 64 MiB


def _table_bits(runs: int) -> int:
    return max(10, min(30, (4 * max(runs, 1) - 1).bit_length()))


def find_matches(sig: Signature, data: np.ndarray, threads: int | None = None) -> Matches:
    """Verified block matches of ``data`` against ``sig``, in increasing position order."""
    from .kernels.native import get
    build_table, scan, sums_at = get("build_table"), get("scan"), get("sums_at")

    threads = threads or thread_count()
    L = sig.block_len
    n = int(data.shape[0])
    full = sig.file_len // L
    key = sig.key_words
    weights = sig.check_weights() if sig.count else None
    pos_parts: list[np.ndarray] = []
    blk_parts: list[np.ndarray] = []

    if full and n >= L:
        block_weak = np.ascontiguousarray(sig.weak[:full])
        block_check = np.ascontiguousarray(sig.check[:full])
        order = np.argsort(block_weak, kind="stable")
        sorted_weak = block_weak[order]
        runs = int(np.count_nonzero(np.diff(sorted_weak))) + 1
        bits = _table_bits(runs)
        keys = np.empty(1 << bits, np.uint32)
        heads = np.empty(1 << bits, np.int64)
        filt = np.empty(1 << min(bits, _MAX_FILTER_BITS), np.uint8)   # 8 filter bits per slot
        build_table(sorted_weak, bits, keys, heads, filt)
        sorted_check = block_check[order]
        sorted_block = order.astype(np.int64)
        strong = sig.strong[:full]
        windows = n - L + 1
        piece = max(L, min(_PIECE_BYTES, -(-windows // threads)))
        pieces = [(lo, min(lo + piece, windows)) for lo in range(0, windows, piece)]

        def work(lo: int, hi: int):
            cap = (hi - lo) // L + 1
            out_pos = np.empty(cap, dtype=np.int64)
            out_blk = np.empty(cap, dtype=np.int64)
            k = scan(data, lo, hi, L, weights, keys, heads, filt, bits,
                     sorted_weak, sorted_check, sorted_block, block_weak, block_check,
                     MAX_CHAIN, out_pos, out_blk)
            p, b = out_pos[:k], out_blk[:k]
            digests = hash_blocks(data, p, L, key)[:, : sig.strong_len]
            ok = np.all(digests == strong[b], axis=1)
            return p[ok], b[ok]

        if len(pieces) == 1:
            results = [work(*pieces[0])]
        else:
            with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
                results = list(pool.map(lambda r: work(*r), pieces))
        last_end = 0
        for p, b in results:
            # Pieces were scanned independently: drop matches overlapping the
            # previous piece's last match.
            keep = p >= last_end
            p, b = p[keep], b[keep]
            if p.size:
                # Within a piece matches never overlap, so only the first can.
                last_end = int(p[-1]) + L
            pos_parts.append(p)
            blk_parts.append(b)

    pos = np.concatenate(pos_parts) if pos_parts else np.empty(0, np.int64)
    src = np.concatenate(blk_parts) * L if blk_parts else np.empty(0, np.int64)
    length = np.full(pos.shape[0], L, dtype=np.int64)

    tail = sig.tail_len
    if tail and n >= tail:
        # The basis's short last block can only match at the very end.
        tpos = n - tail
        end = int(pos[-1] + L) if pos.size else 0
        if tpos >= end:
            weak, check = sums_at(data, tpos, tail, weights)
            if weak == sig.weak[-1] and check == sig.check[-1]:
                digest = hash_blocks(data, np.array([tpos]), tail, key)[0, : sig.strong_len]
                if np.array_equal(digest, sig.strong[-1]):
                    pos = np.append(pos, tpos)
                    src = np.append(src, full * L)
                    length = np.append(length, tail)
    return Matches(pos, src, length)


def build_instructions(m: Matches, target_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kinds, sources, lengths, literal_positions): COPY runs with the literal
    gaps between them. literal_positions[i] is the target offset of INSERT i."""
    n = m.pos.shape[0]
    if n == 0:
        if target_len == 0:
            e = np.empty(0, np.int64)
            return np.empty(0, np.uint8), e, e, e
        return (np.array([formats.INSERT], np.uint8), np.zeros(1, np.int64),
                np.array([target_len], np.int64), np.zeros(1, np.int64))
    end = m.pos + m.length
    brk = np.ones(n, dtype=bool)
    brk[1:] = (m.pos[1:] != end[:-1]) | (m.src[1:] != m.src[:-1] + m.length[:-1])
    first = np.flatnonzero(brk)
    last = np.append(first[1:] - 1, n - 1)
    run_pos, run_src, run_end = m.pos[first], m.src[first], end[last]
    gap_start = np.concatenate(([0], run_end))
    gap_len = np.concatenate((run_pos, [target_len])) - gap_start
    r = first.shape[0]
    kinds = np.empty(2 * r + 1, np.uint8)
    sources = np.zeros(2 * r + 1, np.int64)
    lengths = np.empty(2 * r + 1, np.int64)
    kinds[0::2] = formats.INSERT
    kinds[1::2] = formats.COPY
    lengths[0::2] = gap_len
    lengths[1::2] = run_end - run_pos
    sources[1::2] = run_src
    positions = np.zeros(2 * r + 1, np.int64)
    positions[0::2] = gap_start
    keep = lengths > 0
    kinds, sources, lengths, positions = kinds[keep], sources[keep], lengths[keep], positions[keep]
    literal_positions = positions[kinds == formats.INSERT]
    return kinds, sources, lengths, literal_positions


def _literal_chunks(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, total: int):
    """Yield the literal stream (the INSERT ranges of ``data`` in order) in
    chunks of LITERAL_CHUNK bytes."""
    from .kernels.native import get
    assemble = get("assemble")

    kinds = np.zeros(starts.shape[0], np.uint8)    # all COPY from data
    index, skip, done = 0, 0, 0
    while done < total:
        buf = np.empty(min(LITERAL_CHUNK, total - done), np.uint8)
        index, skip, filled = assemble(data, data, 0, kinds, starts, lengths, index, skip, buf)
        done += filled
        yield buf


def _encode_chunk(raw: np.ndarray) -> tuple[int, bytes | np.ndarray]:
    import lz4.block
    packed = lz4.block.compress(raw, mode="default", store_size=False)
    if len(packed) < raw.shape[0]:
        return formats.CODEC_LZ4, packed
    return formats.CODEC_RAW, raw


def write_delta(path: str | os.PathLike, sig: Signature, data: np.ndarray, target_hash,
                kinds: np.ndarray, sources: np.ndarray, lengths: np.ndarray,
                literal_positions: np.ndarray, threads: int, durable: bool = True) -> tuple[int, int]:
    """Write a delta file atomically. ``target_hash`` is bytes or a
    HashInBackground. Returns (file size, stored literal bytes)."""
    is_insert = kinds == formats.INSERT
    literal_lengths = lengths[is_insert]
    literal_len = int(literal_lengths.sum())
    nchunks = -(-literal_len // LITERAL_CHUNK)
    records = np.zeros(kinds.shape[0], dtype=formats.INSTRUCTION)
    records["kind"], records["source"], records["length"] = kinds, sources, lengths
    chunk_table = np.zeros(nchunks, dtype=formats.CHUNK)
    table_offset = formats.DELTA_HEADER.size + records.nbytes
    stored_total = 0
    with atomic_output(path, durable) as fd:
        os.pwrite(fd, b"\0" * formats.DELTA_HEADER.size, 0)
        os.lseek(fd, formats.DELTA_HEADER.size, os.SEEK_SET)
        write_all(fd, records)
        write_all(fd, chunk_table)
        chunks = _literal_chunks(data, literal_positions, literal_lengths, literal_len)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            pending = []
            i = 0
            for raw in chunks:
                pending.append((raw.shape[0], pool.submit(_encode_chunk, raw)))
                if len(pending) > 2 * threads:
                    raw_len, fut = pending.pop(0)
                    stored_total += _put_chunk(fd, chunk_table, i, raw_len, *fut.result())
                    i += 1
            for raw_len, fut in pending:
                stored_total += _put_chunk(fd, chunk_table, i, raw_len, *fut.result())
                i += 1
        os.pwrite(fd, chunk_table.tobytes(), table_offset)
        digest = target_hash.result() if isinstance(target_hash, HashInBackground) else target_hash
        header = formats.DeltaHeader(sig.file_len, sig.file_hash, int(data.shape[0]), digest,
                                     int(kinds.shape[0]), literal_len, nchunks)
        os.pwrite(fd, formats.pack_delta_header(header), 0)
    return table_offset + chunk_table.nbytes + stored_total, stored_total


def _put_chunk(fd: int, table: np.ndarray, i: int, raw_len: int, codec: int, payload) -> int:
    write_all(fd, payload)
    stored = len(payload) if isinstance(payload, bytes) else payload.shape[0]
    table[i] = (codec, raw_len, stored)
    return stored


def make_delta(sig: Signature, data: np.ndarray, out: str | os.PathLike,
               threads: int | None = None, durable: bool = True) -> DeltaStats:
    threads = threads or thread_count()
    target_hash = HashInBackground(data)
    matches = find_matches(sig, data, threads)
    kinds, sources, lengths, literal_positions = build_instructions(matches, int(data.shape[0]))
    size, stored = write_delta(out, sig, data, target_hash, kinds, sources, lengths,
                               literal_positions, threads, durable)
    is_insert = kinds == formats.INSERT
    literal = int(lengths[is_insert].sum())
    return DeltaStats(
        target_bytes=int(data.shape[0]), basis_bytes=sig.file_len, block_len=sig.block_len,
        matched_bytes=int(data.shape[0]) - literal, literal_bytes=literal,
        literal_stored_bytes=stored, copy_instructions=int((~is_insert).sum()),
        insert_instructions=int(is_insert.sum()), delta_bytes=size)


def delta_file(sig_path: str, new_path: str, out: str) -> DeltaStats:
    sig = read_signature(sig_path) if os.path.getsize(sig_path) else None
    with MappedFile(new_path) as f:
        if sig is None:
            sig = empty_signature()
        return make_delta(sig, f.array, out)


def empty_signature() -> Signature:
    """The signature of an absent basis: every byte of the new file is literal."""
    from .signature import compute_signature
    return compute_signature(np.empty(0, np.uint8), salt=bytes(32))
