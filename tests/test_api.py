"""The daemon's HTTP API (resync/net/api.py, docs/api.md): its doors (key,
Host check, no CORS) through aiohttp's test client, the key file, and a real
`resync serve` answering `resync status` and Prometheus scrapes whose
counters agree with its history."""
from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from resync.identity import IdentityError, load_api_key
from resync.apply import TEMP_PREFIX
from resync.net.api import Api, Control, loopback
from resync.protocol.receiver import RECV_PREFIX

from .test_net import Server, _same, _tree

KEY = "k" * 43


class _Metrics:
    def __init__(self):
        from resync.metrics import ServerMetrics
        self.m = ServerMetrics("9.9.9", ["m"])
        self.registry = self.m.registry


def _call(app, requests):
    """Each (method, path, headers) against ``app``: [(status, headers, body)]."""
    from aiohttp.test_utils import TestClient, TestServer

    async def run():
        async with TestClient(TestServer(app)) as client:
            out = []
            for method, path, headers in requests:
                r = await client.request(method, path, headers=headers)
                out.append((r.status, dict(r.headers), await r.read()))
            return out
    return asyncio.run(run())


class _Daemon(Control):
    def __init__(self, status=None):
        self._status = status or (lambda: {"version": "9.9.9"})

    def status(self):
        return self._status()


def _api(status=None):
    return Api(KEY, _Daemon(status), _Metrics())


def test_every_route_but_health_needs_the_key_and_says_nothing_without_it():
    app = _api().application(check_host=True)
    out = _call(app, [
        ("GET", "/health", {}),
        ("GET", "/api/v1/status", {}),
        ("GET", "/api/v1/status", {"X-API-Key": KEY[:-1] + "x"}),
        ("GET", "/api/v1/status", {"Authorization": f"Basic {KEY}"}),
        ("GET", "/api/v1/status", {"X-API-Key": KEY}),
        ("GET", "/api/v1/status", {"Authorization": f"Bearer {KEY}"}),
        ("GET", "/no/such/route", {}),
        ("GET", "/no/such/route", {"X-API-Key": KEY}),
        ("POST", "/api/v1/status", {"X-API-Key": KEY}),
        ("GET", "/metrics", {}),
        ("GET", "/metrics", {"X-API-Key": KEY}),
    ])
    codes = [c for c, _, _ in out]
    assert codes == [200, 401, 401, 401, 200, 200, 401, 404, 405, 401, 200]
    assert json.loads(out[0][2]) == {"status": "OK"}
    assert json.loads(out[4][2]) == {"version": "9.9.9"} == json.loads(out[5][2])
    assert out[1][1]["WWW-Authenticate"].startswith("Bearer") and json.loads(out[1][2])["error"]
    assert json.loads(out[7][2]) == {"error": "Not Found"}         # errors are JSON too
    assert b"resync_build_info" in out[10][2] and out[10][1]["Content-Type"].startswith("text/plain")
    for _, headers, _ in out:                   # no CORS; nothing cached, sniffed or framed
        assert not any(h.lower().startswith("access-control-") for h in headers)
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
        assert headers["X-Frame-Options"] == "DENY"


def test_on_loopback_a_foreign_host_header_is_refused_even_with_the_key():
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own
    name as Host; a name of this machine's loopback passes."""
    app = _api().application(check_host=True)
    hosts = ["evil.example", "evil.example:8731", "127.0.0.1.evil.example", "10.0.0.1:8731",
             "localhost", "localhost:8731", "app.localhost:1", "127.0.0.1:8731", "[::1]:8731", "127.9.9.9"]
    out = _call(app, [("GET", "/api/v1/status", {"X-API-Key": KEY, "Host": h}) for h in hosts]
                + [("GET", "/health", {"Host": "evil.example"})])
    assert [c for c, _, _ in out] == [403] * 4 + [200] * 6 + [403]
    # bound elsewhere (the operator's choice: a key is the door), any Host is taken
    out = _call(_api().application(check_host=False), [("GET", "/api/v1/status",
                                                        {"X-API-Key": KEY, "Host": "siteb.example"})])
    assert out[0][0] == 200


def test_the_keyless_metrics_listener_serves_metrics_only():
    app = _api().metrics_application(check_host=True)
    out = _call(app, [("GET", "/metrics", {}), ("GET", "/api/v1/status", {}), ("GET", "/health", {}),
                      ("GET", "/metrics", {"Host": "evil.example"})])
    assert [c for c, _, _ in out] == [200, 404, 404, 403]
    assert b"resync_transfers_completed_total" in out[0][2]


def test_events_are_numbered_and_a_client_behind_the_buffer_is_told_what_it_missed():
    from resync.net.events import Events

    async def run():
        ev = Events(size=3)
        for n in range(5):
            ev.publish("T", {"n": n})
        assert [e["id"] for e in ev.since(0)[0]] == [3, 4, 5] and ev.since(0)[1] == 2
        assert ev.since(1) == (ev.since(0)[0], 1)
        assert [e["id"] for e in ev.since(3)[0]] == [4, 5] and ev.since(3)[1] == 0
        assert ev.since(5) == ([], 0)
        assert ev.since(99) == ev.since(0)          # a previous start's id: its ids began again
        assert [e["data"]["n"] for e in ev.since(2)[0]] == [2, 3, 4]
    asyncio.run(run())


def _sse(app, headers, publish, read: int):
    """``read`` events from /api/v1/events after ``publish(events)`` ran
    (before and after connecting, as it likes): [(id, type, data)]."""
    from aiohttp.test_utils import TestClient, TestServer

    async def run():
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/api/v1/events", headers={"X-API-Key": KEY, **headers})
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            publish()
            out = []
            while len(out) < read:
                block = (await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)).decode()
                if block.startswith(":"):
                    continue
                fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])["data"]))
            r.close()
            return out
    return asyncio.run(run())


def test_the_event_stream_replays_from_last_event_id_and_says_what_was_lost():
    """SSE: a client reconnecting with Last-Event-ID gets every buffered
    event after it, then the live ones; one further behind than the buffer
    is told how many it lost (EventsMissed), then gets the rest."""
    from resync.net.events import Events
    api = Api(KEY, Control(), _Metrics(), events=None)
    api.events = Events(size=4)
    for n in range(3):
        api.events.publish("TransferProgress", {"n": n})
    got = _sse(api.application(check_host=True), {"Last-Event-ID": "1"},
               lambda: api.events.publish("TransferEnded", {"n": 3}), 3)
    assert got == [(2, "TransferProgress", {"n": 1}), (3, "TransferProgress", {"n": 2}), (4, "TransferEnded", {"n": 3})]
    for n in range(4, 7):                       # ids 5-7: the buffer holds 4-7 now
        api.events.publish("TransferProgress", {"n": n})
    got = _sse(api.application(check_host=True), {"Last-Event-ID": "1"}, lambda: None, 5)
    assert got[0] == (3, "EventsMissed", {"missed": 2, "first_buffered": 4})
    assert [g[0] for g in got[1:]] == [4, 5, 6, 7]
    got = _sse(api.application(check_host=True), {}, lambda: api.events.publish("ConfigReloaded", {}), 1)
    assert got == [(8, "ConfigReloaded", {})]   # a new client: what happens from now on


def test_the_websocket_carries_the_events_and_refuses_another_hosts_page():
    from aiohttp.test_utils import TestClient, TestServer
    api = _api()

    async def run():
        async with TestClient(TestServer(api.application(check_host=True))) as client:
            r = await client.get("/ws", headers={"X-API-Key": KEY, "Origin": "https://evil.example"})
            assert r.status == 403
            r = await client.get("/ws", headers={"Origin": "http://localhost:8731"})
            assert r.status == 401                  # the key first
            out = []
            for origin in ({"Origin": "http://127.0.0.1:8731"}, {}):     # a loopback page; not a browser
                ws = await client.ws_connect("/ws", headers={"X-API-Key": KEY, **origin})
                api.events.publish("TransferStarted", {"id": "abc"})
                out.append(json.loads((await asyncio.wait_for(ws.receive(), 5)).data))
                await ws.close()
            return out
    a, b = asyncio.run(run())
    assert (a["type"], a["data"], b["id"]) == ("TransferStarted", {"id": "abc"}, a["id"] + 1)


def test_loopback_names():
    assert all(loopback(h) for h in ("localhost", "LOCALHOST.", "a.b.localhost", "127.0.0.1", "127.1.2.3", "::1",
                                     "[::1]"))
    assert not any(loopback(h) for h in ("localhost.example", "evil-localhost", "10.0.0.1", "0.0.0.0", "::",
                                         "example.org", ""))


def test_the_api_key_is_made_once_private_and_refused_when_others_can_read_it(tmp_path):
    with pytest.raises(IdentityError, match="no API key"):
        load_api_key(tmp_path)
    key = load_api_key(tmp_path, create=True)
    path = tmp_path / "api-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= 43
    assert load_api_key(tmp_path, create=True) == key == load_api_key(tmp_path)
    assert load_api_key(tmp_path / "other", create=True) != key
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        load_api_key(tmp_path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(IdentityError, match="not an API key"):
        load_api_key(tmp_path)


def _api_of(site) -> tuple[str, str]:
    """(url, key) of the site's running daemon, from its config directory
    (the API starts listening a moment after the transfers' ports)."""
    d = Path(site.env["XDG_CONFIG_HOME"]) / "resync"
    deadline = time.monotonic() + 30
    while not (d / "api.json").exists():
        assert time.monotonic() < deadline, "no api.json"
        time.sleep(0.05)
    return json.loads((d / "api.json").read_text())["url"], (d / "api-key").read_text().strip()


def _get(url: str, key: str | None, path: str, host: str | None = None):
    import urllib.error
    import urllib.request
    headers = {"X-API-Key": key} if key else {}
    if host:
        headers["Host"] = host
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _replayed(url: str, key: str, until) -> list[dict]:
    """The events of a daemon's /api/v1/events from its first (since=0),
    read until ``until(events)``."""
    import aiohttp

    async def run():
        out = []
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/api/v1/events?since=0", headers={"X-API-Key": key}) as r:
                while not until(out):
                    block = (await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)).decode()
                    if not block.startswith(":"):
                        data = [line for line in block.split("\n") if line.startswith("data: ")][0]
                        out.append(json.loads(data[len("data: "):]))
        return out
    return asyncio.run(run())


def _post(url: str, key: str | None, path: str):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url + path, data=b"", method="POST", headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_operator_cancels_a_running_push_and_the_client_stops_without_retrying(sites, tmp_path):
    """POST /api/v1/transfers/{id}/cancel: the client is told (exit 13, no
    retry though --retry-for allows minutes), nothing staged stays and the
    destination keeps its old files; the transfer shows as cancelled, in the
    list, the events and the metrics."""
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 63)
    (module / "dst").mkdir(parents=True)
    (module / "dst" / "old.txt").write_text("old\n")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--api", "127.0.0.1:0") as server:
        url, key = _api_of(server_site)
        p = client.popen("sync", "--delete", src, server.url("m", "dst"), "--peer-id", server_site.id, "--bwlimit",
                         "300K", "--retry-for", "300", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (active := json.loads(_get(url, key, "/api/v1/transfers?state=active")[1])["transfers"]):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        tid = active[0]["id"]
        assert _post(url, None, f"/api/v1/transfers/{tid}/cancel")[0] == 401
        code, body = _post(url, key, f"/api/v1/transfers/{tid}/cancel")
        assert code == 200 and json.loads(body)["state"] == "cancelled"
        started = time.monotonic()
        assert p.wait(30) == 13
        assert time.monotonic() - started < 10                    # told at once, not retried
        assert "cancelled" in p.stderr.read()
        assert (module / "dst" / "old.txt").read_text() == "old\n"          # not deleted: the run did not end
        for path in (module / "dst").rglob("*"):    # every path old or new; nothing staged left
            rel = path.relative_to(module / "dst")
            assert not path.name.startswith((TEMP_PREFIX, RECV_PREFIX)), rel
            if rel.name == "old.txt":
                continue
            twin = src / rel
            assert twin.is_symlink() == path.is_symlink() and twin.is_dir() == path.is_dir(), rel
            if path.is_symlink():
                assert os.readlink(path) == os.readlink(twin)
            elif path.is_file():
                assert path.read_bytes() == twin.read_bytes(), rel
        deadline = time.monotonic() + 10
        while (t := json.loads(_get(url, key, f"/api/v1/transfers/{tid}")[1]))["state"] != "cancelled":
            assert time.monotonic() < deadline, t
            time.sleep(0.05)
        assert _post(url, key, f"/api/v1/transfers/{tid}/cancel")[0] == 409
        text = _get(url, key, "/metrics")[1]
        assert _metric(text, "resync_transfers_cancelled_total", direction="push", module="m") == 1
        assert _metric(text, "resync_transfers_failed_total", direction="push", module="m") == 0
        events = _replayed(url, key, until=lambda evs: any(e["type"] == "TransferEnded" for e in evs))
        assert [e["data"]["state"] for e in events if e["type"] == "TransferEnded"] == ["cancelled"]


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} {labels} not in the metrics"
    return float(m.group(1))


@pytest.fixture
def sites(tmp_path):
    from .test_net import Site
    return Site(tmp_path, "client"), Site(tmp_path, "server")


def test_a_real_daemon_answers_status_and_metrics_that_agree_with_its_history(sites, tmp_path):
    """Two pushes (QUIC and TLS over TCP) and a pull, then a push refused
    (no such module: not a transfer the daemon took) and one cut by the
    client's SIGKILL (failed): `resync status` and /metrics count them as
    the history does, byte for byte; the daemon's own log names its API."""
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 61)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--api", "127.0.0.1:0") as server:
        url, key = _api_of(server_site)
        assert re.search(r"API on http://127\.0\.0\.1:\d+ \(its key: .*api-key\)", server.text())
        assert _get(url, None, "/api/v1/status")[0] == 401
        assert _get(url, key, "/api/v1/status", host="attacker.example")[0] == 403
        pushed = {}
        for transport in ("quic", "tcp"):
            r = client.run("sync", "--json", src, server.url("m", transport), "--peer-id", server_site.id,
                           "--transport", transport)
            assert r.returncode == 0, r.stderr
            pushed[transport] = json.loads(r.stdout.splitlines()[-1])["transfer_id"]
            _same(src, module / transport)
        pulled = tmp_path / "pulled"
        r = client.run("sync", server.url("m", "quic"), pulled, "--peer-id", server_site.id, "--transport", "quic")
        assert r.returncode == 0, r.stderr
        r = client.run("sync", src, server.url("nomodule", "x"), "--peer-id", server_site.id)
        assert r.returncode == 13
        p = client.popen("sync", src, server.url("m", "cut"), "--peer-id", server_site.id, "--bwlimit", "200K",
                         "--retry-for", "0", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while json.loads(_get(url, key, "/api/v1/status")[1])["transfers"]["active"] == 0:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        running = _get(url, key, "/metrics")[1]
        assert _metric(running, "resync_active_transfers", direction="push") == 1
        p.kill()
        p.wait()
        while json.loads(_get(url, key, "/api/v1/status")[1])["transfers"]["failed"] == 0:
            assert time.monotonic() < deadline + 30, "the cut transfer did not end at the daemon"
            time.sleep(0.1)
        r = client.run("status", "--json", "--config-dir", Path(server_site.env["XDG_CONFIG_HOME"]) / "resync")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["transfers"] == {"active": 0, "completed": 3, "failed": 1, "cancelled": 0, "push": 0, "pull": 0}
        assert status["device_id"] == server_site.id and status["api"] == url
        assert [m["name"] for m in status["modules"]] == ["m"]
        text = _get(url, key, "/metrics")[1]
        assert _metric(text, "resync_transfers_completed_total", direction="push", module="m") == 2
        assert _metric(text, "resync_transfers_completed_total", direction="pull", module="m") == 1
        assert _metric(text, "resync_transfers_failed_total", direction="push", module="m") == 1
        assert _metric(text, "resync_active_transfers", direction="push") == 0
        assert _metric(text, "resync_transfer_duration_seconds_count", direction="push") == 3
        r = client.run("status", "--config-dir", Path(server_site.env["XDG_CONFIG_HOME"]) / "resync")
        assert r.returncode == 0 and "3 completed, 1 failed and 0 cancelled" in r.stdout
        listed = json.loads(_get(url, key, "/api/v1/transfers")[1])
        assert listed["total"] == 4 and [t["state"] for t in listed["transfers"]] == ["failed"] + ["completed"] * 3
        assert [t["direction"] for t in listed["transfers"]] == ["push", "pull", "push", "push"]
        assert [t["path"] for t in listed["transfers"]] == ["cut", "quic", "tcp", "quic"]
        quic = listed["transfers"][3]
        assert quic["id"] == pushed["quic"] and quic["peer_id"] == client.id and quic["module"] == "m"
        assert quic["files_done"] == sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        assert json.loads(_get(url, key, f"/api/v1/transfers/{quic['id']}")[1]) == quic
        assert _get(url, key, "/api/v1/transfers/0000000000000000")[0] == 404
        assert json.loads(_get(url, key, "/api/v1/transfers?state=failed")[1])["total"] == 1
        page = json.loads(_get(url, key, "/api/v1/transfers?limit=2&offset=1")[1])["transfers"]
        assert page == listed["transfers"][1:3]
        assert _get(url, key, "/api/v1/transfers?state=stuck")[0] == 400
        assert _post(url, key, f"/api/v1/transfers/{quic['id']}/cancel")[0] == 409      # it has ended
        assert _post(url, key, "/api/v1/transfers/0000000000000000/cancel")[0] == 404
        events = _replayed(url, key, until=lambda evs: sum(e["type"] == "TransferEnded" for e in evs) == 4)
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))      # from 1, none missing
        for t in listed["transfers"]:
            mine = [e["type"] for e in events if e["data"].get("id") == t["id"]]
            assert mine[0] == "TransferStarted" and mine[-1] == "TransferEnded", mine
            assert set(mine[1:-1]) <= {"TransferProgress"}
        assert [e["data"] for e in events if e["type"] == "TransferEnded"] == listed["transfers"][::-1]
        assert server.stop() == 0
    assert not (Path(server_site.env["XDG_CONFIG_HOME"]) / "resync" / "api.json").exists()
    from resync.store import History
    h = History(Path(server_site.env["XDG_DATA_HOME"]) / "resync" / "history.duckdb")
    h.merge()
    _, rows = h.query("SELECT role, sum(coalesce(udp_bytes_received, 0) + coalesce(tcp_bytes_received, 0)), "
                      "sum(coalesce(udp_bytes_sent, 0) + coalesce(tcp_bytes_sent, 0)), sum(shards_received), "
                      "sum(shards_sent), sum(coalesce(udp_packets_sent, 0)), count(*) FROM transfers "
                      "GROUP BY role ORDER BY role")
    (rx, rx_in, rx_out, rx_shards, _, rx_packets, n_rx), (tx, tx_in, tx_out, _, tx_shards, tx_packets, n_tx) = rows
    assert (rx, n_rx, tx, n_tx) == ("receive", 3, "send", 1)
    assert _metric(text, "resync_received_bytes_total", direction="push", module="m") == rx_in > 3_000_000
    assert _metric(text, "resync_sent_bytes_total", direction="push", module="m") == rx_out
    assert _metric(text, "resync_shards_received_total", direction="push", module="m") == rx_shards
    assert _metric(text, "resync_sent_bytes_total", direction="pull", module="m") == tx_out > 3_000_000
    assert _metric(text, "resync_shards_sent_total", direction="pull", module="m") == tx_shards > 0
    assert _metric(text, "resync_quic_packets_sent_total", direction="pull", module="m") == tx_packets > 0
    assert _metric(text, "resync_quic_packets_sent_total", direction="push", module="m") == rx_packets
    assert _metric(text, "resync_shards_recovered_total", direction="push", module="m") == 0    # (no loss here)


def test_shards_rebuilt_from_parity_are_counted_as_the_receiver_reports_them(sites, tmp_path):
    """A server whose received shards are corrupted now and then (a test hook
    below QUIC's protection: the stripe check drops them) rebuilds the
    missing data shards from parity; its metric says how many, as the
    receiver's statistics (the client's --json) do."""
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 64)
    module.mkdir()
    server_site.env["RESYNC_TEST_CORRUPT_SHARDS"] = "0.03"
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--api", "127.0.0.1:0") as server:
        url, key = _api_of(server_site)
        r = client.run("sync", "--json", src, server.url("m", "x"), "--peer-id", server_site.id,
                       "--transport", "quic")
        assert r.returncode == 0, r.stderr
        _same(src, module / "x")
        reported = json.loads(r.stdout.splitlines()[-1])
        assert reported["corrupt_shards"] > 0 and reported["shards_recovered"] > 0
        text = _get(url, key, "/metrics")[1]
        assert _metric(text, "resync_shards_recovered_total", direction="push", module="m") == \
            reported["shards_recovered"]


def test_status_without_a_daemon_or_with_a_wrong_key_is_a_one_line_error(sites, tmp_path):
    client, server_site = sites
    d = Path(server_site.env["XDG_CONFIG_HOME"]) / "resync"
    r = client.run("status", "--config-dir", d)
    assert r.returncode == 10 and r.stderr.count("\n") == 1 and "no daemon's API is known" in r.stderr
    module = tmp_path / "module"
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--api", "127.0.0.1:0"):
        url, _ = _api_of(server_site)
        other = tmp_path / "other"
        load_api_key(other, create=True)
        r = client.run("status", "--config-dir", other, "--api", url)
        assert r.returncode == 13 and r.stderr.count("\n") == 1 and "refused" in r.stderr
    r = client.run("status", "--config-dir", d, "--api", url)
    assert r.returncode == 10 and "no daemon answers" in r.stderr


def test_an_api_address_in_use_stops_the_daemon_only_when_asked_for(sites, tmp_path):
    """--api HOST:PORT taken: exit 10 with a line saying so; the default
    address taken (another daemon's): the daemon serves, without an API,
    and says so in its log."""
    import socket
    client, server_site = sites
    module = tmp_path / "module"
    module.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = server_site.run("serve", "--listen", "127.0.0.1:0", "--module", f"m={module}", "--allow", client.id,
                            "--api", f"127.0.0.1:{port}", timeout=60)
        assert r.returncode == 10 and f"cannot listen for the API on 127.0.0.1:{port}" in r.stderr
        cfg = tmp_path / "serve.toml"
        cfg.write_text(f'api = "127.0.0.1:{port}"\n')
        r = server_site.run("serve", "--listen", "127.0.0.1:0", "--module", f"m={module}", "--allow", client.id,
                            "--config", cfg, timeout=60)
        assert r.returncode == 10                # (the config's address is asked for too)
    r = server_site.run("serve", "--no-api", "--metrics", "127.0.0.1:0", "--module", f"m={module}", "--allow",
                        client.id, timeout=60)
    assert r.returncode == 2 and "--metrics needs the API" in r.stderr
    from resync.net.api import DEFAULT_PORT
    with socket.socket() as s:
        try:                                    # (taken already: by another daemon, as in the case at hand)
            s.bind(("127.0.0.1", DEFAULT_PORT))
            s.listen()
        except OSError:
            pass
        with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
            deadline = time.monotonic() + 30
            while "API not offered" not in server.text():
                assert time.monotonic() < deadline, server.text()
                time.sleep(0.05)
            assert f"127.0.0.1:{DEFAULT_PORT}" in server.text()
            src = tmp_path / "src"
            _tree(src, 62, files=5)
            r = client.run("sync", src, server.url("m", "x"), "--peer-id", server_site.id)
            assert r.returncode == 0, r.stderr
            _same(src, module / "x")
