"""Content: where a file's new bytes come from, behind one small interface.

A content spec is a tuple ``(kind, *args)`` (cheap to send to a copy worker),
and ``WRITERS[kind](fd, dir_fd, name, *args, options)`` writes that content
into the open temp file ``fd`` (``name`` in ``dir_fd`` is the destination's
current file: a delta's basis) and returns what it wrote::

    (literal bytes, matched bytes, BLAKE3 hex or None, mode, mtime_ns, uid, gid)

Kinds: ``local`` (a local source file, copied whole or rebuilt from the
destination's old copy by the delta engine; here), bundle records (whole or
delta; ``resync.bundle.records``), and later stripes from the network.

``write_job`` wraps a writer with what every content needs: the temp file
created exclusively, the BLAKE3 compared with the expected one where it is
known, the file's owner (as root), mode and mtime set on the temp file before
it is renamed into place (apply does the rename), and a failed or
interrupted write never left behind.
"""
from __future__ import annotations

import os
import stat
import time

_COPY_STEP = 64 << 20
_SMALL_FILE = 1 << 20           # copied through user space (and hashed on the way)

WRITERS: dict = {}


def writer(kind: str):
    """Register a content writer for specs of ``kind``."""
    def register(fn):
        WRITERS[kind] = fn
        return fn
    return register


class ContentError(OSError):
    """Content that cannot be written as promised (its BLAKE3 differs, it is
    not what the plan said): a per-entry error, reported with its message."""


class Options:
    """Per-run settings of the writers: ``whole_file`` (no local delta),
    ``hash_files`` (BLAKE3 of every file written, for the history),
    ``as_root`` (set owners) and ``sparse`` (-S: blocks of zeros in any file
    written become holes; without it only a source's own holes stay holes)."""

    __slots__ = ("whole_file", "hash_files", "as_root", "sparse")

    def __init__(self, whole_file: bool = True, hash_files: bool = False, as_root: bool = False,
                 sparse: bool = False):
        self.whole_file, self.hash_files, self.as_root, self.sparse = whole_file, hash_files, as_root, sparse

    def __getstate__(self):
        return self.whole_file, self.hash_files, self.as_root, self.sparse

    def __setstate__(self, state):
        self.whole_file, self.hash_files, self.as_root, self.sparse = state


def write_job(dir_fd: int, name: str, tmp: str, spec: tuple, expected: bytes | None, options: Options) -> tuple:
    """Write content ``spec`` into the new temp file ``tmp`` of ``dir_fd``.
    Returns ("ok", literal, matched, blake3 hex or None, mode, mtime_ns, uid,
    gid, seconds), or raises (the temp file is removed)."""
    started = time.monotonic()
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        literal, matched, digest, mode, mtime_ns, uid, gid = WRITERS[spec[0]](fd, dir_fd, name, *spec[1:],
                                                                             options=options)
        digest = finish_temp(fd, digest, expected, mode, mtime_ns, uid, gid, options)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.close(fd)
    return ("ok", literal, matched, digest, mode, mtime_ns, uid, gid, time.monotonic() - started)


def finish_temp(fd: int, digest: str | None, expected: bytes | None, mode: int, mtime_ns: int, uid: int,
                gid: int, options: Options) -> str | None:
    """What every written temp file gets before it may be renamed into place:
    its BLAKE3 compared with ``expected`` (hashed from the file if the writer
    did not), then its owner (as root), mode and mtime. Returns the BLAKE3
    (hex) if known; ContentError if it differs."""
    if digest is None and (expected is not None or options.hash_files):
        digest = hash_fd(fd)
    if expected is not None and digest != expected.hex():
        raise ContentError(0, "content does not match its BLAKE3; not applied")
    if options.as_root and (uid, gid) != (0, 0):          # created as root:root
        os.fchown(fd, uid, gid)
    os.fchmod(fd, stat.S_IMODE(mode))
    os.utime(fd, ns=(time.time_ns(), mtime_ns))
    return digest


def write_jobs(root_fd: int, options: Options, items: list[tuple], open_dir) -> list[tuple]:
    """Write each job (dir, name, tmp, spec, expected BLAKE3) into its temp
    file; directories are reached from ``root_fd`` with ``open_dir(root_fd,
    rel)`` (O_NOFOLLOW, like everything under DST). Returns one result per
    item: ("ok", ...) as write_job, ("vanished", ""), or ("error", message).
    A copy worker's entry point (and the inline executor's)."""
    results = []
    cached_rel, cached_fd = None, -1
    try:
        for rel_dir, name, tmp, spec, expected in items:
            try:
                if rel_dir != cached_rel:
                    if cached_fd >= 0:
                        os.close(cached_fd)
                        cached_fd = -1
                    cached_fd = open_dir(root_fd, rel_dir)
                    cached_rel = rel_dir
                results.append(write_job(cached_fd, name, tmp, spec, expected, options))
            except FileNotFoundError as exc:
                src = spec[1] if spec[0] == "local" else None
                if exc.filename is None or exc.filename == src:
                    results.append(("vanished", ""))
                else:
                    results.append(("error", exc.strerror or str(exc)))
            except OSError as exc:
                results.append(("error", exc.strerror or str(exc)))
    finally:
        if cached_fd >= 0:
            os.close(cached_fd)
    return results


def worker_init(parent: int, mask) -> None:
    """A copy worker: Ctrl-C, SIGTERM and SIGHUP reach the whole process group,
    and only the parent handles them (it lets the workers finish their chunk,
    removes temp files not yet renamed, and exits with one line), so workers
    print no traceback; and a worker dies with its parent. The signals were
    blocked while it was forked."""
    from .parallel import child_started
    child_started(parent, mask)


# -- local files -----------------------------------------------------------------

@writer("local")
def write_local(fd: int, dir_fd: int, name: str, src_path: str, old_size: int, *, options: Options) -> tuple:
    """The source file ``src_path``, copied whole, or (``old_size`` > 0 and
    not ``whole_file``) rebuilt from the destination's old copy ``name`` by the
    delta engine. Attributes come from the source as opened (fstat), so they
    describe exactly the bytes copied."""
    src_fd = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "changed type during the run")
        literal, matched, digest = st.st_size, 0, None
        if not options.whole_file and old_size > 0 and st.st_size > 0:
            basis_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:                                # a source with holes: its copy's zeros are holes too
                literal, matched = _delta_data(basis_fd, src_fd, fd, options.sparse or has_holes(st))
            finally:
                os.close(basis_fd)
        elif st.st_size < _SMALL_FILE:
            # One read, one write, and the hash from the same bytes.
            literal, digest = _copy_small(src_fd, fd, st.st_size, options.hash_files, options.sparse)
        else:
            literal = _copy_data(src_fd, fd, options.sparse)
    finally:
        os.close(src_fd)
    return (literal, matched, digest, stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode), st.st_mtime_ns,
            st.st_uid, st.st_gid)


def has_holes(st: os.stat_result) -> bool:
    """Does the file occupy fewer blocks than its size (it has holes)?"""
    return st.st_blocks * 512 < st.st_size


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The (offset, length) runs of ``fd`` that hold data, found with
    SEEK_DATA / SEEK_HOLE (lseek(2)), when the file has holes (it occupies
    fewer blocks than its size); None when it has none, or the file system
    cannot say (then it is copied whole)."""
    st = os.fstat(fd)
    if not hasattr(os, "SEEK_DATA") or st.st_blocks * 512 >= size:
        return None
    extents, pos = [], 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == 6:              # ENXIO: nothing but a hole from pos to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                extents.append((start, end - start))
            pos = end
    except OSError:
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return extents


def _copy_data(src_fd: int, dst_fd: int, sparse: bool = False) -> int:
    """Copy src to dst (both at offset 0) until EOF; returns the bytes copied.
    A source with holes keeps them: only its data runs are copied and the
    copy is cut to the source's size (cp's --sparse=auto; rsync needs -S).
    ``sparse`` (-S): blocks of zeros within the data become holes too."""
    size = os.fstat(src_fd).st_size
    extents = data_extents(src_fd, size)
    if sparse or extents is not None:
        return _copy_extents(src_fd, dst_fd, [(0, size)] if extents is None else extents, size, sparse)
    total = 0
    try:
        while True:
            n = os.copy_file_range(src_fd, dst_fd, _COPY_STEP)
            if n == 0:
                return total
            total += n
    except OSError as exc:
        if total or exc.errno not in (18, 22, 38, 95):   # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
            raise
    while True:
        chunk = os.read(src_fd, 1 << 20)
        if not chunk:
            return total
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]
        total += len(chunk)


def _copy_extents(src_fd: int, dst_fd: int, extents: list[tuple[int, int]], size: int,
                  sparse: bool = False) -> int:
    """Copy the data runs ``extents`` of src to the same offsets of dst and
    give dst ``size`` bytes: what lies between stays a hole; with ``sparse``
    (-S) so do the blocks of zeros within the runs (read and written around
    them: fs.pwrite_sparse). Returns the bytes of data copied."""
    from .fs import pwrite_all, pwrite_sparse
    total = 0
    for offset, length in extents:
        done = 0
        while done < length:
            n = -1
            if not sparse:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
                except OSError as exc:
                    if exc.errno not in (18, 22, 38, 95):      # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                        raise
            if n < 0:                                          # -S, or no copy_file_range: user space
                chunk = os.pread(src_fd, min(length - done, 8 << 20), offset + done)
                n = len(chunk)
                (pwrite_sparse if sparse else pwrite_all)(dst_fd, chunk, offset + done)
            if n == 0:
                break                                          # (the source shrank meanwhile)
            done += n
        total += done
    os.ftruncate(dst_fd, size)
    return total


def _copy_small(src_fd: int, dst_fd: int, size: int, want_hash: bool, sparse: bool = False) -> tuple[int, str | None]:
    """Copy a small file with one read and one write; BLAKE3 of the bytes if
    asked. ``sparse`` (-S): blocks of zeros are left as holes."""
    data = os.read(src_fd, size + 1)
    if len(data) > size:                         # the file grew since it was listed
        parts = [data]
        while chunk := os.read(src_fd, 1 << 20):
            parts.append(chunk)
        data = b"".join(parts)
    from .fs import pwrite_sparse, write_all
    if sparse:
        pwrite_sparse(dst_fd, data, 0)
        os.ftruncate(dst_fd, len(data))
    else:
        write_all(dst_fd, data)
    digest = None
    if want_hash:
        import blake3
        digest = blake3.blake3(data).hexdigest()
    return len(data), digest


def _delta_data(basis_fd: int, src_fd: int, dst_fd: int, sparse: bool = False) -> tuple[int, int]:
    """Write src to dst, reusing the blocks it shares with basis (the delta
    engine run locally). ``sparse``: blocks of zeros are left as holes.
    Returns (literal, matched) bytes."""
    import mmap

    import numpy as np

    from . import formats
    from .delta import build_instructions, find_matches
    from .fs import pwrite_sparse, write_all
    from .kernels.native import get
    from .signature import compute_signature

    def mapped(fd):
        size = os.fstat(fd).st_size
        if not size:
            return None, np.empty(0, np.uint8)
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        return m, np.frombuffer(m, np.uint8)

    bmap, basis = mapped(basis_fd)
    nmap, new = mapped(src_fd)
    try:
        sig = compute_signature(basis, threads=1)
        matches = find_matches(sig, new, threads=1)
        kinds, sources, lengths, literal_positions = build_instructions(matches, int(new.shape[0]))
        is_insert = kinds == formats.INSERT
        sources[is_insert] = literal_positions     # literals come straight from the new file
        assemble = get("assemble")
        window = np.empty(min(8 << 20, max(int(new.shape[0]), 1)), np.uint8)
        index, skip, done = 0, 0, 0
        while done < new.shape[0]:
            index, skip, filled = assemble(basis, new, 0, kinds, sources, lengths, index, skip, window)
            if sparse:
                pwrite_sparse(dst_fd, window[:filled], done)
            else:
                write_all(dst_fd, window[:filled])
            done += filled
        if sparse:
            os.ftruncate(dst_fd, done)
        literal = int(lengths[is_insert].sum())
        return literal, int(new.shape[0]) - literal
    finally:
        del basis, new
        for m in (bmap, nmap):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass


@writer("delta-file")
def write_delta_file(fd: int, dir_fd: int, name: str, delta_fd: int, root_fd: int, parent: str, basis: str,
                     attrs: tuple, what: str, sparse: bool = False, *, options: Options) -> tuple:
    """The delta in the file open at ``delta_fd`` applied to the destination's
    current file ``parent``/``basis`` (reached from ``root_fd`` without
    following a symlink; it must be a regular file). ``attrs``: the (mode,
    mtime_ns, uid, gid) the result gets; ``sparse`` (the source had holes, or
    -S): its blocks of zeros are left as holes."""
    from . import formats
    from .errors import VerificationError
    from .fs import MappedFile
    from .patch import patch_into
    from .scan import open_rel_dir
    pfd = open_rel_dir(root_fd, parent)
    try:
        bfd = os.open(basis, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    finally:
        os.close(pfd)
    try:
        if not stat.S_ISREG(os.fstat(bfd).st_mode):
            raise VerificationError(what, "the delta's basis is not a regular file")
        with MappedFile(f"/proc/self/fd/{delta_fd}", name=what) as d:
            parsed = formats.unpack_delta(d.buffer, d.name)
            stats, digest = patch_into(f"/proc/self/fd/{bfd}", d, parsed, fd, what,
                                       sparse=sparse or options.sparse)
    finally:
        os.close(bfd)
    return (stats.literal_bytes, stats.copied_bytes, digest, *attrs)


def hash_fd(fd: int) -> str:
    """BLAKE3 (hex) of the whole file open at ``fd`` (read back from the page
    cache in 4 MiB pieces: no mapping, so memory stays flat)."""
    import blake3
    h = blake3.blake3(max_threads=1)
    buf = bytearray(min(4 << 20, max(1 << 16, os.fstat(fd).st_size + 1)))   # a small file: a small buffer
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [buf], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest()


def same_content(src_path: str, dir_fd: int, name: str) -> bool:
    """--checksum: do the source file and the destination's ``name`` (in
    ``dir_fd``, not following a symlink) have the same BLAKE3?"""
    a = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        b = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return hash_fd(a) == hash_fd(b)
        finally:
            os.close(b)
    finally:
        os.close(a)
