"""Kernels as one native library, loaded without Numba.

A command-line run pays ~0.35 s to import Numba and ~0.25 s more to load even
cached kernels, which is a third of a 1 GiB signature. So the kernels are also
compiled ahead of time (``kernels/build.py``: each one wrapped as a C function
by ``numba.cfunc``, the machine code linked into a shared library for this
CPU) and called here through ``ctypes``, which needs only NumPy and releases
the GIL during each call, so threads still run kernels in parallel.

``get(name)`` returns a callable with the kernel's own Python signature. It is
the native function when the library for these sources and this CPU exists
(built on first use, or by ``python -m resync.kernels.build``), else the Numba
dispatcher. ``RESYNC_KERNELS=jit`` forces the dispatcher; ``NUMBA_DISABLE_JIT=1``
gives the pure-Python functions (tests use it to see inside the kernels).
Arguments are checked (dtype, dimensions, C order) before a pointer is passed.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import platform
import sys
import threading
from pathlib import Path

import numpy as np

ABI_VERSION = 1

# name: (module, argument types, result types). Arrays are "dtype[]" (1-D) or
# "dtype[,]" (2-D), passed as a pointer and their shape; scalars are i64, u64
# or bool. Results come back through an int64 array.
EXPORTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "check_weights": ("weak", ("u64", "u32[]"), ()),
    "block_sums": ("weak", ("u8[]", "i64", "i64", "i64", "u32[]", "u32[]", "u32[]"), ()),
    "sums_at": ("weak", ("u8[]", "i64", "i64", "u32[]"), ("u32", "u32")),
    "hash_windows": ("blake3_lanes", ("u8[]", "i64[]", "i64", "u32[]", "bool", "u32[,]", "u32[]"), ()),
    "build_table": ("scan", ("u32[]", "i64", "u32[]", "i64[]", "u8[]"), ()),
    "scan": ("scan", ("u8[]", "i64", "i64", "i64", "u32[]", "u32[]", "i64[]", "u8[]", "i64",
                      "u32[]", "u32[]", "i64[]", "u32[]", "u32[]", "i64", "bool", "i64", "i64",
                      "i64[]", "i64[]"), ("i64",)),
    "assemble": ("patch", ("u8[]", "u8[]", "i64", "u8[]", "i64[]", "i64[]", "i64", "i64", "u8[]"),
                 ("i64", "i64", "i64")),
    "gf_mul_portable": ("gf256", ("u8[,]", "u8[]", "i64[]", "u8[]", "i64[]", "i64", "i64", "u8[]"), ()),
    "gf_mul_gfni": ("gf256", ("u8[,]", "i64[]", "u8[]", "i64[]", "u8[]", "i64[]", "i64", "i64", "u8[]"), ()),
}
# Kernels that only exist on CPUs with these features (names as in /proc/cpuinfo).
REQUIRES: dict[str, tuple[str, ...]] = {
    "gf_mul_gfni": ("gfni", "avx2"),
}
SYMBOL_PREFIX = "resync_kernel_"
HASH_WINDOWS_SCRATCH = (16 + 8 + 8 + 8 * 54) * 16    # == blake3_lanes.SCRATCH_WORDS (tested)
GF_SCRATCH = 8 * 2048                                 # == gf256.SCRATCH (tested)

_DTYPES = {"u8": np.dtype(np.uint8), "u32": np.dtype(np.uint32), "i64": np.dtype(np.int64)}


def parse_array(spec: str) -> tuple[np.dtype, int] | None:
    """("u32[,]") -> (uint32, 2); None for a scalar type."""
    if not spec.endswith("]"):
        return None
    name, dims = spec[:-1].split("[")
    return _DTYPES[name], dims.count(",") + 1


_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None       # "native: PATH" or "jit: reason"
_bound: dict[str, object] = {}


def _cpu_identity() -> bytes:
    """What the compiled code depends on: architecture, CPU model and features."""
    ident = platform.machine().encode()
    try:
        with open("/proc/cpuinfo", "rb") as f:
            info = f.read(1 << 16).split(b"\n\n")[0]
        ident += b"".join(line for line in info.splitlines()
                          if line.startswith((b"model name", b"flags", b"vendor_id", b"Features")))
    except OSError:
        ident += platform.processor().encode()
    return ident


_flags: frozenset[str] | None = None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature names (``gfni``, ``avx2``, ...), from /proc/cpuinfo
    or, failing that, from LLVM's view of the host."""
    global _flags
    if _flags is None:
        flags: set[str] = set()
        try:
            with open("/proc/cpuinfo", "rb") as f:
                info = f.read(1 << 16).split(b"\n\n")[0]
            for line in info.splitlines():
                if line.startswith((b"flags", b"Features")):
                    flags.update(line.split(b":", 1)[1].decode().split())
        except OSError:
            pass
        if not flags:
            try:
                import llvmlite.binding as llvm
                flags = {name for name, on in llvm.get_host_cpu_features().items() if on}
            except Exception:       # no LLVM either: only the portable kernels
                flags = set()
        _flags = frozenset(flags)
    return _flags


def supported(name: str) -> bool:
    """Whether kernel ``name`` can run on this CPU (see REQUIRES)."""
    return all(flag in cpu_flags() for flag in REQUIRES.get(name, ()))


def library_key() -> str:
    """Digest of everything the library is built from: kernel sources, ABI, CPU."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"abi{ABI_VERSION} py{sys.version_info[0]}".encode())
    for path in sorted(_HERE.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(_cpu_identity())
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("RESYNC_CACHE_DIR"):
        return Path(os.environ["RESYNC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resync"


def library_path() -> Path:
    return cache_dir() / f"kernels-{library_key()}.so"


def mode() -> str:
    """'python' (NUMBA_DISABLE_JIT), 'jit' (RESYNC_KERNELS=jit) or 'native'."""
    if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return "python"
    if os.environ.get("RESYNC_KERNELS", "").lower() == "jit":
        return "jit"
    return "native"


def _load() -> ctypes.CDLL | None:
    """The native library, built if missing; None (and _status says why) if unavailable."""
    global _library, _status
    if _status is not None:
        return _library
    m = mode()
    if m != "native":
        _status = f"{m}: selected by the environment"
        return None
    path = library_path()
    failed = path.with_suffix(".failed")
    if not path.exists():
        if failed.exists():
            _status = f"jit: native build failed earlier (see {failed})"
            return None
        from .build import BuildError, build
        if sys.stderr is not None and sys.stderr.isatty():
            print("resync: compiling kernels for this machine (once, ~30 s)...", file=sys.stderr, flush=True)
        try:
            build(path)
        except BuildError as exc:
            _status = f"jit: native build failed: {exc}"
            try:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{exc}\n")
            except OSError:
                pass
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        _status = f"jit: cannot load {path}: {exc}"
        return None
    _library = lib
    _status = f"native: {path}"
    return lib


def status() -> str:
    """Which kernels run, and why: for ``resync --version`` and benchmarks."""
    with _lock:
        _load()
    return _status or "unknown"


def describe() -> str:
    """Like status(), but never builds: for ``resync --version``."""
    with _lock:
        if _status is None and mode() == "native":
            path = library_path()
            if not path.exists():
                failed = path.with_suffix(".failed")
                return f"jit (native build failed, see {failed})" if failed.exists() else \
                    "native, not built yet (built on first use)"
        _load()
    return _status or "unknown"


def _bind(lib: ctypes.CDLL, name: str):
    _, args, results = EXPORTS[name]
    fn = getattr(lib, SYMBOL_PREFIX + name)
    argtypes = []
    arrays = []
    for spec in args:
        arr = parse_array(spec)
        arrays.append(arr)
        if arr is None:
            argtypes.append(ctypes.c_uint64 if spec == "u64" else ctypes.c_int64)
        else:
            argtypes.append(ctypes.c_void_p)
            argtypes.extend([ctypes.c_int64] * arr[1])
    if results:
        argtypes.append(ctypes.c_void_p)
    fn.argtypes = argtypes
    fn.restype = None
    nres = len(results)
    signed = tuple(r == "i64" for r in results)

    def call(*values):
        if len(values) != len(arrays):
            raise TypeError(f"{name}() takes {len(arrays)} arguments ({len(values)} given)")
        cargs = []
        for i, (v, arr) in enumerate(zip(values, arrays)):
            if arr is None:
                cargs.append(int(v))
                continue
            dtype, ndim = arr
            if not (isinstance(v, np.ndarray) and v.dtype == dtype and v.ndim == ndim
                    and v.flags.c_contiguous):
                raise TypeError(f"{name}() argument {i}: expected a C-contiguous {ndim}-D {dtype} array, "
                                f"got {type(v).__name__} {getattr(v, 'dtype', '')}{getattr(v, 'shape', '')}")
            cargs.append(v.ctypes.data)
            cargs.extend(v.shape)
        if not nres:
            fn(*cargs)
            return None
        res = np.zeros(nres, np.int64)
        fn(*cargs, res.ctypes.data)
        out = tuple(int(r) if s else int(r) & 0xFFFFFFFF for r, s in zip(res, signed))
        return out[0] if nres == 1 else out

    call.__name__ = name
    call.__doc__ = f"Native build of kernels.{EXPORTS[name][0]}.{name}."
    return call


def native_kernels() -> dict[str, object]:
    """Every exported kernel from the native library; RuntimeError if it is unavailable."""
    with _lock:
        lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable ({_status})")
    return {name: _bind(lib, name) for name in EXPORTS if supported(name)}


def get(name: str):
    """The kernel ``name`` (see EXPORTS): native if available, else Numba's.
    RuntimeError if this CPU cannot run it (see REQUIRES)."""
    fn = _bound.get(name)
    if fn is not None:
        return fn
    if not supported(name):
        raise RuntimeError(f"kernel {name} needs CPU features {', '.join(REQUIRES[name])}")
    with _lock:
        lib = _load()
        fn = _bind(lib, name) if lib is not None else \
            getattr(importlib.import_module(f"{__package__}.{EXPORTS[name][0]}"), name)
        _bound[name] = fn
    return fn
