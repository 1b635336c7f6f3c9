"""What keeps one connection's packets getting through, driven from its
link: a PING after a tail loss (aioquic's own probe timeout doubles), a
keepalive PING when idle, PINGs the owner asks for (is the peer alive?),
and packets sent twice on a lossy path while little is in flight."""
from __future__ import annotations

import time

from .congestion import controller_of

PROBE_MIN = 0.02                  # s: the shortest interval between PINGs for a tail loss
KEEPALIVE = 5.0                   # s without a packet sent after which an idle connection PINGs
REDUNDANT_LOSS = 0.02            # on a path losing more than this share of packets ...
REDUNDANT_FLIGHT = 8              # ... packets sent with fewer than this many in flight go out twice


class Liveness:
    """The link ``link``'s PINGs and redundant sends."""

    def __init__(self, link):
        self.link = link
        self._timer = None
        self._pings = 0
        self.pings_acked: set[int] = set()      # numbers of ping()s the peer acknowledged

    def arm(self) -> None:
        """Look again in an RTT (at most PROBE_MIN), unless already due."""
        if self._timer is None:
            self._timer = self.link._loop.call_later(max(self.link.rtt(), PROBE_MIN), self._on_probe)

    def ping(self) -> int:
        """An ack-eliciting PING now (a live peer acknowledges it within an
        RTT); returns its number, found in ``pings_acked`` once it is."""
        link = self.link
        self._pings += 1
        if not link.closed_event.is_set():
            link._quic.send_ping(self._pings)
            link.transmit()
        return self._pings

    def redundant(self, cc) -> bool:
        """Whether this transmit's packets go out twice: on a path that has
        lost more than REDUNDANT_LOSS of the packets so far, while fewer
        than REDUNDANT_FLIGHT are in flight — the control exchanges before
        content flows and after it (Welcome, listing, Want, the last File,
        Done, Bye), where each lost packet costs a round trip or more (at
        33 % loss the exchange before the first shard took ~0.5 s). QUIC
        drops the copy it has seen; at most a few packets per round trip."""
        link = self.link
        return cc is not None and cc.packets_sent >= 4 and \
            cc.packets_lost > REDUNDANT_LOSS * cc.packets_sent and \
            cc.bytes_in_flight < REDUNDANT_FLIGHT * link.paths.datagram_size and \
            time.monotonic() - link.last_shard_at > link.rtt()    # (not a receiver's Acks mid-transfer)

    def _on_probe(self) -> None:
        """While anything is unacknowledged, a PING once no packet has gone
        out for an RTT. aioquic finds a lost packet only from later packets
        being acknowledged, or after a probe timeout that doubles with each
        one in a row: a lost control frame (Hello, Challenge, the last File
        or Done) took 7 s to come through at 33 % loss. A PING acknowledged
        lets it declare the packet lost and send it again within ~1 RTT.
        The PING is a probe, sent even when the window is full (RFC 9002
        section 7): in an outage the window is full of lost packets, and a
        plain PING waited for aioquic's doubling probe timeout — the rate
        came back ~1 s after a 2 s blackout ended, not within an RTT."""
        self._timer = None
        link = self.link
        s = link.session
        if s is None or s.finished or link.closed_event.is_set():
            return
        if not link.handshake_done:
            # (a PING in the handshake's packet spaces would postpone aioquic's probe timeout,
            # the only thing that sends lost CRYPTO data again: the handshake stalled)
            self.arm()
            return
        cc = controller_of(link._quic)
        quiet = time.monotonic() - link.last_send()
        if cc is not None and cc.bytes_in_flight > 0 and quiet >= link.rtt():
            link._quic._send_probe()            # (aioquic's PTO probe: a PING let past the window)
            link.transmit()
        elif quiet >= KEEPALIVE:
            # nothing to send for a while (one end waits for the other): a PING keeps a NAT's
            # mapping, moves the connection to a rebound address at once, and makes a server
            # that restarted answer with a stateless reset
            link._quic.send_ping(0)
            link.transmit()
        self.arm()
