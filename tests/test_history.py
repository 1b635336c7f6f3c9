"""History in DuckDB: runs, files and manifests recorded; killed runs never
recorded as success; a reader and a writer in two processes never see a lock
error; resync verify finds drift and corruption."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resync.store import History
from resync.store.recorder import RunRecorder
from resync.sync import SyncOptions, Syncer

from . import mix

PY = sys.executable


def cli(*args, history, env_extra=None):
    env = dict(os.environ, RESYNC_HISTORY=str(history), RESYNC_HISTORY_MERGE="inline", **(env_extra or {}))
    return subprocess.run([PY, "-m", "resync", *map(str, args)], capture_output=True, text=True, env=env)


def tree(root: Path, n: int = 20) -> None:
    """Files of every content kind of the test mix (one is empty), in two directories, and a link."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mix.write(root / ("sub" if i % 2 else "") / f"f{i}", i, 100 + i * 37, mix.KINDS[i % len(mix.KINDS)])
    os.symlink("f0", root / "link")


def test_runs_files_and_manifests_are_recorded(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src)
    assert cli("sync", src, dst, history=db).returncode == 0
    (src / "f0").write_bytes(b"changed")
    assert cli("sync", src, dst, history=db).returncode == 0
    h = History(db)
    _, runs = h.query("SELECT id, status, files_scanned, files_changed, bytes_written, finished IS NOT NULL "
                      "FROM runs ORDER BY started")
    assert [(r[1], r[2], r[3], r[5]) for r in runs] == [("ok", 20, 20, True), ("ok", 20, 1, True)]
    assert runs[1][4] == len(b"changed")
    _, files = h.query("SELECT path, action, size, blake3 FROM run_files WHERE run_id = ?", [runs[1][0]])
    import blake3
    assert files == [("f0", "update", 7, blake3.blake3(b"changed").hexdigest())]
    # The second manifest is complete: every file hashed (19 carried over, 1 new).
    _, man = h.query("SELECT path, kind, blake3 FROM manifests WHERE run_id = ? ORDER BY path", [runs[1][0]])
    assert len(man) == 22                      # 20 files, sub/, link
    for path, kind, digest in man:
        if kind == "f":
            assert digest == blake3.blake3((dst / path).read_bytes()).hexdigest()
    r = cli("history", "--json", history=db)
    assert [x["status"] for x in json.loads(r.stdout)] == ["ok", "ok"]
    r = cli("history", "--run", runs[1][0][:8], history=db)
    assert r.returncode == 0 and "f0" in r.stdout and "update" in r.stdout


def test_manifest_keeps_awkward_names(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    names = ['we"ird', "back\\slash", "tab\there", "été", "日本", "new\nline"]
    for n in names:
        (src / n).write_bytes(n.encode())
    (src / "big").write_bytes(os.urandom(3 << 20))        # hashed after a whole-file copy
    assert cli("sync", src, dst, history=db).returncode == 0
    _, rows = History(db).query("SELECT path, blake3 FROM manifests ORDER BY path")
    import blake3
    assert sorted(p for p, _ in rows) == sorted(names + ["big"])
    assert all(d == blake3.blake3((dst / p).read_bytes()).hexdigest() for p, d in rows)


def test_names_that_are_not_utf8_are_recorded_exactly(tmp_path):
    """A VARCHAR cannot hold them: path shows \\xHH, path_raw has the bytes;
    verify and the merge's hashing find the real files (DST's own name is
    not UTF-8 either)."""
    import blake3
    db, src = tmp_path / "h.duckdb", tmp_path / "src"
    dst = os.fsdecode(os.fsencode(tmp_path) + b"/dst-\xff")
    src.mkdir()
    bad_dir = os.fsencode(src) + b"/r\xe9pertoire"
    os.mkdir(bad_dir)
    names = {b"caf\xe9": b"latin-1", b"r\xe9pertoire/\xff\xfe": b"bytes", b"caf\\xe9": b"a literal backslash"}
    for name, data in names.items():
        with open(os.fsencode(src) + b"/" + name, "wb") as f:
            f.write(data)
    assert cli("sync", "--no-history", src, dst, history=db).returncode == 0
    (src / "new").write_bytes(b"n")
    r = cli("sync", src, dst, history=db)                      # hashes the files already in place
    assert r.returncode == 0, r.stderr
    _, rows = History(db).query("SELECT path, path_raw, blake3 FROM manifests WHERE kind = 'f' ORDER BY path")
    got = {(path, None if raw is None else bytes(raw)): digest for path, raw, digest in rows}
    assert got == {("caf\\xe9", b"caf\xe9"): blake3.blake3(b"latin-1").hexdigest(),
                   ("caf\\xe9", None): blake3.blake3(b"a literal backslash").hexdigest(),
                   ("r\\xe9pertoire/\\xff\\xfe", b"r\xe9pertoire/\xff\xfe"): blake3.blake3(b"bytes").hexdigest(),
                   ("new", None): blake3.blake3(b"n").hexdigest()}
    _, runs = History(db).query("SELECT destination FROM runs")
    assert runs == [(str(tmp_path) + "/dst-\\xff",)]
    r = cli("verify", dst, history=db)
    assert r.returncode == 0, r.stderr
    with open(os.fsencode(dst) + b"/caf\xe9", "r+b") as f:       # same size and mtime, other bytes
        st = os.fstat(f.fileno())
        f.write(b"LATIN-1")
    os.utime(os.fsencode(dst) + b"/caf\xe9", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = subprocess.run([PY, "-m", "resync", "verify", dst], capture_output=True,
                       env=dict(os.environ, RESYNC_HISTORY=str(db)))
    assert r.returncode == 5 and r.stdout == b"corrupt  caf\\#351\n", r.stderr     # rsync's escape of byte 0xe9
    # itemized names are escaped the same way, whatever the locale (here: strict UTF-8)
    r = subprocess.run([PY, "-m", "resync", "sync", "-n", "-i", "--checksum", "--no-history", str(src), dst],
                       capture_output=True, env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))   # as in a UTF-8 locale
    assert r.returncode == 0 and r.stdout == b">fc........ caf\\#351\n", r.stderr


def test_unknown_hashes_are_filled_in_later_without_holding_the_database(tmp_path, monkeypatch):
    import blake3

    from resync import scan as tree
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree_files = 30
    (src / "a" / "b").mkdir(parents=True)
    for i in range(tree_files):
        (src / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "") / f"f{i}").write_bytes(os.urandom(i * 50))
    Syncer(str(src), str(dst), SyncOptions()).run()                  # files already in place, unrecorded
    rec = RunRecorder(str(db), "sync", str(src), str(dst))
    stats = Syncer(str(src), str(dst), SyncOptions(hash_files=True), on_entry=rec.entry, on_file=rec.file).run()
    rec.finish("ok", stats, merge=False)
    assert History(db).merge() == 1                                   # as a reader merges: no hashing
    _, rows = History(db).query("SELECT count(blake3) FROM manifests WHERE kind = 'f'")
    assert rows == [(0,)] and len(list(History(db).spool_dir.glob("*.hash"))) == 1
    real, seen = tree.hash_under, []

    def hash_under(root, files):
        # While the files are hashed, another process may write the database.
        con = History(db)._connect(read_only=False, wait=0.5)
        con.close()
        seen.append(len(files))
        return real(root, files)

    monkeypatch.setattr(tree, "hash_under", hash_under)
    assert History(db).merge(hash_files=True) == 0
    assert seen == [tree_files]
    _, rows = History(db).query("SELECT path, blake3 FROM manifests WHERE kind = 'f'")
    assert len(rows) == tree_files
    assert all(d == blake3.blake3((dst / p).read_bytes()).hexdigest() for p, d in rows)
    assert not [p for p in History(db).spool_dir.glob("*") if p.name.endswith((".hash", ".ndjson"))]
    assert cli("verify", dst, history=db).returncode == 0


def test_first_run_over_existing_files_hashes_them(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src, 6)
    assert cli("sync", "--no-history", src, dst, history=db).returncode == 0
    assert cli("sync", src, dst, history=db).returncode == 0        # nothing transferred
    _, rows = History(db).query("SELECT count(*), count(blake3) FROM manifests WHERE kind = 'f'")
    assert rows == [(6, 6)]


def test_killed_run_is_recorded_as_incomplete(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src)
    rec = RunRecorder(str(db), "sync", str(src), str(dst))
    # Simulate a process that died mid-run: its spool says running, its pid is gone.
    record = json.loads(rec.run.record.read_text())
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    record["pid"] = dead.pid
    rec.run.write_record(record)
    Syncer(str(src), str(dst), SyncOptions(hash_files=True), on_entry=rec.entry, on_file=rec.file).run()
    rec._manifest.write('{"path": "torn')           # a torn last line
    rec._manifest.flush()
    assert History(db).merge() == 1
    _, rows = History(db).query("SELECT status, finished FROM runs")
    assert rows == [("incomplete", None)]
    _, rows = History(db).query("SELECT count(*) FROM manifests")
    assert rows == [(0,)]
    r = cli("verify", dst, history=db)
    assert r.returncode == 5 and "no recorded sync" in r.stderr


def test_running_spool_of_a_live_process_is_left_alone(tmp_path):
    db = tmp_path / "h.duckdb"
    rec = RunRecorder(str(db), "sync", "/s", "/d")
    assert History(db).merge() == 0 and rec.run.record.exists()


@pytest.mark.slow
def test_reader_and_writer_processes_never_see_a_lock_error(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src, 50)
    reader = subprocess.Popen([PY, "-c", f"""
import time, sys
from resync.store import History
h = History({str(db)!r})
n = 0
end = time.monotonic() + 8
while time.monotonic() < end:
    h.query("SELECT count(*) FROM runs")      # each query opens, reads, closes
    n += 1
print(n)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = []
    for i in range(8):
        (src / "f0").write_bytes(os.urandom(1000 + i))
        r = cli("sync", src, dst, history=db)
        codes.append((r.returncode, r.stderr))
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert int(out) > 10 and err == ""
    assert all(code == 0 and e == "" for code, e in codes), codes
    History(db).merge()
    _, rows = History(db).query("SELECT count(*), count(*) FILTER (status = 'ok') FROM runs")
    assert rows == [(8, 8)]


def test_verify_reports_drift_and_corruption(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src)
    assert cli("sync", src, dst, history=db).returncode == 0
    r = cli("verify", dst, history=db)
    assert r.returncode == 0, r.stderr
    # Same size and mtime, different bytes: only the hash can tell.
    victim = dst / "sub" / "f1"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    (dst / "f2").unlink()
    (dst / "stray").write_bytes(b"?")
    (dst / "newdir").mkdir()
    (dst / "newdir" / "x").write_bytes(b"x")
    (dst / "f4").chmod(0o600)                       # mode
    (dst / "sub" / "f3").write_bytes(b"longer than before" * 40)       # size
    (dst / "f6").unlink()
    os.symlink("f0", dst / "f6")                    # kind
    r = cli("verify", "--json", dst, history=db)
    assert r.returncode == 5
    report = json.loads(r.stdout)
    assert report["corrupt"] == ["sub/f1"] and report["missing"] == ["f2"]
    assert report["extra"] == ["newdir", "newdir/x", "stray"]
    assert report["changed"] == ["f4", "f6", "sub/f3"]
    assert report["checked"] == 22 - 1 and report["unhashed"] == 0


def test_unwritable_history_is_a_clear_error_before_any_change(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, 3)
    r = cli("sync", src, dst, history="/proc/no-such-dir/h.duckdb")
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    assert "cannot record the run" in r.stderr and not dst.exists()
    assert cli("sync", "--no-history", src, dst, history="/proc/no-such-dir/h.duckdb").returncode == 0


def test_unchanged_run_shares_the_previous_manifest(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src)
    for _ in range(3):
        assert cli("sync", src, dst, history=db).returncode == 0
    h = History(db)
    _, runs = h.query("SELECT id, manifest_run FROM runs ORDER BY started")
    assert len(runs) == 3 and runs[0][1] == runs[0][0]
    assert runs[1][1] == runs[2][1] == runs[0][0]           # no copies of an unchanged tree
    _, rows = h.query("SELECT count(DISTINCT run_id) FROM manifests")
    assert rows == [(1,)]
    assert cli("verify", dst, history=db).returncode == 0
    (src / "f3").write_bytes(b"changed")
    assert cli("sync", src, dst, history=db).returncode == 0
    _, runs = h.query("SELECT id, manifest_run FROM runs ORDER BY started")
    assert runs[3][1] == runs[3][0]
    assert cli("verify", dst, history=db).returncode == 0


def test_migration_from_version_1(tmp_path):
    import duckdb

    from resync.store.schema import MIGRATIONS
    db = tmp_path / "h.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for sql in MIGRATIONS[0][1]:
        con.execute(sql)
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.execute("INSERT INTO runs (id, started, source, destination, status) VALUES "
                "('a', now()::TIMESTAMP, '/s', '/d', 'ok'), ('b', now()::TIMESTAMP, '/s', '/d', 'incomplete')")
    con.execute("INSERT INTO manifests VALUES ('a', 'f', 'f', 1, 1, 420, NULL)")
    con.close()
    h = History(db)
    RunRecorder(str(db), "sync", "/s", "/x").finish("ok", None)     # any write opens and migrates
    from resync.store.schema import SCHEMA_VERSION
    _, rows = h.query("SELECT max(version) FROM schema_version")
    assert rows == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 9
    _, rows = h.query("SELECT count(*) FROM transfers")
    assert rows == [(0,)]
    _, rows = h.query("SELECT count(*) FROM relay_events")
    assert rows == [(0,)]
    _, rows = h.query("SELECT path, path_raw, mtime_ns, typeof(mtime_ns) FROM manifests")
    assert rows == [("f", None, 1, "HUGEINT")]
    _, rows = h.query("SELECT id, manifest_run FROM runs WHERE id IN ('a', 'b') ORDER BY id")
    assert rows == [("a", "a"), ("b", None)]


def test_manifest_cut_short_by_a_crash_is_not_kept(tmp_path):
    db, src, dst = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "dst"
    tree(src)
    rec = RunRecorder(str(db), "sync", str(src), str(dst))
    stats = Syncer(str(src), str(dst), SyncOptions(hash_files=True), on_entry=rec.entry, on_file=rec.file).run()
    rec.finish("ok", stats, merge=False)
    # The record survived, the unsynced manifest lost its tail.
    with open(rec.run.manifest, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    assert History(db).merge() == 1
    _, rows = History(db).query("SELECT status, manifest_run FROM runs")
    assert rows == [("ok", None)]
    _, rows = History(db).query("SELECT count(*) FROM manifests")
    assert rows == [(0,)]


def test_pruning_forgets_old_file_lists_and_manifests_but_keeps_runs_and_what_verify_needs(tmp_path):
    """Retention (a server's history grew 18 MB in an afternoon): the runs
    older than DAYS lose their changed-file rows and the manifests nothing
    newer needs; every runs and transfers row stays, and each destination's
    newest manifest — shared by a run that changed nothing — so verify
    still works and the next run still carries hashes over."""
    db, src, one, two = tmp_path / "h.duckdb", tmp_path / "src", tmp_path / "one", tmp_path / "two"
    tree(src)
    assert cli("sync", src, one, history=db).returncode == 0           # A: manifest A
    (src / "f0").write_bytes(b"changed")
    assert cli("sync", src, one, history=db).returncode == 0           # B: manifest B
    assert cli("sync", src, one, history=db).returncode == 0           # C: nothing changed, shares B's
    assert cli("sync", src, two, history=db).returncode == 0           # D: manifest D
    h = History(db)
    _, runs = h.query("SELECT id, manifest_run FROM runs ORDER BY started")
    (a, ma), (b, mb), (c, mc), (d, md) = runs
    assert (ma, mb, mc, md) == (a, b, b, d)
    _, before = h.query("SELECT run_id, count(*) FROM manifests GROUP BY run_id ORDER BY run_id")
    _, files_before = h.query("SELECT count(*) FROM run_files")
    import time
    assert h.prune(30) == {"runs": 0, "run_files": 0, "manifest_rows": 0}       # nothing that old
    gone = h.prune(1, now=time.time() + 3 * 86400)                   # every run is old now
    # A (its tree and files), B and D (their changed files); C changed nothing and keeps B's tree
    assert gone == {"runs": 3, "run_files": files_before[0][0], "manifest_rows": dict(before)[a]}
    _, after = h.query("SELECT id, manifest_run FROM runs ORDER BY started")
    assert after == [(a, None), (b, b), (c, b), (d, d)]             # the summaries stay, A's tree is gone
    _, kept = h.query("SELECT DISTINCT run_id FROM manifests ORDER BY run_id")
    assert [k[0] for k in kept] == sorted([b, d])
    _, left = h.query("SELECT count(*) FROM run_files")
    assert left == [(0,)]
    assert cli("verify", one, history=db).returncode == 0            # C -> B's manifest: still there
    assert cli("verify", two, history=db).returncode == 0
    (src / "f1").write_bytes(b"changed too")
    assert cli("sync", src, one, history=db).returncode == 0         # the next run reads B's hashes
    r = cli("history", "--prune", "0", "--json", history=db)
    # B and C (B's tree: E's is the newest of one now) and E (its changed file); D keeps two's tree
    assert r.returncode == 0 and json.loads(r.stdout)["runs"] == 3
    r = cli("history", "--prune", "10", history=db)
    assert r.returncode == 0 and r.stdout.startswith("pruned 0 runs older than 10 days")
