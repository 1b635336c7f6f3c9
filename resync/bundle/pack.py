"""The sending side of the offline flow: ``signature-tree`` describes a
destination, ``pack`` writes everything the destination lacks into one
parity-protected bundle.
"""
from __future__ import annotations

import os
import stat
import tempfile
import time

from ..content import has_holes
from ..errors import FileError, ResyncError, UsageError
from ..fs import TEMP_PREFIX, MappedFile, atomic_output, raise_os_error
from ..report import FileChange, Report, RunStats
from ..scan import Entry as FsEntry
from ..scan import join, walk, walk_dirs
from . import payload as P
from .manifest import NONE, TreeEntry, read_tree_signature, write_tree_signature
from .shards import DEFAULT_K, DEFAULT_M, DEFAULT_SHARD, ShardWriter, check_parameters


def _check_root(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FileError.from_os(path, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: {what} must be a directory")


def _problem(path: str, exc: BaseException, is_dir: bool = False) -> str:
    """One line naming the path that failed (a directory with a trailing /)."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, ResyncError) and len(exc.args) == 2:
        why = exc.args[1]
    return f"{path or '.'}{'/' if is_dir and path else ''}: {why}"


def signature_tree(root: str, out: str) -> tuple[int, int, list[str]]:
    """Write the tree signature of directory ``root`` to ``out`` (atomically).
    Returns (entries, bytes written, problems): a directory that cannot be
    listed is recorded as unlisted and a file that cannot be read as unread
    (each named in ``problems``), so that a pack against the signature leaves
    what lies there alone or sends it whole."""
    from ..signature import compute_signature, signature_bytes
    _check_root(root, "the destination")
    errors: list = []
    problems: list[str] = []

    def entries():
        for path, e, unlisted in walk(root, errors):
            for rel, exc in errors:
                problems.append(_problem(rel, exc, True))
            errors.clear()
            sig, unread = b"", False
            if e.kind == "f":
                try:
                    with MappedFile(os.path.join(root, path), name=path) as f:
                        sig = signature_bytes(compute_signature(f.array))
                except ResyncError as exc:
                    problems.append(_problem(path, exc))
                    unread = True
            yield TreeEntry(path, e.kind, e.mode, e.mtime_ns, e.size, sig, unlisted=unlisted, unread=unread)

    with atomic_output(out) as fd:
        count, _ = write_tree_signature(fd, entries())
        size = os.lseek(fd, 0, os.SEEK_CUR)
    problems += [_problem(rel, exc, True) for rel, exc in errors]
    return count, size, problems


def load_tree_signature(path: str) -> tuple[bytes, list[TreeEntry]]:
    try:
        with MappedFile(path) as f:
            return read_tree_signature(f.buffer, path)
    except IsADirectoryError:
        raise FileError(path, "is a directory") from None


class BundleStats(RunStats):
    """Counters of a pack or unpack, named as sync's (the history records
    them the same way), the number of stripes, and the per-entry messages."""

    def __init__(self):
        super().__init__()
        self.stripes = 0
        self._messages: list[str] = []

    @property
    def messages(self) -> list[str]:
        return self._messages


class PackStats(BundleStats):
    def __init__(self, k: int = 0, m: int = 0):
        super().__init__()
        self.whole_files = 0
        self.delta_files = 0
        self.unchanged = 0              # files the destination already has (quick check)
        self.payload_bytes = 0
        self.bundle_bytes = 0           # size of the bundle file (payload + parity + headers)
        self.k, self.m = k, m
        self.shard_size = 0


class _Payload:
    """The payload stream: counts its offset and feeds the shard writer. A
    write error names the bundle (``out``), never the source file being read."""

    def __init__(self, writer: ShardWriter, out: str):
        self.writer = writer
        self.out = out
        self.pos = 0

    def put(self, data) -> None:
        try:
            self.writer.write(data)
        except OSError as exc:
            raise_os_error(self.out, exc)
        self.pos += len(memoryview(data).cast("B"))


def _whole(out: _Payload, fd: int, size: int, sparse: bool = False) -> bytes | None:
    """Stream ``size`` bytes of ``fd`` as LZ4 chunks; their BLAKE3, or None if
    the file ended early (then zeros make up the declared size). The file's
    holes (SEEK_HOLE) travel as hole chunks, nothing stored; with ``sparse``
    (-S) so do its blocks of zeros."""
    import blake3
    import lz4.block

    from ..content import data_extents
    from ..fs import nonzero_runs, pread_all
    h = blake3.blake3()
    extents = data_extents(fd, size)
    pieces: list[tuple[int, int, bool]] = []        # (offset, length, data?) tiling 0..size
    at = 0
    for offset, length in ([(0, size)] if extents is None else extents):
        if offset > at:
            pieces.append((at, offset - at, False))
        pieces.append((offset, length, True))
        at = offset + length
    if at < size:
        pieces.append((at, size - at, False))

    def hole(n: int) -> None:
        for lo in range(0, n, P.MAX_HOLE):
            step = min(P.MAX_HOLE, n - lo)
            out.put(P.CHUNK.pack(P.CODEC_HOLE, step, 0))
            P.hash_zeros(h, step)

    def data(raw: bytes) -> None:
        h.update(raw)
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):
            out.put(P.CHUNK.pack(P.CODEC_LZ4, len(raw), len(packed)) + packed)
        else:
            out.put(P.CHUNK.pack(P.CODEC_RAW, len(raw), len(raw)) + raw)

    short = False
    for offset, length, is_data in pieces:
        if not is_data:
            hole(length)
            continue
        for lo in range(offset, offset + length, P.CHUNK_RAW):
            want = min(P.CHUNK_RAW, offset + length - lo)
            raw = pread_all(fd, want, lo) if not short else b""
            if len(raw) < want:
                short = True
                raw = raw.ljust(want, b"\0")
            if not sparse:
                data(raw)
                continue
            at = 0
            for a, b in nonzero_runs(raw, lo):
                if a > at:
                    hole(a - at)
                data(raw[a:b])
                at = b
            if at < want:
                hole(want - at)
    if not short and pread_all(fd, 1, size):
        return None                 # grew while being read
    return None if short else h.digest()


def _read_back(fd: int, out: str, bundle_id: bytes, entries: int) -> None:
    """Check the bundle just written (still under its temp name) the way
    unpack will read it: every shard intact, the trailer parsed, every record
    decoded and checked. A bundle pack reports as written is one unpack
    accepts; anything else is refused here, before the rename."""
    from ..errors import ResyncError, VerificationError
    from .shards import ShardReader
    from .records import check_bundle
    try:
        health, info = check_bundle(ShardReader(fd, out))
        bad = sum(len(h.bad) for h in health)
        if bad or info.bundle_id != bundle_id or len(info.trailer.entries) != entries:
            raise VerificationError(out, f"{bad} shards damaged, or another bundle, right after writing")
    except ResyncError as exc:
        raise VerificationError(out, f"the bundle does not read back as written ({exc}); nothing written") from None


class _Listed:
    """A tree-signature entry as the planner reads an lstat result."""

    __slots__ = ("st_mode", "st_size", "st_mtime_ns", "st_uid", "st_gid", "st_rdev")

    def __init__(self, e: TreeEntry):
        self.st_mode, self.st_size, self.st_mtime_ns = e.mode, e.size, e.mtime_ns
        self.st_uid = self.st_gid = self.st_rdev = 0


def pack(src: str, out: str, against: str | None = None, k: int = DEFAULT_K, m: int = DEFAULT_M,
         shard_size: int = DEFAULT_SHARD, on_entry=None, on_file=None, sparse: bool = False) -> PackStats:
    """Write bundle ``out`` holding tree ``src`` as the destination described
    by tree signature ``against`` lacks it (everything, without one): the
    source is compared with the signature's entries directory by directory
    (``plan.Planner``, the same rules as sync), and a file the plan
    transfers travels as a delta against the signature's blocks, or whole.
    A file's holes are not stored and unpack as holes; ``sparse`` (-S): its
    blocks of zeros neither."""
    from ..plan import ATTRS, DIRECTORY, LINK, SPECIAL, TRANSFER, PlanOptions, Planner

    t0 = time.monotonic()
    check_parameters(k, m, shard_size)
    _check_root(src, "the source")
    against_id, old_entries = load_tree_signature(against) if against else (bytes(32), [])
    old = {e.path: e for e in old_entries}
    listed: dict[str, dict] = {}
    for e in old_entries:
        parent, _, name = e.path.rpartition("/")
        listed.setdefault(parent, {})[name] = _Listed(e)
    stats = PackStats(k, m)
    report = Report(stats, on_error=stats.messages.append, on_file=on_file, on_entry=on_entry)
    bundle_id = os.urandom(16)
    entries: list[P.Entry] = []
    out_dir = os.path.dirname(os.path.abspath(out))
    # Paths whose source state is unknown (a directory that could not be
    # listed, a file that could not be read): the bundle says nothing of
    # them, and deletes nothing there.
    unknown: list[str] = []

    def failed(path: str, exc: BaseException, is_dir: bool = False) -> None:
        stats.errors += 1
        stats.messages.append(_problem(path, exc, is_dir))
        unknown.append(path)

    def add(path: str, e, digest: bytes = bytes(32), target: bytes = b"", record: int = NONE) -> None:
        entries.append(P.Entry(path, e.kind, e.mode, e.mtime_ns, e.size if e.kind in "fL" else 0,
                               e.uid, e.gid, e.rdev, digest, target, record))
        report.entry(path, e, digest.hex() if e.kind == "f" else None)

    def keep(path: str, e) -> None:
        stats.unchanged += 1
        add(path, e, old[path].file_hash)

    planner = Planner(PlanOptions(delete=bool(against)), report, keep,
                      link_target=lambda path: os.readlink(os.fsencode(os.path.join(src, path))))
    with atomic_output(out) as fd, tempfile.TemporaryDirectory(prefix=TEMP_PREFIX + "pack-", dir=out_dir) as tmp:
        writer = ShardWriter(fd, bundle_id, k, m, shard_size)
        body = _Payload(writer, out)
        body.put(P.HEADER.pack(P.MAGIC, P.VERSION, P.FLAG_AGAINST if against else 0, 0, bundle_id,
                               against_id, time.time_ns()))
        errors: list = []
        for rel, listing, unlisted in walk_dirs(src, errors):
            for path, exc in errors:
                failed(path, exc, True)
            errors.clear()
            unknown.extend(join(rel, name) for name in unlisted)
            for d in planner.directory(rel, listing, dict(listed.get(rel, ()))):
                what, e, prev, path = d[0], d[1], d[2], d[3]
                if what == TRANSFER:
                    basis = old.get(path) if prev is not None and prev.kind == "f" else None
                    if basis is not None and basis.unread:
                        basis = None            # its content is unknown: the file travels whole
                    _record(path, e, basis, src, tmp, body, len(entries), stats, report, failed, add, unknown,
                            sparse)
                    continue
                if prev is None:
                    stats.created += 1
                elif prev.kind != e.kind or prev.mode != e.mode or prev.mtime_ns != e.mtime_ns:
                    stats.updated += 1
                if what == ATTRS:
                    stats.unchanged += 1
                    add(path, e, old[path].file_hash)
                elif what == LINK:
                    add(path, e, target=d[4])
                elif what in (DIRECTORY, SPECIAL):
                    add(path, e)
        for path, exc in errors:
            failed(path, exc, True)
        unknown_dirs = tuple(p + "/" for p in unknown)
        gone = [join(rel, e.name) for rel, e in planner.deletions]
        gone_dirs = tuple(p + "/" for p in gone)
        deletions = [e.path for e in old_entries if (e.path in gone or e.path.startswith(gone_dirs))
                     and e.path not in unknown and not e.path.startswith(unknown_dirs)]
        stats.deleted = len(deletions)
        try:
            rst = os.stat(src)
        except OSError as exc:
            raise_os_error(src, exc)
        trailer = P.pack_trailer(P.Trailer(
            P.Root(rst.st_mode, rst.st_mtime_ns, rst.st_uid, rst.st_gid), entries,
            [P.Against(e.path, e.kind, e.size, e.mtime_ns, e.unlisted) for e in old_entries], deletions))
        trailer_offset = body.pos
        stored = P.store_trailer(trailer)
        body.put(stored)
        body.put(P.footer(trailer_offset, trailer, stored))
        layout = writer.close()
        _read_back(fd, out, bundle_id, len(entries))
    stats.payload_bytes = layout.payload_len
    stats.bundle_bytes = stats.bytes_written = layout.file_size
    stats.shard_size, stats.stripes = layout.shard_size, layout.stripes
    stats.duration = time.monotonic() - t0
    return stats


def _record(path: str, e, basis: TreeEntry | None, src: str, tmp: str, body: _Payload, index: int,
            stats: PackStats, report: Report, failed, add, unknown: list[str], sparse: bool = False) -> None:
    """Write the record of the file ``path`` (a delta against the signature's
    ``basis``, or whole) and its manifest entry; a file that cannot be read is
    left out (and named), one that changes while it is read is left out with
    its record unreferenced in the payload (readers step over it)."""
    from .. import formats
    from ..delta import make_delta
    from ..signature import signature_from_bytes
    started = time.monotonic()
    full = os.path.join(src, path)
    try:
        fd_src = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        failed(path, exc)
        return
    try:
        st = os.fstat(fd_src)
        if not stat.S_ISREG(st.st_mode):
            failed(path, OSError(0, "changed type while packing; skipped"))
            return
        e = FsEntry.from_stat(e.name, st)
        record = body.pos
        flags = P.RECORD_SPARSE if sparse or has_holes(st) else 0     # its zeros unpacked as holes
        digest: bytes | None = b""
        if basis is not None:
            delta_path = os.path.join(tmp, "delta")
            sig = signature_from_bytes(basis.signature, path)
            with MappedFile(full, name=path) as f:
                if f.array.shape[0] != e.size:
                    digest = None
                else:
                    ds = make_delta(sig, f.array, delta_path, durable=False)
            if digest is not None:
                with MappedFile(delta_path) as d:
                    digest = formats.unpack_delta(d.buffer, path).header.target_hash
                    size = len(d.buffer)
                    body.put(P.RECORD.pack(P.DELTA, flags, index, size))
                    for lo in range(0, size, P.CHUNK_RAW):
                        body.put(d.buffer[lo:lo + P.CHUNK_RAW])
                os.unlink(delta_path)
                stats.delta_files += 1
                literal, matched = ds.literal_bytes, ds.matched_bytes
        else:
            body.put(P.RECORD.pack(P.WHOLE, flags, index, e.size))
            digest = _whole(body, fd_src, e.size, sparse)
            stats.whole_files += 1
            literal, matched = e.size, 0
        after = os.fstat(fd_src)
        if digest is None or after.st_size != e.size or after.st_mtime_ns != e.mtime_ns:
            stats.vanished += 1         # its record stays in the payload, unreferenced
            stats.messages.append(f"{path}: changed while being packed; left out")
            unknown.append(path)
            return
    except (OSError, FileError) as exc:     # reading the source (the bundle's errors name it)
        if isinstance(exc, FileError) and exc.args[0] != path:
            raise
        failed(path, exc)
        return
    finally:
        os.close(fd_src)
    stats.files_transferred += 1
    stats.bytes_transferred += e.size
    stats.bytes_literal += literal
    stats.bytes_matched += matched
    if basis is None:
        stats.created += 1
    else:
        stats.updated += 1
    add(path, e, digest, record=record)
    report.file(FileChange(path, "new" if basis is None else "update", e.size, literal, matched,
                           time.monotonic() - started, digest.hex(), e))
