"""Slow, obviously-correct references for the kernels.

BLAKE3 itself is checked against the ``blake3`` package (the reference
implementation's bindings) rather than a Python re-implementation.
"""
from __future__ import annotations

import zlib

MASK64 = (1 << 64) - 1


def adler32_blocks(data: bytes, block_len: int) -> list[int]:
    return [zlib.adler32(data[i:i + block_len]) for i in range(0, len(data), block_len)]


def check_weights(seed: int, length: int) -> list[int]:
    """splitmix64(seed + i * golden) >> 32, as documented in kernels/weak.py."""
    out, state = [], seed
    for _ in range(length):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out.append(z >> 32)
    return out


def check_value(window: bytes, weights: list[int]) -> int:
    return sum(b * w for b, w in zip(window, weights)) & 0xFFFFFFFF


def scan(new: bytes, block_len: int, weak: list[int], check: list[int], weights: list[int],
         max_chain: int, start: int = 0, stop: int | None = None,
         state: tuple[bool, int, int] | None = None) -> list[tuple[int, int]]:
    """Greedy scan with the kernel's documented rules: right after a match, the
    next block matches if its check does; at each window position, prefer the
    block after the previous match (until the window is a whole block past
    that match's end), else the first of up to ``max_chain`` blocks (in block
    order) with the window's weak sum whose check also matches; on a match jump
    a block, else move one byte. ``state``: (right after a match, expected
    block, end of that match) at ``start``."""
    stop = len(new) if stop is None else stop
    by_weak: dict[int, list[int]] = {}
    for b, w in enumerate(weak):
        by_weak.setdefault(w, []).append(b)
    after_match, expected, last_end = state if state is not None else (False, -1, start)
    out, p = [], start
    while p < stop and p + block_len <= len(new):
        window = new[p:p + block_len]
        w = zlib.adler32(window)
        match = -1
        if p - last_end >= block_len:
            expected = -1
        if after_match and 0 <= expected < len(weak) and check[expected] == check_value(window, weights):
            match = expected      # right after a match, the next block's check alone decides
        elif w in by_weak:
            c = check_value(window, weights)
            if 0 <= expected < len(weak) and weak[expected] == w and check[expected] == c:
                match = expected
            else:
                for b in by_weak[w][:max_chain]:
                    if check[b] == c:
                        match = b
                        break
        after_match = match >= 0
        if match >= 0:
            out.append((p, match))
            expected = match + 1
            p += block_len
            last_end = p
        else:
            p += 1
    return out


def patch(basis: bytes, instructions: list[tuple[int, int, int]], literals: bytes) -> bytes:
    """instructions: (kind, source, length); kind 0 COPY from basis[source:], kind 1
    INSERT the next ``length`` literal bytes."""
    out, lit = bytearray(), 0
    for kind, source, length in instructions:
        if kind == 0:
            out += basis[source:source + length]
        else:
            out += literals[lit:lit + length]
            lit += length
    return bytes(out)


# GF(2^8) with 0x11d, by shift-and-add: the definition, nothing precomputed.

def gf_mul(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


def gf_inv(a: int) -> int:
    """a^254 (a^255 = 1 for a != 0)."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    r, p, e = 1, a, 254
    while e:
        if e & 1:
            r = gf_mul(r, p)
        p = gf_mul(p, p)
        e >>= 1
    return r


def gf_mul_rows(coef: list[list[int]], rows: list[bytes]) -> list[bytes]:
    """out[i] = XOR_j coef[i][j] * rows[j], byte by byte."""
    length = len(rows[0]) if rows else 0
    out = []
    for crow in coef:
        acc = bytearray(length)
        for c, row in zip(crow, rows):
            for t in range(length):
                acc[t] ^= gf_mul(c, row[t])
        out.append(bytes(acc))
    return out


def gf_invert(a: list[list[int]]) -> list[list[int]] | None:
    """The inverse of a square matrix over GF(2^8) by Gauss-Jordan, one
    element at a time; None if it is singular."""
    n = len(a)
    w = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if w[r][col]), None)
        if pivot is None:
            return None
        w[col], w[pivot] = w[pivot], w[col]
        inv = gf_inv(w[col][col])
        w[col] = [gf_mul(inv, x) for x in w[col]]
        for r in range(n):
            f = w[r][col]
            if r != col and f:
                w[r] = [x ^ gf_mul(f, y) for x, y in zip(w[r], w[col])]
    return [row[n:] for row in w]


def gf_matmul(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    out = []
    for row in a:
        acc = [0] * len(b[0])
        for x, brow in zip(row, b):
            for j, y in enumerate(brow):
                acc[j] ^= gf_mul(x, y)
        out.append(acc)
    return out


def cauchy_parity(k: int, m: int) -> list[list[int]]:
    """resync's documented parity matrix: 1 / ((k + i) xor j)."""
    return [[gf_inv((k + i) ^ j) for j in range(k)] for i in range(m)]


def affine_byte(matrix: int, x: int) -> int:
    """What GF2P8AFFINEQB computes for one byte (Intel SDM): bit i of the
    result is the parity of (byte 7-i of the matrix) AND x."""
    out = 0
    for i in range(8):
        row = (matrix >> (8 * (7 - i))) & 0xFF
        out |= (bin(row & x).count("1") & 1) << i
    return out


def nonzero_runs(data: bytes, offset: int, block: int) -> list[tuple[int, int]]:
    """fs.nonzero_runs, byte by byte: cut ``data`` (at file offset ``offset``)
    at the file's block boundaries; keep the pieces holding a non-zero byte,
    adjacent ones merged."""
    runs: list[tuple[int, int]] = []
    lo = 0
    while lo < len(data):
        hi = min(len(data), lo + block - (offset + lo) % block)
        if any(data[lo:hi]):
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        lo = hi
    return runs
