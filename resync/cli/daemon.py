"""Talking to the local daemon's API (``resync status``, ``resync transfer``):
where it listens (its api.json, or --api) and its key (the config
directory's api-key)."""
from __future__ import annotations

import click

api_options = [
    click.option("--api", "api_url", default=None, metavar="URL",
                 help="The daemon's API (default: where the `resync serve` using this config directory "
                      "listens, from its api.json)."),
    click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                 help="The daemon's config directory: its api-key and api.json (default: $XDG_CONFIG_HOME/resync)."),
]


def with_api(f):
    for option in reversed(api_options):
        f = option(f)
    return f


def call(api_url: str | None, config_dir: str | None, path: str, method: str = "GET", body=None) -> tuple[str, dict]:
    """The daemon's URL and its JSON answer to one request. ConnectionFailed
    (exit 10) when no daemon is known or answers, and net.api.request's errors."""
    import json
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
    return api_url, request(api_url, load_api_key(d), path, method, body)
