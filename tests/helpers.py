"""Round-trip helpers over the Python API (files in a temp directory)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from resync.delta import make_delta
from resync.patch import apply_delta
from resync.signature import compute_signature, write_signature


def roundtrip(tmp: Path, basis: bytes, new: bytes, block_len: int | None = None,
              salt: bytes | None = None, threads: int = 2):
    """patch(basis, delta(sig(basis), new)); returns (result bytes, delta stats)."""
    (tmp / "basis").write_bytes(basis)
    sig = compute_signature(np.frombuffer(basis, np.uint8), block_len, salt=salt, threads=threads)
    write_signature(sig, tmp / "sig")
    stats = make_delta(sig, np.frombuffer(new, np.uint8), tmp / "delta", threads=threads)
    apply_delta(str(tmp / "basis"), str(tmp / "delta"), str(tmp / "out"), threads=threads)
    return (tmp / "out").read_bytes(), stats
