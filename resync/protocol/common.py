"""What both ends of a transfer share: the errors a peer's Error frame
becomes, the tunables both use, and the one rule of resuming."""
from __future__ import annotations

from ..errors import FileError, NoSpaceError, ResyncError
from . import frames as F

QUIET_FACTOR = 8                 # a file is quiet after this many repair (or probe) delays, even while others flow
SMALL_FILE = 1 << 20             # files up to this size are read, not mapped
PACK_FILE = 64 << 10             # files up to this size travel in packs (their contents share stripes); one
#                                  of the basis's size is asked for with the basis's hash, not its blocks
MEMBER_FILE = SMALL_FILE         # a file up to this size whose wire delta is at most PACK_FILE is a pack member
MEMBER_BASIS = 16 << 20          # ... if its basis (the receiver's copy, read whole to rebuild it) is at most this
WORK_SLICE = 0.02                # s of work (frames taken, files started) before the transport may send
#                                  and read again: the two ends work at once instead of in turns


class PeerNoSpaceError(NoSpaceError):
    """the peer ran out of space: {}"""


class PeerFileError(FileError):
    """the peer could not read or write: {}"""


class RefusedError(ResyncError):
    """refused: {}"""

    exit_code = 13


class CancelledError(RefusedError):
    """cancelled: {}"""

    # The server's operator cancelled the transfer (its API): the receiver
    # keeps what arrived for a later run to resume; the client does not retry.


class BusyError(RefusedError):
    """refused: {}"""

    # Another device's transfer is writing the destination: the client
    # retries (within --retry-for), then gives up with exit 13.


def resumes(r: F.Resume, frame: F.File) -> bool:
    """Whether the content ``frame`` announces is the very one ``r`` kept
    part of (same BLAKE3 and length): then what was kept is not sent again,
    whatever stripes each attempt cut it into (``carried``)."""
    return r.content == frame.content and r.length == frame.length


def carried(r: F.Resume, frame: F.File) -> list[int]:
    """The stripes of ``frame``'s content that the receiver already holds,
    from what ``r`` offers (stripe ranges of the geometry the cut transfer
    used, ``r.k`` x ``r.shard_size`` bytes a stripe) — the one rule both
    ends apply. The same geometry: the ranges as they are. Another (a
    fallback from the TLS stream's 1 MiB stripes to QUIC's datagrams, a path
    whose MTU dropped): every new stripe whose bytes lie wholly inside the
    bytes kept; a new stripe only partly kept is sent again whole."""
    if not resumes(r, frame) or not r.stripes:
        return []
    if r.k == frame.k and r.shard_size == frame.shard_size:
        return [s for first, count in r.stripes for s in range(first, first + count)]
    old, new, length = r.k * r.shard_size, frame.k * frame.shard_size, frame.length
    if old <= 0 or new <= 0:
        return []
    spans: list[list[int]] = []                 # the bytes kept, adjacent ranges joined
    for first, count in sorted(r.stripes):
        lo, hi = first * old, min(length, (first + count) * old)
        if spans and spans[-1][1] >= lo:
            spans[-1][1] = max(spans[-1][1], hi)
        elif hi > lo:
            spans.append([lo, hi])
    out: list[int] = []
    for lo, hi in spans:
        for s in range(-(-lo // new), -(-hi // new) + 1):
            if s * new >= lo and s * new < length and min(length, (s + 1) * new) <= hi:
                out.append(s)
    return sorted(set(out))


def progress_share(frame: F.File, stripe: int) -> int:
    """The bytes of the file ``frame`` describes that ``stripe`` of its
    content stands for in a progress display (a delta's stripes scaled to the
    file's size)."""
    if not frame.length:
        return 0
    lo = stripe * frame.k * frame.shard_size
    n = max(0, min(frame.k * frame.shard_size, frame.length - lo))
    return n if not frame.delta else n * frame.size // frame.length


def keyed_hash(buffer, salt: bytes) -> bytes:
    """The first encodings.BASIS_HASH bytes of the BLAKE3 of ``buffer`` keyed
    with this transfer's 32-byte ``salt`` (BLAKE3's keyed mode): a basis
    hash (encodings.basis_hash_to_wire), which a peer cannot make collide
    without the salt."""
    import blake3

    from .encodings import BASIS_HASH
    return blake3.blake3(buffer, key=salt).digest(BASIS_HASH)


def blake3_of(buffer) -> bytes:
    """BLAKE3 (32 bytes) of a buffer, on all cores past 16 MiB."""
    import blake3
    return blake3.blake3(buffer, max_threads=blake3.blake3.AUTO if len(buffer) > 1 << 24 else 1).digest()
