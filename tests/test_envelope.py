"""The relay's sealed envelope (resync.relay.envelope) and the cards that
bind a device's exchange key to its device key (resync.relay.keys): round
trips over realistic payloads, golden bytes, every part tampered with, fuzz."""
from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resync.identity import Identity, device_id, load_identity
from resync.relay import envelope as E
from resync.relay.keys import BadCard, device_hash, load_exchange_key, make_card, parse_card

from . import mix


def _fixed_identity(seed: int) -> Identity:
    """An Identity with a key made from ``seed`` (golden bytes need the same keys each run)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"device %d" % seed).digest())
    return Identity(None, None, key, None)


def _fixed_x25519(seed: int):
    from cryptography.hazmat.primitives.asymmetric import x25519
    return x25519.X25519PrivateKey.from_private_bytes(hashlib.sha256(b"x25519 %d" % seed).digest())


SOURCE, DEST = _fixed_identity(1), _fixed_identity(2)
DEST_X = _fixed_x25519(2)
DEST_CARD = make_card(DEST, DEST_X)
FIELDS = dict(tree=bytes(range(16)), generation=3, previous=b"\x11" * 32, base=b"\x22" * 32, priority="high",
              created=1_796_000_000_000, expires=1_796_600_000_000, hop_limit=8)


def _seal(data: bytes, inner=None, **over) -> bytes:
    return E.seal(SOURCE, DEST_CARD, inner if inner is not None else {"module": "backup", "path": "photos/2026"},
                  data, **{**FIELDS, **over})


def _payloads():
    """A realistic mix (text, runs of zeros, repeated blocks, random, empty),
    at the chunk boundaries too."""
    rng = random.Random(5)
    out = [b"", b"x", b"photos/2026/ \xe9t\xe9.txt\n" * 40, bytes(E.CHUNK), bytes(E.CHUNK - 57),
           bytes(rng.randrange(256) for _ in range(E.CHUNK + 1))]
    out.append(mix.data(4, 3 * E.CHUNK + 123, "mixed"))
    return out


@pytest.mark.parametrize("n", range(7))
def test_an_envelope_opens_to_what_was_sealed_and_only_at_its_destination(n):
    data = _payloads()[n]
    raw = _seal(data)
    env = E.parse(raw)
    E.verify(env)
    assert env.to_bytes() == raw
    inner, out = E.open_payload(env, DEST_X, DEST_CARD)
    assert (inner, out) == ({"module": "backup", "path": "photos/2026"}, data)
    h = env.header
    assert (h.generation, h.priority, h.hop_limit, h.tree) == (3, "high", 8, FIELDS["tree"])
    assert h.destination == device_hash(device_id(DEST_CARD.signing))
    other = _fixed_identity(3)
    other_x = _fixed_x25519(3)
    with pytest.raises(E.EnvelopeError, match="another device"):
        E.open_payload(env, other_x, make_card(other, other_x))
    with pytest.raises(E.EnvelopeError, match="does not decrypt"):      # the right name, the wrong key
        E.open_payload(env, other_x, DEST_CARD)


def test_golden_bytes():
    """The format does not drift: fixed keys give these bytes (Ed25519 and
    ChaCha20-Poly1305 are deterministic)."""
    raw = _seal(b"golden payload\n" * 3, ephemeral=_fixed_x25519(9))
    env = E.parse(raw)
    assert raw[:12].hex() == "5253454e5631000033010000"        # magic, a signed header of 307 bytes
    assert env.id.hex() == GOLDEN_ID
    assert len(raw) == GOLDEN_LENGTH


GOLDEN_ID = "d204fb5ff8338a0ec69aa73a8f10b3c120cae698a5c8eed49e49434634f14804"
GOLDEN_LENGTH = 472


def test_a_relay_changes_the_hop_part_only_and_the_id_stays():
    env = E.parse(_seal(b"data" * 1000))
    moved = E.parse(E.rehop(env, E.Hops(2, device_hash(device_id(SOURCE.private_key.public_key().public_bytes(
        *_raw()))), 5000)))
    E.verify(moved)
    assert moved.id == env.id and moved.hops.count == 2 and moved.hops.age == 5000
    assert E.open_payload(moved, DEST_X, DEST_CARD)[1] == b"data" * 1000


def _raw():
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.Raw, serialization.PublicFormat.Raw


def test_a_byte_changed_in_the_signed_header_or_the_payload_is_refused():
    raw = _seal(mix.data(1, 200_000, "mixed"))
    start = len(E.MAGIC) + 4
    regions = {"header": range(start, start + E.SIGNED_SIZE - E.SIGNATURE),
               "signature": range(start + E.SIGNED_SIZE - E.SIGNATURE, start + E.SIGNED_SIZE),
               "payload": range(E.HEAD_SIZE, len(raw))}
    rng = random.Random(2)
    for name, where in regions.items():
        for _ in range(40):
            i = rng.choice(where)
            bad = bytearray(raw)
            bad[i] ^= 1 << rng.randrange(8)
            with pytest.raises(E.EnvelopeError):
                env = E.parse(bytes(bad))               # (a field out of range: refused as it is read)
                E.verify(env)
    # the hop part is not signed: a changed hop count is taken (the id says it is the same envelope)
    bad = bytearray(raw)
    bad[start + E.SIGNED_SIZE + 4] = 7
    env = E.parse(bytes(bad))
    E.verify(env)
    assert env.hops.count == 7 and env.id == E.parse(raw).id


def test_chunks_cut_reordered_or_dropped_do_not_open_even_re_signed():
    """A payload's chunks are bound in order, the last marked last: even the
    source's own key signing a header over a shortened payload (a relay
    cannot, but a stolen or confused source might) does not make it open."""
    import blake3
    from dataclasses import replace
    data = mix.data(3, 3 * E.CHUNK, "random")
    env = E.parse(_seal(data))
    size = E.CHUNK + E.TAG
    chunks = [env.payload[i:i + size] for i in range(0, len(env.payload), size)]
    for payload in (b"".join(chunks[:-1]), b"".join([chunks[1], chunks[0], *chunks[2:]])):
        header = replace(env.header, payload_length=len(payload), payload_hash=blake3.blake3(payload).digest())
        body = header.to_bytes()
        forged = E.Envelope(header, body + SOURCE.sign(E.SIGN_CONTEXT + body), env.hops, payload)
        E.verify(forged)
        with pytest.raises(E.EnvelopeError, match="does not decrypt"):
            E.open_payload(forged, DEST_X, DEST_CARD)


def test_fields_out_of_range_are_refused_when_sealing():
    for over in ({"priority": "urgent"}, {"hop_limit": 0}, {"generation": 0}, {"expires": FIELDS["created"]},
                 {"tree": b"short"}):
        with pytest.raises(ValueError):
            _seal(b"x", **over)


_FUZZED = _seal(b"fuzz" * 100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 2000), st.binary(max_size=8))
def test_fuzzed_envelopes_give_only_envelope_errors(junk, cut, splice):
    raw = _FUZZED
    for data in (junk, raw[:cut], raw[:cut] + splice + raw[cut + len(splice):], E.MAGIC + junk):
        try:
            env = E.parse(data)
            E.verify(env)
            E.open_payload(env, DEST_X, DEST_CARD)
        except E.EnvelopeError:
            pass


def test_a_card_binds_the_exchange_key_and_names_its_device(tmp_path):
    identity = load_identity(tmp_path, create=True)
    key = load_exchange_key(tmp_path, create=True)
    assert (tmp_path / "exchange-key.pem").stat().st_mode & 0o777 == 0o600
    card = make_card(identity, key)
    again = parse_card(card.text(), expect=identity.device_id)
    assert again == card and again.device_id == identity.device_id
    assert load_exchange_key(tmp_path).private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(BadCard, match="not .*'s"):
        parse_card(card.to_bytes(), expect=device_id(b"\x01" * 32))
    bad = bytearray(card.to_bytes())
    bad[-70] ^= 1                                       # the exchange key swapped under its signature
    with pytest.raises(BadCard, match="signature"):
        parse_card(bytes(bad))
    for text in ("not base64!", "AAAA"):
        with pytest.raises(BadCard):
            parse_card(text)
    assert device_hash(identity.device_id) == hashlib.sha256(card.signing).digest()


def test_id_card_prints_a_card_of_this_device(tmp_path):
    import subprocess
    import sys
    run = [sys.executable, "-m", "resync", "id", "--config-dir", str(tmp_path)]
    card = subprocess.run(run + ["--card"], capture_output=True, text=True, check=True).stdout
    me = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    assert card.count("\n") == 1 and parse_card(card, expect=me).device_id == me
    again = subprocess.run(run + ["--card"], capture_output=True, text=True, check=True).stdout
    assert again == card                                # the exchange key is made once
    both = subprocess.run(run + ["--card", "--rotate"], capture_output=True, text=True)
    assert both.returncode == 2 and "one at a time" in both.stderr
