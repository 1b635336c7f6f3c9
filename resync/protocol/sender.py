"""The sending end of a transfer: it lists its tree and sends what the
receiver asks for. Parts, each one job:

- ``Lister``: the tree as Dir frames, reached from the root's descriptor
  without following a symlink; the listed directories reopened for Wants;
- ``Stripes``: contents being sent as stripes — which shards go out next
  within the window, acknowledgements, repairs asked for, tail-loss probes;
- ``Packer``: small files' contents gathered into packs (shared stripes);
- ``Sender``: takes the receiver's frames, starts wanted files (reads them,
  makes a delta against the receiver's signature) and composes the above,
  with ``parity.ParityPlanner`` choosing each stripe's parity.
"""
from __future__ import annotations

import json
import os
import stat
import time
from collections import deque

from ..content import has_holes
from ..errors import ResyncError
from . import frames as F
from .common import (MEMBER_BASIS, MEMBER_FILE, PACK_FILE, QUIET_FACTOR, SMALL_FILE, WORK_SLICE, blake3_of, carried,
                     keyed_hash, progress_share)
from .frames import ProtocolError
from .parity import DEFAULT_K, ParityPlanner
from .shards import MAX_INDEX as MAX_SHARDS
from .shards import StripeEncoder
from .sparse import zero_free_runs

MAX_ACTIVE = 64                  # files being sent at once (open, with stripes in flight)
STREAM_HIGH = 256 << 10          # control bytes buffered before the sender stops listing ahead
RELIABLE_WINDOW = 32 << 20       # content bytes unacknowledged at most on a reliable transport
PROBE_DELAY = 0.1                # seconds (at least; 4 RTT on slower links) before an unacknowledged stripe is probed
PACK_BYTES = 256 << 10           # a pack is sealed once its members hold this much (or the turn ends)
MAX_PACKS = 16                   # packs sealed and not yet acknowledged, at most


class Lister:
    """``root`` listed depth first as Dir frames (``frames``), and its
    listed directories opened again by index (``dir_of``).

    Everything below the root is reached from the root's descriptor one
    component at a time without following a symlink (scan.open_rel_dir),
    files are opened with O_NOFOLLOW in their directory's descriptor: a
    directory swapped for a symlink while the tree is listed or sent is
    refused, never followed out of the tree (rsync CVE-2024-12747's kind).
    ``root_fd``: the root already opened (the server opens a module path
    beneath the module); else ``root`` is opened, following a symlink there
    only (the user named it)."""

    def __init__(self, root: str, options, root_fd: int | None = None):
        from ..scan import Excludes
        self.root, self.checksum, self.root_fd = root, options.checksum, root_fd
        self.excludes = Excludes(options.excludes)
        self.dirs: list[str] = []
        self.listed = False
        self._walk = self._listing()
        self._dir_fd: tuple[int, int] | None = None     # (directory index, its descriptor): the last opened

    def next_frame(self):
        """The next Dir or DirFailed frame, or None when the tree is listed."""
        return next(self._walk, None)

    def open_dir(self, rel: str) -> int:
        """A new descriptor of root/rel, reached without following symlinks."""
        from ..scan import open_rel_dir
        if self.root_fd is None:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return open_rel_dir(self.root_fd, rel)

    def dir_of(self, index: int) -> int:
        """The descriptor of listed directory ``index`` (kept while the
        receiver's Wants stay in one directory, as they mostly do)."""
        if self._dir_fd is not None and self._dir_fd[0] == index:
            return self._dir_fd[1]
        self._close_dir()
        fd = self.open_dir(self.dirs[index])
        self._dir_fd = (index, fd)
        return fd

    def path(self, want: F.Want) -> str:
        rel = self.dirs[want.dir_index]
        return os.path.join(self.root, os.fsdecode(os.path.join(os.fsencode(rel), want.name) if rel else want.name))

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd[1])
            self._dir_fd = None

    def close(self) -> None:
        self._close_dir()
        if self.root_fd is not None and self.root_fd >= 0:
            os.close(self.root_fd)
        self.root_fd = -1

    def _listing(self):
        from ..scan import list_dir
        stack = [""]
        while stack:
            rel = stack.pop()
            index = len(self.dirs)
            self.dirs.append(rel)
            try:
                fd = self.open_dir(rel)
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
            if self.checksum and e.kind == "f":
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


class Outgoing:
    """One content being sent (a file's, or a pack's): its stripes, what was
    sent and acknowledged."""

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

    def skip_acked(self) -> None:
        """Move past stripes acknowledged before they were sent (resumed)."""
        while self.next_stripe < self.encoder.stripes and self.next_stripe in self.acked:
            self.next_stripe += 1


class Stripes:
    """The contents being sent as stripes: which shards go out next (repairs
    first, then new stripes while fewer than ``window`` bytes are
    unacknowledged), what the receiver acknowledged or asks to repair, and
    tail-loss probes. ``advanced(out, stripe)`` and ``retired(out)`` tell the
    sender of progress."""

    def __init__(self, session, parity: ParityPlanner, window: int, advanced, retired):
        self.s, self.parity = session, parity
        self.set_window(window)
        self.advanced, self.retired = advanced, retired
        self.active: dict[int, Outgoing] = {}
        self.order: deque = deque()             # content ids in the order their shards go out
        self.in_flight = 0                      # bytes of stripes sent and not acknowledged
        self.spill: deque = deque()             # shards made but not yet handed out (over a call's limit)
        self.last_heard = 0.0                   # the receiver's last frame
        self.repair_shards = 0
        self.probes = 0

    def set_window(self, window: int) -> None:
        """Content bytes in flight at most: the receiver's ``window`` (1 MiB at least)."""
        self.window = max(1 << 20, window)
        if self.s.reliable:                     # the receiver holds nothing of a stripe there (each shard is
            self.window = max(self.window, RELIABLE_WINDOW)     # written as it comes): TCP's window rules

    def add(self, out: Outgoing) -> None:
        self.active[out.fid] = out
        self.order.append(out.fid)

    def ack(self, frame: F.Ack) -> None:
        out = self.active.get(frame.file_id)
        if out is None:
            return
        for s in frame.stripes:
            if out.encoder is None or s >= out.encoder.stripes:
                raise ProtocolError(f"Ack of stripe {s} of file {frame.file_id}: no such stripe")
            if s not in out.acked and s < out.next_stripe:
                out.acked.add(s)
                self.advanced(out, s)
                n = out.bytes_out.pop(s, 0)
                out.in_flight -= n
                self.in_flight -= n
                out.sent_rows.pop(s, None)
                out.next_row.pop(s, None)
                out.sent_at.pop(s, None)
                out.encoder.forget(s)
        self.retire(out)

    def repair(self, frame: F.Repair) -> None:
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
            rows = list(range(first, min(first + need + self.parity.spare(need), MAX_SHARDS)))
            if len(rows) < need:
                rows = list(range(d))                                     # parity exhausted: the data again
            out.next_row[s] = first + len(rows)
            out.repairs.append((s, rows))
            self.repair_shards += len(rows)

    def done(self, fid: int) -> None:
        """The receiver has the content ``fid`` (FileDone: its last stripes' Ack is left out)."""
        out = self.active.get(fid)
        if out is not None:
            self.retire(out, force=True)

    def retire(self, out: Outgoing, force: bool = False) -> None:
        if (out.done or force) and self.active.pop(out.fid, None) is not None:
            self.in_flight -= out.in_flight
            out.in_flight = 0
            if out.closer is not None:
                out.closer()
            self.retired(out)

    def stripe_parity(self, out: Outgoing, stripe: int) -> int:
        return self.parity.parity(out.encoder.k, out.encoder.geometry(stripe)[0])

    def owe_parity(self) -> None:
        """The stripes sent before the loss was first measured went out with
        the parity of a lossless link (none): send what the measured loss
        asks for now, ahead of new stripes, before the receiver sees them
        short and spends a repair round (the first two stripes of every
        transfer at 20-33 % loss needed one)."""
        if self.parity.lossless:
            return
        for o in self.active.values():
            if o.encoder is None:
                continue
            for s, row in list(o.next_row.items()):
                if s in o.acked:
                    continue
                end = min(o.encoder.geometry(s)[0] + self.stripe_parity(o, s), MAX_SHARDS)
                if end > row:
                    o.repairs.append((s, list(range(row, end))))
                    o.next_row[s] = end

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
                n = d + self.stripe_parity(o, s)
                out += o.encoder.shards(s, range(n))
                o.sent_rows[s] = o.next_row[s] = n
                o.sent_at[s] = now
                o.next_stripe += 1
                o.skip_acked()
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
        """When an unacknowledged stripe is due for a probe (never on a
        reliable stream: what was sent arrives)."""
        if self.s.reliable:
            return None
        first = min((min(o.sent_at.values()) for o in self.active.values() if o.sent_at), default=None)
        if first is None:
            return None
        delay = self._probe_delay()
        if self.parity.lossless:
            return first + QUIET_FACTOR * delay
        return max(first + delay, min(self.last_heard + delay / 2, first + QUIET_FACTOR * delay))

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
        if self.s.reliable:
            return
        delay = self._probe_delay()
        patient = self.last_heard + delay / 2 > now or self.parity.lossless     # (as next_timer)
        for o in self.active.values():
            for s, t in list(o.sent_at.items()):
                if t + (QUIET_FACTOR * delay if patient else delay) > now or s in o.acked:
                    continue
                d = o.encoder.geometry(s)[0]
                row = o.next_row[s]
                rows = [row] if row < MAX_SHARDS else list(range(d))
                o.next_row[s] = row + 1 if row < MAX_SHARDS else row
                o.repairs.append((s, rows))
                o.sent_at[s] = now
                self.probes += 1

    def close(self) -> None:
        for o in list(self.active.values()):
            if o.closer is not None:
                o.closer()
        self.active.clear()


class Packer:
    """Small files' contents gathered into packs: each member a wire delta
    against the receiver's signature (made here, on this thread) if that is
    smaller than the file, else the file itself; a pack sealed at PACK_BYTES
    or when the sender's turn ends, and sent as one content's stripes."""

    def __init__(self, sender: "Sender"):
        self.sender = sender
        self.buf = bytearray()                  # members of the pack being filled (encodings.encode_member)
        self.members: list[int] = []
        self.owed: list = []                    # the members' (update, size, literal bytes): Tally.owe
        self.sealed = 0                         # packs sealed so far (the next one's id: PACK_BASE + sealed)
        self.active = 0                         # sealed and not yet acknowledged

    def add(self, want: F.Want, st: os.stat_result, data: bytes, delta_only: bool = False) -> bool:
        """Add the file ``data`` (its ``st``) as a member; ``delta_only`` (a
        file past PACK_FILE): only as a wire delta of at most PACK_FILE bytes,
        else nothing is added and False returned."""
        from .encodings import MEMBER_DELTA, MEMBER_HASH, MEMBER_SAME, Member, encode_member
        flags, content, literal = 0, data, len(data)
        if want.signature:
            flags, content, literal = self._against_basis(want.signature, data)
        if delta_only and (flags != MEMBER_DELTA or len(content) > PACK_FILE):
            return False
        seconds, ns = divmod(st.st_mtime_ns, 10**9)
        encode_member(self.buf, Member(want.file_id, F.FILE_OK, flags, blake3_of(data)[:MEMBER_HASH], st.st_mode,
                                       seconds, ns, len(data), st.st_uid, st.st_gid, content))
        self.members.append(want.file_id)
        self.owed.append((want.update, len(data), literal, bool(flags & MEMBER_SAME)))
        if len(self.buf) >= PACK_BYTES:
            self.seal()
        return True

    def _against_basis(self, signature: bytes, data: bytes) -> tuple[int, bytes, int]:
        """(member flags, content, literal bytes) of a file the receiver has a
        copy of: nothing if ``signature`` is a basis hash this file matches,
        a wire delta against a block signature if that is smaller and its
        basis at most MEMBER_BASIS (the receiver reads a member's basis
        whole), else the file itself."""
        from .encodings import MEMBER_DELTA, MEMBER_SAME, basis_hash_of, delta_to_wire, signature_from_wire
        salt = self.sender.s.salt
        basis = basis_hash_of(signature)
        if basis is not None:
            if basis == (len(data), keyed_hash(data, salt)):
                return MEMBER_SAME, b"", 0
            return 0, data, len(data)           # changed, though of the same size: the whole file
        if not data:
            return 0, data, 0
        import numpy as np

        from ..delta import instructions_in_memory
        sig = signature_from_wire(signature, salt)
        if sig.file_len > MEMBER_BASIS:
            return 0, data, len(data)
        delta = instructions_in_memory(sig, np.frombuffer(data, np.uint8))
        wire = delta_to_wire(*delta)
        if len(wire) < len(data):
            return MEMBER_DELTA, wire, len(delta[3])
        return 0, data, len(data)

    def seal(self) -> None:
        """Send the pack being filled: its Pack frame, then its content (the
        members, LZ4-compressed when that is smaller) as one content's
        stripes, acknowledged and repaired like a file's."""
        if not self.members:                    # (every turn: nothing imported for nothing)
            return
        import lz4.block

        from .encodings import put_varint
        raw = bytearray()
        put_varint(raw, len(self.members))
        raw += self.buf
        packed = lz4.block.compress(bytes(raw), store_size=False)
        codec, stored = (1, packed) if len(packed) < len(raw) else (0, bytes(raw))
        pid = F.PACK_BASE + self.sealed
        sender = self.sender
        k, size = sender.parity.geometry(None)
        frame = F.Pack(pid, codec, len(raw), len(stored), k, sender.parity.full(k), size)
        sender.s.send(frame)
        if sender.s.reliable:                   # (cut as it is: no parity, no NumPy)
            encoder = StripeEncoder(pid, stored, k, size, False)
        else:
            import numpy as np
            encoder = StripeEncoder(pid, np.frombuffer(stored, np.uint8), k, size)
        sender.stripes.add(Outgoing(frame, encoder, frame.m, None, self.members))
        sender.tally.owe(pid, self.owed)
        self.sealed += 1
        self.active += 1
        self.buf, self.members, self.owed = bytearray(), [], []


class Tally:
    """What the receiver confirmed (FileDone) of the contents sent, counted
    as the receiver counts it: files, their sizes, literal and matched bytes,
    new and updated. A retried push adds a cut attempt's tally to the last
    attempt's statistics (net.client.run): the files it placed are not sent
    again, so nothing else would count them."""

    KEYS = ("files_transferred", "bytes_transferred", "bytes_literal", "bytes_matched", "created", "updated")

    def __init__(self):
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.owed: dict[int, list] = {}         # content id -> [(update, size, literal bytes, same)] of its files

    def owe(self, cid: int, files: list) -> None:
        self.owed[cid] = files

    def confirmed(self, cid: int, ok: bool) -> None:
        files = self.owed.pop(cid, None)
        if not ok or files is None:
            return
        c = self.counts
        for update, size, literal, same in files:
            if same:                            # the receiver's copy was the file: its attributes updated
                c["updated"] += 1
                continue
            c["files_transferred"] += 1
            c["bytes_transferred"] += size
            c["bytes_literal"] += literal
            c["bytes_matched"] += max(0, size - literal)
            c["updated" if update else "created"] += 1


class Sender:
    """Lists ``root`` and sends what the receiver asks for (see the module)."""

    def __init__(self, session, root: str, options, window: int, min_parity: int = 1, root_fd: int | None = None):
        self.s = session
        self.lister = Lister(root, options, root_fd)
        self.parity = ParityPlanner(session, min_parity)
        self.stripes = Stripes(session, self.parity, window, self._advance, self._retired)
        self.packer = Packer(self)
        self.wants: deque = deque()
        self.more = False                       # Wants left for the next turn (WORK_SLICE ran out)
        self.queued: dict[int, int] = {}        # -P: file id -> the size it was shown with
        self.sent_files = 0
        self.tally = Tally()
        self.resumed_bytes = 0                  # content not sent: the receiver kept it from a cut transfer
        self.tmp = None                         # scratch directory of the deltas of large files
        self.waiting = -1                       # the file id of a large file waiting for the path MTU search
        self.sparse = options.sparse            # -S: blocks of zeros travel as holes
        self.listing_until: int | None = None  # control bytes the listing stops at until welcomed (a push)

    # -- the session's calls ----------------------------------------------------------
    def before_welcome(self, listing: int) -> None:
        """A pushing client's sender, made as the client sends its proof:
        it lists ``listing`` control bytes ahead (whole frames: the last may
        pass it) and waits for ``welcome`` for the rest."""
        self.listing_until = self.s.stats["control_bytes_sent"] + self.s.buffered + listing

    def welcome(self, window: int) -> None:
        """The server took the push: its receiver's window, and the listing goes on."""
        self.stripes.set_window(window)
        self.listing_until = None

    def pump(self) -> None:
        """List ahead while the control stream is not backed up, for at most
        half of WORK_SLICE (what is listed leaves, and the receiver plans it,
        while the rest is listed); start the wanted files while the limits
        allow, until WORK_SLICE is over (the transport then sends what is
        ready; the timer, due at once while there is more, goes on)."""
        lister = self.lister
        start = time.monotonic()
        until = STREAM_HIGH if self.listing_until is None else \
            min(STREAM_HIGH, self.listing_until - self.s.stats["control_bytes_sent"])
        while not lister.listed and self.s.buffered < until:
            frame = lister.next_frame()
            if frame is None:
                lister.listed = True
                self.s.send(F.ListEnd())
                if self.s.progress is not None:
                    self.s.progress.scanned()
                break
            self.s.send(frame)
            if time.monotonic() > start + WORK_SLICE / 2:
                break                           # (the receiver plans what is listed while the rest is)
        deadline = start + WORK_SLICE
        held = self.listing_until is not None and \
            self.s.stats["control_bytes_sent"] + self.s.buffered >= self.listing_until
        self.more = not lister.listed and not held      # (held: the Welcome goes on with it)
        st = self.stripes
        while self.wants and len(st.active) < MAX_ACTIVE and st.in_flight < st.window \
                and self.packer.active < MAX_PACKS:
            if not self.s.path_settled and self.wants[0].file_id == self.waiting:
                break                           # a large file waits for the path's packet size
            if not self._start(self.wants[0]):
                self.waiting = self.wants[0].file_id
                break
            self.wants.popleft()
            if time.monotonic() > deadline:
                self.more = self.more or bool(self.wants)
                break
        self.packer.seal()                      # what this turn packed goes now (the receiver starts on it)

    def frame(self, frame, now: float) -> None:
        self.stripes.last_heard = now           # the receiver is alive and talking: it asks for itself
        if isinstance(frame, (F.Want, F.Wants)):
            if frame.dir_index >= len(self.lister.dirs):
                raise ProtocolError(f"Want for directory {frame.dir_index}, which was not listed")
            wants = [frame] if isinstance(frame, F.Want) else \
                [F.Want(frame.first_id + i, frame.dir_index, name, signature, None, update)
                 for i, (name, update, signature) in enumerate(frame.wants)]
            self.wants.extend(wants)
            if self.s.progress is not None:     # -P: the total is known as the receiver asks
                for want in wants:
                    try:
                        size = os.stat(want.name, dir_fd=self.lister.dir_of(want.dir_index),
                                       follow_symlinks=False).st_size
                    except OSError:
                        size = 0
                    self.queued[want.file_id] = size
                    self.s.progress.queued(size)
        elif isinstance(frame, F.Ack):
            self.stripes.ack(frame)
        elif isinstance(frame, F.Repair):
            self.stripes.repair(frame)
        elif isinstance(frame, F.FileDone):
            self.stripes.done(frame.file_id)
            self.tally.confirmed(frame.file_id, frame.ok)
        elif isinstance(frame, F.Done):
            self.s.send(F.Bye())
            try:
                result = json.loads(frame.stats)
            except ValueError:
                raise ProtocolError("Done: statistics are not JSON") from None
            result.update(files_sent=self.sent_files, repair_shards=self.stripes.repair_shards,
                          probes=self.stripes.probes, resumed_bytes=self.resumed_bytes,
                          parity=self.parity.full(DEFAULT_K),        # (per 128 data shards, as documented)
                          loss_estimate=round(self.parity.loss, 4))
            self.close()
            self.s.finish(result)
        elif isinstance(frame, F.Item) and hasattr(getattr(self.s, "report", None), "remote"):
            self.s.report.remote(frame)         # (the pushing client: what happens at the server)
        else:
            raise ProtocolError(f"{type(frame).__name__} is not for the sender")

    def datagrams(self, now: float, limit: int) -> list[bytes]:
        return self.stripes.datagrams(now, limit)

    def observe_loss(self, lost: int, sent: int) -> None:
        if self.parity.observe(lost, sent):
            self.stripes.owe_parity()

    def next_timer(self) -> float | None:
        """When an unacknowledged stripe is due for a probe (at once if Wants
        wait that the last turn had no time for)."""
        return 0.0 if self.more else self.stripes.next_timer()

    def timer(self, now: float) -> None:
        self.stripes.timer(now)

    def abort(self, exc: ResyncError | None = None) -> None:
        self.close()

    def close(self) -> None:
        self.stripes.close()
        self.lister.close()
        if self.tmp is not None:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- progress (-P) ------------------------------------------------------------------
    def _advance(self, out: Outgoing, stripe: int) -> None:
        """A stripe of ``out`` is through; its share of the file's size."""
        if self.s.progress is not None and not out.members:
            n = progress_share(out.frame, stripe)
            out.progressed += n
            self.s.progress.partial(n)

    def _retired(self, out: Outgoing) -> None:
        if out.members:
            self.packer.active -= 1
            for fid in out.members:
                self._shown_done(fid, 0)
        else:
            self._shown_done(out.fid, out.progressed)

    def _shown_done(self, fid: int, progressed: int) -> None:
        """The file is through (sent, vanished or failed): the rest of the
        size it was queued with."""
        if self.s.progress is not None:
            self.s.progress.done(max(0, self.queued.pop(fid, 0) - progressed))

    # -- starting a wanted file -------------------------------------------------------------
    def _start(self, want: F.Want) -> bool:
        """Open the wanted file and make its content (the file, or a delta
        against the receiver's signature): a small one joins a pack; a larger
        one gets its File frame and stripes of its own — once the path's MTU
        search is settled (False until then: its shards would be cut to the
        minimum's size for good; a pack's are few, and the first updates
        start a few RTTs sooner)."""
        from ..fs import pread_all
        k, shard_size = self.parity.geometry(want.resume)
        m = self.parity.full(k)
        try:
            fd = os.open(want.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.lister.dir_of(want.dir_index))
        except OSError as exc:
            status = F.FILE_VANISHED if isinstance(exc, FileNotFoundError) else F.FILE_ERROR
            self._send_file(F.File(want.file_id, status, False, 0, bytes(32), 0, 0, 0, 0, 0, 0, k, m,
                                   shard_size, os.fsencode(exc.strerror or str(exc))), None, None)
            return True
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "changed type during the run")
            size = st.st_size
            if size <= PACK_FILE:               # a small file: its content joins a pack
                data = pread_all(fd, size)
                os.close(fd)
                self.packer.add(want, st, data)
                self.sent_files += 1
                return True
            if not self.s.path_settled:
                os.close(fd)
                return False
            runs = data = None
            from .encodings import basis_hash_of
            if want.signature and basis_hash_of(want.signature) is not None:
                want = want._replace(signature=b"")     # grown past a pack since listed: whole
            if want.signature and size <= MEMBER_FILE and not (self.sparse or has_holes(st)):
                data = pread_all(fd, size)      # a small delta of a larger file: a pack member (no scratch
                if self.packer.add(want, st, data, delta_only=True):     # file, no stripes of its own)
                    os.close(fd)
                    self.sent_files += 1
                    return True
            if not want.signature:              # a sparse file sent whole: its data runs, not its holes
                from ..content import data_extents
                runs = data_extents(fd, size)
                if self.sparse:                 # -S: its blocks of zeros are holes too
                    runs = zero_free_runs(fd, size, runs)
            if size <= SMALL_FILE and runs is None:     # read (once): a map costs more than it saves
                data = pread_all(fd, size) if data is None else data
                size, closers = len(data), []
                if self.s.reliable and not want.signature:
                    array = data                # sent as it is: cut without NumPy (shards.StripeEncoder)
                else:
                    import numpy as np
                    array = np.frombuffer(data, np.uint8)
            else:
                from ..fs import MappedFile
                mapped = MappedFile(f"/proc/self/fd/{fd}", name=self.lister.path(want))
                data, array, closers = mapped.buffer, mapped.array, [mapped.close]
        except (OSError, ResyncError) as exc:
            os.close(fd)
            msg = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._send_file(F.File(want.file_id, F.FILE_ERROR, False, 0, bytes(32), 0, 0, 0, 0, 0, 0, k, m,
                                   shard_size, os.fsencode(msg or "cannot read")), None, None)
            return True
        os.close(fd)
        seconds, ns = divmod(st.st_mtime_ns, 10**9)
        try:
            if want.signature and size:
                content, target, content_hash = self._delta(want, array, closers)
                delta = True
            elif runs is not None:
                from .sparse import DataRuns
                content, delta = DataRuns(array, runs), False
                target, content_hash = blake3_of(data), content.blake3()
            else:
                content, delta = array, False
                target = content_hash = blake3_of(data)
        except ResyncError:
            for c in closers:
                c()
            raise
        length = len(content) if isinstance(content, bytes) else int(content.shape[0])
        frame = F.File(want.file_id, F.FILE_OK, delta, length, target, st.st_mode, seconds, ns,
                       size, st.st_uid, st.st_gid, k, m, shard_size, b"", content_hash,
                       tuple(runs) if runs is not None else None, delta and (self.sparse or has_holes(st)))
        encoder = StripeEncoder(want.file_id, content if length else b"", k, shard_size, not self.s.reliable)
        self.tally.owe(want.file_id, [(want.update, size, frame.length, False)])

        def close():
            for c in closers:
                c()
        out = self._send_file(frame, encoder, close)
        r = want.resume
        if out is not None and r is not None:
            # the receiver kept these stripes of this very content from a cut transfer
            for stripe in carried(r, frame):
                if stripe < encoder.stripes and stripe not in out.acked:
                    out.acked.add(stripe)
                    self._advance(out, stripe)
                    d, size = encoder.geometry(stripe)
                    self.resumed_bytes += min(d * size, frame.length - stripe * encoder.k * encoder.size)
            out.skip_acked()
            self.stripes.retire(out)
        return True

    def _delta(self, want: F.Want, array, closers):
        """The delta of a large file against the receiver's signature, in a scratch file."""
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
        return d.array, header.target_hash, blake3_of(d.buffer)

    def _send_file(self, frame: F.File, encoder, closer) -> Outgoing | None:
        self.s.send(frame)
        self.sent_files += 1
        out = Outgoing(frame, encoder, frame.m, closer)
        if encoder is None or encoder.stripes == 0:
            if closer is not None:
                closer()
            self._shown_done(frame.file_id, 0)
            return None
        self.stripes.add(out)
        return out
