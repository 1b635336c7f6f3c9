"""Local tree mirroring: ``resync sync SRC DST`` behaves like ``rsync -a SRC/ DST/``.

Regular files, directories, symlinks (copied as links, never followed) and
special files, with permissions, modification times and, as root, owners.
A file is transferred when its size or mtime differs (``checksum``: when its
BLAKE3 differs); changed files are copied whole, or with ``whole_file=False``
rebuilt from the destination's old copy by the delta engine.

Safety and durability:
- Every destination change goes through the directory descriptors of
  ``tree`` (O_NOFOLLOW per component), so nothing is written outside DST.
- A file is written to a temp file beside its final name, its data made
  durable, then renamed over the old one: a killed run leaves each path old or
  new. Durability is batched the way the field notes measured: a batch of temp
  files, one ``syncfs``, the renames, one fsync per directory touched. Stray
  temp files of a killed run are removed when the next run lists their
  directory.
- Deletions (``delete``) happen after all transfers, only if every transfer
  succeeded, never when the source root is empty, and not at all when they
  would exceed ``max_delete``. Directory permissions and mtimes are set last,
  deepest first, so later changes inside them do not disturb them.

Copies run in forked worker processes (with threads, copying 20,000 small
files was serialised by the GIL: 1.7 s vs 0.6 s into tmpfs). The source tree
is listed by another forked process, ahead of the traversal and in its order
(``tree.TreeLister``), while this one lists the destination and compares: a
run that changes nothing costs about what rsync's does, whose sender and
receiver also split the listing. The traversal keeps one directory listing at
a time and the lister's lead is bounded by a pipe, so memory does not grow
with the number of files.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from .errors import DeletionRefusedError, FileError, UsageError
from .fs import TEMP_PREFIX
from .parallel import thread_count
from .tree import (USER_RWX, Entry, Excludes, TreeLister, join, list_dir, open_dir_at, open_rel_dir,
                   open_up_at, overrides_permissions, remove_tree, skipped_dir, stat_dir)

if TYPE_CHECKING:                 # concurrent.futures costs 4 ms to import; a run with nothing to copy needs none
    from concurrent.futures import Future

_BATCH_FILES = 512               # temp files made durable with one syncfs
_BATCH_BYTES = 512 << 20
_CHUNK_FILES = 64               # small files copied by one worker call
_CHUNK_BYTES = 16 << 20
_COPY_STEP = 64 << 20
_MAX_OPEN_DIRS = 128            # directory descriptors held by pending work before committing
_SMALL_FILE = 1 << 20           # copied through user space (and hashed on the way)


# Plain classes, not dataclasses: building a dataclass costs ~2.5 ms at import,
# and every run of this command starts a fresh process.

class SyncOptions:
    def __init__(self, checksum: bool = False, whole_file: bool = True, delete: bool = False,
                 max_delete: int | None = None, excludes: list[str] | None = None, dry_run: bool = False,
                 threads: int | None = None, hash_files: bool = False):
        self.checksum = checksum
        self.whole_file = whole_file
        self.delete = delete
        self.max_delete = max_delete
        self.excludes = list(excludes or [])
        self.dry_run = dry_run
        self.threads = threads
        self.hash_files = hash_files          # BLAKE3 of each transferred file (for the history)


class SyncStats:
    def __init__(self):
        self.files = 0                  # regular files in the source (after excludes)
        self.dirs = 0
        self.symlinks = 0
        self.specials = 0
        self.bytes_scanned = 0          # total size of the source's regular files
        self.files_transferred = 0
        self.bytes_transferred = 0      # size of the transferred files
        self.bytes_literal = 0          # bytes read from the source for them
        self.bytes_matched = 0          # bytes reused from the destination's old copies
        self.bytes_written = 0
        self.created = 0                # new entries of any kind
        self.updated = 0                # changed entries (content or attributes)
        self.deleted = 0
        self.errors = 0
        self.vanished = 0
        self.deletion_refused = ""
        self.duration = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


class FileChange:
    """One transferred file, for itemize output and the history."""

    __slots__ = ("path", "action", "size", "literal", "matched", "seconds", "blake3", "entry")

    def __init__(self, path: str, action: str, size: int, literal: int, matched: int, seconds: float,
                 blake3: str | None = None, entry: Entry | None = None):
        self.path, self.action, self.size = path, action, size          # action: "new" | "update"
        self.literal, self.matched, self.seconds = literal, matched, seconds
        self.blake3 = blake3
        self.entry = entry              # the source file as copied (fstat at open)


class _Dir:
    """An open destination directory shared by pending work (reference-counted),
    and its permission bits as this run last set or saw them."""

    __slots__ = ("fd", "rel", "perms", "_refs", "_lock")
    open_count = 0                  # descriptors held by all _Dir objects
    _count_lock = threading.Lock()

    def __init__(self, fd: int, rel: str, perms: int = 0o700):
        self.fd, self.rel, self.perms, self._refs, self._lock = fd, rel, perms, 1, threading.Lock()
        with _Dir._count_lock:
            _Dir.open_count += 1

    def acquire(self) -> "_Dir":
        with self._lock:
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            os.close(self.fd)
            with _Dir._count_lock:
                _Dir.open_count -= 1


class _Job:
    """One file to copy: where from, where to, and how it went."""

    __slots__ = ("parent", "name", "rel", "src_path", "src", "old", "code", "tmp", "result", "error",
                 "vanished")

    def __init__(self, parent: _Dir, name: str, rel: str, src_path: str, src: Entry, old: Entry | None,
                 code: str, tmp: str):
        self.parent, self.name, self.rel, self.src_path = parent, name, rel, src_path
        self.src, self.old, self.code, self.tmp = src, old, code, tmp
        self.result: FileChange | None = None
        self.error = ""
        self.vanished = False


class _Pending:
    """A directory waiting to be visited: its path, its parent's handle
    (acquired; the child is opened from it when its turn comes), whether it
    already existed in DST and its permission bits there, or its own handle
    (the root)."""

    __slots__ = ("rel", "parent", "exists", "handle", "perms")

    def __init__(self, rel: str, parent: "_Dir | None", exists: bool, handle: "_Dir | None" = None,
                 perms: int = 0o700):
        self.rel, self.parent, self.exists, self.handle, self.perms = rel, parent, exists, handle, perms


class _Listing:
    __slots__ = ("handle", "src", "gone", "skip", "src_error", "dst", "temps", "dst_error")

    def __init__(self):
        self.handle: _Dir | None = None
        self.src: list[Entry] = []
        self.gone: list[str] = []
        self.skip: str | None = None            # the source directory that is DST itself
        self.src_error: OSError | None = None
        self.dst: dict[str, os.stat_result] = {}
        self.temps: list[str] = []
        self.dst_error = ""


class _Batch:
    """Copies made durable together: chunks submitted to the pool, then the jobs."""

    __slots__ = ("chunks", "jobs", "thread")

    def __init__(self, chunks: list[tuple[Future, list[_Job]]]):
        self.chunks = chunks
        self.jobs: list[_Job] = []
        self.thread: threading.Thread | None = None


def _itemize(y: str, entry: Entry, old: Entry | None, content: str = ".") -> str:
    """rsync's 11-character change summary YXcstpoguax for one entry."""
    x = entry.kind
    if old is None:
        return f"{y}{x}+++++++++"
    s = "s" if x == "f" and entry.size != old.size else "."
    t = "t" if entry.mtime_ns != old.mtime_ns else "."
    p = "p" if entry.perms != old.perms and x != "L" else "."
    root = os.geteuid() == 0
    o = "o" if root and entry.uid != old.uid else "."
    g = "g" if root and entry.gid != old.gid else "."
    return f"{y}{x}{content}{s}{t}{p}{o}{g}..."


def _syncfs(fd: int) -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    except (OSError, AttributeError):
        return False


def _copy_data(src_fd: int, dst_fd: int) -> int:
    """Copy src to dst (both at offset 0) until EOF; returns the bytes copied."""
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


def _copy_small(src_fd: int, dst_fd: int, size: int, want_hash: bool) -> tuple[int, str | None]:
    """Copy a small file with one read and one write; BLAKE3 of the bytes if asked."""
    data = os.read(src_fd, size + 1)
    if len(data) > size:                         # the file grew since it was listed
        parts = [data]
        while chunk := os.read(src_fd, 1 << 20):
            parts.append(chunk)
        data = b"".join(parts)
    view = memoryview(data)
    while view:
        view = view[os.write(dst_fd, view):]
    digest = None
    if want_hash:
        import blake3
        digest = blake3.blake3(data).hexdigest()
    return len(data), digest


def _delta_data(basis_fd: int, src_fd: int, dst_fd: int) -> tuple[int, int]:
    """Write src to dst, reusing the blocks it shares with basis (the delta
    engine run locally). Returns (literal, matched) bytes."""
    import mmap

    import numpy as np

    from . import formats
    from .delta import build_instructions, find_matches
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
            view = memoryview(window)[:filled]
            while view:
                view = view[os.write(dst_fd, view):]
            done += filled
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


def _hash_fd(fd: int) -> str:
    """BLAKE3 (hex) of the whole file open at ``fd`` (read back from the page
    cache in 4 MiB pieces: no mapping, so memory stays flat)."""
    import blake3
    h = blake3.blake3(max_threads=1)
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [buf], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest()


def _copy_one(dir_fd: int, name: str, src_path: str, tmp: str, old_size: int,
              whole_file: bool, hash_files: bool, as_root: bool) -> tuple:
    """Copy src_path to the new temp file ``tmp`` in the destination directory
    ``dir_fd`` (``old_size`` >= 0: ``name`` there is the old regular file, a
    basis for the delta engine unless ``whole_file``). Returns ("ok", literal,
    matched, blake3 or None, mode, mtime_ns, uid, gid, seconds)."""
    started = time.monotonic()
    src_fd = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "changed type during the run")
        dst_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            literal, matched, digest = st.st_size, 0, None
            if not whole_file and old_size > 0 and st.st_size > 0:
                basis_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    literal, matched = _delta_data(basis_fd, src_fd, dst_fd)
                finally:
                    os.close(basis_fd)
            elif st.st_size < _SMALL_FILE:
                # One read, one write, and the hash from the same bytes.
                literal, digest = _copy_small(src_fd, dst_fd, st.st_size, hash_files)
            else:
                literal = _copy_data(src_fd, dst_fd)
            if as_root and (st.st_uid, st.st_gid) != (0, 0):     # created as root:root
                os.fchown(dst_fd, st.st_uid, st.st_gid)
            os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
            os.utime(dst_fd, ns=(time.time_ns(), st.st_mtime_ns))
            if hash_files and digest is None:
                digest = _hash_fd(dst_fd)
        except BaseException:
            os.close(dst_fd)
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    return ("ok", literal, matched, digest, stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode),
            st.st_mtime_ns, st.st_uid, st.st_gid, time.monotonic() - started)


def _worker_init(parent: int, mask) -> None:
    """Ctrl-C, SIGTERM and SIGHUP reach the whole process group: only the
    parent handles them (it lets the workers finish their chunk, removes temp
    files not yet renamed, and exits with one line), so workers print no
    traceback; and a worker dies with its parent (parallel.child_started).
    The signals were blocked while they were forked (see _submit)."""
    from .parallel import child_started
    child_started(parent, mask)


def _copy_chunk(root_fd: int, options: tuple, items: list[tuple]) -> list[tuple]:
    """Worker-process entry: copy each (dir, name, src_path, tmp, old_size)
    into its temp file. Directories are reached from the inherited root
    descriptor with O_NOFOLLOW, like everything under DST. Returns one result
    per item: ("ok", ...) as _copy_one, ("vanished", ""), or ("error", message)."""
    results = []
    cached_rel, cached_fd = None, -1
    try:
        for rel_dir, name, src_path, tmp, old_size in items:
            try:
                if rel_dir != cached_rel:
                    if cached_fd >= 0:
                        os.close(cached_fd)
                        cached_fd = -1
                    cached_fd = open_rel_dir(root_fd, rel_dir)
                    cached_rel = rel_dir
                results.append(_copy_one(cached_fd, name, src_path, tmp, old_size, *options))
            except FileNotFoundError as exc:
                if exc.filename is None or exc.filename == src_path:
                    results.append(("vanished", ""))
                else:
                    results.append(("error", exc.strerror or str(exc)))
            except OSError as exc:
                results.append(("error", exc.strerror or str(exc)))
    finally:
        if cached_fd >= 0:
            os.close(cached_fd)
    return results


def _same_content(src_path: str, parent: _Dir, name: str) -> bool:
    """--checksum: do the source file and the destination's ``name`` have the same BLAKE3?"""
    a = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        b = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            return _hash_fd(a) == _hash_fd(b)
        finally:
            os.close(b)
    finally:
        os.close(a)


class Syncer:
    """One run of ``sync``. Callbacks: ``on_item(line)`` for each change
    (itemize format), ``on_error(message)`` for each per-entry error,
    ``on_file(FileChange)`` for each transferred file."""

    def __init__(self, src: str, dst: str, options: SyncOptions | None = None,
                 on_item: Callable[[str], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 on_file: Callable[[FileChange], None] | None = None, progress=None,
                 on_entry: Callable[[str, Entry, str | None], None] | None = None):
        self.src = os.path.abspath(src)
        self.dst = os.path.abspath(dst)
        self.opt = options or SyncOptions()
        self.stats = SyncStats()
        self._on_item = on_item or (lambda line: None)
        self._on_error = on_error or (lambda msg: None)
        self._on_file = on_file or (lambda change: None)
        self._progress = progress        # resync.progress.Progress or None
        # on_entry(path, entry, blake3 or None): the final state of each destination
        # path (the manifest); not called in a dry run.
        self._on_entry = on_entry if on_entry is not None and not self.opt.dry_run else (lambda *a: None)
        self._excludes = Excludes(self.opt.excludes)
        self._root = os.geteuid() == 0
        # Without CAP_DAC_OVERRIDE, a destination directory without u+rwx
        # (a 0555 copy of a read-only source directory) gets it for the run.
        self._dac = overrides_permissions()
        self._opened: dict[str, int] = {}           # rel -> permission bits before this run opened it up
        self._run_tag = f"{TEMP_PREFIX}{os.getpid():x}-{os.urandom(3).hex()}-"
        self._counter = 0
        self._chunk: list[_Job] = []
        self._chunk_bytes = 0
        self._batch: list[tuple[Future, list[_Job]]] = []
        self._pipeline: deque[_Batch] = deque()
        self._batch_files = 0
        self._batch_bytes = 0
        self._dirty: dict[int, _Dir] = {}          # directories with renames to fsync
        self._dirs: list[tuple[str, Entry, Entry | None]] = []   # (rel, source, old) in pre-order
        self._touched: set[str] = set()             # directories that gained or lost a name
        self._deletions: list[tuple[str, Entry]] = []
        self._pool = None                           # copy workers (see _workers)
        self._root_fd = -1
        self._root_created = False
        self._dst_id: tuple[int, int] | None = None     # (st_dev, st_ino) of DST's root

    # ----------------------------------------------------------------- entry
    def run(self) -> SyncStats:
        started = time.monotonic()
        try:
            src_st = os.stat(self.src)
        except OSError as exc:
            raise FileError.from_os(self.src, exc) from None
        if not stat.S_ISDIR(src_st.st_mode):
            raise FileError(self.src, "source is not a directory")
        try:
            top, _, _ = list_dir(self.src, self._excludes)
        except OSError as exc:
            raise FileError.from_os(self.src, exc) from None
        if self.opt.delete and not top:
            raise DeletionRefusedError(f"source {self.src} is empty (or everything in it is excluded); "
                                       "refusing to delete the destination's contents")
        self._check_nesting()
        self._open_root()
        if self._root_fd >= 0:
            st = os.fstat(self._root_fd)
            self._dst_id = (st.st_dev, st.st_ino)
        try:
            self._walk(src_st)
            if self._progress is not None:
                self._progress.scanned()
            self._flush_chunk()
            self._commit(final=True)
        except BaseException:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._discard_pending()
            self._close_up()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        try:
            self._delete()
            self._finish_dirs()
        except BaseException:
            self._close_up()
            raise
        if self._root_fd >= 0:
            os.close(self._root_fd)
        self.stats.duration = time.monotonic() - started
        return self.stats

    def _check_nesting(self) -> None:
        """SRC and DST must not be the same directory, and --delete must not
        run when SRC lies inside DST (it would delete the source itself). DST
        inside SRC is fine: the traversal skips it (see _visit)."""
        real_src = os.path.realpath(self.src)
        real_dst = os.path.realpath(self.dst)
        if real_src == real_dst:
            raise UsageError(f"source and destination are the same directory: {real_src}")
        if self.opt.delete and (real_src + os.sep).startswith(real_dst.rstrip(os.sep) + os.sep):
            raise DeletionRefusedError(f"the source {real_src} is inside the destination {real_dst}: "
                                       "--delete would remove it")

    def _open_root(self) -> None:
        if self.opt.dry_run and not os.path.exists(self.dst):
            self._root_fd = -1
            return
        try:
            if not os.path.isdir(self.dst):
                if os.path.lexists(self.dst):
                    raise FileError(self.dst, "destination exists and is not a directory")
                os.makedirs(self.dst, exist_ok=True)
                self._root_created = True
            self._root_fd = os.open(self.dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FileError.from_os(self.dst, exc) from None

    def _error(self, path: str, message: str) -> None:
        self.stats.errors += 1
        self._on_error(f"{path}: {message}")

    # ------------------------------------------- permissions as an ordinary user
    def _open_up(self, d: "_Dir | None") -> None:
        """Something in ``d`` is about to change: without CAP_DAC_OVERRIDE, give
        it u+rwx first if it lacks them (rsync does the same); its mode is set
        back when the run's directory attributes are set, or by _close_up."""
        if d is None or self._dac or d.perms & USER_RWX == USER_RWX:
            return
        try:
            os.fchmod(d.fd, d.perms | USER_RWX)
        except OSError:
            return                  # not ours: the change itself reports EACCES
        self._opened.setdefault(d.rel, d.perms)
        d.perms |= USER_RWX
        self._touched.add(d.rel)

    def _open_up_at(self, parent: "_Dir", name: str, rel: str) -> None:
        """Like _open_up, for a directory not opened yet (it lacks u+r or u+x)."""
        try:
            self._opened.setdefault(rel, open_up_at(parent.fd, name))
            self._touched.add(rel)
        except OSError:
            pass

    def _open_up_fd(self, fd: int, rel: str) -> None:
        """Like _open_up, for a directory descriptor opened from the root."""
        if self._dac:
            return
        perms = stat.S_IMODE(os.fstat(fd).st_mode)
        if perms & USER_RWX != USER_RWX:
            try:
                os.fchmod(fd, perms | USER_RWX)
            except OSError:
                return
            self._opened.setdefault(rel, perms)
            self._touched.add(rel)

    def _close_up(self) -> None:
        """The run stops early: give the directories it opened up their modes back."""
        opened, self._opened = self._opened, {}
        if self._root_fd < 0:
            return
        for rel, perms in sorted(opened.items(), reverse=True):     # children first
            try:
                fd = open_rel_dir(self._root_fd, rel)
            except OSError:
                continue
            try:
                os.fchmod(fd, perms)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _source_failed(self, path: str, exc: OSError) -> None:
        """Reading the source entry failed: vanished (exit 24) or an error (23)."""
        if isinstance(exc, FileNotFoundError):
            self._vanished(path)
        else:
            self._error(path, exc.strerror or str(exc))

    def _changed(self, prev: Entry | None, item: str) -> None:
        """Count a created (no ``prev``) or replaced entry and itemize it."""
        if prev is None:
            self.stats.created += 1
        else:
            self.stats.updated += 1
        self._on_item(item)

    def _vanished(self, path: str) -> None:
        self.stats.vanished += 1
        self._on_error(f"file has vanished: {path}")

    # ------------------------------------------------------------- traversal
    def _walk(self, src_root_st: os.stat_result) -> None:
        root_entry = Entry.from_stat("", src_root_st)
        old_root = None
        if self._root_fd >= 0 and not self._root_created:
            old_root = Entry.from_stat("", os.fstat(self._root_fd))
        if old_root is None:
            self.stats.created += 1
            self._on_item("cd+++++++++ ./")
        self._dirs.append(("", root_entry, old_root))
        # Stack entries are directories still to visit. A directory's
        # descriptor is opened only when it is about to be visited, so a
        # directory with 100,000 subdirectories does not hold 100,000
        # descriptors. (Listing ahead on a thread instead of a process was
        # tried: GIL contention made the no-change run 30 % slower.)
        root = None
        if self._root_fd >= 0:
            root = _Dir(os.dup(self._root_fd), "", stat.S_IMODE(os.fstat(self._root_fd).st_mode))
            if not self._dac and root.perms & 0o500 != 0o500:
                self._open_up(root)                     # it must be listed
        stack: list[_Pending] = [_Pending("", None, True, root)]
        # The source is listed ahead by a forked process (TreeLister), in the
        # order of this loop; the destination is listed here, where it is changed.
        with TreeLister(self.src, self._excludes, self._dst_id) as lister:
            while stack:
                pending = stack.pop()
                listing = self._list_pair(pending, lister)
                try:
                    children = self._visit(pending.rel, listing)
                finally:
                    if listing.handle is not None:
                        listing.handle.release()
                stack.extend(reversed(children))
                if _Dir.open_count > _MAX_OPEN_DIRS and not self.opt.dry_run:
                    # Pending work keeps its directories open: in a wide tree with few
                    # files per directory, commit early rather than run out of descriptors.
                    self._flush_chunk()
                    self._commit(final=True)

    def _list_pair(self, p: "_Pending", lister: TreeLister) -> "_Listing":
        """Open a pending directory in DST and list it in SRC and DST."""
        out = _Listing()
        handle = p.handle
        if handle is None and p.parent is not None:
            name = p.rel.rpartition("/")[2]
            try:
                if p.exists and not self._dac and p.perms & 0o500 != 0o500:
                    self._open_up_at(p.parent, name, p.rel)      # it must be listed
                handle = _Dir(open_dir_at(p.parent.fd, name), p.rel,
                              (p.perms | USER_RWX) if p.rel in self._opened else p.perms)
            except OSError as exc:
                out.dst_error = f"cannot open destination directory: {exc.strerror or exc}"
            finally:
                p.parent.release()
        out.handle = handle
        ahead = lister.listing(p.rel)
        if ahead is not None:
            out.src, out.gone, out.skip, out.src_error = ahead
        else:
            src_dir = f"{self.src}/{p.rel}" if p.rel else self.src
            try:
                out.src, _, out.gone = list_dir(src_dir, self._excludes, p.rel)
            except OSError as exc:
                out.src_error = exc
            out.skip = skipped_dir(src_dir, out.src, self._dst_id)
        if handle is not None and p.exists and not out.dst_error:
            try:
                out.dst, out.temps = stat_dir(handle.fd, skip_temps=True)
            except OSError as exc:
                out.dst_error = f"cannot list destination directory: {exc.strerror or exc}"
        return out

    def _visit(self, rel: str, listing: "_Listing") -> list["_Pending"]:
        """Handle one directory: its files, links and specials; returns its
        subdirectories to visit."""
        src_dir = f"{self.src}/{rel}" if rel else self.src
        parent = listing.handle
        if listing.src_error is not None:
            if isinstance(listing.src_error, FileNotFoundError):
                self._vanished(rel + "/")
            else:
                self._error(rel + "/", listing.src_error.strerror or str(listing.src_error))
            return []
        if listing.dst_error:
            self._error(rel + "/", listing.dst_error)
            return []
        entries = listing.src
        for name in listing.gone:
            self._vanished(join(rel, name))
        old = listing.dst
        if parent is not None and not self.opt.dry_run:
            if listing.temps:
                self._open_up(parent)
            for t in listing.temps:          # left by a killed run
                try:
                    os.unlink(t, dir_fd=parent.fd)
                    self._touched.add(rel)
                except OSError:
                    pass
        stats = self.stats
        # A regular file whose size, mtime, type, permissions and (as root)
        # owner already match needs nothing: that is most files of most runs,
        # so it is decided here, from the raw lstat of the destination.
        quick = not self.opt.checksum
        owners = self._root
        on_entry = self._on_entry
        subdirs = []
        for e in entries:
            name = e.name
            st = old.pop(name, None)
            kind = e.kind
            if kind == "f":
                stats.files += 1
                stats.bytes_scanned += e.size
                if quick and st is not None and st.st_mtime_ns == e.mtime_ns and st.st_size == e.size \
                        and st.st_mode == e.mode and (not owners or (st.st_uid == e.uid and st.st_gid == e.gid)):
                    on_entry(f"{rel}/{name}" if rel else name, e, None)
                    continue
                prev = Entry.from_stat(name, st) if st is not None else None
                self._file(parent, e, prev, join(rel, name), f"{src_dir}/{name}")
                continue
            path = join(rel, name)
            prev = Entry.from_stat(name, st) if st is not None else None
            if kind == "d":
                if name == listing.skip:
                    continue           # DST inside SRC: never copy the copy into itself
                stats.dirs += 1
                sub = self._enter_dir(parent, e, prev, path)
                if sub is not None:
                    subdirs.append(sub)
            elif kind == "L":
                stats.symlinks += 1
                self._symlink(parent, e, prev, path, f"{src_dir}/{name}")
            else:
                stats.specials += 1
                self._special(parent, e, prev, path)
        if self.opt.delete:
            for name in sorted(old):
                e = Entry.from_stat(name, old[name])
                if self._excludes and self._excludes.excluded(join(rel, name), e.kind == "d"):
                    continue    # excluded files are protected, as in rsync
                self._deletions.append((rel, e))
        return subdirs

    # ----------------------------------------------------------- directories
    def _enter_dir(self, parent: _Dir | None, e: Entry, prev: Entry | None, path: str):
        if prev is not None and prev.kind != "d":
            if not self._make_way(parent, e.name, prev, path):
                return None
            prev = None
        self._dirs.append((path, e, prev))
        if prev is None:
            if not (self.opt.dry_run or parent is None):
                try:
                    self._open_up(parent)
                    os.mkdir(e.name, 0o700, dir_fd=parent.fd)
                    self._mark_dirty(parent)
                except OSError as exc:
                    self._error(path + "/", exc.strerror or str(exc))
                    return None
            self.stats.created += 1
            self._on_item(f"cd+++++++++ {path}/")
            if self.opt.dry_run or parent is None:
                return _Pending(path, None, False)
        if parent is None:
            return _Pending(path, None, False)
        self._on_entry(path, e, None)
        return _Pending(path, parent.acquire(), prev is not None, perms=prev.perms if prev is not None else USER_RWX)

    def _finish_dirs(self) -> None:
        """Permissions, owners and mtimes of directories, deepest first."""
        if self.opt.dry_run:
            for path, e, prev in self._dirs:
                if prev is not None and (e.perms != prev.perms or e.mtime_ns != prev.mtime_ns):
                    self.stats.updated += 1
                    self._on_item(f"{_itemize('.', e, prev)} {path}/" if path else f"{_itemize('.', e, prev)} ./")
            return
        for path, e, prev in reversed(self._dirs):
            if prev is not None and path not in self._touched and prev.perms == e.perms \
                    and prev.mtime_ns == e.mtime_ns and (not self._root or (prev.uid, prev.gid) == (e.uid, e.gid)):
                continue            # as listed, and nothing in it changed since
            try:
                fd = open_rel_dir(self._root_fd, path)
            except OSError as exc:
                self._error(path + "/", f"cannot set attributes: {exc.strerror or exc}")
                continue
            try:
                now = Entry.from_stat("", os.fstat(fd))
                if self._root and (now.uid != e.uid or now.gid != e.gid):
                    os.fchown(fd, e.uid, e.gid)
                if now.perms != e.perms:
                    os.fchmod(fd, e.perms)
                self._opened.pop(path, None)            # opened up for the run: closed again
                if now.mtime_ns != e.mtime_ns:
                    os.utime(fd, ns=(time.time_ns(), e.mtime_ns))
                if prev is not None and (prev.perms != e.perms or prev.mtime_ns != e.mtime_ns
                                         or (self._root and (prev.uid, prev.gid) != (e.uid, e.gid))):
                    self.stats.updated += 1
                    self._on_item(f"{_itemize('.', e, prev)} {path + '/' if path else './'}")
            except OSError as exc:
                self._error(path + "/", exc.strerror or str(exc))
            finally:
                os.close(fd)
        self._close_up()                                # any left (their attributes failed)

    def _make_way(self, parent: _Dir | None, name: str, prev: Entry, path: str) -> bool:
        """Remove the destination entry ``prev`` that has the wrong type."""
        if self.opt.dry_run or parent is None:
            return True
        self._touched.add(parent.rel)
        self._open_up(parent)
        try:
            if prev.kind == "d":
                try:
                    os.rmdir(name, dir_fd=parent.fd)
                except OSError:
                    if not self.opt.delete:
                        self._error(path, "cannot replace a non-empty directory (use --delete)")
                        return False
                    remove_tree(parent.fd, name, open_up=not self._dac)
            else:
                os.unlink(name, dir_fd=parent.fd)
            self.stats.deleted += 1
            self._on_item(f"*deleting   {path}/" if prev.kind == "d" else f"*deleting   {path}")
            return True
        except OSError as exc:
            self._error(path, exc.strerror or str(exc))
            return False

    # ----------------------------------------------------------------- files
    def _file(self, parent: _Dir | None, e: Entry, prev: Entry | None, path: str, src_path: str) -> None:
        if prev is not None and prev.kind == "f":
            same = prev.size == e.size and (prev.mtime_ns == e.mtime_ns or self.opt.checksum)
            if same and self.opt.checksum and parent is not None:
                try:
                    same = _same_content(src_path, parent, e.name)
                except OSError as exc:
                    self._source_failed(path, exc)
                    return
            if same:
                self._attributes(parent, e, prev, path)
                self._on_entry(path, e, None)
                return
            code = _itemize(">", e, prev, "c" if self.opt.checksum else ".")
        else:
            code = _itemize(">", e, None)
        if self.opt.dry_run or parent is None:
            self._count_transfer(e, prev)
            self._on_item(f"{code} {path}")
            return
        self._counter += 1
        self._touched.add(parent.rel)
        self._open_up(parent)                   # the worker creates its temp file there
        job = _Job(parent.acquire(), e.name, path, src_path, e, prev, code, tmp=f"{self._run_tag}{self._counter}")
        self._chunk.append(job)
        self._chunk_bytes += e.size
        if self._progress is not None:
            self._progress.queued(e.size)
        if len(self._chunk) >= _CHUNK_FILES or self._chunk_bytes >= _CHUNK_BYTES:
            self._flush_chunk()


    def _count_transfer(self, e: Entry, prev: Entry | None) -> None:
        self.stats.files_transferred += 1
        self.stats.bytes_transferred += e.size
        if prev is None:
            self.stats.created += 1
        else:
            self.stats.updated += 1

    def _attributes(self, parent: _Dir | None, e: Entry, prev: Entry, path: str) -> None:
        """Same content: fix permissions (and owner as root) in place."""
        fix_owner = self._root and (prev.uid, prev.gid) != (e.uid, e.gid)
        if prev.perms == e.perms and not fix_owner:
            return
        if not (self.opt.dry_run or parent is None):
            try:
                # O_PATH: a file without read permission (mode 0200, 0000) has its mode changed too
                fd = os.open(e.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError(0, "changed type during the run")
                    if fix_owner:
                        os.chown(f"/proc/self/fd/{fd}", e.uid, e.gid)
                    os.chmod(f"/proc/self/fd/{fd}", e.perms)
                finally:
                    os.close(fd)
            except OSError as exc:
                self._error(path, exc.strerror or str(exc))
                return
        self.stats.updated += 1                 # reported only once done
        self._on_item(f"{_itemize('.', e, prev)} {path}")

    def _flush_chunk(self) -> None:
        if not self._chunk:
            return
        jobs, nbytes = self._chunk, self._chunk_bytes
        items = [(j.parent.rel, j.name, j.src_path, j.tmp,
                  j.old.size if j.old is not None and j.old.kind == "f" else -1) for j in jobs]
        options = (self.opt.whole_file, self.opt.hash_files, self._root)
        fut = self._submit(_copy_chunk, self._root_fd, options, items)
        if self._progress is not None:
            progress = self._progress
            fut.add_done_callback(lambda f: [progress.done(r[1] + r[2]) for r in (
                f.result() if not f.exception() else []) if r[0] == "ok"])
        self._batch.append((fut, jobs))
        self._chunk, self._chunk_bytes = [], 0     # only now: an interrupt finds every job somewhere
        self._batch_files += len(jobs)
        self._batch_bytes += nbytes
        if self._batch_files >= _BATCH_FILES or self._batch_bytes >= _BATCH_BYTES:
            self._commit()

    def _discard_pending(self) -> None:
        """Interrupted: remove the temp files of copies not yet renamed (the
        next run would, but an operator should not find them lying around)."""
        jobs = list(self._chunk)
        for _, chunk in self._batch:
            jobs += chunk
        for batch in self._pipeline:
            if batch.thread is not None:
                batch.thread.join()
            jobs += [j for _, chunk in batch.chunks for j in chunk]
        for job in jobs:
            try:
                os.unlink(job.tmp, dir_fd=job.parent.fd)
            except OSError:
                pass

    def _submit(self, fn, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        from .parallel import block_stop_signals, restore_signals
        # The first submit forks the workers: hold the stop signals off until they ignore them.
        blocked = block_stop_signals()
        try:
            return self._workers(blocked).submit(fn, *args)
        finally:
            restore_signals(blocked)

    def _workers(self, mask):
        """Copy workers: forked processes, so copying many small files is not
        serialised by the GIL (threads spent most of the run trading it).
        Forked on first use: a run with nothing to copy starts none. They are
        forked by this thread (ProcessPoolExecutor forks in ``submit`` with
        the fork context), which lives as long as the run: the parent-death
        signal they ask for is tied to it."""
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self._pool = ProcessPoolExecutor(max(1, self.opt.threads or thread_count()),
                                             mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_init, initargs=(os.getpid(), mask))
        return self._pool

    def _collect(self, jobs: list[_Job], results: list[tuple]) -> None:
        """Attach a worker's results to the jobs they belong to."""
        for job, r in zip(jobs, results):
            if r[0] == "ok":
                _, literal, matched, digest, mode, mtime_ns, uid, gid, seconds = r
                entry = Entry(job.name, mode, literal + matched, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
                job.result = FileChange(job.rel, "new" if job.old is None else "update", literal + matched,
                                        literal, matched, seconds, digest, entry)
            elif r[0] == "vanished":
                job.vanished = True
            else:
                job.error = r[1]

    def _commit(self, final: bool = False) -> None:
        """Move the pending copies down a three-stage pipeline, so the disk
        flush of one batch overlaps copying the next and the traversal never
        waits for it: [copying N] -> [syncfs of N-1 on a thread] -> [renames of
        N-2]. ``final``: drain everything."""
        if self._batch:
            self._pipeline.append(_Batch(self._batch))
            self._batch = []
        self._batch_files = self._batch_bytes = 0
        keep = 0 if final else 2
        while len(self._pipeline) > keep:
            batch = self._pipeline[0]        # stays listed until done: see _discard_pending
            self._start_sync(batch)
            self._finish_batch(batch)
            self._pipeline.popleft()
        if final:
            self._sync_dirs()        # directories changed by mkdir, links and specials only
        if not final and len(self._pipeline) == 2:
            self._start_sync(self._pipeline[0])

    def _start_sync(self, batch: "_Batch") -> None:
        """Wait for the batch's copies, then flush them to disk on a thread."""
        if batch.thread is not None:
            return
        for fut, jobs in batch.chunks:
            self._collect(jobs, fut.result())
            batch.jobs.extend(jobs)
        ready = [j for j in batch.jobs if j.result is not None]
        batch.thread = threading.Thread(target=self._make_durable, args=(ready,), daemon=True,
                                        name="resync-syncfs")
        batch.thread.start()

    def _make_durable(self, ready: list[_Job]) -> None:
        if not ready or _syncfs(self._root_fd):
            return
        for j in ready:                          # no syncfs: one fsync per file
            try:
                fd = os.open(j.tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=j.parent.fd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                j.error, j.result = exc.strerror or str(exc), None

    def _finish_batch(self, batch: "_Batch") -> None:
        """Rename the batch's durable temp files into place; fsync the directories."""
        batch.thread.join()
        done = batch.jobs
        for j in done:
            try:
                if j.result is not None:
                    if j.old is not None and j.old.kind == "d" and not self._make_way(j.parent, j.name, j.old, j.rel):
                        os.unlink(j.tmp, dir_fd=j.parent.fd)
                        continue
                    os.rename(j.tmp, j.name, src_dir_fd=j.parent.fd, dst_dir_fd=j.parent.fd)
                    self._count_transfer(j.src, j.old)
                    self.stats.bytes_literal += j.result.literal
                    self.stats.bytes_matched += j.result.matched
                    self.stats.bytes_written += j.result.size
                    self._on_item(f"{j.code} {j.rel}")
                    self._on_file(j.result)
                    self._on_entry(j.rel, j.result.entry, j.result.blake3)
                    self._mark_dirty(j.parent)
                elif j.vanished:
                    self._vanished(j.rel)
                    self._keep_old(j.rel, j.old)
                else:
                    self._error(j.rel, j.error or "transfer failed")
                    self._keep_old(j.rel, j.old)
            except OSError as exc:
                self._error(j.rel, exc.strerror or str(exc))
                try:
                    os.unlink(j.tmp, dir_fd=j.parent.fd)
                except OSError:
                    pass
            finally:
                j.parent.release()
        self._sync_dirs()

    def _keep_old(self, path: str, old: Entry | None) -> None:
        """A change failed: the destination keeps ``old`` (for the manifest)."""
        if old is not None and old.kind != "d":
            self._on_entry(path, old, None)

    def _mark_dirty(self, d: _Dir) -> None:
        """``d`` gained or lost a name: fsync it at the next commit."""
        self._touched.add(d.rel)
        if id(d) not in self._dirty:
            self._dirty[id(d)] = d.acquire()

    def _sync_dirs(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for d in dirty.values():
            try:
                os.fsync(d.fd)
            except OSError as exc:
                self._error(d.rel + "/", exc.strerror or str(exc))
            finally:
                d.release()

    # ------------------------------------------------- links and special files
    def _replace_with(self, parent: _Dir, e: Entry, prev: Entry | None, path: str, create) -> bool:
        """Create the new entry under a temp name with ``create(tmp)``, set its
        times, then rename it over ``path``."""
        self._counter += 1
        tmp = f"{self._run_tag}{self._counter}"
        self._touched.add(parent.rel)
        self._open_up(parent)
        try:
            create(tmp)
            try:
                if self._root:
                    os.chown(tmp, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if e.kind != "L":
                    os.chmod(tmp, e.perms, dir_fd=parent.fd)
                os.utime(tmp, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
                if prev is not None and prev.kind == "d" and not self._make_way(parent, e.name, prev, path):
                    os.unlink(tmp, dir_fd=parent.fd)
                    return False
                os.rename(tmp, e.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=parent.fd)
                except OSError:
                    pass
                raise
        except OSError as exc:
            self._error(path, exc.strerror or str(exc))
            return False
        self._mark_dirty(parent)
        return True

    def _symlink(self, parent: _Dir | None, e: Entry, prev: Entry | None, path: str, src_path: str) -> None:
        try:
            target = os.readlink(src_path)
        except OSError as exc:
            self._source_failed(path, exc)
            return
        if prev is not None and prev.kind == "L" and parent is not None:
            try:
                same = os.readlink(e.name, dir_fd=parent.fd) == target
            except OSError:
                same = False
            if same:
                self._fix_in_place(parent, e, prev, path, f" -> {target}")
                self._on_entry(path, e, None)
                return
            code = _itemize("c", e, prev, "c")
        else:
            code = _itemize("c", e, None)
        if self.opt.dry_run or parent is None:
            self._changed(prev, f"{code} {path} -> {target}")
            return
        if self._replace_with(parent, e, prev, path,
                              lambda tmp: os.symlink(target, tmp, dir_fd=parent.fd)):
            self._changed(prev, f"{code} {path} -> {target}")
            self._on_entry(path, e, None)
        else:
            self._keep_old(path, prev)

    def _fix_in_place(self, parent: _Dir | None, e: Entry, prev: Entry, path: str, suffix: str = "") -> None:
        """A link or special file that is already right but for its mtime,
        permissions (not for links) or, as root, owner: set those in place."""
        owner = self._root and (prev.uid, prev.gid) != (e.uid, e.gid)
        mode = e.kind != "L" and prev.perms != e.perms
        if not (owner or mode or prev.mtime_ns != e.mtime_ns):
            return
        if not (self.opt.dry_run or parent is None):
            try:
                if owner:
                    os.chown(e.name, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if mode:
                    os.chmod(e.name, e.perms, dir_fd=parent.fd)
                os.utime(e.name, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
            except OSError as exc:
                self._error(path, exc.strerror or str(exc))
                return
        self.stats.updated += 1                 # reported only once done
        self._on_item(f"{_itemize('.', e, prev)} {path}{suffix}")

    def _special(self, parent: _Dir | None, e: Entry, prev: Entry | None, path: str) -> None:
        if prev is not None and prev.kind == e.kind and stat.S_IFMT(prev.mode) == stat.S_IFMT(e.mode) \
                and prev.rdev == e.rdev:
            self._fix_in_place(parent, e, prev, path)
            self._on_entry(path, e, None)
            return
        code = _itemize("c", e, None if prev is None or prev.kind != e.kind else prev)
        if self.opt.dry_run or parent is None:
            self._changed(prev, f"{code} {path}")
            return
        if self._replace_with(parent, e, prev, path,
                              lambda tmp: os.mknod(tmp, stat.S_IFMT(e.mode) | 0o600, e.rdev, dir_fd=parent.fd)):
            self._changed(prev, f"{code} {path}")
            self._on_entry(path, e, None)
        else:
            self._keep_old(path, prev)

    # ------------------------------------------------------------- deletions
    def _delete(self) -> None:
        if not self._deletions:
            return
        if self.stats.errors:
            self.stats.deletion_refused = (f"{self.stats.errors} transfer errors: skipping "
                                           f"{len(self._deletions)} deletions (as rsync does)")
            self._keep_deletion_candidates()
            return
        count = 0
        for rel, e in self._deletions:
            count += 1
            if e.kind == "d" and self._root_fd >= 0:
                count += self._count_tree(rel, e.name)
        if self.opt.max_delete is not None and count > self.opt.max_delete:
            self.stats.deletion_refused = (f"{count} deletions exceed --max-delete {self.opt.max_delete}; "
                                           "nothing deleted")
            self._keep_deletion_candidates()
            return
        for rel, e in self._deletions:
            path = join(rel, e.name)
            item = f"*deleting   {path}/" if e.kind == "d" else f"*deleting   {path}"
            if self.opt.dry_run or self._root_fd < 0:
                self.stats.deleted += 1 + (self._count_tree(rel, e.name) if e.kind == "d" and self._root_fd >= 0 else 0)
                self._on_item(item)
                continue
            self._touched.add(rel)
            try:
                fd = open_rel_dir(self._root_fd, rel)
                try:
                    self._open_up_fd(fd, rel)
                    if e.kind == "d":
                        self.stats.deleted += 1 + remove_tree(fd, e.name, open_up=not self._dac)
                    else:
                        os.unlink(e.name, dir_fd=fd)
                        self.stats.deleted += 1
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self._error(path, exc.strerror or str(exc))
                if e.kind != "d":
                    self._on_entry(path, e, None)       # still there
                continue
            self._on_item(item)                         # reported only once done

    def _keep_deletion_candidates(self) -> None:
        for rel, e in self._deletions:
            self._on_entry(join(rel, e.name), e, None)

    def _count_tree(self, rel: str, name: str) -> int:
        """Entries below the destination directory rel/name."""
        try:
            fd = open_rel_dir(self._root_fd, join(rel, name))
        except OSError:
            return 0
        try:
            total = 0
            for _, dirs, files, _ in os.fwalk(".", dir_fd=fd):
                total += len(dirs) + len(files)
            return total
        finally:
            os.close(fd)
