"""Rolling scan of a new file against a signature's weak-sum table.

The window slides one byte at a time until its weak sum is in the table; then
the keyed check selects a block, preferring the block that follows the
previous match so COPY runs stay contiguous (right after a match, that block's
check alone is enough). That preference is forgotten once the window has slid
a whole block past the end of the previous match without a match, so the
scan's state is then its position alone: a scan split into pieces (one per
thread) can be joined where a re-scan from the true state meets a piece's own
scan, and the result does not depend on how the work was split (see
``resync.delta.find_matches``). A candidate chain (blocks sharing a weak sum)
is walked for at most ``max_chain`` entries, so a basis made of thousands of
equal blocks cannot make the scan quadratic.

Per byte, the roll updates the exact sums (two adds, no modulo on the
loop-carried chain), and a bit filter holding 8 bits per table slot (a hash of
the weak sum picks the bit) rejects ~97 % of windows without touching the
table, so the branch is predictable and the table stays out of the way.

Matches are tentative: the caller confirms each with BLAKE3 in batch
(``blake3_lanes.hash_windows``), which keeps strong hashing off this loop.
"""
import numpy as np
from numba import uint32, uint64

from ._jit import inline, kernel
from .weak import adler, window_check, window_totals

EMPTY = -1
_GOLDEN = 0x9E3779B1


@inline
def _mix(weak):
    return (uint64(weak) * uint64(_GOLDEN)) & uint64(0xFFFFFFFF)


@inline
def _filter_bit(weak, nbits):
    """Bit index in [0, nbits) for ``weak`` (multiply-shift: any nbits works)."""
    return (_mix(weak) * uint64(nbits)) >> uint64(32)


@kernel
def build_table(sorted_weak, bits, keys, heads, filter_bits):
    """Open-addressing table from weak sum to the first index of its run in
    ``sorted_weak`` (ascending), written into keys (uint32) and heads (int64),
    both 2**bits long (> 2x the number of runs), and a bit filter over the weak
    sums in ``filter_bits`` (uint8, any length; more bits reject more windows
    before the table probe). All three are overwritten."""
    size = 1 << bits
    mask = size - 1
    keys[:] = 0
    heads[:] = EMPTY
    filter_bits[:] = 0
    nbits = filter_bits.shape[0] * 8
    shift = uint64(32 - bits)
    for i in range(sorted_weak.shape[0]):
        w = sorted_weak[i]
        if i > 0 and sorted_weak[i - 1] == w:
            continue
        slot = np.int64(_mix(w) >> shift)
        while heads[slot] != EMPTY:
            slot = (slot + 1) & mask
        keys[slot] = w
        heads[slot] = i
        f = _filter_bit(w, nbits)
        filter_bits[f >> uint64(3)] |= np.uint8(1 << (f & uint64(7)))


@kernel
def scan(data, start, stop, block_len, weights,
         keys, heads, filter_bits, bits,
         sorted_weak, sorted_check, sorted_block,
         block_weak, block_check, max_chain,
         fresh, expected, last_end,
         out_pos, out_block):
    """Tentative matches for windows starting in [start, stop) of ``data``.

    Windows are ``block_len`` long and may extend past ``stop``. block_weak /
    block_check are indexed by block number (full blocks only). Writes match
    positions and block numbers in increasing position order; returns the count.
    out arrays need (stop - start) // block_len + 1 entries.

    The scan starts in the state (``fresh``, ``expected``, ``last_end``): fresh
    (1) means ``start`` directly follows a match, whose block + 1 is
    ``expected`` and whose end is ``last_end``; a fresh scan of a whole file is
    (1, -1, start). ``expected`` is preferred until the window has slid a block
    past ``last_end``.
    """
    n = data.shape[0]
    nfull = block_weak.shape[0]
    mask = (1 << bits) - 1
    shift = uint64(32 - bits)
    nbits = filter_bits.shape[0] * 8
    L = uint64(block_len)
    count = 0
    p = start
    s1 = uint64(0)
    s2 = uint64(0)
    check = uint32(0)
    have_check = False
    have_sums = False
    while p < stop and p + block_len <= n:
        if fresh:
            # Right after a match, the next block usually follows: its keyed
            # check alone decides (a third of the work of the full sums; the
            # caller's BLAKE3 confirms every match either way).
            if 0 <= expected < nfull and window_check(data, p, block_len, weights) == block_check[expected]:
                out_pos[count] = p
                out_block[count] = expected
                count += 1
                expected += 1
                p += block_len
                last_end = p
                continue
            fresh = False
            have_sums = False
        if not have_sums:
            s1, s2, check = window_totals(data, p, block_len, weights)
            have_check = True
            have_sums = True
        if expected >= 0 and p - last_end >= block_len:
            expected = -1                  # a block past the last match: the preference is forgotten
        weak = adler(s1, s2, block_len)
        matched = -1
        f = _filter_bit(weak, nbits)
        if filter_bits[f >> uint64(3)] & (1 << (f & uint64(7))):
            slot = np.int64(_mix(weak) >> shift)
            head = EMPTY
            while heads[slot] != EMPTY:
                if keys[slot] == weak:
                    head = heads[slot]
                    break
                slot = (slot + 1) & mask
            if head != EMPTY:
                if not have_check:
                    check = window_check(data, p, block_len, weights)
                    have_check = True
                if 0 <= expected < nfull and block_weak[expected] == weak and block_check[expected] == check:
                    matched = expected
                else:
                    i = head
                    last = min(head + max_chain, sorted_weak.shape[0])
                    while i < last and sorted_weak[i] == weak:
                        if sorted_check[i] == check:
                            matched = sorted_block[i]
                            break
                        i += 1
        if matched >= 0:
            out_pos[count] = p
            out_block[count] = matched
            count += 1
            expected = matched + 1
            p += block_len
            last_end = p
            fresh = True
            continue
        if p + block_len >= n:
            break
        # Exact sums never go negative: the byte leaving was part of both.
        b_out = uint64(data[p])
        s1 = s1 - b_out + uint64(data[p + block_len])
        s2 = s2 - L * b_out + s1
        p += 1
        have_check = False
    return count
