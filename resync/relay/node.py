"""A relay node's two ends of an exchange (protocol.relay), over its spool
(store.spool): what it offers a peer, and where what a peer offers goes.

Rules (docs/relay.md "Custody on the wire"):

- an envelope is offered to a next hop with its hop part advanced: one more
  hop, this node as the previous node, its age plus the time it spent here;
- never offered back to the node it came from (RFC 9171's loop rule; a
  longer loop meets the next node's tombstone: refused as a duplicate);
- offered to a device collecting its mailbox: every envelope held for it,
  whatever its backoff (the device is here now);
- the peer's custody acknowledgement gives it up (``forwarded``, or
  ``delivered`` when the peer is its destination); a refusal leaves it here,
  tried again after the spool's backoff — except ``duplicate`` from its
  destination, which holds or applied it already: given up as delivered
  (a destination that dropped it — expired, removed — says ``removed``).
"""
from __future__ import annotations

import time

from ..store.spool import PRIORITY_ORDER, Held, Spool


def _now_ms() -> int:
    return int(time.time() * 1000)


class SpoolOut:
    """What this node offers ``peer`` (a device hash, 32 bytes) from its
    spool: the envelopes ``wanted`` selects (Held -> bool), in priority
    order, those in backoff only when ``collecting`` (the peer is their
    destination, calling in for its mailbox)."""

    def __init__(self, spool: Spool, own: bytes, peer: bytes, wanted=None, collecting: bool = False):
        self.spool, self.own, self.peer = spool, own, peer
        self.wanted = wanted or (lambda h: True)
        self.collecting = collecting
        self.handed: list[str] = []

    def candidates(self, now: int) -> list[Held]:
        """What is to be offered now, in order (spool.due)."""
        peer = self.peer.hex()
        if self.collecting:
            return self.spool.due(now, destination=peer, backoff=False)
        return [h for h in self.spool.due(now) if h.previous != peer and self.wanted(h)]

    def next_offers(self, n: int, offered: set) -> list[tuple[str, bytes, int]]:
        from .envelope import HEAD_SIZE, Hops, parse_head
        now = _now_ms()
        out = []
        for h in self.candidates(now):
            if len(out) == n:
                break
            if h.id in offered:
                continue
            head = self.spool.head(h.id)
            hops = parse_head(head).hops
            age = hops.age + max(0, now - h.received)
            moved = Hops(min(255, hops.count + 1), self.own, age).to_bytes()
            out.append((h.id, head[:HEAD_SIZE - len(moved)] + moved, PRIORITY_ORDER[h.priority]))
        return out

    def payload(self, key: str, offset: int, n: int) -> bytes:
        return self.spool.payload(key, offset, n)

    def payload_length(self, key: str) -> int:
        from .envelope import HEAD_SIZE
        return self.spool.index[key].size - HEAD_SIZE

    def handed_over(self, key: str) -> None:
        h = self.spool.index.get(key)
        delivered = h is not None and h.destination == self.peer.hex()
        self.spool.remove(key, "delivered" if delivered else "forwarded")
        self.handed.append(key)

    def refused(self, key: str, reason: str, detail: str) -> None:
        h = self.spool.index.get(key)
        if h is None:
            return
        if reason == "duplicate" and h.destination == self.peer.hex():
            self.spool.remove(key, "delivered")         # (its destination has it already)
            self.handed.append(key)
            return
        self.spool.failed(key, f"refused by {self.peer.hex()[:16]}: {reason}: {detail}")


class SpoolIn:
    """Where what ``peer`` offers goes: this node's spool (custody taken
    there; an envelope for this node itself is delivered from it later)."""

    def __init__(self, spool: Spool, peer: bytes, on_taken=None):
        self.spool, self.peer, self.on_taken = spool, peer, on_taken

    def begin(self, head: bytes, key: str) -> int:
        return self.spool.begin(head, key, self.peer)

    def write(self, key: str, offset: int, data) -> None:
        self.spool.write(key, offset, data)

    def finish(self, key: str) -> None:
        self.spool.finish(key)
        if self.on_taken is not None:
            self.on_taken()

    def abandon(self, key: str, keep: bool = True) -> None:
        self.spool.abandon(key, keep)


def call(remote, identity, spool: Spool, *, peer_id: str | None, deposit: bool = True, collect: bool = False,
         known_peers=None, accept_new: bool = False, timeout: float = 60.0, retry_for: float = 60.0,
         transport: str = "auto", on_retry=None) -> tuple[dict, SpoolOut | None, SpoolIn]:
    """One relay exchange with the node at ``remote`` (net.url.Remote, no
    module), trusted as ``peer_id`` (or known_peers): this node's due
    envelopes handed over (``deposit``), and with ``collect`` those it holds
    for this device taken into ``spool``; retried as a transfer is (a cut
    resumes each envelope where it stopped). (result, the offering end, the
    receiving end). The errors of a transfer (exit codes as `resync sync`)."""
    from ..identity import certificate_device_id
    from ..net.client import Transfer, run
    from ..protocol.session import Options, RelayClientSession
    from .keys import device_hash
    own = device_hash(identity.device_id)
    ends: dict = {}

    def session(identity, cert: bytes):
        server = device_hash(certificate_device_id(cert))
        ends["out"] = SpoolOut(spool, own, server) if deposit else None
        ends["in"] = SpoolIn(spool, server) if collect else None     # (nothing taken that was not asked for)
        return RelayClientSession(identity, cert, ends["out"], ends["in"], collect)
    t = Transfer(remote, True, "", Options(), peer_id=peer_id, accept_new=accept_new, timeout=timeout,
                 retry_for=retry_for, known_peers=known_peers, transport=transport, session=session)
    s = run(t, identity, on_retry=on_retry)
    return dict(s.result, transfer_id=s.transfer_id, attempts=s.attempts), ends.get("out"), ends.get("in")
