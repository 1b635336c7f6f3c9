#!/usr/bin/env python3
"""resync vs rsync (daemon, TCP BBR and CUBIC) vs a raw aioquic stream over an
emulated WAN (tests/linkemu: 100 Mbit/s, 50 ms RTT), side by side in one run.

    python bench/bench_wan.py [--mib 256] [--losses 0,5,20,33] [--repeat 3]
                              [--files 20000] [--only bulk|tree|release|disaster|lan|veth|share]
                              [--releases sympy,django,pandas] [--release-losses 0,5,20] [--dir /dev/shm/bw]

Needs root (network namespaces). Steps, each at every loss in --losses
(random, both directions, on the wire after the rate cap):

- **bulk**: a --mib MiB file of mixed content (text, zeros, random, repeated
  blocks) pushed into an empty destination;
- **tree**: the nightly run: a --files tree (bench/gen.py tree) whose
  destination holds yesterday's copy, after 1 % of the files changed;
- **release**: real software updates (bench/releases.py: consecutive wheels
  from PyPI, unpacked, cached in bench/.data/releases): per pair the first
  copy and a no-change run at 0 % loss, and the update (the destination holds
  the older release, the source the newer one with every mtime new, so every
  file goes through the delta path) at each of --release-losses;
- **disaster**: the `disaster` profile (1 Mbit/s, RTT 150-250 ms, 20 % loss),
  a --disaster-mib file;
- **lan**: the `lan` profile (a veth pair at 1 Gbit/s), the bulk file, no loss
  (resync as it chooses — TLS over TCP here — and over QUIC);
- **veth**: a plain veth pair (no rate cap), a --veth-mib MiB random file:
  resync (auto), resync over QUIC, the rsync daemon and rsync over ssh
  (sshd in namespace B);
- **share**: no loss, two resync pushes of the bulk file started together
  (the first to finish had share T_last / (2 T_first) of the link while
  both ran), then a resync push beside a TCP stream (tests/linkemu/probe.py,
  BBR and CUBIC) that runs 10 s from the same moment: their average rates.

Tools: resync (`resync serve` in namespace B, `resync sync` in A), the rsync
daemon (`rsync --daemon` in B, `rsync -a --stats SRC/ rsync://B/bench/` in A)
with BBR (this machine's default) and with CUBIC, and bench/quic_raw.py (one
aioquic stream, its stock Reno controller). resync runs first at each step;
another tool gets at most 10x resync's time there and is reported as not
finished otherwise. At 20 % loss every tool runs --repeat times (TCP at that
loss is not repeatable): the median and the range are printed.

Printed per run: wall time (the client command, start-up and handshake
included), payload goodput (payload bytes / wall time), bytes on the wire
(both directions, as the link counted them: frames), the stripes resync
needed a repair round for (`stripes_repaired` of `stripes`, the median run),
and ratios. The limit for payload goodput at independent loss p is
(1 - p) x link rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
PY = sys.executable

from tests.linkemu import Link, unavailable  # noqa: E402

CC_SYSCTL = "net.ipv4.tcp_congestion_control"
ALLOWED_SYSCTL = "net.ipv4.tcp_allowed_congestion_control"


def sh(*argv, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), check=check, capture_output=True, text=True, **kw)


class Tools:
    """The servers of every tool in namespace B, their clients in A."""

    def __init__(self, link: Link, work: Path):
        self.link, self.work = link, work
        self.dst = {name: work / f"dst-{name}" for name in ("resync", "rsync")}
        for d in self.dst.values():
            d.mkdir(parents=True, exist_ok=True)
        cfg_c, cfg_s = work / "client-config", work / "server-config"
        self.env_c = dict(os.environ, XDG_CONFIG_HOME=str(cfg_c), RESYNC_HISTORY=str(work / "client.duckdb"))
        self.env_s = dict(os.environ, XDG_CONFIG_HOME=str(cfg_s), RESYNC_HISTORY=str(work / "server.duckdb"))
        self.client_id = sh(PY, "-m", "resync", "id", env=self.env_c).stdout.strip()
        self.server_id = sh(PY, "-m", "resync", "id", env=self.env_s).stdout.strip()
        self.procs: list[subprocess.Popen] = []
        log = work / "serve.log"
        self._start([PY, "-m", "resync", "serve", "--listen", f"{link.addr_b}:7000", "--module",
                     f"bench={self.dst['resync']}", "--allow", self.client_id], env=self.env_s, stderr=open(log, "w"))
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = 0\ngid = 0\npid file = {work}/rsyncd.pid\n"
                        f"[bench]\npath = {self.dst['rsync']}\nread only = no\n")
        (work / "rsyncd.pid").unlink(missing_ok=True)
        self._start(["rsync", "--daemon", "--no-detach", f"--config={conf}", "--port=873", f"--address={link.addr_b}"],
                    stderr=subprocess.DEVNULL)
        portfile = work / "quic-raw.port"
        portfile.unlink(missing_ok=True)
        self._start([PY, HERE / "quic_raw.py", "serve", portfile, link.addr_b])
        deadline = time.monotonic() + 60
        while not ("listening" in log.read_text() and portfile.exists()):
            if time.monotonic() > deadline:
                raise SystemExit(f"servers did not start: {log.read_text()}")
            time.sleep(0.1)
        self.raw_port = int(portfile.read_text())

    def _start(self, argv, **kw) -> None:
        """A server in namespace B, in a process group of its own."""
        self.procs.append(self.link.popen("b", argv, stdout=subprocess.DEVNULL, start_new_session=True, **kw))

    def close(self) -> None:
        """Stop the servers with their children (the rsync daemon's receiver of a capped run)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                for p in self.procs:
                    p.wait(10)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "Tools":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stats(self) -> dict:
        if self.link.forwarder is None:          # the lan profile: a plain veth pair, nothing counts
            zero = {"received_bytes": 0}
            return {"ab": zero, "ba": zero}
        return self.link.stats()

    def _timed(self, argv, limit: float | None, env=None) -> tuple[float | None, str, dict]:
        before = self._stats()
        t = time.monotonic()
        p = self.link.popen("a", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return None, "", self._wire(before)
        dt = time.monotonic() - t
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, argv))}\n{err[-2000:]}")
        return dt, out, self._wire(before)

    def _wire(self, before: dict) -> dict:
        after = self._stats()
        return {d: after[d]["received_bytes"] - before[d]["received_bytes"] for d in ("ab", "ba")}

    transport = "auto"              # --resync-transport

    def resync(self, src: Path, limit=None, transport: str | None = None) -> dict:
        dt, out, wire = self._timed([PY, "-m", "resync", "sync", "--delete", "--json", "--retry-for", "0", src,
                                     f"resync://{self.link.addr_b}:7000/bench", "--peer-id", self.server_id,
                                     "--transport", transport or self.transport], limit, env=self.env_c)
        r = json.loads(out.splitlines()[-1]) if out else {}
        return {"seconds": dt, "wire": wire, "repairs": (r.get("stripes_repaired"), r.get("stripes")), "json": r,
                "transport": r.get("transport")}

    def sshd(self) -> None:
        """An sshd in namespace B (port 2222, a host key and an authorized
        key of its own, root's login by key only): rsync over ssh, the
        encrypted tool a user compares resync's TLS path with."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise SystemExit("sshd not found: apt-get install openssh-server (make bench-tools does it)")
        d = self.work / "ssh"
        d.mkdir(exist_ok=True)
        for name in ("host", "client"):
            if not (d / name).exists():
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name)
        (d / "authorized_keys").write_text((d / "client.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        (d / "sshd_config").write_text(
            f"Port 2222\nListenAddress {self.link.addr_b}\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUsePAM no\nStrictModes no\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self._start([sshd, "-D", "-e", "-f", d / "sshd_config"], stderr=open(d / "sshd.log", "w"))
        self.ssh = ["ssh", "-i", str(d / "client"), "-p", "2222", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes"]
        deadline = time.monotonic() + 20
        while self.link.run("a", [*self.ssh, f"root@{self.link.addr_b}", "true"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise SystemExit(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.2)

    def rsync_ssh(self, src: Path, limit=None) -> dict:
        dt, _, wire = self._timed(["rsync", "-a", "--delete", "--stats", "-e", " ".join(self.ssh), f"{src}/",
                                   f"root@{self.link.addr_b}:{self.dst['rsync']}/"], limit)
        return {"seconds": dt, "wire": wire}

    def rsync(self, src: Path, cc: str, limit=None) -> dict:
        for ns in ("a", "b"):
            sh("ip", "netns", "exec", self.link.ns[ns], "sysctl", "-qw", f"{CC_SYSCTL}={cc}")
        dt, _, wire = self._timed(["rsync", "-a", "--delete", "--stats", f"{src}/",
                                   f"rsync://{self.link.addr_b}/bench/"], limit)
        return {"seconds": dt, "wire": wire}

    def raw(self, files: list[Path], limit=None) -> dict:
        listing = self.work / "quic-raw.files"
        listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in files))
        dt, _, wire = self._timed([PY, HERE / "quic_raw.py", "send", f"{self.link.addr_b}:{self.raw_port}",
                                   f"@{listing}"], limit)
        return {"seconds": dt, "wire": wire}


def make_file(path: Path, mib: int, seed: int) -> int:
    """A ``mib`` MiB file of mixed content (bench/gen.py); its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    unused = path.parent / "unused"                 # (gen.py also writes an edited copy)
    sh(PY, HERE / "gen.py", "file", "--size", f"{mib}MiB", "--pattern", "mixed", "--seed", seed, path, unused)
    unused.unlink(missing_ok=True)
    return path.stat().st_size


def reset(dst: Path, like: Path | None) -> None:
    """``dst`` empty, or a copy of ``like`` (yesterday's tree)."""
    shutil.rmtree(dst, ignore_errors=True)
    if like is None:
        dst.mkdir(parents=True)
    else:
        sh("cp", "-a", like, dst)


def goodput(payload: int, r: dict) -> float | None:
    return payload * 8 / r["seconds"] / 1e6 if r.get("seconds") else None


def fmt_runs(runs: list[dict], payload: int) -> tuple[str, str, str, float | None]:
    """(time, goodput, wire) cells and the median time (None: the median run
    did not finish within its limit)."""
    times = [r["seconds"] if r["seconds"] is not None else float("inf") for r in runs]
    wire = statistics.median([r["wire"]["ab"] + r["wire"]["ba"] for r in runs])
    med = statistics.median(times)
    if len(runs) > 1:
        spread = " (" + "–".join("∞" if t == float("inf") else f"{t:.1f}" for t in (min(times), max(times))) + ")"
    else:
        spread = ""
    wire_cell = f"{wire / 1e6:,.1f} MB" if wire else ""
    if med == float("inf"):
        return f"not finished in {max(r.get('limit', 0) for r in runs):.0f} s{spread}", "", wire_cell, None
    good = f"{payload * 8 / med / 1e6:.1f} Mbit/s" if payload else "—"
    return f"{med:.1f} s{spread}", good, wire_cell, med


SEED = 1                          # --seed: the link's loss pattern (linkemu draws it from this seed)


def step(name: str, tools: Tools, link: Link, loss: float, src: Path, payload: int, like: Path | None,
         repeat: int, which: list[str], rows: list) -> None:
    link.reset()
    link.seed(SEED)
    link.set("both", loss=loss)
    runs: dict[str, list[dict]] = {t: [] for t in which}
    times = repeat if abs(loss - 0.2) < 1e-9 else 1
    for n in range(times):
        reset(tools.dst["resync"], like)
        r = tools.resync(src)
        runs["resync"].append(r)
        limit = 10 * r["seconds"]
        for tool in which[1:]:
            if tool == "quic-raw" and like is not None:
                continue                        # the raw stream has no delta: bulk only
            print(f"    {name} {loss:.0%} run {n + 1}: {tool} (limit {limit:.0f} s)", flush=True)
            if tool.startswith("rsync"):
                reset(tools.dst["rsync"], like)
                x = tools.rsync(src, tool.split("-")[1], limit)
            else:
                x = tools.raw(sorted(p for p in src.rglob("*") if p.is_file()), limit)
            x["limit"] = limit
            runs[tool].append(x)
        print(f"  {name} {loss:.0%} run {n + 1}: " + ", ".join(
            f"{t} {runs[t][-1]['seconds'] or float('inf'):.1f} s" for t in which if runs[t]), flush=True)
    rows.append((name, loss, payload, runs))


def report(rows: list) -> None:
    print("\n| data | loss | tool | wall time (median, range) | payload goodput | wire (both ways) "
          "| stripes repaired | resync's time / tool's |")
    print("|---|---|---|---|---|---|---|---|")
    for name, loss, payload, runs in rows:
        res_t = fmt_runs(runs["resync"], payload)[3]
        for tool, rs in runs.items():
            if not rs:
                continue
            t, g, w, med = fmt_runs(rs, payload)
            repairs = ""
            if tool == "resync":
                counts = sorted((r["repairs"] for r in rs if r.get("repairs") and r["repairs"][1]),
                                key=lambda c: c[0] / c[1])
                if counts:
                    a, b = counts[len(counts) // 2]
                    repairs = f"{a} of {b} ({a / b:.1%})"
            ratio = "" if tool == "resync" else (f"{res_t / med:.2f}x" if med else "> 10x faster")
            print(f"| {name} | {loss:.0%} | {tool} | {t} | {g} | {w} | {repairs} | {ratio} |")


def _held(root: Path) -> int:
    """Bytes the files under ``root`` occupy (a receiver's staged content
    as it arrives: allocated blocks, not the length it was cut to)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def staggered(tools: Tools, link: Link, bulk: Path, src2: Path, size: int, argv: list, url: str,
              delay: float = 3.0) -> None:
    """The second push starts ``delay`` s after the first: each one's share
    of what arrived while both ran, from the bytes their destinations held
    (sampled every 0.1 s)."""
    reset(tools.dst["resync"], None)
    dests = [tools.dst["resync"] / "0", tools.dst["resync"] / "1"]
    procs, samples = [], []
    t0 = time.monotonic()
    for n, src in enumerate((bulk, src2)):
        if n:
            while time.monotonic() - t0 < delay:
                samples.append((time.monotonic(), _held(dests[0]), 0))
                time.sleep(0.1)
        procs.append(link.popen("a", argv + [src, f"{url}/{n}", "--peer-id", tools.server_id], env=tools.env_c,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    both_end = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        samples.append((now, _held(dests[0]), _held(dests[1])))
        if both_end is None and any(p.poll() is not None for p in procs):
            both_end = now
        time.sleep(0.1)
    for p in procs:
        p.communicate()
        if p.returncode:
            raise SystemExit("share: a push failed")
    lo, hi = t0 + delay + 2.0, (both_end or time.monotonic()) - 0.5     # (the second's handshake and startup)
    inside = [x for x in samples if lo <= x[0] <= hi]
    if len(inside) < 5:
        print("share (staggered): the pushes overlapped too briefly to measure", flush=True)
        return
    a = inside[-1][1] - inside[0][1]
    b = inside[-1][2] - inside[0][2]
    print(f"share: the second push of {size >> 20} MiB started {delay:.0f} s after the first: from 2 s after "
          f"its start until the first ended ({hi - lo:.1f} s) the first had {a / (a + b):.0%}, the second "
          f"{b / (a + b):.0%} (target 35-65 % each)", flush=True)


def share(tools: Tools, link: Link, bulk: Path, size: int) -> None:
    """Two resync pushes at once; then resync beside a TCP stream."""
    src2 = bulk.parent / "bulk-src-2"
    if not src2.exists():
        src2.mkdir()
        sh("cp", bulk / "bulk.bin", src2 / "bulk.bin")
    url = f"resync://{link.addr_b}:7000/bench"
    reset(tools.dst["resync"], None)
    argv = [PY, "-m", "resync", "sync", "--json", "--retry-for", "0"]
    t0 = time.monotonic()
    procs = [link.popen("a", argv + [src, f"{url}/{n}", "--peer-id", tools.server_id], env=tools.env_c,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, src in
             enumerate((bulk, src2))]
    ends = []
    for p in procs:
        p.communicate(timeout=600)
        ends.append(time.monotonic() - t0)
        if p.returncode:
            raise SystemExit("share: a push failed")
    first, last = min(ends), max(ends)
    print(f"\nshare: two resync pushes of {size >> 20} MiB started together finished at {ends[0]:.1f} s and "
          f"{ends[1]:.1f} s: the first to finish had {last / (2 * first):.0%} of the link while both ran "
          f"(target 35-65 %)", flush=True)
    staggered(tools, link, bulk, src2, size, argv, url)
    for cc in ("bbr", "cubic"):
        for ns in ("a", "b"):
            sh("ip", "netns", "exec", link.ns[ns], "sysctl", "-qw", f"{CC_SYSCTL}={cc}")
        sink = link.popen("b", [PY, HERE.parent / "tests" / "linkemu" / "probe.py", "tcp-sink", "7400"],
                          stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        reset(tools.dst["resync"], None)
        tcp = link.popen("a", [PY, HERE.parent / "tests" / "linkemu" / "probe.py", "tcp-send-for",
                               link.addr_b, "7400", "10"], stdout=subprocess.PIPE, text=True)
        r = tools.resync(bulk)
        t = json.loads(tcp.stdout.read())
        sink.kill()
        sink.wait()
        mbit = size * 8 / r["seconds"] / 1e6
        print(f"share: resync beside TCP {cc.upper()} (10 s): TCP {t['mbit']:.1f} Mbit/s, resync "
              f"{mbit:.1f} Mbit/s over its {r['seconds']:.1f} s: TCP had "
              f"{t['mbit'] / (t['mbit'] + mbit):.0%} (target at least a third)", flush=True)


def veth(work: Path, mib: int, repeat: int, rows: list) -> None:
    """A --veth-mib MiB file of random bytes (nothing for rsync or resync to
    save) over a plain veth pair between two namespaces, into an empty
    destination: resync (auto: it picks TLS over TCP on this path), resync
    over QUIC, the rsync daemon (clear text), rsync over ssh (encrypted, as
    resync is); --repeat runs each, the median kept. Both ends' files on
    --dir (tmpfs by default: the disk would be measured otherwise)."""
    src = work / "veth-src"
    src.mkdir(parents=True, exist_ok=True)
    with open(src / "random.bin", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    size = mib << 20
    with Link("veth") as link, Tools(link, work / "veth") as tools:
        tools.sshd()
        runs: dict[str, list[dict]] = {"resync": [], "resync-quic": [], "rsync-daemon": [], "rsync-ssh": []}
        for n in range(repeat):
            reset(tools.dst["resync"], None)
            r = tools.resync(src)
            runs["resync"].append(r)
            reset(tools.dst["rsync"], None)
            runs["rsync-daemon"].append(tools.rsync(src, "cubic"))
            reset(tools.dst["rsync"], None)
            runs["rsync-ssh"].append(tools.rsync_ssh(src))
            if n == 0:                          # (QUIC: ~30 s a GiB here; once is enough to show it)
                reset(tools.dst["resync"], None)
                runs["resync-quic"].append(tools.resync(src, transport="quic"))
            print(f"  veth run {n + 1}: " + ", ".join(
                f"{t} {x[-1]['seconds']:.2f} s" for t, x in runs.items() if x)
                + f" (resync chose {r['transport']})", flush=True)
        reset(tools.dst["resync"], None)
        reset(tools.dst["rsync"], None)
    rows.append((f"veth ({mib} MiB random)", 0.0, size, runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--disaster-mib", type=int, default=4)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--losses", default="0,5,20,33")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["bulk", "tree", "release", "disaster", "lan", "veth", "share"],
                    action="append")
    ap.add_argument("--veth-mib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1,
                    help="the emulated link's random loss pattern: one seed draws the same losses for the same "
                         "frames (a run that sends one frame more sees another pattern from then on)")
    ap.add_argument("--resync-transport", choices=["auto", "quic", "tcp"], default="auto",
                    help="resync's --transport in every step but veth's and lan's (which run both)")
    ap.add_argument("--releases", default="sympy,django,pandas")
    ap.add_argument("--release-losses", default="0,5,20")
    ap.add_argument("--tools", default="resync,rsync-bbr,rsync-cubic,quic-raw")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/resync-bench-wan"))
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"bench_wan: {why}")
    if not shutil.which("rsync"):
        raise SystemExit("rsync not found: apt-get install rsync (make bench does it)")
    which = args.tools.split(",")
    global SEED
    SEED = args.seed
    Tools.transport = args.resync_transport
    if which[0] != "resync":
        raise SystemExit("--tools: resync first (the others are timed against it)")
    losses = [float(x) / 100 for x in args.losses.split(",")]
    parts = args.only or ["bulk", "tree", "release", "disaster", "lan", "veth", "share"]
    work = args.dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    allowed = sh("sysctl", "-n", ALLOWED_SYSCTL).stdout.strip()
    if "cubic" not in allowed.split():
        sh("sysctl", "-qw", f"{ALLOWED_SYSCTL}={allowed} cubic")
    print(f"# resync vs rsync (BBR, CUBIC) vs raw aioquic over tests/linkemu, {os.cpu_count()} CPUs; "
          f"kernel {os.uname().release}", flush=True)
    rows: list = []
    try:
        bulk = work / "bulk-src"
        if set(parts) - {"veth", "release"}:
            size = make_file(bulk / "bulk.bin", args.mib, 7)
        if "bulk" in parts or "tree" in parts:
            with Link("clean") as link, Tools(link, work / "clean") as tools:
                print(f"link: clean profile + loss; forwarder real-time: {link.realtime}", flush=True)
                if "bulk" in parts:
                    for loss in losses:
                        step("bulk", tools, link, loss, bulk, size, None, args.repeat, which, rows)
                if "tree" in parts:
                    tree, old = work / "tree-src", work / "tree-old"
                    sh(PY, HERE / "gen.py", "tree", "--files", args.files, "--big", "0", "--seed", "3", tree)
                    sh("cp", "-a", tree, old)
                    sh(PY, HERE / "gen.py", "change", "--fraction", "0.01", "--seed", "4", tree)
                    changed = sh("rsync", "-a", "-n", "-i", "--delete", f"{tree}/", f"{old}/").stdout.count("\n")
                    print(f"tree: {args.files} files, {changed} entries differ after the change", flush=True)
                    for loss in losses:     # (no payload goodput: a nightly run's figure is its time)
                        step("tree 1 %", tools, link, loss, tree, 0, old, args.repeat,
                             [t for t in which if t != "quic-raw"], rows)
        if "release" in parts:
            sys.path.insert(0, str(HERE))
            from releases import release_tree
            cache = HERE / ".data" / "releases"
            tools_no_raw = [t for t in which if t != "quic-raw"]
            with Link("clean") as link, Tools(link, work / "release") as tools:
                for pair in args.releases.split(","):
                    old, new = work / f"{pair}-old", work / f"{pair}-new"
                    shutil.copytree(release_tree(pair, 0, cache), old, symlinks=True)
                    shutil.copytree(release_tree(pair, 1, cache), new, symlinks=True,
                                    copy_function=shutil.copyfile)      # (every mtime new, as an upgrade's)
                    changed = sh("rsync", "-a", "-n", "-i", "-c", "--delete", f"{new}/", f"{old}/").stdout.count("\n")
                    print(f"release {pair}: {sum(1 for p in new.rglob('*') if p.is_file())} files, "
                          f"{changed} entries differ in content or presence", flush=True)
                    step(f"{pair} first copy", tools, link, 0.0, new, 0, None, 1, tools_no_raw, rows)
                    for loss in [float(x) / 100 for x in args.release_losses.split(",")]:
                        step(f"{pair} update", tools, link, loss, new, 0, old, args.repeat, tools_no_raw, rows)
                    step(f"{pair} no change", tools, link, 0.0, new, 0, new, 1, tools_no_raw, rows)
        if "disaster" in parts:
            small = work / "disaster-src"
            small_size = make_file(small / "small.bin", args.disaster_mib, 8)
            with Link("disaster") as link, Tools(link, work / "disaster") as tools:
                step("disaster", tools, link, 0.2, small, small_size, None, 1, which, rows)
        if "lan" in parts:
            with Link("lan") as link, Tools(link, work / "lan") as tools:
                reset(tools.dst["resync"], None)
                r = tools.resync(bulk)
                reset(tools.dst["resync"], None)
                q = tools.resync(bulk, transport="quic")
                reset(tools.dst["rsync"], None)
                a = tools.rsync(bulk, "bbr")
                x = tools.raw([bulk / "bulk.bin"])
                rows.append(("lan (1 Gbit/s)", 0.0, size, {"resync": [r], "resync-quic": [q], "rsync-bbr": [a],
                                                           "quic-raw": [x]}))
        if "veth" in parts:
            veth(work, args.veth_mib, args.repeat, rows)
        if "share" in parts:
            with Link("clean") as link, Tools(link, work / "share") as tools:
                share(tools, link, bulk, size)
    finally:
        sh("sysctl", "-qw", f"{ALLOWED_SYSCTL}={allowed}", check=False)
    report(rows)
    print("\nlimit at loss p: (1 - p) x the link rate of frames (100 Mbit/s; disaster 1 Mbit/s); "
          "payload goodput is payload / wall time.")


if __name__ == "__main__":
    main()
