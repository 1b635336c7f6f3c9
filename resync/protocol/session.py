"""The two ends of a transfer as state machines, free of network I/O.

A ``Session`` is fed what arrives (``receive_stream`` for the control stream,
``receive_datagram`` for shards) and the time, and is asked what to send
(``stream_to_send``, ``datagrams_to_send``) and when to be woken
(``next_timer``, ``handle_timer``) — the shape of aioquic's QuicConnection.
``resync.net`` pumps it over QUIC; the tests pump two of them into each other
in memory, through a channel that loses, reorders and duplicates datagrams,
with a clock moved by hand.

The file system is not abstracted away: the sender lists and reads its tree
(``scan``, the delta engine), the receiver plans against its own tree
(``plan.Planner``) and changes it only through ``apply.Applier`` — the same
steps as a local sync, with file content arriving as stripes.

Handshake (client C, server S), before any file metadata::

    C -> S  Hello      version, push or pull, C's public key, C's nonce, options,
                       module, path
    S -> C  Challenge  S's nonce
    C -> S  Auth       Ed25519 signature by C's key of auth_message(...), which
                       binds both nonces and the SHA-256 of the certificate S
                       presented in this connection's TLS handshake (the client
                       has already checked that certificate's key against the
                       server's pinned device ID)
    S -> C  Welcome    or Error: unknown module, client not allowed, bad proof

A pushing client lists (up to EARLY_LISTING bytes) right after its Auth, a
round trip before the Welcome; the server holds what follows the Auth until
it has admitted the push (HELD_LIMIT bytes at most), then plans it.
Then the sender lists its tree (Dir ... ListEnd), the receiver plans each
directory as it arrives and asks for what it lacks (Want: with its copy's
block signature for a delta); the sender answers each Want with a File frame
and the content as shards; the receiver acknowledges stripes (Ack), asks for
more shards where a stripe stays short (Repair), places each file once it is
complete and checked, and ends with its deletions, directory attributes and
Done; the sender says Bye.
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass, field

from ..errors import OutputClosed, ResyncError
from . import frames as F
from .common import WORK_SLICE, BusyError, CancelledError, PeerFileError, PeerNoSpaceError, RefusedError
from .frames import ProtocolError
from .receiver import Receiver
from .sender import Sender
from .shards import PROBE, parse

__all__ = ["AUTH_LIMIT", "HELLO_LIMIT", "SHARD_SIZE", "WINDOW", "BusyError", "ClientSession", "Module", "Options",
           "PeerFileError", "PeerNoSpaceError", "RefusedError", "RelayClientSession", "ServerSession", "Session",
           "shard_size_for", "transfer_id"]

AUTH_CONTEXT = b"resync-auth-v1"
# One shard per DATAGRAM frame in a 1,350-byte QUIC packet: short header (1 + 8-byte connection
# ID + packet number, at most 4), AEAD tag 16, frame type and length 3: at most 1,318 bytes of
# datagram, of which the shard header takes 19 (shards.HEADER).
SHARD_SIZE = 1296                # (at QUIC's 1,200-byte minimum: 1,136; see shard_size_for)
WINDOW = 8 << 20                 # content bytes in flight before the receiver acknowledges
HELLO_LIMIT = (1 << 20) + (1 << 18)   # longest frame a server takes before Hello: a Hello at most
AUTH_LIMIT = 256                 # ... and after it, before Auth (an Auth is 69 bytes)
EARLY_LISTING = 64 << 10         # control bytes a pushing client lists after its Auth, before Welcome
HELD_LIMIT = EARLY_LISTING + F.MAX_FRAME  # bytes a server holds after a client's Auth, before its Welcome
LOCK_WAIT = 3.0                  # s a push waits for the server to learn whether the run holding its
LOCK_POLL = 0.1                  # destination is alive (asked again this often), before "busy"

# Error frame codes and the exit codes they become (README: exit codes).
E_PROTOCOL, E_AUTH, E_NO_MODULE, E_DENIED, E_READ_ONLY, E_BUSY, E_INTERNAL, E_CUT = 1, 2, 3, 4, 5, 6, 7, 8
E_NO_SPACE, E_FILE = 9, 10        # the peer's disk is full (exit 6), or failed to read or write (exit 3)
E_CANCELLED = 11                  # the server's operator cancelled the transfer (exit 13, not retried)


def transfer_id(server_nonce: bytes, client_nonce: bytes) -> str:
    """The id both ends record for one connection's transfer (the client's
    --json and history, the server's log and history): 16 hex digits of
    SHA-256 over the handshake's two nonces, which both hold once the
    Challenge has crossed, so nothing more is sent."""
    return hashlib.sha256(b"resync-transfer-id\0" + server_nonce + client_nonce).hexdigest()[:16]


def signature_salt(server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The key of this transfer's block signatures (32 bytes: the check sums'
    weights and the keyed BLAKE3 of every block): SHA-256 over the
    handshake's two nonces, fresh for each connection and unknown before it,
    so nobody can prepare blocks that collide with a destination's (rsync's
    checksum seed, made unpredictable); a Want need not carry it."""
    return hashlib.sha256(b"resync-signature-salt\0" + server_nonce + client_nonce).digest()


def auth_message(server_nonce: bytes, client_nonce: bytes, server_cert_der: bytes, client_key: bytes,
                 module: bytes, path: bytes) -> bytes:
    """What the client signs: bound to this connection (both nonces, the
    certificate the server presented) and to what it asks for."""
    return b"\0".join([AUTH_CONTEXT, server_nonce, client_nonce, hashlib.sha256(server_cert_der).digest(),
                       client_key, module, path])


@dataclass
class Options:
    """What the client asks the server for (the Hello's flags, excludes and
    limits), as both ends' sessions run it."""

    delete: bool = False            # --delete
    checksum: bool = False          # -c: compare files by BLAKE3
    dry_run: bool = False           # -n
    whole_file: bool = False        # -W: no deltas
    itemize: bool = False           # -i: itemized lines (a push: sent back to the client)
    max_delete: int | None = None   # --max-delete N
    excludes: list = field(default_factory=list)     # gitignore patterns
    bwlimit: int = 0                # bytes per second the sender may send; 0: no limit
    sparse: bool = False            # -S: blocks of zeros travel as holes and are written as holes

    def __post_init__(self):
        self.excludes = list(self.excludes)
        self.bwlimit = int(self.bwlimit or 0)

    @property
    def flags(self) -> int:
        return ((F.FLAG_DELETE if self.delete else 0) | (F.FLAG_CHECKSUM if self.checksum else 0)
                | (F.FLAG_DRY_RUN if self.dry_run else 0) | (F.FLAG_WHOLE_FILE if self.whole_file else 0)
                | (F.FLAG_ITEMIZE if self.itemize else 0) | (F.FLAG_SPARSE if self.sparse else 0))

    @classmethod
    def from_hello(cls, h: F.Hello) -> "Options":
        excludes = [os.fsdecode(p) for p in h.excludes.split(b"\n") if p]
        return cls(bool(h.flags & F.FLAG_DELETE), bool(h.flags & F.FLAG_CHECKSUM), bool(h.flags & F.FLAG_DRY_RUN),
                   bool(h.flags & F.FLAG_WHOLE_FILE), bool(h.flags & F.FLAG_ITEMIZE),
                   None if h.max_delete < 0 else h.max_delete, excludes, h.bwlimit,
                   bool(h.flags & F.FLAG_SPARSE))


def shard_size_for(datagram_size: int) -> int:
    """Shard bytes per datagram in a QUIC packet of ``datagram_size`` bytes
    of UDP payload (a multiple of 16): the packet's short header (1 + an
    8-byte connection ID + a packet number of at most 4), its AEAD tag (16)
    and the DATAGRAM frame's type and length (3) leave datagram_size - 32,
    of which the shard header takes 19 (shards.HEADER). 1,350 -> 1,296;
    1,200 (QUIC's minimum) -> 1,136."""
    from .shards import HEADER
    return (datagram_size - 32 - HEADER) // 16 * 16


class Session:
    """One connection's protocol state. Subclasses: ClientSession, ServerSession.

    The transport sets ``shard_size`` (what a datagram holds on the path as
    confirmed so far: files started later are cut to it) and
    ``path_settled`` (False while it still searches the path's MTU: a
    sender starts no file before, so that a large file is not cut into the
    smaller shards of the minimum; the transport settles it within a few
    RTTs whatever the search finds), and ``reliable`` (True on a transport
    that delivers every shard in order, the TLS over TCP stream: stripes go
    without parity, nothing is repaired or probed, shards carry no check)."""

    def __init__(self):
        self._reader = F.FrameReader()
        self._out = bytearray()
        self.role = None                 # a Sender or a Receiver once authenticated
        self.finished = False
        self.error: ResyncError | None = None
        self.cleanup_error = ""           # what failed while a failed session cleaned up (for the log)
        self.output_closed = False        # stopped because this end's stdout was closed (EPIPE)
        self.transfer_id = ""             # both ends' id of this transfer, once the Challenge has crossed
        self.salt = b""                   # the key of its block signatures (signature_salt), from then too
        self.result: dict = {}
        self.rtt = 0.05                  # the transport's estimate (net sets it)
        self.shard_size = SHARD_SIZE     # shard bytes a datagram holds on this path (net sets it)
        self.path_settled = True         # False while the transport searches the path's MTU
        self.reliable = False            # the transport loses nothing (the TLS stream): no parity, repairs,
        #                                  probes or shard checks; net sets it
        self.progress = None             # resync.progress.Progress (-P) or None: queued, partial, done, scanned
        self.blocking = None             # the transport's: blocking(job, back) runs job() off its event loop,
        #                                  then back(future) on it and sends what the session has; None: here
        self._worker = None              # the thread running a job of the session's (run_blocking), if any
        self._held: list[bytes] = []     # frames that job sent, sent when it is over
        self._backlog = False            # frames received and not yet taken (WORK_SLICE ran out)
        self._prev_rel = b""             # the path of the last Dir frame sent
        self.stats = {"datagrams_sent": 0, "datagram_bytes_sent": 0, "datagrams_received": 0,
                      "datagram_bytes_received": 0, "control_bytes_sent": 0, "control_bytes_received": 0}

    # -- the transport's surface ----------------------------------------------------
    # Whatever goes wrong inside a call from the transport ends the session
    # with one error (its peer told, its receiver cleaned up) and never
    # escapes into the transport's event loop: an OSError (a full disk, an
    # I/O error) becomes the resync error it is, anything else an internal
    # error. A session that has failed is finished: no call does more work.
    def _guarded(self, call, *args):
        try:
            return call(*args)
        except ResyncError as exc:
            self.fail(exc)
        except OutputClosed:                    # this end's output was closed (`... | head`): it
            from ..errors import ConnectionFailed  # stops; the peer sees a cut, resumable
            self.output_closed = True
            self.fail(ConnectionFailed("the client stopped: its output was closed"))
        except OSError as exc:
            from ..fs import os_error
            self.fail(os_error(exc.filename or "the transfer", exc))
        except Exception as exc:                # a bug: one line, not a traceback per packet
            from ..errors import InternalError
            self.fail(InternalError(f"{type(exc).__name__}: {exc}"))
        return None

    def receive_stream(self, data: bytes, now: float) -> None:
        self.stats["control_bytes_received"] += len(data)
        if not self.finished:
            self._guarded(self._take_stream, data, now)

    def _take_stream(self, data: bytes, now: float) -> None:
        self._reader.feed(data)
        self._take_frames(now)

    def _take_frames(self, now: float) -> None:
        """Take the frames received, for at most WORK_SLICE once the
        transfer runs (a receiver plans directories and signs its copies as
        their listings come; a sender's listing of a thousand directories
        arrives in one read): what is left waits in the reader for the
        session's timer (``next_timer`` says now), so that the Wants made so
        far leave at once and the peer starts on them."""
        deadline = time.monotonic() + WORK_SLICE
        self._backlog = False
        frames = self._reader.frames()
        while not self.finished:
            if self.role is None and self._holding():
                if self._reader.pending > HELD_LIMIT:
                    raise ProtocolError(f"over {HELD_LIMIT} bytes sent before Welcome")
                self._backlog = self._reader.pending > 0
                return
            frame = next(frames, None)
            if frame is None:
                return
            self._frame(frame, now)
            if self.role is not None and time.monotonic() > deadline:
                self._backlog = self._reader.pending > 0
                return

    def _holding(self) -> bool:
        """Whether what arrives now waits in the reader (a server that has the
        client's proof and is still admitting it: the early listing)."""
        return False

    def receive_datagram(self, data: bytes, now: float) -> None:
        if data[:1] == PROBE:
            return                              # (a path MTU probe's padding: nothing to take)
        self.stats["datagrams_received"] += 1
        self.stats["datagram_bytes_received"] += len(data)
        if self.finished or not isinstance(self.role, Receiver):
            return
        self._guarded(self.role.shard, parse(data, not self.reliable), now)

    def stream_to_send(self) -> bytes:
        if self.role is not None and not self.finished:
            self._guarded(self.role.pump)
        out, self._out = bytes(self._out), bytearray()
        self.stats["control_bytes_sent"] += len(out)
        return out

    def datagrams_to_send(self, now: float, limit: int) -> list[bytes]:
        if self.finished or not isinstance(self.role, Sender):
            return []
        out = self._guarded(self.role.datagrams, now, limit) or []
        self.stats["datagrams_sent"] += len(out)
        self.stats["datagram_bytes_sent"] += sum(len(d) for d in out)
        return out

    def observe_loss(self, lost: int, sent: int) -> None:
        """The transport saw ``lost`` of ``sent`` datagrams lost (since its
        last report): the sender sizes its parity by it."""
        if isinstance(self.role, Sender):
            self.role.observe_loss(lost, sent)

    def next_timer(self) -> float | None:
        if self.finished or self.role is None:
            return None
        if self._backlog:
            return 0.0                          # at once: frames wait to be taken
        return self.role.next_timer()

    def handle_timer(self, now: float) -> None:
        if self._backlog and not self.finished:
            self._guarded(self._take_frames, now)
        if self.role is not None and not self.finished:
            self._guarded(self.role.timer, now)

    def connection_lost(self, why: str) -> None:
        """The transport is gone (idle timeout, reset): a transfer not
        finished fails; the receiver cleans up. A receiver that has applied
        everything and sent Done has finished: only the sender's Bye is
        missing (the sender closes soon after it, and on a lossy link its
        CONNECTION_CLOSE may be all that arrives)."""
        if not self.finished:
            if isinstance(self.role, Receiver) and self.role.done_sent and self.error is None:
                self.finished = True
                return
            if getattr(self.role, "over_sent", False) and self.role.peer_over and self.error is None:
                self.finish(self.role.result)   # (a relay exchange both ends had ended: only the Bye is missing)
                return
            from ..errors import ConnectionFailed
            self.fail(ConnectionFailed(why), tell_peer=False)

    # -- for subclasses -------------------------------------------------------------------
    def run_blocking(self, job, then, orphaned=None):
        """Run ``job()``, which may wait on the disk for long (fsyncs
        behind another program's writes: seconds), where it holds nothing
        else up — the transport's worker thread (``blocking``), or here and
        now — then ``then(future)`` here (``future.result()``: what ``job``
        returned, or raises what it raised, which ends the session as if
        raised here). Frames ``job`` sends leave when it is over, before
        those of ``then``. While it runs the session is fed as before; its
        role must not touch what ``job`` does. If the session has ended
        meanwhile (cut, cancelled), ``orphaned(future)`` is called instead
        of ``then``, to clean up after ``job`` if it failed. Returns the
        job's future (concurrent.futures)."""
        def run():
            import threading
            self._worker = threading.get_ident()
            try:
                return job()
            finally:
                self._worker = None

        def back(outcome) -> None:
            held, self._held = self._held, []
            for data in held:
                self._out += data
            if not self.finished:
                self._guarded(then, outcome)
            elif orphaned is not None:
                orphaned(outcome)
        if self.blocking is None:
            from concurrent.futures import Future
            outcome: Future = Future()
            try:
                outcome.set_result(run())
            except BaseException as exc:        # (raised again by back, under _guarded)
                outcome.set_exception(exc)
            back(outcome)
            return outcome
        return self.blocking(run, back)

    def send(self, frame) -> None:
        if self._worker is not None:
            import threading
            if threading.get_ident() == self._worker:   # (run_blocking's job: sent when it is over)
                self._held.append(F.encode(frame))
                return
        if type(frame) is F.Dir:                # (its path is front-coded against the Dir before it)
            self._out += F.encode(frame, self._prev_rel)
            self._prev_rel = frame.rel
            return
        self._out += F.encode(frame)

    @property
    def buffered(self) -> int:
        return len(self._out)

    def fail(self, exc: ResyncError, tell_peer: bool = True) -> None:
        if self.finished:
            return
        if tell_peer:
            from ..errors import ConnectionFailed, TimedOut
            code = E_CUT if isinstance(exc, (ConnectionFailed, TimedOut)) else E_BUSY if isinstance(exc, BusyError) \
                else E_CANCELLED if isinstance(exc, CancelledError) \
                else {12: E_PROTOCOL, 13: E_AUTH, 6: E_NO_SPACE, 3: E_FILE}.get(getattr(exc, "exit_code", 0),
                                                                              E_INTERNAL)
            try:
                self.send(F.Error(code, os.fsencode(str(exc))))
            except ResyncError:
                pass
        self.error = exc
        self.finished = True
        if self.role is not None:
            try:
                self.role.abort(exc)
            except Exception as cleanup:        # (the disk that failed the run may fail its cleanup too)
                self.cleanup_error = f"{type(cleanup).__name__}: {cleanup}"

    def finish(self, result: dict) -> None:
        self.result = result
        self.finished = True

    def _frame(self, frame, now: float) -> None:
        if isinstance(frame, F.Error):
            self._peer_error(frame)
            return
        if self.role is None:
            self._handshake(frame, now)
        else:
            self.role.frame(frame, now)

    def _peer_error(self, frame: F.Error) -> None:
        message = os.fsdecode(frame.message)
        if frame.code == E_BUSY:
            exc = BusyError(f"the peer says: {message}")
        elif frame.code == E_CANCELLED:
            exc = CancelledError(f"the peer says: {message}")
        elif frame.code in (E_AUTH, E_NO_MODULE, E_DENIED, E_READ_ONLY):
            exc = RefusedError(f"the peer says: {message}")
        elif frame.code == E_CUT:
            from ..errors import ConnectionFailed
            exc = ConnectionFailed(f"the peer says: {message}")
        elif frame.code == E_NO_SPACE:
            exc = PeerNoSpaceError(message)
        elif frame.code == E_FILE:
            exc = PeerFileError(message)
        else:
            exc = ProtocolError(f"the peer says: {message}")
        self.fail(exc, tell_peer=False)

    def _handshake(self, frame, now: float) -> None:
        raise NotImplementedError

    @property
    def sends_content(self) -> bool:
        """Whether this end is (or will be, once the handshake ends) the
        sender of content: the one whose packets the path MTU matters for."""
        return isinstance(self.role, Sender)


class ClientSession(Session):
    """The client's end. ``local`` is its tree (the source when pushing, the
    destination when pulling); ``server_cert_der`` the certificate the server
    presented (already checked against its pinned device ID by the caller)."""

    def __init__(self, identity, server_cert_der: bytes, push: bool, module: str, path: str, local: str,
                 options: Options, report=None, progress=None):
        super().__init__()
        self.progress = progress
        self.identity, self.server_cert_der, self.push = identity, server_cert_der, push
        self.module, self.path, self.local, self.options = os.fsencode(module), os.fsencode(path), local, options
        self.report = report
        self.nonce = os.urandom(16)
        self.welcomed = False
        self.send(F.Hello(F.VERSION, push, identity.public_key, self.nonce, options.flags,
                          -1 if options.max_delete is None else options.max_delete, self.module, self.path,
                          b"\n".join(os.fsencode(p) for p in options.excludes), options.bwlimit))

    @property
    def sends_content(self) -> bool:
        return self.push

    def _handshake(self, frame, now: float) -> None:
        if isinstance(frame, F.Challenge) and not self.transfer_id:
            self.transfer_id = transfer_id(frame.nonce, self.nonce)
            self.salt = signature_salt(frame.nonce, self.nonce)
            msg = auth_message(frame.nonce, self.nonce, self.server_cert_der, self.identity.public_key,
                               self.module, self.path)
            self.send(F.Auth(self.identity.sign(msg)))
            if self.push:                       # the listing starts with the proof, a round trip before
                self.role = Sender(self, self.local, self.options, window=WINDOW)       # the Welcome
                self.role.before_welcome(EARLY_LISTING)
        elif isinstance(frame, F.Welcome) and self.transfer_id and not self.push:
            self.welcomed = True
            self.role = Receiver(self, self.local, self.options, self.report, hold=True)
        else:
            raise ProtocolError(f"{type(frame).__name__} before the handshake ended")

    def _frame(self, frame, now: float) -> None:
        if type(frame) is F.Welcome and self.push and not self.welcomed and self.role is not None:
            self.welcomed = True
            self.role.welcome(frame.window)
            return
        super()._frame(frame, now)


class RelayClientSession(ClientSession):
    """A client's relay exchange (protocol.relay): hands ``outgoing``'s
    envelopes to the server and, with ``collect``, takes what the server
    holds for this device into ``incoming``."""

    def __init__(self, identity, server_cert_der: bytes, outgoing, incoming, collect: bool):
        Session.__init__(self)
        self.identity, self.server_cert_der, self.push = identity, server_cert_der, True
        self.module, self.path, self.local, self.options = b"", b"", "", Options()
        self.report, self.progress = None, None
        self.outgoing, self.incoming = outgoing, incoming
        self.nonce = os.urandom(16)
        self.welcomed = False
        flags = F.FLAG_RELAY | (F.FLAG_COLLECT if collect else 0)
        self.send(F.Hello(F.VERSION, True, identity.public_key, self.nonce, flags, -1, b"", b"", b"", 0))

    def _handshake(self, frame, now: float) -> None:
        from .relay import Exchange
        if isinstance(frame, F.Challenge) and not self.transfer_id:
            self.transfer_id = transfer_id(frame.nonce, self.nonce)
            self.salt = signature_salt(frame.nonce, self.nonce)
            self.send(F.Auth(self.identity.sign(auth_message(frame.nonce, self.nonce, self.server_cert_der,
                                                             self.identity.public_key, b"", b""))))
        elif isinstance(frame, F.Welcome) and self.transfer_id:
            self.welcomed = True
            self.role = Exchange(self, self.outgoing, self.incoming, client=True)
        else:
            raise ProtocolError(f"{type(frame).__name__} before the handshake ended")

    def _frame(self, frame, now: float) -> None:
        Session._frame(self, frame, now)


class Module:
    """A directory the server offers: its name, path, whether clients may
    write into it, and the device IDs allowed to use it."""

    __slots__ = ("name", "path", "read_only", "allowed")

    def __init__(self, name: str, path: str, read_only: bool = False, allowed=()):
        self.name, self.path, self.read_only, self.allowed = name, path, read_only, set(allowed)


class ServerSession(Session):
    """The server's end: checks the client's proof and permissions, then
    becomes the receiver (a push) or the sender (a pull) of ``module/path``.
    ``lock(key, fd, session)`` takes the destination (open as fd) for this
    transfer: True, False (another transfer holds it: busy), or None (ask
    again: the server is finding out whether the transfer holding it is
    alive); with fd None it only answers whether it would."""

    def __init__(self, identity, cert_der: bytes, modules: dict, report_factory=None, lock=None,
                 bwlimit: float = 0, min_parity: int = 1, capacity=None, relay=None):
        super().__init__()
        self.relay = relay                  # relay(client_id, collect): (outgoing, incoming) of a relay
        #                                     exchange for that device, or None (not allowed); None: no relaying
        self.capacity = capacity            # capacity(session): why it may not start now (the server's cap), or None
        self._reader.limit = HELLO_LIMIT       # until the client has proved its key: no frame
                                               # longer than a Hello can be (nothing held for more)
        self.bwlimit, self.min_parity = bwlimit, min_parity
        self.rate_limit = 0.0               # what this server may send per second in a pull (0: no limit)
        self.identity, self.cert_der, self.modules = identity, cert_der, modules
        self.report_factory = report_factory
        self.lock = lock
        self.hello: F.Hello | None = None
        self.nonce = os.urandom(16)
        self.client_id: str | None = None
        self.module: Module | None = None
        self.target: str | None = None          # module/path as a path (for logs and history)
        self.target_key: str | None = None      # the module's real path joined with the checked path
        self._lock_wait = None                  # (give up at, options, rel) while lock() said "ask again"
        self._lock_asked = 0.0

    @property
    def sends_content(self) -> bool:
        return self.hello is not None and not self.hello.push and not self.finished

    @property
    def authenticated(self) -> bool:
        """Whether the client has proved its key (a refused client has too, or not)."""
        return self.client_id is not None

    def _handshake(self, frame, now: float) -> None:
        from ..identity import device_id, verify_signature
        if isinstance(frame, F.Hello) and self.hello is None:
            if frame.version != F.VERSION:
                raise ProtocolError(f"version {frame.version} not supported (this server speaks {F.VERSION})")
            self.hello = frame
            self.transfer_id = transfer_id(self.nonce, frame.nonce)
            self.salt = signature_salt(self.nonce, frame.nonce)
            self._reader.limit = AUTH_LIMIT
            self.send(F.Challenge(self.nonce))
            return
        if not isinstance(frame, F.Auth) or self.hello is None:
            raise ProtocolError(f"{type(frame).__name__} out of order in the handshake")
        h = self.hello
        if not verify_signature(h.client_key, frame.signature, auth_message(self.nonce, h.nonce, self.cert_der,
                                                                           h.client_key, h.module, h.path)):
            self._refuse(E_AUTH, "the client did not prove its key")
            return
        self.client_id = device_id(h.client_key)
        self._reader.limit = F.MAX_FRAME
        if h.flags & F.FLAG_RELAY:
            self._relay_exchange(bool(h.flags & F.FLAG_COLLECT))
            return
        module = self.modules.get(os.fsdecode(h.module))
        if module is None or self.client_id not in module.allowed:
            # the same answer whether the module exists or not: a device that may not use it
            # learns nothing of which names exist
            self._refuse(E_DENIED, f"no module {os.fsdecode(h.module)!r} for device {self.client_id} "
                                   "(none by that name, or this device is not allowed to use it)")
            return
        if h.push and module.read_only:
            self._refuse(E_READ_ONLY, f"module {module.name!r} is read-only")
            return
        try:
            rel = os.fsdecode(F.check_rel(h.path.strip(b"/"), "path"))
        except ProtocolError:
            self._refuse(E_DENIED, "the path leaves the module")
            return
        options = Options.from_hello(h)
        self.module = module
        self.target = os.path.join(module.path, rel) if rel else module.path
        self.target_key = os.path.join(os.path.realpath(module.path), rel) if rel else \
            os.path.realpath(module.path)
        self._admit(options, rel, now)

    def _admit(self, options: Options, rel: str, now: float) -> None:
        """Take the destination of a push — ``lock``: True, False for busy,
        None while it finds out whether the transfer holding it is still
        alive (asked again from the timer, at most LOCK_WAIT) —, asked first
        without a descriptor, so that a push refused as busy has made
        nothing; then open (or make) the destination, Welcome, and become
        the receiver or the sender."""
        h, module = self.hello, self.module
        full = self.capacity(self) if self.capacity is not None else None
        if full:
            self._refuse(E_BUSY, full)
            return
        locked = h.push and not options.dry_run and self.lock is not None
        if locked:
            got = self.lock(self.target_key, None, self)
            if got is None and (self._lock_wait is None or now < self._lock_wait[0]):
                if self._lock_wait is None:
                    self._lock_wait, self._lock_asked = (now + LOCK_WAIT, options, rel), now
                return
            self._lock_wait = None
            if not got:
                self._busy(rel)
                return
        fd = self._open_target(module, rel, create=h.push and not options.dry_run)
        if fd is None:
            return                              # refused, and said why
        if locked and fd >= 0 and not self.lock(self.target_key, fd, self):
            os.close(fd)                        # (another server process on this machine holds it)
            self._busy(rel)
            return
        self.send(F.Welcome(WINDOW))
        report = self.report_factory(self) if self.report_factory else None     # (a pull: None back)
        try:
            if h.push:
                self.role = Receiver(self, self.target, options, report, remote_items=True, root_fd=fd)
            else:
                limits = [x for x in (self.bwlimit, options.bwlimit) if x]
                self.rate_limit = min(limits) if limits else 0.0
                self.role = Sender(self, self.target, options, window=WINDOW, min_parity=self.min_parity,
                                    root_fd=fd)
        except BaseException:
            if self.role is None and fd >= 0:
                os.close(fd)
            raise

    def _relay_exchange(self, collect: bool) -> None:
        """A client that relays: refused unless this server relays and allows
        that device (the same answer either way); else Welcome, and the
        exchange starts (protocol.relay)."""
        from .relay import Exchange
        ends = self.relay(self.client_id, collect) if self.relay is not None else None
        if ends is None:
            self._refuse(E_DENIED, f"no relaying here for device {self.client_id} (this server does not relay, "
                                   "or this device is not allowed to use it)")
            return
        full = self.capacity(self) if self.capacity is not None else None
        if full:
            self._refuse(E_BUSY, full)
            return
        self.target = "relay"
        self.send(F.Welcome(WINDOW))
        self.role = Exchange(self, ends[0], ends[1], client=False)

    def _busy(self, rel: str) -> None:
        self._refuse(E_BUSY, f"another transfer into {self.module.name}/{rel} is running (or into a "
                             "directory above or below it); try again later")

    def _holding(self) -> bool:
        return self.client_id is not None       # (proved, not yet admitted: a push's early listing waits)

    @property
    def relaying(self) -> bool:
        return self.hello is not None and bool(self.hello.flags & F.FLAG_RELAY)

    def next_timer(self) -> float | None:
        if self._lock_wait is not None and not self.finished:
            return self._lock_asked + LOCK_POLL
        return super().next_timer()

    def handle_timer(self, now: float) -> None:
        if self._lock_wait is not None and not self.finished:
            self._lock_asked = now
            _, options, rel = self._lock_wait
            self._guarded(self._admit, options, rel, now)
            return
        super().handle_timer(now)

    def _open_target(self, module: Module, rel: str, create: bool) -> int | None:
        """The directory module/rel, opened beneath the module's own path
        without following a symlink at any component (scan.open_beneath),
        made if ``create`` (a push). The module's path is the operator's and
        is followed; nothing a client or a file in the module names is: a
        symlink on the way is refused as leaving the module, whether it
        points out or not (rsync's daemon refuses the same since 3.4).
        None (refused, the client told why); -1 for a dry-run push into a
        directory that does not exist yet."""
        from ..scan import open_beneath
        shown = f"{module.name}/{rel}" if rel else module.name
        try:
            if create and not os.path.lexists(module.path):
                os.makedirs(module.path, exist_ok=True)     # (the operator's path: made as configured)
            base = os.open(module.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self._refuse(E_NO_MODULE, f"module {module.name!r} is not available: {exc.strerror or exc}")
            return None
        try:
            return open_beneath(base, rel, create=create, mode=0o777)
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.hello.push and not create:
                return -1                       # a dry run: nothing is made
            if exc.errno == errno.ELOOP:
                self._refuse(E_DENIED, f"{shown}: the path leaves the module (a symlink on the way)")
            elif exc.errno == errno.ENOTDIR:
                self._refuse(E_NO_MODULE, f"{shown}: not a directory")
            elif exc.errno == errno.ENOENT:     # before Welcome: the client makes nothing
                self._refuse(E_NO_MODULE, f"{shown}: no such directory")
            else:
                self._refuse(E_DENIED, f"{shown}: {exc.strerror or exc}")
            return None
        finally:
            os.close(base)

    def _refuse(self, code: int, message: str) -> None:
        self.send(F.Error(code, os.fsencode(message)))
        self.error = RefusedError(message)
        self.finished = True


