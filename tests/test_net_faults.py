"""Faults of the network side, end to end with real processes and real
kernels (the field cases ../shared/field-cases/case-net-0*.sh in test
form): a disk that fills at either end (tmpfs mounted by the test), a full
history disk, a path that drops packets over 1,280 bytes (two network
namespaces and a veth pair), connections from a device nobody allowed that
never prove their key, pushes into nested directories, and symlinks that
leave a module (also swapped in while pulls run). test_net_security.py
holds the in-process versions of most of these."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from aioquic.quic.packet import QuicErrorCode

from resync.fs import TEMP_PREFIX
from resync.identity import load_identity
from resync.net.link import configuration
from resync.net.server import MAX_UNPROVEN, MAX_UNPROVEN_PER_HOST, PROOF_DEADLINE

from . import mix
from .test_net import Server, Site, _json, _same, _slow_push, _tree
from .test_sync import make_tree
from .treeutil import snapshot, tmpfs

ROOT = os.geteuid() == 0


@pytest.fixture
def sites(tmp_path):
    return Site(tmp_path, "client"), Site(tmp_path, "server")


def _staged(root: Path) -> list[str]:
    """Entries the transfer left behind in ``root`` (staging, temporaries)."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def _mostly_incompressible(path: Path, seed: int, size: int) -> None:
    """``size`` bytes, about 80 % random, the rest text, repeated blocks and zeros, interleaved."""
    shares = (("random", 35), ("text", 5), ("random", 25), ("repeat", 8), ("zeros", 4), ("random", 20),
              ("text", 3))
    total = sum(s for _, s in shares)
    parts = [mix.data(seed + i, size * s // total, kind) for i, (kind, s) in enumerate(shares)]
    data = b"".join(parts)
    path.write_bytes(data + mix.data(seed + 99, size - len(data), "random"))


def _small_tree(root: Path, seed: int, files: int = 12) -> None:
    """A few small files of every kind, odd names, symlinks, an empty file."""
    make_tree(root, random.Random(seed), files=files)
    (root / "empty").write_bytes(b"")
    (root / "notes.txt").write_bytes(mix.data(seed, 3000, "text"))
    (root / mix.odd_name(random.Random(seed), 0)).write_bytes(mix.data(seed + 1, 700, "repeat"))


def _fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until its file system has at most ``leave`` bytes free
    (text, as a log that grew would: tmpfs keeps every page written)."""
    chunk = mix.data(5, 1 << 16, "text")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                return
            try:
                os.write(fd, chunk[:max(1, min(len(chunk), free - leave))])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
    finally:
        os.close(fd)


def _open_files(pid: int, wait_for: set | None = None, wait: float = 10.0) -> set[str]:
    """What process ``pid`` holds open (descriptor targets), once that is
    ``wait_for`` (or ``wait`` s have passed)."""
    deadline = time.monotonic() + wait
    while True:
        held = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held.add(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
            except FileNotFoundError:
                pass
        if wait_for is None or held == wait_for or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def _log_lines(server: Server, words: str, want: int = 1, wait: float = 10.0) -> list[str]:
    """The server's log lines holding ``words``, once there are ``want`` (or ``wait`` s have passed);
    a transfer's start line is left out (its end line says how it went)."""
    deadline = time.monotonic() + wait
    while True:
        lines = [line for line in server.text().splitlines() if words in line and ": started (transfer" not in line]
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


needs_root = pytest.mark.skipif(not ROOT, reason="mounts a tmpfs (root only)")


# -- a full disk ------------------------------------------------------------------------------

@needs_root
def test_a_pull_into_a_full_disk_ends_at_once_with_one_line(sites, tmp_path):
    """case-net-07: a 4 MB pull into a 5 MB tmpfs that is 90 % full ends with
    exit 6 and one line, promptly; the old file is kept, nothing is left
    staged, and the server goes on serving."""
    client, server_site = sites
    module = tmp_path / "module"
    src = module / "x"
    _small_tree(src, 1, files=6)
    _mostly_incompressible(src / "large.bin", 1, 4_000_000)
    with tmpfs(tmp_path / "small", "5m") as small, \
            Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        base = _open_files(server.proc.pid)
        (small / "keep.txt").write_bytes(b"old\n")
        keep = snapshot(small)["keep.txt"]
        (small / "filler").write_bytes(mix.data(2, 4_500_000, "text"))
        t = time.monotonic()
        r = client.run("sync", server.url("m", "x"), small, "--peer-id", server_site.id, "--timeout", "10",
                       "--retry-for", "0", "--no-history", timeout=60)
        took = time.monotonic() - t
        assert r.returncode == 6, r.stderr
        assert took < 15, took
        assert "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and "not enough space" in r.stderr, r.stderr
        assert snapshot(small)["keep.txt"] == keep
        assert not _staged(small), _staged(small)
        assert not (small / "large.bin").exists()
        lines = _log_lines(server, "pull from m/x")
        assert len(lines) == 1 and "from 127.0.0.1:" in lines[0] and "the peer ran out of space" in lines[0], lines
        assert _open_files(server.proc.pid, base) == base            # the sender let go of everything
        # the server keeps serving
        again = tmp_path / "again"
        r = client.run("sync", server.url("m", "x"), again, "--peer-id", server_site.id, "--retry-for", "0",
                       "--no-history")
        assert r.returncode == 0, r.stderr
        _same(src, again)
        assert server.proc.poll() is None


def _push_into_a_full_module(client: Site, server_site: Site, tmp_path: Path, then):
    """A push into m/x of a module on an 8 MB tmpfs with 1 MB free: exit 6,
    told by the peer, one line at each end, nothing staged left; then
    ``then(server, module, src, pin, base)`` with the filler deleted
    (``base``: what the server held open before the push)."""
    src = tmp_path / "src"
    _small_tree(src, 2)
    _mostly_incompressible(src / "large.bin", 2, 3_000_000)
    with tmpfs(tmp_path / "module", "8m") as module, \
            Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        _fill(module / "filler", leave=1_000_000)
        base = _open_files(server.proc.pid)
        pin = ("--peer-id", server_site.id, "--retry-for", "0", "--no-history")
        t = time.monotonic()
        r = client.run("sync", src, server.url("m", "x"), *pin, "--timeout", "10", timeout=60)
        assert r.returncode == 6, r.stderr
        assert time.monotonic() - t < 15
        assert r.stderr.count("\n") == 1 and "the peer ran out of space" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        lines = _log_lines(server, "push into m/x")
        assert len(lines) == 1 and "from 127.0.0.1:" in lines[0], server.text()
        assert "not enough space" in lines[0], lines
        assert "Traceback" not in server.text()
        assert not _staged(module), _staged(module)
        assert server.proc.poll() is None
        (module / "filler").unlink()
        then(server, module, src, pin, base)


@needs_root
def test_a_push_into_a_full_module_is_exit_6_at_the_client(sites, tmp_path):
    """The server's disk fills mid-push: the client is told (exit 6, "the
    peer ran out of space", one line), the server logs one line naming the
    client's address, removes its staging and goes on serving (a pull)."""
    client, server_site = sites

    def then(server, module, src, pin, base):
        (module / "y").mkdir()
        (module / "y" / "notes.txt").write_bytes(mix.data(4, 5000, "text"))
        r = client.run("sync", server.url("m", "y"), tmp_path / "back", *pin)
        assert r.returncode == 0, r.stderr
        _same(module / "y", tmp_path / "back")
    _push_into_a_full_module(client, server_site, tmp_path, then)


@needs_root
def test_after_a_full_module_the_next_push_succeeds_and_nothing_stays_open(sites, tmp_path):
    """With room again (the filler deleted), the same push completes
    identical, nothing is left staged, and the server holds nothing of the
    module open."""
    client, server_site = sites

    def then(server, module, src, pin, base):
        r = client.run("sync", src, server.url("m", "x"), *pin)
        assert r.returncode == 0, r.stderr
        _same(src, module / "x")
        assert not _staged(module)
        assert len(_log_lines(server, "push into m/x", want=2)) == 2, server.text()
        assert _open_files(server.proc.pid, base, wait=3) == base    # no descriptor of m/x kept
    _push_into_a_full_module(client, server_site, tmp_path, then)


@needs_root
def test_a_full_history_disk_leaves_the_push_unrecorded_not_failed(sites, tmp_path):
    """serve --history on a 1 MB tmpfs that is full: the push succeeds and
    arrives identical; the server's log says it was not recorded."""
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _small_tree(src, 3)
    _mostly_incompressible(src / "large.bin", 3, 500_000)
    module.mkdir()
    with tmpfs(tmp_path / "hist", "1m") as hist:
        _fill(hist / "filler")
        assert os.statvfs(hist).f_bavail == 0
        with Server(server_site, "--module", f"m={module}", "--allow", client.id,
                    "--history", hist / "h.duckdb") as server:
            r = client.run("sync", src, server.url("m", "x"), "--peer-id", server_site.id, "--retry-for", "0",
                           "--no-history")
            assert r.returncode == 0, r.stderr
            _same(src, module / "x")
            lines = _log_lines(server, "not recorded in the history")
            assert len(lines) == 1 and "push into" in lines[0], server.text()
            assert _log_lines(server, "push into m/x: ok"), server.text()       # the run itself: ok
            assert "Traceback" not in server.text()
            assert server.proc.poll() is None


# -- a path MTU black hole ---------------------------------------------------------------------

def _netns_unavailable() -> str:
    if not ROOT:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    name = f"rnfprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces are not available: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return ""


class _Pair:
    """Namespaces C (.1) and S (.2) joined by a veth pair, no ICMP in
    between: a link whose MTU is lowered at one end drops bigger packets
    arriving there without a word (case-net-01)."""

    def __init__(self, tag: str):
        n = os.getpid() % 100000
        self.c, self.s = f"rnf{n}{tag}c", f"rnf{n}{tag}s"
        self.net = f"10.{180 + os.getpid() % 40}.{n % 250}"
        self.made: list[str] = []
        self.addr_c, self.addr_s = f"{self.net}.1", f"{self.net}.2"

    def ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
        assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"

    def make(self) -> _Pair:
        for ns in (self.c, self.s):
            self.ip("netns", "add", ns)
            self.made.append(ns)
        self.ip("link", "add", f"{self.c}v", "type", "veth", "peer", "name", f"{self.s}v")
        for ns, addr in ((self.c, self.addr_c), (self.s, self.addr_s)):
            self.ip("link", "set", f"{ns}v", "netns", ns)
            self.ip("-n", ns, "addr", "add", f"{addr}/24", "dev", f"{ns}v")
            self.ip("-n", ns, "link", "set", "lo", "up")
            self.ip("-n", ns, "link", "set", f"{ns}v", "up")
        return self

    def mtu(self, ns: str, mtu: int) -> None:
        self.ip("-n", ns, "link", "set", f"{ns}v", "mtu", str(mtu))

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)  # (the veth pair goes too)


@pytest.fixture
def pair(tmp_path):
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    p = _Pair("a")
    try:
        yield p.make()
    finally:
        p.close()


def _netns_sites(tmp_path: Path, pair: _Pair) -> tuple[Site, Site]:
    return (Site(tmp_path, "client", prefix=["ip", "netns", "exec", pair.c]),
            Site(tmp_path, "server", prefix=["ip", "netns", "exec", pair.s]))


def _300k_tree(root: Path, seed: int) -> None:
    _small_tree(root, seed, files=16)
    _mostly_incompressible(root / "blob.bin", seed, 250_000)


def _per_datagram(r: dict) -> float:
    """Content bytes per datagram a receiver got: the sender's packet size, less the framing."""
    assert r["datagrams_received"] > 100, r
    return r["datagram_bytes_received"] / r["datagrams_received"]


def test_a_1280_byte_path_carries_a_push_and_a_pull_in_1200_byte_packets(pair, tmp_path):
    """case-net-01: packets over 1,280 bytes vanish on the way in (a veth end
    with MTU 1280, no ICMP). A push and a pull both complete identical: the
    sender's packets stay at QUIC's 1,200 bytes (its probe of 1,350 is lost);
    where the path carries 1,350 the same transfers use it."""
    client, server_site = _netns_sites(tmp_path, pair)
    src, module = tmp_path / "src", tmp_path / "module"
    _300k_tree(src, 11)
    _300k_tree(module / "y", 12)
    pair.mtu(pair.s, 1280)                          # client -> server black-holed over 1280
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history",
                host=pair.addr_s) as server:
        pin = ("--peer-id", server_site.id, "--timeout", "8", "--retry-for", "0", "--no-history", "--json",
               "--transport", "quic")      # (QUIC's own path MTU search; TCP has the MSS: tests/test_net_tcp.py)
        r = _json(client.run("sync", src, server.url("m", "x"), *pin, timeout=60))
        _same(src, module / "x")
        assert r["path_mtu"] == 1200 and r["pmtu_probes"] >= 1, r
        pair.mtu(pair.s, 1500)
        pair.mtu(pair.c, 1280)                      # server -> client black-holed
        r = _json(client.run("sync", server.url("m", "y"), tmp_path / "back", *pin, timeout=60))
        _same(module / "y", tmp_path / "back")
        assert _per_datagram(r) <= 1200, r          # the server sent no packet the path could not carry
        pair.mtu(pair.c, 1500)                      # the same pull where 1,350 passes: bigger packets
        r = _json(client.run("sync", server.url("m", "y"), tmp_path / "back2", *pin, timeout=60))
        _same(module / "y", tmp_path / "back2")
        assert _per_datagram(r) > 1200, r


def test_a_1500_byte_path_grows_packets_to_1350(pair, tmp_path):
    client, server_site = _netns_sites(tmp_path, pair)
    src, module = tmp_path / "src", tmp_path / "module"
    _300k_tree(src, 13)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history",
                host=pair.addr_s) as server:
        r = _json(client.run("sync", "--json", src, server.url("m", "x"), "--peer-id", server_site.id,
                             "--timeout", "8", "--retry-for", "0", "--no-history", "--transport", "quic",
                             timeout=60))
    _same(src, module / "x")
    assert r["path_mtu"] == 1350 and r["pmtu_probes"] >= 1, r


# -- connections that never prove their key ------------------------------------------------------

class _Probe(QuicConnectionProtocol):
    """A QUIC connection that notes when its handshake completed and when
    (and with which error code) the connection ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connected_at: float | None = None
        self.closed_at: float | None = None
        self.error_code: int | None = None
        self.sent_at: float | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, HandshakeCompleted):
            self.connected_at = time.monotonic()
        elif isinstance(event, ConnectionTerminated) and self.closed_at is None:
            self.closed_at, self.error_code = time.monotonic(), event.error_code


async def _stranger(port: int, identity, claim: int | None = None, stuff: int = 0, hold: float = 0.0,
                    opened: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> _Probe:
    """One connection to 127.0.0.1:``port`` with ``identity``: the TLS
    handshake, then (``claim``) the start of a Hello frame whose header
    claims ``claim`` bytes followed by up to ``stuff`` zero bytes of it,
    then PINGs every 0.5 s for ``hold`` s, until ``stop`` is set or the
    server closes it. ``opened`` is set once the handshake is over (or failed)."""
    config = configuration(identity, is_client=True, idle_timeout=120)
    started = time.monotonic()
    async with connect("127.0.0.1", port, configuration=config, create_protocol=_Probe,
                       wait_connected=False) as c:
        c.started_at = started
        c.transmit()                                # (connect() left the ClientHello unsent)
        try:
            await asyncio.wait_for(c.wait_connected(), 10)
        except (ConnectionError, asyncio.TimeoutError):
            return c
        finally:
            if opened is not None:
                opened.set()
        if claim is not None:
            sid = c._quic.get_next_available_stream_id()
            c._quic.send_stream_data(sid, struct.pack("<IB", claim, 0x01))
            c.transmit()
            c.sent_at = time.monotonic()
            sent = 0
            while sent < stuff and c.closed_at is None:
                c._quic.send_stream_data(sid, bytes(64 << 10))
                c.transmit()
                sent += 64 << 10
                await asyncio.sleep(0.005)
        end = time.monotonic() + hold
        uid = 0
        while c.closed_at is None and time.monotonic() < end and not (stop is not None and stop.is_set()):
            uid += 1
            c._quic.send_ping(uid)
            c.transmit()
            await asyncio.sleep(0.5)
    return c


async def _idle_strangers(port: int, identity, count: int, stop: asyncio.Event) -> list[asyncio.Task]:
    """``count`` strangers that only PING, opened one after the other (each
    once the last one's handshake is over): the ones past a cap are the last."""
    tasks = []
    for _ in range(count):
        opened = asyncio.Event()
        tasks.append(asyncio.ensure_future(_stranger(port, identity, hold=PROOF_DEADLINE + 10, opened=opened,
                                                     stop=stop)))
        await asyncio.wait_for(opened.wait(), 15)
    return tasks


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def _peak_rss(pid: int, until: asyncio.Future) -> int:
    peak = _rss_kib(pid)
    while not until.done():
        peak = max(peak, _rss_kib(pid))
        await asyncio.sleep(0.05)
    return max(peak, _rss_kib(pid))


@pytest.fixture
def served(sites, tmp_path):
    """A server whose module holds m/x (a small mixed tree), the allowed
    client, and an identity in no allow list."""
    client, server_site = sites
    module = tmp_path / "module"
    _small_tree(module / "x", 21)
    stranger = load_identity(tmp_path / "stranger", create=True)
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        yield client, server_site, server, module, stranger


def _pull_ok(client: Site, server_site: Site, server: Server, module: Path, dst: Path, *extra) -> None:
    r = client.run("sync", server.url("m", "x"), dst, "--peer-id", server_site.id, "--no-history", *extra)
    assert r.returncode == 0, r.stderr
    _same(module / "x", dst)


def test_a_hello_claiming_16_mib_is_refused_at_once_and_costs_no_memory(served, tmp_path):
    """case-net-06: 24 connections from a stranger each start a Hello whose
    header claims 16 MiB and go on sending it: each is closed by the server
    within 2 s of the header, the server grows by less than 30 MB, logs it
    in a line or two, and serves an allowed client afterwards."""
    client, server_site, server, module, stranger = served
    _pull_ok(client, server_site, server, module, tmp_path / "warm")     # the server's code paths loaded
    pid = server.proc.pid
    base = _rss_kib(pid)

    async def run():
        attack = asyncio.ensure_future(asyncio.gather(
            *(_stranger(server.port, stranger, claim=(16 << 20) - 1, stuff=4 << 20, hold=4.0) for _ in range(24))))
        peak = await _peak_rss(pid, attack)
        return await attack, peak
    t = time.monotonic()
    conns, peak = asyncio.run(run())
    assert time.monotonic() - t < 30
    assert all(c.connected_at is not None for c in conns), "the TLS handshake completes for anyone"
    late = [round(c.closed_at - c.sent_at, 2) if c.closed_at else None for c in conns
            if c.closed_at is None or c.closed_at - c.sent_at > 2.0]
    assert not late, late
    # one log line for the lot (refused for the frame's length, or let go as the oldest of 8 from one
    # address): a flood does not flood the log
    refused = _log_lines(server, "ended without the client's proof")
    assert 1 <= len(refused) <= 2 and all("from 127.0.0.1:" in line for line in refused), server.text()
    assert (peak - base) < 30 * 1024, f"grew {(peak - base) / 1024:.1f} MB"
    assert server.proc.poll() is None and "Traceback" not in server.text()
    _pull_ok(client, server_site, server, module, tmp_path / "after")


@pytest.mark.slow
def test_strangers_are_let_go_oldest_first_and_the_rest_cut_at_the_proof_deadline(served, tmp_path):
    """40 strangers from one address complete the TLS handshake, one after
    the other, and then send nothing but PINGs (which keep QUIC's idle
    timeout away): past MAX_UNPROVEN_PER_HOST the one waiting longest is let
    go as each newcomer arrives (never the newcomer: an honest client proves
    its key in a few round trips, so idle strangers are the oldest), with
    CONNECTION_REFUSED; the last ones are cut PROOF_DEADLINE after they
    came (not before); the log has a line per REFUSAL_LOG_INTERVAL at most;
    then an allowed client gets in at once."""
    client, server_site, server, module, stranger = served
    from resync.net.server import MAX_UNPROVEN_PER_HOST, REFUSAL_LOG_INTERVAL
    keep = MAX_UNPROVEN_PER_HOST

    async def run():
        stop = asyncio.Event()
        tasks = await _idle_strangers(server.port, stranger, 40, stop)
        await asyncio.sleep(2.0)
        open_after_2s = sum(1 for t in tasks if not t.done())
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), PROOF_DEADLINE + 8), open_after_2s
        finally:
            stop.set()
    conns, open_after_2s = asyncio.run(run())
    assert open_after_2s == keep
    let_go, last = conns[:-keep], conns[-keep:]
    assert all(c.closed_at is not None and c.closed_at < last[0].started_at + 2.0 for c in let_go)
    assert {c.error_code for c in conns} == {QuicErrorCode.CONNECTION_REFUSED}
    lasted = [round(c.closed_at - c.connected_at, 2) if c.closed_at else None for c in last]
    assert all(x is not None and PROOF_DEADLINE - 1 <= x <= PROOF_DEADLINE + 3 for x in lasted), lasted
    lines = _log_lines(server, "ended without the client's proof")
    assert 1 <= len(lines) <= 2 + (PROOF_DEADLINE + 10) / REFUSAL_LOG_INTERVAL, server.text()
    _pull_ok(client, server_site, server, module, tmp_path / "after", "--retry-for", "0")
    assert server.proc.poll() is None and "Traceback" not in server.text()


def test_an_allowed_client_gets_in_while_strangers_hold_the_unproven_slots(served, tmp_path):
    """While 32 idle strangers from 127.0.0.1 wait without a proof, an
    allowed client's pull (no retry) succeeds."""
    client, server_site, server, module, stranger = served

    async def run():
        stop = asyncio.Event()
        tasks = await _idle_strangers(server.port, stranger, MAX_UNPROVEN + 8, stop)
        try:
            for _ in range(100):                # the oldest let go (within a second, or a few on a busy machine)
                await asyncio.sleep(0.1)
                if sum(1 for t in tasks if not t.done()) == MAX_UNPROVEN_PER_HOST:
                    break
            assert sum(1 for t in tasks if not t.done()) == MAX_UNPROVEN_PER_HOST
            return await asyncio.get_running_loop().run_in_executor(None, lambda: client.run(
                "sync", server.url("m", "x"), tmp_path / "got", "--peer-id", server_site.id, "--no-history",
                "--retry-for", "0", timeout=60))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    r = asyncio.run(run())
    assert r.returncode == 0, r.stderr
    _same(module / "x", tmp_path / "got")


# -- pushes into nested directories ----------------------------------------------------------------

def _without(root: Path, top: str) -> dict:
    """snapshot(root) without ``top`` and what is below it, nor the root's own entry."""
    return {k: v for k, v in snapshot(root, root_meta=False).items() if k != top and not k.startswith(top + "/")}


def test_pushes_into_nested_directories_exclude_each_other(sites, tmp_path):
    """While a slow push writes m/x/sub, another device's push --delete into
    m/x (which would delete sub with its staging) is refused as busy; while
    one writes m/y, a push into m/y/sub/deeper is refused likewise. The slow
    pushes complete identical, and the refused ones go through afterwards."""
    client, server_site = sites
    second = Site(tmp_path, "second")
    module = tmp_path / "module"
    slow_src, other_src, slow2_src = tmp_path / "slow", tmp_path / "other", tmp_path / "slow2"
    _tree(slow_src, 31, files=10)
    _small_tree(other_src, 32)
    _tree(slow2_src, 33, files=10)
    _small_tree(module / "x", 34)                  # what m/x holds before: its own files beside sub
    before = _without(module / "x", "sub")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--allow", second.id,
                "--no-history") as server:
        pin = ("--peer-id", server_site.id, "--retry-for", "0", "--no-history")
        slow = _slow_push(client, server, server_site.id, slow_src, module, "x/sub")
        try:
            r = second.run("sync", "--delete", other_src, server.url("m", "x"), *pin)
            assert slow.poll() is None             # refused while the slow push ran
            assert r.returncode == 13 and "another transfer into m/x is running" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1
            _, err = slow.communicate(timeout=120)
        finally:
            slow.kill()
            slow.wait()
        assert slow.returncode == 0, err
        _same(slow_src, module / "x" / "sub")
        assert _without(module / "x", "sub") == before     # nothing of m/x deleted or replaced
        # the other way round: the outer directory busy, a push below it refused
        slow = _slow_push(client, server, server_site.id, slow2_src, module, "y")
        try:
            r = second.run("sync", other_src, server.url("m", "y/sub/deeper"), *pin)
            assert slow.poll() is None
            assert r.returncode == 13 and "another transfer into m/y/sub/deeper is running" in r.stderr, r.stderr
            _, err = slow.communicate(timeout=120)
        finally:
            slow.kill()
            slow.wait()
        assert slow.returncode == 0, err
        assert _without(module / "y", "sub") == _without(slow2_src, "sub")
        assert not [p for p in (module / "y").rglob("*") if p.is_file() and "sub" in p.parts]
        # once both are over, the refused pushes go through
        r = second.run("sync", "--delete", other_src, server.url("m", "x"), *pin)
        assert r.returncode == 0, r.stderr
        _same(other_src, module / "x")
        r = second.run("sync", other_src, server.url("m", "y/sub/deeper"), *pin)
        assert r.returncode == 0, r.stderr
        _same(other_src, module / "y" / "sub" / "deeper")
        assert not _staged(module)


def test_a_push_refused_as_busy_makes_nothing(sites, tmp_path):
    client, server_site = sites
    second = Site(tmp_path, "second")
    module, slow_src, other_src = tmp_path / "module", tmp_path / "slow", tmp_path / "other"
    _tree(slow_src, 35, files=4)
    _small_tree(other_src, 36)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--allow", second.id,
                "--no-history") as server:
        slow = _slow_push(client, server, server_site.id, slow_src, module, "y")
        try:
            r = second.run("sync", other_src, server.url("m", "y/sub/deeper"), "--peer-id", server_site.id,
                           "--retry-for", "0", "--no-history")
            assert r.returncode == 13 and "is running" in r.stderr, r.stderr
            assert not (module / "y" / "sub").exists()
        finally:
            slow.kill()
            slow.wait()


# -- symlinks that leave the module -------------------------------------------------------------

MARKER = "SECRET-outside-the-module"


def _outside(root: Path, names) -> None:
    """A directory outside the module whose files all hold MARKER."""
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        (root / name).write_text(f"{MARKER} {i}\n" + mix.data(i, 200, "text").decode())


def test_paths_through_symlinks_out_of_the_module_are_refused(sites, tmp_path):
    """case-net-02: a module holding up/root -> / and up/out -> a directory
    outside it. Pulls through either are refused (exit 13, nothing made), a
    push through up/out writes nothing outside; a pull of up itself brings
    the symlinks as symlinks."""
    client, server_site = sites
    module, outside = tmp_path / "module", tmp_path / "outside"
    _outside(outside, ["secret.txt", "notes.txt"])
    outside_before = snapshot(outside)
    _small_tree(module / "up", 41)
    os.symlink("/", module / "up" / "root")
    os.symlink(outside, module / "up" / "out")
    src = tmp_path / "src"
    _small_tree(src, 42)
    (src / "planted.txt").write_text("planted\n")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        pin = ("--peer-id", server_site.id, "--retry-for", "0", "--no-history")
        for path, dst in (("up/root/etc", "got-etc"), ("up/out", "got-out"), ("up/root", "got-root")):
            r = client.run("sync", server.url("m", path), tmp_path / dst, *pin)
            assert r.returncode == 13 and "leaves the module" in r.stderr, (path, r.stderr)
            assert r.stderr.count("\n") == 1
            assert not (tmp_path / dst).exists(), path
        for path in ("up/out", "up/out/sub"):
            r = client.run("sync", src, server.url("m", path), *pin)
            assert r.returncode == 13 and "leaves the module" in r.stderr, (path, r.stderr)
        assert snapshot(outside) == outside_before
        r = client.run("sync", server.url("m", "up"), tmp_path / "got-up", *pin)
        assert r.returncode == 0, r.stderr
        _same(module / "up", tmp_path / "got-up")
        assert os.readlink(tmp_path / "got-up" / "root") == "/"
        assert os.readlink(tmp_path / "got-up" / "out") == str(outside)
        assert not [p for p in (tmp_path / "got-up").rglob("*") if p.name in ("secret.txt", "passwd")]
    assert snapshot(outside) == outside_before


def test_a_directory_swapped_for_a_symlink_during_pulls_never_leaks(sites, tmp_path):
    """case-net-03: while pulls of the module run, a thread swaps m/d and a
    symlink to a directory outside (renameat2 RENAME_EXCHANGE) every 0.5 ms:
    no pulled file holds anything from outside. A pull ends 0, 23 (d's
    files, or d itself, could not be read) or 24 (a lookup racing with the
    exchange found no d: it vanished for that instant)."""
    import ctypes
    import threading
    client, server_site = sites
    module, outside = tmp_path / "module", tmp_path / "outside"
    names = [f"f{i}" for i in range(200)]
    _outside(outside, names)
    (module / "d").mkdir(parents=True)
    for i, name in enumerate(names):               # the same names inside, public content of every kind
        mix.write(module / "d" / name, 500 + i, random.Random(i).choice([0, 90, 3000]),
                  random.Random(i).choice(["text", "zeros", "repeat", "random", "empty"]))
    _small_tree(module / "e", 43)
    alt = module / (TEMP_PREFIX + "alt")            # a name resync never lists
    os.symlink(outside, alt)
    libc = ctypes.CDLL(None, use_errno=True)
    a, b = os.fsencode(module / "d"), os.fsencode(alt)
    stop, swaps, failures = threading.Event(), [0], []

    def swap():
        while not stop.is_set():
            if libc.renameat2(-100, a, -100, b, 2) != 0:        # AT_FDCWD, RENAME_EXCHANGE
                failures.append(os.strerror(ctypes.get_errno()))
                return
            swaps[0] += 1
            time.sleep(0.0005)
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history") as server:
        t = threading.Thread(target=swap, daemon=True)
        t.start()
        results = []
        try:
            deadline = time.monotonic() + 30
            for i in range(24):                 # (until one of them has read d's own files, 3 at least)
                if time.monotonic() > deadline:
                    break
                r = client.run("sync", server.url("m"), tmp_path / f"p{i}", "--peer-id", server_site.id,
                               "--retry-for", "0", "--no-history", timeout=60)
                results.append((r.returncode, r.stderr))
                got = tmp_path / f"p{i}" / "d"
                if i >= 2 and got.is_dir() and not got.is_symlink() and any(x.is_file() for x in got.iterdir()):
                    break
        finally:
            stop.set()
            t.join(5)
        if os.path.islink(module / "d"):           # put it back as it was
            libc.renameat2(-100, a, -100, b, 2)
        assert server.proc.poll() is None and "Traceback" not in server.text()
    assert not failures and swaps[0] > 100, (failures, swaps)
    assert len(results) >= 3, results
    assert all(rc in (0, 23, 24) and "Traceback" not in err for rc, err in results), results
    leaked, public = [], 0
    for i in range(len(results)):
        for dirpath, _, files in os.walk(tmp_path / f"p{i}"):
            for name in files:
                p = Path(dirpath) / name
                if p.is_symlink() or not p.is_file():
                    continue
                data = p.read_bytes()
                if MARKER.encode() in data:
                    leaked.append(str(p.relative_to(tmp_path)))
                elif Path(dirpath).name == "d":
                    public += 1
    assert not leaked, leaked
    assert public > 0                               # the pulls did reach d's own files
