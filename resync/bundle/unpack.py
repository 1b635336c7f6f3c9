"""The receiving side: check a bundle, rebuild what parity allows, and apply
it to a destination tree.

Everything that can refuse a bundle is checked before the destination is
touched: every stripe's shards (more than m bad in any stripe: refused), the
payload's header, footer and trailer, and -- for a bundle made against a tree
signature -- that the destination is still in the state that signature
describes. Then every file's new content is written into a staging
directory inside the destination (``.resync-tmp-unpack-*``, on the same file
system) and checked against its BLAKE3; only when all of them are staged and
durable are they renamed into place, links and specials made, attributes set
and deletions done. A failure or kill before that leaves every destination
path as it was; stale staging directories are removed by the next unpack.

Every change is made relative to a directory descriptor reached from the
destination root one component at a time with O_NOFOLLOW, so nothing is
written outside the root, whatever symlinks the bundle or the destination
holds.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

from ..errors import FormatError, UnrecoverableError, UsageError, VerificationError
from ..fs import TEMP_PREFIX, raise_os_error
from ..tree import DIR_FLAGS, USER_RWX, open_dir_at, open_up_at, overrides_permissions, remove_tree, walk
from . import payload as P
from .manifest import MAX_SIZE, NONE
from .pack import BundleStats
from .shards import ShardReader, open_bundle

STAGE_PREFIX = TEMP_PREFIX + "unpack-"


class PayloadStream:
    """Random access to the payload of a shard file, one stripe cached."""

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self.layout = reader.layout
        self._stripe = -1
        self._data = memoryview(b"")

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.layout.payload_len:
            raise FormatError(self.reader.name, P.WHAT, "a record runs past the end of the payload")
        out = bytearray()
        per = self.layout.stripe_data
        while n:
            s = offset // per
            if s != self._stripe:
                self._data = self.reader.stripe_payload(s)
                self._stripe = s
            lo = offset - s * per
            take = min(n, len(self._data) - lo)
            out += self._data[lo:lo + take]
            offset += take
            n -= take
        return bytes(out)


@dataclass
class BundleInfo:
    bundle_id: bytes
    against_id: bytes | None
    created_ns: int
    trailer: P.Trailer
    trailer_offset: int


def read_bundle(reader: ShardReader) -> tuple[PayloadStream, BundleInfo]:
    """The payload stream and the checked header, footer and trailer."""
    import blake3
    name = reader.name
    stream = PayloadStream(reader)
    size = reader.layout.payload_len
    if size < P.HEADER.size + P.FOOTER.size:
        raise FormatError(name, P.WHAT, "payload too short")
    magic, version, flags, _, bundle_id, against_id, created = P.HEADER.unpack(stream.read(0, P.HEADER.size))
    if magic != P.MAGIC:
        raise FormatError(name, P.WHAT, "bad payload magic")
    if version not in P.VERSIONS:
        raise FormatError(name, P.WHAT, f"unsupported payload version {version}")
    if bundle_id != reader.layout.bundle_id:
        raise FormatError(name, P.WHAT, "payload and shards belong to different bundles")
    if flags & ~P.FLAG_AGAINST:
        raise FormatError(name, P.WHAT, f"unknown flags {flags:#x}")
    t_off, t_len, raw_len, t_hash, end = P.FOOTER.unpack(stream.read(size - P.FOOTER.size, P.FOOTER.size))
    if end != P.END_MAGIC:
        raise FormatError(name, P.WHAT, "bad end magic (truncated?)")
    if t_off < P.HEADER.size or t_off + t_len != size - P.FOOTER.size:
        raise FormatError(name, P.WHAT, "trailer offset or length out of range")
    if raw_len > P.MAX_TRAILER or raw_len > t_len * P.LZ4_MAX_RATIO + 16:
        raise FormatError(name, P.WHAT, f"trailer length {raw_len} out of range")
    stored = stream.read(t_off, t_len)
    if blake3.blake3(stored).digest() != t_hash:
        raise FormatError(name, P.WHAT, "trailer checksum mismatch")
    import lz4.block
    try:
        raw = lz4.block.decompress(stored, uncompressed_size=raw_len) if raw_len else b""
    except lz4.block.LZ4BlockError:
        raise FormatError(name, P.WHAT, "corrupt trailer (LZ4)") from None
    if len(raw) != raw_len:
        raise FormatError(name, P.WHAT, "trailer expands to the wrong size")
    against = bool(flags & P.FLAG_AGAINST)
    trailer = P.unpack_trailer(raw, name, t_off, against, version)
    return stream, BundleInfo(bundle_id, against_id if against else None, created, trailer, t_off)


def check_health(reader: ShardReader) -> list:
    """Health of every stripe; UnrecoverableError if any has more than m bad shards."""
    health = list(reader.health())
    for h in health:
        if not h.repairable:
            raise UnrecoverableError(
                f"{reader.name}: stripe {h.stripe}",
                f"{len(h.bad)} of {h.stored} shards damaged or missing, parity repairs {reader.layout.m}; "
                f"nothing applied")
    return health


def check_bundle(reader: ShardReader) -> tuple[list, BundleInfo]:
    """Everything unpack checks before it touches a destination: the health
    of every stripe (UnrecoverableError beyond parity), then the payload's
    header, trailer and every record (``check_records``). Returns the stripes'
    health and the bundle's BundleInfo."""
    health = check_health(reader)
    stream, info = read_bundle(reader)
    check_records(stream, info, reader.name)
    return health, info


@dataclass
class UnpackStats(BundleStats):
    damaged_stripes: int = 0
    repaired_shards: int = 0


def _mismatch(dst: str, why: str):
    raise VerificationError(dst, f"does not match the tree signature the bundle was made against "
                                 f"({why}); nothing applied")


def _check_against(dst: str, current: dict, trailer: P.Trailer) -> None:
    """Every destination path must be as the tree signature says, or already
    as the bundle makes it (a re-run after an interrupted unpack), or gone
    when the bundle deletes or replaces it."""
    new = {e.path: e for e in trailer.entries}
    deleted = set(trailer.deletions)

    def is_new(path: str, cur) -> bool:
        e = new.get(path)
        return e is not None and e.kind == cur.kind and (
            e.kind not in "fL" or (cur.size == e.size and (e.kind == "L" or cur.mtime_ns == e.mtime_ns)))

    for a in trailer.against:
        cur = current.get(a.path)
        if cur is None:
            if a.path in deleted or a.path in new:
                continue
            _mismatch(dst, f"{a.path}: missing")
        if cur.kind == a.kind and (a.kind not in "fL" or (
                cur.size == a.size and (a.kind == "L" or cur.mtime_ns == a.mtime_ns))):
            continue
        if is_new(a.path, cur):
            continue
        _mismatch(dst, f"{a.path}: changed" if cur.kind == a.kind else f"{a.path}: is a different kind of entry")
    known = {a.path for a in trailer.against}
    unlisted = tuple(a.path + "/" for a in trailer.against if a.unlisted)
    for path, cur in current.items():
        if path not in known and not is_new(path, cur) and not path.startswith(unlisted):
            _mismatch(dst, f"{path}: not in the tree signature")


def _already_new(dirs: "_Dirs", e: P.Entry, cur) -> bool:
    """Whether the destination already holds ``e`` (an earlier, interrupted
    unpack got that far): same size and mtime, and the same BLAKE3."""
    import blake3
    if cur is None or cur.kind != "f" or cur.size != e.size or cur.mtime_ns != e.mtime_ns:
        return False
    parent, _, base = e.path.rpartition("/")
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dirs.get(parent))
    except OSError:
        return False
    try:
        h = blake3.blake3()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.digest() == e.blake3
    finally:
        os.close(fd)


class _Dirs:
    """Descriptors of destination directories, opened from the root one
    component at a time without following symlinks.

    Without CAP_DAC_OVERRIDE, a directory this user owns that lacks u+rwx (a
    0555 copy of a read-only source directory) is given u+rwx when opened;
    ``opened`` keeps its permission bits before, for the end of the run (the
    bundle's attributes) or ``close_up`` (an unpack that stops early)."""

    def __init__(self, root_fd: int, opened: dict[str, int]):
        self.fds = {"": root_fd}
        self.open_up = not overrides_permissions()
        self.opened = opened
        if self.open_up:
            self._open_up("", root_fd)

    def get(self, rel: str) -> int:
        fd = self.fds.get(rel)
        if fd is None:
            parent, _, name = rel.rpartition("/")
            pfd = self.get(parent)
            try:
                fd = open_dir_at(pfd, name)
            except PermissionError:
                if not self.open_up:
                    raise
                self.opened.setdefault(rel, open_up_at(pfd, name))
                fd = open_dir_at(pfd, name)
            self.fds[rel] = fd
            if self.open_up:
                self._open_up(rel, fd)
        return fd

    def _open_up(self, rel: str, fd: int) -> None:
        perms = stat.S_IMODE(os.fstat(fd).st_mode)
        if perms & USER_RWX != USER_RWX:
            try:
                os.fchmod(fd, perms | USER_RWX)
                self.opened.setdefault(rel, perms)
            except OSError:
                pass                    # not ours: what needs it fails with EACCES and says so

    def close_up(self) -> None:
        """Give the directories opened up their permission bits back (children first)."""
        for rel, perms in sorted(self.opened.items(), reverse=True):
            try:
                os.fchmod(self.get(rel), perms)
            except OSError:
                pass
        self.opened.clear()

    def forget(self, rel: str) -> None:
        for key in [k for k in self.fds if k == rel or k.startswith(rel + "/")]:
            os.close(self.fds.pop(key))

    def close(self) -> None:
        for rel, fd in self.fds.items():
            if rel:
                os.close(fd)
        self.fds = {}


def _clear(parent_fd: int, name: str) -> None:
    """Remove whatever is at ``name`` (file, link, special or directory tree)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(parent_fd, name, open_up=True)
    else:
        os.unlink(name, dir_fd=parent_fd)


def _remove_stale_stages(root_fd: int) -> None:
    for name in os.listdir(root_fd):
        if name.startswith(STAGE_PREFIX):
            try:
                _clear(root_fd, name)
            except OSError:
                pass


def record_header(stream: PayloadStream, info: BundleInfo, index: int, e: P.Entry, name: str) -> tuple[int, int, int]:
    """(kind, body offset, length) of manifest entry ``index``'s record, checked.

    ``length`` is a logical size for a whole-file record (the file's size; its
    chunks, each with its stored length, delimit themselves) and the stored
    size for a delta record (the delta file's length)."""
    kind, rec_index, length = P.RECORD.unpack(stream.read(e.record, P.RECORD.size))
    body = e.record + P.RECORD.size
    if rec_index != index or kind not in (P.WHOLE, P.DELTA):
        raise FormatError(name, P.WHAT, f"{e.path}: bad record header")
    if kind == P.WHOLE and length != e.size:
        raise FormatError(name, P.WHAT, f"{e.path}: record size differs from the manifest")
    if kind == P.DELTA and length > info.trailer_offset - body:
        raise FormatError(name, P.WHAT, f"{e.path}: delta record runs into the trailer")
    return kind, body, length


def delta_header(stream: PayloadStream, body: int, length: int, e: P.Entry, name: str):
    """The parsed tables of a delta record (everything but its literal bytes),
    checked against the manifest entry it must produce."""
    from .. import formats
    where = f"{name}: {e.path}"
    head = stream.read(body, min(length, formats.DELTA_HEADER.size))
    tables = stream.read(body, formats.delta_tables_size(head, length, where))
    parsed = formats.parse_delta(tables, length, where)
    if parsed.header.target_hash != e.blake3 or parsed.header.target_len != e.size:
        raise FormatError(name, P.WHAT, f"{e.path}: delta does not produce the manifest's file")
    return parsed


def check_records(stream: PayloadStream, info: BundleInfo, name: str) -> None:
    """Read every record as unpack will: whole files decoded and checked
    against their BLAKE3, deltas parsed and their literal chunks decoded.
    What this accepts, unpack applies (given the destination it was made for).
    Records must also tile the payload between its header and the trailer,
    in manifest order, with no gap or overlap (a writer that miscounted a
    length shows here even where a reader would not notice); the only thing
    allowed between them is the well-formed record of a file that changed
    while pack read it (written, then left out of the manifest)."""
    expected = P.HEADER.size
    for index, e in enumerate(info.trailer.entries):
        if e.record == NONE:
            continue
        expected = _skip_abandoned(stream, expected, e.record, info.trailer_offset, name)
        if e.record != expected:
            raise FormatError(name, P.WHAT, f"{e.path}: record at {e.record}, where the previous one ends "
                                            f"at {expected}")
        kind, body, length = record_header(stream, info, index, e, name)
        if kind == P.WHOLE:
            expected = _stage_whole(stream, body, info.trailer_offset, e, None, name)
            continue
        expected = body + length
        parsed = delta_header(stream, body, length, e, name)
        pos = body + parsed.data_offset
        for codec, raw, stored in parsed.chunks.tolist():
            _decode_chunk(stream.read(pos, stored), codec, raw, name, f"{e.path}: delta's")
            pos += stored
    expected = _skip_abandoned(stream, expected, info.trailer_offset, info.trailer_offset, name)
    if expected != info.trailer_offset:
        raise FormatError(name, P.WHAT, f"{info.trailer_offset - expected} bytes between the last record "
                                        "and the trailer")


def _decode_chunk(data: bytes, codec: int, raw: int, name: str, where: str) -> bytes:
    """A chunk's raw bytes (LZ4 blocks decompressed, and checked to expand to
    exactly ``raw`` bytes)."""
    import lz4.block
    if codec != P.CODEC_LZ4:
        return data
    try:
        out = lz4.block.decompress(data, uncompressed_size=raw)
    except lz4.block.LZ4BlockError:
        raise FormatError(name, P.WHAT, f"{where} corrupt LZ4 chunk") from None
    if len(out) != raw:
        raise FormatError(name, P.WHAT, f"{where} LZ4 chunk expands to the wrong size")
    return out


def _skip_abandoned(stream: PayloadStream, pos: int, target: int, end: int, name: str) -> int:
    """Step over abandoned records from ``pos`` towards ``target``: each must
    be a well-formed record (its framing is checked, not its content).
    Returns where the last one ends (``target`` unless something else is there)."""
    while pos < target and target - pos >= P.RECORD.size:
        kind, _, length = P.RECORD.unpack(stream.read(pos, P.RECORD.size))
        body = pos + P.RECORD.size
        if kind == P.DELTA and length <= end - body:
            nxt = body + length
        elif kind == P.WHOLE and length <= MAX_SIZE:
            nxt, done = body, 0
            while done < length and nxt + P.CHUNK.size <= end:
                codec, raw_len, stored = P.CHUNK.unpack(stream.read(nxt, P.CHUNK.size))
                if codec not in (P.CODEC_RAW, P.CODEC_LZ4) or not 0 < raw_len <= P.MAX_CHUNK or stored > raw_len:
                    return pos
                nxt += P.CHUNK.size + stored
                done += raw_len
            if done != length:
                return pos
        else:
            return pos
        if nxt > target:
            return pos
        pos = nxt
    return pos


def _stage_whole(stream: PayloadStream, pos: int, end: int, e: P.Entry, out_fd: int | None, name: str) -> int:
    """Decode a whole-file record body at ``pos`` into ``out_fd`` (None: only
    check it); returns the position after it. Checks every chunk header
    before decompressing, and the content against the entry's BLAKE3."""
    import blake3
    h = blake3.blake3()
    done = 0
    while done < e.size:
        codec, raw_len, stored = P.CHUNK.unpack(stream.read(pos, P.CHUNK.size))
        pos += P.CHUNK.size
        if codec not in (P.CODEC_RAW, P.CODEC_LZ4) or not 0 < raw_len <= P.MAX_CHUNK \
                or raw_len > e.size - done or stored > end - pos \
                or (codec == P.CODEC_RAW and stored != raw_len) or (codec == P.CODEC_LZ4 and stored > raw_len):
            raise FormatError(name, P.WHAT, f"{e.path}: bad chunk header")
        data = _decode_chunk(stream.read(pos, stored), codec, raw_len, name, f"{e.path}:")
        pos += stored
        h.update(data)
        if out_fd is not None:
            view = memoryview(data)
            while len(view):
                view = view[os.write(out_fd, view):]
        done += raw_len
    if h.digest() != e.blake3:
        raise VerificationError(name, f"{e.path}: content does not match its BLAKE3; nothing applied")
    return pos


def unpack(bundle: str, dst: str, on_entry=None, on_file=None) -> UnpackStats:
    """Apply ``bundle`` to directory ``dst`` (created if absent and the bundle
    was made without a tree signature)."""
    t0 = time.monotonic()
    stats = UnpackStats()
    if os.path.isdir(bundle):
        raise UsageError(f"{bundle}: is a directory, not a bundle")
    with open_bundle(bundle) as reader:
        health = check_health(reader)
        stats.stripes = len(health)
        stats.damaged_stripes = sum(1 for h in health if h.bad)
        stats.repaired_shards = sum(len(h.bad) for h in health)
        stream, info = read_bundle(reader)
        _apply(stream, info, bundle, dst, stats, on_entry, on_file)
    stats.duration = time.monotonic() - t0
    return stats


def _open_root(dst: str, info: BundleInfo) -> int:
    try:
        return os.open(dst, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if info.against_id is not None and info.trailer.against:
            _mismatch(dst, "the destination does not exist")
        try:
            os.mkdir(dst, 0o755)
            return os.open(dst, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise_os_error(dst, exc)
    except NotADirectoryError:
        raise UsageError(f"{dst}: not a directory") from None
    except OSError as exc:
        raise_os_error(dst, exc)


def _apply(stream: PayloadStream, info: BundleInfo, name: str, dst: str, stats: UnpackStats,
           on_entry, on_file) -> None:
    from ..sync import _syncfs
    trailer = info.trailer
    root_fd = _open_root(dst, info)
    opened: dict[str, int] = {}
    dirs = _Dirs(root_fd, opened)
    stage_name = None
    try:
        _remove_stale_stages(root_fd)
        errors: list = []
        current = {path: e for path, e, _ in walk(dst, errors, opened if dirs.open_up else None)}
        # A directory that cannot be listed is fine only where the tree
        # signature could not list it either (nothing below it is checked or
        # deleted); anywhere else the destination's state is unknown.
        unlisted = {a.path for a in trailer.against if a.unlisted}
        for rel, exc in errors:
            if rel not in unlisted:
                raise_os_error(os.path.join(dst, rel), exc)
        if info.against_id is not None:
            _check_against(dst, current, trailer)

        # 1. stage every file's new content, checked, in the staging directory
        stage_name = STAGE_PREFIX + info.bundle_id.hex()[:16]
        try:
            os.mkdir(stage_name, 0o700, dir_fd=root_fd)
            stage_fd = os.open(stage_name, DIR_FLAGS, dir_fd=root_fd)
        except OSError as exc:
            raise_os_error(os.path.join(dst, stage_name), exc)
        dirs.fds[stage_name] = stage_fd
        staged = {}
        for index, e in enumerate(trailer.entries):
            if e.kind != "f" or e.record == NONE:
                continue
            if info.against_id is not None and _already_new(dirs, e, current.get(e.path)):
                continue
            started = time.monotonic()
            kind, body, length = record_header(stream, info, index, e, name)
            out = str(index)
            try:
                if kind == P.WHOLE:
                    ofd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                  0o600, dir_fd=stage_fd)
                    try:
                        _stage_whole(stream, body, info.trailer_offset, e, ofd, name)
                    finally:
                        os.close(ofd)
                    literal, matched = e.size, 0
                else:
                    literal, matched = _stage_delta(stream, body, length, e, current, dirs, stage_fd, out,
                                                    name, dst)
            except OSError as exc:
                raise_os_error(os.path.join(dst, e.path), exc)
            staged[index] = out
            stats.files_transferred += 1
            stats.bytes_literal += literal
            stats.bytes_matched += matched
            stats.bytes_written += e.size
            if on_file is not None:
                on_file(e.path, "new" if e.path not in current else "update", e.size, literal, matched,
                        time.monotonic() - started, e.blake3.hex())
        if not _syncfs(stage_fd):
            for out in staged.values():
                sfd = os.open(out, os.O_RDONLY, dir_fd=stage_fd)
                try:
                    os.fsync(sfd)
                finally:
                    os.close(sfd)

        # 2. commit: parents first, then deletions, then directory attributes
        try:
            _commit(trailer, current, dirs, stage_fd, staged, stats, on_entry)
            dirs.forget(stage_name)
            _clear(root_fd, stage_name)
            stage_name = None
            # the root last: removing the staging directory changed its mtime
            root = trailer.root
            if os.geteuid() == 0:
                os.chown(root_fd, root.uid, root.gid)
            os.chmod(root_fd, stat.S_IMODE(root.mode))
            opened.pop("", None)
            os.utime(root_fd, ns=(root.mtime_ns, root.mtime_ns))
            os.fsync(root_fd)
        except OSError as exc:
            raise_os_error(os.path.join(dst, getattr(exc, "filename", None) or ""), exc)
    finally:
        dirs.close_up()                 # directories opened up and not given the bundle's mode
        if stage_name is not None:
            try:
                dirs.forget(stage_name)
                _clear(root_fd, stage_name)
            except OSError:
                pass
        dirs.close()
        os.close(root_fd)


def _stage_delta(stream, body, length, e, current, dirs, stage_fd, out, name, dst) -> tuple[int, int]:
    """Rebuild a file from its delta against the destination's copy."""
    from ..patch import apply_delta
    cur = current.get(e.path)
    if cur is None or cur.kind != "f":
        raise VerificationError(os.path.join(dst, e.path), "the delta's basis is missing; nothing applied")
    delta_header(stream, body, length, e, name)         # before anything is written
    delta_name = out + ".delta"
    dfd = os.open(delta_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=stage_fd)
    try:
        for lo in range(0, length, P.CHUNK_RAW):
            data = stream.read(body + lo, min(P.CHUNK_RAW, length - lo))
            view = memoryview(data)
            while len(view):
                view = view[os.write(dfd, view):]
    finally:
        os.close(dfd)
    here = f"/proc/self/fd/{stage_fd}"
    parent, _, base = e.path.rpartition("/")
    pfd = dirs.get(parent)
    st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise VerificationError(os.path.join(dst, e.path), "the delta's basis is not a regular file")
    # staged files are made durable together (syncfs) before any is renamed into place
    res = apply_delta(f"/proc/self/fd/{pfd}/{base}", f"{here}/{delta_name}", f"{here}/{out}", durable=False)
    os.unlink(delta_name, dir_fd=stage_fd)
    return res.literal_bytes, res.copied_bytes


def _attributes(fd: int, name: str, e: P.Entry, is_root: bool) -> None:
    if is_root:
        os.chown(name, e.uid, e.gid, dir_fd=fd, follow_symlinks=False)
    if e.kind != "L":
        os.chmod(name, stat.S_IMODE(e.mode), dir_fd=fd)
    os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd, follow_symlinks=False)


def _commit(trailer: P.Trailer, current: dict, dirs: _Dirs, stage_fd: int, staged: dict,
            stats: UnpackStats, on_entry) -> None:
    is_root = os.geteuid() == 0
    touched: set[str] = set()
    for index, e in enumerate(trailer.entries):
        parent, _, base = e.path.rpartition("/")
        pfd = dirs.get(parent)
        cur = current.get(e.path)
        if cur is None:
            stats.created += 1
        elif cur.kind != e.kind or index in staged or cur.mode != e.mode or cur.mtime_ns != e.mtime_ns:
            stats.updated += 1
        if e.kind == "d":
            stats.dirs += 1
            if cur is None or cur.kind != "d":
                if cur is not None:
                    _clear(pfd, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
                touched.add(parent)
        elif e.kind == "f":
            stats.files += 1
            stats.bytes_scanned += e.size
            if index in staged:
                # attributes first: a kill between them and the rename must not
                # leave the new content with another mtime (a re-run would take
                # it for a change made at the destination and refuse the bundle)
                _attributes(stage_fd, staged[index], e, is_root)
                if cur is not None and cur.kind == "d":
                    dirs.forget(e.path)
                    _clear(pfd, base)
                os.rename(staged[index], base, src_dir_fd=stage_fd, dst_dir_fd=pfd)
                touched.add(parent)
            else:
                _attributes(pfd, base, e, is_root)
        else:
            if e.kind == "L":
                stats.symlinks += 1
            else:
                stats.specials += 1
            tmp = TEMP_PREFIX + os.urandom(6).hex()
            if e.kind == "L":
                os.symlink(e.target, tmp, dir_fd=pfd)
            else:
                try:
                    os.mknod(tmp, e.mode, e.rdev, dir_fd=pfd)
                except PermissionError:
                    stats.errors += 1
                    stats.messages.append(f"{e.path}: cannot create a device without root; skipped")
                    continue
            try:
                if cur is not None and cur.kind == "d":
                    dirs.forget(e.path)
                    _clear(pfd, base)
                _attributes(pfd, tmp, e, is_root)
                os.rename(tmp, base, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise
            touched.add(parent)
        if on_entry is not None:
            on_entry(e.path, e, e.blake3.hex() if e.kind == "f" else None)
    for path in reversed(trailer.deletions):         # children before their directories
        parent, _, base = path.rpartition("/")
        try:
            pfd = dirs.get(parent)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise
        dirs.forget(path)
        _clear(pfd, base)
        touched.add(parent)
        stats.deleted += 1
    for e in reversed(trailer.entries):
        if e.kind == "d":
            parent, _, base = e.path.rpartition("/")
            _attributes(dirs.get(parent), base, e, is_root)
            dirs.opened.pop(e.path, None)           # its mode is the bundle's now

    for rel in touched:
        try:
            os.fsync(dirs.get(rel))
        except OSError:
            pass
