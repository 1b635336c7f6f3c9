"""Entries that need no content: symlinks, devices, FIFOs and sockets made
under a temp name and renamed into place, and attributes fixed in place."""
from __future__ import annotations

import os
import stat
import time

from ..scan import Entry
from .tree import Dir, itemize


class EntryWriter:
    """The Applier ``a``'s links, specials and attribute fixes."""

    def __init__(self, a):
        self.a = a

    def replace_with(self, parent: Dir, e: Entry, prev: Entry | None, path: str, create) -> bool:
        """Create the new entry under a temp name with ``create(tmp)``, set its
        owner, mode and times, then rename it over ``path``."""
        tmp = self.a.temp_name()
        self.a.touched.add(parent.rel)
        self.a.access.open_up(parent)
        try:
            create(tmp)
            try:
                if self.a.owners:
                    os.chown(tmp, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if e.kind != "L":
                    os.chmod(tmp, e.perms, dir_fd=parent.fd)
                os.utime(tmp, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
                if prev is not None and prev.kind == "d" and not self.a.make_way(parent, e.name, prev, path):
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
            self.a.report.error(path, exc.strerror or str(exc))
            return False
        self.a.mark_dirty(parent)
        return True

    def symlink(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, target, code: str) -> None:
        """Make ``path`` the symlink ``e`` to ``target``."""
        shown = os.fsdecode(target) if isinstance(target, bytes) else target
        if self.a.dry_run or parent is None:
            self.a.report.changed(prev, f"{code} {path} -> {shown}")
            return
        if self.replace_with(parent, e, prev, path, lambda tmp: os.symlink(target, tmp, dir_fd=parent.fd)):
            self.a.report.changed(prev, f"{code} {path} -> {shown}")
            self.a.report.entry(path, e, None)
        else:
            self.a.keep_old(path, prev)

    def carry_out(self, parent: Dir | None, d: tuple) -> None:
        """A planner decision that needs no content and nothing of the
        caller's (plan.LINK, plan.FIX, plan.SPECIAL): the symlink made, the
        entry's times, mode and owner fixed in place, the special file made."""
        from ..plan import FIX, LINK
        what, e, prev, path = d[0], d[1], d[2], d[3]
        if what == LINK:
            self.symlink(parent, e, prev, path, d[4], d[5])
        elif what == FIX:
            self.fix_in_place(parent, e, prev, path, d[4])
            self.a.report.entry(path, e, None)
        else:
            self.special(parent, e, prev, path, d[4])

    def special(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, code: str) -> None:
        """Make ``path`` the device, FIFO or socket ``e``."""
        if self.a.dry_run or parent is None:
            self.a.report.changed(prev, f"{code} {path}")
            return
        if self.replace_with(parent, e, prev, path,
                             lambda tmp: os.mknod(tmp, stat.S_IFMT(e.mode) | 0o600, e.rdev, dir_fd=parent.fd)):
            self.a.report.changed(prev, f"{code} {path}")
            self.a.report.entry(path, e, None)
        else:
            self.a.keep_old(path, prev)

    def fix_in_place(self, parent: Dir | None, e: Entry, prev: Entry, path: str, suffix: str = "") -> None:
        """A link or special file that is already right but for its mtime,
        permissions (not for links) or, as root, owner: set those in place."""
        owner = self.a.owners and (prev.uid, prev.gid) != (e.uid, e.gid)
        mode = e.kind != "L" and prev.perms != e.perms
        if not (owner or mode or prev.mtime_ns != e.mtime_ns):
            return
        if not (self.a.dry_run or parent is None):
            try:
                if owner:
                    os.chown(e.name, e.uid, e.gid, dir_fd=parent.fd, follow_symlinks=False)
                if mode:
                    os.chmod(e.name, e.perms, dir_fd=parent.fd)
                os.utime(e.name, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
            except OSError as exc:
                self.a.report.error(path, exc.strerror or str(exc))
                return
        self.a.stats.updated += 1                 # reported only once done
        self.a.report.item(f"{itemize('.', e, prev, owners=self.a.owners)} {path}{suffix}")

    def attributes(self, parent: Dir | None, e: Entry, prev: Entry, path: str, mtime: bool = False) -> None:
        """A file whose content is right: fix its permissions (and owner as
        root; and its mtime if ``mtime``) in place."""
        fix_owner = self.a.owners and (prev.uid, prev.gid) != (e.uid, e.gid)
        fix_mtime = mtime and prev.mtime_ns != e.mtime_ns
        if prev.perms == e.perms and not fix_owner and not fix_mtime:
            return
        if not (self.a.dry_run or parent is None) and prev.perms == e.perms and not fix_owner:
            try:                # only the mtime (most of a release update): one utimensat, no symlink followed
                os.utime(e.name, ns=(time.time_ns(), e.mtime_ns), dir_fd=parent.fd, follow_symlinks=False)
            except OSError as exc:
                self.a.report.error(path, exc.strerror or str(exc))
                return
        elif not (self.a.dry_run or parent is None):
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
                self.a.report.error(path, exc.strerror or str(exc))
                return
        self.a.stats.updated += 1                 # reported only once done
        self.a.report.item(f"{itemize('.', e, prev, owners=self.a.owners)} {path}")
