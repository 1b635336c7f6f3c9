"""The transfer protocol without a network: frames round-trip and refuse
hostile input; stripes rebuild from any k shards; two sessions pumped into
each other by hand, through a channel that loses, reorders, duplicates and
corrupts datagrams, leave the destination equal to the source."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resync.protocol import frames as F
from resync.protocol.frames import ProtocolError
from resync.protocol.session import ClientSession, Module, Options, RefusedError, ServerSession
from resync.protocol import checkpoint as checkpoint_mod
from resync.protocol import parity as parity_mod
from resync.protocol import receiver as receiver_mod
from resync.protocol import session as session_mod
from resync.protocol import sender as sender_mod
from resync.protocol.shards import HEADER, StripeAssembler, StripeEncoder, parse

from . import mix
from .protopump import Channel, RemoteLines, identities, make_pair, pump
from .test_sync import _restamp, make_tree, mutate, seconds
from .treeutil import rsync_a, snapshot

LISTED = F.Listed(b"name", 1, 0o100644, 1_700_000_000, 123, 42, 1000, 1000, 0, b"", b"")
SAMPLES = [
    F.Hello(F.VERSION, True, b"k" * 32, b"n" * 16, F.FLAG_DELETE | F.FLAG_ITEMIZE | F.FLAG_SPARSE, -1, b"mod", b"a/b", b"*.tmp\n/x", 5 << 20),
    F.Challenge(b"c" * 16), F.Auth(b"s" * 64), F.Welcome(8 << 20), F.Error(4, b"not allowed"),
    F.Dir(3, b"a/b", F.Listed(b"", 2, 0o40755, 5, 6, 0, 0, 0, 0, b"", b""),
          (LISTED, LISTED._replace(name=b"zlink", kind=3, mode=0o120777, target=b"../t", size=4)), (b"gone",)),
    F.DirFailed(4, b"x", 13, b"Permission denied"), F.ListEnd(),
    F.Want(7, 3, b"f", b"SIG" * 10), F.Wants(3, 10, ((b"a", False, b""), (b"b.txt", True, b"SIG" * 50))), F.Want(8, 0, b"g", b"", F.Resume(b"c" * 32, 10**9, 32, 1280, ((0, 5), (9, 100))), True),
    F.File(7, F.FILE_OK, True, 1000, b"h" * 32, 0o100600, -1, 500, 2000, 1, 2, 32, 4, 1280, b"", b"d" * 32),
    F.File(9, F.FILE_OK, False, 300, b"h" * 32, 0o100600, 5, 0, 1 << 30, 0, 0, 128, 1, 1296, b"", b"d" * 32,
           ((0, 100), (1 << 20, 200))),
    F.File(10, F.FILE_OK, True, 70, b"h" * 32, 0o100600, 5, 0, 1 << 30, 0, 0, 16, 1, 1296, b"", b"d" * 32,
           None, True),
    F.Ack(7, (0, 1, 5)), F.Repair(7, ((2, 3), (9, 32))), F.FileDone(7, False, b"no space"),
    F.Pack(F.PACK_BASE + 2, 1, 5000, 3000, 144, 20, 1296),
    F.Item(F.ITEM_LINE, b">f+++++++++ f"), F.Done(b'{"files": 1}'), F.Bye(),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_frames_round_trip(frame):
    data = F.encode(frame)
    r = F.FrameReader()
    for i in range(0, len(data), 7):                    # arriving in pieces
        r.feed(data[i:i + 7])
    assert list(r.frames()) == [frame] and r.pending == 0


def test_frame_bytes_are_stable():
    """Golden: the wire bytes of every sample frame (recorded from the
    field-by-field encoder of protocol version 6: only Hello's version
    differs from 5's; a change here is a protocol change and needs a new
    VERSION)."""
    import hashlib
    wire = b"".join(F.encode(f) for f in SAMPLES)
    assert hashlib.sha256(wire).hexdigest() == "cc15238d080715409d8399c38fa370fe82c8ff0eefac4c6c1406d6cc437bac21"


@pytest.mark.parametrize("frame,why", [
    (F.encode(SAMPLES[5]).replace(b"a/b", b"../"), "bad name"),
    (F.encode(F.Want(1, 0, b"ok", b"")).replace(b"ok", b".."), "bad name"),
])
def test_frames_refuse_names_that_escape(frame, why):
    r = F.FrameReader()
    r.feed(frame)
    with pytest.raises(ProtocolError, match=why):
        list(r.frames())


@pytest.mark.parametrize("edit,why", [
    (lambda w: w[:-1] + b"\x08", "unknown flags"),                 # the last entry's flags
    (lambda w: w.replace(b"\x01a\x00", b"\x02..\x00"), "bad name"),
    (lambda w: w[:13] + b"\x00" + w[14:], "bad count"),            # no entries
])
def test_hostile_wants_are_refused(edit, why):
    wire = F.encode(F.Wants(0, 5, ((b"x", True, b""), (b"a", False, b""))))
    assert wire[13] == 2                                          # 5 bytes of head, u32, u32, then the count
    r = F.FrameReader()
    bad = edit(wire)
    r.feed(bad)
    with pytest.raises(ProtocolError, match=why):
        list(r.frames())


def test_a_want_with_unknown_flags_is_refused():
    wire = bytearray(F.encode(F.Want(1, 0, b"ok", b"", None, True)))
    assert wire[-1] == F.WANT_UPDATE                # the flags end a Want without a Resume
    wire[-1] |= 4
    r = F.FrameReader()
    r.feed(bytes(wire))
    with pytest.raises(ProtocolError, match="unknown flags"):
        list(r.frames())


@pytest.mark.parametrize("ranges", [((5, 2), (0, 1)), ((0, 5), (3, 2)), ((0, 0),)],
                         ids=["unsorted", "overlapping", "empty"])
def test_resume_ranges_must_be_sorted_and_disjoint(ranges):
    """A Want's Resume costs the sender work per stripe it names: ranges
    out of order, overlapping or empty are a protocol error."""
    r = F.FrameReader()
    r.feed(F.encode(F.Want(1, 0, b"f", b"", F.Resume(b"c" * 32, 10**9, 32, 1280, ranges))))
    with pytest.raises(ProtocolError, match="resume ranges"):
        list(r.frames())


def test_another_protocol_version_is_refused_by_name():
    data = F.encode(SAMPLES[0])
    body = (F.VERSION - 1).to_bytes(2, "little") + data[7:-8]      # an older Hello: laid out otherwise (shorter)
    r = F.FrameReader()
    r.feed((len(body) + 1).to_bytes(4, "little") + data[4:5] + body)
    with pytest.raises(ProtocolError, match=f"version {F.VERSION - 1} not supported"):
        list(r.frames())


def test_frame_lengths_are_bounded():
    r = F.FrameReader()
    r.feed(b"\xff\xff\xff\x7f\x01")                        # claims 2 GiB
    with pytest.raises(ProtocolError, match="out of range"):
        list(r.frames())
    r = F.FrameReader()
    r.feed(F.encode(F.Ack(1, ())).replace(b"\x00\x00\x00\x00", b"\xff\xff\xff\x0f", 1)[:5] + b"\0" * 20)
    with pytest.raises(ProtocolError):
        list(r.frames())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_frames_give_only_protocol_errors(data):
    """Valid frames with bytes flipped, cut or extended: a frame or a
    ProtocolError, never another exception (and no huge allocation)."""
    base = bytearray(F.encode(data.draw(st.sampled_from(SAMPLES))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.integers(0, 2))
        pos = data.draw(st.integers(0, len(base) - 1))
        if op == 0:
            base[pos] = data.draw(st.integers(0, 255))
        elif op == 1:
            del base[pos:]
            if len(base) < 5:
                base += b"\0" * 5
        else:
            base[pos:pos] = data.draw(st.binary(max_size=20))
    r = F.FrameReader()
    r.feed(bytes(base))
    try:
        list(r.frames())
    except ProtocolError:
        pass


# -- stripes ----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(content=mix.mixed_bytes(60_000), k=st.integers(1, 12), m=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_any_k_shards_of_a_stripe_rebuild_it(content, k, m, seed):
    rnd = random.Random(seed)
    size = 64 * rnd.randint(1, 4)
    enc = StripeEncoder(9, np.frombuffer(content, np.uint8), k, size)
    out = bytearray(len(content))
    asm = StripeAssembler(9, len(content), k, size, lambda off, data: out.__setitem__(
        slice(off, off + len(data)), bytes(data)))
    rebuilt = 0
    for s in range(enc.stripes):
        d, _ = enc.geometry(s)
        shards = enc.shards(s, range(d + m))
        keep = rnd.sample(range(d + m), d)                # any d of them
        if m and rnd.random() < 0.5:                      # or fewer, then repairs: new parity rows
            keep = keep[:d - 1]
            shards = shards + enc.shards(s, [d + m + i for i in range(2)])
            keep += [d + m]
        rebuilt += sum(1 for i in range(d) if i not in keep)          # data shards not among those taken
        for i in keep:
            got = parse(shards[i])
            assert got is not None and got[:3] == (9, s, i)
            assert asm.need(s) > 0
            asm.add(got[1], got[2], got[3])
        assert asm.need(s) == 0
    assert asm.complete and bytes(out) == content
    assert asm.rebuilt == rebuilt                         # (the daemon's resync_shards_recovered_total)


@pytest.mark.parametrize("length, k, size, expect", [
    (100, 32, 1280, [(1, 100)]),                          # a small file: one shard of its own size
    (1280, 32, 1280, [(1, 1280)]),
    (1281, 32, 1280, [(2, 641)]),
    (32 * 1280, 32, 1280, [(32, 1280)]),
    (32 * 1280 + 5, 32, 1280, [(32, 1280), (1, 5)]),
    (3 * 32 * 1280 - 1, 32, 1280, [(32, 1280), (32, 1280), (32, 1280)]),
])
def test_the_last_stripe_is_shortened_not_padded(length, k, size, expect):
    from resync.protocol.shards import geometry, stripe_count
    got = [geometry(length, k, size, s) for s in range(stripe_count(length, k, size))]
    assert got == expect
    # every byte has a place, and the padding of a stripe is less than its shard count
    d, sz = got[-1]
    left = length - (len(got) - 1) * k * size
    assert 0 <= d * sz - left < d
    content = np.frombuffer(bytes(range(256)) * (length // 256 + 1), np.uint8)[:length]
    enc = StripeEncoder(3, content, k, size)
    last = enc.shards(len(got) - 1, [0])[0]
    assert len(last) == HEADER + sz


@settings(max_examples=40, deadline=None)
@given(content=mix.mixed_bytes(20_000), k=st.integers(1, 6), size=st.integers(64, 3000))
def test_a_bytes_content_is_cut_as_an_array_is_on_a_reliable_stream(content, k, size):
    """A reliable stream's contents of bytes (packs, small whole files: no
    NumPy) give the very datagrams an array gives, padding included; parity
    is refused."""
    plain = StripeEncoder(5, content, k, size, False)
    array = StripeEncoder(5, np.frombuffer(content, np.uint8), k, size, False)
    assert plain.stripes == array.stripes
    for s in range(plain.stripes):
        d, _ = plain.geometry(s)
        assert [bytes(x) for x in plain.shards(s, range(d))] == [bytes(x) for x in array.shards(s, range(d))]
        with pytest.raises(ProtocolError):
            plain.shards(s, [d])
    with pytest.raises(ValueError):
        StripeEncoder(5, b"abc", 1, 64, True)             # a checked stream's content is an array


def test_a_corrupt_shard_is_a_lost_shard():
    enc = StripeEncoder(1, np.frombuffer(b"x" * 5000, np.uint8), 4, 256)
    d = bytearray(enc.shards(0, [0])[0])
    d[HEADER + 10] ^= 1
    assert parse(bytes(d)) is None and parse(enc.shards(0, [0])[0]) is not None


# -- sessions ---------------------------------------------------------------------------

def tree(root: Path, seed: int) -> None:
    make_tree(root, random.Random(seed), files=50)
    mix.write(root / "big-mixed", seed, 2_000_000, "mixed")
    mix.write(root / "big-random", seed + 1, 700_000, "random")


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.2, 0.33])
@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_transfers_over_a_lossy_channel_equal_the_source(tmp_path, push, loss):
    """Both directions, random loss with reordering and duplication: the
    destination equals the source (and rsync -a's copy); a second round of
    edits with --delete sends deltas, not whole files."""
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    tree(src, 4)
    dst.mkdir()
    server_root, local = (dst, src) if push else (src, dst)
    rng = random.Random(int(loss * 100) + push)
    for round_ in range(2):
        options = Options(delete=True)
        client, server = make_pair(tmp_path, push, local, server_root, options=options)
        t = pump(client, server, Channel(rng, loss=loss, dup=0.02, jitter=0.01))
        assert client.error is None and server.error is None, (client.error, server.error)
        assert snapshot(dst) == snapshot(src)
        assert rsync_a(src, ref, "--delete").returncode == 0
        assert seconds(snapshot(dst)) == seconds(snapshot(ref))
        result = client.result
        if round_ == 1:
            assert result["bytes_literal"] < 300_000 < result["bytes_matched"]   # deltas of the big files
        # each stripe counted once; a stripe asked for is counted once however often it is asked
        assert result["stripes"] > 0
        assert result["stripes_repaired"] <= min(result["repairs_asked"], result["stripes"])
        assert (result["stripes_repaired"] > 0) == (result["repairs_asked"] > 0)
        assert not list(dst.rglob(".resync-tmp-*"))
        assert t < 60
        mutate(src, random.Random(round_))
        with open(src / "big-mixed", "r+b") as f:
            f.seek(1_000_000)
            f.write(b"edited in the middle")
        _restamp(src / "big-mixed", random.Random(round_))      # (rsync compares whole seconds)
        if not any(src.iterdir()):
            (src / "last").write_bytes(b"x")


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
def test_a_cut_transfer_resumes_without_sending_again_what_arrived(tmp_path, push, delta):
    """The connection is lost halfway through a large file (a new file, or
    a delta against an old copy): the receiver checkpoints what arrived; the
    next run resends at most 1.1x what was missing and ends identical."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    rng = random.Random(7)
    big = rng.randbytes(6_000_000)
    if delta:
        (dst / "big").write_bytes(big)
        os.utime(dst / "big", ns=(10**18, 10**18))
        big = big[:1_000_000] + rng.randbytes(4_000_000) + big[1_000_000:]
    (src / "big").write_bytes(big)
    (src / "small.txt").write_text("a small file\n" * 20)
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(1), loss=0.05), cut_after=3000, rate=50e6)   # (the clock moves: cut at ~3000 of ~5000)
    assert client.error is not None and server.error is not None
    assert (dst / "big").exists() == delta and not (delta and (dst / "big").read_bytes() == big)   # old or absent
    kept = list(dst.glob(".resync-tmp-recv-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoint.json").exists()
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(2), loss=0.05))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    assert not list(dst.glob(".resync-tmp-*"))
    receiver = server if push else client
    sender = client if push else server
    resumed = (client.result if push else client.result)["resumed_bytes"]
    content = 4_200_000 if delta else 6_000_000          # about: a delta holds the new 4 MB and its instructions
    assert resumed > content * 0.4                        # what arrived before the cut
    missing = receiver_content(receiver) - resumed
    assert 0 < missing and sender.stats["datagram_bytes_sent"] <= 1.1 * missing + 200_000


@pytest.mark.parametrize("push, trigger", [(True, "time"), (False, "time"), (True, "bytes")],
                         ids=["push", "pull", "push-by-bytes"])
def test_a_killed_receiver_resumes_from_its_last_periodic_checkpoint(tmp_path, monkeypatch, push, trigger):
    """SIGKILL of the receiver: no final checkpoint, only the periodic one
    (every CHECKPOINT_INTERVAL, or every CHECKPOINT_BYTES of content on a
    fast link); the next run resumes from it and ends identical. (Little
    parity, so that several files wait for repairs when it dies.)"""
    monkeypatch.setattr(parity_mod, "STRIPE_TARGET", 0.5)
    if trigger == "time":
        monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_INTERVAL", 0.02)
    else:
        monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_INTERVAL", 1000.0)
        monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_BYTES", 2 << 20)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    rng = random.Random(5)
    for i in range(3):
        (src / f"large{i}").write_bytes(rng.randbytes(3_000_000) + bytes(1_000_000))
    (src / "small.txt").write_text("a small file\n" * 20)
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(1), loss=0.05), cut_after=6000, kill=True, rate=50e6)
    kept = list(dst.glob(".resync-tmp-recv-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoint.json").exists()
    entries = json.loads((kept[0] / "checkpoint.json").read_text())["files"]
    assert len(entries) >= 2
    (kept[0] / entries[0]["tmp"]).unlink()      # as when a file completed after the checkpoint
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(3), loss=0.05), cut_after=3)    # cut again before much arrives
    kept = list(dst.glob(".resync-tmp-recv-*/checkpoint.json"))
    again = {e["tmp"] for e in json.loads(kept[0].read_text())["files"]} if len(kept) == 1 else set()
    assert {e["tmp"] for e in entries[1:]} <= again, "files offered again but not begun stay in the checkpoint"
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(2), loss=0.05))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    assert not list(dst.glob(".resync-tmp-*"))
    assert client.result["resumed_bytes"] > 0


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_a_hostile_or_damaged_checkpoint_is_ignored(tmp_path, push):
    """checkpoint.json lies on disk in the destination: a FIFO in its
    place, or entries with missing, mistyped, out-of-range or unsafe fields,
    are no checkpoint (never a hang, a traceback or a write elsewhere);
    resync's temp names in a source are never sent."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 11)
    (src / ".resync-tmp-recv-0123").mkdir()                 # another run's staging, left in a source
    (src / ".resync-tmp-recv-0123" / "checkpoint.json").write_text("{}")
    (src / ".resync-tmp-abc-1").write_bytes(b"half a file")
    dst.mkdir()
    (dst / ".resync-tmp-recv-fifo").mkdir()
    os.mkfifo(dst / ".resync-tmp-recv-fifo" / "checkpoint.json")
    good = {"path": b"f0".hex(), "tmp": ".resync-tmp-1-2-3", "content": "00" * 32, "length": 10, "delta": False,
            "k": 32, "shard_size": 1280, "basis": None, "stripes": [[0, 1]]}
    bad = [dict(good, delta=None), dict(good, content="00"), dict(good, k=1 << 20), dict(good, stripes=[5]),
           dict(good, stripes=[[0, 10**12]]), dict(good, tmp="../../escape"), dict(good, tmp=".resync-tmp-\0"),
           dict(good, path="zz"), dict(good, length=-1), "not an entry"]
    (dst / ".resync-tmp-recv-bad").mkdir()
    (dst / ".resync-tmp-recv-bad" / "checkpoint.json").write_text(json.dumps({"version": 1, "files": bad}))
    os.utime(dst / ".resync-tmp-recv-bad" / "checkpoint.json", ns=(4 * 10**18, 4 * 10**18))      # the newest
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(4), loss=0.05))
    assert client.error is None and server.error is None, (client.error, server.error)
    expect = {k: v for k, v in snapshot(src).items() if ".resync-tmp-" not in k}
    assert snapshot(dst) == expect
    assert not list(dst.glob(".resync-tmp-*")) and not list(tmp_path.glob("escape*"))


def receiver_content(session) -> int:
    """Bytes of content the transfer was about (files' or deltas' lengths)."""
    return session.result["bytes_literal"] if session.result.get("bytes_matched") else \
        session.result["bytes_transferred"]


def test_a_cut_transfer_of_a_file_changed_since_starts_it_over(tmp_path):
    """Old and new content are never spliced: a source file that changed
    after the cut is sent whole again, and the result is the new one."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    rng = random.Random(8)
    (src / "big").write_bytes(rng.randbytes(5_000_000))
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(1)), cut_after=1500)
    assert list(dst.glob(".resync-tmp-recv-*"))
    data = bytearray((src / "big").read_bytes())
    data[100:200] = b"x" * 100                            # changed at the start: stripe 0 differs
    (src / "big").write_bytes(bytes(data))
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(2)))
    assert client.error is None and server.error is None
    assert (dst / "big").read_bytes() == bytes(data) and client.result["resumed_bytes"] == 0


def test_a_no_change_transfer_sends_the_listing_and_nothing_else(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 5)
    dst.mkdir()
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(1)))
    os.symlink("a/b/../target", src / "link")
    root_mtime = os.stat(src).st_mtime_ns
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(1)))
    os.utime(src, ns=(root_mtime, root_mtime))
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(1)))
    assert client.stats["datagrams_sent"] == 0 and client.result["files_transferred"] == 0
    assert server.stats["control_bytes_received"] < 20_000
    # nothing to do is nothing done: no symlink made again, the root's time untouched (as local sync)
    assert client.result["updated"] == 0 and client.result["created"] == 0, client.result
    assert snapshot(dst) == snapshot(src)


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_delete_from_an_empty_source_is_refused(tmp_path, push):
    """--delete with an empty source (or all of it excluded) deletes
    nothing and says why, as local sync does (exit 25 at the client)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    tree(dst, 13)
    before = snapshot(dst)
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root, options=Options(delete=True))
    pump(client, server, Channel(random.Random(1)))
    assert client.error is None and server.error is None
    assert "source is empty" in client.result["deletion_refused"]
    assert snapshot(dst) == before                      # the root's mode and time too: left as it was
    shutil.rmtree(dst)                                  # nothing at the destination: refused all the same
    client, server = make_pair(tmp_path, push, local, server_root, options=Options(delete=True))
    pump(client, server, Channel(random.Random(1)))
    assert "source is empty" in client.result["deletion_refused"]


def test_corrupted_shards_are_caught_and_repaired(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 6)
    dst.mkdir()
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(2), loss=0.02, corrupt=0.05, jitter=0.005))
    assert client.error is None and server.error is None
    assert snapshot(dst) == snapshot(src)
    assert server.result["corrupt_shards"] > 0


@pytest.mark.parametrize("held", [True, False], ids=["held", "over-the-limit"])
def test_shards_that_overtake_their_file_frame_are_held_not_lost(tmp_path, monkeypatch, held):
    """The control stream arrives late (QUIC sends queued datagrams first and
    resends a lost stream packet later): on a link that loses nothing no
    shard is asked for again. Beyond the receiver's limit for such shards
    they are dropped, and the transfer still ends equal through repairs."""
    if not held:
        monkeypatch.setattr(receiver_mod, "EARLY_BYTES", 3000)
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 8)
    dst.mkdir()
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(3), delay=0.005), stream_delay=0.05)
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    receiver = server.role
    assert receiver.intake.early == {} and receiver.intake.early_bytes == 0
    if held:
        assert server.result["repairs_asked"] == 0 and client.result["probes"] == 0
        assert client.result["repair_shards"] == 0
    else:
        assert client.result["repair_shards"] > 0


def test_a_pull_is_sent_at_the_lower_of_the_client_and_server_limits_with_the_servers_min_parity(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(random.Random(1).randbytes(41 * parity_mod.K_UNKNOWN * session_mod.SHARD_SIZE))    # 41 full stripes (the first file: loss not yet measured)
    sent = {}
    for min_parity in (1, 4):
        for p in dst.iterdir():
            p.unlink()
        client, server = make_pair(tmp_path, False, dst, src, options=Options(bwlimit=3 << 20),
                                   bwlimit=5 << 20, min_parity=min_parity)
        pump(client, server, Channel(random.Random(1)))
        assert client.error is None and server.error is None
        assert (dst / "f").read_bytes() == (src / "f").read_bytes()
        assert server.rate_limit == 3 << 20
        sent[min_parity] = server.stats["datagrams_sent"]
    assert sent[4] - sent[1] == 41 * 3
    client, server = make_pair(tmp_path, True, src, dst, options=Options(bwlimit=3 << 20), bwlimit=5 << 20)
    pump(client, server, Channel(random.Random(1)))
    assert server.rate_limit == 0                   # a push: the client limits what it sends itself


class Meter:
    """Records what a session tells its progress display (resync.progress.Progress)."""

    def __init__(self):
        self.bytes_queued = self.bytes_done = self.partial_bytes = self.partials = 0
        self.files_queued = self.files_done = 0
        self.scanned_at: int | None = None

    def queued(self, n):
        self.bytes_queued += n
        self.files_queued += 1

    def done(self, n):
        self.bytes_done += n
        self.files_done += 1

    def partial(self, n):
        self.partial_bytes += n
        self.partials += 1
        self.bytes_done += n

    def scanned(self):
        self.scanned_at = self.bytes_done


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_progress_counts_every_byte_of_every_file_once(tmp_path, push):
    """-P over the network: each transferred file queued once with its size,
    its stripes shown as they go (a delta's scaled to the file), and done once."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 3)
    mix.write(src / "big", 3, 3_000_000, "mixed")
    dst.mkdir()
    mix.write(dst / "big", 4, 3_000_000, "mixed")       # partly the same: a delta
    os.utime(dst / "big", ns=(10**18, 10**18))
    server_root, local = (dst, src) if push else (src, dst)
    meter = Meter()
    client, server = make_pair(tmp_path, push, local, server_root)
    client.progress = meter
    pump(client, server, Channel(random.Random(3), loss=0.1), rate=20e6)    # (time moves: Acks come while it flows)
    assert client.error is None and server.error is None
    assert snapshot(dst) == snapshot(src)
    result = client.result
    assert meter.files_queued == meter.files_done == result["files_transferred"]
    assert meter.bytes_queued == meter.bytes_done == result["bytes_transferred"]
    assert meter.partials > 8 and 0 < meter.partial_bytes <= meter.bytes_done     # (3 MB: 18 stripes of 160 KiB)
    assert meter.scanned_at is not None


def test_itemized_lines_of_a_push_reach_the_client(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("a")
    dst.mkdir()
    lines = RemoteLines()
    client, server = make_pair(tmp_path, True, src, dst, options=Options(itemize=True), client_report=lines)
    pump(client, server, Channel(random.Random(1)))
    assert (F.ITEM_LINE, b">f+++++++++ a") in lines.items


# -- refusals ------------------------------------------------------------------------------

def _refused(client, server):
    pump(client, server, Channel(random.Random(1)), max_time=5)
    assert isinstance(server.error, RefusedError) and isinstance(client.error, RefusedError)
    return str(client.error)


def test_unknown_client_unknown_module_and_read_only_are_refused_before_any_listing_is_taken(tmp_path):
    """(The client's early listing crosses with its proof; the server reads
    none of it: it refuses with no role, having made nothing.)"""
    src, mod = tmp_path / "src", tmp_path / "mod"
    tree(src, 7)
    mod.mkdir()
    client, server = make_pair(tmp_path, True, src, mod, allowed=set())
    not_allowed = _refused(client, server)
    assert "is not allowed" in not_allowed
    assert server.role is None and not any(mod.iterdir())
    assert server.stats["control_bytes_received"] < 1000 + session_mod.EARLY_LISTING
    client, server = make_pair(tmp_path, True, src, mod, read_only=True)
    assert "read-only" in _refused(client, server)
    cid, sid = identities(tmp_path)
    server = ServerSession(sid, sid.cert_der, {"other": Module("other", str(mod), allowed={cid.device_id})})
    client = ClientSession(cid, sid.cert_der, True, "m", "", str(src), Options())
    no_module = _refused(client, server)
    assert "no module 'm'" in no_module
    assert no_module == not_allowed             # a device that may not use it learns nothing of the names
    assert not any(mod.iterdir())


def test_a_push_lists_with_its_proof_and_the_server_holds_the_listing_until_it_admits_the_push(tmp_path):
    """Protocol 6: a pushing client's first listing frames leave with its
    Auth, a round trip before the Welcome — EARLY_LISTING bytes of them, no
    more until the Welcome; a server still admitting the push (the
    destination held by a transfer it is asking about) keeps them unread,
    then plans them, and the push ends as any other."""
    src, mod = tmp_path / "src", tmp_path / "mod"
    import hashlib
    for d in range(3):                          # a listing of ~150 KB (names with nothing in common, which
        (src / f"d{d}").mkdir(parents=True)     # the listing's front coding cannot shorten): past the early part
        for i in range(800):
            (src / f"d{d}" / hashlib.sha256(b"%d %d" % (d, i)).hexdigest()).write_bytes(b"")
    (src / "d0" / "text").write_bytes(b"some text\n" * 300)
    mod.mkdir()
    asked = []

    def lock(key, fd, session):
        asked.append(fd)
        return None if len(asked) < 3 else True     # "ask again" twice, LOCK_POLL apart: then taken

    client, server = make_pair(tmp_path, True, src, mod, lock=lock)
    server.receive_stream(client.stream_to_send(), 0.0)     # Hello
    client.receive_stream(server.stream_to_send(), 0.0)     # Challenge
    out = b""
    while more := client.stream_to_send():      # (the sender lists in turns of WORK_SLICE)
        out += more
    reader = F.FrameReader()
    reader.feed(out)
    frames = list(reader.frames())
    assert type(frames[0]) is F.Auth and type(frames[1]) is F.Dir and type(frames[-1]) is F.Dir
    listed = len(out) - len(F.encode(frames[0]))     # (nothing more until the Welcome: the loop ended)
    assert session_mod.EARLY_LISTING <= listed <= session_mod.EARLY_LISTING + max(len(F.encode(f)) for f in frames)
    auth = len(F.encode(frames[0]))
    for piece in (out[:auth], out[auth:auth + 1000], out[auth + 1000:]):   # (it arrives in pieces while
        server.receive_stream(piece, 0.0)                                  # the server admits the push)
        assert server.role is None and asked == [None] and server.stream_to_send() == b""
    pump(client, server, Channel(random.Random(1)))
    assert client.error is None and server.error is None and len(asked) == 4
    assert snapshot(mod) == snapshot(src)


def test_a_client_that_cannot_prove_its_key_is_refused(tmp_path):
    """It presents the allowed key but signs with another, or the server's
    certificate differs from the one it signed for (a relay in between)."""
    src, mod = tmp_path / "src", tmp_path / "mod"
    tree(src, 8)
    mod.mkdir()
    cid, sid = identities(tmp_path)
    from resync.identity import load_identity
    other = load_identity(tmp_path / "other-id", create=True)

    class Impostor:
        public_key = cid.public_key
        sign = other.sign

    server = ServerSession(sid, sid.cert_der, {"m": Module("m", str(mod), allowed={cid.device_id})})
    client = ClientSession(Impostor(), sid.cert_der, True, "m", "", str(src), Options())
    assert "did not prove its key" in _refused(client, server)
    server = ServerSession(sid, sid.cert_der, {"m": Module("m", str(mod), allowed={cid.device_id})})
    client = ClientSession(cid, other.cert_der, True, "m", "", str(src), Options())     # another certificate
    assert "did not prove its key" in _refused(client, server)
    assert not any(mod.iterdir())


def test_a_path_leaving_the_module_is_refused(tmp_path):
    src, mod = tmp_path / "src", tmp_path / "mod"
    src.mkdir()
    mod.mkdir()
    client, server = make_pair(tmp_path, True, src, mod, path="../escape")
    assert "leaves the module" in _refused(client, server)
    assert not (tmp_path / "escape").exists()


def test_a_hostile_sender_cannot_write_outside_the_destination(tmp_path):
    """A sender whose listing names '..' or a file under a symlink: a
    protocol error, nothing outside the root written."""
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    os.symlink(outside, dst / "link")
    from resync.protocol.receiver import Receiver
    from resync.report import Report
    server = ServerSession(*_server_args(tmp_path, dst))
    server.role = Receiver(server, str(dst), Options(), Report())
    attrs = F.Listed(b"", 2, 0o40755, 0, 0, 0, 0, 0, 0, b"", b"")
    evil = F.encode(F.Dir(0, b"", attrs, (LISTED._replace(name=b"ok"),), ()))
    server.receive_stream(evil, 0.0)
    server.receive_stream(F.encode(F.Dir(1, b"link", attrs, (LISTED._replace(name=b"x"),), ())), 0.0)
    assert not any(outside.iterdir())
    bad = F.encode(F.Dir(2, b"ok", attrs, (), ())).replace(b"ok", b"..")
    server.receive_stream(bad, 0.0)
    assert isinstance(server.error, ProtocolError)
    assert not any(outside.iterdir()) and not (tmp_path / "x").exists()


def _server_args(tmp_path, root):
    cid, sid = identities(tmp_path)
    return sid, sid.cert_der, {"m": Module("m", str(root), allowed={cid.device_id})}


@pytest.mark.parametrize("loss", [0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.25, 0.33, 0.4, 0.5])
def test_the_stripe_size_follows_the_loss_within_256_shards(loss):
    """stripe_k picks, for the loss estimate plus its margin, a k whose
    parity meets the repair-round target within k + m <= 256 and costs no
    more parity per data shard than k = 128 would; no loss: 128."""
    from resync.erasure.policy import failure_probability, parity_for_target
    from resync.protocol.parity import DEFAULT_K, K_MARGIN, STRIPE_TARGET, stripe_k
    k = stripe_k(loss)
    if loss == 0:
        assert k == DEFAULT_K
        return
    planned = min(loss + K_MARGIN, 0.5)
    m = parity_for_target(k, planned, STRIPE_TARGET)
    assert k + m <= 256 and failure_probability(k, m, planned) < STRIPE_TARGET or k == DEFAULT_K
    assert m / k <= parity_for_target(DEFAULT_K, planned, STRIPE_TARGET) / DEFAULT_K + 1e-9


def test_a_resumed_file_keeps_the_stripes_it_was_cut_into():
    """A cut transfer resumed at another loss estimate is cut into the same
    stripes as before (its kept stripes are skipped only then), and into
    shards of the same size as long as the path's datagrams hold them; a
    fresh one takes the k of the loss now and the path's shard size."""
    from types import SimpleNamespace
    from resync.protocol.parity import ParityPlanner, stripe_k
    from resync.protocol.session import shard_size_for
    planner = ParityPlanner(SimpleNamespace(shard_size=1296, reliable=False))
    planner.policy.loss, planner.reports = 0.2, 3
    resume = F.Resume(bytes(32), 10_000_000, 224, 1296, ((0, 3),))
    assert planner.geometry(resume) == (224, 1296)
    assert planner.geometry(None) == (stripe_k(0.2), 1296) == (176, 1296)
    smaller = F.Resume(bytes(32), 10_000_000, 224, 1136, ((0, 3),))      # cut while packets were smaller
    assert planner.geometry(smaller) == (224, 1136)
    planner.s.shard_size = shard_size_for(1200)                          # a path that carries no more than
    assert planner.geometry(resume) == (176, 1136)                       # the minimum
    planner.s.shard_size = 1296
    planner.reports = 0                         # nothing measured yet: a k whose parity reaches 35 % loss
    k, _ = planner.geometry(None)
    from resync.erasure.policy import failure_probability, parity_for_target
    from resync.protocol.parity import STRIPE_TARGET
    m = parity_for_target(k, 0.35, STRIPE_TARGET)
    assert k > 128 and k + m <= 256 and failure_probability(k, m, 0.35) < STRIPE_TARGET
    planner.s.reliable, planner.s.shard_size = True, 1 << 20    # the TLS stream: no parity, 1 MiB stripes
    assert planner.geometry(resume) == (1, 1 << 20) and planner.full(1) == 0 and planner.parity(4, 3) == 0


def _file_frame(length: int, k: int, size: int, content: bytes = bytes(32)) -> F.File:
    return F.File(1, F.FILE_OK, False, length, content, 0o100644, 0, 0, length, 0, 0, k, 0, size, b"",
                  content, None, False)


def test_kept_stripes_carry_over_to_another_geometry():
    """A content cut in one geometry and resumed in another (the TLS
    stream's 64 KiB shards falling back to QUIC's datagrams, or back): every
    new stripe whose bytes were all kept is carried, none other; against a
    byte-by-byte reference over many geometries and kept sets."""
    import random
    from resync.protocol.common import carried
    rng = random.Random(7)
    for _ in range(400):
        length = rng.choice([1, 100, 65536, 1 << 20, 5_000_000, rng.randrange(1, 20_000_000)])
        ok, osz = rng.choice([(4, 1 << 20), (16, 65536), (128, 1296), (176, 1136), (3, 64)])
        nk, nsz = rng.choice([(4, 1 << 20), (128, 1296), (224, 1296), (5, 100)])
        old_stripes = -(-length // (ok * osz))
        kept = sorted(rng.sample(range(old_stripes), rng.randint(0, min(old_stripes, 6))))
        runs = tuple((s, 1) for s in kept)
        have = bytearray(length)                # which bytes the receiver holds
        for s in kept:
            have[s * ok * osz:min(length, (s + 1) * ok * osz)] = b"\1" * (min(length, (s + 1) * ok * osz) - s * ok * osz)
        r = F.Resume(bytes(32), length, ok, osz, runs)
        got = carried(r, _file_frame(length, nk, nsz))
        want = [s for s in range(-(-length // (nk * nsz)))
                if all(have[s * nk * nsz:min(length, (s + 1) * nk * nsz)])]
        assert got == want, (length, ok, osz, nk, nsz, kept)
    r = F.Resume(bytes(32), 1 << 20, 128, 1296, ((0, 3),))
    assert carried(r, _file_frame(1 << 20, 16, 65536, b"\1" * 32)) == []      # another content: nothing
    assert carried(r, _file_frame(1 << 20, 128, 1296)) == [0, 1, 2]


def _push_with_late_first_loss_report(tmp_path, monkeypatch, owe: bool) -> dict:
    """A 4 MB push at 30 % loss whose transport reports no loss for its first
    six sends (as QUIC's first sample needs 100 decided packets)."""
    src, dst = tmp_path / f"src{owe}", tmp_path / f"dst{owe}"
    src.mkdir()
    dst.mkdir()
    mix.write(src / "big", 5, 4_000_000, "mixed")
    client, server = make_pair(tmp_path, True, src, dst)
    calls = {"n": 0}
    observe = client.observe_loss

    def late(lost, sent):
        calls["n"] += 1
        if calls["n"] > 6:
            observe(lost, sent)
    client.observe_loss = late
    if not owe:
        monkeypatch.setattr(sender_mod.Stripes, "owe_parity", lambda self: None)
    pump(client, server, Channel(random.Random(5), loss=0.3), rate=20e6)
    assert client.error is None and server.error is None
    assert (dst / "big").read_bytes() == (src / "big").read_bytes()
    return client.result


def test_stripes_sent_before_the_loss_is_measured_get_their_parity_when_it_is(tmp_path, monkeypatch):
    """The first stripes leave before any loss sample, with no parity; when
    the first sample comes, their parity follows at once, before the
    receiver sees them short: no repair round for them (without it, the
    first stripes of each transfer at 30 % loss need one)."""
    owed = _push_with_late_first_loss_report(tmp_path, monkeypatch, True)
    plain = _push_with_late_first_loss_report(tmp_path, monkeypatch, False)
    assert plain["stripes_repaired"] >= 3                # the scenario: the first stripes short
    assert owed["stripes_repaired"] < plain["stripes_repaired"]
    assert owed["stripes_repaired"] <= 1


def _release(root: Path, files: int, version: int) -> None:
    """A tree of small source files, as a software release: ``version``
    changes a line in every third file and gives every file a new mtime."""
    rnd = random.Random(11)
    for i in range(files):
        d = root / f"pkg{i % 40}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {j} + {rnd.randrange(1000)}\n" for j in range(rnd.randrange(5, 120)))
        if version and i % 3 == 0:
            body = body.replace("return x", f"return -x  # v{version}", 1)
        p = d / f"m{i}.py"
        p.write_text(body)
        os.utime(p, ns=(0, (1_700_000_000 + version * 1000 + i) * 10**9))


def test_an_update_of_many_small_files_starts_no_thread_and_batches_durability(tmp_path, monkeypatch):
    """A push of 2,000 small files with new mtimes, a third of them slightly
    changed (a release update): the changed ones travel in packs as wire
    deltas (no stripe of their own), rebuilt and staged by the receiver
    without starting a thread, made durable by fsyncs of the receiver's own
    files and directories, not a syncfs; the others, asked
    for with their basis hash, cost a member of a few bytes and keep their
    inode (only their mtime set); the bytes sent are a small share of the tree."""
    import threading
    src, dst = tmp_path / "src", tmp_path / "dst"
    _release(src, 2000, 0)
    dst.mkdir()
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(1)))
    assert client.error is None and server.error is None
    _release(src, 2000, 1)
    starts, fsyncs = [], []
    real_start, real_fsync = threading.Thread.start, os.fsync
    monkeypatch.setattr(threading.Thread, "start", lambda self: (starts.append(self.name), real_start(self))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    import resync.apply.applier
    import resync.apply.staging
    syncfs_calls: list[int] = []
    for module in (resync.apply.applier, resync.apply.staging):
        monkeypatch.setattr(module, "syncfs", lambda fd: (syncfs_calls.append(fd), False)[1])
    inodes = {p.relative_to(dst): p.stat().st_ino for p in dst.rglob("*.py")}
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(2)))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    r = client.result
    assert r["files_transferred"] == 667 and r["redone"] == 0
    kept = {p for p, ino in inodes.items() if (dst / p).stat().st_ino == ino}
    assert kept == {p for p in inodes if int(p.stem[1:]) % 3}           # the unchanged 1,333 stay where they are
    assert starts == []                         # no thread (per file or at all) at either end
    # durability of its own writes only: an fsync of each file and directory it changed (their
    # writeback started together), never a syncfs, which waits for every writer on the disk
    assert syncfs_calls == []
    assert len(fsyncs) <= 667 + 40 * 7 + 16
    total = sum(p.stat().st_size for p in src.rglob("*.py"))
    sent = client.stats["datagram_bytes_sent"] + client.stats["control_bytes_sent"]
    assert sent < total / 8, (sent, total)      # wire deltas of the 667 changed files, packed
    assert r["bytes_literal"] < 667 * 2 * 700       # about a block for each changed line
    # what the receiver asked with: a Wants frame per directory, each file a name, a flag byte and
    # its wire signature (8 bytes a block, a header of ~5) or basis hash (21 bytes), then FileDones and Acks
    from resync import formats
    from resync.signature import default_block_len
    files = list(src.rglob("*.py"))
    changed = [p for p in files if int(p.stem[1:]) % 3 == 0]
    blocks = sum(formats.block_count(p.stat().st_size, default_block_len(p.stat().st_size)) for p in changed)
    names = sum(len(p.name) for p in files)
    asked = server.stats["control_bytes_sent"]
    assert asked < blocks * 8 + names + len(files) * 10 + (len(files) - len(changed)) * 21 + (16 << 10), \
        (asked, blocks, names, len(files))


def test_a_larger_file_whose_delta_is_small_travels_in_a_pack(tmp_path, monkeypatch):
    """A file past 64 KiB (up to 1 MiB) whose wire delta is at most 64 KiB is
    a pack member (no File frame, scratch delta file or stripes of its own);
    one whose delta is larger, or a sparse one, keeps its File frame; the
    receiver refuses a member claiming more than a member holds."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    mix.write(src / "edited.txt", 21, 300_000, "text")
    mix.write(src / "rewritten.bin", 22, 200_000, "random")
    shutil.copytree(src, dst)
    body = (src / "edited.txt").read_bytes()
    (src / "edited.txt").write_bytes(body[:150_000] + b"a new line\n" + body[150_000:])
    mix.write(src / "rewritten.bin", 23, 200_000, "random")
    sent = []
    real = session_mod.Session.send
    monkeypatch.setattr(session_mod.Session, "send", lambda self, f: (sent.append(type(f).__name__), real(self, f))[1])
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(6)))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    assert sent.count("File") == 1 and sent.count("Pack") == 1         # rewritten.bin alone has its own
    assert client.result["files_transferred"] == 2 and client.result["bytes_literal"] < 210_000
    from resync.protocol import encodings as E
    from resync.protocol.receiver import PackIntake
    big = E.Member(1, F.FILE_OK, 0, b"h" * 16, 0o100644, 0, 0, (1 << 20) + 1, 0, 0, b"")
    r = SimpleNamespace(wanted={1: receiver_mod.Incoming("x", "", None, None, ">f+++++++++")},
                        placement=SimpleNamespace(finished=lambda inc: None))
    with pytest.raises(ProtocolError, match="more than a member holds"):
        PackIntake(r)._member(big, {})


def test_a_small_file_of_the_same_size_is_checked_by_its_basis_hash(tmp_path, monkeypatch):
    """Small files whose size stayed and mtime changed are asked for with
    the basis's keyed hash: one whose content changed all the same comes
    whole; a destination copy changed after it was hashed (the same member
    would leave it wrong) is caught by the member's BLAKE3 and asked for
    again whole; the rest keep their content and get the new mtime."""
    from resync.protocol import receiver
    src, dst = tmp_path / "src", tmp_path / "dst"
    _release(src, 30, 0)
    shutil.copytree(src, dst)
    files = sorted(src.rglob("*.py"), key=lambda p: int(p.stem[1:]))
    flipped = files[1]                              # the same size, other content
    flipped.write_bytes(flipped.read_bytes().replace(b"return x", b"return y", 1))
    touched = files[2]                              # the destination's copy, changed behind the basis hash
    for i, p in enumerate(files):
        os.utime(p, ns=(0, (1_800_000_000 + i) * 10**9))
    real = receiver.Planning.signature

    def sign_then_change(self, dir_fd, name, path, basis_hash=False):
        out = real(self, dir_fd, name, path, basis_hash)
        if name == touched.name:
            (dst / path).write_bytes((dst / path).read_bytes().replace(b"return x", b"return z", 1))
        return out
    monkeypatch.setattr(receiver.Planning, "signature", sign_then_change)
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(4)))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    r = client.result
    assert r["redone"] == 1 and r["errors"] == 0                        # the touched copy, once
    assert r["files_transferred"] == 2 and r["bytes_literal"] == flipped.stat().st_size + touched.stat().st_size


def test_a_delta_that_does_not_make_the_file_is_asked_for_again_whole(tmp_path, monkeypatch):
    """The file's BLAKE3 checks what a small file's wire delta made (a false
    block match the short strong hash let through, or a copy changed since it
    was signed): the receiver asks for it again whole, once (rsync's redo)."""
    from resync import patch
    src, dst = tmp_path / "src", tmp_path / "dst"
    _release(src, 30, 0)
    shutil.copytree(src, dst)
    _release(src, 30, 1)
    real = patch.assemble_in_memory
    spoiled = []

    def spoil(*args):
        out = real(*args)
        if not spoiled and out.shape[0]:
            spoiled.append(1)
            out[0] ^= 1
        return out
    monkeypatch.setattr(patch, "assemble_in_memory", spoil)
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(3)))
    assert client.error is None and server.error is None, (client.error, server.error)
    assert snapshot(dst) == snapshot(src)
    assert spoiled and client.result["redone"] == 1 and client.result["errors"] == 0


def test_stripe_geometry_bounds_hold_a_stripe_to_16_mib():
    """A File or Pack frame's geometry: shards of 64 bytes to 1 MiB (the TLS
    stream's), k + m <= 256, and at most 16 MiB a stripe (what a receiver
    holds of one incomplete stripe) — a 1 MiB shard with k = 128 is refused."""
    ok = _file_frame(10 << 20, 4, 1 << 20)
    assert F.decode(F._TYPES[F.File], F.encode(ok)[5:]).shard_size == 1 << 20
    for k, size in ((128, 1 << 20), (4, (1 << 20) + 1), (1, 63), (17, 1 << 20)):
        bad = _file_frame(10 << 20, k, size)
        with pytest.raises(F.ProtocolError):
            F.decode(F._TYPES[F.File], F.encode(bad)[5:])
    assert F.geometry_ok(248, 8, 65536) and F.geometry_ok(16, 0, 1 << 20) and not F.geometry_ok(16, 1, 1 << 20 | 1)
