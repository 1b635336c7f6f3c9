"""Helpers for tree tests: random trees, snapshots, rsync as the reference."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path


def snapshot(root: Path, times: bool = True, root_meta: bool = True) -> dict:
    """{relpath: (type, perms, size, mtime_ns, content digest or link target)} of a tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            m = st.st_mode
            if stat.S_ISLNK(m):
                data = os.readlink(p)
            elif stat.S_ISREG(m):
                data = hashlib.blake2b(p.read_bytes()).hexdigest()
            else:
                data = ""
            out[rel] = (stat.S_IFMT(m), stat.S_IMODE(m) if not stat.S_ISLNK(m) else 0,
                        st.st_size if not stat.S_ISDIR(m) else 0,
                        st.st_mtime_ns if times else 0, data)
    if root_meta:
        st = root.stat()
        out["."] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), 0, st.st_mtime_ns if times else 0, "")
    return out


def rsync_a(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    if not shutil.which("rsync"):
        raise RuntimeError("rsync is not installed (make test installs it)")
    return subprocess.run(["rsync", "-a", *extra, f"{src}/", f"{dst}/"], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block (root only;
    the test is skipped, saying why, where none can be mounted)."""
    import pytest
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
