import click

from .daemon import call, with_api
from .options import say


@click.command("status")
@with_api
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

    api_url, status = call(api_url, config_dir, "/api/v1/status")
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
    own = status.get("sessions")
    if own:
        say("own transfers: " + ", ".join(f"{n} {state}" for state, n in own.items() if n) if any(own.values())
            else "own transfers: none")
    if status.get("paused"):
        say("paused: the daemon's transfers are paused (resync transfer resume --all)")
