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
         max_chain: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """Greedy scan with the kernel's documented rules: right after a match, the
    next block matches if its check does; at each window position, prefer the
    block after the previous match, else the first of up to
    ``max_chain`` blocks (in block order) with the window's weak sum whose check
    also matches; on a match jump a block, else move one byte."""
    stop = len(new) if stop is None else stop
    by_weak: dict[int, list[int]] = {}
    for b, w in enumerate(weak):
        by_weak.setdefault(w, []).append(b)
    out, expected, p, after_match = [], -1, start, False
    while p < stop and p + block_len <= len(new):
        window = new[p:p + block_len]
        w = zlib.adler32(window)
        match = -1
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
