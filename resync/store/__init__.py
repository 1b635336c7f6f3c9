"""Transfer history and destination manifests in DuckDB — the only DuckDB code.

Concurrency. DuckDB lets one process at a time hold a database file (even a
read-only holder blocks writers), and a notebook, a cron run and a one-shot
sync may all want the history at once. So nobody holds it for long:

- A run never writes the database while it works. It writes a spool in the
  history's directory instead (``<db>.spool/<run id>.*``): the run record at
  start (status ``running``, pid, host), then, as it goes, its manifest and
  changed files as newline-delimited JSON, and at the end the final record.
- Merging a spool into the database is one short transaction (DuckDB reads
  the JSON itself), done by the run at its end and by any later history
  reader. Connections are opened per operation and retried with backoff while
  another process holds the file; if the database stays busy the spool simply
  waits for the next merge — nothing is lost and no lock error reaches anyone.
- A spool still marked ``running`` whose process is gone (killed) is merged
  as ``incomplete``: a killed run is never recorded as a success.

Readers (``History.query``, the notebook) open read-only per query and copy
the rows out, holding the lock for milliseconds.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ResyncError
from .schema import MIGRATIONS, RUN_COLUMNS, SCHEMA_VERSION, display_path, stored_path

LOCK_WAIT = 30.0        # seconds a writer keeps retrying a busy database before leaving the spool


class HistoryError(ResyncError):
    """history database {}: {}"""

    exit_code = 3


def default_path() -> Path:
    env = os.environ.get("RESYNC_HISTORY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "resync" / "history.duckdb"


def _flock(f, wait: float) -> bool:
    """An exclusive lock on open file ``f``, trying for ``wait`` seconds."""
    import fcntl
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _hostname() -> str:
    return os.uname().nodename          # what socket.gethostname() returns, without importing socket


def _busy(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunSpool:
    """The files a run writes while it works (merged into the database later)."""
    directory: Path
    run_id: str

    @property
    def record(self) -> Path:
        return self.directory / f"{self.run_id}.run.json"

    @property
    def manifest(self) -> Path:
        return self.directory / f"{self.run_id}.manifest.ndjson"

    @property
    def files(self) -> Path:
        return self.directory / f"{self.run_id}.files.ndjson"

    def write_record(self, record: dict) -> None:
        tmp = self.record.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record)

    def remove(self) -> None:
        for p in (self.record, self.manifest, self.files):
            p.unlink(missing_ok=True)


class History:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_path()
        self.spool_dir = self.path.with_name(self.path.name + ".spool")

    # ----------------------------------------------------------- connections
    def _connect(self, read_only: bool, wait: float = LOCK_WAIT):
        import duckdb
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            try:
                if read_only and not self.path.exists():
                    return None
                if not read_only:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.Error as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    if _busy(exc):
                        raise TimeoutError(str(exc)) from None
                    raise HistoryError(self.path, str(exc).splitlines()[0]) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
            except OSError as exc:
                raise HistoryError(self.path, exc.strerror or str(exc)) from None
        if not read_only:
            try:
                self._migrate(con)
            except BaseException:
                con.close()
                raise
        return con

    def _migrate(self, con) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise HistoryError(self.path, f"schema version {current} is newer than this resync ({SCHEMA_VERSION})")
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            con.execute("BEGIN")
            for sql in statements:
                con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?)", [version])
            con.execute("COMMIT")

    def query(self, sql: str, params: list | None = None, wait: float = LOCK_WAIT,
              merge: bool = True) -> tuple[list[str], list[tuple]]:
        """Run a read-only query: (column names, rows). Empty when there is no
        history yet. Pending run spools are merged first (``merge``)."""
        if merge and self.spool_dir.is_dir() and (any(self.spool_dir.glob("*.run.json"))
                                                  or any(self.spool_dir.glob("*.relay.json"))):
            self.merge(wait)
        try:
            con = self._connect(read_only=True, wait=wait)
        except TimeoutError as exc:
            raise HistoryError(self.path, f"busy for {wait:.0f} s: {exc}") from None
        if con is None:
            return [], []
        try:
            cur = con.execute(sql, params or [])
            return [d[0] for d in cur.description], cur.fetchall()
        finally:
            con.close()

    def rows(self, sql: str, params: list | None = None, wait: float = LOCK_WAIT, batch: int = 8192):
        """Like ``query`` (no merge), but yields the rows in batches as they
        are fetched, so a large result is never held whole; the read-only
        connection stays open until the iteration ends."""
        try:
            con = self._connect(read_only=True, wait=wait)
        except TimeoutError as exc:
            raise HistoryError(self.path, f"busy for {wait:.0f} s: {exc}") from None
        if con is None:
            return
        try:
            cur = con.execute(sql, params or [])
            while chunk := cur.fetchmany(batch):
                yield from chunk
        finally:
            con.close()

    # ----------------------------------------------------------------- spools
    def start_run(self, command: str, source: str, destination: str, write: bool = True) -> RunSpool:
        """A new run's spool, its start record written (``write``; else
        the caller writes it later: ``write_start``). HistoryError."""
        run = RunSpool(self.spool_dir, os.urandom(16).hex())
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            if write:
                self.write_start(run, command, source, destination)
        except OSError as exc:
            raise HistoryError(self.path, f"cannot record the run ({exc.strerror or exc}); "
                                          "use --history PATH or --no-history") from None
        return run

    def write_start(self, run: RunSpool, command: str, source: str, destination: str,
                    started: float | None = None) -> None:
        """The run's start record, durably (OSError). ``started``: Unix
        time (default: now)."""
        from .. import __version__ as version
        run.write_record({"id": run.run_id, "command": command, "source": source,
                          "destination": destination, "status": "running",
                          "started": time.time() if started is None else started, "pid": os.getpid(), "host": _hostname(),
                          "version": version})

    def finish_run(self, run: RunSpool, status: str, stats: dict) -> None:
        record = json.loads(run.record.read_text())
        record.update(stats)
        record["status"] = status
        record["finished"] = time.time()
        run.write_record(record)

    def merge_in_background(self):
        """Merge spools in a detached process, so a command returns without
        waiting for DuckDB (readers merge pending spools first anyway).
        Returns the process (subprocess.Popen), None if it could not start."""
        import subprocess
        import sys
        try:
            return subprocess.Popen([sys.executable, "-m", "resync.store", "merge", str(self.path)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError:
            return None     # the next reader or run merges the spool

    def prune(self, keep_days: float, wait: float = LOCK_WAIT, now: float | None = None) -> dict:
        """Retention: forget the per-file detail of the runs started more
        than ``keep_days`` days before ``now`` (Unix time; default: now) —
        their changed files (run_files) and the manifests no other run
        needs — keeping every runs and transfers row (the summaries) and
        each destination's newest manifest (what ``verify`` and the next
        run read), and the manifests the kept runs share. Returns the counts
        removed: {"runs": old runs that lost rows, "run_files": rows,
        "manifest_rows": rows}. HistoryError if the database stays busy for
        ``wait`` s. The file does not shrink: DuckDB reuses the freed blocks."""
        self.merge(wait)
        try:
            con = self._connect(read_only=False, wait=wait)
        except TimeoutError as exc:
            raise HistoryError(self.path, f"busy for {wait:.0f} s: {exc}") from None
        cutoff = (time.time() if now is None else now) - keep_days * 86400
        old = "started < to_timestamp(?)::TIMESTAMP"          # (as the merge writes it)
        try:
            con.execute("BEGIN")
            con.execute(f"""CREATE TEMP TABLE keep AS SELECT DISTINCT manifest_run AS id FROM runs
                            WHERE manifest_run IS NOT NULL AND (NOT ({old}) OR id IN (
                                SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY destination
                                                ORDER BY started DESC) AS n FROM runs
                                                WHERE manifest_run IS NOT NULL) WHERE n = 1))""", [cutoff])
            runs = con.execute(f"SELECT count(*) FROM runs WHERE {old} AND ((manifest_run IS NOT NULL AND "
                               "manifest_run NOT IN (SELECT id FROM keep)) OR EXISTS "
                               "(SELECT 1 FROM run_files f WHERE f.run_id = runs.id))", [cutoff]).fetchone()[0]
            manifest_rows = con.execute("DELETE FROM manifests WHERE run_id NOT IN (SELECT id FROM keep)"
                                        ).fetchone()[0]
            con.execute("UPDATE runs SET manifest_run = NULL WHERE manifest_run IS NOT NULL "
                        "AND manifest_run NOT IN (SELECT id FROM keep)")
            run_files = con.execute(f"DELETE FROM run_files WHERE run_id IN (SELECT id FROM runs WHERE {old})",
                                    [cutoff]).fetchone()[0]
            con.execute("DROP TABLE keep")
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        except BaseException:
            con.close()
            raise
        con.close()
        return {"runs": runs, "run_files": run_files, "manifest_rows": manifest_rows}

    def merge(self, wait: float = LOCK_WAIT, hash_files: bool = False) -> int:
        """Move finished (or abandoned) spools into the database. Returns how
        many runs were merged; leaves spools alone while the database or
        another merger stays busy for ``wait`` seconds.

        ``hash_files``: then hash the destination files whose BLAKE3 no run
        has recorded (see _hash_pending). Only the background merger and
        inline merges do; a reader never waits for that."""
        if not self.spool_dir.is_dir():
            return 0
        # One merger at a time (a background merge and a reader may race for
        # the same spool); the lock is on a file beside the spools.
        with open(self.spool_dir / ".merge.lock", "a") as lock:
            merged = self._merge_locked(wait) if _flock(lock, wait) else 0
        if hash_files:
            self._hash_pending(wait)
        return merged

    def record_relay_events(self, node: str, events: list[dict]) -> None:
        """A relay's events (store.Spool's: at, event, id, reason, detail,
        size, priority) spooled for the ``relay_events`` table, one file
        written whole and durably (merged with the runs). OSError."""
        from ..fs import write_durable
        if not events:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        write_durable(self.spool_dir / f"{int(time.time() * 1000)}-{os.urandom(4).hex()}.relay.json",
                      json.dumps({"node": node, "events": events}).encode())

    def _merge_relay(self, con) -> int:
        files = sorted(self.spool_dir.glob("*.relay.json"))
        for path in files:
            try:
                doc = json.loads(path.read_text())
                rows = [(e["at"] / 1000, doc.get("node"), e["event"], e.get("id") or None, e.get("reason"),
                         e.get("detail") or None, e.get("size"), e.get("priority")) for e in doc["events"]]
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)    # (unreadable: written whole or not at all, so not ours)
                continue
            con.execute("BEGIN")
            con.executemany("INSERT INTO relay_events VALUES (to_timestamp(?)::TIMESTAMP, ?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
            path.unlink(missing_ok=True)
        return len(files)

    def _merge_locked(self, wait: float) -> int:
        if any(self.spool_dir.glob("*.relay.json")):
            try:
                con = self._connect(read_only=False, wait=wait)
            except TimeoutError:
                return 0
            try:
                self._merge_relay(con)
            finally:
                con.close()
        pending = []
        host = _hostname()
        for rec_path in sorted(self.spool_dir.glob("*.run.json")):
            try:
                record = json.loads(rec_path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("status") == "running":
                if record.get("host") == host and _alive(int(record.get("pid", 0))):
                    continue                  # still working
                record["status"] = "incomplete"
            pending.append((RunSpool(self.spool_dir, record["id"]), record))
        if not pending:
            return 0
        try:
            con = self._connect(read_only=False, wait=wait)
        except TimeoutError:
            return 0
        try:
            for spool, record in pending:
                self._merge_one(con, spool, record)
                spool.remove()
        finally:
            con.close()
        return len(pending)

    def _merge_one(self, con, spool: RunSpool, r: dict) -> None:
        from .schema import FILE_COLUMNS, MANIFEST_COLUMNS, SPOOL_EXPRESSIONS
        destination = display_path(r["destination"])
        con.execute("BEGIN")
        con.execute("DELETE FROM runs WHERE id = ?", [r["id"]])
        con.execute("DELETE FROM run_files WHERE run_id = ?", [r["id"]])
        con.execute("DELETE FROM manifests WHERE run_id = ?", [r["id"]])
        con.execute("DELETE FROM transfers WHERE run_id = ?", [r["id"]])
        complete = r["status"] not in ("incomplete", "failed")
        previous = con.execute(
            "SELECT manifest_run FROM runs WHERE destination = ? AND id <> ? AND manifest_run IS NOT NULL "
            "ORDER BY started DESC LIMIT 1", [destination, r["id"]]).fetchone()
        previous = previous[0] if previous else None
        unchanged = complete and previous is not None and r.get("unchanged")
        manifest_run = previous if unchanged else (r["id"] if complete else None)
        values = [r["id"], r["started"], r.get("finished"), display_path(r["source"]), destination, r["status"],
                  r.get("files_scanned"), r.get("files_changed"), r.get("files_deleted"), r.get("bytes_scanned"),
                  r.get("bytes_literal"), r.get("bytes_matched"), r.get("bytes_written"), r.get("errors"),
                  r.get("duration"), r.get("version"), r.get("host"), r.get("command"), r.get("pid"),
                  manifest_run]
        marks = ["?", "to_timestamp(?)::TIMESTAMP", "to_timestamp(?)::TIMESTAMP"] + ["?"] * (len(RUN_COLUMNS) - 3)
        con.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join(marks)})", values)
        transfer = r.get("transfer")
        if isinstance(transfer, dict):
            from .schema import TRANSFER_COLUMNS
            con.execute(f"INSERT INTO transfers (run_id, {', '.join(TRANSFER_COLUMNS)}) VALUES "
                        f"(?{', ?' * len(TRANSFER_COLUMNS)})", [r["id"], *(transfer.get(c) for c in TRANSFER_COLUMNS)])
        parts = [(spool.files, "run_files", FILE_COLUMNS)]
        if manifest_run == r["id"]:
            # A killed or failed run's manifest is partial (its last line may be
            # torn): the destination's state after it is not known, so none is
            # kept. A run that changed nothing points at the previous manifest.
            parts.append((spool.manifest, "manifests", MANIFEST_COLUMNS))
        for path, table, columns in parts:
            expected = r.get("manifest_bytes" if table == "manifests" else "files_bytes")
            if table == "manifests" and path.exists() and expected is not None \
                    and path.stat().st_size != expected:
                # Lost to a crash after the record was written: the tree is unknown.
                con.execute("UPDATE runs SET manifest_run = NULL WHERE id = ?", [r["id"]])
                continue
            if path.exists() and path.stat().st_size:
                spec = "{" + ", ".join(f"'{name}': '{kind}'" for name, kind in columns) + "}"
                names = ", ".join(name for name, _ in columns)
                values = ", ".join(SPOOL_EXPRESSIONS.get(name, name) for name, _ in columns)
                con.execute(f"INSERT INTO {table} (run_id, {names}) SELECT ?, {values} FROM read_json(?, "
                            f"format='newline_delimited', ignore_errors=true, columns={spec})", [r["id"], str(path)])
        if manifest_run == r["id"] and previous is not None:
            # Unchanged files were not re-read by the run: take their hash from
            # the previous manifest when size and mtime agree.
            con.execute("""
                UPDATE manifests AS m SET blake3 = p.blake3
                FROM (SELECT path, path_raw, size, mtime_ns, blake3 FROM manifests
                      WHERE run_id = ? AND blake3 IS NOT NULL) AS p
                WHERE m.run_id = ? AND m.kind = 'f' AND m.blake3 IS NULL AND m.path = p.path
                  AND m.path_raw IS NOT DISTINCT FROM p.path_raw AND m.size = p.size AND m.mtime_ns = p.mtime_ns""",
                        [previous, r["id"]])
        con.execute("COMMIT")
        # What is still unknown (a first run over files that were already in
        # place) is hashed later from the destination itself, without holding
        # the database: a marker names the run.
        unknown = con.execute("SELECT count(*) FROM manifests WHERE run_id = ? AND kind = 'f' "
                              "AND blake3 IS NULL", [r["id"]]).fetchone()[0]
        if unknown:
            marker = self.spool_dir / f"{r['id']}.hash"
            marker.write_text(json.dumps({"id": r["id"], "destination": r["destination"]}))

    def _hash_pending(self, wait: float) -> None:
        """Hash the files named by ``*.hash`` markers: read the rows (a short
        read-only connection), hash the files with no connection open (that
        can take minutes on a large tree), then set every hash in one UPDATE
        from a JSON file. One hasher at a time; a busy one is left alone."""
        with open(self.spool_dir / ".hash.lock", "a") as lock:
            if not _flock(lock, 0):
                return
            for marker in sorted(self.spool_dir.glob("*.hash")):
                try:
                    job = json.loads(marker.read_text())
                    self._hash_run(job["id"], job["destination"], wait)
                except TimeoutError:
                    return                      # the database stays busy: try again next time
                except (OSError, ValueError, KeyError):
                    pass
                marker.unlink(missing_ok=True)

    def _hash_run(self, run_id: str, destination: str, wait: float) -> None:
        from ..scan import hash_under
        con = self._connect(read_only=True, wait=wait)
        if con is None:
            return
        try:
            missing = con.execute("SELECT path, path_raw, size, mtime_ns FROM manifests WHERE run_id = ? "
                                  "AND kind = 'f' AND blake3 IS NULL", [run_id]).fetchall()
        finally:
            con.close()
        names = {stored_path(path, raw): (path, raw) for path, raw, _, _ in missing}
        hashes = hash_under(destination, [(stored_path(path, raw), size, mtime_ns)
                                          for path, raw, size, mtime_ns in missing])
        if not hashes:
            return
        rows = self.spool_dir / f"{run_id}.hashes.ndjson"
        try:
            with open(rows, "w", encoding="utf-8") as f:
                for name, digest in hashes.items():
                    path, raw = names[name]
                    f.write(json.dumps({"path": path, "path_raw": None if raw is None else bytes(raw).hex(),
                                        "blake3": digest}, ensure_ascii=False) + "\n")
            con = self._connect(read_only=False, wait=wait)
            try:
                con.execute("""
                    UPDATE manifests AS m SET blake3 = h.blake3
                    FROM read_json(?, format='newline_delimited',
                                   columns={'path': 'VARCHAR', 'path_raw': 'VARCHAR', 'blake3': 'VARCHAR'}) AS h
                    WHERE m.run_id = ? AND m.kind = 'f' AND m.blake3 IS NULL AND m.path = h.path
                      AND m.path_raw IS NOT DISTINCT FROM unhex(h.path_raw)""", [str(rows), run_id])
            finally:
                con.close()
        finally:
            rows.unlink(missing_ok=True)
