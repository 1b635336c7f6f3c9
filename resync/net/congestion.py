"""A rate-based congestion controller for aioquic (registered as
``resync-rate``), after BBR (Cardwell et al., "BBR: Congestion-Based
Congestion Control", ACM Queue 14(5), 2016), made to treat random loss as a
measurement.

aioquic's Reno halves its window on every loss, and QUIC counts datagram
loss as congestion: at 20 % random loss it crawls (0.3 Mbit/s measured here).
resync's content carries its own parity, so random loss is something to send
parity for, not a signal to slow down. The controller models the path by three
figures and sends at them:

- **capacity**: per round (one smoothed RTT of acknowledgements), the bytes
  acknowledged plus the bytes declared lost up to the usual loss share, over
  the round's length — what the path carried — the best of the last
  RATE_ROUNDS rounds. A link that loses p of what it carries delivers
  (1 - p) C at capacity C; counting only what was delivered (as BBR does)
  would shrink the rate by (1 - p) each round at 20 % or 33 % loss. Losses
  beyond the usual share are a queue overflowing before the bottleneck:
  counted, the flow losing most would measure the most capacity and starve
  the others;
- **usual loss**: the median loss share (lost over the packets whose fate
  the round learnt) of the last LOSS_ROUNDS rounds without a standing queue:
  a lossy link's steady loss, not a burst nor an overflowing queue;
- **min RTT**: the least RTT sample of the last MIN_RTT_WINDOW seconds.

It paces at ``gain x capacity`` (``RatePacer`` replaces aioquic's pacer, which
paces at window / RTT) and keeps a window of ``WINDOW_GAIN x capacity x min
RTT`` (twice the bandwidth-delay product: the acknowledgements of one round
arrive while the next is sent; loss that QUIC has not yet declared counts
in flight too). Phases:

- **startup**: the window grows by what is delivered (doubling per round;
  by 1.67 at 33 % loss: growing by what was lost too overshot into the
  bottleneck's queue, and six stripes lost half their shards),
  paced at window / RTT, until the capacity stops growing by a quarter for
  three rounds, a queue forms (the round's largest RTT above min RTT by
  STARTUP_QUEUE_FACTOR of it plus STARTUP_QUEUE) or a round loses more than
  STARTUP_LOSS (random loss of a
  third must not end it: the queue shows an overshoot first); then
  one round at DRAIN_GAIN empties the queue startup built;
- **cruise**: the gain cycles over eight rounds (1.25, 0.75, then 1 six
  times: BBR's ProbeBW), probing for more and giving back what the probe
  queued.

A round in which the sender ran out of data with room left in the window
(``on_app_limited``: the handshake, a listing, a small file's tail, a
``--bwlimit``) measured the application, not the path (BBR's app-limited
samples): it does not end startup (nor does its RTT count as a queue
forming), and its rate enters the model only if it
is higher than the model (a start-up that ended during the handshake then
crawled up at 25 % per eight rounds: 1 MiB took 0.8 s at 100 Mbit/s).

Congestion lowers the gain to BACKOFF_GAIN for a round and the capacity to
BACKOFF_KEEP of the best (or to the last round's sample if higher: the best
was not sustainable), then ignores further signals for HOLD_RTTS smoothed
RTTs (they are about packets sent before it reacted; the same hold follows
the end of startup), when:

- a queue stands: even the round's least RTT sample is above QUEUE_FACTOR x
  min RTT + QUEUE_SLACK (the least sample, so jitter alone is not a queue);
- a round loses clearly more than the usual loss: more than its expectation
  plus LOSS_SIGMAS standard deviations (binomial) plus LOSS_SLACK packets —
  a bottleneck's queue overflowing drops in bursts, a lossy link steadily.

A round that lasted more than STALL_ROUNDS smoothed RTTs (an outage: nothing
was acknowledged) is no sample: the model is kept, and the window opens
again at once when acknowledgements return. Persistent congestion (RFC 9002
7.6: everything lost for a while) shrinks the window but keeps the model.

The figures it reaches through the emulated links of tests/linkemu are in
docs/protocol.md.
"""
from __future__ import annotations

import math
from collections import deque

from aioquic.quic.congestion.base import QuicCongestionControl, register_congestion_control

NAME = "resync-rate"
MIN_WINDOW_PACKETS = 16
START_WINDOW_PACKETS = 32
WINDOW_GAIN = 2.0
GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
DRAIN_GAIN = 0.5
BACKOFF_GAIN = 0.75
BACKOFF_KEEP = 0.92              # congestion: the capacity drops to this much of the best (or the last sample)
HOLD_RTTS = 1.5                  # after a change, signals for this many RTTs are about what was sent before it
RATE_ROUNDS = 10                 # capacity samples kept (one per round): the max filter
LOSS_ROUNDS = 16                 # loss samples kept: their median is the usual loss
LOSS_SIGMAS = 3.0                # a round losing this many standard deviations more than usual ...
LOSS_SLACK = 3                   # ... plus this many packets is congestion
LOSS_SAMPLE_PACKETS = 20         # a round that sent fewer packets is no loss sample
STARTUP_LOSS = 0.5               # startup ends on a round losing more than this (or a queue forming)
QUEUE_FACTOR = 1.25              # the round's least RTT this much above the minimum ...
QUEUE_SLACK = 0.005              # ... plus this (s: the peers' own processing) means a standing queue
STARTUP_QUEUE = 0.005            # s above the minimum RTT ...
STARTUP_QUEUE_FACTOR = 0.25      # ... plus this share of it, in a round's largest RTT, ends startup (a queue)
MIN_RTT_WINDOW = 10.0            # s over which the minimum RTT is taken
STALL_ROUNDS = 4                 # a round longer than this many smoothed RTTs was an outage
RTT_FLOOR = 0.001                # s: aioquic's smoothed RTT is never below 1 ms


class RateController(QuicCongestionControl):
    """The controller aioquic creates per connection (``max_datagram_size``
    in bytes). ``pacing_rate`` (bytes/s, None: window / RTT) is read by
    ``RatePacer``; ``packets_sent`` / ``packets_acked`` / ``packets_lost`` are totals
    (the session's loss estimate is lost / (acked + lost)); ``capacity`` (bytes/s), ``usual_loss`` and
    ``min_rtt`` (s) are the model."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.mds = max_datagram_size
        self.congestion_window = START_WINDOW_PACKETS * max_datagram_size
        self.pacing_rate: float | None = None
        self.srtt: float | None = None
        self.startup = True
        self.packets_sent = 0
        self.packets_lost = 0
        self.packets_acked = 0
        self.probe_above = max_datagram_size    # larger packets are path MTU probes ...
        self.probes: list[tuple[bool, int]] = []     # ... whose fate (acked, bytes) the link takes from here
        self._full_rounds = 0
        self._best_startup = 0.0
        self._rates: deque = deque(maxlen=RATE_ROUNDS)
        self._losses: deque = deque(maxlen=LOSS_ROUNDS)
        self._cycle = 0
        self._round_start: float | None = None
        self._round_delivered = self._round_lost = 0
        self._round_lost_packets = self._round_acked_packets = 0
        self._round_min_rtt, self._round_max_rtt = math.inf, 0.0
        self._round_app_limited = False
        self._last_sent_pn = -1                  # the last packet number sent
        self._app_limited_pn = -1                # ... when the sender last ran dry
        self._hold_until = 0.0
        self._min_rtt = math.inf                 # this window's least RTT, and the last window's
        self._min_rtt_last = math.inf
        self._min_rtt_since = 0.0

    # -- the model ------------------------------------------------------------------------
    @property
    def capacity(self) -> float:
        """The path's rate (bytes/s) as modelled: the best recent sample."""
        return max(self._rates, default=0.0)

    @property
    def usual_loss(self) -> float:
        """The median loss share of recent rounds (0 before any)."""
        if not self._losses:
            return 0.0
        ordered = sorted(self._losses)
        return ordered[len(ordered) // 2]

    @property
    def min_rtt(self) -> float | None:
        best = min(self._min_rtt, self._min_rtt_last)
        return None if best == math.inf else best

    def model(self) -> dict | None:
        """The path as modelled (for the next connection to the same peer)."""
        if self.startup or not self._rates or self.min_rtt is None:
            return None
        return {"capacity": self.capacity, "min_rtt": self.min_rtt}

    def resume_model(self, model: dict) -> None:
        """Start from what the last connection to this peer learnt (a retry
        in the same run): no startup, pacing at its capacity — a new startup
        would overshoot into the bottleneck's queue again. A wrong model is
        corrected as any other: a queue or losses back it off."""
        capacity, rtt = float(model["capacity"]), float(model["min_rtt"])
        if capacity <= 0 or rtt <= 0:
            return
        self.startup = False
        self._rates.append(capacity)
        self._cycle = 2                          # cruising at gain 1
        self.pacing_rate = capacity
        self.congestion_window = self._window(capacity, rtt)

    # -- aioquic's calls -----------------------------------------------------------------
    def set_datagram_size(self, size: int) -> None:
        """Packets may now be ``size`` bytes (a path MTU probe of it was
        acknowledged): the window floor follows, and so does the start
        window while nothing has been acknowledged yet."""
        if self.startup and not self.packets_acked and \
                self.congestion_window == START_WINDOW_PACKETS * self.mds:
            self.congestion_window = START_WINDOW_PACKETS * size
        self.mds = self.probe_above = size

    def on_packet_sent(self, *, packet) -> None:
        self.bytes_in_flight += packet.sent_bytes
        self.packets_sent += 1
        self._last_sent_pn = packet.packet_number

    def on_packet_acked(self, *, now: float, packet) -> None:
        if packet.sent_bytes > self.probe_above:
            self.probes.append((True, packet.sent_bytes))
        if packet.packet_number <= self._app_limited_pn:
            self._round_app_limited = True      # sent before the sender ran dry: its RTT is the peer's too
        self.bytes_in_flight -= packet.sent_bytes
        self._round_delivered += packet.sent_bytes
        self._round_acked_packets += 1
        self.packets_acked += 1
        if self.startup:
            self.congestion_window += packet.sent_bytes
        if self._round_start is None:
            self._round_start = now
        if now - self._round_start >= (self.srtt or 0.05):
            self._end_round(now)

    def on_app_limited(self) -> None:
        """Told by the sender that it had nothing more to send while the
        window had room: this round's rate is the application's, and so is
        that of the rounds the packets sent so far are acknowledged in (BBR's
        app-limited mark: the peer answering what the sender then waits on,
        a listing, is no queue)."""
        self._round_app_limited = True
        self._app_limited_pn = self._last_sent_pn

    def on_packets_expired(self, *, packets) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            if packet.sent_bytes > self.probe_above:
                # a path MTU probe: its loss says nothing of congestion (RFC 9000 14.4) nor of the
                # random loss parity is sized for
                self.probes.append((False, packet.sent_bytes))
                continue
            self._round_lost += packet.sent_bytes
            self._round_lost_packets += 1
            self.packets_lost += 1

    def on_persistent_congestion(self) -> None:
        self.congestion_window = MIN_WINDOW_PACKETS * self.mds     # the model stays (see _end_round)

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        sample = max(rtt, RTT_FLOOR)              # as aioquic's smoothed RTT
        self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        self._round_min_rtt = min(self._round_min_rtt, rtt)
        self._round_max_rtt = max(self._round_max_rtt, rtt)
        if now - self._min_rtt_since >= MIN_RTT_WINDOW:
            self._min_rtt_last, self._min_rtt, self._min_rtt_since = self._min_rtt, math.inf, now
        self._min_rtt = min(self._min_rtt, rtt)

    # -- per round ------------------------------------------------------------------------
    def _end_round(self, now: float) -> None:
        length = max(now - self._round_start, 1e-6)
        srtt = self.srtt or 0.05
        # the round's loss: of the packets whose fate it learnt (sent about an RTT before;
        # lost over sent-this-round read p/2 while startup doubled)
        sent, lost = self._round_acked_packets + self._round_lost_packets, self._round_lost_packets
        round_min_rtt, round_max_rtt = self._round_min_rtt, self._round_max_rtt
        self._round_start = now
        delivered, lost_bytes = self._round_delivered, self._round_lost
        self._round_delivered = self._round_lost = 0
        self._round_lost_packets = self._round_acked_packets = 0
        self._round_min_rtt, self._round_max_rtt = math.inf, 0.0
        app_limited, self._round_app_limited = self._round_app_limited, False
        if length > STALL_ROUNDS * srtt and self._rates:
            # an outage (or, in startup, a pause with nothing to send): no sample; the window
            # opens to the model again at once (startup keeps its window: it has no model yet,
            # and the handshake's few packets would have shrunk it to the minimum)
            if not self.startup:
                self.congestion_window = self._window(self.capacity)
            return
        usual = self.usual_loss
        share = lost / sent if sent else 0.0
        overrun = len(self._losses) >= 3 and lost > usual * sent + LOSS_SIGMAS * math.sqrt(
            max(sent * usual * (1 - usual), 1.0)) + LOSS_SLACK
        min_rtt = self.min_rtt
        queue = min_rtt is not None and round_min_rtt != math.inf and \
            round_min_rtt > QUEUE_FACTOR * min_rtt + QUEUE_SLACK
        if sent >= LOSS_SAMPLE_PACKETS and not queue:
            # (a round of a few packets says little; one with a queue standing measured the
            # queue overflowing, not the path)
            self._losses.append(min(share, 1.0))
        # what the path carried: the delivered, and the lost up to the usual loss (more than
        # that was lost to a queue before the bottleneck: counted, the flow losing most to an
        # overflowing queue would measure the most capacity and starve the others)
        counted = lost_bytes if usual >= 1 else min(lost_bytes, delivered * usual / (1 - usual))
        rate = (delivered + counted) / length
        if not app_limited or rate > self.capacity:
            self._rates.append(rate)
        gain = None
        held = now < self._hold_until            # signals about packets sent before the last change
        if self.startup:
            # the round's largest RTT: by the time its least one shows a queue, startup has
            # doubled once more and overflowed a 100 ms queue
            # (in an app-limited round a long RTT is the peer's processing: the handshake's)
            forming = not app_limited and min_rtt is not None and \
                round_max_rtt > min_rtt * (1 + STARTUP_QUEUE_FACTOR) + STARTUP_QUEUE
            if forming or (sent >= LOSS_SAMPLE_PACKETS and share > STARTUP_LOSS):
                self.startup = False
            elif rate > self._best_startup * 1.25:
                self._best_startup = rate
                self._full_rounds = 0
            elif not app_limited:
                self._full_rounds += 1
                self.startup = self._full_rounds < 3
            if not self.startup:
                gain, self._cycle = DRAIN_GAIN, 0
                self._hold_until = now + HOLD_RTTS * srtt
        else:
            gain = GAIN_CYCLE[self._cycle]
            self._cycle = (self._cycle + 1) % len(GAIN_CYCLE)
            if (queue or overrun) and not held:
                gain = BACKOFF_GAIN
                keep = max(rate, BACKOFF_KEEP * self.capacity)     # the best capacity was not sustainable
                self._rates.clear()
                self._rates.append(keep)
                self._hold_until = now + HOLD_RTTS * srtt
        if gain is not None:
            floor = MIN_WINDOW_PACKETS * self.mds / srtt
            self.pacing_rate = max(gain * self.capacity, floor)
            self.congestion_window = self._window(self.capacity)

    def _window(self, capacity: float, rtt: float | None = None) -> int:
        """WINDOW_GAIN x capacity x RTT (the min RTT unless given), at least MIN_WINDOW_PACKETS."""
        if rtt is None:
            rtt = self.min_rtt if self.min_rtt is not None else (self.srtt or 0.05)
        return int(max(WINDOW_GAIN * capacity * max(rtt, RTT_FLOOR), MIN_WINDOW_PACKETS * self.mds))


register_congestion_control(NAME, RateController)


def controller_of(quic) -> RateController | None:
    """The RateController of a QuicConnection (aioquic keeps it in its
    private loss recovery), or None if it uses another."""
    cc = getattr(getattr(quic, "_loss", None), "_cc", None)
    return cc if isinstance(cc, RateController) else None


def install_pacer(quic) -> None:
    """Give a QuicConnection using RateController a RatePacer (aioquic has no
    public way to pace at a rate apart from the window)."""
    cc = controller_of(quic)
    if cc is not None and not isinstance(quic._loss._pacer, RatePacer):
        quic._loss._pacer = RatePacer(cc, quic._loss._pacer)


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
