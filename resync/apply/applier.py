"""The Applier: one run's changes to a destination tree, composed of its
parts (``access``, ``pipeline``, ``staging``, ``entries``, ``deleter``);
it holds the root, the directories, and what every part shares: the
report, the counters, the directories touched and made dirty."""
from __future__ import annotations

import os
import stat
import time

from ..content import Options
from ..fs import TEMP_PREFIX
from ..report import Report
from ..scan import Entry, Excludes, open_dir_at, open_rel_dir
from .access import Access
from .deleter import Deleter
from .entries import EntryWriter
from .pipeline import Pipeline
from .staging import Staging
from .tree import USER_RWX, Dir, itemize, prune_tree, remove_tree, syncfs

_MAX_OPEN_DIRS = 128            # directory descriptors held by pending work before committing
SYNC_DIRS_EACH = 8      # dirty directories fsynced one by one; more: one syncfs (Applier.sync_dirs)


class Applier:
    """One run's changes to the destination tree ``root``.

    ``workers``: how many forked processes write file content (0: inline, in
    this process; content specs then need not be picklable). ``owners``: set
    owners (default: as root). ``replace_trees``: an entry of another type
    may replace a non-empty directory (sync: with --delete; unpack: always).
    ``excludes``: the run's, which protect what they match inside a
    directory tree being removed, as the planner protects a directory's own
    entries. ``own_flush``: make this run's writes durable by fsyncs of its
    own files and directories, never a syncfs (which also waits for every
    other writer on the file system): the network receiver, which runs on an
    event loop, several at once in a daemon. Use ``open_root`` first;
    ``close`` (or ``abort`` on failure) last."""

    def __init__(self, root: str, report: Report, options: Options | None = None, *, dry_run: bool = False,
                 owners: bool | None = None, workers: int = 0, replace_trees: bool = False,
                 excludes: Excludes | None = None, own_flush: bool = False):
        self.root = root
        self.own_flush = own_flush                 # flush this run's files and directories only, never syncfs
        self.excludes = excludes if excludes else None
        self.report = report
        self.stats = report.stats
        self.options = options or Options()
        self.dry_run = dry_run
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.options.as_root = self.owners
        self.workers = workers
        self.replace_trees = replace_trees
        self.root_fd = -1
        self.created_root = False
        self._run_tag = f"{TEMP_PREFIX}{os.getpid():x}-{os.urandom(3).hex()}-"
        self._counter = 0
        self._dirty: dict[int, Dir] = {}           # directories with renames to fsync
        self.touched: set[str] = set()             # directories that gained or lost a name
        self.access = Access(self)                 # u+rwx for a run as an ordinary user
        self.pipeline = Pipeline(self)             # files written by workers, durable in batches
        self.staging = Staging(self)               # files staged, then placed
        self.entries = EntryWriter(self)           # links, specials, attributes
        self.deleter = Deleter(self)

    def temp_name(self) -> str:
        """A new temp name of this run (resync's prefix, the pid, a random
        tag: a later run recognises and removes what a killed one left)."""
        self._counter += 1
        return f"{self._run_tag}{self._counter}"

    def open_root(self, create: bool = True) -> bool:
        """Open the root (creating it, with its parents, if ``create``);
        returns whether it exists now. FileError if it cannot be, or is not a
        directory. In a dry run a missing root is not created."""
        from ..errors import FileError
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
        if not self.access.dac and d.perms & 0o500 != 0o500:
            self.access.open_up(d)                         # it must be listed
        return d

    def open_dir(self, parent: Dir, name: str, rel: str, perms: int, exists: bool) -> Dir:
        """Open the existing directory ``name`` in ``parent`` for the walk
        (giving it u+rwx first if this user cannot list it). OSError if it
        cannot be opened."""
        if exists and not self.access.dac and perms & 0o500 != 0o500:
            self.access.open_up_at(parent, name, rel)
        return Dir(open_dir_at(parent.fd, name), rel, (perms | USER_RWX) if rel in self.access.opened else perms)

    def too_many_open(self) -> bool:
        return Dir.open_count > _MAX_OPEN_DIRS and not self.dry_run

    def remove_temps(self, d: Dir, names: list[str]) -> None:
        """Temp files a killed run left in ``d``."""
        if self.dry_run or not names:
            return
        self.access.open_up(d)
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
                self.access.open_up(parent)
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
        self.access.open_up(parent)
        try:
            if prev.kind == "d":
                try:
                    os.rmdir(name, dir_fd=parent.fd)
                except OSError:
                    if not self.replace_trees:
                        self.report.error(path, "cannot replace a non-empty directory (use --delete)")
                        return False
                    if self.excludes is not None:
                        removed, steps = prune_tree(parent.fd, name, path, self.excludes, open_up=not self.access.dac)
                        if steps[-1][1] is not None:        # something in it is protected: it stays
                            self.stats.deleted += removed
                            self.deleter.say_deleted(steps)
                            self.report.error(path, "cannot replace a directory that holds excluded entries")
                            return False
                    else:
                        remove_tree(parent.fd, name, open_up=not self.access.dac)
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
                self.access.opened.pop(path, None)            # opened up for the run: closed again
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
        self.access.close_up()                                # any left (their attributes failed)

    def count_transfer(self, e: Entry, prev: Entry | None) -> None:
        self.stats.files_transferred += 1
        self.stats.bytes_transferred += e.size
        if prev is None:
            self.stats.created += 1
        else:
            self.stats.updated += 1

    def keep_old(self, path: str, old: Entry | None) -> None:
        """A change failed: the destination keeps ``old`` (for the manifest)."""
        if old is not None and old.kind != "d":
            self.report.entry(path, old, None)

    def mark_dirty(self, d: Dir) -> None:
        """``d`` gained or lost a name: fsync it at the next commit."""
        self.touched.add(d.rel)
        if id(d) not in self._dirty:
            self._dirty[id(d)] = d.acquire()

    def take_dirty(self) -> list[Dir]:
        """The directories with names not yet durable, no longer counted
        dirty here: the caller fsyncs and releases each."""
        dirty, self._dirty = self._dirty, {}
        return list(dirty.values())

    def sync_dirs(self) -> None:
        """Make the names the dirty directories gained or lost durable: an
        fsync of each, or one syncfs of the file system when there are more
        than SYNC_DIRS_EACH (a release tree's update touches hundreds of
        directories per batch; one journal commit serves them all, where an
        fsync each forced a commit each and stalled the file creations
        queued behind it). With ``own_flush`` always an fsync of each: after
        the first one's commit the others find their names already durable."""
        dirty, self._dirty = self._dirty, {}
        if len(dirty) > SYNC_DIRS_EACH and not self.own_flush and self.root_fd >= 0 and syncfs(self.root_fd):
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

    def abort(self) -> None:
        """The run failed or was interrupted: stop the workers, remove temp
        files not yet renamed, give opened-up directories their modes back."""
        self.pipeline.shutdown_workers(kill=True)
        self.pipeline.discard_pending()
        self.staging.drop_beside()
        self.staging.end()
        self.access.close_up()

    def close(self) -> None:
        self.pipeline.shutdown_workers()
        self.staging.drop_beside()
        self.staging.end()
        dirty, self._dirty = self._dirty, {}      # (a run that stopped early: not synced, only let go of;
        for d in dirty.values():                  # a daemon kept them open for its lifetime)
            d.release()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1
