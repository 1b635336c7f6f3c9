"""The command line as a user meets it: exit codes, one-line errors, --json."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resync.errors import FileError, FormatError, VerificationError

from .conftest import edited

PY = sys.executable


def resync(*args, cwd=None):
    return subprocess.run([PY, "-m", "resync", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def pair(tmp_path, rng):
    basis = rng.integers(0, 256, 300_000, dtype=np.uint8)
    new = edited(rng, basis, 5, span=3000)
    (tmp_path / "basis").write_bytes(basis.tobytes())
    (tmp_path / "new").write_bytes(new.tobytes())
    return tmp_path


def test_help_imports_no_numba_and_is_fast():
    code = ("import sys, time\nt = time.perf_counter()\nfrom resync.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(*[m in sys.modules for m in ('numba', 'numpy', 'duckdb', 'pathspec', 'galois', 'aioquic', "
            "'aiohttp', 'prometheus_client')], file=sys.stderr)")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr.strip() == " ".join(["False"] * 8)
    for name in ("sync", "history", "verify", "signature", "delta", "patch", "serve", "status"):
        assert name in r.stdout


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130():
    # A Ctrl-C that lands while click is being imported (made certain here by
    # a finder that raises it) ends as one during a run does.
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'click':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from resync._entry import main\n"
            "main()\n")
    r = subprocess.run([PY, "-c", code, "sync", "a", "b"], capture_output=True, text=True)
    assert (r.returncode, r.stderr, r.stdout) == (130, "resync: error: interrupted\n", "")


def test_version():
    from resync import __version__
    r = resync("--version")
    assert r.returncode == 0
    first, kernels = r.stdout.splitlines()
    assert first == f"resync {__version__}"
    assert kernels.startswith("kernels: ")


def test_full_cycle_with_json(pair):
    d = pair
    assert resync("signature", d / "basis", d / "sig").returncode == 0
    r = resync("delta", d / "sig", d / "new", d / "delta", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["target_bytes"] == (d / "new").stat().st_size
    assert stats["matched_bytes"] + stats["literal_bytes"] == stats["target_bytes"]
    assert 0 < stats["savings_pct"] < 100 and stats["delta_bytes"] == (d / "delta").stat().st_size
    r = resync("patch", d / "basis", d / "delta", d / "out", "--json")
    assert r.returncode == 0, r.stderr
    assert (d / "out").read_bytes() == (d / "new").read_bytes()
    assert json.loads(r.stdout)["target_bytes"] == stats["target_bytes"]


def test_patch_in_place_over_the_basis(pair):
    d = pair
    resync("signature", d / "basis", d / "sig", "-b", "4096")
    resync("delta", d / "sig", d / "new", d / "delta")
    r = resync("patch", d / "basis", d / "delta", d / "basis")
    assert r.returncode == 0, r.stderr
    assert (d / "basis").read_bytes() == (d / "new").read_bytes()


def test_empty_signature_means_no_basis(pair):
    d = pair
    (d / "empty.sig").write_bytes(b"")
    assert resync("delta", d / "empty.sig", d / "new", d / "delta").returncode == 0
    assert resync("patch", d / "nowhere", d / "delta", d / "out").returncode == 0
    assert (d / "out").read_bytes() == (d / "new").read_bytes()


def _one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resync: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_corrupt_signature_exit_code(pair):
    d = pair
    (d / "sig").write_bytes(b"garbage that is not a signature" * 10)
    line = _one_line_error(resync("delta", d / "sig", d / "new", d / "delta"), FormatError.exit_code)
    assert "not a valid resync signature file: bad magic" in line
    assert not (d / "delta").exists()


def test_wrong_basis_exit_code_and_nothing_written(pair):
    d = pair
    resync("signature", d / "basis", d / "sig")
    resync("delta", d / "sig", d / "new", d / "delta")
    line = _one_line_error(resync("patch", d / "new", d / "delta", d / "out"), VerificationError.exit_code)
    assert "basis" in line
    assert not (d / "out").exists()
    assert not [p for p in os.listdir(d) if p.startswith(".resync-tmp-")]


def test_unwritable_destination_exit_code(pair):
    d = pair
    line = _one_line_error(resync("signature", d / "basis", d / "no" / "such" / "dir" / "sig"),
                           FileError.exit_code)
    assert "No such file or directory" in line


def test_usage_errors_exit_2(pair):
    d = pair
    assert resync("signature", d / "missing", d / "sig").returncode == 2
    assert resync("signature", d / "basis", d / "sig", "-b", "0").returncode == 2
    assert resync("frobnicate").returncode == 2
    assert resync("delta", d / "basis").returncode == 2


def test_patch_refuses_garbage_delta(pair):
    d = pair
    (d / "delta").write_bytes(b"RSYNCDLT" + b"\xff" * 200)
    _one_line_error(resync("patch", d / "basis", d / "delta", d / "out"), FormatError.exit_code)
    assert not (d / "out").exists()
