"""The daemon's HTTP API (aiohttp, on the event loop aioquic runs on), and
the client the CLI uses to talk to it.

Doors shut by default, as Syncthing's and rclone's (docs/api.md has the
routes and the reasons):

- it listens on 127.0.0.1 (``resync serve --api HOST:PORT`` to move it);
- every route but ``GET /health`` needs the daemon's API key, sent as
  ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` (compared in constant
  time); a request without it learns nothing, not even whether its route
  exists (401 before 404);
- bound to a loopback address, it answers only requests whose Host header
  names a loopback host (``localhost``, ``*.localhost``, a loopback IP):
  a web page that rebinds its own name to 127.0.0.1 gets 403 (DNS
  rebinding, the attack Syncthing's host check and Transmission's host
  whitelist answer);
- no CORS headers: a browser page of another origin cannot read an answer.

``--metrics HOST:PORT`` serves /metrics alone on a listener of its own,
without the key (for a Prometheus that holds no secrets), with the same
Host check when on loopback.

The daemon writes where its API listens to ``api.json`` in its config
directory (with the API key beside it, ``api-key``, mode 0600); ``resync
status`` reads both.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import time
from pathlib import Path

DEFAULT_PORT = 8731              # the API's port by default (resync's own is 8730)
PUBLIC = frozenset({"/health"})  # routes without the key
API_FILE = "api.json"            # in the config directory: where the running daemon's API listens
CLIENT_TIMEOUT = 10.0            # s the CLI waits for the daemon's answer


def loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, no port) is this machine's loopback."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8731" -> "::1")."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _json(data, status: int = 200):
    from aiohttp import web
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, sort_keys=True))


def _error(status: int, message: str):
    return _json({"error": message}, status)


class Api:
    """The API of one daemon. ``key``: its API key; ``status()``: the
    /api/v1/status document; ``metrics``: a resync.metrics.ServerMetrics."""

    def __init__(self, key: str, status, metrics):
        self.key = key.encode()
        self.status = status
        self.metrics = metrics
        self._runners: list = []

    # -- the guard ------------------------------------------------------------------------
    def _guard(self, check_host: bool, keyed: bool):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            if check_host and not loopback(_host_of(request.host or "")):
                response = _error(403, "Host check: this API answers only requests to a loopback host name")
            elif keyed and request.path not in PUBLIC and not self._has_key(request):
                response = _error(401, "an API key is needed (X-API-Key or Authorization: Bearer)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="resync"'
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:     # (404, 405: as JSON, with the headers below)
                    response = _error(exc.status, exc.reason)
            response.headers["Cache-Control"] = "no-store"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["X-Frame-Options"] = "DENY"
            return response
        return guard

    def _has_key(self, request) -> bool:
        given = request.headers.get("X-API-Key")
        if given is None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        return given is not None and hmac.compare_digest(given.encode(), self.key)

    # -- the routes -----------------------------------------------------------------------
    def application(self, check_host: bool):
        from aiohttp import web
        app = web.Application(middlewares=[self._guard(check_host, keyed=True)])
        app.router.add_get("/health", self._health)
        app.router.add_get("/api/v1/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        return app

    def metrics_application(self, check_host: bool):
        from aiohttp import web
        app = web.Application(middlewares=[self._guard(check_host, keyed=False)])
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _health(self, request):
        return _json({"status": "OK"})

    async def _status(self, request):
        return _json(self.status())

    async def _metrics(self, request):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        body = generate_latest(self.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    # -- listening ------------------------------------------------------------------------
    async def listen(self, app, host: str, port: int) -> int:
        """Serve ``app`` on host:port (0: a free port); returns the port.
        OSError if it cannot listen there."""
        from aiohttp import web
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runners.append(runner)
        return runner.addresses[0][1]

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []


def url_of(host: str, port: int) -> str:
    """http://HOST:PORT of a listener (a wildcard address: its loopback twin)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_api_file(directory: Path, url: str, instance_id: str) -> Path:
    """``api.json`` in ``directory``: where this daemon's API listens (for
    ``resync status``), replaced atomically."""
    path = directory / API_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "instance_id": instance_id,
                               "started": time.time()}) + "\n")
    os.replace(tmp, path)
    return path


def remove_api_file(directory: Path, instance_id: str) -> None:
    """Remove ``api.json`` if it is still this daemon's."""
    path = directory / API_FILE
    try:
        if json.loads(path.read_text()).get("instance_id") == instance_id:
            path.unlink()
    except (OSError, ValueError):
        pass


def request(url: str, key: str, path: str, method: str = "GET", body: dict | None = None) -> dict:
    """One call to a daemon's API: its JSON answer. ConnectionFailed if
    nothing answers, RefusedError for 401 and 403, and for any other
    error status (ProtocolError, with the daemon's message)."""
    import urllib.error
    import urllib.request

    from ..errors import ConnectionFailed
    from ..protocol.common import RefusedError
    from ..protocol.frames import ProtocolError
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"X-API-Key": key, "Accept": "application/json",
                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except ValueError:
            message = exc.reason
        if exc.code in (401, 403):
            raise RefusedError(f"the daemon at {url} refused: {message}") from None
        raise ProtocolError(f"the daemon at {url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConnectionFailed(f"no daemon answers at {url}: {getattr(why, 'strerror', None) or why}") from None
    except ValueError:
        raise ConnectionFailed(f"the daemon at {url} did not answer JSON") from None
