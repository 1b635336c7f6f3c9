"""``resync://HOST[:PORT]/MODULE[/PATH]`` URLs (no network code: the CLI
checks its arguments with this before anything heavy is imported)."""
from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from ..errors import UsageError
from . import DEFAULT_PORT


class Remote(NamedTuple):
    host: str
    port: int
    module: str
    path: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"resync://{self.address}/{self.module}/{self.path}".rstrip("/")


def parse_url(url: str) -> Remote | None:
    """A ``resync://HOST[:PORT]/MODULE[/PATH]`` URL, or None if ``url`` is a
    local path. UsageError for a malformed one."""
    if url[:9].lower() == "resync://":
        url = "resync://" + url[9:]
    if not url.startswith("resync://"):
        scheme = url.partition("://")[0]
        if "://" in url and scheme.isalnum() and "/" not in scheme:
            raise UsageError(f"{url}: {scheme}:// is not resync's; use resync://HOST[:PORT]/MODULE[/PATH] "
                             f"(./{url} for a local path)")
        return None
    u = urlsplit(url)
    parts = [unquote(p) for p in u.path.split("/") if p]
    if not u.hostname or not parts:
        raise UsageError(f"{url}: expected resync://HOST[:PORT]/MODULE[/PATH]")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise UsageError(f"{url}: bad port") from None
    return Remote(u.hostname, port, parts[0], "/".join(parts[1:]))


def parse_relay_url(url: str) -> Remote:
    """A relay's ``resync://HOST[:PORT]`` (a path after it is refused: a
    relay has no modules). UsageError otherwise."""
    remote = parse_url(url.rstrip("/") + "/relay") if url.lower().startswith("resync://") else None
    if remote is None or remote.path or remote.module != "relay":
        raise UsageError(f"{url}: expected a relay's resync://HOST[:PORT]")
    return Remote(remote.host, remote.port, "", "")
