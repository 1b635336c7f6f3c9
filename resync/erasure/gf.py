"""GF(2^8) with polynomial 0x11d: tables and the bit matrices GFNI uses.

Only small things live here (256-entry tables, coefficient matrices); bulk
data goes through the kernels in ``resync.kernels.gf256``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

POLY = 0x11D


@lru_cache(maxsize=None)
def exp_log() -> tuple[np.ndarray, np.ndarray]:
    """(exp, log): exp has 510 entries so exp[log a + log b] needs no modulo;
    the generator is 2, primitive for 0x11d."""
    exp = np.zeros(510, np.int64)
    log = np.zeros(256, np.int64)
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    return exp, log


@lru_cache(maxsize=None)
def mul_table() -> np.ndarray:
    """The 256x256 product table, flattened: table[(a << 8) | b] = a * b."""
    exp, log = exp_log()
    a = np.arange(256)
    t = exp[log[a][:, None] + log[a][None, :]]
    t[0, :] = 0
    t[:, 0] = 0
    return np.ascontiguousarray(t.astype(np.uint8).reshape(-1))


def mul(a: int, b: int) -> int:
    return int(mul_table()[(a << 8) | b])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Product of two small uint8 matrices over GF(2^8)."""
    t = mul_table()
    products = t[(a.astype(np.intp)[:, :, None] << 8) | b.astype(np.intp)[None, :, :]]
    return np.bitwise_xor.reduce(products, axis=1).astype(np.uint8)


def invert(a: np.ndarray) -> np.ndarray | None:
    """The inverse of a square uint8 matrix over GF(2^8), or None if it is
    singular: Gauss-Jordan elimination, each step one vectorised row update
    through the product table. For the e x e systems of a stripe decode (e
    lost data shards), where galois' inverse costs milliseconds per call
    (2.4 ms at e = 13 here) and about a second to set up in a new process."""
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"invert needs a square matrix, got {a.shape}")
    t = mul_table().reshape(256, 256)
    exp, log = exp_log()
    w = np.zeros((n, 2 * n), np.uint8)
    w[:, :n] = a
    w[np.arange(n), n + np.arange(n)] = 1
    for col in range(n):
        nz = np.flatnonzero(w[col:, col])
        if nz.size == 0:
            return None
        p = col + int(nz[0])
        if p != col:
            w[[col, p]] = w[[p, col]]
        w[col] = t[exp[255 - log[w[col, col]]], w[col]]          # pivot to 1
        f = w[:, col].copy()
        f[col] = 0
        rows = np.flatnonzero(f)
        if rows.size:
            w[rows] ^= t[f[rows][:, None], w[col][None, :]]
    return np.ascontiguousarray(w[:, n:])


@lru_cache(maxsize=None)
def _bit_matrix_table() -> np.ndarray:
    """For each c, the 8x8 bit matrix of x -> c*x as vgf2p8affineqb wants it:
    byte 7-i of the qword holds row i, whose bit j is bit i of c * 2**j."""
    t = mul_table().reshape(256, 256)
    out = np.zeros(256, np.uint64)
    for c in range(256):
        q = 0
        for i in range(8):
            row = 0
            for j in range(8):
                if (int(t[c, 1 << j]) >> i) & 1:
                    row |= 1 << j
            q |= row << (8 * (7 - i))
        out[c] = q
    return out


def bit_matrices(coef: np.ndarray) -> np.ndarray:
    """The GFNI bit matrix of every coefficient, row-major, as int64 words."""
    return np.ascontiguousarray(_bit_matrix_table()[coef.reshape(-1)]).view(np.int64)
