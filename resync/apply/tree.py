"""The destination's directories as the apply layer holds them, and the
tree operations every part uses: ``Dir`` (a reference-counted directory
descriptor), ``syncfs``, opening a directory up for an ordinary user,
removing or pruning a tree without following symlinks, ``Deletions``,
``itemize`` (rsync's -i codes) and ``read_regular``."""
from __future__ import annotations

import os
import stat
import threading
import unicodedata
from typing import Iterable

from ..scan import Entry, Excludes, join, open_dir_at

USER_RWX = 0o700


def itemize(y: str, entry: Entry, old: Entry | None, content: str = ".", owners: bool = False) -> str:
    """rsync's 11-character change summary YXcstpoguax for one entry."""
    x = entry.kind
    if old is None:
        return f"{y}{x}+++++++++"
    s = "s" if x == "f" and entry.size != old.size else "."
    t = "t" if entry.mtime_ns != old.mtime_ns else "."
    p = "p" if entry.perms != old.perms and x != "L" else "."
    o = "o" if owners and entry.uid != old.uid else "."
    g = "g" if owners and entry.gid != old.gid else "."
    return f"{y}{x}{content}{s}{t}{p}{o}{g}..."


SYNC_DIRS_EACH = 8      # dirty directories fsynced one by one; more: one syncfs (Applier.sync_dirs)


def syncfs(fd: int) -> bool:
    """Flush the file system holding ``fd`` (False where syncfs is missing)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    except (OSError, AttributeError):
        return False


_SYNC_FILE_RANGE_WRITE = 2              # linux/fs.h: start writeback of the range's dirty pages, do not wait
_sync_file_range = None


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages out, without waiting (Linux's
    sync_file_range(2) with SYNC_FILE_RANGE_WRITE; nothing where it is
    missing: the fsync that follows does it all)."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
            _sync_file_range = f
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_files(fds: list[int]) -> None:
    """Make these files durable (fsync), their writeback started together
    first: the first fsync's journal commit then carries them all and the
    others find nothing left to do, where an fsync each from cold forced a
    commit each. Unlike ``syncfs``, this flushes only these files: a syncfs
    also waits for every other writer's dirty data on the file system (1.1 s
    measured beside a ``dd`` writing, against 1 ms for an fsync of a small
    file) — what a daemon receiving many transfers at once, or any receiver
    on an event loop, must not wait for. OSError from fsync."""
    for fd in fds:
        _start_writeback(fd)
    for fd in fds:
        os.fsync(fd)


# -- permission bits as an ordinary user --------------------------------------------
#
# ``rsync -a`` copies a mode-0555 directory as 0555; a later run by a user
# without CAP_DAC_OVERRIDE can then change nothing inside it. Like rsync, resync
# gives such a directory (when it owns it) u+rwx for the run and sets its mode
# back at the end, or when the run is interrupted.

def overrides_permissions() -> bool:
    """Whether this process may read and write any directory whatever its
    permission bits say (CAP_DAC_OVERRIDE in its effective set: root, unless
    the capability was dropped, e.g. ``setpriv --bounding-set=-dac_override``)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 1))     # CAP_DAC_OVERRIDE
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def open_up_at(parent_fd: int, name: str) -> int:
    """Give the directory ``name`` under ``parent_fd`` u+rwx (never following a
    symlink: reached with O_PATH, changed through its /proc/self/fd link, so
    not even read permission is needed). Returns its permission bits before;
    OSError (EPERM) if this user does not own it."""
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        perms = stat.S_IMODE(os.fstat(fd).st_mode)
        if perms & USER_RWX != USER_RWX:
            os.chmod(f"/proc/self/fd/{fd}", perms | USER_RWX)
        return perms
    finally:
        os.close(fd)


def remove_tree(parent_fd: int, name: str, open_up: bool = False) -> int:
    """Remove the directory ``name`` under ``parent_fd`` and everything below
    it, never following a symlink. ``open_up``: a directory below that lacks
    u+rwx (and that this user owns) gets it first, since it is being removed
    anyway. Returns the number of entries removed below ``name``."""
    try:
        fd = open_dir_at(parent_fd, name)
    except PermissionError:
        if not open_up:
            raise
        open_up_at(parent_fd, name)
        fd = open_dir_at(parent_fd, name)
    removed = 0
    try:
        if open_up and stat.S_IMODE(os.fstat(fd).st_mode) & USER_RWX != USER_RWX:
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | USER_RWX)
        for child in os.listdir(fd):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                removed += remove_tree(fd, child, open_up)
            else:
                os.unlink(child, dir_fd=fd)
            removed += 1
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
    return removed


def prune_tree(parent_fd: int, name: str, path: str, excludes: Excludes, open_up: bool = False,
               dry_run: bool = False) -> tuple[int, list[tuple[str, Entry | None]]]:
    """Remove the directory ``name`` under ``parent_fd`` (``path`` from the
    transfer root) and everything below it but what ``excludes`` protects,
    never following a symlink. As in rsync, an entry the excludes match (by
    its path from the root, as the planner matches the entries it lists)
    stays -- a directory excluded as such with all it holds -- and so does
    every directory on the way to it: removing them would delete what the
    excludes keep out of the run. ``open_up``: as for remove_tree; a
    directory that stays gets its mode back. ``dry_run``: change nothing,
    only count (a directory that cannot be listed counts as one entry).

    Returns (entries removed, ``name`` itself included when it goes; the
    steps, children before parents: (path, None) for a file or a whole tree
    removed, a directory's path ending in "/"; (path, the directory as it
    is now) for one that stays)."""
    removed, steps, gone = _prune(parent_fd, name, path, excludes, open_up, dry_run)
    return removed, [(path + "/", None)] if gone else steps


def _prune(parent_fd: int, name: str, path: str, excludes: Excludes, open_up: bool,
           dry_run: bool) -> tuple[int, list[tuple[str, Entry | None]], bool]:
    """prune_tree's walk; also says whether ``name`` itself went (its steps
    are then left for the caller to say as one)."""
    before = None                       # permission bits to give back to a directory that stays
    try:
        fd = open_dir_at(parent_fd, name)
    except PermissionError:
        if not open_up or dry_run:
            raise
        before = open_up_at(parent_fd, name)
        fd = open_dir_at(parent_fd, name)
    removed, steps, kept = 0, [], False
    try:
        if open_up and not dry_run:
            perms = stat.S_IMODE(os.fstat(fd).st_mode)
            if perms & USER_RWX != USER_RWX:
                os.fchmod(fd, perms | USER_RWX)
                before = perms
        for child in sorted(os.listdir(fd)):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            sub = f"{path}/{child}"
            is_dir = stat.S_ISDIR(st.st_mode)
            if excludes.excluded(sub, is_dir):
                kept = True
                continue
            if not is_dir:
                if not dry_run:
                    os.unlink(child, dir_fd=fd)
                removed += 1
                steps.append((sub, None))
                continue
            try:
                n, below, gone = _prune(fd, child, sub, excludes, open_up, dry_run)
            except OSError:
                if not dry_run:
                    raise
                n, below, gone = 1, [], True
            removed += n
            if gone:
                steps.append((sub + "/", None))
            else:
                kept = True
                steps += below
        if kept:
            if before is not None:
                os.fchmod(fd, before)
            steps.append((path, Entry.from_stat(name, os.fstat(fd))))
    finally:
        os.close(fd)
    if kept:
        return removed, steps, False
    if not dry_run:
        os.rmdir(name, dir_fd=parent_fd)
    return removed + 1, steps, True


def clear(parent_fd: int, name: str, open_up: bool = True) -> int:
    """Remove whatever is at ``name`` (file, link, special or directory tree);
    returns the entries removed below it."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if stat.S_ISDIR(st.st_mode):
        return remove_tree(parent_fd, name, open_up)
    os.unlink(name, dir_fd=parent_fd)
    return 0


def name_key(name: str) -> str:
    """The name as a case-insensitive or normalization-insensitive file
    system compares it (vfat, exFAT, ext4 or tmpfs with casefold, macOS):
    two names with the same key may be one directory entry there."""
    return unicodedata.normalize("NFC", name).casefold()


class Deletions(list):
    """Deletion candidates as ``Applier.delete`` takes them: (directory,
    destination entry), children before parents. ``aliases``: for a
    candidate's path, the names of source entries of the same directory
    with the same ``name_key`` -- on a destination that takes both names
    for one entry, the candidate is the file just placed under the source's
    spelling, and deleting it would delete that."""

    def __init__(self, items: Iterable[tuple[str, Entry]] = ()):
        super().__init__(items)
        self.aliases: dict[str, list[str]] = {}

    def note_aliases(self, rel: str, names: Iterable[str], source_names: Iterable[str]) -> None:
        """Record the aliases of the candidates ``names`` of directory
        ``rel`` among ``source_names`` (that directory's source entries).
        Only source names whose key is a candidate's are kept."""
        keys: dict[str, list[str]] = {}
        for name in names:
            keys.setdefault(name_key(name), []).append(name)
        for other in source_names:
            for name in keys.get(name_key(other), ()):
                if other != name:
                    self.aliases.setdefault(join(rel, name), []).append(other)


# -- the pieces of pending work -------------------------------------------------------

class Dir:
    """An open destination directory shared by pending work (reference-counted),
    and its permission bits as this run last set or saw them."""

    __slots__ = ("fd", "rel", "perms", "_refs", "_lock")
    open_count = 0                  # descriptors held by all Dir objects
    _count_lock = threading.Lock()

    def __init__(self, fd: int, rel: str, perms: int = USER_RWX):
        self.fd, self.rel, self.perms, self._refs, self._lock = fd, rel, perms, 1, threading.Lock()
        with Dir._count_lock:
            Dir.open_count += 1

    def acquire(self) -> "Dir":
        with self._lock:
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            os.close(self.fd)
            with Dir._count_lock:
                Dir.open_count -= 1


def read_regular(dir_fd: int, name: str, limit: int) -> bytes | None:
    """The content of ``name`` in ``dir_fd`` if it is a regular file of at
    most ``limit`` bytes, else None (missing, a symlink, a FIFO or device —
    opened without blocking, never read —, too large, unreadable)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)
