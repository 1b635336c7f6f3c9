"""A protocol session carried by one QUIC connection (aioquic), both ends.

The pump is thin (aioquic's asyncio layer is the model): what arrives on the
control stream or as a datagram goes into the session with the loop's time;
after every event the session's control bytes are written to the stream, its
shard datagrams handed to QUIC while QUIC's own datagram queue is short (QUIC
paces and congestion-controls them; resync's window and acknowledgements
bound how far the sender runs ahead), and the session's timer is armed.

``SessionLink`` is the connection (aioquic's protocol: packets in and out,
events, the session's timer, the connection's end); its parts, each one job:
``feeder.Feeder`` (the session's shards and control bytes into QUIC, loss
reports, --bwlimit), ``pathsearch.PathSearch`` (the path MTU search and the
packet size), ``liveness.Liveness`` (PINGs after a tail loss, keepalive,
packets doubled on a lossy idle path).
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

from . import defer_import

defer_import("service_identity")                # (before aioquic, which imports it: see defer_import)

from aioquic.asyncio import QuicConnectionProtocol  # noqa: E402
from aioquic.quic import events  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnectionState  # noqa: E402

from . import ALPN, pmtu
from .congestion import NAME as RATE_CONTROLLER
from .congestion import controller_of, install_pacer
from .feeder import Feeder, TokenBucket  # noqa: F401  (TokenBucket: for callers)
from .liveness import Liveness
from .pathsearch import PathSearch
from .reset import is_reset, peer_tokens

                                  # (1 + 8-byte connection ID + 2-byte packet number), AEAD tag 16, frame 3
TIMER_DEFER = 0.05                # s a session timer may wait for the packets queued in the socket
RX_BATCH = 32                    # packets read from the socket in one go, before the links transmit
SOCKET_BUFFER = 8 << 20           # bytes of UDP socket buffer asked for, each way
HANDSHAKE_COPIES = 3              # times the client sends each of its handshake packets
SERVER_HANDSHAKE_COPIES = 2       # times the server sends its handshake packets, if the client's came short
CLOSE_COPIES = 3                  # times a leaving client sends its CONNECTION_CLOSE
FLOW_WINDOW = 64 << 20            # QUIC flow control for the control stream (resync has its own)
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
    # MAX_DATAGRAM_SIZE is acknowledged (PathSearch: resync.net.pmtu)
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
        self.closed_event = asyncio.Event()
        self.close_reason = ""
        self._session_timer = None
        self._session_timer_at = None
        self._timer_due = None
        self.on_session_done = None
        self.last_progress = time.monotonic()
        self._receiving = False
        self.batch: PacketBatch | None = None   # set by whoever owns the UDP socket
        self._deferred = False
        self._counting: _CountingTransport | None = None
        self._fileno = -1
        self._leaving = False
        self.handshake_done = False
        self.last_shard_at = 0.0                # time.monotonic() of the last shard received
        self.udp = {"udp_bytes_sent": 0, "udp_bytes_received": 0, "udp_packets_sent": 0,
                    "udp_packets_received": 0}
        self.preauth_limit = 0                  # bytes a server takes before the client's proof (0: any)
        self.reset_tokens: set[bytes] = set()   # a client's: the server's stateless reset tokens
        self.last_received = time.monotonic()   # when the peer last sent a packet
        self.feeder = Feeder(self)              # the session's shards and control bytes into QUIC
        self.paths = PathSearch(self)           # the path MTU search: the packet size
        self.on_channels = None                 # (server) makes the Mux of a connection whose client opens
        self._sniff: bytearray | None = None    # channels (net.channels), from its first bytes
        self.shards_lost = 0                    # shards in packets QUIC declared lost
        self._count_lost_shards()
        self.liveness = Liveness(self)          # PINGs after a tail loss, keepalive; redundant sends

    def _count_lost_shards(self) -> None:
        """Give each DATAGRAM frame aioquic writes a delivery handler (it
        gives them none: datagrams are never sent again), so that a shard in
        a packet declared lost is counted: ``shards_lost``, and the channel's
        own count on a connection of channels. aioquic's writer calls the
        packet builder's ``start_frame``; the handler rides on that call."""
        quic = self._quic
        write = getattr(quic, "_write_datagram_frame", None)
        if write is None:
            return

        def write_counted(builder, data, frame_type):
            start = builder.start_frame

            def start_frame(kind, capacity=1, handler=None, handler_args=()):
                return start(kind, capacity, self._datagram_delivered, (bytes(data[:2]),))
            builder.start_frame = start_frame
            try:
                return write(builder=builder, data=data, frame_type=frame_type)
            finally:
                del builder.start_frame
        quic._write_datagram_frame = write_counted

    def _datagram_delivered(self, delivery, head: bytes) -> None:
        from aioquic.quic.packet_builder import QuicDeliveryState

        from ..protocol.shards import PROBE
        if delivery != QuicDeliveryState.LOST or head[:1] == PROBE:
            return                              # (a path MTU probe's loss is the search's business)
        self.shards_lost += 1
        lost = getattr(self.session, "lost", None)      # (a Mux: the channel's count)
        if lost is not None:
            lost(head)

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
        if isinstance(exc, ConnectionRefusedError) and not self.handshake_done \
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

    transport_name = "quic"

    def peer_address(self):
        """(host, port, ...) of the peer, as far as the connection knows it."""
        return self._quic.get_peer_address()

    def path_model(self) -> dict | None:
        """The rate controller's model of the path (None before it has one)."""
        cc = controller_of(self._quic)
        return cc.model() if cc is not None else None

    def resume_path_model(self, model: dict | None) -> None:
        cc = controller_of(self._quic)
        if model and cc is not None:
            cc.resume_model(model)

    def last_send(self) -> float:
        """time.monotonic() of the last packet this end sent."""
        return self._counting.last_send if self._counting is not None else time.monotonic()

    def _smoothed_rtt(self) -> float:
        """QUIC's smoothed RTT (s; 0 before any sample)."""
        return getattr(getattr(self._quic, "_loss", None), "_rtt_smoothed", 0) or 0

    def rtt(self) -> float:
        """QUIC's smoothed RTT (s; 0.1 before any sample)."""
        return self._smoothed_rtt() or 0.1

    def transport_stats(self) -> dict:
        """What crossed the wire: UDP payload bytes and packets both ways,
        QUIC's count of packets it declared lost, its smoothed RTT (ms)."""
        out = dict(self.udp, transport=self.transport_name)
        cc = controller_of(self._quic)
        out["packets_lost"] = cc.packets_lost if cc is not None else 0
        out["rtt_ms"] = round(self._smoothed_rtt() * 1000, 2)
        out["shards_lost"] = self.shards_lost
        out["path_mtu"] = self.paths.datagram_size      # bytes of UDP payload per packet at the end (pmtu)
        out["pmtu_probes"] = self.paths.pmtu.probes
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
                data = event.data
                if self.on_channels is not None:
                    data = self._channels(data)
                    if not data:
                        return
                self.session.receive_stream(data, now)
        elif isinstance(event, events.DatagramFrameReceived):
            if self.session is not None:
                self.last_progress = self.last_shard_at = time.monotonic()
                data = event.data
                if _CORRUPT_SHARDS and random.random() < _CORRUPT_SHARDS:
                    data = _flip_bit(data)
                self.session.receive_datagram(data, now)
        elif isinstance(event, events.PingAcknowledged):
            if event.uid:
                self.liveness.pings_acked.add(event.uid)
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            if self._quic.configuration.is_client:
                self.reset_tokens = peer_tokens(self._quic)
        elif isinstance(event, events.ConnectionTerminated):
            self.close_reason = event.reason_phrase or f"closed by the peer (error {event.error_code})"
            if self.session is not None and not self.session.finished:
                self.session.connection_lost(self.close_reason)
            self.closed_event.set()

    def _channels(self, data: bytes) -> bytes:
        """(server) The connection's first bytes: the channel preface makes
        it a Mux (``on_channels(link)``), anything else leaves it one
        session's. What to give the session now (nothing while the first
        four bytes are incomplete)."""
        from ..protocol.mux import PREFACE
        self._sniff = (self._sniff or bytearray()) + data
        if len(self._sniff) < len(PREFACE) and PREFACE.startswith(bytes(self._sniff)):
            return b""
        data, self._sniff = bytes(self._sniff), None
        make, self.on_channels = self.on_channels, None
        if data.startswith(PREFACE):
            self.session = make(self)
        return data

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
        self.feeder.report_loss(cc, s)
        self.paths.step(now, cc, s)
        dry = self.feeder.feed(now, s)
        doubled = self._counting is not None and self._counting.copies == 1 and self.liveness.redundant(cc)
        if doubled:
            self._counting.copies = 2
        super().transmit()
        if doubled:
            self._counting.copies = 1
        if self._counting is not None and self._counting.copies > 1 and self.handshake_done:
            # the handshake's copies end with the first packets of the session (the client's
            # Finished went out before it, with the copies: sent once, lost at 33 % loss in one
            # run in three, the server ignored the Hello until a probe timeout sent it again)
            self._counting.copies = 1
        self._tell_app_limited(cc, dry)
        if not s.finished:
            self.liveness.arm()
            t = s.next_timer()
            if self.feeder.starved:             # --bwlimit: look again when tokens are back
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

    def _tell_app_limited(self, cc, dry: bool) -> None:
        """Tell the rate controller ``cc`` that the sender ran out of data
        (``dry`` and QUIC sent every datagram queued): the round measures
        resync, not the path (see RateController.on_app_limited)."""
        if cc is not None and dry and not getattr(self._quic, "_datagrams_pending", None):
            cc.on_app_limited()

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
