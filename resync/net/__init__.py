"""The only code with sockets and event loops: resync's protocol sessions
(``resync.protocol``) carried over QUIC by aioquic — the control stream, shard
datagrams, the rate controller, the server (``resync serve``) and the client
(``resync sync`` to or from a ``resync://`` URL)."""
DEFAULT_PORT = 8730
ALPN = "resync/1"
