#!/usr/bin/env python3
"""resync's Reed-Solomon erasure code vs zfec and pyeclib (ISA-L), in one process.

    .venv/bin/python bench/bench_erasure.py [--size 64MiB] [--repeat 5] [--seed 0] [--json]

Cases: RS(50,10) and RS(50,25) over the same seeded random data (64 MiB by
default), laid out as a (k, L) uint8 array with L = ceil(size / k) and the tail
zero-padded. Every tool gets those same bytes in its own API's form:

    resync   ReedSolomon(k, m).encode(the (k, L) array) -> (m, L) parity
    zfec     Encoder(k, k + m).encode(k data blocks as bytes, parity numbers)
    pyeclib  ECDriver(k, m, ec_type="isa_l_rs_vand").encode(the k*L bytes)
             (falls back to "isa_l_rs_cauchy" if vand cannot do the case)

Decode loses the first m data shards. zfec and pyeclib get exactly the k
survivors (k - m data + m parity); resync gets its full list of k + m entries
with None at the lost positions, in two forms: rows of one (k + m, L) array
(how resync's bundle reader holds a stripe) and separate ``bytes`` objects.
Every decode result is compared with the original data (a mismatch stops the
run). resync also runs with RESYNC_GF_KERNEL=portable (read at each call) as
extra rows, so both GF(2^8) kernel paths show.

Timing: time.perf_counter around each call; one warm-up call per row first
(excluded: it pays one-off costs such as resync inverting the recovery
matrix for a new erasure pattern); then --repeat rounds in which every row
of a (case, operation) group runs once, in turn, so that noise on a shared
machine hits all tools alike. Reported: best and median MB/s (10^6 bytes of
data per second; parity bytes are not counted), and resync / pyeclib and
resync / zfec from the medians. resync splits large inputs across all cores
(threads); zfec and pyeclib run on one core. The targets (encode >= 3x
pyeclib/ISA-L and >= 10x zfec, decode >= 2x pyeclib/ISA-L) are checked
against resync's default kernel rows.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen import parse_size  # noqa: E402

from resync import erasure  # noqa: E402
from resync.erasure import ReedSolomon  # noqa: E402
from resync.parallel import thread_count  # noqa: E402

CASES = ((50, 10), (50, 25))
KERNEL_VAR = "RESYNC_GF_KERNEL"
PYECLIB_TYPES = ("isa_l_rs_vand", "isa_l_rs_cauchy")
# Targets: (operation, competitor, minimum ratio resync / competitor).
TARGETS = (("encode", "pyeclib", 3.0), ("encode", "zfec", 10.0), ("decode", "pyeclib", 2.0))


# --------------------------------------------------------------------------- timing

@dataclass
class Row:
    """One implementation of one operation on one case: what runs and how it went."""
    case: str                       # "RS(50,10)"
    op: str                         # "encode" | "decode"
    tool: str                       # "resync" | "zfec" | "pyeclib"
    label: str                      # what the table prints
    threads: int
    call: Callable[[], Any] | None  # None: the tool could not run (see error)
    check: Callable[[Any], None] = lambda result: None
    kernel: str | None = None       # resync only: RESYNC_GF_KERNEL for this row (None: as set)
    primary: bool = False           # resync's default-kernel rows: the targets apply to these
    error: str | None = None
    warmup_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    result: Any = None              # the last call's result (encode feeds decode)

    def run_once(self) -> float:
        with gf_kernel(self.kernel):
            start = time.perf_counter()
            result = self.call()
            elapsed = time.perf_counter() - start
        self.check(result)
        self.result = result
        return elapsed

    def median(self) -> float:
        return statistics.median(self.times_s)


@contextmanager
def gf_kernel(value: str | None):
    """RESYNC_GF_KERNEL=value for the duration (resync reads it at each call)."""
    if value is None:
        yield
        return
    old = os.environ.get(KERNEL_VAR)
    os.environ[KERNEL_VAR] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNEL_VAR]
        else:
            os.environ[KERNEL_VAR] = old


def measure(rows: list[Row], repeat: int) -> None:
    """Warm-up call per row, then ``repeat`` rounds of one call per row."""
    runnable = [r for r in rows if r.call is not None]
    for r in runnable:
        r.warmup_s = r.run_once()
    for _ in range(repeat):
        for r in runnable:
            r.times_s.append(r.run_once())


def verify(ok: bool, what: str) -> None:
    """Fail loudly (and also under python -O, unlike assert)."""
    if not ok:
        raise AssertionError(f"verification failed: {what}")


# --------------------------------------------------------------------------- tools

def make_data(size: int, k: int, seed: int) -> np.ndarray:
    """``size`` seeded random bytes as a C-contiguous (k, ceil(size / k)) array, tail zeroed."""
    length = max(1, math.ceil(size / k))
    data = np.zeros(k * length, np.uint8)
    data[:size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return data.reshape(k, length)


def open_pyeclib(k: int, m: int, buf: bytes) -> tuple[Any, str | None, list[str]]:
    """The first ISA-L ec_type that round-trips ``buf`` with the first m data
    fragments lost: (driver, ec_type, notes on the types that failed);
    (None, None, notes) if none does."""
    try:
        from pyeclib.ec_iface import ECDriver
    except Exception as exc:        # ImportError, or a missing liberasurecode
        return None, None, [f"pyeclib unavailable: {type(exc).__name__}: {exc}"]
    notes = []
    for ec_type in PYECLIB_TYPES:
        try:
            driver = ECDriver(k=k, m=m, ec_type=ec_type)
            if driver.decode(driver.encode(buf)[m:]) != buf:
                raise ValueError("round trip returned different bytes")
            return driver, ec_type, notes
        except Exception as exc:
            notes.append(f"{ec_type}: {type(exc).__name__}: {exc}")
    return None, None, notes


def open_zfec(k: int, m: int) -> tuple[Any, Any, str | None]:
    """zfec's encoder and decoder for k of k + m, or (None, None, reason)."""
    try:
        import zfec
        return zfec.Encoder(k, k + m), zfec.Decoder(k, k + m), None
    except Exception as exc:
        return None, None, f"zfec unavailable: {type(exc).__name__}: {exc}"


def loaded_library(name: str) -> str | None:
    """Path of the shared library ``name`` (e.g. "libisal": libisal.so.2, or a
    wheel's bundled libisal-<tag>.so.2) mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                base = os.path.basename(path)
                if base.startswith(name) and base[len(name):len(name) + 1] in (".", "-"):
                    return path
    except OSError:
        pass
    return None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- one case

def run_case(k: int, m: int, data: np.ndarray, repeat: int) -> tuple[list[Row], dict]:
    """Encode then decode rows for RS(k, m) on ``data`` (k, L); and facts to print."""
    n = k + m
    case = f"RS({k},{m})"
    length = data.shape[1]
    blocks = tuple(row.tobytes() for row in data)   # zfec: the k primary blocks
    buf = data.tobytes()                            # pyeclib: the whole buffer
    rs = ReedSolomon(k, m)
    threads = thread_count()
    with gf_kernel("portable"):
        portable = erasure.describe_kernel()
    default = erasure.describe_kernel()
    encoder, decoder, zfec_error = open_zfec(k, m)
    driver, ec_type, pyeclib_notes = open_pyeclib(k, m, buf)
    pyeclib_error = None if driver is not None else "; ".join(pyeclib_notes)
    zfec_label = f"zfec {version('zfec')}"
    pyeclib_label = f"pyeclib {version('pyeclib')} {ec_type or 'ISA-L'}"

    # ---- encode
    def check_parity(parity):
        verify(parity.shape == (m, length) and parity.dtype == np.uint8, f"{case} resync parity shape")

    def check_zfec_parity(parity):
        verify(len(parity) == m and all(len(p) == length for p in parity), f"{case} zfec parity shape")

    def check_fragments(fragments):
        verify(len(fragments) == n, f"{case} pyeclib fragment count")

    parity_nums = tuple(range(k, n))
    encode = [
        Row(case, "encode", "resync", f"resync {default}", threads,
            lambda: rs.encode(data), check_parity, primary=True),
        Row(case, "encode", "resync", f"resync {portable}, forced", threads,
            lambda: rs.encode(data), check_parity, kernel="portable"),
        Row(case, "encode", "zfec", zfec_label, 1,
            (lambda: encoder.encode(blocks, parity_nums)) if encoder else None, check_zfec_parity,
            error=zfec_error),
        Row(case, "encode", "pyeclib", pyeclib_label, 1,
            (lambda: driver.encode(buf)) if driver else None, check_fragments, error=pyeclib_error),
    ]
    measure(encode, repeat)
    parity = encode[0].result
    verify(np.array_equal(encode[1].result, parity), f"{case} portable and default kernels' parity differ")
    zfec_parity, fragments = encode[2].result, encode[3].result
    for r in encode:
        r.result = None

    # ---- decode: the first m data shards lost
    stripe = np.empty((n, length), np.uint8)      # one stripe as resync's bundle reader holds it
    stripe[:k], stripe[k:] = data, parity
    lost = [None] * m
    shards_rows = lost + list(stripe[m:])                       # views into ``stripe``
    shards_bytes = lost + [row.tobytes() for row in stripe[m:]]
    del parity
    # zfec's decode moves primary blocks to their own index *inside the
    # sequence it is given* (even a tuple) but leaves the block numbers as
    # they were, so reusing one sequence decodes garbage from the second call
    # on: every call gets a fresh tuple (k pointers: nothing to measure).
    zfec_blocks = list(blocks[m:]) + list(zfec_parity or ())
    zfec_nums = list(range(m, n))
    survivors = fragments[m:] if fragments else None

    def check_data(out):
        verify(out.shape == data.shape and np.array_equal(out, data), f"{case} resync decode != data")

    def check_blocks(out):
        verify(len(out) == k and all(bytes(a) == b for a, b in zip(out, blocks)), f"{case} zfec decode != data")

    def check_buf(out):
        verify(out == buf, f"{case} pyeclib decode != data")

    decode = [
        Row(case, "decode", "resync", f"resync {default}, rows of one (k+m, L) array", threads,
            lambda: rs.decode(shards_rows), check_data, primary=True),
        Row(case, "decode", "resync", f"resync {default}, separate bytes shards", threads,
            lambda: rs.decode(shards_bytes), check_data, primary=True),
        Row(case, "decode", "resync", f"resync {portable}, forced, rows of one array", threads,
            lambda: rs.decode(shards_rows), check_data, kernel="portable"),
        Row(case, "decode", "zfec", zfec_label, 1,
            (lambda: decoder.decode(tuple(zfec_blocks), tuple(zfec_nums))) if zfec_parity else None,
            check_blocks, error=zfec_error),
        Row(case, "decode", "pyeclib", pyeclib_label, 1,
            (lambda: driver.decode(survivors)) if survivors else None, check_buf, error=pyeclib_error),
    ]
    measure(decode, repeat)
    for r in decode:
        r.result = None

    notes = [f"pyeclib {note}" for note in pyeclib_notes] + ([zfec_error] if zfec_error else [])
    facts = {"case": case, "k": k, "m": m, "shard_bytes": length, "pyeclib_ec_type": ec_type,
             "notes": notes, "kernel_default": default, "kernel_portable": portable}
    return encode + decode, facts


# --------------------------------------------------------------------------- report

def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def ratio(row: Row, rows: list[Row], tool: str) -> float | None:
    """resync row's median speed / the ``tool`` row's median speed, same case and op."""
    if row.tool != "resync" or not row.times_s:
        return None
    for other in rows:
        if other.case == row.case and other.op == row.op and other.tool == tool and other.times_s:
            return other.median() / row.median()
    return None


def target_checks(rows: list[Row]) -> list[dict]:
    checks = []
    for row in rows:
        if not row.primary:
            continue
        for op, tool, minimum in TARGETS:
            if row.op == op:
                value = ratio(row, rows, tool)
                checks.append({"case": row.case, "row": row.label, "op": op, "versus": tool,
                               "ratio": value, "target": minimum,
                               "met": None if value is None else value >= minimum})
    return checks


def result_dicts(rows: list[Row], size: int) -> list[dict]:
    out = []
    for r in rows:
        timed = bool(r.times_s)
        out.append({
            "case": r.case, "op": r.op, "tool": r.tool, "implementation": r.label, "threads": r.threads,
            "kernel_forced": r.kernel, "error": r.error,
            "warmup_s": r.warmup_s, "times_s": r.times_s,
            "best_mb_s": mb_per_s(size, min(r.times_s)) if timed else None,
            "median_mb_s": mb_per_s(size, r.median()) if timed else None,
            "resync_over_pyeclib": ratio(r, rows, "pyeclib"),
            "resync_over_zfec": ratio(r, rows, "zfec"),
        })
    return out


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def print_table(rows: list[Row], facts: list[dict], env: dict, args) -> None:
    size = args.size
    print("Reed-Solomon erasure coding: resync vs zfec vs pyeclib (ISA-L), one process, same data")
    print(f"data: {size:,} B seeded random (seed {args.seed}) as a (k, L) uint8 array, "
          f"L = ceil(size / k), tail zero-padded")
    print(f"timing: 1 warm-up call (excluded) + {args.repeat} timed calls per row, rows interleaved; "
          f"MB/s = 10^6 data bytes/s (parity not counted)")
    print(f"cores: {env['cpus']}; resync uses {env['resync_threads']} threads for large inputs; "
          f"zfec and pyeclib run on one core (single-threaded)")
    print(f"resync kernel: {env['kernel_default']} by default; extra rows force "
          f"{KERNEL_VAR}=portable -> {env['kernel_portable']}")
    print(f"zfec {env['zfec']}; pyeclib {env['pyeclib']}, liberasurecode {env['liberasurecode'] or '?'}, "
          f"ISA-L {env['libisal'] or 'not loaded'}")
    print("decode: first m data shards lost; zfec and pyeclib get the k survivors, "
          "resync k + m entries with None at lost ones; every result verified equal to the data")

    header = ("op", "implementation", "thr", "best MB/s", "median MB/s", "resync/pyeclib", "resync/zfec")
    widths = (6, max(len(r.label) for r in rows), 3, 10, 11, 14, 11)

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    for f in facts:
        print()
        print(f"{f['case']}: k={f['k']} data + m={f['m']} parity shards of {f['shard_bytes']:,} B; "
              f"pyeclib ec_type: {f['pyeclib_ec_type'] or 'none ran'}")
        for note in f["notes"]:
            print(f"  note: {note}")
        print(line(header))
        print(line("-" * w for w in widths))
        for r in rows:
            if r.case != f["case"]:
                continue
            if not r.times_s:
                print(line((r.op, r.label, r.threads, "n/a", "", "", "")) + "  (did not run: see note)")
                continue
            print(line((r.op, r.label, r.threads, f"{mb_per_s(size, min(r.times_s)):.0f}",
                        f"{mb_per_s(size, r.median()):.0f}", fmt_ratio(ratio(r, rows, "pyeclib")),
                        fmt_ratio(ratio(r, rows, "zfec")))))

    print()
    print(f"Targets (medians, resync's default kernel {env['kernel_default']}):")
    checks = target_checks(rows)
    what = [f"{c['case']} {c['op']}{shard_form(c['row'])} vs {c['versus']}" for c in checks]
    for c, text in zip(checks, what):
        verdict = "n/a (competitor did not run)" if c["met"] is None else ("met" if c["met"] else "NOT MET")
        target = f"{c['target']:g}x"
        print(f"  {text.ljust(max(map(len, what)))}  {fmt_ratio(c['ratio']) or '-':>7}  "
              f"target >= {target:<4}  {verdict}")


def shard_form(label: str) -> str:
    """' (rows of one ... array)' from a resync decode row's label ('' for encode rows)."""
    parts = label.split(", ", 1)
    return f" ({parts[1]})" if len(parts) == 2 else ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("64MiB"),
                        help="data bytes per case, e.g. 64MiB, 1GiB, 500MB (default 64MiB)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.size < 1 or args.repeat < 1:
        parser.error("--size and --repeat must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, facts, data_by_k = [], [], {}
    for k, m in CASES:
        if k not in data_by_k:
            data_by_k[k] = make_data(args.size, k, args.seed)
        case_rows, case_facts = run_case(k, m, data_by_k[k], args.repeat)
        rows += case_rows
        facts.append(case_facts)

    env = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "resync_threads": thread_count(), "zfec_threads": 1, "pyeclib_threads": 1,
        "kernel_default": facts[0]["kernel_default"], "kernel_portable": facts[0]["kernel_portable"],
        "python": sys.version.split()[0], "numpy": np.__version__,
        "zfec": version("zfec"), "pyeclib": version("pyeclib"),
        "liberasurecode": loaded_library("liberasurecode"), "libisal": loaded_library("libisal"),
    }
    if args.json:
        json.dump({"config": {"size": args.size, "repeat": args.repeat, "seed": args.seed,
                              "cases": [list(c) for c in CASES], "lost": "first m data shards"},
                   "environment": env, "cases": facts, "results": result_dicts(rows, args.size),
                   "targets": target_checks(rows)}, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, facts, env, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
