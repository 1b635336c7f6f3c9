"""The only code that writes files: atomic replacement (temp file in the target
directory, fsync, rename, fsync of the directory)."""
from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from typing import Iterator

from .errors import FileError, NoSpaceError

TEMP_PREFIX = ".resync-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def os_error(path, exc: OSError):
    """The ResyncError an OSError on ``path`` is: NoSpaceError (exit 6) for a
    full file system or quota, else FileError (exit 3)."""
    if exc.errno in NO_SPACE:
        return NoSpaceError(path, exc.strerror or str(exc))
    return FileError.from_os(path, exc)


def raise_os_error(path, exc: OSError):
    raise os_error(path, exc) from None


@contextmanager
def atomic_output(path: str | os.PathLike, durable: bool = True, mode: int | None = None) -> Iterator[int]:
    """Yield a file descriptor whose contents replace ``path`` only if the block
    completes: then the data is fsynced and renamed over ``path`` and the
    directory is fsynced. On any exception the temp file (TEMP_PREFIX, in
    the same directory) is removed and ``path`` keeps its old contents. A new
    file gets mode 0666 & ~umask, a replaced file keeps its mode — or
    ``mode`` when given (the temp file is 0600 from the start: a secret is
    never readable by others on the way). ``durable=False`` skips both
    fsyncs, for a caller that makes a whole batch durable at once
    (``syncfs``) or writes scratch files. NoSpaceError (exit 6) for a full
    file system, FileError (exit 3) for any other failure.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise FileError(path, "is a directory")
        mode = stat.S_IMODE(st.st_mode) if mode is None else mode
    except FileNotFoundError:
        mode = 0o666 & ~_umask() if mode is None else mode
    except OSError as exc:
        raise_os_error(path, exc)
    try:
        import tempfile
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    except OSError as exc:
        raise_os_error(path, exc)
    try:
        try:
            yield fd
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            # An error on the output (its descriptor, its temp name) names the
            # output; one the block met elsewhere names the path it was about.
            culprit = exc.filename if exc.filename not in (None, tmp) else path
            raise_os_error(os.fsdecode(culprit) if isinstance(culprit, bytes) else culprit, exc)
        raise
    if not durable:
        return
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise_os_error(directory, exc)


def write_durable(path: str | os.PathLike, data, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``atomic_output``:
    temp file, fsync, rename, directory fsync; its errors and ``mode``)."""
    with atomic_output(path, mode=mode) as fd:
        write_all(fd, data)


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite at ``offset`` until every byte of ``data`` is written."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


SPARSE_BLOCK = 4096     # a run of zeros this long, aligned to it in the file, becomes a hole (-S):
#                         the page and block size of the file systems resync runs on


def nonzero_runs(data, offset: int = 0, block: int = SPARSE_BLOCK) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``data`` (bytes-like) that hold something
    other than zeros, ``data`` seen at file offset ``offset`` and cut at the
    file's ``block`` boundaries: what must be written to put ``data`` into a
    new file whose zeros are left as holes (rsync's -S, cp's
    --sparse=always). Ranges are sorted, disjoint and not adjacent; an
    all-zero ``data`` gives []. Cost: one vectorized pass (~1 ms a MiB here)."""
    import numpy as np
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    n = int(a.shape[0])
    if n == 0:
        return []
    head = min((-offset) % block, n)
    blocks = (n - head) // block
    bounds = [0]
    flags = []
    if head:
        bounds.append(head)
        flags.append(bool(a[:head].any()))
    if blocks:
        body = a[head:head + blocks * block].reshape(blocks, block)
        nz = body.view(np.uint64).any(axis=1) if block % 8 == 0 else body.any(axis=1)
        starts = np.arange(1, blocks + 1, dtype=np.int64) * block + head
        # runs of equal flags: only where the flag changes is a bound kept
        change = np.flatnonzero(nz[1:] != nz[:-1])
        keep_ends = np.append(starts[change], starts[-1])
        keep_flags = np.append(nz[change], nz[-1])
        bounds.extend(int(x) for x in keep_ends)
        flags.extend(bool(x) for x in keep_flags)
    if head + blocks * block < n:
        bounds.append(n)
        flags.append(bool(a[head + blocks * block:].any()))
    runs: list[tuple[int, int]] = []
    for lo, hi, nonzero in zip(bounds, bounds[1:], flags):
        if not nonzero:
            continue
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def pwrite_sparse(fd: int, data, offset: int) -> None:
    """Write ``data`` at ``offset`` of a new file, leaving its aligned blocks
    of zeros unwritten: they read back as zeros because nothing was ever
    written there, and take no space (holes). Only for a file created empty
    for this content (a temp file); its size is set at the end
    (``os.ftruncate``), so zeros at its end are a hole too."""
    view = memoryview(data).cast("B")
    for lo, hi in nonzero_runs(view, offset):
        pwrite_all(fd, view[lo:hi], offset + lo)


def pread_all(fd: int, size: int, offset: int = 0) -> bytes:
    """Up to ``size`` bytes from ``offset`` (fewer only at end of file: a
    file that shrank while read)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def write_all(fd: int, data) -> None:
    """os.write until every byte of ``data`` (bytes-like) is written."""
    view = memoryview(data)
    if view.nbytes == 0:
        return
    view = view.cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


DIRECT_ALIGN = 4096


class StreamWriter:
    """Writes a large file front to back from a few page-aligned buffers, on
    ``writers`` background threads (each buffer at its own offset, so the
    disk has several writes in flight: a GiB took 0.48 s with one O_DIRECT
    writer here, 0.40 s with two), so filling the next buffer overlaps
    writing this one. With ``hasher`` (anything with ``update``, e.g. a BLAKE3
    hasher that drops the GIL), another thread feeds it every buffer in order,
    alongside the writes.

    Full buffers go to disk with O_DIRECT where the file system accepts it:
    the file is fsynced before it is renamed anyway, so its data gains nothing
    from passing through the page cache, and on the project's VMs filling a GiB
    of fresh page cache costs seconds (first touch of guest memory) while the
    direct writes take ~0.6 s. The short last buffer, and every write on file
    systems without O_DIRECT (tmpfs, some FUSE), use ordinary writes.

    Use: ``buf = w.get()``; fill ``buf[:n]``; ``w.put(buf, n)`` (n equals the
    buffer size except for the last one); ``w.finish()``; always ``w.close()``.
    Errors of the background threads are raised from the next call.

    ``sparse``: blocks of zeros are not written (``pwrite_sparse``): holes, in
    a file created empty for this content.
    """

    def __init__(self, fd: int, buffer_size: int = 8 << 20, buffers: int = 4, direct: bool = True,
                 hasher=None, writers: int = 2, sparse: bool = False):
        import mmap
        import queue
        import threading

        import numpy as np

        if buffer_size % DIRECT_ALIGN:
            raise ValueError("buffer size must be a multiple of 4096")
        self._fd = fd
        self._sparse = sparse                  # zeros left as holes (the file must be new: pwrite_sparse)
        self._offset = 0                       # where the next buffer put goes
        self._error: BaseException | None = None
        self._direct = direct and hasattr(os, "O_DIRECT") and self._set_direct(True)
        self._maps = [mmap.mmap(-1, buffer_size) for _ in range(buffers)]   # page-aligned
        self._free: queue.Queue = queue.Queue()
        for i, m in enumerate(self._maps):
            self._free.put((i, np.frombuffer(m, np.uint8)))
        self._pending = [0] * buffers          # consumers still using buffer i
        self._lock = threading.Lock()
        self._flags_lock = threading.Lock()
        self._hasher = hasher
        self._writes: queue.Queue = queue.Queue()      # shared by the writer threads
        self._queues = [self._writes] + ([queue.Queue()] if hasher is not None else [])
        self._threads = [threading.Thread(target=self._run, args=(self._writes, self._write), daemon=True,
                                          name=f"resync-writer-{i}") for i in range(max(1, writers))]
        if hasher is not None:
            self._threads.append(threading.Thread(target=self._run, args=(self._queues[1], self._hash),
                                                  daemon=True, name="resync-hasher"))
        self._buffers: dict[int, int] = {}     # id(array) -> buffer index
        for t in self._threads:
            t.start()

    @property
    def direct(self) -> bool:
        return self._direct

    def _set_direct(self, on: bool) -> bool:
        import fcntl
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            flags = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
            return True
        except OSError:
            return False

    def _write(self, view: memoryview, offset: int) -> None:
        if self._sparse:                        # (pieces start and end on block bounds, but the last)
            for lo, hi in nonzero_runs(view, offset):
                self._write_run(view[lo:hi], offset + lo)
        else:
            self._write_run(view, offset)

    def _write_run(self, view: memoryview, offset: int) -> None:
        aligned = len(view) % DIRECT_ALIGN == 0
        if self._direct and not aligned:
            with self._flags_lock:
                self._direct = not self._set_direct(False)
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                with self._flags_lock:
                    self._direct = not self._set_direct(False)   # O_DIRECT refused: write normally
                if self._direct:
                    raise
                continue
            view = view[n:]
            offset += n

    def _hash(self, view: memoryview, offset: int) -> None:
        self._hasher.update(view)

    def _run(self, todo, work) -> None:
        while True:
            item = todo.get()
            if item is None:
                return
            index, buf, n, offset = item
            try:
                if self._error is None:
                    work(memoryview(buf)[:n], offset)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc
            with self._lock:
                self._pending[index] -= 1
                done = self._pending[index] == 0
            if done:
                self._free.put((index, buf))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def get(self):
        index, buf = self._free.get()
        self._check()
        self._buffers[id(buf)] = index
        return buf

    def put(self, buf, n: int) -> None:
        self._check()
        index = self._buffers.pop(id(buf))
        with self._lock:
            self._pending[index] = len(self._queues)
        for q in self._queues:
            q.put((index, buf, n, self._offset))
        self._offset += n

    def _stop(self) -> None:
        for t in self._threads:
            (self._queues[1] if t.name == "resync-hasher" else self._writes).put(None)
        for t in self._threads:
            t.join()

    def finish(self) -> None:
        """Wait until everything is written (and hashed); raise any background error.
        A sparse writer's file is given its size (zeros at the end left a hole)."""
        if any(t.is_alive() for t in self._threads):
            self._stop()
        if self._direct:
            self._set_direct(False)
        self._check()
        if self._sparse:
            os.ftruncate(self._fd, self._offset)

    def close(self) -> None:
        """Stop the threads (also after an error in the caller) and free the buffers."""
        if any(t.is_alive() for t in self._threads):
            self._error = self._error or RuntimeError("writer closed")
            self._stop()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass


class MappedFile:
    """A read-only memory map of a whole file as a uint8 array (page-cache
    backed: a 4 GiB file is never copied into anonymous memory)."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, populate: bool = False):
        import mmap

        import numpy as np

        self.path = os.fspath(path)
        self.name = name or self.path
        self._map = None
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise FileError(self.name, "is a directory")
                size = st.st_size
                if size:
                    # populate: map every cached page now, in one call, instead
                    # of taking a page fault per 64 KiB later (patch reads the
                    # basis from two threads, where those faults contend).
                    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
                    self._map = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
                    self._map.madvise(mmap.MADV_SEQUENTIAL)
        except OSError as exc:
            raise_os_error(self.name, exc)
        self.size = size
        self.array = (np.frombuffer(self._map, dtype=np.uint8) if self._map is not None
                      else np.empty(0, dtype=np.uint8))

    @property
    def buffer(self):
        return self._map if self._map is not None else b""

    def close(self) -> None:
        self.array = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive; the map is freed with it
            self._map = None

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
