"""GF(2^8) kernels and the Reed-Solomon code, against tests/naive.py."""
import itertools
import random

import numpy as np
import pytest

from resync import erasure
from resync.erasure import ReedSolomon, gf
from resync.errors import UnrecoverableError, UsageError
from resync.kernels import native

from . import mix, naive
from .conftest import NOJIT


def _backends():
    """(name, kernel, uses_gfni) for every way the kernels can run here."""
    import importlib
    mod = importlib.import_module("resync.kernels.gf256")
    out = [("jit-portable", mod.gf_mul_portable, False)]
    if not NOJIT:
        lib = native.native_kernels()
        out.append(("native-portable", lib["gf_mul_portable"], False))
        if native.supported("gf_mul_gfni"):
            out += [("jit-gfni", mod.gf_mul_gfni, True), ("native-gfni", lib["gf_mul_gfni"], True)]
    return out


BACKENDS = _backends()


def _run(kernel, gfni, coef, src, src_offsets, dst, dst_offsets, lo, hi):
    if gfni:
        kernel(coef, gf.bit_matrices(coef), src, src_offsets, dst, dst_offsets, lo, hi, gf.mul_table())
    else:
        kernel(coef, src, src_offsets, dst, dst_offsets, lo, hi, np.empty(native.GF_SCRATCH, np.uint8))


def test_scratch_constant_matches_kernel():
    from resync.kernels import gf256
    assert native.GF_SCRATCH == gf256.SCRATCH


@pytest.mark.nojit
def test_tables_match_the_definition():
    table = gf.mul_table().reshape(256, 256)
    rnd = random.Random(1)
    pairs = [(a, b) for a in (0, 1, 2, 0x80, 0xFF) for b in range(256)]
    pairs += [(rnd.randrange(256), rnd.randrange(256)) for _ in range(2000)]
    for a, b in pairs:
        assert table[a, b] == naive.gf_mul(a, b)
    for c in range(256):
        m = int(gf.bit_matrices(np.array([c], np.uint8))[0]) & ((1 << 64) - 1)
        for x in (0, 1, 2, 3, 0x55, 0x80, 0xFF, rnd.randrange(256)):
            assert naive.affine_byte(m, x) == naive.gf_mul(c, x), (c, x)


def test_matmul_matches_definition():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    want = [[0] * 4 for _ in range(3)]
    for i in range(3):
        for j in range(4):
            for t in range(5):
                want[i][j] ^= naive.gf_mul(int(a[i, t]), int(b[t, j]))
    assert gf.matmul(a, b).tolist() == want


@pytest.mark.nojit
@pytest.mark.parametrize("name,kernel,gfni", BACKENDS, ids=[b[0] for b in BACKENDS])
@pytest.mark.parametrize("length", [0, 1, 31, 32, 33, 511, 512, 513, 2047, 2048, 2049, 4133])
def test_kernel_matches_naive(name, kernel, gfni, length):
    rng = np.random.default_rng(length)
    rows, inputs = 3, 5
    coef = rng.integers(0, 256, (rows, inputs), dtype=np.uint8)
    coef[0, 0], coef[1, 1], coef[2, 2], coef[0, 4] = 0, 1, 255, 2
    # rows at odd, unaligned offsets in one buffer; output rows interleaved with guard bytes
    src = rng.integers(0, 256, inputs * (length + 3) + 7, dtype=np.uint8)
    src_offsets = np.array([7 + j * (length + 3) for j in range(inputs)], np.int64)
    dst = np.full(rows * (length + 5) + 3, 0xA5, np.uint8)
    dst_offsets = np.array([3 + i * (length + 5) for i in range(rows)], np.int64)
    _run(kernel, gfni, coef, src, src_offsets, dst, dst_offsets, 0, length)
    want = naive.gf_mul_rows(coef.tolist(), [src[o:o + length].tobytes() for o in src_offsets])
    for i, o in enumerate(dst_offsets):
        assert dst[o:o + length].tobytes() == want[i]
        assert dst[o + length:o + length + 5].tobytes() in (b"\xa5" * 5, b"\xa5" * 2)
    assert dst[:3].tobytes() == b"\xa5" * 3


@pytest.mark.nojit
@pytest.mark.parametrize("name,kernel,gfni", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_kernel_column_range_and_zero_coefficients(name, kernel, gfni):
    rng = np.random.default_rng(9)
    length, lo, hi = 3000, 37, 2900
    coef = rng.integers(0, 256, (2, 4), dtype=np.uint8)
    coef[1] = 0                     # an all-zero row: output zeroed, not left alone
    src = rng.integers(0, 256, 4 * length, dtype=np.uint8)
    dst = np.full(2 * length, 0x5A, np.uint8)
    offs = np.arange(4, dtype=np.int64) * length
    _run(kernel, gfni, coef, src, offs, dst, np.array([0, length], np.int64), lo, hi)
    want = naive.gf_mul_rows(coef.tolist(), [src[o + lo:o + hi].tobytes() for o in offs])
    assert dst[lo:hi].tobytes() == want[0]
    assert dst[length + lo:length + hi].tobytes() == bytes(hi - lo)
    assert dst[:lo].tobytes() == b"\x5a" * lo and dst[hi:length].tobytes() == b"\x5a" * (length - hi)


def test_parity_matrix_is_the_documented_cauchy_matrix():
    for k, m in [(1, 1), (4, 2), (50, 10), (200, 56)]:
        assert ReedSolomon(k, m).parity_matrix.tolist() == naive.cauchy_parity(k, m)


def test_encode_matches_naive_and_golden():
    rs = ReedSolomon(4, 2)
    data = np.frombuffer(bytes(range(40)), np.uint8).reshape(4, 10)
    parity = rs.encode(data)
    want = naive.gf_mul_rows(naive.cauchy_parity(4, 2), [row.tobytes() for row in data])
    assert [row.tobytes() for row in parity] == want


def test_golden_parity_bytes():
    """The parity of a fixed input, written out: any change to the matrix or
    field breaks every existing bundle, so it must show up here."""
    rs = ReedSolomon(3, 2)
    data = np.frombuffer(b"resync!!" b"erasure." b"golden##", np.uint8).reshape(3, 8)
    assert rs.encode(data).tobytes().hex() == "f575080f0076802b" "13d88b01422dd0c7"


def test_small_matrices_agree_with_galois():
    """galois (an independent GF(2^8) implementation) as the second reference:
    the parity matrix and inverses of the e x e systems a decode solves."""
    galois = pytest.importorskip("galois")
    field = galois.GF(2 ** 8, irreducible_poly=gf.POLY, primitive_element=2, verify=False)
    for k, m in [(3, 2), (64, 30), (200, 56)]:
        x, y = field(np.arange(k, k + m)), field(np.arange(k))
        want = np.asarray(np.reciprocal(x[:, None] + y[None, :]).view(np.ndarray), np.uint8)
        assert np.array_equal(ReedSolomon(k, m).parity_matrix, want)
    rng = np.random.default_rng(3)
    for n in (1, 7, 21):
        a = ReedSolomon(64, 40).parity_matrix[np.ix_(rng.choice(40, n, replace=False), rng.choice(64, n, replace=False))]
        want = np.asarray(np.linalg.inv(field(a)).view(np.ndarray), np.uint8)
        assert np.array_equal(gf.invert(np.ascontiguousarray(a)), want)


@pytest.mark.nojit
def test_invert_matches_naive_including_singular_matrices():
    rng = random.Random(5)
    for n in [1, 2, 3, 5, 8, 13, 24]:
        for trial in range(6):
            a = [[rng.randrange(256) for _ in range(n)] for _ in range(n)]
            if trial == 0 and n > 1:
                a[-1] = list(a[0])                          # singular: two equal rows
            if trial == 1 and n > 1:
                a[1] = [naive.gf_mul(7, x) for x in a[0]]     # singular: one row a multiple of another
            want = naive.gf_invert(a)
            got = gf.invert(np.array(a, np.uint8))
            assert (got is None) == (want is None), (n, trial)
            if want is not None:
                assert got.tolist() == want


@pytest.mark.nojit
@pytest.mark.parametrize("k,m", [(4, 3), (9, 5), (64, 22)])
def test_recovery_rows_are_rows_of_the_generator_over_the_chosen_inverse(k, m):
    """plan(present, rows): the definition, G x inverse(G[chosen]) row by row
    (the code inverts only the lost data shards' e x e system)."""
    rng = random.Random(k)
    g = [[int(i == j) for j in range(k)] for i in range(k)] + naive.cauchy_parity(k, m)
    rs = ReedSolomon(k, m)
    for _ in range(4):
        present = sorted(rng.sample(range(k + m), k + rng.randrange(m + 1)))
        rows = sorted(rng.sample(range(k + m), rng.randrange(1, 6)))
        chosen, coef = rs.plan(present, rows)
        assert chosen == tuple(present[:k])
        inverse = naive.gf_invert([g[i] for i in chosen])
        want = naive.gf_matmul([g[r] for r in rows], inverse)
        assert coef.tolist() == want


def _damage(shards, lost):
    return [None if i in lost else s for i, s in enumerate(shards)]


@pytest.mark.nojit
@pytest.mark.parametrize("k,m", [(1, 1), (2, 3), (3, 2), (4, 4)])
def test_every_pattern_of_m_losses_decodes(k, m):
    rng = np.random.default_rng(k * 10 + m)
    rs = ReedSolomon(k, m)
    data = rng.integers(0, 256, (k, 37), dtype=np.uint8)
    shards = list(data) + list(rs.encode(data))
    for lost in itertools.combinations(range(k + m), m):
        assert np.array_equal(rs.decode(_damage(shards, set(lost))), data), lost
    for lost in itertools.combinations(range(k + m), m + 1):
        with pytest.raises(UnrecoverableError):
            rs.decode(_damage(shards, set(lost)))


@pytest.mark.parametrize("kind", mix.KINDS[:-2] + ("mixed",))
@pytest.mark.parametrize("k,m", [(5, 3), (10, 4), (50, 10), (50, 25), (200, 56)])
def test_sweep_losses_up_to_m(k, m, kind):
    rnd = random.Random(k * m)
    rs = ReedSolomon(k, m)
    data = mix.array(k + m, k * 333, kind).reshape(k, 333)
    shards = list(data) + list(rs.encode(data))
    n = k + m
    patterns = [set(rnd.sample(range(n), lost)) for lost in range(m + 1) for _ in range(3)]
    patterns += [set(range(min(m, k))),                          # the first data shards
                 set(range(k - min(m, k), k)),                   # the last data shards
                 set(range(k, n)),                               # all parity
                 set(range(0, n, max(1, n // m))) if m else set()]  # spread out
    for lost in patterns:
        lost = set(list(lost)[:m])
        assert np.array_equal(rs.decode(_damage(shards, lost)), data), sorted(lost)


def test_rs_50_10_recovers_any_10_and_refuses_11():
    rnd = random.Random(5010)
    rs = ReedSolomon(50, 10)
    data = mix.array(5010, 50 * (4096 + 3), "mixed").reshape(50, 4096 + 3)
    shards = list(data) + list(rs.encode(data))
    for _ in range(20):
        lost = set(rnd.sample(range(60), 10))
        assert np.array_equal(rs.decode(_damage(shards, lost)), data)
    for _ in range(5):
        with pytest.raises(UnrecoverableError, match="49 of 60 shards present, 50 needed"):
            rs.decode(_damage(shards, set(rnd.sample(range(60), 11))))


def test_decode_of_shards_sharing_a_buffer_and_of_separate_ones_agree():
    rng = np.random.default_rng(77)
    rs = ReedSolomon(8, 4)
    data = rng.integers(0, 256, (8, 300_001), dtype=np.uint8)       # large: split across threads
    stripe = np.vstack([data, rs.encode(data)])
    lost = {0, 3, 5, 9}
    shared = rs.decode(_damage(list(stripe), lost))                  # rows of one array
    separate = rs.decode(_damage([row.tobytes() for row in stripe], lost))
    assert np.array_equal(shared, data) and np.array_equal(separate, data)


def test_large_encode_uses_threads_and_matches_small_pieces():
    rng = np.random.default_rng(12)
    rs = ReedSolomon(10, 3)
    data = rng.integers(0, 256, (10, 1 << 18), dtype=np.uint8)
    whole = rs.encode(data)
    pieces = np.hstack([rs.encode(np.ascontiguousarray(data[:, lo:lo + 10_000]))
                        for lo in range(0, 1 << 18, 10_000)])
    assert np.array_equal(whole, pieces)


def test_portable_path_can_be_forced(monkeypatch):
    monkeypatch.setenv("RESYNC_GF_KERNEL", "portable")
    assert erasure.kernel_path() == "portable"
    rs = ReedSolomon(6, 3)
    data = np.random.default_rng(1).integers(0, 256, (6, 1000), dtype=np.uint8)
    parity = rs.encode(data)
    monkeypatch.delenv("RESYNC_GF_KERNEL")
    assert np.array_equal(rs.encode(data), parity)


def test_zero_length_and_no_parity():
    rs = ReedSolomon(3, 2)
    empty = np.zeros((3, 0), np.uint8)
    assert rs.encode(empty).shape == (2, 0)
    assert rs.decode([None, b"", b"", b"", None]).shape == (3, 0)
    plain = ReedSolomon(2, 0)
    data = np.arange(8, dtype=np.uint8).reshape(2, 4)
    assert plain.encode(data).shape == (0, 4)
    assert np.array_equal(plain.decode(list(data)), data)


@pytest.mark.parametrize("k,m", [(0, 1), (1, -1), (200, 57), (256, 1)])
def test_bad_parameters(k, m):
    with pytest.raises(UsageError):
        ReedSolomon(k, m)


def test_bad_shards():
    rs = ReedSolomon(2, 1)
    with pytest.raises(UsageError, match="expects 3 shards"):
        rs.decode([b"ab", b"cd"])
    with pytest.raises(UsageError, match="differ in length"):
        rs.decode([b"ab", b"cde", None])
    with pytest.raises(UsageError, match="uint8"):
        rs.decode([np.zeros(2, np.int32), b"ab", None])
    with pytest.raises(UsageError, match=r"\(2, L\) uint8"):
        rs.encode(np.zeros((3, 4), np.uint8))
