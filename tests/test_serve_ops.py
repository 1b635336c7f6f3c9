"""Operating `resync serve` as rsyncd and sshd are operated: SIGHUP reads
the configuration again without dropping a transfer (a mistake in it keeps
the one in force), a cap on the transfers running at once, the history's
retention, and a machine's key rotated."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from .test_api import _api_of, _get
from .test_net import Server, _same, _tree


@pytest.fixture
def sites(tmp_path):
    from .test_net import Site
    return Site(tmp_path, "client"), Site(tmp_path, "server")


def _wait(cond, what: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _running(site) -> int:
    url, key = _api_of(site)
    return json.loads(_get(url, key, "/api/v1/status")[1])["transfers"]["active"]


def test_sighup_reloads_modules_and_allow_lists_and_a_running_transfer_goes_on(sites, tmp_path):
    client, server_site = sites
    src, a, b = tmp_path / "src", tmp_path / "a", tmp_path / "b"
    _tree(src, 71)
    a.mkdir()
    b.mkdir()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'allow = ["{client.id}"]\n[modules.a]\npath = "{a}"\n')
    with Server(server_site, "--config", cfg, "--api", "127.0.0.1:0") as server:
        slow = client.popen("sync", src, server.url("a", "slow"), "--peer-id", server_site.id, "--bwlimit", "600K",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait(lambda: _running(server_site) == 1, "the slow push did not start")
        cfg.write_text(f'allow = ["{client.id}"]\nmax_transfers = 4\n[modules.a]\npath = "{a}"\n'
                       f'[modules.b]\npath = "{b}"\nread_only = true\n')
        server.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "SIGHUP: reloaded" in server.text(), "no reload in the log")
        line = [x for x in server.text().splitlines() if "SIGHUP: reloaded" in x][0]
        assert "module b added" in line and "max_transfers 0 -> 4" in line
        r = client.run("sync", src, server.url("b", "x"), "--peer-id", server_site.id)
        assert r.returncode == 13 and "read-only" in r.stderr        # b is there, as the file says now
        r = client.run("sync", server.url("a", ""), tmp_path / "pulled-from-a", "--peer-id", server_site.id)
        assert r.returncode == 0, r.stderr
        cfg.write_text('allow = ["NOT-AN-ID"]\n[modules.a]\npath = "/nonexistent"\n')   # a mistake
        server.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "SIGHUP: not reloaded" in server.text(), "the mistake was not reported")
        r = client.run("sync", src, server.url("a", "after-mistake"), "--peer-id", server_site.id)
        assert r.returncode == 0, r.stderr                              # the settings in force were kept
        cfg.write_text(f'[modules.a]\npath = "{a}"\nallow = ["{server_site.id}"]\n')     # the client let go
        server.proc.send_signal(signal.SIGHUP)
        _wait(lambda: server.text().count("SIGHUP: reloaded") == 2, "no second reload")
        assert "module b removed" in server.text() and "module a: allowed devices changed" in server.text()
        r = client.run("sync", src, server.url("a", "refused"), "--peer-id", server_site.id)
        assert r.returncode == 13 and "is not allowed" in r.stderr
        assert slow.wait(120) == 0, slow.stderr.read()                 # admitted before: it went on
        _same(src, a / "slow")
        _same(src, a / "after-mistake")
        assert server.proc.poll() is None and server.stop() == 0


def test_max_transfers_turns_the_next_one_away_as_busy_until_one_ends(sites, tmp_path):
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 72)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--max-transfers", "1",
                "--api", "127.0.0.1:0") as server:
        slow = client.popen("sync", src, server.url("m", "one"), "--peer-id", server_site.id, "--bwlimit", "1M",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait(lambda: _running(server_site) == 1, "the slow push did not start")
        r = client.run("sync", src, server.url("m", "two"), "--peer-id", server_site.id, "--retry-for", "0")
        assert r.returncode == 13 and "1 transfers are running already" in r.stderr, r.stderr
        assert not (module / "two").exists()
        waited = client.popen("sync", src, server.url("m", "two"), "--peer-id", server_site.id, "--retry-for", "60",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert slow.wait(120) == 0, slow.stderr.read()
        assert waited.wait(120) == 0, waited.stderr.read()          # it retried, and went once the first ended
        _same(src, module / "one")
        _same(src, module / "two")
        url, key = _api_of(server_site)
        assert json.loads(_get(url, key, "/api/v1/status")[1])["max_transfers"] == 1


def test_history_keep_days_prunes_the_servers_history_at_start_keeping_runs_and_the_newest_trees(sites, tmp_path):
    from pathlib import Path

    from resync.store import History
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 73, files=10)
    module.mkdir()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'history_keep_days = 0.00001\nallow = ["{client.id}"]\n[modules.m]\npath = "{module}"\n')
    with Server(server_site, "--config", cfg, "--no-api") as server:
        r = client.run("sync", src, server.url("m", "x"), "--peer-id", server_site.id)
        assert r.returncode == 0, r.stderr
        assert server.stop() == 0
    time.sleep(1.0)                             # (0.00001 days: 0.86 s)
    with Server(server_site, "--config", cfg, "--no-api") as server:
        _wait(lambda: "history: pruned 1 runs older than 1e-05 days" in server.text(), "not pruned at the start")
        assert server.stop() == 0
    h = History(Path(server_site.env["XDG_DATA_HOME"]) / "resync" / "history.duckdb")
    _, rows = h.query("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM transfers), "
                      "(SELECT count(*) FROM run_files), (SELECT count(*) FROM manifests)")
    runs, transfers, files, manifest = rows[0]
    assert (runs, transfers, files) == (1, 1, 0) and manifest > 10    # the module's newest tree stays
    cfg.write_text(f'history_keep_days = -1\nallow = ["{client.id}"]\n[modules.m]\npath = "{module}"\n')
    r = server_site.run("serve", "--config", cfg, "--listen", "127.0.0.1:0", timeout=60)
    assert r.returncode == 2 and "history_keep_days must be a number of days" in r.stderr


def test_a_rotated_key_is_refused_until_the_server_allows_the_new_id(sites, tmp_path):
    """resync id --rotate: a new key, the old one kept (0600); both IDs and
    what the peers must change are printed; the server refuses the new ID
    until its allow list names it (a SIGHUP takes the change)."""
    import os
    import stat
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 74, files=5)
    module.mkdir()
    old = client.id
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'allow = ["{old}"]\n[modules.m]\npath = "{module}"\n')
    with Server(server_site, "--config", cfg, "--no-api") as server:
        assert client.run("sync", src, server.url("m", "a"), "--peer-id", server_site.id).returncode == 0
        r = client.run("id", "--rotate")
        assert r.returncode == 0, r.stderr
        new = re.search(r"new device ID: (\S+)", r.stdout).group(1)
        assert f"old device ID: {old}" in r.stdout and new != old and f"replace {old} by {new}" in r.stdout
        assert client.run("id").stdout.strip() == new
        kept = re.search(r"\(the old key: (\S+)\)", r.stdout).group(1)
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
        r = client.run("sync", src, server.url("m", "b"), "--peer-id", server_site.id)
        assert r.returncode == 13 and new in r.stderr and "is not allowed" in r.stderr
        cfg.write_text(f'allow = ["{new}"]\n[modules.m]\npath = "{module}"\n')
        server.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "module m: allowed devices changed" in server.text(), "the reload did not take")
        r = client.run("sync", src, server.url("m", "b"), "--peer-id", server_site.id)
        assert r.returncode == 0, r.stderr
        _same(src, module / "b")


def test_peers_lists_the_servers_pinned_and_what_the_daemon_allows_each_device(sites, tmp_path):
    from pathlib import Path
    client, server_site = sites
    src, a, b = tmp_path / "src", tmp_path / "a", tmp_path / "b"
    _tree(src, 75, files=3)
    a.mkdir()
    b.mkdir()
    other = "P5HFHLZ-Q6OKJMM-XTPEKY5-T6FARJY-TNHBMAG-CAEV2SQ-BC3PPOT-GPLLRAF"
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'allow = ["{client.id}"]\n[modules.a]\npath = "{a}"\n'
                   f'[modules.b]\npath = "{b}"\nread_only = true\nallow = ["{client.id}", "{other}"]\n')
    with Server(server_site, "--config", cfg, "--api", "127.0.0.1:0") as server:
        assert client.run("sync", src, server.url("a", "x"), "--peer-id", server_site.id).returncode == 0
        r = client.run("peers", "--json")
        assert r.returncode == 0, r.stderr
        mine = json.loads(r.stdout)
        assert mine == {"known_servers": [{"address": f"127.0.0.1:{server.port}", "device_id": server_site.id}],
                        "allowed_by_daemon": None}
        _api_of(server_site)
        r = server_site.run("peers", "--json")
        assert r.returncode == 0, r.stderr
        allowed = {p["device_id"]: p["modules"] for p in json.loads(r.stdout)["allowed_by_daemon"]}
        assert allowed == {client.id: [{"name": "a", "read_only": False}, {"name": "b", "read_only": True}],
                           other: [{"name": "b", "read_only": True}]}
        r = server_site.run("peers")
        assert r.returncode == 0 and f"{other}  b (read-only)" in r.stdout
        url, _ = _api_of(server_site)
        assert _get(url, None, "/api/v1/peers")[0] == 401
    r = client.run("peers", "--config-dir", Path(client.env["XDG_CONFIG_HOME"]) / "resync")
    assert r.returncode == 0 and server_site.id in r.stdout and "no daemon runs" in r.stdout
