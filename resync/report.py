"""What a run reports, and to whom: its counters (``RunStats``), each file
whose content was written (``FileChange``), and one ``Report`` that carries
itemized lines, per-entry errors, written files and the destination's final
state (the manifest) to the CLI and the history.

Scan, plan and apply all report through the same Report. Apply reports a
change only once it is done: a deletion or a transfer that fails is an error,
never an itemized line, and never counted as done.
"""
from __future__ import annotations

from typing import Callable

# Plain classes, not dataclasses: building a dataclass costs ~2.5 ms at import,
# and every run of a command starts a fresh process.


class RunStats:
    """Counters of a run, named the same for sync, pack and unpack (the
    history records them the same way)."""

    def __init__(self):
        self.files = 0                  # regular files in the source (after excludes)
        self.dirs = 0
        self.symlinks = 0
        self.specials = 0
        self.bytes_scanned = 0          # total size of the source's regular files
        self.files_transferred = 0      # files whose content was written (or travels, for pack)
        self.bytes_transferred = 0      # size of those files
        self.bytes_literal = 0          # bytes read from the source (or carried) for them
        self.bytes_matched = 0          # bytes reused from the destination's old copies
        self.bytes_written = 0
        self.created = 0                # new entries of any kind
        self.updated = 0                # changed entries (content or attributes)
        self.deleted = 0
        self.errors = 0
        self.vanished = 0
        self.deletion_refused = ""
        self.duration = 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: dict) -> "RunStats":
        """The counters named in ``d`` (a network run's statistics: other keys
        are left out)."""
        stats = cls()
        for k, v in d.items():
            if hasattr(stats, k):
                setattr(stats, k, v)
        return stats

    @property
    def status(self) -> str:
        """A sync's status in the history: partial, refused, vanished or ok."""
        return ("partial" if self.errors else "refused" if self.deletion_refused
                else "vanished" if self.vanished else "ok")

    def outcome_error(self):
        """The error a sync ends with (exit 23, 25 or 24, as rsync's), or None."""
        from .errors import DeletionRefusedError, PartialTransferError, VanishedError
        if self.errors:
            extra = f"; {self.deletion_refused}" if self.deletion_refused else ""
            return PartialTransferError(self.errors, self.files + self.dirs + self.symlinks + self.specials, extra)
        if self.deletion_refused:
            return DeletionRefusedError(self.deletion_refused)
        if self.vanished:
            return VanishedError(self.vanished)
        return None


class FileChange:
    """One file whose content was written, for itemize output and the history."""

    __slots__ = ("path", "action", "size", "literal", "matched", "seconds", "blake3", "entry")

    def __init__(self, path: str, action: str, size: int, literal: int, matched: int, seconds: float,
                 blake3: str | None = None, entry=None):
        self.path, self.action, self.size = path, action, size          # action: "new" | "update"
        self.literal, self.matched, self.seconds = literal, matched, seconds
        self.blake3 = blake3
        self.entry = entry              # the file as written (scan.Entry)


def _nothing(*_args) -> None:
    return None


class Report:
    """Where a run's results go. ``on_item(line)``: an itemized change
    (rsync's YXcstpoguax format); ``on_error(message)``: a per-entry error;
    ``on_file(FileChange)``: a file whose content was written;
    ``on_entry(path, entry, blake3 hex or None)``: the final state of a
    destination path (the manifest; not called in a dry run)."""

    __slots__ = ("stats", "item", "file", "entry", "_error", "progress")

    def __init__(self, stats: RunStats | None = None, on_item: Callable | None = None,
                 on_error: Callable | None = None, on_file: Callable | None = None,
                 on_entry: Callable | None = None, progress=None, dry_run: bool = False):
        self.stats = stats if stats is not None else RunStats()
        self.item = on_item or _nothing
        self._error = on_error or _nothing
        self.file = on_file or _nothing
        self.entry = on_entry if on_entry is not None and not dry_run else _nothing
        self.progress = progress        # resync.progress.Progress or None

    def error(self, path: str, message: str) -> None:
        self.stats.errors += 1
        self._error(f"{path}: {message}")

    def vanished(self, path: str) -> None:
        self.stats.vanished += 1
        self._error(f"file has vanished: {path}")

    def source_failed(self, path: str, exc: OSError) -> None:
        """Reading a source entry failed: vanished (exit 24) or an error (23)."""
        if isinstance(exc, FileNotFoundError):
            self.vanished(path)
        else:
            self.error(path, exc.strerror or str(exc))

    def changed(self, prev, line: str) -> None:
        """Count a created (no ``prev``) or replaced entry and itemize it."""
        if prev is None:
            self.stats.created += 1
        else:
            self.stats.updated += 1
        self.item(line)
