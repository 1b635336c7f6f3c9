#!/usr/bin/env python3
"""resync over QUIC vs an rsync daemon vs raw aioquic, on loopback, side by side.

    python bench/bench_net.py [--big-mib 256] [--files 20000] [--dir bench/.data] [--only big|tree|release]
                              [--transport auto|quic|tcp] [--repeat N] [--releases sympy,django,pandas]

Three kinds of data, each pushed by both tools into their own destination:
a single file of --big-mib MiB (mixed content: text, zeros, random, repeated
blocks), a tree of --files small files (bench/gen.py tree), and real software
releases (bench/releases.py: pairs of consecutive wheels from PyPI, unpacked,
downloaded once and cached). Steps: first copy, no change, and after a change
(the big file: 1 % of its bytes rewritten in 40 places; the tree: 1 % of the
files; a release: the next release unpacked in its place, every file with a
new mtime, as an upgrade leaves them — so every file goes through the delta
path). Tools:

- rsync daemon: ``rsync --daemon`` with a writable module, client
  ``rsync -a --delete --stats SRC/ rsync://127.0.0.1:PORT/bench/`` (rsync's own
  protocol over TCP; delta transfer, as it uses for a remote);
- resync: ``resync serve`` with a module, client
  ``resync sync --delete --json --transport T SRC resync://127.0.0.1:PORT/bench``
  (--transport: auto by default, which picks TLS over TCP on loopback; quic
  measures the QUIC path);
- raw aioquic (first copy only): the same bytes over one aioquic stream
  (bench/quic_raw.py), the ceiling for a Python QUIC transport.

Wire bytes: rsync's --stats "Total bytes sent/received" (its TCP payload) and
resync's ``bytes_on_wire_sent``/``_received``: over QUIC its count of UDP
payload bytes (QUIC headers, TLS, acknowledgements included), over TCP the
kernel's count of TCP payload bytes (TLS records and handshake). Ratios are resync / rsync (wire, time) and resync / raw aioquic
(goodput). Each tool runs as its own processes, servers warmed up first.
Release sets with --repeat N run their three steps N times from empty
destinations, the tools alternated, and report each step's median time.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
PY = sys.executable


def run(cmd, env=None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return dt, r.stdout


def fresh(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)


def wait_for(pred, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class RsyncDaemon:
    transport = "auto"

    def __init__(self, work: Path, dest: Path):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\npid file = {work}/rsyncd.pid\n"
                        f"[bench]\npath = {dest}\nread only = no\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        wait_for(up, "rsync --daemon")

    def push(self, src: Path) -> dict:
        dt, out = run(["rsync", "-a", "--delete", "--stats", f"{src}/", f"rsync://127.0.0.1:{self.port}/bench/"])

        def num(label):
            m = re.search(label + r": ([\d,]+)", out)
            return int(m.group(1).replace(",", "")) if m else -1
        return {"seconds": dt, "sent": num("Total bytes sent"), "received": num("Total bytes received")}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class ResyncServer:
    transport = "auto"

    def __init__(self, work: Path, dest: Path):
        self.client_env = dict(os.environ, XDG_CONFIG_HOME=str(work / "client-config"),
                               RESYNC_HISTORY=str(work / "client-history.duckdb"))
        server_env = dict(os.environ, XDG_CONFIG_HOME=str(work / "server-config"),
                          RESYNC_HISTORY=str(work / "server-history.duckdb"))
        client_id = run([PY, "-m", "resync", "id"], self.client_env)[1].strip()
        self.server_id = run([PY, "-m", "resync", "id"], server_env)[1].strip()
        self.log = work / "serve.log"
        self.proc = subprocess.Popen([PY, "-m", "resync", "serve", "--listen", "127.0.0.1:0", "--module",
                                      f"bench={dest}", "--allow", client_id], env=server_env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        wait_for(lambda: "listening on" in self.log.read_text(), "resync serve")
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text()).group(1))

    def push(self, src: Path) -> dict:
        dt, out = run([PY, "-m", "resync", "sync", "--delete", "--json", str(src),
                       f"resync://127.0.0.1:{self.port}/bench", "--peer-id", self.server_id,
                       "--transport", self.transport], self.client_env)
        r = json.loads(out.splitlines()[-1])
        return {"seconds": dt, "sent": r["bytes_on_wire_sent"], "received": r["bytes_on_wire_received"], "json": r}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def raw_quic(files: list[Path], work: Path) -> dict:
    portfile = work / "quic-raw.port"
    portfile.unlink(missing_ok=True)
    srv = subprocess.Popen([PY, str(HERE / "quic_raw.py"), "serve", str(portfile)])
    try:
        wait_for(portfile.exists, "quic_raw serve")
        listing = work / "quic-raw.files"
        listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in files))
        _, out = run([PY, str(HERE / "quic_raw.py"), "send", portfile.read_text(), f"@{listing}"])
        return json.loads(out)
    finally:
        srv.kill()
        srv.wait()


def same_tree(a: Path, b: Path) -> bool:
    r = subprocess.run(["rsync", "-a", "-n", "-i", "-c", "--delete", f"{a}/", f"{b}/"], capture_output=True,
                       text=True)
    return r.returncode == 0 and not r.stdout.strip()


def bench_set(name: str, src: Path, change, work: Path, rows: list, raw_rows: list,
              steps=("first copy", "no change", "after 1 % changed"), reset=None, repeat: int = 1) -> None:
    """Push ``src`` with both tools through ``steps`` (``change`` before the
    last). With ``reset`` (puts ``src`` back as it was), the steps are run
    ``repeat`` times from empty destinations and each step's row holds the
    median time (and the last run's bytes)."""
    d_rsync, d_resync = work / f"{name}-rsync-dst", work / f"{name}-resync-dst"
    fresh(d_rsync)
    fresh(d_resync)
    daemon, server = RsyncDaemon(work, d_rsync), ResyncServer(work, d_resync)
    times: dict = {}
    try:
        for rep in range(repeat if reset is not None else 1):
            if rep:
                reset()
                for d in (d_rsync, d_resync):
                    for p in d.iterdir():
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
            total = sum(p.stat().st_size for p in files)
            subprocess.run(["sh", "-c", f'find "{src}" -type f -exec cat {{}} + > /dev/null'], check=True)
            raw = raw_quic(files, work) if not rep else None
            for step in steps:
                if step == steps[-1]:
                    change()
                a = daemon.push(src)
                b = server.push(src)
                assert same_tree(src, d_rsync) and same_tree(src, d_resync), f"{name} {step}: trees differ"
                times.setdefault(step, []).append((a, b))
                print(f"  {name} / {step}: rsync daemon {a['seconds']:.2f} s, resync {b['seconds']:.2f} s "
                      f"({b['json'].get('transport')})", flush=True)
                if step == "first copy" and raw is not None:
                    goodput = total * 8 / b["json"]["duration"] / 1e6 if b["json"].get("duration") else 0
                    raw_rows.append((name, total, raw, goodput, b["seconds"]))
    finally:
        daemon.stop()
        server.stop()
    for step in steps:
        runs = times[step]
        a, b = dict(runs[-1][0]), dict(runs[-1][1])
        a["seconds"] = statistics.median(r[0]["seconds"] for r in runs)
        b["seconds"] = statistics.median(r[1]["seconds"] for r in runs)
        rows.append((name, step, a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--dir", type=Path, default=HERE / ".data")
    ap.add_argument("--only", choices=["big", "tree", "release"], default=None)
    ap.add_argument("--transport", choices=["auto", "quic", "tcp"], default="auto")
    ap.add_argument("--repeat", type=int, default=1,
                    help="release sets: run the steps this many times, report median times")
    ap.add_argument("--releases", default=None,
                    help="comma-separated release pairs of bench/releases.py (default: all)")
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync not found: apt-get install rsync (make bench does it)")
    work = args.dir / "net"
    fresh(work)
    ResyncServer.transport = args.transport
    rows, raw_rows = [], []
    print(f"# resync (--transport {args.transport}) vs rsync --daemon vs raw aioquic, loopback, "
          f"{os.cpu_count()} CPUs", flush=True)
    if args.only in (None, "big"):
        big = work / "big-src"
        big.mkdir()
        edited = work / "big-edited"
        run([PY, str(HERE / "gen.py"), "file", "--size", f"{args.big_mib}MiB", "--pattern", "mixed",
             "--edits", "40", "--edit-len", str(args.big_mib * (1 << 20) // 4000), "--seed", "7",
             str(big / "big.bin"), str(edited)])

        def change_big():                # the generator's NEW: 1 % of the bytes edited in 40 places
            os.replace(edited, big / "big.bin")
        bench_set("big", big, change_big, work, rows, raw_rows)
    if args.only in (None, "tree"):
        tree = work / "tree-src"
        run([PY, str(HERE / "gen.py"), "tree", "--files", str(args.files), "--big", "0", "--seed", "3", str(tree)])
        bench_set("tree", tree, lambda: run([PY, str(HERE / "gen.py"), "change", "--fraction", "0.01",
                                             "--seed", "4", str(tree)]), work, rows, raw_rows)
    if args.only in (None, "release"):
        from releases import PAIRS, release_tree
        names = args.releases.split(",") if args.releases else list(PAIRS)
        for pair in names:
            old, new = release_tree(pair, 0, args.dir / "releases"), release_tree(pair, 1, args.dir / "releases")
            src = work / f"{pair}-src"
            shutil.copytree(old, src, symlinks=True)

            def upgrade(src=src, new=new):   # the next release in its place, every mtime new
                shutil.rmtree(src)
                shutil.copytree(new, src, symlinks=True, copy_function=shutil.copyfile)

            def back(src=src, old=old):      # the old release again, as first copied
                shutil.rmtree(src)
                shutil.copytree(old, src, symlinks=True)
            bench_set(pair, src, upgrade, work, rows, raw_rows, steps=("first copy", "no change", "update"),
                      reset=back, repeat=args.repeat)

    print("\n| data | step | rsync daemon | resync (transport) | time ratio | wire rsync (sent + received) "
          "| wire resync (sent + received) | wire ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, step, a, b in rows:
        wa, wb = a["sent"] + a["received"], b["sent"] + b["received"]
        print(f"| {name} | {step} | {a['seconds']:.2f} s | {b['seconds']:.2f} s ({b['json'].get('transport')}) "
              f"| {b['seconds'] / a['seconds']:.2f}x "
              f"| {a['sent']:,} + {a['received']:,} | {b['sent']:,} + {b['received']:,} | **{wb / wa:.2f}x** |")
    print("\n| data | bytes | raw aioquic stream | resync first copy (transfer) | goodput ratio | resync wall |")
    print("|---|---|---|---|---|---|")
    for name, total, raw, goodput, wall in raw_rows:
        print(f"| {name} | {total:,} | {raw['goodput_mbit']:.0f} Mbit/s ({raw['seconds']:.2f} s) | "
              f"{goodput:.0f} Mbit/s | **{goodput / raw['goodput_mbit']:.2f}x** | {wall:.2f} s |")


if __name__ == "__main__":
    main()
