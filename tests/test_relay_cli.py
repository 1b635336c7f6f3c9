"""`resync relay send` and `receive`: a tree mirrored by envelopes carried in
a directory (sneakernet), as two machines would run it."""
from __future__ import annotations

import json
import random

from .test_net import Site
from .test_sync import make_tree, mutate
from .treeutil import snapshot


def _lines(r) -> list[dict]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_a_tree_travels_by_disk_in_order_whatever_order_the_disks_come_in(tmp_path):
    a, b = Site(tmp_path, "a"), Site(tmp_path, "b")
    card = b.run("id", "--card").stdout.strip()
    (tmp_path / "b.card").write_text(card + "\n")
    src, backup = tmp_path / "src", tmp_path / "backup"
    backup.mkdir()
    make_tree(src, random.Random(1), files=30)
    disks, states = [tmp_path / f"disk{i}" for i in range(3)], []
    for i, disk in enumerate(disks):
        if i:
            mutate(src, random.Random(20 + i))
        r = a.run("relay", "send", src, disk, "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id, "--as",
                  "backup/photos", "--json")
        assert r.returncode == 0, r.stderr
        assert _lines(r)[0]["generation"] == i + 1
        states.append(snapshot(src))
    receive = ("relay", "receive", "--module", f"backup={backup}", "--allow", a.id, "--json")
    r = b.run(*receive[:2], disks[0], *receive[2:])
    assert r.returncode == 0, r.stderr
    assert snapshot(backup / "photos") == states[0]
    r = b.run(*receive[:2], disks[2], *receive[2:])                     # the third disk comes before the second
    assert r.returncode == 0 and _lines(r)[0]["verdict"] == "park", r.stdout
    assert snapshot(backup / "photos") == states[0]
    r = b.run(*receive[:2], disks[1], *receive[2:])
    assert r.returncode == 0, r.stderr
    assert [g for x in _lines(r) for g in x["applied"]] == [2, 3]       # (the third from where it waited)
    assert snapshot(backup / "photos") == states[2]
    r = b.run(*receive[:2], disks[0], *receive[2:])                     # an old disk again: a replay
    assert r.returncode == 0 and _lines(r)[0]["verdict"] == "replay"
    sent = json.loads(a.run("relay", "status", "--json").stdout)["sent"]
    assert [(t["to"], t["name"], t["generation"]) for t in sent] == [(b.id, "backup/photos", 3)]
    status = json.loads(b.run("relay", "status", "--json").stdout)
    assert [(c["source"], c["generation"]) for c in status["applied"]] == [(a.id, 3)] and status["parked"] == []
    assert "generation 3" in b.run("relay", "status").stdout
    # a damaged envelope: exit 4, one line, nothing applied
    env = max(disks[1].glob("*.env"), key=lambda p: p.stat().st_size)    # (the bundle, not B's receipt beside it)
    data = bytearray(env.read_bytes())
    data[-50] ^= 1
    env.write_bytes(bytes(data))
    r = b.run(*receive[:2], disks[1], *receive[2:-1])
    assert r.returncode == 4 and "does not match its hash" in r.stdout + r.stderr
    assert snapshot(backup / "photos") == states[2]
    # a card that is not the device's named: refused before anything is sealed
    r = a.run("relay", "send", src, disks[0], "--to", card, "--to-id", a.id, "--as", "backup/photos")
    assert r.returncode == 2 and "not" in r.stderr and r.stderr.count("\n") == 1


def test_a_parked_envelope_is_dropped_when_its_lifetime_ends(tmp_path):
    import time
    a, b = Site(tmp_path, "a"), Site(tmp_path, "b")
    card = b.run("id", "--card").stdout.strip()
    src, backup = tmp_path / "src", tmp_path / "backup"
    backup.mkdir()
    make_tree(src, random.Random(2), files=5)
    send = ("relay", "send", src, None, "--to", card, "--to-id", b.id, "--as", "backup/x")
    assert a.run(*[x if x is not None else tmp_path / "withheld" for x in send]).returncode == 0
    mutate(src, random.Random(3))
    r = a.run(*[x if x is not None else tmp_path / "short" for x in send], "--ttl", "2s")
    assert r.returncode == 0, r.stderr
    receive = ("relay", "receive", None, "--module", f"backup={backup}", "--allow", a.id, "--json")
    r = b.run(*[x if x is not None else tmp_path / "short" for x in receive])
    assert r.returncode == 0 and _lines(r)[0]["verdict"] == "park"
    waiting = json.loads(b.run("relay", "status", "--json").stdout)["parked"]
    assert [(p["source"], p["generation"]) for p in waiting] == [(a.id, 2)]
    time.sleep(2.2)
    (tmp_path / "empty").mkdir()
    r = b.run(*[x if x is not None else tmp_path / "empty" for x in receive])
    assert r.returncode == 0 and [x["verdict"] for x in _lines(r)] == ["expired"]
    assert not list((b.home / "config" / "resync" / "relay" / "parked").iterdir())


def test_the_receipt_comes_back_on_the_same_disk(tmp_path):
    a, b = Site(tmp_path, "a"), Site(tmp_path, "b")
    (tmp_path / "b.card").write_text(b.run("id", "--card").stdout)
    src, backup, disk = tmp_path / "src", tmp_path / "backup", tmp_path / "disk"
    backup.mkdir()
    make_tree(src, random.Random(2), files=10)
    sent = _lines(a.run("relay", "send", src, disk, "--to", f"@{tmp_path / 'b.card'}", "--to-id", b.id, "--as",
                        "backup/x", "--json"))[0]
    r = b.run("relay", "receive", disk, "--module", f"backup={backup}", "--allow", a.id, "--json")
    assert r.returncode == 0 and _lines(r)[0]["verdict"] == "apply", r.stderr
    assert len(list(disk.glob("*.env"))) == 2                        # the envelope, and B's receipt beside it
    r = a.run("relay", "receive", disk, "--json")                     # the disk back at A: no module needed
    assert r.returncode == 0, r.stderr
    assert [x["verdict"] for x in _lines(r)] == ["receipt"]
    tree = json.loads(a.run("relay", "status", "--json").stdout)["sent"][0]
    assert tree["confirmed"] == 1 and tree["receipt"]["envelope"] == sent["envelope"]
