"""Apply: the only code that changes a destination tree (local sync, unpack,
and the network receiver all apply through it).

What it guarantees, whoever calls it:

- Every change is made relative to a directory descriptor reached from the
  destination root one component at a time with O_NOFOLLOW (``scan.open_dir_at``),
  so a symlink planted in the destination, before or during a run, is never
  followed out of it.
- A file's new content is written to a temp file (beside its final name, or
  in a staging directory inside the root), given its owner (as root), mode and
  mtime, checked against its BLAKE3 where one is known (``content.write_job``),
  made durable, and only then renamed over the old one: a run killed at any
  moment leaves each path old or new. Durability is batched the way the field
  notes measured it: a batch of temp files, one ``syncfs``, the renames, one
  fsync per directory touched. Links and specials are made under a temp name
  and renamed the same way.
- Two ways to schedule it. The pipeline (``transfer`` … ``commit``): copies
  run in forked workers (or inline), batch N is flushed to disk on a thread
  while batch N+1 is written, and batch N-1 is renamed — local sync and the
  network receiver. Stage-all-then-place (``stage`` … ``make_staged_durable``
  … ``place``): every file is written and checked in the staging directory
  before anything in the tree changes — unpack, which must refuse a bad
  bundle with nothing applied.
- Deletions run when the caller says (after every transfer succeeded: the
  plan's rule) and remove trees without following symlinks. Inside a tree
  being removed, entries the excludes protect stay, with the directories
  that hold them (rsync: "cannot delete non-empty directory"). A name that
  this destination takes for one the source spells otherwise (a case- or
  normalization-insensitive file system) is not deleted: it is the file just
  placed. Directory attributes are set last, deepest first.
- Without CAP_DAC_OVERRIDE, a directory this user owns that lacks u+rwx (the
  copy of a read-only source directory) gets them while something in it must
  change, and its mode back at the end, or when the run stops early.
- Reports (``Report``: -i lines, counters, the manifest, the history) say only
  what was done.
"""
from __future__ import annotations

import os
import stat
import threading
import time
import unicodedata
from collections import deque
from typing import TYPE_CHECKING, Iterable

from .content import Options, write_jobs
from .fs import TEMP_PREFIX
from .report import FileChange, Report
from .scan import DIR_FLAGS, Entry, Excludes, join, open_dir_at, open_rel_dir

if TYPE_CHECKING:                 # concurrent.futures costs 4 ms to import; a run with nothing to copy needs none
    pass

_BATCH_FILES = 512               # temp files made durable with one syncfs
_BATCH_BYTES = 512 << 20
_CHUNK_FILES = 64               # small files written by one worker call
_CHUNK_BYTES = 16 << 20
_MAX_OPEN_DIRS = 128            # directory descriptors held by pending work before committing
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


class _Job:
    """One file to write: where to, from what, and how it went."""

    __slots__ = ("parent", "name", "rel", "spec", "expected", "src", "old", "code", "tmp", "result", "error",
                 "vanished")

    def __init__(self, parent: Dir, name: str, rel: str, spec: tuple, expected: bytes | None, src: Entry,
                 old: Entry | None, code: str, tmp: str):
        self.parent, self.name, self.rel, self.spec, self.expected = parent, name, rel, spec, expected
        self.src, self.old, self.code, self.tmp = src, old, code, tmp
        self.result: FileChange | None = None
        self.error = ""
        self.vanished = False


class _Batch:
    """Copies made durable together: chunks submitted to the workers, then the jobs."""

    __slots__ = ("chunks", "jobs", "thread")

    def __init__(self, chunks: list):
        self.chunks = chunks
        self.jobs: list[_Job] = []
        self.thread: threading.Thread | None = None


class _Done:
    """A finished future, for the inline executor."""

    __slots__ = ("_value", "_error")

    def __init__(self, fn, *args):
        self._value, self._error = None, None
        try:
            self._value = fn(*args)
        except BaseException as exc:   # re-raised by result(), as a Future would
            self._error = exc

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self):
        return self._error

    def add_done_callback(self, fn) -> None:
        fn(self)


class Staged:
    """A file written and checked, waiting to be placed: in the staging
    directory, or (``parent``: a Dir held for it) beside the file it replaces."""

    __slots__ = ("tmp", "result", "parent")

    def __init__(self, tmp: str, result: FileChange, parent: "Dir | None" = None):
        self.tmp, self.result, self.parent = tmp, result, parent


class Applier:
    """One run's changes to the destination tree ``root``.

    ``workers``: how many forked processes write file content (0: inline, in
    this process; content specs then need not be picklable). ``owners``: set
    owners (default: as root). ``replace_trees``: an entry of another type
    may replace a non-empty directory (sync: with --delete; unpack: always).
    ``excludes``: the run's, which protect what they match inside a
    directory tree being removed, as the planner protects a directory's own
    entries. Use ``open_root`` first; ``close`` (or ``abort`` on failure) last."""

    def __init__(self, root: str, report: Report, options: Options | None = None, *, dry_run: bool = False,
                 owners: bool | None = None, workers: int = 0, replace_trees: bool = False,
                 excludes: Excludes | None = None):
        self.root = root
        self.excludes = excludes if excludes else None
        self.report = report
        self.stats = report.stats
        self.options = options or Options()
        self.dry_run = dry_run
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.options.as_root = self.owners
        self.workers = workers
        self.replace_trees = replace_trees
        # Without CAP_DAC_OVERRIDE, a destination directory without u+rwx
        # (a 0555 copy of a read-only source directory) gets it for the run.
        self.dac = overrides_permissions()
        self.opened: dict[str, int] = {}            # rel -> permission bits before this run opened it up
        self.root_fd = -1
        self.created_root = False
        self._run_tag = f"{TEMP_PREFIX}{os.getpid():x}-{os.urandom(3).hex()}-"
        self._counter = 0
        self._chunk: list[_Job] = []
        self._chunk_bytes = 0
        self._batch: list = []
        self._pipeline: deque[_Batch] = deque()
        self._batch_files = 0
        self._batch_bytes = 0
        self._dirty: dict[int, Dir] = {}           # directories with renames to fsync
        self.touched: set[str] = set()             # directories that gained or lost a name
        self._pool = None
        self._stage: Dir | None = None              # stage-all mode: the staging directory
        self._staged: list[Staged] = []
        self._beside: dict[int, Staged] = {}     # staged beside their files (stage_data), not yet placed

    # ------------------------------------------------------------------ root
    def open_root(self, create: bool = True) -> bool:
        """Open the root (creating it, with its parents, if ``create``);
        returns whether it exists now. FileError if it cannot be, or is not a
        directory. In a dry run a missing root is not created."""
        from .errors import FileError
        if self.dry_run and not os.path.exists(self.root):
            return False
        try:
            if not os.path.isdir(self.root):
                if os.path.lexists(self.root):
                    raise FileError(self.root, "destination exists and is not a directory")
                if not create:
                    return False
                os.makedirs(self.root, exist_ok=True)
                self.created_root = True
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FileError.from_os(self.root, exc) from None
        return True

    def adopt_root(self, fd: int) -> None:
        """Use ``fd``, a directory already opened by the caller, as the root
        (the server opens a module path beneath the module without following
        symlinks: the root is never reached by name again). The Applier owns
        ``fd`` from now on; -1: a dry run into a root that does not exist."""
        self.root_fd = fd

    def root_dir(self) -> Dir | None:
        """A handle on the root for the walk (None in a dry run into nothing)."""
        if self.root_fd < 0:
            return None
        d = Dir(os.dup(self.root_fd), "", stat.S_IMODE(os.fstat(self.root_fd).st_mode))
        if not self.dac and d.perms & 0o500 != 0o500:
            self.open_up(d)                         # it must be listed
        return d

    def open_dir(self, parent: Dir, name: str, rel: str, perms: int, exists: bool) -> Dir:
        """Open the existing directory ``name`` in ``parent`` for the walk
        (giving it u+rwx first if this user cannot list it). OSError if it
        cannot be opened."""
        if exists and not self.dac and perms & 0o500 != 0o500:
            self.open_up_at(parent, name, rel)
        return Dir(open_dir_at(parent.fd, name), rel, (perms | USER_RWX) if rel in self.opened else perms)

    def too_many_open(self) -> bool:
        return Dir.open_count > _MAX_OPEN_DIRS and not self.dry_run

    # ------------------------------------------- permissions as an ordinary user
    def open_up(self, d: Dir | None) -> None:
        """Something in ``d`` is about to change: without CAP_DAC_OVERRIDE, give
        it u+rwx first if it lacks them (rsync does the same); its mode is set
        back when the run's directory attributes are set, or by close_up."""
        if d is None or self.dac or d.perms & USER_RWX == USER_RWX:
            return
        try:
            os.fchmod(d.fd, d.perms | USER_RWX)
        except OSError:
            return                  # not ours: the change itself reports EACCES
        self.opened.setdefault(d.rel, d.perms)
        d.perms |= USER_RWX
        self.touched.add(d.rel)

    def open_up_at(self, parent: Dir, name: str, rel: str) -> None:
        """Like open_up, for a directory not opened yet (it lacks u+r or u+x)."""
        try:
            self.opened.setdefault(rel, open_up_at(parent.fd, name))
            self.touched.add(rel)
        except OSError:
            pass

    def open_up_fd(self, fd: int, rel: str) -> None:
        """Like open_up, for a directory descriptor opened from the root."""
        if self.dac:
            return
        perms = stat.S_IMODE(os.fstat(fd).st_mode)
        if perms & USER_RWX != USER_RWX:
            try:
                os.fchmod(fd, perms | USER_RWX)
            except OSError:
                return
            self.opened.setdefault(rel, perms)
            self.touched.add(rel)

    def close_up(self) -> None:
        """Give the directories this run opened up their modes back."""
        opened, self.opened = self.opened, {}
        if self.root_fd < 0:
            return
        for rel, perms in sorted(opened.items(), reverse=True):     # children first
            try:
                fd = open_rel_dir(self.root_fd, rel)
            except OSError:
                continue
            try:
                os.fchmod(fd, perms)
            except OSError:
                pass
            finally:
                os.close(fd)

    # ---------------------------------------------------------- directories
    def remove_temps(self, d: Dir, names: list[str]) -> None:
        """Temp files a killed run left in ``d``."""
        if self.dry_run or not names:
            return
        self.open_up(d)
        for t in names:
            try:
                os.unlink(t, dir_fd=d.fd)
                self.touched.add(d.rel)
            except OSError:
                pass

    def mkdir(self, parent: Dir | None, e: Entry, path: str) -> bool:
        """Create directory ``e`` (mode 0700 until finish_dirs gives it its own)."""
        if not (self.dry_run or parent is None):
            try:
                self.open_up(parent)
                os.mkdir(e.name, USER_RWX, dir_fd=parent.fd)
                self.mark_dirty(parent)
            except OSError as exc:
                self.report.error(path + "/", exc.strerror or str(exc))
                return False
        self.stats.created += 1
        self.report.item(f"cd+++++++++ {path}/")
        return True

    def directory(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str) -> tuple[bool, Entry | None]:
        """Directory ``e`` at ``path``: what is there in its way (``prev``,
        not a directory) removed, then made if missing. (whether it is there
        now, what was there before that stays: ``prev`` or None)."""
        if prev is not None and prev.kind != "d":
            if not self.make_way(parent, e.name, prev, path):
                return False, prev
            prev = None
        if prev is None and not self.mkdir(parent, e, path):
            return False, None
        return True, prev

    def make_way(self, parent: Dir | None, name: str, prev: Entry, path: str) -> bool:
        """Remove the destination entry ``prev`` that has the wrong type (a
        non-empty directory only with ``replace_trees``)."""
        if self.dry_run or parent is None:
            return True
        self.touched.add(parent.rel)
        self.open_up(parent)
        try:
            if prev.kind == "d":
                try:
                    os.rmdir(name, dir_fd=parent.fd)
                except OSError:
                    if not self.replace_trees:
                        self.report.error(path, "cannot replace a non-empty directory (use --delete)")
                        return False
                    if self.excludes is not None:
                        removed, steps = prune_tree(parent.fd, name, path, self.excludes, open_up=not self.dac)
                        if steps[-1][1] is not None:        # something in it is protected: it stays
                            self.stats.deleted += removed
                            self._say_deleted(steps)
                            self.report.error(path, "cannot replace a directory that holds excluded entries")
                            return False
                    else:
                        remove_tree(parent.fd, name, open_up=not self.dac)
            else:
                os.unlink(name, dir_fd=parent.fd)
            self.stats.deleted += 1
            self.report.item(f"*deleting   {path}/" if prev.kind == "d" else f"*deleting   {path}")
            return True
        except OSError as exc:
            self.report.error(path, exc.strerror or str(exc))
            return False

    def finish_dirs(self, dirs: list[tuple[str, Entry, Entry | None]]) -> None:
        """Permissions, owners and mtimes of directories (``dirs``: (path,
        source entry, destination entry before the run) in pre-order),
        deepest first."""
        report, owners = self.report, self.owners
        if self.dry_run:
            for path, e, prev in dirs:
                if prev is not None and (e.perms != prev.perms or e.mtime_ns != prev.mtime_ns):
                    self.stats.updated += 1
                    report.item(f"{itemize('.', e, prev, owners=owners)} {path + '/' if path else './'}")
            return
        for path, e, prev in reversed(dirs):
            if prev is not None and path not in self.touched and prev.perms == e.perms \
                    and prev.mtime_ns == e.mtime_ns and (not owners or (prev.uid, prev.gid) == (e.uid, e.gid)):
                continue            # as listed, and nothing in it changed since
            try:
                fd = open_rel_dir(self.root_fd, path)
            except OSError as exc:
                report.error(path + "/", f"cannot set attributes: {exc.strerror or exc}")
                continue
            try:
                now = Entry.from_stat("", os.fstat(fd))
                if owners and (now.uid != e.uid or now.gid != e.gid):
                    os.fchown(fd, e.uid, e.gid)
                if now.perms != e.perms:
                    os.fchmod(fd, e.perms)
                self.opened.pop(path, None)            # opened up for the run: closed again
                if now.mtime_ns != e.mtime_ns:
                    os.utime(fd, ns=(time.time_ns(), e.mtime_ns))
                if prev is not None and (prev.perms != e.perms or prev.mtime_ns != e.mtime_ns
                                         or (owners and (prev.uid, prev.gid) != (e.uid, e.gid))):
                    self.stats.updated += 1
                    report.item(f"{itemize('.', e, prev, owners=owners)} {path + '/' if path else './'}")
            except OSError as exc:
                report.error(path + "/", exc.strerror or str(exc))
            finally:
                os.close(fd)
        self.close_up()                                # any left (their attributes failed)

    # ----------------------------------------------- files: the pipeline
    def transfer(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, code: str, spec: tuple,
                 expected: bytes | None = None) -> None:
        """Write ``e``'s new content (``spec``, see content.py) to a temp
        file beside its final name and, with its batch, rename it into place."""
        if self.dry_run or parent is None:
            self._count_transfer(e, prev)
            self.report.item(f"{code} {path}")
            return
        self._counter += 1
        self.touched.add(parent.rel)
        self.open_up(parent)                    # the worker creates its temp file there
        job = _Job(parent.acquire(), e.name, path, spec, expected, e, prev, code, f"{self._run_tag}{self._counter}")
        self._chunk.append(job)
        self._chunk_bytes += e.size
        if self.report.progress is not None:
            self.report.progress.queued(e.size)
        if len(self._chunk) >= _CHUNK_FILES or self._chunk_bytes >= _CHUNK_BYTES:
            self.flush()

    def _count_transfer(self, e: Entry, prev: Entry | None) -> None:
        self.stats.files_transferred += 1
        self.stats.bytes_transferred += e.size
        if prev is None:
            self.stats.created += 1
        else:
            self.stats.updated += 1

    def flush(self) -> None:
        """Hand the jobs gathered so far to a worker."""
        if not self._chunk:
            return
        jobs, nbytes = self._chunk, self._chunk_bytes
        items = [(j.parent.rel, j.name, j.tmp, j.spec, j.expected) for j in jobs]
        fut = self._submit(write_jobs, self.root_fd, self.options, items, open_rel_dir)
        if self.report.progress is not None:
            progress = self.report.progress
            fut.add_done_callback(lambda f: [progress.done(r[1] + r[2]) for r in (
                f.result() if not f.exception() else []) if r[0] == "ok"])
        self._batch.append((fut, jobs))
        self._chunk, self._chunk_bytes = [], 0     # only now: an interrupt finds every job somewhere
        self._batch_files += len(jobs)
        self._batch_bytes += nbytes
        if self._batch_files >= _BATCH_FILES or self._batch_bytes >= _BATCH_BYTES:
            self.commit()

    def _submit(self, fn, *args):
        if not self.workers:
            return _Done(fn, *args)
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        from .parallel import block_stop_signals, restore_signals
        # The first submit forks the workers: hold the stop signals off until they ignore them.
        blocked = block_stop_signals()
        try:
            return self._start_workers(blocked).submit(fn, *args)
        finally:
            restore_signals(blocked)

    def _start_workers(self, mask):
        """Copy workers: forked processes, so writing many small files is not
        serialised by the GIL (threads spent most of the run trading it).
        Forked on first use: a run with nothing to copy starts none. They are
        forked by this thread (ProcessPoolExecutor forks in ``submit`` with
        the fork context), which lives as long as the run: the parent-death
        signal they ask for is tied to it."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .content import worker_init
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=worker_init, initargs=(os.getpid(), mask))
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

    def commit(self, final: bool = False) -> None:
        """Move the pending copies down a three-stage pipeline, so the disk
        flush of one batch overlaps copying the next and the traversal never
        waits for it: [copying N] -> [syncfs of N-1 on a thread] -> [renames of
        N-2]. ``final``: drain everything."""
        if final:
            self.flush()
        if self._batch:
            self._pipeline.append(_Batch(self._batch))
            self._batch = []
        self._batch_files = self._batch_bytes = 0
        keep = 0 if final else 2
        while len(self._pipeline) > keep:
            batch = self._pipeline[0]        # stays listed until done: see discard_pending
            self._start_sync(batch)
            self._finish_batch(batch)
            self._pipeline.popleft()
        if final:
            self.sync_dirs()         # directories changed by mkdir, links and specials only
        if not final and len(self._pipeline) == 2:
            self._start_sync(self._pipeline[0])

    def _start_sync(self, batch: _Batch) -> None:
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
        if not ready or syncfs(self.root_fd):
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

    def _finish_batch(self, batch: _Batch) -> None:
        """Rename the batch's durable temp files into place; fsync the directories."""
        batch.thread.join()
        stats, report = self.stats, self.report
        for j in batch.jobs:
            try:
                if j.result is not None:
                    if j.old is not None and j.old.kind == "d" and not self.make_way(j.parent, j.name, j.old, j.rel):
                        os.unlink(j.tmp, dir_fd=j.parent.fd)
                        continue
                    os.rename(j.tmp, j.name, src_dir_fd=j.parent.fd, dst_dir_fd=j.parent.fd)
                    self._count_transfer(j.src, j.old)
                    stats.bytes_literal += j.result.literal
                    stats.bytes_matched += j.result.matched
                    stats.bytes_written += j.result.size
                    report.item(f"{j.code} {j.rel}")
                    report.file(j.result)
                    report.entry(j.rel, j.result.entry, j.result.blake3)
                    self.mark_dirty(j.parent)
                elif j.vanished:
                    report.vanished(j.rel)
                    self._keep_old(j.rel, j.old)
                else:
                    report.error(j.rel, j.error or "transfer failed")
                    self._keep_old(j.rel, j.old)
            except OSError as exc:
                report.error(j.rel, exc.strerror or str(exc))
                try:
                    os.unlink(j.tmp, dir_fd=j.parent.fd)
                except OSError:
                    pass
            finally:
                j.parent.release()
        self.sync_dirs()

    def _keep_old(self, path: str, old: Entry | None) -> None:
        """A change failed: the destination keeps ``old`` (for the manifest)."""
        if old is not None and old.kind != "d":
            self.report.entry(path, old, None)

    def mark_dirty(self, d: Dir) -> None:
        """``d`` gained or lost a name: fsync it at the next commit."""
        self.touched.add(d.rel)
        if id(d) not in self._dirty:
            self._dirty[id(d)] = d.acquire()

    def sync_dirs(self) -> None:
        """Make the names the dirty directories gained or lost durable: an
        fsync of each, or one syncfs of the file system when there are more
        than SYNC_DIRS_EACH (a release tree's update touches hundreds of
        directories per batch; one journal commit serves them all, where an
        fsync each forced a commit each and stalled the file creations
        queued behind it)."""
        dirty, self._dirty = self._dirty, {}
        if len(dirty) > SYNC_DIRS_EACH and self.root_fd >= 0 and syncfs(self.root_fd):
            for d in dirty.values():
                d.release()
            return
        for d in dirty.values():
            try:
                os.fsync(d.fd)
            except OSError as exc:
                self.report.error(d.rel + "/", exc.strerror or str(exc))
            finally:
                d.release()

    def discard_pending(self) -> None:
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

    def shutdown_workers(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---------------------------------- files: stage all, then place
    def begin_staging(self, bundle_id: str, prefix: str | None = None, resume: bool = False) -> bytes | None:
        """Stage-all mode: a staging directory inside the root, named
        ``prefix + bundle_id``. Stale ones of killed runs (same prefix) are
        removed first — except, with ``resume``, the newest one that holds a
        checkpoint (``stage_checkpoint``): that one is taken over, and its
        checkpoint returned (None: a fresh directory)."""
        from .fs import raise_os_error
        prefix = prefix or STAGE_PREFIX
        stale = [n for n in os.listdir(self.root_fd) if n.startswith(prefix)]
        adopted, journal = None, None
        if resume:
            for n in sorted(stale, key=_stat_journal(self.root_fd), reverse=True):
                data = _read_journal(self.root_fd, n)
                if data is not None:
                    adopted, journal = n, data
                    break
        for name in stale:
            if name != adopted:
                try:
                    clear(self.root_fd, name)
                except OSError:
                    pass
        name = adopted or prefix + bundle_id
        self.touched.add("")                    # the root gains (or loses) a name: its mtime is restored
        try:
            self.open_up_fd(self.root_fd, "")
            if adopted is None:
                os.mkdir(name, USER_RWX, dir_fd=self.root_fd)
            self._stage = Dir(os.open(name, DIR_FLAGS, dir_fd=self.root_fd), name)
        except OSError as exc:
            raise_os_error(os.path.join(self.root, name), exc)
        return journal

    def stage_checkpoint(self, journal: bytes) -> None:
        """Record ``journal`` (the caller's account of what the staging
        directory holds) durably and atomically in the staging directory;
        ``begin_staging(resume=True)`` of a later run returns it."""
        tmp = JOURNAL + ".tmp"
        self.stage_write(tmp, journal)
        os.rename(tmp, JOURNAL, src_dir_fd=self._stage.fd, dst_dir_fd=self._stage.fd)
        os.fsync(self._stage.fd)

    def stage_reopen(self, tmp: str) -> int:
        """A descriptor (read-write) of a file a checkpointed run staged.
        OSError if it is gone, is not a regular file or has other links."""
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=self._stage.fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise OSError(0, f"{tmp}: not a regular file of its own")
        return fd

    def stage_write(self, name: str, data: bytes) -> None:
        """A side file of the staging directory (e.g. a signature a resumed
        transfer needs again), written and fsynced (its name is made durable
        by the next checkpoint's fsync of the directory)."""
        from .fs import write_all
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=self._stage.fd)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def stage_read(self, name: str, limit: int = 64 << 20) -> bytes | None:
        """A side file of the staging directory written by ``stage_write``
        (None: missing, not a regular file, or over ``limit`` bytes)."""
        return read_regular(self._stage.fd, name, limit)

    def keep_staging(self) -> None:
        """Leave the staging directory as it is (a checkpoint in it, for the
        next run to resume from) and let go of it."""
        if self._stage is not None:
            self._stage.release()
            self._stage = None

    @property
    def staging_fd(self) -> int:
        return self._stage.fd

    def stage(self, path: str, spec: tuple, expected: bytes | None, action: str) -> Staged:
        """Write content ``spec`` (self-contained: a delta's spec names its
        basis) for ``path`` into the staging directory now, in this process,
        checked against ``expected``. OSError (content.ContentError for a
        BLAKE3 that differs) if it cannot be; nothing is left behind then."""
        from .content import write_job
        self._counter += 1
        tmp = f"{self._run_tag}{self._counter}"
        _, literal, matched, digest, mode, mtime_ns, uid, gid, seconds = write_job(
            self._stage.fd, "", tmp, spec, expected, self.options)
        entry = Entry(path.rpartition("/")[2], mode, literal + matched, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
        staged = Staged(tmp, FileChange(path, action, literal + matched, literal, matched, seconds, digest, entry))
        self._staged.append(staged)
        return staged

    def stage_open(self) -> tuple[int, str]:
        """A new empty temp file in the staging directory for content that
        arrives in pieces (the network): (descriptor, name). Finish it with
        ``stage_finish``, or ``stage_drop`` it."""
        self._counter += 1
        tmp = f"{self._run_tag}{self._counter}"
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                       dir_fd=self._stage.fd), tmp

    def stage_finish(self, path: str, fd: int, tmp: str, expected: bytes | None, attrs: tuple, action: str,
                     literal: int, matched: int, seconds: float, digest: str | None = None) -> Staged:
        """The content written into ``tmp`` (by ``stage_open``) is complete:
        check its BLAKE3 (``digest``, hex, if the writer hashed what it wrote;
        else read back) against ``expected``, give it ``attrs`` (mode,
        mtime_ns, uid, gid) and keep it to be placed. ContentError (the temp
        file removed) if the BLAKE3 differs. Closes ``fd``."""
        from .content import finish_temp
        mode, mtime_ns, uid, gid = attrs
        try:
            digest = finish_temp(fd, digest, expected, mode, mtime_ns, uid, gid, self.options)
        except BaseException:
            self.stage_drop(fd, tmp)
            raise
        os.close(fd)
        size = os.stat(tmp, dir_fd=self._stage.fd).st_size
        entry = Entry(path.rpartition("/")[2], mode, size, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
        staged = Staged(tmp, FileChange(path, action, size, literal, matched, seconds, digest, entry))
        self._staged.append(staged)
        return staged

    def stage_data(self, path: str, data, digest: str, attrs: tuple, action: str, literal: int,
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
        from .content import finish_temp
        from .fs import pwrite_all
        mode, mtime_ns, uid, gid = attrs
        self._counter += 1
        tmp = f"{self._run_tag}{self._counter}"
        self.open_up(parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=parent.fd)
        try:
            if len(data):
                pwrite_all(fd, data, 0)
            finish_temp(fd, digest, None, mode, mtime_ns, uid, gid, self.options)
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

    def _drop_beside(self) -> None:
        """Remove the temp files staged beside their files and not placed."""
        beside, self._beside = self._beside, {}
        for st in beside.values():
            try:
                os.unlink(st.tmp, dir_fd=st.parent.fd)
            except OSError:
                pass
            st.parent.release()

    def stage_drop(self, fd: int, tmp: str) -> None:
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            os.unlink(tmp, dir_fd=self._stage.fd)
        except OSError:
            pass

    def make_staged_durable(self) -> None:
        """One syncfs for everything staged since the last call (or an fsync
        per file)."""
        staged, self._staged = self._staged, []
        if not staged or syncfs(self._stage.fd):
            return
        for s in staged:
            fd = os.open(s.tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=s.parent.fd if s.parent else self._stage.fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def place(self, staged: Staged, parent: Dir, e: Entry, prev: Entry | None, path: str, code: str) -> None:
        """Rename a staged file over ``path`` (whatever is there: a
        directory is removed first). Raises OSError."""
        if prev is not None and prev.kind == "d":
            remove_tree(parent.fd, e.name, open_up=True)
        self.open_up(parent)
        if staged.parent is not None:           # (beside it: the same directory)
            os.rename(staged.tmp, e.name, src_dir_fd=staged.parent.fd, dst_dir_fd=parent.fd)
        else:
            os.rename(staged.tmp, e.name, src_dir_fd=self._stage.fd, dst_dir_fd=parent.fd)
        self.mark_dirty(parent)
        if staged.parent is not None:
            del self._beside[id(staged)]
            staged.parent.release()
            staged.parent = None
        self._count_transfer(e, prev)
        self.stats.bytes_literal += staged.result.literal
        self.stats.bytes_matched += staged.result.matched
        self.stats.bytes_written += staged.result.size
        self.report.item(f"{code} {path}")
        self.report.file(staged.result)

    def end_staging(self) -> None:
        """Remove the staging directory (and whatever is left in it)."""
        if self._stage is None:
            return
        name = self._stage.rel
        self._stage.release()
        self._stage = None
        self.touched.add("")
        try:
            clear(self.root_fd, name)
        except OSError:
            pass

    # ------------------------------------------------ links and special files
    def replace_with(self, parent: Dir, e: Entry, prev: Entry | None, path: str, create) -> bool:
        """Create the new entry under a temp name with ``create(tmp)``, set its
        owner, mode and times, then rename it over ``path``."""
        self._counter += 1
        tmp = f"{self._run_tag}{self._counter}"
        self.touched.add(parent.rel)
        self.open_up(parent)
        try:
            create(tmp)
            try:
                if self.owners:
                    os.chown(tmp, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if e.kind != "L":
                    os.chmod(tmp, e.perms, dir_fd=parent.fd)
                os.utime(tmp, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
                if prev is not None and prev.kind == "d" and not self.make_way(parent, e.name, prev, path):
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
            self.report.error(path, exc.strerror or str(exc))
            return False
        self.mark_dirty(parent)
        return True

    def symlink(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, target, code: str) -> None:
        """Make ``path`` the symlink ``e`` to ``target``."""
        shown = os.fsdecode(target) if isinstance(target, bytes) else target
        if self.dry_run or parent is None:
            self.report.changed(prev, f"{code} {path} -> {shown}")
            return
        if self.replace_with(parent, e, prev, path, lambda tmp: os.symlink(target, tmp, dir_fd=parent.fd)):
            self.report.changed(prev, f"{code} {path} -> {shown}")
            self.report.entry(path, e, None)
        else:
            self._keep_old(path, prev)

    def carry_out(self, parent: Dir | None, d: tuple) -> None:
        """A planner decision that needs no content and nothing of the
        caller's (plan.LINK, plan.FIX, plan.SPECIAL): the symlink made, the
        entry's times, mode and owner fixed in place, the special file made."""
        from .plan import FIX, LINK
        what, e, prev, path = d[0], d[1], d[2], d[3]
        if what == LINK:
            self.symlink(parent, e, prev, path, d[4], d[5])
        elif what == FIX:
            self.fix_in_place(parent, e, prev, path, d[4])
            self.report.entry(path, e, None)
        else:
            self.special(parent, e, prev, path, d[4])

    def special(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, code: str) -> None:
        """Make ``path`` the device, FIFO or socket ``e``."""
        if self.dry_run or parent is None:
            self.report.changed(prev, f"{code} {path}")
            return
        if self.replace_with(parent, e, prev, path,
                             lambda tmp: os.mknod(tmp, stat.S_IFMT(e.mode) | 0o600, e.rdev, dir_fd=parent.fd)):
            self.report.changed(prev, f"{code} {path}")
            self.report.entry(path, e, None)
        else:
            self._keep_old(path, prev)

    def fix_in_place(self, parent: Dir | None, e: Entry, prev: Entry, path: str, suffix: str = "") -> None:
        """A link or special file that is already right but for its mtime,
        permissions (not for links) or, as root, owner: set those in place."""
        owner = self.owners and (prev.uid, prev.gid) != (e.uid, e.gid)
        mode = e.kind != "L" and prev.perms != e.perms
        if not (owner or mode or prev.mtime_ns != e.mtime_ns):
            return
        if not (self.dry_run or parent is None):
            try:
                if owner:
                    os.chown(e.name, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if mode:
                    os.chmod(e.name, e.perms, dir_fd=parent.fd)
                os.utime(e.name, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
            except OSError as exc:
                self.report.error(path, exc.strerror or str(exc))
                return
        self.stats.updated += 1                 # reported only once done
        self.report.item(f"{itemize('.', e, prev, owners=self.owners)} {path}{suffix}")

    def attributes(self, parent: Dir | None, e: Entry, prev: Entry, path: str, mtime: bool = False) -> None:
        """A file whose content is right: fix its permissions (and owner as
        root; and its mtime if ``mtime``) in place."""
        fix_owner = self.owners and (prev.uid, prev.gid) != (e.uid, e.gid)
        fix_mtime = mtime and prev.mtime_ns != e.mtime_ns
        if prev.perms == e.perms and not fix_owner and not fix_mtime:
            return
        if not (self.dry_run or parent is None):
            try:
                # O_PATH: a file without read permission (mode 0200, 0000) has its mode changed too
                fd = os.open(e.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError(0, "changed type during the run")
                    if fix_owner:
                        os.chown(f"/proc/self/fd/{fd}", e.uid, e.gid)
                    os.chmod(f"/proc/self/fd/{fd}", e.perms)
                    if fix_mtime:
                        os.utime(f"/proc/self/fd/{fd}", ns=(time.time_ns(), e.mtime_ns))
                finally:
                    os.close(fd)
            except OSError as exc:
                self.report.error(path, exc.strerror or str(exc))
                return
        self.stats.updated += 1                 # reported only once done
        self.report.item(f"{itemize('.', e, prev, owners=self.owners)} {path}")

    # ------------------------------------------------------------- deletions
    def delete(self, deletions: list[tuple[str, Entry]], count_tree) -> None:
        """Remove each (directory, entry) of ``deletions`` (whole trees for
        directories, but what the excludes protect inside them: see
        prune_tree), children before parents as listed; reported once done.
        A candidate this destination takes for the same entry as a source
        name it aliases (``Deletions.aliases``) is kept. ``count_tree``
        counts a tree in a dry run without excludes."""
        aliases = deletions.aliases if isinstance(deletions, Deletions) else {}
        for rel, e in deletions:
            path = join(rel, e.name)
            if self.root_fd < 0:                        # a dry run into nothing
                self.stats.deleted += 1
                self._say_deleted([(path + "/" if e.kind == "d" else path, None)])
                continue
            try:
                fd = open_rel_dir(self.root_fd, rel)
            except OSError as exc:
                self._delete_failed(path, e, exc)
                continue
            try:
                other = aliases.get(path) and self._same_entry(fd, e.name, aliases[path])
                if other:
                    self.report.item(f"not deleting {path}: this destination takes it for "
                                     f"{join(rel, other)} (the names differ only in case or Unicode normalization)")
                    continue
                removed, steps = self._delete_one(fd, rel, e, path, count_tree)
            except OSError as exc:
                self._delete_failed(path, e, exc)
                continue
            finally:
                os.close(fd)
            self.stats.deleted += removed
            self._say_deleted(steps)                    # reported only once done

    def _delete_one(self, fd: int, rel: str, e: Entry, path: str, count_tree) -> tuple[int, list]:
        """Delete ``e`` from the directory ``fd`` (``rel``), or in a dry run
        count it: (entries removed, prune_tree's steps)."""
        if e.kind != "d":
            if not self.dry_run:
                self.touched.add(rel)
                self.open_up_fd(fd, rel)
                os.unlink(e.name, dir_fd=fd)
                os.fsync(fd)
            return 1, [(path, None)]
        if self.dry_run:
            if self.excludes is not None:
                return prune_tree(fd, e.name, path, self.excludes, dry_run=True)
            return 1 + count_tree(rel, e.name), [(path + "/", None)]
        self.touched.add(rel)
        self.open_up_fd(fd, rel)
        if self.excludes is not None:
            removed, steps = prune_tree(fd, e.name, path, self.excludes, open_up=not self.dac)
        else:
            removed, steps = 1 + remove_tree(fd, e.name, open_up=not self.dac), [(path + "/", None)]
        os.fsync(fd)
        return removed, steps

    def _delete_failed(self, path: str, e: Entry, exc: OSError) -> None:
        if self.dry_run:                                # what cannot be looked at is counted as itself
            self.stats.deleted += 1
            self._say_deleted([(path + "/" if e.kind == "d" else path, None)])
            return
        if isinstance(exc, FileNotFoundError) and exc.filename is None:
            return                                      # already gone (a re-run)
        self.report.error(path, exc.strerror or str(exc))
        if e.kind != "d":
            self.report.entry(path, e, None)            # still there

    def _say_deleted(self, steps: list[tuple[str, Entry | None]]) -> None:
        """Itemize prune_tree's steps: what went, and the directories that
        stay because of what they hold (rsync's words; they stay in the
        manifest)."""
        for path, kept in steps:
            if kept is None:
                self.report.item(f"*deleting   {path}")
            else:
                self.report.item(f"cannot delete non-empty directory: {path}")
                self.report.entry(path, kept, None)

    @staticmethod
    def _same_entry(fd: int, name: str, spellings: list[str]) -> str | None:
        """The name among ``spellings`` that the directory ``fd`` takes for
        the same entry as ``name`` (lstat, never following a link), or None.
        The same inode settles it for a directory or a file of one link. A
        FUSE file system (exFAT, vfat) gives each spelling an inode number
        of its own, and a file of several links has more than one name:
        there the listing decides -- one entry is listed once, under one of
        the two names."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        listing = None
        for other in spellings:
            try:
                ost = os.stat(other, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino) and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
                return other
            if listing is None:
                listing = set(os.listdir(fd))
            if name not in listing or other not in listing:
                return other
        return None

    def keep(self, deletions) -> None:
        """Deletion candidates that stay (the deletion was refused: errors,
        --max-delete, an empty source): each reported as an entry of the
        tree, a directory with everything below it, so that the run's
        manifest is the tree as it is (a ``verify`` after a refused deletion
        found its whole subtrees "extra"). Entries are read without
        following symlinks; resync's temp names are left out."""
        report = self.report
        for rel, e in deletions:
            path = join(rel, e.name)
            report.entry(path, e, None)
            if e.kind != "d" or self.root_fd < 0:
                continue
            try:
                fd = open_rel_dir(self.root_fd, path)
            except OSError:
                continue
            try:
                for top, dirs, files, dir_fd in os.fwalk(".", dir_fd=fd):
                    base = path if top == "." else join(path, top[2:])
                    dirs[:] = [d for d in dirs if not d.startswith(TEMP_PREFIX)]
                    for name in dirs + [f for f in files if not f.startswith(TEMP_PREFIX)]:
                        try:
                            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                        except OSError:
                            continue
                        report.entry(join(base, name), Entry.from_stat(name, st), None)
            finally:
                os.close(fd)

    def count_tree(self, rel: str, name: str) -> int:
        """What deleting the destination directory rel/name removes besides
        the directory itself (callers count it as one): every entry below
        it -- with excludes, those they do not protect, less one when what
        they protect keeps the directory itself (then -1 if nothing goes)."""
        if self.excludes is not None:
            try:
                fd = open_rel_dir(self.root_fd, rel)
            except OSError:
                return 0
            try:
                return prune_tree(fd, name, join(rel, name), self.excludes, dry_run=True)[0] - 1
            except OSError:
                return 0
            finally:
                os.close(fd)
        try:
            fd = open_rel_dir(self.root_fd, join(rel, name))
        except OSError:
            return 0
        try:
            total = 0
            for _, dirs, files, _ in os.fwalk(".", dir_fd=fd):
                total += len(dirs) + len(files)
            return total
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ end
    def abort(self) -> None:
        """The run failed or was interrupted: stop the workers, remove temp
        files not yet renamed, give opened-up directories their modes back."""
        self.shutdown_workers()
        self.discard_pending()
        self._drop_beside()
        self.end_staging()
        self.close_up()

    def close(self) -> None:
        self.shutdown_workers()
        self._drop_beside()
        self.end_staging()
        dirty, self._dirty = self._dirty, {}      # (a run that stopped early: not synced, only let go of;
        for d in dirty.values():                  # a daemon kept them open for its lifetime)
            d.release()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


STAGE_PREFIX = TEMP_PREFIX + "unpack-"
JOURNAL = "checkpoint.json"


def _read_journal(root_fd: int, name: str) -> bytes | None:
    try:
        d = os.open(name, DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None
    try:
        return read_regular(d, JOURNAL, 64 << 20)
    finally:
        os.close(d)


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
