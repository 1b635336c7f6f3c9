"""A server killed and restarted with the same key while a client pushes:
over QUIC the new process answers the old connection with a stateless reset
(RFC 9000 10.3; resync.net.reset) and the client retries at once instead of
waiting out its --timeout; over TLS on TCP the kernel resets the connection
of the dead process, and the retry goes over QUIC and resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import time

from . import mix
from .test_net import Server, Site, _checkpointed, _same


def _push_across_a_restart(tmp_path, size: int, wait: float, *args, checkpointed: bool = False
                           ) -> tuple[dict, str, float]:
    """A --bwlimit 2M push of a ``size``-byte file killed (the server,
    SIGKILL) after ``wait`` s (``checkpointed``: once the receiver's
    checkpoint holds stripes, at most ``wait`` s) and a new server on the
    same port: the push's --json result, its stderr, and the seconds it took
    after the kill."""
    client, server_site = Site(tmp_path, "client"), Site(tmp_path, "server")
    src, module = tmp_path / "src", tmp_path / "module"
    src.mkdir()
    module.mkdir()
    mix.write(src / "image.bin", 1, size, "mixed")
    (src / "notes.txt").write_text("a text file\n" * 200)
    first = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history")
    port = first.port
    push = client.popen("sync", "--json", src, first.url("m", "x"), "--peer-id", server_site.id, "--bwlimit", "2M",
                        "--timeout", "60", "--no-history", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not (checkpointed and _checkpointed(module / "x")):
        time.sleep(0.05)
    first.stop(signal.SIGKILL)
    started = time.monotonic()
    second = Server(server_site, "--module", f"m={module}", "--allow", client.id, "--no-history", port=port)
    try:
        out, err = push.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        second.stop()
    assert push.returncode == 0, err
    _same(src, module / "x")
    return json.loads(out.splitlines()[-1]), err, took


def test_a_restarted_server_resets_the_old_connection_and_the_client_retries_at_once(tmp_path):
    _, err, took = _push_across_a_restart(tmp_path, 6_000_000, 1.5, "--transport", "quic")
    assert "reset the connection" in err
    assert took < 15, f"{took:.1f} s: the client waited for its timeout, not for a reset"


def test_a_killed_server_cuts_a_tcp_push_at_once_and_the_retry_resumes_over_quic(tmp_path):
    """Past the first checkpoint (2 s) the server is killed: the client sees
    the reset at once, retries over QUIC (the TCP path failed) against the
    restarted server, and resumes what the first had checkpointed."""
    r, _, took = _push_across_a_restart(tmp_path, 12_000_000, 5.0, checkpointed=True)
    assert r["transport"] == "quic" and r["attempts"] == 2 and r["resumed_bytes"] > 0, r
    assert took < 15, f"{took:.1f} s"
