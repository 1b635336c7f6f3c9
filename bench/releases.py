#!/usr/bin/env python3
"""Real software releases for the benchmarks: pairs of consecutive wheels from PyPI.

    python bench/releases.py [--dir bench/.data/releases] [PAIR ...]   # download and unpack (cached)

A nightly mirror mostly moves updates: a new release of a software tree in
place of the old one. A wheel is a zip of the installed tree, so unpacking two
consecutive releases gives the two trees an upgrade turns into each other:
most files changed a little or not at all (only their mtime), some added,
some removed. ``release_tree(pair, 0|1, cache)`` returns the unpacked tree of
the older or newer release, downloading it with ``pip download`` the first
time (the only network access; the registry is reachable here).
"""
import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (older, newer): consecutive releases, a feature release and patch releases.
PAIRS = {
    "sympy": ("sympy==1.12", "sympy==1.13.1"),           # ~1,500 files, 25 MB: a feature release
    "django": ("django==5.1.3", "django==5.1.4"),        # ~2,800 files: a patch release
    "pandas": ("pandas==2.2.2", "pandas==2.2.3"),        # ~1,500 files, 44 MB, with native libraries
}


def release_tree(pair: str, which: int, cache: Path) -> Path:
    """The unpacked tree of release ``which`` (0 older, 1 newer) of ``pair``."""
    spec = PAIRS[pair][which]
    out = cache / spec.replace("==", "-")
    if (out / ".complete").exists():
        return out / "tree"
    dl = cache / "wheels"
    dl.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", str(dl), spec], capture_output=True, text=True)
    wheels = [w for w in dl.glob("*.whl") if w.name.lower().startswith(f"{name.lower()}-{version}-")]
    if not wheels:
        raise SystemExit(f"cannot download {spec}: {r.stderr.strip() or r.stdout.strip()}")
    tree = out / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tree)
    (out / ".complete").touch()
    return tree


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=HERE / ".data" / "releases")
    ap.add_argument("pairs", nargs="*", default=list(PAIRS))
    args = ap.parse_args()
    for pair in args.pairs:
        for which in (0, 1):
            tree = release_tree(pair, which, args.dir)
            files = [p for p in tree.rglob("*") if p.is_file()]
            print(f"{PAIRS[pair][which]}: {len(files):,} files, {sum(p.stat().st_size for p in files):,} bytes "
                  f"in {tree}")


if __name__ == "__main__":
    main()
