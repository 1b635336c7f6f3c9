"""The daemon's Prometheus metrics (prometheus-client), served by its API.

Names follow Prometheus's conventions (prometheus.io/docs/practices/naming):
the ``resync_`` prefix, base units (seconds, bytes) last, counters ending in
``_total``; labels only from small fixed sets — ``direction`` (``push`` or
``pull``, as the client asked), ``module`` (the configured modules) — never a
transfer id (the API's transfers say what each one did). Every label set of
the configured modules starts at 0, so a rate over a quiet night is 0, not
absent.

A transfer's counters are added when it ends (from the figures its history
row records); ``resync_active_transfers`` counts the running ones.
"""
from __future__ import annotations

import sys
import time

DIRECTIONS = ("push", "pull")
# s: from a small update to a day-long first copy of a large dataset
DURATION_BUCKETS = (0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
# s: loopback to a satellite link
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# s: a timer run on time to a loop blocked for seconds (net.watch)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# (name, help, the transfer row's key) of the counters a transfer adds to when it ends
_COUNTED = (
    ("resync_sent_bytes", "Bytes this daemon sent on the wire (UDP payload over QUIC, TCP payload over TLS).",
     "bytes_sent"),
    ("resync_received_bytes", "Bytes this daemon received on the wire.", "bytes_received"),
    ("resync_shards_sent", "Shards (content datagrams) this daemon sent, parity and repairs included.",
     "shards_sent"),
    ("resync_shards_received", "Shards this daemon received.", "shards_received"),
    ("resync_shards_lost", "Shards this daemon sent over QUIC in packets declared lost (their stripes' parity, "
     "or a repair, made up for them).", "shards_lost"),
    ("resync_stripes_repaired", "Stripes the receiving end asked to be repaired (their parity was not enough).",
     "stripes_repaired"),
    ("resync_shards_recovered", "Data shards the receiving end rebuilt from parity (lost, corrupt or late on the "
     "way).", "shards_recovered"),
    ("resync_quic_packets_sent", "QUIC packets this daemon sent.", "udp_packets_sent"),
    ("resync_quic_packets_lost", "QUIC packets this daemon's loss detection declared lost.", "packets_lost"),
)


RELAY_PRIORITIES = ("critical", "high", "normal")
RELAY_EVENTS = ("taken", "refused", "forwarded", "delivered", "applied", "replay", "parked", "expired",
                "hold_time_ended", "removed", "stuck", "other")
RELAY_REASONS = ("expired", "hop limit", "duplicate", "busy", "storage depleted", "invalid", "other")


class ServerMetrics:
    """The metrics of one daemon, in a registry of its own (``registry``:
    what the API's /metrics serves). ``version``: resync's; ``modules``: the
    configured module names (their label sets start at 0)."""

    def __init__(self, version: str, modules=()):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        prometheus_client.disable_created_metrics()     # (no *_created series: noise for these counters)
        r = self.registry = CollectorRegistry()
        labels = ("direction", "module")
        self.completed = Counter("resync_transfers_completed", "Transfers that ended complete (entries that "
                                 "failed or vanished at the source included: they are reported, not retried).",
                                 labels, registry=r)
        self.failed = Counter("resync_transfers_failed", "Transfers that ended in an error after the daemon took "
                              "them (cut, the peer's or this disk full, a protocol error).", labels, registry=r)
        self.cancelled = Counter("resync_transfers_cancelled", "Transfers the operator cancelled (the API).",
                                 labels, registry=r)
        self.counters = {key: Counter(name, doc, labels, registry=r) for name, doc, key in _COUNTED}
        self.active = Gauge("resync_active_transfers", "Transfers running now.", ("direction",), registry=r)
        self.queued = Gauge("resync_queued_transfers", "The daemon's own transfers waiting for a slot (pending), "
                            "by priority.", ("priority",), registry=r)
        self.duration = Histogram("resync_transfer_duration_seconds", "Wall time of each transfer the daemon "
                                  "took, from its Welcome to its end.", ("direction",), buckets=DURATION_BUCKETS,
                                  registry=r)
        self.rtt = Histogram("resync_rtt_seconds", "QUIC's smoothed round-trip time at the end of each transfer "
                             "over QUIC.", buckets=RTT_BUCKETS, registry=r)
        self.loop_lag = Histogram("resync_event_loop_lag_seconds", "How late the daemon's event loop ran a "
                                  "timer due every 50 ms (transfers, the API and the metrics share the loop: a lag "
                                  "of seconds stalls them all; the log says where it was blocked).",
                                  buckets=LAG_BUCKETS, registry=r)
        Gauge("resync_build_info", "resync's version (the value is 1).", ("version", "python"),
              registry=r).labels(version, sys.version.split()[0]).set(1)
        Gauge("resync_start_time_seconds", "When this daemon started (Unix time).", registry=r).set(time.time())
        for direction in DIRECTIONS:
            self.active.labels(direction)
            self.duration.labels(direction)
        self.add_modules(modules)

    def add_modules(self, modules) -> None:
        """Label sets at 0 for these modules (a reload may add some)."""
        for direction in DIRECTIONS:
            for module in modules:
                for c in (self.completed, self.failed, self.cancelled, *self.counters.values()):
                    c.labels(direction, module)

    def add_relay(self, status) -> None:
        """A relaying daemon's series: what its spool holds (``status()``:
        store.Spool.status, read at each scrape) and what happened to
        envelopes (``relay_event``)."""
        from prometheus_client import Counter, Gauge
        r = self.registry
        held = Gauge("resync_relay_envelopes", "Envelopes the relay holds, by priority.", ("priority",), registry=r)
        size = Gauge("resync_relay_bytes", "Bytes of envelopes the relay holds, by priority.", ("priority",),
                     registry=r)
        for p in RELAY_PRIORITIES:
            held.labels(p).set_function(lambda p=p: status()["by_priority"][p]["envelopes"])
            size.labels(p).set_function(lambda p=p: status()["by_priority"][p]["bytes"])
        Gauge("resync_relay_oldest_envelope_age_seconds", "How long the oldest envelope held has been here.",
              registry=r).set_function(lambda: status()["oldest_seconds"])
        Gauge("resync_relay_stuck_envelopes", "Envelopes held whose forwards failed many times (kept until they "
              "expire).", registry=r).set_function(lambda: status()["stuck"])
        self.relay_events = Counter("resync_relay_events", "What happened to envelopes: taken into custody, "
                                    "refused, handed to the next hop or their destination, applied here, expired, "
                                    "removed.", ("event",), registry=r)
        self.relay_refusals = Counter("resync_relay_refusals", "Envelopes refused, by reason.", ("reason",),
                                      registry=r)
        for e in RELAY_EVENTS:
            self.relay_events.labels(e)
        for reason in RELAY_REASONS:
            self.relay_refusals.labels(reason)

    def relay_event(self, kind: str, reason: str | None = None) -> None:
        """One of the spool's events (store.Spool's ``on_event``)."""
        event = kind.replace(" ", "_")
        self.relay_events.labels(event if event in RELAY_EVENTS else "other").inc()
        if kind == "refused":
            self.relay_refusals.labels(reason if reason in RELAY_REASONS else "other").inc()

    def count_queued(self, queued) -> None:
        """``queued()``: pending transfers by priority (read at each scrape)."""
        from .net.sessions import PRIORITIES
        for p in PRIORITIES:
            self.queued.labels(p).set_function(lambda p=p: queued()[p])

    def started(self, direction: str) -> None:
        self.active.labels(direction).inc()

    def stopped(self, direction: str) -> None:
        self.active.labels(direction).dec()

    def ended(self, direction: str, module: str, state: str, seconds: float, row: dict,
              running: bool = True) -> None:
        """A transfer has ended, ``state`` completed, failed, cancelled,
        expired (counted as failed: it did not complete) or paused (no outcome
        counted: it goes on later); ``running``: it had ``started`` and
        stops now. ``row`` is its history row (net.transfer_row, with
        ``bytes_sent`` and ``bytes_received``: the wire's bytes at this end,
        whichever transport)."""
        if running:
            self.stopped(direction)
        if state != "paused":
            {"completed": self.completed, "cancelled": self.cancelled}.get(state, self.failed).labels(
                direction, module).inc()
        for key, counter in self.counters.items():
            value = row.get(key)
            if value:
                counter.labels(direction, module).inc(value)
        if state != "paused":
            self.duration.labels(direction).observe(max(0.0, seconds))
        rtt = row.get("rtt_ms")
        if row.get("transport") == "quic" and rtt:
            self.rtt.observe(rtt / 1000)
