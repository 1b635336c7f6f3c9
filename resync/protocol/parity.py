"""How much parity each stripe gets, and how large stripes are: the sender's
estimate of the link's loss and the choices made from it (docs/protocol.md:
Parity, Stripe size)."""
from __future__ import annotations

import functools
import math

from . import frames as F
from .shards import MAX_INDEX as MAX_SHARDS

DEFAULT_K = 128                  # data shards per full stripe (128 x 1,296 B = 162 KiB of content)
MIN_PARITY = 1                   # parity shards per full stripe even on a link that loses nothing
LOSSLESS = 1e-4                  # a loss estimate below this: the link loses nothing
STRIPE_TARGET = 0.005            # chance a stripe needs a repair round that the parity is chosen for
K_CHOICES = tuple(range(DEFAULT_K, 249, 16))     # data shards per stripe a file may be cut into (stripe_k)
K_MARGIN = 0.02                  # stripe_k plans for the loss estimate plus this
LOSS_SETTLED = 1500              # packets after which the loss estimate's own error is left out of parity
K_UNKNOWN = 144                  # k before the loss is measured: its parity meets the target up to 35 % loss
MIN_SHARD_SIZE = 64              # the smallest shard a peer may ask to resume with
RELIABLE_K = 1                   # data shards per stripe on a reliable stream: 1 MiB stripes, each acknowledged
#                                  and checkpointed on its own (a cut loses at most a MiB a file in flight)


class ParityPlanner:
    """The sender's loss estimate (fed by the transport's counts) and the
    parity and stripe geometry chosen from it. ``session`` gives the path's
    shard size (``session.shard_size``)."""

    def __init__(self, session, min_parity: int = 1):
        from ..erasure.policy import ParityPolicy
        self.s = session
        self.min_parity = max(MIN_PARITY, min_parity)
        self.policy = ParityPolicy(DEFAULT_K, mode="target", target=STRIPE_TARGET)
        self.reports = 0                        # loss reports taken
        self.packets = 0                        # packets the loss estimate rests on

    @property
    def loss(self) -> float:
        return self.policy.loss

    @property
    def lossless(self) -> bool:
        return self.s.reliable or self.policy.loss < LOSSLESS

    def observe(self, lost: int, sent: int) -> bool:
        """The transport's count of datagrams lost among those whose fate it
        learnt since its last report: the parity of the next stripes follows
        it. The first report is taken as it is: the moving average from 0
        took ~8 reports (2,000 packets, the first 15 stripes at 20 % loss)
        to come near the loss, and those stripes needed repair rounds.
        True for the first report (the stripes sent before it are owed
        their parity: Stripes.owe_parity)."""
        if sent <= 0:
            return False
        first = self.reports == 0
        if first:
            self.policy.loss = min(lost, sent) / sent
        else:
            self.policy.observe(min(lost, sent), sent)
        self.reports += 1
        self.packets += sent
        return first

    def parity(self, k: int, d: int) -> int:
        """Parity shards sent with a stripe of d data shards of a content cut
        into stripes of k, from the loss estimate as it is when the stripe
        goes out (the receiver needs no m: a shard's index says whether it is
        data or which parity row): for a full stripe the fewest that keep its
        chance of needing a repair round below STRIPE_TARGET, at least
        MIN_PARITY (or --min-parity); for a shortened one (a small file, a
        file's tail) the same for its d — none on a link that has lost
        nothing (a small file would double), at least one otherwise."""
        if d == k:
            return self.full(k)
        if self.lossless:
            return 0
        return max(1, min(self.full(k), parity_for(d, self.planned_loss())))

    def full(self, k: int) -> int:
        """Parity shards for a full stripe of k at the loss estimated now
        (none on a reliable stream: nothing is lost there)."""
        if self.s.reliable:
            return 0
        return min(MAX_SHARDS - k, max(self.min_parity, parity_for(k, self.planned_loss())))

    def planned_loss(self) -> float:
        """The loss parity is sized for: the estimate, plus two standard
        errors while it rests on fewer than LOSS_SETTLED packets (a first
        sample of 100 at 33 % loss reads anywhere from 24 to 42 %: the
        stripes sent on a low reading came 16 shards short). No margin on a
        link that has lost nothing."""
        p, n = self.policy.loss, self.packets
        if p < LOSSLESS or n >= LOSS_SETTLED or n == 0:
            return p
        return min(0.5, p + 2 * math.sqrt(p * (1 - p) / n))

    def spare(self, need: int) -> int:
        """Extra shards sent with a repair of ``need``: parity for their own loss
        (a stripe sent before the loss was measured, 44 shards short at 33 %,
        took four rounds with one spare each time)."""
        return max(1, parity_for(need, self.planned_loss()))

    def geometry(self, resume: F.Resume | None) -> tuple[int, int]:
        """(data shards per stripe, shard bytes) for a content about to be
        cut: a cut transfer's (``resume``: so that the stripes the receiver
        kept are skipped) if its shards still fit the path's datagrams; else
        the k with the least parity per data shard at the loss estimated now
        (``stripe_k``), or K_UNKNOWN before any estimate (a single large file
        starts before the first loss sample), and the largest shard the path
        carries now (``Session.shard_size``). On a reliable stream
        (``Session.reliable``: the TLS over TCP path) always RELIABLE_K shards
        of the stream's size: a resumed content's kept stripes carry over
        whatever geometry they were cut in (``common.carried``)."""
        if self.s.reliable:
            return RELIABLE_K, self.s.shard_size
        r = resume
        if r is not None and 1 <= r.k < MAX_SHARDS and MIN_SHARD_SIZE <= r.shard_size <= self.s.shard_size:
            return r.k, r.shard_size
        if self.reports == 0:                   # (the first files: nothing measured yet)
            return K_UNKNOWN, self.s.shard_size
        return stripe_k(self.policy.loss), self.s.shard_size


def stripe_k(loss: float) -> int:
    """Data shards per stripe for a file started at loss estimate ``loss``:
    of K_CHOICES, the k whose parity for STRIPE_TARGET at ``loss`` plus
    K_MARGIN (the loss may rise while the file is sent) is the least per
    data shard, within k + m <= 256. Larger stripes need relatively less
    parity (the binomial tail narrows): at 20 % loss k = 128 needs m = 50
    (28 % of what is sent is parity), k = 176 needs 64 (27 %); at 33 %,
    128 + 90 against 144 + 99. Without loss, DEFAULT_K."""
    return _stripe_k_cached(math.ceil(loss * 100 - 1e-9))


@functools.lru_cache(maxsize=128)
def _stripe_k_cached(percent: int) -> int:
    from ..erasure.policy import failure_probability
    if percent <= 0:
        return DEFAULT_K
    loss = min(percent / 100 + K_MARGIN, 0.5)
    best, best_share = DEFAULT_K, None
    for k in K_CHOICES:
        m = _parity_cached(k, round(loss * 1000), STRIPE_TARGET)
        if failure_probability(k, m, loss) >= STRIPE_TARGET:
            break                               # no m within 256 shards is enough: larger k neither
        share = m / k
        if best_share is None or share < best_share - 1e-9:
            best, best_share = k, share
    return best


def parity_for(d: int, loss: float) -> int:
    """parity_for_target(d, loss, STRIPE_TARGET), the loss rounded up to the
    next 0.1 % so that the answer can be kept (working it out takes
    milliseconds at d = 128)."""
    return _parity_cached(d, math.ceil(loss * 1000 - 1e-9), STRIPE_TARGET)


@functools.lru_cache(maxsize=4096)
def _parity_cached(d: int, permille: int, target: float) -> int:
    from ..erasure.policy import parity_for_target
    return parity_for_target(d, permille / 1000, target) if permille > 0 else 0

