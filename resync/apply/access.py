"""Permissions as an ordinary user: without CAP_DAC_OVERRIDE, a destination
directory this user owns that lacks u+rwx (the copy of a read-only source
directory) gets them while something in it must change, and its mode back
at the end, or when the run stops early (rsync does the same)."""
from __future__ import annotations

import os
import stat

from ..scan import open_rel_dir
from .tree import USER_RWX, Dir, open_up_at, overrides_permissions


class Access:
    """Which directories the Applier ``a`` opened up, and their modes before."""

    def __init__(self, a):
        self.a = a
        self.dac = overrides_permissions()          # CAP_DAC_OVERRIDE: nothing to open up
        self.opened: dict[str, int] = {}            # rel -> permission bits before this run opened it up

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
        self.a.touched.add(d.rel)

    def open_up_at(self, parent: Dir, name: str, rel: str) -> None:
        """Like open_up, for a directory not opened yet (it lacks u+r or u+x)."""
        try:
            self.opened.setdefault(rel, open_up_at(parent.fd, name))
            self.a.touched.add(rel)
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
            self.a.touched.add(rel)

    def close_up(self) -> None:
        """Give the directories this run opened up their modes back."""
        opened, self.opened = self.opened, {}
        if self.a.root_fd < 0:
            return
        for rel, perms in sorted(opened.items(), reverse=True):     # children first
            try:
                fd = open_rel_dir(self.a.root_fd, rel)
            except OSError:
                continue
            try:
                os.fchmod(fd, perms)
            except OSError:
                pass
            finally:
                os.close(fd)
