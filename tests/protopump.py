"""Two protocol sessions pumped into each other in memory, with a clock moved
by hand and a datagram channel that loses, reorders and duplicates."""
from __future__ import annotations

import random
from pathlib import Path

from resync.identity import load_identity
from resync.protocol.session import ClientSession, Module, Options, ServerSession


class Channel:
    """Datagrams from one end to the other: each lost with probability
    ``loss``, duplicated with ``dup``, delayed by ``delay`` plus up to
    ``jitter`` (so later ones overtake earlier ones)."""

    def __init__(self, rng: random.Random, loss=0.0, dup=0.0, delay=0.01, jitter=0.0, corrupt=0.0):
        self.rng, self.loss, self.dup, self.delay, self.jitter, self.corrupt = rng, loss, dup, delay, jitter, corrupt
        self.queue: list[tuple[float, int, bytes]] = []
        self.sent = self.lost = 0
        self._n = 0

    def send(self, now: float, datagram: bytes) -> None:
        self.sent += 1
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            data = datagram
            if self.corrupt and self.rng.random() < self.corrupt:
                b = bytearray(data)
                b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
                data = bytes(b)
            self._n += 1
            self.queue.append((now + self.delay + self.rng.random() * self.jitter, self._n, data))

    def due(self, now: float) -> list[bytes]:
        ready = sorted(x for x in self.queue if x[0] <= now)
        self.queue = [x for x in self.queue if x[0] > now]
        return [x[2] for x in ready]

    def next_time(self) -> float | None:
        return min((x[0] for x in self.queue), default=None)


def identities(tmp: Path):
    return load_identity(tmp / "client-id", create=True), load_identity(tmp / "server-id", create=True)


def pump(client, server, channel: Channel, budget: int = 64, max_time: float = 600.0, rtt: float = 0.02,
         cut_at: float | None = None, cut_after: int | None = None, kill: bool = False,
         rate: float | None = None, stream_delay: float = 0.0, cut_when=None):
    """Run both sessions until both are finished; returns the final clock.
    ``cut_at``: at that protocol time the connection is lost (both sessions
    are told, as a transport would on a kill or a network outage);
    ``cut_after``: the same once the receiver has taken that many datagrams;
    ``kill``: at the cut the receiver is not told (a SIGKILL: only its last
    periodic checkpoint survives), the sender is; ``rate``: the link's rate in
    bytes per second — the clock moves on by each datagram's time on the wire
    (without it, time stands still while datagrams flow); ``stream_delay``:
    control bytes take this long (s) to arrive, so shards sent after a frame
    can overtake it (QUIC writes queued datagrams ahead of stream data, and
    resends a lost stream packet later); ``cut_when``: a function of
    nothing, the cut once it says True."""
    now = 0.0
    client.rtt = server.rtt = rtt
    in_transit: list[tuple[float, int, object, bytes]] = []     # control bytes on their way
    while not (client.finished and server.finished):
        moved = False
        for n, (a, b) in enumerate(((client, server), (server, client))):
            data = a.stream_to_send()
            if data:
                in_transit.append((now + stream_delay, n, b, data))
                moved = True
        for item in [x for x in in_transit if x[0] <= now]:
            in_transit.remove(item)
            item[2].receive_stream(item[3], now)
            moved = True
        sent, lost = channel.sent, channel.lost
        for d in server.datagrams_to_send(now, budget) + client.datagrams_to_send(now, budget):
            channel.send(now, d)
            moved = True
            if rate:
                now += len(d) / rate
        if channel.sent > sent:                   # the transport's loss report, as QUIC's would be
            for s in (client, server):
                s.observe_loss(channel.lost - lost, channel.sent - sent)
        for d in channel.due(now):
            (server if server_is_receiver(server) else client).receive_datagram(d, now)
            moved = True
        for s in (client, server):
            t = s.next_timer()
            if t is not None and t <= now:
                s.handle_timer(now)
                moved = True
        if client.finished and server.finished:
            break
        if (client.error is not None or server.error is not None) and not moved:
            break
        if not moved:
            times = [t for t in (client.next_timer(), server.next_timer(), channel.next_time(),
                                 min((x[0] for x in in_transit), default=None)) if t is not None]
            if not times:
                now += 0.001
            else:
                now = max(now + 1e-6, min(times))
        taken = max(client.stats["datagrams_received"], server.stats["datagrams_received"])
        if (cut_at is not None and now >= cut_at) or (cut_after is not None and taken >= cut_after) \
                or (cut_when is not None and cut_when()):
            receiver = server if server_is_receiver(server) else client
            for s in (client, server):
                if not (kill and s is receiver):
                    s.connection_lost("cut by the test")
            if kill:
                _die(receiver.role)
            return now
        if now > max_time:
            raise AssertionError(f"not finished after {max_time} s of protocol time")
    return now


def _die(receiver) -> None:
    """What the kernel does for a killed receiver: its descriptors closed
    (its flock on the destination gone), nothing else — the staging
    directory stays as the last periodic checkpoint left it."""
    import os
    for inc in receiver.wanted.values():
        if inc.fd >= 0:
            os.close(inc.fd)
    receiver.apply.staging.keep()
    receiver.apply.close()


class RemoteLines:
    """A client's report that keeps the lines the server sent it (Item
    frames: (kind, text))."""

    def __init__(self):
        self.items: list[tuple[int, bytes]] = []

    def remote(self, frame) -> None:
        self.items.append((frame.kind, frame.text))


def server_is_receiver(server) -> bool:
    from resync.protocol.receiver import Receiver
    return isinstance(server.role, Receiver)


def make_pair(tmp: Path, push: bool, local: Path, module_root: Path, path: str = "", options: Options | None = None,
              allowed=None, read_only=False, client_report=None, **server_options):
    cid, sid = identities(tmp)
    modules = {"m": Module("m", str(module_root), read_only, allowed if allowed is not None else {cid.device_id})}
    server = ServerSession(sid, sid.cert_der, modules, **server_options)
    client = ClientSession(cid, sid.cert_der, push, "m", path, str(local), options or Options(), client_report)
    return client, server
