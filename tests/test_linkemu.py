"""The link emulator (tests/linkemu) checks itself: what it delivers through
two network namespaces — delay, jitter, rate, queue, random and bursty loss,
duplication, reordering, blackouts, corruption — is measured from the
outside with UDP and TCP probes and compared with what it was told."""
from __future__ import annotations

import json
import statistics
import time

import pytest

from .linkemu import Link, unavailable

WHY = unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "")

FRAME_OVERHEAD = 14 + 20 + 8            # Ethernet + IPv4 + UDP headers: the link counts whole frames


@pytest.fixture(scope="module")
def wan():
    with Link("wan") as link:
        yield link


@pytest.fixture
def link(wan):
    wan.reset()
    wan.seed(7)
    yield wan
    wan.reset()


def _listening(p) -> None:
    line = p.stdout.readline()
    assert "listening" in line, line


def udp(link, rate: float, seconds: float, size: int, during=None, port: int = 7100) -> dict:
    """Flood A -> B at ``rate`` bit/s of payload for ``seconds``; what B's
    sink saw, and under "link" what the link counted A -> B meanwhile."""
    before = link.stats()["ab"]
    sink = link.probe("b", "sink", port, seconds + 5)
    _listening(sink)
    flood = link.probe("a", "flood", link.addr_b, port, rate, seconds, size)
    if during is not None:
        during()
    sent = json.loads(flood.stdout.read())
    got = json.loads(sink.stdout.read())
    got["sent"] = sent["sent"]
    after = link.stats()["ab"]
    got["link"] = {k: after[k] - before[k] for k in after}
    return got


def rtts(link, count: int, interval: float, port: int = 7200) -> list[float]:
    echo = link.probe("b", "echo", port, count * interval + 10)
    _listening(echo)
    try:
        ping = link.probe("a", "ping", link.addr_b, port, count, interval)
        return json.loads(ping.stdout.read())["rtts"]
    finally:
        echo.kill()
        echo.wait()


def test_delay_and_jitter(link):
    times = rtts(link, 21, 0.02)[1:]               # (the first one waits for ARP)
    assert len(times) >= 19                         # 0.1 % loss each way
    assert min(times) >= 0.050 and statistics.median(times) <= 0.052, times
    link.set("both", jitter=0.02)
    times = rtts(link, 40, 0.03)
    assert min(times) >= 0.050 and max(times) <= 0.092, times
    assert max(times) - min(times) >= 0.015, times


def test_rate_cap_with_a_bounded_queue(link):
    """150 Mbit/s into a 100 Mbit/s link: 100 Mbit/s of frames come out, the
    rest is dropped at a queue of 100 ms, and a probe behind it waits that
    queue's time, not more."""
    loaded = []
    got = udp(link, 150e6, 3.0, 1400, during=lambda: loaded.extend(rtts(link, 20, 0.1)))
    span = got["last"] - got["first"]
    frames = got["distinct"] * (1400 + FRAME_OVERHEAD) * 8 / span
    assert 0.96 * 100e6 <= frames <= 1.02 * 100e6, frames
    assert got["link"]["lost_queue"] > 0.2 * got["sent"]
    queued = [t for t in loaded if t > 0.1]         # probes that met the full queue
    assert queued and max(loaded) <= 0.050 + 0.100 + 0.010, loaded


def test_random_loss(link):
    link.set("ab", loss=0.2)
    got = udp(link, 8e6, 2.0, 1000)
    delivered = got["distinct"] / got["sent"]
    assert 0.77 <= delivered <= 0.83, delivered
    assert got["link"]["lost_random"] == pytest.approx(got["sent"] - got["distinct"], abs=3)


def test_bursty_loss_comes_in_runs(link):
    """Gilbert-Elliott: into the bad state with 2 %, out with 25 % per frame,
    everything lost while bad: 7.4 % lost, in runs of 4 on average (random
    loss of the same rate would give runs of about 1.1)."""
    link.set("ab", p_gb=0.02, p_bg=0.25, ge_bad=1.0, loss=0.0)
    got = udp(link, 8e6, 3.0, 1000)
    seen = set(got["seqs"])
    lost = [s for s in range(got["sent"]) if s not in seen]
    assert 0.05 <= len(lost) / got["sent"] <= 0.10
    runs = 1 + sum(1 for x, y in zip(lost, lost[1:]) if y != x + 1)
    assert len(lost) / runs >= 2.5


def test_duplication_and_reordering(link):
    link.set("ab", loss=0.0, dup=0.1, reorder=0.05, reorder_gap=0.01)
    got = udp(link, 8e6, 2.0, 1000)
    assert got["distinct"] >= got["sent"] - 2
    assert 0.07 <= got["duplicates"] / got["sent"] <= 0.13
    assert 0.03 <= got["reordered"] / got["sent"] <= 0.07


def test_a_blackout_drops_everything_for_its_length(link):
    link.set("both", loss=0.0)
    got = udp(link, 8e6, 3.0, 1000, during=lambda: (time.sleep(1.0), link.blackout(1.0)))
    seen = set(got["seqs"])
    lost = [s for s in range(got["sent"]) if s not in seen]
    assert lost and lost[-1] - lost[0] + 1 == len(lost)         # one gap
    gap = len(lost) / (got["sent"] / 3.0)                       # seconds of sending
    assert 0.9 <= gap <= 1.1, gap


def test_corrupted_datagrams_reach_the_application(link):
    """A flipped bit with the UDP checksum cleared is delivered: what resync's
    transport must catch (QUIC's packet protection), not the kernel."""
    link.set("ab", loss=0.0, corrupt=0.2)
    got = udp(link, 8e6, 2.0, 1000)
    assert 0.15 <= got["corrupt"] / got["sent"] <= 0.25
    assert got["corrupt"] + got["distinct"] >= got["sent"] - 2


def test_tcp_crosses_the_link(link):
    link.set("both", loss=0.0)
    sink = link.probe("b", "tcp-sink", 7300)
    _listening(sink)
    sent = json.loads(link.probe("a", "tcp-send", link.addr_b, 7300, 30 << 20).stdout.read())
    got = json.loads(sink.stdout.read())
    assert got["bytes"] == sent["bytes"] and got["digest"] == sent["digest"]
    assert 60 <= sent["mbit"] <= 100, sent


def test_lan_profile_is_a_plain_veth_pair_at_a_gigabit():
    with Link("lan") as lan:
        sink = lan.probe("b", "tcp-sink", 7300)
        _listening(sink)
        sent = json.loads(lan.probe("a", "tcp-send", lan.addr_b, 7300, 200 << 20).stdout.read())
        got = json.loads(sink.stdout.read())
        assert got["digest"] == sent["digest"]
        assert 300 <= sent["mbit"] <= 1000, sent
