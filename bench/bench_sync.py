#!/usr/bin/env python3
"""resync sync vs rsync -a on a generated tree, whole processes, side by side.

    python bench/bench_sync.py [--files 20000] [--big 2] [--repeat 3] [--rounds 10] [--dir bench/.data]

Tree (bench/gen.py tree): 20,000 files of 200 B .. 20 kB in 500 directories
plus two 50 MB files. Steps, each timed for both tools into their own
destination: initial copy (fresh destination; best of --repeat), no-change
re-run (best of --repeat), and a run after 1 % of the small files were
rewritten and both big files edited in place (once). Prints wall times,
ratios (resync / rsync: < 1 means resync is faster), peak RSS, and the bytes
each tool transferred (rsync --stats "Total transferred file size", resync
--json "bytes_transferred"). resync makes every file durable before renaming
it into place; rsync does not fsync, so the table also shows rsync followed by
`sync -f` on its destination (the same guarantee). resync records every run
in its history (a DuckDB file in the data directory, merged by a background
process); the benchmark waits for that merge between timed commands.
"""
import argparse
import json
import os
import re
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
RESYNC = [sys.executable, "-m", "resync", "sync"]


def timed(cmd):
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, cmd))}\n{err}")
    return dt, usage.ru_maxrss / 1024, out


def settle(d: Path) -> None:
    """Wait until resync's background history merge has finished, so it does
    not run during the next timed command."""
    spool = d / "history.duckdb.spool"
    end = time.monotonic() + 60
    while spool.is_dir() and any(spool.glob("*.run.json")) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.2)


def metadata(root: Path) -> dict:
    """{path: (type, mode, size, mtime in seconds)} of a tree (rsync leaves a
    directory's mtime alone when it already matches to the second)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            out[rel] = (st.st_mode, st.st_size if not os.path.isdir(os.path.join(dirpath, name)) else 0,
                        st.st_mtime_ns // 10**9)
    return out


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def rsync_bytes(out: str) -> int:
    m = re.search(r"Total transferred file size: ([\d,]+)", out)
    return int(m.group(1).replace(",", "")) if m else -1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--dense", metavar="DIRSxFILES", default=None,
                    help="the dense shape instead: DIRS directories of FILES small files (e.g. 200x100)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=HERE / ".data")
    ap.add_argument("--rounds", type=int, default=10,
                    help="then the no-change step alone, the three commands alternating, this many "
                         "rounds (medians; steadier than best-of on a noisy machine)")
    ap.add_argument("--dst-dir", type=Path, default=None,
                    help="where the destinations go (e.g. a tmpfs, to compare the tools' CPU paths "
                         "without the disk); default: beside the source")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync not found: apt-get install rsync (make bench does it)")
    d = args.dir / (f"dense-{args.dense}" if args.dense else f"tree-{args.files}-{args.big}")
    out = args.dst_dir or d
    out.mkdir(parents=True, exist_ok=True)
    src, dr, ds, dn = d / "src", out / "rsync-dst", out / "resync-dst", out / "resync-nohist-dst"
    fresh(d)
    for p in (dr, ds, dn):
        fresh(p)
    shape = ["--dense", args.dense] if args.dense else ["--files", str(args.files), "--big", str(args.big)]
    subprocess.run([sys.executable, str(HERE / "gen.py"), "tree", *shape, str(src)], check=True)
    subprocess.run(["sh", "-c", f'find "{src}" -type f -exec cat {{}} + > /dev/null'], check=True)
    os.environ["RESYNC_HISTORY"] = str(d / "history.duckdb")     # resync records every run, as by default
    rsync = ["rsync", "-a", "--stats", f"{src}/", f"{dr}/"]
    rsync_durable = ["sh", "-c", f'rsync -a "{src}/" "{dr}/" && sync -f "{dr}"']
    resync = [*RESYNC, "--json", str(src), str(ds)]
    resync_nohist = [*RESYNC, "--no-history", str(src), str(dn)]
    what = (f"{args.dense} (directories x small files)" if args.dense
            else f"{args.files} small files + {args.big} x 50 MB")
    print(f"# resync sync vs rsync -a: {what}, best of {args.repeat}, {os.cpu_count()} CPUs"
          f"{f', destinations in {args.dst_dir}' if args.dst_dir else ''}", flush=True)
    rows = []

    best = {"rsync": (1e9, 0), "rsync+sync": (1e9, 0), "resync": (1e9, 0), "nohist": (1e9, 0)}
    for _ in range(args.repeat):
        for name, cmd, dst in (("rsync", rsync, dr), ("rsync+sync", rsync_durable, dr), ("resync", resync, ds),
                               ("nohist", resync_nohist, dn)):
            fresh(dst)
            t, rss, _ = timed(cmd)
            best[name] = (min(best[name][0], t), max(best[name][1], rss))
            settle(d)
    rows.append(("initial copy", best))

    best = {"rsync": (1e9, 0), "resync": (1e9, 0), "nohist": (1e9, 0)}
    for _ in range(args.repeat):
        for name, cmd in (("rsync", rsync), ("resync", resync), ("nohist", resync_nohist)):
            t, rss, _ = timed(cmd)
            best[name] = (min(best[name][0], t), max(best[name][1], rss))
            settle(d)
    rows.append(("no change", best))

    subprocess.run([sys.executable, str(HERE / "gen.py"), "change", "--fraction", "0.01", str(src)], check=True)
    t_r, rss_r, out_r = timed(rsync)
    t_s, rss_s, out_s = timed(resync)
    settle(d)
    rows.append(("after 1 % changed", {"rsync": (t_r, rss_r), "resync": (t_s, rss_s)}))
    bytes_r, bytes_s = rsync_bytes(out_r), json.loads(out_s.strip().splitlines()[-1])["bytes_transferred"]
    same = subprocess.run(["diff", "-r", "--no-dereference", "-q", str(dr), str(ds)], capture_output=True)
    meta_equal = metadata(dr) == metadata(ds)

    print("\n| step | rsync -a | rsync -a + sync | resync sync | resync / rsync | resync --no-history "
          "| ratio | peak RSS rsync / resync (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for step, b in rows:
        rs, rd, sy, nh = b["rsync"], b.get("rsync+sync"), b["resync"], b.get("nohist")
        durable = f"{rd[0]:.2f} s" if rd else ""
        nohist = f"{nh[0]:.2f} s | {nh[0] / rs[0]:.2f}x" if nh else " | "
        print(f"| {step} | {rs[0]:.2f} s | {durable} | {sy[0]:.2f} s | **{sy[0] / rs[0]:.2f}x** | {nohist} | "
              f"{rs[1]:.0f} / {sy[1]:.0f} |")
    print(f"\nbytes transferred after the change: rsync {bytes_r:,}, resync {bytes_s:,} "
          f"({'equal' if bytes_r == bytes_s else 'DIFFERENT'}); trees identical: {same.returncode == 0}; "
          f"modes, sizes and mtimes (to the second) identical: {meta_equal}")

    if args.rounds:
        import statistics
        for cmd in (rsync, resync, resync_nohist):       # the trees are in sync again
            timed(cmd)
            settle(d)
        times = {"rsync": [], "resync": [], "nohist": []}
        for _ in range(args.rounds):
            for name, cmd in (("rsync", rsync), ("resync", resync), ("nohist", resync_nohist)):
                times[name].append(timed(cmd)[0])
                settle(d)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nno change, {args.rounds} alternating rounds, medians: rsync {med['rsync']:.3f} s, "
              f"resync {med['resync']:.3f} s ({med['resync'] / med['rsync']:.2f}x), "
              f"--no-history {med['nohist']:.3f} s ({med['nohist'] / med['rsync']:.2f}x)")


if __name__ == "__main__":
    main()
