import click

from .options import say


@click.command("status")
@click.option("--api", "api_url", default=None, metavar="URL",
              help="The daemon's API (default: where the `resync serve` using this config directory "
                   "listens, from its api.json).")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="The daemon's config directory: its api-key and api.json (default: $XDG_CONFIG_HOME/resync).")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status document as JSON.")
def command(api_url, config_dir, as_json):
    """Show the local daemon's status: version, device ID, instance (new at
    each start), uptime, modules and transfers running — asked of its API
    with the key in the config directory.

    Exit 10 when no daemon answers, 13 when it refuses the key.

    Example: resync status
    """
    import json
    import time
    from pathlib import Path

    from ..errors import ConnectionFailed
    from ..identity import config_dir as default_dir
    from ..identity import load_api_key
    from ..net.api import API_FILE, request
    d = Path(config_dir) if config_dir else default_dir()
    if api_url is None:
        try:
            api_url = json.loads((d / API_FILE).read_text())["url"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConnectionFailed(f"no daemon's API is known in {d} (no {API_FILE}: is `resync serve` running "
                                   "with this config directory? --api URL names one)") from None
    status = request(api_url, load_api_key(d), "/api/v1/status")
    if as_json:
        say(json.dumps(status, sort_keys=True))
        return
    up = int(status.get("uptime_seconds", 0))
    say(f"resync {status.get('version')} daemon at {api_url}, device ID {status.get('device_id')}")
    say(f"instance {status.get('instance_id')}, up {up // 86400}d {up % 86400 // 3600:02}:{up % 3600 // 60:02}:"
        f"{up % 60:02} (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.get('started', 0)))})")
    say(f"listening on {', '.join(status.get('listen', []))}")
    say("modules: " + (", ".join(f"{m['name']}{' (read-only)' if m.get('read_only') else ''}"
                                 for m in status.get("modules", [])) or "none"))
    t = status.get("transfers", {})
    say(f"transfers: {t.get('active', 0)} running ({t.get('push', 0)} push, {t.get('pull', 0)} pull), "
        f"{t.get('completed', 0)} completed, {t.get('failed', 0)} failed and {t.get('cancelled', 0)} cancelled "
        "since the start")
