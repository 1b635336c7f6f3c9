#!/usr/bin/env python3
"""The baseline for bench_net.py: the same bytes over one raw aioquic stream.

    python bench/quic_raw.py serve PORTFILE [HOST]   # prints nothing; writes its port to PORTFILE
    python bench/quic_raw.py send [HOST:]PORT FILE...  # one stream, the files' bytes back to back
    python bench/quic_raw.py send [HOST:]PORT @LIST  # the files named in LIST, each path ended by a NUL

HOST is 127.0.0.1 unless given (bench_wan.py runs the two ends in network
namespaces joined by an emulated link).

The server reads the stream to its end (discarding the bytes), answers one
byte, and the sender prints a JSON line: bytes, seconds, goodput (Mbit/s),
UDP payload bytes both ways. Same QUIC settings as resync's link
(max_datagram_size 1350, 64 MiB flow-control windows) but aioquic's own
congestion control (Reno) and no parity: what aioquic itself moves.
"""
import asyncio
import json
import os
import ssl
import sys
import tempfile
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

ALPN = "quic-raw-bench"
MDS = 1350
WINDOW = 64 << 20
CHUNK = 1 << 20
BUFFERED = 8 << 20


def _certificate(tmp: str):
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cp, kp = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cp, kp


class Counting(QuicConnectionProtocol):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.udp_in = self.udp_out = 0
        self.received = 0
        self.done = asyncio.Event()

    def connection_made(self, transport):
        outer = self

        class T:
            def sendto(self, data, addr=None):
                outer.udp_out += len(data)
                transport.sendto(data, addr)

            def __getattr__(self, name):
                return getattr(transport, name)
        super().connection_made(T())

    def datagram_received(self, data, addr):
        self.udp_in += len(data)
        super().datagram_received(data, addr)

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self.received += len(event.data)
            if event.end_stream:
                if self._quic._is_client:
                    self.done.set()
                else:
                    self._quic.send_stream_data(event.stream_id, b"k", end_stream=True)
                    self.transmit()


def config(is_client: bool) -> QuicConfiguration:
    c = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], max_datagram_size=MDS,
                          max_data=WINDOW, max_stream_data=WINDOW, idle_timeout=60)
    if is_client:
        c.verify_mode = ssl.CERT_NONE
    return c


async def run_server(portfile: str, host: str = "127.0.0.1") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        c = config(False)
        c.load_cert_chain(*_certificate(tmp))
        server = await serve(host, 0, configuration=c, create_protocol=Counting)
        port = server._transport.get_extra_info("sockname")[1]
        with open(portfile + ".tmp", "w") as f:
            f.write(str(port))
        os.rename(portfile + ".tmp", portfile)
        await asyncio.Event().wait()


async def run_sender(port: int, files: list[str], host: str = "127.0.0.1") -> dict:
    async with connect(host, port, configuration=config(True), create_protocol=Counting) as link:
        quic = link._quic
        sid = quic.get_next_available_stream_id()
        total = 0
        t = time.perf_counter()
        for path in files:
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    while len(quic._streams[sid].sender._buffer) > BUFFERED if sid in quic._streams else False:
                        await asyncio.sleep(0.0005)
                    quic.send_stream_data(sid, chunk)
                    link.transmit()
                    total += len(chunk)
        quic.send_stream_data(sid, b"", end_stream=True)
        link.transmit()
        await link.done.wait()
        dt = time.perf_counter() - t
        return {"bytes": total, "seconds": dt, "goodput_mbit": total * 8 / dt / 1e6,
                "udp_bytes_sent": link.udp_out, "udp_bytes_received": link.udp_in}


def main() -> None:
    if sys.argv[1] == "serve":
        asyncio.run(run_server(sys.argv[2], *sys.argv[3:4]))
    else:
        host, _, port = sys.argv[2].rpartition(":")
        files = sys.argv[3:]
        if len(files) == 1 and files[0].startswith("@"):          # @LIST: paths, each ended by a NUL
            with open(files[0][1:], "rb") as f:
                files = [os.fsdecode(p) for p in f.read().split(b"\0") if p]
        print(json.dumps(asyncio.run(run_sender(int(port), files, host or "127.0.0.1"))))


if __name__ == "__main__":
    main()
