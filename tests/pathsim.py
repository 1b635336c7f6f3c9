"""A packet-level model of one bottleneck, for testing the rate controller
(resync.net.congestion) with a hand-moved clock: no sockets, no aioquic.

Each flow's packets (MDS bytes) are paced as aioquic paces them (at the
controller's ``pacing_rate``, or window / smoothed RTT before it has one)
and held by its window; they pass a drop-tail FIFO served at the link rate
(queue_ms of it, as tests/linkemu's forwarder), then random loss on the wire
(after the rate cap, as linkemu: the payload limit is (1 - p) x rate), then
the base RTT. Acknowledgements come back without loss or delay, and each
feeds the controller an RTT sample; a lost packet is declared lost when
the packet after it would have been acknowledged plus 1/8 of the RTT (RFC
9002's time threshold, roughly). ``outages``: (start, end) times in which
the wire loses every packet.
"""
from __future__ import annotations

import heapq
import math
import random
from types import SimpleNamespace

MDS = 1350


class Flow:
    """A sender. ``app_limited(t)``: True while the application has nothing
    to send (a handshake, a listing): the flow then sends only ``trickle``
    packets per RTT (or one every ``quiet`` s: a sender waiting for its
    peer) and tells the controller, as SessionLink does. ``ack_delay(t)``:
    the peer's processing before it acknowledges a packet sent at t (s)."""

    def __init__(self, controller, start: float = 0.0, app_limited=None, trickle: int = 2, quiet: float = 0.0,
                 ack_delay=None):
        self.cc, self.start = controller, start
        self.app_limited = app_limited or (lambda t: False)
        self.trickle = trickle
        self.quiet = quiet                      # s between app-limited sends if set (else an RTT / trickle)
        self.ack_delay = ack_delay or (lambda t: 0.0)   # s the peer holds the ack of a packet sent at t
        self.next_send = start
        self.delivered = []                    # (time, bytes) delivered to the receiver
        self._trickle_at = start

    def pacing_rate(self) -> float:
        rate = self.cc.pacing_rate
        if rate is None:
            rate = self.cc.congestion_window / max(self.cc.srtt or 0.1, 1e-3)
        return rate

    def rate(self, lo: float, hi: float) -> float:
        """Delivered bytes/s between times lo and hi."""
        return sum(b for t, b in self.delivered if lo <= t < hi) / (hi - lo)


class Path:
    """One bottleneck: ``rate`` bytes/s, ``rtt`` s, random ``loss``,
    ``queue_ms`` of drop-tail queue at the rate."""

    def __init__(self, rate: float, rtt: float, loss: float = 0.0, queue_ms: float = 100.0,
                 seed: int = 1, outages=()):
        self.rate, self.rtt, self.loss = rate, rtt, loss
        self.queue_bytes = rate * queue_ms / 1000
        self.rng = random.Random(seed)
        self.outages = list(outages)
        self.queue_delays: list[tuple[float, float]] = []     # (time, s waited in the queue)
        self._free_at = 0.0
        self._events: list = []
        self._seq = 0
        self._now = 0.0

    def _dead(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.outages)

    def run(self, flows: list[Flow], until: float) -> None:
        """Move the clock to ``until`` (s; a later call goes on from there)."""
        events = self._events                   # (time, seq, kind, flow, packet)

        def push(t, kind, flow, packet):
            self._seq += 1
            heapq.heappush(events, (t, self._seq, kind, flow, packet))

        now = self._now
        while now < until:
            # the next thing to happen: an event, or a flow's next paced send
            t_send, sender = math.inf, None
            for f in flows:
                if f.cc.bytes_in_flight + MDS <= f.cc.congestion_window:
                    t = max(f.next_send, f.start)
                    if f.app_limited(t):
                        t = max(t, f._trickle_at)
                    if t < t_send:
                        t_send, sender = t, f
            t_event = events[0][0] if events else math.inf
            now = min(t_send, t_event)
            if now >= until or now == math.inf:
                now = until
                break
            if t_event <= t_send:
                _, _, kind, f, packet = heapq.heappop(events)
                if kind == "ack":
                    f.cc.on_rtt_measurement(now=now, rtt=now - packet.sent_time)
                    f.cc.on_packet_acked(now=now, packet=packet)
                    f.delivered.append((now, packet.sent_bytes))
                else:
                    f.cc.on_packets_lost(now=now, packets=[packet])
                continue
            f = sender
            self._seq += 1
            packet = SimpleNamespace(sent_bytes=MDS, sent_time=now, packet_number=self._seq)
            f.cc.on_packet_sent(packet=packet)
            if f.app_limited(now):
                f.cc.on_app_limited()
                f._trickle_at = now + (f.quiet or self.rtt / f.trickle)
            f.next_send = now + MDS / f.pacing_rate()
            # the bottleneck: drop-tail queue, then the wire
            backlog = max(self._free_at - now, 0.0) * self.rate
            if backlog + MDS > self.queue_bytes:
                push(now + self.rtt * 1.125, "lost", f, packet)
                continue
            start = max(now, self._free_at)
            self._free_at = start + MDS / self.rate
            self.queue_delays.append((now, start - now))
            if self._dead(self._free_at) or self.rng.random() < self.loss:
                push(self._free_at + self.rtt * 1.125, "lost", f, packet)
            else:
                push(self._free_at + self.rtt + f.ack_delay(now), "ack", f, packet)
        self._now = until

    def queue_delay(self, lo: float, hi: float) -> float:
        """The mean time (s) packets sent between lo and hi waited in the queue."""
        waits = [w for t, w in self.queue_delays if lo <= t < hi]
        return sum(waits) / max(len(waits), 1)
