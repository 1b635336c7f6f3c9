"""The daemon's guarantees, in memory (sans-I/O sessions and a hand-moved
clock): paths a peer names or finds in a module never lead out of it, a peer
that has not proved its key makes the server hold little, a failing disk ends
a transfer with one error at both ends, excludes protect across --delete, and
the path MTU search (resync.net.pmtu). The same kinds through real processes
are in tests/test_net_faults.py; docs/protocol.md ("Security") lists them."""
from __future__ import annotations

import errno
import os
import random
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from resync.errors import InternalError, NoSpaceError
from resync.net import pmtu
from resync.protocol import frames as F
from resync.protocol.frames import ProtocolError
from resync.protocol.receiver import Receiver
from resync.protocol.sender import Sender
from resync.protocol.session import (AUTH_LIMIT, HELLO_LIMIT, SHARD_SIZE, Options, PeerNoSpaceError, RefusedError,
                                     shard_size_for)

from . import mix
from .protopump import Channel, make_pair, pump
from .test_sync import make_tree
from .treeutil import snapshot


def _tree(root: Path, seed: int, files: int) -> None:
    """A realistic mix (text, zeros, repeated blocks, empty files, odd names)."""
    make_tree(root, random.Random(seed), files=files)


def _module(tmp_path: Path) -> tuple[Path, Path]:
    """A module whose tree holds symlinks leading out of it, and a directory
    outside it with a secret in it."""
    mod, outside = tmp_path / "mod", tmp_path / "outside"
    (mod / "up" / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("server-private\n")
    (mod / "up" / "real" / "notes.txt").write_text("inside the module\n")
    os.symlink("/", mod / "up" / "root")
    os.symlink(outside, mod / "up" / "out")
    os.symlink("real", mod / "up" / "inner")       # points inside: refused on the way all the same
    return mod, outside


# -- paths named by the peer -------------------------------------------------------------

@pytest.mark.parametrize("path", ["up/root/etc", "up/out", "up/inner", "up/root"])
def test_a_pull_through_a_symlink_in_the_module_is_refused(tmp_path, path):
    """rsync CVE-2024-12087's kind: the path a client asks for is opened
    beneath the module one component at a time; a symlink anywhere on it is
    refused as leaving the module (exit 13) before any file metadata."""
    mod, outside = _module(tmp_path)
    dst = tmp_path / "dst"
    client, server = make_pair(tmp_path, False, dst, mod, path=path)
    pump(client, server, Channel(random.Random(1)))
    assert isinstance(client.error, RefusedError) and client.error.exit_code == 13
    assert "leaves the module" in str(client.error)
    assert server.role is None and not dst.exists()


def test_a_push_through_a_symlink_in_the_module_writes_nothing_outside(tmp_path):
    mod, outside = _module(tmp_path)
    src = tmp_path / "src"
    _tree(src, 3, files=6)
    before = snapshot(outside)
    for path in ("up/out", "up/out/deeper", "up/root/tmp"):
        client, server = make_pair(tmp_path, True, src, mod, path=path)
        pump(client, server, Channel(random.Random(2)))
        assert isinstance(client.error, RefusedError) and "leaves the module" in str(client.error), path
        assert snapshot(outside) == before
    assert not (Path("/tmp") / "planted").exists()


def test_a_pull_of_a_directory_holding_symlinks_sends_them_as_symlinks(tmp_path):
    mod, outside = _module(tmp_path)
    dst = tmp_path / "dst"
    client, server = make_pair(tmp_path, False, dst, mod, path="up")
    pump(client, server, Channel(random.Random(3)))
    assert client.error is None and server.error is None
    assert os.readlink(dst / "out") == str(outside) and os.readlink(dst / "root") == "/"
    assert not (dst / "out" / "secret.txt").is_file() or (dst / "out").is_symlink()
    assert (dst / "real" / "notes.txt").read_text() == "inside the module\n"


def test_a_push_makes_missing_directories_beneath_the_module(tmp_path):
    mod, _ = _module(tmp_path)
    src = tmp_path / "src"
    _tree(src, 4, files=5)
    client, server = make_pair(tmp_path, True, src, mod, path="up/real/new/deeper")
    pump(client, server, Channel(random.Random(4)))
    assert client.error is None and server.error is None
    assert snapshot(mod / "up/real/new/deeper") == snapshot(src)


def _listed_sender(root: Path) -> Sender:
    """A sender over ``root`` that has listed its whole tree."""
    s = SimpleNamespace(buffered=0, progress=None, shard_size=SHARD_SIZE, path_settled=True, reliable=False, sent=[])
    s.send = s.sent.append
    sender = Sender(s, str(root), Options(), window=1 << 20)
    while not sender.lister.listed:
        sender.pump()
    return sender


def test_a_directory_swapped_for_a_symlink_after_listing_is_never_followed(tmp_path):
    """rsync CVE-2024-12747's kind: a directory listed, then swapped for a
    symlink to outside (as renameat2 RENAME_EXCHANGE does) before its files
    are asked for: the sender opens them from the root's descriptor without
    following symlinks, so it sends an error for each, never the outside."""
    mod, outside = tmp_path / "mod", tmp_path / "outside"
    (mod / "d").mkdir(parents=True)
    outside.mkdir()
    for i in range(5):
        (mod / "d" / f"f{i}").write_text(f"public {i}\n")
        (outside / f"f{i}").write_text(f"SECRET {i}\n")
    sender = _listed_sender(mod)
    index = sender.lister.dirs.index("d")
    os.rename(mod / "d", mod / "d.moved")
    os.symlink(outside, mod / "d")
    for i in range(5):
        sender.frame(F.Want(i, index, f"f{i}".encode(), b""), 0.0)
    sender.pump()
    files = [f for f in sender.s.sent if isinstance(f, F.File)]
    assert len(files) == 5 and all(f.status == F.FILE_ERROR for f in files)
    assert not sender.stripes.active
    sender.close()


def test_a_directory_swapped_before_it_is_listed_is_refused(tmp_path):
    mod, outside = tmp_path / "mod", tmp_path / "outside"
    (mod / "a" / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_text("SECRET\n")
    s = SimpleNamespace(buffered=0, progress=None, shard_size=SHARD_SIZE, path_settled=True, reliable=False, sent=[])
    s.send = s.sent.append
    sender = Sender(s, str(mod), Options(), window=1 << 20)
    first = sender.lister.next_frame()                 # the root: lists a/
    assert isinstance(first, F.Dir)
    os.rename(mod / "a", mod / "a.moved")
    os.symlink(outside, mod / "a")
    frames = list(iter(sender.lister.next_frame, None))
    assert isinstance(frames[0], F.DirFailed) and frames[0].errno in (errno.ELOOP, errno.ENOTDIR)
    assert not any(isinstance(f, F.Dir) and any(e.name == b"f" for e in f.entries) for f in frames)
    sender.close()


# -- before the client's proof -----------------------------------------------------------------

def test_the_server_takes_no_long_frame_before_the_proof(tmp_path):
    """A Hello header claiming more than a Hello can hold is refused as soon
    as its 5 header bytes arrive: nothing is buffered for it; after Hello,
    nothing longer than an Auth; after the proof, the usual limit."""
    from .protopump import identities
    from resync.protocol.session import Module, ServerSession
    cid, sid = identities(tmp_path)
    server = ServerSession(sid, sid.cert_der, {"m": Module("m", str(tmp_path), allowed={cid.device_id})})
    server.receive_stream(struct.pack("<IB", 16 << 20, 0x01), 0.0)
    assert server.finished and isinstance(server.error, ProtocolError)
    assert server._reader.pending <= 5
    reader = F.FrameReader(limit=HELLO_LIMIT)
    reader.feed(struct.pack("<IB", HELLO_LIMIT + 1, 0x01))
    with pytest.raises(ProtocolError, match="out of range"):
        list(reader.frames())
    assert AUTH_LIMIT < 1024 and HELLO_LIMIT < 2 << 20


def test_an_honest_handshake_passes_the_limits_with_long_excludes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 5, files=4)
    excludes = [f"pattern-{i:06d}-*.tmp" for i in range(40_000)]     # ~0.9 MB of excludes in the Hello
    client, server = make_pair(tmp_path, True, src, dst, options=Options(excludes=excludes))
    pump(client, server, Channel(random.Random(5)))
    assert client.error is None and server.error is None and server.authenticated


# -- failing disks --------------------------------------------------------------------------------

def _full_disk(monkeypatch, after: int = 0):
    """pwrite_all fails with ENOSPC after ``after`` calls (as a full file system)."""
    import resync.fs
    real, calls = resync.fs.pwrite_all, {"n": 0}

    def pwrite_all(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    monkeypatch.setattr(resync.fs, "pwrite_all", pwrite_all)


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_a_full_disk_ends_the_transfer_at_both_ends_with_nothing_left(tmp_path, monkeypatch, push):
    """rclone#4442 / restic#3834's kind: the receiver's write fails with
    ENOSPC: its session fails with NoSpaceError (exit 6), the sender is told
    (PeerNoSpaceError, exit 6), old files stay, staging is removed, and the
    sessions end (the pump returns: nothing loops)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 6, files=12)
    mix.write(src / "big", 7, 3_000_000, "mixed")
    dst.mkdir()
    (dst / "keep.txt").write_text("old\n")
    before = snapshot(dst)
    _full_disk(monkeypatch, after=3)
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(6)), max_time=60)
    receiver, sender = (server, client) if push else (client, server)
    assert isinstance(receiver.error, NoSpaceError) and receiver.error.exit_code == 6
    assert isinstance(sender.error, PeerNoSpaceError) and sender.error.exit_code == 6
    assert "not enough space" in str(sender.error)
    after, source = snapshot(dst), snapshot(src)
    # nothing lost: each path as it was (keep.txt), or as in the source (directories, symlinks and
    # specials made before the disk filled); no file half-written; no staging left
    assert all(after[p] == v for p, v in before.items() if p != ".")
    for p, v in after.items():
        if p not in before:
            assert p in source and (v[0], v[4]) == (source[p][0], source[p][4]), p
    assert not [n for n in os.listdir(dst) if n.startswith(".resync-tmp")]


def test_an_unexpected_error_in_a_session_ends_it_once_with_one_message(tmp_path, monkeypatch):
    """A bug inside the session (here a KeyError in the receiver) fails the
    session with an internal error (exit 1) and tells the peer; it never
    escapes into the transport's loop (where it was retried per packet)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 8, files=6)
    calls = {"n": 0}
    real = Receiver.shard

    def shard(self, sh, now):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("a bug")
        return real(self, sh, now)
    monkeypatch.setattr(Receiver, "shard", shard)
    client, server = make_pair(tmp_path, True, src, dst)
    pump(client, server, Channel(random.Random(7)), max_time=60)
    assert isinstance(server.error, InternalError) and "KeyError" in str(server.error)
    assert client.error is not None and server.finished and client.finished
    server.receive_datagram(b"\xd5" + bytes(40), 1.0)      # a failed session takes nothing more
    assert calls["n"] == 3


def test_a_full_history_disk_leaves_the_run_unrecorded_not_failed(tmp_path, monkeypatch):
    from resync.store.recorder import RunRecorder
    rec = RunRecorder(str(tmp_path / "h.duckdb"), "sync", "/src", "/dst")

    class Full:
        closed = False

        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.closed = True
    rec._manifest = Full()
    e = SimpleNamespace(kind="f", size=3, mtime_ns=1, perms=0o644)
    rec.entry("a", e, None)                     # no exception: recording stops
    rec.entry("b", e, None)
    assert "No space left" in rec.failed
    assert rec.finish("ok", None) == rec.failed


# -- locks of nested destinations ------------------------------------------------------------------

def test_pushes_into_nested_destinations_exclude_each_other(tmp_path):
    from resync.net.server import _Locks
    locks = _Locks()
    fds = {}
    for rel in ("x/sub/deeper", "xy"):
        (tmp_path / rel).mkdir(parents=True)
    for rel in ("x", "x/sub", "x/sub/deeper", "xy"):
        fds[rel] = os.open(tmp_path / rel, os.O_RDONLY | os.O_DIRECTORY)
    try:
        a = SimpleNamespace(client_id="A", finished=False, target="m/x/sub")
        b = SimpleNamespace(client_id="B", finished=False, target="m/x")
        assert locks.take(f"{tmp_path}/x/sub", fds["x/sub"], a)
        assert not locks.take(f"{tmp_path}/x", None, b)                      # above it (asked first)
        assert not locks.take(f"{tmp_path}/x", fds["x"], b)
        assert not locks.take(f"{tmp_path}/x/sub/deeper", fds["x/sub/deeper"], b)   # below it
        assert locks.take(f"{tmp_path}/xy", None, b)                          # a sibling whose name begins
        assert locks.take(f"{tmp_path}/xy", fds["xy"], b)                     # alike
        a.finished = True
        assert locks.take(f"{tmp_path}/x", fds["x"], SimpleNamespace(client_id="C", finished=False, target="m/x"))
    finally:
        for key in list(locks.held):
            locks.release(key)
        for fd in fds.values():
            os.close(fd)


# -- --delete next to excludes, over the protocol ----------------------------------------------------

@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_delete_keeps_excluded_files_in_directories_the_source_lacks(tmp_path, push):
    """rsync#812's kind, over the network: what the excludes protect stays
    with the directories holding it; the rest of those directories goes."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "k").write_text("k\n")
    for rel in ("b/build/old", "c/z.log", "cache/old", "stale.txt", "c/gone.txt", "d/e/f.txt"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text("OLD\n")
    server_root, local = (dst, src) if push else (src, dst)
    options = Options(delete=True, excludes=["build/", "*.log", "cache/"])
    client, server = make_pair(tmp_path, push, local, server_root, options=options)
    pump(client, server, Channel(random.Random(8)))
    assert client.error is None and server.error is None
    for kept in ("b/build/old", "c/z.log", "cache/old", "keep/k"):
        assert (dst / kept).is_file(), kept
    for gone in ("stale.txt", "c/gone.txt", "d"):
        assert not (dst / gone).exists(), gone


# -- the path MTU search ------------------------------------------------------------------------

def test_shard_sizes_fill_the_datagram_of_each_packet_size():
    assert shard_size_for(1350) == SHARD_SIZE == 1296
    assert shard_size_for(pmtu.BASE) == 1136
    for size in (1200, 1280, 1350, 1452, 8952):
        s = shard_size_for(size)
        assert s % 16 == 0 and s + 19 + 32 <= size < s + 19 + 32 + 16


def test_the_search_confirms_a_size_by_an_acknowledged_probe():
    m = pmtu.PathMTU((1350,))
    assert m.size == 1200 and not m.settled
    assert m.probe(0.0, rtt=0.05) == 1350
    assert m.probe(0.01, rtt=0.05) is None            # one probe at a time
    assert m.acked(1340) is False                     # (a packet short of the probe confirms nothing larger)
    assert m.acked(1350) is True and m.size == 1350 and m.settled
    assert m.probe(1000.0, rtt=0.05) is None           # nothing left to search


def test_a_black_hole_gives_up_after_max_probes_and_searches_again_later():
    m = pmtu.PathMTU((1350,))
    now = 0.0
    for _ in range(pmtu.MAX_PROBES):
        size = m.probe(now, rtt=0.05)
        assert size == 1350
        m.lost_probe(size, now + 0.1)
        now += 0.2
    assert m.settled and m.size == 1200
    assert m.probe(now + 1, rtt=0.05) is None
    assert m.probe(now + pmtu.RAISE_INTERVAL + 1, rtt=0.05) == 1350     # PMTU_RAISE_TIMER


def test_a_lossy_path_gets_more_probes_before_a_size_is_given_up():
    m = pmtu.PathMTU((1350,))
    now = 0.0
    for _ in range(pmtu.MAX_PROBES):
        m.lost_probe(m.probe(now, rtt=0.05, loss=0.33), now + 0.1)
        now += 0.2
    assert not m.settled                               # 3 lost of 3 at 33 % loss: 4 % of searches
    size = m.probe(now, rtt=0.05, loss=0.33)
    assert m.acked(size) and m.size == 1350


def test_a_probe_that_could_not_leave_is_asked_for_again():
    m = pmtu.PathMTU((1350, 1452))
    assert m.probe(0.0, rtt=0.05) == 1350
    m.unsent()
    assert m.probe(0.0, rtt=0.05) == 1350 and m.probes == 1
    assert m.acked(1350) and m.target == 1452
    assert m.probe(0.0, rtt=0.05) == 1452              # the next size at once
    with pytest.raises(ValueError):
        pmtu.PathMTU((1100,))


def test_a_lost_probe_is_neither_congestion_nor_random_loss():
    """RFC 9000 14.4: a lost probe says the size is too large, nothing of
    congestion; and it must not raise the loss the parity is sized for."""
    from resync.net.congestion import RateController
    cc = RateController(max_datagram_size=1200)
    small, probe = SimpleNamespace(sent_bytes=1200, packet_number=1), SimpleNamespace(sent_bytes=1350, packet_number=2)
    for p in (small, small, probe):
        cc.on_packet_sent(packet=p)
    cc.on_packets_lost(now=0.1, packets=[probe])
    cc.on_packet_acked(now=0.1, packet=small)
    assert cc.packets_lost == 0 and cc.probes == [(False, 1350)]
    assert cc.bytes_in_flight == 1200
    cc.set_datagram_size(1350)
    assert cc.probe_above == 1350 and cc.mds == 1350


def test_a_sender_cuts_no_large_file_before_the_path_is_settled(tmp_path):
    """While the path MTU search runs, small files' packs go (cut to the
    minimum's shards: few of them) and a large file waits, so that its
    shards are not all cut to the minimum's size."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src, 9, files=3)
    (src / "zz-big.bin").write_bytes(mix.data(9, 300_000, "mixed"))
    client, server = make_pair(tmp_path, True, src, dst)
    client.path_settled = False
    for _ in range(40):                         # handshake, listing and Wants go through; no File
        server.receive_stream(client.stream_to_send(), 0.0)
        client.receive_stream(server.stream_to_send(), 0.0)
    role = client.role
    assert role is not None and [w.name for w in role.wants] == [b"zz-big.bin"]
    assert role.stripes.active and all(fid >= F.PACK_BASE for fid in role.stripes.active)   # packs only
    client.shard_size = shard_size_for(1200)
    client.path_settled = True
    pump(client, server, Channel(random.Random(9)))
    assert client.error is None and server.error is None
    assert snapshot(dst) == snapshot(src)


# -- stateless reset ------------------------------------------------------------------------------

def test_reset_tokens_survive_a_restart_and_resets_are_small(tmp_path):
    """The tokens come from the device key (the same after a restart, not
    known to anyone else); a reset is smaller than the packet it answers,
    looks like a short header and ends in the token (RFC 9000 10.3)."""
    from resync.identity import load_identity
    from resync.net.reset import MAX_RESET, MIN_RESET, StatelessReset, is_reset
    key = load_identity(tmp_path / "a", create=True)
    again = load_identity(tmp_path / "a")
    other = load_identity(tmp_path / "b", create=True)
    cid = bytes(range(8))
    a, b = StatelessReset(key), StatelessReset(again)
    assert a.token(cid) == b.token(cid) != StatelessReset(other).token(cid) and len(a.token(cid)) == 16
    assert a.token(cid) != a.token(bytes(8))
    packet = bytes([0x41]) + cid + bytes(1200)
    reset = b.packet(packet)
    assert MIN_RESET <= len(reset) <= MAX_RESET < len(packet) and reset[0] & 0xC0 == 0x40
    assert is_reset(reset, {a.token(cid)}) and not is_reset(reset, {a.token(bytes(8))})
    assert b.packet(bytes([0x41]) + cid + bytes(10)) is None           # too small to answer smaller
    assert b.packet(bytes([0xC1]) + cid + bytes(1200)) is None         # a long header: not ours to reset
