"""The destination's guard (resync.relay.guard): a chain of generations per
(source, tree) applied in order, exactly once; replays and rollbacks
refused and acknowledged; a withheld generation parks the later ones; a
broken chain refused. Checked against every order of arrival."""
from __future__ import annotations

import itertools
import random

from resync.relay.guard import APPLY, PARK, REFUSE, REPLAY, ZERO, Chains, Link, decide


def _chain(n: int, seed: int = 0) -> list[tuple[int, bytes, bytes]]:
    """(generation, previous id, id) of a tree's first n generations."""
    rng = random.Random(seed)
    out, previous = [], ZERO
    for g in range(1, n + 1):
        me = bytes(rng.randrange(256) for _ in range(32))
        out.append((g, previous, me))
        previous = me
    return out


class _Memory(dict):
    def put(self, key, link):
        self[key] = link


def test_each_case_of_the_decision():
    (g1, p1, i1), (g2, p2, i2), (g3, p3, i3) = _chain(3)
    assert decide(None, g1, p1, i1)[0] == APPLY
    assert decide(None, 1, b"\x01" * 32, i1)[0] == REFUSE
    assert decide(None, g2, p2, i2)[0] == PARK
    last = Link(1, i1)
    assert decide(last, g2, p2, i2)[0] == APPLY
    assert decide(last, g1, p1, i1) == (REPLAY, "generation 1 was applied already (the same envelope again)")
    assert decide(last, g3, p3, i3)[0] == PARK
    assert decide(last, 2, b"\x02" * 32, i2)[0] == REFUSE          # the previous id is not the one applied
    assert decide(Link(2, i2), g1, p1, i1)[0] == REPLAY             # a rollback
    assert decide(Link(2, i2), 2, p2, b"\x09" * 32)[0] == REFUSE    # a fork: another generation 2


def _deliver(order, chain, copies: int = 1, store=None) -> tuple[list[int], list[str]]:
    """Offer ``chain``'s envelopes in ``order`` (each ``copies`` times),
    applying what may be: the generations applied, in turn, and the verdicts."""
    chains = Chains(store if store is not None else _Memory())
    src, tree = b"s" * 32, b"t" * 16
    applied, verdicts = [], []
    for n in order:
        for _ in range(copies):
            g, prev, me = chain[n]
            verdict, _ = chains.offer(src, tree, g, prev, me, data=me)
            verdicts.append(verdict)
            ready = [(g, me, me)] if verdict == APPLY else []
            while ready:
                g2, i2, _ = ready.pop()
                applied.append(g2)
                ready += chains.applied(src, tree, g2, i2)
    return applied, verdicts


def test_every_order_of_arrival_applies_each_generation_once_and_in_order():
    chain = _chain(5, seed=1)
    for order in itertools.permutations(range(5)):
        applied, verdicts = _deliver(order, chain, copies=2)
        assert applied == [1, 2, 3, 4, 5], (order, applied)
        assert verdicts.count(APPLY) <= 5 and REFUSE not in verdicts


def test_a_withheld_generation_holds_the_later_ones_until_it_comes():
    chain = _chain(4, seed=2)
    applied, verdicts = _deliver([0, 2, 3], chain)
    assert applied == [1] and verdicts == [APPLY, PARK, PARK]
    applied, _ = _deliver([0, 2, 3, 1], chain)
    assert applied == [1, 2, 3, 4]


def test_a_replayed_old_generation_is_refused_after_newer_ones():
    chain = _chain(3, seed=3)
    applied, verdicts = _deliver([0, 1, 2, 0, 1], chain)
    assert applied == [1, 2, 3] and verdicts[-2:] == [REPLAY, REPLAY]


def test_the_applied_link_survives_a_restart_and_an_unreadable_record_refuses(tmp_path):
    import pytest

    from resync.store import HistoryError
    from resync.store.guard import GuardStore
    chain = _chain(3, seed=4)
    store = GuardStore(tmp_path / "guard")
    applied, _ = _deliver([0, 1], chain, store=store)
    assert applied == [1, 2]
    again = Chains(GuardStore(tmp_path / "guard"))                  # the next start
    src, tree = b"s" * 32, b"t" * 16
    assert again.offer(src, tree, *chain[1])[0] == REPLAY
    assert again.offer(src, tree, *chain[2])[0] == APPLY
    record = next((tmp_path / "guard").iterdir())
    assert record.stat().st_mode & 0o777 == 0o600
    record.write_text("{not json")
    with pytest.raises(HistoryError, match="refused until it is repaired"):
        again.offer(src, tree, *chain[2])
