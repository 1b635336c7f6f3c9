"""Systematic Reed-Solomon erasure coding over GF(2^8) (polynomial 0x11d).

``ReedSolomon(k, m)`` turns k data shards into m parity shards; any k of the
k + m shards give back the data. The generator is ``[I; C]`` with C the m x k
Cauchy matrix ``C[i, j] = 1 / (x_i + y_j)``, ``x_i = k + i``, ``y_j = j``
(all distinct because k + m <= 256): every square submatrix of a Cauchy
matrix is invertible, so every k rows of the generator are, and the code is
MDS. The small matrices are computed from GF(2^8) log and exp tables
(``gf``): the parity matrix directly, and for a decode only the e x e system
of the e lost data shards is inverted (``codec._recovery_rows``) —
microseconds, where galois needed about a second to set up in each process
and 2.4 ms per 13 x 13 inverse, which stalled a network receiver
mid-transfer (the tests check both against galois and against
tests/naive.py). The bytes go through the GF(2^8) kernels
(``resync.kernels.gf256``), split across threads for large shards.

The kernel path is chosen at run time: ``gfni`` where the CPU has GFNI and
AVX2, else ``portable``; ``RESYNC_GF_KERNEL=portable`` forces the latter.

The codec (``codec.py``, numpy and the kernels) is imported on first use of
one of its names (PEP 562): ``policy`` (the parity a loss rate needs) is
plain arithmetic, and a network run that moves no content needs nothing
else (numpy's import was 70 ms of its start).
"""
from __future__ import annotations

MAX_SHARDS = 256                 # k + m at most: GF(2^8) has 256 elements

_CODEC = ("ReedSolomon", "multiply", "kernel_path", "describe_kernel")


def __getattr__(name: str):
    if name in _CODEC:
        from . import codec
        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
