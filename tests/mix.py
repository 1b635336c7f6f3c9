"""The tests' data: the realistic content mix of ``bench/gen.py`` (random
bytes, text, runs of zeros, sparse files, repeated blocks, empty files, odd
names), as plain functions and as hypothesis strategies. Round-trip tests draw
from here so that no test sees only incompressible data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gen  # noqa: E402

KINDS = gen.KINDS
ODD_NAMES = gen.ODD_NAMES


def data(seed: int, size: int, kind: str = "mixed") -> bytes:
    """``size`` bytes of one content kind (``empty`` gives b"")."""
    return gen.content(np.random.default_rng(seed), size, kind).tobytes()


def array(seed: int, size: int, kind: str = "mixed") -> np.ndarray:
    return gen.content(np.random.default_rng(seed), size, kind)


def write(path, seed: int, size: int, kind: str = "mixed") -> None:
    """A file of ``kind``; ``sparse`` ones get real holes."""
    gen.write_file(path, np.random.default_rng(seed), size, kind)


def pick_kind(rnd) -> str:
    """A content kind drawn with the tree generator's weights (``rnd``: random.Random)."""
    return rnd.choices(list(gen.WEIGHTS), weights=list(gen.WEIGHTS.values()))[0]


def odd_name(rnd, i: int) -> str:
    """One of the odd names, made unique by ``i``; at most 240 bytes, so the
    tests' renames (NAME-renamed) stay within NAME_MAX."""
    raw = rnd.choice(ODD_NAMES)
    suffix = f"-{i}".encode()
    return os.fsdecode(raw[:240 - len(suffix)] + suffix)


def mixed_bytes(max_size: int = 4096, min_size: int = 0):
    """Bytes of every content kind, or arbitrary bytes (hypothesis shrinks
    the seed, size and kind)."""
    kinds = [k for k in KINDS if k != "empty" or min_size == 0]
    drawn = st.builds(data, st.integers(0, 2**32 - 1), st.integers(min_size, max_size), st.sampled_from(kinds))
    return st.one_of(drawn, st.binary(min_size=min_size, max_size=max_size))


def edit_ops(max_pos: int, max_chunk: int, max_edits: int):
    """Edits for ``apply_edits``: (0 insert / 1 delete / 2 replace, position, bytes of the mix)."""
    return st.lists(st.tuples(st.integers(0, 2), st.integers(0, max_pos), mixed_bytes(max_chunk)),
                    max_size=max_edits)


def apply_edits(data: bytes, ops) -> bytes:
    """``data`` with each (op, position, chunk) of ``edit_ops`` applied in turn
    (positions past the end are the end)."""
    out = bytearray(data)
    for op, pos, chunk in ops:
        pos = min(pos, len(out))
        if op == 0:
            out[pos:pos] = chunk
        elif op == 1:
            del out[pos:pos + len(chunk) + 1]
        else:
            out[pos:pos + len(chunk)] = chunk
    return bytes(out)
