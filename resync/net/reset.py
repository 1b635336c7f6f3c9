"""Stateless reset (RFC 9000 section 10.3), which aioquic 1.x leaves out.

A server that restarts has lost its connections; a client still sending on
one got no answer and waited out its idle timeout (60 s) before it retried.
With stateless reset the new server process answers a packet of a connection
it does not know with a short packet ending in that connection ID's reset
token, and the client, which holds the token from the handshake, ends the
connection at once (and retries: resync.net.client).

The token of a connection ID is HMAC-SHA-256(key, connection ID), first 16
bytes, with a key derived from the device key (an Ed25519 signature of a
fixed context: deterministic, so the same after a restart; unknowable without
the private key, so nobody else can reset this server's connections). The
server gives its connection IDs these tokens (the handshake's transport
parameter and NEW_CONNECTION_ID frames) instead of aioquic's random ones.

A reset is smaller than the packet that caused it (at most 43 bytes, at
least 21: section 10.3's size rules), so two endpoints cannot loop or
amplify, and at most RESETS_PER_SECOND are sent.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time

TOKEN = 16                        # bytes (RFC 9000 section 10.3)
MIN_RESET = 21                    # bytes: 5 of an unpredictable start and the token
MAX_RESET = 43                    # bytes: like a short 1-RTT packet (section 10.3 recommends one that looks so)
RESETS_PER_SECOND = 100           # at most (a reset costs a packet: no reflector for spoofed floods)
CID_LENGTH = 8                    # aioquic's connection IDs (QuicConfiguration.connection_id_length)


class StatelessReset:
    """Tokens for this device's connection IDs, and reset packets."""

    def __init__(self, identity):
        self._key = hashlib.sha256(identity.sign(b"resync stateless reset key v1")).digest()
        self._window, self._sent = 0.0, 0

    def token(self, cid: bytes) -> bytes:
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:TOKEN]

    def adopt(self, quic) -> None:
        """Give a server-side QuicConnection's connection IDs, those it has
        and those it issues later, the tokens of this key (replacing
        aioquic's random ones before any is sent)."""
        for c in quic._host_cids:
            c.stateless_reset_token = self.token(c.cid)
        replenish = quic._replenish_connection_ids

        def replenish_with_tokens() -> None:
            replenish()
            for c in quic._host_cids:
                if not c.was_sent:
                    c.stateless_reset_token = self.token(c.cid)
        quic._replenish_connection_ids = replenish_with_tokens

    def packet(self, datagram: bytes) -> bytes | None:
        """The reset answering ``datagram`` (a short-header packet whose
        connection ID this server does not know), or None: not a short
        header, too small to answer with something smaller, or over the
        rate."""
        if len(datagram) < 1 + CID_LENGTH + MIN_RESET or datagram[0] & 0xC0 != 0x40:
            return None
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._sent = now, 0
        if self._sent >= RESETS_PER_SECOND:
            return None
        self._sent += 1
        size = min(len(datagram) - 1, MAX_RESET)
        start = bytearray(os.urandom(size - TOKEN))
        start[0] = 0x40 | (start[0] & 0x3F)            # looks like a short header (fixed bit set)
        return bytes(start) + self.token(datagram[1:1 + CID_LENGTH])


def peer_tokens(quic) -> set[bytes]:
    """The reset tokens a client holds for the server's connection IDs."""
    cids = [quic._peer_cid, *getattr(quic, "_peer_cid_available", [])]
    return {c.stateless_reset_token for c in cids if getattr(c, "stateless_reset_token", None)}


def is_reset(datagram: bytes, tokens: set[bytes]) -> bool:
    """Whether ``datagram`` is a stateless reset carrying one of ``tokens``
    (a real packet ends in its AEAD tag: 2^-128 of matching by chance)."""
    return len(datagram) >= MIN_RESET and datagram[0] & 0xC0 == 0x40 and datagram[-TOKEN:] in tokens
