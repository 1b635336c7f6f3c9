import sys

import click

from .options import emit, history_options, human, json_option, printable, rate_option, say, warn_unrecorded


def _read_patterns(paths) -> list[str]:
    from ..errors import FileError
    patterns = []
    for path in paths:
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
        except OSError as exc:
            raise FileError.from_os(path, exc) from None
        patterns += text.splitlines()
    return patterns


def _check_dir(path: str, must_exist: bool) -> None:
    """A local SRC or DST: a directory (SRC must exist). UsageError (exit 2)."""
    import os

    from ..errors import UsageError
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise UsageError(f"Directory {path!r} is a file.")
    if must_exist:
        raise UsageError(f"Directory {path!r} does not exist.")


@click.command("sync")
@click.argument("src")
@click.argument("dst")
@click.option("-c", "--checksum", is_flag=True, help="Compare files by BLAKE3, not by size and mtime.")
@click.option("-W/--no-whole-file", "--whole-file", "whole_file", default=None,
              help="Copy changed files whole (the default for local copies), or rebuild them from the "
                   "destination's old copy with the delta engine (the default over the network).")
@click.option("-S", "--sparse", is_flag=True,
              help="Write blocks of zeros as holes in every file (a source's own holes stay holes "
                   "without it).")
@click.option("--delete", is_flag=True, help="Delete destination entries that are not in SRC "
                                              "(after all transfers succeeded).")
@click.option("--max-delete", type=click.IntRange(min=0), default=None, metavar="N",
              help="With --delete: delete nothing if more than N entries would go.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Skip paths matching PATTERN (gitignore syntax); repeatable.")
@click.option("--exclude-from", "exclude_files", multiple=True, metavar="FILE",
              help="Read exclude patterns from FILE ('-' for stdin); repeatable.")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("-i", "--itemize-changes", "itemize", is_flag=True,
              help="One line per change: YXcstpoguax PATH (see README).")
@click.option("-P", "--progress", "show_progress", is_flag=True,
              help="A progress line (bytes, rate, ETA, files) on stderr when it is a terminal.")
@json_option
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--peer-id", default=None, metavar="DEVICE-ID",
              help="resync:// only: the server's device ID (else the known_peers file's).")
@click.option("--accept-new", is_flag=True,
              help="resync:// only: trust a server not yet known and record it in known_peers.")
@click.option("--bwlimit", callback=rate_option, default=None, metavar="RATE",
              help="resync:// only: send at most RATE bytes per second (K, M, G suffixes).")
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True, metavar="SECONDS",
              help="resync:// only: give up when the server has sent nothing for this long.")
@click.option("--retry-for", type=click.FloatRange(min=0), default=300, show_default=True, metavar="SECONDS",
              help="resync:// only: retry a lost connection (backoff 1 s to 60 s) for this long.")
@click.option("--transport", type=click.Choice(["auto", "quic", "tcp"]), default="auto", show_default=True,
              help="resync:// only: TLS over TCP (clean LAN paths: fastest), QUIC with parity (long or lossy "
                   "paths), or auto: TCP when its handshake answers within 10 ms, else QUIC; a TCP path that "
                   "breaks falls back to QUIC and resumes.")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="resync:// only: this machine's key and known_peers (default ~/.config/resync).")
@click.option("--via", default=None, metavar="resync://RELAY[:PORT]",
              help="A push with --delete only: when DST cannot be reached within --retry-for, seal the tree's next "
                   "generation for DST's device (--peer-id, --card) and hand it to this relay (docs/relay.md).")
@click.option("--via-id", default=None, metavar="DEVICE-ID", help="With --via: the relay's device ID.")
@click.option("--card", "card_text", default=None, metavar="CARD",
              help="With --via: DST's card (`resync id --card` there), or @FILE holding it.")
@history_options
def command(src, dst, checksum, whole_file, sparse, delete, max_delete, excludes, exclude_files, dry_run,
            itemize, show_progress, as_json, verbose, quiet, peer_id, accept_new, bwlimit, timeout, retry_for,
            transport, config_dir, via, via_id, card_text, history_path, no_history):
    """Mirror directory SRC into DST, like rsync -a SRC/ DST/. Either may be
    a server's directory, resync://HOST[:PORT]/MODULE[/PATH] (resync serve):
    a push or a pull over QUIC (deltas and parity-protected shards) or, on a
    clean LAN, TLS over TCP.

    With --via, a push whose destination cannot be reached goes through a
    store-and-forward relay instead: the next generation of the tree, sealed
    to the destination's device, waits at the relay until the destination
    collects it (exit 0, "relayed" in --json; exit 10 when the relay cannot
    be reached either: the generation waits here for the next run).

    Examples: resync sync --delete -i photos/ /backup/photos/;
    resync sync photos/ resync://siteb:8730/backup/photos --peer-id SERVER-ID;
    resync sync --delete photos/ resync://siteb:8730/backup/photos --peer-id SITEB-ID --via resync://relay:8730 --via-id RELAY-ID --card @siteb.card
    """
    import json
    import os

    from ..net.url import parse_url
    remote_src, remote_dst = parse_url(src), parse_url(dst)
    if remote_src is None:
        _check_dir(src, must_exist=True)
    if remote_dst is None:
        _check_dir(dst, must_exist=False)
    if remote_src is not None or remote_dst is not None:
        from .remote import RemoteSync, remote_sync
        return remote_sync(RemoteSync(
            src, dst, remote_src, remote_dst, checksum=checksum, whole_file=bool(whole_file), sparse=sparse, delete=delete,
            max_delete=max_delete, patterns=list(excludes) + _read_patterns(exclude_files), dry_run=dry_run,
            itemize=itemize, as_json=as_json, verbose=verbose, quiet=quiet, show_progress=show_progress,
            peer_id=peer_id, accept_new=accept_new, bwlimit=bwlimit, timeout=timeout, retry_for=retry_for,
            transport=transport, history_path=history_path, no_history=no_history, config_dir=config_dir,
            via=via, via_id=via_id, card_text=card_text))

    from ..sync import Syncer, SyncOptions

    if config_dir is not None:
        from ..errors import UsageError
        raise UsageError("--config-dir is for resync:// transfers (a local sync uses no key)")
    if transport != "auto":
        from ..errors import UsageError
        raise UsageError("--transport is for resync:// transfers")
    if via or via_id or card_text:
        from ..errors import UsageError
        raise UsageError("--via, --via-id and --card are for a push to resync:// (a local sync needs no relay)")
    patterns = list(excludes) + _read_patterns(exclude_files)
    record = not (dry_run or no_history)
    options = SyncOptions(checksum=checksum, whole_file=whole_file is not False, sparse=sparse, delete=delete,
                          max_delete=max_delete, excludes=patterns, dry_run=dry_run, hash_files=record)
    item_stream = sys.stderr if as_json else sys.stdout

    def on_item(line: str) -> None:
        if itemize and not quiet:
            emit(line, item_stream)

    def on_error(message: str) -> None:
        print(printable(f"resync: error: {message}"), file=sys.stderr, flush=True)

    progress = None
    if show_progress and not quiet and sys.stderr.isatty():
        from ..progress import Progress
        progress = Progress(sys.stderr)
    recorder = None
    if record:
        from ..store.recorder import RunRecorder
        recorder = RunRecorder(history_path, "sync", os.path.abspath(src), os.path.abspath(dst))
    try:
        stats = Syncer(src, dst, options, on_item=on_item, on_error=on_error, progress=progress,
                       on_file=recorder.file if recorder else None,
                       on_entry=recorder.entry if recorder else None).run()
    except BaseException:
        if recorder is not None:
            recorder.finish("failed", None)
        raise
    finally:
        if progress is not None:
            progress.close()
    if recorder is not None:
        warn_unrecorded(recorder.finish(stats.status, stats))
    item_stream.flush()
    if as_json:
        sys.stdout.write(json.dumps(stats.as_dict(), sort_keys=True) + "\n")
    if verbose and not quiet:
        rate = stats.bytes_written / stats.duration if stats.duration else 0.0
        say(f"sync: {stats.files} files, {stats.dirs} dirs scanned ({human(stats.bytes_scanned)}); "
                   f"{stats.files_transferred} transferred ({human(stats.bytes_transferred)}, "
                   f"{human(stats.bytes_matched)} reused), {stats.created} created, {stats.updated} updated, "
                   f"{stats.deleted} deleted{' (dry run)' if dry_run else ''}; "
                   f"{stats.duration:.2f} s, {human(rate)}/s", err=True)
    error = stats.outcome_error()
    if error is not None:
        raise error
