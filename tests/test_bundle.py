"""Bundles: the shard container (damage located and repaired up to m per
stripe, refused beyond), the offline flow against rsync -a, refusals that
touch nothing, hostile and fuzzed bundles, and the CLI's exit codes."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resync.bundle import payload as P
from resync.bundle.manifest import NONE
from resync.bundle.pack import pack, signature_tree
from resync.bundle.shards import HEADER_SIZE, Layout, ShardReader, ShardWriter, rewrite
from resync.bundle.unpack import unpack
from resync.errors import FormatError, ResyncError, UnrecoverableError

from . import mix, naive
from .test_sync import make_tree, mutate, seconds
from .treeutil import rsync_a, snapshot

PY = sys.executable


def cli(*args, env=None):
    return subprocess.run([PY, "-m", "resync", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# -- the shard container -------------------------------------------------------

def write_shards(path: Path, data: bytes, k: int, m: int, shard: int, piece: int = 1000) -> Layout:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = ShardWriter(fd, b"B" * 16, k, m, shard)
        for i in range(0, len(data), piece):
            w.write(data[i:i + piece])
        return w.close()
    finally:
        os.close(fd)


def read_payload(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(bytes(v) for v in ShardReader(fd, str(path)).payload())
    finally:
        os.close(fd)


def damage_shard(path: Path, lay: Layout, stripe: int, index: int, rnd: random.Random, whole=False) -> None:
    pos = lay.stored(stripe).index(index)
    base = lay.stripe_offset(stripe) + pos * lay.slot
    with open(path, "r+b") as f:
        if whole:
            f.seek(base)
            f.write(rnd.randbytes(lay.slot))
        else:
            off = base + rnd.randrange(lay.slot)
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))


@settings(max_examples=25, deadline=None)
@given(data=mix.mixed_bytes(40_000), k=st.integers(1, 6), m=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_any_m_damaged_shards_per_stripe_are_repaired(tmp_path_factory, data, k, m, seed):
    rnd = random.Random(seed)
    path = tmp_path_factory.mktemp("shards") / "b"
    lay = write_shards(path, data, k, m, 1024)
    assert path.stat().st_size == lay.file_size
    assert read_payload(path) == data
    original = path.read_bytes()
    for s in range(lay.stripes):
        stored = lay.stored(s)
        for index in rnd.sample(stored, min(m, len(stored))):
            damage_shard(path, lay, s, index, rnd, whole=rnd.random() < 0.3)
    assert read_payload(path) == data
    fixed = path.with_name("fixed")
    fd, out = os.open(path, os.O_RDONLY), os.open(fixed, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        rewrite(ShardReader(fd, "b"), out)
    finally:
        os.close(fd)
        os.close(out)
    assert fixed.read_bytes() == original            # byte-identical repair


def test_m_plus_one_damaged_shards_in_a_stripe_are_refused(tmp_path):
    rnd = random.Random(3)
    path = tmp_path / "b"
    data = rnd.randbytes(50 * 4096 * 2 + 100)
    lay = write_shards(path, data, 50, 10, 4096)
    assert lay.stripes == 3
    for index in rnd.sample(range(50), 11):
        damage_shard(path, lay, 1, index, rnd)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = ShardReader(fd, "b")
        health = list(reader.health())
        assert [len(h.bad) for h in health] == [0, 11, 0]
        assert not health[1].repairable
        with pytest.raises(UnrecoverableError, match="11 of 60 shards damaged or missing, parity repairs 10"):
            reader.stripe_payload(1)
        assert bytes(reader.stripe_payload(0)) == data[:50 * 4096]
    finally:
        os.close(fd)


def test_layout_is_found_when_the_first_headers_are_destroyed(tmp_path):
    rnd = random.Random(4)
    path = tmp_path / "b"
    data = rnd.randbytes(100_000)
    lay = write_shards(path, data, 8, 3, 1024)
    with open(path, "r+b") as f:                     # wipe the first three shards entirely
        f.write(bytes(3 * lay.slot))
    assert read_payload(path) == data


def test_truncation_within_parity_is_repaired_beyond_is_refused(tmp_path):
    rnd = random.Random(5)
    path = tmp_path / "b"
    data = rnd.randbytes(30_000)
    lay = write_shards(path, data, 10, 3, 1024)
    assert lay.stripes == 3
    with open(path, "r+b") as f:
        f.truncate(lay.file_size - 3 * lay.slot)     # the last 3 shards of the last stripe
    assert read_payload(path) == data
    with open(path, "r+b") as f:
        f.truncate(lay.file_size - 4 * lay.slot)
    with pytest.raises(UnrecoverableError):
        read_payload(path)


def test_shard_format_is_frozen(tmp_path):
    """A fixed payload gives these exact bytes; any change to the shard format,
    the parity matrix or the checks breaks existing bundles and shows here."""
    path = tmp_path / "b"
    lay = write_shards(path, bytes(range(256)) * 10, 4, 2, 1024)
    raw = path.read_bytes()
    assert (lay.stripes, lay.shard_size, len(raw)) == (1, 640, 6 * (64 + 640))
    assert raw[:HEADER_SIZE - 16] == struct.pack("<8sHHHHIIQ16s", b"RSYNCSHD", 1, 4, 2, 0, 0, 640, 2560, b"B" * 16)
    shards = [raw[i * 704 + 64:(i + 1) * 704] for i in range(6)]
    data = (bytes(range(256)) * 10).ljust(4 * 640, b"\0")
    assert shards[:4] == [data[i * 640:(i + 1) * 640] for i in range(4)]
    assert shards[4:] == naive.gf_mul_rows(naive.cauchy_parity(4, 2), shards[:4])
    for i, shard in enumerate(shards):
        header = raw[i * 704:i * 704 + 48]
        check = blake3.blake3(header + blake3.blake3(shard).digest()).digest(16)
        assert raw[i * 704 + 48:i * 704 + 64] == check
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_SHARDS


GOLDEN_SHARDS = "77edcdda637d9ccc243da00477bc85e44cac21e1c897ea524533fddcb023531b"


def test_not_a_bundle(tmp_path):
    for content, why in [(b"", "empty file"), (b"hello" * 100, "bad magic")]:
        (tmp_path / "x").write_bytes(content)
        fd = os.open(tmp_path / "x", os.O_RDONLY)
        try:
            with pytest.raises(FormatError, match=why):
                ShardReader(fd, "x")
        finally:
            os.close(fd)


# -- the offline flow -----------------------------------------------------------

def flow(tmp_path: Path, src: Path, dst: Path, against: bool, parity=(50, 10)) -> Path:
    sig = None
    if against:
        sig = tmp_path / "tree.sig"
        signature_tree(str(dst), str(sig))
    bundle = tmp_path / "x.bundle"
    stats = pack(str(src), str(bundle), str(sig) if sig else None, *parity)
    assert stats.errors == 0 and stats.vanished == 0
    unpack(str(bundle), str(dst))
    return bundle


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_offline_flow_reproduces_rsync(tmp_path, seed):
    rnd = random.Random(seed)
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    make_tree(src, rnd, files=50)
    flow(tmp_path, src, dst, against=False)
    assert rsync_a(src, ref).returncode == 0
    assert snapshot(dst) == snapshot(src)
    for _ in range(2):                               # then edits shipped as deltas + deletions
        mutate(src, rnd)
        flow(tmp_path, src, dst, against=True, parity=(4, 2))
        assert rsync_a(src, ref, "--delete").returncode == 0
        assert snapshot(dst) == snapshot(src)
        assert seconds(snapshot(dst)) == seconds(snapshot(ref))


def test_against_bundle_carries_deltas_and_deletions(tmp_path):
    rnd = random.Random(9)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(rnd.randbytes(2_000_000))
    (src / "gone").write_bytes(b"bye")
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"x" * 10)
    flow(tmp_path, src, dst, against=False)
    data = bytearray((src / "big").read_bytes())
    data[1_000_000:1_000_010] = b"0123456789"
    (src / "big").write_bytes(bytes(data))
    (src / "gone").unlink()
    shutil.rmtree(src / "d")
    signature_tree(str(dst), str(tmp_path / "tree.sig"))
    stats = pack(str(src), str(tmp_path / "x.bundle"), str(tmp_path / "tree.sig"))
    assert (stats.delta_files, stats.whole_files, stats.deleted) == (1, 0, 3)
    assert stats.bytes_literal < 100_000 and stats.payload_bytes < 150_000
    u = unpack(str(tmp_path / "x.bundle"), str(dst))
    assert u.deleted == 3 and u.bytes_matched > 1_800_000
    assert snapshot(dst) == snapshot(src)


def test_changed_destination_is_refused_and_untouched(tmp_path):
    rnd = random.Random(10)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, rnd, files=30)
    flow(tmp_path, src, dst, against=False)
    signature_tree(str(dst), str(tmp_path / "tree.sig"))
    mutate(src, rnd)
    pack(str(src), str(tmp_path / "x.bundle"), str(tmp_path / "tree.sig"))
    (dst / "local-edit").write_bytes(b"made after the signature")
    before = snapshot(dst)
    r = cli("unpack", tmp_path / "x.bundle", dst, "--no-history")
    assert r.returncode == 5, r.stderr
    assert "does not match the tree signature" in r.stderr and "local-edit" in r.stderr
    assert r.stderr.count("\n") == 1
    assert snapshot(dst) == before


def test_damage_beyond_parity_is_refused_and_untouched(tmp_path):
    rnd = random.Random(11)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, rnd, files=30)
    bundle = tmp_path / "x.bundle"
    pack(str(src), str(bundle), None, 4, 2)
    fd = os.open(bundle, os.O_RDONLY)
    lay = ShardReader(fd, "x").layout
    os.close(fd)
    dst.mkdir()
    (dst / "keep").write_bytes(b"old")
    before = snapshot(dst)
    for index in (0, 1, 4):                           # 3 > m = 2 in stripe 0
        damage_shard(bundle, lay, 0, index, rnd)
    r = cli("unpack", bundle, dst, "--no-history")
    assert r.returncode == 7 and "cannot be recovered" in r.stderr, r.stderr
    assert snapshot(dst) == before
    assert cli("verify", bundle).returncode == 7


def test_verify_and_repair_cli(tmp_path):
    rnd = random.Random(12)
    src = tmp_path / "src"
    make_tree(src, rnd, files=30)
    bundle = tmp_path / "x.bundle"
    assert cli("pack", src, "-o", bundle, "--parity", "5,3", "--no-history").returncode == 0
    original = bundle.read_bytes()
    r = cli("verify", bundle)
    assert r.returncode == 0 and "intact" in r.stderr
    fd = os.open(bundle, os.O_RDONLY)
    lay = ShardReader(fd, "x").layout
    os.close(fd)
    for s in range(lay.stripes):
        for index in rnd.sample(lay.stored(s), min(3, len(lay.stored(s)))):
            damage_shard(bundle, lay, s, index, rnd)
    r = cli("verify", bundle)
    assert r.returncode == 5 and "repairable" in r.stdout, r.stdout + r.stderr
    r = cli("repair", bundle, "-o", tmp_path / "fixed")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fixed").read_bytes() == original
    assert cli("unpack", bundle, tmp_path / "dst", "--no-history").returncode == 0
    assert snapshot(tmp_path / "dst") == snapshot(src)


def test_pack_and_unpack_are_recorded_and_verify_uses_the_manifest(tmp_path):
    rnd = random.Random(13)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, rnd, files=20)
    env = {"RESYNC_HISTORY": str(tmp_path / "h.duckdb"), "RESYNC_HISTORY_MERGE": "inline"}
    assert cli("pack", src, "-o", tmp_path / "x.bundle", env=env).returncode == 0
    assert cli("unpack", tmp_path / "x.bundle", dst, env=env).returncode == 0
    r = cli("history", "--json", env=env)
    assert r.returncode == 0
    assert '"command": "unpack"' in r.stdout.replace('":"', '": "') or "unpack" in r.stdout
    assert cli("verify", dst, env=env).returncode == 0
    victim = next(p for p in dst.rglob("f*") if p.is_file() and not p.is_symlink() and p.stat().st_size)
    st = victim.stat()
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_mtime_ns, st.st_mtime_ns))
    assert cli("verify", dst, env=env).returncode == 5


# -- hostile bundles ---------------------------------------------------------------

def hostile_bundle(path: Path, entries, records=b"", against=None, deletions=(), flags=0) -> None:
    """A bundle whose shards are all valid but whose payload says what we like."""
    bundle_id = b"H" * 16
    head = P.HEADER.pack(P.MAGIC, P.VERSION, flags, 0, bundle_id, bytes(32), 0)
    trailer = P.pack_trailer(P.Trailer(P.Root(0o40755, 0, 0, 0), list(entries), list(against or []),
                                       list(deletions)))
    body = head + records
    stored = P.store_trailer(trailer)
    payload = body + stored + P.footer(len(body), trailer, stored)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = ShardWriter(fd, bundle_id, 4, 2, 1024)
        w.write(payload)
        w.close()
    finally:
        os.close(fd)


def file_entry(path: str, content: bytes, record: int, mode=0o100644) -> P.Entry:
    return P.Entry(path, "f", mode, 0, len(content), 0, 0, 0, blake3.blake3(content).digest(), b"", record)


def whole_record(index: int, content: bytes, codec=P.CODEC_RAW, stored=None, raw_len=None) -> bytes:
    data = stored if stored is not None else content
    return (P.RECORD.pack(P.WHOLE, 0, index, len(content))
            + P.CHUNK.pack(codec, raw_len if raw_len is not None else len(content), len(data)) + data)


def link_entry(path: str, target: bytes) -> P.Entry:
    return P.Entry(path, "L", 0o120777, 0, len(target), 0, 0, 0, bytes(32), target, NONE)


def dir_entry(path: str) -> P.Entry:
    return P.Entry(path, "d", 0o40755, 0, 0, 0, 0, 0, bytes(32), b"", NONE)


HOSTILE_PATHS = ["../escape", "/etc/evil", "a/../../escape", "a\0b", "", "./x", "a//b", "x" * 256]


@pytest.mark.parametrize("bad", HOSTILE_PATHS)
def test_hostile_paths_are_refused(tmp_path, bad):
    off = P.HEADER.size
    hostile_bundle(tmp_path / "b", [file_entry(bad, b"evil", off)], whole_record(0, b"evil"))
    dst = tmp_path / "dst"
    dst.mkdir()
    r = cli("unpack", tmp_path / "b", dst, "--no-history")
    assert r.returncode == 4 and r.stderr.startswith("resync: error:"), r.stderr
    assert list(dst.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_symlink_parent_trick_is_refused(tmp_path):
    """A link 'a' -> outside, then a file 'a/x': a's entry is not a directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    off = P.HEADER.size
    entries = [link_entry("a", str(outside).encode()), file_entry("a/x", b"evil", off)]
    hostile_bundle(tmp_path / "b", entries, whole_record(1, b"evil"))
    r = cli("unpack", tmp_path / "b", tmp_path / "dst", "--no-history")
    assert r.returncode == 4 and "parent is not a directory" in r.stderr
    assert list(outside.iterdir()) == []


def test_destination_symlink_is_never_followed(tmp_path):
    """The destination holds a link 'a' -> outside; the bundle puts a file in
    directory 'a': the link is replaced by a directory, outside is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "a")
    off = P.HEADER.size
    hostile_bundle(tmp_path / "b", [dir_entry("a"), file_entry("a/x", b"data", off)], whole_record(1, b"data"))
    r = cli("unpack", tmp_path / "b", dst, "--no-history")
    assert r.returncode == 0, r.stderr
    assert list(outside.iterdir()) == []
    assert (dst / "a").is_dir() and not (dst / "a").is_symlink() and (dst / "a" / "x").read_bytes() == b"data"


def test_lz4_bomb_and_bad_chunks_are_refused(tmp_path):
    import lz4.block
    bomb = lz4.block.compress(bytes(8 << 20), store_size=False)   # expands to 8 MiB
    off = P.HEADER.size
    cases = [
        whole_record(0, b"x" * 100, P.CODEC_LZ4, stored=bomb, raw_len=100),          # expands past its size
        whole_record(0, b"x" * 100, 7),                                                # unknown codec
        whole_record(0, b"x" * 100, P.CODEC_RAW, stored=b"x" * 100, raw_len=P.MAX_CHUNK + 1),
        whole_record(0, b"x" * 100, P.CODEC_LZ4, stored=b"\xff" * 50, raw_len=100),    # corrupt LZ4
        whole_record(0, b"x" * 100, P.CODEC_HOLE, stored=b"x" * 100, raw_len=100),     # a hole that stores bytes
        whole_record(0, b"x" * 100, P.CODEC_HOLE, stored=b"", raw_len=101),            # a hole past the end
        P.RECORD.pack(P.WHOLE, 0x80, 0, 100) + P.CHUNK.pack(P.CODEC_RAW, 100, 100) + b"x" * 100,  # unknown flag
    ]
    for records in cases:
        hostile_bundle(tmp_path / "b", [file_entry("f", b"x" * 100, off)], records)
        dst = tmp_path / "dst"
        r = cli("unpack", tmp_path / "b", dst, "--no-history")
        assert r.returncode == 4, r.stderr
        assert not (dst / "f").exists() and [p.name for p in dst.iterdir()] == []


def test_wrong_content_hash_is_refused(tmp_path):
    off = P.HEADER.size
    entry = file_entry("f", b"what the manifest promises", off)
    hostile_bundle(tmp_path / "b", [entry], whole_record(0, b"what the record contains!!"))
    r = cli("unpack", tmp_path / "b", tmp_path / "dst", "--no-history")
    assert r.returncode == 5 and "BLAKE3" in r.stderr
    assert list((tmp_path / "dst").iterdir()) == []


_VALID: list = []


def _valid_payload(tmp_path: Path) -> tuple[bytes, bytes]:
    """One real bundle's payload, made once per session (hypothesis needs every
    example to see the same bytes: a fresh pack differs in ids and times)."""
    if _VALID:
        return _VALID[0]
    rnd = random.Random(21)
    src = tmp_path / "fsrc"
    make_tree(src, rnd, files=12)
    pack(str(src), str(tmp_path / "v.bundle"), None, 4, 2)
    fd = os.open(tmp_path / "v.bundle", os.O_RDONLY)
    try:
        reader = ShardReader(fd, "v")
        _VALID.append((b"".join(bytes(v) for v in reader.payload()), reader.layout.bundle_id))
        return _VALID[0]
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzzed_payloads_give_only_resync_errors(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    payload, bundle_id = _valid_payload(tmp)
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[:data.draw(st.integers(0, len(mutated)))]
    fd = os.open(tmp / "m.bundle", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = ShardWriter(fd, bundle_id, 4, 2, 1024)
        w.write(bytes(mutated))
        w.close()
    finally:
        os.close(fd)
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    try:
        unpack(str(tmp / "m.bundle"), str(tmp / "dst"))
    except ResyncError:
        pass
    assert list(outside.iterdir()) == []
    assert not any(p.name.startswith(".resync-tmp") for p in (tmp / "dst").rglob("*")) \
        if (tmp / "dst").exists() else True


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzzed_shard_files_give_only_resync_errors(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzzfile")
    src = tmp / "src"
    make_tree(src, random.Random(data.draw(st.integers(0, 5))), files=8)
    pack(str(src), str(tmp / "b"), None, 3, 1)
    raw = bytearray((tmp / "b").read_bytes())
    # positions drawn as fractions of the bundle: its size varies a little from run to run (the
    # tree's times), and hypothesis needs the same draws to mean the same test case
    at = st.integers(0, 1 << 20)
    for _ in range(data.draw(st.integers(1, 40))):
        raw[data.draw(at) * (len(raw) - 1) >> 20] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(at) * len(raw) >> 20]
    (tmp / "b").write_bytes(bytes(raw))
    try:
        unpack(str(tmp / "b"), str(tmp / "dst"))
    except ResyncError:
        return
    assert snapshot(tmp / "dst") == snapshot(src)    # if it applied, it is exact


def test_kill_during_unpack_leaves_old_or_new_and_rerun_finishes(tmp_path):
    rnd = random.Random(31)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, rnd, files=40)
    for i in range(4):
        (src / f"big{i}").write_bytes(mix.data(i, 3_000_000, ("random", "mixed")[i % 2]))
    flow(tmp_path, src, dst, against=False)
    old = snapshot(dst)
    signature_tree(str(dst), str(tmp_path / "tree.sig"))
    mutate(src, rnd)
    for i in range(4):
        if (src / f"big{i}").is_dir():                   # mutate may have made it a directory
            shutil.rmtree(src / f"big{i}")
        (src / f"big{i}").write_bytes(mix.data(10 + i, 3_000_000, ("random", "mixed")[i % 2]))
    new = snapshot(src)
    bundle = tmp_path / "n.bundle"
    pack(str(src), str(bundle), str(tmp_path / "tree.sig"))
    killed = 0
    for delay in (0.05, 0.2, 0.35, 0.5, 0.7):
        p = subprocess.Popen([PY, "-m", "resync", "unpack", str(bundle), str(dst), "--no-history"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        killed += p.wait() < 0
        for path, value in snapshot(dst).items():
            if path != "." and value[0] != 0o040000 and not path.startswith(".resync-tmp-unpack-"):
                assert value[4] in (old.get(path, (0,) * 5)[4], new.get(path, (0,) * 5)[4]), path  # never torn
    assert killed
    r = cli("unpack", bundle, dst, "--no-history")
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == new
    assert not any(p.name.startswith(".resync-tmp") for p in dst.rglob("*"))


def test_bundle_format_is_frozen(tmp_path):
    """A fixed bundle (payload and shards) as bytes: changing any layout,
    constant or check breaks bundles already written and shows here."""
    content = b"frozen content\n" * 3
    sparse = b"head" + bytes(3 << 12)                    # 4 bytes of data, then a hole to the end
    first = whole_record(1, content)
    second = (P.RECORD.pack(P.WHOLE, P.RECORD_SPARSE, 2, len(sparse)) + P.CHUNK.pack(P.CODEC_RAW, 4, 4)
              + b"head" + P.CHUNK.pack(P.CODEC_HOLE, len(sparse) - 4, 0))
    entries = [dir_entry("d"), file_entry("d/f", content, P.HEADER.size),
               file_entry("d/s", sparse, P.HEADER.size + len(first)), link_entry("l", b"d/f")]
    hostile_bundle(tmp_path / "b", entries, first + second)
    raw = (tmp_path / "b").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_BUNDLE
    unpack(str(tmp_path / "b"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "d" / "f").read_bytes() == content
    assert (tmp_path / "dst" / "d" / "s").read_bytes() == sparse
    assert os.readlink(tmp_path / "dst" / "l") == "d/f"


# Payload version 3 (record flags, hole chunks). The version-2 bundle of the
# first three entries (hash e4e891a3...) is tests/data/v2.bundle, the
# version-1 one (hash 04d7a199...) tests/data/v1.bundle, both still unpacked
# by test_times.py.
GOLDEN_BUNDLE = "66ca16ac74acf708b0cf21ec212b918a155562ab3fff7193f8b53909896f3450"


def test_tree_signature_format_is_frozen(tmp_path):
    from resync.bundle.manifest import TreeEntry, read_tree_signature, write_tree_signature
    from resync.signature import compute_signature, signature_bytes
    content = b"frozen content\n" * 3
    sig = signature_bytes(compute_signature(np.frombuffer(content, np.uint8), salt=bytes(32), threads=1))
    entries = [TreeEntry("d", "d", 0o40755, 1_600_000_000_123_456_789, 0),
               TreeEntry("d/f", "f", 0o100644, -500_000_000, len(content), sig),
               TreeEntry("l", "L", 0o120777, 10_413_792_000 * 10**9, 3),
               TreeEntry("u", "d", 0o40000, 0, 0, unlisted=True)]
    fd = os.open(tmp_path / "t.sig", os.O_WRONLY | os.O_CREAT, 0o644)
    write_tree_signature(fd, entries)
    os.close(fd)
    raw = (tmp_path / "t.sig").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_TREE_SIGNATURE
    back = read_tree_signature(raw, "t.sig")[1]
    assert [(e.path, e.mtime_ns, e.unlisted) for e in back] == [(e.path, e.mtime_ns, e.unlisted) for e in entries]


GOLDEN_TREE_SIGNATURE = "27199265c03a092b41e58769cb29398ee9e9e818f5fa19a6462affc47563114f"


@pytest.mark.parametrize("field,value,message", [
    (0, b"RSYNCXXX", "bad payload magic"), (1, 4, "unsupported payload version 4"), (2, 6, "unknown flags")])
def test_bad_payload_header(tmp_path, field, value, message):
    fields = [P.MAGIC, P.VERSION, 0, 0, b"H" * 16, bytes(32), 0]
    fields[field] = value
    trailer = P.pack_trailer(P.Trailer(P.Root(0o40755, 0, 0, 0), [], [], []))
    head = P.HEADER.pack(*fields)
    stored = P.store_trailer(trailer)
    payload = head + stored + P.footer(len(head), trailer, stored)
    fd = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    w = ShardWriter(fd, b"H" * 16, 4, 2, 1024)
    w.write(payload)
    w.close()
    os.close(fd)
    with pytest.raises(FormatError, match=message):
        unpack(str(tmp_path / "b"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


def test_bundle_written_inside_its_source_is_not_packed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    stats = pack(str(src), str(src / "self.bundle"), None, 2, 1)
    assert stats.files == 1                      # neither the bundle's temp file nor pack's scratch
    unpack(str(src / "self.bundle"), str(tmp_path / "dst"))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["f"]


# -- compressible content (field case 04) ----------------------------------------

def test_compressible_files_round_trip_through_the_cli(tmp_path):
    """A sparse disk image and a text log (LZ4 makes their records much
    shorter than the files) pack, verify intact and unpack exactly; so does
    every other kind of the test mix. Was: unpack refused the bundle (exit 4,
    'bad record header') that pack wrote and verify called intact."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "disk.img", "wb") as f:               # 8 MiB of holes around two islands
        f.truncate(8 << 20)
        f.write(b"MBR")
        f.seek((8 << 20) - 3)
        f.write(b"end")
    (src / "app.log").write_bytes(b"".join(b"line %d of a log file\n" % i for i in range(1, 2001)))
    for i, kind in enumerate(mix.KINDS):
        mix.write(src / f"{kind}.dat", i, 300_000, kind)
    bundle = tmp_path / "b.bundle"
    r = cli("pack", src, "-o", bundle, "--no-history", "--json")
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout)["payload_bytes"] < 600_000      # far less than the 10.4 MB of files
    r = cli("verify", bundle)
    assert r.returncode == 0 and "intact" in r.stderr, r.stderr
    r = cli("unpack", bundle, tmp_path / "dst", "--no-history")
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "dst") == snapshot(src)


def test_record_framing_is_checked_by_verify_and_unpack(tmp_path):
    """A whole record's length is the file's logical size; a delta record's is
    its stored size and may not run into the trailer. verify BUNDLE reads every
    record as unpack does, so it cannot call intact what unpack refuses."""
    off = P.HEADER.size
    content = b"abc" * 1000
    import lz4.block
    packed = lz4.block.compress(content, store_size=False)
    good = whole_record(0, content, P.CODEC_LZ4, stored=packed)
    hostile_bundle(tmp_path / "ok", [file_entry("f", content, off)], good)
    assert cli("verify", tmp_path / "ok").returncode == 0
    assert cli("unpack", tmp_path / "ok", tmp_path / "d1", "--no-history").returncode == 0
    assert (tmp_path / "d1" / "f").read_bytes() == content
    bad_len = P.RECORD.pack(P.WHOLE, 0, 0, len(content) + 1) + good[P.RECORD.size:]
    delta_into_trailer = P.RECORD.pack(P.DELTA, 0, 0, 1 << 20) + good[P.RECORD.size:]
    for name, records in (("len", bad_len), ("delta", delta_into_trailer)):
        hostile_bundle(tmp_path / name, [file_entry("f", content, off)], records)
        r = cli("verify", tmp_path / name)
        assert r.returncode == 4, (name, r.stderr)
        r = cli("unpack", tmp_path / name, tmp_path / f"d-{name}", "--no-history")
        assert r.returncode == 4, (name, r.stderr)
        assert not (tmp_path / f"d-{name}" / "f").exists()


def test_pack_refuses_a_bundle_that_does_not_read_back(tmp_path, monkeypatch):
    """pack reads its bundle back before it reports success: one that unpack
    would refuse is never left under the output name."""
    from resync.bundle import pack as pack_module
    from resync.errors import VerificationError
    src = tmp_path / "src"
    src.mkdir()
    (src / "log").write_bytes(b"compressible " * 10_000)
    real = pack_module._whole

    def short_record(out, fd, size, sparse=False):       # a writer bug: one chunk header lies about its length
        digest = real(out, fd, size, sparse)
        out.put(b"\0")
        return digest

    monkeypatch.setattr(pack_module, "_whole", short_record)
    with pytest.raises(VerificationError, match="does not read back"):
        pack(str(src), str(tmp_path / "x.bundle"))
    assert not (tmp_path / "x.bundle").exists()
    assert not list(tmp_path.glob(".resync-tmp-*"))


def test_a_file_changed_while_packed_is_left_out_and_the_bundle_reads_back(tmp_path, monkeypatch):
    """Its record is already in the payload when the change is seen: it stays
    there, unreferenced and well-formed, and readers step over it."""
    from resync.bundle import pack as pack_module
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(mix.data(ord(name), 200_000, "mixed"))
    real = pack_module._whole

    def touched_while_read(out, fd, size, sparse=False):
        digest = real(out, fd, size, sparse)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/b"):
            os.utime(src / "b", ns=(1, 1))                # someone writes to it meanwhile
        return digest

    monkeypatch.setattr(pack_module, "_whole", touched_while_read)
    stats = pack(str(src), str(tmp_path / "x.bundle"))
    assert stats.vanished == 1 and stats.files_transferred == 2
    r = cli("verify", tmp_path / "x.bundle")
    assert r.returncode == 0, r.stderr
    unpack(str(tmp_path / "x.bundle"), str(tmp_path / "dst"))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["a", "c"]
