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
    """An input file that must exist (else a usage error, 2); whether it can be
    read is the command's own check (a file error, 3)."""
    return click.Path(exists=True, dir_okay=False, readable=False, **kw)


output_file = click.Path(dir_okay=False)     # whether it can be written: a file error (3) when it is


_DIGITS = frozenset("01234567")


def printable(text: str) -> str:
    """``text`` as it may reach a terminal or a script reading lines, escaped
    the way rsync escapes file names: each byte of a control character (C0 but
    tab, DEL, C1), of a line or paragraph separator (U+2028, U+2029: Python's
    splitlines() splits there) and of a name that is not valid UTF-8 (the
    surrogate-escaped bytes of os.fsdecode) becomes ``\\#ooo`` (three octal
    digits), and so does a backslash that would start such an escape. So a
    name cannot forge report lines or send escape sequences to a terminal.
    JSON output is not escaped this way (JSON has its own)."""
    if text.isprintable() and "\\#" not in text:
        return text
    out = []
    for i, ch in enumerate(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:                       # a byte that was not UTF-8
            out.append(f"\\#{o - 0xDC00:03o}")
        elif (o < 0x20 and ch != "\t") or 0x7F <= o <= 0x9F or o in (0x2028, 0x2029) or 0xD800 <= o <= 0xDFFF:
            out.extend(f"\\#{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
        elif ch == "\\" and text[i + 1:i + 2] == "#" and len(text) >= i + 5 \
                and set(text[i + 2:i + 5]) <= _DIGITS:
            out.append("\\#134")
        else:
            out.append(ch)
    return "".join(out)


def emit(line: str, stream) -> None:
    """Print one output line (``printable``) to ``stream`` (itemized lines:
    stdout, or stderr under --json); OutputClosed if the stream's reader is
    gone (``| head``): the run stops, rather than each file failing."""
    try:
        print(printable(line), file=stream)
    except BrokenPipeError:
        from ..errors import OutputClosed
        raise OutputClosed() from None


def say(text: str, err: bool = False) -> None:
    """One line for a person or a script (``printable``): stdout, or stderr."""
    click.echo(printable(text), err=err)


def report(stats: dict, as_json: bool, verbose: bool, summary: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(stats, sort_keys=True) + "\n")
    if verbose:
        say(summary, err=True)


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
    """Run ``work(on_entry, on_file)`` (returns stats with the RunStats
    counters; the callbacks as resync.report.Report takes them) and record it
    in the history unless ``record`` is false: the run is marked failed if
    ``work`` raises."""
    if not record:
        return work(None, None)
    import os

    from ..store.recorder import RunRecorder
    recorder = RunRecorder(history_path, command, os.path.abspath(source), os.path.abspath(destination))
    try:
        stats = work(recorder.entry, recorder.file)
    except BaseException:
        recorder.finish("failed", None)
        raise
    warn_unrecorded(recorder.finish("partial" if stats.errors else "vanished" if stats.vanished else "ok", stats))
    return stats


def warn_unrecorded(why: str) -> None:
    """One line on stderr when a run that went well could not be recorded
    (RunRecorder.finish's answer): the run's own exit code stands."""
    if why:
        import sys
        print(printable(f"resync: warning: the run is not recorded in the history: {why}"), file=sys.stderr)


def parse_rate(value: str) -> float:
    """Bytes per second from ``value``: a number with an optional K, M or G
    (powers of 1024) and B/s. ValueError with a one-line message."""
    text = str(value).strip().upper().rstrip("B").rstrip("/S").rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        rate = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ValueError(f"{value!r}: expected bytes per second, e.g. 500K or 10M") from None
    if not 0 < rate < 1 << 62:
        raise ValueError(f"{value!r}: must be more than 0 and finite")
    return rate


def rate_option(ctx, param, value):
    """click callback of --bwlimit."""
    import click
    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def duration_option(ctx, param, value):
    """click callback of a duration: 90, 90s, 15m, 6h, 7d as seconds."""
    if value is None:
        return None
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 1)
    try:
        seconds = float(text[:-1] if text[-1:] in "smhd" else text) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a duration, e.g. 90s, 15m, 6h or 7d") from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r}: must be more than 0")
    return seconds
