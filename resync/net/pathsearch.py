"""The path MTU search of one connection, driven from its link: the fate of
the probes QUIC learnt of, the next probe, and the packet size the
connection, its pacer, the rate controller and the session use
(``resync.net.pmtu`` holds the search itself, sans-I/O; docs/protocol.md
"Path MTU")."""
from __future__ import annotations

from aioquic.asyncio import QuicConnectionProtocol

from ..protocol.session import shard_size_for
from ..protocol.shards import PROBE
from . import pmtu
from .pmtu import MAX_DATAGRAM_SIZE

PROBE_OVERHEAD = 30               # a probe packet's bytes besides its padding datagram's: short header
#                                   (1 + 8-byte connection ID + 4-byte packet number), AEAD tag (16), frame type (1)
SETTLE_WAIT = 0.25                # s (or SETTLE_RTTS RTTs) after the handshake a sender waits at most ...
SETTLE_RTTS = 4                   # ... for the path MTU search before it cuts files to the minimum's shards


class PathSearch:
    """The link ``link``'s path MTU search: ``step`` after every packet
    event (from the link's transmit); ``datagram_size``: bytes of UDP
    payload per packet now."""

    def __init__(self, link):
        self.link = link
        self.pmtu = pmtu.PathMTU((MAX_DATAGRAM_SIZE,))
        self.datagram_size = pmtu.BASE
        self._settle_by: float | None = None    # when a sender stops waiting for the search
        self._done = False                      # the search is over for good (every size confirmed)

    def step(self, now: float, cc, s) -> None:
        """The fate of the probes QUIC learnt since the last call, the next
        probe once the handshake is done, and the session ``s`` told the
        shard size and whether the search is settled (or SETTLE_WAIT passed:
        a sender waits no longer). ``cc``: the rate controller, or None
        (another controller: no probes, the minimum)."""
        if self._done:
            return                              # (the common case, once per transmit: nothing to do)
        if cc is None:
            s.shard_size, s.path_settled = shard_size_for(self.datagram_size), True
            self._done = True
            return
        link = self.link
        for acked, size in cc.probes:
            if acked:
                if self.pmtu.acked(size):
                    self._set_datagram_size(self.pmtu.size, cc)
            else:
                self.pmtu.lost_probe(size, now)
        cc.probes.clear()
        if link.handshake_done and s.sends_content:       # (only the sender's packets carry content)
            if self._settle_by is None:
                self._settle_by = now + max(SETTLE_WAIT, SETTLE_RTTS * link.rtt())
                link._loop.call_at(self._settle_by, link.drive)
            decided = cc.packets_acked + cc.packets_lost
            size = self.pmtu.probe(now, link.rtt(), cc.packets_lost / decided if decided else 0.0)
            if size is not None and not self._send_probe(size, cc):
                self.pmtu.unsent()
        s.shard_size = shard_size_for(self.datagram_size)
        s.path_settled = self.pmtu.settled or (self._settle_by is not None and now >= self._settle_by)
        # every size confirmed: nothing will change (a search that failed is tried again later)
        self._done = self.pmtu.settled and self.pmtu.target is None

    def _send_probe(self, size: int, cc) -> bool:
        """Send one packet of ``size`` bytes: a padding datagram that fills it
        (shards.PROBE), built alone — QUIC's datagram queue empty, the
        window opened for this one packet only, the connection's packet size
        raised for this call only. False if it could not leave now (the
        queue was not empty, the pacer or an ACK took the room): asked for
        again later."""
        quic = self.link._quic
        pending = getattr(quic, "_datagrams_pending", None)
        if pending is None or pending:
            return False
        probe = PROBE + bytes(size - PROBE_OVERHEAD - len(PROBE))
        quic.send_datagram_frame(probe)
        saved = quic._max_datagram_size, cc.congestion_window
        quic._max_datagram_size, cc.congestion_window = size, cc.bytes_in_flight + size
        try:
            QuicConnectionProtocol.transmit(self.link)
        finally:
            quic._max_datagram_size, cc.congestion_window = saved
            sent = not (pending and pending[0] is probe)
            if not sent:
                pending.popleft()
        return sent

    def _set_datagram_size(self, size: int, cc) -> None:
        """Packets of ``size`` bytes from now on (a probe of it was
        acknowledged): QUIC's packet builder, its pacer and the rate
        controller (their per-packet figures), the session's shards."""
        quic = self.link._quic
        self.datagram_size = size
        quic._max_datagram_size = size
        pacer = getattr(getattr(quic, "_loss", None), "_pacer", None)
        inner = getattr(pacer, "_pacer", pacer)             # (RatePacer wraps aioquic's)
        if inner is not None and hasattr(inner, "_max_datagram_size"):
            inner._max_datagram_size = size
        cc.set_datagram_size(size)
