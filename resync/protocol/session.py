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
import functools
import hashlib
import json
import math
import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import FileError, NoSpaceError, OutputClosed, ResyncError
from . import frames as F
from .frames import ProtocolError
from .shards import MAX_INDEX as MAX_SHARDS
from .shards import PROBE, StripeAssembler, StripeEncoder, parse, stripe_count

AUTH_CONTEXT = b"resync-auth-v1"
# One shard per DATAGRAM frame in a 1,350-byte QUIC packet: short header (1 + 8-byte connection
# ID + packet number, at most 4), AEAD tag 16, frame type and length 3: at most 1,318 bytes of
# datagram, of which the shard header takes 19 (shards.HEADER).
SHARD_SIZE = 1296                # (at QUIC's 1,200-byte minimum: 1,136; see shard_size_for)
MIN_SHARD_SIZE = 64              # the smallest shard a peer may ask to resume with
DEFAULT_K = 128                  # data shards per full stripe (128 x 1,296 B = 162 KiB of content)
MIN_PARITY = 1                   # parity shards per full stripe even on a link that loses nothing
LOSSLESS = 1e-4                  # a loss estimate below this: the link loses nothing
STRIPE_TARGET = 0.005            # chance a stripe needs a repair round that the parity is chosen for
K_CHOICES = tuple(range(DEFAULT_K, 249, 16))     # data shards per stripe a file may be cut into (stripe_k)
K_MARGIN = 0.02                  # stripe_k plans for the loss estimate plus this
LOSS_SETTLED = 1500               # packets after which the loss estimate's own error is left out of parity
K_UNKNOWN = 144                  # k before the loss is measured: its parity meets the target up to 35 % loss
MAX_ACTIVE = 64                  # files being sent at once (open, with stripes in flight)
WINDOW = 8 << 20                 # content bytes in flight before the receiver acknowledges
STREAM_HIGH = 256 << 10          # control bytes buffered before the sender stops listing ahead
REPAIR_DELAY = 0.03              # seconds (at least; 3 RTT on slower links) a quiet file waits for a repair
PROBE_DELAY = 0.1                # seconds (at least; 4 RTT on slower links) before an unacknowledged stripe is probed
CHECKPOINT_INTERVAL = 2.0        # seconds between a receiver's checkpoints (resume after a cut)
CHECKPOINT_BYTES = 64 << 20      # or sooner, once this much content has arrived since the last
QUIET_FACTOR = 8                 # a file is quiet after this many repair delays, even while others flow
REPAIR_LAG = 4                   # a short stripe this many stripes behind a completed one is asked for at once
PLACE_BATCH = 256                # files made durable (one syncfs) and placed together
PACK_FILE = 64 << 10             # files up to this size travel in packs (their contents share stripes)
PACK_BYTES = 256 << 10           # a pack is sealed once its members hold this much (or no Want waits)
MAX_PACKS = 16                   # packs sealed and not yet acknowledged, at most
SMALL_FILE = 1 << 20             # files up to this size are read, not mapped, by the sender
EARLY_BYTES = 8 << 20            # shard bytes a receiver holds for wanted files whose File frame is late
HELLO_LIMIT = (1 << 20) + (1 << 18)   # longest frame a server takes before Hello: a Hello at most
AUTH_LIMIT = 256                 # ... and after it, before Auth (an Auth is 69 bytes)
LOCK_WAIT = 3.0                  # s a push waits for the server to learn whether the run holding its
WORK_SLICE = 0.02                # s of work (frames taken, files started) before the transport may send
#                                  and read again: the two ends work at once instead of in turns
LOCK_POLL = 0.1                  # destination is alive (asked again this often), before "busy"

# Error frame codes and the exit codes they become (README: exit codes).
E_PROTOCOL, E_AUTH, E_NO_MODULE, E_DENIED, E_READ_ONLY, E_BUSY, E_INTERNAL, E_CUT = 1, 2, 3, 4, 5, 6, 7, 8
E_NO_SPACE, E_FILE = 9, 10        # the peer's disk is full (exit 6), or failed to read or write (exit 3)


class PeerNoSpaceError(NoSpaceError):
    """the peer ran out of space: {}"""


class PeerFileError(FileError):
    """the peer could not read or write: {}"""


class RefusedError(ResyncError):
    """refused: {}"""

    exit_code = 13


class BusyError(RefusedError):
    """refused: {}"""

    # Another device's transfer is writing the destination: the client
    # retries (within --retry-for), then gives up with exit 13.


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

    def __post_init__(self):
        self.excludes = list(self.excludes)
        self.bwlimit = int(self.bwlimit or 0)

    @property
    def flags(self) -> int:
        return ((F.FLAG_DELETE if self.delete else 0) | (F.FLAG_CHECKSUM if self.checksum else 0)
                | (F.FLAG_DRY_RUN if self.dry_run else 0) | (F.FLAG_WHOLE_FILE if self.whole_file else 0)
                | (F.FLAG_ITEMIZE if self.itemize else 0))

    @classmethod
    def from_hello(cls, h: F.Hello) -> "Options":
        excludes = [os.fsdecode(p) for p in h.excludes.split(b"\n") if p]
        return cls(bool(h.flags & F.FLAG_DELETE), bool(h.flags & F.FLAG_CHECKSUM), bool(h.flags & F.FLAG_DRY_RUN),
                   bool(h.flags & F.FLAG_WHOLE_FILE), bool(h.flags & F.FLAG_ITEMIZE),
                   None if h.max_delete < 0 else h.max_delete, excludes, h.bwlimit)


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
    RTTs whatever the search finds)."""

    def __init__(self):
        self._reader = F.FrameReader()
        self._out = bytearray()
        self.role = None                 # _Sender or _Receiver once authenticated
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
        self.progress = None             # resync.progress.Progress (-P) or None: queued, partial, done, scanned
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
        for frame in self._reader.frames():
            if self.finished:
                return
            self._frame(frame, now)
            if self.role is not None and time.monotonic() > deadline:
                self._backlog = self._reader.pending > 0
                return

    def receive_datagram(self, data: bytes, now: float) -> None:
        if data[:1] == PROBE:
            return                              # (a path MTU probe's padding: nothing to take)
        self.stats["datagrams_received"] += 1
        self.stats["datagram_bytes_received"] += len(data)
        if self.finished or not isinstance(self.role, _Receiver):
            return
        self._guarded(self.role.shard, parse(data), now)

    def stream_to_send(self) -> bytes:
        if self.role is not None and not self.finished:
            self._guarded(self.role.pump)
        out, self._out = bytes(self._out), bytearray()
        self.stats["control_bytes_sent"] += len(out)
        return out

    def datagrams_to_send(self, now: float, limit: int) -> list[bytes]:
        if self.finished or not isinstance(self.role, _Sender):
            return []
        out = self._guarded(self.role.datagrams, now, limit) or []
        self.stats["datagrams_sent"] += len(out)
        self.stats["datagram_bytes_sent"] += sum(len(d) for d in out)
        return out

    def observe_loss(self, lost: int, sent: int) -> None:
        """The transport saw ``lost`` of ``sent`` datagrams lost (since its
        last report): the sender sizes its parity by it."""
        if isinstance(self.role, _Sender):
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
            if isinstance(self.role, _Receiver) and self.role.finished_here and self.error is None:
                self.finished = True
                return
            from ..errors import ConnectionFailed
            self.fail(ConnectionFailed(why), tell_peer=False)

    # -- for subclasses -------------------------------------------------------------------
    def send(self, frame) -> None:
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
        return isinstance(self.role, _Sender)


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
        self.send(F.Hello(F.VERSION, push, identity.public_key, self.nonce, options.flags,
                          -1 if options.max_delete is None else options.max_delete, self.module, self.path,
                          b"\n".join(os.fsencode(p) for p in options.excludes), options.bwlimit))

    @property
    def sends_content(self) -> bool:
        return self.push

    def _handshake(self, frame, now: float) -> None:
        if isinstance(frame, F.Challenge):
            self.transfer_id = transfer_id(frame.nonce, self.nonce)
            self.salt = signature_salt(frame.nonce, self.nonce)
            msg = auth_message(frame.nonce, self.nonce, self.server_cert_der, self.identity.public_key,
                               self.module, self.path)
            self.send(F.Auth(self.identity.sign(msg)))
        elif isinstance(frame, F.Welcome):
            if self.push:
                self.role = _Sender(self, self.local, self.options, window=frame.window)
            else:
                self.role = _Receiver(self, self.local, self.options, self.report, hold=True)
        else:
            raise ProtocolError(f"{type(frame).__name__} before the handshake ended")


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
                 bwlimit: float = 0, min_parity: int = 1):
        super().__init__()
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
                self.role = _Receiver(self, self.target, options, report, remote_items=True, root_fd=fd)
            else:
                limits = [x for x in (self.bwlimit, options.bwlimit) if x]
                self.rate_limit = min(limits) if limits else 0.0
                self.role = _Sender(self, self.target, options, window=WINDOW, min_parity=self.min_parity,
                                    root_fd=fd)
        except BaseException:
            if self.role is None and fd >= 0:
                os.close(fd)
            raise

    def _busy(self, rel: str) -> None:
        self._refuse(E_BUSY, f"another transfer into {self.module.name}/{rel} is running (or into a "
                             "directory above or below it); try again later")

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


# -- the sender --------------------------------------------------------------------------

class _Outgoing:
    """One file being sent: its content's stripes, what was sent and acknowledged."""

    __slots__ = ("frame", "encoder", "next_stripe", "m", "acked", "repairs", "next_row", "closer", "sent_rows",
                 "in_flight", "bytes_out", "sent_at", "progressed", "fid", "members")

    def __init__(self, frame, encoder: StripeEncoder | None, m: int, closer, members=()):
        self.frame, self.encoder, self.m, self.closer = frame, encoder, m, closer
        self.fid = frame.pack_id if isinstance(frame, F.Pack) else frame.file_id
        self.members = members                  # a pack: its members' file ids
        self.next_stripe = 0
        self.in_flight = 0                      # bytes of its stripes sent and not acknowledged
        self.acked: set[int] = set()
        self.repairs: deque = deque()           # (stripe, indexes) to send
        self.next_row: dict[int, int] = {}      # stripe -> next shard index not yet sent
        self.sent_rows: dict[int, int] = {}     # stripe -> shards sent
        self.bytes_out: dict[int, int] = {}     # stripe -> bytes counted in flight
        self.sent_at: dict[int, float] = {}     # unacknowledged stripe -> when shards of it last went out
        self.progressed = 0                     # bytes of the file shown as done (-P)

    @property
    def done(self) -> bool:
        return self.encoder is None or len(self.acked) == self.encoder.stripes


class _Sender:
    """Lists ``root`` and sends what the receiver asks for.

    Everything below the root is reached from the root's descriptor one
    component at a time without following a symlink (scan.open_rel_dir),
    files are opened with O_NOFOLLOW in their directory's descriptor: a
    directory swapped for a symlink while the tree is listed or sent is
    refused, never followed out of the tree (rsync CVE-2024-12747's kind).
    ``root_fd``: the root already opened (the server opens a module path
    beneath the module); else ``root`` is opened, following a symlink there
    only (the user named it)."""

    def __init__(self, session: Session, root: str, options: Options, window: int, min_parity: int = 1,
                 root_fd: int | None = None):
        from ..erasure.policy import ParityPolicy
        from ..scan import Excludes
        self.s, self.root, self.options = session, root, options
        self.window = max(1 << 20, window)
        self.excludes = Excludes(options.excludes)
        self.dirs: list[str] = []
        self._walk = self._listing()
        self.listed = False
        self.wants: deque = deque()
        self.active: dict[int, _Outgoing] = {}
        self.order: deque = deque()             # file ids in the order their shards go out
        self.in_flight = 0                      # bytes of stripes sent and not acknowledged
        self.k = DEFAULT_K
        self.queued: dict[int, int] = {}        # -P: file id -> the size it was shown with
        self.min_parity = max(MIN_PARITY, min_parity)
        self.policy = ParityPolicy(self.k, mode="target", target=STRIPE_TARGET)
        self.loss_reports = 0
        self.loss_packets = 0                   # packets the loss estimate rests on
        self.sent_files = 0
        self.repair_shards = 0
        self.probes = 0
        self.resumed_bytes = 0                  # content not sent: the receiver kept it from a cut transfer
        self.spill: deque = deque()             # shards made but not yet handed out (over a call's limit)
        self.last_ack = 0.0
        self.tmp = None
        self.root_fd = root_fd
        self._dir_fd: tuple[int, int] | None = None     # (directory index, its descriptor): the last opened
        self.more = False                       # Wants left for the next turn (WORK_SLICE ran out)
        self.pack_buf = bytearray()             # members of the pack being filled (encodings.encode_member)
        self.pack_members: list[int] = []
        self.packs = 0                          # packs sealed so far (the next one's id: PACK_BASE + packs)
        self.packs_active = 0

    # listing
    def _open_dir(self, rel: str) -> int:
        """A new descriptor of root/rel, reached without following symlinks."""
        from ..scan import open_rel_dir
        if self.root_fd is None:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return open_rel_dir(self.root_fd, rel)

    def _dir_of(self, index: int) -> int:
        """The descriptor of listed directory ``index`` (kept while the
        receiver's Wants stay in one directory, as they mostly do)."""
        if self._dir_fd is not None and self._dir_fd[0] == index:
            return self._dir_fd[1]
        self._close_dir()
        fd = self._open_dir(self.dirs[index])
        self._dir_fd = (index, fd)
        return fd

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd[1])
            self._dir_fd = None

    def _listing(self):
        from ..scan import list_dir
        stack = [""]
        while stack:
            rel = stack.pop()
            index = len(self.dirs)
            self.dirs.append(rel)
            try:
                fd = self._open_dir(rel)
            except OSError as exc:              # (ELOOP: swapped for a symlink since its parent was listed)
                yield F.DirFailed(index, os.fsencode(rel), exc.errno or 0, os.fsencode(exc.strerror or str(exc)))
                continue
            try:
                frame, entries = self._list(fd, index, rel, list_dir)
            except OSError as exc:
                frame, entries = F.DirFailed(index, os.fsencode(rel), exc.errno or 0,
                                             os.fsencode(exc.strerror or str(exc))), ()
            finally:
                os.close(fd)
            yield frame
            stack.extend(reversed([os.path.join(rel, e.name) if rel else e.name for e in entries
                                   if e.kind == "d"]))

    def _list(self, fd: int, index: int, rel: str, list_dir):
        """The Dir frame of the directory open as ``fd``, and its entries."""
        entries, _, gone = list_dir(fd, self.excludes, rel, skip_temps=True)
        listed = []
        for e in entries:
            target = b""
            if e.kind == "L":
                try:
                    target = os.readlink(os.fsencode(e.name), dir_fd=fd)
                except OSError:
                    gone.append(e.name)
                    continue
            digest = b""
            if self.options.checksum and e.kind == "f":
                digest = self._hash(fd, e.name)
                if digest is None:
                    gone.append(e.name)
                    continue
            seconds, ns = divmod(e.mtime_ns, 10**9)
            listed.append(F.Listed(os.fsencode(e.name), "fdLDS".index(e.kind) + 1, e.mode, seconds, ns,
                                   e.size if e.kind in "fL" else 0, e.uid, e.gid, e.rdev, target, digest))
        st = os.fstat(fd)
        seconds, ns = divmod(st.st_mtime_ns, 10**9)
        attrs = F.Listed(b"", 2, st.st_mode, seconds, ns, 0, st.st_uid, st.st_gid, 0, b"", b"")
        frame = F.Dir(index, os.fsencode(rel), attrs, tuple(listed), tuple(sorted(os.fsencode(n) for n in gone)))
        return frame, entries

    @staticmethod
    def _hash(dir_fd: int, name: str) -> bytes | None:
        from ..content import hash_fd
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            return bytes.fromhex(hash_fd(fd))
        finally:
            os.close(fd)

    def pump(self) -> None:
        """List ahead while the control stream is not backed up."""
        while not self.listed and self.s.buffered < STREAM_HIGH:
            frame = next(self._walk, None)
            if frame is None:
                self.listed = True
                self.s.send(F.ListEnd())
                if self.s.progress is not None:
                    self.s.progress.scanned()
                break
            self.s.send(frame)
        deadline = time.monotonic() + WORK_SLICE
        self.more = False
        while self.wants and len(self.active) < MAX_ACTIVE and self.in_flight < self.window and self.s.path_settled \
                and self.packs_active < MAX_PACKS:
            self._start(self.wants.popleft())
            if time.monotonic() > deadline:     # (the transport sends what is ready; the timer goes on)
                self.more = bool(self.wants)
                break
        if self.pack_members:
            self._seal()                        # what this turn packed goes now (the receiver starts on it)

    def frame(self, frame, now: float) -> None:
        self.last_ack = now                     # the receiver is alive and talking: it asks for itself
        if isinstance(frame, F.Want):           # (a busy receiver planning directories acknowledged
            if frame.dir_index >= len(self.dirs):   # late; probes then sent 560 kB of 1.2 MB in an update)
                raise ProtocolError(f"Want for directory {frame.dir_index}, which was not listed")
            self.wants.append(frame)
            if self.s.progress is not None:     # -P: the total is known as the receiver asks
                try:
                    size = os.stat(frame.name, dir_fd=self._dir_of(frame.dir_index), follow_symlinks=False).st_size
                except OSError:
                    size = 0
                self.queued[frame.file_id] = size
                self.s.progress.queued(size)
        elif isinstance(frame, F.Ack):
            self.last_ack = now
            out = self.active.get(frame.file_id)
            if out is None:
                return
            for s in frame.stripes:
                if out.encoder is None or s >= out.encoder.stripes:
                    raise ProtocolError(f"Ack of stripe {s} of file {frame.file_id}: no such stripe")
                if s not in out.acked and s < out.next_stripe:
                    out.acked.add(s)
                    self._advance(out, s)
                    n = out.bytes_out.pop(s, 0)
                    out.in_flight -= n
                    self.in_flight -= n
                    out.sent_rows.pop(s, None)
                    out.next_row.pop(s, None)
                    out.sent_at.pop(s, None)
                    out.encoder.forget(s)
            self._retire(out)
        elif isinstance(frame, F.Repair):
            out = self.active.get(frame.file_id)
            if out is None or out.encoder is None:
                return
            for s, need in frame.needs:
                if s >= out.encoder.stripes or not 0 < need <= out.encoder.geometry(s)[0]:
                    raise ProtocolError(f"Repair of stripe {s} of file {frame.file_id}: out of range")
                if s in out.acked or s >= out.next_stripe:
                    continue
                d = out.encoder.geometry(s)[0]
                first = out.next_row[s]
                # with parity for their own loss (a stripe sent before the loss was measured,
                # 44 shards short at 33 %, took four rounds with one spare each time)
                spare = max(1, _parity_for(need, self._planned_loss()))
                rows = list(range(first, min(first + need + spare, MAX_SHARDS)))
                if len(rows) < need:
                    rows = list(range(d))                                     # parity exhausted: the data again
                out.next_row[s] = first + len(rows)
                out.repairs.append((s, rows))
                self.repair_shards += len(rows)
        elif isinstance(frame, F.FileDone):       # (its last stripes' Ack is left out: this says it)
            self.last_ack = now
            out = self.active.get(frame.file_id)
            if out is not None:
                self._retire(out, force=True)
        elif isinstance(frame, F.Done):
            self.s.send(F.Bye())
            try:
                result = json.loads(frame.stats)
            except ValueError:
                raise ProtocolError("Done: statistics are not JSON") from None
            result.update(files_sent=self.sent_files, repair_shards=self.repair_shards, probes=self.probes,
                          resumed_bytes=self.resumed_bytes,
                          parity=self._full_parity(DEFAULT_K),       # (per 128 data shards, as documented)
                          loss_estimate=round(self.policy.loss, 4))
            self.close()
            self.s.finish(result)
        elif isinstance(frame, F.Item) and self.s.__class__ is ClientSession and self.s.report is not None:
            self.s.report.remote(frame)
        else:
            raise ProtocolError(f"{type(frame).__name__} is not for the sender")

    def _parity(self, out: _Outgoing, stripe: int) -> int:
        """Parity shards sent with ``stripe`` of ``out``, from the loss
        estimate as it is when the stripe goes out (the receiver needs no m:
        a shard's index says whether it is data or which parity row): for a
        full stripe the fewest that keep its chance of needing a repair
        round below STRIPE_TARGET, at least MIN_PARITY (or --min-parity);
        for a shortened one (d < k data shards: a small file, a file's tail)
        the same for its d — none on a link that has lost nothing (a small
        file would double), at least one otherwise."""
        k = out.encoder.k
        d = out.encoder.geometry(stripe)[0]
        if d == k:
            return self._full_parity(k)
        if self.policy.loss < LOSSLESS:
            return 0
        return max(1, min(self._full_parity(k), _parity_for(d, self._planned_loss())))

    def _full_parity(self, k: int) -> int:
        """Parity shards for a full stripe of k at the loss estimated now."""
        return min(MAX_SHARDS - k, max(self.min_parity, _parity_for(k, self._planned_loss())))

    def _planned_loss(self) -> float:
        """The loss parity is sized for: the estimate, plus two standard
        errors while it rests on fewer than LOSS_SETTLED packets (a first
        sample of 100 at 33 % loss reads anywhere from 24 to 42 %: the
        stripes sent on a low reading came 16 shards short). No margin on a
        link that has lost nothing."""
        p, n = self.policy.loss, self.loss_packets
        if p < LOSSLESS or n >= LOSS_SETTLED or n == 0:
            return p
        return min(0.5, p + 2 * math.sqrt(p * (1 - p) / n))

    def _file_geometry(self, want: F.Want) -> tuple[int, int]:
        """(data shards per stripe, shard bytes) for the file ``want`` asks
        for: a cut transfer's (so that the stripes the receiver kept are
        skipped) if its shards still fit the path's datagrams; else the k
        with the least parity per data shard at the loss estimated now
        (``stripe_k``), or K_UNKNOWN before any estimate (a single large
        file starts before the first loss sample), and the largest shard
        the path carries now (``Session.shard_size``)."""
        r = want.resume
        if r is not None and 1 <= r.k < MAX_SHARDS and MIN_SHARD_SIZE <= r.shard_size <= self.s.shard_size:
            return r.k, r.shard_size
        if self.loss_reports == 0:              # (the first files: nothing measured yet)
            return K_UNKNOWN, self.s.shard_size
        return stripe_k(self.policy.loss), self.s.shard_size

    def observe_loss(self, lost: int, sent: int) -> None:
        """The transport's count of datagrams lost among those whose fate it
        learnt since its last report: the parity of the next stripes follows
        it. The first report is taken as it is: the moving average from 0
        took ~8 reports (2,000 packets, the first 15 stripes at 20 % loss)
        to come near the loss, and those stripes needed repair rounds."""
        if sent > 0:
            first = self.loss_reports == 0
            if first:
                self.policy.loss = min(lost, sent) / sent
            else:
                self.policy.observe(min(lost, sent), sent)
            self.loss_reports += 1
            self.loss_packets += sent
            if first:
                self._owe_parity()

    def _owe_parity(self) -> None:
        """The stripes sent before the loss was first measured went out with
        the parity of a lossless link (none): send what the measured loss
        asks for now, ahead of new stripes, before the receiver sees them
        short and spends a repair round (the first two stripes of every
        transfer at 20-33 % loss needed one)."""
        if self.policy.loss < LOSSLESS:
            return
        for o in self.active.values():
            if o.encoder is None:
                continue
            for s, row in list(o.next_row.items()):
                if s in o.acked:
                    continue
                d = o.encoder.geometry(s)[0]
                end = min(d + self._parity(o, s), MAX_SHARDS)
                if end > row:
                    o.repairs.append((s, list(range(row, end))))
                    o.next_row[s] = end

    def _retire(self, out: _Outgoing, force: bool = False) -> None:
        if (out.done or force) and self.active.pop(out.fid, None) is not None:
            self.in_flight -= out.in_flight
            out.in_flight = 0
            if out.closer is not None:
                out.closer()
            if out.members:
                self.packs_active -= 1
                for fid in out.members:
                    self._shown_done(fid, 0)
            else:
                self._shown_done(out.fid, out.progressed)

    def _shown_done(self, fid: int, progressed: int) -> None:
        """-P: the file is through (sent, vanished or failed): the rest of the
        size it was queued with."""
        if self.s.progress is not None:
            self.s.progress.done(max(0, self.queued.pop(fid, 0) - progressed))

    def _path(self, want: F.Want) -> str:
        rel = self.dirs[want.dir_index]
        return os.path.join(self.root, os.fsdecode(os.path.join(os.fsencode(rel), want.name) if rel else want.name))

    def _advance(self, out: _Outgoing, stripe: int) -> None:
        """-P: a stripe of ``out`` is through; its share of the file's size."""
        if self.s.progress is not None and not out.members:
            n = progress_share(out.frame, stripe)
            out.progressed += n
            self.s.progress.partial(n)

    def _start(self, want: F.Want) -> None:
        """Open the wanted file and make its content (the file, or a delta
        against the receiver's signature); send its File frame."""
        import numpy as np

        from ..fs import MappedFile, pread_all
        path = self._path(want)
        k, shard_size = self._file_geometry(want)
        m = self._full_parity(k)
        try:
            fd = os.open(want.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_of(want.dir_index))
        except OSError as exc:
            status = F.FILE_VANISHED if isinstance(exc, FileNotFoundError) else F.FILE_ERROR
            self._send_file(F.File(want.file_id, status, False, 0, bytes(32), 0, 0, 0, 0, 0, 0, k, m,
                                   shard_size, os.fsencode(exc.strerror or str(exc))), None, None)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "changed type during the run")
            size = st.st_size
            if size <= PACK_FILE:               # a small file: its content joins a pack
                data = pread_all(fd, size)
                os.close(fd)
                self._pack_member(want, st, data)
                return
            if size <= SMALL_FILE:              # read: a map costs more than it saves for a small file
                data = pread_all(fd, size)
                size, array, closers = len(data), np.frombuffer(data, np.uint8), []
            else:
                mapped = MappedFile(f"/proc/self/fd/{fd}", name=path)
                data, array, closers = mapped.buffer, mapped.array, [mapped.close]
        except (OSError, ResyncError) as exc:
            os.close(fd)
            msg = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._send_file(F.File(want.file_id, F.FILE_ERROR, False, 0, bytes(32), 0, 0, 0, 0, 0, 0, k, m,
                                   shard_size, os.fsencode(msg or "cannot read")), None, None)
            return
        os.close(fd)
        seconds, ns = divmod(st.st_mtime_ns, 10**9)
        try:
            if want.signature and size:
                content, target, content_hash = self._delta(want, array, closers)
                delta = True
            else:
                content, delta = array, False
                target = content_hash = _blake3(data)
        except ResyncError:
            for c in closers:
                c()
            raise
        frame = F.File(want.file_id, F.FILE_OK, delta, int(content.shape[0]), target, st.st_mode, seconds, ns,
                       size, st.st_uid, st.st_gid, k, m, shard_size, b"", content_hash)
        encoder = StripeEncoder(want.file_id, content if content.shape[0] else np.zeros(0, np.uint8), k,
                                shard_size)

        def close():
            for c in closers:
                c()
        out = self._send_file(frame, encoder, close)
        r = want.resume
        if out is not None and r is not None and resumes(r, frame):
            # the receiver kept these stripes of this very content from a cut transfer
            for first, count in r.stripes:
                for stripe in range(first, min(first + count, encoder.stripes)):
                    if stripe not in out.acked:
                        out.acked.add(stripe)
                        self._advance(out, stripe)
                        d, size = encoder.geometry(stripe)
                        self.resumed_bytes += min(d * size, frame.length - stripe * encoder.k * encoder.size)
            self._skip_acked(out)
            self._retire(out)

    def _pack_member(self, want: F.Want, st: os.stat_result, data: bytes) -> None:
        """Add a small file's content to the pack being filled: a wire delta
        against the receiver's signature (made here, on this thread) if that
        is smaller than the file, else the file itself."""
        import numpy as np

        from .encodings import MEMBER_DELTA, Member, delta_to_wire, encode_member, signature_from_wire
        flags, content = 0, data
        if want.signature and data:
            from ..delta import instructions_in_memory
            sig = signature_from_wire(want.signature, self.s.salt)
            wire = delta_to_wire(*instructions_in_memory(sig, np.frombuffer(data, np.uint8)))
            if len(wire) < len(data):
                flags, content = MEMBER_DELTA, wire
        seconds, ns = divmod(st.st_mtime_ns, 10**9)
        encode_member(self.pack_buf, Member(want.file_id, F.FILE_OK, flags, _blake3(data), st.st_mode, seconds, ns,
                                            len(data), st.st_uid, st.st_gid, content))
        self.pack_members.append(want.file_id)
        self.sent_files += 1
        if len(self.pack_buf) >= PACK_BYTES:
            self._seal()

    def _seal(self) -> None:
        """Send the pack being filled: its Pack frame, then its content (the
        members, LZ4-compressed when that is smaller) as one content's
        stripes, acknowledged and repaired like a file's."""
        import lz4.block
        import numpy as np

        from .encodings import put_varint
        raw = bytearray()
        put_varint(raw, len(self.pack_members))
        raw += self.pack_buf
        packed = lz4.block.compress(bytes(raw), store_size=False)
        codec, stored = (1, packed) if len(packed) < len(raw) else (0, bytes(raw))
        pid = F.PACK_BASE + self.packs
        k = K_UNKNOWN if self.loss_reports == 0 else stripe_k(self.policy.loss)
        frame = F.Pack(pid, codec, len(raw), len(stored), k, self._full_parity(k), self.s.shard_size)
        self.s.send(frame)
        out = _Outgoing(frame, StripeEncoder(pid, np.frombuffer(stored, np.uint8), k, frame.shard_size), frame.m,
                        None, self.pack_members)
        self.active[pid] = out
        self.order.append(pid)
        self.packs += 1
        self.packs_active += 1
        self.pack_buf, self.pack_members = bytearray(), []

    def _delta(self, want: F.Want, array, closers):
        """The delta of the file against the receiver's signature, in a scratch file."""
        import tempfile

        from .. import formats
        from ..delta import make_delta
        from ..fs import MappedFile
        from .encodings import signature_from_wire
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix=".resync-tmp-send-")
        sig = signature_from_wire(want.signature, self.s.salt)
        out = os.path.join(self.tmp, f"{want.file_id}.delta")
        make_delta(sig, array, out, durable=False)
        d = MappedFile(out)
        closers.append(d.close)
        closers.append(lambda: os.unlink(out))
        header = formats.unpack_delta(d.buffer, out).header
        return d.array, header.target_hash, _blake3(d.buffer)

    def _send_file(self, frame: F.File, encoder, closer) -> _Outgoing | None:
        self.s.send(frame)
        self.sent_files += 1
        out = _Outgoing(frame, encoder, frame.m, closer)
        if encoder is None or encoder.stripes == 0:
            if closer is not None:
                closer()
            self._shown_done(frame.file_id, 0)
            return None
        self.active[frame.file_id] = out
        self.order.append(frame.file_id)
        return out

    @staticmethod
    def _skip_acked(o: _Outgoing) -> None:
        """Move past stripes acknowledged before they were sent (resumed)."""
        while o.next_stripe < o.encoder.stripes and o.next_stripe in o.acked:
            o.next_stripe += 1

    def datagrams(self, now: float, limit: int) -> list[bytes]:
        """Up to ``limit`` shard datagrams: repairs first, then new stripes
        while fewer than ``window`` bytes of content are unacknowledged
        (shards of a stripe beyond ``limit`` wait for the next call)."""
        out: list[bytes] = []
        while self.spill and len(out) < limit:
            out.append(self.spill.popleft())
        for fid in list(self.order):
            o = self.active.get(fid)
            if o is None:
                self.order.remove(fid)
                continue
            while o.repairs and len(out) < limit:
                s, rows = o.repairs.popleft()
                if s in o.acked:
                    continue
                out += o.encoder.shards(s, rows)
                o.sent_rows[s] = o.sent_rows.get(s, 0) + len(rows)
                o.sent_at[s] = now
        for fid in list(self.order):
            o = self.active.get(fid)
            if o is None:
                continue
            while o.next_stripe < o.encoder.stripes and len(out) < limit and self.in_flight < self.window:
                s = o.next_stripe
                d, size = o.encoder.geometry(s)
                n = d + self._parity(o, s)
                out += o.encoder.shards(s, range(n))
                o.sent_rows[s] = o.next_row[s] = n
                o.sent_at[s] = now
                o.next_stripe += 1
                self._skip_acked(o)
                o.bytes_out[s] = n * size
                o.in_flight += n * size
                self.in_flight += n * size
            if len(out) >= limit or self.in_flight >= self.window:
                break
        if len(out) > limit:
            self.spill.extend(out[limit:])
            del out[limit:]
        return out

    def _probe_delay(self) -> float:
        return max(PROBE_DELAY, 4 * self.s.rtt)

    def next_timer(self) -> float | None:
        """When an unacknowledged stripe is due for a probe (at once if Wants
        wait that the last pump had no time for)."""
        if self.more:
            return 0.0
        first = min((min(o.sent_at.values()) for o in self.active.values() if o.sent_at), default=None)
        if first is None:
            return None
        delay = self._probe_delay()
        if self.policy.loss < LOSSLESS:
            return first + QUIET_FACTOR * delay
        return max(first + delay, min(self.last_ack + delay / 2, first + QUIET_FACTOR * delay))

    def timer(self, now: float) -> None:
        """Tail-loss probe: a stripe sent a probe delay ago and still not
        acknowledged gets one more parity shard. The receiver asks for repairs
        of stripes it has seen shards of; a stripe lost whole (a small file's
        one or two datagrams, the last stripes of a file) it cannot know of —
        the probe makes it known. While the receiver's frames flow (Acks,
        Wants, anything) it is alive and asking for itself: then only a
        stripe unacknowledged for QUIET_FACTOR probe delays is probed; so too
        on a link that has lost nothing (a receiver busy planning a release
        tree's directories was silent for 50 ms at a time, and probes made
        560 kB of an update's 1.2 MB). (A pack's stripes are all announced:
        its receiver asks for them itself.)"""
        delay = self._probe_delay()
        acks_flow = self.last_ack + delay / 2 > now or self.policy.loss < LOSSLESS   # (as next_timer)
        for o in self.active.values():
            for s, t in list(o.sent_at.items()):
                if t + (QUIET_FACTOR * delay if acks_flow else delay) > now or s in o.acked:
                    continue
                d = o.encoder.geometry(s)[0]
                row = o.next_row[s]
                rows = [row] if row < MAX_SHARDS else list(range(d))
                o.next_row[s] = row + 1 if row < MAX_SHARDS else row
                o.repairs.append((s, rows))
                o.sent_at[s] = now
                self.probes += 1

    def abort(self, exc: ResyncError | None = None) -> None:
        self.close()

    def close(self) -> None:
        for o in list(self.active.values()):
            if o.closer is not None:
                o.closer()
        self.active.clear()
        self._close_dir()
        if self.root_fd is not None and self.root_fd >= 0:
            os.close(self.root_fd)
        self.root_fd = -1
        if self.tmp is not None:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


# -- the receiver ------------------------------------------------------------------------

class _Incoming:
    """One wanted file: where it goes, and its content as it arrives."""

    __slots__ = ("path", "rel", "entry", "prev", "code", "frame", "assembler", "fd", "tmp", "started",
                 "last_shard", "next_look", "asked", "signature", "kept", "progressed", "sig_saved", "digest",
                 "index", "retried")

    def __init__(self, path: str, rel: str, entry, prev, code: str, index: int = 0):
        self.path, self.rel, self.entry, self.prev, self.code, self.index = path, rel, entry, prev, code, index
        self.retried = False                   # asked for again whole (its delta did not make the file)
        self.frame: F.File | None = None
        self.assembler: StripeAssembler | None = None
        self.fd = -1
        self.tmp = ""
        self.started = time.monotonic()
        self.last_shard = 0.0
        self.next_look = 0.0                   # when the repair timer next looks at it
        self.asked: dict[int, float] = {}      # stripe -> when a repair was last asked for
        self.signature = b""                   # the Want's signature (saved with a checkpoint of a delta)
        self.kept: dict | None = None          # the checkpoint entry this Want offered to resume
        self.progressed = 0                    # bytes of the file shown as done (-P)
        self.sig_saved = False                 # its signature is in the staging directory (a delta's resume)
        self.digest: str | None = None         # BLAKE3 (hex) of content written in one piece, as written


class _IncomingPack:
    """One pack (small files' contents sharing stripes) as its shards arrive."""

    __slots__ = ("frame", "assembler", "buf", "fd", "kept", "started", "last_shard", "next_look", "asked",
                 "progressed")

    def __init__(self, frame: F.Pack, now: float):
        import numpy as np
        self.frame = frame
        self.buf = np.empty(frame.length, np.uint8)
        self.fd, self.kept, self.progressed = -1, None, 0
        self.started = self.last_shard = now
        self.next_look = now
        self.asked: dict[int, float] = {}

        def sink(off, data):
            self.buf[off:off + len(data)] = data
        self.assembler = StripeAssembler(frame.pack_id, frame.length, frame.k, frame.shard_size, sink)


class _Receiver:
    """Plans ``root`` against the sender's listing and applies what arrives."""

    def __init__(self, session: Session, root: str, options: Options, report=None, remote_items: bool = False,
                 hold: bool = False, root_fd: int | None = None):
        from ..apply import Applier
        from ..content import Options as ContentOptions
        from ..plan import PlanOptions, Planner
        from ..report import Report, RunStats
        from ..scan import Excludes
        self.s, self.root, self.options = session, root, options
        self.remote_items = remote_items
        if report is None:
            report = Report(RunStats(), dry_run=options.dry_run)
        if remote_items:                       # the client (which pushes) prints what happens here
            report = _relay(report, session, options.itemize)
        self.report = report
        self.stats = report.stats
        self.owners = os.geteuid() == 0
        self.apply = Applier(root, report, ContentOptions(hash_files=True), dry_run=options.dry_run,
                             owners=self.owners, workers=0, replace_trees=options.delete,
                             excludes=Excludes(options.excludes))
        if root_fd is None:
            self.apply.open_root()
        else:
            self.apply.adopt_root(root_fd)      # opened beneath the module (the server)
        if hold and not options.dry_run and self.apply.root_fd >= 0:
            self._hold(root)                    # before staging: two runs never take each other's
        self.links: dict[str, bytes] = {}
        self.digests: dict[str, bytes] = {}
        self.plan = Planner(PlanOptions(options.checksum, options.delete, options.max_delete,
                                        Excludes(options.excludes), self.owners),
                            report, lambda path, e: report.entry(path, e, None),
                            lambda path: self.links[path], self._same_content)
        self.kept: dict[str, dict] = {}        # path -> checkpoint entry of a cut transfer's partial file
        # the root as it was: making the staging directory in it changes its mtime
        self.root_before = os.fstat(self.apply.root_fd) if self.apply.root_fd >= 0 else None
        if not options.dry_run:
            journal = self.apply.begin_staging(os.urandom(8).hex(), prefix=RECV_PREFIX, resume=True)
            self.kept = _parse_checkpoint(journal)
        self.resumed_bytes = 0
        self.next_checkpoint: float | None = None        # set by the first shard
        self.since_checkpoint = 0                         # shard bytes taken since the last checkpoint
        self.dirs: dict[int, str] = {}
        self.dir_attrs: list = []              # (path, entry, prev) for the end
        self.root_prev = None
        self.wanted: dict[int, _Incoming] = {}
        self.receiving: dict[int, _Incoming] = {}     # wanted files whose File frame came: content arriving
        self.next_id = 0
        self.listed = False
        self.empty_source = ""                  # why --delete may delete nothing: the source root is empty
        self.to_place: list = []
        self.acks: dict[int, list[int]] = {}
        self.early: dict[int, list] = {}       # wanted file -> shards that came before its File frame
        self.early_bytes = 0
        self.repairs_asked = 0                  # stripes asked for (again each repair delay one stays short)
        self.stripes_repaired = 0               # distinct stripes asked for at least once
        self.stripes_received = 0               # stripes completed in this run
        self.last_datagram = 0.0
        self.corrupt_shards = 0
        self.last_pack = F.PACK_BASE - 1        # the highest pack id announced (a Pack frame) so far
        self.redone = 0                         # files asked for again whole: their delta did not make them
        self.root_attrs = None
        self.finished_here = False
        self.started = time.monotonic()

    def _hold(self, root: str) -> None:
        """An exclusive flock on the destination root for this run (a pull:
        the server holds a push's destination the same way). BusyError if
        another transfer holds it; a file system without locks is not held."""
        import fcntl
        try:
            fcntl.flock(self.apply.root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.apply.close()
            raise BusyError(f"another resync transfer is writing {root}") from None
        except OSError:
            pass

    def _same_content(self, path: str, dst_fd: int, name: str) -> bool:
        from ..content import hash_fd
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_fd)
        try:
            return bytes.fromhex(hash_fd(fd)) == self.digests.get(path)
        finally:
            os.close(fd)

    # frames
    def frame(self, frame, now: float) -> None:
        if isinstance(frame, F.Dir):
            self._dir(frame)
        elif isinstance(frame, F.DirFailed):
            rel = os.fsdecode(frame.rel)
            self.dirs[frame.index] = rel
            exc = OSError(frame.errno, os.fsdecode(frame.message))
            self.report.source_failed(rel + "/", exc)
        elif isinstance(frame, F.ListEnd):
            self.listed = True
            if self.s.progress is not None:
                self.s.progress.scanned()
        elif isinstance(frame, F.File):
            self._file(frame, now)
        elif isinstance(frame, F.Pack):
            self._pack(frame, now)
        elif isinstance(frame, F.Bye):
            self.s.finished = True
        else:
            raise ProtocolError(f"{type(frame).__name__} is not for the receiver")

    def _dir(self, frame: F.Dir) -> None:
        from ..apply import Dir
        from ..scan import Entry, open_rel_dir, stat_dir
        if frame.index in self.dirs or (frame.index and frame.index != max(self.dirs, default=-1) + 1):
            raise ProtocolError(f"Dir {frame.index} out of order")
        rel = os.fsdecode(frame.rel)
        self.dirs[frame.index] = rel
        from ..apply import TEMP_PREFIX
        attrs, listed = frame.attrs, frame.entries
        entries = []
        for e in listed:
            name = os.fsdecode(e.name)
            if name.startswith(TEMP_PREFIX):
                continue                        # resync's own temp names are never taken from a peer
            kind = "fdLDS"[e.kind - 1]
            mode = e.mode
            if stat.S_IFMT(mode) == 0 or "fdLDS"[_kind_of(mode) - 1] != kind:
                raise ProtocolError(f"{rel}/{name}: mode {mode:o} does not match its kind")
            entries.append(Entry(name, mode, e.size, e.seconds * 10**9 + e.nanoseconds, e.uid, e.gid, e.rdev, kind,
                                 mode & 0o7777))
            path = f"{rel}/{name}" if rel else name
            if kind == "L":
                self.links[path] = e.target
            if e.blake3:
                self.digests[path] = e.blake3
        for name in frame.gone:
            self.report.vanished(os.path.join(rel, os.fsdecode(name)) if rel else os.fsdecode(name))
        # this directory in the destination (made when its parent's listing was applied)
        parent = None
        dst = {}
        if self.apply.root_fd >= 0:
            try:
                fd = open_rel_dir(self.apply.root_fd, rel)
                parent = Dir(fd, rel, stat.S_IMODE(os.fstat(fd).st_mode))
                dst, temps = stat_dir(fd, skip_temps=True)
                self.apply.remove_temps(parent, temps)
            except OSError as exc:
                if parent is None and rel and not self.options.dry_run:
                    self.report.error(rel + "/", f"cannot open destination directory: {exc.strerror or exc}")
                    return
        if rel == "":
            if self.options.delete and not entries:    # as local sync (plan.refuse_empty_source)
                self.empty_source = ("the source is empty (or everything in it is excluded); refusing to "
                                     "delete the destination's contents")
            if parent is not None:
                self.root_prev = Entry.from_stat("", self.root_before or os.fstat(parent.fd))
            self.root_attrs = Entry("", attrs.mode, 0, attrs.seconds * 10**9 + attrs.nanoseconds, attrs.uid,
                                    attrs.gid, 0, "d", attrs.mode & 0o7777)
        try:
            self._apply(frame.index, rel, entries, dst, parent)
        finally:
            if parent is not None:
                parent.release()

    def _apply(self, index: int, rel: str, entries, dst, parent) -> None:
        from ..plan import ATTRS, DIRECTORY, TRANSFER
        apply, report = self.apply, self.report
        for d in self.plan.directory(rel, entries, dst, parent.fd if parent is not None else None):
            what, e, prev, path = d[0], d[1], d[2], d[3]
            if what == TRANSFER:
                if self.options.dry_run or parent is None:
                    apply.transfer(None, e, prev, path, d[4], ())
                    continue
                self._want(index, rel, e, prev, path, d[4], parent)
            elif what == ATTRS:
                apply.attributes(parent, e, prev, path)
                report.entry(path, e, None)
            elif what == DIRECTORY:
                if prev is not None and prev.kind != "d":
                    if not apply.make_way(parent, e.name, prev, path):
                        continue
                    prev = None
                if prev is None and not apply.mkdir(parent, e, path):
                    continue
                self.dir_attrs.append((path, e, prev))
                if parent is not None:
                    report.entry(path, e, None)
            else:
                apply.carry_out(parent, d)      # LINK, FIX, SPECIAL

    def _want(self, index: int, rel: str, e, prev, path: str, code: str, parent) -> None:
        """Ask for a file: with this destination's copy's block signature, so
        that only what differs travels, unless it is new or --whole-file."""
        fid = self.next_id
        inc = _Incoming(path, rel, e, prev, code, index)
        if self.s.progress is not None:
            self.s.progress.queued(e.size)
        resume = self._resumable(path, prev, inc)
        if resume is not None:
            self.next_id += 1
            self.wanted[fid] = inc
            self.s.send(F.Want(fid, index, os.fsencode(e.name), inc.signature, resume))
            return
        signature = b""
        if prev is not None and prev.kind == "f" and prev.size and not self.options.whole_file:
            try:
                signature = self._signature(parent.fd, e.name, path)
            except (OSError, ResyncError):
                signature = b""                # unreadable here: the whole file instead
        self.next_id += 1
        inc.signature = signature
        self.wanted[fid] = inc
        self.s.send(F.Want(fid, index, os.fsencode(e.name), signature))

    def _signature(self, dir_fd: int, name: str, path: str) -> bytes:
        """The wire signature (protocol.encodings) of this destination's copy
        of ``name``, keyed with this transfer's salt, its strong hashes as
        long as the file's size needs (encodings.strong_len_for)."""
        import numpy as np

        from ..fs import MappedFile, pread_all
        from ..signature import compute_signature, default_block_len
        from .encodings import signature_to_wire, strong_len_for
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            size = os.fstat(fd).st_size
            if size <= SMALL_FILE:              # read: a map costs more than it saves
                data = np.frombuffer(pread_all(fd, size), np.uint8)
                block = default_block_len(data.shape[0])
                return signature_to_wire(compute_signature(data, block, strong_len_for(data.shape[0], block),
                                                           salt=self.s.salt, threads=1, file_hash=False))
            with MappedFile(f"/proc/self/fd/{fd}", name=path) as m:
                block = default_block_len(m.array.shape[0])
                return signature_to_wire(compute_signature(m.array, block, strong_len_for(m.array.shape[0], block),
                                                           salt=self.s.salt, threads=1, file_hash=False))
        finally:
            os.close(fd)

    def _rewant(self, inc: _Incoming) -> None:
        """Ask for a file again, whole: the delta made from its signature did
        not make the file (a false block match the strong hash let through,
        or the copy changed meanwhile) — rsync's redo pass. Once per file."""
        fid = self.next_id
        self.next_id += 1
        inc.retried, inc.signature, inc.frame, inc.assembler, inc.kept = True, b"", None, None, None
        inc.fd, inc.tmp, inc.digest = -1, "", None
        self.redone += 1
        self.wanted[fid] = inc
        self.s.send(F.Want(fid, inc.index, os.fsencode(inc.entry.name), b""))

    def _resumable(self, path: str, prev, inc: _Incoming) -> F.Resume | None:
        """The Resume to offer for ``path``: what a cut transfer kept of it,
        if that content can still be what the sender will send (for a delta:
        the same basis, asked for with the same signature). The sender
        resumes only if its content has the same BLAKE3."""
        k = self.kept.pop(path, None)
        if k is None:
            return None
        if k["delta"]:
            signature = self.apply.stage_read(k["tmp"] + ".sig")
            if signature is None or prev is None or prev.kind != "f" or [prev.size, prev.mtime_ns] != k["basis"] \
                    or self.options.whole_file or not _signature_parses(signature):
                self._forget(k)
                return None
            inc.signature, inc.sig_saved = signature, True
        try:                                    # held open from here: what is offered cannot go missing
            fd = self.apply.stage_reopen(k["tmp"])
            if os.fstat(fd).st_size != k["length"]:
                os.close(fd)
                raise OSError(0, "not the checkpointed length")
        except OSError:
            self._forget(k)
            inc.signature = b""
            return None
        inc.kept, inc.fd, inc.tmp = k, fd, k["tmp"]
        return F.Resume(bytes.fromhex(k["content"]), k["length"], k["k"], k["shard_size"],
                        tuple(map(tuple, k["stripes"])))

    def _forget(self, k: dict) -> None:
        for name in (k["tmp"], k["tmp"] + ".sig"):
            try:
                os.unlink(name, dir_fd=self.apply.staging_fd)
            except OSError:
                pass

    def _file(self, frame: F.File, now: float) -> None:
        inc = self.wanted.get(frame.file_id)
        if inc is None or inc.frame is not None:
            raise ProtocolError(f"File {frame.file_id} was not asked for")
        inc.frame = frame
        early = self.early.pop(frame.file_id, ())
        self.early_bytes -= sum(len(sh[3]) for sh in early)
        self._open(inc, frame, now)
        for sh in early:
            if frame.file_id not in self.receiving:
                break                           # complete, or dropped
            self.shard(sh, now)

    def _open(self, inc: _Incoming, frame: F.File, now: float) -> None:
        """Make ready for ``frame``'s content: a temp file (or the kept one of
        a cut transfer) and its stripe assembler."""
        if frame.status == F.FILE_VANISHED:
            self.report.vanished(inc.path)
            self._drop(frame.file_id, keep_old=True)
            return
        if frame.status == F.FILE_ERROR:
            self.report.error(inc.path, os.fsdecode(frame.message))
            self._drop(frame.file_id, keep_old=True)
            return
        if frame.delta and (inc.prev is None or inc.prev.kind != "f"):
            raise ProtocolError(f"File {frame.file_id}: a delta for a file without a basis")
        if stat.S_IFMT(frame.mode) != stat.S_IFREG:
            raise ProtocolError(f"File {frame.file_id}: not a regular file's mode")
        k, inc.kept = inc.kept, None
        if k is not None and not resumes(_resume_of(k), frame):
            os.close(inc.fd)                    # the content changed since: the sender starts over too
            inc.fd = -1
            self._forget(k)
            k = None
        if k is None:
            inc.fd, inc.tmp = self.apply.stage_open()
        inc.last_shard = now
        inc.next_look = now + self._delay()
        from ..fs import pwrite_all
        fd = inc.fd
        if stripe_count(frame.length, frame.k, frame.shard_size) == 1 and not frame.delta and k is None:
            def sink(off, data):                # a small file: one write, hashed as written
                pwrite_all(fd, data, off)
                inc.digest = _blake3(data).hex()
        else:
            if frame.length:                    # (stripes land in any order; a checkpoint keeps the length)
                os.ftruncate(fd, frame.length)

            def sink(off, data):
                pwrite_all(fd, data, off)
        inc.assembler = StripeAssembler(frame.file_id, frame.length, frame.k, frame.shard_size, sink)
        if k is not None:
            done = [s for first, count in k["stripes"] for s in range(first, first + count)]
            self.resumed_bytes += inc.assembler.mark_done(done)
            for s in done:
                self._advance(inc, s)
        self.receiving[frame.file_id] = inc
        if inc.assembler.complete:
            self._complete(frame.file_id, now)

    def shard(self, shard, now: float) -> None:
        if shard is None:
            self.corrupt_shards += 1            # dropped: counted as lost, parity makes up for it
            return
        fid, stripe, index, payload = shard
        inc = self.wanted.get(fid)
        if inc is None:
            if fid > self.last_pack and self.early_bytes + len(payload) <= EARLY_BYTES:
                self.early.setdefault(fid, []).append(shard)    # a pack announced later (its Pack frame
                self.early_bytes += len(payload)                # comes on the stream, behind datagrams)
            return                              # late or duplicate shards of a finished file
        if inc.assembler is None:
            # Before its File frame: QUIC sends queued datagrams ahead of stream data,
            # and a lost stream packet is resent later. Held (up to EARLY_BYTES in all).
            if inc.frame is None and self.early_bytes + len(payload) <= EARLY_BYTES:
                self.early.setdefault(fid, []).append(shard)
                self.early_bytes += len(payload)
            return
        inc.last_shard = self.last_datagram = now
        inc.next_look = now + self._delay()
        if self.next_checkpoint is None:
            self.next_checkpoint = now + CHECKPOINT_INTERVAL
        self.since_checkpoint += len(payload)
        if self.since_checkpoint >= CHECKPOINT_BYTES and self.next_checkpoint > now:
            self.next_checkpoint = now          # a fast link: what a kill loses stays bounded
        try:
            stripe_done = inc.assembler.add(stripe, index, payload)
        except OSError as exc:                  # writing the stripe failed: the run ends (a full disk:
            from ..fs import os_error            # exit 6), nothing of it placed, staging removed
            raise os_error(inc.path, exc) from None
        if stripe_done:
            self.stripes_received += 1
            self.acks.setdefault(fid, []).append(stripe)
            self._advance(inc, stripe)
            inc.asked.pop(stripe, None)
            if inc.assembler.complete:
                self._complete(fid, now)
            elif stripe >= REPAIR_LAG:
                self._ask(fid, inc, inc.assembler.lagging(stripe - REPAIR_LAG), now)

    def _ask(self, fid: int, inc: _Incoming, short, now: float) -> None:
        """Ask for the shards ``short`` stripes still need, each stripe at most
        once per repair delay."""
        delay = self._delay()
        needs = [(s, n) for s, n in short if now - inc.asked.get(s, -1e9) >= delay]
        if needs:
            for s, _ in needs:
                if s not in inc.asked:
                    self.stripes_repaired += 1
                inc.asked[s] = now
            self.repairs_asked += len(needs)
            for lo in range(0, len(needs), 4096):
                self.s.send(F.Repair(fid, tuple(needs[lo:lo + 4096])))

    def _pack(self, frame: F.Pack, now: float) -> None:
        """A pack is announced: its content's shards follow (or came early)."""
        if frame.pack_id != self.last_pack + 1:
            raise ProtocolError(f"Pack {frame.pack_id} out of order")
        self.last_pack = frame.pack_id
        p = _IncomingPack(frame, now)
        p.next_look = now + self._delay()
        self.wanted[frame.pack_id] = p
        self.receiving[frame.pack_id] = p
        early = self.early.pop(frame.pack_id, ())
        self.early_bytes -= sum(len(sh[3]) for sh in early)
        for sh in early:
            if frame.pack_id not in self.receiving:
                break
            self.shard(sh, now)

    def _complete_pack(self, pid: int, now: float) -> None:
        """A pack's content is in: each member file is rebuilt (a delta
        applied to this destination's copy), checked and staged."""
        import lz4.block

        from .encodings import decode_members
        p = self.wanted.pop(pid)
        self.receiving.pop(pid, None)
        self.acks.pop(pid, None)
        self.s.send(F.FileDone(pid, True, b""))  # (acknowledges every stripe of it)
        f = p.frame
        raw = p.buf.tobytes()
        if f.codec == 1:
            try:
                raw = lz4.block.decompress(raw, uncompressed_size=f.raw_length)
            except lz4.block.LZ4BlockError:
                raise ProtocolError(f"Pack {pid}: corrupt content (LZ4)") from None
        if len(raw) != f.raw_length:
            raise ProtocolError(f"Pack {pid}: content of the wrong size")
        dirs: dict = {}                         # rel -> apply.Dir (or None: cannot be opened)
        try:
            for m in decode_members(raw):
                self._member(m, dirs)
        finally:
            for d in dirs.values():
                if d is not None:
                    d.release()
        if len(self.to_place) >= PLACE_BATCH:
            self._place()

    def _dir_handle(self, rel: str, dirs: dict):
        """The destination directory ``rel`` (an apply.Dir, reached from the
        root without following symlinks), or None if it cannot be opened."""
        from ..apply import Dir
        from ..scan import open_rel_dir
        if rel not in dirs:
            try:
                fd = open_rel_dir(self.apply.root_fd, rel)
                dirs[rel] = Dir(fd, rel, stat.S_IMODE(os.fstat(fd).st_mode))
            except OSError as exc:
                self.report.error(rel + "/", exc.strerror or str(exc))
                dirs[rel] = None
        return dirs[rel]

    def _member(self, m, dirs: dict) -> None:
        """One file of a pack: rebuilt in memory, checked, staged beside the
        file it replaces (no thread, no fsync: the batch is made durable
        with one syncfs when placed)."""
        from ..fs import NO_SPACE, os_error
        inc = self.wanted.get(m.file_id)
        if not isinstance(inc, _Incoming) or inc.frame is not None:
            raise ProtocolError(f"pack member {m.file_id} was not asked for")
        del self.wanted[m.file_id]
        self._finished(inc)
        if m.status != F.FILE_OK:
            if m.status == F.FILE_VANISHED:
                self.report.vanished(inc.path)
            else:
                self.report.error(inc.path, os.fsdecode(m.message))
            self._keep_old(inc)
            return
        if stat.S_IFMT(m.mode) != stat.S_IFREG:
            raise ProtocolError(f"pack member {m.file_id}: not a regular file's mode")
        if m.delta:
            if inc.prev is None or inc.prev.kind != "f":
                raise ProtocolError(f"pack member {m.file_id}: a delta for a file without a basis")
            data, literal = self._rebuild(inc, m, dirs)
        else:
            if len(m.content) != m.size:
                raise ProtocolError(f"pack member {m.file_id}: content is not its size")
            data, literal = m.content, m.size
        digest = _blake3(data) if data is not None else None
        if digest != m.blake3:
            if m.delta and not inc.retried:
                self._rewant(inc)
                return
            self.report.error(inc.path, "content does not match its BLAKE3; not applied")
            self._keep_old(inc)
            return
        attrs = (m.mode, m.seconds * 10**9 + m.nanoseconds, m.uid, m.gid)
        parent = self._dir_handle(inc.rel, dirs)
        if parent is None:
            self._keep_old(inc)
            return
        try:
            staged = self.apply.stage_data(inc.path, data, digest.hex(), attrs, "new" if inc.prev is None else
                                           "update", literal, m.size - literal, parent)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise os_error(inc.path, exc) from None     # a full disk ends the run, not one file
            self.report.error(inc.path, exc.strerror or str(exc))
            self._keep_old(inc)
            return
        self.to_place.append((staged, inc))

    def _rebuild(self, inc: _Incoming, m, dirs: dict):
        """(the file ``m``'s wire delta makes from this destination's copy,
        literal bytes), or (None, 0) if the copy cannot be read as a regular
        file of the size the delta was made against."""
        import numpy as np

        from ..fs import pread_all
        from ..patch import assemble_in_memory
        from .encodings import delta_from_wire
        d = self._dir_handle(inc.rel, dirs)
        if d is None:
            return None, 0
        try:
            fd = os.open(inc.entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
            try:
                st = os.fstat(fd)
                basis = pread_all(fd, st.st_size) if stat.S_ISREG(st.st_mode) else None
            finally:
                os.close(fd)
        except OSError:
            return None, 0
        if basis is None:
            return None, 0
        kinds, sources, lengths, literals = delta_from_wire(m.content, len(basis), m.size)
        out = assemble_in_memory(np.frombuffer(basis, np.uint8), kinds, sources, lengths, literals, m.size)
        return out, len(literals)

    def _advance(self, inc: _Incoming, stripe: int) -> None:
        """-P: a stripe of ``inc`` is in; its share of the file's size."""
        if self.s.progress is not None and isinstance(inc, _Incoming) and inc.frame is not None:
            n = progress_share(inc.frame, stripe)
            inc.progressed += n
            self.s.progress.partial(n)

    def _finished(self, inc: _Incoming) -> None:
        if self.s.progress is not None and isinstance(inc, _Incoming):
            self.s.progress.done(max(0, inc.entry.size - inc.progressed))

    def _complete(self, fid: int, now: float) -> None:
        """All of a file's content is in: check it (a delta is applied to
        the old copy first) and keep it for the next placing."""
        from ..content import ContentError
        if fid >= F.PACK_BASE:
            self._complete_pack(fid, now)
            return
        inc = self.wanted.pop(fid)
        self.receiving.pop(fid, None)
        self.acks.pop(fid, None)                # its FileDone acknowledges the stripes not yet acknowledged
        self._finished(inc)
        f = inc.frame
        attrs = (f.mode, f.seconds * 10**9 + f.nanoseconds, f.uid, f.gid)
        action = "new" if inc.prev is None else "update"
        try:
            if f.delta:
                spec = ("delta-file", inc.fd, self.apply.root_fd, inc.rel, inc.entry.name, attrs, inc.path)
                try:
                    staged = self.apply.stage(inc.path, spec, f.blake3, action)
                except BaseException:
                    self.apply.stage_drop(inc.fd, inc.tmp)
                    raise
                os.close(inc.fd)                # the delta stays until the file is placed: a kill
                inc.fd = -1                     # before that resumes it from the last checkpoint
            else:
                staged = self.apply.stage_finish(inc.path, inc.fd, inc.tmp, f.blake3, attrs, action, f.length, 0,
                                                 time.monotonic() - inc.started, inc.digest)
        except (ContentError, OSError, ResyncError) as exc:
            from ..fs import NO_SPACE, os_error
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise os_error(inc.path, exc) from None     # a full disk ends the run, not one file
            if isinstance(exc, NoSpaceError):
                raise
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.s.send(F.FileDone(fid, False, os.fsencode(msg)))
            if f.delta and not inc.retried and isinstance(exc, (ContentError, ResyncError)):
                self._rewant(inc)               # the delta did not make the file: whole, once
                return
            self.report.error(inc.path, msg)
            self._keep_old(inc)
            return
        self.s.send(F.FileDone(fid, True, b""))
        if f.delta:
            staged.result.literal = f.length
            staged.result.matched = max(0, staged.result.size - f.length)
        self.to_place.append((staged, inc))
        if len(self.to_place) >= PLACE_BATCH:
            self._place()

    def _drop(self, fid: int, keep_old: bool) -> None:
        inc = self.wanted.pop(fid, None)
        self.receiving.pop(fid, None)
        if inc is None:
            return
        self._finished(inc)
        if inc.fd >= 0:
            self.apply.stage_drop(inc.fd, inc.tmp)
        if keep_old:
            self._keep_old(inc)

    def _keep_old(self, inc: _Incoming) -> None:
        if inc.prev is not None and inc.prev.kind != "d":
            self.report.entry(inc.path, inc.prev, None)

    def _place(self) -> None:
        """Make the completed files durable together, then rename them into place."""
        from ..apply import Dir
        from ..scan import open_rel_dir
        if not self.to_place:
            return
        batch, self.to_place = self.to_place, []
        self.apply.make_staged_durable()
        handles: dict[str, Dir] = {}
        try:
            for staged, inc in batch:
                if inc.frame is not None and inc.frame.delta:
                    self.apply.stage_drop(-1, inc.tmp)
                parent = handles.get(inc.rel) or staged.parent
                if parent is None:
                    try:
                        fd = open_rel_dir(self.apply.root_fd, inc.rel)
                    except OSError as exc:
                        self.report.error(inc.path, exc.strerror or str(exc))
                        continue
                    parent = handles[inc.rel] = Dir(fd, inc.rel, stat.S_IMODE(os.fstat(fd).st_mode))
                try:
                    self.apply.place(staged, parent, inc.entry, inc.prev, inc.path, inc.code)
                except OSError as exc:
                    self.report.error(inc.path, exc.strerror or str(exc))
                    self._keep_old(inc)
                    continue
                self.report.entry(inc.path, staged.result.entry, staged.result.blake3)
        finally:
            for h in handles.values():
                h.release()
            self.apply.sync_dirs()

    def pump(self) -> None:
        for fid, stripes in self.acks.items():
            for lo in range(0, len(stripes), 4096):
                self.s.send(F.Ack(fid, tuple(stripes[lo:lo + 4096])))
        self.acks.clear()
        if self.listed and not self.wanted and not self.finished_here:
            self._end()

    def _end(self) -> None:
        """Everything listed has been dealt with: place the last files,
        delete (if allowed), set the directories' attributes, report."""
        self.finished_here = True
        self._place()
        apply, plan = self.apply, self.plan
        apply.keep(plan.extras)                 # what stays though the source lacks it: in the manifest
        if self.empty_source:                   # as local sync: nothing deleted, the root left as it was
            self.stats.deletion_refused = self.empty_source
            apply.keep(plan.deletions)
            self.root_attrs = self.root_prev
        elif plan.deletions:
            count = 0
            if not self.stats.errors:
                for rel, e in plan.deletions:
                    count += 1 + (apply.count_tree(rel, e.name) if e.kind == "d" and apply.root_fd >= 0 else 0)
            refused = plan.deletion_refusal(count)
            if refused:
                self.stats.deletion_refused = refused
                apply.keep(plan.deletions)
            else:
                apply.delete(plan.deletions, apply.count_tree)
        apply.end_staging()
        dirs = list(self.dir_attrs)
        if self.root_attrs is not None:
            dirs.insert(0, ("", self.root_attrs, self.root_prev))
        apply.finish_dirs(dirs)
        apply.close()
        self.stats.duration = time.monotonic() - self.started
        result = self.stats.as_dict()
        result["repairs_asked"] = self.repairs_asked
        result["stripes"] = self.stripes_received
        result["stripes_repaired"] = self.stripes_repaired
        result["corrupt_shards"] = self.corrupt_shards
        result["resumed_bytes"] = self.resumed_bytes
        result["redone"] = self.redone
        self.result = result
        self.s.send(F.Done(json.dumps(result).encode()))
        self.s.result = result                # finished when the sender's Bye arrives

    def _delay(self) -> float:
        return max(REPAIR_DELAY, 3 * self.s.rtt)

    def next_timer(self) -> float | None:
        """When a file's content may need a repair: a delay after its last
        shard (or its last check)."""
        first = min((inc.next_look for inc in self.receiving.values()), default=None)
        if first is not None and self.next_checkpoint is not None:
            first = min(first, self.next_checkpoint)
        return first

    def timer(self, now: float) -> None:
        """Ask for what a quiet file still lacks (stripes overtaken by later
        ones are asked for as soon as that happens, in ``shard``). A file is
        quiet when no shard of it came for the repair delay and none of any
        file for half of it — after a stall of this process, the timer fires
        before the shards waiting in the socket are read — or when none of it
        came for QUIET_FACTOR delays while others flow."""
        if self.next_checkpoint is not None and now >= self.next_checkpoint:
            self.next_checkpoint = now + CHECKPOINT_INTERVAL
            try:
                self._checkpoint()
            except OSError:                     # a full disk or I/O error: the transfer goes on without
                self.next_checkpoint = float("inf")     # checkpoints (placing will report what fails)
        delay = self._delay()
        link_quiet = self.last_datagram + delay / 2 <= now
        for fid, inc in self.receiving.items():
            a = inc.assembler
            if inc.next_look > now:
                continue
            if not link_quiet and inc.last_shard + QUIET_FACTOR * delay > now:
                inc.next_look = now + delay / 2
                continue
            inc.next_look = now + delay         # checked: the next look is a delay away
            top = a.highest_seen()              # (beyond it: not sent yet, or lost whole: the sender probes)
            if isinstance(inc, _IncomingPack):
                top = a.stripes - 1             # (announced whole, and sent together: lost whole is asked for)
            self._ask(fid, inc, [(s, n) for s, n in a.short() if s <= top], now)

    def abort(self, exc: ResyncError | None = None) -> None:
        """The transfer failed. Cut off (the connection lost or silent, the
        server stopping): what arrived is checkpointed for the next run to
        resume, the staging directory kept. Otherwise everything staged is
        removed."""
        from ..errors import ConnectionFailed, TimedOut
        resumable = isinstance(exc, (ConnectionFailed, TimedOut)) and not self.options.dry_run
        if resumable:
            try:
                self._checkpoint()
            except (OSError, ResyncError):
                resumable = False
        for fid in list(self.wanted):
            if resumable:
                inc = self.wanted.pop(fid)
                if inc.fd >= 0:
                    os.close(inc.fd)
            else:
                self._drop(fid, keep_old=False)
        self.receiving.clear()
        if resumable:
            self.apply.keep_staging()
            self.apply.close_up()
        else:
            self.apply.abort()
        self.apply.close()

    def _checkpoint(self) -> None:
        """Place the files completed so far, make what has arrived of the
        others durable, and record it (stripes held, the content's BLAKE3)
        in the staging directory: a cut transfer resumes from here."""
        self.since_checkpoint = 0
        if self.options.dry_run or self.apply.root_fd < 0:
            return
        self._place()
        entries = [k for k in self.kept.values()]            # not reached again yet: still kept
        entries += [inc.kept for inc in self.wanted.values()   # offered again, its File not here yet
                    if inc.kept is not None and inc.frame is None]
        for inc in self.receiving.values():
            a, f = inc.assembler, inc.frame
            if a is None or inc.fd < 0 or not a.done or a.complete:
                continue
            os.fdatasync(inc.fd)
            if f.delta and not inc.sig_saved:              # once, whole, with its salt: the checkpoint names it
                from .encodings import signature_from_wire, signature_to_wire
                self.apply.stage_write(inc.tmp + ".sig.tmp", signature_to_wire(
                    signature_from_wire(inc.signature, self.s.salt), with_salt=True))
                os.rename(inc.tmp + ".sig.tmp", inc.tmp + ".sig", src_dir_fd=self.apply.staging_fd,
                          dst_dir_fd=self.apply.staging_fd)
                inc.sig_saved = True
            entries.append({"path": os.fsencode(inc.path).hex(), "tmp": inc.tmp, "content": f.content.hex(),
                            "length": f.length, "delta": f.delta, "k": f.k, "shard_size": f.shard_size,
                            "basis": [inc.prev.size, inc.prev.mtime_ns] if f.delta else None,
                            "stripes": _ranges(a.done)})
        self.apply.stage_checkpoint(json.dumps({"version": 1, "files": entries}).encode())


RECV_PREFIX = ".resync-tmp-recv-"       # the network receiver's staging directories (apply.TEMP_PREFIX)


def _ranges(stripes) -> list[list[int]]:
    """Sorted stripe numbers as [first, count] runs."""
    out: list[list[int]] = []
    for s in sorted(stripes):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return out


def progress_share(frame: F.File, stripe: int) -> int:
    """The bytes of the file ``frame`` describes that ``stripe`` of its
    content stands for in a progress display (a delta's stripes scaled to the
    file's size)."""
    if not frame.length:
        return 0
    lo = stripe * frame.k * frame.shard_size
    n = max(0, min(frame.k * frame.shard_size, frame.length - lo))
    return n if not frame.delta else n * frame.size // frame.length


def resumes(r: F.Resume, frame: F.File) -> bool:
    """Whether the sender of ``frame`` skips the stripes ``r`` offers — the
    one rule both ends apply: the very content, cut into the same stripes."""
    return (r.content == frame.content and r.length == frame.length and r.k == frame.k
            and r.shard_size == frame.shard_size)


def _resume_of(k: dict) -> F.Resume:
    return F.Resume(bytes.fromhex(k["content"]), k["length"], k["k"], k["shard_size"], ())


def _parse_checkpoint(journal: bytes | None) -> dict[str, dict]:
    """path -> entry of a receiver's checkpoint (see _Receiver._checkpoint);
    an unreadable one is no checkpoint (the transfer starts over)."""
    if not journal:
        return {}
    try:
        doc = json.loads(journal)
        files = doc["files"] if isinstance(doc, dict) and doc.get("version") == 1 else []
    except (ValueError, KeyError, TypeError):
        return {}
    out, tmps = {}, set()
    for k in files if isinstance(files, list) else []:
        entry = _checkpoint_entry(k)
        if entry is not None and entry["tmp"] not in tmps:
            tmps.add(entry["tmp"])
            out[os.fsdecode(bytes.fromhex(entry["path"]))] = entry
    return out


def _signature_parses(data: bytes) -> bool:
    from .encodings import signature_from_wire
    try:
        signature_from_wire(data, b"")
        return True
    except Exception:                           # anything unreadable: no resume, the delta starts over
        return False


def _whole(x, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _checkpoint_entry(k) -> dict | None:
    """One checkpoint entry checked field by field (the file is on disk in
    the destination: anything malformed is ignored, never trusted)."""
    from ..apply import TEMP_PREFIX
    try:
        path = os.fsdecode(bytes.fromhex(k["path"]))
        content = bytes.fromhex(k["content"])
        tmp, stripes, basis = k["tmp"], k["stripes"], k.get("basis")
        if not (isinstance(tmp, str) and tmp.startswith(TEMP_PREFIX) and "/" not in tmp and "\0" not in tmp
                and len(tmp) < 128 and "\0" not in path and len(content) == 32
                and _whole(k["length"], 0, 1 << 62) and isinstance(k["delta"], bool)
                and _whole(k["k"], 1, 255) and _whole(k["shard_size"], 64, 65536)
                and isinstance(stripes, list) and len(stripes) <= 1 << 20):
            return None
        if k["delta"] and not (isinstance(basis, list) and len(basis) == 2 and all(_whole(x, 0, 1 << 126)
                                                                                 for x in basis)):
            return None
        total = -(-k["length"] // (k["k"] * k["shard_size"]))
        ranges, end = [], 0
        for r in stripes:
            if not (isinstance(r, list) and len(r) == 2 and _whole(r[0], end, total) and _whole(r[1], 1, total)
                    and r[0] + r[1] <= total):
                return None                     # sorted, disjoint, within the content
            ranges.append([r[0], r[1]])
            end = r[0] + r[1]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"path": k["path"], "tmp": tmp, "content": content.hex(), "length": k["length"], "delta": k["delta"],
            "k": k["k"], "shard_size": k["shard_size"], "basis": basis if k["delta"] else None,
            "stripes": ranges}


def stripe_k(loss: float) -> int:
    """Data shards per stripe for a file started at loss estimate ``loss``:
    of K_CHOICES, the k whose parity for STRIPE_TARGET at ``loss`` plus
    K_MARGIN (the loss may rise while the file is sent) is the least per
    data shard, within k + m <= 256. Larger stripes need relatively less
    parity (the binomial tail narrows): at 20 % loss k = 128 needs m = 50
    (28 % of what is sent is parity), k = 176 needs 64 (27 %); at 33 %,
    128 + 90 against 144 + 99. Without loss, DEFAULT_K."""
    return _stripe_k_cached(math.ceil(loss * 100 - 1e-9))


@functools.lru_cache(maxsize=128)
def _stripe_k_cached(percent: int) -> int:
    from ..erasure.policy import failure_probability
    if percent <= 0:
        return DEFAULT_K
    loss = min(percent / 100 + K_MARGIN, 0.5)
    best, best_share = DEFAULT_K, None
    for k in K_CHOICES:
        m = _parity_cached(k, round(loss * 1000), STRIPE_TARGET)
        if failure_probability(k, m, loss) >= STRIPE_TARGET:
            break                               # no m within 256 shards is enough: larger k neither
        share = m / k
        if best_share is None or share < best_share - 1e-9:
            best, best_share = k, share
    return best


def _parity_for(d: int, loss: float) -> int:
    """parity_for_target(d, loss, STRIPE_TARGET), the loss rounded up to the
    next 0.1 % so that the answer can be kept (working it out takes
    milliseconds at d = 128)."""
    return _parity_cached(d, math.ceil(loss * 1000 - 1e-9), STRIPE_TARGET)


@functools.lru_cache(maxsize=4096)
def _parity_cached(d: int, permille: int, target: float) -> int:
    from ..erasure.policy import parity_for_target
    return parity_for_target(d, permille / 1000, target) if permille > 0 else 0


def _blake3(buffer) -> bytes:
    import blake3
    return blake3.blake3(buffer, max_threads=blake3.blake3.AUTO if len(buffer) > 1 << 24 else 1).digest()


def _kind_of(mode: int) -> int:
    fmt = stat.S_IFMT(mode)
    return {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 3, stat.S_IFCHR: 4, stat.S_IFBLK: 4}.get(fmt, 5)


def _relay(report, session: Session, itemize: bool):
    """``report``, its itemized lines (with ``itemize``) and errors also sent
    to the client: in a push the client prints what happens at the
    destination, as rsync does."""
    original_item, original_error = report.item, report._error

    def item(line: str) -> None:
        original_item(line)
        if itemize:
            session.send(F.Item(F.ITEM_LINE, os.fsencode(line)))

    def error(message: str) -> None:
        original_error(message)
        kind = F.ITEM_VANISHED if message.startswith("file has vanished: ") else F.ITEM_ERROR
        session.send(F.Item(kind, os.fsencode(message)))
    report.item = item
    report._error = error
    return report
