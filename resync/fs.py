"""The only code that writes files: atomic replacement (temp file in the target
directory, fsync, rename, fsync of the directory)."""
from __future__ import annotations

import errno
import os
import stat
import tempfile
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


def raise_os_error(path, exc: OSError):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(path, exc.strerror) from None
    raise FileError.from_os(path, exc) from None


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[int]:
    """Yield a file descriptor whose contents replace ``path`` only if the block
    completes: then the data is fsynced and renamed over ``path`` and the
    directory is fsynced. On any exception the temp file is removed and
    ``path`` keeps its old contents. A new file gets mode 0666 & ~umask; a
    replaced file keeps its mode.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise FileError(path, "is a directory")
        mode = stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    except OSError as exc:
        raise_os_error(path, exc)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    except OSError as exc:
        raise_os_error(path, exc)
    try:
        try:
            yield fd
            os.fchmod(fd, mode)
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
            raise_os_error(path, exc)
        raise
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise_os_error(directory, exc)


def write_all(fd: int, data) -> None:
    """os.write until every byte of ``data`` (bytes-like) is written."""
    view = memoryview(data)
    if view.nbytes == 0:
        return
    view = view.cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


class MappedFile:
    """A read-only memory map of a whole file as a uint8 array (page-cache
    backed: a 4 GiB file is never copied into anonymous memory)."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None):
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
                    self._map = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
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
