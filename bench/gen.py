#!/usr/bin/env python3
"""Seeded test-data generator for resync's benchmarks and `make run`.

    gen.py file --size 1GiB --edits 400 --edit-len 27000 --seed 1 BASIS NEW
    gen.py file --size 64MiB --pattern repeat --edits 50 --seed 2 BASIS NEW
    gen.py tree --files 20000 --big 2 --seed 1 DIR
    gen.py change --fraction 0.01 --seed 2 DIR

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


def make_tree(root: str, files: int, big: int, big_size: int, seed: int) -> int:
    """``files`` files of 200 B .. 20 kB (log-uniform) in a few hundred nested
    directories, plus ``big`` files of ``big_size`` bytes. Returns the bytes written."""
    import os
    rng = np.random.default_rng(seed)
    ndirs = max(1, files // 40)
    dirs = [root]
    for i in range(1, ndirs):
        parent = dirs[int(rng.integers(0, len(dirs)))] if len(dirs) < 8 or rng.random() < 0.5 else dirs[-1]
        dirs.append(os.path.join(parent, f"dir{i:04d}"))
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    sizes = np.exp(rng.uniform(np.log(200), np.log(20_000), files)).astype(np.int64)
    pool = rng.integers(0, 256, int(sizes.max()) + (1 << 16), dtype=np.uint8)
    total = 0
    for i, size in enumerate(sizes.tolist()):
        d = dirs[int(rng.integers(0, len(dirs)))]
        off = int(rng.integers(0, 1 << 16))
        with open(os.path.join(d, f"file{i:06d}.dat"), "wb") as f:
            f.write(memoryview(pool[off:off + size]))
        total += size
    for i in range(big):
        rng.integers(0, 256, big_size, dtype=np.uint8).tofile(os.path.join(root, f"big{i}.bin"))
        total += big_size
    return total


def change_tree(root: str, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the small files (new random content) and edit
    every big file in place (a few 27 kB replacements). Returns files changed."""
    import os
    rng = np.random.default_rng(seed)
    small, big = [], []
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            path = os.path.join(dirpath, n)
            if os.path.isfile(path) and not os.path.islink(path):     # links and fifos stay as they are
                (big if n.startswith("big") else small).append(path)
    small.sort()
    pick = rng.choice(len(small), size=max(1, int(len(small) * fraction)), replace=False)
    for i in pick.tolist():
        size = os.path.getsize(small[i])
        rng.integers(0, 256, size, dtype=np.uint8).tofile(small[i])
    for path in big:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            for pos in np.sort(rng.integers(0, max(size - 27000, 1), 8)).tolist():
                f.seek(pos)
                f.write(rng.integers(0, 256, 27000, dtype=np.uint8).tobytes())
    return len(pick) + len(big)


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
    t = sub.add_parser("tree", help="a tree of many small files and a few big ones")
    t.add_argument("--files", type=int, default=20000)
    t.add_argument("--big", type=int, default=2)
    t.add_argument("--big-size", type=parse_size, default=parse_size("50MB"))
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("dir")
    c = sub.add_parser("change", help="change a fraction of a generated tree's files")
    c.add_argument("--fraction", type=float, default=0.01)
    c.add_argument("--seed", type=int, default=2)
    c.add_argument("dir")
    args = ap.parse_args(argv)
    if args.what == "tree":
        total = make_tree(args.dir, args.files, args.big, args.big_size, args.seed)
        print(f"{args.files + args.big} files, {total / 1e6:.1f} MB in {args.dir}")
        return 0
    if args.what == "change":
        print(f"{change_tree(args.dir, args.fraction, args.seed)} files changed in {args.dir}")
        return 0
    rng = np.random.default_rng(args.seed)
    basis = make_basis(rng, args.size, args.pattern)
    basis.tofile(args.basis)
    with open(args.new, "wb") as out:
        for piece in edit(rng, basis, args.edits, args.edit_len):
            out.write(memoryview(piece))
    return 0


if __name__ == "__main__":
    sys.exit(main())
