#!/usr/bin/env python3
"""Seeded test-data generator for resync's benchmarks and `make run`.

    gen.py file --size 1GiB --edits 400 --edit-len 27000 --seed 1 BASIS NEW
    gen.py file --size 64MiB --pattern repeat --edits 50 --seed 2 BASIS NEW

``random``: BASIS is random bytes. ``repeat``: BASIS is one random 8 KiB block
repeated (every block has the same weak sum: the adversarial case). NEW is BASIS
with ``edits`` random inserts, deletes and replacements of ``edit-len`` bytes.
"""
import argparse
import re
import sys

import numpy as np

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6,
          "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def make_basis(rng: np.random.Generator, size: int, pattern: str) -> np.ndarray:
    if pattern == "repeat":
        block = rng.integers(0, 256, 8192, dtype=np.uint8)
        return np.resize(block, size)
    return rng.integers(0, 256, size, dtype=np.uint8)


def edit(rng: np.random.Generator, basis: np.ndarray, edits: int, edit_len: int):
    """Yield the pieces of the new file: basis slices and fresh random bytes."""
    size = basis.shape[0]
    if edits == 0 or size == 0:
        yield basis
        return
    positions = np.sort(rng.choice(max(size - edit_len, 1), size=edits, replace=False))
    kinds = rng.integers(0, 3, edits)      # 0 insert, 1 delete, 2 replace
    cursor = 0
    for pos, kind in zip(positions.tolist(), kinds.tolist()):
        if pos < cursor:
            continue
        yield basis[cursor:pos]
        if kind == 0:
            yield rng.integers(0, 256, edit_len, dtype=np.uint8)
            cursor = pos
        elif kind == 1:
            cursor = pos + edit_len
        else:
            yield rng.integers(0, 256, edit_len, dtype=np.uint8)
            cursor = pos + edit_len
    yield basis[cursor:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("file", help="a basis file and an edited new file")
    f.add_argument("--size", type=parse_size, default=parse_size("64MiB"))
    f.add_argument("--pattern", choices=("random", "repeat"), default="random")
    f.add_argument("--edits", type=int, default=40)
    f.add_argument("--edit-len", type=int, default=27000)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("basis")
    f.add_argument("new")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    basis = make_basis(rng, args.size, args.pattern)
    basis.tofile(args.basis)
    with open(args.new, "wb") as out:
        for piece in edit(rng, basis, args.edits, args.edit_len):
            out.write(memoryview(piece))
    return 0


if __name__ == "__main__":
    sys.exit(main())
