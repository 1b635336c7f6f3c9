"""A device's exchange key (X25519, for envelopes sealed to it) and its card,
which binds that key to the device key.

Signing and encryption use separate keys (as NNCP's exchange and signing
keys, and age's X25519 recipients): the exchange key is made once beside the
device key (``exchange-key.pem``, mode 0600). A *card* is what a source needs
to seal envelopes to a device: ``CARD_MAGIC | Ed25519 public key (32) |
X25519 public key (32) | Ed25519 signature (64)`` of ``CARD_CONTEXT`` and the
X25519 key; it is checked against the device ID the source pins (the device
ID is the SHA-256 of the Ed25519 key), so a card may travel any way — a
relay, a USB stick, an e-mail — without being trusted. ``resync id --card``
prints this device's, base64 in one line.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..identity import IdentityError, config_dir, device_id

CARD_MAGIC = b"RSCARD1\0"
CARD_CONTEXT = b"resync exchange key v1\0"
CARD_SIZE = len(CARD_MAGIC) + 32 + 32 + 64
KEY_FILE = "exchange-key.pem"


class BadCard(IdentityError):
    """not a valid card: {}"""

    exit_code = 2


@dataclass(frozen=True)
class Card:
    """A device's public keys: ``signing`` (Ed25519, its device key) and
    ``exchange`` (X25519), the latter signed by the former."""

    signing: bytes
    exchange: bytes
    signature: bytes

    @property
    def device_id(self) -> str:
        return device_id(self.signing)

    def to_bytes(self) -> bytes:
        return CARD_MAGIC + self.signing + self.exchange + self.signature

    def text(self) -> str:
        """The card as one line of base64 (``resync id --card``)."""
        return base64.b64encode(self.to_bytes()).decode()


def load_exchange_key(directory: Path | None = None, create: bool = False):
    """This device's X25519 private key (cryptography's X25519PrivateKey)
    from ``directory`` (default: config_dir()), made there first if
    ``create``. IdentityError if it is missing (and not ``create``),
    unreadable, readable by others, or not an X25519 key."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    from ..identity import private_key
    return private_key((directory or config_dir()) / KEY_FILE, x25519.X25519PrivateKey, create,
                       "no exchange key yet (run `resync id --card` to make one)")


def make_card(identity, exchange_key) -> Card:
    """This device's card: its device key's public half, its exchange key's,
    and the device key's signature binding them."""
    from cryptography.hazmat.primitives import serialization
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    signing = identity.private_key.public_key().public_bytes(*raw)
    exchange = exchange_key.public_key().public_bytes(*raw)
    return Card(signing, exchange, identity.sign(CARD_CONTEXT + exchange))


def parse_card(data: bytes | str, expect: str | None = None) -> Card:
    """A card from its bytes or its base64 line, its signature checked, and
    (``expect``: a device ID) that it is that device's. BadCard (exit 2)
    otherwise, saying which."""
    from ..identity import parse_device_id, verify_signature
    if isinstance(data, str):
        try:
            data = base64.b64decode("".join(data.split()), validate=True)
        except ValueError:
            raise BadCard("not base64") from None
    if len(data) != CARD_SIZE or not data.startswith(CARD_MAGIC):
        raise BadCard(f"{len(data)} bytes, expected {CARD_SIZE} starting {CARD_MAGIC!r}")
    body = data[len(CARD_MAGIC):]
    card = Card(bytes(body[:32]), bytes(body[32:64]), bytes(body[64:]))
    if not verify_signature(card.signing, card.signature, CARD_CONTEXT + card.exchange):
        raise BadCard(f"its signature does not match its device key ({card.device_id})")
    if expect is not None and card.device_id != parse_device_id(expect):
        raise BadCard(f"it is device {card.device_id}'s, not {parse_device_id(expect)}'s")
    return card


def device_hash(device: str) -> bytes:
    """The 32 bytes a device ID stands for (the SHA-256 of its key), from the
    ID's text: what an envelope names its destination and previous node by."""
    from ..identity import parse_device_id
    clean = parse_device_id(device).replace("-", "")
    raw = "".join(clean[i:i + 13] for i in range(0, 56, 14))         # (the check characters dropped)
    return base64.b32decode(raw + "====")[:32]


def key_hash(signing: bytes) -> bytes:
    """The 32 bytes of the device ID of Ed25519 key ``signing``."""
    return hashlib.sha256(signing).digest()
