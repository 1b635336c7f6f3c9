"""Scan: directory trees as resync sees them — listings of a source and of a
destination, excludes, the source listed ahead by a forked process, and the
one safe way to reach a path under a destination root.

Destination paths are always reached from an open descriptor of the root, one
component at a time with O_NOFOLLOW, and every change is made relative to the
descriptor of its parent directory. A directory inside the destination that is
swapped for a symlink (before or during a run) therefore makes that operation
fail; it is never followed out of the root.
"""
from __future__ import annotations

import marshal
import errno
import os
import stat
from typing import NamedTuple

from .fs import TEMP_PREFIX

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


_KINDS = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "L", stat.S_IFCHR: "D", stat.S_IFBLK: "D"}


class Entry(NamedTuple):
    """One directory entry: name and the lstat fields that rsync -a compares,
    plus ``kind`` (f file, d directory, L symlink, D device, S fifo or socket)
    and ``perms`` (permission bits), computed once. (A NamedTuple: a tree of
    100,000 entries builds 200,000 of these.)"""
    name: str
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    rdev: int
    kind: str
    perms: int

    @classmethod
    def from_stat(cls, name: str, st: os.stat_result) -> "Entry":
        mode = st.st_mode
        return cls(name, mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_rdev,
                   _KINDS.get(mode & 0o170000, "S"), mode & 0o7777)


class Excludes:
    """--exclude / --exclude-from patterns with gitignore semantics (pathspec),
    matched against paths relative to the source root ("dir/" for directories)."""

    def __init__(self, patterns: list[str]):
        self.patterns = [p for p in patterns if p.strip() and not p.lstrip().startswith("#")]
        self._spec = None
        if self.patterns:
            from pathspec import GitIgnoreSpec
            self._spec = GitIgnoreSpec.from_lines(self.patterns)

    def __bool__(self) -> bool:
        return self._spec is not None

    def excluded(self, rel: str, is_dir: bool) -> bool:
        if self._spec is None:
            return False
        return self._spec.match_file(rel + "/" if is_dir else rel)


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _scan(fd_or_path, skip_temps: bool, temps: list[str], vanished: list[str]):
    """(name, lstat) of each entry of a directory, in directory order; the
    names of resync temp files (when ``skip_temps``) go to ``temps``, of
    entries that vanish while listed to ``vanished``."""
    with os.scandir(fd_or_path) as it:
        for de in it:
            name = de.name
            if skip_temps and name.startswith(TEMP_PREFIX):
                temps.append(name)
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                vanished.append(name)
                continue
            yield name, st


def list_dir(fd_or_path, excludes: Excludes | None = None, rel: str = "",
             skip_temps: bool = False) -> tuple[list[Entry], list[str], list[str]]:
    """Sorted entries of a directory (lstat, never following symlinks), minus
    excluded ones; also the names of resync temp files (when ``skip_temps``)
    and of entries that vanished while being listed."""
    temps: list[str] = []
    vanished: list[str] = []
    if excludes:
        entries = [Entry.from_stat(name, st) for name, st in _scan(fd_or_path, skip_temps, temps, vanished)
                   if not excludes.excluded(join(rel, name), stat.S_ISDIR(st.st_mode))]
    else:
        entries = [Entry.from_stat(name, st) for name, st in _scan(fd_or_path, skip_temps, temps, vanished)]
    entries.sort(key=lambda e: e.name)
    return entries, temps, vanished


def stat_dir(fd_or_path, skip_temps: bool = False) -> tuple[dict[str, os.stat_result], list[str]]:
    """The lstat of every entry of a directory by name, unsorted, and the
    names of resync temp files (when ``skip_temps``); entries that vanish
    while it is listed are left out. The cheap listing of a destination
    directory: most of its entries are only compared, never turned into an
    Entry."""
    temps: list[str] = []
    return dict(_scan(fd_or_path, skip_temps, temps, [])), temps


class TreeLister:
    """The listings of a source tree, made ahead of the caller by a forked
    process.

    ``sync`` spends most of a run that changes little on listing two trees;
    with the source listed here, on the other core, the main process only
    lists the destination and compares (rsync splits the work between
    processes the same way). The child walks ``root`` in the order the caller
    visits it (pre-order, names sorted, ``excludes`` applied, never entering
    the directory whose (st_dev, st_ino) is ``skip``) and sends one frame per
    directory through a pipe, which bounds how far it runs ahead.

    ``listing(rel)`` returns (entries, vanished names, the name of the skipped
    directory or None, OSError or None); or None when the stream cannot
    supply it (the child died, or ``rel`` was not in its walk) and the caller
    must list the directory itself. Directories the caller does not visit
    are passed over."""

    def __init__(self, root: str, excludes: Excludes | None = None, skip: tuple[int, int] | None = None):
        self._stream = None
        self._pid = -1
        self._next: tuple | None = None             # a frame read ahead, not yet asked for
        try:
            r, w = os.pipe()
        except OSError:
            return
        try:
            import fcntl
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)   # let it run further ahead
        except OSError:
            pass
        from .parallel import block_stop_signals, child_started, restore_signals
        # Ctrl-C (and a stop's SIGTERM or SIGHUP) reaches the whole process
        # group; only the parent handles it (the child must not print a
        # KeyboardInterrupt, not even from an at-fork hook), so the signals are
        # held off until the child ignores them. The child dies with its parent.
        parent = os.getpid()
        blocked = block_stop_signals()
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:                                 # the child: walk, write, leave
            code = 1
            try:
                child_started(parent, blocked)
                os.close(r)
                _walk_frames(root, excludes, skip, w)
                code = 0
            except BaseException:
                pass
            finally:
                os._exit(code)
        restore_signals(blocked)
        if pid < 0:
            os.close(r)
            os.close(w)
            return
        os.close(w)
        self._pid = pid
        self._stream = os.fdopen(r, "rb", buffering=1 << 16)

    def listing(self, rel: str):
        if self._stream is None:
            return None
        key = rel.split("/") if rel else []
        while True:
            frame = self._next if self._next is not None else self._read()
            self._next = None
            if frame is None:
                self.close()
                return None
            found = frame[0].split("/") if frame[0] else []
            if found == key:
                entries, vanished, skipped, error = frame[1:]
                if error is not None:
                    error = OSError(*error)          # the errno picks the subclass (FileNotFoundError, ...)
                return [_entry(e) for e in entries], vanished, skipped, error
            if found > key:              # past it: ``rel`` is not in the walk
                self._next = frame
                return None

    def _read(self):
        head = self._stream.read(8)
        if len(head) < 8:
            return None
        size = int.from_bytes(head, "little")
        data = self._stream.read(size)
        if len(data) < size:
            return None
        try:
            return marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._pid > 0:
            import signal
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
            self._pid = -1

    def __enter__(self) -> "TreeLister":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def walk_dirs(root: str, errors: list | None = None, open_up=None):
    """(directory, its entries, names of its subdirectories that cannot be
    listed) for every directory under ``root`` (itself first, as ""),
    parents first, names sorted, symlinks not followed, resync's temp files
    left out. The caller may prune: subdirectories are taken from the
    entries when the caller asks for the next directory (after it has
    handled this one), except the unlistable ones, which are not entered.

    A directory whose contents cannot be read is named in the third field of
    its parent's row, and its error goes to ``errors`` as (path, OSError), or
    is raised (naming that directory) when ``errors`` is None; the root itself
    failing raises or yields nothing. ``open_up(parent_fd, name, rel)``:
    called for a directory this process cannot read, before it is tried once
    more (apply's way of giving a directory this user owns u+rwx for the run)."""
    def failed(rel: str, exc: OSError) -> None:
        if errors is None:
            raise OSError(exc.errno, exc.strerror, f"{root}/{rel}" if rel else root) from None
        errors.append((rel, exc))

    def readable(rel: str) -> bool:
        full = f"{root}/{rel}" if rel else root
        try:
            fd = os.open(full, DIR_FLAGS)
        except PermissionError as exc:
            if open_up is None:
                failed(rel, exc)
                return False
            try:
                parent, _, name = full.rpartition("/")
                pfd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    open_up(pfd, name, rel)
                finally:
                    os.close(pfd)
                fd = os.open(full, DIR_FLAGS)
            except OSError:
                failed(rel, exc)
                return False
        except OSError as exc:
            failed(rel, exc)
            return False
        os.close(fd)
        return True

    if not readable(""):
        return
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries, _, _ = list_dir(f"{root}/{rel}" if rel else root, rel=rel, skip_temps=True)
        except OSError as exc:           # changed since it was checked
            failed(rel, exc)
            continue
        unlisted = {e.name for e in entries if e.kind == "d" and not readable(join(rel, e.name))}
        yield rel, entries, unlisted
        stack.extend(reversed([join(rel, e.name) for e in entries if e.kind == "d" and e.name not in unlisted]))


def walk(root: str, errors: list | None = None, open_up=None):
    """(relative path, Entry, unlisted) of everything under the directory
    ``root`` in walk_dirs' order (parents first, names sorted): a directory
    whose contents cannot be read is yielded with ``unlisted`` True, and
    nothing below it (see walk_dirs for ``errors`` and ``open_up``)."""
    for rel, entries, unlisted in walk_dirs(root, errors, open_up):
        for e in entries:
            yield join(rel, e.name), e, e.name in unlisted


def skipped_dir(path: str, entries: list[Entry], skip: tuple[int, int] | None) -> str | None:
    """The name of the directory among ``entries`` (listed from ``path``) whose
    (st_dev, st_ino) is ``skip`` — the destination inside its own source."""
    if skip is None:
        return None
    for e in entries:
        if e.kind == "d":
            try:
                st = os.stat(f"{path}/{e.name}", follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == skip:
                return e.name
    return None


def _entry(fields: tuple) -> Entry:
    return tuple.__new__(Entry, fields)


def _walk_frames(root: str, excludes: Excludes | None, skip: tuple[int, int] | None, fd: int) -> None:
    """TreeLister's child: one length-prefixed marshal frame per directory,
    (rel, entries as plain tuples, vanished, skipped name, (errno, message))."""
    stack = [""]
    while stack:
        rel = stack.pop()
        path = f"{root}/{rel}" if rel else root
        entries: list[Entry] = []
        vanished: list[str] = []
        error = None
        try:
            entries, _, vanished = list_dir(path, excludes, rel, skip_temps=True)
        except OSError as exc:
            error = (exc.errno or 0, exc.strerror or str(exc))
        skipped = skipped_dir(path, entries, skip)
        subdirs = [join(rel, e.name) for e in entries if e.kind == "d" and e.name != skipped]
        data = marshal.dumps((rel, [tuple(e) for e in entries], vanished, skipped, error))
        view = memoryview(len(data).to_bytes(8, "little") + data)
        while view:
            view = view[os.write(fd, view):]
        stack.extend(reversed(subdirs))


def open_dir_at(parent_fd: int, name: str) -> int:
    """Open the directory ``name`` under ``parent_fd`` without following a symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def open_rel_dir(root_fd: int, rel: str) -> int:
    """Open root/rel one component at a time, refusing symlinks on the way
    (OSError ELOOP: see open_beneath)."""
    return open_beneath(root_fd, rel)


def _openat2():
    """Linux's openat2(2) (5.6+, system call 437 on every architecture):
    one call that opens a path beneath a directory refusing every symlink on
    the way (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    <linux/openat2.h>), where the portable way opens each component in
    turn. Returns ``call(dir_fd, path) -> fd`` (OSError as os.open raises
    it), or None where the system lacks it (another OS, an older kernel, a
    sandbox's filter): the walk is used there."""
    import sys
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    how = (ctypes.c_uint64 * 3)(DIR_FLAGS & ~os.O_NOFOLLOW, 0, 0x08 | 0x04 | 0x02)     # flags, mode, resolve
    size = ctypes.sizeof(how)

    def call(dir_fd: int, path: str) -> int:
        fd = syscall(437, dir_fd, os.fsencode(path), how, size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd
    try:
        top = os.open("/", DIR_FLAGS)
        try:
            os.close(call(top, "."))
        finally:
            os.close(top)
    except OSError:                             # (ENOSYS, or a filter's EPERM)
        return None
    return call


_OPENAT2 = False                                # the call, None where missing; False: not looked for yet


def open_beneath(root_fd: int, rel: str, create: bool = False, mode: int = 0o777) -> int:
    """Open the directory root/rel (``rel``: "/"-separated, already checked
    to hold no "..", "." or empty component) without following a symlink:
    with openat2(2) RESOLVE_NO_SYMLINKS in one system call where Linux has
    it, else one component at a time; missing components are made
    (``mode``, less the umask) when ``create``.

    Raises OSError: ELOOP when a component is a symlink (the path would
    leave the tree below ``root_fd``: the caller refuses it), ENOTDIR when
    one is another kind of file, ENOENT when one is missing and ``create``
    is off. Each component is opened with O_NOFOLLOW, so a component
    swapped for a symlink while this runs is refused, never followed."""
    global _OPENAT2
    if rel:
        if _OPENAT2 is False:
            _OPENAT2 = _openat2()
        if _OPENAT2 is not None:
            try:
                return _OPENAT2(root_fd, rel)
            except FileNotFoundError:
                if not create:
                    raise                       # (else: the walk makes what is missing)
    fd = os.dup(root_fd)
    try:
        for part in (rel.split("/") if rel else []):
            try:
                try:
                    nxt = open_dir_at(fd, part)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, mode, dir_fd=fd)
                    except FileExistsError:
                        pass                    # made meanwhile: opened (without following) below
                    nxt = open_dir_at(fd, part)
            except NotADirectoryError:          # (O_DIRECTORY | O_NOFOLLOW on a symlink: ENOTDIR)
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def hash_under(root: str, files: list[tuple[str, int, int]]) -> dict[str, str]:
    """BLAKE3 (hex) of root/path for each (path, size, mtime_ns) that still has
    that size and mtime; reached without following symlinks. Files are taken
    directory by directory, each directory opened once."""
    out: dict[str, str] = {}
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return out
    buf = bytearray(1 << 20)
    dir_rel, dir_fd = None, -1
    try:
        for path, size, mtime_ns in sorted(files, key=lambda f: f[0].rpartition("/")[::2]):
            parent, _, name = path.rpartition("/")
            try:
                if parent != dir_rel:
                    if dir_fd >= 0:
                        os.close(dir_fd)
                        dir_fd = -1
                    dir_rel = parent
                    dir_fd = open_rel_dir(root_fd, parent)
                if dir_fd < 0:
                    continue
            except OSError:
                continue
            digest = hash_at(dir_fd, name, size, mtime_ns, buf)
            if digest is not None:
                out[path] = digest.hex()
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        os.close(root_fd)
    return out


def hash_at(dir_fd: int, name: str, size: int, mtime_ns: int, buf: bytearray) -> bytes | None:
    """BLAKE3 of the regular file ``name`` in ``dir_fd`` (never following a
    symlink) if it still has this size and mtime, else None. ``buf`` is the
    read buffer."""
    import blake3
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or st.st_mtime_ns != mtime_ns:
            return None
        h = blake3.blake3(max_threads=1)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
        return h.digest()
    except OSError:
        return None
    finally:
        os.close(fd)
