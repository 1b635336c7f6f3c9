"""Weak block checks: Adler-32 and a keyed 32-bit linear check.

Adler-32 is the rolling sum (mod 65521) with exactly the values of
``zlib.adler32`` over each block. The second check, ``sum(b[i] * w[i]) mod 2**32``
with per-position weights derived from the signature's salt, is computed only
where the rolling sum already matched, so a 32-bit weak collision (about
N*F/2**32 of them for N blocks and F bytes scanned) rarely reaches BLAKE3.
"""
import numpy as np
from numba import uint32, uint64

from ._jit import inline, kernel

MOD = 65521


@inline
def window_sums(data, pos, length, weights):
    """(s1, s2, check) of data[pos:pos+length]; s1, s2 already reduced mod 65521."""
    s1 = np.int64(0)
    s2 = np.int64(0)
    check = uint64(0)
    for i in range(length):
        b = np.int64(data[pos + i])
        s1 += b
        s2 += (length - i) * b
        check += uint64(weights[i]) * uint64(b)
    return (s1 + 1) % MOD, (s2 + length) % MOD, uint32(check & 0xFFFFFFFF)


@inline
def window_check(data, pos, length, weights):
    check = uint64(0)
    for i in range(length):
        check += uint64(weights[i]) * uint64(data[pos + i])
    return uint32(check & 0xFFFFFFFF)


@kernel
def check_weights(seed, length):
    """Per-position weights of the second check: splitmix64(seed + i) >> 32."""
    out = np.empty(length, dtype=np.uint32)
    state = uint64(seed)
    for i in range(length):
        state = uint64(state + uint64(0x9E3779B97F4A7C15))
        z = state
        z = uint64((z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9))
        z = uint64((z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB))
        z = z ^ (z >> uint64(31))
        out[i] = uint32(z >> uint64(32))
    return out


@kernel
def block_sums(data, first_block, nblocks, block_len, weights, weak_out, check_out):
    """Adler-32 and check of blocks first_block .. first_block+nblocks-1 of data.

    The last block of the file may be short; its check uses the first weights.
    Results go to weak_out / check_out at the same block indices.
    """
    n = data.shape[0]
    for k in range(first_block, first_block + nblocks):
        pos = k * block_len
        length = min(block_len, n - pos)
        s1, s2, check = window_sums(data, pos, length, weights)
        weak_out[k] = uint32((s2 << 16) | s1)
        check_out[k] = check


@kernel
def sums_at(data, pos, length, weights):
    """(weak, check) of the window data[pos:pos+length]."""
    s1, s2, check = window_sums(data, pos, length, weights)
    return uint32((s2 << 16) | s1), check
