"""A relay exchange: sealed envelopes handed over hop by hop, both ways over
one authenticated connection (docs/relay.md "Custody on the wire"). Sans-I/O,
as the transfer's sender and receiver: a role of a ``Session``, fed frames,
asked for what to send; the envelopes themselves are reached through two
objects the caller gives (a relay's spool behind them: ``resync.relay.node``).

Per envelope, the offering end O and the receiving end R::

    O -> R  RelayOffer    id, head (magic, signed header, hop part as it would arrive)
    R -> O  RelayTake     the payload offset to start from (bytes a cut transfer left), or
            RelayRefuse   why not (expired, hop limit, duplicate, storage depleted, invalid, ...):
                          decided on the head alone, before any payload byte is sent
    O -> R  RelayChunk    payload bytes in order, CHUNK at a time, the highest priority first
    R -> O  RelayReceived how far it has come, every RECEIVED_EVERY bytes (O knows R is alive)
    R -> O  RelayCustody  whole, verified (signature, payload BLAKE3, id) and durable: O may
                          delete its copy. A custody acknowledgement is never acknowledged.
            RelayRefuse   the payload did not verify, or the disk filled: O keeps custody

Either end offers (a client depositing, a server whose client collects its
mailbox: Hello's FLAG_COLLECT). An end with nothing more to offer and no
offer unsettled says ``RelayOver``; once both have, the client says ``Bye``
and both finish. A cut leaves what arrived of an envelope for the next
offer of the same id, from whichever node, to resume.
"""
from __future__ import annotations

from typing import Protocol

from . import frames as F
from .frames import ProtocolError

CHUNK = 256 << 10                # payload bytes per RelayChunk: a higher priority overtakes at the next one
LOOK_EVERY = 8                   # chunks sent between looks for new envelopes to offer (an urgent arrival)
RECEIVED_EVERY = 1 << 20         # payload bytes between RelayReceived frames: on a 1 Mbit/s link one each 8 s,
#                                  well inside the sender's 30 s without news from the peer
PUMP_AGAIN = 0.005               # s: while payload waits to be sent, the timer asks for it again (a transport
#                                  whose buffer filled below its pause mark would otherwise not ask)
OFFERS_AHEAD = 16                # offers unsettled at once from one end
MAX_INGEST = 64                  # envelopes one end receives at once (more offered: a protocol error)
SEND_BUFFER = 1 << 20            # control-stream bytes queued before the transport takes them


class Outgoing(Protocol):
    """What one end offers (its spool, seen by this peer)."""

    def next_offers(self, n: int, offered: set) -> list[tuple[str, bytes, int]]:
        """Up to ``n`` envelopes to offer, not in ``offered``: (id hex, head, priority rank 0-2)."""

    def payload(self, key: str, offset: int, n: int) -> bytes:
        """``n`` payload bytes (fewer at its end) of ``key`` from ``offset``."""

    def payload_length(self, key: str) -> int: ...

    def handed_over(self, key: str) -> None:
        """The peer has custody of ``key``."""

    def refused(self, key: str, reason: str, detail: str) -> None:
        """The peer did not take ``key``: this end keeps it."""


class Incoming(Protocol):
    """Where what the peer offers goes (spool.Spool's begin/write/finish/abandon)."""

    def begin(self, head: bytes, key: str) -> int: ...

    def write(self, key: str, offset: int, data) -> None: ...

    def finish(self, key: str) -> None: ...

    def abandon(self, key: str, keep: bool = True) -> None: ...


class _Out:
    __slots__ = ("key", "rank", "length", "offset", "taken")

    def __init__(self, key: str, rank: int, length: int):
        self.key, self.rank, self.length, self.offset, self.taken = key, rank, length, 0, False


class Exchange:
    """One end of a relay exchange over ``session`` (its ``send``,
    ``buffered``, ``finish``; a client's says Bye at the end)."""

    def __init__(self, session, outgoing: Outgoing | None, incoming: Incoming | None, client: bool):
        self.s, self.outgoing, self.incoming, self.client = session, outgoing, incoming, client
        self.out: dict[str, _Out] = {}           # offered, not settled
        self.offered: set[str] = set()           # every id offered in this exchange (each once)
        self.into: dict[str, int] = {}           # id -> payload length: taken from the peer, arriving
        self.over_sent = self.peer_over = False
        self.stats = {"handed_over": 0, "handed_bytes": 0, "taken": 0, "taken_bytes": 0, "resumed_bytes": 0,
                      "refused_by_peer": 0, "refused_here": 0}
        self.refusals: list[dict] = []           # what the peer refused, and why (the first 100)
        self._sent = 0                           # chunks since the last look for new offers
        self._now = 0.0                          # the clock as last given (frames, timer)
        self._told: dict[str, int] = {}          # id -> payload offset last told the peer (RelayReceived)
        self._offer_more()

    # -- the session's surface -----------------------------------------------------------
    def frame(self, frame, now: float) -> None:
        self._now = now
        t = type(frame)
        if t is F.RelayOffer:
            self._offered(frame)
        elif t is F.RelayChunk:
            self._chunk(frame)
        elif t is F.RelayTake:
            o = self._mine(frame.envelope_id, "RelayTake")
            if o.taken or frame.offset > o.length:
                raise ProtocolError(f"RelayTake of {o.key[:16]} at {frame.offset} of {o.length}")
            o.taken, o.offset = True, frame.offset      # (at its length: all there already, custody comes next)
        elif t is F.RelayRefuse:
            o = self._mine(frame.envelope_id, "RelayRefuse")
            del self.out[o.key]
            reason, detail = frame.reason.decode(errors="replace"), frame.detail.decode(errors="replace")
            self.stats["refused_by_peer"] += 1
            if len(self.refusals) < 100:
                self.refusals.append({"id": o.key, "reason": reason, "detail": detail})
            self.outgoing.refused(o.key, reason, detail)
            self._offer_more()
        elif t is F.RelayCustody:
            o = self._mine(frame.envelope_id, "RelayCustody")
            if not o.taken or o.offset != o.length:
                raise ProtocolError(f"RelayCustody of {o.key[:16]} before all of it was sent")
            del self.out[o.key]
            self.stats["handed_over"] += 1
            self.stats["handed_bytes"] += o.length
            self.outgoing.handed_over(o.key)
            self._offer_more()
        elif t is F.RelayReceived:
            o = self._mine(frame.envelope_id, "RelayReceived")
            if not o.taken or frame.offset > o.offset:
                raise ProtocolError(f"RelayReceived of {o.key[:16]} at {frame.offset}, beyond what was sent")
        elif t is F.RelayOver:
            if self.peer_over:
                raise ProtocolError("RelayOver twice")
            self.peer_over = True
            self._maybe_end()
        elif t is F.Bye and not self.client:
            if self.into or not self.peer_over:
                raise ProtocolError("Bye before the exchange was over")
            self._finish()
        else:
            raise ProtocolError(f"{t.__name__} in a relay exchange")

    def pump(self) -> None:
        """Payload chunks while the stream takes them: always the most urgent
        envelope taken (priority, then the order offered), so a critical one
        offered behind a large normal one overtakes it at the next chunk.
        Every LOOK_EVERY chunks the spool is asked again for envelopes to
        offer: one arriving while a large one is sent is offered then, not
        after it."""
        while self.s.buffered < SEND_BUFFER:
            if self._sent >= LOOK_EVERY:
                self._sent = 0
                self._offer_more()
            o = min((o for o in self.out.values() if o.taken and o.offset < o.length), key=lambda o: o.rank,
                    default=None)
            if o is None:
                break
            data = self.outgoing.payload(o.key, o.offset, min(CHUNK, o.length - o.offset))
            if not data:
                raise ProtocolError(f"{o.key[:16]}: its payload ended early here")
            self.s.send(F.RelayChunk(bytes.fromhex(o.key), o.offset, data))
            o.offset += len(data)
            self._sent += 1

    def timer(self, now: float) -> None:
        self._now = now

    def next_timer(self) -> float | None:
        if any(o.taken and o.offset < o.length for o in self.out.values()):
            return self._now + PUMP_AGAIN
        return None

    def abort(self, exc=None) -> None:
        """The exchange failed or was cut: what arrived of each envelope is
        kept for a resume; nothing offered changes hands."""
        for key in list(self.into):
            self.incoming.abandon(key, keep=True)
        self.into.clear()

    @property
    def result(self) -> dict:
        return {**self.stats, "refusals": self.refusals}

    # -- receiving ---------------------------------------------------------------------
    def _offered(self, f: F.RelayOffer) -> None:
        from ..errors import ResyncError
        key = f.envelope_id.hex()
        if self.incoming is None:
            raise ProtocolError("an envelope offered to an end that takes none")
        if self.peer_over:
            raise ProtocolError("an envelope offered after RelayOver")
        if key in self.into:
            raise ProtocolError(f"{key[:16]} offered twice")
        if len(self.into) >= MAX_INGEST:
            raise ProtocolError(f"over {MAX_INGEST} envelopes offered at once")
        try:
            offset = self.incoming.begin(f.head, key)
        except ResyncError as exc:
            self._refuse(key, exc)
            return
        from ..relay.envelope import parse_head
        length = parse_head(f.head).header.payload_length
        self.into[key] = length
        self.stats["resumed_bytes"] += offset
        self.s.send(F.RelayTake(f.envelope_id, offset))
        if offset == length:
            self._complete(key)

    def _chunk(self, f: F.RelayChunk) -> None:
        from ..errors import ResyncError
        key = f.envelope_id.hex()
        length = self.into.get(key)
        if length is None:
            raise ProtocolError(f"RelayChunk of {key[:16]}, which is not being received")
        try:
            self.incoming.write(key, f.offset, f.data)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        except ResyncError as exc:              # (a full disk: refused, the partial removed)
            del self.into[key]
            self._refuse(key, exc)
            return
        end = f.offset + len(f.data)
        if end == length:
            self._told.pop(key, None)
            self._complete(key)
        elif end - self._told.get(key, 0) >= RECEIVED_EVERY:
            self._told[key] = end
            self.s.send(F.RelayReceived(f.envelope_id, end))

    def _complete(self, key: str) -> None:
        from ..errors import ResyncError
        length = self.into.pop(key)
        try:
            self.incoming.finish(key)
        except ResyncError as exc:
            self._refuse(key, exc)
            return
        self.stats["taken"] += 1
        self.stats["taken_bytes"] += length
        self.s.send(F.RelayCustody(bytes.fromhex(key)))

    def _refuse(self, key: str, exc) -> None:
        reason = getattr(exc, "reason", None) or ("invalid" if type(exc).__name__ == "EnvelopeError" else "error")
        self.stats["refused_here"] += 1
        self.s.send(F.RelayRefuse(bytes.fromhex(key), reason.encode(), str(exc).encode()))

    # -- offering ----------------------------------------------------------------------
    def _mine(self, envelope_id: bytes, what: str) -> _Out:
        o = self.out.get(envelope_id.hex())
        if o is None:
            raise ProtocolError(f"{what} of an envelope not offered")
        return o

    def _offer_more(self) -> None:
        if self.outgoing is not None and not self.over_sent:
            room = OFFERS_AHEAD - len(self.out)
            if room > 0:
                for key, head, rank in self.outgoing.next_offers(room, self.offered):
                    self.offered.add(key)
                    self.out[key] = _Out(key, rank, self.outgoing.payload_length(key))
                    self.s.send(F.RelayOffer(bytes.fromhex(key), head))
        if not self.out and not self.over_sent:
            self.over_sent = True
            self.s.send(F.RelayOver())
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self.client and self.over_sent and self.peer_over and not self.into and not self.s.finished:
            self.s.send(F.Bye())
            self._finish()

    def _finish(self) -> None:
        self.abort()                            # (nothing half-received is left open; none should be)
        self.s.finish(self.result)
