"""Deletions: run when the caller says (after every transfer succeeded: the
plan's rule); trees removed without following symlinks, what the excludes
protect inside them kept (rsync: "cannot delete non-empty directory"); a
name this destination takes for one the source spells otherwise kept; a
refused deletion's candidates reported as the tree as it is."""
from __future__ import annotations

import os
import stat

from ..fs import TEMP_PREFIX
from ..scan import Entry, join, open_rel_dir
from .tree import Deletions, prune_tree, remove_tree


class Deleter:
    """The Applier ``a``'s deletions."""

    def __init__(self, a):
        self.a = a

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
            if self.a.root_fd < 0:                        # a dry run into nothing
                self.a.stats.deleted += 1
                self.say_deleted([(path + "/" if e.kind == "d" else path, None)])
                continue
            try:
                fd = open_rel_dir(self.a.root_fd, rel)
            except OSError as exc:
                self._delete_failed(path, e, exc)
                continue
            try:
                other = aliases.get(path) and self._same_entry(fd, e.name, aliases[path])
                if other:
                    self.a.report.item(f"not deleting {path}: this destination takes it for "
                                     f"{join(rel, other)} (the names differ only in case or Unicode normalization)")
                    continue
                removed, steps = self._delete_one(fd, rel, e, path, count_tree)
            except OSError as exc:
                self._delete_failed(path, e, exc)
                continue
            finally:
                os.close(fd)
            self.a.stats.deleted += removed
            self.say_deleted(steps)                    # reported only once done

    def _delete_one(self, fd: int, rel: str, e: Entry, path: str, count_tree) -> tuple[int, list]:
        """Delete ``e`` from the directory ``fd`` (``rel``), or in a dry run
        count it: (entries removed, prune_tree's steps)."""
        if e.kind != "d":
            if not self.a.dry_run:
                self.a.touched.add(rel)
                self.a.access.open_up_fd(fd, rel)
                os.unlink(e.name, dir_fd=fd)
                os.fsync(fd)
            return 1, [(path, None)]
        if self.a.dry_run:
            if self.a.excludes is not None:
                return prune_tree(fd, e.name, path, self.a.excludes, dry_run=True)
            return 1 + count_tree(rel, e.name), [(path + "/", None)]
        self.a.touched.add(rel)
        self.a.access.open_up_fd(fd, rel)
        if self.a.excludes is not None:
            removed, steps = prune_tree(fd, e.name, path, self.a.excludes, open_up=not self.a.access.dac)
        else:
            removed, steps = 1 + remove_tree(fd, e.name, open_up=not self.a.access.dac), [(path + "/", None)]
        os.fsync(fd)
        return removed, steps

    def _delete_failed(self, path: str, e: Entry, exc: OSError) -> None:
        if self.a.dry_run:                                # what cannot be looked at is counted as itself
            self.a.stats.deleted += 1
            self.say_deleted([(path + "/" if e.kind == "d" else path, None)])
            return
        if isinstance(exc, FileNotFoundError) and exc.filename is None:
            return                                      # already gone (a re-run)
        self.a.report.error(path, exc.strerror or str(exc))
        if e.kind != "d":
            self.a.report.entry(path, e, None)            # still there

    def say_deleted(self, steps: list[tuple[str, Entry | None]]) -> None:
        """Itemize prune_tree's steps: what went, and the directories that
        stay because of what they hold (rsync's words; they stay in the
        manifest)."""
        for path, kept in steps:
            if kept is None:
                self.a.report.item(f"*deleting   {path}")
            else:
                self.a.report.item(f"cannot delete non-empty directory: {path}")
                self.a.report.entry(path, kept, None)

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
        report = self.a.report
        for rel, e in deletions:
            path = join(rel, e.name)
            report.entry(path, e, None)
            if e.kind != "d" or self.a.root_fd < 0:
                continue
            try:
                fd = open_rel_dir(self.a.root_fd, path)
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
        if self.a.excludes is not None:
            try:
                fd = open_rel_dir(self.a.root_fd, rel)
            except OSError:
                return 0
            try:
                return prune_tree(fd, name, join(rel, name), self.a.excludes, dry_run=True)[0] - 1
            except OSError:
                return 0
            finally:
                os.close(fd)
        try:
            fd = open_rel_dir(self.a.root_fd, join(rel, name))
        except OSError:
            return 0
        try:
            total = 0
            for _, dirs, files, _ in os.fwalk(".", dir_fd=fd):
                total += len(dirs) + len(files)
            return total
        finally:
            os.close(fd)
