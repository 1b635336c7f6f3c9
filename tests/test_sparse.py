"""Sparse files: a source's holes stay holes (cp's --sparse=auto: the data
runs found with SEEK_DATA / SEEK_HOLE are copied, the rest stays a hole) in
a local mirror, through a delta, in a bundle and over the network; with -S
(rsync's --sparse) blocks of zeros become holes too. Holes never travel as
bytes: not on the wire, not in a bundle."""
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


# -- the zero-block scan (fs.nonzero_runs) against the byte-by-byte reference -------

def _zero_mix(rng, n: int) -> bytes:
    """Runs of zeros (some block-sized and aligned, some not) between text,
    single stray bytes and random data."""
    out = bytearray()
    while len(out) < n:
        kind = rng.random()
        if kind < 0.45:
            out += bytes(rng.choice([1, 7, 4095, 4096, 8192, 3 * 4096 + 5, 20_000]))
        elif kind < 0.7:
            out += b"line of text %d\n" % rng.randrange(10**6)
        elif kind < 0.8:
            out += b"\x01"
        else:
            out += rng.randbytes(rng.randrange(1, 6000))
    return bytes(out[:n])


@pytest.mark.parametrize("seed", range(12))
def test_nonzero_runs_match_the_reference(seed):
    import random

    from resync.fs import nonzero_runs
    from tests import naive
    rng = random.Random(seed)
    for _ in range(20):
        data = _zero_mix(rng, rng.randrange(0, 60_000))
        offset = rng.choice([0, 1, 4095, 4096, rng.randrange(1 << 40)])
        block = rng.choice([64, 512, 4096])
        assert nonzero_runs(data, offset, block) == naive.nonzero_runs(data, offset, block)
    assert nonzero_runs(b"", 0) == [] and nonzero_runs(bytes(1 << 20), 0) == []


def test_pwrite_sparse_leaves_zeros_unwritten(tmp_path):
    from resync.fs import pwrite_sparse
    mib = 1 << 20
    data = b"x" * 100 + bytes(4 * mib) + b"tail" + bytes(mib)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_sparse(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    if _allocated(path) >= 2 * mib:
        pytest.skip("this file system does not keep holes")
    assert _allocated(path) <= 64 << 10


# -- through a delta, with -S, in bundles --------------------------------------------

def _image(path: Path, mib: int, marks: list[tuple[int, bytes]]) -> None:
    _sparse(path, mib << 20, marks)


def _disk_image(path: Path, marks: list | None = None) -> list:
    """A 32 MiB image holding ~1.1 MiB of data (``marks``, or new ones:
    returned); the test is skipped where the file system keeps no holes."""
    mib = 1 << 20
    marks = marks or [(0, b"boot" * 2000), (9 * mib, os.urandom(mib)), (30 * mib, b"log line\n" * 5000)]
    _image(path, 32, marks)
    if _allocated(path) >= 16 * mib:
        pytest.skip("this file system does not keep holes")
    return marks


def _edit(path: Path) -> None:
    """A few bytes changed in the image's data."""
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"changed" * 100, (9 << 20) + 5000)
    os.close(fd)


def test_holes_stay_holes_through_a_local_delta(tmp_path):
    """An updated sparse image rebuilt from the old copy (--no-whole-file):
    the result keeps its holes (a delta's zeros are written as holes when the
    source has holes)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _disk_image(src / "disk.img")
    assert _sync(src, dst).returncode == 0
    _edit(src / "disk.img")
    r = _sync("--no-whole-file", "-i", src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "disk.img").read_bytes() == (src / "disk.img").read_bytes()
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + (256 << 10)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "delta"])
def test_dash_s_turns_zeros_into_holes_locally(tmp_path, whole):
    """-S: a dense file with long runs of zeros (written, not holes) is
    copied with holes where its zeros were; small files too."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    mib = 1 << 20
    dense = b"header" + bytes(8 * mib) + os.urandom(mib) + bytes(4 * mib)
    (src / "dense.img").write_bytes(dense)
    (src / "small").write_bytes(b"a" * 10 + bytes(64 << 10) + b"b")
    if not whole:
        (dst).mkdir()
        (dst / "dense.img").write_bytes(b"old" + bytes(13 * mib))
        (dst / "small").write_bytes(b"old")
    r = _sync("-S", *(() if whole else ("--no-whole-file",)), src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "dense.img").read_bytes() == dense
    assert (dst / "small").read_bytes() == (src / "small").read_bytes()
    if _allocated(dst / "dense.img") >= 13 * mib:
        pytest.skip("this file system does not keep holes")
    assert _allocated(dst / "dense.img") <= mib + (64 << 10)
    assert _allocated(dst / "small") <= 16 << 10


def _cli(*args, history: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resync", *map(str, args), *(("--no-history",) if history else ())],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dash_s", [False, True], ids=["holes", "dash-S"])
def test_holes_in_a_bundle_are_not_stored_and_unpack_as_holes(tmp_path, dash_s):
    """A bundle of a 64 MiB image holding ~1 MiB of data (and, with -S, a
    dense 16 MiB file of zeros) stores neither holes nor zeros; unpacked,
    the files are identical with their holes. An update packed against the
    first tree (a delta record) keeps the holes too."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    mib = 1 << 20
    marks = [(0, b"header " * 1000), (7 * mib + 123, b"\x00\x01" * 40_000), (63 * mib, os.urandom(mib))]
    _image(src / "disk.img", 64, marks)
    if _allocated(src / "disk.img") >= 32 * mib:
        pytest.skip("this file system does not keep holes")
    if dash_s:
        (src / "zeros.bin").write_bytes(bytes(16 * mib) + b"end")
    flag = ("-S",) if dash_s else ()
    r = _cli("pack", src, "-o", tmp_path / "full.bundle", *flag)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "full.bundle").stat().st_size < 3 * mib         # not 64 (or 80) MiB, nor LZ4's share
    assert _cli("unpack", tmp_path / "full.bundle", dst).returncode == 0
    for name in ("disk.img",) + (("zeros.bin",) if dash_s else ()):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + 2 * mib
    if dash_s:
        assert _allocated(dst / "zeros.bin") <= 64 << 10
    assert _cli("signature-tree", dst, "-o", tmp_path / "dst.sig", history=False).returncode == 0
    fd = os.open(src / "disk.img", os.O_WRONLY)
    os.pwrite(fd, b"changed" * 100, 63 * mib + 5000)
    os.close(fd)
    r = _cli("pack", src, "--against", tmp_path / "dst.sig", "-o", tmp_path / "update.bundle", *flag)
    assert r.returncode == 0, r.stderr
    r = _cli("unpack", tmp_path / "update.bundle", dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "disk.img").read_bytes() == (src / "disk.img").read_bytes()
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + 2 * mib


@pytest.mark.parametrize("push", [True, False], ids=["push", "pull"])
def test_holes_stay_holes_through_a_network_delta_and_dash_s(tmp_path, push):
    """Over the network: an updated sparse image travels as a delta and its
    copy keeps its holes; with -S a dense file of zeros travels as its data
    runs (its zeros do not cross the wire) and is written with holes."""
    import random

    from resync.protocol.session import Options
    from tests.protopump import Channel, make_pair, pump
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    mib = 1 << 20
    _disk_image(dst / "disk.img", _disk_image(src / "disk.img"))
    os.utime(dst / "disk.img", ns=(10**18, 10**18))           # (the clock may not tick between the two)
    _edit(src / "disk.img")
    (src / "zeros.bin").write_bytes(b"start" + bytes(24 * mib) + b"end")
    server_root, local = (dst, src) if push else (src, dst)
    client, server = make_pair(tmp_path, push, local, server_root, options=Options(sparse=True))
    pump(client, server, Channel(random.Random(7), loss=0.05, dup=0.01, jitter=0.01))
    assert client.error is None and server.error is None, (client.error, server.error)
    for name in ("disk.img", "zeros.bin"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert _allocated(dst / "disk.img") <= _allocated(src / "disk.img") + (256 << 10)
    assert _allocated(dst / "zeros.bin") <= 64 << 10
    sender = client if push else server
    assert sender.stats["datagram_bytes_sent"] < 2 * mib            # not the 24 MiB of zeros
