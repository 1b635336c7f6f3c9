"""The daemon's own transfers: pushes and pulls between a local directory
and a ``resync://`` URL, submitted through its API (``POST
/api/v1/transfers``, ``resync transfer add``) and run on its event loop —
the one its server and API run on — by the client's code (net.client), as
``resync sync`` runs them.

Each is a *session*, persisted (store.sessions: one JSON document each,
replaced atomically at every change) so that it survives the daemon's
restart, SIGKILL included. Its states (docs/api.md, "Sessions")::

    pending -> active <-> paused -> completed | failed | cancelled | expired
       \\______________/^

- ``pending``: waiting for a slot (``max_active`` run at once; the next is
  the oldest of the highest priority, critical before high before normal);
- ``active``: connecting, transferring, or waiting to retry a lost
  connection or a busy destination (backoff 1 s doubling to 60 s, as the
  CLI's, until the session expires);
- ``paused``: the operator paused it (or all); a running one is cut as a
  lost connection is, so that both ends checkpoint what arrived, and a
  resumed one carries on from there (nothing that arrived is sent again);
- ``completed``, ``failed`` (a refusal, a protocol error, an error the
  destination reported), ``cancelled`` (the operator), ``expired`` (not
  completed within its TTL, counted from its submission).

A daemon stopping (SIGTERM) cuts its running sessions the same way and
leaves them ``active``: started again, it resumes them first, then starts
the pending ones. A session killed with the daemon resumes from the
checkpoints the receiving end kept (the resume of the protocol).
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from ..errors import ConnectionFailed, ResyncError, TimedOut

PRIORITIES = ("critical", "high", "normal")
STATES = ("pending", "active", "paused", "completed", "failed", "cancelled", "expired")
ENDED = frozenset({"completed", "failed", "cancelled", "expired"})
DEFAULT_TTL = 7 * 86400.0         # s a session may take from its submission to its completion
MAX_TTL = 366 * 86400.0
MAX_ACTIVE = 4                    # sessions running at once (more wait, pending)
KEEP_ENDED = 1000                 # ended sessions kept (listed, and on disk); the oldest are forgotten first
CHECKPOINT_EVERY = 10.0           # s between the records of a running session's progress
EXPIRY_CHECK = 30.0               # s between looks for sessions past their TTL
PROGRESS_EVERY = 1.0              # s between TransferProgress events of a running session

# The body of POST /api/v1/transfers (docs/api.md): key -> (type, default)
_SUBMIT = {
    "source": (str, None), "destination": (str, None), "priority": (str, "normal"),
    "ttl_seconds": ((int, float), DEFAULT_TTL), "delete": (bool, False), "checksum": (bool, False),
    "whole_file": (bool, False), "sparse": (bool, False), "dry_run": (bool, False),
    "max_delete": (int, None), "exclude": (list, []), "bytes_per_second": ((int, float), 0),
    "shards_per_second": ((int, float), 0), "transport": (str, "auto"), "peer_id": (str, None),
    "accept_new": (bool, False), "timeout": ((int, float), 60.0),
}


class Conflict(ResyncError):
    """{}"""

    # A transition the session's state does not allow (the API's 409).


class NotFound(ResyncError):
    """no such transfer: {}"""


class _Interrupted(Exception):
    """A running session stopped by the daemon: ``state`` is where it goes
    (paused, cancelled, expired; active when the daemon stops)."""

    def __init__(self, state: str):
        super().__init__(state)
        self.state = state


def parse_submission(body, now: float) -> dict:
    """A new session's record from the body of ``POST /api/v1/transfers``
    (a JSON object: ``source`` and ``destination``, one of them a
    ``resync://`` URL and the other an absolute local path, and the options
    of _SUBMIT). ValueError (the API's 400) with a one-line reason."""
    from ..errors import UsageError
    from .url import parse_url
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - set(_SUBMIT))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_SUBMIT))})")
    spec = {}
    for key, (kind, default) in _SUBMIT.items():
        value = body.get(key, default)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"{key}: expected {_kind_name(kind)}")
        spec[key] = list(value) if isinstance(value, list) else value
    if spec["source"] is None or spec["destination"] is None:
        raise ValueError("source and destination are required")
    try:
        src, dst = parse_url(spec["source"]), parse_url(spec["destination"])
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    if (src is None) == (dst is None):
        raise ValueError("one of source and destination must be a resync:// URL, the other a local path")
    push = dst is not None
    local = spec["source"] if push else spec["destination"]
    if not os.path.isabs(local):
        raise ValueError(f"{local}: the local path must be absolute (the daemon has no working directory of yours)")
    local = os.path.normpath(local)
    if push and not os.path.isdir(local):
        raise ValueError(f"{local}: not a directory")
    if not push and not os.path.isdir(os.path.dirname(local) or "/"):
        raise ValueError(f"{os.path.dirname(local)}: no such directory (the destination's parent must exist)")
    if spec["priority"] not in PRIORITIES:
        raise ValueError(f"priority {spec['priority']!r}: one of {', '.join(PRIORITIES)}")
    if not 1 <= spec["ttl_seconds"] <= MAX_TTL:
        raise ValueError(f"ttl_seconds: from 1 to {MAX_TTL:.0f}")
    if spec["transport"] not in ("auto", "quic", "tcp"):
        raise ValueError("transport: auto, quic or tcp")
    if not all(isinstance(p, str) for p in spec["exclude"]):
        raise ValueError("exclude: expected a list of patterns")
    if spec["max_delete"] is not None and spec["max_delete"] < 0:
        raise ValueError("max_delete: expected a whole number, 0 or more")
    if not 1 <= spec["timeout"] <= 3600:
        raise ValueError("timeout: from 1 to 3600 s")
    _check_limits(spec["bytes_per_second"], spec["shards_per_second"])
    if spec["peer_id"] is not None:
        from ..identity import parse_device_id
        try:
            spec["peer_id"] = parse_device_id(spec["peer_id"])
        except ResyncError as exc:
            raise ValueError(str(exc)) from None
    remote = dst if push else src
    options = {k: spec[k] for k in ("delete", "checksum", "whole_file", "sparse", "dry_run", "max_delete",
                                    "exclude", "transport", "peer_id", "accept_new", "timeout")}
    return {"id": os.urandom(8).hex(), "kind": "outbound", "direction": "push" if push else "pull",
            "source": spec["source"] if not push else local, "destination": local if not push else spec["destination"],
            "local": local, "remote": str(remote), "module": remote.module, "priority": spec["priority"],
            "state": "pending", "created": now, "started": None, "ended": None,
            "expires": now + spec["ttl_seconds"], "attempts": 0, "error": None, "outcome": None,
            "peer_id": spec["peer_id"], "transfer_id": None, "exit_code": None, "options": options,
            "limits": {"bytes_per_second": spec["bytes_per_second"], "shards_per_second": spec["shards_per_second"]},
            "progress": {"files_done": 0, "files_total": None, "bytes_done": 0, "bytes_total": None,
                         "rate_bytes_per_second": 0, "eta_seconds": None},
            "result": None}


def _kind_name(kind) -> str:
    names = {str: "a string", bool: "true or false", int: "a whole number", list: "a list"}
    return names.get(kind, "a number")


def _check_limits(rate, shards) -> None:
    for name, value in (("bytes_per_second", rate), ("shards_per_second", shards)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected a number, 0 or more (0: no limit)")


def parse_change(body) -> tuple[str | None, dict]:
    """The body of ``PATCH /api/v1/transfers/{id}``: its priority (None:
    unchanged) and its limits (as ``parse_limits``); ValueError otherwise."""
    if not isinstance(body, dict) or not body:
        raise ValueError("the body must be a JSON object with priority, bytes_per_second or shards_per_second")
    unknown = sorted(set(body) - {"priority", "bytes_per_second", "shards_per_second"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: priority, bytes_per_second, shards_per_second)")
    priority = body.get("priority")
    if "priority" in body and priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r}: one of {', '.join(PRIORITIES)}")
    return priority, parse_limits({k: v for k, v in body.items() if k != "priority"})


def parse_limits(body) -> dict:
    """``{"bytes_per_second": N, "shards_per_second": N}`` (either may be
    left out: unchanged) from an API body; ValueError otherwise."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - {"bytes_per_second", "shards_per_second"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: bytes_per_second, shards_per_second)")
    _check_limits(body.get("bytes_per_second", 0), body.get("shards_per_second", 0))
    return dict(body)


@dataclass
class _Run:
    """A running session's live parts (not persisted)."""

    task: asyncio.Task | None = None
    stop: object = None                         # client._Stop of the attempt running, if one is
    wanted: str | None = None                   # the state the operator asked for (paused, cancelled, ...)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    counts: object = None                       # progress.Counts
    saved: float = 0.0                          # when its progress was last recorded


class Sessions:
    """The daemon's own transfers (see the module). ``store``:
    store.sessions.SessionStore; ``identity``: this device's; ``config_dir``:
    its known_peers; ``history``: the history database (None: runs are not
    recorded); ``events``: net.events.Events; ``metrics``:
    metrics.ServerMetrics or None; ``limits``: the daemon's TokenBuckets
    (bytes, shards) every session's link passes; ``log(text)``."""

    def __init__(self, store, identity, config_dir, history, events, metrics, limits, log,
                 max_active: int = MAX_ACTIVE):
        self.store, self.identity, self.config_dir, self.history = store, identity, config_dir, history
        self.events, self.metrics, self.limits, self.log = events, metrics, limits, log
        self.max_active = max_active
        self.records: dict[str, dict] = {}
        self.runs: dict[str, _Run] = {}
        self.buckets: dict[str, tuple] = {}     # id -> (bytes, shards) TokenBuckets of the session
        self.closing = False
        self._expiry = self._ticking = None
        from .channels import Pool
        self.pool = Pool(limits)                # its transfers to one server share a QUIC connection

    # -- the daemon's start and stop -----------------------------------------------------
    def restore(self) -> None:
        """The sessions recorded, taken up again: active ones resume first,
        then pending ones start (in priority order); those past their TTL
        expire."""
        records, problems = self.store.load()
        for line in problems:
            self.log(f"session not read: {line}")
        resumed = 0
        for r in records:
            self.records[r["id"]] = r
            if r["state"] == "active":
                r["state"], r["resumed"] = "pending", True
                resumed += 1
        self._forget_old()
        if records:
            waiting = sum(1 for r in self.records.values() if r["state"] == "pending")
            self.log(f"sessions: {len(records)} recorded, {waiting} to run ({resumed} cut by the daemon's stop)")
        self.schedule()

    async def close(self) -> None:
        """The daemon stops: running sessions are cut (checkpointed at both
        ends) and stay ``active`` for its next start."""
        self.closing = True
        for timer in (self._expiry, self._ticking):
            if timer is not None:
                timer.cancel()
        tasks = []
        for sid, run in list(self.runs.items()):
            self._interrupt(sid, "active")
            if run.task is not None:
                tasks.append(run.task)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.pool.close()

    # -- what the API asks ---------------------------------------------------------------
    def submit(self, body) -> dict:
        """A new session (ValueError: the body is not one); pending, and
        started if a slot is free."""
        record = parse_submission(body, time.time())
        self._save(record)
        self.records[record["id"]] = record
        self.events.publish("TransferQueued", self.described(record))
        self.log(f"session {record['id']}: {record['direction']} {record['source']} -> {record['destination']}: "
                 f"queued ({record['priority']})")
        self.schedule()
        return record

    def get(self, sid: str) -> dict:
        r = self.records.get(sid)
        if r is None:
            raise NotFound(sid)
        return r

    def pause(self, sid: str) -> dict:
        r = self.get(sid)
        if r["state"] not in ("pending", "active"):
            raise Conflict(f"transfer {sid} is {r['state']}: only a pending or active one can be paused")
        if r["state"] == "active":
            self._interrupt(sid, "paused")      # (paused once its attempt has stopped)
        else:
            self._set(r, "paused")
        return r

    def resume(self, sid: str) -> dict:
        r = self.get(sid)
        if r["state"] != "paused":
            raise Conflict(f"transfer {sid} is {r['state']}: only a paused one can be resumed")
        self._set(r, "pending", event="TransferResumed")
        self.schedule()
        return r

    def cancel(self, sid: str) -> dict:
        r = self.get(sid)
        if r["state"] in ENDED:
            raise Conflict(f"transfer {sid} has ended ({r['state']})")
        if sid in self.runs:
            self._interrupt(sid, "cancelled")
        else:
            self._end(r, "cancelled", "cancelled by the operator")
        return r

    def change(self, sid: str, body) -> dict:
        """PATCH: ``priority`` and the session's own ``bytes_per_second`` /
        ``shards_per_second`` (ValueError for a bad body, Conflict once ended)."""
        r = self.get(sid)
        priority, limits = parse_change(body)
        if r["state"] in ENDED:
            raise Conflict(f"transfer {sid} has ended ({r['state']})")
        if priority is not None:
            r["priority"] = priority
            run = self.runs.get(sid)
            link = getattr(run.stop, "link", None) if run is not None else None
            if link is not None and hasattr(link, "priority"):
                link.priority = priority                # (its class on the shared connection, at once)
        r["limits"].update(limits)
        self._apply_limits(sid)
        self._save(r)
        self.events.publish("TransferChanged", self.described(r))
        self.schedule()
        return r

    def pause_all(self) -> list[str]:
        out = [sid for sid, r in self.records.items() if r["state"] in ("pending", "active")]
        for sid in out:
            self.pause(sid)
        return out

    def resume_all(self) -> list[str]:
        out = [sid for sid, r in self.records.items() if r["state"] == "paused"]
        for sid in out:
            self.resume(sid)
        return out

    def counts(self) -> dict:
        """Sessions by state (the status document)."""
        out = dict.fromkeys(STATES, 0)
        for r in self.records.values():
            out[r["state"]] += 1
        return out

    def queued(self) -> dict:
        """Pending sessions per priority (the queue-depth gauge)."""
        out = dict.fromkeys(PRIORITIES, 0)
        for r in self.records.values():
            if r["state"] == "pending":
                out[r["priority"]] += 1
        return out

    def described(self, r: dict) -> dict:
        """A session as the API shows it (docs/api.md, "Transfers")."""
        run = self.runs.get(r["id"])
        if run is not None and run.counts is not None:
            r["progress"] = run.counts.snapshot()
        out = {k: v for k, v in r.items() if k not in ("options", "resumed", "started_at")}
        out["options"] = dict(r["options"])
        if r["state"] == "active" and r.get("started_at"):
            out["elapsed_seconds"] = round(time.time() - r["started_at"], 3)
        return out

    def listed(self) -> list[dict]:
        """Every session, running and waiting first (newest first), then the ended ones."""
        rows = sorted(self.records.values(), key=lambda r: (r["state"] in ENDED, -(r["created"] or 0)))
        return [self.described(r) for r in rows]

    def tick(self) -> None:
        """A TransferProgress event for each running session every
        PROGRESS_EVERY s (and its progress recorded every CHECKPOINT_EVERY s)."""
        self._ticking = None
        now = time.monotonic()
        for sid, run in self.runs.items():
            r = self.records[sid]
            if r["state"] != "active":
                continue
            self.events.publish("TransferProgress", self.described(r))
            if now - run.saved >= CHECKPOINT_EVERY:
                run.saved = now
                self._save(r, quiet=True)
        self._arm_tick()

    def _arm_tick(self) -> None:
        if self.runs and self._ticking is None and not self.closing:
            self._ticking = asyncio.get_running_loop().call_later(PROGRESS_EVERY, self.tick)

    # -- running them --------------------------------------------------------------------
    def schedule(self) -> None:
        """Expire what is past its TTL, then start pending sessions while
        slots are free, highest priority first, oldest first."""
        if self.closing:
            return
        now = time.time()
        for sid, r in list(self.records.items()):
            if r["state"] not in ENDED and now >= r["expires"]:
                if sid in self.runs:
                    self._interrupt(sid, "expired")
                else:
                    self._end(r, "expired", "not completed within its TTL")
        waiting = sorted((r for r in self.records.values() if r["state"] == "pending" and r["id"] not in self.runs),
                         key=lambda r: (not r.get("resumed"), PRIORITIES.index(r["priority"]), r["created"]))
        for r in waiting[:max(0, self.max_active - len(self.runs))]:
            self._start(r)
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        live = [r["expires"] for r in self.records.values() if r["state"] not in ENDED]
        if live:
            wait = min(EXPIRY_CHECK, max(0.0, min(live) - time.time()) + 0.01)
            self._expiry = asyncio.get_running_loop().call_later(wait, self.schedule)

    def _start(self, r: dict) -> None:
        from ..progress import Counts
        run = self.runs[r["id"]] = _Run(counts=Counts())
        if r["started"] is None:
            r["started"] = time.time()
        r["started_at"] = time.time()
        r.pop("resumed", None)
        self._set(r, "active", event="TransferStarted")
        if self.metrics is not None:
            self.metrics.started(r["direction"])
        run.saved = time.monotonic()
        run.task = asyncio.get_running_loop().create_task(self._drive(r, run))
        self._arm_tick()

    def _interrupt(self, sid: str, state: str) -> None:
        """Stop a running session; it goes to ``state`` once its attempt has
        ended (a push's server told, a pull's receiver checkpointed)."""
        from ..protocol.common import CancelledError
        run = self.runs.get(sid)
        if run is None or run.wanted is not None:
            return
        run.wanted = state
        why = {"paused": "paused by the operator", "cancelled": "cancelled by the operator",
               "expired": "expired (its TTL)", "active": "the daemon is stopping"}[state]
        if run.stop is not None:
            cut = CancelledError(why) if state in ("cancelled", "expired") else ConnectionFailed(why)
            run.stop.interrupt(_Interrupted(state), cut)
        run.wake.set()

    def _transfer(self, r: dict):
        from pathlib import Path

        from ..protocol.session import Options
        from .client import Transfer
        from .feeder import TokenBucket
        from .url import parse_url
        o, lim = r["options"], r["limits"]
        own = self.buckets.get(r["id"])
        if own is None:
            own = self.buckets[r["id"]] = (TokenBucket(0), TokenBucket(0, "shards"))
        self._apply_limits(r["id"])
        push = r["direction"] == "push"
        options = Options(delete=o["delete"], checksum=o["checksum"], dry_run=o["dry_run"],
                          whole_file=o["whole_file"], sparse=o["sparse"], max_delete=o["max_delete"],
                          excludes=o["exclude"], bwlimit=0 if push else int(lim["bytes_per_second"] or 0))
        return Transfer(parse_url(r["remote"]), push, r["local"], options, peer_id=o["peer_id"],
                        accept_new=o["accept_new"], timeout=o["timeout"], retry_for=max(0.0, r["expires"] - time.time()),
                        known_peers=Path(self.config_dir) / "known_peers", transport=o["transport"],
                        limits=(*self.limits, *own), priority=r["priority"])

    def _apply_limits(self, sid: str) -> None:
        own, r = self.buckets.get(sid), self.records[sid]
        if own is not None:
            own[0].set_rate(r["limits"]["bytes_per_second"])
            own[1].set_rate(r["limits"]["shards_per_second"])

    async def _drive(self, r: dict, run: _Run) -> None:
        """Run session ``r`` to its end, or until the operator stops it."""
        from ..protocol.session import BusyError, ClientSession
        from .client import Attempts, _once, _Stop
        recorder = report = None
        try:
            t = self._transfer(r)
            recorder, report = self._recording(r)
            attempts = Attempts(t, report, run.counts)
            while True:
                if run.wanted is not None:
                    raise _Interrupted(run.wanted)
                attempts.begin()
                r["attempts"] += 1
                self._save(r, quiet=True)
                run.stop = _Stop(asyncio.get_running_loop(), asyncio.current_task())
                try:
                    session = await _once(t, self.identity, report, run.counts, None, attempts.path, run.stop,
                                          self.pool)
                except (ConnectionFailed, TimedOut, BusyError) as exc:
                    outcome = attempts.after(error=exc)
                else:
                    outcome = attempts.after(session)
                run.stop = None
                if isinstance(outcome, ClientSession):
                    break
                r["error"] = str(attempts.error)
                self._save(r, quiet=True)
                self.events.publish("TransferRetrying", {**self.described(r), "retry_in_seconds": round(outcome, 1)})
                try:
                    await asyncio.wait_for(run.wake.wait(), outcome)
                except asyncio.TimeoutError:
                    pass
            self._completed(r, outcome, t, recorder)
        except _Interrupted as exc:
            self._stopped(r, exc.state, recorder)
        except asyncio.CancelledError:
            self._stopped(r, run.wanted or "active", recorder)
        except ResyncError as exc:
            if run.wanted is not None:          # (the cut itself failed the attempt)
                self._stopped(r, run.wanted, recorder)
            else:                               # (a lost connection or a busy server ends it only at its TTL)
                state = "expired" if isinstance(exc, (ConnectionFailed, TimedOut)) or \
                    isinstance(exc, BusyError) or time.time() >= r["expires"] else "failed"
                self._finish_record(recorder, "failed")
                self._end(r, state, str(exc) if state == "failed" else f"not completed within its TTL: {exc}",
                          exc.exit_code if state == "failed" else None)
        except Exception as exc:                # a fault of resync's own: said, and the session failed
            self._finish_record(recorder, "failed")
            self._end(r, "failed", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.runs.pop(r["id"], None)
            if self.metrics is not None:
                self.metrics.stopped(r["direction"])
            if not self.closing:
                asyncio.get_running_loop().call_soon(self.schedule)

    def _recording(self, r: dict):
        """The history's recorder of this session's run (None: not
        recorded: no history, a dry run, or the history failed) and the
        session's report (a pull's Report: what it writes; a push's: the
        server's error lines, logged)."""
        from ..report import Report, RunStats
        recorder = None
        if self.history is not None and not r["options"]["dry_run"]:
            from ..store import HistoryError
            from ..store.recorder import RunRecorder
            try:
                recorder = RunRecorder(self.history, "sync", r["source"], r["destination"])
            except HistoryError as exc:
                self.log(f"session {r['id']}: not recorded in the history: {exc}")
        if r["direction"] == "push":
            return recorder, _ServerLines(self.log, r["id"])
        return recorder, Report(RunStats(), lambda line: None,
                                lambda message: self.log(f"session {r['id']}: {message}"),
                                recorder.file if recorder else None, recorder.entry if recorder else None,
                                dry_run=r["options"]["dry_run"])

    def _finish_record(self, recorder, status: str, stats=None, transfer=None) -> None:
        if recorder is not None:
            failed = recorder.finish(status, stats, transfer=transfer)
            if failed:
                self.log(f"history: {failed}")

    def _completed(self, r: dict, session, t, recorder) -> None:
        from ..report import RunStats
        from . import transfer_row
        from .client import result_of
        result = result_of(session, t)
        stats = RunStats.from_dict(result)
        wire = getattr(session, "transport", {})
        row = transfer_row(result, wire, r["remote"], getattr(session, "server_id", None), r["direction"])
        self._finish_record(recorder, stats.status, stats, row)
        r["peer_id"] = getattr(session, "server_id", None) or r["peer_id"]
        r["transfer_id"] = session.transfer_id
        r["outcome"] = stats.status
        r["result"] = {k: result.get(k) for k in ("files", "files_transferred", "bytes_transferred", "bytes_matched",
                                                  "deleted", "errors", "resumed_bytes", "bytes_on_wire_sent",
                                                  "bytes_on_wire_received", "duration", "transport")}
        error = stats.outcome_error()
        if self.metrics is not None:
            self.metrics.ended(r["direction"], r["module"], "completed", result.get("duration") or 0,
                               dict(row, bytes_sent=result.get("bytes_on_wire_sent"),
                                    bytes_received=result.get("bytes_on_wire_received"),
                                    shards_lost=wire.get("shards_lost")), running=False)
        self._end(r, "completed", str(error) if error is not None else None,
                  error.exit_code if error is not None else 0)

    def _stopped(self, r: dict, state: str, recorder) -> None:
        self._finish_record(recorder, "failed")
        run = self.runs.get(r["id"])
        if run is not None and run.counts is not None:
            r["progress"] = run.counts.snapshot()
        if state == "active":                   # the daemon stops: taken up again at its next start
            self._save(r, quiet=True)
        elif state == "paused":
            self._set(r, "paused")
        else:
            self._end(r, state, {"cancelled": "cancelled by the operator",
                                 "expired": "not completed within its TTL"}[state])

    def _end(self, r: dict, state: str, error: str | None, exit_code: int | None = None) -> None:
        """``exit_code``: what ``resync sync`` would have exited with
        (``resync transfer add --wait`` exits with it)."""
        r["ended"], r["error"] = time.time(), error
        r["exit_code"] = exit_code if exit_code is not None else \
            {"completed": 0, "cancelled": 13, "expired": 30}.get(state, 1)
        if state != "completed" and self.metrics is not None:
            self.metrics.ended(r["direction"], r["module"], state, (r["ended"] - (r.get("started") or r["ended"])), {},
                               running=False)
        self.buckets.pop(r["id"], None)
        self._set(r, state, event="TransferEnded")
        self.log(f"session {r['id']}: {r['direction']} {r['source']} -> {r['destination']}: {state}"
                 + (f": {error}" if error else ""))
        self._forget_old()

    def _set(self, r: dict, state: str, event: str | None = None) -> None:
        was, r["state"] = r["state"], state
        self._save(r, quiet=True)
        if event is None:
            event = {"paused": "TransferPaused"}.get(state, "TransferChanged")
        if was != state or event != "TransferChanged":
            self.events.publish(event, {**self.described(r), "previous_state": was})

    def _save(self, r: dict, quiet: bool = False) -> None:
        from ..store import HistoryError
        try:
            self.store.save({k: v for k, v in r.items() if k != "started_at"})
        except HistoryError as exc:
            if not quiet:
                raise
            self.log(str(exc))

    def _forget_old(self) -> None:
        ended = sorted((r for r in self.records.values() if r["state"] in ENDED), key=lambda r: r["ended"] or 0)
        for r in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self.records[r["id"]]
            try:
                self.store.remove(r["id"])
            except ResyncError as exc:
                self.log(str(exc))


class _ServerLines:
    """A daemon's push: the server's error lines, logged (its itemized lines
    are not asked for)."""

    def __init__(self, log, sid: str):
        self.log, self.sid = log, sid

    def remote(self, frame) -> None:
        from ..protocol.frames import ITEM_LINE
        if frame.kind != ITEM_LINE:
            self.log(f"session {self.sid}: the server says: {os.fsdecode(frame.text)}")
