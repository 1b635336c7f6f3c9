"""Kernels against the references in tests/naive.py, on random and edge inputs."""
import os

import blake3
import numpy as np
import pytest

from resync.kernels import native
from resync.kernels.blake3_lanes import IV, LANES, SCRATCH_WORDS

from . import naive
from .conftest import NOJIT

LENGTHS_SMALL = [1, 3, 63, 64, 65, 1023, 1024, 1025, 2048, 2049]
LENGTHS = LENGTHS_SMALL + [3072, 4096, 4097, 8192, 9999, 32768, 65537]


class Kernels:
    """One backend's kernels, with the allocating conveniences the tests use."""

    def __init__(self, functions):
        self.__dict__.update(functions)

    def weights(self, seed: int, length: int) -> np.ndarray:
        out = np.empty(length, np.uint32)
        self.check_weights(np.uint64(seed), out)
        return out

    def table(self, sorted_weak: np.ndarray, bits: int):
        keys, heads = np.empty(1 << bits, np.uint32), np.empty(1 << bits, np.int64)
        filt = np.empty(1 << bits, np.uint8)
        self.build_table(sorted_weak, bits, keys, heads, filt)
        return keys, heads, filt


def _module_kernels():
    import importlib
    return {name: getattr(importlib.import_module(f"resync.kernels.{module}"), name)
            for name, (module, _, _) in native.EXPORTS.items() if native.supported(name)}


@pytest.fixture(params=["jit"] if NOJIT else ["jit", "native"], scope="module")
def kern(request):
    """Each test runs on the Numba dispatchers (pure Python under
    NUMBA_DISABLE_JIT=1) and on the native library that commands use."""
    return Kernels(_module_kernels() if request.param == "jit" else native.native_kernels())


def _b3(data: bytes, key: bytes | None) -> bytes:
    return (blake3.blake3(data, key=key) if key else blake3.blake3(data)).digest()


def _hash(kern, data: np.ndarray, starts, length: int, key: bytes | None) -> list[bytes]:
    out = np.empty((len(starts), 8), np.uint32)
    words = np.frombuffer(key, "<u4").astype(np.uint32) if key else IV
    kern.hash_windows(data, np.asarray(starts, np.int64), length, words, key is not None, out,
                      np.empty(SCRATCH_WORDS, np.uint32))
    return [row.tobytes() for row in out]


@pytest.mark.nojit
@pytest.mark.parametrize("length", LENGTHS_SMALL)
def test_hash_windows_small_matches_blake3(kern, rng, length):
    data = rng.integers(0, 256, 3 * length + 7, dtype=np.uint8)
    key = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
    starts = [0, 1, 2, 3, data.shape[0] - length]     # unaligned and flush with the end
    for k in (key, None):
        got = _hash(kern, data, starts, length, k)
        assert got == [_b3(data[s:s + length].tobytes(), k) for s in starts]


@pytest.mark.parametrize("length", LENGTHS)
def test_hash_windows_matches_blake3_across_lane_groups(kern, rng, length):
    data = rng.integers(0, 256, length * 3 + 4096, dtype=np.uint8)
    key = os.urandom(32)
    n = 2 * LANES + 5                                  # full groups and a partial one
    starts = np.sort(rng.integers(0, data.shape[0] - length + 1, n))
    starts[-1] = data.shape[0] - length
    for k in (key, None):
        got = _hash(kern, data, starts, length, k)
        assert got == [_b3(data[s:s + length].tobytes(), k) for s in starts]


@pytest.mark.nojit
def test_check_weights_match_reference(kern):
    for seed in (0, 1, 2**63 + 5):
        assert kern.weights(seed, 300).tolist() == naive.check_weights(seed, 300)


@pytest.mark.nojit
@pytest.mark.parametrize("size,block", [(0, 8), (1, 8), (8, 8), (9, 8), (100, 16), (1000, 700), (4096, 64), (5000, 1024)])
def test_block_sums_match_zlib(kern, rng, size, block):
    data = rng.integers(0, 256, size, dtype=np.uint8)
    count = -(-size // block)
    weights = kern.weights(7, block)
    weak = np.zeros(count, np.uint32)
    chk = np.zeros(count, np.uint32)
    kern.block_sums(data, 0, count, block, weights, weak, chk)
    raw = data.tobytes()
    assert weak.tolist() == naive.adler32_blocks(raw, block)
    assert chk.tolist() == [naive.check_value(raw[i:i + block], weights.tolist()) for i in range(0, size, block)]


@pytest.mark.nojit
def test_block_sums_extreme_bytes(kern):
    # all 0xff exercises the largest intermediate sums before the modulo
    block = 1 << 20
    data = np.full(block + 5, 255, np.uint8)
    weights = kern.weights(1, block)
    weak = np.zeros(2, np.uint32)
    chk = np.zeros(2, np.uint32)
    kern.block_sums(data, 0, 2, block, weights, weak, chk)
    assert weak.tolist() == naive.adler32_blocks(data.tobytes(), block)


def _scan(kern, new: np.ndarray, basis: np.ndarray, block: int, max_chain: int = 64, start=0, stop=None,
          filter_bytes=None, weights=None, state=None):
    full = basis.shape[0] // block
    weights = kern.weights(99, block) if weights is None else weights
    weak = np.zeros(full, np.uint32)
    chk = np.zeros(full, np.uint32)
    kern.block_sums(basis, 0, full, block, weights, weak, chk)
    order = np.argsort(weak, kind="stable")
    sw = weak[order]
    runs = int(np.count_nonzero(np.diff(sw))) + 1 if full else 1
    bits = max(10, (4 * runs - 1).bit_length())
    keys, heads, filt = kern.table(sw, bits)
    if filter_bytes is not None:      # the filter only rejects early: any size gives the same matches
        filt = np.empty(filter_bytes, np.uint8)
        kern.build_table(sw, bits, keys, heads, filt)
    stop = new.shape[0] if stop is None else stop
    cap = max(stop - start, 0) // block + 1
    pos = np.zeros(cap, np.int64)
    blk = np.zeros(cap, np.int64)
    state = (True, -1, start) if state is None else state
    k = kern.scan(new, start, stop, block, weights, keys, heads, filt, bits, sw, chk[order],
                  order.astype(np.int64), weak, chk, max_chain, *state, pos, blk)
    got = list(zip(pos[:k].tolist(), blk[:k].tolist()))
    ref = naive.scan(new.tobytes(), block, weak.tolist(), chk.tolist(), weights.tolist(), max_chain, start, stop,
                     state)
    return got, ref


@pytest.mark.nojit
@pytest.mark.parametrize("case", ["same", "insert_start", "delete_start", "insert_mid", "delete_mid",
                                  "insert_end", "delete_end", "short", "empty_new", "replace"])
def test_scan_matches_naive_edge_cases(kern, rng, case):
    block = 16
    basis = rng.integers(0, 256, block * 12, dtype=np.uint8)
    b = basis
    new = {
        "same": b, "insert_start": np.concatenate([[7], b]), "delete_start": b[1:],
        "insert_mid": np.concatenate([b[:77], [1], b[77:]]), "delete_mid": np.concatenate([b[:77], b[78:]]),
        "insert_end": np.concatenate([b, [3]]), "delete_end": b[:-1], "short": b[:block - 1],
        "empty_new": b[:0], "replace": np.concatenate([b[:40], 255 - b[40:50], b[50:]]),
    }[case].astype(np.uint8)
    got, ref = _scan(kern, new, basis, block)
    assert got == ref
    if case == "same":
        assert got == [(i * block, i) for i in range(12)]


def test_scan_matches_naive_random(kern, rng):
    from .conftest import edited
    for block in (8, 64, 700):
        basis = rng.integers(0, 256, block * 40 + 13, dtype=np.uint8)
        new = edited(rng, basis, 6, span=block * 2)
        got, ref = _scan(kern, new, basis, block)
        assert got == ref
        # a scan of a sub-range sees the same rules
        got, ref = _scan(kern, new, basis, block, start=5, stop=new.shape[0] // 2)
        assert got == ref
        for size in (1, 3, 1000):
            got, ref = _scan(kern, new, basis, block, filter_bytes=size)
            assert got == ref


def test_scan_resumes_from_a_given_state(kern, rng):
    """Started as if right after a match of block 3 (fresh, expected 4), the
    scan takes block 4's check alone; started rolling with that preference,
    it keeps it for one block length past the match's end, then forgets it."""
    block = 16
    basis = np.tile(rng.integers(0, 256, block, dtype=np.uint8), 12)   # every block equal
    new = np.concatenate([[1, 2, 3], basis]).astype(np.uint8)
    for state in [(True, 4, 0), (False, 4, 0), (False, 4, -block), (False, -1, 0), (True, 11, 0)]:
        got, ref = _scan(kern, new, basis, block, state=state)
        assert got == ref, state
    got, _ = _scan(kern, new, basis, block, state=(False, 4, 0))
    assert got[0] == (3, 4)                          # preferred: 3 bytes past the match's end
    got, _ = _scan(kern, new, basis, block, state=(False, 4, -block))
    assert got[0] == (3, 0)                          # forgotten: the first block of the chain


def test_scan_after_match_trusts_the_next_blocks_check(kern, rng):
    # With all-zero weights every check is 0, so right after a match the next
    # block is always taken (the caller's BLAKE3 refutes such matches); the
    # kernel must follow that rule exactly like the reference.
    block = 16
    basis = rng.integers(0, 256, block * 10, dtype=np.uint8)
    new = np.concatenate([basis[:40], [9, 9, 9], basis[40:]]).astype(np.uint8)
    got, ref = _scan(kern, new, basis, block, weights=np.zeros(block, np.uint32))
    assert got == ref
    assert got[:4] == [(0, 0), (16, 1), (32, 2), (48, 3)]    # block 2 spans the insert


def test_scan_low_entropy_and_chain_cap(kern, rng):
    # Every block equal: one long chain. Also equal weak sums with different
    # checks (permuted blocks keep s1 but not s2: use two-byte swaps that keep adler).
    block = 32
    basis = np.tile(rng.integers(0, 256, block, dtype=np.uint8), 50)
    new = np.concatenate([basis[:100], [1, 2, 3], basis[100:]]).astype(np.uint8)
    for chain in (1, 4, 64):
        got, ref = _scan(kern, new, basis, block, max_chain=chain)
        assert got == ref
    zeros = np.zeros(block * 30, np.uint8)
    got, ref = _scan(kern, zeros, zeros, block, max_chain=2)
    assert got == ref and len(got) == 30


@pytest.mark.nojit
def test_sums_at_matches_reference(kern, rng):
    data = rng.integers(0, 256, 500, dtype=np.uint8)
    weights = kern.weights(3, 123)
    weak, chk = kern.sums_at(data, 17, 123, weights)
    raw = data[17:140].tobytes()
    import zlib
    assert int(weak) == zlib.adler32(raw)
    assert int(chk) == naive.check_value(raw, weights.tolist())


@pytest.mark.nojit
@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
def test_assemble_matches_naive(kern, rng, window):
    basis = rng.integers(0, 256, 3000, dtype=np.uint8)
    literals = rng.integers(0, 256, 2000, dtype=np.uint8)
    kinds, sources, lengths, lit = [], [], [], 0
    for _ in range(40):
        if rng.integers(0, 2):
            n = int(rng.integers(1, 200))
            s = int(rng.integers(0, 3000 - n))
            kinds.append(0), sources.append(s), lengths.append(n)
        else:
            n = int(rng.integers(1, 40))
            kinds.append(1), sources.append(lit), lengths.append(n)
            lit += n
    expected = naive.patch(basis.tobytes(), list(zip(kinds, sources, lengths)), literals.tobytes())
    k, s, ln = np.array(kinds, np.uint8), np.array(sources, np.int64), np.array(lengths, np.int64)
    out, index, skip = bytearray(), 0, 0
    buf = np.empty(window, np.uint8)
    while True:
        index, skip, filled = kern.assemble(basis, literals, 0, k, s, ln, index, skip, buf)
        if filled == 0:
            break
        out += buf[:filled].tobytes()
    assert bytes(out) == expected


def test_native_scratch_size_matches_kernel():
    assert native.HASH_WINDOWS_SCRATCH == SCRATCH_WORDS


@pytest.mark.skipif(NOJIT, reason="native library is not used under NUMBA_DISABLE_JIT")
def test_native_kernels_load_without_numba():
    import subprocess
    import sys
    code = ("import sys; from resync.kernels import native; native.get('block_sums'); "
            "print(native.status()); print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    status, numba_loaded = out.splitlines()
    assert status.startswith("native: ")
    assert numba_loaded == "False"


@pytest.mark.skipif(NOJIT, reason="native library is not used under NUMBA_DISABLE_JIT")
def test_native_arguments_are_checked():
    fns = native.native_kernels()
    weights = np.empty(8, np.uint32)
    with pytest.raises(TypeError, match="expected a C-contiguous 1-D uint32"):
        fns["check_weights"](1, weights.astype(np.int64))
    with pytest.raises(TypeError, match="C-contiguous"):
        fns["check_weights"](1, np.empty(16, np.uint32)[::2])
    with pytest.raises(TypeError, match="takes 2 arguments"):
        fns["check_weights"](1)
