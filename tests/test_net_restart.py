"""A server killed and restarted with the same key while a client pushes:
the new process answers the old connection with a stateless reset (RFC 9000
10.3; resync.net.reset), and the client retries at once instead of waiting
out its --timeout."""
from __future__ import annotations

import signal
import subprocess
import time

from . import mix
from .test_net import Server, Site, _same


def test_a_restarted_server_resets_the_old_connection_and_the_client_retries_at_once(tmp_path):
    client, server_site = Site(tmp_path, "client"), Site(tmp_path, "server")
    src, module = tmp_path / "src", tmp_path / "module"
    src.mkdir()
    module.mkdir()
    mix.write(src / "image.bin", 1, 6_000_000, "mixed")
    (src / "notes.txt").write_text("a text file\n" * 200)
    first = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history")
    port = first.port
    push = client.popen("sync", src, first.url("m", "x"), "--peer-id", server_site.id, "--bwlimit", "2M",
                        "--timeout", "60", "--transport", "quic", "--no-history", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    first.stop(signal.SIGKILL)
    started = time.monotonic()
    second = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history", port=port)
    try:
        out, err = push.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        second.stop()
    assert push.returncode == 0, err
    assert "reset the connection" in err
    assert took < 15, f"{took:.1f} s: the client waited for its timeout, not for a reset"
    _same(src, module / "x")


def test_a_killed_server_cuts_a_tcp_push_at_once_and_the_retry_resumes_over_quic(tmp_path):
    """Over TLS on TCP a server killed mid-push is a reset the client sees at
    once (the kernel answers for the dead process): it retries over QUIC
    (the TCP path failed) against the restarted server, and the push
    completes identical, resuming what the first server had checkpointed."""
    client, server_site = Site(tmp_path, "client"), Site(tmp_path, "server")
    src, module = tmp_path / "src", tmp_path / "module"
    src.mkdir()
    module.mkdir()
    mix.write(src / "image.bin", 2, 8_000_000, "mixed")
    (src / "notes.txt").write_text("a text file\n" * 200)
    first = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history")
    port = first.port
    push = client.popen("sync", "--json", src, first.url("m", "x"), "--peer-id", server_site.id, "--bwlimit", "2M",
                        "--timeout", "60", "--no-history", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)                             # (past the first checkpoint: 2 s)
    first.stop(signal.SIGKILL)
    started = time.monotonic()
    second = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history", port=port)
    try:
        out, err = push.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        second.stop()
    assert push.returncode == 0, err
    import json
    r = json.loads(out.splitlines()[-1])
    assert r["transport"] == "quic" and r["attempts"] == 2 and r["resumed_bytes"] > 0, r
    assert took < 15, f"{took:.1f} s"
    _same(src, module / "x")
