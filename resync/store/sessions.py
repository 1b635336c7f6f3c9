"""The daemon's transfer sessions, persisted: one JSON document a session in
a directory, each replaced atomically (a temporary file, fsync, rename, the
directory fsynced) at every change of state and at checkpoints of its
progress, so that a daemon killed at any moment (SIGKILL included) finds
every session as it last recorded it.

Not in the DuckDB history: a session must be writable at any moment, and the
history's file may be held by a notebook for as long as its owner likes
(see this package's docstring); a finished session's run is recorded there
like any other (its ``runs`` and ``transfers`` rows). Imports no DuckDB.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import HistoryError

SUFFIX = ".session.json"


class SessionStore:
    """The sessions kept in ``directory`` (made 0700 on first use).
    HistoryError (exit 3) when a session cannot be written: the caller
    says so (the API answers 507, the daemon logs it)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, session_id: str) -> Path:
        if not session_id or not all(c in "0123456789abcdef" for c in session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.directory / (session_id + SUFFIX)

    def save(self, record: dict) -> None:
        """Write ``record`` (a JSON object with an ``id`` of hex digits) in
        place of the one before, atomically and durably."""
        from ..errors import ResyncError
        from ..fs import write_durable
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_durable(self._path(record["id"]), json.dumps(record, sort_keys=True).encode(), mode=0o600)
        except (OSError, ResyncError) as exc:
            raise HistoryError(self.directory, f"cannot record session {record['id']}: "
                                               f"{getattr(exc, 'strerror', None) or exc}") from None

    def remove(self, session_id: str) -> None:
        try:
            os.unlink(self._path(session_id))
            self._sync_directory()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise HistoryError(self.directory, f"cannot remove session {session_id}: {exc.strerror or exc}") \
                from None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> tuple[list[dict], list[str]]:
        """Every session recorded (oldest ``created`` first), and a line for
        each file that could not be read (left where it is, for its owner to
        look at). Temporary files of a write that was cut are removed."""
        records, problems = [], []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise HistoryError(self.directory, f"cannot read the sessions: {exc.strerror or exc}") from None
        from ..fs import TEMP_PREFIX
        for name in names:
            path = self.directory / name
            if name.startswith(TEMP_PREFIX):
                try:
                    path.unlink()
                except OSError:
                    pass
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                record = json.loads(path.read_bytes())
                if not isinstance(record, dict) or record.get("id") != name[:-len(SUFFIX)]:
                    raise ValueError("not a session record")
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")
                continue
            records.append(record)
        records.sort(key=lambda r: (r.get("created") or 0, r["id"]))
        return records, problems
