"""Atomic replacement: old contents survive any failure; no temp files remain."""
import os
import stat

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
