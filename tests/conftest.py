import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

NOJIT = os.environ.get("NUMBA_DISABLE_JIT") == "1"


def pytest_collection_modifyitems(config, items):
    # Under NUMBA_DISABLE_JIT=1 only the small kernel tests marked `nojit` run.
    if NOJIT:
        skip = pytest.mark.skip(reason="needs compiled kernels (NUMBA_DISABLE_JIT=1)")
        for item in items:
            if "nojit" not in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def edited(rng, basis: np.ndarray, edits: int, span: int = 50) -> np.ndarray:
    """basis with ``edits`` random inserts, deletes and replacements of up to ``span`` bytes."""
    out = basis.copy()
    for _ in range(edits):
        n = int(rng.integers(1, span + 1))
        pos = int(rng.integers(0, out.shape[0] + 1))
        kind = int(rng.integers(0, 3))
        fresh = rng.integers(0, 256, n, dtype=np.uint8)
        if kind == 0:
            out = np.concatenate([out[:pos], fresh, out[pos:]])
        elif kind == 1:
            out = np.concatenate([out[:pos], out[pos + n:]])
        else:
            out = np.concatenate([out[:pos], fresh, out[pos + n:]])
    return out
