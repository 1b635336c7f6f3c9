"""Build the native kernel library (see ``native.py``) for this machine.

    python -m resync.kernels.build [--force]

Each kernel in ``native.EXPORTS`` gets a C-ABI wrapper (``numba.cfunc``) that
turns pointers and shapes back into arrays and calls the kernel; Numba
compiles kernel and wrapper into one LLVM module, which is emitted as a
position-independent object for the host CPU. The objects are linked with the
system C compiler into a shared library, written atomically into the cache.

The kernels allocate nothing and raise nothing, so the library needs no Numba
runtime. The Numba runtime symbols its generated code still names sit on
error paths that cannot run (building the message of an array-shape error,
reporting an exception): they are defined below to abort. Every exported
kernel is run natively by the tests, so an allocation slipped into a kernel
shows up there. The wrappers' error paths also name Python C-API
functions, resolved from the interpreter that loads the library. Any other
undefined symbol is a build error, not a crash at run time.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import native

_UNREACHABLE = ("numba_do_raise", "numba_gil_ensure", "numba_gil_release",
                "numba_runtime_build_excinfo_struct", "numba_unpickle", "NRT_MemInfo_call_dtor",
                "NRT_Free", "NRT_Allocate", "NRT_MemInfo_alloc")
_STUBS = "#include <stdlib.h>\n" + "".join(f"void {name}(void) {{ abort(); }}\n" for name in _UNREACHABLE)


class BuildError(Exception):
    pass


def _wrapper_source(name: str, args: tuple[str, ...], results: tuple[str, ...]) -> str:
    params, body, call = [], [], []
    for i, spec in enumerate(args):
        arr = native.parse_array(spec)
        if arr is None:
            params.append(f"a{i}")
            call.append(f"a{i} != 0" if spec == "bool" else f"a{i}")
        else:
            dims = [f"a{i}_n{d}" for d in range(arr[1])]
            params += [f"a{i}_p", *dims]
            body.append(f"    a{i} = carray(a{i}_p, ({', '.join(dims)},))")
            call.append(f"a{i}")
    if results:
        params.append("res")
        body.append(f"    r = fn({', '.join(call)})")
        if len(results) == 1:
            body.append("    res[0] = r")
        else:
            body += [f"    res[{k}] = r[{k}]" for k in range(len(results))]
    else:
        body.append(f"    fn({', '.join(call)})")
    return f"def {native.SYMBOL_PREFIX}{name}({', '.join(params)}):\n" + "\n".join(body) + "\n"


def _c_signature(args: tuple[str, ...], results: tuple[str, ...]):
    from numba import types
    scalar = {"i64": types.int64, "u64": types.uint64, "bool": types.int64}
    array = {"u8": types.uint8, "u32": types.uint32, "i64": types.int64}
    sig = []
    for spec in args:
        arr = native.parse_array(spec)
        if arr is None:
            sig.append(scalar[spec])
        else:
            sig.append(types.CPointer(array[spec.split("[")[0]]))
            sig += [types.int64] * arr[1]
    if results:
        sig.append(types.CPointer(types.int64))
    return types.void(*sig)


def _objects(workdir: Path) -> list[Path]:
    import llvmlite.binding as llvm
    from numba import carray, cfunc

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple()
    machine = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                           features=llvm.get_host_cpu_features().flatten(),
                                           opt=3, reloc="pic", codemodel="default")
    objects = []
    for name, (module, args, results) in native.EXPORTS.items():
        if not native.supported(name):
            continue
        fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        scope = {"carray": carray, "fn": fn}
        exec(compile(_wrapper_source(name, args, results), f"<{name} wrapper>", "exec"), scope)
        wrapper = cfunc(_c_signature(args, results), error_model="numpy", boundscheck=False)(
            scope[native.SYMBOL_PREFIX + name])
        ir = llvm.parse_bitcode(wrapper._library._final_module.as_bitcode())
        for f in ir.functions:
            if f.name == wrapper.native_name:
                f.name = native.SYMBOL_PREFIX + name
                f.linkage = "external"
                f.visibility = "default"
                break
        else:
            raise BuildError(f"wrapper of {name} not found in its module")
        obj = workdir / f"{name}.o"
        obj.write_bytes(machine.emit_object(ir))
        objects.append(obj)
    return objects


def _check_undefined(lib: Path) -> None:
    """Only C-library and Python C-API symbols may remain undefined."""
    nm = shutil.which("nm")
    if not nm:
        raise BuildError("no nm to check the linked library")
    proc = subprocess.run([nm, "-u", "-D", str(lib)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nm failed: {proc.stderr.strip()[:500]}")
    bad = []
    for line in proc.stdout.splitlines():
        kind, _, symbol = line.strip().partition(" ")
        if kind == "w" or "@" in symbol or symbol.startswith(("Py", "_Py")):
            continue
        bad.append(symbol)
    if bad:
        raise BuildError(f"unresolved symbols: {', '.join(sorted(bad))}")


def build(path: Path) -> Path:
    """Compile and link the library to ``path`` (atomically). Raises BuildError."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BuildError("no C compiler (cc) to link the kernels")
    try:
        return _build(cc, path)
    except OSError as exc:      # unwritable cache, full disk, ...
        raise BuildError(f"{exc.filename or path}: {exc.strerror or exc}") from exc


def _build(cc: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resync-build-") as tmp:
        work = Path(tmp)
        try:
            objects = _objects(work)
        except BuildError:
            raise
        except Exception as exc:        # a Numba/LLVM failure: fall back to the JIT
            raise BuildError(f"compiling: {type(exc).__name__}: {exc}") from exc
        stubs = work / "unreachable.c"
        stubs.write_text(_STUBS)
        out = work / "kernels.so"
        cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), *map(str, objects), str(stubs), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"linking failed: {proc.stderr.strip()[:2000]}")
        if os.environ.get("RESYNC_BUILD_KEEP"):
            shutil.copytree(work, os.environ["RESYNC_BUILD_KEEP"], dirs_exist_ok=True)
        _check_undefined(out)
        fd, tmp_path = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=path.parent)
        os.close(fd)
        shutil.copyfile(out, tmp_path)
        os.chmod(tmp_path, 0o755)
        os.replace(tmp_path, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = native.library_path()
    if "--force" in argv or not path.exists():
        path.with_suffix(".failed").unlink(missing_ok=True)
        try:
            build(path)
        except BuildError as exc:
            print(f"resync: native kernels not built ({exc}); the Numba JIT will be used", file=sys.stderr)
            return 1
    print(native.status())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
