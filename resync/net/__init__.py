"""The only code with sockets and event loops: resync's protocol sessions
(``resync.protocol``) carried over QUIC by aioquic — the control stream, shard
datagrams, the rate controller — or over TLS 1.3 on TCP (``tcp``: clean
short paths), the server (``resync serve``) and the client (``resync sync``
to or from a ``resync://`` URL)."""
DEFAULT_PORT = 8730
ALPN = "resync/1"


def transfer_row(result: dict, transport: dict, peer: str, peer_id: str | None, role: str) -> dict:
    """A network run's row of the history's ``transfers`` table
    (store.schema.TRANSFER_COLUMNS) from the session's statistics
    (``result``: the receiver's, with the sender's counters) and the link's
    (``transport``: link.SessionLink.transport_stats)."""
    return {"peer": peer, "peer_id": peer_id, "role": role,
            **{k: transport.get(k) for k in ("udp_bytes_sent", "udp_bytes_received", "udp_packets_sent",
                                             "udp_packets_received", "packets_lost", "rtt_ms")},
            "shards_sent": result.get("datagrams_sent"), "shards_received": result.get("datagrams_received"),
            "path_mtu": transport.get("path_mtu"),
            **{k: transport.get(k) for k in ("transport", "tcp_bytes_sent", "tcp_bytes_received", "tcp_retransmits")},
            **{k: result.get(k) for k in ("repair_shards", "repairs_asked", "probes", "corrupt_shards", "parity",
                                          "loss_estimate", "resumed_bytes", "stripes", "stripes_repaired",
                                          "transfer_id", "attempts")}}
