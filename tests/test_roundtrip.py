"""patch(basis, delta(sig(basis), new)) == new, on chosen and generated inputs."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from resync import formats
from resync.delta import LITERAL_CHUNK, empty_signature, find_matches, make_delta
from resync.patch import apply_delta
from resync.signature import compute_signature, default_block_len, read_signature, write_signature

from . import mix
from .conftest import edited
from .helpers import roundtrip


def test_default_block_len_follows_rsync_rule():
    assert default_block_len(0) == 700
    assert default_block_len(700 * 700) == 700
    assert default_block_len(1 << 30) == 32768
    assert default_block_len(1 << 40) == 128 << 10
    assert all(default_block_len(n) % 8 == 0 for n in (10**6, 3 * 10**7, 123456789))


@pytest.mark.parametrize("basis_len,new_len,block", [
    (0, 0, 8), (0, 1, 8), (1, 0, 8), (1, 1, 8), (8, 8, 8), (16, 17, 8), (17, 16, 8),
    (700, 700, None), (1400, 1399, None), (5000, 5001, 1000), (4096 * 3, 4096 * 3, 4096),
])
def test_roundtrip_edges(tmp_path, rng, basis_len, new_len, block):
    basis = rng.integers(0, 256, basis_len, dtype=np.uint8).tobytes()
    new = (basis + bytes(rng.integers(0, 256, max(0, new_len - basis_len), dtype=np.uint8)))[:new_len]
    out, _ = roundtrip(tmp_path, basis, new, block)
    assert out == new


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("op", ["insert", "delete"])
def test_one_byte_shift_keeps_almost_everything(tmp_path, rng, where, op):
    block = 64
    basis = rng.integers(0, 256, block * 50, dtype=np.uint8).tobytes()
    at = {"start": 0, "middle": len(basis) // 2 + 5, "end": len(basis) - 1}[where]
    new = basis[:at] + b"\x01" + basis[at:] if op == "insert" else basis[:at] + basis[at + 1:]
    out, stats = roundtrip(tmp_path, basis, new, block)
    assert out == new
    # At most the blocks touching the edit (plus a short tail) become literal.
    assert stats.literal_bytes <= 2 * block + 1


def test_unchanged_file_is_all_copy(tmp_path, rng):
    basis = rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    out, stats = roundtrip(tmp_path, basis, basis)
    assert out == basis
    assert stats.literal_bytes == 0 and stats.copy_instructions == 1 and stats.insert_instructions == 0


def test_random_edits_many_pieces(tmp_path, rng):
    basis = rng.integers(0, 256, 3_000_000, dtype=np.uint8)
    new = edited(rng, basis, 30, span=5000)
    out, stats = roundtrip(tmp_path, basis.tobytes(), new.tobytes(), 2048, threads=2)
    assert out == new.tobytes()
    assert stats.literal_bytes < 30 * (5000 + 2 * 2048)


def test_compressible_literals_use_lz4(tmp_path, rng):
    basis = rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    new = basis[:10_000] + b"hello world " * 20_000 + basis[10_000:]
    out, stats = roundtrip(tmp_path, basis, new, 1024)
    assert out == new
    assert stats.literal_stored_bytes < stats.literal_bytes / 10


def test_absent_basis_gives_whole_file_delta(tmp_path, rng):
    new = rng.integers(0, 256, 3 * LITERAL_CHUNK + 5, dtype=np.uint8)
    st_ = make_delta(empty_signature(), new, tmp_path / "d")
    assert st_.literal_bytes == new.shape[0] and st_.copy_instructions == 0
    apply_delta(str(tmp_path / "missing-basis"), str(tmp_path / "d"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == new.tobytes()


def test_repeated_blocks_basis(tmp_path, rng):
    block = 512
    basis = np.tile(rng.integers(0, 256, block, dtype=np.uint8), 400)
    new = edited(rng, basis, 10, span=300)
    out, _ = roundtrip(tmp_path, basis.tobytes(), new.tobytes(), block)
    assert out == new.tobytes()


def test_signature_file_roundtrip(tmp_path, rng):
    data = rng.integers(0, 256, 12345, dtype=np.uint8)
    sig = compute_signature(data, 1000, strong_len=24)
    write_signature(sig, tmp_path / "s")
    back = read_signature(tmp_path / "s")
    assert (back.block_len, back.file_len, back.strong_len, back.salt, back.file_hash) == \
        (sig.block_len, sig.file_len, sig.strong_len, sig.salt, sig.file_hash)
    assert np.array_equal(back.weak, sig.weak) and np.array_equal(back.check, sig.check)
    assert np.array_equal(back.strong, sig.strong)
    assert (tmp_path / "s").stat().st_size == formats.SIG_HEADER.size + sig.count * (8 + 24)


def test_threads_do_not_change_the_result(tmp_path, rng):
    basis = rng.integers(0, 256, 9_000_000, dtype=np.uint8)
    new = edited(rng, basis, 12, span=20000)
    salt = bytes(range(32))
    sig1 = compute_signature(basis, 4096, salt=salt, threads=1)
    sig2 = compute_signature(basis, 4096, salt=salt, threads=2)
    assert np.array_equal(sig1.strong, sig2.strong) and np.array_equal(sig1.weak, sig2.weak)
    make_delta(sig1, new, tmp_path / "d1", threads=1)
    make_delta(sig1, new, tmp_path / "d2", threads=2)
    for d in ("d1", "d2"):
        (tmp_path / "b").write_bytes(basis.tobytes())
        apply_delta(str(tmp_path / "b"), str(tmp_path / d), str(tmp_path / ("o" + d)))
        assert (tmp_path / ("o" + d)).read_bytes() == new.tobytes()


@given(basis=mix.mixed_bytes(3000), data=st.data(), block=st.sampled_from([8, 16, 64, 700]))
@example(basis=b"", data=None, block=8)
def test_property_roundtrip(basis, data, block):
    if data is None:
        new = b"x"
    else:
        new = mix.apply_edits(basis, data.draw(mix.edit_ops(3000, 100, 6)))
    with tempfile.TemporaryDirectory() as d:
        out, _ = roundtrip(Path(d), basis, new, block, threads=1)
    assert out == new


@pytest.mark.parametrize("kind", mix.KINDS)
def test_roundtrip_over_the_content_mix(tmp_path, rng, kind):
    """Each content kind, edited: the result is exact, and an unchanged file
    against its own signature is all COPY (no literal bytes) at any thread count."""
    basis = mix.array(7, 3_000_000, kind)
    new = edited(rng, basis, 20, span=3000) if basis.size else np.frombuffer(b"new", np.uint8)
    for threads in (1, 3):
        out, stats = roundtrip(tmp_path, basis.tobytes(), new.tobytes(), 4096, threads=threads)
        assert out == new.tobytes()
        out, stats = roundtrip(tmp_path, basis.tobytes(), basis.tobytes(), 4096, threads=threads)
        assert out == basis.tobytes() and stats.literal_bytes == 0


@settings(max_examples=60, deadline=None)
@given(basis=mix.mixed_bytes(60_000, min_size=1), data=st.data(), block=st.sampled_from([8, 16, 64, 256, 700]),
       piece=st.integers(1, 5000))
def test_delta_does_not_depend_on_the_thread_count(basis, data, block, piece):
    """The matches (and so the delta) are those of one scan over the whole file
    whatever the number of threads and wherever the pieces fall: 1, 2 and 5
    threads, with pieces as small as one block."""
    new = mix.apply_edits(basis, data.draw(mix.edit_ops(60_000, 300, 8)))
    assert_same_matches_at_any_thread_count(basis, new + (basis if data.draw(st.booleans()) else b""), block,
                                            piece)


def assert_same_matches_at_any_thread_count(basis: bytes, new: bytes, block: int, piece: int) -> None:
    """find_matches with 1, 2 and 5 threads and scan pieces of ``piece`` bytes agree exactly."""
    from resync import delta as delta_module
    sig = compute_signature(np.frombuffer(basis, np.uint8), block, salt=bytes(32), threads=1)
    saved = delta_module._PIECE_BYTES
    try:
        delta_module._PIECE_BYTES = piece
        results = [find_matches(sig, np.frombuffer(new, np.uint8), threads=t) for t in (1, 2, 5)]
    finally:
        delta_module._PIECE_BYTES = saved
    for m in results[1:]:
        assert np.array_equal(m.pos, results[0].pos) and np.array_equal(m.src, results[0].src)
        assert np.array_equal(m.length, results[0].length)


def test_file_of_one_repeated_byte_against_its_own_signature_is_all_copy(tmp_path):
    """Field case 07: zeros (and any one repeated byte) against their own
    signature: no literal byte at any thread count (was one block per piece
    boundary: 64 KiB with two threads, 192 KiB with four)."""
    for fill in (0, 0xAB):
        data = np.full(4 << 20, fill, np.uint8)
        sig = compute_signature(data, 65536, threads=1)
        for threads in (1, 2, 4):
            stats = make_delta(sig, data, tmp_path / "d", threads=threads)
            assert stats.literal_bytes == 0 and stats.copy_instructions == 1, threads


@settings(max_examples=200, deadline=None)
@given(data=st.data(), block=st.sampled_from([8, 16]), piece=st.integers(1, 60))
def test_thread_count_on_repeated_blocks(data, block, piece):
    """The hard case for joining pieces: a basis of a few distinct blocks
    repeated (so a window matches several blocks and the preferred one
    matters), and a new file of those blocks in another order with short
    junk between them; pieces of a few bytes to a few blocks."""
    alphabet = [bytes(data.draw(st.binary(min_size=block, max_size=block))) for _ in range(data.draw(st.integers(1, 3)))]
    symbols = st.integers(0, len(alphabet) - 1)
    basis = b"".join(alphabet[i] for i in data.draw(st.lists(symbols, min_size=2, max_size=30)))
    parts = []
    for i in data.draw(st.lists(symbols, min_size=1, max_size=40)):
        parts.append(alphabet[i])
        parts.append(data.draw(st.binary(max_size=block - 1)))
    assert_same_matches_at_any_thread_count(basis, b"".join(parts), block, piece)
