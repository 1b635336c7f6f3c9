"""The one place where Numba compilation options are set.

Kernels are compiled once per machine (``cache=True``) and release the GIL
(``nogil=True``) so callers can run them on several threads. ``error_model``
"numpy" drops Python's division-by-zero checks from the hot loops.
"""
from numba import njit

_KERNEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


def kernel(fn):
    """Compile ``fn`` as a cached, GIL-free kernel."""
    return njit(**_KERNEL_OPTIONS)(fn)


def inline(fn):
    """A helper inlined into the kernels that call it (inlined at Numba-IR level,
    so LLVM sees straight-line code it can vectorize)."""
    return njit(inline="always", error_model="numpy")(fn)


def function(fn):
    """A helper compiled as its own function (not inlined). LLVM then vectorizes
    its loops with run-time alias checks on its array arguments, which it cannot
    do once the body is inlined next to the caller's own allocations."""
    return njit(nogil=True, error_model="numpy", boundscheck=False)(fn)
