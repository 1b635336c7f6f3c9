"""Plan: what a destination needs, decided by comparing a source listing with
the destination's, one directory at a time (rsync's generator).

Local sync compares a source directory with the destination's directory; pack
compares it with a tree signature's entries; the network sender will compare
it with the receiver's listing. The same rules decide for all of them:

- A regular file whose size, mtime, type, permissions and (when owners are
  compared) owner match is kept as it is: that is most files of most runs, so
  it is decided from the destination's raw lstat without building anything.
- With ``checksum``, a file of the same size is kept when its BLAKE3 matches
  (whatever its mtime); otherwise size and mtime decide (rsync's quick check).
- A file whose content is the same but whose permissions or owner differ gets
  its attributes fixed; any other file is transferred (new, or replacing the
  old one: whole, or by delta against it — the content source's choice).
- Directories are created or kept (and entered); symlinks and special files
  are created, replaced, or fixed in place when only their times, mode or
  owner differ; an entry of another type is removed first.
- With ``delete``, destination entries missing from the source are deletion
  candidates (excluded ones are protected, as in rsync; inside a candidate
  directory the apply layer protects them). A candidate whose name equals a
  source name but for case or Unicode normalization is noted with it
  (``Deletions.aliases``): a destination that takes the two for one entry
  holds the source's file there. They are deleted only
  if every transfer succeeded, never when the source root is empty, and not at
  all when there are more than ``max_delete``: ``deletion_refusal`` says why not.

Each decision carries its itemize code (rsync's YXcstpoguax).
"""
from __future__ import annotations

import os
import stat
from typing import Callable

from .apply import Deletions, itemize
from .report import Report
from .scan import Entry, Excludes, join

# Decisions, in the order a directory's entries were listed (name order):
ATTRS = "attrs"          # (ATTRS, entry, prev, path): same content, fix mode/owner
TRANSFER = "transfer"    # (TRANSFER, entry, prev, path, code): new content
DIRECTORY = "dir"        # (DIRECTORY, entry, prev, path): create (prev None or another type) or keep, and enter
LINK = "link"            # (LINK, entry, prev, path, target, code): create or replace a symlink
FIX = "fix"              # (FIX, entry, prev, path, suffix): a link or special that only needs times/mode/owner
SPECIAL = "special"      # (SPECIAL, entry, prev, path, code): create or replace a device, FIFO or socket


class PlanOptions:
    __slots__ = ("checksum", "delete", "max_delete", "excludes", "owners")

    def __init__(self, checksum: bool = False, delete: bool = False, max_delete: int | None = None,
                 excludes: Excludes | None = None, owners: bool = False):
        self.checksum, self.delete, self.max_delete = checksum, delete, max_delete
        self.excludes = excludes or Excludes([])
        self.owners = owners


class Planner:
    """Decisions for one run. ``keep(path, entry)`` is called for every file
    kept as it is (the manifest needs it); ``link_target(path)`` gives a source
    symlink's target (OSError if it cannot be read); ``same_content(path,
    dst_fd, name)`` says whether the source file and the destination's have the
    same BLAKE3, for --checksum (OSError if the source cannot be read)."""

    def __init__(self, options: PlanOptions, report: Report, keep: Callable[[str, Entry], None],
                 link_target: Callable[[str], str | bytes],
                 same_content: Callable[[str, int, str], bool] | None = None):
        self.opt = options
        self.report = report
        self.keep = keep
        self.link_target = link_target
        self.same_content = same_content
        self.deletions = Deletions()                    # (directory, destination entry)
        self.extras: list[tuple[str, Entry]] = []       # destination entries the source lacks that stay
                                                        # (no --delete, or excluded): for the manifest

    def directory(self, rel: str, entries: list[Entry], dst: dict, dst_fd: int | None = None,
                  skip: str | None = None) -> list[tuple]:
        """The decisions for directory ``rel``: ``entries`` are the source's
        (sorted, excludes applied), ``dst`` the destination's lstat by name
        (consumed: what is left are names the source lacks), ``dst_fd`` the
        destination directory (for --checksum and link targets; None when the
        destination is only described, as by a tree signature), ``skip`` a
        source subdirectory that is the destination itself."""
        stats = self.stats = self.report.stats
        quick = not self.opt.checksum
        owners = self.opt.owners
        keep = self.keep
        out: list[tuple] = []
        for e in entries:
            name = e.name
            st = dst.pop(name, None)
            kind = e.kind
            if kind == "f":
                stats.files += 1
                stats.bytes_scanned += e.size
                if quick and st is not None and st.st_mtime_ns == e.mtime_ns and st.st_size == e.size \
                        and st.st_mode == e.mode and (not owners or (st.st_uid == e.uid and st.st_gid == e.gid)):
                    keep(f"{rel}/{name}" if rel else name, e)
                    continue
                self._file(out, rel, e, Entry.from_stat(name, st) if st is not None else None, dst_fd)
                continue
            path = join(rel, name)
            prev = Entry.from_stat(name, st) if st is not None else None
            if kind == "d":
                if name == skip:
                    continue           # DST inside SRC: never copy the copy into itself
                stats.dirs += 1
                out.append((DIRECTORY, e, prev, path))
            elif kind == "L":
                stats.symlinks += 1
                self._symlink(out, e, prev, path, dst_fd)
            else:
                stats.specials += 1
                if prev is not None and prev.kind == e.kind and stat.S_IFMT(prev.mode) == stat.S_IFMT(e.mode) \
                        and prev.rdev == e.rdev:
                    out.append((FIX, e, prev, path, ""))
                else:
                    out.append((SPECIAL, e, prev, path,
                                itemize("c", e, None if prev is None or prev.kind != e.kind else prev,
                                        owners=owners)))
        if dst:
            excludes = self.opt.excludes
            names = []
            for name in sorted(dst):
                e = Entry.from_stat(name, dst[name])
                if not self.opt.delete or (excludes and excludes.excluded(join(rel, name), e.kind == "d")):
                    self.extras.append((rel, e))   # stays (excluded ones are protected, as in rsync)
                    continue
                self.deletions.append((rel, e))
                names.append(name)
            if names:
                self.deletions.note_aliases(rel, names, (e.name for e in entries))
        return out

    def _file(self, out: list, rel: str, e: Entry, prev: Entry | None, dst_fd: int | None) -> None:
        path = join(rel, e.name)
        owners = self.opt.owners
        if prev is not None and prev.kind == "f":
            same = prev.size == e.size and (prev.mtime_ns == e.mtime_ns or self.opt.checksum)
            if same and self.opt.checksum and dst_fd is not None and self.same_content is not None:
                try:
                    same = self.same_content(path, dst_fd, e.name)
                except OSError as exc:
                    self.report.source_failed(path, exc)
                    return
            if same:
                out.append((ATTRS, e, prev, path))
                return
            code = itemize(">", e, prev, "c" if self.opt.checksum else ".", owners=owners)
        else:
            code = itemize(">", e, None)
        out.append((TRANSFER, e, prev, path, code))

    def _symlink(self, out: list, e: Entry, prev: Entry | None, path: str, dst_fd: int | None) -> None:
        try:
            target = self.link_target(path)
        except OSError as exc:
            self.report.source_failed(path, exc)
            return
        owners = self.opt.owners
        if prev is not None and prev.kind == "L" and dst_fd is not None:
            try:
                same = os.fsencode(os.readlink(e.name, dir_fd=dst_fd)) == os.fsencode(target)
            except OSError:                     # (a peer's target is bytes, a local one str)
                same = False
            if same:
                out.append((FIX, e, prev, path, f" -> {os.fsdecode(target)}"))
                return
            code = itemize("c", e, prev, "c", owners=owners)
        else:
            code = itemize("c", e, None)
        out.append((LINK, e, prev, path, target, code))

    def deletion_refusal(self, count: int) -> str:
        """Why the deletion candidates (``count`` entries, trees counted whole)
        must not be deleted, or "" when they may be."""
        stats = self.report.stats
        if stats.errors:
            return f"{stats.errors} transfer errors: skipping {len(self.deletions)} deletions (as rsync does)"
        if self.opt.max_delete is not None and count > self.opt.max_delete:
            return f"{count} deletions exceed --max-delete {self.opt.max_delete}; nothing deleted"
        return ""


def refuse_empty_source(src: str, top: list[Entry], delete: bool) -> None:
    """--delete with an empty source (or one whose every entry is excluded)
    would empty the destination: refused before anything starts."""
    from .errors import DeletionRefusedError
    if delete and not top:
        raise DeletionRefusedError(f"source {src} is empty (or everything in it is excluded); "
                                   "refusing to delete the destination's contents")
