"""resync's network sync through an emulated WAN (tests/linkemu: two network
namespaces, 100 Mbit/s, 50 ms RTT): what a bad link does — loss with
reordering and duplication, an outage longer than the idle timeout, restarts
of either end, bits flipped on the wire and above the transport — and each
time the destination ends equal to the source. Also the rate controller's
figures that a test can hold: the link rate at 20 % loss, completion at
33 %, recovery after an outage (bench/bench_wan.py measures the rest)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from . import mix
from .linkemu import Link, unavailable
from .test_net import Server, Site, _same, _tree

WHY = unavailable()
pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or ""), pytest.mark.slow]

FRAME = 42                      # Ethernet + IPv4 + UDP header bytes the link counts per datagram


class Wan:
    """A link, a client site in namespace A and a server site in B."""

    def __init__(self, root: Path, link: Link):
        self.root, self.link = root, link
        self.client = Site(root, "client", link.cmd("a", []))
        self.client.sync_args = ("--transport", "quic")    # (QUIC's behaviour under loss is what these test;
        #                                                    auto's choice: tests/test_net_tcp.py)
        self.server_site = Site(root, "server", link.cmd("b", []))
        self.module = root / "module"
        self.module.mkdir(exist_ok=True)
        self.server: Server | None = None
        self.port = 0

    def serve(self, *args) -> Server:
        self.server = Server(self.server_site, "--module", f"m={self.module}", "--allow", self.client.id, *args,
                             host=self.link.addr_b, port=self.port)
        self.port = self.server.port
        return self.server

    def url(self, path: str = "d") -> str:
        return self.server.url("m", path)

    def push(self, src: Path, *args, timeout=600) -> dict:
        r = self.client.run("sync", "--json", *args, src, self.url(), "--peer-id", self.server_site.id,
                            timeout=timeout)
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout.splitlines()[-1])

    def close(self) -> None:
        if self.server is not None:
            self.server.__exit__()


@pytest.fixture
def wan(tmp_path):
    with Link("clean") as link:
        link.seed(11)
        w = Wan(tmp_path, link)
        try:
            yield w
        finally:
            w.close()


def _big(path: Path, mib: int, seed: int) -> None:
    mix.write(path, seed, mib << 20, "mixed")


def _sent(before: dict, after: dict) -> int:
    """UDP payload bytes the client sent through the link between two stats."""
    a, b = before["ab"], after["ab"]
    return (b["received_bytes"] - a["received_bytes"]) - FRAME * (b["received"] - a["received"])


def test_loss_with_reordering_and_duplication_leaves_both_directions_identical(wan):
    """2 % loss with reordering and duplication both ways: both directions
    identical; the push counts the shards it lost."""
    wan.link.set("both", loss=0.02, reorder=0.02, reorder_gap=0.01, dup=0.02)
    src = wan.root / "src"
    _tree(src, 21, files=60)
    _big(src / "large", 8, 21)
    wan.serve()
    result = wan.push(src)
    _same(src, wan.module / "d")
    # the shards in packets QUIC declared lost: counted, and at most the packets lost
    assert 0 < result["shards_lost"] <= result["packets_lost"], result
    back = wan.root / "back"
    r = wan.client.run("sync", wan.url(), back, "--peer-id", wan.server_site.id)
    assert r.returncode == 0, r.stderr
    _same(src, back)
    stats = wan.link.stats()
    assert stats["ab"]["reordered"] and stats["ab"]["duplicated"] and stats["ba"]["lost_random"]


def test_an_outage_longer_than_the_idle_timeout_is_retried_and_resumed(wan):
    """12 s of nothing mid-transfer, with --timeout 5 (QUIC's idle timeout
    10 s): the client gives up on the connection, retries with backoff while
    the link is down, and the next connection resumes — the destination is
    identical and what the last connection sent is at most 1.1x what was
    still missing."""
    wan.link.set("both", rate=20e6)                 # 24 MiB: about 10 s
    src = wan.root / "src"
    src.mkdir()
    _big(src / "large", 24, 22)
    size = (src / "large").stat().st_size
    wan.serve()

    def outage():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:          # once about a third has crossed
            if wan.link.stats()["ab"]["sent_bytes"] > size // 3:
                wan.link.blackout(12.0)
                return
            time.sleep(0.05)
    t = threading.Thread(target=outage)
    t.start()
    r = wan.client.run("sync", "--json", "--timeout", "5", "--retry-for", "120", src, wan.url(),
                       "--peer-id", wan.server_site.id, timeout=300)
    t.join()
    assert r.returncode == 0, r.stderr
    assert "retrying" in r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    _same(src, wan.module / "d")
    missing = size - result["resumed_bytes"]
    assert result["resumed_bytes"] > size // 4
    assert result["datagram_bytes_sent"] <= 1.1 * missing * 1315 / 1296 + 200_000   # shards and their headers


def test_restarts_of_the_server_then_the_client_at_every_tenth_complete_it(wan):
    """The server stopped and started again (SIGTERM: transfers are
    checkpointed), then the client killed and run again, alternately at every
    10 % of progress: the push completes, identical, and the client sent at
    most 1.3x the data in all."""
    wan.link.set("both", rate=40e6)
    src = wan.root / "src"
    src.mkdir()
    _big(src / "large", 48, 23)
    (src / "small.txt").write_text("a small file\n" * 50)
    size = (src / "large").stat().st_size
    wan.serve()
    start = wan.link.stats()
    args = ("sync", "--json", "--retry-for", "120", src, None, "--peer-id", wan.server_site.id)

    def client():
        return wan.client.popen(*[a if a is not None else wan.url() for a in args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc = client()
    restarts = 0
    for step in range(1, 10):
        deadline = time.monotonic() + 120
        while _sent(start, wan.link.stats()) < step * size // 10 * 1.05:
            assert proc.poll() is None or proc.returncode == 0, proc.stderr.read()
            if proc.poll() == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            break
        if step % 2:
            assert wan.server.stop(signal.SIGTERM) == 0
            wan.serve()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            proc = client()
        restarts += 1
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert restarts >= 6
    _same(src, wan.module / "d")
    assert _sent(start, wan.link.stats()) <= 1.3 * size


def test_flipped_bits_are_caught_by_quic_on_the_wire_and_by_the_stripe_check_above_it(wan):
    src = wan.root / "src"
    _tree(src, 24, files=20)
    _big(src / "large", 6, 24)
    wan.link.set("ab", corrupt=0.02)                # on the wire: QUIC's packet protection drops them
    wan.serve()
    result = wan.push(src)
    _same(src, wan.module / "d")
    assert wan.link.stats()["ab"]["corrupted"] > 50
    assert result["corrupt_shards"] == 0 and result["packets_lost"] > 0
    # above the transport (a test hook in the receiving server): the shard's own check
    wan.server.stop()
    wan.link.set("ab", corrupt=0.0)
    wan.server_site.env["RESYNC_TEST_CORRUPT_SHARDS"] = "0.02"
    wan.serve()
    _big(src / "large", 6, 25)
    result = wan.push(src, "--whole-file")
    _same(src, wan.module / "d")
    assert result["corrupt_shards"] > 5         # each rebuilt from parity or a repair: the result is exact


@contextmanager
def _sampled(wan):
    """(time.monotonic(), bytes the link took from A) every 50 ms while the block runs."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), wan.link.stats()["ab"]["received_bytes"]))
            time.sleep(0.05)
    t = threading.Thread(target=sample)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()


def test_the_link_rate_holds_at_20_percent_loss_and_a_transfer_completes_at_33(wan):
    """The controller treats random loss as a measurement: at 20 % loss it
    keeps sending at >= 85 % of the link rate (issue 13's figure) — measured
    while the file flows, from a tenth of its frames to nine tenths (the
    whole run's average also carries the handshake, the path MTU search and
    the ending, ~10 % of the run, which a busy machine stretches: the whole
    run read 83-85 Mbit/s in full test runs, 84-89 alone, while the flow
    held 97-100) —, and at 33 % it finishes."""
    src = wan.root / "src"
    src.mkdir()
    _big(src / "large", 48, 26)
    wan.serve()
    wan.link.set("both", loss=0.2)
    with _sampled(wan) as samples:
        wan.push(src)
    _same(src, wan.module / "d")
    first, total = samples[0][1], samples[-1][1] - samples[0][1]
    lo = next(x for x in samples if x[1] - first >= total / 10)
    hi = next(x for x in samples if x[1] - first >= total * 9 / 10)
    rate = (hi[1] - lo[1]) * 8 / (hi[0] - lo[0])
    assert rate >= 0.85 * 100e6, f"{rate / 1e6:.1f} Mbit/s"
    wan.link.set("both", loss=0.33)
    _big(src / "large", 24, 27)
    wan.push(src)
    _same(src, wan.module / "d")


def test_the_rate_recovers_within_a_second_after_an_outage(wan):
    """A 2 s blackout (shorter than any timeout) in a transfer at full rate:
    0.5 to 1 s after the link comes back the client sends at >= 70 % of the
    rate it had before. (Measured: full rate again 0.2-0.5 s after, 4-10
    RTTs; before the tail-loss PING was let past the full window it waited
    for aioquic's doubling probe timeout, ~1 s in one run of three.)"""
    src = wan.root / "src"
    src.mkdir()
    _big(src / "large", 96, 28)
    wan.serve()
    with _sampled(wan) as samples:
        proc = wan.client.popen("sync", "--json", src, wan.url(), "--peer-id", wan.server_site.id,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not samples or samples[-1][1] < 30 << 20:
            time.sleep(0.05)
            assert proc.poll() is None
        outage_start = time.monotonic()
        wan.link.blackout(2.0)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _same(src, wan.module / "d")

    def rate(lo: float, hi: float) -> float:
        pts = [(t, b) for t, b in samples if lo <= t <= hi]
        return (pts[-1][1] - pts[0][1]) * 8 / (pts[-1][0] - pts[0][0])
    before = rate(outage_start - 1.0, outage_start)
    back = outage_start + 2.0
    after = rate(back + 0.5, back + 1.0)
    assert after >= 0.7 * before, f"{before / 1e6:.0f} Mbit/s before, {after / 1e6:.0f} 0.5-1 s after"


_WATCH = r"""
import json, sys, time, urllib.request
url, key = json.load(open(sys.argv[1]))["url"], open(sys.argv[2]).read().strip()
while True:
    req = urllib.request.Request(url + "/api/v1/transfers?limit=1000", headers={"X-API-Key": key})
    ts = json.loads(urllib.request.urlopen(req, timeout=10).read())["transfers"]
    print(json.dumps([time.monotonic(), {t["id"]: [t["state"], t["progress"]["bytes_done"]] for t in ts
                                         if t.get("kind") == "outbound"}]), flush=True)
    time.sleep(0.2)
"""


def test_priority_classes_share_one_connection_fifty_thirty_twenty_and_a_lone_transfer_gets_the_link(wan):
    """Issue 23: the daemon's own pushes to one server share one QUIC
    connection; one of each class at once over the emulated link (20 Mbit/s,
    50 ms RTT) gets 50/30/20 % of what crosses while all three are busy
    (within 5 points, from the daemon's own progress counts, sampled inside
    its namespace: 49.6/30.1/20.4 here, 18.4 Mbit/s together); then a lone
    normal one gets the link (18.4 Mbit/s)."""
    from .test_api import _api_of
    wan.link.set("both", rate=20e6)
    wan.serve()
    daemon_dir = wan.root / "own"
    daemon_dir.mkdir()
    daemon = Server(wan.client, "--module", f"own={daemon_dir}", "--allow", wan.server_site.id,
                    "--api", "127.0.0.1:0", host=wan.link.addr_a)
    try:
        _api_of(wan.client)                                    # (its api.json written)
        config = Path(wan.client.env["XDG_CONFIG_HOME"]) / "resync"
        from .test_net import PY
        watch = subprocess.Popen(wan.link.cmd("a", [PY, "-c", _WATCH, str(config / "api.json"),
                                                    str(config / "api-key")]),
                                 stdout=subprocess.PIPE, text=True)
        ids = {}
        for i, priority in enumerate(("critical", "high", "normal")):
            src = wan.root / f"src{i}"
            src.mkdir()
            mix.write(src / "data", 30 + i, 12 << 20, "random")
            r = wan.client.run("transfer", "add", src, wan.url(f"d{i}"), "--peer-id", wan.server_site.id,
                               "--transport", "quic", "--priority", priority, "--json")
            assert r.returncode == 0, r.stderr
            ids[priority] = json.loads(r.stdout)["id"]
        samples = []
        for line in watch.stdout:
            at, state = json.loads(line)
            samples.append((at, state))
            if all(state.get(t, ["?"])[0] in ("completed", "failed") for t in ids.values()):
                break
        for i in range(3):
            _same(wan.root / f"src{i}", wan.module / f"d{i}")
        busy = [(at, s) for at, s in samples if all(s.get(t, ["?"])[0] == "active" and s[t][1] > 0
                                                    for t in ids.values())]
        assert len(busy) >= 10, samples
        (t0, first), (t1, last) = busy[2], busy[-2]                # (clear of the starts and the first end)
        moved = {p: last[t][1] - first[t][1] for p, t in ids.items()}
        total = sum(moved.values())
        shares = {p: round(100 * moved[p] / total, 1) for p in moved}
        assert all(abs(shares[p] - want) <= 5 for p, want in (("critical", 50), ("high", 30), ("normal", 20))), \
            shares
        together = total / (t1 - t0)
        # a lone normal transfer: the whole link
        src = wan.root / "src3"
        src.mkdir()
        mix.write(src / "data", 33, 12 << 20, "random")
        r = wan.client.run("transfer", "add", src, wan.url("d3"), "--peer-id", wan.server_site.id,
                           "--transport", "quic", "--json")
        lone = json.loads(r.stdout)["id"]
        alone = []
        for line in watch.stdout:
            at, state = json.loads(line)
            if lone in state:
                alone.append((at, state[lone][1]))
                if state[lone][0] != "active":
                    break
        watch.kill()
        _same(src, wan.module / "d3")
        moving = [x for x in alone if x[1] > 0]
        (a0, b0), (a1, b1) = moving[1], moving[-2]
        assert (b1 - b0) / (a1 - a0) >= 0.85 * together, (shares, together, alone)
        print(f"\nshares while all three were busy: {shares}; together {together * 8 / 1e6:.1f} Mbit/s, "
              f"alone {(b1 - b0) / (a1 - a0) * 8 / 1e6:.1f} Mbit/s")
    finally:
        daemon.__exit__()
