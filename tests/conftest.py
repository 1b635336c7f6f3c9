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


@pytest.fixture(autouse=True)
def every_bundle_reads_back(monkeypatch, tmp_path_factory):
    """Every bundle the suite's in-process ``pack`` calls write is read again
    after the test, from its final name, with everything unpack checks (every
    shard, the trailer, every record decoded); one made without a tree
    signature is also unpacked. Bundles a test changed on purpose (damage,
    truncation) are left to that test."""
    import blake3

    from resync.bundle import pack as pack_module
    written = []
    real = pack_module._read_back

    def spy(fd, out, bundle_id, entries):
        real(fd, out, bundle_id, entries)
        digest = blake3.blake3()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        written.append((out, digest.digest()))

    monkeypatch.setattr(pack_module, "_read_back", spy)
    yield
    from resync.bundle.shards import open_bundle
    from resync.bundle.records import check_bundle
    from resync.bundle.unpack import unpack
    for out, digest in written:
        try:
            with open(out, "rb") as f:
                if blake3.blake3(f.read()).digest() != digest:
                    continue                  # changed since: the test's own business
        except FileNotFoundError:
            continue
        with open_bundle(out) as reader:
            health, info = check_bundle(reader)
        assert not any(h.bad for h in health), out
        if info.against_id is None:
            unpack(out, str(tmp_path_factory.mktemp("reread")))


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
