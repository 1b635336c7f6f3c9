"""``resync serve``: modules offered over QUIC, one protocol session per
connection, several clients at once, one-line logs on stderr.

Two transfers into the same destination directory never interleave: a push
takes an exclusive flock on the destination directory for its duration, and a
second one is refused as busy (exit 13 at the client, which may retry).
SIGTERM and SIGINT stop the server: no new connection is accepted, transfers
in flight are stopped and checkpointed (nothing half applied; their clients
retry and resume what had arrived), and it exits 0.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import signal
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConnectionFailed, ResyncError
from ..protocol.session import ServerSession
from ..protocol.frames import FLAG_DRY_RUN
from . import warm_up
from .api import Control
from .link import PacketBatch, SessionLink, configuration
from .tcp import HANDSHAKE_TIMEOUT as TCP_HANDSHAKE_TIMEOUT
from .tcp import StreamLink, tls_context
from .workers import attach
from .reset import CID_LENGTH, StatelessReset


# What a peer can make the server hold before it has proved its key (docs/protocol.md, "Security"):
MAX_CONNECTIONS = 512             # connections at once; more are refused at once (CONNECTION_REFUSED)
MAX_UNPROVEN = 32                 # ... of which still without the client's proof (then the oldest is let go)
MAX_UNPROVEN_PER_HOST = 8         # ... and from one address
PROOF_DEADLINE = 20.0             # s from a connection's first packet to the client's proof (Auth)
PREAUTH_BYTES = (1 << 20) + (1 << 19)   # UDP bytes taken from a connection before its proof (a Hello fits)
REFUSAL_LOG_INTERVAL = 10.0       # s between log lines about connections refused at the caps
RELAY_MAINTENANCE = 60.0          # s between a relay's maintenance cycles (expired envelopes removed)
PROBE_WAIT = 1.0                  # s (or 4 RTT) a PING may take to be acknowledged by a live connection
MERGE_AGAIN = 2.0                 # s between looks at a history merge under way, when another was asked for


def log(message: str) -> None:
    from ..cli.options import printable
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write(printable(f"{stamp} resync serve: {message}") + "\n")
    sys.stderr.flush()


class _Locks:
    """Destination directories being written, each held by an flock (so
    that two servers on one machine exclude each other too) and by the
    session writing it.

    A push excludes every other push into the same directory and into any
    directory above or below it (a ``push --delete`` into m/x would delete
    m/x/sub with the staging of a push into it). Directories are keyed by
    the module's real path joined with the path the client named, which the
    server opened beneath the module without following a symlink: two keys
    name nested directories exactly when one is a prefix of the other.

    A new push from the device that holds the very same destination is
    refused as busy while the old one's connection is alive (two runs of a
    cron job overlapping: the newer waits, retrying, for the older to end).
    To find out, the old connection is PINGed while the newcomer waits; one
    that does not acknowledge within PROBE_WAIT (a client killed and run
    again, its connection not timed out yet) is superseded — stopped and
    checkpointed, so that the newcomer's next try resumes from it
    (Syncthing likewise replaces a device's dead connection with its new
    one). Any other overlapping push is refused as busy."""

    def __init__(self):
        self.held: dict[str, tuple[int, object, object]] = {}     # key -> (fd, session, link)
        self.links: dict[int, object] = {}                        # id(session) -> its link
        self.probing = weakref.WeakSet()                          # sessions being asked if alive ...
        self.alive = weakref.WeakSet()                            # ... and found alive

    @staticmethod
    def _nested(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

    def take(self, key: str, fd: int | None, session) -> bool | None:
        """Hold the directory open as ``fd`` (keyed ``key``) for ``session``;
        False if an overlapping push holds it, None while the server asks
        whether the same device's earlier push holding it is alive. With
        ``fd`` None: whether it would be taken, taking nothing (the push
        makes its directory only then)."""
        for other in [k for k in self.held if self._nested(k, key)]:
            _, old, link = self.held[other]
            if old.finished:
                self.release(other)
                continue
            if other != key or old.client_id != session.client_id or link is None:
                return False
            return self._probe(other, old, link)
        if fd is None:
            return True
        # its own open file description (an flock belongs to one): held until release, whatever
        # becomes of the receiver's descriptors
        lock_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return False
        except OSError:
            pass                                # a file system without locks: held in this process only
        self.held[key] = (lock_fd, session, self.links.get(id(session)))
        return True

    def _probe(self, key: str, old, link) -> bool | None:
        """Whether ``old``'s connection is alive (see the class): False (it
        is: busy), or None while it is being asked (it is superseded if it
        does not answer: the caller asks again)."""
        if old in self.probing:
            return None
        if old in self.alive:
            self.alive.discard(old)         # (told once; the newcomer's next try asks again)
            return False
        self.probing.add(old)
        ping = link.liveness.ping()

        def check() -> None:
            self.probing.discard(old)
            held = self.held.get(key)
            if held is None or held[1] is not old or old.finished:
                return                          # it ended meanwhile: the newcomer takes the lock
            if ping in link.liveness.pings_acked:
                self.alive.add(old)         # alive: the newcomer is busy, and retries
                return
            from ..errors import ConnectionFailed
            log(f"{old.client_id}: its earlier push into {_shown(old)} did not answer for "
                f"{time.monotonic() - link.last_received:.1f} s: superseded by its new connection")
            old.fail(ConnectionFailed("superseded by a new connection from the same device"))
            link.drive()
            link.close()
            self.release(key)
        asyncio.get_running_loop().call_later(max(PROBE_WAIT, 4 * link.rtt()), check)
        return None

    def release(self, key: str | None, session=None) -> None:
        if key is None:
            return
        held = self.held.get(key)
        if held is not None and (session is None or held[1] is session):
            del self.held[key]
            os.close(held[0])


RECENT = 100                      # ended transfers the API keeps showing
PROGRESS_EVERY = 1.0              # s between TransferProgress events of a running transfer
PRUNE_EVERY = 86400.0             # s between prunings of the history (Settings.history_keep_days)


@dataclass
class Settings:
    """What a daemon serves, and how (``resync serve``'s flags and config
    file; a SIGHUP reads them again): ``modules``; ``bwlimit``, bytes per
    second each pull may send (a client's --bwlimit may lower it);
    ``min_parity``, parity shards per stripe at least; ``max_transfers``,
    transfers running at once at most (0: no cap); ``history_keep_days``:
    the history is pruned to that many days (store.History.prune) at the
    start and daily (0: never); ``bytes_per_second`` and
    ``shards_per_second``: what the daemon sends in all (every transfer's
    shards pass the same two token buckets; 0: no limit; the API's PUT
    /api/v1/limits changes them until the daemon's next start, or a reload
    that changes them); ``max_sessions``: its own transfers running at once
    (net.sessions)."""

    modules: dict
    bwlimit: float = 0
    min_parity: int = 1
    max_transfers: int = 0
    history_keep_days: float = 0             # the history's file lists and trees kept this long (0: forever)
    bytes_per_second: float = 0              # what the daemon sends in all, every transfer's shards (0: no limit)
    shards_per_second: float = 0             # ... in shards a second (0: no limit)
    max_sessions: int = 4                    # its own transfers (net.sessions) running at once
    relay: "RelaySettings | None" = None     # relaying on: the spool, who may use it, the routes


@dataclass
class RelaySettings:
    """A daemon that relays (``resync serve --relay DIR``): sealed envelopes
    taken into the spool ``spool`` (store.spool) from the devices in
    ``allowed``, which also collect what it holds for them (their mailbox);
    ``cap``: bytes held at most (0: the disk's free space less a margin);
    ``max_hold``: ms an envelope is kept at most (0: until its own expiry)."""

    spool: str
    allowed: frozenset
    cap: int = 0
    max_hold: int = 0
    routes: tuple = ()                       # net.relaying.Route: where envelopes for other devices go next


def _delivery(identity, state_dir: Path, modules):
    """``deliver(data)`` for a relaying daemon's Forwarder: an envelope sealed
    to this device applied through the destination's Inbox into the module
    its source named (``modules()``: the daemon's modules now; a source may
    write a module that allows its device ID), its guard's record and
    parked copies in the config directory's ``relay/``; (verdict, why,
    receipts to send back). Raises what Inbox.receive raises, with the
    receipts attached (``exc.receipts``)."""
    from ..relay.guard import Chains
    from ..relay.keys import load_exchange_key, make_card
    from ..relay.trees import Inbox, Outbox, module_places
    from ..store.guard import GuardStore
    exchange = load_exchange_key(state_dir, create=True)
    chains = Chains(GuardStore(state_dir / "relay" / "applied"))
    outbox = Outbox(state_dir / "relay" / "outbox", identity)

    def deliver(data: bytes):
        from ..errors import ResyncError
        mods = modules()
        mods = {n: m for n, m in mods.items() if not m.read_only}          # (clients may only pull from those)
        inbox = Inbox(identity, exchange, make_card(identity, exchange), chains,
                      module_places({n: m.path for n, m in mods.items()}, {n: m.allowed for n, m in mods.items()}),
                      outbox)
        try:
            r = inbox.receive(data, int(time.time() * 1000))
        except ResyncError as exc:
            exc.receipts = inbox.receipts
            raise
        return r.verdict, r.why + (f" (generations {', '.join(str(g) for g, _ in r.applied)})" if r.applied else ""), \
            inbox.receipts
    return deliver


async def serve(host: str, port: int, settings: Settings, identity, history: str | None = None,
                ready=None, tcp: bool = True, api: "ApiOptions | None" = None, reload=None,
                state_dir: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT. ``ready(port)`` is called once listening.
    ``settings``: what is served, and how; ``reload()``: the settings read
    again, called on SIGHUP (ResyncError: a mistake in them, which keeps the
    ones in force); ``tcp``: offer TLS over TCP on the same port number too
    (net.tcp); ``api``: the HTTP API and metrics (net.api), None for neither;
    ``state_dir``: where the daemon's own transfers are kept (net.sessions:
    its ``sessions`` directory; None: it runs none).
    ConnectionFailed if it cannot listen (the API too, when its address was
    asked for rather than the default)."""
    from aioquic.asyncio import serve as quic_serve
    warm_up()
    from .. import __version__
    from ..metrics import ServerMetrics
    from collections import deque

    from .events import Events
    current = [settings]                        # (replaced whole by a reload: a session keeps the one it got)
    metrics = ServerMetrics(__version__, sorted(settings.modules))
    events = Events()
    recent: deque = deque(maxlen=RECENT)        # the transfers that ended, newest last
    ticking = [None]                            # the progress timer while transfers run
    pruning = [None]                            # the history's daily retention
    ended = {"completed": 0, "failed": 0, "cancelled": 0}
    instance_id = os.urandom(8).hex()
    started_at = time.time()
    listening: list[str] = []
    api_url = None
    locks = _Locks()
    loop = asyncio.get_running_loop()
    from .feeder import TokenBucket
    limits = (TokenBucket(settings.bytes_per_second), TokenBucket(settings.shards_per_second, "shards"))
    paused = [False]                            # POST /api/v1/pause: inbound transfers refused as busy
    sessions = None                             # net.sessions.Sessions: the daemon's own transfers
    stop = asyncio.Event()
    links: set[SessionLink] = set()
    batch: list[PacketBatch] = []               # the listening socket's, once it exists

    refusals = {"count": 0, "logged": 0.0}
    resets = StatelessReset(identity)

    def unproven(link) -> bool:
        s = link.session
        return s is not None and not s.finished and not s.authenticated

    def admit(link) -> None:
        """The caps above, once aioquic has taken the connection's first
        packet (its address is known, a close can be sent). Over
        MAX_CONNECTIONS the newcomer is refused. Among connections without
        a proof, the one waiting longest is let go when its address has
        MAX_UNPROVEN_PER_HOST of them, or when MAX_UNPROVEN wait in all —
        not the newcomer: an honest client proves its key within a few
        round trips, so idle strangers are always the oldest, and a stranger
        holding every slot cannot keep allowed clients out."""
        if not unproven(link):
            return
        if len(links) > MAX_CONNECTIONS:
            link.refuse(f"{MAX_CONNECTIONS} connections already")
            return
        host = peer_host(link)
        waiting = sorted((x for x in links if x is not link and unproven(x)), key=lambda x: x.created)
        same = [x for x in waiting if peer_host(x) == host]
        if len(same) >= MAX_UNPROVEN_PER_HOST:
            same[0].refuse(f"let go: {MAX_UNPROVEN_PER_HOST} connections from {host} wait for their proof, "
                           "this one the longest")
        elif len(waiting) >= MAX_UNPROVEN:
            waiting[0].refuse(f"let go: {MAX_UNPROVEN} connections wait for their client's proof, "
                              "this one the longest")

    def note_unproven(link, why: str) -> None:
        """A connection that ended without a proof: one log line per
        REFUSAL_LOG_INTERVAL at most (a flood must not flood the log)."""
        refusals["count"] += 1
        now = time.monotonic()
        if now - refusals["logged"] >= REFUSAL_LOG_INTERVAL:
            log(f"{refusals['count']} connection(s) ended without the client's proof (the last from "
                f"{peer_of(link)}: {why})")
            refusals["count"], refusals["logged"] = 0, now

    def deadline(link) -> None:
        s = link.session
        if s is not None and not s.finished and not s.authenticated:
            link.refuse(f"no proof of the client's key within {PROOF_DEADLINE:.0f} s")

    def prune_history() -> None:
        """The retention of the history (Settings.history_keep_days), in a
        thread (a large delete must not hold transfers); again in a day."""
        days = current[0].history_keep_days
        if history is not None and days:
            def job():
                from ..store import History
                return History(history).prune(days, wait=60.0)

            def done(f) -> None:
                try:
                    gone = f.result()
                except Exception as exc:         # (HistoryError: busy, its disk; logged, tried again tomorrow)
                    log(f"history: not pruned: {exc}")
                    return
                if gone["runs"]:
                    log(f"history: pruned {gone['runs']} runs older than {days:g} days ({gone['run_files']} "
                        f"changed-file rows, {gone['manifest_rows']} manifest rows)")
            loop.run_in_executor(None, job).add_done_callback(done)
        pruning[0] = loop.call_later(PRUNE_EVERY, prune_history)

    def tick() -> None:
        """A TransferProgress event a second for each transfer running."""
        ticking[0] = None
        active = inbound()
        for s_, x in active:
            events.publish("TransferProgress", _described(s_, x, "active"))
        if active:
            ticking[0] = loop.call_later(PROGRESS_EVERY, tick)

    inbound_store = None                        # inbound transfers as records (store.sessions), if state_dir
    if state_dir is not None:
        from ..store.sessions import SessionStore
        inbound_store = SessionStore(Path(state_dir) / "inbound")
    # The transfers' records (their sessions' and the history's run records: fsyncs each) are written
    # by a thread of their own, in the order asked: an fsync waits for whatever else the file system
    # has to write (seconds, beside another program writing), and the loop serves every transfer.
    from concurrent.futures import ThreadPoolExecutor
    records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resync-records")

    def in_order(job) -> None:
        """``job()`` on the records thread, after those asked before;
        HistoryError or OSError it raises: logged."""
        from ..store import HistoryError

        def run() -> None:
            try:
                job()
            except (HistoryError, OSError) as exc:
                log(str(exc))
        try:
            records.submit(run)
        except RuntimeError:                    # (the daemon is stopping: its records thread has ended)
            run()

    def keep_inbound(described: dict) -> None:
        """An inbound transfer's record, at its start and its end: the API
        lists the last RECENT across the daemon's restarts."""
        if inbound_store is not None:
            record = dict(described)
            in_order(lambda: inbound_store.save(record))

    def forget_inbound(transfer_id: str) -> None:
        if inbound_store is not None:
            in_order(lambda: inbound_store.remove(transfer_id))

    merging = {"process": None, "again": False}

    def merge_history() -> None:
        """(On the records thread.) The history's spools merged by one
        background process at a time: a hundred transfers ending together
        started a hundred Python processes importing DuckDB, beside the
        daemon on its cores. Asked while one runs: once more after it."""
        process = merging["process"]
        if process is not None and process.poll() is None:
            if not merging["again"]:
                merging["again"] = True
                loop.call_soon_threadsafe(loop.call_later, MERGE_AGAIN, in_order, merge_again)
            return
        from ..store import History
        merging["process"] = History(history).merge_in_background()

    def merge_again() -> None:
        merging["again"] = False
        merge_history()

    def restore_inbound() -> None:
        """The inbound transfers recorded before this start: the last RECENT
        listed again; one recorded running was cut by the daemon's stop
        (SIGKILL: its end unrecorded), and shows so — its client retries and
        resumes it as a new transfer."""
        if inbound_store is None:
            return
        from ..store import HistoryError
        try:
            records, problems = inbound_store.load()
        except HistoryError as exc:
            log(f"inbound transfers: not read: {exc}")
            return
        for line in problems:
            log(f"inbound transfer not read: {line}")
        for r in records:
            if r.get("state") == "active":
                r.update(state="failed", outcome="failed", ended=r.get("ended") or time.time(),
                         error="the daemon stopped while it ran (its client resumes it when it retries)")
                keep_inbound(r)
        records.sort(key=lambda r: r.get("ended") or 0)
        for r in records[:-RECENT]:
            forget_inbound(r["id"])
        recent.extend(records[-RECENT:])

    def inbound() -> list:
        """The inbound transfers running (taken: past the Welcome, not ended): (session, link) of each."""
        return [(x.session, x) for x in links if x.session is not None and not x.session.finished
                and getattr(x.session, "taken_at", None) is not None]

    def running() -> list:
        return [s for s, _ in inbound()]

    spool = forwarder = None
    if settings.relay is not None:
        from ..store.spool import Spool
        spool = Spool(settings.relay.spool, settings.relay.cap, settings.relay.max_hold, lock_wait=0)
        own_hash = hashlib.sha256(identity.public_key).digest()

        def maintain():
            try:
                for key, reason in spool.expire():
                    log(f"relay: envelope {key[:16]} removed: {reason}")
            except (OSError, ResyncError) as exc:
                log(f"relay: the maintenance cycle failed, tried again in {RELAY_MAINTENANCE:.0f} s: {exc}")
            finally:
                loop.call_later(RELAY_MAINTENANCE, maintain)
        maintain()
        from .relaying import Forwarder
        forwarder = Forwarder(spool, identity, list(settings.relay.routes), log,
                              _delivery(identity, state_dir, lambda: current[0].modules)
                              if settings.modules and state_dir is not None else None)
        forwarding = asyncio.ensure_future(forwarder.run())
        metrics.add_relay(spool.status)
        relay_events: list[dict] = []           # for the history, written a second after the first of them

        def record_relay():
            batch, relay_events[:] = list(relay_events), []
            if history is not None and batch:
                from ..store import History
                try:
                    History(history).record_relay_events(identity.device_id, batch)
                except OSError as exc:
                    log(f"relay: {len(batch)} events not recorded in the history: {exc.strerror or exc}")

        def on_relay_event(event: dict) -> None:
            metrics.relay_event(event["event"], event.get("reason"))
            if not relay_events:
                loop.call_later(1.0, record_relay)
            relay_events.append(event)
        spool.on_event = on_relay_event

    def relay_ends(client_id: str, collect: bool):
        """The two ends of a relay exchange with device ``client_id``, or
        None: this daemon does not relay, or not for that device."""
        r = current[0].relay
        if spool is None or r is None or client_id not in r.allowed:
            return None
        from ..relay.keys import device_hash
        from ..relay.node import SpoolIn, SpoolOut
        peer = device_hash(client_id)
        return (SpoolOut(spool, own_hash, peer, collecting=True) if collect else None), \
            SpoolIn(spool, peer, forwarder.wake)

    def full(session) -> str | None:
        """Why ``session`` may not start now: the operator paused the
        daemon's transfers, or max_transfers are running."""
        if paused[0]:
            return "the server's operator has paused its transfers; try again later"
        cap = current[0].max_transfers
        if cap and len(running()) >= cap:
            return f"{cap} transfers are running already (the server's max_transfers); try again later"
        return None

    def reload_now() -> None:
        """SIGHUP: the settings read again and put in force for the connections
        that come next; transfers running keep theirs. A mistake keeps the
        settings in force, said in the log."""
        from ..errors import ResyncError
        try:
            new = reload()
        except ResyncError as exc:
            log(f"SIGHUP: not reloaded, the settings in force are kept: {exc}")
            return
        old, current[0] = current[0], new
        metrics.add_modules(sorted(new.modules))
        if (old.bytes_per_second, old.shards_per_second) != (new.bytes_per_second, new.shards_per_second):
            limits[0].set_rate(new.bytes_per_second)
            limits[1].set_rate(new.shards_per_second)
        if sessions is not None:
            sessions.max_active = new.max_sessions
            sessions.schedule()
        changes = _changes(old, new)
        log("SIGHUP: reloaded: " + changes)
        events.publish("ConfigReloaded", {"changes": changes, "modules": sorted(new.modules)})

    def adopt(link) -> None:
        """A new connection (either transport): its session, and what
        happens at its end."""
        link.preauth_limit = PREAUTH_BYTES
        link.own_limits = (TokenBucket(0), TokenBucket(0, "shards"))      # (PATCH /api/v1/transfers/ID)
        link.feeder.limits = [*limits, *link.own_limits]    # (a channel's: its own; the connection has the daemon's)
        link.priority = "normal"
        reports = _report_factory(history, lambda s: locks.links[id(s)], in_order)

        def report_factory(s):              # (called at the Welcome: the daemon has taken the transfer)
            s.taken_at, s.taken_wall = time.monotonic(), time.time()
            metrics.started(_direction(s))
            started = _described(s, link, "active")
            events.publish("TransferStarted", started)
            keep_inbound(started)
            if ticking[0] is None:
                ticking[0] = loop.call_later(PROGRESS_EVERY, tick)
            return reports(s)
        now = current[0]
        session = ServerSession(identity, identity.cert_der, now.modules, report_factory=report_factory,
                                lock=locks.take, bwlimit=now.bwlimit, min_parity=now.min_parity,
                                capacity=full, relay=relay_ends)
        started = link.created = time.monotonic()

        def done():
            from ..protocol.receiver import Receiver
            if isinstance(session.role, Receiver) or session.error is not None:
                loop.call_soon(link.close)              # the receiver ends the connection, before the
            else:                                       # history is written (a slow write must not hold it)
                loop.call_later(5.0, link.close)        # the client (the receiver) closes first
            loop.call_soon(finish)

        def finish():
            locks.release(session.target_key if session.hello is not None and session.hello.push else None, session)
            locks.links.pop(id(session), None)
            if link.session is not session:     # a connection of channels: each was its own transfer
                links.discard(link)
                return
            if not session.authenticated:
                note_unproven(link, str(session.error or link.close_reason or "closed"))
                links.discard(link)
                return
            if session.relaying:
                r = session.result
                log(f"{session.client_id} from {peer_of(link)}: relay exchange: " + (
                    str(session.error) if session.error is not None else
                    f"took {r.get('taken', 0)} envelopes ({r.get('taken_bytes', 0)} B, "
                    f"{r.get('resumed_bytes', 0)} B resumed), refused {r.get('refused_here', 0)}, "
                    f"handed over {r.get('handed_over', 0)} ({r.get('handed_bytes', 0)} B), "
                    f"{time.monotonic() - started:.2f} s"))
                links.discard(link)
                return
            from ..report import RunStats
            from . import transfer_row
            status = "failed" if session.error is not None else RunStats.from_dict(session.result).status
            result = dict(session.result, **session.stats)
            result["transfer_id"] = session.transfer_id
            row = transfer_row(result, link.transport_stats(), f"resync://{session.client_id}",
                               session.client_id, "receive" if session.hello.push else "send")
            if getattr(session, "taken_at", None) is not None:
                from ..protocol.common import CancelledError
                ok = session.error is None
                state = "completed" if ok else "cancelled" if isinstance(session.error, CancelledError) else \
                    "paused" if isinstance(session.error, _PausedCut) else "failed"
                ended[state] = ended.get(state, 0) + 1
                described = _described(session, link, state, status)
                if len(recent) == RECENT:
                    forget_inbound(recent[0]["id"])
                recent.append(described)
                keep_inbound(described)
                events.publish("TransferEnded", described)
                metrics.ended(_direction(session), session.module.name, state, time.monotonic() - session.taken_at,
                              dict(row, bytes_sent=row.get("udp_bytes_sent") or row.get("tcp_bytes_sent"),
                                   bytes_received=row.get("udp_bytes_received") or row.get("tcp_bytes_received"),
                                   shards_recovered=session.result.get("shards_recovered"),
                                   shards_lost=link.transport_stats().get("shards_lost")))
            recorder = getattr(session, "recorder", None)
            who = f"{session.client_id or 'unknown client'} from {peer_of(link)}"
            if session.transfer_id and session.module:
                who += f" (transfer {session.transfer_id}, {'TLS over TCP' if link.transport_name == 'tcp' else 'QUIC'})"
            what = (f"{'push into' if session.hello.push else 'pull from'} {_shown(session)}"
                    if session.module else "handshake")
            if session.module and session.hello.flags & FLAG_DRY_RUN:
                what = f"dry-run {what}"
            if session.error is not None:
                log(f"{who}: {what}: {session.error}"
                    + (f" (and cleaning up: {session.cleanup_error})" if session.cleanup_error else ""))
            else:
                r = session.result
                detail = {"partial": f"{r.get('errors', 0)} errors",
                          "refused": f"deletion refused: {r.get('deletion_refused', '')}",
                          "vanished": f"{r.get('vanished', 0)} vanished"}.get(status)
                log(f"{who}: {what}: {status}{' (' + detail + ')' if detail else ''}, "
                    f"{r.get('files_transferred', 0)} files ({r.get('bytes_transferred', 0)} B), "
                    f"{time.monotonic() - started:.2f} s")
            if recorder is not None:
                stats = _Stats(session.result) if session.error is None else None

                def record(recorder=recorder, stats=stats, row=row, who=who, what=what) -> None:
                    if recorder.finish(status, stats, transfer=row, background=merge_history):
                        log(f"{who}: {what}: not recorded in the history: {recorder.failed}")
                in_order(record)
            links.discard(link)

        link.on_session_done = done
        locks.links[id(session)] = link
        link.session = session                  # driven by the connection's events from now on
        attach(session, link.drive)             # (its end's fsyncs off the loop: net.workers)
        loop.call_soon(admit, link)
        loop.call_later(PROOF_DEADLINE, deadline, link)
        links.add(link)

    def channels(link):
        """A connection whose client opened channels (net.channels): each
        channel is adopted as a connection of its own would be."""
        from ..protocol.mux import Mux
        from .channels import ChannelLink

        def accept(c):
            x = ChannelLink(link, mux, c, shared=limits)
            adopt(x)
            return x.session
        mux = Mux(client=False, accept=accept)
        return mux

    def create_protocol(*args, **kwargs):
        link = SessionLink(*args, **kwargs)
        resets.adopt(link._quic)                # reset tokens that survive a restart of this server
        link.batch = batch[0] if batch else None
        adopt(link)
        link.on_channels = channels
        return link

    def create_stream():
        link = StreamLink()
        adopt(link)
        link.start(link.session)                # (reliable: no parity; driven once TLS is up)
        return link

    from ..errors import ConnectionFailed
    try:
        server = await quic_serve(host, port, configuration=configuration(identity, is_client=False),
                                  create_protocol=create_protocol)
    except OSError as exc:                      # in use, not an address of this machine, not allowed
        raise ConnectionFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    answer_unknown_connections(server, resets)
    batch.append(PacketBatch(server, server._transport))
    import threading
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_now)
    sockname = server._transport.get_extra_info("sockname")
    streams = None
    if tcp:
        try:
            streams = await loop.create_server(create_stream, host, sockname[1], ssl=tls_context(identity, True),
                                               ssl_handshake_timeout=TCP_HANDSHAKE_TIMEOUT, reuse_address=True)
        except OSError as exc:                  # (the port number taken for TCP): QUIC only
            log(f"TLS over TCP not offered on {host}:{sockname[1]}: {exc.strerror or exc}")
    shown_host = f"[{host}]" if ":" in host else host
    listening += [f"{shown_host}:{sockname[1]} (QUIC)"] + ([f"{shown_host}:{sockname[1]} (TLS over TCP)"] if streams else [])

    def status() -> dict:
        """The API's /api/v1/status document (docs/api.md)."""
        now, active = current[0], running()
        pushes = sum(1 for x in active if x.hello.push)
        return {"version": __version__, "device_id": identity.device_id, "instance_id": instance_id,
                "started": started_at, "uptime_seconds": round(time.time() - started_at, 3),
                "listen": listening, "api": api_url, "max_transfers": now.max_transfers,
                "modules": [{"name": m.name, "path": m.path, "read_only": m.read_only}
                            for m in now.modules.values()],
                "paused": paused[0], "limits": control.limits(),
                "transfers": {"active": len(active), "push": pushes, "pull": len(active) - pushes, **ended},
                "sessions": sessions.counts() if sessions is not None else None}
    if state_dir is not None:
        from ..store.sessions import SessionStore
        from .sessions import Sessions
        sessions = Sessions(SessionStore(Path(state_dir) / "sessions"), identity, state_dir, history, events, metrics,
                            limits, log, settings.max_sessions)
        metrics.count_queued(sessions.queued)
    control = _Control(status, lambda: _peers(current[0].modules), inbound, recent, sessions, limits, paused, events,
                       spool, forwarder if spool is not None else None)
    http = None
    if api is not None:
        from .api import Api
        http = Api(api.key, control, metrics, events)
        try:
            api_url = await _listen_api(http, api, instance_id)
        except BaseException:
            await http.close()
            server.close()
            if streams is not None:
                streams.close()
            raise
    log(f"listening on {host}:{sockname[1]} (QUIC{', TLS over TCP' if streams else ''}) as {identity.device_id}; "
        "modules: " + _shown_modules(settings.modules)
        + (f"; relaying, spool {settings.relay.spool}, {len(settings.relay.routes)} routes" if spool else ""))
    prune_history()
    restore_inbound()
    if sessions is not None:
        sessions.restore()
    from .watch import LoopWatch
    watch = LoopWatch(loop, log, metrics.loop_lag.observe)
    watch.start()
    if ready is not None:
        ready(sockname[1])
    try:
        await stop.wait()
    finally:
        watch.stop()
        for timer in (ticking[0], pruning[0]):
            if timer is not None:
                timer.cancel()
        if spool is not None:
            forwarding.cancel()
            record_relay()
            spool.close()
        if http is not None:
            from .api import remove_api_file
            await http.close()
            remove_api_file(api.directory, instance_id)
        log("stopping: transfers in flight are stopped and checkpointed for resume")
        if sessions is not None:
            await sessions.close()
        from ..errors import ConnectionFailed
        for link in list(links):
            if link.session is not None and not link.session.finished:
                link.session.fail(ConnectionFailed("the server is stopping"))
                link.drive()
            link.close()
        server.close()
        if streams is not None:
            streams.close()
        records.shutdown(wait=True)             # (the records asked for written before the daemon exits)


class _PausedCut(ConnectionFailed):
    """the operator paused the server's transfers: {}"""

    # An inbound transfer cut by POST /api/v1/pause: both ends checkpoint; its client's
    # retries are told busy until POST /api/v1/resume, then resume what arrived.


class _Control(Control):
    """The API's view of a running daemon (net.api.Control): the inbound
    transfers (``inbound()``: (session, link) of the running ones; ``recent``:
    those ended, newest last), its own sessions (net.sessions.Sessions, or
    None), its limits (the two TokenBuckets every transfer passes) and the
    pause of it all (``paused[0]``)."""

    def __init__(self, status, peers, inbound, recent, sessions, limits, paused, events, spool=None, forwarder=None):
        self.status, self.peers, self.inbound, self.recent = status, peers, inbound, recent
        self.sessions, self.buckets, self.paused, self.events = sessions, limits, paused, events
        self.spool, self.forwarder = spool, forwarder

    def relay(self) -> dict:
        if self.spool is None:
            return {"relaying": False}
        now = time.monotonic()
        routes = [{"to": sorted(r.to) or "*", "via": r.remote.address, "peer_id": r.peer_id,
                   "next_try_in_seconds": round(max(0.0, r.next_try - now), 1), "last_error": r.last_error}
                  for r in (self.forwarder.routes if self.forwarder is not None else [])]
        return {"relaying": True, "spool": str(self.spool.root), **self.spool.status(), "routes": routes,
                "held": self.spool.held()}

    def remove_envelope(self, envelope_id: str) -> dict:
        from .sessions import NotFound
        if self.spool is None or envelope_id not in self.spool.index:
            raise NotFound(f"no envelope {envelope_id} held here")
        held = self.spool.held(limit=len(self.spool.index))
        self.spool.remove(envelope_id, "removed")
        self.events.publish("RelayEnvelopeRemoved", {"id": envelope_id})
        return next(h for h in held if h["id"] == envelope_id)

    def transfers(self) -> list[dict]:
        live = [_described(s, x, "active") for s, x in self.inbound()]
        done = list(self.recent)
        if self.sessions is not None:
            from .sessions import ENDED
            for t in self.sessions.listed():
                (done if t["state"] in ENDED else live).append(t)
        when = (lambda t: -(t.get("created") or t.get("started") or 0))
        return sorted(live, key=when) + sorted(done, key=lambda t: -(t.get("ended") or 0))

    def _own(self, tid: str) -> bool:
        return self.sessions is not None and tid in self.sessions.records

    def _running(self, tid: str):
        for s, x in self.inbound():
            if s.transfer_id == tid:
                return s, x
        from .sessions import Conflict, NotFound
        for t in self.recent:
            if t["id"] == tid:
                raise Conflict(f"transfer {tid} has ended ({t['state']})")
        raise NotFound(tid)

    def submit(self, body) -> dict:
        if self.sessions is None:
            raise ValueError("this daemon runs no transfers of its own (it has no state directory)")
        record = self.sessions.submit(body)
        return {**self.sessions.described(record), "event_id": self.events.last_id}     # (its TransferQueued)

    def act(self, tid: str, action: str) -> dict:
        from .sessions import Conflict
        if self._own(tid):
            return self.sessions.described(getattr(self.sessions, action)(tid))
        s, x = self._running(tid)
        if action != "cancel":
            raise Conflict(f"transfer {tid} is inbound: its client runs it (pause it there, or pause the whole "
                           "daemon: POST /api/v1/pause); it can be cancelled here")
        from ..protocol.common import CancelledError
        s.fail(CancelledError("the server's operator cancelled this transfer"))
        x.drive()
        return dict(_described(s, x, "cancelled", "failed"))

    def change(self, tid: str, body) -> dict:
        if self._own(tid):
            return self.sessions.described(self.sessions.change(tid, body))
        from .sessions import parse_change
        s, x = self._running(tid)
        priority, limits = parse_change(body)
        if priority is not None:
            x.priority = priority
        for bucket, key in zip(x.own_limits, ("bytes_per_second", "shards_per_second")):
            if key in limits:
                bucket.set_rate(limits[key])
        described = _described(s, x, "active")
        self.events.publish("TransferChanged", described)
        return described

    def act_all(self, action: str) -> dict:
        if action == "pause":
            self.paused[0] = True
            own = self.sessions.pause_all() if self.sessions is not None else []
            cut = []
            for s, x in self.inbound():
                s.fail(_PausedCut("its client retries, and resumes once the daemon's transfers are resumed"))
                x.drive()
                cut.append(s.transfer_id)
            log(f"paused by the operator: {len(own)} own transfers paused, {len(cut)} inbound cut "
                "(new ones are told busy)")
        else:
            self.paused[0] = False
            own = self.sessions.resume_all() if self.sessions is not None else []
            cut = []
            log(f"resumed by the operator: {len(own)} own transfers resumed, inbound ones taken again")
        self.events.publish("Paused" if action == "pause" else "Resumed", {"sessions": own, "inbound": cut})
        return {"paused": self.paused[0], "sessions": own, "inbound": cut}

    def limits(self) -> dict:
        return {"bytes_per_second": self.buckets[0].rate, "shards_per_second": self.buckets[1].rate}

    def set_limits(self, body) -> dict:
        from .sessions import parse_limits
        limits = parse_limits(body)
        for bucket, key in zip(self.buckets, ("bytes_per_second", "shards_per_second")):
            if key in limits:
                bucket.set_rate(limits[key])
        now = self.limits()
        log(f"limits: {now['bytes_per_second']:g} bytes/s, {now['shards_per_second']:g} shards/s in all (0: none)")
        self.events.publish("LimitsChanged", now)
        return now


@dataclass
class ApiOptions:
    """The daemon's HTTP API (net.api): its ``key``, where it listens
    (``host``, ``port``; ``asked``: given by the operator — a daemon that
    cannot listen there stops, while the default address taken only costs
    the API, said in the log), the keyless metrics listener (``metrics``:
    (host, port) or None), and the config ``directory`` its api.json goes to."""

    key: str
    host: str
    port: int
    asked: bool
    directory: Path
    metrics: tuple[str, int] | None = None


async def _listen_api(http, api: ApiOptions, instance_id: str) -> str | None:
    """Start the API's listeners; its URL (None if the default address was taken)."""
    from ..errors import ConnectionFailed
    from .api import loopback, url_of, write_api_file
    try:
        port = await http.listen(http.application(check_host=loopback(api.host)), api.host, api.port)
    except OSError as exc:
        if api.asked:
            raise ConnectionFailed(f"cannot listen for the API on {api.host}:{api.port}: "
                                   f"{exc.strerror or exc}") from None
        log(f"API not offered: {api.host}:{api.port}: {exc.strerror or exc} (another daemon's? "
            "--api HOST:PORT gives it another address)")
        url = None
    else:
        url = url_of(api.host, port)
        write_api_file(api.directory, url, instance_id)
        log(f"API on {url} (its key: {api.directory / 'api-key'})")
    if api.metrics is not None:
        host, port = api.metrics
        try:
            port = await http.listen(http.metrics_application(check_host=loopback(host)), host, port)
        except OSError as exc:
            raise ConnectionFailed(f"cannot listen for the metrics on {host}:{port}: {exc.strerror or exc}") from None
        log(f"metrics without a key on {url_of(host, port)}/metrics")
    return url


def _described(session, link, state: str, outcome: str | None = None) -> dict:
    """A transfer as the API shows it (docs/api.md "Transfers")."""
    from ..protocol.receiver import Receiver
    role = session.role
    if isinstance(role, Receiver):
        done = {"files_done": role.stats.files_transferred, "bytes_done": role.stats.bytes_transferred}
    elif role is not None:
        c = role.tally.counts
        done = {"files_done": c["files_transferred"], "bytes_done": c["bytes_transferred"]}
    else:
        done = {"files_done": 0, "bytes_done": 0}
    own = getattr(link, "own_limits", None)
    t = link.transport_stats()
    sent = t.get("udp_bytes_sent") or t.get("tcp_bytes_sent") or 0
    received = t.get("udp_bytes_received") or t.get("tcp_bytes_received") or 0
    elapsed = max(time.monotonic() - session.taken_at, 1e-6)
    return {"id": session.transfer_id, "kind": "inbound", "priority": getattr(link, "priority", "normal"),
            "direction": _direction(session), "state": state, "outcome": outcome,
            "peer_id": session.client_id, "peer": peer_of(link), "module": session.module.name,
            "path": os.fsdecode(session.hello.path).strip("/"), "transport": link.transport_name,
            "dry_run": bool(session.hello.flags & FLAG_DRY_RUN), "started": session.taken_wall,
            "ended": time.time() if state != "active" else None, "elapsed_seconds": round(elapsed, 3),
            **done, "wire_bytes_sent": sent, "wire_bytes_received": received,
            "rate_bytes_per_second": round((sent + received) / elapsed),
            "error": str(session.error) if session.error is not None else None,
            "limits": {"bytes_per_second": own[0].rate, "shards_per_second": own[1].rate} if own else None}


def _peers(modules: dict) -> list[dict]:
    """The devices the modules allow, each with the modules it may use (the
    API's /api/v1/peers; a device learns nothing of the others' modules)."""
    out: dict[str, list] = {}
    for m in sorted(modules.values(), key=lambda m: m.name):
        for device in m.allowed:
            out.setdefault(device, []).append({"name": m.name, "read_only": m.read_only})
    return [{"device_id": d, "modules": out[d]} for d in sorted(out)]


def _shown_modules(modules: dict) -> str:
    return ", ".join(f"{m.name}={m.path}{' (read-only)' if m.read_only else ''}" for m in modules.values()) or "none"


def _changes(old: Settings, new: Settings) -> str:
    """What a reload changed, for the log."""
    out = []
    for name in sorted(set(old.modules) | set(new.modules)):
        a, b = old.modules.get(name), new.modules.get(name)
        if a is None:
            out.append(f"module {name} added ({b.path}{', read-only' if b.read_only else ''})")
        elif b is None:
            out.append(f"module {name} removed (its transfers running go on)")
        elif (a.path, a.read_only, a.allowed) != (b.path, b.read_only, b.allowed):
            what = [w for w, x, y in (("path", a.path, b.path), ("read-only", a.read_only, b.read_only),
                                      ("allowed devices", a.allowed, b.allowed)) if x != y]
            out.append(f"module {name}: {', '.join(what)} changed")
    for field, shown in (("bwlimit", "bwlimit"), ("min_parity", "min_parity"), ("max_transfers", "max_transfers"),
                         ("history_keep_days", "history_keep_days"), ("bytes_per_second", "bytes_per_second"),
                         ("shards_per_second", "shards_per_second"), ("max_sessions", "max_sessions")):
        if getattr(old, field) != getattr(new, field):
            out.append(f"{shown} {getattr(old, field)} -> {getattr(new, field)}")
    return "; ".join(out) or "nothing changed"


def _direction(session) -> str:
    """push or pull, as the client asked (the metrics' label)."""
    return "push" if session.hello.push else "pull"


def _report_factory(history: str | None, link_of, in_order):
    """Called as a transfer starts (Welcome sent): its start line in the
    log, and its record in the server's history — a push's with the
    destination's manifest (the Report returned), a pull's with no manifest
    (the module is its source: the run row and its transfers row say what
    was sent, to whom). The run's start record is written by ``in_order``
    (the records thread), as its end is."""
    def make(session):
        from ..report import Report, RunStats
        from ..store import HistoryError
        from ..store.recorder import RunRecorder
        push, dry = session.hello.push, bool(session.hello.flags & FLAG_DRY_RUN)
        what = f"{'dry-run ' if dry else ''}{'push into' if push else 'pull from'} {_shown(session)}"
        log(f"{session.client_id} from {peer_of(link_of(session))}: {what}: started "
            f"(transfer {session.transfer_id})")
        if history is None or dry:
            return None
        source, destination = (f"resync://{session.client_id}", session.target) if push else \
            (session.target, f"resync://{session.client_id}")
        try:
            session.recorder = RunRecorder(history, "serve", source, destination, deferred=True)
        except HistoryError as exc:             # the history's disk full: the transfer goes on, unrecorded
            log(f"{session.client_id}: {what}: not recorded in the history: {exc}")
            return None
        in_order(session.recorder.begin)
        if not push:
            return None
        return Report(RunStats(), on_file=session.recorder.file, on_entry=session.recorder.entry)
    return make


def answer_unknown_connections(server, resets: StatelessReset) -> None:
    """A short-header packet of a connection this server does not know (it
    restarted since, or forgot it) is answered with a stateless reset
    (resync.net.reset); aioquic drops such packets without a word."""
    handle = server.datagram_received

    def datagram_received(data, addr) -> None:
        if data and not data[0] & 0x80 and bytes(data[1:1 + CID_LENGTH]) not in server._protocols:
            reset = resets.packet(data)
            if reset is not None:
                server._transport.sendto(reset, addr)
            return
        handle(data, addr)
    server.datagram_received = datagram_received


def _shown(session) -> str:
    """module/path a session's client named (for the log)."""
    if session.module is None or session.hello is None:
        return "?"
    return f"{session.module.name}/{os.fsdecode(session.hello.path).strip('/')}".rstrip("/")


def peer_host(link) -> str:
    addr = link.peer_address()
    return addr[0] if addr else ""


def peer_of(link) -> str:
    """The peer's address as HOST:PORT (as far as the connection knows it)."""
    addr = link.peer_address()
    if not addr:
        return "an unknown address"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Stats:
    """A receiver's statistics (the Done frame's JSON) as the recorder reads them."""

    def __init__(self, d: dict):
        self.__dict__.update({k: d.get(k, 0) for k in (
            "files", "files_transferred", "deleted", "bytes_scanned", "bytes_literal", "bytes_matched",
            "bytes_written", "errors", "duration", "created", "updated", "vanished")})
