"""A sparse source file keeps its holes in a local mirror (cp's
--sparse=auto: the data runs found with SEEK_DATA / SEEK_HOLE are copied,
the rest stays a hole)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _sparse(path: Path, size: int, runs: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in runs:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _sync(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resync", "sync", "--no-history", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_holes_stay_holes_in_a_local_mirror(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    mib = 1 << 20
    runs = [(0, b"header " * 1000), (7 * mib + 123, b"\x00\x01" * 40_000), (63 * mib, os.urandom(mib))]
    _sparse(src / "disk.img", 64 * mib, runs)
    _sparse(src / "tail-hole.img", 8 * mib, [(0, b"x" * 5000)])                 # a hole to the end
    _sparse(src / "all-hole.img", 4 * mib, [])
    (src / "dense.bin").write_bytes(os.urandom(3 * mib) + bytes(mib))           # zeros written, not a hole
    if _allocated(src / "disk.img") >= 32 * mib:
        pytest.skip("this file system does not keep holes")
    r = _sync(src, dst)
    assert r.returncode == 0, r.stderr
    for name in ("disk.img", "tail-hole.img", "all-hole.img", "dense.bin"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
        assert (dst / name).stat().st_size == (src / name).stat().st_size
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + 2 * mib
    assert _allocated(dst / "tail-hole.img") <= 1 * mib
    assert _allocated(dst / "all-hole.img") <= 64 << 10
    assert _allocated(dst / "dense.bin") >= 4 * mib - (64 << 10)                 # copied whole, as it was
    (src / "disk.img").unlink()                                                   # changed: copied again,
    _sparse(src / "disk.img", 64 * mib, runs[:1] + [(40 * mib, b"new data" * 1000)])     # holes and all
    r = _sync(src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "disk.img").read_bytes() == (src / "disk.img").read_bytes()
    assert _allocated(dst / "disk.img") <= 2 * mib


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_holes_never_cross_the_wire_and_stay_holes(tmp_path, push):
    """Over the network (the protocol pumped in memory, a lossy channel): a
    sparse file's data runs travel, its holes do not; the destination's copy
    has the same holes (a 64 MiB image holding 1.1 MiB of data costs ~1.1 MiB
    of shards and of disk)."""
    import random

    from tests.protopump import Channel, make_pair, pump
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    mib = 1 << 20
    runs = [(0, b"header " * 1000), (7 * mib + 123, b"\x00\x01" * 40_000), (63 * mib, os.urandom(mib))]
    _sparse(src / "disk.img", 64 * mib, runs)
    _sparse(src / "all-hole.img", 4 * mib, [])
    if _allocated(src / "disk.img") >= 32 * mib:
        pytest.skip("this file system does not keep holes")
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root)
    pump(client, server, Channel(random.Random(4), loss=0.05, dup=0.01, jitter=0.01))
    assert client.error is None and server.error is None, (client.error, server.error)
    for name in ("disk.img", "all-hole.img"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + 2 * mib
    assert _allocated(dst / "all-hole.img") <= 64 << 10
    sender = client if push else server
    assert sender.stats["datagram_bytes_sent"] < 4 * mib            # not the 68 MiB of the files' sizes
