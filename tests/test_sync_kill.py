"""SIGKILL during sync at many moments: every destination path is old or new,
never torn; the next run completes the mirror and leaves no temp files."""
from __future__ import annotations

import hashlib
import shutil
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


def wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of the group is left (workers die a moment later
    than the parent when they were inside a write)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still alive")


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
    cmd = [sys.executable, "-m", "resync", "sync", "--no-history", "--delete", str(src), str(dst)]

    full = 1e9
    for _ in range(2):                  # how long an uninterrupted run takes (warm)
        assert rsync_a(old_copy, dst, "--delete").returncode == 0
        t = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True)
        full = min(full, time.monotonic() - t)

    kills, attempts = 0, 0
    while kills < 8 and attempts < 30:         # a run may finish before its kill: draw again
        attempts += 1
        delay = rnd.uniform(0.05, max(0.9 * full, 0.1))
        r = rsync_a(old_copy, dst, "--delete")                       # back to the old state
        assert r.returncode == 0, f"resetting the destination: {r.stderr}"
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        wait_group_gone(proc.pid)          # copy workers too, before we look
        now = contents(dst)
        for rel, value in now.items():
            assert value in (old.get(rel), new.get(rel)), f"{rel} is neither old nor new after a kill at {delay:.2f} s"
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"resume after a kill at {delay:.2f} s: {r.stderr}"
        assert snapshot(dst) == snapshot(src), f"resume after a kill at {delay:.2f} s differs from the source"
        assert not list(dst.rglob(".resync-tmp-*"))
    assert kills >= 5, f"only {kills} of {attempts} runs were killed before finishing ({full:.2f} s each)"


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_no_temp_files(tmp_path):
    rnd = random.Random(5)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(6000):
        (src / f"f{i:05d}").write_bytes(rnd.randbytes(rnd.randrange(100, 20_000)))
    cmd = [sys.executable, "-m", "resync", "sync", "--no-history", str(src), str(dst)]
    interrupted = 0
    for delay in (0.0, 0.02, 0.05, 0.1):
        shutil.rmtree(dst, ignore_errors=True)
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
        end = time.monotonic() + 30
        while not dst.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)      # past start-up: the run is copying (a ^C during imports is Python's)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)         # what a terminal's Ctrl-C does
        _, err = proc.communicate()
        wait_group_gone(proc.pid)
        if proc.returncode == 130:
            interrupted += 1
            assert err.strip() == "resync: error: interrupted"
        else:
            assert proc.returncode == 0, err
        assert not list(dst.rglob(".resync-tmp-*"))
        for p in dst.glob("f*"):                        # whatever landed is whole
            assert p.read_bytes() == (src / p.name).read_bytes()
    assert interrupted >= 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert snapshot(dst) == snapshot(src)


def _busy_tree(root: Path, files: int = 6000) -> None:
    rnd = random.Random(6)
    root.mkdir()
    for i in range(files):
        (root / f"f{i:05d}").write_bytes(rnd.randbytes(rnd.randrange(100, 20_000)))


def _start_copying(cmd: list[str], dst: Path) -> subprocess.Popen:
    """Start a run and return once it is copying (its workers and lister exist)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.monotonic() + 30
    while not (dst.exists() and any(dst.iterdir())) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,line", [(signal.SIGTERM, 143, "resync: error: terminated (SIGTERM)"),
                                           (signal.SIGHUP, 129, "resync: error: hangup (SIGHUP)")])
@pytest.mark.parametrize("whole_group", [False, True])
def test_term_and_hup_are_handled_like_ctrl_c(tmp_path, sig, code, line, whole_group):
    """timeout(1) signals the main process, systemd's stop and a closed
    terminal the whole group: either way the run removes its temp files,
    prints one line, exits 128 + the signal, and leaves no process behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _busy_tree(src)
    cmd = [sys.executable, "-m", "resync", "sync", "--no-history", str(src), str(dst)]
    stopped = 0
    for delay in (0.0, 0.05):
        shutil.rmtree(dst, ignore_errors=True)
        proc = _start_copying(cmd, dst)
        time.sleep(delay)
        if proc.poll() is None:
            (os.killpg if whole_group else os.kill)(proc.pid, sig)
        _, err = proc.communicate()
        wait_group_gone(proc.pid, timeout=5)
        if proc.returncode == code:
            stopped += 1
            assert err.strip() == line
        else:
            assert proc.returncode == 0, err
        assert not list(dst.rglob(".resync-tmp-*"))
        for p in dst.glob("f*"):                        # whatever landed is whole
            assert p.read_bytes() == (src / p.name).read_bytes()
    assert stopped >= 1


@pytest.mark.slow
def test_children_end_when_the_main_process_is_killed(tmp_path):
    """SIGKILL of the main process alone (the OOM killer): its copy workers and
    source lister end too (they were left blocked on a pipe for good); a re-run
    removes the temp files and completes the mirror."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _busy_tree(src)
    cmd = [sys.executable, "-m", "resync", "sync", "--no-history", str(src), str(dst)]
    proc = _start_copying(cmd, dst)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) >= 2                          # the lister and at least one worker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_group_gone(proc.pid, timeout=5)               # was: two processes blocked forever
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert snapshot(dst) == snapshot(src) and not list(dst.rglob(".resync-tmp-*"))
