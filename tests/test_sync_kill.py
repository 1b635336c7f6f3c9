"""SIGKILL during sync at many moments: every destination path is old or new,
never torn; the next run completes the mirror and leaves no temp files."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_sync import make_tree, mutate
from .treeutil import rsync_a, snapshot


def contents(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.name.startswith(".resync-tmp-"):
            continue
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.blake2b(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = "special"
    return out


@pytest.mark.slow
def test_kill_at_many_points_then_resume(tmp_path):
    rnd = random.Random(11)
    src, dst, old_copy = tmp_path / "src", tmp_path / "dst", tmp_path / "old"
    make_tree(src, rnd, files=300, depth=4)
    for i in range(3):
        (src / f"big{i}").write_bytes(rnd.randbytes(20_000_000))
    assert rsync_a(src, old_copy).returncode == 0
    old = contents(old_copy)
    for _ in range(4):
        mutate(src, rnd)
    for i in range(3):
        data = bytearray((src / f"big{i}").read_bytes())
        data[1000:2000] = rnd.randbytes(1000)
        (src / f"big{i}").write_bytes(bytes(data))
    for i in range(200):
        (src / f"new{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 50_000)))
    new = contents(src)
    cmd = [sys.executable, "-m", "resync", "sync", "--delete", str(src), str(dst)]

    full = 1e9
    for _ in range(2):                  # how long an uninterrupted run takes (warm)
        assert rsync_a(old_copy, dst, "--delete").returncode == 0
        t = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True)
        full = min(full, time.monotonic() - t)

    kills = 0
    for delay in sorted(rnd.uniform(0.1, max(0.8 * full, 0.2)) for _ in range(10)):
        assert rsync_a(old_copy, dst, "--delete").returncode == 0     # back to the old state
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        now = contents(dst)
        for rel, value in now.items():
            assert value in (old.get(rel), new.get(rel)), f"{rel} is neither old nor new after a kill at {delay:.2f} s"
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert snapshot(dst) == snapshot(src)
        assert not list(dst.rglob(".resync-tmp-*"))
    assert kills >= 5, f"only {kills} of 10 runs were killed before finishing ({full:.2f} s each)"
