"""A relay's spool: the sealed envelopes it holds in custody (docs/relay.md),
on disk, with what it must remember of each — and of those it gave up —
so that a relay killed at any moment finds every envelope whole or absent.

Layout, in the spool's directory (one file system: renames are atomic):

- ``envelopes/ID`` — an envelope's bytes (its hop part as it arrived), named
  by its id (hex BLAKE3 of the bytes no relay may change);
- ``envelopes/ID.json`` — what the relay knows of it (``Held``), replaced
  atomically as it changes;
- ``partial/ID`` — an envelope being received (its head, then its payload
  as far as it came): a cut transfer resumes at its end, from whichever
  node offers that id next; it becomes ``envelopes/ID`` (renamed) only
  once whole and verified, so nothing half-received is ever visible;
- ``tombstones/ID`` — an envelope delivered or removed, kept until its
  expiry so that a copy arriving again (another relay, a disk, a replay)
  is refused as a duplicate;
- every file is written beside its name (fs.atomic_output: a temporary
  file, fsync, rename, directory fsync — NNCP's spool and RFC 9171's
  custody ask no less); a temporary file a crash left is removed at the
  next start;
- ``events.ndjson`` — every custody taken, refusal, forward, expiry and
  removal, with its reason, one JSON object a line.

Admission never evicts: an envelope that would pass the cap or leave the
disk with less than ``min_free`` bytes is refused ("storage depleted") and
its sender keeps custody (ION's and DTN Marshall Enterprise's rule).
Envelopes are kept until their lifetime ends — the source's expiry, or the
relay's ``max_hold`` if shorter (recorded as such: RFC 9171's lifetime
override) —, never dropped after a number of failed forwards: those are
marked stuck and tried less often.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ResyncError

MIN_FREE = 64 << 20               # bytes the disk keeps free whatever the cap
BACKOFF_FIRST = 10_000            # ms before a failed forward is tried again, doubling ...
BACKOFF_CAP = 3_600_000           # ... to an hour at most (with jitter: 50-100 %)
STUCK_AFTER = 8                   # failed forwards after which an envelope is marked stuck (and kept)
PRIORITY_ORDER = {"critical": 0, "high": 1, "normal": 2}
GIVEN_UP = ("expired", "hold time ended", "removed")   # tombstones of envelopes dropped here, not passed on


class Refused(ResyncError):
    """refused: {}"""

    exit_code = 13

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass
class Held:
    """An envelope in custody: its id (hex), size, header's routing fields,
    when it arrived and from whom, its effective expiry (and whether the
    relay's hold time shortened it), and its forwarding state."""

    id: str
    size: int
    destination: str                       # hex device hash
    source: str                            # hex device hash of the source
    priority: str
    created: int                           # ms (the source's clock)
    expires: int                           # ms: when this relay gives it up
    source_expires: int                    # ms: the source's expiry
    shortened: bool                        # the relay's max_hold ended it before the source's expiry
    received: int                          # ms (this relay's clock)
    previous: str                          # hex device hash of the node it came from
    hops: int
    attempts: int = 0
    next_attempt: int = 0                  # ms
    stuck: bool = False
    last_error: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class _Ingest:
    """An envelope being received: its head parsed, its whole size, the
    partial file's descriptor and end, the node it comes from."""

    env: object
    size: int
    fd: int
    end: int
    previous: bytes


def _now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    """The envelopes a relay holds in ``directory`` (made 0700), at most
    ``cap`` bytes of them (0: the disk's free space only), each kept at
    most ``max_hold`` ms (0: until the source's expiry)."""

    def __init__(self, directory: str | os.PathLike, cap: int = 0, max_hold: int = 0, min_free: int = MIN_FREE,
                 lock_wait: float | None = None, read_only: bool = False):
        self.root = Path(directory)
        self.read_only = read_only              # look, change nothing (a running relay's spool: export)
        self.cap, self.max_hold, self.min_free = cap, max_hold, min_free
        self.envelopes, self.tombstones = self.root / "envelopes", self.root / "tombstones"
        self.partial = self.root / "partial"
        for d in (self.root, self.envelopes, self.tombstones, self.partial):
            if not read_only:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.index: dict[str, Held] = {}
        self.ingesting: dict[str, _Ingest] = {}      # envelopes being received now (begin ... finish)
        self.on_event = None                    # on_event(event): each event (a dict) as it is recorded
        self._lock = -1
        if lock_wait is not None:
            self._take_lock(lock_wait)
        self.recover()

    def _take_lock(self, wait: float) -> None:
        """One process changes a spool at a time (a daemon holds its spool's
        ``lock`` as long as it runs; a command waits ``wait`` s for it):
        ResyncError (exit 13 as a refusal) when another holds it longer."""
        import fcntl
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fd
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Refused("in use", f"{self.root}: another process (a running relay?) holds this spool; "
                                            "hand envelopes to a running relay through its resync:// URL") from None
                time.sleep(0.1)

    def close(self) -> None:
        """Let go of the spool's lock (the process's exit does too)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # -- start ------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """What a crash left: temporary files removed, an envelope without
        its record verified and indexed again (one that does not verify is
        removed), a record without its envelope dropped. Lines saying what
        was done."""
        from ..fs import TEMP_PREFIX
        from ..relay.envelope import EnvelopeError, parse, verify
        if self.read_only:
            self.index = {}
            for record in self.envelopes.glob("*.json"):
                try:
                    if (self.envelopes / record.name[:-5]).exists():
                        self.index[record.name[:-5]] = Held(**json.loads(record.read_text()))
                except (OSError, ValueError, TypeError):
                    continue
            return []
        said = []
        for d in (self.envelopes, self.tombstones):     # (partial/ stays: a cut transfer resumes from it)
            for p in d.glob(TEMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
                said.append(f"removed a partial write: {p.name}")
        self.index = {}
        names = {p.name for p in self.envelopes.iterdir()}
        for name in sorted(names):
            if name.endswith(".json"):
                if name[:-5] not in names:
                    (self.envelopes / name).unlink(missing_ok=True)
                    said.append(f"dropped the record of a missing envelope {name[:-5]}")
                continue
            record = self.envelopes / (name + ".json")
            try:
                self.index[name] = Held(**json.loads(record.read_text()))
                continue
            except (OSError, ValueError, TypeError):
                pass
            try:
                env = parse((self.envelopes / name).read_bytes())
                verify(env)
                if env.id.hex() != name:
                    raise EnvelopeError("its id is not its name")
            except (OSError, EnvelopeError) as exc:
                (self.envelopes / name).unlink(missing_ok=True)
                said.append(f"removed {name}: {exc}")
                continue
            self.index[name] = self._held(env, len(env.to_bytes()), _now_ms(), env.hops.previous)
            self._save(self.index[name])
            said.append(f"indexed {name} again")
        for line in said:
            self._event("recovered", "", line)
        return said

    # -- custody ----------------------------------------------------------------------
    def used(self) -> int:
        """Bytes held, reserved for the envelopes being received, and left in
        ``partial/`` by cut transfers (kept for a resume, so counted: an
        allowed device cutting transfers on purpose cannot pass the cap)."""
        left = 0
        try:
            for p in self.partial.iterdir():
                if p.name not in self.ingesting:
                    try:
                        left += p.stat().st_size
                    except OSError:
                        pass
        except OSError:
            pass
        return sum(h.size for h in self.index.values()) + sum(i.size for i in self.ingesting.values()) + left

    def _held(self, env, size: int, now: int, previous: bytes, key: str | None = None) -> Held:
        h = env.header
        expires, shortened = h.expires, False
        if self.max_hold and now + self.max_hold < h.expires:
            expires, shortened = now + self.max_hold, True
        from ..relay.keys import key_hash
        return Held(key or env.id.hex(), size, h.destination.hex(), key_hash(h.source).hex(), h.priority, h.created,
                    expires, h.expires, shortened, now, previous.hex(), env.hops.count)

    def admit(self, env, size: int, now: int | None = None, key: str | None = None) -> None:
        """Whether the relay may take custody of ``env`` (``size`` bytes;
        ``key``: its id, hex, when only its head is here yet): Refused with
        its reason — ``expired`` (on arrival), ``hop limit``, ``duplicate``
        (held, or passed on here before its expiry), ``removed`` (given up
        here before: expired, hold time ended, the operator), ``busy`` (being
        received on another connection),
        ``storage depleted`` (the cap, or the disk's free space)."""
        now = _now_ms() if now is None else now
        h, key = env.header, key or env.id.hex()
        if h.expires <= now:
            raise Refused("expired", "its lifetime ended before it arrived")
        if env.hops.count >= h.hop_limit:
            raise Refused("hop limit", f"{env.hops.count} hops of {h.hop_limit}")
        if key in self.index:
            raise Refused("duplicate", "held here already")
        if key in self.ingesting:               # (not a duplicate: nothing is held yet; the sender keeps it)
            raise Refused("busy", "being received here on another connection; try again later")
        gone = self._tombstone(key, now)
        if gone in GIVEN_UP:                    # (not here, and never passed on: not a duplicate)
            raise Refused("removed", f"given up here before ({gone})")
        if gone is not None:
            raise Refused("duplicate", "delivered or removed here before")
        if self.cap and self.used() + size > self.cap:
            raise Refused("storage depleted", f"{self.used() + size} bytes would pass the cap of {self.cap}")
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < size + self.min_free:
            raise Refused("storage depleted", f"the disk has {st.f_bavail * st.f_frsize} bytes free")

    def put(self, data: bytes, previous: bytes = bytes(32), now: int | None = None) -> Held:
        """Take custody of the whole envelope ``data`` from node ``previous``
        (its device hash): ``begin``, ``write``, ``finish`` at once. A carried
        envelope (sneakernet) and a relayed one take the same path."""
        from ..relay.envelope import HEAD_SIZE, EnvelopeError, parse
        env = parse(data)
        key = env.id.hex()
        self.begin(data[:HEAD_SIZE], key, previous, now)
        try:
            self.write(key, 0, memoryview(data)[HEAD_SIZE:])
            return self.finish(key, now)
        except (Refused, EnvelopeError):
            raise
        except BaseException:
            self.abandon(key, keep=False)
            raise

    def begin(self, head: bytes, key: str, previous: bytes = bytes(32), now: int | None = None) -> int:
        """An envelope offered: its head (envelope.HEAD_SIZE bytes: magic,
        signed header, hop part) and its id ``key`` (hex), from node
        ``previous``. Its header's signature is checked (EnvelopeError) and it
        is admitted (Refused, recorded) before a byte of its payload comes;
        the payload's bytes already here from a cut transfer are kept: the
        offset to resume from is returned. ``write`` then ``finish`` (or
        ``abandon``)."""
        from ..relay.envelope import HEAD_SIZE, parse_head, verify_header
        now = _now_ms() if now is None else now
        env = parse_head(head)
        verify_header(env)
        size = HEAD_SIZE + env.header.payload_length
        try:
            self.admit(env, size, now, key)
        except Refused as exc:
            self._event("refused", key, str(exc), reason=exc.reason)
            raise
        path = self.partial / key
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise self._no_space(key, exc) from None
        try:
            have = os.fstat(fd).st_size
            offset = min(max(0, have - HEAD_SIZE), env.header.payload_length)
            os.ftruncate(fd, HEAD_SIZE + offset)
            from ..fs import pwrite_all
            pwrite_all(fd, head, 0)             # (this offer's hop part)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise self._no_space(key, exc) from None
        self.ingesting[key] = _Ingest(env, size, fd, HEAD_SIZE + offset, previous)
        return offset

    def write(self, key: str, offset: int, data) -> None:
        """The payload's bytes at ``offset`` of an envelope begun: in order,
        each piece where the last ended (ValueError otherwise). A full disk
        is a refusal ("storage depleted"), the partial file removed."""
        from ..fs import pwrite_all
        from ..relay.envelope import HEAD_SIZE
        ing = self.ingesting[key]
        if HEAD_SIZE + offset != ing.end or ing.end + len(data) > ing.size:
            raise ValueError(f"payload bytes at {offset} of {key[:16]}: expected {ing.end - HEAD_SIZE}")
        try:
            pwrite_all(ing.fd, data, ing.end)
        except OSError as exc:
            self.abandon(key, keep=False)
            raise self._no_space(key, exc) from None
        ing.end += len(data)

    def finish(self, key: str, now: int | None = None) -> Held:
        """Every payload byte of ``key`` is in: fsynced, verified (its id,
        the payload's length and BLAKE3: EnvelopeError, the partial file
        removed), recorded, renamed into ``envelopes/``, the directories
        fsynced, indexed: custody taken."""
        import blake3

        from ..relay.envelope import HEAD_SIZE, EnvelopeError
        now = _now_ms() if now is None else now
        ing = self.ingesting[key]
        env = ing.env
        try:
            if ing.end != ing.size:
                raise EnvelopeError(f"{ing.end - HEAD_SIZE} of {env.header.payload_length} payload bytes")
            os.fsync(ing.fd)
            payload, whole = blake3.blake3(), blake3.blake3(env.signed)     # (the id: signed header + payload)
            with open(self.partial / key, "rb") as f:
                f.seek(HEAD_SIZE)
                while chunk := f.read(1 << 20):
                    payload.update(chunk)
                    whole.update(chunk)
            if payload.digest() != env.header.payload_hash:
                raise EnvelopeError("the payload does not match its hash (changed on the way?)")
            if whole.hexdigest() != key:
                raise EnvelopeError("its bytes are not the id it was offered as")
        except EnvelopeError as exc:
            self.abandon(key, keep=False)
            self._event("refused", key, str(exc), reason="invalid")
            raise
        except OSError as exc:
            self.abandon(key, keep=False)
            raise self._no_space(key, exc) from None
        held = self._held(env, ing.size, now, ing.previous, key)
        from ..errors import NoSpaceError
        try:
            self._save(held)                    # (a crash before the rename: a record alone, dropped)
            os.rename(self.partial / key, self.envelopes / key)
            self._sync(self.envelopes)
            self._sync(self.partial)
        except (NoSpaceError, OSError, ResyncError) as exc:
            (self.envelopes / (key + ".json")).unlink(missing_ok=True)
            self.abandon(key, keep=False)
            raise self._no_space(key, exc) from None
        self._close(key)
        self.index[key] = held
        self._event("taken", key, f"{held.size} bytes from {held.previous[:16]}", priority=held.priority,
                    expires=held.expires, shortened=held.shortened, size=held.size)
        return held

    def abandon(self, key: str, keep: bool = True) -> None:
        """Stop receiving ``key`` (a cut connection: ``keep`` what came, for a
        resume by offset; a refusal: remove it)."""
        self._close(key)
        if not keep:
            (self.partial / key).unlink(missing_ok=True)

    def _close(self, key: str) -> None:
        ing = self.ingesting.pop(key, None)
        if ing is not None:
            try:
                os.close(ing.fd)
            except OSError:
                pass

    def _no_space(self, key: str, exc) -> ResyncError:
        """An OSError while receiving ``key``: a full disk is a refusal
        ("storage depleted", recorded), anything else the I/O error it is."""
        from ..fs import NO_SPACE, os_error
        if getattr(exc, "errno", None) in NO_SPACE or type(exc).__name__ == "NoSpaceError":
            (self.partial / key).unlink(missing_ok=True)
            self._event("refused", key, "the disk filled while it was written", reason="storage depleted")
            return Refused("storage depleted", "the disk filled while it was written")
        return exc if isinstance(exc, ResyncError) else os_error(str(self.partial / key), exc)

    def head(self, key: str) -> bytes:
        """The first HEAD_SIZE bytes of a held envelope (its hop part as it arrived)."""
        from ..relay.envelope import HEAD_SIZE
        with open(self.envelopes / key, "rb") as f:
            return f.read(HEAD_SIZE)

    def payload(self, key: str, offset: int, n: int) -> bytes:
        """``n`` bytes (fewer at the end) of a held envelope's payload from ``offset``."""
        from ..relay.envelope import HEAD_SIZE
        fd = os.open(self.envelopes / key, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, n, HEAD_SIZE + offset)
        finally:
            os.close(fd)

    def read(self, key: str) -> bytes:
        return (self.envelopes / key).read_bytes()

    def due(self, now: int | None = None, destination: str | None = None, backoff: bool = True) -> list[Held]:
        """The envelopes to forward now (not waiting out a backoff, unless
        ``backoff`` is False: a destination calling in for its mailbox), in
        priority order, oldest first within a class; ``destination``: those
        for one device (hex device hash)."""
        now = _now_ms() if now is None else now
        out = [h for h in self.index.values() if (h.next_attempt <= now or not backoff) and h.expires > now
               and (destination is None or h.destination == destination)]
        return sorted(out, key=lambda h: (PRIORITY_ORDER[h.priority], h.created, h.id))

    def failed(self, key: str, error: str, now: int | None = None, rng: random.Random | None = None) -> Held:
        """A forward of ``key`` failed: tried again after a backoff (doubling,
        with jitter); after STUCK_AFTER failures it is marked stuck — kept
        until its expiry, tried at the backoff's cap."""
        now = _now_ms() if now is None else now
        h = self.index[key]
        h.attempts += 1
        wait = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (h.attempts - 1)) * (rng or random).uniform(0.5, 1.0)
        h.next_attempt, h.last_error = now + int(wait), error
        if h.attempts >= STUCK_AFTER and not h.stuck:
            h.stuck = True
            self._event("stuck", key, f"{h.attempts} forwards failed; kept until it expires: {error}")
        self._save(h)
        return h

    def remove(self, key: str, reason: str, now: int | None = None) -> None:
        """Give up custody of ``key`` (``reason``: delivered — the next hop
        acknowledged it —, expired, removed by the operator ...): its bytes
        deleted, a tombstone kept until its expiry, the event recorded."""
        now = _now_ms() if now is None else now
        h = self.index.pop(key, None)
        expires = h.source_expires if h is not None else now
        try:
            self._write(self.tombstones / key, json.dumps({"expires": expires, "reason": reason, "at": now}).encode())
        except (OSError, ResyncError):          # (a full disk: the removal itself must still happen)
            pass
        finally:
            (self.envelopes / key).unlink(missing_ok=True)
            (self.envelopes / (key + ".json")).unlink(missing_ok=True)
            self._sync(self.envelopes)
        self._event(reason, key, "", size=h.size if h is not None else None,
                    priority=h.priority if h is not None else None)

    def expire(self, now: int | None = None) -> list[tuple[str, str]]:
        """The maintenance cycle: every envelope whose lifetime has ended is
        removed (reason ``expired``, or ``hold time ended`` when the relay's
        max_hold ended it first) and counted in the events; tombstones past
        their expiry are forgotten. The (id, reason) removed."""
        now = _now_ms() if now is None else now
        gone = []
        for key, h in list(self.index.items()):
            if h.expires <= now:
                reason = "hold time ended" if h.shortened else "expired"
                self.remove(key, reason, now)
                gone.append((key, reason))
        for p in self.tombstones.iterdir():
            try:
                if json.loads(p.read_text())["expires"] <= now:
                    p.unlink()
            except (OSError, ValueError, KeyError):
                p.unlink(missing_ok=True)
        from ..relay.envelope import HEAD_SIZE, EnvelopeError, parse_head
        for p in self.partial.iterdir():        # what a cut transfer left, once its envelope has expired
            if p.name in self.ingesting:
                continue
            try:
                with open(p, "rb") as f:
                    ended = parse_head(f.read(HEAD_SIZE)).header.expires <= now
            except (OSError, EnvelopeError):
                ended = True
            if ended:
                p.unlink(missing_ok=True)
                self._event("expired", p.name, "a partial envelope, never completed")
        return gone

    def status(self, now: int | None = None) -> dict:
        """Queued bytes and envelopes per priority and per destination, the
        oldest envelope's age, the stuck ones (``resync relay status``, the
        API)."""
        now = _now_ms() if now is None else now
        out = {"envelopes": len(self.index), "bytes": self.used(), "cap": self.cap,
               "by_priority": {p: {"envelopes": 0, "bytes": 0} for p in PRIORITY_ORDER}, "by_destination": {},
               "stuck": sum(h.stuck for h in self.index.values()),
               "oldest_seconds": round((now - min((h.received for h in self.index.values()), default=now)) / 1000, 3)}
        for h in self.index.values():
            for group in (out["by_priority"][h.priority],
                          out["by_destination"].setdefault(h.destination, {"envelopes": 0, "bytes": 0})):
                group["envelopes"] += 1
                group["bytes"] += h.size
        return out

    # -- the files ----------------------------------------------------------------------
    def _tombstone(self, key: str, now: int) -> str | None:
        """Why ``key`` was given up here, while its tombstone lasts; else None."""
        try:
            t = json.loads((self.tombstones / key).read_text())
            return str(t.get("reason", "")) if t["expires"] > now else None
        except (OSError, ValueError, KeyError, AttributeError):
            return None

    def _save(self, held: Held) -> None:
        self._write(self.envelopes / (held.id + ".json"), json.dumps(asdict(held), sort_keys=True).encode())

    def _write(self, path: Path, data: bytes) -> None:
        from ..fs import write_durable
        write_durable(path, data, mode=0o600)

    @staticmethod
    def _sync(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def held(self, limit: int = 100) -> list[dict]:
        """The envelopes held, oldest first (``limit`` at most): what an
        operator sees of each (no name: the relay has none)."""
        from ..identity import device_id_of_hash
        out = []
        for h in sorted(self.index.values(), key=lambda h: h.received)[:limit]:
            out.append({"id": h.id, "bytes": h.size, "priority": h.priority,
                        "destination": device_id_of_hash(bytes.fromhex(h.destination)),
                        "source": device_id_of_hash(bytes.fromhex(h.source)), "received": h.received,
                        "expires": h.expires, "shortened": h.shortened, "hops": h.hops, "attempts": h.attempts,
                        "stuck": h.stuck, "last_error": h.last_error})
        return out

    def _event(self, kind: str, key: str, detail: str, **more) -> None:
        event = {"at": _now_ms(), "event": kind, "id": key, "detail": detail, **more}
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:                   # (a metric or the history must never fail a custody)
                pass
        line = json.dumps(event, sort_keys=True)
        try:
            with open(self.root / "events.ndjson", "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass                                # (a full disk: the custody itself is what matters)
