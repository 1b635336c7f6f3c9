"""``resync sync`` to or from ``resync://HOST[:PORT]/MODULE[/PATH]``.

The client connects (QUIC, TLS 1.3), checks the key in the server's
certificate against the device ID it pins (``--peer-id``, or the
``known_peers`` file; ``--accept-new`` records an unknown server on first
use, as ssh's accept-new) before it sends anything, then runs one protocol
session: a push (the client sends its tree) or a pull (it receives). A lost
or silent connection, or a busy destination, is retried with exponential
backoff and jitter (1 s doubling to a 60 s cap) within ``--retry-for``.
A pull holds its local destination as the server holds a push's (an
exclusive flock on the directory, taken by the receiver before it stages),
so two network transfers never write it at once.
"""
from __future__ import annotations

import asyncio
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConnectionFailed, OutputClosed, ResyncError, StopSignal, TimedOut
from ..protocol.sender import Tally
from ..protocol.session import BusyError, ClientSession, Options, RefusedError
from .feeder import TokenBucket
from .url import Remote, parse_url  # noqa: F401  (parse_url: for callers)

STOP_GRACE = 2.0                  # s a stopped client waits at most for its session to end cleanly
HANDSHAKE_TIMEOUT = 10.0          # s for the server to answer the handshake (--timeout, if shorter, is for a
                                  # live connection going silent: a lossy link's handshake takes 1-3 s)
AUTO_RTT = 0.01                   # s: a TCP handshake within this picks TLS over TCP (--transport auto)


def pinned_certificate(link) -> bytes:
    """The DER certificate the server presented in this connection's TLS
    handshake (aioquic keeps it on its TLS context; there is no public
    accessor)."""
    from cryptography.hazmat.primitives import serialization
    cert = getattr(getattr(link._quic, "tls", None), "_peer_certificate", None)
    if cert is None:
        raise ConnectionFailed("the server presented no certificate (or this aioquic hides it)")
    return cert.public_bytes(serialization.Encoding.DER)


def check_server(remote: Remote, cert_der: bytes, peer_id: str | None, accept_new: bool,
                 known_peers=None) -> tuple[str, bool]:
    """The server's device ID, if it is the one pinned for it, and whether
    it was recorded in known_peers now on --accept-new (a --peer-id the
    file did not hold yet is recorded too, silently: as ssh records a key it
    has checked). A
    known_peers entry is never replaced by --peer-id (a changed key is the
    owner's to re-pin). RefusedError (exit 13) showing both IDs if not, or
    if nothing is pinned and ``accept_new`` is off."""
    from ..identity import certificate_device_id, lookup_peer, parse_device_id, remember_peer
    got = certificate_device_id(cert_der)
    known = lookup_peer(remote.address, known_peers)
    want = parse_device_id(peer_id) if peer_id else known
    if want is None:
        if not accept_new:
            raise RefusedError(f"{remote.address} is not a known peer (its device ID is {got}); pass "
                               f"--peer-id {got} after checking it with the server's owner, or --accept-new")
        remember_peer(remote.address, got, known_peers)
        return got, True
    if want != got:
        raise RefusedError(f"{remote.address} presented device ID {got}, but {want} is pinned for it "
                           "(another server, or its key changed); nothing sent")
    if known is None:                           # pinned by --peer-id and proved: the next run needs no pin
        remember_peer(remote.address, got, known_peers)     # (said of --accept-new only: here the user
    return got, False                                       # named the ID)


@dataclass(frozen=True)
class Transfer:
    """One ``resync sync`` over the network, as the CLI asks the client to run
    it (one typed object from the command line to the session): the server's
    directory and the local one, which way, what the server is asked for
    (``options``: the Hello's flags, excludes, limits), and how the client
    connects, trusts and retries."""

    remote: Remote
    push: bool                      # True: local -> remote; False: remote -> local
    local: str                      # the local directory
    options: Options
    peer_id: str | None = None      # the server's device ID (--peer-id); else known_peers
    accept_new: bool = False        # trust and record a server not yet known (--accept-new)
    timeout: float = 60.0           # s without a packet from the server before the connection is given up
    bwlimit: float | None = None    # bytes per second this end sends at most (a pull's travels in Hello)
    retry_for: float = 300.0        # s within which a lost connection or a busy destination is retried
    known_peers: Path | None = None  # the known_peers file (default: the config directory's)
    transport: str = "auto"         # "auto" (TLS over TCP on a short clean path, else QUIC), "quic", "tcp"
    limits: tuple = ()              # feeder.TokenBuckets more that this end's shards pass (a daemon's)
    priority: str = "normal"        # its class on a connection shared with other transfers (net.channels)
    session: object = None          # session(identity, server certificate): the session to run instead of a
    #                                 push or pull (a relay exchange: protocol.session.RelayClientSession)


async def _once(t: Transfer, identity, report, meter=None, on_note=None, path: dict | None = None,
                stop: "_Stop | None" = None, pool=None) -> ClientSession:
    """One connection. ``path``: what one attempt leaves the next — the rate
    controller's model ("model", read and written here) and, in a push, what
    the server confirmed ("tally": Sender.tally's counts, written here).
    ``stop``: how the attempt is stopped — by default SIGTERM and SIGHUP
    (StopSignal); a daemon running the transfer passes its own, whose
    ``interrupt(exc)`` ends the attempt with ``exc`` raised. ``pool``: a
    net.channels.Pool whose connection to the server the attempt shares
    with other transfers (over QUIC; a daemon's own transfers)."""
    path = {} if path is None else path
    if stop is None:
        stop = _Stop(asyncio.get_running_loop(), asyncio.current_task(), signals=True)
    with stop.signals():
        try:
            sock = await pick_transport(t, path)
            if sock is not None:
                session = await _connected_tcp(t, identity, report, meter, on_note, path, sock, stop)
            elif pool is not None:
                link, cert = await pool.channel(t, identity)
                stop.link = link
                session = await _session_over(link, cert, t, identity, report, meter, on_note, path, stop)
            else:
                from .link import configuration         # (here: a run over TCP never imports aioquic)
                from aioquic.asyncio import connect     # (after .link: see net.defer_import)
                config = configuration(identity, is_client=True, idle_timeout=max(10.0, t.timeout))
                session = await _connected(t, identity, report, meter, on_note, path, config, connect, stop)
        except asyncio.CancelledError:
            if stop.reason is None:
                raise
            session = None
    if stop.signum is not None:                 # (the session, if any, is checkpointed and the server told)
        raise StopSignal(stop.signum)
    if stop.reason is not None:
        raise stop.reason
    if session.output_closed:
        raise OutputClosed()
    return session


class _Stop:
    """How a running attempt is stopped: ``interrupt(exc)`` — a running
    session fails as cut (a receiver checkpoints what arrived, the server is
    told: E_CUT, or E_CANCELLED for a CancelledError), the connection is left
    at once, and the attempt ends with ``exc`` within STOP_GRACE seconds at
    most, whatever the peer does.

    With ``signals``, SIGTERM and SIGHUP interrupt it, taken by the event
    loop (the attempt ends with StopSignal: exit 128 + the signal). The CLI's
    handler raises StopSignal wherever Python happens to be; inside an aioquic
    callback asyncio logs such an exception and goes on (a push ignored
    SIGTERM three times in ten, hung once). A daemon running its own
    transfers (net.sessions) passes no signals and interrupts them itself."""

    def __init__(self, loop, task, signals: bool = False):
        self.loop, self.task, self.take_signals = loop, task, signals
        self.signum: int | None = None
        self.reason: BaseException | None = None
        self.session: ClientSession | None = None
        self.link = None                        # the link.SessionLink or tcp.StreamLink

    @contextmanager
    def signals(self):
        import signal
        import threading
        if not self.take_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        for sig in previous:
            self.loop.add_signal_handler(sig, self.stopped, sig)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                self.loop.remove_signal_handler(sig)        # (which leaves SIG_DFL behind)
                signal.signal(sig, handler)

    def stopped(self, signum: int) -> None:
        if self.reason is not None:
            return
        name = {1: "SIGHUP", 15: "SIGTERM"}.get(signum, f"signal {signum}")
        self.signum = signum
        self.interrupt(StopSignal(signum), ConnectionFailed(f"the client was stopped ({name})"))

    def interrupt(self, exc: BaseException, cut: ResyncError | None = None) -> None:
        """End the attempt with ``exc``; its session fails with ``cut`` (by
        default ``exc``, which must then be a ResyncError)."""
        if self.reason is not None:
            return
        self.reason = exc
        if self.session is not None and not self.session.finished:
            self.session.fail(cut if cut is not None else exc)
            if self.link is not None:
                self.link.drive()               # the Error frame out; the session's end ends the wait
            self.loop.call_later(STOP_GRACE, self.task.cancel)
        else:
            self.task.cancel()
        if self.link is not None:
            self.link.leave()


async def handshake(link, remote: Remote, timeout: float) -> bytes:
    """The QUIC handshake of the new connection ``link`` (aioquic's connect
    leaves its ClientHello unsent), each packet sent HANDSHAKE_COPIES
    times; the certificate the server presented. TimedOut when it does not
    answer within ``timeout`` (at most HANDSHAKE_TIMEOUT), ConnectionFailed
    when it refuses."""
    from . import warm_up
    from .link import HANDSHAKE_COPIES, PacketBatch
    link.batch = PacketBatch(link, link._transport)
    link.handshake_copies(HANDSHAKE_COPIES)
    link.transmit()
    warm_up()                                   # (while the ClientHello crosses: the wait hides it)
    wait = min(timeout, HANDSHAKE_TIMEOUT)
    try:
        await asyncio.wait_for(link.wait_connected(), wait)
    except asyncio.TimeoutError:
        waiter = getattr(link, "_connected_waiter", None)       # fails later, as the link closes:
        if waiter is not None:                                   # nobody else will look at it
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise TimedOut(f"{remote.address} did not answer the handshake within {wait:.0f} s") from None
    except ConnectionError:
        raise ConnectionFailed(f"{remote.address}: {link.close_reason or 'refused'}") from None
    return pinned_certificate(link)


async def _connected(t: Transfer, identity, report, meter, on_note, path, config, connect,
                     stop: _Stop) -> ClientSession:
    from .link import SessionLink
    remote = t.remote
    try:
        async with connect(remote.host, remote.port, configuration=config, create_protocol=SessionLink,
                           wait_connected=False) as link:
            stop.link = link
            cert = await handshake(link, remote, t.timeout)
            return await _session_over(link, cert, t, identity, report, meter, on_note, path, stop)
    except OSError as exc:
        raise ConnectionFailed(f"{remote.address}: {exc.strerror or exc}") from None


async def _session_over(link, cert: bytes, t: Transfer, identity, report, meter, on_note, path: dict,
                        stop: "_Stop") -> ClientSession:
    """The session over a connected ``link`` (either transport) whose server
    presented ``cert``: the server's key checked against the pin before a
    byte of the protocol is sent, then the session driven to its end."""
    remote = t.remote
    try:
        server_id, added = check_server(remote, cert, t.peer_id, t.accept_new, t.known_peers)
    except RefusedError:                        # the server's log says why the client left
        link.close(reason_phrase="the client does not trust this server's key (device ID not pinned)")
        raise
    if added and on_note is not None:
        on_note(f"{remote.address} added to known_peers as {server_id}")
    session = t.session(identity, cert) if t.session is not None else \
        ClientSession(identity, cert, t.push, remote.module, remote.path, t.local, t.options, report, meter)
    stop.session = session
    if t.bwlimit and t.push:                    # a pull's limit travels in Hello: the server sends slower
        link.feeder.bucket = TokenBucket(t.bwlimit)
    link.feeder.limits = list(t.limits)
    done = asyncio.Event()
    link.on_session_done = done.set
    from .channels import ChannelLink
    from .tcp import StreamLink
    quic = not isinstance(link, (StreamLink, ChannelLink))     # a link.SessionLink of its own
    from .workers import attach
    attach(session, link.drive)                 # (a pull's end: its fsyncs off the loop)
    if quic:
        link.resume_path_model(path.get("model"))
        link.start(session, link._quic.get_next_available_stream_id())
    else:
        link.start(session)
    try:
        await _run_session(link, session, done, remote, t.push, t.timeout)
    finally:
        if quic:
            path["model"] = link.path_model() or path.get("model")
        tally = getattr(session.role, "tally", None)
        path["tally"] = tally.counts if tally is not None else None
    session.server_id = server_id
    return session


async def pick_transport(t: Transfer, path: dict):
    """The connected TCP socket to run this attempt over TLS, or None for
    QUIC. ``--transport tcp``: the socket, or ConnectionFailed. ``quic``:
    None. ``auto``: a TCP connection that completes within AUTO_RTT (its
    handshake took one round trip: a LAN, where QUIC in Python is the
    bottleneck and TCP loses nothing worth parity), unless a TCP path failed
    earlier in this run (``path["fallback"]``: the next attempts use QUIC and
    resume what arrived); None on a longer round trip, a refusal, or
    silence (a lossy path loses SYNs: QUIC with parity is the better
    transport there)."""
    if t.transport == "quic" or (t.transport == "auto" and path.get("fallback")):
        return None
    import socket
    loop = asyncio.get_running_loop()
    remote = t.remote
    try:
        try:                                    # (an address: no resolver thread in this process)
            infos = socket.getaddrinfo(remote.host, remote.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await loop.getaddrinfo(remote.host, remote.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionFailed(f"{remote.address}: {exc.strerror or exc}") from None
    family, _, proto, _, addr = infos[0]
    if t.transport == "auto":
        # (blocking, for AUTO_RTT at most: a connect given up is closed with nothing of it
        # left in the event loop, whose next socket may take the same descriptor number)
        try:
            sock = socket.create_connection(addr[:2], timeout=AUTO_RTT)
        except OSError:
            return None
        sock.setblocking(False)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            why = "no answer" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
            raise ConnectionFailed(f"{remote.address} (TCP): {why}") from None
    return sock


async def _connected_tcp(t: Transfer, identity, report, meter, on_note, path, sock, stop: "_Stop") -> ClientSession:
    """One attempt over TLS 1.3 on the connected TCP socket ``sock``."""
    from .tcp import HANDSHAKE_TIMEOUT as TLS_TIMEOUT
    from .tcp import LINGER, StreamLink, tls_context
    remote = t.remote
    loop = asyncio.get_running_loop()
    try:
        _, link = await loop.create_connection(StreamLink, sock=sock, ssl=tls_context(identity, False),
                                               server_hostname="resync", ssl_handshake_timeout=TLS_TIMEOUT)
    except OSError as exc:                      # (ssl.SSLError is one)
        sock.close()
        path["fallback"] = True
        raise ConnectionFailed(f"{remote.address} (TLS over TCP): {getattr(exc, 'strerror', None) or exc}") from None
    stop.link = link
    cert = link.peer_certificate()
    if cert is None:
        link.close()
        raise ConnectionFailed(f"{remote.address}: the server presented no certificate")
    try:
        session = await _session_over(link, cert, t, identity, report, meter, on_note, path, stop)
    except (ConnectionFailed, TimedOut):
        path["fallback"] = True                 # the TCP path broke: the next attempts use QUIC
        raise
    finally:
        link.close()
        try:                                    # (both ends' FINs: a moment, at most the linger)
            await asyncio.wait_for(link.closed_event.wait(), LINGER)
        except asyncio.TimeoutError:
            pass
    if isinstance(session.error, (ConnectionFailed, TimedOut)):
        path["fallback"] = True
    return session


async def _run_session(link, session: ClientSession, done: asyncio.Event, remote: Remote,
                       push: bool, timeout: float) -> None:
    """Drive ``session`` to its end (or a lost or silent connection: TimedOut
    after ``timeout`` s without data), then close the connection."""
    while not done.is_set():
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(done.wait())), 1.0)
        except asyncio.TimeoutError:
            pass
        if link.closed_event.is_set() and not session.finished:
            session.connection_lost(link.close_reason)
            break
        if time.monotonic() - link.last_progress > timeout:
            exc = TimedOut(f"no data from {remote.address} for {timeout:.0f} s")
            session.fail(exc)           # a receiver checkpoints; the server is told (E_CUT)
            link.drive()
            link.close()
            raise exc
    link.drive()
    session.transport = link.transport_stats()
    # The client closes: a pull once it has the sender's Bye, a push once its Bye is sent
    # (a receiver that has sent Done has finished, whether the Bye or only the close arrives),
    # and does not wait out QUIC's closing period.
    link.leave()


def _new_listing(stats) -> None:
    """A retry lists the source again: what describes the tree (files,
    directories, bytes scanned) is the last attempt's, not the sum of them
    all (a retried pull counted every file twice). What was written stays
    counted: the next attempt finds it done and does not count it again."""
    stats.files = stats.dirs = stats.symlinks = stats.specials = stats.bytes_scanned = 0


class Attempts:
    """The retry policy of one transfer (see ``run``), for whoever drives
    its attempts: the CLI (``run``: one event loop an attempt) or a daemon
    running the transfer on its own loop (net.sessions). Before each
    attempt ``begin()``; after it ``after(session)`` or ``after(error=exc)``,
    which returns the session to keep (done) or the seconds to wait before
    the next attempt, and raises the error that ends the transfer (a refusal,
    a protocol error, or a lost connection past ``t.retry_for``)."""

    def __init__(self, t: Transfer, report=None, meter=None):
        self.t, self.report, self.meter = t, report, meter
        self.delay, self.started, self.count = 1.0, time.monotonic(), 0
        self.path: dict = {}                    # the path's model and the tally, from one attempt to the next
        self.carried = dict.fromkeys(Tally.KEYS, 0)     # a push: what the server confirmed in cut attempts
        self.error: BaseException | None = None

    def begin(self) -> None:
        if self.meter is not None:
            self.meter.reset()
        if self.count and getattr(self.report, "stats", None) is not None:  # (a pull's: this end lists
            _new_listing(self.report.stats)                                  # nothing in a push)
        self.count += 1
        self.path["tally"] = None

    def after(self, session: ClientSession | None = None, error: BaseException | None = None):
        t = self.t
        if session is not None:
            if session.error is None:
                session.attempts, session.wall = self.count, time.monotonic() - self.started
                if t.push and any(self.carried.values()):
                    session.result = {**session.result,
                                      **{k: session.result.get(k, 0) + v for k, v in self.carried.items()}}
                return session
            error = session.error
            if not isinstance(error, (ConnectionFailed, TimedOut, BusyError)):
                raise error
            if session.stats["datagrams_sent"] + session.stats["datagrams_received"]:
                self.delay = 1.0                # it moved content: a new outage, not the same one
        self.error = error
        if t.push and self.path["tally"]:
            for k, v in self.path["tally"].items():
                self.carried[k] += v
        wait = self.delay * random.uniform(0.5, 1.0)
        if time.monotonic() - self.started + wait > t.retry_for:
            raise error
        self.delay = min(self.delay * 2, 60.0)
        return wait


def run(t: Transfer, identity, report=None, on_retry=None, meter=None, on_note=None) -> ClientSession:
    """The transfer ``t``, retried after a lost or silent connection, or while the
    destination is busy with another device's transfer (backoff 1 s doubling
    to 60 s, with jitter) for at most ``t.retry_for`` seconds (a retried push's
    statistics add what the server confirmed in the cut attempts); ``on_retry(why,
    seconds)`` is told of each wait, ``on_note(text)`` of a server recorded
    in known_peers; ``meter`` (resync.progress.Progress, -P)
    is shown each attempt's bytes. The session returned carries
    ``attempts`` and ``wall`` (seconds since the first attempt began). Raises
    the last error (other refusals and protocol errors are never retried)."""
    attempts = Attempts(t, report, meter)
    while True:
        attempts.begin()
        try:
            session = asyncio.run(_once(t, identity, report, meter, on_note, attempts.path))
        except (ConnectionFailed, TimedOut, BusyError) as exc:
            outcome = attempts.after(error=exc)
        else:
            outcome = attempts.after(session)
        if isinstance(outcome, ClientSession):
            return outcome
        if on_retry is not None:
            on_retry(str(attempts.error), outcome)
        time.sleep(outcome)


def result_of(session: ClientSession, t: Transfer) -> dict:
    """What a finished network transfer reports (``--json``'s object, the
    history's run row): the receiver's statistics with the sender's counters,
    the peer, the whole run's duration and attempts, the transfer id, the
    protocol's and the transport's bytes."""
    result = dict(session.result)
    result["peer"] = str(t.remote)
    # the whole run, retries and their waits included (the wire figures below are the last attempt's)
    result["duration"], result["attempts"] = round(session.wall, 6), session.attempts
    result["transfer_id"] = session.transfer_id         # the server's log and history have it too
    result.update(session.stats)                # the protocol's bytes: control stream and shards
    wire = getattr(session, "transport", {})
    result.update(wire)                         # QUIC: UDP payload bytes and packets, losses, RTT; TCP: its
    tcp = wire.get("transport") == "tcp"        # payload bytes (TLS records), retransmissions, RTT
    result["bytes_on_wire_sent"] = wire.get("tcp_bytes_sent" if tcp else "udp_bytes_sent", 0)
    result["bytes_on_wire_received"] = wire.get("tcp_bytes_received" if tcp else "udp_bytes_received", 0)
    return result
