"""The receiving end of a transfer: the side whose tree changes. It plans its
tree against the sender's listing, asks for what it lacks, takes the content
as stripes, and applies everything through the apply layer. Parts, each one
job, composed by ``Receiver`` (which holds what they share: the session, the
apply layer, the report, the files wanted and those arriving):

- ``Planning``: listing intake — each Dir planned against this tree, what
  needs no content applied at once, a Want (with this copy's signature) for
  each file to transfer;
- ``StripeIntake``: File frames and the shards of files' contents, Acks, and
  the repairs asked for where a stripe stays short;
- ``PackIntake``: packs — small files rebuilt in memory and staged;
- ``Placement``: completed files checked and staged, placed in batches made
  durable together;
- ``checkpoint.Checkpoints``: what a cut transfer leaves for the next run.
"""
from __future__ import annotations

import json
import os
import stat
import time

from ..errors import NoSpaceError, ResyncError
from . import frames as F
from .checkpoint import Checkpoints, resume_of
from .common import (MEMBER_BASIS, MEMBER_FILE, PACK_FILE, QUIET_FACTOR, SMALL_FILE, BusyError, blake3_of, carried,
                     keyed_hash, progress_share, resumes)
from .encodings import MEMBER_HASH
from .frames import ProtocolError
from .shards import StripeAssembler, stripe_count

RECV_PREFIX = ".resync-tmp-recv-"       # the network receiver's staging directories (apply.TEMP_PREFIX)
REPAIR_DELAY = 0.03              # seconds (at least; 3 RTT on slower links) a quiet file waits for a repair
REPAIR_LAG = 4                   # a short stripe this many stripes behind a completed one is asked for at once
EARLY_BYTES = 8 << 20            # shard bytes a receiver holds for wanted files whose File frame is late
PLACE_BATCH = 256                # files made durable (one syncfs) and placed together


class Incoming:
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


class IncomingPack:
    """One pack (small files' contents sharing stripes) as its shards arrive."""

    __slots__ = ("frame", "assembler", "buf", "fd", "kept", "started", "last_shard", "next_look", "asked",
                 "progressed")

    def __init__(self, frame: F.Pack, now: float):
        import numpy as np
        self.frame = frame
        self.buf = np.empty(frame.length, np.uint8)
        self.fd, self.kept, self.progressed = -1, None, 0
        self.started = self.last_shard = self.next_look = now
        self.asked: dict[int, float] = {}

        def sink(off, data):
            self.buf[off:off + len(data)] = data
        self.assembler = StripeAssembler(frame.pack_id, frame.length, frame.k, frame.shard_size, sink)


class Receiver:
    """Plans ``root`` against the sender's listing and applies what arrives
    (see the module). ``remote_items``: the client pushes and prints what
    happens here (its itemized lines and errors are sent to it); ``hold``: an
    exclusive flock on the root for the run (a pull); ``root_fd``: the root
    already opened (the server opens a module path beneath the module)."""

    def __init__(self, session, root: str, options, report=None, remote_items: bool = False,
                 hold: bool = False, root_fd: int | None = None):
        from ..apply import Applier
        from ..content import Options as ContentOptions
        from ..report import Report, RunStats
        from ..scan import Excludes
        self.s, self.root, self.options = session, root, options
        if report is None:
            report = Report(RunStats(), dry_run=options.dry_run)
        if remote_items:                       # the client (which pushes) prints what happens here
            report = _relay(report, session, options.itemize)
        self.report = report
        self.stats = report.stats
        self.owners = os.geteuid() == 0
        self.apply = Applier(root, report, ContentOptions(hash_files=True), dry_run=options.dry_run,
                             owners=self.owners, workers=0, replace_trees=options.delete,
                             excludes=Excludes(options.excludes), own_flush=True)
        if root_fd is None:
            self.apply.open_root()
        else:
            self.apply.adopt_root(root_fd)      # opened beneath the module (the server)
        if hold and not options.dry_run and self.apply.root_fd >= 0:
            self._hold(root)                    # before staging: two runs never take each other's
        # the root as it was: making the staging directory in it changes its mtime
        self.root_before = os.fstat(self.apply.root_fd) if self.apply.root_fd >= 0 else None
        journal = None
        if not options.dry_run:
            journal = self.apply.staging.begin(os.urandom(8).hex(), prefix=RECV_PREFIX, resume=True)
        self.wanted: dict[int, Incoming | IncomingPack] = {}
        self.receiving: dict[int, Incoming | IncomingPack] = {}    # content arriving (its File or Pack came)
        self.finished_here = False               # everything listed dealt with: the end is under way
        self.ending = False                      # ... its changes being made off the event loop (_end)
        self.done_sent = False                   # ... and over: Done sent
        self.started = time.monotonic()
        self.checkpoints = Checkpoints(self, journal)
        self.planning = Planning(self)
        self.intake = StripeIntake(self)
        self.packs = PackIntake(self)
        self.placement = Placement(self)

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

    # -- the session's calls ----------------------------------------------------------
    def frame(self, frame, now: float) -> None:
        if isinstance(frame, F.Dir):
            self.planning.dir(frame)
        elif isinstance(frame, F.DirFailed):
            self.planning.dir_failed(frame)
        elif isinstance(frame, F.ListEnd):
            self.planning.listed = True
            if self.s.progress is not None:
                self.s.progress.scanned()
        elif isinstance(frame, F.File):
            self.intake.file(frame, now)
        elif isinstance(frame, F.Pack):
            self.packs.pack(frame, now)
        elif isinstance(frame, F.Bye):
            self.s.finished = True
        else:
            raise ProtocolError(f"{type(frame).__name__} is not for the receiver")

    def shard(self, shard, now: float) -> None:
        self.intake.shard(shard, now)

    def pump(self) -> None:
        self.intake.send_acks()
        if self.planning.listed and not self.wanted and not self.finished_here and self.placement.flushing is None:
            self._end()

    def next_timer(self) -> float | None:
        """When a content may need a repair (a delay after its last shard, or
        its last look; never on a reliable stream), or the next checkpoint is
        due."""
        looks = () if self.s.reliable else (inc.next_look for inc in self.receiving.values())
        first = min(looks, default=None)
        due = self.checkpoints.next_at
        if due is not None and due != float("inf") and (first is not None or self.receiving):
            first = due if first is None else min(first, due)
        return first

    def timer(self, now: float) -> None:
        if self.finished_here:
            return
        self.checkpoints.timer(now)
        self.intake.timer(now)

    def complete(self, fid: int, now: float) -> None:
        """All of a content is in: a pack's files, or one file, are checked and staged."""
        if fid >= F.PACK_BASE:
            self.packs.complete(fid, now)
        else:
            self.placement.complete(fid, now)

    def abort(self, exc: ResyncError | None = None) -> None:
        """The transfer failed. Cut off (the connection lost or silent, the
        server stopping): what arrived is checkpointed for the next run to
        resume, the staging directory kept. Otherwise everything staged is
        removed."""
        from ..errors import ConnectionFailed, TimedOut
        if self.ending:                         # its end owns the tree now: once over, it cleans up
            return                              # itself if it failed (_end_orphaned)
        self.placement.settle()
        resumable = isinstance(exc, (ConnectionFailed, TimedOut)) and not self.options.dry_run
        if resumable:
            try:
                self.checkpoints.write()
            except (OSError, ResyncError):
                resumable = False
        for fid in list(self.wanted):
            if resumable:
                inc = self.wanted.pop(fid)
                if inc.fd >= 0:
                    os.close(inc.fd)
            else:
                self.placement.drop(fid, keep_old=False)
        self.receiving.clear()
        if resumable:
            self.apply.staging.keep()
            self.apply.access.close_up()
        else:
            self.apply.abort()
        self.apply.close()

    def _end(self) -> None:
        """Everything listed has been dealt with: place the last files,
        delete (if allowed), set the directories' attributes — off the
        event loop (``Session.run_blocking``): their fsyncs may wait seconds
        behind another program's writes, and a daemon's loop serves every
        other transfer and its API meanwhile — then report (Done)."""
        self.finished_here = self.ending = True
        self.s.run_blocking(self._apply_end, self._ended, self._end_orphaned)

    def _end_orphaned(self, outcome) -> None:
        """The session ended (cut, cancelled) while its end was being
        made: if that failed, what it left staged is removed."""
        self.ending = False
        if outcome.exception() is not None:
            try:
                self.apply.abort()
                self.apply.close()
            except OSError:
                pass

    def _apply_end(self) -> None:
        self.placement.place()
        apply, p = self.apply, self.planning
        plan = p.plan
        apply.deleter.keep(plan.extras)                 # what stays though the source lacks it: in the manifest
        if p.empty_source:                      # as local sync: nothing deleted, the root left as it was
            self.stats.deletion_refused = p.empty_source
            apply.deleter.keep(plan.deletions)
            p.root_attrs = p.root_prev
        elif plan.deletions:
            count = 0
            if not self.stats.errors:
                for rel, e in plan.deletions:
                    count += 1 + (apply.deleter.count_tree(rel, e.name) if e.kind == "d" and apply.root_fd >= 0 else 0)
            refused = plan.deletion_refusal(count)
            if refused:
                self.stats.deletion_refused = refused
                apply.deleter.keep(plan.deletions)
            else:
                apply.deleter.delete(plan.deletions, apply.deleter.count_tree)
        apply.staging.end()
        dirs = list(p.dir_attrs)
        if p.root_attrs is not None:
            dirs.insert(0, ("", p.root_attrs, p.root_prev))
        apply.finish_dirs(dirs)
        apply.close()

    def _ended(self, outcome) -> None:
        self.ending = False
        outcome.result()                        # (what the end raised fails the session: abort cleans up)
        self.stats.duration = time.monotonic() - self.started
        result = self.stats.as_dict()
        i = self.intake
        result.update(repairs_asked=i.repairs_asked, stripes=i.stripes_received, stripes_repaired=i.stripes_repaired,
                      shards_recovered=i.shards_recovered,
                      corrupt_shards=i.corrupt_shards, resumed_bytes=self.checkpoints.resumed_bytes,
                      redone=self.planning.redone)
        self.s.send(F.Done(json.dumps(result).encode()))
        self.s.result = result                # finished when the sender's Bye arrives
        self.done_sent = True


WANTS_BYTES = 64 << 10           # a directory's Wants frame is sent once its names and signatures reach this


class Planning:
    """Listing intake: each Dir frame planned against this tree (plan.Planner)
    and applied at once where no content is needed (directories, symlinks,
    attributes, specials); the files to transfer asked for in one Wants frame
    per directory, each with the block signature of this tree's copy (a file
    offered to resume: a Want of its own)."""

    def __init__(self, r: Receiver):
        from ..plan import PlanOptions, Planner
        from ..scan import Excludes
        self.r = r
        o = r.options
        self.links: dict[str, bytes] = {}
        self.digests: dict[str, bytes] = {}
        self.plan = Planner(PlanOptions(o.checksum, o.delete, o.max_delete, Excludes(o.excludes), r.owners),
                            r.report, lambda path, e: r.report.entry(path, e, None),
                            lambda path: self.links[path], self._same_content)
        self.dirs: dict[int, str] = {}
        self.top = -1                           # the highest directory index listed so far
        self.made: set[str] = set()             # directories this run made (empty when their Dir comes)
        self.dir_attrs: list = []              # (path, entry, prev) for the end
        self.root_prev = self.root_attrs = None
        self.empty_source = ""                  # why --delete may delete nothing: the source root is empty
        self.listed = False
        self.next_id = 0
        self.redone = 0                         # files asked for again whole: their delta did not make them
        self._batch: list = []                  # (name, update, signature) wanted in _batch_dir, not yet sent
        self._batch_dir = self._batch_first = self._batch_bytes = 0

    def _same_content(self, path: str, dst_fd: int, name: str) -> bool:
        from ..content import hash_fd
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_fd)
        try:
            return bytes.fromhex(hash_fd(fd)) == self.digests.get(path)
        finally:
            os.close(fd)

    def dir_failed(self, frame: F.DirFailed) -> None:
        rel = os.fsdecode(frame.rel)
        self.dirs[frame.index] = rel
        self.top = max(self.top, frame.index)
        self.r.report.source_failed(rel + "/", OSError(frame.errno, os.fsdecode(frame.message)))

    def dir(self, frame: F.Dir) -> None:
        from ..apply import TEMP_PREFIX, Dir
        from ..scan import Entry, open_rel_dir, stat_dir
        r = self.r
        if frame.index in self.dirs or (frame.index and frame.index != self.top + 1):
            raise ProtocolError(f"Dir {frame.index} out of order")
        rel = os.fsdecode(frame.rel)
        self.dirs[frame.index] = rel
        self.top = max(self.top, frame.index)
        attrs, entries = frame.attrs, []
        for e in frame.entries:
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
            r.report.vanished(os.path.join(rel, os.fsdecode(name)) if rel else os.fsdecode(name))
        # this directory in the destination (made when its parent's listing was applied)
        parent, dst = None, {}
        if r.apply.root_fd >= 0:
            try:
                fd = open_rel_dir(r.apply.root_fd, rel)
                parent = Dir(fd, rel, stat.S_IMODE(os.fstat(fd).st_mode))
                if rel in self.made:
                    self.made.discard(rel)      # made by this run a moment ago: nothing to read in it
                else:
                    dst, temps = stat_dir(fd, skip_temps=True)
                    r.apply.remove_temps(parent, temps)
            except OSError as exc:
                if parent is None and rel and not r.options.dry_run:
                    r.report.error(rel + "/", f"cannot open destination directory: {exc.strerror or exc}")
                    return
        if rel == "":
            if r.options.delete and not entries:        # as local sync (plan.refuse_empty_source)
                self.empty_source = ("the source is empty (or everything in it is excluded); refusing to "
                                     "delete the destination's contents")
            if parent is not None:
                self.root_prev = Entry.from_stat("", r.root_before or os.fstat(parent.fd))
            self.root_attrs = Entry("", attrs.mode, 0, attrs.seconds * 10**9 + attrs.nanoseconds, attrs.uid,
                                    attrs.gid, 0, "d", attrs.mode & 0o7777)
        try:
            self._apply(frame.index, rel, entries, dst, parent)
        finally:
            self.flush_wants()
            if parent is not None:
                parent.release()

    def flush_wants(self) -> None:
        """Send the Wants gathered for one directory as one frame."""
        if self._batch:
            self.r.s.send(F.Wants(self._batch_dir, self._batch_first, tuple(self._batch)))
            self._batch, self._batch_bytes = [], 0

    def _apply(self, index: int, rel: str, entries, dst, parent) -> None:
        from ..plan import ATTRS, DIRECTORY, TRANSFER
        apply, report, dry_run = self.r.apply, self.r.report, self.r.options.dry_run
        for d in self.plan.directory(rel, entries, dst, parent.fd if parent is not None else None):
            what, e, prev, path = d[0], d[1], d[2], d[3]
            if what == TRANSFER:
                if dry_run or parent is None:
                    apply.pipeline.transfer(None, e, prev, path, d[4], ())
                    continue
                self.want(index, rel, e, prev, path, d[4], parent)
            elif what == ATTRS:
                apply.entries.attributes(parent, e, prev, path)
                report.entry(path, e, None)
            elif what == DIRECTORY:
                made = prev is None or prev.kind != "d"
                there, prev = apply.directory(parent, e, prev, path)
                if not there:
                    continue
                if made and not dry_run and parent is not None:
                    self.made.add(path)
                self.dir_attrs.append((path, e, prev))
                if parent is not None:
                    report.entry(path, e, None)
            else:
                apply.entries.carry_out(parent, d)      # LINK, FIX, SPECIAL

    def want(self, index: int, rel: str, e, prev, path: str, code: str, parent) -> None:
        """Ask for a file: with this destination's copy's block signature, so
        that only what differs travels, unless it is new or --whole-file."""
        r = self.r
        fid = self.next_id
        inc = Incoming(path, rel, e, prev, code, index)
        if r.s.progress is not None:
            r.s.progress.queued(e.size)
        resume = r.checkpoints.resumable(path, prev, inc)
        if resume is not None:
            self.flush_wants()                  # (file ids stay in order on the stream)
            self.next_id += 1
            r.wanted[fid] = inc
            r.s.send(F.Want(fid, index, os.fsencode(e.name), inc.signature, resume, prev is not None))
            return
        signature = b""
        same_size = prev is not None and prev.size == e.size <= PACK_FILE     # (empty files too)
        if prev is not None and prev.kind == "f" and (prev.size or same_size) and not r.options.whole_file:
            try:
                signature = self.signature(parent.fd, e.name, path, same_size)
            except (OSError, ResyncError):
                signature = b""                # unreadable here: the whole file instead
        self.next_id += 1
        inc.signature = signature
        r.wanted[fid] = inc
        if self._batch and self._batch_dir != index:
            self.flush_wants()
        if not self._batch:
            self._batch_dir, self._batch_first = index, fid
        name = os.fsencode(e.name)
        self._batch.append((name, prev is not None, signature))
        self._batch_bytes += len(name) + len(signature)
        if self._batch_bytes >= WANTS_BYTES:    # (large files' signatures: the sender starts on them)
            self.flush_wants()

    def signature(self, dir_fd: int, name: str, path: str, basis_hash: bool = False) -> bytes:
        """The wire signature (protocol.encodings) of this destination's copy
        of ``name``, keyed with this transfer's salt: its blocks' sums, the
        strong hashes as long as the file's size needs (encodings.strong_len_for);
        or, ``basis_hash`` (a small file whose size did not change), only its
        keyed hash."""
        from ..fs import pread_all
        from .encodings import basis_hash_to_wire
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            size = os.fstat(fd).st_size
            if size <= SMALL_FILE:                          # read: a map costs more than it saves
                data = pread_all(fd, size)
                if basis_hash and len(data) <= PACK_FILE:
                    return basis_hash_to_wire(len(data), keyed_hash(data, self.r.s.salt))
                return self._signed(data)
            from ..fs import MappedFile
            with MappedFile(f"/proc/self/fd/{fd}", name=path) as m:
                return self._signed(m.array)
        finally:
            os.close(fd)

    def _signed(self, data) -> bytes:
        """The wire signature of ``data`` (bytes or a uint8 array)."""
        import numpy as np

        from ..signature import compute_signature, default_block_len
        from .encodings import signature_to_wire, strong_len_for
        if not isinstance(data, np.ndarray):
            data = np.frombuffer(data, np.uint8)
        block = default_block_len(data.shape[0])
        return signature_to_wire(compute_signature(data, block, strong_len_for(data.shape[0], block),
                                                   salt=self.r.s.salt, threads=1, file_hash=False, check_bits=16))

    def rewant(self, inc: Incoming) -> None:
        """Ask for a file again, whole: the delta made from its signature did
        not make the file (a false block match the strong hash let through,
        or the copy changed meanwhile) — rsync's redo pass. Once per file."""
        fid = self.next_id
        self.next_id += 1
        inc.retried, inc.signature, inc.frame, inc.assembler, inc.kept = True, b"", None, None, None
        inc.fd, inc.tmp, inc.digest = -1, "", None
        self.redone += 1
        self.r.wanted[fid] = inc
        self.r.s.send(F.Want(fid, inc.index, os.fsencode(inc.entry.name), b"", None, inc.prev is not None))


class StripeIntake:
    """File frames and shards: each content's stripes put back together (a
    temp file for a file, memory for a pack), Acks for the stripes complete,
    Repairs for those that stay short, shards that overtake their File or
    Pack frame held (up to EARLY_BYTES)."""

    def __init__(self, r: Receiver):
        self.r = r
        self.acks: dict[int, list[int]] = {}
        self.early: dict[int, list] = {}       # content id -> shards that came before its File or Pack frame
        self.early_bytes = 0
        self.repairs_asked = 0                  # stripes asked for (again each repair delay one stays short)
        self.stripes_repaired = 0               # distinct stripes asked for at least once
        self.stripes_received = 0               # stripes completed in this run
        self.shards_recovered = 0               # data shards rebuilt from parity (lost, corrupt or late)
        self.last_datagram = 0.0
        self.corrupt_shards = 0

    def delay(self) -> float:
        return max(REPAIR_DELAY, 3 * self.r.s.rtt)

    def take_early(self, fid: int, now: float) -> None:
        """Feed the shards of ``fid`` held before its frame came."""
        early = self.early.pop(fid, ())
        self.early_bytes -= sum(len(sh[3]) for sh in early)
        for sh in early:
            if fid not in self.r.receiving:
                break                           # complete, or dropped
            self.shard(sh, now)

    def file(self, frame: F.File, now: float) -> None:
        inc = self.r.wanted.get(frame.file_id)
        if inc is None or inc.frame is not None:
            raise ProtocolError(f"File {frame.file_id} was not asked for")
        inc.frame = frame
        self._open(inc, frame, now)
        self.take_early(frame.file_id, now)

    def _open(self, inc: Incoming, frame: F.File, now: float) -> None:
        """Make ready for ``frame``'s content: a temp file (or the kept one of
        a cut transfer) and its stripe assembler."""
        r = self.r
        if frame.status in (F.FILE_VANISHED, F.FILE_ERROR):
            if frame.status == F.FILE_VANISHED:
                r.report.vanished(inc.path)
            else:
                r.report.error(inc.path, os.fsdecode(frame.message))
            r.placement.drop(frame.file_id, keep_old=True)
            return
        if frame.delta and (inc.prev is None or inc.prev.kind != "f"):
            raise ProtocolError(f"File {frame.file_id}: a delta for a file without a basis")
        if stat.S_IFMT(frame.mode) != stat.S_IFREG:
            raise ProtocolError(f"File {frame.file_id}: not a regular file's mode")
        k, inc.kept = inc.kept, None
        if k is not None and not resumes(resume_of(k), frame):
            os.close(inc.fd)                    # the content changed since: the sender starts over too
            inc.fd = -1
            r.checkpoints.forget(k)
            k = None
        if k is None:
            inc.fd, inc.tmp = r.apply.staging.open()
        inc.last_shard = now
        inc.next_look = now + self.delay()
        from ..fs import pwrite_all
        fd = inc.fd
        if frame.runs is not None:              # sparse: the data runs written at their offsets, the
            from .sparse import content_starts, scatter     # rest left a hole
            os.ftruncate(fd, frame.size)
            runs, starts = frame.runs, content_starts(frame.runs)

            def sink(off, data):
                scatter(fd, runs, starts, off, data)
        elif r.s.reliable and not frame.delta and k is None:
            import blake3                       # a reliable transport: shards come in order, each
            hasher, end = blake3.blake3(), [0]  # written at once and hashed as written (no read-back)
            if frame.length:
                os.ftruncate(fd, frame.length)

            def sink(off, data):
                pwrite_all(fd, data, off)
                if off == end[0]:
                    hasher.update(data)
                    end[0] += len(data)
                    if end[0] == frame.length:
                        inc.digest = hasher.hexdigest()
        elif stripe_count(frame.length, frame.k, frame.shard_size) == 1 and not frame.delta and k is None:
            def sink(off, data):                # one stripe: one write, hashed as written
                pwrite_all(fd, data, off)
                inc.digest = blake3_of(data).hex()
        else:
            if frame.length:                    # (stripes land in any order; a checkpoint keeps the length)
                os.ftruncate(fd, frame.length)

            def sink(off, data):
                pwrite_all(fd, data, off)
        inc.assembler = StripeAssembler(frame.file_id, frame.length, frame.k, frame.shard_size, sink,
                                        direct=r.s.reliable)
        if k is not None:
            done = carried(resume_of(k), frame)
            r.checkpoints.resumed_bytes += inc.assembler.mark_done(done)
            for s in done:
                r.placement.advance(inc, s)
        r.receiving[frame.file_id] = inc
        if inc.assembler.complete:
            r.complete(frame.file_id, now)

    def shard(self, shard, now: float) -> None:
        r = self.r
        if shard is None:
            self.corrupt_shards += 1            # dropped: counted as lost, parity makes up for it
            return
        fid, stripe, index, payload = shard
        inc = r.wanted.get(fid)
        if inc is None:
            if fid > r.packs.last and self.early_bytes + len(payload) <= EARLY_BYTES:
                # a pack announced later (its Pack frame comes on the stream, behind datagrams); kept
                # as a copy (the transport may reuse the buffer the payload is a view of)
                self.early.setdefault(fid, []).append((fid, stripe, index, bytes(payload)))
                self.early_bytes += len(payload)
            return                              # late or duplicate shards of a finished file
        if inc.assembler is None:
            # Before its File frame: QUIC sends queued datagrams ahead of stream data,
            # and a lost stream packet is resent later. Held (up to EARLY_BYTES in all).
            if inc.frame is None and self.early_bytes + len(payload) <= EARLY_BYTES:
                self.early.setdefault(fid, []).append((fid, stripe, index, bytes(payload)))
                self.early_bytes += len(payload)
            return
        inc.last_shard = self.last_datagram = now
        inc.next_look = now + self.delay()
        r.checkpoints.took(len(payload), now)
        rebuilt = inc.assembler.rebuilt
        try:
            stripe_done = inc.assembler.add(stripe, index, payload)
        except OSError as exc:                  # writing the stripe failed: the run ends (a full disk:
            from ..fs import os_error            # exit 6), nothing of it placed, staging removed
            raise os_error(getattr(inc, "path", "a pack"), exc) from None
        if stripe_done:
            self.stripes_received += 1
            self.shards_recovered += inc.assembler.rebuilt - rebuilt
            self.acks.setdefault(fid, []).append(stripe)
            r.placement.advance(inc, stripe)
            inc.asked.pop(stripe, None)
            if inc.assembler.complete:
                r.complete(fid, now)
            elif stripe >= REPAIR_LAG:
                self.ask(fid, inc, inc.assembler.lagging(stripe - REPAIR_LAG), now)

    def ask(self, fid: int, inc, short, now: float) -> None:
        """Ask for the shards ``short`` stripes still need, each stripe at most
        once per repair delay (none on a reliable stream: they are on their way)."""
        if self.r.s.reliable:
            return
        delay = self.delay()
        needs = [(s, n) for s, n in short if now - inc.asked.get(s, -1e9) >= delay]
        if needs:
            for s, _ in needs:
                if s not in inc.asked:
                    self.stripes_repaired += 1
                inc.asked[s] = now
            self.repairs_asked += len(needs)
            for lo in range(0, len(needs), 4096):
                self.r.s.send(F.Repair(fid, tuple(needs[lo:lo + 4096])))

    def send_acks(self) -> None:
        for fid, stripes in self.acks.items():
            for lo in range(0, len(stripes), 4096):
                self.r.s.send(F.Ack(fid, tuple(stripes[lo:lo + 4096])))
        self.acks.clear()

    def timer(self, now: float) -> None:
        """Ask for what a quiet content still lacks (stripes overtaken by
        later ones are asked for as soon as that happens, in ``shard``). A
        content is quiet when no shard of it came for the repair delay and
        none of any for half of it — after a stall of this process, the timer
        fires before the shards waiting in the socket are read — or when none
        of it came for QUIET_FACTOR delays while others flow."""
        delay = self.delay()
        link_quiet = self.last_datagram + delay / 2 <= now
        for fid, inc in self.r.receiving.items():
            a = inc.assembler
            if inc.next_look > now:
                continue
            if not link_quiet and inc.last_shard + QUIET_FACTOR * delay > now:
                inc.next_look = now + delay / 2
                continue
            inc.next_look = now + delay         # checked: the next look is a delay away
            top = a.highest_seen()              # (beyond it: not sent yet, or lost whole: the sender probes)
            if isinstance(inc, IncomingPack):
                top = a.stripes - 1             # (announced whole, and sent together: lost whole is asked for)
            self.ask(fid, inc, [(s, n) for s, n in a.short() if s <= top], now)


class PackIntake:
    """Packs: when one is complete, each member file is rebuilt in memory (a
    wire delta applied to this destination's copy), checked and staged
    beside the file it replaces (no thread, no fsync: the batch is made
    durable with one syncfs when placed)."""

    def __init__(self, r: Receiver):
        self.r = r
        self.last = F.PACK_BASE - 1             # the highest pack id announced (a Pack frame) so far

    def pack(self, frame: F.Pack, now: float) -> None:
        """A pack is announced: its content's shards follow (or came early)."""
        r = self.r
        if frame.pack_id != self.last + 1:
            raise ProtocolError(f"Pack {frame.pack_id} out of order")
        self.last = frame.pack_id
        p = IncomingPack(frame, now)
        p.next_look = now + r.intake.delay()
        r.wanted[frame.pack_id] = p
        r.receiving[frame.pack_id] = p
        r.intake.take_early(frame.pack_id, now)

    def complete(self, pid: int, now: float) -> None:
        import lz4.block

        from .encodings import decode_members
        r = self.r
        p = r.wanted.pop(pid)
        r.receiving.pop(pid, None)
        r.intake.acks.pop(pid, None)
        r.s.send(F.FileDone(pid, True, b""))    # (acknowledges every stripe of it)
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
        if len(r.placement.to_place) >= PLACE_BATCH:
            r.placement.flush()

    def _dir_handle(self, rel: str, dirs: dict):
        """The destination directory ``rel`` (an apply.Dir, reached from the
        root without following symlinks), or None if it cannot be opened."""
        if rel not in dirs:
            from ..apply import Dir
            from ..scan import open_rel_dir
            try:
                fd = open_rel_dir(self.r.apply.root_fd, rel)
                dirs[rel] = Dir(fd, rel, stat.S_IMODE(os.fstat(fd).st_mode))
            except OSError as exc:
                self.r.report.error(rel + "/", exc.strerror or str(exc))
                dirs[rel] = None
        return dirs[rel]

    def _member(self, m, dirs: dict) -> None:
        """One file of a pack: rebuilt (or, a same-content member, this
        destination's copy read back: it may have changed since it was
        hashed), checked, staged (or given its attributes in place). A delta
        or copy that does not make the file is asked for again whole, once."""
        from ..fs import NO_SPACE, os_error
        r, placement = self.r, self.r.placement
        inc = r.wanted.get(m.file_id)
        if not isinstance(inc, Incoming) or inc.frame is not None:
            raise ProtocolError(f"pack member {m.file_id} was not asked for")
        del r.wanted[m.file_id]
        placement.finished(inc)
        if m.status != F.FILE_OK:
            if m.status == F.FILE_VANISHED:
                r.report.vanished(inc.path)
            else:
                r.report.error(inc.path, os.fsdecode(m.message))
            placement.keep_old(inc)
            return
        if stat.S_IFMT(m.mode) != stat.S_IFREG:
            raise ProtocolError(f"pack member {m.file_id}: not a regular file's mode")
        if m.size > MEMBER_FILE:
            raise ProtocolError(f"pack member {m.file_id}: {m.size} bytes, more than a member holds")
        if m.flags and (inc.prev is None or inc.prev.kind != "f"):
            raise ProtocolError(f"pack member {m.file_id}: a delta or same content for a file without a basis")
        if m.same:
            data, literal = self._basis(inc, dirs), 0
        elif m.delta:
            data, literal = self._rebuild(inc, m, dirs)
        else:
            if len(m.content) != m.size:
                raise ProtocolError(f"pack member {m.file_id}: content is not its size")
            data, literal = m.content, m.size
        digest = blake3_of(data) if data is not None and len(data) == m.size else None
        if digest is None or digest[:MEMBER_HASH] != m.blake3:
            if m.flags and not inc.retried:
                r.planning.rewant(inc)
                return
            r.report.error(inc.path, "content does not match its BLAKE3; not applied")
            placement.keep_old(inc)
            return
        if m.same:
            e = inc.entry._replace(mode=m.mode, size=m.size, mtime_ns=m.seconds * 10**9 + m.nanoseconds,
                                   uid=m.uid, gid=m.gid, perms=m.mode & 0o7777)
            r.apply.entries.attributes(self._dir_handle(inc.rel, dirs), e, inc.prev, inc.path, mtime=True)
            r.report.entry(inc.path, e, digest.hex())
            return
        attrs = (m.mode, m.seconds * 10**9 + m.nanoseconds, m.uid, m.gid)
        parent = self._dir_handle(inc.rel, dirs)
        if parent is None:
            placement.keep_old(inc)
            return
        try:
            staged = r.apply.staging.data(inc.path, data, digest.hex(), attrs, "new" if inc.prev is None else
                                        "update", literal, m.size - literal, parent)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise os_error(inc.path, exc) from None     # a full disk ends the run, not one file
            r.report.error(inc.path, exc.strerror or str(exc))
            placement.keep_old(inc)
            return
        placement.to_place.append((staged, inc))

    def _basis(self, inc: Incoming, dirs: dict) -> bytes | None:
        """This destination's copy of ``inc``, or None if it cannot be read
        as a regular file."""
        from ..fs import pread_all
        d = self._dir_handle(inc.rel, dirs)
        if d is None:
            return None
        try:
            fd = os.open(inc.entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MEMBER_BASIS:
                    return None                 # (read whole: a copy past the bound is asked for again whole)
                return pread_all(fd, st.st_size)
            finally:
                os.close(fd)
        except OSError:
            return None

    def _rebuild(self, inc: Incoming, m, dirs: dict):
        """(the file ``m``'s wire delta makes from this destination's copy,
        literal bytes), or (None, 0) if the copy cannot be read as a regular
        file."""
        import numpy as np

        from ..patch import assemble_in_memory
        from .encodings import delta_from_wire
        basis = self._basis(inc, dirs)
        if basis is None:
            return None, 0
        kinds, sources, lengths, literals = delta_from_wire(m.content, len(basis), m.size)
        out = assemble_in_memory(np.frombuffer(basis, np.uint8), kinds, sources, lengths, literals, m.size)
        return out, len(literals)


class Placement:
    """Completed files: checked (a delta applied to the old copy first),
    staged, and placed in batches of PLACE_BATCH made durable with one
    syncfs; files that failed keep their old copy. -P progress is counted
    here too."""

    def __init__(self, r: Receiver):
        self.r = r
        self.to_place: list = []
        self.flushing: list | None = None       # the batch a flush makes durable off the loop, until placed
        self._flush = None                      # ... that flush's future (concurrent.futures)

    def advance(self, inc, stripe: int) -> None:
        """-P: a stripe of ``inc`` is in; its share of the file's size."""
        if self.r.s.progress is not None and isinstance(inc, Incoming) and inc.frame is not None:
            n = progress_share(inc.frame, stripe)
            inc.progressed += n
            self.r.s.progress.partial(n)

    def finished(self, inc) -> None:
        if self.r.s.progress is not None and isinstance(inc, Incoming):
            self.r.s.progress.done(max(0, inc.entry.size - inc.progressed))

    def complete(self, fid: int, now: float) -> None:
        """All of a file's content is in: check it (a delta is applied to
        the old copy first) and keep it for the next placing."""
        from ..content import ContentError
        r = self.r
        inc = r.wanted.pop(fid)
        r.receiving.pop(fid, None)
        r.intake.acks.pop(fid, None)            # its FileDone acknowledges the stripes not yet acknowledged
        self.finished(inc)
        f = inc.frame
        attrs = (f.mode, f.seconds * 10**9 + f.nanoseconds, f.uid, f.gid)
        action = "new" if inc.prev is None else "update"
        try:
            if f.delta:
                spec = ("delta-file", inc.fd, r.apply.root_fd, inc.rel, inc.entry.name, attrs, inc.path, f.holes)
                try:
                    staged = r.apply.staging.stage(inc.path, spec, f.blake3, action)
                except BaseException:
                    r.apply.staging.drop(inc.fd, inc.tmp)
                    raise
                os.close(inc.fd)                # the delta stays until the file is placed: a kill
                inc.fd = -1                     # before that resumes it from the last checkpoint
            else:
                staged = r.apply.staging.finish(inc.path, inc.fd, inc.tmp, f.blake3, attrs, action, f.length, 0,
                                              time.monotonic() - inc.started, inc.digest)
        except (ContentError, OSError, ResyncError) as exc:
            from ..fs import NO_SPACE, os_error
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise os_error(inc.path, exc) from None     # a full disk ends the run, not one file
            if isinstance(exc, NoSpaceError):
                raise
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            r.s.send(F.FileDone(fid, False, os.fsencode(msg)))
            if f.delta and not inc.retried and isinstance(exc, (ContentError, ResyncError)):
                r.planning.rewant(inc)          # the delta did not make the file: whole, once
                return
            r.report.error(inc.path, msg)
            self.keep_old(inc)
            return
        r.s.send(F.FileDone(fid, True, b""))
        if f.delta:
            staged.result.literal = f.length
            staged.result.matched = max(0, staged.result.size - f.length)
        self.to_place.append((staged, inc))
        if len(self.to_place) >= PLACE_BATCH:
            self.flush()

    def drop(self, fid: int, keep_old: bool) -> None:
        r = self.r
        inc = r.wanted.pop(fid, None)
        r.receiving.pop(fid, None)
        if inc is None:
            return
        self.finished(inc)
        if inc.fd >= 0:
            r.apply.staging.drop(inc.fd, inc.tmp)
        if keep_old:
            self.keep_old(inc)

    def keep_old(self, inc: Incoming) -> None:
        if inc.prev is not None and inc.prev.kind != "d":
            self.r.report.entry(inc.path, inc.prev, None)

    def flush(self, checkpoint: bool = False) -> None:
        """In the middle of a transfer: make the completed files durable
        and place them, and with ``checkpoint`` write the checkpoint too —
        off the event loop where the transport has disk workers
        (``Session.run_blocking``: an fsync may wait seconds behind another
        program's writes; one flush at a time, one asked for while another
        runs is left to the next), here otherwise. A flush's files are
        renamed into place once it is over, after its checkpoint: a kill
        before then sends them again. OSError (nothing taken)."""
        from .checkpoint import Flush
        r = self.r
        if r.s.blocking is None:
            if checkpoint:
                r.checkpoints.write()
            else:
                self.place()
            return
        if self.flushing is not None or r.options.dry_run or r.apply.root_fd < 0:
            return
        staging = r.apply.staging
        staged = staging.take_staged()
        try:
            job = Flush(staging.open_staged(staged))
            if checkpoint:
                try:
                    r.checkpoints.prepare(job)
                except BaseException:
                    job.close()
                    raise
        except BaseException:
            staging.untake(staged)
            raise
        job.dirs = r.apply.take_dirty()
        batch, self.to_place = self.to_place, []
        self.flushing = batch
        self._flush = r.s.run_blocking(job.run, lambda outcome: self._flushed(job, outcome))

    def _flushed(self, job, outcome) -> None:
        """A flush is over (back on the loop): its files renamed into place."""
        batch, self.flushing, self._flush = self.flushing, None, None
        r = self.r
        outcome.result()                        # (its files could not be made durable: the transfer fails)
        for rel, message in job.dir_errors:
            r.report.error(rel + "/", message)
        if job.journal is not None:
            if job.journal_error is not None:   # the transfer goes on without checkpoints
                r.checkpoints.next_at = float("inf")
            else:
                for inc in job.saved:
                    inc.sig_saved = True
        self._rename(batch)

    def settle(self) -> None:
        """The transfer stops: a flush under way is waited for (blocking,
        the one wait on the disk left on the loop, at a cut or a cancel);
        its files, if it made them durable, are placed by what follows."""
        if self.flushing is None:
            return
        batch, future = self.flushing, self._flush
        self.flushing = self._flush = None
        try:
            future.result()
        except Exception:                       # (its files stay staged: removed, or resent after a resume)
            return
        self.to_place[:0] = batch

    def place(self) -> None:
        """Make the completed files durable together, then rename them into
        place (here and now: the end, a cut, a transport without disk
        workers); and the directories that gained or lost names since the
        last time (those flushes placed files in too) fsynced."""
        try:
            if self.to_place:
                self.r.apply.staging.make_durable()
                batch, self.to_place = self.to_place, []
                self._rename(batch)
        finally:
            self.r.apply.sync_dirs()

    def _rename(self, batch: list) -> None:
        """Rename the files of ``batch``, durable, into place."""
        from ..apply import Dir
        from ..scan import open_rel_dir
        apply, report = self.r.apply, self.r.report
        handles: dict[str, Dir] = {}
        try:
            for staged, inc in batch:
                if inc.frame is not None and inc.frame.delta:
                    apply.staging.drop(-1, inc.tmp)
                parent = handles.get(inc.rel) or staged.parent
                if parent is None:
                    try:
                        fd = open_rel_dir(apply.root_fd, inc.rel)
                    except OSError as exc:
                        report.error(inc.path, exc.strerror or str(exc))
                        continue
                    parent = handles[inc.rel] = Dir(fd, inc.rel, stat.S_IMODE(os.fstat(fd).st_mode))
                try:
                    apply.staging.place(staged, parent, inc.entry, inc.prev, inc.path, inc.code)
                except OSError as exc:
                    report.error(inc.path, exc.strerror or str(exc))
                    self.keep_old(inc)
                    continue
                report.entry(inc.path, staged.result.entry, staged.result.blake3)
        finally:
            for h in handles.values():
                h.release()


def _kind_of(mode: int) -> int:
    fmt = stat.S_IFMT(mode)
    return {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 3, stat.S_IFCHR: 4, stat.S_IFBLK: 4}.get(fmt, 5)


def _relay(report, session, itemize: bool):
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
