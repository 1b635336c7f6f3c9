"""A relay on the network, as three machines run it: A hands sealed
envelopes to R (`resync serve --relay`) while B is offline; B calls in,
collects its mailbox and applies it; R gives each up only once B holds it;
B's receipts travel back through R to A;
R's spool never holds a name or a byte of content in the clear; a device R
does not allow is refused before anything is stored; R killed (SIGKILL)
mid-ingest keeps nothing half-visible and the next hand-over resumes."""
from __future__ import annotations

import json
import random
import signal

from . import mix
from .test_net import Server, Site
from .test_sync import make_tree, mutate
from .treeutil import snapshot


def _json(r) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.splitlines()[-1])


def _sites(tmp_path):
    a, r, b = Site(tmp_path, "a"), Site(tmp_path, "r"), Site(tmp_path, "b")
    (tmp_path / "b.card").write_text(b.run("id", "--card").stdout)
    return a, r, b


def _send(a, b, r_server, r, src, tmp_path, *more):
    return a.run("relay", "send", src, f"resync://127.0.0.1:{r_server.port}", "--peer-id", r.id,
                 "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id, "--as", "backup/photos", "--json", *more)


def test_a_tree_goes_through_a_relay_while_its_destination_is_offline(tmp_path):
    a, r, b = _sites(tmp_path)
    src, backup, spool = tmp_path / "src", tmp_path / "backup", tmp_path / "r-spool"
    backup.mkdir()
    make_tree(src, random.Random(3), files=40)
    mix.write(src / "notes-secret-name.txt", 1, 200_000, "text")
    states = []
    with Server(r, "--relay", spool, "--relay-allow", a.id, "--relay-allow", b.id) as server:
        for gen in (1, 2):
            if gen == 2:
                mutate(src, random.Random(7))
            out = _json(_send(a, b, server, r, src, tmp_path))
            assert out["generation"] == gen and out["handed_over"] == 1 and out["waiting"] == 0
            states.append(snapshot(src))
        held = sorted(p.name for p in (spool / "envelopes").iterdir() if not p.name.endswith(".json"))
        assert len(held) == 2
        # what R holds: no name, no content in the clear (the payload is encrypted to B)
        secret = (src / "notes-secret-name.txt").read_bytes()[1000:1064]
        for p in spool.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert b"notes-secret-name" not in data and b"photos" not in data and secret not in data, p
        # B comes up, collects its mailbox, applies both generations in order
        got = b.run("relay", "receive", f"resync://127.0.0.1:{server.port}", "--peer-id", r.id,
                    "--module", f"backup={backup}", "--allow", a.id, "--json")
        assert got.returncode == 0, got.stderr
        verdicts = [json.loads(line) for line in got.stdout.splitlines()]
        assert [v["verdict"] for v in verdicts] == ["apply", "apply"] and verdicts[-1]["applied"] == [2]
        assert snapshot(backup / "photos") == states[1]
        # R gave both up once B held them; it holds B's two receipts for A now
        assert set(held) <= {p.name for p in (spool / "tombstones").iterdir()}
        receipts = [p for p in (spool / "envelopes").iterdir() if not p.name.endswith(".json")]
        assert len(receipts) == 2 and not set(held) & {p.name for p in receipts}
        from resync.relay import envelope as E
        from resync.relay.keys import device_hash
        assert {E.parse(p.read_bytes()).header.destination for p in receipts} == {device_hash(a.id)}
        # A calls in: its receipts say both generations were applied
        told = a.run("relay", "receive", f"resync://127.0.0.1:{server.port}", "--peer-id", r.id, "--json")
        assert told.returncode == 0, told.stderr
        assert [json.loads(line)["verdict"] for line in told.stdout.splitlines()] == ["receipt", "receipt"]
        sent = json.loads(a.run("relay", "status", "--json").stdout)["sent"][0]
        assert sent["confirmed"] == 2 and sent["receipt"]["verdict"] == "apply"
        assert "receipt: apply generation 2" in a.run("relay", "status").stdout
        assert not [p for p in (spool / "envelopes").iterdir()]          # nothing left at R
        # the same again: nothing to collect, nothing applied twice
        again = b.run("relay", "receive", f"resync://127.0.0.1:{server.port}", "--peer-id", r.id,
                      "--module", f"backup={backup}", "--allow", a.id, "--json")
        assert again.returncode == 0 and again.stdout == "", again.stdout
        assert "relay exchange: took 1 envelopes" in server.text()
    events = [json.loads(line)["event"] for line in (spool / "events.ndjson").read_text().splitlines()]
    assert events.count("taken") == 4 and events.count("delivered") == 4      # 2 generations, 2 receipts


def test_a_device_the_relay_does_not_allow_is_refused_before_anything_is_stored(tmp_path):
    a, r, b = _sites(tmp_path)
    src, spool = tmp_path / "src", tmp_path / "r-spool"
    make_tree(src, random.Random(4), files=5)
    with Server(r, "--relay", spool, "--relay-allow", b.id) as server:
        res = _send(a, b, server, r, src, tmp_path)
        assert res.returncode == 13, (res.returncode, res.stderr)
        assert "not allowed" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list((spool / "envelopes").iterdir()) and not list((spool / "partial").iterdir())
    status = json.loads(a.run("relay", "status", "--json").stdout)
    assert status["sent"][0]["generation"] == 1                           # sealed, and still A's to hand over
    assert len(list((a.home / "config" / "resync" / "relay" / "spool" / "envelopes").glob("*.json"))) == 1


def test_a_relay_killed_mid_ingest_shows_nothing_and_the_hand_over_resumes(tmp_path):
    a, r, b = _sites(tmp_path)
    src, spool = tmp_path / "src", tmp_path / "r-spool"
    src.mkdir()
    mix.write(src / "big.bin", 5, 40_000_000, "random")
    server = Server(r, "--relay", spool, "--relay-allow", a.id, "--relay-allow", b.id)
    with server:
        proc = a.popen("relay", "send", src, f"resync://127.0.0.1:{server.port}", "--peer-id", r.id,
                       "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id, "--as", "backup/big", "--json",
                       "--retry-for", "0")
        partial = spool / "partial"
        import time
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in partial.iterdir()] if partial.exists() else []
            if sizes and sizes[0] > 5_000_000:
                break
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        proc.wait(120)
        assert proc.returncode != 0
    kept = [p.stat().st_size for p in (spool / "partial").iterdir()]
    assert len(kept) == 1 and 5_000_000 < kept[0] < 40_000_000
    assert not [p for p in (spool / "envelopes").iterdir()]               # nothing half-visible
    with Server(r, "--relay", spool, "--relay-allow", a.id, "--relay-allow", b.id) as server:
        # the envelope waits in A's spool: handed over now, resumed where the kill left it
        from .test_net import _json as ok
        out = ok(a.run("relay", "send", src, f"resync://127.0.0.1:{server.port}", "--peer-id", r.id,
                       "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id, "--as", "backup/big", "--json"))
        assert out["handed_over"] == 2 and out["waiting"] == 0           # (generation 1, then 2)
        assert "B resumed" in server.text()
        resumed = int(server.text().split(" B resumed")[0].rsplit("(", 1)[1].split(", ")[-1].split(" ")[0])
        assert resumed >= kept[0] - 1000
    assert len([p for p in (spool / "envelopes").iterdir() if not p.name.endswith(".json")]) == 2


def test_a_destination_changed_locally_refuses_the_generation_and_the_source_is_told(tmp_path):
    a, r, b = _sites(tmp_path)
    src, backup, spool = tmp_path / "src", tmp_path / "backup", tmp_path / "r-spool"
    backup.mkdir()
    make_tree(src, random.Random(5), files=20)
    url = None
    with Server(r, "--relay", spool, "--relay-allow", a.id, "--relay-allow", b.id) as server:
        url = f"resync://127.0.0.1:{server.port}"
        receive = ("relay", "receive", url, "--peer-id", r.id, "--module", f"backup={backup}", "--allow", a.id,
                   "--json")
        _json(_send(a, b, server, r, src, tmp_path))
        assert b.run(*receive).returncode == 0
        first = snapshot(backup / "photos")
        victim = sorted(p for p in (backup / "photos").rglob("*") if p.is_file())[0]
        victim.write_bytes(b"changed at the destination\n")                 # someone edits B's copy
        changed = snapshot(backup / "photos")
        mutate(src, random.Random(9))
        _json(_send(a, b, server, r, src, tmp_path))
        got = b.run(*receive)
        assert got.returncode == 5, (got.returncode, got.stderr)
        assert json.loads(got.stdout.splitlines()[0])["verdict"] == "refused"
        assert snapshot(backup / "photos") == changed != first              # nothing applied
        told = a.run("relay", "receive", url, "--peer-id", r.id, "--json")
        assert told.returncode == 0, told.stderr
        sent = json.loads(a.run("relay", "status", "--json").stdout)["sent"][0]
        assert sent["receipt"]["verdict"] == "refuse" and sent["receipt"]["generation"] == 2
        assert sent["confirmed"] == 1 and "changed" in sent["receipt"]["why"]
        # told, the source starts the chain again: its next generation is whole and makes B a mirror again
        assert sent["generation"] == 0 and sent.get("restarted")
        out = _json(_send(a, b, server, r, src, tmp_path))
        assert out["generation"] == 1
        got = b.run(*receive)
        assert got.returncode == 0 and json.loads(got.stdout.splitlines()[0])["verdict"] == "apply", got.stdout
        assert snapshot(backup / "photos") == snapshot(src)


def test_an_envelope_that_cannot_be_applied_yet_is_kept_not_dropped(tmp_path):
    a, r, b = _sites(tmp_path)
    src, backup = tmp_path / "src", tmp_path / "backup"
    backup.mkdir()
    make_tree(src, random.Random(6), files=8)
    with Server(r, "--relay", tmp_path / "r-spool", "--relay-allow", a.id, "--relay-allow", b.id) as server:
        url = f"resync://127.0.0.1:{server.port}"
        _json(_send(a, b, server, r, src, tmp_path))
        got = b.run("relay", "receive", url, "--peer-id", r.id, "--json")      # B forgot --module
        assert got.returncode == 2, got.stderr
        assert json.loads(got.stdout.splitlines()[0])["verdict"] == "kept"
        held = list((b.home / "config" / "resync" / "relay" / "spool" / "envelopes").glob("*.json"))
        assert len(held) == 1                                            # still in B's spool, not tombstoned
        got = b.run("relay", "receive", url, "--peer-id", r.id, "--module", f"backup={backup}", "--allow", a.id,
                    "--json")
        assert got.returncode == 0 and json.loads(got.stdout.splitlines()[0])["verdict"] == "apply", got.stdout
        assert snapshot(backup / "photos") == snapshot(src)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_relay_forwards_when_the_destination_comes_up_and_the_receipt_comes_back(tmp_path):
    """A -> R while B's daemon is down; B comes up; R (routing B's envelopes to B)
    forwards them, B applies them and acknowledges; R gives them up only then;
    B's receipts go back to R (its route for any other device), where A collects them."""
    import time
    a, r, b = _sites(tmp_path)
    src, backup = tmp_path / "src", tmp_path / "backup"
    backup.mkdir()
    make_tree(src, random.Random(11), files=30)
    b_port = _free_port()
    with Server(r, "--relay", tmp_path / "r-spool", "--relay-allow", a.id, "--relay-allow", b.id,
                "--relay-route", f"{b.id}=resync://127.0.0.1:{b_port}") as relay:
        out = _json(_send(a, b, relay, r, src, tmp_path))
        assert out["handed_over"] == 1
        time.sleep(1.0)                                                   # R tries B, which is down
        assert "trying again in" in relay.text()
        held = [p for p in (tmp_path / "r-spool" / "envelopes").iterdir() if not p.name.endswith(".json")]
        assert len(held) == 1
        with Server(b, "--module", f"backup={backup}", "--allow", a.id, "--relay", tmp_path / "b-spool",
                    "--relay-allow", r.id, "--relay-route", f"*=resync://127.0.0.1:{relay.port}@{r.id}",
                    port=b_port) as dest:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "for this device: apply" not in dest.text():
                time.sleep(0.2)
            assert snapshot(backup / "photos") == snapshot(src), dest.text()
            # R gave B's envelope up once B acknowledged it; B's receipt came back to R for A
            while time.monotonic() < deadline:
                names = {p.name for p in (tmp_path / "r-spool" / "envelopes").iterdir()}
                if held[0].name not in names and len([n for n in names if not n.endswith(".json")]) == 1:
                    break
                time.sleep(0.2)
            assert held[0].name in {p.name for p in (tmp_path / "r-spool" / "tombstones").iterdir()}
            told = a.run("relay", "receive", f"resync://127.0.0.1:{relay.port}", "--peer-id", r.id, "--json")
            assert told.returncode == 0, told.stderr
            assert [json.loads(line)["verdict"] for line in told.stdout.splitlines()] == ["receipt"]
            sent = json.loads(a.run("relay", "status", "--json").stdout)["sent"][0]
            assert sent["confirmed"] == 1
            assert "handed over 1 envelopes" in relay.text() and "handed over 1 envelopes" in dest.text()


def test_export_and_import_carry_the_same_envelopes_applied_once(tmp_path):
    a, r, b = _sites(tmp_path)
    src, backup, spool, disk = tmp_path / "src", tmp_path / "backup", tmp_path / "r-spool", tmp_path / "usb"
    backup.mkdir()
    make_tree(src, random.Random(12), files=15)
    with Server(r, "--relay", spool, "--relay-allow", a.id, "--relay-allow", b.id) as server:
        url = f"resync://127.0.0.1:{server.port}"
        _json(_send(a, b, server, r, src, tmp_path))
        # the relay's operator copies what it holds for B onto a disk, the relay running
        out = _json(r.run("relay", "export", disk, "--spool", spool, "--to", b.id, "--json"))
        assert len(out["copied"]) == 1
        assert r.run("relay", "import", disk, "--spool", spool).returncode == 13    # its daemon holds the spool
        got = b.run("relay", "receive", disk, "--module", f"backup={backup}", "--allow", a.id, "--json")
        assert got.returncode == 0 and json.loads(got.stdout.splitlines()[0])["verdict"] == "apply", got.stderr
        assert snapshot(backup / "photos") == snapshot(src)
        # B calls the relay too: the relayed copy is the same envelope, a replay (nothing applied twice);
        # the relay gives it up as delivered
        got = b.run("relay", "receive", url, "--peer-id", r.id, "--module", f"backup={backup}", "--allow", a.id,
                    "--json")
        assert got.returncode == 0, got.stderr
        assert [json.loads(line)["verdict"] for line in got.stdout.splitlines()] == ["replay"]
        assert not [p for p in (spool / "envelopes").iterdir() if p.name == out["copied"][0]]
        # the next generation travels by disk to a machine that imports it into the relay
        mutate(src, random.Random(13))
        r2 = a.run("relay", "send", src, tmp_path / "usb2", "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id,
                   "--as", "backup/photos", "--json")
        assert r2.returncode == 0, r2.stderr
        imp = a.run("relay", "import", tmp_path / "usb2", url, "--peer-id", r.id, "--json")
        assert imp.returncode == 0, imp.stderr
        lines = [json.loads(line) for line in imp.stdout.splitlines()]
        assert lines[0]["verdict"] == "taken" and lines[-1]["handed_over"] >= 1
        again = a.run("relay", "import", tmp_path / "usb2", "--json")        # the same disk again: a duplicate
        assert json.loads(again.stdout.splitlines()[0])["verdict"] == "refused"
        got = b.run("relay", "receive", url, "--peer-id", r.id, "--module", f"backup={backup}", "--allow", a.id,
                    "--json")
        assert got.returncode == 0, got.stderr
        assert "apply" in [json.loads(line)["verdict"] for line in got.stdout.splitlines()]
        assert snapshot(backup / "photos") == snapshot(src)


def test_the_relay_shows_what_it_holds_in_its_api_metrics_and_cli_and_the_operator_removes_one(tmp_path):
    from .test_api import _api_of, _metric
    import urllib.request
    a, r, b = _sites(tmp_path)
    src = tmp_path / "src"
    make_tree(src, random.Random(14), files=5)
    with Server(r, "--relay", tmp_path / "r-spool", "--relay-allow", a.id, "--relay-allow", b.id, "--relay-route",
                f"{b.id}=resync://127.0.0.1:9@{b.id}", "--api", "127.0.0.1:0") as server:
        _json(_send(a, b, server, r, src, tmp_path))
        held = _json(r.run("relay", "held", "--json"))
        assert held["relaying"] and held["envelopes"] == 1 and held["by_priority"]["normal"]["envelopes"] == 1
        assert held["held"][0]["destination"] == b.id and held["held"][0]["source"] == a.id
        assert held["routes"][0]["peer_id"] == b.id and held["routes"][0]["via"] == "127.0.0.1:9"
        text = r.run("relay", "held").stdout
        assert "1 envelopes" in text and f"for {b.id}" in text
        url, key = _api_of(r)
        metrics = urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers={"X-API-Key": key}),
                                         timeout=10).read().decode()
        assert _metric(metrics, "resync_relay_envelopes", priority="normal") == 1
        assert _metric(metrics, "resync_relay_events_total", event="taken") == 1
        gone = r.run("relay", "remove", held["held"][0]["id"])
        assert gone.returncode == 0 and "removed" in gone.stdout, gone.stderr
        assert _json(r.run("relay", "held", "--json"))["envelopes"] == 0
        assert r.run("relay", "remove", held["held"][0]["id"]).returncode == 2          # no such envelope now
        metrics = urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers={"X-API-Key": key}),
                                         timeout=10).read().decode()
        assert _metric(metrics, "resync_relay_events_total", event="removed") == 1
        assert _metric(metrics, "resync_relay_envelopes", priority="normal") == 0
        assert server.stop() == 0
    # every event is in the relay's history too
    from resync.store import History
    _, rows = History(r.home / "data" / "resync" / "history.duckdb").query(
        "SELECT event, envelope_id, node, bytes FROM relay_events ORDER BY occurred")
    assert [(e, i) for e, i, _, _ in rows] == [("taken", held["held"][0]["id"]), ("removed", held["held"][0]["id"])]
    assert {n for _, _, n, _ in rows} == {r.id} and rows[0][3] == held["held"][0]["bytes"]


def test_a_relay_killed_mid_forward_resumes_by_offset_and_the_destination_applies_once(tmp_path):
    import time
    a, r, b = _sites(tmp_path)
    src, backup, r_spool, b_spool = tmp_path / "src", tmp_path / "backup", tmp_path / "r-spool", tmp_path / "b-spool"
    src.mkdir()
    backup.mkdir()
    mix.write(src / "big.bin", 6, 120_000_000, "random")
    b_port = _free_port()
    relay_args = ("--relay", r_spool, "--relay-allow", a.id, "--relay-route", f"{b.id}=resync://127.0.0.1:{b_port}")
    relay = Server(r, *relay_args)
    try:
        _json(_send(a, b, relay, r, src, tmp_path))                         # R holds it; B is down
        with Server(b, "--module", f"backup={backup}", "--allow", a.id, "--relay", b_spool, "--relay-allow", r.id,
                    port=b_port) as dest:
            deadline = time.monotonic() + 60
            partial = b_spool / "partial"
            while time.monotonic() < deadline:
                sizes = [p.stat().st_size for p in partial.iterdir()] if partial.exists() else []
                if sizes and sizes[0] > 10_000_000:
                    break
                time.sleep(0.002)
            relay.proc.send_signal(signal.SIGKILL)                           # R dies mid-forward
            relay.proc.wait(30)
            relay._f.close()
            time.sleep(0.5)
            kept = [p.stat().st_size for p in partial.iterdir()]
            assert len(kept) == 1 and 10_000_000 < kept[0] < 120_000_000, kept
            assert not [p for p in (b_spool / "envelopes").iterdir()]        # nothing half-visible at B
            assert not (backup / "photos").exists()
            relay = Server(r, *relay_args)                                   # R again: it still has custody
            while time.monotonic() < deadline + 60 and "for this device: apply" not in dest.text():
                time.sleep(0.2)
            assert dest.text().count("for this device: apply") == 1, dest.text()
            assert (backup / "photos" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
            taken = [line for line in dest.text().splitlines() if "relay exchange: took 1" in line]
            resumed = int(taken[-1].split(" B resumed")[0].rsplit(", ", 1)[1].split(" ")[0])
            assert resumed >= kept[0] - 1_000_000, (resumed, kept)            # the rest only, from the offset
    finally:
        if relay.proc.poll() is None:
            relay.stop()


def test_sync_via_a_relay_when_the_destination_is_down_then_directly_then_relayed_again(tmp_path):
    """`resync sync SRC resync://B/... --via resync://R`: B down -> the next generation
    goes to R and B applies it when it collects; B up -> a direct push (and the
    relayed path learns what B holds); B down again -> generation 2, built on the
    direct push's result, applies at B."""
    a, r, b = _sites(tmp_path)
    src, backup = tmp_path / "src", tmp_path / "backup"
    backup.mkdir()
    make_tree(src, random.Random(21), files=25)
    b_port = _free_port()
    dst = f"resync://127.0.0.1:{b_port}/backup/photos"
    receive = ("relay", "receive", None, "--peer-id", r.id, "--module", f"backup={backup}", "--allow", a.id,
               "--json")
    with Server(r, "--relay", tmp_path / "r-spool", "--relay-allow", a.id, "--relay-allow", b.id) as relay:
        via = ("--delete", "--peer-id", b.id, "--via", f"resync://127.0.0.1:{relay.port}", "--via-id", r.id,
               "--card", f"@{tmp_path / 'b.card'}", "--retry-for", "0", "--json")
        out = _json(a.run("sync", src, dst, *via))
        assert out["relayed"] and out["generation"] == 1 and out["handed_over"] == 1
        url = f"resync://127.0.0.1:{relay.port}"
        got = b.run(*receive[:2], url, *receive[3:])
        assert got.returncode == 0 and json.loads(got.stdout.splitlines()[0])["verdict"] == "apply", got.stderr
        assert snapshot(backup / "photos") == snapshot(src)
        mutate(src, random.Random(22))
        with Server(b, "--module", f"backup={backup}", "--allow", a.id, port=b_port):
            direct = _json(a.run("sync", src, dst, *via))
            assert "relayed" not in direct and direct["files_transferred"] > 0
        assert snapshot(backup / "photos") == snapshot(src)
        mutate(src, random.Random(23))
        out = _json(a.run("sync", src, dst, *via))
        assert out["relayed"] and out["generation"] == 1          # (a new chain from the direct push's tree)
        got = b.run(*receive[:2], url, *receive[3:])
        assert got.returncode == 0, got.stdout + got.stderr
        assert snapshot(backup / "photos") == snapshot(src)
        # neither B nor the relay: exit 10, the generation waits in A's spool
    dead = a.run("sync", src, dst, "--delete", "--peer-id", b.id, "--via", f"resync://127.0.0.1:{_free_port()}", "--via-id", r.id,
                 "--card", f"@{tmp_path / 'b.card'}", "--retry-for", "0")
    assert dead.returncode == 10 and "waits in this machine's spool" in dead.stderr, dead.stderr
    assert len(dead.stderr.strip().splitlines()) <= 2


def test_sync_via_refuses_what_it_cannot_do_in_one_line(tmp_path):
    a, r, b = _sites(tmp_path)
    src = tmp_path / "src"
    make_tree(src, random.Random(31), files=3)
    card = f"@{tmp_path / 'b.card'}"
    dst = "resync://127.0.0.1:9/backup/photos"
    for args, says in [
        ((src, dst, "--peer-id", b.id, "--via", "resync://127.0.0.1:9", "--card", card), "--via needs --delete"),
        ((src, dst, "--delete", "--via", "resync://127.0.0.1:9", "--card", card), "needs --peer-id"),
        ((src, dst, "--delete", "--peer-id", a.id, "--via", "resync://127.0.0.1:9", "--card", card), "card"),
        ((src, tmp_path / "local", "--via", "resync://127.0.0.1:9"), "for a push to resync://"),
        ((src, dst, "--delete", "--peer-id", b.id, "--card", card), "go with --via"),
    ]:
        res = a.run("sync", *args)
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.returncode, res.stderr)
