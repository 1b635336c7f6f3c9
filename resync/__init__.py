"""resync: batch sync and archive tool on Numba kernels."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("resync-tool")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
