"""An emulated network link between two network namespaces, for tests and benchmarks.

    with Link("wan") as link:                  # 100 Mbit/s, 50 ms RTT, 0.1 % loss
        server = link.popen("b", ["resync", "serve", "--listen", f"{link.addr_b}:7000", ...])
        link.run("a", ["resync", "sync", "src", f"resync://{link.addr_b}:7000/m"])
        link.set("both", loss=0.2)             # change it while traffic flows
        link.blackout(5.0)
        link.stats()                            # what the forwarder counted, per direction

Topology (all made by the test, removed at exit; root only):

    namespace A: va 10.201.0.1/24 ──veth── fa ┐
                                               namespace F: linkemu forwards fa <-> fb
    namespace B: vb 10.201.0.2/24 ──veth── fb ┘

``linkemu.c`` (built here with the C compiler on first use, or by ``make
linkemu``) reads every frame arriving on fa or fb with an AF_PACKET socket
and sends it out of the other after the direction's loss, queue, rate cap,
delay, jitter, reordering, duplication and corruption (its header comment
has the model). Checksum, segmentation and receive offloads are off on all
four interfaces: with them on, the kernel hands the forwarder segments
larger than the MTU and TCP checksums left for hardware to fill in. The
link carries TCP as well as UDP, so rsync runs over the same link as resync.

The ``lan`` profile has no forwarder (no userspace forwarder is accurate at
1 Gbit/s on two cores): va and vb are one veth pair, offloads on, with a tbf
qdisc at 1 Gbit/s on each end. The ``veth`` profile is the same pair without
the tbf: as fast as the kernel moves packets between two hosts' stacks (a
clean LAN or a data centre, where the CPU is the limit).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "linkemu.c"
PREFIX = "rsle-"                 # namespace names: rsle-PID-N-{a,b,f}
ADDR_A, ADDR_B = "10.201.0.1", "10.201.0.2"

# Named profiles. Per direction: rate in bit/s, one-way delay and jitter in s, loss probability,
# queue in s at the link rate (drop-tail). RTT = 2 x delay (+ jitter both ways).
PROFILES: dict[str, dict] = {
    "lan": {"rate": 1e9},                                                    # a veth pair, tbf only
    "veth": {},                                                              # a plain veth pair
    "wan": {"rate": 100e6, "delay": 0.025, "loss": 0.001, "queue": 0.1},      # 50 ms RTT
    "lossy": {"rate": 100e6, "delay": 0.025, "loss": 0.05, "queue": 0.1},
    "disaster": {"rate": 1e6, "delay": 0.075, "jitter": 0.05, "loss": 0.2, "queue": 0.5},  # RTT 150-250 ms
    "extreme": {"rate": 100e6, "delay": 0.025, "loss": 0.33, "queue": 0.1},
    "clean": {"rate": 100e6, "delay": 0.025, "queue": 0.1},                   # wan without its loss
}
KEYS = ("rate", "delay", "jitter", "loss", "p_gb", "p_bg", "ge_good", "ge_bad", "reorder", "reorder_gap", "dup",
        "corrupt", "queue")


def unavailable() -> str:
    """Why links cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "the link emulator needs root (network namespaces, AF_PACKET)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the link emulator needs {tool} (iproute2)"
    if shutil.which("cc") is None and shutil.which("gcc") is None and not _binary_path().exists():
        return "the link emulator needs a C compiler to build tests/linkemu/linkemu.c"
    r = subprocess.run(["ip", "netns", "add", f"{PREFIX}probe-{os.getpid()}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces are not available: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}probe-{os.getpid()}"], capture_output=True)
    return ""


def _binary_path() -> Path:
    tag = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return HERE / "build" / f"linkemu-{tag}"


def build() -> Path:
    """The forwarder's binary, compiled from linkemu.c unless this source's build exists."""
    out = _binary_path()
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        cc = shutil.which("cc") or shutil.which("gcc") or "cc"
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE)], check=True)
        os.replace(tmp, out)
    return out


def _sh(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def remove_stale() -> None:
    """Namespaces left by a run that was killed (its pid gone)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _mac(ns: str, dev: str) -> str:
    """The hardware address of ``dev`` in namespace ``ns``."""
    r = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", dev], capture_output=True, text=True, check=True)
    words = r.stdout.split()
    return words[words.index("link/ether") + 1]


class Link:
    """Two namespaces joined by an emulated link (see the module's docstring).
    ``profile``: a name in PROFILES; ``overrides``: per-direction parameters
    (KEYS) on top of it, for both directions."""

    _count = 0

    def __init__(self, profile: str = "wan", **overrides):
        if profile not in PROFILES:
            raise ValueError(f"unknown link profile {profile!r}; known: {', '.join(PROFILES)}")
        Link._count += 1
        base = f"{PREFIX}{os.getpid()}-{Link._count}"
        self.ns = {"a": f"{base}-a", "b": f"{base}-b", "f": f"{base}-f"}
        self.profile = profile
        self.direct = profile in ("lan", "veth")        # one veth pair, no forwarder
        self.params = dict(PROFILES[profile], **overrides)
        self.addr_a, self.addr_b = ADDR_A, ADDR_B
        self.forwarder: subprocess.Popen | None = None
        self.realtime = False

    # -- set-up -------------------------------------------------------------------------
    def __enter__(self) -> "Link":
        remove_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        a, b, f = self.ns["a"], self.ns["b"], self.ns["f"]
        for ns in (a, b):
            _sh("ip", "netns", "add", ns)
        if self.direct:
            _sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        else:
            binary = build()
            _sh("ip", "netns", "add", f)
            _sh("ip", "-n", f, "link", "add", "fa", "type", "veth", "peer", "name", "va", "netns", a)
            _sh("ip", "-n", f, "link", "add", "fb", "type", "veth", "peer", "name", "vb", "netns", b)
            for ns, ifs in ((a, ["va"]), (b, ["vb"]), (f, ["fa", "fb"])):
                _sh("ip", "netns", "exec", ns, str(binary), "offload", *ifs)
            _sh("ip", "netns", "exec", f, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            for dev in ("fa", "fb"):
                _sh("ip", "-n", f, "link", "set", dev, "up")
        for ns, dev, addr in ((a, "va", ADDR_A), (b, "vb", ADDR_B)):
            _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.profile == "lan":
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit", "burst", "256kb",
                    "latency", "5ms")
        # Static neighbours: an ARP request or reply lost on the emulated link cost the first
        # packet of a run a 1 s retry (at 33 % loss in one run in two) — not the WAN's loss,
        # which is not on a host's own segment.
        macs = {ns: _mac(ns, dev) for ns, dev in ((a, "va"), (b, "vb"))}
        for ns, dev, peer, peer_ns in ((a, "va", ADDR_B, b), (b, "vb", ADDR_A, a)):
            _sh("ip", "-n", ns, "neigh", "replace", peer, "lladdr", macs[peer_ns], "dev", dev, "nud", "permanent")
        if not self.direct:
            self.forwarder = subprocess.Popen(["ip", "netns", "exec", f, str(build()), "forward", "fa", "fb"],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            ready = self.forwarder.stdout.readline()
            if not ready.startswith("ready"):
                raise RuntimeError(f"linkemu did not start: {ready!r}")
            self.realtime = "SCHED_FIFO" in ready
            self.set("both", **{k: v for k, v in self.params.items() if k in KEYS})

    def close(self) -> None:
        if self.forwarder is not None:
            try:
                self.forwarder.stdin.write("quit\n")
                self.forwarder.stdin.flush()
                self.forwarder.wait(5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.forwarder.kill()
                self.forwarder.wait()
            self.forwarder = None
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # -- control ------------------------------------------------------------------------
    def _ask(self, line: str) -> str:
        if self.forwarder is None:
            raise RuntimeError(f"the {self.profile} profile has no forwarder to control")
        self.forwarder.stdin.write(line + "\n")
        self.forwarder.stdin.flush()
        answer = self.forwarder.stdout.readline().strip()
        if answer.startswith("error") or not answer:
            raise ValueError(f"linkemu: {line}: {answer or 'no answer'}")
        return answer

    def set(self, direction: str = "both", **params) -> None:
        """Change parameters of one direction ("ab": A to B, "ba") or both, at once."""
        unknown = set(params) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown link parameters: {', '.join(sorted(unknown))}")
        if params:
            self._ask(f"set {direction} " + " ".join(f"{k}={float(v)!r}" for k, v in params.items()))

    def reset(self) -> None:
        """Back to the profile's parameters (every other parameter 0) in both directions."""
        self.set("both", **{k: self.params.get(k, 0.1 if k == "queue" else 0.0) for k in KEYS})

    def seed(self, n: int) -> None:
        self._ask(f"seed {int(n)}")

    def blackout(self, seconds: float) -> None:
        """Drop everything, both ways, for ``seconds`` from now."""
        self._ask(f"blackout {float(seconds)!r}")

    def stats(self) -> dict:
        """Counters per direction ("ab", "ba"): received, sent, lost_random,
        lost_burst, lost_queue, lost_blackout, duplicated, corrupted, reordered..."""
        return json.loads(self._ask("stats"))

    # -- processes in the namespaces ----------------------------------------------------------
    def cmd(self, side: str, argv: list) -> list:
        """``argv`` run in namespace ``side`` ("a" or "b")."""
        return ["ip", "netns", "exec", self.ns[side], *map(str, argv)]

    def popen(self, side: str, argv: list, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(side, argv), **kwargs)

    def run(self, side: str, argv: list, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(side, argv), **kwargs)

    def probe(self, side: str, *args, **kwargs) -> subprocess.Popen:
        """tests/linkemu/probe.py ARGS in namespace ``side`` (stdout piped)."""
        return self.popen(side, [sys.executable, HERE / "probe.py", *args], stdout=subprocess.PIPE, text=True,
                          **kwargs)
