"""Measuring tools run inside a link's namespaces (tests/linkemu). Each prints one JSON line.

    probe.py sink PORT SECONDS                 UDP: count what arrives (sequence numbers, payload check)
    probe.py flood HOST PORT BITS_PER_S SECONDS SIZE   UDP: paced packets of SIZE payload bytes
    probe.py echo PORT SECONDS                 UDP: send every packet back
    probe.py ping HOST PORT COUNT INTERVAL     UDP: round-trip times (s) of COUNT probes
    probe.py tcp-sink PORT                     TCP: read one connection to its end
    probe.py tcp-send HOST PORT BYTES          TCP: send BYTES, report the rate
    probe.py tcp-send-for HOST PORT SECONDS    TCP: send for SECONDS, report bytes and rate
"""
from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import time

HEAD = struct.Struct("<Qd")             # sequence number, send time


def payload(seq: int, size: int) -> bytes:
    """SIZE bytes: the header, then a pattern derived from the sequence number
    (the sink recomputes it: a changed bit shows)."""
    body = hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=32).digest()
    head = HEAD.pack(seq, time.monotonic())
    return (head + body * (size // 32 + 1))[:size]


def sink(port: int, seconds: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    print(json.dumps({"listening": port}), flush=True)
    seen: set[int] = set()
    packets = dup = reordered = corrupt = nbytes = 0
    top = -1
    first = last = None
    arrivals = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = s.recv(65536)
        except socket.timeout:
            if packets and time.monotonic() - last > 1.0:
                break
            continue
        now = time.monotonic()
        first = first if first is not None else now
        last = now
        packets += 1
        nbytes += len(data)
        if len(data) < HEAD.size:
            continue
        seq = HEAD.unpack_from(data)[0]
        if data[HEAD.size:] != payload(seq, len(data))[HEAD.size:]:
            corrupt += 1
            continue
        if seq in seen:
            dup += 1
            continue
        if seq < top:
            reordered += 1
        top = max(top, seq)
        seen.add(seq)
        arrivals.append(seq)
    return {"packets": packets, "bytes": nbytes, "distinct": len(seen), "duplicates": dup, "reordered": reordered,
            "corrupt": corrupt, "first": first, "last": last, "seqs": sorted(seen)}


def flood(host: str, port: int, rate: float, seconds: float, size: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    gap = size * 8 / rate
    start = time.monotonic()
    seq = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        due = start + seq * gap
        if due > now:
            if due - now > 0.002:
                time.sleep(due - now - 0.001)
            continue
        try:
            s.sendto(payload(seq, size), (host, port))
        except OSError:
            pass
        seq += 1
    return {"sent": seq, "seconds": time.monotonic() - start}


def echo(port: int, seconds: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.5)
    print(json.dumps({"listening": port}), flush=True)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(65536)
        except socket.timeout:
            continue
        s.sendto(data, addr)
        n += 1
    return {"echoed": n}


def ping(host: str, port: int, count: int, interval: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    sent: dict[int, float] = {}
    rtts: dict[int, float] = {}
    start = time.monotonic()
    seq = 0
    while seq < count or time.monotonic() - sent.get(count - 1, time.monotonic()) < 2.0:
        now = time.monotonic()
        if seq < count and now >= start + seq * interval:
            s.sendto(struct.pack("<Q", seq), (host, port))
            sent[seq] = now
            seq += 1
        try:
            data = s.recv(64)
        except socket.timeout:
            continue
        n = struct.unpack_from("<Q", data)[0]
        if n in sent and n not in rtts:
            rtts[n] = time.monotonic() - sent[n]
        if len(rtts) == count:
            break
    return {"sent": count, "rtts": [rtts[n] for n in sorted(rtts)]}


def tcp_sink(port: int) -> dict:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = srv.accept()
    h = hashlib.blake2b()
    n = 0
    while data := conn.recv(1 << 20):
        h.update(data)
        n += len(data)
    return {"bytes": n, "digest": h.hexdigest()}


def tcp_send(host: str, port: int, nbytes: int) -> dict:
    block = hashlib.blake2b(b"tcp").digest() * (65536 // 64)
    h = hashlib.blake2b()
    c = socket.create_connection((host, port), timeout=30)
    start = time.monotonic()
    left = nbytes
    while left:
        chunk = block[:min(left, len(block))]
        c.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)                            # the sink closes once it has everything
    seconds = time.monotonic() - start
    return {"bytes": nbytes, "seconds": seconds, "digest": h.hexdigest(), "mbit": nbytes * 8 / seconds / 1e6}


def tcp_send_for(host: str, port: int, seconds: float) -> dict:
    block = hashlib.blake2b(b"tcp").digest() * (65536 // 64)
    c = socket.create_connection((host, port), timeout=30)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        c.sendall(block)
        n += len(block)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    dt = time.monotonic() - start
    return {"bytes": n, "seconds": dt, "mbit": n * 8 / dt / 1e6}


def main(argv: list[str]) -> None:
    what, args = argv[0], argv[1:]
    if what == "sink":
        out = sink(int(args[0]), float(args[1]))
    elif what == "flood":
        out = flood(args[0], int(args[1]), float(args[2]), float(args[3]), int(args[4]))
    elif what == "echo":
        out = echo(int(args[0]), float(args[1]))
    elif what == "ping":
        out = ping(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif what == "tcp-sink":
        out = tcp_sink(int(args[0]))
    elif what == "tcp-send-for":
        out = tcp_send_for(args[0], int(args[1]), float(args[2]))
    elif what == "tcp-send":
        out = tcp_send(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown probe {what}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
