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
- Two ways to schedule it. The pipeline (``pipeline``: ``transfer`` … ``commit``): copies
  run in forked workers (or inline), batch N is flushed to disk on a thread
  while batch N+1 is written, and batch N-1 is renamed — local sync and the
  network receiver. Stage-all-then-place (``staging``: ``stage`` … ``make_durable``
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

The parts, each one job (``Applier`` composes them and holds what they
share: the root, the report and counters, the directories touched):

- ``tree``: ``Dir`` handles, ``syncfs``, tree removal and pruning, ``itemize``;
- ``access``: u+rwx for a run as an ordinary user, and the modes given back;
- ``pipeline``: files written by workers, made durable in batches, renamed;
- ``staging``: files staged (in the staging directory or beside their
  targets), checkpoints, and placing;
- ``entries``: symlinks, specials and attribute fixes;
- ``deleter``: deletions, and a refused deletion's tree as it is.
"""
from __future__ import annotations

from ..fs import TEMP_PREFIX
from .applier import SYNC_DIRS_EACH, Applier
from .staging import JOURNAL, STAGE_PREFIX, Staged
from .tree import (USER_RWX, Deletions, Dir, clear, itemize, name_key, open_up_at, overrides_permissions,
                   prune_tree, read_regular, remove_tree, syncfs)

__all__ = ["Applier", "Deletions", "Dir", "JOURNAL", "STAGE_PREFIX", "SYNC_DIRS_EACH", "Staged", "TEMP_PREFIX",
           "USER_RWX", "clear", "itemize", "name_key", "open_up_at", "overrides_permissions", "prune_tree",
           "read_regular", "remove_tree", "syncfs"]
