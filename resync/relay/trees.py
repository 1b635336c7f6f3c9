"""A tree mirrored through relays, at both ends (docs/relay.md, "A relayed
tree"): the source seals each generation of its tree as a bundle against
what the previous generation delivers; the destination checks the envelope,
its place in the chain, then applies the bundle with unpack — the apply
layer every other way of changing a destination uses.

Source: per (destination, name) it keeps in its state directory the tree's
id, the last generation sealed and its envelope's id, and the tree
signature of what that generation makes the destination hold — the basis
of the next generation's bundle (rsync's batch files and git's incremental
bundles likewise need the destination's state; here the source keeps it
instead of asking for it). A generation is built against the last one
sealed, whether or not its receipt has come back: the destination's guard
parks it until the one before has arrived.

Destination: ``receive`` verifies the envelope (signature, payload hash,
expiry), asks the guard, opens it, and unpacks its bundle into the
directory the destination maps the source's name to; unpack refuses a
destination that no longer matches the signature the bundle was made
against, with nothing touched.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ResyncError, UsageError
from .envelope import EnvelopeError
from .guard import APPLY, PARK, REFUSE, ZERO

DEFAULT_TTL = 30 * 86400 * 1000          # ms an envelope lives by default
DEFAULT_HOPS = 16
RECEIPT_TREE = b"\xff" * 16              # the tree id receipts carry: each stands alone, in no chain
RECEIPT = "receipt"                      # Received.verdict of a receipt taken by the source


@dataclass
class Sealed:
    """What ``Outbox.seal`` made: the envelope's bytes and id, its generation."""

    data: bytes
    id: bytes
    generation: int


class Outbox:
    """The source's relayed trees, in ``directory`` (its state: made 0700).
    ``card``: this device's own card (keys.Card), sealed inside each envelope
    (only the destination reads it) so that the destination can seal its
    receipt back; None: no receipts asked for."""

    def __init__(self, directory: str | os.PathLike, identity, card=None):
        self.directory, self.identity, self.card = Path(directory), identity, card

    def _tree_dir(self, destination: str, name: str) -> Path:
        from .keys import device_hash
        key = device_hash(destination).hex()[:32] + "-" + _safe(name)
        return self.directory / "trees" / key

    def state(self, destination: str, name: str) -> dict:
        """The tree's state: ``tree`` (hex id), ``generation`` (0: none
        sealed), ``last`` (hex id of the last envelope)."""
        path = self._tree_dir(destination, name) / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {"tree": os.urandom(16).hex(), "generation": 0, "last": ZERO.hex()}
        except (OSError, ValueError) as exc:
            raise ResyncError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None

    def seal(self, src: str, card, module: str, path: str = "", priority: str = "normal", now: int = 0,
             ttl: int = DEFAULT_TTL, hop_limit: int = DEFAULT_HOPS, parity: tuple[int, int] = (50, 10),
             store=None) -> Sealed:
        """The next generation of tree ``src`` for the device of ``card``
        (keys.Card), named ``module``/``path`` at the destination: a bundle
        of what changed since the last generation sealed (everything, the
        first time), sealed in an envelope; ``store(raw)`` keeps it (a
        spool's put, a durable file) before the tree's state advances — if
        it raises, nothing is committed and the next seal makes the same
        generation again."""
        import blake3

        from ..bundle.pack import pack, signature_tree
        from ..fs import write_durable
        from .envelope import parse, seal
        d = self._tree_dir(card.device_id, f"{module}/{path}")
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.state(card.device_id, f"{module}/{path}")
        basis = d / "delivered.sig"
        against = str(basis) if basis.exists() else None     # (a direct sync may have set it: delivered_directly)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            bundle = os.path.join(tmp, "bundle")
            stats = pack(src, bundle, against, *parity)
            if stats.errors:
                raise ResyncError(f"{src}: {stats.errors} entries could not be read; nothing sealed "
                                  f"({'; '.join(stats.messages[:3])})")
            data = Path(bundle).read_bytes()
            base = blake3.blake3(basis.read_bytes()).digest() if against else bytes(32)
            generation = st["generation"] + 1
            inner = {"kind": "bundle", "module": module, "path": path}
            if self.card is not None:
                inner["reply"] = self.card.text()
            raw = seal(self.identity, card, inner, data,
                       tree=bytes.fromhex(st["tree"]), generation=generation, previous=bytes.fromhex(st["last"]),
                       base=base, priority=priority, created=now, expires=now + ttl, hop_limit=hop_limit)
            nxt = os.path.join(tmp, "next.sig")
            signature_tree(src, nxt)            # what the destination holds once this generation is applied
            if store is not None:
                store(raw)
            os.replace(nxt, basis)
        env_id = parse(raw).id
        write_durable(d / "state.json", json.dumps({"tree": st["tree"], "generation": generation,
                                                    "last": env_id.hex(), "to": card.device_id,
                                                    "name": f"{module}/{path}".rstrip("/"), "src": os.path.abspath(src),
                                                    "sealed": now, "bytes": len(raw)}).encode(), mode=0o600)
        return Sealed(raw, env_id, generation)

    def delivered_directly(self, destination: str, module: str, path: str, src: str, now: int = 0) -> None:
        """A direct sync (`resync sync --via`) has made the destination hold
        tree ``src``: its signature becomes the basis of the next relayed
        generation, which starts a new chain (a new tree id): a generation
        still on its way in the old chain was built for a tree the
        destination no longer holds (refused there: nothing applied), and
        the next one must not wait for it."""
        from ..bundle.pack import signature_tree
        from ..fs import write_durable
        name = f"{module}/{path}"
        d = self._tree_dir(destination, name)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            nxt = os.path.join(tmp, "next.sig")
            signature_tree(src, nxt)
            os.replace(nxt, d / "delivered.sig")
        st = self.state(destination, name)
        st.update(tree=os.urandom(16).hex(), generation=0, last=ZERO.hex(), to=destination,
                  name=name.rstrip("/"), src=os.path.abspath(src), direct=now)
        write_durable(d / "state.json", json.dumps(st).encode(), mode=0o600)

    def take_receipt(self, inner: dict, sender: str, now: int) -> dict | None:
        """A receipt from device ``sender`` (its inner header: ``for`` the
        envelope's id, ``tree``, ``generation``, ``verdict``, ``why``)
        recorded in the tree's state: ``receipt`` (the latest generation's) and
        ``confirmed`` (the highest generation applied there). The tree's
        state, or None when no tree sent from here to that device matches."""
        from ..fs import write_durable
        for path in sorted((self.directory / "trees").glob("*/state.json")):
            try:
                st = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if st.get("tree") != inner.get("tree") or st.get("to") != sender:
                continue
            generation = int(inner.get("generation", 0))
            old = st.get("receipt", {})
            if generation > old.get("generation", 0) or (generation == old.get("generation")
                                                         and old.get("verdict") != APPLY):  # (any order)
                st["receipt"] = {"envelope": inner.get("for"), "generation": generation,
                                 "verdict": inner.get("verdict"), "why": inner.get("why", ""), "at": now}
            if inner.get("verdict") == APPLY:
                st["confirmed"] = max(st.get("confirmed", 0), generation)
            if inner.get("verdict") == REFUSE:
                # the destination holds a tree none of this chain was built for: the chain starts again,
                # its next generation whole (a mirror: the destination's own changes are replaced)
                st.update(tree=os.urandom(16).hex(), generation=0, last=ZERO.hex(), restarted=now)
                (path.parent / "delivered.sig").unlink(missing_ok=True)
            write_durable(path, json.dumps(st).encode(), mode=0o600)
            return st
        return None

    def trees(self) -> list[dict]:
        """Every tree sent from here: ``to`` (device ID), ``name``, ``src``,
        ``generation``, ``last`` (the last envelope's id), ``sealed`` (ms),
        ``bytes`` (of the last envelope)."""
        out = []
        for state in sorted((self.directory / "trees").glob("*/state.json")):
            try:
                out.append(json.loads(state.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda t: (t.get("to", ""), t.get("name", "")))


def _safe(name: str) -> str:
    import hashlib
    return hashlib.sha256(name.encode()).hexdigest()[:16]


@dataclass
class Received:
    """What ``receive`` did with an envelope: ``verdict`` (guard.APPLY,
    REPLAY, PARK, REFUSE), why, and the generations applied (this one and
    any parked ones it released), each with its unpack statistics."""

    verdict: str
    why: str
    applied: list


class Inbox:
    """The destination's side: ``identity``, its ``exchange_key`` and
    ``card``; ``chains``: guard.Chains; ``places(source_device_id, module,
    path)``: the local directory a source's tree goes to (UsageError when
    that source may not write there)."""

    def __init__(self, identity, exchange_key, card, chains, places, outbox: Outbox | None = None):
        self.identity, self.exchange_key, self.card = identity, exchange_key, card
        self.chains, self.places, self.outbox = chains, places, outbox
        self.receipts: list[bytes] = []         # receipts sealed to sources, for the caller to send back

    def receive(self, data: bytes, now: int) -> Received:
        """Take an envelope: EnvelopeError (exit 4) if it is not whole or
        not this device's, or its lifetime has ended. A generation applied,
        a replay, or one refused (the destination changed: VerifyError from
        unpack, re-raised) is answered with a receipt to its source when it
        asked for one (``receipts``: the sealed receipts to send back, taken
        by the caller). A receipt for this device's own trees is recorded by
        ``outbox`` (verdict RECEIPT)."""
        from .envelope import open_payload, parse, verify
        from .keys import key_hash
        env = parse(data)
        verify(env)
        h = env.header
        if h.expires <= now:
            raise EnvelopeError("its lifetime ended before it arrived")
        if h.destination != key_hash(self.card.signing):
            raise EnvelopeError("it is sealed to another device")
        if h.tree == RECEIPT_TREE:
            return self._receipt(env, now)
        source = key_hash(h.source)
        verdict, why = self.chains.offer(source, h.tree, h.generation, h.previous, env.id, data)
        if verdict != APPLY:
            if verdict != PARK:
                self._reply(env, data, verdict, why, now)
            return Received(verdict, why, [])
        applied = []
        ready = [(h.generation, env.id, data)]
        while ready:
            generation, env_id, raw = ready.pop()
            e = parse(raw)
            inner, bundle = open_payload(e, self.exchange_key, self.card)
            try:
                stats = self._apply(e, inner, bundle)
            except ResyncError as exc:
                if getattr(exc, "exit_code", None) == 5:        # the destination changed: refused for good
                    self._reply(e, raw, REFUSE, str(exc), now, inner)
                raise
            applied.append((generation, stats))
            self._reply(e, raw, APPLY, "applied", now, inner)
            ready += self.chains.applied(source, h.tree, generation, env_id)
        return Received(APPLY, why, applied)

    def _reply(self, env, raw: bytes, verdict: str, why: str, now: int, inner: dict | None = None) -> None:
        """Seal a receipt of ``env`` to its source, if it sealed its card inside."""
        from .envelope import open_payload, seal
        from .keys import BadCard, parse_card
        if inner is None:
            try:
                inner, _ = open_payload(env, self.exchange_key, self.card)
            except EnvelopeError:
                return
        reply = inner.get("reply")
        if not isinstance(reply, str):
            return
        from ..identity import device_id
        try:
            card = parse_card(reply, expect=device_id(env.header.source))
        except BadCard:
            return                              # (a card not the source's own: no receipt to anyone else)
        h = env.header
        body = {"kind": RECEIPT, "for": env.id.hex(), "tree": h.tree.hex(), "generation": h.generation,
                "verdict": verdict, "why": why[:1000]}
        self.receipts.append(seal(self.identity, card, body, b"", tree=RECEIPT_TREE, generation=1,
                                  previous=env.id, base=bytes(32), priority=h.priority, created=now,
                                  expires=max(h.expires, now + 1), hop_limit=DEFAULT_HOPS))

    def _receipt(self, env, now: int) -> Received:
        from ..identity import device_id
        from .envelope import open_payload
        inner, _ = open_payload(env, self.exchange_key, self.card)
        if inner.get("kind") != RECEIPT:
            raise EnvelopeError("an envelope of the receipts' tree that is not a receipt")
        sender = device_id(env.header.source)
        recorded = self.outbox.take_receipt(inner, sender, now) if self.outbox is not None else None
        what = f"{inner.get('verdict')} at {sender}: generation {inner.get('generation')}" + \
            (f" ({inner.get('why')})" if inner.get("verdict") != APPLY else "")
        return Received(RECEIPT, what if recorded is not None else f"{what}, of no tree sent from here", [])

    def _apply(self, env, inner: dict, bundle: bytes):
        from ..bundle.unpack import unpack
        from ..identity import device_id
        if inner.get("kind") != "bundle" or not isinstance(inner.get("module"), str):
            raise EnvelopeError("its payload is not a bundle of a named tree")
        target = self.places(device_id(env.header.source), inner["module"], str(inner.get("path", "")))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bundle")
            Path(path).write_bytes(bundle)
            return unpack(path, target)


def module_places(modules: dict[str, str], allowed: dict[str, set]):
    """``places`` for an Inbox: ``modules`` name -> local directory;
    ``allowed`` name -> device IDs that may write there. The path inside a
    module is checked to stay beneath it (no '..', no absolute path)."""
    def places(source: str, module: str, path: str) -> str:
        if module not in modules or source not in allowed.get(module, set()):
            raise UsageError(f"device {source} may not write module {module!r} here")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or path.startswith("/"):
            raise UsageError(f"{path!r}: the path leaves the module")
        root = os.path.realpath(modules[module])
        target = os.path.join(root, *parts)
        real = os.path.realpath(target)        # (a symlink inside the module must not lead out of it)
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            raise UsageError(f"{path!r}: the path leaves the module (through a symlink)")
        return target
    return places
