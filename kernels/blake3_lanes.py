"""BLAKE3 of many equal-length windows at once, one window per SIMD lane.

Hashing a 4 KiB block costs ~2 us of call overhead from Python, i.e. up to a
second per GiB; here LANES windows are hashed together and LLVM turns the lane
loop of the compression function into AVX2/AVX-512 instructions (~5 GB/s per
core on the project's machines). The result is the standard BLAKE3 (optionally
keyed) and is tested against the ``blake3`` package.

Data flow per group of LANES windows: message words are gathered into a
transposed buffer ``m[word * LANES + lane]``, compressed chunk by chunk, and
chunk chaining values are merged into parents with the usual BLAKE3 stack
(all windows have the same length, so the tree shape is the same in every lane).
"""
import numpy as np
from numba import uint32

from ._jit import function, inline, kernel

LANES = 16
OUT_WORDS = 8          # 32-byte digests
CHUNK_LEN = 1024
BLOCK_LEN = 64
MAX_DEPTH = 54         # log2(2**64 / 1024): deepest possible chaining-value stack
SCRATCH_WORDS = (16 + 8 + 8 + 8 * MAX_DEPTH) * LANES   # hash_windows' work space

CHUNK_START = 1
CHUNK_END = 2
PARENT = 4
ROOT = 8
KEYED_HASH = 16

IV = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19], dtype=np.uint32)


@inline
def _rotr(x, n):
    return uint32((x >> n) | (x << (32 - n)))


@inline
def _g(a, b, c, d, mx, my):
    a = uint32(a + b + mx)
    d = _rotr(uint32(d ^ a), 16)
    c = uint32(c + d)
    b = _rotr(uint32(b ^ c), 12)
    a = uint32(a + b + my)
    d = _rotr(uint32(d ^ a), 8)
    c = uint32(c + d)
    b = _rotr(uint32(b ^ c), 7)
    return a, b, c, d


@function
def _compress_lanes(cv, m, counter, block_len, flags, out):
    """out[:, lane] = first 8 words of compress(cv[:, lane], m[:, lane], ...).

    Arrays are flat (word * LANES + lane) so every access has unit stride in
    the lane index; ``cv`` and ``out`` must be distinct arrays.
    """
    counter_lo = uint32(counter & 0xFFFFFFFF)
    counter_hi = uint32(counter >> 32)
    for l in range(LANES):
        v0 = cv[0 * LANES + l]
        v1 = cv[1 * LANES + l]
        v2 = cv[2 * LANES + l]
        v3 = cv[3 * LANES + l]
        v4 = cv[4 * LANES + l]
        v5 = cv[5 * LANES + l]
        v6 = cv[6 * LANES + l]
        v7 = cv[7 * LANES + l]
        v8 = uint32(0x6A09E667)
        v9 = uint32(0xBB67AE85)
        v10 = uint32(0x3C6EF372)
        v11 = uint32(0xA54FF53A)
        v12 = counter_lo
        v13 = counter_hi
        v14 = uint32(block_len)
        v15 = uint32(flags)
        m0 = m[0 * LANES + l]
        m1 = m[1 * LANES + l]
        m2 = m[2 * LANES + l]
        m3 = m[3 * LANES + l]
        m4 = m[4 * LANES + l]
        m5 = m[5 * LANES + l]
        m6 = m[6 * LANES + l]
        m7 = m[7 * LANES + l]
        m8 = m[8 * LANES + l]
        m9 = m[9 * LANES + l]
        m10 = m[10 * LANES + l]
        m11 = m[11 * LANES + l]
        m12 = m[12 * LANES + l]
        m13 = m[13 * LANES + l]
        m14 = m[14 * LANES + l]
        m15 = m[15 * LANES + l]
        # Seven rounds written out, the message permutation done by renaming:
        # a loop here would stop LLVM from vectorizing across lanes.
        # round 1
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 2
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 3
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 4
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 5
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 6
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8)
        # round 7
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m0, m1)
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m2, m3)
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m4, m5)
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m6, m7)
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m8, m9)
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m10, m11)
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m12, m13)
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m14, m15)
        out[0 * LANES + l] = v0 ^ v8
        out[1 * LANES + l] = v1 ^ v9
        out[2 * LANES + l] = v2 ^ v10
        out[3 * LANES + l] = v3 ^ v11
        out[4 * LANES + l] = v4 ^ v12
        out[5 * LANES + l] = v5 ^ v13
        out[6 * LANES + l] = v6 ^ v14
        out[7 * LANES + l] = v7 ^ v15


@function
def _load_block(data, w0, w1, w2, w3, starts, g0, count, offset, nbytes, m):
    """Gather message block ``offset`` (``nbytes`` <= 64 bytes) of each lane's window
    into m as little-endian words, zero-padded. Lanes past ``count`` repeat lane 0.

    Full blocks are read as whole 32-bit words: ``wK`` is ``data[K:]`` viewed as
    uint32, so a window starting at byte p reads wK[p >> 2 ...] with K = p & 3
    (one unaligned load per word; x86 does not mind).
    """
    for l in range(LANES):
        lane = g0 + l if l < count else g0
        p = starts[lane] + offset
        i = p >> 2
        if nbytes == BLOCK_LEN:
            # One loop per alignment: choosing the array inside a single loop
            # costs ~20 % of the hash rate.
            k = p & 3
            if k == 0:
                for w in range(16):
                    m[w * LANES + l] = w0[i + w]
            elif k == 1:
                for w in range(16):
                    m[w * LANES + l] = w1[i + w]
            elif k == 2:
                for w in range(16):
                    m[w * LANES + l] = w2[i + w]
            else:
                for w in range(16):
                    m[w * LANES + l] = w3[i + w]
        else:
            for w in range(16):
                word = uint32(0)
                for k in range(4):
                    j = 4 * w + k
                    if j < nbytes:
                        word |= uint32(data[p + j]) << (8 * k)
                m[w * LANES + l] = word


@inline
def _words_from(data, k):
    """data[k:] as little-endian uint32 words (as many as fit)."""
    n = max(data.shape[0] - k, 0)
    return data[k:k + n // 4 * 4].view(np.uint32)


@inline
def _fill_key(cv, key):
    for w in range(8):
        for l in range(LANES):
            cv[w * LANES + l] = key[w]


@inline
def _parent(left, right, key, flags, m, cv, out):
    """out = chaining value of the parent node over (left, right)."""
    for w in range(8):
        for l in range(LANES):
            m[w * LANES + l] = left[w * LANES + l]
            m[(w + 8) * LANES + l] = right[w * LANES + l]
    _fill_key(cv, key)
    _compress_lanes(cv, m, 0, BLOCK_LEN, flags | PARENT, out)


@kernel
def hash_windows(data, starts, length, key, keyed, out, scratch):
    """out[i] = BLAKE3(data[starts[i] : starts[i] + length]) as 8 little-endian words.

    ``key`` holds 8 words: the key when ``keyed`` (BLAKE3 keyed mode), else the
    IV. ``length`` >= 1; every window must lie inside ``data`` (the caller checks).
    ``scratch``: uint32[SCRATCH_WORDS] of work space (the kernel allocates nothing).
    """
    n = starts.shape[0]
    base_flags = KEYED_HASH if keyed else 0
    nchunks = (length + CHUNK_LEN - 1) // CHUNK_LEN
    w0 = _words_from(data, 0)
    w1 = _words_from(data, 1)
    w2 = _words_from(data, 2)
    w3 = _words_from(data, 3)
    m = scratch[:16 * LANES]
    cv = scratch[16 * LANES:24 * LANES]
    nxt = scratch[24 * LANES:32 * LANES]
    stack = scratch[32 * LANES:]     # MAX_DEPTH rows of 8 * LANES words
    for g0 in range(0, n, LANES):
        count = min(LANES, n - g0)
        depth = 0
        for c in range(nchunks):
            chunk_off = c * CHUNK_LEN
            chunk_len = min(CHUNK_LEN, length - chunk_off)
            nblocks = (chunk_len + BLOCK_LEN - 1) // BLOCK_LEN
            _fill_key(cv, key)
            for b in range(nblocks):
                blen = min(BLOCK_LEN, chunk_len - b * BLOCK_LEN)
                _load_block(data, w0, w1, w2, w3, starts, g0, count, chunk_off + b * BLOCK_LEN, blen, m)
                flags = base_flags
                if b == 0:
                    flags |= CHUNK_START
                if b == nblocks - 1:
                    flags |= CHUNK_END
                    if nchunks == 1:
                        flags |= ROOT
                _compress_lanes(cv, m, c, blen, flags, nxt)
                cv, nxt = nxt, cv
            if c < nchunks - 1:
                # Merge completed subtrees: one parent per trailing zero bit
                # of the number of chunks done so far.
                total = c + 1
                while total & 1 == 0:
                    depth -= 1
                    _parent(stack[depth * 8 * LANES:(depth + 1) * 8 * LANES], cv, key, base_flags, m, nxt, cv)
                    total >>= 1
                for j in range(8 * LANES):
                    stack[depth * 8 * LANES + j] = cv[j]
                depth += 1
        # The last chunk's chaining value climbs the remaining stack; the top
        # parent is the root.
        while depth > 0:
            depth -= 1
            flags = base_flags | ROOT if depth == 0 else base_flags
            _parent(stack[depth * 8 * LANES:(depth + 1) * 8 * LANES], cv, key, flags, m, nxt, cv)
        for l in range(count):
            for w in range(OUT_WORDS):
                out[g0 + l, w] = cv[w * LANES + l]
