#!/usr/bin/env python3
"""resync's offline bundles (pack / unpack) vs rsync batch mode, whole processes, side by side.

    python bench/bench_bundle.py [--files 20000] [--big 2] [--repeat 1] [--seed 1]
                                 [--dir bench/.data] [--dst-dir DIR] [--json]

Tree (bench/gen.py tree, as bench_sync.py): --files files of 200 B .. 20 kB in
a few hundred directories plus --big 50 MB files. Each repeat regenerates the
source with the same seed (so every repeat does the same work) and runs:

1. initial: `resync pack SRC -o B` + `resync unpack B DST1` (DST1 empty) vs
   `rsync -a --only-write-batch=BATCH SRC/ EMPTY/` + `rsync -a --read-batch=BATCH DST2/`
   (DST2 empty);
2. after `gen.py change --fraction 0.01` (1 % of the small files rewritten,
   every big file edited in place, as bench_sync.py):
   `resync signature-tree DST1 -o T.sig` + `resync pack SRC --against T.sig -o B2`
   + `resync unpack B2 DST1` vs `rsync -a --only-write-batch=BATCH2 SRC/ DST2/`
   + `rsync -a --read-batch=BATCH2 DST2/`. rsync's write-batch reads DST2
   itself (it must be reachable); resync's equivalent is signature-tree, which
   is reported as its own step.

After each phase DST1 and DST2 must be identical (`diff -r`, and type, mode,
owner, size and mtime to the nanosecond of every path, the roots included) and
equal to SRC, and `resync verify` of the bundle must exit 0; the benchmark stops with
an error otherwise. Times are wall clock of whole processes
(time.perf_counter around subprocess.run; best of --repeat). resync fsyncs
what it writes (the bundle, the tree signature, every unpacked file); rsync
does not, so the tables also show each rsync step followed by `sync -f` on
what it wrote (the same guarantee). Every timed command starts with no dirty
pages (an untimed `sync` before it) and with the source in the page cache.
resync runs with --no-history, its bytecode cached as for an installed copy
(this sandbox exports PYTHONDONTWRITEBYTECODE=1), and after an untimed
warm-up run so its kernel library and parity matrices are already in its
per-machine cache. Bundles, batches and the tree signature are written next to
the destinations (--dst-dir, e.g. a tmpfs, to take the disk out of the
comparison). The bundle holds a payload (file data LZ4-compressed where that
helps, deltas, the manifest) plus Reed-Solomon parity, 10 parity shards per 50
data shards with RS(50,10) (+20 %), plus a header per shard; the table shows
both its size and its payload size next to rsync's batch file.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# resync runs as an installed copy would: with its bytecode cached (this
# sandbox exports PYTHONDONTWRITEBYTECODE=1, which makes every start compile
# resync's sources again).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
RESYNC = [sys.executable, "-m", "resync"]
GEN = [sys.executable, str(HERE / "gen.py")]
CHANGE_FRACTION = 0.01          # as bench_sync.py


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd, check=True):
    """Run ``cmd`` (untimed helper); stop the benchmark loudly if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")
    return proc


def timed(cmd) -> tuple[float, str]:
    """Wall time of one whole process, started with no dirty pages."""
    subprocess.run(["sync"], check=True)
    cmd = [str(c) for c in cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return dt, proc.stdout


def flush_time(path: Path) -> float:
    """Time of `sync -f` on the file system holding ``path`` (run right after an rsync step)."""
    t = time.perf_counter()
    subprocess.run(["sync", "-f", str(path)], check=True)
    return time.perf_counter() - t


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        path.unlink()
    subprocess.run(["sync"], check=True)


def metadata(root: Path) -> dict:
    """{path: (mode, uid, gid, size, mtime_ns)} of a tree, the root included
    (as ""); directories have size 0 (their st_size depends on the file system)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [None] + dirs + files if dirpath == str(root) else dirs + files:
            full = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(full)
            rel = os.path.relpath(full, root) if name else ""
            isdir = os.path.isdir(full) and not os.path.islink(full)
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, 0 if isdir else st.st_size, st.st_mtime_ns)
    return out


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two trees: `diff -r` on content, then metadata."""
    problems = []
    diff = run(["diff", "-r", "--no-dereference", "-q", a, b], check=False)
    if diff.returncode != 0:
        problems.append(f"diff -r {a} {b} (exit {diff.returncode}):\n" + (diff.stdout + diff.stderr)[:3000])
    ma, mb = metadata(a), metadata(b)
    for p in sorted(set(ma) | set(mb)):
        if ma.get(p) != mb.get(p):
            problems.append(f"{p or '.'}: {a}: {ma.get(p)} != {b}: {mb.get(p)} (mode, uid, gid, size, mtime_ns)")
    return problems


def check_trees(phase: str, src: Path, dst1: Path, dst2: Path) -> int:
    """Fail loudly unless DST1 (resync) == DST2 (rsync) == SRC; returns the paths compared."""
    problems = compare(dst1, dst2) + compare(src, dst1)
    if problems:
        shown = "\n  ".join(problems[:40])
        raise SystemExit(f"FAILED after {phase}: destinations differ ({len(problems)} problems)\n  {shown}")
    return len(metadata(dst1))


def tree_bytes(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size
    return files, size


def warm_up(where: Path) -> None:
    """One untimed round of every resync command on a tiny tree: compiles the
    bytecode cache and makes sure the kernel library and the RS(50,10) parity
    matrices are in resync's per-machine cache, as after any first use."""
    w = where / "warm-up"
    fresh(w)
    run([*GEN, "tree", "--files", "50", "--big", "1", "--big-size", "1MB", "--seed", "9", w / "src"])
    run([*RESYNC, "pack", w / "src", "-o", w / "b", "--no-history"])
    run([*RESYNC, "verify", w / "b", "--no-history"])
    run([*RESYNC, "unpack", w / "b", w / "dst", "--no-history"])
    run([*RESYNC, "signature-tree", w / "dst", "-o", w / "t.sig"])
    run([*GEN, "change", "--fraction", "0.1", w / "src"])
    run([*RESYNC, "pack", w / "src", "--against", w / "t.sig", "-o", w / "b2", "--no-history"])
    run([*RESYNC, "unpack", w / "b2", w / "dst", "--no-history"])
    fresh(w)


def best(results: list[dict]) -> dict:
    """Per-key minimum over repeats for times, last repeat's value otherwise."""
    out = dict(results[-1])
    for key in out:
        if key.startswith("t_"):
            out[key] = min(r[key] for r in results)
    return out


def one_repeat(args, src: Path, out: Path, seed_change: int) -> dict:
    dst1, dst2, empty = out / "resync-dst", out / "rsync-dst", out / "rsync-empty"
    b1, b2, sig = out / "initial.bundle", out / "changed.bundle", out / "dst.sig"
    batch1, batch2 = out / "initial.batch", out / "changed.batch"
    for p in (dst1, dst2, empty, b1, b2, sig, batch1, batch2, Path(f"{batch1}.sh"), Path(f"{batch2}.sh")):
        fresh(p)
    fresh(src)
    run([*GEN, "tree", "--files", args.files, "--big", args.big, "--seed", args.seed, src])
    run(["sh", "-c", f'find "{src}" -type f -exec cat {{}} + > /dev/null'])   # source in the page cache
    for p in (dst1, dst2, empty):
        p.mkdir(parents=True)
    r = {}
    r["src_files"], r["src_bytes"] = tree_bytes(src)

    # Phase 1: initial copy into empty destinations.
    r["t_pack1"], o = timed([*RESYNC, "pack", src, "-o", b1, "--json", "--no-history"])
    p1 = json.loads(o.strip().splitlines()[-1])
    r["t_wbatch1"], _ = timed(["rsync", "-a", f"--only-write-batch={batch1}", f"{src}/", f"{empty}/"])
    r["t_wbatch1_sync"] = r["t_wbatch1"] + flush_time(batch1)
    if any(empty.iterdir()):
        raise SystemExit(f"FAILED: rsync --only-write-batch wrote into {empty}")
    r["t_unpack1"], o = timed([*RESYNC, "unpack", b1, dst1, "--json", "--no-history"])
    u1 = json.loads(o.strip().splitlines()[-1])
    r["t_rbatch1"], _ = timed(["rsync", "-a", f"--read-batch={batch1}", f"{dst2}/"])
    r["t_rbatch1_sync"] = r["t_rbatch1"] + flush_time(dst2)
    r["t_verify1"], _ = timed([*RESYNC, "verify", b1, "--no-history"])      # exit 0 = intact, else FAILED
    r["paths1"] = check_trees("the initial copy", src, dst1, dst2)
    r["bundle1"], r["payload1"], r["batch1"] = b1.stat().st_size, p1["payload_bytes"], batch1.stat().st_size
    r["stripes1"], r["shard1"] = p1["stripes"], p1["shard_size"]
    r["pack1"], r["unpack1"] = p1, u1

    # Phase 2: 1 % changed; destinations as left by phase 1.
    r["changed"] = run([*GEN, "change", "--fraction", CHANGE_FRACTION, "--seed", seed_change, src]).stdout.strip()
    run(["sh", "-c", f'find "{src}" -type f -exec cat {{}} + > /dev/null'])
    r["t_sigtree"], _ = timed([*RESYNC, "signature-tree", dst1, "-o", sig])
    r["t_pack2"], o = timed([*RESYNC, "pack", src, "--against", sig, "-o", b2, "--json", "--no-history"])
    p2 = json.loads(o.strip().splitlines()[-1])
    r["t_wbatch2"], _ = timed(["rsync", "-a", f"--only-write-batch={batch2}", f"{src}/", f"{dst2}/"])
    r["t_wbatch2_sync"] = r["t_wbatch2"] + flush_time(batch2)
    r["t_unpack2"], o = timed([*RESYNC, "unpack", b2, dst1, "--json", "--no-history"])
    u2 = json.loads(o.strip().splitlines()[-1])
    r["t_rbatch2"], _ = timed(["rsync", "-a", f"--read-batch={batch2}", f"{dst2}/"])
    r["t_rbatch2_sync"] = r["t_rbatch2"] + flush_time(dst2)
    r["t_verify2"], _ = timed([*RESYNC, "verify", b2, "--no-history"])
    r["paths2"] = check_trees("the 1 % change", src, dst1, dst2)
    r["sig_bytes"] = sig.stat().st_size
    r["bundle2"], r["payload2"], r["batch2"] = b2.stat().st_size, p2["payload_bytes"], batch2.stat().st_size
    r["stripes2"], r["shard2"] = p2["stripes"], p2["shard_size"]
    r["pack2"], r["unpack2"] = p2, u2
    return r


def fmt_t(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f} s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def fmt_rate(nbytes: int, t: float | None) -> str:
    return "-" if t is None else f"{nbytes / 1e6 / t:.0f}"


def table(rows: list[tuple], src_bytes: int) -> str:
    head = ("step (resync / rsync)", "resync", "rsync", "rsync+sync", "resync/rsync", "resync/(rsync+sync)",
            "resync MB/s", "rsync MB/s")
    body = []
    for name, ts, tr, trs, *nbytes in rows:          # nbytes: rate of another size than the source's
        n = nbytes[0] if nbytes else src_bytes
        body.append((name, fmt_t(ts), fmt_t(tr), fmt_t(trs), fmt_ratio(ts, tr), fmt_ratio(ts, trs),
                     fmt_rate(n, ts), fmt_rate(n, tr)))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def sizes(bundle: int, payload: int, batch: int, stripes: int, shard: int, k: int, m: int) -> str:
    return (f"bundle {bundle:,} B = payload {payload:,} B + {bundle - payload:,} B parity and shard headers "
            f"(+{(bundle / payload - 1) * 100:.1f} %; {stripes} stripe(s) of RS({k},{m}) x {shard:,} B shards: "
            f"the parity alone is +{m / k * 100:.0f} %); rsync batch {batch:,} B; bundle/batch {bundle / batch:.3f}x, "
            f"payload/batch {payload / batch:.3f}x")


def report(args, r: dict) -> str:
    sb = r["src_bytes"]
    out = [f"resync pack/unpack vs rsync batch mode: {r['src_files']:,} files, {sb / 1e6:.1f} MB "
           f"({args.files} small + {args.big} x 50 MB, seed {args.seed}), best of {args.repeat}, "
           f"{os.cpu_count()} CPUs; destinations, bundles and batches in {args.out_desc}",
           "times are whole processes; ratio < 1: resync faster; MB/s = source bytes / step time",
           "", "phase 1: initial copy into an empty destination"]
    t1s = r["t_pack1"] + r["t_unpack1"]
    t1r, t1rs = r["t_wbatch1"] + r["t_rbatch1"], r["t_wbatch1_sync"] + r["t_rbatch1_sync"]
    out.append(table([
        ("pack / --only-write-batch", r["t_pack1"], r["t_wbatch1"], r["t_wbatch1_sync"]),
        ("unpack / --read-batch", r["t_unpack1"], r["t_rbatch1"], r["t_rbatch1_sync"]),
        ("total", t1s, t1r, t1rs),
        ("resync verify BUNDLE (exit 0; MB/s of bundle)", r["t_verify1"], None, None, r["bundle1"]),
    ], sb))
    out.append("sizes: " + sizes(r["bundle1"], r["payload1"], r["batch1"], r["stripes1"], r["shard1"],
                                 r["pack1"]["k"], r["pack1"]["m"]))
    out.append(f"check: DST1 == DST2 == SRC (diff -r; mode, owner, size, mtime_ns of {r['paths1']:,} paths): OK; "
               f"resync verify: intact")
    out += ["", f"phase 2: after the change ({r['changed']}; fraction {CHANGE_FRACTION})"]
    t2s = r["t_sigtree"] + r["t_pack2"] + r["t_unpack2"]
    t2r, t2rs = r["t_wbatch2"] + r["t_rbatch2"], r["t_wbatch2_sync"] + r["t_rbatch2_sync"]
    out.append(table([
        ("signature-tree DST1 / -", r["t_sigtree"], None, None),
        ("pack --against / --only-write-batch", r["t_pack2"], r["t_wbatch2"], r["t_wbatch2_sync"]),
        ("unpack / --read-batch", r["t_unpack2"], r["t_rbatch2"], r["t_rbatch2_sync"]),
        ("total (signature-tree + pack + unpack)", t2s, t2r, t2rs),
        ("total without signature-tree", r["t_pack2"] + r["t_unpack2"], t2r, t2rs),
        ("resync verify BUNDLE (exit 0; MB/s of bundle)", r["t_verify2"], None, None, r["bundle2"]),
    ], sb))
    p2 = r["pack2"]
    out.append("sizes: " + sizes(r["bundle2"], r["payload2"], r["batch2"], r["stripes2"], r["shard2"],
                                 r["pack2"]["k"], r["pack2"]["m"]))
    out.append(f"       tree signature {r['sig_bytes']:,} B; pack: {p2['whole_files']} whole files, "
               f"{p2['delta_files']} deltas, {p2['unchanged']} unchanged, {p2['bytes_literal']:,} B literal, "
               f"{p2['bytes_matched']:,} B matched")
    out.append(f"check: DST1 == DST2 == SRC (diff -r; mode, owner, size, mtime_ns of {r['paths2']:,} paths): OK; "
               f"resync verify: intact")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1, help="seed of the tree (the change uses seed + 1)")
    ap.add_argument("--dir", type=Path, default=HERE / ".data")
    ap.add_argument("--dst-dir", type=Path, default=None,
                    help="where the destinations, bundles and batches go (e.g. a tmpfs, to compare the "
                         "tools' CPU paths without the disk); default: beside the source")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the tables")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync not found: apt-get install rsync (make bench does it)")
    d = (args.dir / f"bundle-{args.files}-{args.big}").resolve()
    out = (args.dst_dir.resolve() / f"bundle-{args.files}-{args.big}") if args.dst_dir else d
    args.out_desc = str(args.dst_dir or d)
    d.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["RESYNC_HISTORY"] = str(d / "history.duckdb")     # unused (--no-history), kept off ~/.local
    log(f"# {' '.join([sys.executable, *sys.argv])}")
    warm_up(out)
    results = []
    for i in range(args.repeat):
        log(f"# repeat {i + 1}/{args.repeat}")
        results.append(one_repeat(args, d / "src", out, args.seed + 1))
    r = best(results)
    if args.json:
        r["times_per_repeat"] = [{k: v for k, v in x.items() if k.startswith("t_")} for x in results]
        r.update(files=args.files, big=args.big, repeat=args.repeat, seed=args.seed, out=args.out_desc,
                 cpus=os.cpu_count())
        print(json.dumps(r, indent=1, sort_keys=True))
    else:
        print(report(args, r))


if __name__ == "__main__":
    main()
