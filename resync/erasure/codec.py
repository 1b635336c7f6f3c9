"""The Reed-Solomon codec of ``resync.erasure`` (see the package): the
generator, encode and decode, and the GF(2^8) kernels' driver."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from ..errors import UnrecoverableError, UsageError
from ..parallel import split, thread_count
from . import MAX_SHARDS, gf
_PARALLEL_BYTES = 1 << 20        # below this much input, one thread
_SPLIT_ALIGN = 4096


def kernel_path() -> str:
    """'gfni' or 'portable': which GF(2^8) kernel encode and decode run."""
    from ..kernels import native
    if os.environ.get("RESYNC_GF_KERNEL", "").lower() == "portable" or native.mode() == "python":
        return "portable"
    return "gfni" if native.supported("gf_mul_gfni") else "portable"


def describe_kernel() -> str:
    """For benchmarks and --version: the path and how the kernels are run."""
    from ..kernels import native
    return f"{kernel_path()} ({native.status().split(':')[0]})"


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(thread_count(), thread_name_prefix="resync-gf")
        return _pool


def multiply(coef: np.ndarray, src: np.ndarray, src_offsets: np.ndarray,
             dst: np.ndarray, dst_offsets: np.ndarray, length: int) -> None:
    """dst rows = coef x src rows over GF(2^8): row i of the output is the
    ``length`` bytes at ``dst[dst_offsets[i]:]``, input row j those at
    ``src[src_offsets[j]:]`` (flat uint8 buffers; rows must not overlap the
    output). The low-level entry point: the shard codec calls it on stripes
    as they lie in its buffers."""
    from ..kernels import native
    coef = np.ascontiguousarray(coef, dtype=np.uint8)
    src_offsets = np.ascontiguousarray(src_offsets, dtype=np.int64)
    dst_offsets = np.ascontiguousarray(dst_offsets, dtype=np.int64)
    rows, inputs = coef.shape
    if rows == 0 or length == 0:
        return
    if inputs == 0:
        for o in dst_offsets:
            dst[o:o + length] = 0
        return
    for name, buf, offs in (("input", src, src_offsets), ("output", dst, dst_offsets)):
        if offs.shape[0] != (inputs if name == "input" else rows):
            raise ValueError(f"{name} offsets do not match the coefficient matrix")
        if offs.min() < 0 or offs.max() + length > buf.shape[0]:
            raise ValueError(f"{name} rows fall outside their buffer")
    if kernel_path() == "gfni":
        fn, extra, tail = native.get("gf_mul_gfni"), gf.bit_matrices(coef), gf.mul_table()

        def run(lo, hi):
            fn(coef, extra, src, src_offsets, dst, dst_offsets, lo, hi, tail)
    else:
        fn = native.get("gf_mul_portable")

        def run(lo, hi):
            fn(coef, src, src_offsets, dst, dst_offsets, lo, hi, np.empty(native.GF_SCRATCH, np.uint8))

    pieces = split(length, thread_count(), _SPLIT_ALIGN) if length * inputs >= _PARALLEL_BYTES else \
        [(0, length)]
    if len(pieces) == 1:
        run(0, length)
        return
    for f in [_threads().submit(run, lo, hi) for lo, hi in pieces]:
        f.result()


def _as_row(shard, index: int) -> np.ndarray:
    if isinstance(shard, np.ndarray):
        if shard.dtype != np.uint8 or shard.ndim != 1:
            raise UsageError(f"shard {index}: expected a 1-D uint8 array, got {shard.dtype}{shard.shape}")
        return shard if shard.flags.c_contiguous else np.ascontiguousarray(shard)
    try:
        return np.frombuffer(shard, np.uint8)
    except TypeError:
        raise UsageError(f"shard {index}: expected a uint8 array or bytes, got {type(shard).__name__}") from None


class ReedSolomon:
    """A systematic (k + m, k) Reed-Solomon code over GF(2^8)."""

    def __init__(self, k: int, m: int):
        if not (isinstance(k, int) and isinstance(m, int)) or k < 1 or m < 0 or k + m > MAX_SHARDS:
            raise UsageError(f"Reed-Solomon needs k >= 1, m >= 0 and k + m <= {MAX_SHARDS} (got k={k}, m={m})")
        self.k = k
        self.m = m
        self.n = k + m

    def __repr__(self) -> str:
        return f"ReedSolomon(k={self.k}, m={self.m})"

    @property
    def parity_matrix(self) -> np.ndarray:
        """The m x k Cauchy matrix (uint8) whose rows make the parity shards."""
        return _parity_matrix(self.k, self.m)

    def encode(self, data: np.ndarray) -> np.ndarray:
        """Parity (m, L) of data (k, L), both uint8."""
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[0] != self.k:
            raise UsageError(f"encode expects a ({self.k}, L) uint8 array, got {data.dtype}{data.shape}")
        data = np.ascontiguousarray(data)
        length = data.shape[1]
        parity = np.empty((self.m, length), np.uint8)
        self.encode_into(data.reshape(-1), np.arange(self.k, dtype=np.int64) * length,
                         parity.reshape(-1), np.arange(self.m, dtype=np.int64) * length, length)
        return parity

    def encode_into(self, src: np.ndarray, src_offsets, dst: np.ndarray, dst_offsets, length: int) -> None:
        """encode() on rows in flat buffers (see ``multiply``)."""
        multiply(self.parity_matrix, src, np.asarray(src_offsets, np.int64), dst,
                 np.asarray(dst_offsets, np.int64), length)

    def plan(self, present, rows=None) -> tuple[tuple[int, ...], np.ndarray]:
        """For the shard indexes in ``present``: the k to read (data shards
        first) and the matrix (len(rows) x k; all n rows by default) that
        turns those k into the shards ``rows``. UnrecoverableError when fewer
        than k are present."""
        chosen = _choose(tuple(sorted(set(present))), self.k, self.n)
        rows = tuple(range(self.n)) if rows is None else tuple(rows)
        return chosen, _recovery_rows(self.k, self.m, chosen, rows)

    def decode(self, shards) -> np.ndarray:
        """The (k, L) data from k + m entries, each a length-L uint8 array (or
        bytes) or None for a lost shard."""
        shards = list(shards)
        if len(shards) != self.n:
            raise UsageError(f"decode expects {self.n} shards (None for lost ones), got {len(shards)}")
        rows = {i: _as_row(s, i) for i, s in enumerate(shards) if s is not None}
        lengths = {r.shape[0] for r in rows.values()}
        if len(lengths) > 1:
            raise UsageError(f"shards differ in length: {sorted(lengths)}")
        length = lengths.pop() if lengths else 0
        missing = [i for i in range(self.k) if i not in rows]
        chosen, recover = self.plan(rows, missing)
        parity_used = [i for i in chosen if i >= self.k]
        # One work buffer: the data rows (the result) and, below them, the
        # parity rows the rebuild reads. Present data rows are copied once
        # into the result; only the parity rows in use are copied besides.
        work = np.empty((self.k + len(parity_used), length), np.uint8)
        for i, row in rows.items():
            if i < self.k:
                work[i] = row
        for t, i in enumerate(parity_used):
            work[self.k + t] = rows[i]
        if missing:
            place = {i: (i if i < self.k else self.k + parity_used.index(i)) for i in chosen}
            flat = work.reshape(-1)
            multiply(recover, flat, np.array([place[i] for i in chosen], np.int64) * length,
                     flat, np.array(missing, np.int64) * length, length)
        out = work[:self.k]
        return out


def _choose(present: tuple[int, ...], k: int, n: int) -> tuple[int, ...]:
    if any(i < 0 or i >= n for i in present):
        raise UsageError(f"shard index out of range 0..{n - 1}")
    if len(present) < k:
        raise UnrecoverableError("stripe", f"{len(present)} of {n} shards present, {k} needed")
    return present[:k]          # sorted: data shards (identity rows) first


@lru_cache(maxsize=1024)
def _parity_matrix(k: int, m: int) -> np.ndarray:
    """C[i, j] = 1 / ((k + i) xor j) from the log and exp tables (x + y is
    XOR in GF(2^8), never 0 here: k + i and j differ)."""
    exp, log = gf.exp_log()
    x = np.arange(k, k + m)[:, None]
    y = np.arange(k)[None, :]
    out = exp[255 - log[x ^ y]].astype(np.uint8) if m else np.zeros((0, k), np.uint8)
    out = np.ascontiguousarray(out)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=256)
def _recovery_rows(k: int, m: int, chosen: tuple[int, ...], rows: tuple[int, ...]) -> np.ndarray:
    """Rows ``rows`` of G @ inverse(G[chosen]) (G = [I; C]): row r gives
    shard r from the chosen k shards (data shards first, then parity).

    Only e x e is inverted, e the number of data shards not chosen: with D
    the chosen data shards, P the chosen parity rows and M the missing data
    shards, C[P, M] x data[M] = parity[P] + C[P, D] x data[D] (+ is XOR), so
    data[M] = A^-1 parity[P] + A^-1 C[P, D] data[D] with A = C[P, M]; every
    square submatrix of a Cauchy matrix is invertible. A parity row r is
    C[r] times those data rows."""
    c = _parity_matrix(k, m)
    pos = {i: j for j, i in enumerate(chosen)}
    data = [i for i in chosen if i < k]
    parity = [i - k for i in chosen if i >= k]
    missing = [i for i in range(k) if i not in pos]
    inverse = np.zeros((k, k), np.uint8)       # inverse(G[chosen]): data shard i from the chosen k
    inverse[data, [pos[i] for i in data]] = 1
    if missing:
        a_inv = gf.invert(np.ascontiguousarray(c[np.ix_(parity, missing)]))
        if a_inv is None:                       # (not for a Cauchy matrix)
            raise UnrecoverableError("stripe", "the chosen shards do not determine the data")
        # over chosen positions: the chosen data shards first, then the chosen parity rows
        inverse[missing, :len(data)] = gf.matmul(a_inv, np.ascontiguousarray(c[np.ix_(parity, data)]))
        inverse[missing, len(data):] = a_inv
    rows = np.asarray(rows, np.intp)
    out = np.empty((len(rows), k), np.uint8)
    low = rows < k
    out[low] = inverse[rows[low]]
    if not low.all():
        out[~low] = gf.matmul(np.ascontiguousarray(c[rows[~low] - k]), inverse)
    out.flags.writeable = False
    return out
