"""What a link's session sends, fed to QUIC: its control bytes to the
stream, its shards topped up within QUIC's datagram queue (QUIC paces and
congestion-controls them; resync's window and acknowledgements bound how far
the sender runs ahead) and a --bwlimit token bucket; and the losses QUIC
declared, reported to the session (which sizes its parity by them)."""
from __future__ import annotations

import time

from .pmtu import MAX_DATAGRAM_SIZE

DATAGRAM_QUEUE = 64               # shards queued in QUIC beyond what it is sending
LOSS_SAMPLE = 500                # packets per loss report to the session (a moving average's sample)
LOSS_FIRST_SAMPLE = 100          # ... and for its first, taken as it is (at 50 it read low: losses are declared late)


class TokenBucket:
    """At most ``rate`` bytes (``unit`` "bytes": --bwlimit, the daemon's
    limits) or shards (``unit`` "shards") per second, in bursts of a tenth
    of a second (at least one packet, or one shard: a rate under 13.5 KB/s
    still moves). A rate of 0 is no limit. ``set_rate`` changes it while
    shards flow (the daemon's API: PUT /api/v1/limits)."""

    def __init__(self, rate: float, unit: str = "bytes"):
        if unit not in ("bytes", "shards"):
            raise ValueError(f"unit {unit!r}: bytes or shards")
        self.unit = unit
        self.tokens = -1.0
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        self.rate, self.last = float(rate or 0), time.monotonic()
        self.burst = max(self.rate / 10, MAX_DATAGRAM_SIZE if self.unit == "bytes" else 1)
        self.tokens = self.burst if self.tokens < 0 else min(self.tokens, self.burst)

    def _cost(self, size: int) -> int:
        return max(size, 1) if self.unit == "bytes" else 1

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def available(self, want: int, size: int) -> int:
        """How many of ``want`` shards of ``size`` bytes may go now."""
        if not self.rate:
            return want
        self._refill()
        return max(0, min(want, int(self.tokens // self._cost(size))))

    def take(self, n: int, size: int) -> None:
        if self.rate:
            self.tokens -= n * self._cost(size)

    def allow(self, want: int, size: int) -> int:
        n = self.available(want, size)
        self.take(n, size)
        return n

    def refund(self, n: int, size: int) -> None:
        """``n`` shards of ``size`` bytes taken by ``allow`` but not sent."""
        self.take(-n, size)

    def ready(self) -> bool:
        """Refilled, whether anything may go now (the TLS stream's shards are
        larger than a burst: one goes whenever the bucket is not in debt,
        ``spend`` takes it, and the debt holds the next back)."""
        if not self.rate:
            return True
        self._refill()
        return self.tokens > 0

    def spend(self, size: int) -> None:
        self.take(1, size)


def limiting(bucket: TokenBucket | None, limits) -> list[TokenBucket]:
    """A feeder's buckets that limit it now: ``limits`` with a rate, and its own ``bucket``."""
    out = [b for b in limits if b.rate]
    return out + [bucket] if bucket is not None else out


def allowance(buckets, want: int, size: int) -> int:
    """How many of ``want`` shards of ``size`` bytes every one of ``buckets``
    lets go now, taken from each."""
    n = want
    for b in buckets:
        n = min(n, b.available(want, size))
    for b in buckets:
        b.take(n, size)
    return n


class Feeder:
    """The link ``link``'s session fed to its QUIC connection. ``bucket``:
    the --bwlimit of this end (a push's, set by the client), or the one the
    session asks for (a pull's, from its Hello; the server's own)."""

    def __init__(self, link):
        self.link = link
        self.bucket: TokenBucket | None = None
        self.limits: list[TokenBucket] = []     # more buckets (a daemon's: its own and this transfer's)
        self.starved = False                    # the buckets held shards back: look again soon
        self._decided_seen = self._lost_seen = 0

    def buckets(self) -> list[TokenBucket]:
        """The buckets limiting this link now (those with a rate)."""
        return limiting(self.bucket, self.limits)

    def report_loss(self, cc, s) -> None:
        """Tell the session ``s`` of the losses over the packets whose fate
        is known since the last report (acknowledged or declared lost:
        counted over those sent, the losses lag an RTT and startup's first
        reports read ~0), every LOSS_SAMPLE packets."""
        if cc is None:
            return
        decided, lost = cc.packets_acked + cc.packets_lost, cc.packets_lost
        if decided >= self._decided_seen + (LOSS_SAMPLE if self._decided_seen else LOSS_FIRST_SAMPLE):
            s.observe_loss(lost - self._lost_seen, decided - self._decided_seen)
            self._decided_seen, self._lost_seen = decided, lost

    def feed(self, now: float, s) -> bool:
        """Top up QUIC's datagram queue with the session's shards (within
        the bucket), then hand its control bytes to the stream. Returns
        whether the session gave less than QUIC had room for (``dry``: the
        round measures resync, not the path)."""
        link = self.link
        quic = link._quic
        if self.bucket is None and getattr(s, "rate_limit", 0):
            self.bucket = TokenBucket(s.rate_limit)     # a pull's --bwlimit, or the server's own
        dry = True
        if not s.finished and link.stream_id is not None:
            pending = getattr(quic, "_datagrams_pending", ())
            room = DATAGRAM_QUEUE - len(pending)
            self.starved = False
            size = link.paths.datagram_size
            buckets = self.buckets()
            if room > 0 and buckets:
                allowed = allowance(buckets, room, size)
                self.starved = allowed < room
                room = allowed
            dry = self.starved
            if room > 0:
                out = s.datagrams_to_send(now, room)
                dry = dry or len(out) < room
                for d in out:
                    quic.send_datagram_frame(d)
                for b in buckets:
                    b.refund(room - len(out), size)
        if link.stream_id is not None:
            data = s.stream_to_send()           # (after a session ends too: its last frames)
            if data:
                quic.send_stream_data(link.stream_id, data)
        return dry
