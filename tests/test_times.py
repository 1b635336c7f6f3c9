"""Times anywhere a file system can put them (field case 01): before 1970 with
fractional seconds, after 2262-04-11 (where a signed 64-bit count of
nanoseconds ends), 2446 (ext4's limit) and whatever the file system clamps
extreme values to, through sync, verify, the history, signature-tree, pack
and unpack; and bundles and tree signatures of format version 1 still read."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resync.bundle.manifest import read_tree_signature
from resync.bundle.pack import pack, signature_tree
from resync.bundle.unpack import unpack
from resync.store import History

from .treeutil import snapshot

PY = sys.executable
DATA = Path(__file__).resolve().parent / "data"
NS = 10**9

TIMES = {
    "far-past": -(2**62),                               # clamped by the file system (ext4: 1901-12-13)
    "1901": -2_147_483_648 * NS,
    "1969-fraction": -500_000_000,                      # 1969-12-31 23:59:59.5
    "1969-more": -1 * NS - 250_000_001,
    "epoch": 0,
    "2262-04-11-last": 2**63 - 1,                       # the last time a BIGINT of ns holds
    "2262-04-12": 9_223_459_200 * NS + 1,
    "2300": 10_413_792_000 * NS + 123_456_789,
    "2446": 15_032_385_535 * NS + 999_999_999,          # ext4's last second
    "far-future": (2**63 - 1) * NS,                     # clamped by the file system
}


def cli(*args, env=None):
    return subprocess.run([PY, "-m", "resync", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def dated_tree(root: Path) -> dict[str, int]:
    """A file, a directory and a link per time; returns each path's mtime as
    the file system kept it (it may clamp the extreme ones)."""
    root.mkdir()
    kept = {}
    for name, ns in TIMES.items():
        (root / f"d-{name}").mkdir()
        f = root / f"d-{name}" / "f"
        f.write_bytes(name.encode() * 100)
        os.utime(f, ns=(ns, ns))
        os.symlink("f", root / f"d-{name}" / "l")
        os.utime(root / f"d-{name}" / "l", ns=(ns, ns), follow_symlinks=False)
        os.utime(root / f"d-{name}", ns=(ns, ns))
        for rel in (f"d-{name}", f"d-{name}/f", f"d-{name}/l"):
            kept[rel] = os.lstat(root / rel).st_mtime_ns
    os.utime(root, ns=(TIMES["2300"], TIMES["2300"]))
    kept["."] = root.stat().st_mtime_ns
    return kept


def test_the_file_system_keeps_these_times():
    """The premise: times past 2262 and before 1970 with fractions exist on this
    file system (otherwise the tests below would prove less)."""
    kept = {}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        kept = dated_tree(Path(d) / "t")
    assert kept["d-2300/f"] == TIMES["2300"] and kept["d-1969-fraction/f"] == TIMES["1969-fraction"]
    assert kept["d-2262-04-12/f"] > 2**63 - 1


def test_sync_verify_and_history_keep_every_time(tmp_path):
    src, dst, db = tmp_path / "src", tmp_path / "dst", tmp_path / "h.duckdb"
    kept = dated_tree(src)
    env = {"RESYNC_HISTORY": str(db), "RESYNC_HISTORY_MERGE": "inline"}
    r = cli("sync", src, dst, env=env)
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == snapshot(src)                 # every mtime to the nanosecond
    r = cli("verify", dst, env=env)
    assert r.returncode == 0, r.stdout + r.stderr         # was exit 5: "changed d-2300/f"
    _, rows = History(db).query("SELECT path, mtime_ns FROM manifests")
    assert {p: m for p, m in rows} == {k: v for k, v in kept.items() if k != "."}
    r = cli("sync", "-i", src, dst, env=env)
    assert r.returncode == 0 and r.stdout == ""           # a second run has nothing to do
    r = cli("history", "--json", env=env)
    assert r.returncode == 0 and r.stdout.startswith("[")


def test_tree_signature_pack_and_unpack_keep_every_time(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    kept = dated_tree(src)
    r = cli("pack", src, "-o", tmp_path / "full.bundle", "--no-history")
    assert r.returncode == 0, r.stderr                   # was exit 1: "argument out of range"
    r = cli("unpack", tmp_path / "full.bundle", dst, "--no-history")
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == snapshot(src)
    r = cli("signature-tree", dst, "-o", tmp_path / "t.sig")
    assert r.returncode == 0, r.stderr
    _, entries = read_tree_signature((tmp_path / "t.sig").read_bytes(), "t.sig")
    assert {e.path: e.mtime_ns for e in entries} == {k: v for k, v in kept.items() if k != "."}
    # unchanged files are recognised by size and (far-future) mtime: no content travels
    stats = pack(str(src), str(tmp_path / "none.bundle"), str(tmp_path / "t.sig"))
    assert stats.unchanged == len(TIMES) and stats.files_transferred == 0
    unpack(str(tmp_path / "none.bundle"), str(dst))
    assert snapshot(dst) == snapshot(src)


def test_bundles_of_version_2_still_read(tmp_path):
    """Version 2 had no record flags and no hole chunks; what was written
    then is still unpacked (the golden bundle of session 10)."""
    raw = (DATA / "v2.bundle").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "e4e891a3f7d2674c31154c15e80a06fa9a4743e5479420eb50a9eb03b61b8cf6"
    unpack(str(DATA / "v2.bundle"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "d" / "f").read_bytes() == b"frozen content\n" * 3
    assert os.readlink(tmp_path / "dst" / "l") == "d/f"


def test_bundles_and_tree_signatures_of_version_1_still_read(tmp_path):
    """Format version 1 stored times as i64 nanoseconds; what was written
    then is still unpacked (the file holds a bundle packed by resync 0.x)."""
    raw = (DATA / "v1.bundle").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "04d7a199959748c30d0d073410ad901a503645137307c03d46bb091f5a860243"
    unpack(str(DATA / "v1.bundle"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "d" / "f").read_bytes() == b"frozen content\n" * 3
    assert os.readlink(tmp_path / "dst" / "l") == "d/f"
    _, entries = read_tree_signature((DATA / "v1.tree.sig").read_bytes(), "v1.tree.sig")
    assert [(e.path, e.mtime_ns) for e in entries] == [
        ("d", 1_600_000_000_123_456_789), ("d/f", -500_000_000), ("l", 0)]


@pytest.mark.parametrize("nanoseconds", [NS, 2**32 - 1])
def test_nanoseconds_out_of_range_are_a_format_error(tmp_path, nanoseconds):
    import struct

    from resync.bundle import manifest as M
    from resync.errors import FormatError
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    signature_tree(str(src), str(tmp_path / "t.sig"))
    raw = bytearray((tmp_path / "t.sig").read_bytes())
    at = M.TREE_HEADER.size + 3 + 1 + 1 + 4 + 8          # path "f" (u16 + 1), kind, flags, mode, seconds
    struct.pack_into("<I", raw, at, nanoseconds)
    import blake3
    raw[-32:] = blake3.blake3(bytes(raw[:-32])).digest()
    with pytest.raises(FormatError, match="nanoseconds"):
        read_tree_signature(bytes(raw), "t.sig")
