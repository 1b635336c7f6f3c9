"""The only code with sockets and event loops: resync's protocol sessions
(``resync.protocol``) carried over QUIC by aioquic — the control stream, shard
datagrams, the rate controller — or over TLS 1.3 on TCP (``tcp``: clean
short paths), the server (``resync serve``) and the client (``resync sync``
to or from a ``resync://`` URL)."""
import sys
import types

DEFAULT_PORT = 8730
ALPN = "resync/1"


class _Deferred(types.ModuleType):
    """Stands in sys.modules for a module not loaded yet (see defer_import)."""

    def __getattr__(self, attr: str):
        real = self.__dict__.get("_real")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            import importlib
            real = self._real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Make ``import name`` cheap: a stand-in module is registered now, and
    the real one is imported on the first access to one of its attributes
    (through the stand-in, which forwards every access to it). Nothing
    happens if it is imported already or not installed. (Not
    importlib.util.LazyLoader: on Python 3.11 the import statement itself
    reads the module's ``__spec__``, which makes a lazy module load.)

    For aioquic's ``import service_identity`` (45 ms of every QUIC run's
    start here: attrs classes, pyOpenSSL), which aioquic uses only to check
    a certificate against a host name — never asked for by resync, whose
    client pins the server's key (client.pinned_certificate)."""
    import importlib.util
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    sys.modules[name] = _Deferred(name)


def warm_up() -> None:
    """Load now what a transfer over QUIC would load once it runs (~0.07 s
    here: NumPy, LZ4, BLAKE3, the delta and apply code, the native kernels if
    built; a build is left to the first use). A server does it before it
    listens; a client while its first handshake packet crosses the path
    (the round trip hides it)."""
    import blake3  # noqa: F401
    import lz4.block  # noqa: F401
    import numpy  # noqa: F401

    from .. import apply, delta, patch, signature  # noqa: F401
    from ..kernels import native
    if native.mode() == "native" and native.library_path().exists():
        for name in native.EXPORTS:
            if native.supported(name):
                native.get(name)


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
