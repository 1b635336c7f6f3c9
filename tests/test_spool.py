"""A relay's spool (resync.store.spool): custody taken durably or refused
with nothing left, never evicting; lifetime, hold time, tombstones, hop
limit, priority order, backoff and stuck marks; a crash's leftovers; a real
ENOSPC on a small tmpfs; no plaintext name or content on its disk."""
from __future__ import annotations

import json
import os
import random

import pytest

from resync.relay import envelope as E
from resync.store.spool import STUCK_AFTER, Refused, Spool

from . import mix
from .test_envelope import DEST_CARD, FIELDS, SOURCE
from .treeutil import tmpfs

NOW = FIELDS["created"] + 1000
NAMES = {"module": "secret-module", "path": "payroll/2026-q4"}


def _env(data=b"payload", **over) -> bytes:
    return E.seal(SOURCE, DEST_CARD, NAMES, data, **{**FIELDS, **over})


def _leftovers(spool: Spool) -> list[str]:
    from resync.fs import TEMP_PREFIX
    return sorted(p.name for p in spool.root.rglob(TEMP_PREFIX + "*"))


def test_custody_is_taken_durably_and_given_up_to_a_tombstone(tmp_path):
    spool = Spool(tmp_path / "spool", min_free=0)
    raw = _env(mix.data(1, 300_000, "mixed"))
    held = spool.put(raw, previous=b"\x07" * 32, now=NOW)
    assert spool.read(held.id) == raw and held.size == len(raw) and held.previous == "07" * 32
    assert oct((spool.envelopes / held.id).stat().st_mode & 0o777) == "0o600"
    assert Spool(tmp_path / "spool", min_free=0).index[held.id] == held          # a restart finds it as it was
    with pytest.raises(Refused, match="held here already"):
        spool.put(raw, now=NOW)
    spool.remove(held.id, "delivered", now=NOW + 5)
    assert not (spool.envelopes / held.id).exists()
    with pytest.raises(Refused, match="delivered or removed here before") as r:
        spool.put(E.rehop(E.parse(raw), E.Hops(1, bytes(32), 10)), now=NOW + 10)  # the same id, another hop part
    assert r.value.reason == "duplicate"
    spool.expire(now=FIELDS["expires"] + 1)                         # the tombstone lasts until its expiry
    assert not list(spool.tombstones.iterdir())
    events = [json.loads(line)["event"] for line in (spool.root / "events.ndjson").read_text().splitlines()]
    assert events == ["taken", "refused", "delivered", "refused"]


def test_expired_on_arrival_over_the_hop_limit_and_over_the_cap_are_refused_with_nothing_kept(tmp_path):
    spool = Spool(tmp_path / "spool", cap=200_000, min_free=0)
    with pytest.raises(Refused, match="before it arrived"):
        spool.put(_env(), now=FIELDS["expires"])
    env = E.parse(_env())
    with pytest.raises(Refused, match="8 hops of 8"):
        spool.put(E.rehop(env, E.Hops(8, bytes(32), 0)), now=NOW)
    small = spool.put(_env(b"x" * 150_000, generation=1), now=NOW)
    with pytest.raises(Refused, match="pass the cap") as r:
        spool.put(_env(b"y" * 100_000, generation=2), now=NOW)
    assert r.value.reason == "storage depleted" and list(spool.index) == [small.id]   # nothing evicted
    assert _leftovers(spool) == [] and len(list(spool.envelopes.iterdir())) == 2    # (one envelope, its record)


def test_the_relays_hold_time_shortens_a_lifetime_and_says_so(tmp_path):
    spool = Spool(tmp_path / "spool", max_hold=60_000, min_free=0)
    long = spool.put(_env(generation=1), now=NOW)
    short = spool.put(_env(generation=2, expires=NOW + 30_000), now=NOW)
    assert long.shortened and long.expires == NOW + 60_000 and long.source_expires == FIELDS["expires"]
    assert not short.shortened and short.expires == NOW + 30_000
    assert spool.expire(now=NOW + 30_000) == [(short.id, "expired")]
    assert spool.expire(now=NOW + 60_000) == [(long.id, "hold time ended")]
    reasons = [json.loads(x)["event"] for x in (spool.root / "events.ndjson").read_text().splitlines()]
    assert reasons[-2:] == ["expired", "hold time ended"]


def test_critical_goes_first_and_failed_forwards_back_off_then_stick_without_being_dropped(tmp_path):
    spool = Spool(tmp_path / "spool", min_free=0)
    normal = spool.put(_env(generation=1, priority="normal"), now=NOW)
    high = spool.put(_env(generation=2, priority="high"), now=NOW)
    critical = spool.put(_env(generation=3, priority="critical", created=FIELDS["created"] + 5), now=NOW)
    assert [h.id for h in spool.due(now=NOW)] == [critical.id, high.id, normal.id]
    rng = random.Random(1)
    at = NOW
    for n in range(STUCK_AFTER):
        h = spool.failed(normal.id, "no route", now=at, rng=rng)
        assert normal.id not in [x.id for x in spool.due(now=at)]
        assert at + 5_000 * 2 ** min(n, 20) <= h.next_attempt or h.next_attempt - at >= 1_800_000
        at = h.next_attempt
    assert h.stuck and h.attempts == STUCK_AFTER and normal.id in spool.index       # kept until it expires
    assert spool.status(now=at)["stuck"] == 1
    assert normal.id in [x.id for x in spool.due(now=at)]


def test_a_crash_leaves_nothing_half_visible(tmp_path):
    spool = Spool(tmp_path / "spool", min_free=0)
    held = spool.put(_env(generation=1), now=NOW)
    (spool.envelopes / ".resync-tmp-abc123").write_bytes(b"half an envelope")     # killed mid-write
    orphan = E.parse(_env(generation=2))
    (spool.envelopes / orphan.id.hex()).write_bytes(orphan.to_bytes())   # killed between rename and record
    (spool.envelopes / ("ff" * 32 + ".json")).write_text("{}")           # a record whose envelope is gone
    bad = bytearray(_env(generation=3))
    bad[-1] ^= 1
    (spool.envelopes / E.parse(bytes(bad)).id.hex()).write_bytes(bytes(bad))   # damaged
    again = Spool(tmp_path / "spool", min_free=0)
    assert sorted(again.index) == sorted([held.id, orphan.id.hex()])
    assert _leftovers(again) == []
    assert sorted(p.name for p in again.envelopes.iterdir()) == sorted(
        [held.id, held.id + ".json", orphan.id.hex(), orphan.id.hex() + ".json"])


def test_the_spool_holds_no_plaintext_name_or_content(tmp_path):
    spool = Spool(tmp_path / "spool", min_free=0)
    secret = b"the quarterly figures: 1234567 EUR\n" * 100
    spool.put(_env(secret), now=NOW)
    for p in spool.root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"secret-module" not in data and b"payroll" not in data and b"quarterly figures" not in data, p


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_enospc_on_a_small_tmpfs_is_a_refusal_with_nothing_left(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        spool = Spool(mnt / "spool", min_free=0)
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        raw = _env(os.urandom(free - 2000))         # admitted (it fits), then the disk fills as it is written
        with pytest.raises(Refused) as r:
            spool.put(raw, now=NOW)
        assert r.value.reason == "storage depleted" and "filled while it was written" in str(r.value)
        assert spool.index == {} and _leftovers(spool) == [] and not any(spool.envelopes.iterdir())
        fits = spool.put(_env(b"small", generation=2), now=NOW)         # and it goes on
        assert spool.read(fits.id)
