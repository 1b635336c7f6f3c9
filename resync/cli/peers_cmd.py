import click

from .options import say


@click.command("peers")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="This machine's config directory: its known_peers, and its daemon's api.json and api-key "
                   "(default: $XDG_CONFIG_HOME/resync).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def command(config_dir, as_json):
    """List this machine's peers: the servers it has pinned (known_peers),
    and, when its daemon runs, the devices that daemon allows with the
    modules each may use (asked of its API).

    Example: resync peers
    """
    import json
    from pathlib import Path

    from ..errors import ConnectionFailed
    from ..identity import config_dir as default_dir
    from ..identity import known_peers, load_api_key
    from ..net.api import API_FILE, request
    d = Path(config_dir) if config_dir else default_dir()
    servers = [{"address": a, "device_id": i} for a, i in known_peers(d / "known_peers")]
    allowed = None
    try:
        url = json.loads((d / API_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        url = None
    if url is not None:
        try:
            allowed = request(url, load_api_key(d), "/api/v1/peers")["peers"]
        except ConnectionFailed:
            allowed = None                      # (a stale api.json: the daemon is not running)
    if as_json:
        say(json.dumps({"known_servers": servers, "allowed_by_daemon": allowed}, sort_keys=True))
        return
    say(f"servers pinned ({d / 'known_peers'}):" if servers else "servers pinned: none")
    for s in servers:
        say(f"  {s['address']}  {s['device_id']}")
    if allowed is None:
        say("devices allowed: no daemon runs with this config directory")
        return
    say(f"devices the daemon at {url} allows:" if allowed else "devices allowed: none")
    for p in allowed:
        mods = ", ".join(m["name"] + (" (read-only)" if m["read_only"] else "") for m in p["modules"])
        say(f"  {p['device_id']}  {mods}")
