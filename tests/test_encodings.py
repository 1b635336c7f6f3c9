"""Protocol 3's compact encodings (resync.protocol.encodings): varints, wire
signatures, wire deltas and pack members round-trip, keep their golden bytes,
and refuse anything malformed with a ProtocolError only."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resync.delta import instructions_in_memory
from resync.patch import assemble_in_memory
from resync.protocol import encodings as E
from resync.protocol.frames import FILE_ERROR, FILE_OK, FILE_VANISHED, ProtocolError
from resync.signature import compute_signature, default_block_len

from . import mix

SALT = bytes(range(32))


def _rsync_s2length(length: int, blength: int) -> int:
    """rsync 3.4's sum_sizes_sqroot (generator.c), line by line, for the test."""
    b = E.BLOCKSUM_BIAS
    x = length
    while True:
        x >>= 1
        if not x:
            break
        b += 2
    c = blength
    while True:
        c >>= 1
        if not c or not b:
            break
        b -= 1
    s2 = int((b + 1 - 32 + 7) / 8)              # C's division truncates toward zero
    return min(max(s2, 2), 16)


@pytest.mark.parametrize("length", [1, 700, 5_000, 64 << 10, 1 << 20, 100 << 20, 1 << 30, 1 << 40])
def test_strong_length_is_rsyncs(length):
    block = default_block_len(length)
    assert E.strong_len_for(length, block) == _rsync_s2length(length, block)


@given(st.integers(0, (1 << 64) - 1))
def test_varints_round_trip(v):
    out = bytearray()
    E.put_varint(out, v)
    assert E.get_varint(out, 0, "t") == (v, len(out))
    assert E.unzigzag(E.zigzag(v - (1 << 63))) == v - (1 << 63)


def test_a_varint_over_ten_bytes_or_cut_short_is_refused():
    with pytest.raises(ProtocolError, match="too long"):
        E.get_varint(b"\x80" * 11, 0, "t")
    with pytest.raises(ProtocolError, match="truncated"):
        E.get_varint(b"\x80\x80", 0, "t")


def _pair(seed: int, size: int):
    """An old file and a new one made from it by a few edits (text, zeros,
    repeated blocks: mix.data)."""
    rnd = random.Random(seed)
    old = mix.data(seed, size, mix.pick_kind(rnd))
    new = bytearray(old)
    for _ in range(rnd.randrange(0, 4)):
        at = rnd.randrange(len(new) + 1)
        new[at:at + rnd.randrange(0, 50)] = rnd.randbytes(rnd.randrange(0, 80))
    return old, bytes(new)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("with_salt", [False, True])
def test_signatures_round_trip(seed, with_salt):
    old, _ = _pair(seed, random.Random(seed).randrange(0, 70_000))
    data = np.frombuffer(old, np.uint8)
    block = default_block_len(len(old))
    sig = compute_signature(data, block, E.strong_len_for(len(old), block), salt=SALT, threads=1, check_bits=16)
    assert not (sig.check & 0xFFFF).any()                # the low half of every check is 0
    wire = E.signature_to_wire(sig, with_salt=with_salt)
    back = E.signature_from_wire(wire, SALT if not with_salt else b"other salt, not used")
    assert back.salt == SALT and back.block_len == sig.block_len and back.file_len == len(old)
    assert np.array_equal(back.weak, sig.weak) and np.array_equal(back.check, sig.check)
    assert np.array_equal(back.strong, sig.strong)
    head = bytearray()
    E.put_varint(head, sig.block_len)
    E.put_varint(head, len(old))
    head = len(head) + 2
    assert len(wire) == head + (32 if with_salt else 0) + sig.count * (6 + sig.strong_len)


@pytest.mark.parametrize("seed", range(16))
def test_deltas_round_trip_and_rebuild_the_file(seed):
    old, new = _pair(seed, random.Random(seed).randrange(1, 70_000))
    block = default_block_len(len(old))
    sig = compute_signature(np.frombuffer(old, np.uint8), block, E.strong_len_for(len(old), block), salt=SALT,
                            threads=1, check_bits=16)
    wire = E.delta_to_wire(*instructions_in_memory(E.signature_from_wire(E.signature_to_wire(sig), SALT),
                                                   np.frombuffer(new, np.uint8)))
    kinds, sources, lengths, literals = E.delta_from_wire(wire, len(old), len(new))
    out = assemble_in_memory(np.frombuffer(old, np.uint8), kinds, sources, lengths, literals, len(new))
    assert out.tobytes() == new
    if old == new and len(old) >= 4096:
        assert len(wire) < 16                   # an unchanged file: a run of COPYs in a few bytes


def test_golden_bytes():
    """The wire bytes of a fixed signature, delta and pack (a change here is
    a protocol change and needs a new frames.VERSION)."""
    old = mix.data(5, 20_000, "text")
    new = old[:7000] + b"inserted" + old[7000:]
    sig = compute_signature(np.frombuffer(old, np.uint8), 700, E.strong_len_for(len(old), 700), salt=SALT,
                            threads=1, check_bits=16)
    wsig = E.signature_to_wire(sig)
    wdelta = E.delta_to_wire(*instructions_in_memory(sig, np.frombuffer(new, np.uint8)))
    members = bytearray()
    E.put_varint(members, 3)
    E.encode_member(members, E.Member(7, FILE_OK, E.MEMBER_DELTA, b"h" * 16, 0o100644, 1_700_000_000, 5, len(new),
                                      1000, 1000, wdelta))
    E.encode_member(members, E.Member(8, FILE_VANISHED, message=b"gone"))
    E.encode_member(members, E.Member(9, FILE_OK, 0, b"g" * 16, 0o100600, -5, 0, 3, 0, 0, b"abc"))
    assert len(wsig) == 2 + 3 + 2 + 29 * (6 + 2)          # varints 700 and 20,000; strong length, flags
    assert wdelta[:1] == b"\x03"                # COPY, INSERT, COPY
    digest = hashlib.sha256(wsig + wdelta + bytes(members)).hexdigest()
    assert digest == "6c01e02a6cfd283dc7fe192a6ec14f367b365630ae7077f2fae09f3ef046b56d"


def test_basis_hashes_round_trip_and_keep_their_golden_bytes():
    from resync.protocol.common import keyed_hash
    data = mix.data(3, 9_000, "text")
    digest = keyed_hash(data, SALT)
    assert len(digest) == E.BASIS_HASH and digest != keyed_hash(data, bytes(32))     # keyed: the salt matters
    wire = E.basis_hash_to_wire(len(data), digest)
    assert E.basis_hash_of(wire) == (len(data), digest)
    assert wire == b"\x00\xa8\x46\x00\x02" + digest  # block length 0, varint 9,000, strong 0, flag 2
    assert hashlib.sha256(wire).hexdigest() == \
        "d42031e6861ed39fd20f0c00436d607e042e4bdc6a2ab385123da3336597f8e6"
    sig = compute_signature(np.frombuffer(data, np.uint8), 700, 2, salt=SALT, threads=1, check_bits=16)
    assert E.basis_hash_of(E.signature_to_wire(sig)) is None         # blocks: not a basis hash
    with pytest.raises(ProtocolError):
        E.signature_from_wire(wire, SALT)                             # nor is a basis hash a block signature


@pytest.mark.parametrize("wire,why", [
    (b"\x00\x10\x00\x02" + b"h" * 15, "wrong length"),
    (b"\x00\x10\x00\x02" + b"h" * 17, "wrong length"),
    (b"\x80\x05\x10\x00\x02" + b"h" * 16, "out of range"),       # a block length
    (b"\x00\x10\x02\x02" + b"h" * 16, "out of range"),           # a strong length
    (b"\x00\x10\x00\x03" + b"h" * 16, "out of range"),           # with the salt flag
    (b"\x00\x10\x00", "truncated"),
])
def test_hostile_basis_hashes_are_refused(wire, why):
    with pytest.raises(ProtocolError, match=why):
        E.basis_hash_of(wire)


def test_members_round_trip():
    ms = [E.Member(1, FILE_OK, 0, b"a" * 16, 0o100644, -(1 << 40), 999_999_999, 0, 0, 0, b""),
          E.Member(2, FILE_ERROR, message=b"Permission denied"),
          E.Member(3, FILE_OK, E.MEMBER_DELTA, b"b" * 16, 0o100755, 1, 2, 5, 1 << 31, 65534, b"\x00\x01\x02"),
          E.Member(4, FILE_OK, E.MEMBER_SAME, b"c" * 16, 0o100644, 1_700_000_000, 7, 12_345, 0, 0, b"")]
    buf = bytearray()
    E.put_varint(buf, len(ms))
    for m in ms:
        E.encode_member(buf, m)
    assert E.decode_members(bytes(buf)) == ms


@pytest.mark.parametrize("wire,why", [
    (b"\x01\x0b\x00", "outside the basis"),              # COPY 5 bytes at 0 of a 4-byte basis
    (b"\x01\x06abc", "do not add up"),                    # INSERT 3 for a 4-byte target
    (b"\x01\x00", "empty instruction"),
    (b"\x02\x04\x04abcd", "longer than its target"),       # two INSERTs of 2 for a 3-byte target
])
def test_hostile_deltas_are_refused(wire, why):
    with pytest.raises(ProtocolError, match=why):
        E.delta_from_wire(wire, 4, 4 if why != "longer than its target" else 3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5000), st.integers(0, 5000))
def test_fuzzed_deltas_give_only_protocol_errors_or_a_checked_result(data, basis_len, target_len):
    try:
        kinds, sources, lengths, literals = E.delta_from_wire(data, basis_len, target_len)
    except ProtocolError:
        return
    out = assemble_in_memory(np.zeros(basis_len, np.uint8), kinds, sources, lengths, literals, target_len)
    assert out.shape[0] == target_len


@pytest.mark.parametrize("flags,content,status", [
    (E.MEMBER_DELTA | E.MEMBER_SAME, b"", FILE_OK),      # both
    (E.MEMBER_SAME, b"x", FILE_OK),                      # same content, yet content
    (4, b"", FILE_OK),                                   # an unknown flag
    (E.MEMBER_SAME, b"", FILE_ERROR),                    # a flag on a failed file
])
def test_bad_member_flags_are_refused(flags, content, status):
    buf = bytearray(b"\x01")
    E.encode_member(buf, E.Member(1, status, flags, b"d" * 16, 0o100644, 1, 0, 0, 0, 0, content, b"why"))
    with pytest.raises(ProtocolError):
        E.decode_members(bytes(buf))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzzed_packs_and_signatures_give_only_protocol_errors(data):
    for decode in (E.decode_members, lambda b: E.signature_from_wire(b, SALT), E.basis_hash_of):
        try:
            decode(data)
        except ProtocolError:
            pass


# -- Dir listings (frames.encode_listing): each entry as it differs from the one before -----

from resync.protocol import frames as F  # noqa: E402

_MODES = {1: 0o100644, 2: 0o40755, 3: 0o120777, 4: 0o20600, 5: 0o10644}


@st.composite
def listings(draw):
    names = sorted(set(draw(st.lists(st.binary(min_size=1, max_size=40).filter(
        lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")), max_size=30))))
    prev_seconds = draw(st.integers(-(1 << 40), 1 << 40))
    entries = []
    for name in names:
        kind = draw(st.integers(1, 5))
        mode = _MODES[kind] | draw(st.integers(0, 0o7777)) if draw(st.booleans()) else _MODES[kind]
        seconds = prev_seconds if draw(st.booleans()) else draw(st.integers(-(1 << 40), 1 << 40))
        entries.append(F.Listed(name, kind, mode, seconds, draw(st.sampled_from([0, 1, 999_999_999, 123456])),
                                draw(st.integers(0, 1 << 62)) if kind in (1, 3) else 0,
                                draw(st.sampled_from([0, 1000, 65534, 0xFFFFFFFF])),
                                draw(st.sampled_from([0, 1000, 0xFFFFFFFF])),
                                draw(st.integers(0, (1 << 64) - 1)) if kind == 4 else 0,
                                draw(st.binary(min_size=1, max_size=50).filter(lambda t: b"\0" not in t))
                                if kind == 3 else b"",
                                draw(st.sampled_from([b"", b"d" * 32])) if kind == 1 else b""))
        prev_seconds = seconds
    own = F.Listed(b"", 2, 0o40755, draw(st.integers(0, 1 << 33)), 0, 0, 0, 0, 0, b"", b"")
    gone = tuple(sorted(set(draw(st.lists(st.sampled_from([b"a", b"gone", b"x" * 255]), max_size=3)))))
    return own, tuple(entries), gone


@settings(max_examples=200, deadline=None)
@given(listings())
def test_listings_round_trip(listing):
    assert F.decode_listing(F.encode_listing(*listing)) == listing


def test_a_listing_of_similar_entries_costs_a_few_bytes_each():
    """A release tree's directory: names sharing prefixes, one owner and
    mode, mtimes in one second: about the name's new suffix, the size and
    the nanoseconds per entry (the fixed layout of protocol 2 took 47 bytes
    plus the name)."""
    own = F.Listed(b"", 2, 0o40755, 1_700_000_000, 0, 0, 1000, 1000, 0, b"", b"")
    entries = tuple(F.Listed(f"test_module_{i:03}.py".encode(), 1, 0o100644, 1_700_000_000, 123_456_789 + i,
                             5000 + i, 1000, 1000, 0, b"", b"") for i in range(200))
    raw = F.encode_listing(own, entries, ())
    assert len(raw) / 200 <= 14                 # (rsync's flist: about as much)
    assert F.decode_listing(raw) == (own, entries, ())


def test_hostile_listings_are_refused():
    own = F.Listed(b"", 2, 0o40755, 5, 0, 0, 0, 0, 0, b"", b"")
    e = F.Listed(b"f", 1, 0o100644, 5, 0, 3, 0, 0, 0, b"", b"")
    raw = F.encode_listing(own, (e, e._replace(name=b"link", kind=3, mode=0o120777, target=b"../t")), ())
    first = len(F.encode_listing(own, (), ())) - 1      # (the own entry, then the count: one byte)
    for body, why in ((raw[:first] + b"\x80" + raw[first + 1:], "unknown entry flags"),
                      (raw + b"\x00", "trailing data"), (raw[:-3], "truncated"),
                      (F.encode_listing(own, (e._replace(mode=0o644),), ()), "no known kind"),
                      (F.encode_listing(own, (e._replace(name=b"l", kind=3, mode=0o120777),), ()), "symlink target"),
                      (F.encode_listing(own, (e._replace(name=b"a/b"),), ()), "bad name"),
                      (F.encode_listing(own, (e._replace(nanoseconds=10**9),), ()), "out of range")):
        with pytest.raises(ProtocolError, match=why):
            F.decode_listing(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_listings_give_only_protocol_errors(data):
    try:
        F.decode_listing(data)
    except ProtocolError:
        pass


def test_dir_paths_are_front_coded_against_the_dir_before():
    """A stream of Dir frames (a depth-first listing): each path costs what
    it does not share with the previous one; one reader decodes them in
    order; a prefix longer than the previous path is refused."""
    own = F.Listed(b"", 2, 0o40755, 5, 0, 0, 0, 0, 0, b"", b"")
    rels = [b"", b"django", b"django/contrib", b"django/contrib/admin/locale/pt_BR/LC_MESSAGES",
            b"django/contrib/admin/locale/pt_PT/LC_MESSAGES", b"docs"]
    wire, prev = b"", b""
    for i, rel in enumerate(rels):
        frame = F.encode(F.Dir(i, rel, own, (), ()), prev)
        if i == 4:
            assert len(frame) < 40                  # "PT/LC_MESSAGES" past the shared prefix (the path: 45)
        wire += frame
        prev = rel
    r = F.FrameReader()
    r.feed(wire)
    assert [f.rel for f in r.frames()] == rels
    bad = F.encode(F.Dir(1, b"abc", own, (), ()), b"abc")       # shares 3 bytes with a path the reader lacks
    r = F.FrameReader()
    r.feed(bad)
    with pytest.raises(ProtocolError, match="prefix"):
        list(r.frames())


@pytest.mark.parametrize("runs,why", [
    (((100, 10), (50, 10)), "not sorted"),
    (((0, 10), (5, 10)), "overlapping"),
    (((0, 0),), "empty"),
    (((1 << 30, 1),), "past the file's end"),
    (((0, 10),), "add up"),                          # 10 bytes of runs for a content of 20
])
def test_hostile_data_runs_are_refused(runs, why):
    f = F.File(1, F.FILE_OK, False, 20, b"h" * 32, 0o100644, 0, 0, 1 << 20, 0, 0, 128, 1, 1296, b"", b"c" * 32,
               runs)
    r = F.FrameReader()
    r.feed(F.encode(f))
    with pytest.raises(ProtocolError, match="data runs"):
        list(r.frames())


@pytest.mark.parametrize("delta,flag", [(False, 2), (True, 3), (False, 255)])
def test_a_bad_sparse_flag_is_refused(delta, flag):
    """Flag 2 (keep a delta's zeros as holes) is for deltas only; 3 and up
    are not defined."""
    f = F.File(1, F.FILE_OK, delta, 20, b"h" * 32, 0o100644, 0, 0, 1 << 20, 0, 0, 128, 1, 1296, b"", b"c" * 32)
    wire = bytearray(F.encode(f))
    assert wire[-1] == 0                            # the sparse flag ends the frame
    wire[-1] = flag
    r = F.FrameReader()
    r.feed(bytes(wire))
    with pytest.raises(ProtocolError, match="bad sparse flag"):
        list(r.frames())


def test_data_runs_gather_and_scatter_a_content(tmp_path):
    """The sender's view of a sparse file's data runs as one content, read a
    stripe at a time across run boundaries, and the receiver's scatter of
    that content back to the file's offsets, give the file back."""
    import os

    from resync.protocol.sparse import DataRuns, content_starts, scatter
    rnd = random.Random(2)
    size = 1 << 20
    runs = [(0, 1000), (5000, 3), (70_000, 40_000), (size - 7, 7)]
    whole = np.zeros(size, np.uint8)
    for off, n in runs:
        whole[off:off + n] = np.frombuffer(rnd.randbytes(n), np.uint8)
    view = DataRuns(whole, runs)
    assert view.shape == (sum(n for _, n in runs),)
    out = tmp_path / "f"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    starts = content_starts(runs)
    for lo in range(0, view.shape[0], 1296):             # stripes of one shard, across the runs
        scatter(fd, runs, starts, lo, view[lo:lo + 1296])
    os.close(fd)
    assert out.read_bytes() == whole.tobytes()
