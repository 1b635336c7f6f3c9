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
from .parallel import split, thread_count
from .signature import HashInBackground, Signature, hash_blocks, read_signature

MAX_CHAIN = 64                 # blocks sharing one weak sum tried per position
_PIECE_BYTES = 64 << 20        # scan work unit
LITERAL_CHUNK = 1 << 20
_PARALLEL_BYTES = 4 << 20      # a thread per this many bytes at most: starting one (~0.1-1 ms on a busy
#                                machine) costs more than scanning or compressing less


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


class _ScanState:
    """Where a scan stands before the window at ``pos``: right after a match
    (``fresh``) or sliding, the block it prefers (``expected``, or -1) and the
    end of its last match (the preference lapses a block past it)."""

    __slots__ = ("pos", "fresh", "expected", "last_end")

    def __init__(self, pos: int, fresh: bool, expected: int, last_end: int):
        self.pos, self.fresh, self.expected, self.last_end = pos, fresh, expected, last_end

    def after(self, pos: np.ndarray, blk: np.ndarray, stop: int, L: int) -> "_ScanState":
        """The state at ``stop`` of a scan that started here and found the
        matches (pos, blk) among the windows starting before ``stop``."""
        if pos.size:
            end = int(pos[-1]) + L
            if end >= stop:
                return _ScanState(end, True, int(blk[-1]) + 1, end)
            return _ScanState(stop, False, int(blk[-1]) + 1, end)
        if self.pos >= stop:
            return self
        return _ScanState(stop, False, self.expected, self.last_end)


def _settled(pos: np.ndarray, lo: int, hi: int, L: int, state: _ScanState | None) -> list[tuple[int, int]]:
    """The ranges of [lo, hi) where a scan that found the matches ``pos`` (and
    started in ``state``; None: at ``lo`` with no preference) slid its window
    with no preferred block: not inside a match, and a block or more past the
    last one. There, the scan's state is its position alone."""
    first = lo
    if state is not None and state.expected >= 0:
        first = max(lo, state.last_end + L)
    starts = np.concatenate(([first], pos + 2 * L))
    ends = np.concatenate((pos, [hi]))
    keep = ends > starts
    return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def _meeting(rescan: tuple[np.ndarray, np.ndarray], state: _ScanState, stop: int,
             piece: tuple[np.ndarray, np.ndarray], lo: int, hi: int, L: int) -> int | None:
    """The first position where the re-scan of a piece from the true state
    (``rescan``: its matches among windows in [state.pos, stop)) and the
    piece's own scan (``piece``: its matches in [lo, hi), started at ``lo``
    with no preference) are provably in the same state, so that the piece's
    own matches from there on are the ones a single scan finds: a match both
    found (same position, same block), or a position where both slid their
    window with no preferred block. None if they do not meet before ``stop``."""
    rp, rb = rescan
    pp, pb = piece
    best = None
    if rp.size and pp.size:
        i = np.searchsorted(pp, rp)
        inside = i < pp.size
        same = np.zeros(rp.size, bool)
        same[inside] = (pp[i[inside]] == rp[inside]) & (pb[i[inside]] == rb[inside])
        hits = np.flatnonzero(same)
        if hits.size:
            best = int(rp[hits[0]])
    a = _settled(rp, state.pos, stop, L, state)
    near = pp[(pp >= state.pos - 2 * L) & (pp < stop)]
    before = pp[pp < state.pos - 2 * L]
    b = _settled(near, lo, hi, L, None if not before.size else _ScanState(0, False, 0, int(before[-1]) + L))
    i = j = 0
    while i < len(a) and j < len(b):
        x = max(a[i][0], b[j][0])
        if x < min(a[i][1], b[j][1]):
            if best is None or x < best:
                best = x
            break
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return best


def find_matches(sig: Signature, data: np.ndarray, threads: int | None = None) -> Matches:
    """Verified block matches of ``data`` against ``sig``, in increasing
    position order. The same for any ``threads``: the file is scanned in
    pieces in parallel, and each piece's matches are joined to the previous
    ones where a re-scan from the true state (usually within a block or two
    of the piece's start) meets the piece's own scan; so the tentative matches
    are exactly those of one scan over the whole file. Each is then confirmed
    by BLAKE3."""
    from .kernels.native import get
    build_table, scan, sums_at = get("build_table"), get("scan"), get("sums_at")

    L = sig.block_len
    n = int(data.shape[0])
    threads = max(1, min(threads or thread_count(), n // _PARALLEL_BYTES))
    full = sig.file_len // L
    key = sig.key_words
    weights = sig.check_weights() if sig.count else None
    pos = np.empty(0, np.int64)
    src = np.empty(0, np.int64)

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

        def run(lo: int, hi: int, state: _ScanState) -> tuple[np.ndarray, np.ndarray]:
            cap = max(hi - lo, 0) // L + 1
            out_pos = np.empty(cap, dtype=np.int64)
            out_blk = np.empty(cap, dtype=np.int64)
            k = scan(data, lo, hi, L, weights, keys, heads, filt, bits,
                     sorted_weak, sorted_check, sorted_block, block_weak, block_check,
                     MAX_CHAIN, state.fresh, state.expected, state.last_end, out_pos, out_blk)
            return out_pos[:k], out_blk[:k]

        if len(pieces) == 1:
            tentative = [run(0, windows, _ScanState(0, True, -1, 0))]
        else:
            with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
                own = list(pool.map(lambda r: run(r[0], r[1], _ScanState(r[0], True, -1, r[0])), pieces))
            tentative = [own[0]]
            state = _ScanState(0, True, -1, 0).after(*own[0], pieces[0][1], L)
            for (lo, hi), (pp, pb) in zip(pieces[1:], own[1:]):
                if state.pos >= hi:
                    continue                 # the previous match covers every window of this piece
                step = 4 * L
                while True:                  # re-scan from the true state until it meets the piece's scan
                    stop = min(hi, state.pos + step)
                    rp, rb = run(state.pos, stop, state)
                    meet = _meeting((rp, rb), state, stop, (pp, pb), lo, hi, L)
                    if meet is not None:
                        tail = (np.concatenate((rp[rp < meet], pp[pp >= meet])),
                                np.concatenate((rb[rp < meet], pb[pp >= meet])))
                        tentative.append(tail)
                        state = state.after(*tail, hi, L)
                        break
                    tentative.append((rp, rb))
                    state = state.after(rp, rb, stop, L)
                    if stop >= hi:
                        break
                    step *= 2
        pos = np.concatenate([t[0] for t in tentative])
        blk = np.concatenate([t[1] for t in tentative])
        # Confirm every tentative match with BLAKE3 (a refuted one becomes literal data).
        confirm = split(pos.shape[0], threads)
        if len(confirm) > 1:
            with ThreadPoolExecutor(len(confirm)) as pool:
                oks = list(pool.map(lambda r: _confirmed(data, pos[r[0]:r[1]], blk[r[0]:r[1]], L, key, sig, strong),
                                    confirm))
            ok = np.concatenate(oks)
        else:
            ok = _confirmed(data, pos, blk, L, key, sig, strong)
        pos, src = pos[ok], blk[ok] * L

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


def _confirmed(data, pos, blk, L, key, sig, strong) -> np.ndarray:
    """Which tentative matches BLAKE3 confirms (bool per match)."""
    if not pos.size:
        return np.zeros(0, bool)
    digests = hash_blocks(data, pos, L, key)[:, : sig.strong_len]
    return np.all(digests == strong[blk], axis=1)


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
        for i, (raw_len, codec, payload) in enumerate(_encoded(chunks, threads if nchunks > 1 else 1)):
            stored_total += _put_chunk(fd, chunk_table, i, raw_len, codec, payload)
        os.pwrite(fd, chunk_table.tobytes(), table_offset)
        digest = target_hash.result() if isinstance(target_hash, HashInBackground) else target_hash
        header = formats.DeltaHeader(sig.file_len, sig.file_hash, int(data.shape[0]), digest,
                                     int(kinds.shape[0]), literal_len, nchunks)
        os.pwrite(fd, formats.pack_delta_header(header), 0)
    return table_offset + chunk_table.nbytes + stored_total, stored_total


def _encoded(chunks, threads: int):
    """(raw length, codec, payload) of each chunk in order: compressed on this
    thread, or by ``threads`` workers with at most 2 x threads chunks in flight."""
    if threads <= 1:
        for raw in chunks:
            yield (raw.shape[0], *_encode_chunk(raw))
        return
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for raw in chunks:
            pending.append((raw.shape[0], pool.submit(_encode_chunk, raw)))
            if len(pending) > 2 * threads:
                raw_len, fut = pending.pop(0)
                yield (raw_len, *fut.result())
        for raw_len, fut in pending:
            yield (raw_len, *fut.result())


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


def instructions_in_memory(sig: Signature, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    """(kinds, sources, lengths, literal bytes) of the delta of ``data``
    against ``sig``, on this thread (no pool, no scratch file: for the small
    files of a network transfer, where starting threads and writing a delta
    file cost more than the scan). COPY sources are basis offsets; the
    literal bytes are the INSERTs' in order.

    A file the length of the basis whose every block hashes as the basis's
    block at the same offset is the basis (most files of a release update:
    only their mtime changed): one COPY, found with one or two kernel calls
    instead of the rolling scan's six."""
    n = int(data.shape[0])
    if n and n == sig.file_len and _same_blocks(sig, data):
        return (np.array([formats.COPY], np.uint8), np.zeros(1, np.int64), np.array([n], np.int64), b"")
    matches = find_matches(sig, data, threads=1)
    kinds, sources, lengths, literal_positions = build_instructions(matches, n)
    counts = lengths[kinds == formats.INSERT]
    literal = b"".join(data[at:at + count].tobytes() for at, count in zip(literal_positions.tolist(),
                                                                          counts.tolist()))
    return kinds, sources, lengths, literal


def _same_blocks(sig: Signature, data: np.ndarray) -> bool:
    """Whether every block of ``data`` (as long as the basis) has the keyed
    strong hash of the basis's block at the same offset."""
    L, full, k = sig.block_len, sig.file_len // sig.block_len, sig.strong_len
    key = sig.key_words
    if full and not np.array_equal(hash_blocks(data, np.arange(full, dtype=np.int64) * L, L, key)[:, :k],
                                   sig.strong[:full]):
        return False
    tail = sig.tail_len
    return not tail or np.array_equal(hash_blocks(data, np.array([full * L], np.int64), tail, key)[0, :k],
                                      sig.strong[full])


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
