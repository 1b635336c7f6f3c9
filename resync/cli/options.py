"""Options and output helpers shared by several commands."""
from __future__ import annotations

import json
import sys

import click

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable statistics on stdout.")
verbose_option = click.option("-v", "--verbose", is_flag=True,
                              help="Print statistics on stderr.")


def existing_file(**kw) -> click.Path:
    return click.Path(exists=True, dir_okay=False, readable=True, **kw)


output_file = click.Path(dir_okay=False, writable=True)


def report(stats: dict, as_json: bool, verbose: bool, summary: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(stats, sort_keys=True) + "\n")
    if verbose:
        click.echo(summary, err=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def history_options(f):
    """--history PATH / RESYNC_HISTORY and --no-history."""
    f = click.option("--no-history", is_flag=True, help="Do not record this run in the history database.")(f)
    f = click.option("--history", "history_path", type=click.Path(dir_okay=False), envvar="RESYNC_HISTORY",
                     default=None, metavar="PATH",
                     help="History database (default: ~/.local/share/resync/history.duckdb; env RESYNC_HISTORY).")(f)
    return f


def recorded(record: bool, history_path, command: str, source: str, destination: str, work):
    """Run ``work(on_entry, on_file)`` (returns stats with the SyncStats
    counters) and record it in the history unless ``record`` is false: the
    run is marked failed if ``work`` raises."""
    if not record:
        return work(None, None)
    import os

    from ..store.recorder import RunRecorder
    from ..sync import FileChange
    recorder = RunRecorder(history_path, command, os.path.abspath(source), os.path.abspath(destination))

    def on_file(path, action, size, literal, matched, seconds, digest):
        recorder.file(FileChange(path, action, size, literal, matched, seconds, digest))

    try:
        stats = work(recorder.entry, on_file)
    except BaseException:
        recorder.finish("failed", None)
        raise
    recorder.finish("partial" if stats.errors else "vanished" if stats.vanished else "ok", stats)
    return stats
