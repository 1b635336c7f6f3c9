"""Network runs as cron or a systemd timer runs them, with nobody watching:
stopped by SIGTERM at any moment, their output piped into ``head``, two runs
of one job overlapping, a server that is not there. Each ends the same way
every time, with one line and a documented exit code, and nothing lost."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from . import mix
from .test_net import Server, Site, _same
from .test_sync import make_tree


@pytest.fixture
def pair(tmp_path):
    client, server_site = Site(tmp_path, "client"), Site(tmp_path, "server")
    src, module = tmp_path / "src", tmp_path / "module"
    import random
    make_tree(src, random.Random(20), files=60)
    mix.write(src / "image.bin", 21, 5_000_000, "mixed")
    module.mkdir()
    server = Server(server_site, "--module", f"m={module}", "--allow", client.id)
    try:
        yield client, server, server_site.id, src, module
    finally:
        server.stop()


def _no_temps(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".resync-tmp") and not p.is_dir()]


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_sigterm_at_any_moment_exits_143_promptly_and_loses_nothing(pair, tmp_path, push):
    """Stopped at eight moments from the handshake to the last files: exit
    143 within 3 s every time (or 0 if it had finished), one line; every
    destination file old or new; the server says the client stopped; the
    next run finishes identical."""
    client, server, sid, src, module = pair
    local = tmp_path / "pulled"
    url = server.url("m", "x")
    if not push:
        assert client.run("sync", src, url, "--peer-id", sid).returncode == 0
    args = (src, url) if push else (url, local)
    dst = module / "x" if push else local
    outcomes = []
    for delay in (0.1, 0.3, 0.5, 0.8, 1.1, 1.5, 2.0, 2.6):
        if dst.exists() and not push:
            import shutil
            shutil.rmtree(dst)
        p = client.popen("sync", *args, "--peer-id", sid, "--bwlimit", "3M", "--no-history",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = p.communicate(timeout=30)
        took = time.monotonic() - stopped
        if p.returncode == -signal.SIGTERM:
            # killed by the signal's default action: before the interpreter ran resync's entry point
            # (slow to start on a loaded machine), or as it tore itself down after the run had
            # ended (CPython puts the default handlers back then): the shell's 143 either way, and
            # nothing was half done (the files are checked below)
            assert not err, err
            continue
        outcomes.append(p.returncode)
        assert p.returncode in (143, 0), (delay, p.returncode, err)
        assert took < 3.0, f"{took:.1f} s after SIGTERM at {delay} s"
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (err, server.log.read_text())
        if p.returncode == 143:
            assert err.strip() in ("", "resync: error: terminated (SIGTERM)"), err
        for f in (dst.rglob("*") if dst.exists() else ()):
            if f.is_file() and not f.name.startswith(".resync-tmp") \
                    and ".resync-tmp" not in str(f.relative_to(dst)):
                rel = f.relative_to(dst)
                assert f.read_bytes() == (src / rel).read_bytes(), rel    # new, never torn
    assert outcomes.count(143) >= 4, outcomes
    log = server.log.read_text()
    assert "the client was stopped (SIGTERM)" in log
    r = client.run("sync", *args, "--peer-id", sid)
    assert r.returncode == 0, r.stderr
    _same(src, dst)
    assert not _no_temps(dst)


@pytest.mark.parametrize("how", ["push", "dry-run push", "pull", "local"])
def test_a_closed_stdout_stops_the_run_at_once_with_141(pair, tmp_path, how):
    """``resync sync -i ... | head``: stop at once, one line, exit 141 (128
    + SIGPIPE, as a shell shows a tool the signal killed); no traceback, no
    retry; the server sees the client stop (not a push that went well)."""
    client, server, sid, src, module = pair
    many = src / "many"                         # more itemized lines than a pipe holds (64 KiB): the
    many.mkdir()                                # writer must meet the closed end, not finish first
    for i in range(4000):
        (many / f"entry-{i:05d}.txt").write_text(f"{i}\n" if i % 3 else "")
    url = server.url("m", "y")
    if how == "pull":
        assert client.run("sync", src, url, "--peer-id", sid).returncode == 0
    args = {"push": ("-i", src, url), "dry-run push": ("-n", "-i", src, url),
            "pull": ("-i", url, tmp_path / "pulled"), "local": ("-i", src, tmp_path / "copy")}[how]
    extra = () if how == "local" else ("--peer-id", sid)
    p = client.popen("sync", *args, *extra, "--no-history", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()                            # what `| head -1` does
    started = time.monotonic()
    rc = p.wait(timeout=30)
    err = p.stderr.read().decode()
    assert first and rc == 141, (rc, err)
    assert time.monotonic() - started < 5
    assert err.strip() == "resync: error: output closed (broken pipe): stopped"
    if how != "local":
        time.sleep(0.3)
        last = server.log.read_text().strip().splitlines()[-1]
        assert "its output was closed" in last and ("dry-run" in last) == (how == "dry-run push")


def test_overlapping_runs_of_one_job_wait_for_each_other(pair, tmp_path):
    """Two runs of the same device into the same destination (a cron
    overlap): the newer is told busy while the older is alive, and waits
    with the documented backoff (1 s doubling) instead of kicking it off;
    both end 0 and the tree is whole."""
    client, server, sid, src, module = pair
    url = server.url("m", "z")
    first = client.popen("sync", src, url, "--peer-id", sid, "--bwlimit", "1M",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    second = client.run("sync", src, url, "--peer-id", sid, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "superseded" not in err, err
    assert second.returncode == 0, second.stderr
    waits = [int(w) for w in re.findall(r"retrying in (\d+) s", second.stderr)]
    assert waits and "another transfer into m/z is running" in second.stderr
    assert waits == sorted(waits) and (len(waits) < 3 or waits[-1] > waits[0]), waits   # it backs off
    assert "superseded" not in server.log.read_text()
    _same(src, module / "z")


def test_a_killed_client_run_again_supersedes_its_dead_transfer(pair, tmp_path):
    """The old connection does not answer the server's PING: the new run
    supersedes it within a few seconds (even with --retry-for 0) and
    resumes what had arrived."""
    client, server, sid, src, module = pair
    url = server.url("m", "k")
    client.sync_args = ("--transport", "quic")  # (over TCP the kernel resets a killed client's connection
    #                                             at once: nothing to supersede)
    p = client.popen("sync", src, url, "--peer-id", sid, "--bwlimit", "1M", "--no-history",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)
    p.kill()
    p.wait()
    started = time.monotonic()
    r = client.run("sync", src, url, "--peer-id", sid, "--retry-for", "0", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 10
    assert "superseded by its new connection" in server.log.read_text()
    _same(src, module / "k")


def test_a_server_that_is_not_there_is_noticed_in_seconds(tmp_path):
    """Nothing listens on the port: the ICMP port unreachable fails the
    handshake at once; --timeout is for a live connection going silent."""
    client = Site(tmp_path, "client")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    r = client.run("sync", src, f"resync://127.0.0.1:{port}/m", "--peer-id",
                   "P5HFHLZ-Q6OKJMM-XTPEKY5-T6FARJY-TNHBMAG-CAEV2SQ-BC3PPOT-GPLLRAF", "--retry-for", "0",
                   "--timeout", "60", timeout=60)
    assert r.returncode == 10 and "nothing listens there" in r.stderr, r.stderr
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("where", ["local", "push", "pull"])
def test_verify_after_a_refused_deletion_finds_the_tree_as_it_is(pair, tmp_path, where):
    """A --max-delete refusal leaves the destination as it was: the run's
    manifest says so, whole subtrees included, and so does a sync without
    --delete that leaves extra entries; ``verify`` finds nothing."""
    client, server, sid, src, module = pair
    if where == "local":
        dst, url = tmp_path / "mirror", None
    else:
        dst = module / "v" if where == "push" else tmp_path / "pulled"
        url = server.url("m", "v")
    if where == "pull":                         # the module holds the source; the local side has extras
        assert client.run("sync", src, url, "--peer-id", sid).returncode == 0
    for d in ("old-a", "old-b/deeper"):
        (dst / d).mkdir(parents=True)
        for i in range(20):
            (dst / d / f"f{i}.txt").write_text(f"{d} {i}\n")
    history = tmp_path / "verify.duckdb"
    args = (src, dst) if where == "local" else (src, url) if where == "push" else (url, dst)
    extra = ("--history", history) if where != "push" else ()
    peer = () if where == "local" else ("--peer-id", sid)
    r = client.run("sync", *args, *peer, *extra)                 # no --delete: the extras stay
    assert r.returncode == 0, r.stderr
    r = client.run("sync", "--delete", "--max-delete", "3", *args, *peer, *extra)
    assert r.returncode == 25 and "exceed --max-delete 3" in r.stderr, r.stderr
    verifier = client if where != "push" else server.site
    hist = ("--history", history) if where != "push" else ()
    if where == "push":
        time.sleep(0.5)                          # (the server's run is recorded as its push ends)
    v = verifier.run("verify", dst, *hist)
    assert v.returncode == 0, v.stdout + v.stderr


def test_both_ends_record_the_same_transfer_and_pulls_are_in_the_servers_history(tmp_path):
    """The client's --json and history and the server's log and history
    carry one transfer id; the server logs when a transfer starts; a pull
    is a run of the server's history too (role send); a server pinned with
    --peer-id is recorded in known_peers, so the next run needs no pin."""
    import json
    from resync.store import History
    client, server_site = Site(tmp_path, "client"), Site(tmp_path, "server")
    src, module = tmp_path / "src", tmp_path / "module"
    import random
    make_tree(src, random.Random(22), files=20)
    module.mkdir()
    history = tmp_path / "server.duckdb"
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--history", history) as server:
        push = client.run("sync", "--json", src, server.url("m", "t"), "--peer-id", server_site.id)
        assert push.returncode == 0, push.stderr
        pushed = json.loads(push.stdout)
        assert re.fullmatch(r"[0-9a-f]{16}", pushed["transfer_id"]) and pushed["attempts"] == 1
        known = (client.home / "config" / "resync" / "known_peers").read_text()
        assert server_site.id in known                        # pinned once, recorded
        pull = client.run("sync", "--json", server.url("m", "t"), tmp_path / "back")     # no --peer-id
        assert pull.returncode == 0, pull.stderr
        pulled = json.loads(pull.stdout)
        assert pulled["transfer_id"] != pushed["transfer_id"]
    log = server.log.read_text()
    for tid, what in ((pushed["transfer_id"], "push into m/t"), (pulled["transfer_id"], "pull from m/t")):
        lines = [line for line in log.splitlines() if tid in line]
        assert len(lines) == 2 and f"{what}: started" in lines[0] and "ok," in lines[1], log
        assert all(client.id in line and "127.0.0.1:" in line for line in lines)
    _same(src, tmp_path / "back")
    server_history = History(str(history))
    server_history.merge(wait=10)
    _, rows = server_history.query("SELECT t.transfer_id, t.role, r.status FROM transfers t JOIN runs r "
                                   "ON r.id = t.run_id ORDER BY r.started")
    assert [tuple(r) for r in rows] == [(pushed["transfer_id"], "receive", "ok"),
                                        (pulled["transfer_id"], "send", "ok")]


def test_a_retried_pull_counts_its_tree_once_and_its_whole_duration(pair, tmp_path):
    """A pull cut by a server restart and retried: files and bytes scanned
    are the tree's (not twice), attempts 2, the duration the whole run's."""
    import json
    client, server, sid, src, module = pair
    assert client.run("sync", src, server.url("m", "r"), "--peer-id", sid).returncode == 0
    started = time.monotonic()
    p = client.popen("sync", "--json", server.url("m", "r"), tmp_path / "back", "--peer-id", sid,
                     "--bwlimit", "2M", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    server.stop()
    restarted = Server(server.site, "--module", f"m={module}", "--allow", client.id, port=server.port)
    try:
        out, err = p.communicate(timeout=120)
        wall = time.monotonic() - started
    finally:
        restarted.stop()
    assert p.returncode == 0, err
    result = json.loads(out)
    files = sum(1 for f in src.rglob("*") if f.is_file() and not f.is_symlink())
    # (2 attempts, or 3 when a retry came before the restarted server listened: the tree counted once either way)
    assert result["attempts"] in (2, 3) and result["files"] == files, (result["attempts"], result["files"], files)
    assert result["bytes_scanned"] == sum(f.stat().st_size for f in src.rglob("*")
                                          if f.is_file() and not f.is_symlink())
    assert wall - 1.5 <= result["duration"] <= wall + 0.5
    _same(src, tmp_path / "back")


def test_a_retried_push_counts_what_every_attempt_placed(pair, tmp_path):
    """A push cut by a server restart and retried: the files and bytes
    transferred are those of the whole run (what the server confirmed in the
    cut attempt, which the next one finds in place, plus the next one's),
    not only the last attempt's."""
    import json
    client, server, sid, src, module = pair
    (src / "image.bin").unlink()                           # small files: many placed before the cut
    for i in range(40):
        mix.write(src / f"more-{i}.bin", 100 + i, 40_000, "mixed")
    files = [f for f in src.rglob("*") if f.is_file() and not f.is_symlink()]
    p = client.popen("sync", "--json", src, server.url("m", "p"), "--peer-id", sid,
                     "--bwlimit", "300K", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    server.stop()
    assert p.poll() is None, "the push ended before the cut"
    placed = [f for f in (module / "p").rglob("*") if f.is_file() and not f.name.startswith(".resync-tmp")]
    restarted = Server(server.site, "--module", f"m={module}", "--allow", client.id, port=server.port)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        restarted.stop()
    assert p.returncode == 0, err
    result = json.loads(out)
    assert result["attempts"] == 2 and placed, (result["attempts"], len(placed))
    assert result["files_transferred"] == len(files), (result["files_transferred"], len(files), len(placed))
    assert result["bytes_transferred"] == sum(f.stat().st_size for f in files)
    assert result["created"] >= len(files)
    _same(src, module / "p")
