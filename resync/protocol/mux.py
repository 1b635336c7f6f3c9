"""Several protocol sessions over one connection (sans-I/O: fed bytes and
``now``, asked for bytes), with the sender's shard scheduler that gives each
priority class its share of what the connection may send.

Transfers between two devices share one QUIC connection (docs/protocol.md,
"Channels"): one handshake, one path MTU search, and one rate controller
measuring the path for all of them, so that what they send together is
what the path carries — not three controllers probing against each other —
and the division between them is resync's to make, by class:

- ``critical``, ``high`` and ``normal`` get 50, 30 and 20 % of the shards
  the connection may send while all are busy (``WEIGHTS``: weighted, not
  strict: a strict critical class would starve a normal transfer for as
  long as a critical one has data, and a nightly mirror of a large dataset
  must still finish; half the link makes a critical transfer two and a
  half times as fast as a normal one and never stops the others);
- a share a class does not use flows to the others (work-conserving: a lone
  normal transfer gets the whole link);
- several transfers of one class share its share equally.

The wire: the client's first bytes on the control stream are ``PREFACE``
(four bytes no frame starts with: as a frame length it is over MAX_FRAME),
then records ``u16 channel | u8 kind | u32 length | body``:

- ``OPEN`` (client -> server; body ``u8 class``): a new channel, whose
  session starts with the next DATA (a Hello, as on a connection of its own);
- ``DATA``: the channel's control-stream bytes (its frames, as they would
  cross a connection of its own);
- ``PRIORITY`` (either way; body ``u8 class``): the channel's class changed.

A datagram is ``u16 channel | shard``. Channel numbers are the client's,
from 1, never used twice in a connection, none whose low byte is a path MTU
probe's first (shards.PROBE: probes are the connection's, dropped here); a channel ends when its session
has ended at this end (its last bytes sent): later datagrams for it are
dropped. Everything else of a channel's session is as on a connection of
its own: its proof, the server's checks, its resume.
"""
from __future__ import annotations

import struct

from .frames import ProtocolError
from .shards import PROBE

PREFACE = b"\xffRMX"
RECORD = struct.Struct("<HBI")
OPEN, DATA, PRIORITY = 1, 2, 3
CHANNEL = struct.Struct("<H")
OVERHEAD = CHANNEL.size                 # bytes a datagram's channel number takes from its shard
CLASSES = ("critical", "high", "normal")
WEIGHTS = {"critical": 5, "high": 3, "normal": 2}      # 50 / 30 / 20 %
MAX_CHANNELS = 64                       # channels open at once on one connection
MAX_RECORD = (16 << 20) + 64            # a record's body at most (a frame and its head)


class Channel:
    """One session on the connection: its number, class and place in the
    scheduler (``passed``: its virtual time, the shards it has sent over its
    share)."""

    __slots__ = ("number", "session", "priority", "passed", "buckets", "on_done", "stats", "rate_set")

    def __init__(self, number: int, session, priority: str):
        self.number, self.session, self.priority = number, session, priority
        self.passed = 0.0
        self.buckets: list = []                 # feeder.TokenBuckets its shards pass (its own limits)
        self.on_done = None                     # called once its session has ended and its bytes are out
        self.rate_set = False                   # its session's own rate limit (a pull's --bwlimit) is a bucket
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "shards_sent": 0, "shards_received": 0,
                      "shards_lost": 0}


class _Passed:
    """An attribute the transport sets on the session it drives (Session's
    ``rtt``, ``shard_size``, ``path_settled``, ``reliable``): kept by the Mux
    and set on each of its sessions (``adjust`` added), those to come too."""

    def __init__(self, name: str, adjust: int = 0):
        self.name, self.adjust = name, adjust

    def __get__(self, mux, owner=None):
        return self if mux is None else mux.passed[self.name]

    def __set__(self, mux, value) -> None:
        mux.passed[self.name] = value
        for c in mux.channels.values():
            setattr(c.session, self.name, value + self.adjust if self.adjust else value)

    def given(self, mux, session) -> None:
        value = mux.passed[self.name]
        setattr(session, self.name, value + self.adjust if self.adjust else value)


class Mux:
    """The sessions of one connection, presented to the transport as one
    session (the surface net's links drive: ``receive_stream``,
    ``receive_datagram``, ``stream_to_send``, ``datagrams_to_send``,
    ``next_timer``, ``handle_timer``, ``observe_loss``, and the attributes
    they set: ``rtt``, ``shard_size``, ``path_settled``, ``reliable``).

    A client ``open``s channels. A server is given ``accept(channel)``,
    which makes the session of a channel the client opened (its ``number``
    and ``priority`` set; it may set the channel's ``on_done`` and
    ``buckets``); ``changed(channel)`` is told of a class the peer changed."""

    def __init__(self, client: bool, accept=None, changed=None):
        self.client, self.accept, self.changed = client, accept, changed
        self.channels: dict[int, Channel] = {}
        self.finished = False
        self.error = None
        self._next = 1
        self._present = 0.0                     # the scheduler's virtual time: the least of the busy channels'
        self._ended = 0                          # (server) the highest channel number seen: lower unknown ones ended
        self._in = bytearray()
        self._out = bytearray(PREFACE if client else b"")
        self._preface = not client               # (server) the preface is still to be read
        self.passed = {"rtt": 0.05, "shard_size": 1296, "path_settled": True, "reliable": False}

    # -- what the transport sets: passed to every session (see _Passed) -----------------
    rtt = _Passed("rtt")
    shard_size = _Passed("shard_size", -OVERHEAD)      # (each datagram carries its channel number)
    path_settled = _Passed("path_settled")
    reliable = _Passed("reliable")

    @property
    def authenticated(self) -> bool:
        """Whether a session on it has proved its client's key (a server's
        caps on connections without a proof apply until then)."""
        return any(getattr(c.session, "authenticated", False) for c in self.channels.values())

    @property
    def sends_content(self) -> bool:
        return any(c.session.sends_content for c in self.channels.values())

    rate_limit = 0                               # (each channel's limits are its own: Channel.buckets)

    # -- channels -------------------------------------------------------------------------
    def _adopt(self, c: Channel) -> None:
        for passed in (Mux.rtt, Mux.shard_size, Mux.path_settled, Mux.reliable):
            passed.given(self, c.session)
        self.channels[c.number] = c

    def open(self, session, priority: str = "normal") -> Channel:
        """(client) A new channel for ``session`` (a ClientSession whose
        Hello is queued); ProtocolError when MAX_CHANNELS are open."""
        if len(self.channels) >= MAX_CHANNELS:
            raise ProtocolError(f"{MAX_CHANNELS} transfers share this connection already")
        if self._next > 0xFFFF:
            raise ProtocolError("this connection has carried all the channels it can: a new one is needed")
        c = Channel(self._next, session, priority)
        self._next += 1
        while self._next & 0xFF == PROBE[0]:    # (a path MTU probe's padding starts with that byte)
            self._next += 1
        self._adopt(c)
        self._out += RECORD.pack(c.number, OPEN, 1) + bytes([CLASSES.index(priority)])
        return c

    def set_priority(self, c: Channel, priority: str) -> None:
        """This end changed ``c``'s class: told to the peer (a pull's sender is the server)."""
        if priority not in WEIGHTS:
            raise ValueError(f"priority {priority!r}")
        c.priority = priority
        if c.number in self.channels:
            self._out += RECORD.pack(c.number, PRIORITY, 1) + bytes([CLASSES.index(priority)])

    def _record(self, number: int, kind: int, body: bytes, now: float) -> None:
        c = self.channels.get(number)
        if kind == OPEN:
            if self.client or c is not None or number <= self._ended or len(body) != 1 or body[0] >= len(CLASSES):
                raise ProtocolError(f"channel {number}: OPEN out of place")
            if len(self.channels) >= MAX_CHANNELS:
                raise ProtocolError(f"more than {MAX_CHANNELS} transfers at once on one connection")
            self._ended = number
            c = Channel(number, None, CLASSES[body[0]])
            c.session = self.accept(c)
            self._adopt(c)
            return
        if c is None:
            if number < self._next if self.client else number <= self._ended:
                return                          # (a channel that ended here: its peer's last words)
            raise ProtocolError(f"channel {number}: {('DATA', 'PRIORITY')[kind == PRIORITY]} before its OPEN")
        if kind == DATA:
            c.stats["bytes_received"] += len(body)
            c.session.receive_stream(body, now)
        elif kind == PRIORITY:
            if len(body) != 1 or body[0] >= len(CLASSES):
                raise ProtocolError(f"channel {number}: a bad PRIORITY")
            c.priority = CLASSES[body[0]]
            if self.changed is not None:
                self.changed(c)
        else:
            raise ProtocolError(f"channel {number}: unknown record kind {kind}")

    # -- the transport's surface ----------------------------------------------------------
    def receive_stream(self, data: bytes, now: float) -> None:
        self._in += data
        if self._preface:
            if len(self._in) < len(PREFACE):
                return
            if bytes(self._in[:len(PREFACE)]) != PREFACE:
                raise ProtocolError("not a channel preface")
            del self._in[:len(PREFACE)]
            self._preface = False
        pos = 0
        while len(self._in) - pos >= RECORD.size:
            number, kind, length = RECORD.unpack_from(self._in, pos)
            if length > MAX_RECORD:
                raise ProtocolError(f"channel {number}: a record of {length} bytes")
            if len(self._in) - pos - RECORD.size < length:
                break
            body = bytes(self._in[pos + RECORD.size:pos + RECORD.size + length])
            pos += RECORD.size + length
            self._record(number, kind, body, now)
        del self._in[:pos]

    def receive_datagram(self, data: bytes, now: float) -> None:
        if len(data) < OVERHEAD or data[0] == PROBE[0]:
            return                              # (a path MTU probe's padding: no channel's)
        c = self.channels.get(CHANNEL.unpack_from(data)[0])
        if c is not None:
            c.stats["shards_received"] += 1
            c.session.receive_datagram(data[OVERHEAD:], now)

    def stream_to_send(self) -> bytes:
        """Every channel's control bytes as DATA records; a channel whose
        session has ended (its last bytes taken now) is forgotten and its
        ``on_done`` called."""
        for number, c in list(self.channels.items()):
            data = c.session.stream_to_send()
            if data:
                for lo in range(0, len(data), MAX_RECORD - 64):
                    part = data[lo:lo + MAX_RECORD - 64]
                    self._out += RECORD.pack(number, DATA, len(part)) + part
                c.stats["bytes_sent"] += len(data)
            if c.session.finished:
                del self.channels[number]
                if c.on_done is not None:
                    c.on_done()
        out = bytes(self._out)
        self._out.clear()
        return out

    def datagrams_to_send(self, now: float, limit: int) -> list[bytes]:
        """Up to ``limit`` shards, shared by class (see the module) by stride
        scheduling (Waldspurger and Weihl, "Stride Scheduling", MIT/LCS/TM-528,
        1995): each channel's share is its class's weight divided among the
        busy channels of its class; each shard goes to the channel whose
        virtual time (shards sent over share) is least, and a channel's time
        grows by 1 / share with each shard it sends. A channel that has fewer
        shards than it was given (idle, or held by its own limits) is dry:
        the rest goes to the others, and it rejoins at the present virtual
        time, owed nothing (a share not used is not banked)."""
        live = [c for c in self.channels.values() if not c.session.finished]
        if not live or limit <= 0:
            return []
        per_class: dict[str, int] = {}
        for c in live:
            per_class[c.priority] = per_class.get(c.priority, 0) + 1
        share = {c.number: WEIGHTS[c.priority] / per_class[c.priority] for c in live}
        for c in live:                          # (a channel back from idle starts level with the others)
            c.passed = max(c.passed, self._present)
        order = {c.number: (CLASSES.index(c.priority), c.number) for c in live}
        out: list[bytes] = []
        size = self.shard_size
        active = live
        while active and len(out) < limit:
            given = dict.fromkeys((c.number for c in active), 0)
            at = {c.number: c.passed for c in active}
            for _ in range(limit - len(out)):
                n = min(at, key=lambda n: (at[n], order[n]))
                given[n] += 1
                at[n] += 1 / share[n]
            dry = []
            for c in sorted(active, key=lambda c: order[c.number]):
                want = given[c.number]
                if not want:
                    continue
                got = self._take(c, now, want, size)
                out += got
                c.passed += len(got) / share[c.number]
                if len(got) < want:
                    dry.append(c)
            if not dry:
                break
            active = [c for c in active if c not in dry]
        busy = [c.passed for c in live if c in active]
        self._present = min(busy) if busy else max(c.passed for c in live)
        return out

    def _take(self, c: Channel, now: float, want: int, size: int) -> list[bytes]:
        """Up to ``want`` of channel ``c``'s shards, within its own limits."""
        from ..net.feeder import TokenBucket, allowance, limiting
        if not c.rate_set and getattr(c.session, "rate_limit", 0):
            c.buckets = [*c.buckets, TokenBucket(c.session.rate_limit)]     # (a pull's --bwlimit, or the
            c.rate_set = True                                                #  server's own: its Hello's)
        buckets = limiting(None, c.buckets)
        if buckets:
            want = allowance(buckets, want, size)
        if want <= 0:
            return []
        shards = c.session.datagrams_to_send(now, want)
        for b in buckets:
            b.refund(want - len(shards), size)
        head = CHANNEL.pack(c.number)
        c.stats["shards_sent"] += len(shards)
        return [head + s for s in shards]

    def lost(self, head: bytes) -> None:
        """A datagram that began ``head`` (its channel number) was lost on the way."""
        if len(head) >= OVERHEAD:
            c = self.channels.get(CHANNEL.unpack_from(head)[0])
            if c is not None:
                c.stats["shards_lost"] += 1

    def observe_loss(self, lost: int, sent: int) -> None:
        for c in self.channels.values():
            c.session.observe_loss(lost, sent)

    def next_timer(self) -> float | None:
        times = [t for t in (c.session.next_timer() for c in self.channels.values()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for c in list(self.channels.values()):
            t = c.session.next_timer()
            if t is not None and t <= now:
                c.session.handle_timer(now)

    def fail(self, exc, tell_peer: bool = True) -> None:
        """Every session fails (the connection is being given up); the mux is finished."""
        for c in list(self.channels.values()):
            c.session.fail(exc, tell_peer)
        self.error, self.finished = exc, True

    def connection_lost(self, why: str) -> None:
        """The connection is gone: every session is told (each ends as cut);
        the mux is finished."""
        for number, c in list(self.channels.items()):
            c.session.connection_lost(why)
            del self.channels[number]
            if c.on_done is not None:
                c.on_done()
        self.finished = True
