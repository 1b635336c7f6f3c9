"""A relay on the network, as three machines run it: A hands sealed
envelopes to R (`resync serve --relay`) while B is offline; B calls in,
collects its mailbox and applies it; R gives each up only once B holds it;
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
        assert not [p for p in (spool / "envelopes").iterdir()]          # given up once B held them
        assert sorted(p.name for p in (spool / "tombstones").iterdir()) == held
        # the same again: nothing to collect, nothing applied twice
        again = b.run("relay", "receive", f"resync://127.0.0.1:{server.port}", "--peer-id", r.id,
                      "--module", f"backup={backup}", "--allow", a.id, "--json")
        assert again.returncode == 0 and again.stdout == "", again.stdout
        assert "relay exchange: took 1 envelopes" in server.text()
    events = [json.loads(line)["event"] for line in (spool / "events.ndjson").read_text().splitlines()]
    assert events.count("taken") == 2 and events.count("delivered") == 2


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
