"""resync: batch sync and archive tool on Numba kernels."""


def __getattr__(name: str):
    # Looked up on first use: importlib.metadata costs ~40 ms of every start-up.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("resync-tool")
        except PackageNotFoundError:  # a source tree that is not installed
            return "0.0.0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
