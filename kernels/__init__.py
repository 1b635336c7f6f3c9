"""Numba kernels of resync: pure functions of NumPy arrays and scalars.

Installed as ``resync.kernels``. Nothing here imports resync or does I/O; the
public wrappers in ``resync/`` validate shapes and dtypes before calling in.
Importing this package is cheap: each kernel module imports numba itself, so a
command compiles (or loads from cache) only the kernels it uses.
"""
