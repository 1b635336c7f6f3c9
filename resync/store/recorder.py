"""Recording one run: manifest and changed-file rows streamed to the run's
spool as it goes (bounded memory), the final record at the end, then a merge
into the database in the background. Imports no DuckDB itself."""
from __future__ import annotations

import json
import os

from . import History
from .schema import display_path, raw_path

_dumps = json.JSONEncoder(ensure_ascii=False).encode


def _path_fields(path: str) -> str:
    """The JSON fields naming ``path``: "path", and "path_raw" (hex of the
    exact bytes) when the name is not valid UTF-8 (see schema.display_path).
    The common plain case skips the encoder."""
    if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
        return f'"path":"{path}"'
    raw = raw_path(path)
    if raw is None:
        return f'"path":{_dumps(path)}'
    return f'"path":{_dumps(display_path(path))},"path_raw":"{raw.hex()}"'


class RunRecorder:
    """Records one run. HistoryError (from History) if the run cannot even
    be started in the history. Once started, a history that fails (its disk
    full, an I/O error) never fails the run it records: recording stops,
    ``failed`` says why, and the caller reports it (a daemon logs it, the
    CLI prints a warning); the run's record stays "running" with the pid of
    a process that is gone, which the next merge takes for an abandoned run.

    ``deferred``: the run's start record is not written here (an fsync) but
    by ``begin``, which the caller runs before ``finish`` where waiting on
    the disk holds nothing up (a daemon: its records thread)."""

    def __init__(self, history_path: str | None, command: str, source: str, destination: str,
                 deferred: bool = False):
        import time
        self.history = History(history_path)
        self.run = self.history.start_run(command, source, destination, write=not deferred)
        self._start = (command, source, destination, time.time()) if deferred else None
        self.failed = ""
        try:
            self._manifest = open(self.run.manifest, "w", encoding="utf-8", buffering=1 << 20)
            self._files = open(self.run.files, "w", encoding="utf-8", buffering=1 << 20)
        except OSError as exc:
            from . import HistoryError
            raise HistoryError(self.history.path, f"cannot record the run ({exc.strerror or exc}); "
                                                  "use --history PATH or --no-history") from None

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def begin(self) -> None:
        """Write the start record of a ``deferred`` recorder (a failure:
        ``failed``, the run goes on unrecorded)."""
        if self._start is not None and not self.failed:
            try:
                self.history.write_start(self.run, *self._start[:3], started=self._start[3])
            except OSError as exc:              # (the spool files stay open: the run writes them meanwhile;
                self.failed = f"{self.history.path}: {exc.strerror or exc}"     # finish closes them)
            self._start = None

    def _fail(self, exc: OSError) -> None:
        if not self.failed:
            self.failed = f"{self.history.path}: {exc.strerror or exc}"
        for f in (self._manifest, self._files):
            try:
                f.close()
            except OSError:
                pass

    def _write(self, f, line: str) -> None:
        if not self.failed:
            try:
                f.write(line)
            except OSError as exc:
                self._fail(exc)

    def entry(self, path: str, e, blake3: str | None) -> None:
        # Formatted by hand: this runs once per file of the tree (json.dumps
        # of the whole row costs several times more).
        digest = "null" if blake3 is None else f'"{blake3}"'
        self._write(self._manifest, f'{{{_path_fields(path)},"kind":"{e.kind}","size":'
                                    f'{e.size if e.kind != "d" else 0},"mtime_ns":{e.mtime_ns},"mode":{e.perms},'
                                    f'"blake3":{digest}}}\n')

    def file(self, change) -> None:
        digest = "null" if change.blake3 is None else f'"{change.blake3}"'
        self._write(self._files, f'{{{_path_fields(change.path)},"action":"{change.action}","size":{change.size},'
                                 f'"literal_bytes":{change.literal},"matched_bytes":{change.matched},'
                                 f'"duration":{change.seconds:.6f},"blake3":{digest}}}\n')

    def finish(self, status: str, stats, merge: bool = True, transfer: dict | None = None,
               background=None) -> str:
        """End the run: ``stats`` (RunStats-like, None for a run that
        failed), ``transfer`` (a network run's row of the transfers table,
        schema.TRANSFER_COLUMNS); ``merge``: then merge the spool into the
        database, in a background process (``background()`` starts it, if
        given: a daemon runs one at a time), or here with
        RESYNC_HISTORY_MERGE=inline. Returns ``failed``: "" when the run is
        recorded, else why it is not."""
        # The spool files are not fsynced (that cost ~10 ms a run): the final
        # record states their sizes, and the merge keeps a file only if it is
        # complete, so a crash can lose a manifest but never shorten one.
        if self.failed:
            self._fail(OSError())               # (closes the spool files, keeps the first reason)
            return self.failed
        sizes = {}
        try:
            for key, f in (("manifest_bytes", self._manifest), ("files_bytes", self._files)):
                if not f.closed:
                    f.flush()
                    sizes[key] = f.tell()
                    f.close()
        except OSError as exc:
            self._fail(exc)
            return self.failed
        fields = dict(sizes)
        if stats is not None:
            fields |= {"files_scanned": stats.files, "files_changed": stats.files_transferred,
                      "files_deleted": stats.deleted, "bytes_scanned": stats.bytes_scanned,
                      "bytes_literal": stats.bytes_literal, "bytes_matched": stats.bytes_matched,
                      "bytes_written": stats.bytes_written, "errors": stats.errors,
                      "duration": stats.duration,
                      # nothing created, updated or deleted: the tree is the previous manifest's
                      "unchanged": not (stats.created or stats.updated or stats.deleted or stats.errors
                                        or stats.vanished or stats.files_transferred)}
        if transfer is not None:
            fields["transfer"] = transfer
        try:
            self.history.finish_run(self.run, status, fields)
        except OSError as exc:
            self._fail(exc)
            return self.failed
        if merge:
            if os.environ.get("RESYNC_HISTORY_MERGE", "background") == "inline":
                self.history.merge(hash_files=True)
            else:
                (background or self.history.merge_in_background)()
        return ""
