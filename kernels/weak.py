"""Weak block checks: Adler-32 and a keyed 32-bit linear check.

Adler-32 is the rolling sum (mod 65521) with exactly the values of
``zlib.adler32`` over each block. The second check, ``sum(b[i] * w[i]) mod 2**32``
with per-position weights derived from the signature's salt, is computed only
where the rolling sum already matched, so a 32-bit weak collision (about
N*F/2**32 of them for N blocks and F bytes scanned) rarely reaches BLAKE3.
"""
from numba import uint32, uint64

from ._jit import inline, kernel

MOD = 65521


_SPAN = 4096   # bytes summed in 32-bit lanes before widening: sum(j * b) < 2**32


@inline
def window_totals(data, pos, length, weights):
    """Exact (unreduced) sums of data[pos:pos+length] as uint64: (sum(b[k]),
    sum((length - k) * b[k]), check). Adler-32 is ((s2 + length) % 65521) << 16
    | ((s1 + 1) % 65521) of these; the scan rolls them exactly, which keeps the
    modulo off its loop-carried chain.

    s2 is computed as length * sum(b) - sum(k * b[k]), each span of 4096 bytes
    in 32-bit arithmetic so the loop vectorizes.
    """
    total = uint64(0)
    moment = uint64(0)
    check = uint32(0)
    for i in range(0, length, _SPAN):
        n = min(_SPAN, length - i)
        # Slices, not data[pos + i + j]: a slice index needs no negative-index
        # fix-up, which is what lets LLVM vectorize this loop (5x faster).
        span = data[pos + i:pos + i + n]
        w = weights[i:i + n]
        a = uint32(0)
        m = uint32(0)
        c = uint32(0)
        for j in range(n):
            b = uint32(span[j])
            a = uint32(a + b)
            m = uint32(m + uint32(j) * b)
            c = uint32(c + w[j] * b)
        moment += uint64(i) * uint64(a) + uint64(m)
        total += uint64(a)
        check = uint32(check + c)
    return total, uint64(length) * total - moment, check


@inline
def adler(s1, s2, length):
    """Adler-32 from the exact sums of window_totals."""
    return uint32((((s2 + uint64(length)) % uint64(MOD)) << uint64(16)) | ((s1 + uint64(1)) % uint64(MOD)))


@inline
def window_check(data, pos, length, weights):
    window = data[pos:pos + length]
    check = uint32(0)
    for i in range(length):
        check = uint32(check + weights[i] * uint32(window[i]))
    return check


@kernel
def check_weights(seed, out):
    """Per-position weights of the second check: out[i] = splitmix64(seed + i) >> 32."""
    state = uint64(seed)
    for i in range(out.shape[0]):
        state = uint64(state + uint64(0x9E3779B97F4A7C15))
        z = state
        z = uint64((z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9))
        z = uint64((z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB))
        z = z ^ (z >> uint64(31))
        out[i] = uint32(z >> uint64(32))


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
        s1, s2, check = window_totals(data, pos, length, weights)
        weak_out[k] = adler(s1, s2, length)
        check_out[k] = check


@kernel
def sums_at(data, pos, length, weights):
    """(weak, check) of the window data[pos:pos+length]."""
    s1, s2, check = window_totals(data, pos, length, weights)
    return adler(s1, s2, length), check
