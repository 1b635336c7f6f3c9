"""How much parity to send: adaptive to the loss a link shows.

``ParityPolicy`` follows the fraction of shards lost with an exponential
moving average (``ema = alpha * observed + (1 - alpha) * ema``, alpha 0.3)
and picks m for k data shards in one of two modes:

* ``steps`` (the default): loss below 5 % -> m = k/10, 5-10 % -> k/5,
  10-15 % -> 3k/10, 15-20 % -> 2k/5, 20 % and above -> k/2 (rounded up; for
  k = 50 that is 5, 10, 15, 20, 25).
* ``target``: the smallest m whose stripe-failure probability, with each of
  the k + m shards lost independently at the estimated rate, is below
  ``target`` (``failure_probability``), capped by k + m <= 256.

An MDS code with m parity shards survives at most m losses per stripe, so
parity buys reliability only against random loss below m / (k + m); loss
above that is congestion or an outage, for the transport to deal with.
"""
from __future__ import annotations

import math

from ..errors import UsageError
from . import MAX_SHARDS

ALPHA = 0.3
STEP = 0.05             # width of a loss band in steps mode
STEPS = 5               # bands: <5 %, 5-10 %, 10-15 %, 15-20 %, >=20 %


def failure_probability(k: int, m: int, loss: float) -> float:
    """P(more than m of k + m shards lost), each lost independently with
    probability ``loss``: the chance a stripe cannot be decoded."""
    if loss <= 0.0:
        return 0.0
    if loss >= 1.0:
        return 1.0
    n = k + m
    # Sum the upper tail directly (1 - CDF loses everything below ~1e-16).
    log_p, log_q = math.log(loss), math.log1p(-loss)
    total = 0.0
    for lost in range(m + 1, n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(lost + 1) - math.lgamma(n - lost + 1)
                          + lost * log_p + (n - lost) * log_q)
    return min(1.0, total)


def parity_for_target(k: int, loss: float, target: float) -> int:
    """Smallest m with failure_probability(k, m, loss) < target, or the most
    parity k + m <= 256 allows when none is enough."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"target failure probability must be between 0 and 1 (got {target})")
    for m in range(0, MAX_SHARDS - k + 1):
        if failure_probability(k, m, loss) < target:
            return m
    return MAX_SHARDS - k


def parity_for_steps(k: int, loss: float) -> int:
    band = min(STEPS - 1, max(0, int(loss / STEP + 1e-9)))
    return min(MAX_SHARDS - k, -(-k * (band + 1) // 10))


class ParityPolicy:
    """Tracks loss (EMA) and says how many parity shards to send per k."""

    def __init__(self, k: int = 50, mode: str = "steps", target: float = 1e-6,
                 alpha: float = ALPHA, initial_loss: float = 0.0):
        if not 1 <= k < MAX_SHARDS:
            raise UsageError(f"k must be between 1 and {MAX_SHARDS - 1} (got {k})")
        if mode not in ("steps", "target"):
            raise UsageError(f"parity mode must be 'steps' or 'target' (got {mode!r})")
        if not 0.0 < alpha <= 1.0:
            raise UsageError(f"alpha must be in (0, 1] (got {alpha})")
        if mode == "target" and not 0.0 < target < 1.0:
            raise UsageError(f"target failure probability must be between 0 and 1 (got {target})")
        self.k = k
        self.mode = mode
        self.target = target
        self.alpha = alpha
        self.loss = float(initial_loss)

    def observe(self, lost: int, sent: int) -> float:
        """Fold in one report (``lost`` of ``sent`` shards); returns the new estimate."""
        if sent <= 0 or lost < 0 or lost > sent:
            raise UsageError(f"a loss report needs 0 <= lost <= sent and sent > 0 (got {lost} of {sent})")
        self.loss = self.alpha * (lost / sent) + (1.0 - self.alpha) * self.loss
        return self.loss

    @property
    def m(self) -> int:
        if self.mode == "target":
            return parity_for_target(self.k, self.loss, self.target)
        return parity_for_steps(self.k, self.loss)

    def __repr__(self) -> str:
        return f"ParityPolicy(k={self.k}, mode={self.mode!r}, loss={self.loss:.4f}, m={self.m})"
