"""A relaying daemon's own work (docs/relay.md "Forwarding"): it calls the
next hop of each route when its spool holds envelopes for it, and delivers
the envelopes sealed to its own device — applied through the destination's
Inbox (unpack), in a worker thread, their receipts put back into the spool
for the routes to carry to their sources.

A next hop that cannot be reached, refuses the connection or fails in the
exchange is tried again after a backoff of its own (1 s doubling to an hour,
with 50-100 % jitter), whatever the envelopes' own backoffs (spool.failed,
for envelopes a hop refused); a successful exchange resets it. Envelopes
wait in the spool meanwhile, until their lifetime ends — never dropped for
failing.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from ..errors import ConnectionFailed, ResyncError, TimedOut

HOP_BACKOFF_FIRST = 1.0          # s before an unreachable next hop is called again, doubling ...
HOP_BACKOFF_CAP = 3600.0         # ... to an hour at most
IDLE_LOOK = 30.0                 # s between looks at the spool when nothing woke the forwarder


@dataclass
class Route:
    """Envelopes for the devices ``to`` (device IDs; empty: any device not
    routed otherwise) go to the node at ``remote`` (net.url.Remote), which
    must prove to be ``peer_id``."""

    to: frozenset
    remote: object
    peer_id: str
    delay: float = 0.0                      # (the hop's backoff: its state)
    next_try: float = 0.0
    last_error: str = field(default="")


def parse_route(spec: str) -> Route:
    """``TO=resync://HOST[:PORT][@PEER-ID]``: TO a device ID or ``*``; the
    peer's ID is TO's when omitted (the next hop is the destination itself).
    UsageError otherwise."""
    from ..errors import UsageError
    from ..identity import parse_device_id
    from .url import parse_relay_url
    to, sep, rest = spec.partition("=")
    if not sep or not to or not rest:
        raise UsageError(f"--relay-route {spec!r}: expected DEVICE-ID=resync://HOST[:PORT][@PEER-ID] (or *=...)")
    url, _, peer = rest.partition("@")
    if to.strip() == "*":
        targets = frozenset()
        if not peer:
            raise UsageError(f"--relay-route {spec!r}: a route for any device (*) needs @PEER-ID, the next hop's")
    else:
        targets = frozenset({parse_device_id(to.strip())})
    peer_id = parse_device_id(peer) if peer else next(iter(targets))
    return Route(targets, parse_relay_url(url), peer_id)


class Forwarder:
    """The routes' calls and the deliveries of one daemon's spool.
    ``deliver(data) -> (verdict, why, receipts)``: applies an envelope sealed
    to this device (in a worker thread), or None when this daemon applies
    nothing (a pure relay keeps such envelopes for their device to collect)."""

    def __init__(self, spool, identity, routes: list[Route], log, deliver=None):
        self.spool, self.identity, self.routes, self.log, self.deliver = spool, identity, routes, log, deliver
        from ..relay.keys import device_hash
        self.own = device_hash(identity.device_id)
        self._routed = {device_hash(d).hex() for r in routes for d in r.to}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something changed (custody taken): look at the spool now."""
        self._wake.set()

    def _hashes(self, route: Route) -> set:
        from ..relay.keys import device_hash
        return {device_hash(d).hex() for d in route.to}

    def _wanted(self, route: Route):
        own, targets, routed = self.own.hex(), self._hashes(route), self._routed

        def wanted(h) -> bool:
            if h.destination == own:
                return False
            return h.destination in targets if targets else h.destination not in routed
        return wanted

    async def run(self) -> None:
        self._wake.set()                        # (a first look at once: a restarted relay has work waiting)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._sleep())
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if self.deliver is not None:
                    await self._deliver_all()
                for route in self.routes:
                    if route.next_try <= time.monotonic() and self._has_work(route):
                        await self._call(route)
            except asyncio.CancelledError:
                raise
            except Exception as exc:            # a fault of resync's own: said, and the forwarder goes on
                self.log(f"relay: internal error while forwarding: {type(exc).__name__}: {exc}")

    def _sleep(self) -> float:
        now = time.monotonic()
        waits = [max(0.05, r.next_try - now) for r in self.routes if r.next_try > now and self._has_work(r)]
        return min(waits + [IDLE_LOOK])

    def _has_work(self, route: Route) -> bool:
        from ..relay.node import SpoolOut
        from ..relay.keys import device_hash
        out = SpoolOut(self.spool, self.own, device_hash(route.peer_id), self._wanted(route))
        return bool(out.candidates(int(time.time() * 1000)))

    async def _call(self, route: Route) -> None:
        """One exchange with the route's next hop: what is due for it handed over."""
        from ..protocol.session import Options, RelayClientSession
        from ..relay.keys import device_hash
        from ..relay.node import SpoolOut
        from .client import Transfer, _once, _Stop
        peer = device_hash(route.peer_id)
        ends = {}

        def session(identity, cert):
            ends["out"] = SpoolOut(self.spool, self.own, peer, self._wanted(route))
            return RelayClientSession(identity, cert, ends["out"], None, False)
        t = Transfer(route.remote, True, "", Options(), peer_id=route.peer_id, timeout=30.0, retry_for=0,
                     session=session)
        stop = _Stop(asyncio.get_running_loop(), asyncio.current_task())
        try:
            s = await _once(t, self.identity, None, None, None, {}, stop)
            if s.error is not None:
                raise s.error
        except (ConnectionFailed, TimedOut, ResyncError) as exc:
            route.delay = min(HOP_BACKOFF_CAP, max(HOP_BACKOFF_FIRST, route.delay * 2))
            wait = route.delay * random.uniform(0.5, 1.0)
            route.next_try, route.last_error = time.monotonic() + wait, str(exc)
            self.log(f"relay: next hop {route.peer_id} at {route.remote.address}: {exc}; "
                     f"trying again in {wait:.0f} s")
            return
        route.delay, route.next_try, route.last_error = 0.0, 0.0, ""
        r = s.result
        if r.get("handed_over") or r.get("refused_by_peer"):
            self.log(f"relay: next hop {route.peer_id} at {route.remote.address}: handed over "
                     f"{r.get('handed_over', 0)} envelopes ({r.get('handed_bytes', 0)} B), refused "
                     f"{r.get('refused_by_peer', 0)}")

    async def _deliver_all(self) -> None:
        """The envelopes sealed to this device, offered to the destination's
        Inbox one at a time in a worker thread (unpack's work is off the
        event loop); each applied, replayed or refused is given up (its
        receipt queued for its source); a parked one stays until the
        generation before it arrives."""
        loop = asyncio.get_running_loop()
        own, now = self.own.hex(), int(time.time() * 1000)
        for h in sorted((h for h in self.spool.index.values() if h.destination == own and h.next_attempt <= now),
                        key=lambda h: h.received):
            if h.id not in self.spool.index:
                continue
            try:
                data = await loop.run_in_executor(None, self.spool.read, h.id)
            except OSError:
                continue                        # (removed meanwhile: expired, the operator)
            try:
                verdict, why, receipts = await loop.run_in_executor(None, self.deliver, data)
            except ResyncError as exc:
                verdict, why, receipts = "refused", str(exc), getattr(exc, "receipts", [])
                if not final_refusal(exc):      # (a full disk, a module not configured: kept, tried again)
                    self.spool.failed(h.id, str(exc))
                    self.log(f"relay: envelope {h.id[:16]} for this device not applied, kept: {exc}")
                    continue
            for raw in receipts:
                try:
                    self.spool.put(raw)
                except ResyncError as exc:
                    self.log(f"relay: a receipt not kept: {exc}")
            if verdict == "park":
                continue
            self.spool.remove(h.id, {"apply": "applied"}.get(verdict, verdict))
            self.log(f"relay: envelope {h.id[:16]} for this device: {verdict}: {why}")


def final_refusal(exc: ResyncError) -> bool:
    """Whether an envelope that failed to apply is refused for good (given up,
    its source told): not whole or not this device's (exit 4), or the
    destination changed since the generation before (exit 5). Anything else
    — a full disk, an I/O error, a module not configured or not allowing
    its source — may pass: the envelope is kept and tried again."""
    return getattr(exc, "exit_code", None) in (4, 5)
