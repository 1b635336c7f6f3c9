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

import asyncio
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


SSE_PING = 15.0                  # s between keep-alive comments on an idle event stream
PAGE = 100                       # transfers per page by default (limit=, at most MAX_PAGE)
MAX_PAGE = 1000
STATES = ("pending", "active", "paused", "completed", "failed", "cancelled", "expired")


class Control:
    """What the API asks of its daemon (net.server implements it; this base
    answers as a daemon with nothing to show). A method raises ValueError
    for a bad request (400), net.sessions.NotFound (404), net.sessions.Conflict
    for a transition the transfer's state does not allow (409), and
    store.HistoryError when the change cannot be recorded (503)."""

    def status(self) -> dict:
        """The /api/v1/status document."""
        return {}

    def peers(self) -> list[dict]:
        """The devices its modules allow, each with the modules it may use."""
        return []

    def transfers(self) -> list[dict]:
        """Every transfer it knows, running and waiting first, newest first (docs/api.md)."""
        return []

    def submit(self, body) -> dict:
        """A new transfer of its own (``POST /api/v1/transfers``)."""
        raise ValueError("this daemon runs no transfers of its own")

    def act(self, transfer_id: str, action: str) -> dict:
        """``pause``, ``resume`` or ``cancel`` one transfer; the transfer."""
        from .sessions import NotFound
        raise NotFound(transfer_id)

    def change(self, transfer_id: str, body) -> dict:
        """PATCH: a transfer's priority and limits; the transfer."""
        from .sessions import NotFound
        raise NotFound(transfer_id)

    def act_all(self, action: str) -> dict:
        """``pause`` or ``resume`` everything: what changed."""
        return {}

    def limits(self) -> dict:
        """The daemon's own limits (bytes_per_second, shards_per_second; 0: none)."""
        return {"bytes_per_second": 0, "shards_per_second": 0}

    def set_limits(self, body) -> dict:
        raise ValueError("this daemon has no limits to change")

    def relay(self) -> dict:
        """GET /api/v1/relay: the spool, the routes, the envelopes held."""
        return {"relaying": False}

    def remove_envelope(self, envelope_id: str) -> dict:
        """DELETE /api/v1/relay/envelopes/{id}: the operator gives one up."""
        from .sessions import NotFound
        raise NotFound(envelope_id)


def _answer(call, status: int = 200):
    """The JSON answer of a Control call, its exceptions as error statuses."""
    from ..store import HistoryError
    from .sessions import Conflict, NotFound
    try:
        return _json(call(), status)
    except NotFound as exc:
        return _error(404, str(exc))
    except Conflict as exc:
        return _error(409, str(exc))
    except HistoryError as exc:
        return _error(503, str(exc))
    except ValueError as exc:
        return _error(400, str(exc))


async def _with_body(request, call, status: int = 200):
    """``call(body)``'s answer (as ``_answer``), the request's JSON body
    given; 400 if the body is not JSON."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body must be JSON (Content-Type: application/json)")
    return _answer(lambda: call(body), status)


class Api:
    """The API of one daemon. ``key``: its API key; ``control``: the daemon
    (a Control); ``metrics``: a resync.metrics.ServerMetrics; ``events``:
    its net.events.Events."""

    def __init__(self, key: str, control: Control, metrics, events=None):
        self.key = key.encode()
        self.control = control
        self.metrics = metrics
        if events is None:
            from .events import Events
            events = Events()
        self.events = events
        self._runners: list = []
        self._sockets: set = set()          # open WebSockets (closed when the daemon stops)

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
        app.router.add_get("/api/v1/peers", self._peers)
        app.router.add_get("/api/v1/transfers", self._transfers)
        app.router.add_post("/api/v1/transfers", self._submit)
        app.router.add_get("/api/v1/transfers/{id}", self._transfer)
        app.router.add_patch("/api/v1/transfers/{id}", self._change)
        for action in ("pause", "resume", "cancel"):
            app.router.add_post(f"/api/v1/transfers/{{id}}/{action}", self._act)
        app.router.add_post("/api/v1/pause", self._act_all)
        app.router.add_post("/api/v1/resume", self._act_all)
        app.router.add_get("/api/v1/limits", self._limits)
        app.router.add_put("/api/v1/limits", self._set_limits)
        app.router.add_get("/api/v1/relay", self._relay)
        app.router.add_delete("/api/v1/relay/envelopes/{id}", self._remove_envelope)
        app.router.add_get("/api/v1/events", self._events)
        app.router.add_get("/ws", self._websocket)
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
        return _json(self.control.status())

    async def _peers(self, request):
        return _json({"peers": self.control.peers()})

    async def _transfers(self, request):
        """GET /api/v1/transfers?state=STATE&limit=N&offset=N"""
        q = request.query
        state = q.get("state")
        if state is not None and state not in STATES:
            return _error(400, f"state must be one of {', '.join(STATES)}")
        try:
            limit = int(q.get("limit", PAGE))
            offset = int(q.get("offset", 0))
        except ValueError:
            return _error(400, "limit and offset are whole numbers")
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            return _error(400, f"limit is 1 to {MAX_PAGE}, offset 0 or more")
        items = [t for t in self.control.transfers() if state is None or t["state"] == state]
        return _json({"transfers": items[offset:offset + limit], "total": len(items), "offset": offset,
                      "limit": limit})

    async def _transfer(self, request):
        tid = request.match_info["id"]
        for t in self.control.transfers():
            if t["id"] == tid:
                return _json(t)
        return _error(404, f"no such transfer: {tid} (the daemon keeps the last 100 inbound ones that ended, "
                           "and its own sessions' last 1000)")

    async def _submit(self, request):
        """POST /api/v1/transfers: 202 and the new session (pending)."""
        return await _with_body(request, self.control.submit, 202)

    async def _act(self, request):
        """POST /api/v1/transfers/{id}/pause|resume|cancel: the transfer;
        409 for a transition its state does not allow; 404 if unknown."""
        action = request.path.rsplit("/", 1)[1]
        return _answer(lambda: self.control.act(request.match_info["id"], action))

    async def _change(self, request):
        return await _with_body(request, lambda body: self.control.change(request.match_info["id"], body))

    async def _act_all(self, request):
        return _answer(lambda: self.control.act_all(request.path.rsplit("/", 1)[1]))

    async def _relay(self, request):
        return _answer(self.control.relay)

    async def _remove_envelope(self, request):
        return _answer(lambda: self.control.remove_envelope(request.match_info["id"]))

    async def _limits(self, request):
        return _json(self.control.limits())

    async def _set_limits(self, request):
        return await _with_body(request, self.control.set_limits)

    def _replay(self, request) -> list[dict]:
        """What a client reconnecting after event ``Last-Event-ID`` (or
        ``?since=``) missed: the buffered events after it, led by an
        EventsMissed when the buffer has moved past some."""
        from .events import missed_event
        raw = request.headers.get("Last-Event-ID", request.query.get("since", ""))
        try:
            last = int(raw) if raw else None
        except ValueError:
            last = None
        if last is None:                        # a new client: what happens from now on
            return []
        events, missed = self.events.since(last)
        if missed:
            events.insert(0, missed_event(missed, events[0]["id"] if events else self.events.last_id + 1))
        return events

    async def _events(self, request):
        """GET /api/v1/events: Server-Sent Events (id, event, data lines)."""
        from aiohttp import web
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        last = self.events.last_id
        backlog = self._replay(request)
        try:
            while not self.events.closed:
                for e in backlog:
                    await response.write(f"id: {e['id']}\nevent: {e['type']}\ndata: "
                                         f"{json.dumps(e, sort_keys=True)}\n\n".encode())
                    last = max(last, e["id"])
                seen = self.events.last_id
                await self.events.wait(SSE_PING)
                backlog, _ = self.events.since(last)
                if not backlog and self.events.last_id == seen:
                    await response.write(b": ping\n\n")
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    async def _websocket(self, request):
        """GET /ws: the events of /api/v1/events as JSON text messages. A
        browser's request carries an Origin: only a loopback page's is taken
        (cross-site WebSocket hijacking: browsers apply no same-origin rule
        to WebSockets); a client that is not a browser sends none."""
        from aiohttp import web
        origin = request.headers.get("Origin")
        if origin is not None:
            from urllib.parse import urlsplit
            if not loopback(urlsplit(origin).hostname or ""):
                return _error(403, "Origin check: a WebSocket from a page of another host is refused")
        ws = web.WebSocketResponse(heartbeat=SSE_PING)
        await ws.prepare(request)
        self._sockets.add(ws)

        async def drain() -> None:              # (what the client sends is not read: its close ends this)
            async for _ in ws:
                pass
        reading = asyncio.ensure_future(drain())
        backlog, last = self._replay(request), self.events.last_id
        try:
            while not self.events.closed and not ws.closed and not reading.done():
                for e in backlog:
                    await ws.send_str(json.dumps(e, sort_keys=True))
                    last = max(last, e["id"])
                waiter = asyncio.ensure_future(self.events.wait(SSE_PING))
                await asyncio.wait({waiter, reading}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                backlog, _ = self.events.since(last)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            reading.cancel()
            self._sockets.discard(ws)
            await ws.close()
        return ws

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
        """Stop listening; open event streams and WebSockets end first (an
        open one held aiohttp's cleanup for its timeout)."""
        self.events.close()
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"the daemon stops")
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
    """One call to a daemon's API: its JSON answer. ConnectionFailed (exit
    10) if nothing answers; RefusedError (13) for 401 and 403 and for 409 (a
    transition the transfer's state does not allow); UsageError (2) for 400
    and 404; ProtocolError (12) for any other error status, with the
    daemon's message."""
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
        if exc.code in (401, 403, 409):
            raise RefusedError(f"the daemon at {url} refused: {message}") from None
        if exc.code in (400, 404):
            from ..errors import UsageError
            raise UsageError(message) from None
        raise ProtocolError(f"the daemon at {url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConnectionFailed(f"no daemon answers at {url}: {getattr(why, 'strerror', None) or why}") from None
    except ValueError:
        raise ConnectionFailed(f"the daemon at {url} did not answer JSON") from None


def follow(url: str, key: str, since: int, timeout: float = 4 * SSE_PING):
    """The daemon's events after event ``since``, as they happen (its event
    stream, GET /api/v1/events with Last-Event-ID): a generator of event
    dicts (an EventsMissed first if the daemon's buffer has moved past
    some). ConnectionFailed when the daemon is not there or goes silent for
    ``timeout`` s (it sends a keep-alive every SSE_PING s)."""
    import urllib.error
    import urllib.request

    from ..errors import ConnectionFailed
    req = urllib.request.Request(url.rstrip("/") + "/api/v1/events",
                                 headers={"X-API-Key": key, "Accept": "text/event-stream",
                                          "Last-Event-ID": str(since)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = []
            for raw in r:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    try:
                        yield json.loads("\n".join(data))
                    except ValueError:
                        pass
                    data = []
    except urllib.error.HTTPError as exc:
        raise ConnectionFailed(f"the daemon at {url} refused its event stream: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConnectionFailed(f"the event stream of {url} ended: {getattr(why, 'strerror', None) or why}") from None
    raise ConnectionFailed(f"the daemon at {url} closed its event stream (it stopped?)")
