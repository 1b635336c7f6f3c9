"""The TLS over TCP path (resync.net.tcp): which transport a run picks, a TCP
path that breaks mid-transfer falling back to QUIC and resuming, and the
server's refusals on the TCP door (a malformed record, a flood before the
client's proof, a client whose key is not pinned)."""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
import time
from pathlib import Path

import pytest

from . import mix
from .linkemu import Link, unavailable
from resync.protocol.sender import STREAM_HIGH

from .test_net import Server, Site, _same, _tree


@pytest.fixture
def sites(tmp_path):
    return Site(tmp_path, "client"), Site(tmp_path, "server")


def _json(r) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.splitlines()[-1])


def _source(root: Path, mib: int = 24) -> Path:
    src = root / "src"
    _tree(src, 31, files=30)
    mix.write(src / "large", 31, mib << 20, "mixed")
    return src


def test_tcp_is_picked_on_loopback_and_each_transport_can_be_asked_for(sites, tmp_path):
    """auto on loopback: TLS over TCP (no parity, no repairs, 64 KiB shards);
    --transport quic: QUIC; a server offering QUIC only (--no-tcp): auto
    falls back to QUIC at once, --transport tcp fails as a connection
    failure (exit 10) with one line."""
    client, server_site = sites
    src = _source(tmp_path, 8)
    module = tmp_path / "module"
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        common = ("--json", "--peer-id", server_site.id)
        r = _json(client.run("sync", src, server.url("m", "a"), *common))
        assert r["transport"] == "tcp" and r["repair_shards"] == 0 and r["parity"] == 0
        assert r["bytes_on_wire_sent"] > 8 << 20 and r["tcp_retransmits"] >= 0 and r["rtt_ms"] >= 0
        _same(src, module / "a")
        r = _json(client.run("sync", src, server.url("m", "b"), *common, "--transport", "quic"))
        assert r["transport"] == "quic" and r["udp_bytes_sent"] > 8 << 20
        _same(src, module / "b")
        r = _json(client.run("sync", server.url("m", "a"), tmp_path / "pulled", *common, "--transport", "tcp"))
        assert r["transport"] == "tcp"
        _same(src, tmp_path / "pulled")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-tcp") as server:
        assert "(QUIC)" in server.text()
        r = _json(client.run("sync", src, server.url("m", "c"), *common))
        assert r["transport"] == "quic" and r["attempts"] == 1
        _same(src, module / "c")
        r = client.run("sync", src, server.url("m", "d"), *common, "--transport", "tcp", "--retry-for", "0")
        assert r.returncode == 10 and "TCP" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = client.run("sync", "--transport", "tcp", src, tmp_path / "local")
    assert r.returncode == 2 and "resync://" in r.stderr


def test_a_tcp_path_cut_mid_transfer_falls_back_to_quic_and_resumes(sites, tmp_path):
    """The server aborts the TCP connection once 12 MB have arrived (a test
    hook): the client retries over QUIC, the receiver's checkpoint is
    offered, and the stripes kept from the 64 KiB-shard attempt carry over
    to QUIC's geometry: the second attempt sends what was missing, not the
    whole (at most the missing bytes plus 10 %)."""
    client, server_site = sites
    src = _source(tmp_path, 32)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    module = tmp_path / "module"
    module.mkdir()
    server_site.env["RESYNC_TEST_CUT_TCP"] = str(12 << 20)
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        r = _json(client.run("sync", src, server.url("m", "d"), "--json", "--peer-id", server_site.id))
        log = server.text()
    _same(src, module / "d")
    assert r["attempts"] == 2 and r["transport"] == "quic", r
    assert r["resumed_bytes"] > 4 << 20, r               # kept from the TCP attempt
    missing = total - r["resumed_bytes"]
    assert r["datagram_bytes_sent"] < 1.1 * missing + (1 << 20), (r["datagram_bytes_sent"], missing)
    assert "TLS over TCP" in log and "QUIC): push into m/d: ok" in log, log


def test_trust_refusals_over_tcp_come_before_any_metadata(sites, tmp_path):
    """--transport tcp: a server whose key is not pinned is left before a
    record is sent (exit 13, its ID shown; the server's log says why the
    client left); a client the module does not allow is refused (exit 13)
    with nothing made in the module."""
    client, server_site = sites
    src = _source(tmp_path, 1)
    module = tmp_path / "module"
    module.mkdir()
    stranger = Site(tmp_path, "stranger")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        r = client.run("sync", "--transport", "tcp", src, server.url("m", "x"))
        assert r.returncode == 13 and server_site.id in r.stderr and r.stderr.count("\n") == 1, r.stderr
        r = stranger.run("sync", "--transport", "tcp", src, server.url("m", "y"), "--peer-id", server_site.id)
        assert r.returncode == 13 and "not allowed" in r.stderr, r.stderr
        deadline = time.monotonic() + 10
        while "does not trust this server's key" not in server.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = server.text()
    assert os.listdir(module) == []
    assert "does not trust this server's key" in text and "push into" not in text, text


@pytest.mark.parametrize("what", ["bad record", "flood"])
def test_the_tcp_door_refuses_before_the_proof(sites, tmp_path, what):
    """A stranger on the TCP port: a record of an unknown kind ends its
    connection; records past the pre-proof allowance (1.5 MiB) end it too;
    the server goes on serving (a real push afterwards works)."""
    client, server_site = sites
    module = tmp_path / "module"
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        async def stranger() -> bool:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            reader, writer = await asyncio.open_connection(server.host, server.port, ssl=ctx,
                                                           server_hostname="resync")
            try:
                if what == "bad record":
                    writer.write(struct.pack("<BI", 9, 4) + b"oops")
                else:
                    chunk = struct.pack("<BI", 2, 65536 + 19) + bytes(65536 + 19)
                    for _ in range(40):                 # 2.6 MB of shard records, no Hello
                        writer.write(chunk)
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 10)
                return data == b""
            except (ConnectionError, ssl.SSLError):
                return True                             # (cut while it was still writing)
            finally:
                writer.close()
        assert asyncio.run(stranger()), "the server kept the connection"
        src = _source(tmp_path, 1)
        r = _json(client.run("sync", src, server.url("m", "d"), "--json", "--peer-id", server_site.id))
        assert r["transport"] == "tcp"
        _same(src, module / "d")
        time.sleep(0.3)
        text = server.text()
    why = "kind 9" if what == "bad record" else "before proving its key"
    assert why in text, text


WHY = unavailable()


@pytest.mark.slow
@pytest.mark.skipif(bool(WHY), reason=WHY or "")
@pytest.mark.parametrize("profile, want", [("veth", "tcp"), ("lossy", "quic"), ("clean", "quic")])
def test_auto_picks_tcp_on_a_lan_and_keeps_quic_on_long_or_lossy_paths(tmp_path, profile, want):
    """Two hosts (network namespaces): a plain veth pair (a LAN) gets TLS
    over TCP; the emulated 50 ms WAN, clean or losing 5 % of its packets,
    keeps QUIC with parity; the copy is exact either way."""
    with Link(profile) as link:
        client = Site(tmp_path, "client", link.cmd("a", []))
        server_site = Site(tmp_path, "server", link.cmd("b", []))
        module = tmp_path / "module"
        module.mkdir()
        src = tmp_path / "src"
        _tree(src, 41, files=20)
        mix.write(src / "large", 41, 2 << 20, "mixed")
        with Server(server_site, "--module", f"m={module}", "--allow", client.id, host=link.addr_b) as server:
            r = _json(client.run("sync", "--json", src, server.url("m", "d"), "--peer-id", server_site.id,
                                 timeout=300))
        assert r["transport"] == want, r
        _same(src, module / "d")
        if want == "quic" and profile == "lossy":
            assert r["parity"] > 0 or r["repair_shards"] > 0


def test_bwlimit_holds_over_tcp_both_ways(sites, tmp_path):
    """--bwlimit over the TLS stream: a push (the client's bucket) and a
    pull (the limit travels in Hello: the server's bucket) of 6 MB take
    about 6 MB / RATE — the 1 MiB shards are cut to a quarter second of the
    rate, and one may leave the bucket in debt, which holds the next back."""
    client, server_site = sites
    src = tmp_path / "src"
    src.mkdir()
    mix.write(src / "f", 3, 6 << 20, "random")
    module = tmp_path / "module"
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        common = ("--json", "--peer-id", server_site.id, "--no-history", "--transport", "tcp")
        r = _json(client.run("sync", src, server.url("m", "d"), "--bwlimit", "2M", *common))
        assert 2.5 <= r["duration"] <= 5.0, r["duration"]        # 6 MiB at 2 MiB/s: 3 s
        _same(src, module / "d")
        r = _json(client.run("sync", server.url("m", "d"), tmp_path / "back", "--bwlimit", "3M", *common))
        assert 1.6 <= r["duration"] <= 4.0, r["duration"]        # 2 s
        _same(src, tmp_path / "back")


def test_tcp_info_reads_the_kernels_counts():
    """tcp_info: the kernel's RTT and byte counts of a connected socket."""
    import socket

    from resync.net.tcp import tcp_info
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    c.sendall(b"x" * 100_000)
    got = 0
    while got < 100_000:
        got += len(peer.recv(1 << 20))
    time.sleep(0.05)
    info = tcp_info(c)
    assert info["tcp_bytes_sent"] >= 100_000 and info["rtt_ms"] >= 0 and info["tcp_retransmits"] == 0
    assert tcp_info(peer)["tcp_bytes_received"] >= 100_000
    for s in (c, peer, srv):
        s.close()


def test_a_listing_longer_than_the_stream_buffer_flows_without_the_receiver_asking(sites, tmp_path):
    """A no-change push of a tree whose listing is many times the sender's
    control buffer (nothing to ask for: the receiver sends nothing while it
    plans): the listing keeps flowing over TCP — the run ends in well under
    the 5 s keep-alive that once was the only thing to wake the sender."""
    client, server_site = sites
    import random
    rnd = random.Random(5)
    src = tmp_path / "src"
    for d in range(2000):
        sub = src / f"{d:04d}-{rnd.randbytes(12).hex()}"
        sub.mkdir(parents=True)
        for f in range(6):
            (sub / f"{rnd.randbytes(16).hex()}.txt").write_text(f"{d} {f}\n")
    module = tmp_path / "module"
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        args = ("sync", "--json", src, server.url("m", "d"), "--peer-id", server_site.id, "--no-history")
        _json(client.run(*args))
        t = time.monotonic()
        r = _json(client.run(*args))
        took = time.monotonic() - t
    assert r["transport"] == "tcp" and r["files_transferred"] == 0
    assert r["control_bytes_sent"] > 2 * STREAM_HIGH, r["control_bytes_sent"]
    assert took < 4.0, f"{took:.1f} s"


class _Recorder:
    """A session stand-in: keeps copies of what the link hands it."""

    def __init__(self, authenticated: bool):
        self.authenticated, self.finished, self.hello, self.rate_limit = authenticated, False, None, 0
        self.control, self.shards = bytearray(), []

    def receive_stream(self, data, now):
        self.control += data

    def receive_datagram(self, data, now):
        self.shards.append(bytes(data))

    def stream_to_send(self):
        return b""

    def datagrams_to_send(self, now, limit):
        return []

    def next_timer(self):
        return None


class _Transport:
    def __init__(self):
        self.written, self.aborted = bytearray(), False

    def writelines(self, parts):
        for p in parts:
            self.written += p

    def abort(self):
        self.aborted = True

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high, low):
        pass

    def get_extra_info(self, name, default=None):
        return default


def _records(rnd) -> tuple[bytes, bytes, list[bytes], bytes]:
    """A stream of records: control chunks, shards (64 B to 1 MiB), PINGs;
    and the PONGs that answer them."""
    from resync.net import tcp
    out, control, shards, pongs = bytearray(), bytearray(), [], bytearray()
    for _ in range(60):
        pick = rnd.random()
        if pick < 0.4:
            body = rnd.randbytes(rnd.choice([1, 7, 300, 70_000, 1 << 20]))
            control += body
            out += tcp.RECORD.pack(tcp.CONTROL, len(body)) + body
        elif pick < 0.9:
            body = bytes([0xD5]) + rnd.randbytes(rnd.choice([18, 200, 65_555, (1 << 20) + 18]))
            shards.append(body)
            out += tcp.RECORD.pack(tcp.SHARD, len(body)) + body
        else:
            body = rnd.randbytes(8)
            out += tcp.RECORD.pack(tcp.PING, 8) + body
            pongs += tcp.RECORD.pack(tcp.PONG, 8) + body
    return bytes(out), bytes(control), shards, bytes(pongs)


@pytest.mark.parametrize("seed", range(6))
def test_records_arrive_whole_whatever_the_reads_cut(seed):
    """The record layer (fuzz): a random stream of control chunks, shards of
    every size up to 1 MiB and PINGs, delivered in reads of random sizes
    (a byte to megabytes) into the link's buffer: the session gets the
    control bytes in order and every shard intact, each PING is answered;
    before the peer's proof the buffer grows only to fit the records that
    came (a stranger costs what it sends), after it to RECEIVE_BUFFER."""
    import random

    from resync.net import tcp
    rnd = random.Random(seed)
    stream, control, shards, pongs = _records(rnd)

    async def feed() -> tuple:
        link = tcp.StreamLink()
        link.session = _Recorder(authenticated=seed % 2 == 0)
        t = _Transport()
        link._transport = t
        pos, biggest = 0, 0
        while pos < len(stream):
            buf = link.get_buffer(-1)
            assert len(buf) >= tcp.MIN_READ or len(buf) >= len(stream) - pos, len(buf)
            n = min(len(buf), len(stream) - pos, rnd.choice([1, 5, 4096, 70_000, 1 << 20, 3 << 20]))
            buf[:n] = stream[pos:pos + n]
            pos += n
            link.buffer_updated(n)
            biggest = max(biggest, len(link._rbuf))
        return link, t, biggest
    link, t, biggest = asyncio.run(feed())
    assert bytes(link.session.control) == control and link.session.shards == shards
    assert bytes(t.written) == pongs
    if seed % 2 == 0:
        assert biggest == tcp.RECEIVE_BUFFER
    else:
        assert biggest <= 4 << 20, biggest              # (1 MiB records, a stranger's: never 8 MiB)


def test_record_layout_golden():
    """The TLS stream's record header as docs/protocol.md gives it: u8 kind,
    u32 length little-endian; the kinds' numbers and limits."""
    from resync.net import tcp
    assert tcp.RECORD.pack(tcp.CONTROL, 3) + b"abc" == bytes.fromhex("0103000000616263")
    assert tcp.RECORD.pack(tcp.SHARD, 1 << 20) == bytes.fromhex("0200001000")
    assert (tcp.CONTROL, tcp.SHARD, tcp.PING, tcp.PONG, tcp.CLOSE) == (1, 2, 3, 4, 5)
    assert tcp.LIMITS == {1: 1 << 20, 2: (1 << 20) + 19, 3: 8, 4: 8, 5: 1024}


def test_a_push_of_small_files_over_tcp_imports_neither_aioquic_nor_numpy(sites, tmp_path):
    """Start-up is most of a small run: a first copy of small files (and one
    of 100 KB) and their new mtimes pushed over TLS on TCP load no aioquic
    (QUIC is not used) and no NumPy (packs and whole files are cut as bytes;
    a same-content member needs no delta); a changed small file's delta does."""
    import subprocess
    import sys
    import random

    from .test_sync import make_tree
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    make_tree(src, random.Random(41), files=40)
    mix.write(src / "whole.bin", 41, 100_000, "text")
    module.mkdir()
    code = ("import sys\nfrom resync.cli import main\ncode = 0\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print(sorted(m for m in ('aioquic', 'numpy') if m in sys.modules), code, file=sys.stderr)\n")

    def push():
        r = subprocess.run([sys.executable, "-c", code, "sync", "--json", src, server.url("m", "x"), "--peer-id",
                            server_site.id], capture_output=True, text=True, env=client.env, timeout=120)
        return r.stderr.strip().splitlines()[-1], json.loads(r.stdout.splitlines()[-1])
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        assert push()[0] == "[] 0"
        _same(src, module / "x")
        touched = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 60_000]
        for p in touched:                           # new mtimes, the contents as they were
            os.utime(p, ns=(0, p.stat().st_mtime_ns + 10**9))
        seen, r = push()
        assert seen == "[] 0" and r["files_transferred"] == 0 and r["updated"] >= len(touched) >= 30
        _same(src, module / "x")
        small = next(p for p in sorted(src.rglob("*")) if p.is_file() and 100 < p.stat().st_size < 60_000)
        small.write_bytes(small.read_bytes() + b"one more line\n")
        seen, r = push()
        assert seen == "['numpy'] 0" and r["files_transferred"] == 1
        _same(src, module / "x")
