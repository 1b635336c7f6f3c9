"""``resync sync`` when SRC or DST is a resync:// URL: a push or a pull."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field


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


@dataclass
class RemoteSync:
    """``resync sync`` with a resync:// end, as the command line gave it: the
    one object the sync command hands over (the transfer's options, how to
    connect, what to print and record)."""

    src: str
    dst: str
    remote_src: object = None       # net.url.Remote, or None: SRC is local
    remote_dst: object = None
    checksum: bool = False
    whole_file: bool = False
    sparse: bool = False
    delete: bool = False
    max_delete: int | None = None
    patterns: list = field(default_factory=list)    # excludes, --exclude-from's included
    dry_run: bool = False
    itemize: bool = False
    as_json: bool = False
    verbose: bool = False
    quiet: bool = False
    show_progress: bool = False
    peer_id: str | None = None
    accept_new: bool = False
    bwlimit: float | None = None
    timeout: float = 60.0
    retry_for: float = 300.0
    transport: str = "auto"         # "auto", "quic" or "tcp" (--transport)
    history_path: str | None = None
    no_history: bool = False
    config_dir: str | None = None
    via: str | None = None          # a relay's resync://HOST[:PORT]: the way when DST cannot be reached
    via_id: str | None = None       # its device ID
    card_text: str | None = None    # DST's card (or @FILE)


def _via(a: RemoteSync):
    """(relay Remote, DST's card) for --via, checked before any connection:
    a push, DST's device ID given and its card that device's. None without --via."""
    from ..errors import UsageError
    if a.via is None:
        if a.via_id or a.card_text:
            raise UsageError("--via-id and --card go with --via")
        return None
    if a.remote_dst is None:
        raise UsageError("--via is for a push (DST a resync:// URL)")
    if a.dry_run:
        raise UsageError("--via does not go with --dry-run")
    if not a.peer_id or not a.card_text:
        raise UsageError("--via needs --peer-id (DST's device ID) and --card (its card)")
    if not a.delete:                            # (a generation is a bundle: it mirrors SRC, deletions included)
        raise UsageError("--via needs --delete: a relayed generation makes DST an exact mirror of SRC, and a "
                         "direct push must leave the same tree")
    from ..net.url import parse_relay_url
    from ..relay.keys import parse_card
    text = a.card_text
    if text.startswith("@"):
        try:
            text = open(text[1:], encoding="ascii", errors="replace").read()
        except OSError as exc:
            from ..errors import FileError
            raise FileError.from_os(text[1:], exc) from None
    return parse_relay_url(a.via), parse_card(text, expect=a.peer_id)


def _outbox(a: RemoteSync, identity):
    from pathlib import Path

    from ..identity import config_dir as default_dir
    from ..relay.keys import load_exchange_key, make_card
    from ..relay.trees import Outbox
    d = Path(a.config_dir) if a.config_dir else default_dir()
    return d, Outbox(d / "relay" / "outbox", identity, make_card(identity, load_exchange_key(d, create=True)))


def _relayed(a: RemoteSync, why, identity, via, recorder) -> None:
    """DST did not answer: the tree's next generation sealed to its device and
    handed to the relay (relay.node.call); the envelope waits in this
    machine's spool if the relay does not answer either (ConnectionFailed)."""
    import time

    from ..errors import ConnectionFailed, TimedOut
    from ..relay.node import call
    from ..store.spool import Spool
    relay, card = via
    remote = a.remote_dst
    d, outbox = _outbox(a, identity)
    name = f"{remote.module}/{remote.path}".rstrip("/")
    try:
        spool = Spool(d / "relay" / "spool", lock_wait=60.0)    # (first: committed only once kept)
        sealed = outbox.seal(a.src, card, remote.module, remote.path, now=int(time.time() * 1000),
                             store=spool.put)
    except BaseException:
        if recorder is not None:
            recorder.finish("failed", None)
        raise
    if not a.quiet:
        say(f"resync: {remote.address} did not answer ({why}): generation {sealed.generation} of {a.src} sealed "
            f"for {card.device_id}; handing it to the relay {relay.address}", err=True)
    try:
        r, _, _ = call(relay, identity, spool, peer_id=a.via_id, deposit=True, collect=False,
                       retry_for=min(a.retry_for, 60.0), transport=a.transport)
    except (ConnectionFailed, TimedOut) as exc:
        if recorder is not None:
            recorder.finish("failed", None)
        raise ConnectionFailed(f"{remote.address} did not answer, nor the relay {relay.address} ({exc}); "
                               f"generation {sealed.generation} waits in this machine's spool for the next run") \
            from None
    if recorder is not None:
        recorder.finish("relayed", None)
    result = {"relayed": True, "relay": str(relay), "envelope": sealed.id.hex(), "generation": sealed.generation,
              "bytes": len(sealed.data), "to": card.device_id, "as": name, "handed_over": r.get("handed_over", 0),
              "refused": r.get("refusals", []), "unreachable": str(why)}
    if a.as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    elif not a.quiet:
        say(f"resync: generation {sealed.generation} handed to the relay {relay.address}: {card.device_id} applies it "
            "when it collects it (resync relay status shows its receipt)", err=True)


def remote_sync(a: RemoteSync):
    from pathlib import Path

    from ..errors import UsageError
    from ..identity import load_identity
    from ..net.client import Transfer, result_of, run
    from ..protocol.session import Options
    from ..report import Report, RunStats
    if a.remote_src is not None and a.remote_dst is not None:
        raise UsageError("one of SRC and DST must be a local directory")
    src, dst, push = a.src, a.dst, a.remote_dst is not None
    dry_run, itemize, quiet, as_json = a.dry_run, a.itemize, a.quiet, a.as_json
    remote, local = (a.remote_dst, src) if push else (a.remote_src, dst)
    if a.peer_id:
        from ..identity import parse_device_id
        parse_device_id(a.peer_id)              # a mistyped ID is a usage error before any connection
    via = _via(a)
    identity = load_identity(Path(a.config_dir) if a.config_dir else None, create=True)
    transfer = Transfer(remote, push, local,
                        Options(delete=a.delete, checksum=a.checksum, dry_run=dry_run, whole_file=bool(a.whole_file),
                                sparse=a.sparse, itemize=itemize, max_delete=a.max_delete, excludes=a.patterns,
                                bwlimit=a.bwlimit or 0),
                        peer_id=a.peer_id, accept_new=a.accept_new, timeout=a.timeout, bwlimit=a.bwlimit,
                        retry_for=a.retry_for, transport=a.transport,
                        known_peers=Path(a.config_dir) / "known_peers" if a.config_dir else None)
    item_stream = sys.stderr if as_json else sys.stdout
    record = not (dry_run or a.no_history)
    recorder = None
    if record:
        from ..store.recorder import RunRecorder
        recorder = RunRecorder(a.history_path, "sync", src if not push else os.path.abspath(src),
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
    if a.show_progress and not quiet and sys.stderr.isatty():
        from ..progress import Progress
        meter = Progress(sys.stderr)
    from ..errors import ConnectionFailed, TimedOut
    try:
        session = run(transfer, identity, report, meter=meter,
                      on_note=None if quiet else lambda text: say(f"resync: {text}", err=True),
                      on_retry=None if quiet else lambda why, wait: say(f"resync: {why}; retrying in {wait:.0f} s",
                                                                       err=True))
    except (ConnectionFailed, TimedOut) as exc:
        if meter is not None:
            meter.close()
        if via is None:
            if recorder is not None:
                recorder.finish("failed", None)
            raise
        return _relayed(a, exc, identity, via, recorder)
    except BaseException:
        if recorder is not None:
            recorder.finish("failed", None)
        raise
    finally:
        if meter is not None:
            meter.close()
    result = result_of(session, transfer)
    wire = getattr(session, "transport", {})
    tcp = wire.get("transport") == "tcp"
    stats = RunStats.from_dict(result)
    if recorder is not None:
        from ..net import transfer_row
        warn_unrecorded(recorder.finish(stats.status, stats, transfer=transfer_row(
            result, wire, str(remote), getattr(session, "server_id", None), "push" if push else "pull")))
    item_stream.flush()
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    if a.verbose and not quiet:
        say(f"sync: {result.get('files', 0)} files, {result.get('dirs', 0)} dirs scanned "
            f"({human(result.get('bytes_scanned', 0))}); {result.get('files_transferred', 0)} transferred "
            f"({human(result.get('bytes_transferred', 0))}, {human(result.get('bytes_matched', 0))} reused"
            f"{', ' + human(result['resumed_bytes']) + ' resumed' if result.get('resumed_bytes') else ''}), "
            f"{result.get('deleted', 0)} deleted{' (dry run)' if dry_run else ''}; "
            f"{human(result['bytes_on_wire_sent'])} sent, {human(result['bytes_on_wire_received'])} received "
            f"over {'TLS on TCP' if tcp else 'QUIC'} with {remote.address}; {result.get('duration', 0):.2f} s", err=True)
    if via is not None and stats.status == "ok":  # what DST holds now: the next relayed generation builds on it
        remote = a.remote_dst
        _, outbox = _outbox(a, identity)
        import time
        outbox.delivered_directly(via[1].device_id, remote.module, remote.path, a.src, int(time.time() * 1000))
    error = stats.outcome_error()
    if error is not None:
        raise error
