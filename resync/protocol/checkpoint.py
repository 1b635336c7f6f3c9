"""A receiver's checkpoints: what a cut transfer had received, recorded in
its staging directory so that the next run resumes it (docs/protocol.md:
Resume), and the Resume offered for each file it kept."""
from __future__ import annotations

import json
import os

from . import frames as F

CHECKPOINT_INTERVAL = 2.0        # seconds between a receiver's checkpoints (resume after a cut)
CHECKPOINT_BYTES = 64 << 20      # or sooner, once this much content has arrived since the last


class Checkpoints:
    """The receiver ``r``'s checkpoints: ``kept`` (path -> entry) holds what
    the cut transfer before it left (``journal``: its checkpoint.json)."""

    def __init__(self, r, journal: bytes | None):
        self.r = r
        self.kept: dict[str, dict] = parse_checkpoint(journal)
        self.resumed_bytes = 0
        self.next_at: float | None = None       # set by the first shard
        self.since = 0                          # shard bytes taken since the last checkpoint

    def took(self, n: int, now: float) -> None:
        """``n`` bytes of shards arrived: the first starts the clock; a fast
        link checkpoints by the bytes (what a kill loses stays bounded)."""
        if self.next_at is None:
            self.next_at = now + CHECKPOINT_INTERVAL
        self.since += n
        if self.since >= CHECKPOINT_BYTES and self.next_at > now:
            self.next_at = now

    def timer(self, now: float) -> None:
        if self.next_at is not None and now >= self.next_at:
            self.next_at = now + CHECKPOINT_INTERVAL
            try:
                self.r.placement.flush(checkpoint=True)
            except OSError:                     # a full disk or I/O error: the transfer goes on without
                self.next_at = float("inf")     # checkpoints (placing will report what fails)

    def resumable(self, path: str, prev, inc) -> F.Resume | None:
        """The Resume to offer for ``path``: what a cut transfer kept of it,
        if that content can still be what the sender will send (for a delta:
        the same basis, asked for with the same signature). The sender
        resumes only if its content has the same BLAKE3."""
        r = self.r
        k = self.kept.pop(path, None)
        if k is None:
            return None
        if k["delta"]:
            signature = r.apply.staging.read(k["tmp"] + ".sig")
            if signature is None or prev is None or prev.kind != "f" or [prev.size, prev.mtime_ns] != k["basis"] \
                    or r.options.whole_file or not _signature_parses(signature):
                self.forget(k)
                return None
            inc.signature, inc.sig_saved = signature, True
        try:                                    # held open from here: what is offered cannot go missing
            fd = r.apply.staging.reopen(k["tmp"])
            if os.fstat(fd).st_size != k["length"]:
                os.close(fd)
                raise OSError(0, "not the checkpointed length")
        except OSError:
            self.forget(k)
            inc.signature = b""
            return None
        inc.kept, inc.fd, inc.tmp = k, fd, k["tmp"]
        return resume_of(k)

    def forget(self, k: dict) -> None:
        for name in (k["tmp"], k["tmp"] + ".sig"):
            try:
                os.unlink(name, dir_fd=self.r.apply.staging.fd)
            except OSError:
                pass

    def write(self) -> None:
        """Place the files completed so far, make what has arrived of the
        others durable, and record it (stripes held, the content's BLAKE3)
        in the staging directory: a cut transfer resumes from here."""
        r = self.r
        self.since = 0
        if r.options.dry_run or r.apply.root_fd < 0:
            return
        r.placement.place()
        journal, syncs, sides = self._account()
        for inc in syncs:
            os.fdatasync(inc.fd)
        for inc, data in sides:
            save_signature(r.apply.staging.fd, inc.tmp, data)
            inc.sig_saved = True
        r.apply.staging.checkpoint(journal)

    def prepare(self, job: "Flush") -> None:
        """The checkpoint as ``job``'s to write, off the event loop: what
        it records is taken now, the descriptors it needs duplicated (the
        loop goes on writing and closing its own). OSError (``job`` owns
        what was duplicated)."""
        r = self.r
        self.since = 0
        journal, syncs, sides = self._account()
        job.stage_fd = os.dup(r.apply.staging.fd)
        for inc in syncs:
            job.data_fds.append(os.dup(inc.fd))
        job.sides = [(inc.tmp, data) for inc, data in sides]
        job.saved = [inc for inc, _ in sides]
        job.journal = journal

    def _account(self) -> tuple[bytes, list, list]:
        """The checkpoint: (its journal, the files still arriving that it
        counts — their content made durable before it is written — and
        (file, bytes) of the delta signatures to save beside them first)."""
        r = self.r
        entries = [k for k in self.kept.values()]            # not reached again yet: still kept
        entries += [inc.kept for inc in r.wanted.values()      # offered again, its File not here yet
                    if inc.kept is not None and inc.frame is None]
        syncs, sides = [], []
        for inc in r.receiving.values():
            a, f = inc.assembler, inc.frame
            if a is None or inc.fd < 0 or not a.done or a.complete or f.runs is not None:
                continue                        # (a sparse file is not checkpointed: sent again after a cut)
            syncs.append(inc)
            if f.delta and not inc.sig_saved:              # once, whole, with its salt: the checkpoint names it
                from .encodings import signature_from_wire, signature_to_wire
                sides.append((inc, signature_to_wire(signature_from_wire(inc.signature, r.s.salt), with_salt=True)))
            entries.append({"path": os.fsencode(inc.path).hex(), "tmp": inc.tmp, "content": f.content.hex(),
                            "length": f.length, "delta": f.delta, "k": f.k, "shard_size": f.shard_size,
                            "basis": [inc.prev.size, inc.prev.mtime_ns] if f.delta else None,
                            "stripes": _ranges(a.done)})
        return json.dumps({"version": 1, "files": entries}).encode(), syncs, sides


class Flush:
    """A receiver's disk work in the middle of a transfer, run off the event
    loop (``Placement.flush``): the completed files made durable (they are
    renamed into place back on the loop, once this is over), the
    directories that gained or lost names since the last flush fsynced,
    and — for a checkpoint (``journal``) — what has arrived of the files
    still arriving, their delta signatures, then the checkpoint itself.
    It owns its descriptors and directory handles (closed and released when
    it is over). OSError from the files' fsyncs; the checkpoint's own
    failure is ``journal_error`` (the transfer goes on without checkpoints),
    a directory's is in ``dir_errors`` ((rel, message), reported on the loop)."""

    def __init__(self, staged_fds: list[int]):
        self.staged_fds = staged_fds
        self.dirs: list = []
        self.data_fds: list[int] = []
        self.stage_fd = -1
        self.sides: list[tuple[str, bytes]] = []
        self.saved: list = []                   # the files whose signatures it saves
        self.journal: bytes | None = None
        self.journal_error: OSError | None = None
        self.dir_errors: list[tuple[str, str]] = []

    def run(self) -> None:
        from ..apply.staging import write_journal
        from ..apply.tree import fsync_files
        try:
            fsync_files(self.staged_fds)
            for d in self.dirs:
                try:
                    os.fsync(d.fd)
                except OSError as exc:
                    self.dir_errors.append((d.rel, exc.strerror or str(exc)))
            if self.journal is not None:
                try:
                    for fd in self.data_fds:
                        os.fdatasync(fd)
                    for tmp, data in self.sides:
                        save_signature(self.stage_fd, tmp, data)
                    write_journal(self.stage_fd, self.journal)
                except OSError as exc:
                    self.journal_error = exc
        finally:
            self.close()

    def close(self) -> None:
        for fd in (*self.staged_fds, *self.data_fds, *([self.stage_fd] if self.stage_fd >= 0 else [])):
            try:
                os.close(fd)
            except OSError:
                pass
        self.staged_fds, self.data_fds, self.stage_fd = [], [], -1
        dirs, self.dirs = self.dirs, []
        for d in dirs:
            d.release()


def save_signature(dir_fd: int, tmp: str, data: bytes) -> None:
    """A delta's signature beside its temp file ``tmp`` in the staging
    directory ``dir_fd`` (``tmp``.sig), written durably. OSError."""
    from ..apply.staging import write_side
    write_side(dir_fd, tmp + ".sig.tmp", data)
    os.rename(tmp + ".sig.tmp", tmp + ".sig", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _ranges(stripes) -> list[list[int]]:
    """Sorted stripe numbers as [first, count] runs."""
    out: list[list[int]] = []
    for s in sorted(stripes):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return out


def resume_of(k: dict) -> F.Resume:
    """A checkpoint entry as the Resume it offers (the stripes it holds)."""
    return F.Resume(bytes.fromhex(k["content"]), k["length"], k["k"], k["shard_size"],
                    tuple(map(tuple, k["stripes"])))


def parse_checkpoint(journal: bytes | None) -> dict[str, dict]:
    """path -> entry of a receiver's checkpoint (see Checkpoints.write);
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
                and _whole(k["k"], 1, 255) and _whole(k["shard_size"], 64, F.MAX_SHARD_SIZE)
                and k["k"] * k["shard_size"] <= F.MAX_STRIPE_BYTES
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


