"""Transfers sharing one QUIC connection (protocol.mux): each transfer's
session runs on a *channel* of the connection, and ``ChannelLink`` presents
a channel to the code that drives one session over one link (the server's
bookkeeping, the client's attempt) as if it were a connection of its own:
its session, its end, its statistics, its limits and its class. Packets,
the rate controller, the path MTU search, liveness and the connection's end
stay the connection's (``link.SessionLink``).

The daemon's own transfers to one server share a connection from
``Pool`` (net.sessions); a server takes channels on any QUIC connection
whose client begins with the channel preface.
"""
from __future__ import annotations

import asyncio
import time

from ..protocol.mux import Mux


class _Limits:
    """A channel's ``feeder``: its ``limits`` are the channel's own token
    buckets, applied by the connection's shard scheduler (the daemon's
    shared ones are the connection's: not counted twice)."""

    def __init__(self, channel, shared=()):
        self.channel, self.shared = channel, list(shared)

    @property
    def limits(self) -> list:
        return self.channel.buckets

    @limits.setter
    def limits(self, buckets) -> None:
        self.channel.buckets = [b for b in buckets if b not in self.shared]

    @property
    def bucket(self):
        return None

    @bucket.setter
    def bucket(self, bucket) -> None:
        """A push's --bwlimit: one more of the channel's own buckets."""
        if bucket is not None:
            self.channel.buckets = [*self.channel.buckets, bucket]


class ChannelLink:
    """One channel of ``link``'s connection (its session is ``mux``'s
    ``channel``), with the surface of a link (see the module)."""

    transport_name = "quic"

    def __init__(self, link, mux: Mux, channel, shared=()):
        self.link, self.mux, self.channel = link, mux, channel
        self.session = channel.session
        self.closed_event = asyncio.Event()
        self.close_reason = ""
        self.on_session_done = None
        self.feeder = _Limits(channel, shared)
        self.created = time.monotonic()
        channel.on_done = self._done

    # -- the connection's, as they are --------------------------------------------------
    @property
    def liveness(self):
        return self.link.liveness

    @property
    def last_received(self) -> float:
        return self.link.last_received

    @property
    def last_progress(self) -> float:
        return self.link.last_progress

    def peer_address(self):
        return self.link.peer_address()

    def rtt(self) -> float:
        return self.link.rtt()

    def drive(self) -> None:
        self.link.drive()

    # -- the channel's own --------------------------------------------------------------
    @property
    def priority(self) -> str:
        return self.channel.priority

    @priority.setter
    def priority(self, value: str) -> None:
        self.mux.set_priority(self.channel, value)
        self.link.drive()

    def _done(self) -> None:
        """The channel's session has ended and its last bytes are out."""
        if not self.closed_event.is_set():
            self.closed_event.set()
        if self.on_session_done is not None:
            done, self.on_session_done = self.on_session_done, None
            done()

    def connection_closed(self, why: str) -> None:
        """The connection under the channel ended (its session was told by the mux)."""
        self.close_reason = why
        self._done()

    def close(self, reason_phrase: str = "") -> None:
        """Leave the channel (the connection stays for the others): a session
        not finished is ended without a word to the peer (an owner that wants
        one said it with the session's ``fail``)."""
        s = self.session
        if s is not None and not s.finished:
            from ..errors import ConnectionFailed
            s.fail(ConnectionFailed(reason_phrase or "the channel was closed"), tell_peer=False)
            self.link.drive()

    leave = close

    def refuse(self, why: str) -> None:
        """A channel whose client has not proved its key: its session ends, the
        client is told as a refused connection would tell it."""
        from ..protocol.session import RefusedError
        s = self.session
        if s is not None and not s.finished:
            s.fail(RefusedError(why))
            self.link.drive()

    def transport_stats(self) -> dict:
        """The channel's bytes (its control records and shards; the QUIC
        packets that carried them are the connection's, shared), the
        connection's RTT, losses and path MTU."""
        t = self.link.transport_stats()
        c = self.channel.stats
        size = self.mux.shard_size
        return {**t, "udp_bytes_sent": c["bytes_sent"] + c["shards_sent"] * size,
                "udp_bytes_received": c["bytes_received"] + c["shards_received"] * size,
                "udp_packets_sent": c["shards_sent"], "udp_packets_received": c["shards_received"],
                "shards_lost": c["shards_lost"],
                "channel": self.channel.number, "shared_connection": True}


class Pool:
    """(client) One QUIC connection per server, shared by the transfers that
    go to it: ``channel(t, identity)`` opens a channel on it (making
    the connection first, or again after it was lost) and returns its
    ChannelLink and the server's certificate. A connection without channels
    for IDLE seconds is closed."""

    IDLE = 5.0

    def __init__(self, limits=()):
        self.limits = tuple(limits)             # the daemon's token buckets: its connections' (not a channel's)
        self.connections: dict[tuple, "_Connection"] = {}

    async def channel(self, t, identity):
        key = (t.remote.host, t.remote.port)
        conn = self.connections.get(key)
        if conn is None or conn.closed():
            conn = self.connections[key] = _Connection(self, key, t, identity)
        await asyncio.shield(conn.ready)
        return conn.open(t.priority), conn.cert

    async def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.leave()


class _Connection:
    """One pooled connection: made by a task of its own (aioquic's connect
    is a context), kept while it has channels, left IDLE s after the last."""

    def __init__(self, pool: Pool, key, t, identity):
        self.pool, self.key = pool, key
        self.link = None
        self.mux = Mux(client=True)
        self.cert = None
        self.links: set[ChannelLink] = set()
        self.ready = asyncio.get_running_loop().create_future()     # done once the connection can take channels
        self._end = asyncio.Event()
        self._idle = None
        self.task = asyncio.get_running_loop().create_task(self._run(t, identity))

    def closed(self) -> bool:
        """Whether it takes no more channels (ended, or out of channel numbers)."""
        return self.task.done() or self._end.is_set() or self.mux._next > 0xFF00 \
            or (self.link is not None and self.link.closed_event.is_set())

    async def _run(self, t, identity) -> None:
        from aioquic.asyncio import connect

        from ..errors import ConnectionFailed, TimedOut
        from .client import handshake
        from .link import SessionLink, configuration
        remote = t.remote
        config = configuration(identity, is_client=True, idle_timeout=max(10.0, t.timeout))
        try:
            async with connect(remote.host, remote.port, configuration=config, create_protocol=SessionLink,
                               wait_connected=False) as link:
                self.link = link
                self.cert = await handshake(link, remote, t.timeout)
                link.feeder.limits = list(self.pool.limits)
                link.on_session_done = None
                link.start(self.mux, link._quic.get_next_available_stream_id())
                self.ready.set_result(None)
                closed = asyncio.ensure_future(link.closed_event.wait())
                ended = asyncio.ensure_future(self._end.wait())
                await asyncio.wait({closed, ended}, return_when=asyncio.FIRST_COMPLETED)
                for f in (closed, ended):
                    f.cancel()
                why = link.close_reason or "the connection was closed"
                self.mux.connection_lost(why)
                for x in list(self.links):
                    x.connection_closed(why)
                if not link.closed_event.is_set():
                    link.drive()
                    link.leave()
        except OSError as exc:
            self._fail(ConnectionFailed(f"{remote.address}: {exc.strerror or exc}"))
        except (ConnectionFailed, TimedOut) as exc:
            self._fail(exc)
        finally:
            if self.pool.connections.get(self.key) is self:
                del self.pool.connections[self.key]
            if not self.ready.done():
                self.ready.set_exception(ConnectionFailed(f"{remote.address}: the connection ended"))
                self.ready.exception()

    def _fail(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()             # (retrieved: a waiter that went away leaves no warning)

    def open(self, priority: str) -> ChannelLink:
        """A channel for a session the caller starts (ChannelLink.start)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        x = _ClientChannel(self, priority)
        self.links.add(x)
        return x

    def released(self, x) -> None:
        self.links.discard(x)
        if not self.links and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(Pool.IDLE, self._end.set)

    def leave(self) -> None:
        self._end.set()


class _ClientChannel(ChannelLink):
    """(client) A channel of a pooled connection, opened when its session
    starts (the OPEN goes with its Hello)."""

    def __init__(self, conn: _Connection, priority: str):
        from ..protocol.mux import Channel
        self.conn = conn
        placeholder = Channel(0, None, priority)            # (its class and limits until the OPEN)
        super().__init__(conn.link, conn.mux, placeholder, shared=conn.pool.limits)

    def start(self, session) -> None:
        self.session = session
        self.channel = self.mux.open(session, self.channel.priority)
        self.channel.on_done = self._done
        self.channel.buckets = self.feeder.channel.buckets
        self.feeder.channel = self.channel
        self.link.drive()

    def _done(self) -> None:
        super()._done()
        self.conn.released(self)

    def close(self, reason_phrase: str = "") -> None:
        super().close(reason_phrase)
        self.conn.released(self)

    leave = close
