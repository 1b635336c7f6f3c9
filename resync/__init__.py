"""resync: batch sync and archive tool on Numba kernels."""

# The one place the version is written (pyproject.toml reads it from here):
# importlib.metadata would cost 10-40 ms of every start-up.
__version__ = "0.1.0"
