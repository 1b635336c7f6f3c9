"""resync's transfer protocol, free of I/O (docs/protocol.md describes it).

``frames``: the control frames as pure encode/decode pairs; ``shards``: file
content cut into Reed-Solomon stripes, one shard per datagram, and put back
together from any k of them; ``session``: the two ends of a transfer (the
client and the server, each the sender or the receiver of files) as state
machines fed bytes and the time, returning bytes and timers — the model is
aioquic's ``QuicConnection``. Only ``resync.net`` touches sockets.
"""
