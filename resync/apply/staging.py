"""Stage all, then place: every file is written and checked in a staging
directory inside the root (or, for the network's small files, beside the
file it replaces) before anything in the tree changes — unpack, which must
refuse a bad bundle with nothing applied, and the network receiver, whose
staging directory also holds the checkpoint a cut transfer resumes from."""
from __future__ import annotations

import os
import stat

from ..fs import TEMP_PREFIX
from ..report import FileChange
from ..scan import DIR_FLAGS, Entry
from .tree import USER_RWX, Dir, clear, fsync_files, read_regular, remove_tree, syncfs

STAGE_PREFIX = TEMP_PREFIX + "unpack-"
JOURNAL = "checkpoint.json"


class Staged:
    """A file written and checked, waiting to be placed: in the staging
    directory, or (``parent``: a Dir held for it) beside the file it replaces."""

    __slots__ = ("tmp", "result", "parent")

    def __init__(self, tmp: str, result: FileChange, parent: "Dir | None" = None):
        self.tmp, self.result, self.parent = tmp, result, parent


class Staging:
    """The Applier ``a``'s staging directory and what is staged: ``begin``,
    ``stage`` / ``open`` … ``finish`` / ``data``, ``make_durable``, ``place``,
    ``end`` (or ``keep``, for a checkpointed transfer to resume)."""

    def __init__(self, a):
        self.a = a
        self._stage: Dir | None = None              # the staging directory
        self._staged: list[Staged] = []
        self._beside: dict[int, Staged] = {}     # staged beside their files (data), not yet placed

    def begin(self, bundle_id: str, prefix: str | None = None, resume: bool = False) -> bytes | None:
        """Stage-all mode: a staging directory inside the root, named
        ``prefix + bundle_id``. Stale ones of killed runs (same prefix) are
        removed first — except, with ``resume``, the newest one that holds a
        checkpoint (``stage_checkpoint``): that one is taken over, and its
        checkpoint returned (None: a fresh directory)."""
        from ..fs import raise_os_error
        prefix = prefix or STAGE_PREFIX
        stale = [n for n in os.listdir(self.a.root_fd) if n.startswith(prefix)]
        adopted, journal = None, None
        if resume:
            for n in sorted(stale, key=_stat_journal(self.a.root_fd), reverse=True):
                data = _read_journal(self.a.root_fd, n)
                if data is not None:
                    adopted, journal = n, data
                    break
        for name in stale:
            if name != adopted:
                try:
                    clear(self.a.root_fd, name)
                except OSError:
                    pass
        name = adopted or prefix + bundle_id
        self.a.touched.add("")                    # the root gains (or loses) a name: its mtime is restored
        try:
            self.a.access.open_up_fd(self.a.root_fd, "")
            if adopted is None:
                os.mkdir(name, USER_RWX, dir_fd=self.a.root_fd)
            self._stage = Dir(os.open(name, DIR_FLAGS, dir_fd=self.a.root_fd), name)
        except OSError as exc:
            raise_os_error(os.path.join(self.a.root, name), exc)
        return journal

    def checkpoint(self, journal: bytes) -> None:
        """Record ``journal`` (the caller's account of what the staging
        directory holds) durably and atomically in the staging directory;
        ``begin_staging(resume=True)`` of a later run returns it."""
        write_journal(self._stage.fd, journal)

    def reopen(self, tmp: str) -> int:
        """A descriptor (read-write) of a file a checkpointed run staged.
        OSError if it is gone, is not a regular file or has other links."""
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=self._stage.fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise OSError(0, f"{tmp}: not a regular file of its own")
        return fd

    def write(self, name: str, data: bytes) -> None:
        """A side file of the staging directory (e.g. a signature a resumed
        transfer needs again), written and fsynced (its name is made durable
        by the next checkpoint's fsync of the directory)."""
        write_side(self._stage.fd, name, data)

    def read(self, name: str, limit: int = 64 << 20) -> bytes | None:
        """A side file of the staging directory written by ``stage_write``
        (None: missing, not a regular file, or over ``limit`` bytes)."""
        return read_regular(self._stage.fd, name, limit)

    def keep(self) -> None:
        """Leave the staging directory as it is (a checkpoint in it, for the
        next run to resume from) and let go of it."""
        if self._stage is not None:
            self._stage.release()
            self._stage = None

    @property
    def fd(self) -> int:
        return self._stage.fd

    def stage(self, path: str, spec: tuple, expected: bytes | None, action: str) -> Staged:
        """Write content ``spec`` (self-contained: a delta's spec names its
        basis) for ``path`` into the staging directory now, in this process,
        checked against ``expected``. OSError (content.ContentError for a
        BLAKE3 that differs) if it cannot be; nothing is left behind then."""
        from ..content import write_job
        tmp = self.a.temp_name()
        _, literal, matched, digest, mode, mtime_ns, uid, gid, seconds = write_job(
            self._stage.fd, "", tmp, spec, expected, self.a.options)
        entry = Entry(path.rpartition("/")[2], mode, literal + matched, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
        staged = Staged(tmp, FileChange(path, action, literal + matched, literal, matched, seconds, digest, entry))
        self._staged.append(staged)
        return staged

    def open(self) -> tuple[int, str]:
        """A new empty temp file in the staging directory for content that
        arrives in pieces (the network): (descriptor, name). Finish it with
        ``stage_finish``, or ``stage_drop`` it."""
        tmp = self.a.temp_name()
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                       dir_fd=self._stage.fd), tmp

    def finish(self, path: str, fd: int, tmp: str, expected: bytes | None, attrs: tuple, action: str,
                     literal: int, matched: int, seconds: float, digest: str | None = None) -> Staged:
        """The content written into ``tmp`` (by ``stage_open``) is complete:
        check its BLAKE3 (``digest``, hex, if the writer hashed what it wrote;
        else read back) against ``expected``, give it ``attrs`` (mode,
        mtime_ns, uid, gid) and keep it to be placed. ContentError (the temp
        file removed) if the BLAKE3 differs. Closes ``fd``."""
        from ..content import finish_temp
        mode, mtime_ns, uid, gid = attrs
        try:
            digest = finish_temp(fd, digest, expected, mode, mtime_ns, uid, gid, self.a.options)
        except BaseException:
            self.drop(fd, tmp)
            raise
        os.close(fd)
        size = os.stat(tmp, dir_fd=self._stage.fd).st_size
        entry = Entry(path.rpartition("/")[2], mode, size, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
        staged = Staged(tmp, FileChange(path, action, size, literal, matched, seconds, digest, entry))
        self._staged.append(staged)
        return staged

    def data(self, path: str, data, digest: str, attrs: tuple, action: str, literal: int,
                   matched: int, parent: Dir) -> Staged:
        """Content held in memory (a small file of a network transfer) as a
        temp file beside the file it replaces, in ``parent`` (as local sync
        writes its copies: ext4 allocates inodes near their directory, and
        thousands of files created in one staging directory right after
        others were deleted cost 240 µs each instead of 28). One write, its
        ``attrs`` (mode, mtime_ns, uid, gid) set, no fsync
        (``make_staged_durable`` makes a batch durable with one syncfs).
        ``digest``: its BLAKE3 (hex), already checked by the caller. OSError
        (nothing left behind). A run that stops first removes it (abort)."""
        from ..content import finish_temp
        from ..fs import pwrite_all
        mode, mtime_ns, uid, gid = attrs
        tmp = self.a.temp_name()
        self.a.access.open_up(parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=parent.fd)
        try:
            if len(data):
                pwrite_all(fd, data, 0)
            finish_temp(fd, digest, None, mode, mtime_ns, uid, gid, self.a.options)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=parent.fd)
            except OSError:
                pass
            raise
        os.close(fd)
        size = len(data)
        entry = Entry(path.rpartition("/")[2], mode, size, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
        staged = Staged(tmp, FileChange(path, action, size, literal, matched, 0.0, digest, entry), parent.acquire())
        self._staged.append(staged)
        self._beside[id(staged)] = staged
        return staged

    def drop_beside(self) -> None:
        """Remove the temp files staged beside their files and not placed."""
        beside, self._beside = self._beside, {}
        for st in beside.values():
            try:
                os.unlink(st.tmp, dir_fd=st.parent.fd)
            except OSError:
                pass
            st.parent.release()

    def drop(self, fd: int, tmp: str) -> None:
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            os.unlink(tmp, dir_fd=self._stage.fd)
        except OSError:
            pass

    def make_durable(self) -> None:
        """Make everything staged since the last call durable: one syncfs,
        or (the applier's ``own_flush``, or no syncfs) an fsync of each file
        with their writeback started together (``tree.fsync_files``)."""
        staged = self.take_staged()
        if not staged or (not self.a.own_flush and syncfs(self._stage.fd)):
            return
        fds = self.open_staged(staged)
        try:
            fsync_files(fds)
        finally:
            for fd in fds:
                os.close(fd)

    def take_staged(self) -> list[Staged]:
        """What was staged since the last call (or ``make_durable``): the
        caller makes it durable."""
        staged, self._staged = self._staged, []
        return staged

    def untake(self, staged: list[Staged]) -> None:
        """Give back what ``take_staged`` took (the caller could not make it durable)."""
        self._staged[:0] = staged

    def open_staged(self, staged: list[Staged]) -> list[int]:
        """A read-only descriptor of each of these staged files, to fsync
        them (the caller closes them). OSError (none left open)."""
        fds: list[int] = []
        try:
            for s in staged:
                fds.append(os.open(s.tmp, os.O_RDONLY | os.O_CLOEXEC,
                                   dir_fd=s.parent.fd if s.parent else self._stage.fd))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def place(self, staged: Staged, parent: Dir, e: Entry, prev: Entry | None, path: str, code: str) -> None:
        """Rename a staged file over ``path`` (whatever is there: a
        directory is removed first). Raises OSError."""
        if prev is not None and prev.kind == "d":
            remove_tree(parent.fd, e.name, open_up=True)
        self.a.access.open_up(parent)
        if staged.parent is not None:           # (beside it: the same directory)
            os.rename(staged.tmp, e.name, src_dir_fd=staged.parent.fd, dst_dir_fd=parent.fd)
        else:
            os.rename(staged.tmp, e.name, src_dir_fd=self._stage.fd, dst_dir_fd=parent.fd)
        self.a.mark_dirty(parent)
        if staged.parent is not None:
            del self._beside[id(staged)]
            staged.parent.release()
            staged.parent = None
        self.a.count_transfer(e, prev)
        self.a.stats.bytes_literal += staged.result.literal
        self.a.stats.bytes_matched += staged.result.matched
        self.a.stats.bytes_written += staged.result.size
        self.a.report.item(f"{code} {path}")
        self.a.report.file(staged.result)

    def end(self) -> None:
        """Remove the staging directory (and whatever is left in it)."""
        if self._stage is None:
            return
        name = self._stage.rel
        self._stage.release()
        self._stage = None
        self.a.touched.add("")
        try:
            clear(self.a.root_fd, name)
        except OSError:
            pass


def _read_journal(root_fd: int, name: str) -> bytes | None:
    try:
        d = os.open(name, DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None
    try:
        return read_regular(d, JOURNAL, 64 << 20)
    finally:
        os.close(d)


def _stat_journal(root_fd: int):
    """Sort key: when a staging directory's checkpoint was written (-1: none)."""
    def key(name: str) -> int:
        try:
            d = os.open(name, DIR_FLAGS, dir_fd=root_fd)
        except OSError:
            return -1
        try:
            return os.stat(JOURNAL, dir_fd=d, follow_symlinks=False).st_mtime_ns
        except OSError:
            return -1
        finally:
            os.close(d)
    return key


def write_side(dir_fd: int, name: str, data: bytes) -> None:
    """``name`` in the directory ``dir_fd``: ``data`` written and fsynced
    (its name made durable by the directory's next fsync). OSError."""
    from ..fs import write_all
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_journal(dir_fd: int, journal: bytes) -> None:
    """A staging directory's checkpoint (``dir_fd``: the directory),
    replaced durably and atomically. OSError."""
    tmp = JOURNAL + ".tmp"
    write_side(dir_fd, tmp, journal)
    os.rename(tmp, JOURNAL, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
