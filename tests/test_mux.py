"""Several sessions over one connection (protocol.mux): the class shares of
the shard scheduler, exactly with sessions that always have shards, and with
real pushes pumped in memory under a hand-moved clock; the wire's records;
a channel's class changed by either end."""
from __future__ import annotations

import random

import pytest

from resync.protocol import mux as M
from resync.protocol.frames import ProtocolError
from resync.protocol.session import ClientSession, Module, Options, ServerSession

from . import mix
from .protopump import identities
from .treeutil import snapshot


class Endless:
    """A session that always has shards (a busy sender), or none (``idle``)."""

    def __init__(self):
        self.sent, self.idle, self.finished = 0, False, False
        self.sends_content = True

    def datagrams_to_send(self, now, limit):
        if self.idle:
            return []
        self.sent += limit
        return [b"s"] * limit

    def stream_to_send(self):
        return b""

    def next_timer(self):
        return None


def _mux(*classes):
    m = M.Mux(client=True)
    sessions = [Endless() for _ in classes]
    channels = [m.open(s, p) for s, p in zip(sessions, classes)]
    return m, sessions, channels


def _run(m, rounds, limits=(64, 7, 1, 13, 32)):
    for i in range(rounds):
        m.datagrams_to_send(0.0, limits[i % len(limits)])


def test_three_busy_classes_get_fifty_thirty_twenty_and_a_lone_one_gets_everything():
    m, (c, h, n), _ = _mux("critical", "high", "normal")
    _run(m, 2000)
    total = c.sent + h.sent + n.sent
    assert [round(100 * x.sent / total, 1) for x in (c, h, n)] == [50.0, 30.0, 20.0]
    m, (lone,), _ = _mux("normal")
    m.datagrams_to_send(0.0, 64)
    assert lone.sent == 64


def test_a_class_shares_its_share_and_an_idle_one_gives_its_share_away_without_banking_it():
    m, (a, b, c), _ = _mux("normal", "normal", "critical")
    _run(m, 1000)
    total = a.sent + b.sent + c.sent
    assert abs(c.sent / total - 5 / 7) < 0.01 and abs(a.sent - b.sent) <= 64
    m, (crit, norm), _ = _mux("critical", "normal")
    crit.idle = True
    _run(m, 500)
    assert crit.sent == 0 and norm.sent > 0          # the idle class's share flowed to the other
    crit.idle = False
    before = crit.sent, norm.sent
    _run(m, 500)
    got = crit.sent - before[0], norm.sent - before[1]
    assert abs(got[0] / sum(got) - 5 / 7) < 0.01     # back at its share at once, nothing owed from the lull


def test_a_channels_own_limit_holds_it_and_the_rest_goes_to_the_others():
    from resync.net.feeder import TokenBucket
    m, (c, n), (cc, _) = _mux("critical", "normal")
    cc.buckets = [TokenBucket(10, "shards")]         # 10 shards a second, a burst of 1
    _run(m, 100)
    assert c.sent <= 2 and n.sent == 20 * (64 + 7 + 1 + 13 + 32) - c.sent     # (every shard the path allowed)


def _tree(root, seed):
    root.mkdir(parents=True)
    for i in range(3):
        mix.write(root / f"f{i}", seed * 10 + i, 400_000, "mixed")


def _pump(client: M.Mux, server: M.Mux, budget: int, until, max_steps: int = 200_000) -> float:
    """Both muxes pumped into each other: control bytes at once, ``budget``
    shards each way a step of 1 ms (the path's rate), every timer on time."""
    now = 0.0
    for _ in range(max_steps):
        if until():
            return now
        for a, b in ((client, server), (server, client)):
            data = a.stream_to_send()
            if data:
                b.receive_stream(data, now)
        for a, b in ((client, server), (server, client)):
            for d in a.datagrams_to_send(now, budget):
                b.receive_datagram(d, now)
        now += 0.001
        for s in (client, server):
            t = s.next_timer()
            if t is not None and t <= now:
                s.handle_timer(now)
    raise AssertionError("not done")


def test_three_pushes_over_one_connection_arrive_and_share_it_by_class(tmp_path):
    """Three real pushes of equal trees, one of each class, over one mux pair
    whose path carries 40 shards a millisecond: while all three are busy the
    shards went 50/30/20 (within 5 points: 48.8/30.7/20.5 here); all three
    trees arrive whole; the client changes a class while it runs and the
    server hears of it; each end forgets a channel once its session ended."""
    cid, sid = identities(tmp_path)
    dst = tmp_path / "module"
    dst.mkdir()
    modules = {"m": Module("m", str(dst), False, {cid.device_id})}
    heard = []
    server = M.Mux(client=False, accept=lambda c: ServerSession(sid, sid.cert_der, modules),
                   changed=lambda c: heard.append((c.number, c.priority)))
    client = M.Mux(client=True)
    channels, sources = [], []
    for i, priority in enumerate(("critical", "high", "normal")):
        src = tmp_path / f"src{i}"
        _tree(src, i)
        sources.append(src)
        s = ClientSession(cid, sid.cert_der, True, "m", f"d{i}", str(src), Options())
        channels.append(client.open(s, priority))
    for m in (client, server):
        m.rtt, m.shard_size, m.reliable = 0.002, 1296, False
    sent_at_first_end = []

    def first_end():
        if not sent_at_first_end and any(c.session.finished for c in channels):
            sent_at_first_end.extend(c.stats["shards_sent"] for c in channels)
        return bool(sent_at_first_end)
    _pump(client, server, 40, first_end)
    total = sum(sent_at_first_end)
    shares = [100 * x / total for x in sent_at_first_end]
    assert all(abs(got - want) <= 5 for got, want in zip(shares, (50, 30, 20))), shares
    client.set_priority(channels[2], "critical")
    _pump(client, server, 40, lambda: not client.channels and not server.channels)
    assert (channels[2].number, "critical") in heard
    for i, (c, src) in enumerate(zip(channels, sources)):
        assert c.session.error is None, c.session.error
        assert snapshot(dst / f"d{i}") == snapshot(src)


def test_records_out_of_place_are_protocol_errors():
    server = M.Mux(client=False, accept=lambda c: Endless())
    with pytest.raises(ProtocolError, match="preface"):
        server.receive_stream(b"\x00\x00\x00\x10xxxx", 0.0)
    for record in (M.RECORD.pack(1, M.DATA, 1) + b"x",                 # DATA before its OPEN
                   M.RECORD.pack(1, M.OPEN, 1) + b"\x07",              # no such class
                   M.RECORD.pack(1, M.OPEN, 1) + b"\x00" + M.RECORD.pack(1, M.OPEN, 1) + b"\x00",   # twice
                   M.RECORD.pack(1, M.DATA, M.MAX_RECORD + 1)):
        s = M.Mux(client=False, accept=lambda c: Endless())
        with pytest.raises(ProtocolError):
            s.receive_stream(M.PREFACE + record, 0.0)
    s = M.Mux(client=False, accept=lambda c: Endless())
    opens = b"".join(M.RECORD.pack(n, M.OPEN, 1) + b"\x02" for n in range(1, M.MAX_CHANNELS + 2))
    with pytest.raises(ProtocolError, match="at once"):
        s.receive_stream(M.PREFACE + opens, 0.0)
    s = M.Mux(client=False, accept=lambda c: Endless())
    s.receive_stream(M.PREFACE + M.RECORD.pack(1, M.OPEN, 1) + b"\x02", 0.0)
    s.receive_datagram(b"\x09\x00late", 0.0)                          # an unknown channel's shard: dropped
    assert s.channels[1].priority == "normal"


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_channel_bytes_give_only_protocol_errors(seed):
    rng = random.Random(seed)
    for _ in range(300):
        s = M.Mux(client=False, accept=lambda c: Endless())
        data = M.PREFACE + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        try:
            s.receive_stream(data, 0.0)
        except ProtocolError:
            pass
