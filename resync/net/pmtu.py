"""Packetization-layer path MTU discovery for one QUIC connection, free of I/O.

QUIC must work on any path that carries 1,200-byte UDP payloads (RFC 9000
section 14): a connection starts at that size. Larger packets are used only
once one of that size has been acknowledged: DPLPMTUD (RFC 8899, section 5;
for QUIC RFC 9000 section 14.3). A path that silently drops larger packets (a
tunnel, a firewall eating ICMP: the "black hole" of RFC 2923) then costs a few
lost probes, never the connection.

``PathMTU`` holds the search; ``resync.net.link`` sends the probes (a packet
filled to the probed size with one padding datagram) and reports each one's
fate, which QUIC's own acknowledgements tell (a probe is an ack-eliciting
packet). The search walks ``sizes`` upwards: a size is confirmed by one
acknowledged probe, and given up after MAX_PROBES lost probes (RFC 8899's
MAX_PROBES; on a path that loses more than LOSSY of its packets, up to
LOSSY_PROBES, so that random loss is not taken for the size: 3 probes all
lost at 33 % loss happen in 4 % of searches). Probes are PROBE_INTERVAL
apart at least (or one RTT: a probe's fate is known about an RTT after it
left). After a failed size the search ends; it starts again RAISE_INTERVAL
later (RFC 8899's PMTU_RAISE_TIMER) while the connection lasts.

A confirmed size is not lowered by later loss here: resync's content
carries parity and repairs, and a path whose MTU shrinks mid-transfer is
recovered by the connection's retry (a new connection searches again).
"""
from __future__ import annotations

BASE = 1200                       # bytes: QUIC's smallest maximum datagram size (RFC 9000 section 14)
MAX_DATAGRAM_SIZE = 1350          # bytes of UDP payload per packet once the path is known to carry them
MAX_PROBES = 3                    # lost probes of one size before it is given up (RFC 8899 section 5.1.2)
LOSSY = 0.05                      # a path losing more than this share of packets ...
LOSSY_PROBES = 6                  # ... gives each size this many probes
PROBE_INTERVAL = 0.05             # s between probes of a search, at least (and at least an RTT)
RAISE_INTERVAL = 600.0            # s before a search that failed starts again (RFC 8899: PMTU_RAISE_TIMER)


class PathMTU:
    """The search for the largest of ``sizes`` (bytes of UDP payload,
    ascending, each above ``base``) the path carries. ``size`` is the
    largest confirmed so far (``base`` to start with); ``settled`` says
    whether the search has finished (every size confirmed or one given up),
    after which nothing is probed until ``RAISE_INTERVAL`` has passed."""

    def __init__(self, sizes=(1350,), base: int = BASE):
        if any(s <= base for s in sizes) or list(sizes) != sorted(sizes):
            raise ValueError(f"probe sizes must rise above {base}: {sizes}")
        self.base = self.size = base
        self.sizes = tuple(sizes)
        self.settled = not self.sizes
        self.in_flight: int | None = None       # the size of the probe awaiting its fate
        self.lost = 0                           # probes of the size being searched lost in a row
        self.probes = 0                         # probes sent in all
        self.next_at = 0.0                      # when the next probe may go (the clock of the caller)
        self.search_again_at: float | None = None
        self._loss = 0.0                        # the path's loss when the probe in flight left

    @property
    def target(self) -> int | None:
        """The size being searched, or None."""
        higher = [s for s in self.sizes if s > self.size]
        return higher[0] if higher else None

    def probe(self, now: float, rtt: float, loss: float = 0.0) -> int | None:
        """The size of the probe to send now, or None. The caller sends it
        and then reports ``acked`` or ``lost`` (or ``unsent`` if it could
        not leave)."""
        if self.settled:
            if self.search_again_at is None or now < self.search_again_at or self.target is None:
                return None
            self.settled, self.search_again_at, self.lost = False, None, 0
        if self.in_flight is not None or now < self.next_at or self.target is None:
            return None
        self.in_flight = self.target
        self.probes += 1
        self.next_at = now + max(PROBE_INTERVAL, rtt)
        self._loss = loss
        return self.in_flight

    def unsent(self) -> None:
        """The probe ``probe`` returned could not be sent (the window or the
        pacer held it): it is asked for again on the next ``probe``."""
        if self.in_flight is not None:
            self.in_flight = None
            self.probes -= 1
            self.next_at = 0.0

    def acked(self, sent_bytes: int) -> bool:
        """A packet of ``sent_bytes`` was acknowledged; True if that
        confirmed a larger size (the caller raises its packets to ``size``)."""
        if sent_bytes <= self.size:
            return False
        confirmed = max(s for s in (self.size, *self.sizes) if s <= sent_bytes)
        if confirmed <= self.size:
            return False
        self.size = confirmed
        self.lost = 0
        if self.in_flight is not None and self.in_flight <= confirmed:
            self.in_flight = None
            self.next_at = 0.0                  # the next size at once
        if self.target is None:
            self.settled = True
        return True

    def lost_probe(self, sent_bytes: int, now: float) -> None:
        """A packet of ``sent_bytes`` (larger than ``size``: a probe) was
        declared lost."""
        if sent_bytes <= self.size or self.in_flight is None:
            return
        self.in_flight = None
        self.lost += 1
        if self.lost >= (LOSSY_PROBES if self._loss > LOSSY else MAX_PROBES):
            self.settled = True                 # the path does not carry it (the black hole)
            self.search_again_at = now + RAISE_INTERVAL
