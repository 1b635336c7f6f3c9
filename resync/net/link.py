"""A protocol session carried by one QUIC connection (aioquic), both ends.

The pump is thin (aioquic's asyncio layer is the model): what arrives on the
control stream or as a datagram goes into the session with the loop's time;
after every event the session's control bytes are written to the stream, its
shard datagrams handed to QUIC while QUIC's own datagram queue is short (QUIC
paces and congestion-controls them; resync's window and acknowledgements
bound how far the sender runs ahead), and the session's timer is armed.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import random
import socket
import ssl
import sys
import termios
import time

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnectionState

from ..protocol.session import shard_size_for
from ..protocol.shards import PROBE
from . import ALPN, pmtu
from .congestion import NAME as RATE_CONTROLLER
from .congestion import controller_of, install_pacer
from .reset import is_reset, peer_tokens

MAX_DATAGRAM_SIZE = 1350          # bytes of UDP payload per packet once the path is known to carry them
PROBE_OVERHEAD = 30               # a probe packet's bytes besides its padding datagram's: short header
                                  # (1 + 8-byte connection ID + 2-byte packet number), AEAD tag 16, frame 3
SETTLE_WAIT = 0.25                # s (or SETTLE_RTTS RTTs) after the handshake a sender waits at most ...
SETTLE_RTTS = 4                   # ... for the path MTU search before it cuts files to the minimum's shards
DATAGRAM_QUEUE = 64               # shards queued in QUIC beyond what it is sending
LOSS_SAMPLE = 500                # packets per loss report to the session (a moving average's sample)
LOSS_FIRST_SAMPLE = 100          # ... and for its first, taken as it is (at 50 it read low: losses are declared late)
TIMER_DEFER = 0.05                # s a session timer may wait for the packets queued in the socket
RX_BATCH = 32                    # packets read from the socket in one go, before the links transmit
PROBE_MIN = 0.02                  # s: the shortest interval between PINGs for a tail loss
SOCKET_BUFFER = 8 << 20           # bytes of UDP socket buffer asked for, each way
REDUNDANT_LOSS = 0.02            # on a path losing more than this share of packets ...
REDUNDANT_FLIGHT = 8              # ... packets sent with fewer than this many in flight go out twice
HANDSHAKE_COPIES = 3              # times the client sends each of its handshake packets
SERVER_HANDSHAKE_COPIES = 2       # times the server sends its handshake packets, if the client's came short
CLOSE_COPIES = 3                  # times a leaving client sends its CONNECTION_CLOSE
FLOW_WINDOW = 64 << 20            # QUIC flow control for the control stream (resync has its own)
KEEPALIVE = 5.0                   # s without a packet sent after which an idle connection PINGs
# Linux's IP_RECVERR and IPV6_RECVERR (<linux/in.h>, <linux/in6.h>; Python's socket module lacks them)
_RECVERR = ((socket.IPPROTO_IP, 11), (socket.IPPROTO_IPV6, 25)) if sys.platform.startswith("linux") else ()


# A test hook, not a setting: RESYNC_TEST_CORRUPT_SHARDS=P flips one bit in a
# fraction P of the shards this process receives, above the transport (QUIC's
# packet protection has passed them), to show that the stripe check catches
# them and the stripe is repaired (tests/test_wan.py).
_CORRUPT_SHARDS = float(os.environ.get("RESYNC_TEST_CORRUPT_SHARDS", "0") or 0)


def _flip_bit(data: bytes) -> bytes:
    b = bytearray(data)
    i = random.randrange(len(b) * 8)
    b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def configuration(identity, is_client: bool, idle_timeout: float = 60.0) -> QuicConfiguration:
    """QUIC settings for either end: TLS with this machine's self-signed
    certificate; the client does not check the server's certificate against
    any CA (it pins the server's key itself, see client.pinned_certificate)."""
    from cryptography.hazmat.primitives import serialization  # noqa: F401  (aioquic needs cryptography)
    # packets start at QUIC's minimum (RFC 9000 14: every path carries it) and grow once a probe of
    # MAX_DATAGRAM_SIZE is acknowledged (SessionLink: resync.net.pmtu)
    config = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], idle_timeout=idle_timeout,
                               max_datagram_frame_size=65536, max_datagram_size=pmtu.BASE,
                               max_data=FLOW_WINDOW, max_stream_data=FLOW_WINDOW,
                               congestion_control_algorithm=RATE_CONTROLLER)
    config.certificate = identity.certificate
    config.private_key = identity.private_key
    if is_client:
        config.verify_mode = ssl.CERT_NONE
        config.server_name = "resync"
    return config


class TokenBucket:
    """--bwlimit: at most ``rate`` bytes per second, in bursts of a tenth of a
    second (at least one packet: a rate under 13.5 KB/s still moves)."""

    def __init__(self, rate: float):
        self.rate, self.last = float(rate), time.monotonic()
        self.burst = max(self.rate / 10, MAX_DATAGRAM_SIZE)
        self.tokens = self.burst

    def allow(self, want: int, size: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        n = min(want, int(self.tokens // max(size, 1)))
        self.tokens -= n * size
        return max(n, 0)

    def refund(self, size: int) -> None:
        """Tokens taken by ``allow`` but not used."""
        self.tokens += size


def _grow_buffers(sock) -> None:
    """Socket buffers of SOCKET_BUFFER bytes: a burst of shards waits in the
    kernel while Python is busy instead of being dropped (root may exceed
    net.core.rmem_max; others get what it allows)."""
    if sock is None:
        return
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        for opt in (force, plain):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:
                continue


class _CountingTransport:
    """The UDP transport, counting what is sent through it (and when last)."""

    def __init__(self, transport, counts: dict):
        self._t, self._counts = transport, counts
        self.last_send = 0.0                    # time.monotonic()
        self.copies = 1                         # times each datagram is sent (see SessionLink.handshake_copies)
        self.amplification_limit = False        # (a server: copies only within 3x what it received)

    def sendto(self, data, addr=None) -> None:
        copies = self.copies
        if copies > 1 and self.amplification_limit:
            if self._counts["udp_packets_received"] >= HANDSHAKE_COPIES:
                copies = 1                      # every copy of the client's first packet came: no loss seen
            room = 3 * self._counts["udp_bytes_received"] - self._counts["udp_bytes_sent"]
            copies = max(1, min(copies, room // max(len(data), 1)))
        self._counts["udp_bytes_sent"] += len(data) * copies
        self._counts["udp_packets_sent"] += copies
        self.last_send = time.monotonic()
        for _ in range(copies):
            self._t.sendto(data, addr)

    def __getattr__(self, name):
        return getattr(self._t, name)


class PacketBatch:
    """Reads the packets waiting in an endpoint's UDP socket in one go.

    asyncio's datagram transport reads one packet per turn of the event loop,
    and aioquic answers each with a transmit (an ACK, a top-up of the
    session): per packet, as much work again as receiving it. Installed on
    the endpoint protocol (the client's link, the server's ``QuicServer``),
    a packet from asyncio is followed by up to RX_BATCH - 1 more read
    directly from the socket (a non-blocking duplicate of its descriptor,
    closed with the transport); the links' transmits wait for the end of the
    batch (``SessionLink.flush``)."""

    def __init__(self, endpoint, transport):
        sock = transport.get_extra_info("socket")
        self._sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
        self._sock.setblocking(False)
        self._handle, self._error = endpoint.datagram_received, endpoint.error_received
        endpoint.datagram_received = self.received
        lost = endpoint.connection_lost

        def connection_lost(exc) -> None:
            self._sock.close()
            lost(exc)
        endpoint.connection_lost = connection_lost
        self.active = False
        self.deferred: list[SessionLink] = []

    def received(self, data, addr) -> None:
        if self.active:
            self._handle(data, addr)
            return
        self.active = True
        try:
            self._handle(data, addr)
            for _ in range(RX_BATCH - 1):
                try:
                    data, addr = self._sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:          # (an ICMP error): as the transport would
                    self._error(exc)
                    break
                self._handle(data, addr)
        finally:
            self.active = False
            links, self.deferred = self.deferred, []
            for link in links:
                link.flush()


class SessionLink(QuicConnectionProtocol):
    """One connection's pump. ``session`` is set by whoever owns the link
    (the server when the connection arrives, the client once the server's
    key is checked); ``closed`` is set when the connection ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_pacer(self._quic)
        self.session = None
        self.stream_id: int | None = None
        self.bucket: TokenBucket | None = None
        self.closed_event = asyncio.Event()
        self.close_reason = ""
        self._session_timer = None
        self._session_timer_at = None
        self._timer_due = None
        self.on_session_done = None
        self.last_progress = time.monotonic()
        self._decided_seen = self._lost_seen = 0
        self._starved = False
        self._receiving = False
        self.batch: PacketBatch | None = None   # set by whoever owns the UDP socket
        self._deferred = False
        self._counting: _CountingTransport | None = None
        self._probe = None
        self._fileno = -1
        self._leaving = False
        self._handshake_done = False
        self._last_shard_at = 0.0               # time.monotonic() of the last shard received
        self.udp = {"udp_bytes_sent": 0, "udp_bytes_received": 0, "udp_packets_sent": 0,
                    "udp_packets_received": 0}
        self.preauth_limit = 0                  # bytes a server takes before the client's proof (0: any)
        self.reset_tokens: set[bytes] = set()   # a client's: the server's stateless reset tokens
        self.last_received = time.monotonic()   # when the peer last sent a packet
        self._pings = 0
        self.pings_acked: set[int] = set()      # numbers of ping()s the peer acknowledged
        self.pmtu = pmtu.PathMTU((MAX_DATAGRAM_SIZE,))
        self.datagram_size = pmtu.BASE          # bytes of UDP payload per packet now
        self._settle_by: float | None = None    # when a sender stops waiting for the MTU search
        self._path_done = False                 # the search is over for good (every size confirmed)

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        _grow_buffers(sock)
        if self._quic.configuration.is_client and sock is not None:
            # an unconnected UDP socket hears of ICMP errors only with IP_RECVERR (a server that
            # is down: port unreachable, error_received)
            for level, opt in _RECVERR:
                try:
                    sock.setsockopt(level, opt, 1)
                except OSError:
                    pass
        self._counting = _CountingTransport(transport, self.udp)
        if not self._quic.configuration.is_client:
            # the server's handshake flight twice when fewer than the client's three copies of
            # its first packet came (a lossy path: a lost flight cost a probe timeout, 0.2 s on
            # the 50 ms link), within RFC 9000 8.1's limit of three times what the client sent
            self._counting.copies = SERVER_HANDSHAKE_COPIES
            self._counting.amplification_limit = True
        super().connection_made(self._counting)

    def datagram_received(self, data, addr) -> None:
        """aioquic takes the packet and calls ``transmit``; within a batch
        (``PacketBatch``) that transmit waits for the batch's end: a receiver
        otherwise builds a QUIC packet (an ACK) and tops up its session once
        per packet received, which costs as much as receiving it."""
        self.udp["udp_bytes_received"] += len(data)
        self.udp["udp_packets_received"] += 1
        self.last_received = time.monotonic()
        if self.reset_tokens and is_reset(data, self.reset_tokens):
            self._was_reset()
            return
        if self.preauth_limit and self.udp["udp_bytes_received"] > self.preauth_limit:
            s = self.session
            if s is not None and not s.finished and not s.authenticated:
                self.refuse(f"sent over {self.preauth_limit} bytes before proving its key")
                return
            self.preauth_limit = 0              # proved (or over): no more counting
        self._receiving = True
        try:
            super().datagram_received(data, addr)
        finally:
            self._receiving = False

    def flush(self) -> None:
        """The batch this link's transmit waited for is over."""
        self._deferred = False
        self.transmit()

    def _socket_waiting(self) -> bool:
        """Whether a packet waits in the UDP socket (FIONREAD)."""
        if self._fileno < 0:
            sock = self._transport.get_extra_info("socket") if self._transport is not None else None
            if sock is None:
                return False
            self._fileno = sock.fileno()
        try:
            return fcntl.ioctl(self._fileno, termios.FIONREAD, b"\0\0\0\0") != b"\0\0\0\0"
        except OSError:
            return False

    def handshake_copies(self, n: int) -> None:
        """Send each packet ``n`` times until the handshake completes and the
        session's first packets (its Hello) are out (the
        client: its Initial and Handshake packets are a few, and each lost
        one costs a probe timeout that doubles — at 33 % loss the handshake
        took 1.5–4.5 s). QUIC drops the copies it has seen. The server sends
        its own SERVER_HANDSHAKE_COPIES times when some of the client's
        copies were lost, never more than three times the bytes it received
        (RFC 9000 8.1: no amplifier before the client's address is
        validated)."""
        if self._counting is not None:
            self._counting.copies = max(1, n)

    def error_received(self, exc) -> None:
        """An ICMP error for a packet this end sent. Port unreachable before
        the handshake is done: nothing listens there (a server that is down
        or not started): the handshake fails at once, not after its
        timeout (the client retries within --retry-for)."""
        if isinstance(exc, ConnectionRefusedError) and not self._handshake_done \
                and self._quic.configuration.is_client:
            self.close_reason = "nothing listens there (port unreachable)"
            waiter, self._connected_waiter = self._connected_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError(self.close_reason))

    def _was_reset(self) -> None:
        """A stateless reset from the server (resync.net.reset): it has
        restarted, or lost this connection otherwise. The session fails as
        cut (the client retries at once and resumes) instead of waiting out
        the idle timeout; nothing more is sent on this connection (RFC 9000
        10.3.1: the connection is over)."""
        self.reset_tokens = set()
        self.close_reason = "the server reset the connection (it restarted, or lost the connection)"
        if self.session is not None and not self.session.finished:
            self.session.connection_lost(self.close_reason)
        self._leaving = True
        self.closed_event.set()
        if self._transport is not None:
            self._quic._close_event = events.ConnectionTerminated(error_code=0, frame_type=None,
                                                                  reason_phrase=self.close_reason)
            self._quic._set_state(QuicConnectionState.TERMINATED)
        self.transmit()                         # (the session's end: its owner's callback)

    def ping(self) -> int:
        """An ack-eliciting PING now (a live peer acknowledges it within an
        RTT); returns its number, found in ``pings_acked`` once it is."""
        self._pings += 1
        if not self.closed_event.is_set():
            self._quic.send_ping(self._pings)
            self.transmit()
        return self._pings

    def refuse(self, why: str) -> None:
        """End a connection whose peer has not proved its key: the session
        fails with ``why`` (the log's line), the peer is told no more than a
        CONNECTION_CLOSE with CONNECTION_REFUSED."""
        from aioquic.quic.packet import QuicErrorCode, QuicFrameType

        from ..protocol.session import RefusedError
        if self.session is not None and not self.session.finished:
            self.session.fail(RefusedError(why), tell_peer=False)
        # a transport-level close (frame type given): aioquic would turn an application close sent
        # during the handshake into APPLICATION_ERROR
        self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, frame_type=QuicFrameType.PADDING,
                         reason_phrase="refused")
        self.transmit()

    def leave(self) -> None:
        """Close, sending CONNECTION_CLOSE ``CLOSE_COPIES`` times, and let
        ``wait_closed`` return at once instead of after QUIC's closing period
        (three probe timeouts, RFC 9000 10.2: 0.4-0.7 s of every run here,
        answering late packets of a peer that has everything). For the
        client at the end of a session: the server's session has ended
        (Done sent, or Bye sent), and a close lost every time only leaves it
        waiting for its idle timeout."""
        self._leaving = True
        if self._counting is not None:
            self._counting.copies = CLOSE_COPIES
        self.close()

    async def wait_closed(self) -> None:
        if not self._leaving:
            await super().wait_closed()

    def path_model(self) -> dict | None:
        """The rate controller's model of the path (None before it has one)."""
        cc = controller_of(self._quic)
        return cc.model() if cc is not None else None

    def resume_path_model(self, model: dict | None) -> None:
        cc = controller_of(self._quic)
        if model and cc is not None:
            cc.resume_model(model)

    def _smoothed_rtt(self) -> float:
        """QUIC's smoothed RTT (s; 0 before any sample)."""
        return getattr(getattr(self._quic, "_loss", None), "_rtt_smoothed", 0) or 0

    def rtt(self) -> float:
        """QUIC's smoothed RTT (s; 0.1 before any sample)."""
        return self._smoothed_rtt() or 0.1

    def transport_stats(self) -> dict:
        """What crossed the wire: UDP payload bytes and packets both ways,
        QUIC's count of packets it declared lost, its smoothed RTT (ms)."""
        out = dict(self.udp)
        cc = controller_of(self._quic)
        out["packets_lost"] = cc.packets_lost if cc is not None else 0
        out["rtt_ms"] = round(self._smoothed_rtt() * 1000, 2)
        out["path_mtu"] = self.datagram_size    # bytes of UDP payload per packet at the end (pmtu)
        out["pmtu_probes"] = self.pmtu.probes
        return out

    def start(self, session, stream_id: int) -> None:
        self.session, self.stream_id = session, stream_id
        self.drive()

    def quic_event_received(self, event) -> None:
        """Feed the session. aioquic calls ``transmit`` after the events of
        each packet, which sends whatever the session has to say."""
        now = self._loop.time()
        if isinstance(event, events.StreamDataReceived):
            if self.stream_id is None:
                self.stream_id = event.stream_id
            if self.session is not None and event.stream_id == self.stream_id and event.data:
                self.last_progress = time.monotonic()
                self.session.receive_stream(event.data, now)
        elif isinstance(event, events.DatagramFrameReceived):
            if self.session is not None:
                self.last_progress = self._last_shard_at = time.monotonic()
                data = event.data
                if _CORRUPT_SHARDS and random.random() < _CORRUPT_SHARDS:
                    data = _flip_bit(data)
                self.session.receive_datagram(data, now)
        elif isinstance(event, events.PingAcknowledged):
            if event.uid:
                self.pings_acked.add(event.uid)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_done = True
            if self._quic.configuration.is_client:
                self.reset_tokens = peer_tokens(self._quic)
        elif isinstance(event, events.ConnectionTerminated):
            self.close_reason = event.reason_phrase or f"closed by the peer (error {event.error_code})"
            if self.session is not None and not self.session.finished:
                self.session.connection_lost(self.close_reason)
            self.closed_event.set()

    def drive(self) -> None:
        """Send what the session has (outside aioquic's own calls: at the
        start, from the session's timer, when the owner changed something)."""
        self.transmit()

    def transmit(self) -> None:
        """Move the session's control bytes to the stream and top up QUIC's
        datagram queue with its shards, let aioquic send, and arm the
        session's timer. aioquic calls this after every packet received and
        every timer of its own, pacing included, so the queue is refilled as
        fast as QUIC drains it."""
        if self._receiving and self.batch is not None and self.batch.active:
            if not self._deferred:
                self._deferred = True
                self.batch.deferred.append(self)
            return
        s = self.session
        if s is None:
            super().transmit()
            self._tell_app_limited(controller_of(self._quic), True)
            return
        now = self._loop.time()
        rtt = self._smoothed_rtt()
        if rtt:
            s.rtt = rtt
        cc = controller_of(self._quic)
        if cc is not None:
            # over the packets whose fate is known (acknowledged or declared lost): counted
            # over those sent, the losses lag an RTT and startup's first reports read ~0
            decided, lost = cc.packets_acked + cc.packets_lost, cc.packets_lost
            if decided >= self._decided_seen + (LOSS_SAMPLE if self._decided_seen else LOSS_FIRST_SAMPLE):
                s.observe_loss(lost - self._lost_seen, decided - self._decided_seen)
                self._decided_seen, self._lost_seen = decided, lost
        self._search_path(now, cc, s)
        if self.bucket is None and getattr(s, "rate_limit", 0):
            self.bucket = TokenBucket(s.rate_limit)     # a pull's --bwlimit, or the server's own
        dry = True                              # the session gave less than QUIC had room for
        if not s.finished and self.stream_id is not None:
            pending = getattr(self._quic, "_datagrams_pending", ())
            room = DATAGRAM_QUEUE - len(pending)
            self._starved = False
            if room > 0 and self.bucket is not None:
                allowed = self.bucket.allow(room, self.datagram_size)
                self._starved = allowed < room
                room = allowed
            dry = self._starved
            if room > 0:
                out = s.datagrams_to_send(now, room)
                dry = dry or len(out) < room
                for d in out:
                    self._quic.send_datagram_frame(d)
                if self.bucket is not None:
                    self.bucket.refund((room - len(out)) * self.datagram_size)
        if self.stream_id is not None:
            data = s.stream_to_send()           # (after a session ends too: its last frames)
            if data:
                self._quic.send_stream_data(self.stream_id, data)
        doubled = self._counting is not None and self._counting.copies == 1 and self._lossy_and_idle(cc)
        if doubled:
            self._counting.copies = 2
        super().transmit()
        if doubled:
            self._counting.copies = 1
        if self._counting is not None and self._counting.copies > 1 and self._handshake_done:
            # the handshake's copies end with the first packets of the session (the client's
            # Finished went out before it, with the copies: sent once, lost at 33 % loss in one
            # run in three, the server ignored the Hello until a probe timeout sent it again)
            self._counting.copies = 1
        self._tell_app_limited(cc, dry)
        if not s.finished:
            if self._probe is None:
                self._probe = self._loop.call_later(max(self.rtt(), PROBE_MIN), self._on_probe)
            t = s.next_timer()
            if self._starved:                   # --bwlimit: look again when tokens are back
                t = min(t, now + 0.005) if t is not None else now + 0.005
            if t != self._session_timer_at:
                if self._session_timer is not None:
                    self._session_timer.cancel()
                self._session_timer = self._loop.call_at(max(t, now), self._on_timer) if t is not None else None
                self._session_timer_at = self._timer_due = t
        else:
            if self._session_timer is not None:
                self._session_timer.cancel()
                self._session_timer = self._session_timer_at = None
            if self.on_session_done is not None:
                done, self.on_session_done = self.on_session_done, None
                done()

    def _search_path(self, now: float, cc, s) -> None:
        """The path MTU search (resync.net.pmtu): the fate of the probes QUIC
        learnt since the last call, the next probe once the handshake is
        done, and the session told the shard size and whether the search is
        settled (or SETTLE_WAIT passed: a sender waits no longer)."""
        if self._path_done:
            return                              # (the common case, once per transmit: nothing to do)
        if cc is None:                          # (another controller: no probes, the minimum)
            s.shard_size, s.path_settled = shard_size_for(self.datagram_size), True
            self._path_done = True
            return
        for acked, size in cc.probes:
            if acked:
                if self.pmtu.acked(size):
                    self._set_datagram_size(self.pmtu.size, cc)
            else:
                self.pmtu.lost_probe(size, now)
        cc.probes.clear()
        if self._handshake_done and s.sends_content:       # (only the sender's packets carry content)
            if self._settle_by is None:
                self._settle_by = now + max(SETTLE_WAIT, SETTLE_RTTS * self.rtt())
                self._loop.call_at(self._settle_by, self.drive)
            decided = cc.packets_acked + cc.packets_lost
            size = self.pmtu.probe(now, self.rtt(), cc.packets_lost / decided if decided else 0.0)
            if size is not None and not self._send_probe(size, cc):
                self.pmtu.unsent()
        s.shard_size = shard_size_for(self.datagram_size)
        s.path_settled = self.pmtu.settled or (self._settle_by is not None and now >= self._settle_by)
        # every size confirmed: nothing will change (a search that failed is tried again later)
        self._path_done = self.pmtu.settled and self.pmtu.target is None

    def _send_probe(self, size: int, cc) -> bool:
        """Send one packet of ``size`` bytes: a padding datagram that fills it
        (shards.PROBE), built alone — QUIC's datagram queue empty, the
        window opened for this one packet only, the connection's packet size
        raised for this call only. False if it could not leave now (the
        queue was not empty, the pacer or an ACK took the room): asked for
        again later."""
        quic = self._quic
        pending = getattr(quic, "_datagrams_pending", None)
        if pending is None or pending:
            return False
        probe = PROBE + bytes(size - PROBE_OVERHEAD - len(PROBE))
        quic.send_datagram_frame(probe)
        saved = quic._max_datagram_size, cc.congestion_window
        quic._max_datagram_size, cc.congestion_window = size, cc.bytes_in_flight + size
        try:
            QuicConnectionProtocol.transmit(self)
        finally:
            quic._max_datagram_size, cc.congestion_window = saved
            sent = not (pending and pending[0] is probe)
            if not sent:
                pending.popleft()
        return sent

    def _set_datagram_size(self, size: int, cc) -> None:
        """Packets of ``size`` bytes from now on (a probe of it was
        acknowledged): QUIC's packet builder, its pacer and the rate
        controller (their per-packet figures), the session's shards."""
        self.datagram_size = size
        self._quic._max_datagram_size = size
        pacer = getattr(getattr(self._quic, "_loss", None), "_pacer", None)
        inner = getattr(pacer, "_pacer", pacer)             # (RatePacer wraps aioquic's)
        if inner is not None and hasattr(inner, "_max_datagram_size"):
            inner._max_datagram_size = size
        cc.set_datagram_size(size)

    def _lossy_and_idle(self, cc) -> bool:
        """Whether this transmit's packets go out twice: on a path that has
        lost more than REDUNDANT_LOSS of the packets so far, while fewer
        than REDUNDANT_FLIGHT are in flight — the control exchanges before
        content flows and after it (Welcome, listing, Want, the last File,
        Done, Bye), where each lost packet costs a round trip or more (at
        33 % loss the exchange before the first shard took ~0.5 s). QUIC
        drops the copy it has seen; at most a few packets per round trip."""
        return cc is not None and cc.packets_sent >= 4 and \
            cc.packets_lost > REDUNDANT_LOSS * cc.packets_sent and \
            cc.bytes_in_flight < REDUNDANT_FLIGHT * self.datagram_size and \
            time.monotonic() - self._last_shard_at > self.rtt()    # (not a receiver's Acks mid-transfer)

    def _tell_app_limited(self, cc, dry: bool) -> None:
        """Tell the rate controller ``cc`` that the sender ran out of data
        (``dry`` and QUIC sent every datagram queued): the round measures
        resync, not the path (see RateController.on_app_limited)."""
        if cc is not None and dry and not getattr(self._quic, "_datagrams_pending", None):
            cc.on_app_limited()

    def _on_probe(self) -> None:
        """While anything is unacknowledged, a PING once no packet has gone
        out for an RTT. aioquic finds a lost packet only from later packets
        being acknowledged, or after a probe timeout that doubles with each
        one in a row: a lost control frame (Hello, Challenge, the last File
        or Done) took 7 s to come through at 33 % loss. A PING acknowledged
        lets it declare the packet lost and send it again within ~1 RTT.
        The PING is a probe, sent even when the window is full (RFC 9002
        section 7): in an outage the window is full of lost packets, and a
        plain PING waited for aioquic's doubling probe timeout — the rate
        came back ~1 s after a 2 s blackout ended, not within an RTT."""
        self._probe = None
        s = self.session
        if s is None or s.finished or self.closed_event.is_set():
            return
        if not self._handshake_done:
            # (a PING in the handshake's packet spaces would postpone aioquic's probe timeout,
            # the only thing that sends lost CRYPTO data again: the handshake stalled)
            self._probe = self._loop.call_later(max(self.rtt(), PROBE_MIN), self._on_probe)
            return
        cc = controller_of(self._quic)
        quiet = time.monotonic() - self._counting.last_send if self._counting is not None else 0.0
        if cc is not None and cc.bytes_in_flight > 0 and quiet >= self.rtt():
            self._quic._send_probe()            # (aioquic's PTO probe: a PING let past the window)
            self.transmit()
        elif quiet >= KEEPALIVE:
            # nothing to send for a while (one end waits for the other): a PING keeps a NAT's
            # mapping, moves the connection to a rebound address at once, and makes a server
            # that restarted answer with a stateless reset
            self._quic.send_ping(0)
            self.transmit()
        if self._probe is None:
            self._probe = self._loop.call_later(max(self.rtt(), PROBE_MIN), self._on_probe)

    def _on_timer(self) -> None:
        self._session_timer = self._session_timer_at = None
        if self.session is None:
            return
        now = self._loop.time()
        if self._socket_waiting() and now < self._timer_due + TIMER_DEFER:
            # Packets wait in the socket (this process was busy): read them
            # first, or the session takes a backlog for silence and asks for
            # repairs of shards that have arrived.
            self._session_timer = self._loop.call_soon(self._on_timer)
            return
        self._timer_due = None
        t = self.session.next_timer()
        if t is not None and t <= now:
            self.session.handle_timer(now)
        self.drive()
