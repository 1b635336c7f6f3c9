"""The sending side of the offline flow: ``signature-tree`` describes a
destination, ``pack`` writes everything the destination lacks into one
parity-protected bundle.
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import FileError, ResyncError, UsageError
from ..fs import TEMP_PREFIX, MappedFile, atomic_output, raise_os_error
from ..tree import Entry as FsEntry
from ..tree import walk
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


@dataclass
class BundleStats:
    """Counters of a pack or unpack, named as SyncStats's (the history
    records them the same way)."""
    files: int = 0                  # regular files in the tree
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    bytes_scanned: int = 0          # their total size
    files_transferred: int = 0      # files whose content (whole or delta) travels / was written
    bytes_literal: int = 0          # file bytes carried (whole files and delta literals)
    bytes_matched: int = 0          # file bytes rebuilt from the destination's own copy
    bytes_written: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    errors: int = 0
    vanished: int = 0
    stripes: int = 0
    duration: float = 0.0
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d.pop("messages")
        return d


@dataclass
class PackStats(BundleStats):
    whole_files: int = 0
    delta_files: int = 0
    unchanged: int = 0              # files the destination already has (quick check)
    payload_bytes: int = 0
    bundle_bytes: int = 0           # size of the bundle file (payload + parity + headers)
    k: int = 0
    m: int = 0
    shard_size: int = 0


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


def _whole(out: _Payload, fd: int, size: int) -> bytes | None:
    """Stream ``size`` bytes of ``fd`` as LZ4 chunks; their BLAKE3, or None if
    the file ended early (then zeros make up the declared size)."""
    import blake3
    import lz4.block
    h = blake3.blake3()
    done = 0
    short = False
    while done < size:
        want = min(P.CHUNK_RAW, size - done)
        raw = os.read(fd, want) if not short else b""
        while len(raw) < want and not short:
            more = os.read(fd, want - len(raw))
            if not more:
                short = True
                break
            raw += more
        if len(raw) < want:
            raw = raw.ljust(want, b"\0")
        h.update(raw)
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):
            out.put(P.CHUNK.pack(P.CODEC_LZ4, len(raw), len(packed)) + packed)
        else:
            out.put(P.CHUNK.pack(P.CODEC_RAW, len(raw), len(raw)) + raw)
        done += want
    if not short and os.read(fd, 1):
        return None                 # grew while being read
    return None if short else h.digest()


def _read_back(fd: int, out: str, bundle_id: bytes, entries: int) -> None:
    """Check the bundle just written (still under its temp name) the way
    unpack will read it: every shard intact, the trailer parsed, every record
    decoded and checked. A bundle pack reports as written is one unpack
    accepts; anything else is refused here, before the rename."""
    from ..errors import ResyncError, VerificationError
    from .shards import ShardReader
    from .unpack import check_bundle
    try:
        health, info = check_bundle(ShardReader(fd, out))
        bad = sum(len(h.bad) for h in health)
        if bad or info.bundle_id != bundle_id or len(info.trailer.entries) != entries:
            raise VerificationError(out, f"{bad} shards damaged, or another bundle, right after writing")
    except ResyncError as exc:
        raise VerificationError(out, f"the bundle does not read back as written ({exc}); nothing written") from None


def pack(src: str, out: str, against: str | None = None, k: int = DEFAULT_K, m: int = DEFAULT_M,
         shard_size: int = DEFAULT_SHARD, on_entry=None, on_file=None) -> PackStats:
    """Write bundle ``out`` holding tree ``src`` as the destination described
    by tree signature ``against`` lacks it (everything, without one)."""
    from ..delta import make_delta
    from ..signature import signature_from_bytes
    from .. import formats

    t0 = time.monotonic()
    check_parameters(k, m, shard_size)
    _check_root(src, "the source")
    against_id, old_entries = load_tree_signature(against) if against else (bytes(32), [])
    old = {e.path: e for e in old_entries}
    stats = PackStats(k=k, m=m)
    bundle_id = os.urandom(16)
    entries: list[P.Entry] = []
    out_dir = os.path.dirname(os.path.abspath(out))
    with atomic_output(out) as fd, tempfile.TemporaryDirectory(prefix=TEMP_PREFIX + "pack-", dir=out_dir) as tmp:
        writer = ShardWriter(fd, bundle_id, k, m, shard_size)
        body = _Payload(writer, out)
        body.put(P.HEADER.pack(P.MAGIC, P.VERSION, P.FLAG_AGAINST if against else 0, 0, bundle_id,
                               against_id, time.time_ns()))
        # Paths whose source state is unknown (a directory that could not be
        # listed, a file that could not be read): the bundle says nothing of
        # them, and deletes nothing there.
        unknown: list[str] = []
        errors: list = []

        def failed(path: str, exc: BaseException, is_dir: bool = False) -> None:
            stats.errors += 1
            stats.messages.append(_problem(path, exc, is_dir))
            unknown.append(path)

        for path, e, unlisted in walk(src, errors):
            for rel, exc in errors:
                failed(rel, exc, True)
            errors.clear()
            if unlisted:
                unknown.append(path)
            full = os.path.join(src, path)
            digest, target, record = bytes(32), b"", NONE
            if e.kind == "f":
                stats.files += 1
                stats.bytes_scanned += e.size
                prev = old.get(path)
                if prev is not None and (prev.kind != "f" or prev.unread):
                    basis = None             # nothing to compare with or build from: the file travels whole
                else:
                    basis = prev
                if basis is not None and basis.size == e.size and basis.mtime_ns == e.mtime_ns:
                    digest = prev.file_hash
                    stats.unchanged += 1
                else:
                    started = time.monotonic()
                    try:
                        fd_src = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
                    except OSError as exc:
                        failed(path, exc)
                        continue
                    try:
                        st = os.fstat(fd_src)
                        if not stat.S_ISREG(st.st_mode):
                            failed(path, OSError(0, "changed type while packing; skipped"))
                            continue
                        e = FsEntry.from_stat(e.name, st)
                        record = body.pos
                        if basis is not None:
                            delta_path = os.path.join(tmp, "delta")
                            sig = signature_from_bytes(prev.signature, path)
                            with MappedFile(full, name=path) as f:
                                if f.array.shape[0] != e.size:
                                    digest = None
                                else:
                                    ds = make_delta(sig, f.array, delta_path, durable=False)
                            if digest is not None:
                                with MappedFile(delta_path) as d:
                                    digest = formats.unpack_delta(d.buffer, path).header.target_hash
                                    size = len(d.buffer)
                                    body.put(P.RECORD.pack(P.DELTA, len(entries), size))
                                    for lo in range(0, size, P.CHUNK_RAW):
                                        body.put(d.buffer[lo:lo + P.CHUNK_RAW])
                                os.unlink(delta_path)
                                stats.delta_files += 1
                                stats.bytes_literal += ds.literal_bytes
                                stats.bytes_matched += ds.matched_bytes
                                literal, matched = ds.literal_bytes, ds.matched_bytes
                        else:
                            body.put(P.RECORD.pack(P.WHOLE, len(entries), e.size))
                            digest = _whole(body, fd_src, e.size)
                            stats.whole_files += 1
                            stats.bytes_literal += e.size
                            literal, matched = e.size, 0
                        after = os.fstat(fd_src)
                        if digest is None or after.st_size != e.size or after.st_mtime_ns != e.mtime_ns:
                            stats.vanished += 1         # its record stays in the payload, unreferenced
                            stats.messages.append(f"{path}: changed while being packed; left out")
                            unknown.append(path)
                            continue
                    except (OSError, FileError) as exc:     # reading the source (the bundle's errors name it)
                        if isinstance(exc, FileError) and exc.args[0] != path:
                            raise
                        failed(path, exc)
                        continue
                    finally:
                        os.close(fd_src)
                    stats.files_transferred += 1
                    if on_file is not None:
                        on_file(path, "new" if prev is None else "update", e.size, literal, matched,
                                time.monotonic() - started, digest.hex())
            elif e.kind == "d":
                stats.dirs += 1
            elif e.kind == "L":
                stats.symlinks += 1
                try:
                    target = os.readlink(os.fsencode(full))
                except OSError as exc:
                    failed(path, exc)
                    continue
            else:
                stats.specials += 1
            prev = old.get(path)
            if prev is None:
                stats.created += 1
            elif prev.kind != e.kind or record != NONE or prev.mode != e.mode or prev.mtime_ns != e.mtime_ns:
                stats.updated += 1
            entries.append(P.Entry(path, e.kind, e.mode, e.mtime_ns, e.size if e.kind in "fL" else 0,
                                   e.uid, e.gid, e.rdev, digest, target, record))
            if on_entry is not None:
                on_entry(path, e, digest.hex() if e.kind == "f" else None)
        for rel, exc in errors:
            failed(rel, exc, True)
        present = {e.path for e in entries}
        unknown_dirs = tuple(p + "/" for p in unknown)
        deletions = [e.path for e in old_entries
                     if e.path not in present and e.path not in unknown and not e.path.startswith(unknown_dirs)]
        stats.deleted = len(deletions)
        try:
            rst = os.stat(src)
        except OSError as exc:
            raise_os_error(src, exc)
        trailer = P.pack_trailer(P.Trailer(
            P.Root(rst.st_mode, rst.st_mtime_ns, rst.st_uid, rst.st_gid), entries, [P.Against(e.path, e.kind, e.size, e.mtime_ns, e.unlisted) for e in old_entries], deletions))
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
