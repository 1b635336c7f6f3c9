"""The rate controller (resync.net.congestion) on a modelled bottleneck
(tests/pathsim.py), with a hand-moved clock: what tests/test_wan.py shows
through the emulated link, here in milliseconds of CPU and without noise, so
each property is pinned apart from the rest of the stack."""
from __future__ import annotations

import pytest

from resync.net.congestion import RateController

from .pathsim import MDS, Flow, Path

MBIT = 1e6 / 8
RTT = 0.05


def _controller() -> RateController:
    return RateController(max_datagram_size=MDS)


@pytest.mark.parametrize("loss", [0.0, 0.2, 0.33])
def test_random_loss_is_measured_not_obeyed(loss):
    """At 100 Mbit/s, 50 ms: the path carries >= 95 % of its rate from 2 s
    on at 0, 20 and 33 % random loss (issue 13 asks for 85 % at 20 %), and
    startup and all reaches >= 90 % over the first 10 s, without a standing
    queue (mean wait < 1/2 RTT)."""
    rate = 100 * MBIT
    path = Path(rate, RTT, loss=loss)
    flow = Flow(_controller())
    path.run([flow], 10.0)
    carried = lambda lo, hi: flow.rate(lo, hi) / (1 - loss) / rate      # noqa: E731
    assert carried(2, 10) >= 0.95, carried(2, 10)
    assert carried(0, 10) >= 0.90, carried(0, 10)
    assert path.queue_delay(2, 10) < RTT / 2


def test_a_slow_start_of_the_application_does_not_end_startup():
    """Half a second of a few packets per RTT (the handshake, a listing) and
    then bulk data: startup still doubles, >= 85 % of the rate within the
    next second (a start-up ended by the handshake's rounds crawled up at
    25 % per eight rounds: 1 MiB took 0.8 s instead of 0.4 on the link)."""
    rate = 20 * MBIT
    path = Path(rate, RTT)
    flow = Flow(_controller(), app_limited=lambda t: t < 0.5)
    path.run([flow], 0.5)
    assert flow.cc.startup
    path.run([flow], 1.5)
    assert flow.rate(0.5, 1.5) >= 0.85 * rate


def test_a_slow_answer_to_the_first_packets_does_not_end_startup():
    """A sender that sent its first packets and waits for its peer (a warm
    server planning the listing they carried holds their acknowledgements
    80 ms), then sends bulk data: the late acknowledgements end rounds in
    which nothing was sent, yet they measured the peer, not a queue —
    startup goes on as from nothing. (Taken for a queue, they ended startup
    at the seventh packet: 5 % of the rate in the next second here, and over
    the emulated link 2 s to reach the rate instead of 0.5.)"""
    rate = 100 * MBIT
    path = Path(rate, RTT, loss=0.2)
    flow = Flow(_controller(), app_limited=lambda t: t < 0.3, quiet=0.05,
                ack_delay=lambda t: 0.08 if t < 0.3 else 0.0)
    path.run([flow], 1.3)
    carried = flow.rate(0.3, 1.3) / 0.8 / rate
    assert carried >= 0.6, carried              # (a startup from nothing carries 0.7 in its first second)


def test_an_outage_keeps_the_model():
    """A 2 s outage (every packet lost): within 0.2 s of the path coming back
    the flow is at >= 80 % of the rate again, not starting over."""
    rate = 20 * MBIT
    path = Path(rate, RTT, outages=[(3.0, 5.0)])
    flow = Flow(_controller())
    path.run([flow], 7.0)
    assert flow.rate(2.0, 3.0) >= 0.9 * rate
    assert flow.rate(5.2, 5.7) >= 0.8 * rate


@pytest.mark.parametrize("mbit", [10, 20, 100])
@pytest.mark.parametrize("loss", [0.0, 0.2])
@pytest.mark.parametrize("stagger", [0.0, 2.0, 5.0])
def test_two_transfers_share_a_bottleneck(mbit, loss, stagger):
    """Two flows, the second starting 0, 2 or 5 s after the first: over the
    last 10 s of 20 each has 35-65 % (issue 13), and together >= 95 %.
    (Counting every lost byte as carried let the flow that lost most to the
    overflowing queue measure the most capacity: the second flow took 88-90
    % at 20 Mbit/s; the queue threshold of 1.5 x min RTT + 10 ms let the
    minimum RTT itself creep up under a standing queue: 10-90 %.)"""
    rate = mbit * MBIT
    path = Path(rate, RTT, loss=loss, seed=1)
    first, second = Flow(_controller()), Flow(_controller(), start=stagger)
    end = stagger + 20.0
    path.run([first, second], end)
    a, b = first.rate(end - 10, end), second.rate(end - 10, end)
    assert 0.35 <= a / (a + b) <= 0.65, (a / rate, b / rate)
    assert (a + b) / (1 - loss) >= 0.95 * rate


def test_the_app_limited_signal_keeps_the_model_while_idle():
    """Rounds in which the sender had nothing to send do not lower the
    capacity the controller has measured (their rate is resync's, not the
    path's)."""
    rate = 20 * MBIT
    path = Path(rate, RTT)
    flow = Flow(_controller(), app_limited=lambda t: t >= 3.0)
    path.run([flow], 3.0)
    before = flow.cc.capacity
    path.run([flow], 6.0)
    assert flow.cc.capacity >= 0.95 * before
    assert before >= 0.9 * rate
