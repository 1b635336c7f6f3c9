#!/usr/bin/env python3
"""Seeded test-data generator for resync's benchmarks and `make run`.

    gen.py file --size 1GiB --edits 400 --edit-len 27000 --seed 1 BASIS NEW
    gen.py file --size 64MiB --pattern repeat --edits 50 --seed 2 BASIS NEW
    gen.py tree --files 20000 --big 2 --seed 1 DIR
    gen.py tree --dense 200x100 DIR
    gen.py change --fraction 0.01 --seed 2 DIR

``random``: BASIS is random bytes. ``repeat``: BASIS is one random 8 KiB block
repeated (every block has the same weak sum: the adversarial case). ``mixed``:
segments of every content kind below. NEW is BASIS with ``edits`` random
inserts, deletes and replacements of ``edit-len`` bytes.

Trees and the tests' data use a realistic mix of content by default (a bundle
bug once hid behind test data that never compressed): random bytes, text (log
lines), runs of zeros, sparse files (holes), repeated blocks, empty files, and
files that are a mix of these; trees also hold a few odd names (spaces, a
newline, non-ASCII, bytes that are not UTF-8, a 255-byte name). The tests draw
from the same functions (``content``, ``write_file``, ``ODD_NAMES``).
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


# -- content -------------------------------------------------------------------

KINDS = ("random", "text", "zeros", "sparse", "repeat", "empty", "mixed")
# how often each kind is picked for a file of a generated tree
WEIGHTS = {"random": 0.25, "text": 0.3, "zeros": 0.05, "sparse": 0.05, "repeat": 0.1, "empty": 0.05,
           "mixed": 0.2}

# Names a tree should hold besides plain ones (bytes: the file system's names).
ODD_NAMES = [b"with space", b"-leading-dash", b"caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac", b"not-utf8-\xff\xfe",
             b"new\nline", b"tab\there", b"back\\slash", b"n" * 255, b".hidden", b"#hash;semi'quote\""]

_WORDS = ("request worker user file path error warning sync delta block signature stripe shard parity "
          "connect timeout retry bytes ok failed done queue cache index commit rename fsync open close "
          "read write scan match literal copy insert module peer device id status").split()
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


_POOL: list = []


def _line_pool(count: int = 4096) -> np.ndarray:
    """Distinct log lines (bytes) that text is drawn from; made once, from a fixed seed."""
    if _POOL:
        return _POOL[0]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        words = " ".join(_WORDS[j] for j in rng.integers(0, len(_WORDS), int(rng.integers(2, 9))))
        lines.append((f"2026-11-{1 + i % 30:02d} {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:"
                      f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d} "
                      f"{_LEVELS[int(rng.integers(0, len(_LEVELS)))]} worker-{int(rng.integers(0, 16))}"
                      f"[{int(rng.integers(100, 99999))}]: {words} id={int(rng.integers(0, 1 << 32)):08x} "
                      f"in {int(rng.integers(0, 5000))} ms\n").encode())
    _POOL.append(np.array(lines, dtype=object))
    return _POOL[0]


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    pool = _line_pool()
    parts, total = [], 0
    while total < size:
        picked = b"".join(pool[rng.integers(0, len(pool), max(16, (size - total) // 60))])
        parts.append(picked)
        total += len(picked)
    return np.frombuffer(b"".join(parts)[:size], np.uint8).copy()


def _islands(rng: np.random.Generator, size: int) -> list[tuple[int, np.ndarray]]:
    """(offset, bytes) of the few data islands of a sparse file: its start,
    its end and some places between; the rest is holes."""
    if size == 0:
        return []
    spots = {0, max(0, size - 512)} | {int(x) for x in rng.integers(0, size, int(rng.integers(0, 4)))}
    out = []
    for off in sorted(spots):
        n = min(size - off, int(rng.integers(1, 513)))
        out.append((off, rng.integers(0, 256, n, dtype=np.uint8)))
    return out


def content(rng: np.random.Generator, size: int, kind: str = "mixed") -> np.ndarray:
    """``size`` bytes (uint8 array) of one content kind (see KINDS)."""
    if kind == "random":
        return rng.integers(0, 256, size, dtype=np.uint8)
    if kind == "text":
        return _text(rng, size)
    if kind in ("zeros", "empty"):
        return np.zeros(size if kind == "zeros" else 0, np.uint8)
    if kind == "sparse":
        out = np.zeros(size, np.uint8)
        for off, data in _islands(rng, size):
            out[off:off + data.shape[0]] = data
        return out
    if kind == "repeat":
        block = rng.integers(0, 256, int(rng.choice([64, 700, 4096, 8192])), dtype=np.uint8)
        return np.resize(block, size)
    if kind == "mixed":
        parts, total = [], 0
        while total < size:
            n = min(size - total, int(np.exp(rng.uniform(np.log(16), np.log(max(size, 17))))))
            parts.append(content(rng, n, str(rng.choice(["random", "text", "zeros", "repeat"]))))
            total += n
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    raise ValueError(f"unknown content kind {kind!r}")


def pick_kind(rng: np.random.Generator) -> str:
    return str(rng.choice(list(WEIGHTS), p=list(WEIGHTS.values())))


def write_file(path, rng: np.random.Generator, size: int, kind: str = "mixed") -> None:
    """Write a file of ``size`` bytes of ``kind``; ``sparse`` files get real
    holes (only their data islands are written)."""
    import os
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if kind == "sparse":
            os.ftruncate(fd, size)
            for off, data in _islands(rng, size):
                os.pwrite(fd, data.tobytes(), off)
            return
        data = content(rng, size, kind)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def make_basis(rng: np.random.Generator, size: int, pattern: str) -> np.ndarray:
    if pattern == "repeat":
        block = rng.integers(0, 256, 8192, dtype=np.uint8)
        return np.resize(block, size)
    if pattern == "mixed":
        return content(rng, size, "mixed")
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


def make_tree(root: str, files: int, big: int, big_size: int, seed: int, mix: str = "mixed") -> int:
    """``files`` files of 200 B .. 20 kB (log-uniform) in a few hundred nested
    directories, plus ``big`` files of ``big_size`` bytes. ``mix="mixed"``:
    each file's content kind is drawn by WEIGHTS (big files are ``mixed``) and
    a few files get odd names; ``"random"``: random bytes only (the content of
    the benchmark figures recorded before session 5). Returns the bytes written."""
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
    total = 0
    if mix == "random":
        pool = rng.integers(0, 256, int(sizes.max()) + (1 << 16), dtype=np.uint8)
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
    odd = {int(i): name for i, name in zip(rng.choice(files, min(files, len(ODD_NAMES)), replace=False),
                                           ODD_NAMES)}
    for i, size in enumerate(sizes.tolist()):
        d = dirs[int(rng.integers(0, len(dirs)))]
        name = odd.get(i, f"file{i:06d}.dat".encode())
        kind = pick_kind(rng)
        write_file(os.path.join(os.fsencode(d), name), rng, 0 if kind == "empty" else size, kind)
        total += 0 if kind == "empty" else size
    for i in range(big):
        write_file(os.path.join(root, f"big{i}.bin"), rng, big_size, "mixed")
        total += big_size
    return total


def make_dense_tree(root: str, dirs: int, per_dir: int, seed: int, lo: int = 300, hi: int = 18_000,
                    mix: str = "mixed") -> int:
    """``dirs`` directories of ``per_dir`` small files each (sizes uniform in
    [lo, hi]): the shape where per-entry costs dominate. Returns the bytes written."""
    import os
    rng = np.random.default_rng(seed)
    total = 0
    for d in range(dirs):
        path = os.path.join(root, f"d{d:04d}")
        os.makedirs(path, exist_ok=True)
        for i, size in enumerate(rng.integers(lo, hi + 1, per_dir).tolist()):
            kind = pick_kind(rng) if mix == "mixed" else "random"
            write_file(os.path.join(path, f"f{i:04d}"), rng, 0 if kind == "empty" else size, kind)
            total += 0 if kind == "empty" else size
    return total


def change_tree(root: str, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the small files (new random content) and edit
    every big file in place (a few 27 kB replacements). Returns files changed."""
    import os
    rng = np.random.default_rng(seed)
    small, big = [], []
    for dirpath, _, names in os.walk(os.fsencode(root)):
        for n in sorted(names):
            path = os.path.join(dirpath, n)
            if os.path.isfile(path) and not os.path.islink(path):     # links and fifos stay as they are
                (big if n.startswith(b"big") else small).append(path)
    small.sort()
    pick = rng.choice(len(small), size=max(1, int(len(small) * fraction)), replace=False)
    for i in pick.tolist():
        size = os.path.getsize(small[i]) or int(rng.integers(1, 5000))
        write_file(small[i], rng, size, pick_kind(rng))
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
    f.add_argument("--pattern", choices=("random", "repeat", "mixed"), default="mixed")
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
    t.add_argument("--content", choices=("mixed", "random"), default="mixed",
                   help="mixed: the realistic mix (default); random: random bytes only")
    t.add_argument("--dense", metavar="DIRSxFILES", default=None,
                   help="instead: DIRS directories of FILES files of 300 B .. 18 kB each (e.g. 200x100)")
    t.add_argument("dir")
    c = sub.add_parser("change", help="change a fraction of a generated tree's files")
    c.add_argument("--fraction", type=float, default=0.01)
    c.add_argument("--seed", type=int, default=2)
    c.add_argument("dir")
    args = ap.parse_args(argv)
    if args.what == "tree":
        if args.dense:
            dirs, per_dir = (int(x) for x in args.dense.lower().split("x"))
            total = make_dense_tree(args.dir, dirs, per_dir, args.seed, mix=args.content)
            print(f"{dirs * per_dir} files in {dirs} directories, {total / 1e6:.1f} MB in {args.dir}")
            return 0
        total = make_tree(args.dir, args.files, args.big, args.big_size, args.seed, args.content)
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
