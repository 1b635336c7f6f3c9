import sys

import click

from .options import history_options, human, say


@click.command("history")
@click.option("--run", "run_id", metavar="ID", help="Show one run's changed files (an ID prefix is enough).")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Runs to list.")
@click.option("--prune", "prune_days", type=click.FloatRange(min=0), default=None, metavar="DAYS",
              help="Forget the file lists and manifests of runs older than DAYS days (runs and transfers "
                   "stay, and each destination's newest manifest).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@history_options
def command(run_id, limit, prune_days, as_json, history_path, no_history):
    """List recent runs, or one run's files, from the history database;
    or prune it (--prune DAYS).

    Example: resync history --run 3f2a
    """
    import json

    from ..store import History

    history = History(history_path)
    if prune_days is not None:
        gone = history.prune(prune_days, wait=30.0)
        if as_json:
            sys.stdout.write(json.dumps(gone) + "\n")
        else:
            say(f"pruned {gone['runs']} runs older than {prune_days:g} days: {gone['run_files']} changed-file rows "
                f"and {gone['manifest_rows']} manifest rows (runs and transfers kept)")
        return
    history.merge(wait=5.0)
    if run_id:
        cols, rows = history.query("SELECT id FROM runs WHERE id LIKE ? || '%' ORDER BY started DESC", [run_id])
        if not rows:
            from ..errors import FileError
            raise FileError(run_id, "no such run in the history")
        full = rows[0][0]
        cols, rows = history.query("SELECT path, action, size, literal_bytes, matched_bytes, duration, blake3, "
                                   "path_raw FROM run_files WHERE run_id = ? ORDER BY path", [full])
    else:
        cols, rows = history.query(
            "SELECT id, strftime(started, '%Y-%m-%d %H:%M:%S') AS started, status, source, destination, "
            "files_scanned, files_changed, files_deleted, bytes_written, bytes_matched, errors, "
            "round(duration, 3) AS duration FROM runs ORDER BY runs.started DESC LIMIT ?", [limit])
    if run_id:                  # names as the file system's bytes (see store.schema.stored_path)
        from ..store.schema import stored_path
        rows = [(stored_path(r[0], r[-1]), *r[1:-1]) for r in rows]
        cols = cols[:-1]
    if as_json:
        sys.stdout.write(json.dumps([dict(zip(cols, r)) for r in rows], default=str) + "\n")
        return
    if run_id:
        for path, action, size, literal, matched, seconds, digest in rows:
            say(f"{action:6} {human(size or 0):>10}  literal {human(literal or 0):>10}  "
                       f"reused {human(matched or 0):>10}  {path}")
        return
    for r in rows:
        d = dict(zip(cols, r))
        say(f"{d['id'][:12]}  {d['started']}  {d['status']:10} {d['files_changed'] or 0:>7} changed "
                   f"{d['files_deleted'] or 0:>6} deleted {human(d['bytes_written'] or 0):>10}  "
                   f"{d['source']} -> {d['destination']}")
