"""Atomic replacement: old contents survive any failure; no temp files remain."""
import os
import stat
from pathlib import Path

import pytest

from resync.errors import FileError
from resync.fs import TEMP_PREFIX, atomic_output, write_all


def _temps(d):
    return [p for p in os.listdir(d) if p.startswith(TEMP_PREFIX)]


def test_replaces_and_keeps_mode(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_output(target) as fd:
        write_all(fd, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _temps(tmp_path) == []


def test_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as fd:
            write_all(fd, b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_new_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "n") as fd:
            write_all(fd, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "n").stat().st_mode) == 0o640


def test_directory_target_is_a_file_error(tmp_path):
    with pytest.raises(FileError, match="is a directory"):
        with atomic_output(tmp_path) as fd:
            write_all(fd, b"x")


def _stream(path, payload: bytes, buffer_size: int, direct: bool = True) -> bool:
    import numpy as np

    from resync.fs import StreamWriter
    with atomic_output(path) as fd:
        w = StreamWriter(fd, buffer_size, buffers=2, direct=direct)
        try:
            for lo in range(0, len(payload), buffer_size):
                buf = w.get()
                part = np.frombuffer(payload[lo:lo + buffer_size], np.uint8)
                buf[:part.shape[0]] = part
                w.put(buf, part.shape[0])
            used_direct = w.direct
            w.finish()
        finally:
            w.close()
    return used_direct


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 8192, 3 * 8192 + 17])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_stream_writer_writes_exact_bytes(tmp_path, size, where):
    # O_DIRECT where the file system takes it (ext4 here), plain writes on tmpfs;
    # a short last buffer is written without O_DIRECT. Both give the same bytes.
    base = tmp_path if where == "disk" else Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no /dev/shm")
    path = base / f"resync-stream-{os.getpid()}-{size}"
    payload = os.urandom(size)
    try:
        _stream(path, payload, 8192)
        assert path.read_bytes() == payload
        assert not [p for p in base.iterdir() if p.name.startswith(TEMP_PREFIX)]
    finally:
        path.unlink(missing_ok=True)


def test_stream_writer_error_reaches_caller_and_keeps_old_file(tmp_path):
    import numpy as np

    from resync.fs import StreamWriter
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(FileError):
        with atomic_output(target):
            ro = os.open(target, os.O_RDONLY)        # writes to it fail with EBADF
            w = StreamWriter(ro, 4096, buffers=2)
            try:
                for _ in range(4):
                    buf = w.get()
                    buf[:] = np.uint8(1)
                    w.put(buf, 4096)
                w.finish()
            finally:
                w.close()
                os.close(ro)
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("durable,fsyncs", [(True, 2), (False, 0)])
def test_durable_flag_controls_the_fsyncs(tmp_path, monkeypatch, durable, fsyncs):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    target = tmp_path / "f"
    with atomic_output(target, durable) as fd:
        write_all(fd, b"content")
    assert target.read_bytes() == b"content"
    assert len(calls) == fsyncs                      # file and directory, or neither
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
