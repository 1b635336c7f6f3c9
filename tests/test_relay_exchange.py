"""The relay exchange (resync.protocol.relay) between two spools, pumped in
memory with a hand-moved clock: custody moves only on the receiving end's
acknowledgement; refusals (duplicate, expired, storage depleted, an unknown
device) leave the sender its copy; a cut resumes by offset from whichever
node offers the id next; a critical envelope overtakes a large normal one;
a mailbox is collected; a byte changed on the way is refused."""
from __future__ import annotations

import os
import random
import time

import pytest

from resync.identity import load_identity
from resync.protocol.session import RelayClientSession, ServerSession
from resync.relay import envelope as E
from resync.relay.keys import device_hash, make_card
from resync.relay.node import SpoolIn, SpoolOut
from resync.store.spool import Spool

from . import mix
from .protopump import Channel, pump
from .treeutil import tmpfs


def _now_ms() -> int:
    return int(time.time() * 1000)


class Net:
    """Three devices: a source A, a relay R, a destination B, each with a spool."""

    def __init__(self, tmp, cap: int = 0):
        self.tmp = tmp
        self.a, self.r, self.b = (load_identity(tmp / f"{n}-id", create=True) for n in "arb")
        self.spools = {n: Spool(tmp / f"{n}-spool", cap=cap if n == "r" else 0, min_free=0) for n in "arb"}
        from cryptography.hazmat.primitives.asymmetric import x25519
        self.b_exchange = x25519.X25519PrivateKey.generate()
        self.b_card = make_card(self.b, self.b_exchange)
        self.allowed = {self.a.device_id, self.b.device_id}

    def hash(self, who) -> bytes:
        return device_hash(who.device_id)

    def seal(self, data: bytes, generation: int = 1, priority: str = "normal", expires_in: int = 3_600_000,
             tree: bytes = b"t" * 16) -> bytes:
        now = _now_ms()
        return E.seal(self.a, self.b_card, {"module": "m", "path": "p"}, data, tree=tree, generation=generation,
                      previous=bytes(32), base=bytes(32), priority=priority, created=now, expires=now + expires_in)

    def exchange(self, client: str, out: bool = True, collect: bool = False, channel=None, **pump_options):
        """``client`` (a or b) calls R: offers its spool's envelopes (``out``), collects its mailbox."""
        me = {"a": self.a, "b": self.b}[client]
        mine, relay = self.spools[client], self.spools["r"]
        server_ends = {}

        def ends(device_id, collecting):
            if device_id not in self.allowed:
                return None
            peer = device_hash(device_id)
            server_ends["out"] = SpoolOut(relay, self.hash(self.r), peer, collecting=True) if collecting else None
            server_ends["in"] = SpoolIn(relay, peer)
            return server_ends["out"], server_ends["in"]
        server = ServerSession(self.r, self.r.cert_der, {}, relay=ends)
        c_out = SpoolOut(mine, self.hash(me), self.hash(self.r)) if out else None
        c_in = SpoolIn(mine, self.hash(self.r))
        client_s = RelayClientSession(me, self.r.cert_der, c_out, c_in, collect)
        pump(client_s, server, channel or Channel(random.Random(1)), **pump_options)
        return client_s, server, c_out, server_ends


def test_a_deposits_r_holds_b_collects_and_custody_moves_only_on_acknowledgement(tmp_path):
    net = Net(tmp_path)
    raws = [net.seal(mix.data(i, size, kind), generation=i + 1)
            for i, (size, kind) in enumerate([(0, "text"), (1, "zeros"), (700_000, "mixed"), (3_000_000, "repeat")])]
    for raw in raws:
        net.spools["a"].put(raw)
    ids = sorted(E.parse(raw).id.hex() for raw in raws)
    client, server, out, _ = net.exchange("a")
    assert client.error is None and server.error is None, (client.error, server.error)
    assert client.result["handed_over"] == 4 and sorted(out.handed) == ids
    assert not net.spools["a"].index                                 # given up, each to a tombstone
    assert sorted(net.spools["r"].index) == ids
    for key in ids:                                                  # R's copy: the bytes, one hop more
        env = E.parse((net.spools["r"].envelopes / key).read_bytes())
        E.verify(env)
        assert env.hops.count == 1 and env.hops.previous == net.hash(net.a) and env.id.hex() == key
    # B calls in and collects its mailbox; R gives each up as delivered
    client, server, _, ends = net.exchange("b", out=False, collect=True)
    assert client.error is None and server.error is None, (client.error, server.error)
    assert sorted(net.spools["b"].index) == ids and not net.spools["r"].index
    assert sorted(ends["out"].handed) == ids
    events = [line for line in (net.spools["r"].root / "events.ndjson").read_text().splitlines()]
    assert sum('"event": "delivered"' in e for e in events) == 4
    got = {E.parse(net.spools["b"].read(k)).id.hex(): E.open_payload(E.parse(net.spools["b"].read(k)), net.b_exchange,
                                                                      net.b_card)[1] for k in ids}
    assert sorted(got.values()) == sorted(E.open_payload(E.parse(r), net.b_exchange, net.b_card)[1] for r in raws)


def test_refusals_leave_the_sender_its_copy(tmp_path):
    net = Net(tmp_path, cap=1_000_000)
    big = net.seal(mix.data(5, 2_000_000, "mixed"), generation=1)       # over R's cap
    dup = net.seal(b"twice", generation=2)
    net.spools["r"].put(dup)                                            # R holds it already
    for raw in (big, dup):
        net.spools["a"].put(raw)
    client, server, out, _ = net.exchange("a")
    assert client.error is None and server.error is None
    reasons = sorted(r["reason"] for r in client.result["refusals"])
    assert reasons == ["duplicate", "storage depleted"]
    assert sorted(net.spools["a"].index) == sorted(E.parse(r).id.hex() for r in (big, dup))     # still A's
    assert all(h.attempts == 1 and h.next_attempt > _now_ms() for h in net.spools["a"].index.values())
    assert not list(net.spools["r"].partial.iterdir())                  # nothing half-kept at R


def test_an_unknown_device_is_refused_before_anything_is_stored(tmp_path):
    net = Net(tmp_path)
    net.allowed = {net.b.device_id}
    net.spools["a"].put(net.seal(b"x" * 1000))
    client, server, _, _ = net.exchange("a")
    assert client.error is not None and "not allowed" in str(client.error)
    assert client.error.exit_code == 13
    assert not net.spools["r"].index and not list(net.spools["r"].partial.iterdir())
    assert len(net.spools["a"].index) == 1


def test_a_cut_exchange_resumes_by_offset_and_takes_custody_once(tmp_path):
    net = Net(tmp_path)
    raw = net.seal(mix.data(9, 6_000_000, "mixed"))
    key = E.parse(raw).id.hex()
    net.spools["a"].put(raw)
    partial = net.spools["r"].partial / key
    client, server, _, _ = net.exchange("a", cut_when=lambda: partial.exists() and partial.stat().st_size > 2_500_000)
    assert client.error is not None and server.error is not None
    assert key in net.spools["a"].index and key not in net.spools["r"].index
    kept = (net.spools["r"].partial / key).stat().st_size
    assert E.HEAD_SIZE < kept < len(raw)                               # part of it, not visible as held
    net.spools["r"] = Spool(net.tmp / "r-spool", min_free=0)          # R restarted: the partial stays
    client, server, _, _ = net.exchange("a")
    assert client.error is None and server.error is None, (client.error, server.error)
    assert server.role.stats["resumed_bytes"] == kept - E.HEAD_SIZE
    assert client.stats["control_bytes_sent"] < len(raw) - kept + 64_000   # only the rest travelled
    assert list(net.spools["r"].index) == [key] and not net.spools["a"].index
    assert net.spools["r"].read(key)[E.HEAD_SIZE:] == raw[E.HEAD_SIZE:]


def test_a_critical_envelope_arriving_behind_a_gibibyte_of_normal_ones_arrives_first(tmp_path):
    """A hands R four 256 MiB normal envelopes; once R has 64 MiB of the first, a
    1 MiB critical one enters A's spool: it is offered at A's next look and
    overtakes at the next chunk — R holds it before any of the normal ones."""
    net = Net(tmp_path)
    big = []
    for i in range(4):
        raw = net.seal(mix.data(20 + i, 256 << 20, "random"), generation=1, priority="normal", tree=bytes([i]) * 16)
        net.spools["a"].put(raw)
        big.append(E.parse(raw).id.hex())
        del raw
    urgent = net.seal(mix.data(30, 1 << 20, "text"), generation=1, priority="critical", tree=b"u" * 16)
    urgent_id = E.parse(urgent).id.hex()
    order, real_finish = [], Spool.finish

    def finish(self, key, now=None):
        if self is net.spools["r"]:
            order.append(key)
        return real_finish(self, key, now)
    partial = net.spools["r"].partial / big[0]
    dropped = []

    def arrive() -> bool:
        if not dropped and partial.exists() and partial.stat().st_size > 64 << 20:
            net.spools["a"].put(urgent)
            dropped.append(True)
        return False
    Spool.finish = finish
    try:
        client, server, _, _ = net.exchange("a", cut_when=arrive)
    finally:
        Spool.finish = real_finish
    assert client.error is None and server.error is None
    assert dropped and order[0] == urgent_id and sorted(order[1:]) == sorted(big)


def test_a_critical_envelope_overtakes_a_large_normal_one(tmp_path):
    net = Net(tmp_path)
    big = net.seal(mix.data(3, 8_000_000, "mixed"), generation=1, priority="normal", tree=b"n" * 16)
    net.spools["a"].put(big)
    small = net.seal(b"urgent" * 100_000, generation=1, priority="critical", tree=b"c" * 16)
    net.spools["a"].put(small)
    order = []
    real_finish = Spool.finish

    def finish(self, key, now=None):
        order.append(key)
        return real_finish(self, key, now)
    Spool.finish = finish
    try:
        client, server, _, _ = net.exchange("a")
    finally:
        Spool.finish = real_finish
    assert client.error is None and server.error is None
    assert order == [E.parse(small).id.hex(), E.parse(big).id.hex()]


def test_a_byte_changed_on_the_way_is_refused_and_nothing_is_held(tmp_path):
    net = Net(tmp_path)
    raw = bytearray(net.seal(mix.data(4, 500_000, "text")))
    net.spools["a"].put(bytes(raw))
    key = E.parse(bytes(raw)).id.hex()
    path = net.spools["a"].envelopes / key
    data = bytearray(path.read_bytes())
    data[E.HEAD_SIZE + 1000] ^= 1                                      # flipped in A's spool, as a bad disk would
    path.write_bytes(bytes(data))
    client, server, _, _ = net.exchange("a")
    assert client.error is None and server.error is None
    assert [r["reason"] for r in client.result["refusals"]] == ["invalid"]
    assert not net.spools["r"].index and not list(net.spools["r"].partial.iterdir())
    assert key in net.spools["a"].index


def test_an_envelope_is_never_offered_back_to_the_node_it_came_from(tmp_path):
    net = Net(tmp_path)
    net.spools["a"].put(net.seal(b"loop"))
    net.exchange("a")
    assert len(net.spools["r"].index) == 1
    # A calls R again, collecting nothing but offering: R must not offer A what came from A, and A
    # (collecting) is not its destination: nothing moves
    client, server, _, _ = net.exchange("a", collect=True)
    assert client.error is None and client.result["taken"] == 0
    out = SpoolOut(net.spools["r"], net.hash(net.r), net.hash(net.a))
    assert out.next_offers(10, set()) == []


def _exchange(spools: dict, ids: dict, client: str, server: str, collect: bool = False, out: bool = True,
              wanted=None):
    """``client`` calls ``server`` (both keys of ``spools`` and ``ids``: identities)."""
    me, srv = ids[client], ids[server]
    ends = {}

    def server_ends(device_id, collecting):
        peer = device_hash(device_id)
        ends["out"] = SpoolOut(spools[server], device_hash(srv.device_id), peer, collecting=True) if collecting \
            else None
        return ends["out"], SpoolIn(spools[server], peer)
    s = ServerSession(srv, srv.cert_der, {}, relay=server_ends)
    c_out = SpoolOut(spools[client], device_hash(me.device_id), device_hash(srv.device_id), wanted) if out else None
    c = RelayClientSession(me, srv.cert_der, c_out, SpoolIn(spools[client], device_hash(srv.device_id)), collect)
    pump(c, s, Channel(random.Random(3)))
    assert c.error is None and s.error is None, (c.error, s.error)
    return c.result


def test_a_loop_through_three_relays_meets_a_tombstone_and_the_copy_stays_in_custody(tmp_path):
    net = Net(tmp_path)
    ids = {n: load_identity(tmp_path / f"{n}-id", create=True) for n in ("r1", "r2", "r3")}
    ids["a"] = net.a
    spools = {n: Spool(tmp_path / f"{n}-spool", min_free=0) for n in ("r1", "r2", "r3")}
    spools["a"] = net.spools["a"]
    raw = net.seal(b"round and round")
    key = E.parse(raw).id.hex()
    spools["a"].put(raw)
    _exchange(spools, ids, "a", "r1")
    _exchange(spools, ids, "r1", "r2")                  # R1 -> R2 (custody moves, R1 keeps a tombstone)
    _exchange(spools, ids, "r2", "r3")
    assert list(spools["r3"].index) == [key] and not spools["r1"].index and not spools["r2"].index
    # R2 would never hand it back to R1 (where it came from)...
    assert SpoolOut(spools["r2"], device_hash(ids["r2"].device_id),
                    device_hash(ids["r1"].device_id)).next_offers(5, set()) == []
    # ... and R3 -> R1 closes the loop: refused as a duplicate, R3 keeps custody
    result = _exchange(spools, ids, "r3", "r1")
    assert [r["reason"] for r in result["refusals"]] == ["duplicate"]
    assert list(spools["r3"].index) == [key] and not spools["r1"].index
    assert E.parse(spools["r3"].read(key)).hops.count == 3


def test_the_same_envelope_by_two_relays_and_a_disk_is_applied_once(tmp_path):
    from resync.relay.guard import Chains
    from resync.relay.trees import Inbox, module_places
    from resync.store.guard import GuardStore
    net = Net(tmp_path)
    ids = {"a": net.a, "b": net.b, "r1": net.r, "r2": load_identity(tmp_path / "r2-id", create=True)}
    spools = {"a": net.spools["a"], "b": net.spools["b"], "r1": net.spools["r"],
              "r2": Spool(tmp_path / "r2-spool", min_free=0)}
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("one copy only\n")
    from resync.relay.trees import Outbox
    sealed = Outbox(tmp_path / "outbox", net.a).seal(str(src), net.b_card, "m", "p", now=_now_ms())
    key = sealed.id.hex()
    spools["r1"].put(sealed.data)                          # A gave it to both relays (and to a disk)
    spools["r2"].put(sealed.data)
    _exchange(spools, ids, "b", "r1", collect=True, out=False)
    result = _exchange(spools, ids, "b", "r2", collect=True, out=False)
    assert result["refused_here"] == 1                     # B: a duplicate of what it holds
    assert not spools["r1"].index and not spools["r2"].index   # both relays: delivered (by B's refusal too)
    dst = tmp_path / "dst"
    dst.mkdir()
    inbox = Inbox(net.b, net.b_exchange, net.b_card, Chains(GuardStore(tmp_path / "applied")),
                  module_places({"m": str(dst)}, {"m": {net.a.device_id}}))
    verdicts = [inbox.receive(spools["b"].read(key), _now_ms()).verdict, inbox.receive(sealed.data, _now_ms()).verdict]
    assert verdicts == ["apply", "replay"]                 # the relayed copy applied; the disk's a replay
    assert (dst / "p" / "f.txt").read_text() == "one copy only\n"


def test_a_thousand_small_envelopes_through_one_relay_none_lost_none_twice(tmp_path):
    net = Net(tmp_path)
    keys = set()
    for i in range(1000):
        raw = net.seal(f"envelope {i}\n".encode() * (i % 7 + 1), generation=i + 1,
                       priority=("critical", "high", "normal")[i % 3])
        keys.add(E.parse(raw).id.hex())
        net.spools["a"].put(raw)
    client, server, _, _ = net.exchange("a")
    assert client.result["handed_over"] == 1000 and client.result["refused_by_peer"] == 0
    client, server, _, ends = net.exchange("b", out=False, collect=True)
    assert client.result["taken"] == 1000
    assert set(net.spools["b"].index) == keys and not net.spools["r"].index and not net.spools["a"].index
    events = [line for line in (net.spools["b"].root / "events.ndjson").read_text().splitlines()]
    assert sum('"event": "taken"' in e for e in events) == 1000


def _tamper(spool: Spool, key: str, offset: int, mask: int = 0x40) -> None:
    path = spool.envelopes / key
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_bytes_a_relay_changes_are_refused_at_the_destination_and_a_changed_hop_count_is_not(tmp_path):
    net = Net(tmp_path)
    raws = [net.seal(mix.data(40 + i, 200_000, "text"), generation=1, tree=bytes([i + 1]) * 16) for i in range(3)]
    keys = [E.parse(raw).id.hex() for raw in raws]
    for raw in raws:
        net.spools["a"].put(raw)
    net.exchange("a")
    assert sorted(net.spools["r"].index) == sorted(keys)
    _tamper(net.spools["r"], keys[0], E.HEAD_SIZE + 5000)         # R flips a payload byte
    _tamper(net.spools["r"], keys[1], 8 + 4 + 100)                # ... a byte of the signed header
    _tamper(net.spools["r"], keys[2], E.HEAD_SIZE - 41, 0x03)     # ... the hop count, 1 to 2 (relay-mutable)
    client, server, _, _ = net.exchange("b", out=False, collect=True)
    assert client.error is None and server.error is None, (client.error, server.error)
    assert list(net.spools["b"].index) == [keys[2]]                # only the one whose hop count changed
    assert client.result["refused_here"] == 2 and not list(net.spools["b"].partial.iterdir())
    assert sorted(net.spools["r"].index) == sorted(keys[:2])       # R keeps custody of what B refused


def test_expired_on_arrival_and_a_relay_hold_time_shorter_than_the_source_expiry(tmp_path):
    net = Net(tmp_path)
    net.spools["r"] = Spool(tmp_path / "r-spool", max_hold=60_000, min_free=0)       # R holds a minute at most
    old = net.seal(b"late", generation=1, tree=b"o" * 16, expires_in=3_600_000)
    fresh = net.seal(b"fresh", generation=1, tree=b"f" * 16, expires_in=3_600_000)
    net.spools["a"].put(old, now=_now_ms() - 3_000_000)
    net.spools["a"].put(fresh)
    env = E.parse(old)
    assert env.header.expires > _now_ms()                           # (not yet: it expires in 10 minutes)
    client, _, _, _ = net.exchange("a")
    assert client.result["handed_over"] == 2
    held = net.spools["r"].index[E.parse(fresh).id.hex()]
    assert held.shortened and held.expires <= _now_ms() + 60_000 < held.source_expires
    gone = net.spools["r"].expire(now=_now_ms() + 61_000)
    assert sorted(reason for _, reason in gone) == ["hold time ended", "hold time ended"]
    # A's clock runs an hour behind: it offers what has expired by R's clock; R refuses it at the door
    expired = net.seal(b"too late", generation=1, tree=b"x" * 16, expires_in=1_000)
    net.spools["a"].put(expired)
    import time as _time
    _time.sleep(1.1)
    import resync.relay.node as node
    real = node._now_ms
    node._now_ms = lambda: real() - 3_600_000
    try:
        client, _, _, _ = net.exchange("a")
    finally:
        node._now_ms = real
    assert [r["reason"] for r in client.result["refusals"]] == ["expired"]
    assert not net.spools["r"].index and not list(net.spools["r"].partial.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_enospc_at_the_relay_is_a_refusal_the_sender_keeps_custody(tmp_path):
    net = Net(tmp_path)
    with tmpfs(tmp_path / "small", "2m") as mnt:
        net.spools["r"] = Spool(mnt / "spool", min_free=0)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        raw = net.seal(os.urandom(free - 2_000))                   # admitted (it fits), then the disk fills
        net.spools["a"].put(raw)
        client, server, _, _ = net.exchange("a")
        assert client.error is None and server.error is None, (client.error, server.error)
        assert [r["reason"] for r in client.result["refusals"]] == ["storage depleted"]
        assert E.parse(raw).id.hex() in net.spools["a"].index       # A keeps custody
        assert not net.spools["r"].index and not list(net.spools["r"].partial.iterdir())


def test_an_envelope_being_received_on_another_connection_is_busy_and_its_sender_keeps_it(tmp_path):
    net = Net(tmp_path)
    raw = net.seal(mix.data(50, 2_000_000, "mixed"))
    key = E.parse(raw).id.hex()
    net.spools["a"].put(raw)
    net.spools["b"].begin(raw[:E.HEAD_SIZE], key, net.hash(net.r))   # B receives it from elsewhere (still open)
    net.spools["b"].write(key, 0, raw[E.HEAD_SIZE:E.HEAD_SIZE + 1000])
    net.exchange("a")
    client, _, _, _ = net.exchange("b", out=False, collect=True)
    assert [r["reason"] for r in client.result.get("refusals", [])] == []
    assert client.result["refused_here"] == 1
    assert key in net.spools["r"].index                    # not taken for delivered: R keeps custody
    assert net.spools["r"].index[key].attempts == 1


def test_an_envelope_its_destination_dropped_is_not_taken_for_delivered(tmp_path):
    net = Net(tmp_path)
    raw = net.seal(b"dropped at B once")
    key = E.parse(raw).id.hex()
    net.spools["b"].put(raw)
    net.spools["b"].remove(key, "removed")                  # B's operator removed it (or it expired there)
    net.spools["a"].put(raw)
    net.exchange("a")
    client, _, _, _ = net.exchange("b", out=False, collect=True)
    assert client.result["refused_here"] == 1
    assert key in net.spools["r"].index                     # R keeps it: B never held it to the end
    assert net.spools["r"].index[key].last_error.endswith("removed: given up here before (removed)")
