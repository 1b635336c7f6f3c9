"""The destination's guard against replay, rollback and omission (docs/relay.md,
"The destination's guard"): sans-I/O decisions over what a destination has
applied from each (source, tree), and the state that records it.

Each envelope of a tree names its generation (1, 2, ...) and the id of the
previous generation's envelope (zeros for the first): a chain, as
Scuttlebutt's feeds carry ``sequence`` and ``previous``. The destination
applies only the next link of the chain it holds:

- the generation after the last applied, naming the last applied's id:
  **apply**;
- the last applied again, or an older one: **replay** — refused, nothing
  touched, and acknowledged so that nobody sends it again (a relay that
  replays, a second copy through another relay or on a disk);
- a later one: **park** — kept unopened until the missing ones arrive (a
  relay that withholds a generation delays the later ones; it cannot make
  the destination skip it);
- the next generation naming another previous id: **refuse** — the chain
  is broken (a source that lost its state, or a forgery with a stolen key),
  said loudly, nothing applied.

A tree's first generation (1, previous zeros) starts the chain.
"""
from __future__ import annotations

from dataclasses import dataclass

APPLY, REPLAY, PARK, REFUSE = "apply", "replay", "park", "refuse"
ZERO = bytes(32)


@dataclass(frozen=True)
class Link:
    """The last applied generation of a (source, tree) and its envelope's id."""

    generation: int
    id: bytes


def decide(last: Link | None, generation: int, previous: bytes, env_id: bytes) -> tuple[str, str]:
    """What to do with an envelope of ``generation`` naming ``previous``
    (``env_id``: its own id) given the tree's ``last`` applied link (None:
    nothing applied yet). (one of APPLY, REPLAY, PARK, REFUSE; why, one line)."""
    if last is None:
        if generation == 1:
            if previous != ZERO:
                return REFUSE, "generation 1 names a previous generation"
            return APPLY, "the tree's first generation"
        return PARK, f"generation {generation} before the tree's first was applied here"
    if generation <= last.generation:
        if generation == last.generation and env_id == last.id:
            return REPLAY, f"generation {generation} was applied already (the same envelope again)"
        if generation == last.generation:
            return REFUSE, (f"another generation {generation} than the one applied (the source's chain forked: "
                            "it lost its state, or its key was used by someone else)")
        return REPLAY, f"generation {generation} is older than the one applied ({last.generation}): a rollback"
    if generation > last.generation + 1:
        return PARK, f"generation {generation} waits for {last.generation + 1}"
    if previous != last.id:
        return REFUSE, (f"generation {generation} does not follow the generation {last.generation} applied here "
                        "(its previous id differs): the chain is broken")
    return APPLY, f"generation {generation} follows {last.generation}"


class Chains:
    """The guard's state: the last link applied per (source, tree) — kept by
    ``store`` (store.guard.GuardStore: ``get(key)``, ``put(key, link)``) —
    and the envelopes parked, waiting for a gap to close (``parked``: key ->
    {generation: (previous, id, data)}; ``data`` is the caller's: where the
    parked envelope's bytes are)."""

    def __init__(self, store):
        self.store = store
        self.parked: dict[tuple[bytes, bytes], dict[int, tuple[bytes, bytes, object]]] = {}

    def offer(self, source: bytes, tree: bytes, generation: int, previous: bytes, env_id: bytes,
              data=None) -> tuple[str, str]:
        """An envelope arrives: the decision (a PARK keeps ``data`` aside)."""
        key = (source, tree)
        verdict, why = decide(self.store.get(key), generation, previous, env_id)
        if verdict == PARK:
            self.parked.setdefault(key, {})[generation] = (previous, env_id, data)
        return verdict, why

    def applied(self, source: bytes, tree: bytes, generation: int, env_id: bytes) -> list:
        """Generation ``generation`` (envelope ``env_id``) of the tree is
        applied: recorded; the parked envelope that follows it, if one does,
        is returned to be applied next (its ``data``), with any after it only
        once that one is applied in turn."""
        key = (source, tree)
        self.store.put(key, Link(generation, env_id))
        waiting = self.parked.get(key, {})
        for g in [g for g in waiting if g <= generation]:
            del waiting[g]                      # (older ones parked meanwhile: replays now)
        nxt = waiting.get(generation + 1)
        if nxt is None or nxt[0] != env_id:
            return []
        del waiting[generation + 1]
        return [(generation + 1, nxt[1], nxt[2])]
