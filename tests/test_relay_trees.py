"""A tree mirrored through relays, both ends in memory (resync.relay.trees):
generations sealed against what the last one delivers and applied with
unpack in order, exactly once, whatever order they arrive in; replays,
tampering, a destination changed locally, a source not allowed and a path
out of the module refused with nothing touched."""
from __future__ import annotations

import random

import pytest

from resync.errors import UsageError, VerificationError
from resync.identity import load_identity
from resync.relay.envelope import EnvelopeError
from resync.relay.guard import APPLY, PARK, REPLAY, Chains
from resync.relay.keys import load_exchange_key, make_card
from resync.relay.trees import Inbox, Outbox, module_places
from resync.store.guard import GuardStore

from .test_sync import make_tree, mutate
from .treeutil import snapshot

NOW = 1_796_000_000_000


@pytest.fixture
def ends(tmp_path):
    a = load_identity(tmp_path / "a", create=True)
    b = load_identity(tmp_path / "b", create=True)
    bx = load_exchange_key(tmp_path / "b", create=True)
    card = make_card(b, bx)
    module = tmp_path / "module"
    module.mkdir()
    places = module_places({"mirror": str(module)}, {"mirror": {a.device_id}})
    inbox = Inbox(b, bx, card, Chains(GuardStore(tmp_path / "b" / "guard")), places)
    return Outbox(tmp_path / "a" / "relay", a), inbox, card, module


def test_generations_arrive_in_any_order_and_apply_once_each_in_order(ends, tmp_path):
    outbox, inbox, card, module = ends
    src = tmp_path / "src"
    make_tree(src, random.Random(1), files=40)
    sealed, trees = [], []
    for g in range(4):
        if g:
            mutate(src, random.Random(10 + g))
        sealed.append(outbox.seal(str(src), card, "mirror", "photos", now=NOW))
        trees.append(snapshot(src))
    assert [s.generation for s in sealed] == [1, 2, 3, 4]
    assert len(sealed[1].data) < len(sealed[0].data)             # a delta against what generation 1 delivers
    dst = module / "photos"
    r = inbox.receive(sealed[0].data, NOW)
    assert r.verdict == APPLY and [g for g, _ in r.applied] == [1] and snapshot(dst) == trees[0]
    assert inbox.receive(sealed[3].data, NOW).verdict == PARK   # generation 3 withheld: 4 waits
    assert inbox.receive(sealed[2].data, NOW).verdict == PARK   # (and 3 waits for 2)
    r = inbox.receive(sealed[1].data, NOW)
    assert [g for g, _ in r.applied] == [2, 3, 4] and snapshot(dst) == trees[3]
    for s in sealed:                                             # every one again: replays, nothing touched
        assert inbox.receive(s.data, NOW).verdict == REPLAY
    assert snapshot(dst) == trees[3]


def test_tampering_a_changed_destination_and_places_out_of_bounds_are_refused_with_nothing_applied(ends, tmp_path):
    outbox, inbox, card, module = ends
    src = tmp_path / "src"
    make_tree(src, random.Random(2), files=20)
    first = outbox.seal(str(src), card, "mirror", "docs", now=NOW)
    inbox.receive(first.data, NOW)
    dst = module / "docs"
    before = snapshot(dst)
    mutate(src, random.Random(3))
    second = outbox.seal(str(src), card, "mirror", "docs", now=NOW)
    bad = bytearray(second.data)
    bad[-100] ^= 4
    with pytest.raises(EnvelopeError):
        inbox.receive(bytes(bad), NOW)
    with pytest.raises(EnvelopeError, match="lifetime"):
        inbox.receive(second.data, NOW + 31 * 86400 * 1000)
    victim = next(p for p in sorted(dst.rglob("*")) if p.is_file() and not p.is_symlink())
    victim.write_bytes(b"changed here since\n")                   # the destination changed locally
    changed = snapshot(dst)
    with pytest.raises(VerificationError, match="nothing applied"):
        inbox.receive(second.data, NOW)
    assert snapshot(dst) == changed and snapshot(dst) != before
    other = Outbox(tmp_path / "c" / "relay", load_identity(tmp_path / "c", create=True))
    with pytest.raises(UsageError, match="may not write"):
        inbox.receive(other.seal(str(src), card, "mirror", "x", now=NOW).data, NOW)
    with pytest.raises(UsageError, match="leaves the module"):
        inbox.receive(outbox.seal(str(src), card, "mirror", "../escape", now=NOW).data, NOW)
    (module / "link").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="symlink"):
        inbox.receive(outbox.seal(str(src), card, "mirror", "link/in", now=NOW).data, NOW)
    assert not (tmp_path / "in").exists() and not (tmp_path / "escape").exists()
