"""History schema (documented in README.md) and its migrations.

Each migration is (version, statements) and runs once, in a transaction, when
a writer opens an older database; ``schema_version`` records what ran.
"""
import os

SCHEMA_VERSION = 9

MIGRATIONS = [
    (1, [
        """CREATE TABLE runs (
            id VARCHAR PRIMARY KEY,          -- random 128-bit hex
            started TIMESTAMP NOT NULL,          -- UTC
            finished TIMESTAMP,                  -- UTC; NULL when the run was killed
            source VARCHAR NOT NULL,
            destination VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- ok | partial | vanished | refused | failed | incomplete
            files_scanned BIGINT,
            files_changed BIGINT,
            files_deleted BIGINT,
            bytes_scanned BIGINT,
            bytes_literal BIGINT,             -- read from the source for changed files
            bytes_matched BIGINT,             -- reused from the destination (delta)
            bytes_written BIGINT,
            errors BIGINT,
            duration DOUBLE,                  -- seconds
            version VARCHAR,
            host VARCHAR,
            command VARCHAR,
            pid INTEGER
        )""",
        """CREATE TABLE run_files (
            run_id VARCHAR NOT NULL,
            path VARCHAR NOT NULL,            -- relative to the destination
            action VARCHAR NOT NULL,          -- new | update
            size BIGINT,
            literal_bytes BIGINT,
            matched_bytes BIGINT,
            duration DOUBLE,
            blake3 VARCHAR                    -- hex of the file as written
        )""",
        """CREATE TABLE manifests (
            run_id VARCHAR NOT NULL,
            path VARCHAR NOT NULL,            -- the destination tree after the run
            kind VARCHAR NOT NULL,            -- f d L D S
            size BIGINT,
            mtime_ns BIGINT,                  -- HUGEINT from v4
            mode INTEGER,                     -- permission bits
            blake3 VARCHAR                    -- regular files; NULL if not hashed
        )""",
        "CREATE INDEX run_files_run ON run_files (run_id)",
        "CREATE INDEX manifests_run ON manifests (run_id)",
    ]),
    # v2: a run that changed nothing shares the manifest rows of the run before
    # it instead of storing a copy (a nightly no-change run of 200,000 files
    # added 27 MB). runs.manifest_run names the run whose rows are the tree.
    (2, [
        "ALTER TABLE runs ADD COLUMN manifest_run VARCHAR",
        "UPDATE runs SET manifest_run = id WHERE EXISTS (SELECT 1 FROM manifests m WHERE m.run_id = runs.id)",
    ]),
    # v3: names that are not valid UTF-8 (a VARCHAR cannot hold them): ``path``
    # shows them with each undecodable byte as \xHH, ``path_raw`` keeps the
    # exact bytes (NULL for every other name).
    (3, [
        "ALTER TABLE manifests ADD COLUMN path_raw BLOB",
        "ALTER TABLE run_files ADD COLUMN path_raw BLOB",
    ]),
    # v4: mtimes after 2262-04-11 (ext4 goes to 2446) do not fit a BIGINT of
    # nanoseconds (they were stored as NULL, and verify called such files
    # changed): HUGEINT holds any time a file system does.
    (4, [
        "DROP INDEX manifests_run",
        "ALTER TABLE manifests ALTER mtime_ns TYPE HUGEINT",
        "CREATE INDEX manifests_run ON manifests (run_id)",
    ]),
    # v5: what crossed the network in a run over QUIC (resync sync to or from
    # resync://, and the pushes resync serve receives): one row per such run.
    (5, [
        """CREATE TABLE transfers (
            run_id VARCHAR NOT NULL,
            peer VARCHAR,                     -- the other side: resync://HOST:PORT/MODULE/PATH, or resync://CLIENT-ID
            peer_id VARCHAR,                  -- its device ID
            role VARCHAR,                     -- push | pull (the client's), receive (the server's)
            udp_bytes_sent BIGINT,            -- UDP payload bytes: QUIC, TLS and acknowledgements included
            udp_bytes_received BIGINT,
            udp_packets_sent BIGINT,
            udp_packets_received BIGINT,
            packets_lost BIGINT,              -- QUIC's count of packets it declared lost
            shards_sent BIGINT,               -- content shards (datagrams) this side sent
            shards_received BIGINT,
            repair_shards BIGINT,             -- shards the sender added on request
            repairs_asked BIGINT,             -- repair asks (a stripe still short is asked again each repair delay)
            probes BIGINT,                    -- shards the sender added for stripes unacknowledged too long
            corrupt_shards BIGINT,            -- shards dropped by their check
            parity INTEGER,                   -- parity shards per 128 data shards, last chosen
            loss_estimate DOUBLE,             -- the sender's estimate of the loss rate, last
            rtt_ms DOUBLE,                    -- QUIC's smoothed RTT at the end
            resumed_bytes BIGINT              -- content a cut earlier run delivered: not sent again
        )""",
        "CREATE INDEX transfers_run ON transfers (run_id)",
    ]),
    # v6: how many stripes came, and how many of them needed a repair round
    # (repairs_asked counts asks: a stripe still short is asked again).
    (6, [
        "ALTER TABLE transfers ADD COLUMN stripes BIGINT",
        "ALTER TABLE transfers ADD COLUMN stripes_repaired BIGINT",
    ]),
    # v7: the id both ends of a transfer record (from the handshake's two nonces), how many
    # connections a client run took, the packet size the path carried (path MTU search)
    (7, [
        "ALTER TABLE transfers ADD COLUMN transfer_id VARCHAR",
        "ALTER TABLE transfers ADD COLUMN attempts INTEGER",
        "ALTER TABLE transfers ADD COLUMN path_mtu INTEGER",
    ]),
    # v8: which transport carried it ('quic', or 'tcp': TLS over TCP on a clean short path) and,
    # for TCP, the kernel's counts (the udp_* columns are NULL then)
    (8, [
        "ALTER TABLE transfers ADD COLUMN transport VARCHAR",
        "ALTER TABLE transfers ADD COLUMN tcp_bytes_sent BIGINT",
        "ALTER TABLE transfers ADD COLUMN tcp_bytes_received BIGINT",
        "ALTER TABLE transfers ADD COLUMN tcp_retransmits BIGINT",
    ]),
    # v9: what a relay did with each envelope (resync serve --relay): custody taken, refusals,
    # hand-overs, deliveries, expiries, removals — one row per event
    (9, [
        """CREATE TABLE relay_events (
            occurred TIMESTAMP NOT NULL,      -- UTC
            node VARCHAR,                     -- the relay's device ID
            event VARCHAR NOT NULL,           -- taken | refused | forwarded | delivered | applied | replay |
            --                                   parked | expired | hold time ended | removed | stuck | recovered
            envelope_id VARCHAR,              -- hex BLAKE3 of the envelope's signed header and payload
            reason VARCHAR,                   -- a refusal's: expired | hop limit | duplicate | storage depleted | invalid
            detail VARCHAR,
            bytes BIGINT,
            priority VARCHAR                  -- critical | high | normal (when known)
        )""",
        "CREATE INDEX relay_events_occurred ON relay_events (occurred)",
    ]),
]

# transfers' columns after run_id, as the spool record's "transfer" object holds them
TRANSFER_COLUMNS = ["peer", "peer_id", "role", "udp_bytes_sent", "udp_bytes_received", "udp_packets_sent",
                    "udp_packets_received", "packets_lost", "shards_sent", "shards_received", "repair_shards",
                    "repairs_asked", "probes", "corrupt_shards", "parity", "loss_estimate", "rtt_ms",
                    "resumed_bytes", "stripes", "stripes_repaired", "transfer_id", "attempts", "path_mtu",
                    "transport", "tcp_bytes_sent", "tcp_bytes_received", "tcp_retransmits"]

RUN_COLUMNS = ["id", "started", "finished", "source", "destination", "status", "files_scanned",
               "files_changed", "files_deleted", "bytes_scanned", "bytes_literal", "bytes_matched",
               "bytes_written", "errors", "duration", "version", "host", "command", "pid", "manifest_run"]

# The spool's NDJSON fields (name, type in the JSON) in table order; path_raw
# arrives as hex and is stored as bytes.
FILE_COLUMNS = [("path", "VARCHAR"), ("action", "VARCHAR"), ("size", "BIGINT"),
                ("literal_bytes", "BIGINT"), ("matched_bytes", "BIGINT"), ("duration", "DOUBLE"),
                ("blake3", "VARCHAR"), ("path_raw", "VARCHAR")]
MANIFEST_COLUMNS = [("path", "VARCHAR"), ("kind", "VARCHAR"), ("size", "BIGINT"), ("mtime_ns", "HUGEINT"),
                    ("mode", "INTEGER"), ("blake3", "VARCHAR"), ("path_raw", "VARCHAR")]
SPOOL_EXPRESSIONS = {"path_raw": "unhex(path_raw)"}


def display_path(path: str) -> str:
    """``path`` as the history's VARCHAR columns hold it: unchanged when it is
    valid UTF-8, else with each undecodable byte as \\xHH."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def raw_path(path: str) -> bytes | None:
    """The exact bytes of ``path`` when it is not valid UTF-8, else None."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path)


def stored_path(path: str, raw: bytes | None) -> str:
    """The file system's name back from a (path, path_raw) pair of the history."""
    if raw is None:
        return path
    return os.fsdecode(bytes(raw))
