"""The daemon's own transfers (net.sessions): submitted through its API and
`resync transfer`, run by the daemon, paused, resumed, cancelled, expired,
taken up again after the daemon's SIGKILL — against real daemons on loopback."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from resync.apply import TEMP_PREFIX
from resync.net.sessions import parse_submission
from resync.protocol.receiver import RECV_PREFIX

from .test_api import _api_of, _get, _metric, _replayed
from .test_net import Server, Site, _same, _tree


@pytest.fixture
def pair(tmp_path):
    """Site a (its daemon runs the transfers; it serves a module of its own
    to site c's clients) and site b (the server they go to)."""
    return Site(tmp_path, "a"), Site(tmp_path, "b")


def _call(url: str, key: str, path: str, method: str = "GET", body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _until(url: str, key: str, tid: str, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, t = _call(url, key, f"/api/v1/transfers/{tid}")
        assert code == 200, t
        if pred(t):
            return t
        assert time.monotonic() < deadline, t
        time.sleep(0.05)


def _daemon(site: Site, module: Path, allow: str, *extra, port: int = 0) -> Server:
    module.mkdir(parents=True, exist_ok=True)
    return Server(site, "--module", f"own={module}", "--allow", allow, "--api", "127.0.0.1:0", *extra, port=port)


def _size(root: Path) -> int:
    """Bytes of the regular files in a tree."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _server(site: Site, module: Path, allow: str, **kw) -> Server:
    """``resync serve`` of module m (made if absent) for device ``allow``, without an API."""
    module.mkdir(parents=True, exist_ok=True)
    return Server(site, "--module", f"m={module}", "--allow", allow, "--no-api", **kw)


def _old_or_new(dst: Path, src: Path, old: dict[str, bytes], checkpoint: bool = False) -> int:
    """Every path of ``dst`` is the source's (new) or what was there before
    (old), nothing half written in sight; how many are new. ``checkpoint``:
    the receiver's hidden staging directory may hold what a cut transfer
    kept for its resume (and nothing else staged)."""
    new = 0
    for path in dst.rglob("*"):
        rel = str(path.relative_to(dst))
        if checkpoint and rel.startswith(RECV_PREFIX):
            continue
        assert not path.name.startswith((TEMP_PREFIX, RECV_PREFIX)), rel
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        twin = src / rel
        if twin.is_file() and not twin.is_symlink() and data == twin.read_bytes():
            new += 1
        else:
            assert old.get(rel) == data, f"{rel} is neither old nor new"
    return new


def test_submitting_checks_the_body_and_says_why_in_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = {"source": str(src), "destination": "resync://h:1/m/p"}
    r = parse_submission(good, 100.0)
    assert (r["direction"], r["local"], r["remote"], r["module"], r["state"], r["priority"], r["expires"]) == \
        ("push", str(src), "resync://h:1/m/p", "m", "pending", "normal", 100.0 + 7 * 86400)
    pull = parse_submission({"source": "resync://h/m", "destination": str(tmp_path / "new"), "priority": "critical",
                             "ttl_seconds": 60}, 0.0)
    assert (pull["direction"], pull["local"], pull["priority"], pull["expires"]) == \
        ("pull", str(tmp_path / "new"), "critical", 60.0)
    for body, why in (([], "JSON object"), ({"source": str(src)}, "required"),
                      ({**good, "colour": 1}, "unknown key 'colour'"),
                      ({"source": str(src), "destination": str(tmp_path)}, "one of source and destination"),
                      ({"source": "src", "destination": "resync://h/m"}, "must be absolute"),
                      ({"source": str(tmp_path / "none"), "destination": "resync://h/m"}, "not a directory"),
                      ({"source": "resync://h/m", "destination": str(tmp_path / "x" / "y")}, "no such directory"),
                      ({**good, "priority": "urgent"}, "priority 'urgent'"),
                      ({**good, "ttl_seconds": 0}, "ttl_seconds"), ({**good, "delete": "yes"}, "delete: expected"),
                      ({**good, "bytes_per_second": -1}, "bytes_per_second"), ({**good, "transport": "udp"}, "transport"),
                      ({**good, "exclude": [1]}, "exclude"), ({**good, "peer_id": "nope"}, "device ID"),
                      ({**good, "destination": "http://h/m"}, "not resync's")):
        with pytest.raises(ValueError, match=why):
            parse_submission(body, 0.0)


def test_a_push_submitted_to_the_daemon_runs_and_is_recorded_and_counted(pair, tmp_path):
    """`resync transfer add --wait` follows the transfer to its end through
    the event stream; the tree arrives; the daemon's history has the run and
    its metrics the transfer; the answer to a transition its state does not
    allow is 409 (exit 13), to an unknown id 404 (exit 2)."""
    a, b = pair
    src = tmp_path / "src"
    _tree(src, 11, files=30)
    with _server(b, tmp_path / "mb", a.id) as sb, \
            _daemon(a, tmp_path / "ma", b.id):
        url, key = _api_of(a)
        r = a.run("transfer", "add", src, sb.url("m", "dst"), "--peer-id", b.id, "--priority", "high", "--wait",
                  "--json")
        assert r.returncode == 0, r.stderr
        t = json.loads(r.stdout)
        assert (t["state"], t["outcome"], t["exit_code"], t["priority"], t["kind"], t["peer_id"]) == \
            ("completed", "ok", 0, "high", "outbound", b.id)
        assert t["progress"]["files_done"] == t["progress"]["files_total"] == t["result"]["files_transferred"] > 0
        _same(src, tmp_path / "mb" / "dst")
        listed = a.run("transfer", "list", "--state", "completed")
        assert listed.returncode == 0 and t["id"] in listed.stdout and "completed" in listed.stdout
        assert _call(url, key, f"/api/v1/transfers/{t['id']}/pause", "POST", {})[0] == 409
        r = a.run("transfer", "pause", t["id"])
        assert r.returncode == 13 and "completed" in r.stderr and r.stderr.count("\n") == 1
        r = a.run("transfer", "show", "0123456789abcdef")
        assert r.returncode == 2 and "no such transfer" in r.stderr
        text = _get(url, key, "/metrics")[1]
        assert _metric(text, "resync_transfers_completed_total", direction="push", module="m") == 1
        assert _metric(text, "resync_sent_bytes_total", direction="push", module="m") == \
            t["result"]["bytes_on_wire_sent"]
        assert _metric(text, "resync_queued_transfers", priority="critical") == 0
        rows = a.run("history", "--json")
        assert rows.returncode == 0, rows.stderr
        runs = json.loads(rows.stdout)
        assert any(x.get("destination") == sb.url("m", "dst") and x.get("status") == "ok" for x in runs), runs


def test_pause_resume_and_cancel_in_the_middle_lose_nothing_and_resend_nothing(pair, tmp_path):
    a, b = pair
    src, dst = tmp_path / "src", tmp_path / "mb" / "dst"
    _tree(src, 12, files=30)
    dst.mkdir(parents=True)
    old = {"old.txt": b"old\n"}
    (dst / "old.txt").write_bytes(b"old\n")
    total = _size(src)
    with _server(b, tmp_path / "mb", a.id) as sb, \
            _daemon(a, tmp_path / "ma", b.id):
        url, key = _api_of(a)
        code, t = _call(url, key, "/api/v1/transfers", "POST",
                        {"source": str(src), "destination": sb.url("m", "dst"), "peer_id": b.id, "delete": True,
                         "bytes_per_second": total // 6})
        assert code == 202 and t["state"] in ("pending", "active"), t
        tid = t["id"]
        _until(url, key, tid, lambda t: t["state"] == "active" and t["progress"]["bytes_done"] > total // 4)
        code, t = _call(url, key, f"/api/v1/transfers/{tid}/pause", "POST", {})
        assert code == 200
        paused = _until(url, key, tid, lambda t: t["state"] == "paused", 15)
        time.sleep(1.0)                         # (the server applies what arrived, checkpoints the rest)
        arrived = _old_or_new(dst, src, old, checkpoint=True)
        assert any(p.name.startswith(RECV_PREFIX) for p in dst.iterdir())      # the resume's checkpoint
        assert arrived < sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        kept = sum(p.stat().st_size for p in dst.glob(RECV_PREFIX + "*/**/*") if p.is_file())
        assert kept > total // 5                # what arrived, kept for the resume
        assert (dst / "old.txt").exists()       # --delete: not before the run ends
        assert _call(url, key, f"/api/v1/transfers/{tid}/resume", "POST", {})[0] == 200
        assert _call(url, key, f"/api/v1/transfers/{tid}/resume", "POST", {})[0] == 409
        done = _until(url, key, tid, lambda t: t["state"] == "completed", 60)
        _same(src, dst)
        assert done["attempts"] == paused["attempts"] + 1
        # the second run sent what had not arrived: not the files that had, and not a kept partial's bytes
        assert done["result"]["files_transferred"] <= done["result"]["files"] - arrived
        assert done["result"]["bytes_on_wire_sent"] < total - paused["progress"]["bytes_done"] * 0.8
        # cancel: one more, cancelled in the middle: every path old or new, and it stays cancelled
        (tmp_path / "src2").mkdir()
        _tree(tmp_path / "src2", 13, files=20)
        code, t = _call(url, key, "/api/v1/transfers", "POST",
                        {"source": str(tmp_path / "src2"), "destination": sb.url("m", "dst2"), "peer_id": b.id,
                         "bytes_per_second": 400_000})
        _until(url, key, t["id"], lambda t: t["state"] == "active" and t["progress"]["bytes_done"] > 200_000)
        r = a.run("transfer", "cancel", t["id"])
        assert r.returncode == 0, r.stderr
        ended = _until(url, key, t["id"], lambda t: t["state"] == "cancelled", 15)
        assert ended["exit_code"] == 13
        time.sleep(0.5)
        _old_or_new(tmp_path / "mb" / "dst2", tmp_path / "src2", {})
        assert _call(url, key, f"/api/v1/transfers/{t['id']}/resume", "POST", {})[0] == 409
        events = _replayed(url, key, until=lambda evs: sum(e["type"] == "TransferEnded" for e in evs) >= 2)
        kinds = [e["type"] for e in events if e.get("data", {}).get("id") == tid]
        assert kinds[0] == "TransferQueued" and "TransferPaused" in kinds and "TransferResumed" in kinds
        assert kinds[-1] == "TransferEnded"


def test_a_running_transfers_own_limit_changes_at_once(pair, tmp_path):
    """PATCH of a running transfer's bytes_per_second: held to 100 KB/s its
    tree would take half a minute; lifted, it completes within seconds."""
    a, b = pair
    src = tmp_path / "src"
    _tree(src, 17, files=10)
    with _server(b, tmp_path / "mb", a.id) as sb, \
            _daemon(a, tmp_path / "ma", b.id):
        url, key = _api_of(a)
        tid = _call(url, key, "/api/v1/transfers", "POST", {"source": str(src), "destination": sb.url("m", "d"),
                                                             "peer_id": b.id, "bytes_per_second": 100_000})[1]["id"]
        _until(url, key, tid, lambda t: t["state"] == "active" and t["progress"]["bytes_done"] > 0)
        time.sleep(1.0)
        slow = _call(url, key, f"/api/v1/transfers/{tid}")[1]["progress"]["bytes_done"]
        assert slow < 400_000, slow
        code, t = _call(url, key, f"/api/v1/transfers/{tid}", "PATCH", {"bytes_per_second": 0})
        assert code == 200 and t["limits"]["bytes_per_second"] == 0
        started = time.monotonic()
        _until(url, key, tid, lambda t: t["state"] == "completed", 30)
        assert time.monotonic() - started < 8
        _same(src, tmp_path / "mb" / "d")


def test_sessions_survive_the_daemons_sigkill_and_the_running_one_resumes(pair, tmp_path):
    """kill -9 of the daemon in the middle of a push: started again, it
    takes the session up from the server's checkpoints (what had arrived is
    not sent again) and starts the pending one; a paused one stays paused."""
    a, b = pair
    src = tmp_path / "src"
    _tree(src, 14, files=30)
    total = _size(src)
    conf = tmp_path / "a.toml"
    conf.write_text("max_sessions = 1\n")
    with _server(b, tmp_path / "mb", a.id) as sb:
        first = _daemon(a, tmp_path / "ma", b.id, "--config", conf)
        url, key = _api_of(a)
        body = {"source": str(src), "destination": sb.url("m", "one"), "peer_id": b.id, "bytes_per_second": total // 5}
        one = _call(url, key, "/api/v1/transfers", "POST", body)[1]["id"]
        two = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "two"),
                                                             "bytes_per_second": 0})[1]["id"]
        three = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "three")})[1]["id"]
        assert _call(url, key, f"/api/v1/transfers/{three}/pause", "POST", {})[1]["state"] == "paused"
        assert _call(url, key, f"/api/v1/transfers/{two}", "GET")[1]["state"] == "pending"    # (one slot)
        before = _until(url, key, one, lambda t: t["progress"]["bytes_done"] > total // 3)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        first._f.close()
        (Path(a.env["XDG_CONFIG_HOME"]) / "resync" / "api.json").unlink()
        with _daemon(a, tmp_path / "ma", b.id, "--config", conf) as again:
            url, key = _api_of(a)
            done = _until(url, key, one, lambda t: t["state"] == "completed", 90)
            _same(src, tmp_path / "mb" / "one")
            assert done["attempts"] >= 2
            assert done["result"]["bytes_on_wire_sent"] < total - before["progress"]["bytes_done"] * 0.5
            _until(url, key, two, lambda t: t["state"] == "completed", 60)
            _same(src, tmp_path / "mb" / "two")
            assert _call(url, key, f"/api/v1/transfers/{three}")[1]["state"] == "paused"
            assert "1 cut by the daemon's stop" in again.text() or "to run" in again.text()


def test_the_highest_priority_waiting_starts_first_and_a_ttl_expires_a_session(pair, tmp_path):
    a, b = pair
    src = tmp_path / "src"
    _tree(src, 15, files=10)
    conf = tmp_path / "a.toml"
    conf.write_text("max_sessions = 1\n")
    with _server(b, tmp_path / "mb", a.id) as sb, \
            _daemon(a, tmp_path / "ma", b.id, "--config", conf):
        url, key = _api_of(a)
        body = {"source": str(src), "peer_id": b.id}
        slow = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "slow"),
                                                              "bytes_per_second": 300_000})[1]["id"]
        normal = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "n")})[1]["id"]
        high = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "h"),
                                                              "priority": "high"})[1]["id"]
        late = _call(url, key, "/api/v1/transfers", "POST", {**body, "destination": sb.url("m", "c")})[1]["id"]
        assert _call(url, key, f"/api/v1/transfers/{late}", "PATCH", {"priority": "critical"})[0] == 200
        assert _call(url, key, f"/api/v1/transfers/{late}", "PATCH", {"priority": "top"})[0] == 400
        text = _get(url, key, "/metrics")[1]
        assert _metric(text, "resync_queued_transfers", priority="normal") == 1
        assert _metric(text, "resync_queued_transfers", priority="critical") == 1
        assert _call(url, key, f"/api/v1/transfers/{slow}/cancel", "POST", {})[0] == 200
        for tid in (late, high, normal):
            _until(url, key, tid, lambda t: t["state"] == "completed", 60)
        started = [e["data"]["id"] for e in _replayed(url, key, until=lambda evs: sum(
            e["type"] == "TransferEnded" for e in evs) >= 4) if e["type"] == "TransferStarted"]
        assert started == [slow, late, high, normal]
        # a server that never answers: retried until the TTL, then expired (exit 30 for --wait)
        r = a.run("transfer", "add", src, "resync://127.0.0.1:9/m/x", "--peer-id", b.id, "--ttl", "3s", "--wait",
                  timeout=60)
        assert r.returncode == 30, r.stderr
        assert "expired" in r.stderr


def test_pausing_everything_cuts_inbound_transfers_until_resumed_and_limits_change_at_run_time(pair, tmp_path):
    """POST /api/v1/pause: the daemon's own paused, an inbound push cut and
    its client told busy (it retries) until POST /api/v1/resume, then it
    completes; PUT /api/v1/limits slows what the daemon sends at once, in
    bytes and in shards a second."""
    a, c = pair
    src = tmp_path / "src"
    _tree(src, 16, files=20)
    total = _size(src)
    with _daemon(a, tmp_path / "ma", c.id) as sa:
        url, key = _api_of(a)
        p = c.popen("sync", src, sa.url("own", "in"), "--peer-id", a.id, "--bwlimit", str(total // 6),
                    "--retry-for", "120", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (active := _call(url, key, "/api/v1/transfers?state=active")[1]["transfers"]):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        assert _call(url, key, f"/api/v1/transfers/{active[0]['id']}/pause", "POST", {})[0] == 409   # (inbound)
        time.sleep(1.0)
        code, answer = _call(url, key, "/api/v1/pause", "POST", {})
        assert code == 200 and answer["paused"] and answer["inbound"] == [active[0]["id"]]
        assert _call(url, key, "/api/v1/status")[1]["paused"] is True
        time.sleep(3.0)
        assert p.poll() is None                 # retrying, told busy
        assert not _call(url, key, "/api/v1/transfers?state=active")[1]["transfers"]
        _old_or_new(tmp_path / "ma" / "in", src, {}, checkpoint=True)
        assert _call(url, key, "/api/v1/resume", "POST", {})[1]["paused"] is False
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["resumed_bytes"] > 0 or "busy" in err
        _same(src, tmp_path / "ma" / "in")
        # limits: the daemon's own, at run time
        assert _call(url, key, "/api/v1/limits")[1] == {"bytes_per_second": 0, "shards_per_second": 0}
        assert _call(url, key, "/api/v1/limits", "PUT", {"bytes_per_second": -5})[0] == 400
        r = a.run("transfer", "limits", "--bwlimit", str(total // 3))
        assert r.returncode == 0 and "/s" in r.stdout, r.stderr
        started = time.monotonic()
        r = c.run("sync", sa.url("own", "in"), tmp_path / "back", "--peer-id", a.id, "--json")
        took = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        assert took > 2.0, took                 # ~3 s at a third of the tree a second (0.1 s without)
        assert _call(url, key, "/api/v1/limits", "PUT", {"bytes_per_second": 0})[1]["bytes_per_second"] == 0
        # and in shards a second, over QUIC (a shard: ~1.3 KB)
        assert _call(url, key, "/api/v1/limits", "PUT", {"shards_per_second": 1000})[0] == 200
        started = time.monotonic()
        r = c.run("sync", sa.url("own", "in"), tmp_path / "back2", "--peer-id", a.id, "--transport", "quic")
        took = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        assert took > 1.5, took                 # ~2.5 s for the tree's 2,600 shards (0.5 s without)
        _same(src, tmp_path / "back2")


def test_transfers_to_one_server_share_a_connection_and_pause_cancel_or_lose_it_one_by_one(pair, tmp_path):
    """Three pushes over QUIC to one server run on channels of one
    connection (one client address in the server's log): one paused and one
    cancelled in the middle while the third goes on; the server killed and
    started again: the running ones retry on a new connection and resume."""
    a, b = pair
    sources = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        _tree(src, 30 + i, files=20)
        sources.append(src)
    total = _size(sources[0])
    sb = _server(b, tmp_path / "mb", a.id)
    port = sb.port
    with _daemon(a, tmp_path / "ma", b.id):
        url, key = _api_of(a)
        ids = [_call(url, key, "/api/v1/transfers", "POST",
                     {"source": str(src), "destination": sb.url("m", f"d{i}"), "peer_id": b.id, "transport": "quic",
                      "bytes_per_second": total // 8, "priority": ("critical", "high", "normal")[i]})[1]["id"]
               for i, src in enumerate(sources)]
        for tid in ids:
            _until(url, key, tid, lambda t: t["state"] == "active" and t["progress"]["bytes_done"] > total // 10)
        clients = set(re.findall(r"from (127\.0\.0\.1:\d+): push into m/d\d: started", sb.text()))
        assert len(clients) == 1, sb.text()                        # one connection, three channels
        assert _call(url, key, f"/api/v1/transfers/{ids[1]}/pause", "POST", {})[0] == 200
        assert _call(url, key, f"/api/v1/transfers/{ids[2]}/cancel", "POST", {})[0] == 200
        _until(url, key, ids[1], lambda t: t["state"] == "paused", 15)
        _until(url, key, ids[2], lambda t: t["state"] == "cancelled", 15)
        running = _call(url, key, f"/api/v1/transfers/{ids[0]}")[1]
        assert running["state"] == "active", running              # the others' cut left it running
        assert _call(url, key, f"/api/v1/transfers/{ids[0]}", "PATCH", {"priority": "normal"})[0] == 200
        os.killpg(sb.proc.pid, signal.SIGKILL)                     # the server dies under the connection
        sb.proc.wait(10)
        sb._f.close()
        time.sleep(1.0)
        with _server(b, tmp_path / "mb", a.id, port=port) as again:
            assert _call(url, key, f"/api/v1/transfers/{ids[1]}/resume", "POST", {})[0] == 200
            for tid in ids[:2]:
                done = _until(url, key, tid, lambda t: t["state"] == "completed", 90)
                assert done["attempts"] >= 2 and done["result"]["transport"] == "quic"
            _same(sources[0], tmp_path / "mb" / "d0")
            _same(sources[1], tmp_path / "mb" / "d1")
            _old_or_new(tmp_path / "mb" / "d2", sources[2], {}, checkpoint=True)
            assert "d0: ok" in again.text() and "d1: ok" in again.text()


def test_inbound_transfers_are_listed_across_a_restart_and_one_cut_by_sigkill_shows_so(pair, tmp_path):
    a, c = pair
    src = tmp_path / "src"
    _tree(src, 18, files=20)
    total = _size(src)
    first = _daemon(a, tmp_path / "ma", c.id)
    port = first.port
    url, key = _api_of(a)
    r = c.run("sync", src, first.url("own", "one"), "--peer-id", a.id)
    assert r.returncode == 0, r.stderr
    done = _call(url, key, "/api/v1/transfers?state=completed")[1]["transfers"]
    assert len(done) == 1 and done[0]["kind"] == "inbound"
    p = c.popen("sync", src, first.url("own", "two"), "--peer-id", a.id, "--bwlimit", str(total // 5),
                "--retry-for", "120", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cut = _until_active(url, key)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    first._f.close()
    (Path(a.env["XDG_CONFIG_HOME"]) / "resync" / "api.json").unlink()
    with _daemon(a, tmp_path / "ma", c.id, port=port):
        url, key = _api_of(a)
        listed = {t["id"]: t for t in _call(url, key, "/api/v1/transfers")[1]["transfers"]}
        assert listed[done[0]["id"]]["state"] == "completed"
        assert listed[cut]["state"] == "failed" and "daemon stopped" in listed[cut]["error"]
        assert p.wait(120) == 0, p.stderr.read()          # its client retried and resumed it
        _same(src, tmp_path / "ma" / "two")
        ended = [t for t in _call(url, key, "/api/v1/transfers?state=completed")[1]["transfers"]]
        assert len(ended) == 2


def _until_active(url: str, key: str) -> str:
    deadline = time.monotonic() + 30
    while not (active := _call(url, key, "/api/v1/transfers?state=active")[1]["transfers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    return active[0]["id"]
