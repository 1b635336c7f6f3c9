"""Store-and-forward relays (docs/relay.md): what a relay carries is a sealed
envelope (``envelope``) — signed by its source, encrypted end to end to its
destination device, identified by the BLAKE3 of the bytes no relay may
change — whose destination's encryption key is bound to its device key by a
card (``keys``)."""
