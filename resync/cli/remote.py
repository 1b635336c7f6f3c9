"""``resync sync`` when SRC or DST is a resync:// URL: a push or a pull."""
from __future__ import annotations

import json
import os
import sys


from .options import emit, human, printable, say, warn_unrecorded


class _Lines:
    """Prints what happens at the other end (a push: the server applies)."""

    def __init__(self, itemize: bool, quiet: bool, stream):
        self.itemize, self.quiet, self.stream = itemize, quiet, stream

    def remote(self, frame) -> None:
        from ..protocol.frames import ITEM_LINE
        text = os.fsdecode(frame.text)
        if frame.kind == ITEM_LINE:
            if self.itemize and not self.quiet:
                emit(text, self.stream)
        else:
            print(printable(f"resync: error: {text}"), file=sys.stderr, flush=True)


def remote_sync(src, dst, remote_src, remote_dst, checksum, whole_file, delete, max_delete, patterns, dry_run,
                itemize, as_json, verbose, quiet, peer_id, accept_new, bwlimit, timeout, retry_for, history_path,
                no_history, show_progress=False, config_dir=None):
    from ..errors import UsageError
    from ..identity import load_identity
    from ..net.client import run
    from ..protocol.session import Options
    from ..report import Report, RunStats
    if remote_src is not None and remote_dst is not None:
        raise UsageError("one of SRC and DST must be a local directory")
    push = remote_dst is not None
    remote, local = (remote_dst, src) if push else (remote_src, dst)
    if peer_id:
        from ..identity import parse_device_id
        parse_device_id(peer_id)                # a mistyped ID is a usage error before any connection
    from pathlib import Path
    identity = load_identity(Path(config_dir) if config_dir else None, create=True)
    known_peers = Path(config_dir) / "known_peers" if config_dir else None
    options = Options(delete=delete, checksum=checksum, dry_run=dry_run, whole_file=bool(whole_file), itemize=itemize,
                      max_delete=max_delete, excludes=patterns, bwlimit=bwlimit or 0)
    item_stream = sys.stderr if as_json else sys.stdout
    record = not (dry_run or no_history)
    recorder = None
    if record:
        from ..store.recorder import RunRecorder
        recorder = RunRecorder(history_path, "sync", src if not push else os.path.abspath(src),
                               dst if push else os.path.abspath(dst))
    if push:
        report = _Lines(itemize, quiet, item_stream)
    else:
        def on_item(line: str) -> None:
            if itemize and not quiet:
                emit(line, item_stream)

        def on_error(message: str) -> None:
            print(printable(f"resync: error: {message}"), file=sys.stderr, flush=True)
        report = Report(RunStats(), on_item, on_error, recorder.file if recorder else None,
                        recorder.entry if recorder else None, dry_run=dry_run)
    meter = None
    if show_progress and not quiet and sys.stderr.isatty():
        from ..progress import Progress
        meter = Progress(sys.stderr)
    try:
        session = run(remote, identity, push, local, options, report, peer_id=peer_id, accept_new=accept_new,
                      timeout=timeout, bwlimit=bwlimit, retry_for=retry_for, meter=meter, known_peers=known_peers,
                      on_note=None if quiet else lambda text: say(f"resync: {text}", err=True),
                      on_retry=None if quiet else lambda why, wait: say(f"resync: {why}; retrying in {wait:.0f} s",
                                                                       err=True))
    except BaseException:
        if recorder is not None:
            recorder.finish("failed", None)
        raise
    finally:
        if meter is not None:
            meter.close()
    result = dict(session.result)
    result["peer"] = str(remote)
    # the whole run, retries and their waits included (the wire figures below are the last attempt's)
    result["duration"], result["attempts"] = round(session.wall, 6), session.attempts
    result["transfer_id"] = session.transfer_id         # the server's log and history have it too
    result.update(session.stats)                # the protocol's bytes: control stream and shards
    wire = getattr(session, "transport", {})
    result.update(wire)                         # UDP payload bytes and packets, QUIC's losses and RTT
    result["bytes_on_wire_sent"] = wire.get("udp_bytes_sent", 0)
    result["bytes_on_wire_received"] = wire.get("udp_bytes_received", 0)
    stats = RunStats.from_dict(result)
    if recorder is not None:
        from ..net import transfer_row
        warn_unrecorded(recorder.finish(stats.status, stats, transfer=transfer_row(
            result, wire, str(remote), getattr(session, "server_id", None), "push" if push else "pull")))
    item_stream.flush()
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    if verbose and not quiet:
        say(f"sync: {result.get('files', 0)} files, {result.get('dirs', 0)} dirs scanned "
            f"({human(result.get('bytes_scanned', 0))}); {result.get('files_transferred', 0)} transferred "
            f"({human(result.get('bytes_transferred', 0))}, {human(result.get('bytes_matched', 0))} reused"
            f"{', ' + human(result['resumed_bytes']) + ' resumed' if result.get('resumed_bytes') else ''}), "
            f"{result.get('deleted', 0)} deleted{' (dry run)' if dry_run else ''}; "
            f"{human(result['bytes_on_wire_sent'])} sent, {human(result['bytes_on_wire_received'])} received "
            f"over QUIC with {remote.address}; {result.get('duration', 0):.2f} s", err=True)
    error = stats.outcome_error()
    if error is not None:
        raise error
