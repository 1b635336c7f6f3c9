"""A protocol session carried by TLS 1.3 over TCP: the path for clean, short links.

QUIC in Python costs tens of microseconds per 1,350-byte packet (aioquic's
packet builder, loss recovery and acknowledgements), which caps one
connection near 300-400 Mbit/s a core. On a clean LAN that is 30x behind
rsync. Here the kernel segments, paces and acknowledges, OpenSSL encrypts
large records, and resync's shards are 1 MiB: about a thousand Python calls a
gigabyte instead of a million. Syncthing keeps TCP and QUIC side by side the
same way; the client picks (``client.pick_transport``): TCP when the TCP
handshake answers within ``AUTO_RTT`` (a LAN), QUIC for long or lossy paths
and whenever the TCP path failed in this run.

The session is the same state machine (``resync.protocol.session``), told
``reliable``: stripes go without parity, nothing is repaired or probed. The
trust model is the QUIC one, unchanged: the client checks the certificate
the server presented in the TLS handshake against the device ID it pins
before it sends a byte of the protocol, and the Hello / Challenge / Auth
exchange binds that certificate's hash.

Records on the TLS stream (docs/protocol.md, "The TLS stream")::

    u8 kind | u32 length (little-endian) | length bytes

    kind 1 CONTROL  bytes of the control stream (frames), at most 1 MiB a record
    kind 2 SHARD    one shard datagram (shards.py; its check zero), at most 1 MiB + 19
    kind 3 PING     8 bytes the peer sends back in a PONG (is the peer alive?)
    kind 4 PONG     the 8 bytes of a PING
    kind 5 CLOSE    why this end closes (UTF-8, at most 1 KiB; the peer logs it), the last record

A record of another kind or length ends the connection (a protocol error).
"""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time

from . import ALPN
from ..protocol.common import WORK_SLICE

RECORD = struct.Struct("<BI")
CONTROL, SHARD, PING, PONG, CLOSE = 1, 2, 3, 4, 5
MAX_REASON = 1024                 # bytes of a CLOSE record
RECEIVE_BUFFER = 8 << 20          # bytes of the buffer records are decrypted into, once the peer is proved
FIRST_BUFFER = 256 << 10          # ... and before (grown to fit a longer record: a stranger costs what it sends)
MIN_READ = 64 << 10               # free bytes at the buffer's end below which room is made
MAX_CONTROL = 1 << 20             # bytes of control stream per record
SHARD_SIZE = 1 << 20              # shard bytes on this path (frames.MAX_SHARD_SIZE): few Python calls a GiB
MAX_SHARD = SHARD_SIZE + 19       # ... with the shard's header (shards.HEADER)
LIMITS = {CONTROL: MAX_CONTROL, SHARD: MAX_SHARD, PING: 8, PONG: 8, CLOSE: MAX_REASON}   # the longest of each kind
WRITE_HIGH = 4 << 20              # bytes waiting in the transport before the session waits
SHARDS_PER_TURN = 4               # shards asked of the session per call (4 MiB)
KEEPALIVE = 5.0                   # s without a record sent after which an idle connection PINGs
HANDSHAKE_TIMEOUT = 10.0          # s for the TLS handshake
LINGER = 2.0                      # s a closing end reads (and drops) what still comes, waiting for the peer's
#                                   close: closing with unread data sends a TCP reset, which can destroy the
#                                   peer's copy of this end's last records (its Error) before it reads them
TCP_INFO_SIZE = 232               # bytes of struct tcp_info read (Linux <linux/tcp.h>)

# A test hook, not a setting: RESYNC_TEST_CUT_TCP=N makes the server's TCP
# links abort their connection once N bytes of records have arrived (a fast
# path that breaks mid-transfer: the client falls back to QUIC and resumes).
_CUT_AFTER = int(os.environ.get("RESYNC_TEST_CUT_TCP", "0") or 0)


def tls_context(identity, server: bool) -> ssl.SSLContext:
    """TLS 1.3 with this machine's self-signed certificate on both ends; the
    client verifies no CA chain (it pins the server's key itself:
    ``peer_certificate``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    if not server:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tcp_info(sock) -> dict:
    """The kernel's view of a TCP connection (Linux TCP_INFO): smoothed RTT
    (ms), segments retransmitted, bytes sent and acknowledged, bytes
    received. Empty where the option is missing."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return {}
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except OSError:
        return {}
    if len(raw) < 144:
        return {}
    rtt_us, = struct.unpack_from("<I", raw, 68)
    retrans, = struct.unpack_from("<I", raw, 100)
    acked, received = struct.unpack_from("<QQ", raw, 120)
    segs_out, = struct.unpack_from("<I", raw, 136)
    return {"rtt_ms": round(rtt_us / 1000, 3), "tcp_retransmits": retrans, "tcp_bytes_sent": acked,
            "tcp_bytes_received": received, "tcp_segments_sent": segs_out}


class Pings:
    """PING records and their PONGs: whether the peer answers (the server
    asks before it supersedes a push; ``pings_acked`` as
    ``liveness.Liveness`` has it)."""

    def __init__(self, link: "StreamLink"):
        self.link = link
        self._pings = 0
        self.pings_acked: set[int] = set()

    def ping(self) -> int:
        self._pings += 1
        self.link.write_record(PING, self._pings.to_bytes(8, "little"))
        return self._pings

    def pong(self, body: bytes) -> None:
        self.pings_acked.add(int.from_bytes(body, "little"))


def shard_size_for_rate(rate: float) -> int:
    """Shard bytes under a --bwlimit of ``rate`` bytes/s: a quarter second's
    worth, as a power of two from 64 KiB to SHARD_SIZE (a 1 MiB shard is 4 s
    of a 256 KB/s limit: its bursts would be that long)."""
    size = 1 << 16
    while size * 2 <= min(SHARD_SIZE, rate / 4):
        size *= 2
    return size


class StreamFeeder:
    """The session's control bytes and shards into the TLS stream, while
    fewer than WRITE_HIGH bytes wait in the transport (TCP's window paces
    them; ``resume_writing`` drives again), within the --bwlimit bucket
    (``bucket``, as ``feeder.Feeder``), for as long as the session has
    something to send."""

    def __init__(self, link: "StreamLink"):
        self.link = link
        self.bucket = None                      # feeder.TokenBucket, or None
        self.limits: list = []                  # more buckets (as feeder.Feeder's)
        self.starved = False

    def buckets(self) -> list:
        from .feeder import limiting
        return limiting(self.bucket, self.limits)

    def feed(self, now: float, s) -> None:
        link = self.link
        if self.bucket is None and getattr(s, "rate_limit", 0):
            from .feeder import TokenBucket
            self.bucket = TokenBucket(s.rate_limit)     # (a pull's --bwlimit, or the server's own)
            s.shard_size = shard_size_for_rate(s.rate_limit)
        self.starved = False
        turn_end = time.monotonic() + WORK_SLICE
        while True:
            data = s.stream_to_send()           # (the sender starts files here: File frames go first)
            for lo in range(0, len(data), MAX_CONTROL):
                link.write_record(CONTROL, data[lo:lo + MAX_CONTROL])
            if s.finished or link.paused or link.buffered() >= WRITE_HIGH:
                return
            room = SHARDS_PER_TURN
            buckets = self.buckets()
            if buckets:
                if not all(b.ready() for b in buckets):
                    self.starved = True
                    return
                room = 1
            out = s.datagrams_to_send(now, room)
            for b in buckets:
                for d in out:
                    b.spend(len(d))
            if not out and not data:
                return                          # (the session has nothing more to say now)
            for d in out:
                link.write_record(SHARD, d)
            if time.monotonic() > turn_end:
                return                          # the peer's frames are read; a sender with more to do (a
            #                                     listing, files to start) has its timer due at once


class StreamLink(asyncio.BufferedProtocol):
    """One TLS connection's pump, the counterpart of ``link.SessionLink``:
    records in to the session with the loop's time, the session's output out
    after every event, the session's timer, the connection's end. The
    surface its owners use is the same (``session``, ``on_session_done``,
    ``closed_event``, ``close_reason``, ``last_progress``, ``last_received``,
    ``drive``, ``close``, ``leave``, ``refuse``, ``rtt``, ``transport_stats``,
    ``peer_address``, ``liveness``, ``feeder``, ``preauth_limit``; the
    server sets ``created``)."""

    transport_name = "tcp"

    def __init__(self):
        self.session = None
        self.on_session_done = None
        self.closed_event = asyncio.Event()
        self.close_reason = ""
        self.last_progress = self.last_received = self.last_sent = time.monotonic()
        self.preauth_limit = 0                  # record bytes a server takes before the client's proof (0: any)
        self.paused = False
        self.liveness = Pings(self)
        self.feeder = StreamFeeder(self)
        self._transport = None
        self._loop = asyncio.get_event_loop()
        self._rbuf = bytearray(FIRST_BUFFER)    # records arrive here (get_buffer), parsed in place
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0           # the bytes not parsed yet: _rbuf[_rstart:_rend]
        self._pending = 0                       # bytes of the record begun at _rstart (0: its header not in)
        self._timer = None
        self._timer_at = None
        self._keepalive = None
        self._linger = None
        self._closing = False
        self._sock = None                       # the TCP socket under TLS (tcp_info), once connected
        self._peer = None                       # the peer's address, once connected
        self._info: dict = {}                   # the kernel's last counts (tcp_info), kept for after the end
        self.counts = {"bytes_in": 0, "records_in": 0, "records_out": 0}

    # -- asyncio's calls ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        """After the TLS handshake (asyncio's SSL transport calls it then)."""
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_HIGH // 4)
        sock = self._sock = transport.get_extra_info("socket")     # (open until connection_lost returns)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._keepalive = self._loop.call_later(KEEPALIVE, self._on_keepalive)
        self.drive()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.drive()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the TLS layer decrypts into: the free end of the receive
        buffer, room made first when less than MIN_READ is free or the
        record begun does not fit (``_make_room``)."""
        if len(self._rbuf) - self._rend < MIN_READ or len(self._rbuf) - self._rstart < self._pending:
            self._make_room()
        return self._rview[self._rend:]

    def _make_room(self) -> None:
        """Move what is not parsed yet to the buffer's start, in a larger
        buffer when the record begun needs it or the peer has proved its key
        (RECEIVE_BUFFER: a transfer reads megabytes a call); before the proof
        the buffer stays FIRST_BUFFER unless a record needs more."""
        n = self._rend - self._rstart
        size = len(self._rbuf)
        if size < RECEIVE_BUFFER and getattr(self.session, "authenticated", True):
            size = RECEIVE_BUFFER
        while size < max(n, self._pending) + MIN_READ:
            size *= 2
        if size == len(self._rbuf):
            self._rbuf[0:n] = self._rbuf[self._rstart:self._rend]
        else:
            grown = bytearray(size)
            grown[0:n] = self._rview[self._rstart:self._rend]
            self._rbuf, self._rview = grown, memoryview(grown)
        self._rstart, self._rend = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        self._rend += nbytes
        self.counts["bytes_in"] += nbytes
        self.last_received = time.monotonic()
        if self._closing:
            self._rstart = self._rend             # (lingering: dropped, see close)
            return
        s = self.session
        if self.preauth_limit and self.counts["bytes_in"] > self.preauth_limit:
            if s is not None and not s.finished and not s.authenticated:
                self.refuse(f"sent over {self.preauth_limit} bytes before proving its key")
                return
            self.preauth_limit = 0
        if _CUT_AFTER and self.counts["bytes_in"] > _CUT_AFTER and s is not None \
                and getattr(s, "hello", None) is not None:
            self._transport.abort()             # (the test hook: see _CUT_AFTER)
            return
        view, now = self._rview, self._loop.time()
        pos, end = self._rstart, self._rend
        while end - pos >= RECORD.size:
            kind, length = RECORD.unpack_from(view, pos)
            if length > LIMITS.get(kind, -1):
                self._broken(f"a record of kind {kind} and {length} bytes")
                return
            if end - pos - RECORD.size < length:
                self._pending = RECORD.size + length
                break
            self._pending = 0
            body = view[pos + RECORD.size:pos + RECORD.size + length]
            pos += RECORD.size + length
            self._rstart = pos
            self.counts["records_in"] += 1
            self._record(kind, body, now)      # (a view into the buffer: whoever keeps it copies it)
            if self._closing or self._transport is None:
                return
        self.drive()

    def _record(self, kind: int, body: bytes, now: float) -> None:
        s = self.session
        if kind == CONTROL:
            if s is not None:
                self.last_progress = time.monotonic()
                s.receive_stream(body, now)
        elif kind == SHARD:
            if s is not None:
                self.last_progress = time.monotonic()
                s.receive_datagram(body, now)
        elif kind == PING:
            self.write_record(PONG, bytes(body))
        elif kind == PONG:
            self.liveness.pong(body)
        else:                                   # CLOSE: the peer leaves, and says why
            self.close_reason = bytes(body).decode("utf-8", "replace") or "closed by the peer"
            if s is not None and not s.finished:
                s.connection_lost(self.close_reason)
            self.close()

    def eof_received(self):
        """The peer's FIN: after this end's own (a lingering close) the
        connection is over; before it, this end closes now (the session's
        end is connection_lost's)."""
        if self._closing:
            self._end()
        return None

    def connection_lost(self, exc) -> None:
        self._kernel_counts()
        if not self.close_reason:
            self.close_reason = f"the TCP connection broke ({exc})" if exc is not None \
                else "the peer closed the connection"
        for h in (self._timer, self._keepalive, self._linger):
            if h is not None:
                h.cancel()
        self._timer = self._keepalive = self._linger = None
        self._transport = None
        if self.session is not None and not self.session.finished:
            self.session.connection_lost(self.close_reason)
        self.closed_event.set()
        self._session_end()

    # -- the owner's calls ----------------------------------------------------------------
    def start(self, session) -> None:
        self.session = session
        session.reliable = True
        rates = [b.rate for b in self.feeder.buckets() if b.unit == "bytes"]
        session.shard_size = shard_size_for_rate(min(rates)) if rates else SHARD_SIZE
        self.drive()

    def write_record(self, kind: int, body) -> None:
        t = self._transport
        if t is None or self._closing:
            return
        t.writelines((RECORD.pack(kind, len(body)), body))
        self.counts["records_out"] += 1
        self.last_sent = time.monotonic()

    def buffered(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if t is not None else 0

    def drive(self) -> None:
        """Send what the session has and arm its timer."""
        s = self.session
        if s is None or self._transport is None:
            return
        now = self._loop.time()
        self.feeder.feed(now, s)
        if s.finished:
            self._cancel_timer()
            self._kernel_counts()               # (the counts at the end: the peer may close before the owner asks)
            self._session_end()
            return
        t = s.next_timer()
        if self.feeder.starved:                 # --bwlimit: look again when tokens are back
            t = min(t, now + 0.005) if t is not None else now + 0.005
        if t != self._timer_at:
            self._cancel_timer()
            if t is not None:
                self._timer = self._loop.call_at(max(t, now), self._on_timer)
                self._timer_at = t

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        s = self.session
        if s is None:
            return
        now = self._loop.time()
        t = s.next_timer()
        if t is not None and t <= now:
            s.handle_timer(now)
        self.drive()

    def _on_keepalive(self) -> None:
        """A PING after KEEPALIVE s with nothing sent (one end waits for the
        other): a peer gone without a FIN is found by TCP's retransmissions."""
        self._keepalive = None
        if self._transport is None:
            return
        if time.monotonic() - self.last_sent >= KEEPALIVE:
            self.liveness.ping()
        self._keepalive = self._loop.call_later(KEEPALIVE, self._on_keepalive)

    def _session_end(self) -> None:
        s = self.session
        if s is not None and s.finished and self.on_session_done is not None:
            done, self.on_session_done = self.on_session_done, None
            done()

    def _broken(self, what: str) -> None:
        from ..protocol.frames import ProtocolError
        self.close_reason = f"protocol error: {what}"
        if self.session is not None and not self.session.finished:
            self.session.fail(ProtocolError(what), tell_peer=False)
        self.close()

    def refuse(self, why: str) -> None:
        """End a connection whose peer has not proved its key: the session
        fails with ``why`` (the log's line), the peer is told nothing."""
        from ..protocol.session import RefusedError
        self.close_reason = why
        if self.session is not None and not self.session.finished:
            self.session.fail(RefusedError(why), tell_peer=False)
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    def close(self, reason_phrase: str = "") -> None:
        """Close: ``reason_phrase`` first, in a CLOSE record; once what is
        written has gone, this end's FIN (the peer reads everything, then
        its end); meanwhile and until the peer's FIN what arrives is dropped
        unread, for at most LINGER s (a lingering close, as HTTP servers do:
        closing a socket with unread data sends a reset, which can destroy
        the peer's copy of this end's last records — its Error frame —
        before it reads them)."""
        if reason_phrase and not self.close_reason:
            self.close_reason = reason_phrase
        if reason_phrase:
            self.write_record(CLOSE, reason_phrase.encode()[:MAX_REASON])
        if self._transport is not None and not self._closing:
            self._kernel_counts()
            self._closing = True
            self._cancel_timer()
            self._linger = self._loop.call_later(LINGER, self._end)
            self._half_close()

    def _half_close(self) -> None:
        """This end's FIN once its records have left (looked at every 5 ms)."""
        t, sock = self._transport, self._socket()
        if t is None or sock is None:
            return
        if t.get_write_buffer_size() > 0:
            self._loop.call_later(0.005, self._half_close)
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._end()

    def _end(self) -> None:
        """The peer closed too, or did not within LINGER s: the connection is over."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._transport is not None:
            self._transport.abort()

    leave = close

    # -- what the owner reads -------------------------------------------------------------
    def _socket(self):
        sock = self._sock
        return sock if sock is not None and sock.fileno() >= 0 else None

    def _kernel_counts(self) -> dict:
        """tcp_info of the connection while its socket is open, else the last
        counts read (kept at the session's end and at the close)."""
        info = tcp_info(self._socket())
        if info:
            self._info = info
        return self._info

    def peer_address(self):
        return self._peer

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the peer presented in the TLS handshake."""
        t = self._transport
        obj = t.get_extra_info("ssl_object") if t is not None else None
        return obj.getpeercert(binary_form=True) if obj is not None else None

    def rtt(self) -> float:
        """TCP's smoothed RTT (s; 0.1 before any sample)."""
        return (self._kernel_counts().get("rtt_ms") or 100) / 1000

    def transport_stats(self) -> dict:
        """What crossed the wire: TCP payload bytes (TLS records, handshake
        included: the kernel's count) both ways, retransmitted segments, the
        smoothed RTT (ms); the transport's name."""
        info = self._kernel_counts()
        out = {"transport": self.transport_name, "records_sent": self.counts["records_out"],
               "records_received": self.counts["records_in"]}
        out.update(info)
        return out
