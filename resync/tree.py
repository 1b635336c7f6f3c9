"""Directory trees as resync sees them: listings, excludes, and the one safe
way to reach a path under the destination root.

Destination paths are always reached from an open descriptor of the root, one
component at a time with O_NOFOLLOW, and every change is made relative to the
descriptor of its parent directory. A directory inside the destination that is
swapped for a symlink (before or during a run) therefore makes that operation
fail; it is never followed out of the root.
"""
from __future__ import annotations

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


def list_dir(fd_or_path, excludes: Excludes | None = None, rel: str = "",
             skip_temps: bool = False) -> tuple[list[Entry], list[str], list[str]]:
    """Sorted entries of a directory (lstat, never following symlinks), minus
    excluded ones; also the names of resync temp files (when ``skip_temps``)
    and of entries that vanished while being listed."""
    entries: list[Entry] = []
    temps: list[str] = []
    vanished: list[str] = []
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
            if excludes and excludes.excluded(join(rel, name), stat.S_ISDIR(st.st_mode)):
                continue
            entries.append(Entry.from_stat(name, st))
    entries.sort(key=lambda e: e.name)
    return entries, temps, vanished


def open_dir_at(parent_fd: int, name: str) -> int:
    """Open the directory ``name`` under ``parent_fd`` without following a symlink."""
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def open_rel_dir(root_fd: int, rel: str) -> int:
    """Open root/rel one component at a time, refusing symlinks on the way."""
    fd = os.dup(root_fd)
    try:
        for part in (rel.split("/") if rel else []):
            nxt = open_dir_at(fd, part)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def hash_under(root: str, files: list[tuple[str, int, int]]) -> dict[str, str]:
    """BLAKE3 (hex) of root/path for each (path, size, mtime_ns) that still has
    that size and mtime; reached without following symlinks."""
    import blake3
    out: dict[str, str] = {}
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return out
    try:
        for path, size, mtime_ns in files:
            parent, _, name = path.rpartition("/")
            try:
                dfd = open_rel_dir(root_fd, parent)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
                finally:
                    os.close(dfd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size or st.st_mtime_ns != mtime_ns:
                    continue
                h = blake3.blake3(max_threads=1)
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                out[path] = h.hexdigest()
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return out
