"""Adaptive parity: the EMA, the k = 50 step table, and the target mode."""
import math

import pytest

from resync.erasure.policy import ParityPolicy, failure_probability, parity_for_target
from resync.errors import UsageError


@pytest.mark.parametrize("loss,m", [(0.0, 5), (0.049, 5), (0.05, 10), (0.0999, 10), (0.10, 15),
                                    (0.15, 20), (0.1999, 20), (0.20, 25), (0.33, 25), (1.0, 25)])
def test_step_table_for_k50(loss, m):
    assert ParityPolicy(50, initial_loss=loss).m == m


def test_ema_with_alpha_03():
    p = ParityPolicy(50)
    assert p.observe(10, 100) == pytest.approx(0.03)           # 0.3 * 0.1
    assert p.observe(10, 100) == pytest.approx(0.051)          # 0.3 * 0.1 + 0.7 * 0.03
    assert p.m == 10
    for _ in range(30):
        p.observe(25, 100)
    assert p.loss == pytest.approx(0.25, abs=1e-4) and p.m == 25
    for _ in range(30):
        p.observe(0, 100)
    assert p.loss < 0.001 and p.m == 5


def test_one_burst_does_not_jump_to_full_parity():
    p = ParityPolicy(50)
    p.observe(50, 100)          # one report of 50 % loss
    assert p.loss == pytest.approx(0.15) and p.m == 20


def _binomial_tail(n, m, p):
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(m + 1, n + 1))


@pytest.mark.parametrize("k,m,loss", [(50, 10, 0.1), (50, 20, 0.1), (50, 20, 0.2), (50, 25, 0.2), (10, 4, 0.01)])
def test_failure_probability_is_the_binomial_tail(k, m, loss):
    assert failure_probability(k, m, loss) == pytest.approx(_binomial_tail(k + m, m, loss), rel=1e-9)


def test_field_note_figures():
    assert failure_probability(50, 10, 0.10) == pytest.approx(0.034, abs=0.002)
    assert failure_probability(50, 20, 0.10) == pytest.approx(3e-6, rel=0.3)
    assert failure_probability(50, 20, 0.20) == pytest.approx(0.03, abs=0.01)
    assert failure_probability(50, 25, 0.20) == pytest.approx(0.002, abs=0.001)


@pytest.mark.parametrize("loss", [0.001, 0.05, 0.1, 0.2, 0.33])
def test_target_mode_picks_the_smallest_sufficient_m(loss):
    m = parity_for_target(50, loss, 1e-6)
    assert failure_probability(50, m, loss) < 1e-6
    assert m == 0 or failure_probability(50, m - 1, loss) >= 1e-6
    p = ParityPolicy(50, mode="target", target=1e-6, initial_loss=loss)
    assert p.m == m


def test_target_mode_without_loss_needs_no_parity_and_caps_at_256():
    assert parity_for_target(50, 0.0, 1e-6) == 0
    assert parity_for_target(200, 0.6, 1e-6) == 56


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=256), dict(mode="max"), dict(alpha=0),
                                    dict(mode="target", target=0), dict(mode="target", target=1.5)])
def test_bad_settings(kwargs):
    with pytest.raises(UsageError):
        ParityPolicy(**kwargs)


@pytest.mark.parametrize("lost,sent", [(1, 0), (-1, 10), (11, 10)])
def test_bad_reports(lost, sent):
    with pytest.raises(UsageError):
        ParityPolicy().observe(lost, sent)
