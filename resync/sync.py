"""Local tree mirroring: ``resync sync SRC DST`` behaves like ``rsync -a SRC/ DST/``.

Regular files, directories, symlinks (copied as links, never followed) and
special files, with permissions, modification times and, as root, owners.
A file is transferred when its size or mtime differs (``checksum``: when its
BLAKE3 differs); changed files are copied whole, or with ``whole_file=False``
rebuilt from the destination's old copy by the delta engine.

This module only connects the steps (docs/architecture.md):

- scan: the source is listed ahead by a forked process (``scan.TreeLister``),
  in the order of the walk, while this one lists the destination directory by
  directory (``scan.stat_dir``) — rsync splits the listing between sender and
  generator the same way, so a run that changes little costs about what
  rsync's does;
- plan: each directory's listings are compared (``plan.Planner``);
- content: a changed file's bytes come from the source (``content``'s
  ``local`` writer: whole, or by delta against the old copy);
- apply: every change to DST goes through ``apply.Applier`` (O_NOFOLLOW
  descriptors, temp files made durable in batches, renames, links, specials,
  attributes, deletions after every transfer succeeded, directory attributes
  last); copies run in forked workers (with threads, copying 20,000 small
  files was serialised by the GIL: 1.7 s vs 0.6 s into tmpfs);
- record: the Report's callbacks feed the history.

The walk keeps one directory listing at a time and the lister's lead is
bounded by a pipe, so memory does not grow with the number of files.
"""
from __future__ import annotations

import os
import stat
import time
from typing import Callable

from .apply import Applier, Dir
from .content import Options, same_content
from .errors import FileError, UsageError
from .parallel import thread_count
from .plan import ATTRS, DIRECTORY, TRANSFER, PlanOptions, Planner, refuse_empty_source
from .report import FileChange, Report, RunStats
from .scan import Entry, Excludes, TreeLister, join, list_dir, skipped_dir, stat_dir

SyncStats = RunStats            # the counters of a run (report.RunStats)
__all__ = ["SyncOptions", "SyncStats", "FileChange", "Syncer"]


class SyncOptions:
    def __init__(self, checksum: bool = False, whole_file: bool = True, delete: bool = False,
                 max_delete: int | None = None, excludes: list[str] | None = None, dry_run: bool = False,
                 threads: int | None = None, hash_files: bool = False, sparse: bool = False):
        self.checksum = checksum
        self.whole_file = whole_file
        self.sparse = sparse                  # -S: blocks of zeros written as holes
        self.delete = delete
        self.max_delete = max_delete
        self.excludes = list(excludes or [])
        self.dry_run = dry_run
        self.threads = threads
        self.hash_files = hash_files          # BLAKE3 of each transferred file (for the history)


class _Pending:
    """A directory waiting to be visited: its path, its parent's handle
    (acquired; the child is opened from it when its turn comes), whether it
    already existed in DST and its permission bits there, or its own handle
    (the root)."""

    __slots__ = ("rel", "parent", "exists", "handle", "perms")

    def __init__(self, rel: str, parent: Dir | None, exists: bool, handle: Dir | None = None, perms: int = 0o700):
        self.rel, self.parent, self.exists, self.handle, self.perms = rel, parent, exists, handle, perms


class _Listing:
    __slots__ = ("handle", "src", "gone", "skip", "src_error", "dst", "temps", "dst_error")

    def __init__(self):
        self.handle: Dir | None = None
        self.src: list[Entry] = []
        self.gone: list[str] = []
        self.skip: str | None = None            # the source directory that is DST itself
        self.src_error: OSError | None = None
        self.dst: dict[str, os.stat_result] = {}
        self.temps: list[str] = []
        self.dst_error = ""


class Syncer:
    """One run of ``sync``. Callbacks: ``on_item(line)`` for each change
    (itemize format), ``on_error(message)`` for each per-entry error,
    ``on_file(FileChange)`` for each transferred file, ``on_entry(path,
    entry, blake3 or None)`` for the final state of each destination path."""

    def __init__(self, src: str, dst: str, options: SyncOptions | None = None,
                 on_item: Callable[[str], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 on_file: Callable[[FileChange], None] | None = None, progress=None,
                 on_entry: Callable[[str, Entry, str | None], None] | None = None):
        self.src = os.path.abspath(src)
        self.dst = os.path.abspath(dst)
        self.opt = options or SyncOptions()
        self.report = Report(RunStats(), on_item, on_error, on_file, on_entry, progress, dry_run=self.opt.dry_run)
        self.stats = self.report.stats
        self._excludes = Excludes(self.opt.excludes)
        owners = os.geteuid() == 0
        self.apply = Applier(self.dst, self.report,
                             Options(self.opt.whole_file, self.opt.hash_files, sparse=self.opt.sparse), dry_run=self.opt.dry_run,
                             owners=owners, workers=max(1, self.opt.threads or thread_count()),
                             replace_trees=self.opt.delete, excludes=self._excludes)
        self.plan = Planner(PlanOptions(self.opt.checksum, self.opt.delete, self.opt.max_delete, self._excludes,
                                        owners),
                            self.report, lambda path, e: self.report.entry(path, e, None),
                            lambda path: os.readlink(f"{self.src}/{path}"),
                            lambda path, fd, name: same_content(f"{self.src}/{path}", fd, name))
        self._dirs: list[tuple[str, Entry, Entry | None]] = []   # (rel, source, old) in pre-order
        self._dst_id: tuple[int, int] | None = None     # (st_dev, st_ino) of DST's root

    # ----------------------------------------------------------------- entry
    def run(self) -> RunStats:
        started = time.monotonic()
        try:
            src_st = os.stat(self.src)
        except OSError as exc:
            raise FileError.from_os(self.src, exc) from None
        if not stat.S_ISDIR(src_st.st_mode):
            raise FileError(self.src, "source is not a directory")
        try:
            top, _, _ = list_dir(self.src, self._excludes, skip_temps=True)
        except OSError as exc:
            raise FileError.from_os(self.src, exc) from None
        refuse_empty_source(self.src, top, self.opt.delete)
        self._check_nesting()
        apply = self.apply
        apply.open_root()
        if apply.root_fd >= 0:
            st = os.fstat(apply.root_fd)
            self._dst_id = (st.st_dev, st.st_ino)
        try:
            self._walk(src_st)
            if self.report.progress is not None:
                self.report.progress.scanned()
            apply.pipeline.commit(final=True)
            apply.pipeline.shutdown_workers()
            self._delete()
            apply.finish_dirs(self._dirs)
        except BaseException:
            apply.abort()
            raise
        finally:
            apply.close()
        self.stats.duration = time.monotonic() - started
        return self.stats

    def _check_nesting(self) -> None:
        """SRC and DST must not be the same directory, and --delete must not
        run when SRC lies inside DST (it would delete the source itself). DST
        inside SRC is fine: the walk skips it."""
        from .errors import DeletionRefusedError
        real_src = os.path.realpath(self.src)
        real_dst = os.path.realpath(self.dst)
        if real_src == real_dst:
            raise UsageError(f"source and destination are the same directory: {real_src}")
        if self.opt.delete and (real_src + os.sep).startswith(real_dst.rstrip(os.sep) + os.sep):
            raise DeletionRefusedError(f"the source {real_src} is inside the destination {real_dst}: "
                                       "--delete would remove it")

    # ------------------------------------------------------------- traversal
    def _walk(self, src_root_st: os.stat_result) -> None:
        apply = self.apply
        root_entry = Entry.from_stat("", src_root_st)
        old_root = None
        if apply.root_fd >= 0 and not apply.created_root:
            old_root = Entry.from_stat("", os.fstat(apply.root_fd))
        if old_root is None:
            self.stats.created += 1
            self.report.item("cd+++++++++ ./")
        self._dirs.append(("", root_entry, old_root))
        # Stack entries are directories still to visit. A directory's
        # descriptor is opened only when it is about to be visited, so a
        # directory with 100,000 subdirectories does not hold 100,000
        # descriptors. (Listing ahead on a thread instead of a process was
        # tried: GIL contention made the no-change run 30 % slower.)
        stack: list[_Pending] = [_Pending("", None, True, apply.root_dir())]
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
                if apply.too_many_open():
                    # Pending work keeps its directories open: in a wide tree with few
                    # files per directory, commit early rather than run out of descriptors.
                    apply.pipeline.commit(final=True)

    def _list_pair(self, p: _Pending, lister: TreeLister) -> _Listing:
        """Open a pending directory in DST and list it in SRC and DST."""
        out = _Listing()
        handle = p.handle
        if handle is None and p.parent is not None:
            try:
                handle = self.apply.open_dir(p.parent, p.rel.rpartition("/")[2], p.rel, p.perms, p.exists)
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
                out.src, _, out.gone = list_dir(src_dir, self._excludes, p.rel, skip_temps=True)
            except OSError as exc:
                out.src_error = exc
            out.skip = skipped_dir(src_dir, out.src, self._dst_id)
        if handle is not None and p.exists and not out.dst_error:
            try:
                out.dst, out.temps = stat_dir(handle.fd, skip_temps=True)
            except OSError as exc:
                out.dst_error = f"cannot list destination directory: {exc.strerror or exc}"
        return out

    def _visit(self, rel: str, listing: _Listing) -> list[_Pending]:
        """Plan one directory and apply its decisions; returns its
        subdirectories to visit."""
        report, apply = self.report, self.apply
        parent = listing.handle
        if listing.src_error is not None:
            report.source_failed(rel + "/", listing.src_error)
            return []
        if listing.dst_error:
            report.error(rel + "/", listing.dst_error)
            return []
        for name in listing.gone:
            report.vanished(join(rel, name))
        if parent is not None:
            apply.remove_temps(parent, listing.temps)     # left by a killed run
        decisions = self.plan.directory(rel, listing.src, listing.dst, parent.fd if parent is not None else None,
                                        listing.skip)
        subdirs = []
        for d in decisions:
            what, e, prev, path = d[0], d[1], d[2], d[3]
            if what == TRANSFER:
                spec = ("local", f"{self.src}/{path}", prev.size if prev is not None and prev.kind == "f" else -1)
                apply.pipeline.transfer(parent, e, prev, path, d[4], spec)
            elif what == ATTRS:
                apply.entries.attributes(parent, e, prev, path)
                report.entry(path, e, None)
            elif what == DIRECTORY:
                sub = self._enter_dir(parent, e, prev, path)
                if sub is not None:
                    subdirs.append(sub)
            else:
                apply.entries.carry_out(parent, d)      # LINK, FIX, SPECIAL
        return subdirs

    def _enter_dir(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str) -> _Pending | None:
        apply = self.apply
        if prev is not None and prev.kind != "d":
            if not apply.make_way(parent, e.name, prev, path):
                return None
            prev = None
        self._dirs.append((path, e, prev))
        if prev is None:
            if not apply.mkdir(parent, e, path):
                return None
            if self.opt.dry_run or parent is None:
                return _Pending(path, None, False)
        if parent is None:
            return _Pending(path, None, False)
        self.report.entry(path, e, None)
        return _Pending(path, parent.acquire(), prev is not None, perms=prev.perms if prev is not None else 0o700)

    # ------------------------------------------------------------- deletions
    def _delete(self) -> None:
        plan, apply = self.plan, self.apply
        apply.deleter.keep(plan.extras)                     # what stays though the source lacks it: in the manifest
        if not plan.deletions:
            return
        count = 0
        if not self.stats.errors:
            for rel, e in plan.deletions:
                count += 1
                if e.kind == "d" and apply.root_fd >= 0:
                    count += apply.deleter.count_tree(rel, e.name)
        refused = plan.deletion_refusal(count)
        if refused:
            self.stats.deletion_refused = refused
            apply.deleter.keep(plan.deletions)             # they stay: the manifest says so
            return
        apply.deleter.delete(plan.deletions, apply.deleter.count_tree)

