"""The sealed envelope a relay carries (docs/relay.md has the layout and the
threat model): sans-I/O, bytes in and out.

An envelope has three parts:

- the **signed header**, immutable: the source's Ed25519 key, the
  destination's device hash, the ephemeral X25519 key of this envelope, an
  opaque tree id, the generation, the previous generation's hash, the base
  the payload was built against, priority, creation and expiry times, hop
  limit, the payload's length and BLAKE3 — signed by the source;
- the **hop part**, which relays change: hop count, previous node, age;
- the **payload**, encrypted end to end to the destination's exchange key
  (X25519 with the ephemeral key, HKDF-SHA256, then ChaCha20-Poly1305 in
  the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár,
  "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance",
  CRYPTO 2015: 64 KiB chunks, the nonce a chunk counter and a last-chunk
  flag, so a relay can neither reorder, drop nor truncate chunks unseen),
  each chunk's associated data the hash of the header's binding fields.
  Inside: the names (module, path) and what the payload is, then its bytes.

An envelope's id is the BLAKE3 of its signed header and payload — the bytes
no relay may change —, so one envelope has one id at every hop, whether it
was relayed or carried on a disk. A relay checks the signature and the
payload's hash (``verify``) without being able to read the payload; the
destination checks both again and opens it (``open_payload``).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace

from ..errors import ResyncError

MAGIC = b"RSENV1\0\0"
VERSION = 1
SIGN_CONTEXT = b"resync envelope v1\0"
KDF_INFO = b"resync envelope v1 payload key"
CHUNK = 64 << 10                         # plaintext bytes per encrypted chunk (the last may be shorter)
TAG = 16                                 # ChaCha20-Poly1305's tag per chunk
PRIORITIES = ("critical", "high", "normal")
MAX_HOPS = 255
MAX_INNER = 64 << 10                     # bytes of the encrypted inner header at most

# the signed header: version, source key, destination, ephemeral key, tree id, generation, previous
# generation hash, base, priority, created, expires (Unix ms), hop limit | payload length, payload BLAKE3
_BINDING = struct.Struct("<B32s32s32s16sQ32s32sBqqB")
_PAYLOAD = struct.Struct("<Q32s")
_HOPS = struct.Struct("<B32sQ")          # hop count, previous node (device hash, zeros: none), age (ms)
_LENGTH = struct.Struct("<I")
SIGNATURE = 64
SIGNED_SIZE = _BINDING.size + _PAYLOAD.size + SIGNATURE
HEAD_SIZE = len(MAGIC) + _LENGTH.size + SIGNED_SIZE + _LENGTH.size + _HOPS.size


class EnvelopeError(ResyncError):
    """invalid envelope: {}"""

    exit_code = 4


@dataclass(frozen=True)
class Header:
    """The signed header's fields (times in Unix milliseconds)."""

    source: bytes                        # the source's Ed25519 public key (its device ID: SHA-256 of it)
    destination: bytes                   # the destination's device hash (keys.device_hash)
    ephemeral: bytes                     # this envelope's X25519 public key
    tree: bytes                          # 16 bytes naming the (source, tree) pair, opaque to relays
    generation: int                      # 1, 2, ... per tree
    previous: bytes                      # the previous generation's id (zeros for the first)
    base: bytes                          # the state the payload was built against (the destination checks it)
    priority: str                        # critical, high or normal
    created: int
    expires: int
    hop_limit: int
    payload_length: int = 0
    payload_hash: bytes = bytes(32)

    def binding(self) -> bytes:
        """The fields a payload's chunks are bound to (all but its own length and hash)."""
        return _BINDING.pack(VERSION, self.source, self.destination, self.ephemeral, self.tree, self.generation,
                             self.previous, self.base, PRIORITIES.index(self.priority), self.created, self.expires,
                             self.hop_limit)

    def to_bytes(self) -> bytes:
        return self.binding() + _PAYLOAD.pack(self.payload_length, self.payload_hash)


@dataclass(frozen=True)
class Hops:
    """The part relays change: hops so far, the node it came from, and the
    milliseconds it has spent in custody so far (RFC 9171's hop count,
    previous node and bundle age blocks)."""

    count: int = 0
    previous: bytes = bytes(32)
    age: int = 0

    def to_bytes(self) -> bytes:
        return _HOPS.pack(self.count, self.previous, self.age)


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope: its ``header``, the exact ``signed`` bytes (header
    and signature), its ``hops`` and its ``payload`` (ciphertext)."""

    header: Header
    signed: bytes
    hops: Hops
    payload: bytes

    @property
    def id(self) -> bytes:
        """BLAKE3 of the signed header and the payload (32 bytes): the same at every hop."""
        import blake3
        h = blake3.blake3(self.signed)
        h.update(self.payload)
        return h.digest()

    def to_bytes(self) -> bytes:
        return b"".join((MAGIC, _LENGTH.pack(len(self.signed)), self.signed, _LENGTH.pack(_HOPS.size),
                         self.hops.to_bytes(), self.payload))


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=KDF_INFO).derive(shared)


def _nonce(n: int, last: bool) -> bytes:
    return struct.pack("<QB3x", n, 1 if last else 0)


def _binding_hash(header: Header) -> bytes:
    import blake3
    return blake3.blake3(header.binding()).digest()


def seal(identity, card, inner: dict, data: bytes, *, tree: bytes, generation: int, previous: bytes,
         base: bytes, priority: str, created: int, expires: int, hop_limit: int = 16, ephemeral=None) -> bytes:
    """An envelope from this device (``identity``: its device key signs) to
    the device of ``card`` (keys.Card: the payload is encrypted to its
    exchange key), carrying ``inner`` (a JSON object: the names, what the
    data is) and ``data``. ``ephemeral``: the X25519 private key to use (a
    test's fixed one; by default a new one). ValueError for a field out of
    range."""
    import blake3
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from .keys import key_hash
    if priority not in PRIORITIES or not 1 <= hop_limit <= MAX_HOPS or generation < 1 or expires <= created \
            or len(tree) != 16 or len(previous) != 32 or len(base) != 32:
        raise ValueError("an envelope field out of range")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    eph = ephemeral or x25519.X25519PrivateKey.generate()
    eph_public = eph.public_key().public_bytes(*raw)
    source = identity.private_key.public_key().public_bytes(*raw)
    header = Header(source, key_hash(card.signing), eph_public, tree, generation, previous, base, priority,
                    created, expires, hop_limit)
    key = _key(eph.exchange(x25519.X25519PublicKey.from_public_bytes(card.exchange)), eph_public, card.exchange)
    inner_bytes = json.dumps(inner, sort_keys=True).encode()
    if len(inner_bytes) > MAX_INNER:
        raise ValueError("the envelope's inner header is too large")
    plain = _LENGTH.pack(len(inner_bytes)) + inner_bytes + data
    aead, ad = ChaCha20Poly1305(key), _binding_hash(header)
    chunks = [plain[i:i + CHUNK] for i in range(0, len(plain), CHUNK)] or [b""]
    payload = b"".join(aead.encrypt(_nonce(n, n == len(chunks) - 1), chunk, ad) for n, chunk in enumerate(chunks))
    header = replace(header, payload_length=len(payload), payload_hash=blake3.blake3(payload).digest())
    body = header.to_bytes()
    signed = body + identity.sign(SIGN_CONTEXT + body)
    return Envelope(header, signed, Hops(), payload).to_bytes()


def parse(data: bytes) -> Envelope:
    """The parts of an envelope's bytes (nothing checked but their layout:
    ``verify`` checks the signature and the payload). EnvelopeError (exit 4)
    for anything malformed."""
    env = parse_head(bytes(memoryview(data)[:HEAD_SIZE]))
    view = memoryview(data)
    if len(view) - HEAD_SIZE != env.header.payload_length:
        raise EnvelopeError(f"{len(view) - HEAD_SIZE} payload bytes, the header says {env.header.payload_length}")
    return replace(env, payload=bytes(view[HEAD_SIZE:]))


def parse_head(head: bytes) -> Envelope:
    """An envelope's first HEAD_SIZE bytes — magic, signed header, hop part:
    what a relay is offered before the payload — as an Envelope whose
    payload is empty (``header.payload_length`` says how long it is).
    EnvelopeError for anything malformed."""
    view = memoryview(head)
    if len(view) != HEAD_SIZE or bytes(view[:len(MAGIC)]) != MAGIC:
        raise EnvelopeError("not a resync envelope (no RSENV1 magic, or too short)")
    pos = len(MAGIC)
    (signed_length,) = _LENGTH.unpack_from(view, pos)
    pos += _LENGTH.size
    if signed_length != SIGNED_SIZE:
        raise EnvelopeError(f"a signed header of {signed_length} bytes (version {view[pos]}?)")
    signed = bytes(view[pos:pos + SIGNED_SIZE])
    pos += SIGNED_SIZE
    (hops_length,) = _LENGTH.unpack_from(view, pos)
    pos += _LENGTH.size
    if hops_length != _HOPS.size:
        raise EnvelopeError(f"a hop part of {hops_length} bytes")
    count, previous, age = _HOPS.unpack_from(view, pos)
    pos += _HOPS.size
    fields = _BINDING.unpack_from(signed, 0)
    length, digest = _PAYLOAD.unpack_from(signed, _BINDING.size)
    version, source, destination, ephemeral, tree, generation, prev, base, priority, created, expires, limit = fields
    if version != VERSION:
        raise EnvelopeError(f"version {version} (this resync reads version {VERSION})")
    if priority >= len(PRIORITIES) or not 1 <= limit <= MAX_HOPS or generation < 1:
        raise EnvelopeError("a header field out of range")
    header = Header(source, destination, ephemeral, tree, generation, prev, base, PRIORITIES[priority], created,
                    expires, limit, length, digest)
    return Envelope(header, signed, Hops(count, previous, age), b"")


def verify_header(env: Envelope) -> None:
    """The source's signature over the header (what a relay checks when it
    is offered an envelope, before its payload). EnvelopeError."""
    from ..identity import verify_signature
    body, signature = env.signed[:-SIGNATURE], env.signed[-SIGNATURE:]
    if not verify_signature(env.header.source, signature, SIGN_CONTEXT + body):
        raise EnvelopeError("the source's signature does not match its header (changed on the way?)")


def verify(env: Envelope) -> None:
    """What a relay checks before taking custody, and the destination before
    opening: the source's signature over the header, and the payload's
    length and BLAKE3. EnvelopeError saying which failed."""
    import blake3
    verify_header(env)
    if len(env.payload) != env.header.payload_length or blake3.blake3(env.payload).digest() != env.header.payload_hash:
        raise EnvelopeError("the payload does not match its hash (changed on the way?)")


def open_payload(env: Envelope, exchange_key, card) -> tuple[dict, bytes]:
    """The inner header and data of an envelope to this device (``card``:
    its own, ``exchange_key``: its X25519 private key), after ``verify``.
    EnvelopeError if it is another device's, or its payload does not
    decrypt (every chunk authenticated, in order, the last marked last)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from .keys import key_hash
    verify(env)
    h = env.header
    if h.destination != key_hash(card.signing):
        raise EnvelopeError("it is sealed to another device")
    key = _key(exchange_key.exchange(x25519.X25519PublicKey.from_public_bytes(h.ephemeral)), h.ephemeral,
               card.exchange)
    aead, ad = ChaCha20Poly1305(key), _binding_hash(h)
    size = CHUNK + TAG
    count = max(1, -(-len(env.payload) // size))
    parts = []
    try:
        for n in range(count):
            parts.append(aead.decrypt(_nonce(n, n == count - 1), env.payload[n * size:(n + 1) * size], ad))
    except InvalidTag:
        raise EnvelopeError(f"chunk {n} of its payload does not decrypt (not sealed to this device's key, "
                            "or changed)") from None
    plain = b"".join(parts)
    if len(plain) < _LENGTH.size:
        raise EnvelopeError("its payload is shorter than its inner header")
    (inner_length,) = _LENGTH.unpack_from(plain)
    if inner_length > min(MAX_INNER, len(plain) - _LENGTH.size):
        raise EnvelopeError("its inner header's length is out of range")
    try:
        inner = json.loads(plain[_LENGTH.size:_LENGTH.size + inner_length])
    except ValueError:
        raise EnvelopeError("its inner header is not JSON") from None
    if not isinstance(inner, dict):
        raise EnvelopeError("its inner header is not a JSON object")
    return inner, plain[_LENGTH.size + inner_length:]


def rehop(env: Envelope, hops: Hops) -> bytes:
    """The envelope's bytes with its hop part replaced (a relay forwarding
    it): the signed header and payload — and so its id — unchanged."""
    if not 0 <= hops.count <= MAX_HOPS or len(hops.previous) != 32 or hops.age < 0:
        raise ValueError("a hop field out of range")
    return Envelope(env.header, env.signed, hops, env.payload).to_bytes()
