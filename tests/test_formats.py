"""Signature and delta formats: golden digests, hostile fields, fuzzing."""
import struct

import blake3
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from resync import formats
from resync.delta import make_delta
from resync.errors import FormatError, ResyncError, VerificationError
from resync.patch import apply_delta
from resync.signature import compute_signature, write_signature

SALT = bytes(range(32))

# Frozen format digests: changing either file layout must be deliberate
# (bump the version and update these).
GOLDEN_SIG = "af59c0970fdb703188b93ff237fa08b88bd352cf7985e7803bcede46f0d6c695"
GOLDEN_DELTA = "02fd8e92661e20d3a0bda139ab9098c88ab38edc573d355cc73bd368235fe43b"


def _golden_pair():
    rng = np.random.default_rng(2024)
    basis = rng.integers(0, 256, 20_000, dtype=np.uint8)
    new = np.concatenate([basis[:5000], np.frombuffer(b"resync golden " * 40, np.uint8),
                          basis[5100:], rng.integers(0, 256, 777, dtype=np.uint8)])
    return basis, new


@pytest.fixture
def files(tmp_path):
    basis, new = _golden_pair()
    (tmp_path / "basis").write_bytes(basis.tobytes())
    sig = compute_signature(basis, 1024, salt=SALT)
    write_signature(sig, tmp_path / "sig")
    make_delta(sig, new, tmp_path / "delta")
    return tmp_path, basis, new


def test_golden_digests(files):
    d, _, _ = files
    assert blake3.blake3((d / "sig").read_bytes()).hexdigest() == GOLDEN_SIG
    assert blake3.blake3((d / "delta").read_bytes()).hexdigest() == GOLDEN_DELTA


# --- signature -------------------------------------------------------------

SIG_FIELDS = ["magic", "version", "weak", "strong_len", "block_len", "file_len", "count", "salt", "hash"]
DELTA_FIELDS = ["magic", "version", "flags", "reserved", "basis_len", "basis_hash", "target_len",
                "target_hash", "count", "literal_len", "chunks"]


def _with_fields(layout, names, raw: bytes, **fields) -> bytes:
    """``raw`` with some header fields replaced."""
    values = dict(zip(names, layout.unpack_from(raw, 0)))
    values.update(fields)
    return layout.pack(*(values[n] for n in names)) + raw[layout.size:]


@pytest.mark.parametrize("fields,why", [
    (dict(magic=b"RSYNCSIX"), "bad magic"),
    (dict(version=2), "unsupported version"),
    (dict(weak=9), "weak checksum kind"),
    (dict(strong_len=33), "strong hash length"),
    (dict(strong_len=0), "strong hash length"),
    (dict(block_len=0), "block length"),
    (dict(block_len=2**32 - 1), "block length"),
    (dict(count=0), "block count"),
    (dict(count=2**32 - 1), "block count"),
    (dict(count=2**64 - 1), "block count"),
    (dict(file_len=2**64 - 1), "basis length"),
    (dict(file_len=0), "block count"),
    (dict(file_len=10**7 * 1024, count=10**7), "size"),
])
def test_hostile_signature_fields(files, fields, why):
    d, _, _ = files
    raw = _with_fields(formats.SIG_HEADER, SIG_FIELDS, (d / "sig").read_bytes(), **fields)
    with pytest.raises(FormatError, match=why):
        formats.unpack_sig(raw)


def test_truncated_signature_everywhere(files):
    d, _, _ = files
    raw = (d / "sig").read_bytes()
    for cut in list(range(0, 200)) + [len(raw) - 1]:
        with pytest.raises(FormatError):
            formats.unpack_sig(raw[:cut])
    with pytest.raises(FormatError, match="trailing"):
        formats.unpack_sig(raw + b"\0")


# --- delta -----------------------------------------------------------------

def _delta_parts(raw: bytes):
    p = formats.unpack_delta(raw)
    return p, bytearray(raw)


def _set_instruction(raw: bytearray, i: int, kind=None, source=None, length=None):
    off = formats.DELTA_HEADER.size + i * formats.INSTRUCTION.itemsize
    k, s, n = struct.unpack_from("<BQQ", raw, off)
    struct.pack_into("<BQQ", raw, off, k if kind is None else kind, s if source is None else source,
                     n if length is None else length)
    return raw


@pytest.mark.parametrize("fields,why", [
    (dict(magic=b"XSYNCDLT"), "bad magic"),
    (dict(version=0), "unsupported version"),
    (dict(flags=1), "flags"),
    (dict(count=0), "instruction"),
    (dict(count=2**64 - 1), "instruction count"),
    (dict(count=10**7), "instruction count"),
    (dict(chunks=2**32 - 1), "chunk count"),
    (dict(target_len=2**64 - 1), "target length"),
    (dict(target_len=1), "literal length exceeds"),
    (dict(literal_len=0), "INSERT lengths|literal"),
    (dict(basis_len=0), "COPY outside"),
])
def test_hostile_delta_header(files, fields, why):
    d, _, _ = files
    raw = _with_fields(formats.DELTA_HEADER, DELTA_FIELDS, (d / "delta").read_bytes(), **fields)
    with pytest.raises(FormatError, match=why):
        formats.unpack_delta(raw)


def test_hostile_delta_instructions(files):
    d, basis, _ = files
    parsed, raw = _delta_parts((d / "delta").read_bytes())
    kinds = parsed.instructions["kind"].tolist()
    ci, ii = kinds.index(formats.COPY), kinds.index(formats.INSERT)
    cases = [
        (dict(i=ci, source=len(basis)), "COPY outside"),
        (dict(i=ci, source=2**64 - 1), "COPY outside"),
        (dict(i=ci, length=2**64 - 1), "COPY outside"),
        (dict(i=ci, length=0), "zero-length"),
        (dict(i=ii, source=5), "INSERT with a source"),
        (dict(i=ii, length=2**63), "longer than the target|add up"),
        (dict(i=ci, kind=7), "unknown instruction"),
    ]
    for change, why in cases:
        bad = _set_instruction(bytearray(raw), **change)
        with pytest.raises(FormatError, match=why):
            formats.unpack_delta(bytes(bad))


def test_lengths_that_wrap_uint64_are_rejected(files):
    d, _, _ = files
    parsed, raw = _delta_parts((d / "delta").read_bytes())
    kinds = parsed.instructions["kind"].tolist()
    ii = [i for i, k in enumerate(kinds) if k == formats.INSERT]
    # Two INSERTs whose lengths sum to the true total modulo 2**64.
    lengths = parsed.instructions["length"].astype(object)
    a, b = ii[0], ii[1]
    bad = _set_instruction(bytearray(raw), a, length=int(lengths[a]) + 2**63)
    bad = _set_instruction(bad, b, length=int(lengths[b]) + 2**63)
    with pytest.raises(FormatError):
        formats.unpack_delta(bytes(bad))


def test_lz4_bomb_and_corrupt_chunk_are_format_errors(tmp_path, rng):
    import lz4.block
    basis = rng.integers(0, 256, 4096, dtype=np.uint8)
    (tmp_path / "basis").write_bytes(basis.tobytes())
    sig = compute_signature(basis, 1024, salt=SALT)
    new = np.concatenate([basis, np.zeros(100_000, np.uint8)])
    make_delta(sig, new, tmp_path / "d")
    raw = bytearray((tmp_path / "d").read_bytes())
    parsed = formats.unpack_delta(bytes(raw))
    assert parsed.chunks["codec"][0] == formats.CODEC_LZ4
    start = parsed.data_offset
    stored = int(parsed.chunks["stored"][0])
    # A chunk that expands far past its declared size: same stored length,
    # payload replaced by a bomb truncated to fit.
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)[:stored]
    bomb = bomb + bytes(stored - len(bomb))
    raw[start:start + stored] = bomb
    (tmp_path / "bad").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="LZ4"):
        apply_delta(str(tmp_path / "basis"), str(tmp_path / "bad"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_truncated_delta_everywhere(files):
    d, _, _ = files
    raw = (d / "delta").read_bytes()
    for cut in list(range(0, 400, 3)) + [len(raw) - 1]:
        with pytest.raises(FormatError):
            formats.unpack_delta(raw[:cut])


def test_wrong_basis_is_refused_and_output_untouched(files):
    d, basis, _ = files
    (d / "out").write_bytes(b"keep me")
    other = basis.copy()
    other[100] ^= 1
    (d / "other").write_bytes(other.tobytes())
    with pytest.raises(VerificationError, match="basis does not match"):
        apply_delta(str(d / "other"), str(d / "delta"), str(d / "out"))
    with pytest.raises(VerificationError, match="wrong basis"):
        apply_delta(str(d / "delta"), str(d / "delta"), str(d / "out"))
    assert (d / "out").read_bytes() == b"keep me"
    assert [p.name for p in d.iterdir() if p.name.startswith(".resync-tmp-")] == []


@settings(max_examples=300)
@given(data=st.data())
def test_fuzz_delta_parser_and_patch(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fz")
    basis, new = _golden_pair()
    raw = bytearray(_fuzz_source(d, basis, new))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.integers(0, 2))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == 0:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == 1:
            del raw[pos:]
            if not raw:
                break
        else:
            raw[pos:pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
    (d / "fz.delta").write_bytes(bytes(raw))
    try:
        apply_delta(str(d / "basis"), str(d / "fz.delta"), str(d / "out"))
    except (FormatError, VerificationError):
        assert not (d / "out").exists()
        return
    assert (d / "out").read_bytes() == new.tobytes()


@settings(max_examples=300)
@given(data=st.data())
def test_fuzz_signature_parser(data):
    basis, _ = _golden_pair()
    sig = compute_signature(basis[:5000], 512, salt=SALT)
    raw = bytearray(formats.pack_sig_header(sig.header()) + sig.weak.tobytes() + sig.check.tobytes()
                    + sig.strong.tobytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del raw[pos:]
            if not raw:
                break
    try:
        header, weak, check, strong = formats.unpack_sig(bytes(raw))
    except FormatError:
        return
    assert weak.shape[0] == header.count and strong.shape == (header.count, header.strong_len)


_cache = {}


def _fuzz_source(d, basis, new) -> bytes:
    (d / "basis").write_bytes(basis.tobytes())
    if "delta" not in _cache:
        sig = compute_signature(basis, 1024, salt=SALT)
        make_delta(sig, new, d / "src.delta")
        _cache["delta"] = (d / "src.delta").read_bytes()
    return _cache["delta"]


def test_errors_are_resync_errors():
    assert issubclass(FormatError, ResyncError) and FormatError.exit_code == 4
    assert VerificationError.exit_code == 5
    assert str(FormatError("f", "resync delta", "bad magic")) == "f: not a valid resync delta file: bad magic"
