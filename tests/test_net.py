"""End to end on loopback: ``resync serve`` and ``resync sync`` as separate
processes, each with its own key and history, as two sites would run them."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resync.apply import TEMP_PREFIX
from resync.protocol.receiver import RECV_PREFIX

from . import mix
from .test_sync import make_tree, mutate, seconds
from .treeutil import rsync_a, snapshot

PY = sys.executable


class Site:
    """One machine's resync: its config directory (key, known_peers) and history."""

    def __init__(self, root: Path, name: str, prefix=()):
        self.prefix = list(prefix)          # e.g. ["ip", "netns", "exec", NS]: the site is another host
        self.home = root / f"site-{name}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, XDG_CONFIG_HOME=str(self.home / "config"),
                        XDG_DATA_HOME=str(self.home / "data"))
        self.env.pop("RESYNC_HISTORY", None)
        self._id = None

    sync_args: tuple = ()               # options added to every `sync` (e.g. --transport quic)

    def _argv(self, args) -> list[str]:
        extra = list(self.sync_args) if args and args[0] == "sync" else []
        return [*self.prefix, PY, "-m", "resync", *map(str, args), *extra]

    def run(self, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(args), capture_output=True, text=True, env=self.env, timeout=timeout, **kw)

    def popen(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen(self._argv(args), env=self.env, **kw)

    @property
    def id(self) -> str:
        if self._id is None:
            r = self.run("id")
            assert r.returncode == 0, r.stderr
            self._id = r.stdout.strip()
        return self._id


class Server:
    """``resync serve`` in the background on a free port of ``host`` (loopback)."""

    def __init__(self, site: Site, *args, host: str = "127.0.0.1", port: int = 0):
        self.site, self.host = site, host
        self.log = site.home / f"serve-{time.monotonic_ns()}.log"
        self._f = open(self.log, "w")
        self.proc = site.popen("serve", "--listen", f"{host}:{port}", *args, stdout=subprocess.DEVNULL,
                               stderr=self._f, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            m = re.search(rf"listening on {re.escape(host)}:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def url(self, module: str, path: str = "") -> str:
        return f"resync://{self.host}:{self.port}/{module}/{path}".rstrip("/")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(30)
        self._f.close()
        return rc

    def text(self) -> str:
        return self.log.read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._f.close()


@pytest.fixture
def sites(tmp_path):
    return Site(tmp_path, "client"), Site(tmp_path, "server")


def _tree(root: Path, seed: int, files: int = 40) -> None:
    make_tree(root, random.Random(seed), files=files)
    mix.write(root / "big-mixed", seed, 3_000_000 + seed, "mixed")


def _json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.splitlines()[-1])


def _same(a: Path, b: Path) -> None:
    assert snapshot(a) == snapshot(b)


# -- identity ---------------------------------------------------------------------------

def test_id_is_made_once_and_kept_private(sites):
    client, _ = sites
    first = client.id
    assert re.fullmatch(r"([A-Z2-7]{7}-){7}[A-Z2-7]{7}", first)
    r = client.run("id")
    assert r.returncode == 0 and r.stdout.strip() == first and r.stdout.count("\n") == 1
    for p in (client.home / "config" / "resync").iterdir():
        if "key" in p.name:
            assert p.stat().st_mode & 0o077 == 0, p


# -- push and pull ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("transport", ["quic", "auto"])
def test_push_then_pull_over_rounds_equal_rsync(sites, tmp_path, transport):
    """Rounds of edits with deletions, pushed and then pulled: each time the
    far side equals the source and rsync -a's copy, attribute for attribute;
    changed files travel as deltas; a round with no change sends only the
    listing; verify passes on both sides. Over QUIC, and with the choice
    left to resync (loopback: TLS over TCP), each recorded as such."""
    client, server_site = sites
    wire = "udp" if transport == "quic" else "tcp"
    src, module, pulled, ref = tmp_path / "src", tmp_path / "module", tmp_path / "pulled", tmp_path / "ref"
    _tree(src, 1)
    module.mkdir()
    with Server(server_site, "--module", f"backup={module}", "--allow", client.id) as server:
        common = ("--peer-id", server_site.id, "--json", "--transport", transport)
        rnd = random.Random(2)
        for round_ in range(3):
            r = _json(client.run("sync", "--delete", src, server.url("backup", "photos"), *common))
            assert rsync_a(src, ref, "--delete").returncode == 0
            _same(src, module / "photos")
            assert seconds(snapshot(ref)) == seconds(snapshot(module / "photos"))   # rsync: to the second
            assert r["errors"] == 0 and r["bytes_on_wire_sent"] > 0 and r["transport"] == wire.replace("udp", "quic")
            if round_:
                assert r["bytes_matched"] > 0                     # deltas against the old copies
            r = _json(client.run("sync", "--delete", server.url("backup", "photos"), pulled, *common))
            _same(src, pulled)
            mutate(src, rnd)
        # no change: the listing crosses, no content
        r = _json(client.run("sync", "--delete", src, server.url("backup", "photos"), *common))
        r = _json(client.run("sync", "--delete", src, server.url("backup", "photos"), *common))
        assert r["files_transferred"] == 0 and r["datagrams_sent"] == 0
        assert r["bytes_on_wire_sent"] < 64 * 1024
        # verify: the client's pulled copy against its history, the module against the server's
        assert client.run("verify", pulled).returncode == 0
        assert server_site.run("verify", module / "photos").returncode == 0
        log = server.text()
        assert server.stop() == 0
    assert "push into backup/photos: ok" in log and "pull from backup/photos: ok" in log
    # the history: each network run has its transfers row, on both sides
    from resync.store import History
    _, rows = History(client.home / "data" / "resync" / "history.duckdb").query(
        f"SELECT t.role, t.peer, t.peer_id, t.{wire}_bytes_sent, t.{wire}_bytes_received, t.shards_sent, r.status, "
        "t.transport FROM transfers t JOIN runs r ON r.id = t.run_id ORDER BY r.started")
    assert [row[0] for row in rows] == ["push", "pull"] * 3 + ["push", "push"]
    assert all(row[1] == server.url("backup", "photos") and row[2] == server_site.id and row[3] > 0
               and row[4] > 0 and row[6] == "ok" and row[7] == wire.replace("udp", "quic") for row in rows)
    assert rows[0][5] > 0 and rows[-1][5] == 0               # shards for the first push, none for no change
    _, rows = History(server_site.home / "data" / "resync" / "history.duckdb").query(
        f"SELECT t.role, t.peer_id, t.{wire}_bytes_received, r.command, r.destination, r.source FROM transfers t "
        "JOIN runs r ON r.id = t.run_id ORDER BY r.started")
    assert [r[0] for r in rows] == ["receive", "send"] * 3 + ["receive", "receive"]   # the pulls too
    assert {r[1] for r in rows} == {client.id}
    assert all(r[2] > 0 and r[3] == "serve" for r in rows)
    assert all((r[4] if r[0] == "receive" else r[5]) == str(module / "photos") for r in rows)
    label = "TLS over TCP" if wire == "tcp" else "QUIC"          # the server's log names the transport
    assert re.search(rf"transfer [0-9a-f]+, {label}\): push into backup/photos: ok", log), log


def test_push_options_dry_run_itemize_exclude_max_delete(sites, tmp_path):
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 3, files=15)
    (module / "dst").mkdir(parents=True)
    (module / "dst" / "extra.txt").write_text("not in the source\n")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        pin = ("--peer-id", server_site.id)
        r = client.run("sync", "-n", "-i", "--delete", src, server.url("m", "dst"), *pin)
        assert r.returncode == 0, r.stderr
        assert "*deleting" in r.stdout and ">f+++++++++" in r.stdout
        assert sorted(os.listdir(module / "dst")) == ["extra.txt"]               # a dry run changes nothing
        r = client.run("sync", "--delete", "--max-delete", "0", src, server.url("m", "dst"), *pin)
        assert r.returncode == 25 and (module / "dst" / "extra.txt").exists()    # as local sync: refused
        r = client.run("sync", "--delete", "--exclude", "*.txt", src, server.url("m", "dst"), *pin)
        assert r.returncode == 0, r.stderr
        ref = tmp_path / "ref"
        assert rsync_a(src, ref, "--exclude", "*.txt").returncode == 0
        got = {k: v for k, v in snapshot(module / "dst").items() if k != "extra.txt"}
        assert got == snapshot(ref)
        assert (module / "dst" / "extra.txt").exists()                         # excluded: kept, as rsync
        big = src / "big-mixed"
        data = bytearray(big.read_bytes())
        data[1000:1100] = b"z" * 100
        big.write_bytes(bytes(data))
        for flag, reused in (("-W", False), ("--no-whole-file", True)):
            os.utime(big, ns=(big.stat().st_mtime_ns + 10**9,) * 2)
            r = client.run("sync", "--json", flag, src, server.url("m", "dst"), *pin)
            assert (_json(r)["bytes_matched"] > 2_000_000) == reused, flag         # -W: whole, else a delta
        assert (module / "dst" / "big-mixed").read_bytes() == bytes(data)


# -- trust --------------------------------------------------------------------------------

def test_trust_refusals_before_any_metadata(sites, tmp_path):
    client, server_site = sites
    src, module = tmp_path / "src", tmp_path / "module"
    _tree(src, 4, files=5)
    module.mkdir()
    stranger = Site(tmp_path, "stranger")
    impostor = Site(tmp_path, "impostor")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        url = server.url("m", "x")
        # an unknown server, nothing pinned: refused, its ID shown
        r = client.run("sync", src, url)
        assert r.returncode == 13 and server_site.id in r.stderr and r.stderr.count("\n") == 1
        assert not (module / "x").exists()
        deadline = time.monotonic() + 10
        while "does not trust this server's key" not in server.text() and time.monotonic() < deadline:
            time.sleep(0.1)                     # the server's log says why the client left
        assert "does not trust this server's key" in server.text(), server.text()
        # a mistyped ID is caught by its check characters
        wrong = server_site.id[:-1] + ("A" if server_site.id[-1] != "A" else "B")
        r = client.run("sync", src, url, "--peer-id", wrong)
        assert r.returncode == 2 and "check" in r.stderr.lower()
        # --accept-new records it; the next run needs no --peer-id
        r = client.run("sync", src, url, "--accept-new")
        assert r.returncode == 0, r.stderr
        assert f"added to known_peers as {server_site.id}" in r.stderr        # said, as ssh says it
        known = (client.home / "config" / "resync" / "known_peers").read_text()
        assert server_site.id in known
        assert client.run("sync", src, url).returncode == 0
        # a client the module does not allow
        r = stranger.run("sync", src, server.url("m", "y"), "--peer-id", server_site.id)
        assert r.returncode == 13 and stranger.id in r.stderr and "not allowed" in r.stderr
        # a pull of a directory the module lacks: refused before the client makes anything
        r = client.run("sync", server.url("m", "no-such-dir"), tmp_path / "np", "--peer-id", server_site.id)
        assert r.returncode == 13 and "no such directory" in r.stderr and not (tmp_path / "np").exists()
        assert not (module / "y").exists()
        # a path that leaves the module, a module that does not exist
        r = client.run("sync", src, server.url("m", "../escape"))
        assert r.returncode == 13 and not (tmp_path / "escape").exists()
        r = client.run("sync", src, server.url("nosuch", "x"))
        assert r.returncode == 13 and "nosuch" in r.stderr
        port = server.port
        assert server.stop() == 0
    # another server (another key) at the same address: refused, both IDs shown
    module2 = tmp_path / "module2"
    module2.mkdir()
    other = None
    for _ in range(20):                                    # the same port, once it is free again
        try:
            other = _server_on(impostor, port, module2, client.id)
            break
        except AssertionError:
            time.sleep(0.2)
    assert other is not None
    with other:
        r = client.run("sync", src, f"resync://127.0.0.1:{port}/m/x")
        assert r.returncode == 13
        assert impostor.id in r.stderr and server_site.id in r.stderr
        assert os.listdir(module2) == []


def _server_on(site: Site, port: int, module: Path, allow: str) -> Server:
    s = Server.__new__(Server)
    s.site = site
    s.log = site.home / f"serve-{time.monotonic_ns()}.log"
    s._f = open(s.log, "w")
    s.proc = site.popen("serve", "--listen", f"127.0.0.1:{port}", "--module", f"m={module}", "--allow", allow,
                        stdout=subprocess.DEVNULL, stderr=s._f, start_new_session=True)
    deadline = time.monotonic() + 30
    while "listening on" not in s.log.read_text():
        if s.proc.poll() is not None or time.monotonic() > deadline:
            s._f.close()
            raise AssertionError(s.log.read_text())
        time.sleep(0.05)
    s.port = port
    return s


def test_read_only_module_refuses_a_push_but_serves_a_pull(sites, tmp_path):
    client, server_site = sites
    src, module, out = tmp_path / "src", tmp_path / "module", tmp_path / "out"
    _tree(module / "data", 5, files=10)
    src.mkdir()
    with Server(server_site, "--module", f"ro={module}", "--read-only", "ro", "--allow", client.id) as server:
        pin = ("--peer-id", server_site.id)
        r = client.run("sync", "--delete", src, server.url("ro", "data"), *pin)
        assert r.returncode == 13 and "read-only" in r.stderr
        assert client.run("sync", server.url("ro", "data"), out, *pin).returncode == 0
    _same(module / "data", out)


# -- concurrency ----------------------------------------------------------------------------

def _slow_push(client: Site, server: Server, server_id: str, src: Path, module: Path, path: str):
    """A push into module ``m``/``path`` held slow by --bwlimit, returned once
    the server is staging it (so other transfers overlap it)."""
    slow = client.popen("sync", src, server.url("m", path), "--peer-id", server_id, "--bwlimit", "1M",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ((module / path).is_dir() and any(n.startswith(RECV_PREFIX) for n in os.listdir(module / path))):
        assert time.monotonic() < deadline and slow.poll() is None
        time.sleep(0.05)
    return slow


def test_two_clients_at_once_and_one_destination_never_shared(sites, tmp_path):
    """Two pushes into different paths run together; a push into a path
    another push is writing is refused as busy (exit 13), never interleaved."""
    client, server_site = sites
    second = Site(tmp_path, "second")
    src1, src2, module = tmp_path / "src1", tmp_path / "src2", tmp_path / "module"
    _tree(src1, 6, files=10)
    _tree(src2, 7, files=10)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--allow", second.id) as server:
        slow = _slow_push(client, server, server_site.id, src1, module, "a")     # the others overlap it
        busy = second.run("sync", src2, server.url("m", "a"), "--peer-id", server_site.id, "--retry-for", "0")
        other = second.run("sync", src2, server.url("m", "b"), "--peer-id", server_site.id)
        assert slow.poll() is None                           # all of that while the first push ran
        waiting = second.popen("sync", src2, server.url("m", "c"), "--peer-id", server_site.id,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err
        # a push that finds the destination busy waits (retries with backoff) and then runs
        queued = second.popen("sync", "--delete", src2, server.url("m", "a"), "--peer-id", server_site.id,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert queued.wait(120) == 0 and waiting.wait(120) == 0
    assert busy.returncode == 13 and "another transfer into m/a is running" in busy.stderr
    assert busy.stderr.count("\n") == 1
    assert other.returncode == 0, other.stderr
    _same(src2, module / "a")
    _same(src2, module / "b")
    _same(src2, module / "c")


def test_a_push_waits_while_another_device_writes_its_destination(sites, tmp_path):
    client, server_site = sites
    second = Site(tmp_path, "second")
    src1, src2, module = tmp_path / "src1", tmp_path / "src2", tmp_path / "module"
    _tree(src1, 6, files=5)
    _tree(src2, 7, files=5)
    module.mkdir()
    with Server(server_site, "--module", f"m={module}", "--allow", client.id, "--allow", second.id) as server:
        slow = _slow_push(client, server, server_site.id, src1, module, "a")
        r = second.run("sync", "--delete", src2, server.url("m", "a"), "--peer-id", server_site.id)
        assert slow.wait(60) == 0
    assert r.returncode == 0, r.stderr
    assert "retrying in" in r.stderr and "running" in r.stderr
    _same(src2, module / "a")


def test_progress_on_a_terminal_push_and_pull(sites, tmp_path):
    """-P over the network: the progress line on a terminal ends at 100 %
    with every file; a pull's --bwlimit holds the server to that rate."""
    import pty
    client, server_site = sites
    src, module, pulled = tmp_path / "src", tmp_path / "module", tmp_path / "pulled"
    src.mkdir()
    module.mkdir()
    for i in range(3):
        mix.write(src / f"large{i}", 30 + i, 3_000_000, "mixed")
    with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
        for ends in ((src, server.url("m", "d")), (server.url("m", "d"), pulled)):
            master, slave = pty.openpty()
            t = time.monotonic()
            proc = client.popen("sync", "-P", "--bwlimit", "4M", *ends, "--peer-id", server_site.id,
                                stdout=subprocess.DEVNULL, stderr=slave)
            os.close(slave)
            out = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            os.close(master)
            assert proc.wait(60) == 0
            last = out.decode().replace("\r", "\n").strip().splitlines()[-1]
            assert "100.0%" in last and "3/3 files" in last, last
            assert time.monotonic() - t > 1.5          # 9 MB of mixed content at 4 MiB/s: not all at once
    _same(src, pulled)


def test_a_pull_waits_while_another_transfer_writes_its_destination(sites, tmp_path):
    """A pull holds its destination as the server holds a push's: while
    another resync transfer (here: the test, holding the flock) writes it,
    the pull retries within --retry-for, else exits 13 naming it."""
    import fcntl
    import threading
    client, server_site = sites
    src, module, dst = tmp_path / "module" / "d", tmp_path / "module", tmp_path / "dst"
    _tree(src, 12, files=5)
    dst.mkdir()
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    held = [fd]

    def release():
        if held:
            os.close(held.pop())
    try:
        with Server(server_site, "--module", f"m={module}", "--allow", client.id) as server:
            pin = ("--peer-id", server_site.id)
            r = client.run("sync", server.url("m", "d"), dst, *pin, "--retry-for", "0")
            assert r.returncode == 13 and "another resync transfer is writing" in r.stderr, r.stderr
            assert not list(dst.iterdir())
            r = client.run("sync", "-n", server.url("m", "d"), dst, *pin, "--retry-for", "0")
            assert r.returncode == 0, r.stderr                  # a dry run writes nothing: it holds nothing
            threading.Timer(2.0, release).start()
            r = client.run("sync", server.url("m", "d"), dst, *pin, "--retry-for", "30")
            assert r.returncode == 0 and "retrying in" in r.stderr, r.stderr
            _same(src, dst)
    finally:
        release()


# -- kills ----------------------------------------------------------------------------------

def _checkpointed(dst: Path) -> bool:
    """Whether the receiver's checkpoint in ``dst`` records stripes of some file."""
    for cp in dst.glob(RECV_PREFIX + "*/checkpoint.json"):
        try:
            if any(e.get("stripes") for e in json.loads(cp.read_text()).get("files", ())):
                return True
        except (OSError, ValueError):
            pass
    return False


def _no_stage_left(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.slow
@pytest.mark.parametrize("push, victim, sig", [
    (True, "client", signal.SIGKILL), (True, "server", signal.SIGKILL), (True, "server", signal.SIGTERM),
    (False, "client", signal.SIGKILL), (False, "server", signal.SIGKILL),
], ids=["push-kill-client", "push-kill-server", "push-term-server", "pull-kill-client", "pull-kill-server"])
def test_cut_transfer_then_rerun_finishes_identical(sites, tmp_path, push, victim, sig):
    """Kill either side in the middle of a transfer (or stop the server with
    SIGTERM): every destination file is the old or the new version (never
    torn), and the next run completes the mirror from the receiver's
    checkpoint (what had arrived is not sent again), leaving nothing staged."""
    client, server_site = sites
    local, module = tmp_path / "local", tmp_path / "module"
    src, dst = (local, module / "d") if push else (module / "d", local)
    _tree(src, 8, files=30)
    for i in range(3):
        mix.write(src / f"large{i}", 10 + i, 4_000_000, "mixed")
    module.mkdir(exist_ok=True)
    old = tmp_path / "old"
    server = Server(server_site, "--module", f"m={module}", "--allow", client.id)
    ends = (local, server.url("m", "d")) if push else (server.url("m", "d"), local)
    try:
        pin = ("--peer-id", server_site.id, "--retry-for", "0")
        assert client.run("sync", *ends, *pin).returncode == 0
        assert rsync_a(dst, old).returncode == 0
        mutate(src, random.Random(9))
        for i in range(3):
            mix.write(src / f"large{i}", 20 + i, 4_000_000, "mixed")
        proc = client.popen("sync", "--delete", *ends, *pin, "--bwlimit", "1M",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60                     # past a checkpoint that holds content
        while not _checkpointed(dst) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None
        if victim == "client":
            os.killpg(proc.pid, sig)
            proc.wait(30)
        else:
            rc = server.stop(sig)
            proc.wait(120)
            assert proc.returncode in (10, 30), proc.stderr.read()
            if sig == signal.SIGTERM:
                assert rc == 0 and "checkpointed" in server.text()
        # nothing torn: each file is as it was or as it is now
        now_snap, old_snap, dst_snap = snapshot(src), snapshot(old), snapshot(dst, times=False)
        for rel, v in dst_snap.items():
            if rel == "." or v[0] != 0o100000 or TEMP_PREFIX in rel:
                continue
            digests = {s[rel][4] for s in (now_snap, old_snap) if rel in s}
            assert v[4] in digests, rel
        assert list(dst.glob(RECV_PREFIX + "*/checkpoint.json")), "the receiver's checkpoint is kept"
        if victim == "server":
            server = Server(server_site, "--module", f"m={module}", "--allow", client.id)
            ends = (local, server.url("m", "d")) if push else (server.url("m", "d"), local)
        r = client.run("sync", "--delete", "--json", *ends, *pin)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["resumed_bytes"] > 0      # what arrived before the cut is not sent again
        _same(src, dst)
        assert _no_stage_left(dst)
    finally:
        server.__exit__()


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code, words", [
    (("serve", "--listen", "nonsense", "--module", "m=/tmp", "--allow", "X"), 2, "device id"),
    (("serve", "--listen", "127.0.0.1:99999"), 2, "nothing to serve"),
    (("serve", "--module", "m=/tmp", "--allow", "X", "--bwlimit", "0"), 2, "more than 0"),
    (("serve", "--module", "m=/tmp", "--min-parity", "0"), 2, "min-parity"),
    (("sync", "a", "resync://"), 2, "resync://host"),
    (("sync", "/tmp", "rsync://h/m"), 2, "not resync's"),
    (("sync", "/tmp", "resync://127.0.0.1:9/m", "--peer-id", "garbage"), 2, "not a device id"),
    (("sync", "resync://h/m", "resync://h/n"), 2, "local directory"),
])
def test_bad_arguments_are_one_line_errors(sites, args, code, words):
    client, _ = sites
    r = client.run(*args)
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr.lower() and "Traceback" not in r.stderr


@pytest.mark.parametrize("text, words", [
    ('[modules.m]\npath = "{d}"\nreadonly = true\nallow = ["{id}"]\n', "unknown key 'readonly'"),
    ('allow = "{id}"\n[modules.m]\npath = "{d}"\n', "must be a list"),
    ('listn = "0.0.0.0:1"\n[modules.m]\npath = "{d}"\nallow = ["{id}"]\n', "unknown key 'listn'"),
    ('listen = "localhost"\n[modules.m]\npath = "{d}"\nallow = ["{id}"]\n', "listen 'localhost'"),
])
def test_a_config_with_a_mistake_is_refused_whole(sites, tmp_path, text, words):
    """A misspelt key (readonly for read_only) must not leave a module
    writable without a word: every key is known and of its type."""
    client, server_site = sites
    cfg = tmp_path / "serve.toml"
    cfg.write_text(text.format(d=tmp_path, id=client.id))
    r = server_site.run("serve", "--config", cfg, timeout=30)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_port_in_use_is_a_one_line_error(sites, tmp_path):
    import socket
    client, server_site = sites
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        r = server_site.run("serve", "--listen", f"127.0.0.1:{s.getsockname()[1]}", "--module", f"m={tmp_path}",
                            "--allow", client.id, timeout=30)
    finally:
        s.close()
    assert r.returncode == 10 and "cannot listen" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_no_server_is_a_connection_failure(sites, tmp_path):
    client, server_site = sites
    src = tmp_path / "src"
    src.mkdir()
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = time.monotonic()
    r = client.run("sync", src, f"resync://127.0.0.1:{port}/m", "--peer-id", server_site.id, "--timeout", "2",
                   "--retry-for", "0")
    assert r.returncode in (10, 30), r.stderr
    assert r.stderr.count("\n") == 1 and time.monotonic() - t < 30


def test_quic_start_up_defers_aioquics_unused_certificate_checker():
    """aioquic imports service_identity (host-name checks resync never asks
    for: it pins keys) at a cost of ~45 ms; net.link leaves a stand-in that
    loads it on first use, and the stand-in then behaves as the module."""
    code = ("import sys\nimport resync.net.link\n"
            "print('service_identity.cryptography' in sys.modules, type(sys.modules['service_identity']).__name__)\n"
            "import service_identity\n"
            "print(issubclass(service_identity.VerificationError, Exception), "
            "callable(service_identity.cryptography.verify_certificate_hostname), "
            "'service_identity.cryptography' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["False _Deferred", "True True True"]
