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
    def __init__(self, history_path: str | None, command: str, source: str, destination: str):
        self.history = History(history_path)
        self.run = self.history.start_run(command, source, destination)
        self._manifest = open(self.run.manifest, "w", encoding="utf-8", buffering=1 << 20)
        self._files = open(self.run.files, "w", encoding="utf-8", buffering=1 << 20)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def entry(self, path: str, e, blake3: str | None) -> None:
        # Formatted by hand: this runs once per file of the tree (json.dumps
        # of the whole row costs several times more).
        digest = "null" if blake3 is None else f'"{blake3}"'
        self._manifest.write(f'{{{_path_fields(path)},"kind":"{e.kind}","size":{e.size if e.kind != "d" else 0},'
                             f'"mtime_ns":{e.mtime_ns},"mode":{e.perms},"blake3":{digest}}}\n')

    def file(self, change) -> None:
        digest = "null" if change.blake3 is None else f'"{change.blake3}"'
        self._files.write(f'{{{_path_fields(change.path)},"action":"{change.action}","size":{change.size},'
                          f'"literal_bytes":{change.literal},"matched_bytes":{change.matched},'
                          f'"duration":{change.seconds:.6f},"blake3":{digest}}}\n')

    def finish(self, status: str, stats, merge: bool = True, transfer: dict | None = None) -> None:
        """End the run: ``stats`` (RunStats-like, None for a run that
        failed), ``transfer`` (a network run's row of the transfers table,
        schema.TRANSFER_COLUMNS)."""
        # The spool files are not fsynced (that cost ~10 ms a run): the final
        # record states their sizes, and the merge keeps a file only if it is
        # complete, so a crash can lose a manifest but never shorten one.
        sizes = {}
        for key, f in (("manifest_bytes", self._manifest), ("files_bytes", self._files)):
            if not f.closed:
                f.flush()
                sizes[key] = f.tell()
                f.close()
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
        self.history.finish_run(self.run, status, fields)
        if merge:
            if os.environ.get("RESYNC_HISTORY_MERGE", "background") == "inline":
                self.history.merge(hash_files=True)
            else:
                self.history.merge_in_background()
