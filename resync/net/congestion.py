"""A rate-based congestion controller for aioquic (registered as
``resync-rate``), after BBR (Cardwell et al., "BBR: Congestion-Based
Congestion Control", ACM Queue 14(5), 2016).

aioquic's Reno halves its window on every loss, and QUIC counts datagram
loss as congestion: at 20 % random loss it crawls (0.3 Mbit/s measured here).
resync's content carries its own parity, so random loss is a measurement to
send parity for, not a signal to slow down. This controller estimates the
path's delivery rate and sends at it:

- rate: bytes acknowledged per round (a round lasts one smoothed RTT), the
  best of the last ten rounds;
- pacing: ``gain x rate``. aioquic paces at window / smoothed RTT; ``RatePacer``
  replaces its pacer so that pacing and window are set apart, as BBR does;
- window: ``2 x rate x smoothed RTT`` (twice the bandwidth-delay product: the
  acknowledgements of one round arrive while the next is sent), at least
  MIN_WINDOW_PACKETS;
- startup: the window grows by what was delivered (doubling per round trip),
  paced at window / RTT, until the rate stops growing by a quarter for three
  rounds or a round loses far more than the ones before; then one round at
  gain 0.5 drains the queue startup built;
- then the gain cycles over eight rounds (1.25, 0.75, then 1 six times:
  BBR's ProbeBW), probing for more and giving back what the probe queued;
- congestion — the smoothed RTT well above its minimum (a queue), or a round
  losing LOSS_MARGIN more than the least loss of recent rounds (a receiver
  or a bottleneck overrun drops in bursts; a lossy radio link drops
  steadily) — lowers the gain to 0.75 and forgets the best rate;
- steady random loss leaves the rate alone: parity pays for it.

Issue 13 tunes it on an emulated WAN; the figures live in docs/protocol.md.
"""
from __future__ import annotations

from collections import deque

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control

NAME = "resync-rate"
MIN_WINDOW_PACKETS = 16
START_WINDOW_PACKETS = 32
WINDOW_GAIN = 2.0
GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
DRAIN_GAIN = 0.5
BACKOFF_GAIN = 0.75
LOSS_MARGIN = 0.08               # a round losing this much more than the usual loss is congestion
QUEUE_FACTOR = 1.5               # a smoothed RTT this much above the minimum ...
QUEUE_SLACK = 0.010              # ... plus this (s: the peers' own processing jitter) means a queue
RTT_FLOOR = 0.001                # s: aioquic's smoothed RTT is never below 1 ms
RATE_ROUNDS = 10                 # rate samples kept (one per round)


class RateController(QuicCongestionControl):
    """The controller aioquic creates per connection (``max_datagram_size``
    in bytes). ``pacing_rate`` (bytes/s, None: window / RTT) is read by
    ``RatePacer``; ``packets_sent`` / ``packets_lost`` are totals for the
    session's loss estimate."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.mds = max_datagram_size
        self.congestion_window = START_WINDOW_PACKETS * max_datagram_size
        self.pacing_rate: float | None = None
        self.min_rtt: float | None = None
        self.srtt: float | None = None
        self.startup = True
        self.packets_sent = 0
        self.packets_lost = 0
        self._full_rounds = 0
        self._best_startup_rate = 0.0
        self._rates: deque = deque(maxlen=RATE_ROUNDS)
        self._losses: deque = deque(maxlen=RATE_ROUNDS)
        self._cycle = 0
        self._round_start: float | None = None
        self._round_delivered = self._round_lost = self._round_sent = 0

    @property
    def rate(self) -> float:
        """The best delivery rate of the last rounds (bytes/s)."""
        return max(self._rates, default=0.0)

    def on_packet_sent(self, *, packet) -> None:
        self.bytes_in_flight += packet.sent_bytes
        self._round_sent += packet.sent_bytes
        self.packets_sent += 1

    def on_packet_acked(self, *, now: float, packet) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        self._round_delivered += packet.sent_bytes
        if self.startup:
            self.congestion_window += packet.sent_bytes
        if self._round_start is None:
            self._round_start = now
        if now - self._round_start >= (self.srtt or 0.05):
            self._end_round(now)

    def _end_round(self, now: float) -> None:
        rate = self._round_delivered / max(now - self._round_start, 1e-6)
        self._rates.append(rate)
        lost_share = self._round_lost / max(self._round_sent, 1)
        usual_loss = min(self._losses, default=lost_share)
        if self._round_sent:
            self._losses.append(lost_share)
        overrun = len(self._losses) > 1 and lost_share > usual_loss + LOSS_MARGIN
        gain = None
        if self.startup:
            if overrun:
                self.startup = False
            elif rate > self._best_startup_rate * 1.25:
                self._best_startup_rate = rate
                self._full_rounds = 0
            else:
                self._full_rounds += 1
                self.startup = self._full_rounds < 3
            if not self.startup:
                gain, self._cycle = DRAIN_GAIN, 0
        else:
            gain = GAIN_CYCLE[self._cycle]
            self._cycle = (self._cycle + 1) % len(GAIN_CYCLE)
            queue = self.min_rtt is not None and (self.srtt or 0) > QUEUE_FACTOR * self.min_rtt + QUEUE_SLACK
            if queue or overrun or lost_share > 0.5:
                gain = BACKOFF_GAIN
                self._rates.clear()                # the best rate was not sustainable
                self._rates.append(rate)
        if gain is not None:
            self.pacing_rate = max(gain * self.rate, MIN_WINDOW_PACKETS * self.mds / (self.srtt or 0.05))
            self.congestion_window = int(max(WINDOW_GAIN * self.rate * (self.srtt or 0.05),
                                             MIN_WINDOW_PACKETS * self.mds))
        self._round_start = now
        self._round_delivered = self._round_lost = self._round_sent = 0

    def on_packets_expired(self, *, packets) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._round_lost += packet.sent_bytes
            self.packets_lost += 1

    def on_persistent_congestion(self) -> None:
        self.congestion_window = max(self.congestion_window // 2, MIN_WINDOW_PACKETS * self.mds)
        if self.pacing_rate is not None:
            self.pacing_rate /= 2

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        sample = max(rtt, RTT_FLOOR)              # as aioquic's smoothed RTT
        self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt


register_congestion_control(NAME, RateController)


def install_pacer(quic) -> None:
    """Give a QuicConnection using RateController a RatePacer (aioquic has no
    public way to pace at a rate apart from the window)."""
    loss = getattr(quic, "_loss", None)
    cc = getattr(loss, "_cc", None)
    if isinstance(cc, RateController) and not isinstance(loss._pacer, RatePacer):
        loss._pacer = RatePacer(cc, loss._pacer)


class RatePacer:
    """aioquic's QuicPacketPacer, fed the controller's pacing rate instead of
    window / smoothed RTT once the controller has one."""

    def __init__(self, controller: RateController, pacer):
        self._cc, self._pacer = controller, pacer

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rate = self._cc.pacing_rate
        if rate is None:
            self._pacer.update_rate(congestion_window, smoothed_rtt)
        else:                                    # the same arithmetic, at ``rate``
            self._pacer.update_rate(int(rate * max(smoothed_rtt, 1e-6)), smoothed_rtt)

    def __getattr__(self, name):
        return getattr(self._pacer, name)
