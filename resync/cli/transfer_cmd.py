"""``resync transfer``: the local daemon's transfers, through its API."""
import click

from .daemon import call, with_api
from .options import duration_option, human, rate_option, say

PRIORITIES = ("critical", "high", "normal")          # (net.sessions.PRIORITIES: not imported for --help)


def _line(t: dict) -> str:
    """One transfer on one line (list, and --wait's progress)."""
    p = t.get("progress") or {}
    done = p.get("bytes_done", t.get("bytes_done", 0)) or 0
    total = p.get("bytes_total")
    files = p.get("files_done", t.get("files_done", 0)) or 0
    amount = f"{human(done)}{' / ' + human(total) if total is not None else ''}, {files} files"
    eta = p.get("eta_seconds")
    tail = f", ETA {eta:.0f} s" if t["state"] == "active" and eta else ""
    if t.get("kind") == "inbound":
        where = f"{t.get('peer_id', '')[:7]} {t['direction']} {t.get('module')}/{t.get('path', '')}".rstrip("/")
    else:
        where = f"{t['source']} -> {t['destination']}"
    error = f"  ({t['error']})" if t.get("error") else ""
    return f"{t['id']}  {t['state']:<9} {t.get('priority', 'normal'):<8} {t.get('kind', 'inbound'):<8} {where}  " \
           f"{amount}{tail}{error}"


def _show(t: dict, as_json: bool) -> None:
    import json
    if as_json:
        say(json.dumps(t, sort_keys=True))
    else:
        say(_line(t))


@click.group("transfer")
def group():
    """The local daemon's transfers (`resync serve`, through its API): its own
    pushes and pulls (add, pause, resume, cancel, priority) and the ones
    clients make to it (list, show, cancel).

    Exit codes: 0 ok, 2 a bad argument or an unknown transfer, 10 no daemon
    answers, 13 the daemon refused (its key, or a change the transfer's
    state does not allow: pausing an ended one); `add --wait` exits as
    `resync sync` would have.
    """


@group.command("list")
@with_api
@click.option("--state", type=click.Choice(("pending", "active", "paused", "completed", "failed", "cancelled",
                                            "expired")), default=None, help="Only the transfers in this state.")
@click.option("--json", "as_json", is_flag=True, help="The API's document on stdout.")
def list_cmd(api_url, config_dir, state, as_json):
    """List the daemon's transfers, running and waiting first.

    Example: resync transfer list --state active
    """
    import json
    path = "/api/v1/transfers?limit=1000" + (f"&state={state}" if state else "")
    _, answer = call(api_url, config_dir, path)
    if as_json:
        say(json.dumps(answer, sort_keys=True))
        return
    for t in answer["transfers"]:
        say(_line(t))
    if not answer["transfers"]:
        say("no transfers" + (f" {state}" if state else ""))


@group.command("add")
@with_api
@click.argument("src")
@click.argument("dst")
@click.option("--priority", type=click.Choice(PRIORITIES), default="normal", show_default=True,
              help="Its class: critical, high or normal.")
@click.option("--ttl", callback=duration_option, default=None, metavar="DURATION",
              help="Expire it if not completed within this time of now (90s, 15m, 6h, 7d; default 7d).")
@click.option("-c", "--checksum", is_flag=True, help="Compare files by content (BLAKE3), not size and time.")
@click.option("-W", "--whole-file", is_flag=True, help="Send whole files, no deltas.")
@click.option("-S", "--sparse", is_flag=True, help="Runs of zeros travel and are written as holes.")
@click.option("--delete", is_flag=True, help="Delete destination files the source does not have.")
@click.option("--max-delete", type=click.IntRange(0), default=None, metavar="N",
              help="Refuse to delete more than N entries.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN", help="Exclude a gitignore pattern; repeatable.")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--bwlimit", callback=rate_option, default=None, metavar="RATE",
              help="Bytes per second this transfer sends at most (K/M/G); changeable with `transfer limits`.")
@click.option("--shard-rate", type=click.FloatRange(min=0, min_open=True), default=None, metavar="N",
              help="Shards per second this transfer sends at most.")
@click.option("--transport", type=click.Choice(("auto", "quic", "tcp")), default="auto", show_default=True)
@click.option("--peer-id", default=None, metavar="DEVICE-ID", help="The server's device ID (else known_peers).")
@click.option("--accept-new", is_flag=True, help="Trust and record a server not known yet.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True, metavar="SECONDS",
              help="Seconds without a packet before a connection is given up (and retried).")
@click.option("--wait", is_flag=True, help="Follow it (the daemon's event stream) to its end, and exit as "
                                            "`resync sync` would have.")
@click.option("--json", "as_json", is_flag=True, help="The transfer as JSON on stdout (its end, with --wait).")
def add_cmd(api_url, config_dir, src, dst, priority, ttl, checksum, whole_file, sparse, delete, max_delete,
            excludes, dry_run, bwlimit, shard_rate, transport, peer_id, accept_new, timeout, wait, as_json):
    """Give the daemon a transfer of its own: SRC or DST is a resync:// URL,
    the other a local directory (of the daemon's machine). It runs when a
    slot is free (highest priority first), retries lost connections until
    its TTL, and survives the daemon's restart.

    Example: resync transfer add /srv/data resync://backup.example:8730/mirror/data --priority high --wait
    """
    import os

    from ..errors import UsageError
    from ..net.url import parse_url
    remote_src, remote_dst = parse_url(src), parse_url(dst)
    if (remote_src is None) == (remote_dst is None):
        raise UsageError("one of SRC and DST must be a resync:// URL, the other a local directory")
    body = {"source": src if remote_src is not None else os.path.abspath(src),
            "destination": dst if remote_dst is not None else os.path.abspath(dst),
            "priority": priority, "checksum": checksum, "whole_file": whole_file, "sparse": sparse,
            "delete": delete, "max_delete": max_delete, "exclude": list(excludes), "dry_run": dry_run,
            "bytes_per_second": bwlimit or 0, "shards_per_second": shard_rate or 0, "transport": transport,
            "peer_id": peer_id, "accept_new": accept_new, "timeout": timeout}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    url, t = call(api_url, config_dir, "/api/v1/transfers", "POST", body)
    if not wait:
        _show(t, as_json)
        return
    say(f"resync: transfer {t['id']} queued ({t['state']}); following it", err=True)
    end = _follow(url, config_dir, t)
    _show(end, as_json)
    code = end.get("exit_code") or 0
    if code:
        from ..errors import ResyncError
        error = ResyncError(f"transfer {end['id']} {end['state']}: {end.get('error') or end.get('outcome')}")
        error.exit_code = code
        raise error


def _follow(url: str, config_dir, t: dict) -> dict:
    """The transfer ``t`` once it has ended, its progress said on stderr as
    the daemon's events tell it."""
    from pathlib import Path

    from ..identity import config_dir as default_dir
    from ..identity import load_api_key
    from ..net.api import follow, request
    key = load_api_key(Path(config_dir) if config_dir else default_dir())
    ended = ("completed", "failed", "cancelled", "expired")
    now = request(url, key, f"/api/v1/transfers/{t['id']}")
    if now["state"] in ended:
        return now
    for event in follow(url, key, t.get("event_id", 0)):
        if event["type"] == "EventsMissed":
            now = request(url, key, f"/api/v1/transfers/{t['id']}")
            if now["state"] in ended:
                return now
            continue
        data = event.get("data") or {}
        if data.get("id") != t["id"]:
            continue
        if event["type"] == "TransferEnded":
            return data
        if event["type"] in ("TransferStarted", "TransferProgress", "TransferPaused", "TransferResumed",
                             "TransferRetrying"):
            extra = f", retrying in {data['retry_in_seconds']} s" if event["type"] == "TransferRetrying" else ""
            say(f"resync: {_line(data)}{extra}", err=True)
    return request(url, key, f"/api/v1/transfers/{t['id']}")


@group.command("show")
@with_api
@click.argument("transfer_id")
@click.option("--json", "as_json", is_flag=True, help="The API's document on stdout.")
def show_cmd(api_url, config_dir, transfer_id, as_json):
    """Show one transfer: its state, progress, priority, limits and last error.

    Example: resync transfer show 3f2a9c0d5e6b7a81
    """
    import json
    _, t = call(api_url, config_dir, f"/api/v1/transfers/{transfer_id}")
    if as_json:
        say(json.dumps(t, sort_keys=True))
        return
    say(_line(t))
    for key in ("direction", "priority", "created", "started", "ended", "expires", "attempts", "peer_id",
                "transfer_id", "outcome", "limits", "error"):
        if t.get(key) is not None:
            say(f"  {key}: {t[key]}")


def _act(action: str, api_url, config_dir, transfer_id, every: bool, as_json: bool) -> None:
    import json

    from ..errors import UsageError
    if every == (transfer_id is not None):
        raise UsageError(f"{action}: give a transfer ID, or --all")
    if every:
        _, answer = call(api_url, config_dir, f"/api/v1/{action}", "POST", {})
        if as_json:
            say(json.dumps(answer, sort_keys=True))
        else:
            say(f"{action}d: {len(answer['sessions'])} own transfers"
                + (f", {len(answer['inbound'])} inbound cut (their clients resume them later)" if answer["inbound"]
                   else "") + ("; inbound ones are told busy until `resync transfer resume --all`"
                               if answer["paused"] else ""))
        return
    _, t = call(api_url, config_dir, f"/api/v1/transfers/{transfer_id}/{action}", "POST", {})
    _show(t, as_json)


@group.command("pause")
@with_api
@click.argument("transfer_id", required=False)
@click.option("--all", "every", is_flag=True, help="Pause everything (inbound transfers are cut, and told busy "
                                                   "until resumed).")
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON on stdout.")
def pause_cmd(api_url, config_dir, transfer_id, every, as_json):
    """Pause a transfer of the daemon's own, or --all. What arrived is kept
    at the receiving end; resumed, it is not sent again.

    Example: resync transfer pause 3f2a9c0d5e6b7a81
    """
    _act("pause", api_url, config_dir, transfer_id, every, as_json)


@group.command("resume")
@with_api
@click.argument("transfer_id", required=False)
@click.option("--all", "every", is_flag=True, help="Resume everything paused.")
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON on stdout.")
def resume_cmd(api_url, config_dir, transfer_id, every, as_json):
    """Resume a paused transfer, or --all.

    Example: resync transfer resume --all
    """
    _act("resume", api_url, config_dir, transfer_id, every, as_json)


@group.command("cancel")
@with_api
@click.argument("transfer_id")
@click.option("--json", "as_json", is_flag=True, help="The transfer as JSON on stdout.")
def cancel_cmd(api_url, config_dir, transfer_id, as_json):
    """Cancel a transfer: one of the daemon's own, or one a client runs (that
    client stops and does not retry). Every destination path stays old or new.

    Example: resync transfer cancel 3f2a9c0d5e6b7a81
    """
    _act("cancel", api_url, config_dir, transfer_id, False, as_json)


@group.command("priority")
@with_api
@click.argument("transfer_id")
@click.argument("priority", type=click.Choice(PRIORITIES))
@click.option("--json", "as_json", is_flag=True, help="The transfer as JSON on stdout.")
def priority_cmd(api_url, config_dir, transfer_id, priority, as_json):
    """Change a transfer's priority class, while it waits or runs.

    Example: resync transfer priority 3f2a9c0d5e6b7a81 critical
    """
    _, t = call(api_url, config_dir, f"/api/v1/transfers/{transfer_id}", "PATCH", {"priority": priority})
    _show(t, as_json)


@group.command("limits")
@with_api
@click.argument("transfer_id", required=False)
@click.option("--bwlimit", default=None, metavar="RATE",
              help="Bytes per second (K/M/G), 0 for no limit.")
@click.option("--shard-rate", type=click.FloatRange(min=0), default=None, metavar="N",
              help="Shards per second, 0 for no limit.")
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON on stdout.")
def limits_cmd(api_url, config_dir, transfer_id, bwlimit, shard_rate, as_json):
    """Show or change the daemon's limits on what it sends in all (or, with
    TRANSFER_ID, one transfer's own), at once, while transfers run.

    Example: resync transfer limits --bwlimit 20M --shard-rate 5000
    """
    import json

    from ..errors import UsageError
    from .options import parse_rate
    body = {}
    if bwlimit is not None:
        try:
            body["bytes_per_second"] = 0 if str(bwlimit).strip() == "0" else parse_rate(bwlimit)
        except ValueError as exc:
            raise UsageError(f"--bwlimit {exc}") from None
    if shard_rate is not None:
        body["shards_per_second"] = shard_rate
    if transfer_id is not None:
        if not body:
            _, t = call(api_url, config_dir, f"/api/v1/transfers/{transfer_id}")
        else:
            _, t = call(api_url, config_dir, f"/api/v1/transfers/{transfer_id}", "PATCH", body)
        answer = t.get("limits") or {}
    elif body:
        _, answer = call(api_url, config_dir, "/api/v1/limits", "PUT", body)
    else:
        _, answer = call(api_url, config_dir, "/api/v1/limits")
    if as_json:
        say(json.dumps(answer, sort_keys=True))
        return
    rate, shards = answer.get("bytes_per_second") or 0, answer.get("shards_per_second") or 0
    say(f"{'transfer ' + transfer_id if transfer_id else 'daemon'}: "
        f"{human(rate) + '/s' if rate else 'no byte limit'}, {f'{shards:g} shards/s' if shards else 'no shard limit'}")
