"""Patch assembly: fill an output window from COPY/INSERT instruction arrays."""
from ._jit import inline, kernel

COPY = 0
INSERT = 1


@inline
def _copy(dst, src):
    # An explicit loop over two slices: LLVM makes it a vectorized copy. Numba's
    # own slice assignment (dst[a:b] = src[c:d]) runs 5x slower.
    for j in range(src.shape[0]):
        dst[j] = src[j]


@kernel
def assemble(basis, literals, literal_base, kinds, sources, lengths, index, skip, out):
    """Write instructions into ``out`` starting at instruction ``index``, of which
    ``skip`` bytes were already written, until ``out`` is full or the
    instructions end.

    COPY sources are basis offsets; INSERT sources are offsets in the literal
    stream, of which ``literals`` holds the part starting at ``literal_base``.
    Returns (index, skip, filled) to resume from.
    """
    filled = 0
    cap = out.shape[0]
    count = kinds.shape[0]
    while index < count and filled < cap:
        todo = lengths[index] - skip
        n = min(todo, cap - filled)
        src = sources[index] + skip
        if kinds[index] == COPY:
            _copy(out[filled:filled + n], basis[src:src + n])
        else:
            src -= literal_base
            _copy(out[filled:filled + n], literals[src:src + n])
        filled += n
        if n == todo:
            index += 1
            skip = 0
        else:
            skip += n
    return index, skip, filled
