"""What resync prints for people and scripts: names escaped as rsync does
(\\#ooo for control characters, invalid UTF-8 and a backslash starting such an
escape) in every text printer, exact names in JSON, one-line errors with the
documented exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resync.cli.options import printable
from resync.errors import FileError, UnrecoverableError, UsageError

from .unprivileged import needs_setpriv, resync_as_user

PY = sys.executable
FORGED = "a\nchanged  fake"                      # a name that forges a second report line
ODD = {FORGED: "a\\#012changed  fake", "esc\x1b[31mred": "esc\\#033[31mred",
       os.fsdecode(b"caf\xe9"): "caf\\#351", "back\\#123": "back\\#134#123",
       "tab\there": "tab\there", "line\u2028sep": "line\\#342\\#200\\#250sep", "c1\x9b": "c1\\#302\\#233",
       "日本 été": "日本 été"}


def cli(*args, env=None):
    return subprocess.run([PY, "-m", "resync", *map(str, args)], capture_output=True,
                          env={**os.environ, **(env or {})})


def lines(raw: bytes) -> list[str]:
    return raw.decode("utf-8", "surrogateescape").splitlines()


def test_printable_escapes_like_rsync():
    for name, shown in ODD.items():
        assert printable(name) == shown
    assert printable("plain/path with space") == "plain/path with space"


@pytest.fixture
def odd_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(ODD):
        (src / name).write_bytes(b"x" * (i + 1))
    return src


def test_itemize_verbose_and_verify_print_escaped_names(tmp_path, odd_tree):
    env = {"RESYNC_HISTORY": str(tmp_path / "h.duckdb"), "RESYNC_HISTORY_MERGE": "inline"}
    dst = tmp_path / "dst"
    r = cli("sync", "-i", odd_tree, dst, env=env)
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert len(out) == len(ODD) + 1                     # one line per entry, plus ./
    for shown in ODD.values():
        assert f">f+++++++++ {shown}" in out
    assert not any("\x1b" in line or "\x9b" in line for line in out)
    # verify: one line per problem, escaped; --json exact
    for name in ODD:
        with open(os.fsencode(dst / name), "ab") as f:
            f.write(b"more")
    r = cli("verify", dst, env=env)
    assert r.returncode == 5
    out = lines(r.stdout)
    assert sorted(out) == sorted(f"changed  {shown}" for shown in ODD.values())
    r = cli("verify", "--json", dst, env=env)
    assert sorted(json.loads(r.stdout)["changed"]) == sorted(ODD)
    # history --run lists the run's files, escaped
    r = cli("history", "--json", env=env)
    run = json.loads(r.stdout)[-1]["id"]
    r = cli("history", "--run", run, env=env)
    out = lines(r.stdout)
    assert len(out) == len(ODD) and all(any(line.endswith(shown) for line in out) for shown in ODD.values())


@needs_setpriv
def test_errors_print_escaped_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = src / FORGED
    bad.write_text("x")
    bad.chmod(0)
    for args in (("sync", "--no-history", src, tmp_path / "dst"), ("pack", "--no-history", src, "-o",
                                                                     tmp_path / "b.bundle")):
        r = resync_as_user(*args)
        assert r.returncode == 23, r.stderr
        err = r.stderr.splitlines()
        assert "resync: error: a\\#012changed  fake: Permission denied" in err, err
        assert not any(line.startswith("changed  fake") for line in err)


def test_usage_errors_are_one_line(tmp_path):
    r = cli("sync", tmp_path)
    assert r.returncode == UsageError.exit_code
    err = lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("resync: error: ") and "DST" in err[0]
    r = cli("pack", tmp_path, "--parity", "x")
    assert r.returncode == 2 and len(lines(r.stderr)) == 1
    r = cli("no-such-command")
    assert r.returncode == 2 and len(lines(r.stderr)) == 1


@needs_setpriv
def test_an_unreadable_input_is_a_file_error(tmp_path):
    f = tmp_path / "basis"
    f.write_bytes(b"x" * 1000)
    f.chmod(0)
    r = resync_as_user("signature", f, tmp_path / "sig")
    assert r.returncode == FileError.exit_code, r.stderr
    assert r.stderr.splitlines() == [f"resync: error: {f}: Permission denied"]
    r = cli("signature", tmp_path / "missing", tmp_path / "sig")
    assert r.returncode == 2 and len(lines(r.stderr)) == 1


@pytest.mark.parametrize("keep", [0, 5, 63, 99])
def test_a_bundle_cut_short_is_damaged_beyond_repair(tmp_path, keep):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    assert cli("pack", src, "-o", tmp_path / "b", "--no-history").returncode == 0
    raw = (tmp_path / "b").read_bytes()[:keep]
    (tmp_path / "b").write_bytes(raw)
    want = 4 if keep == 0 else UnrecoverableError.exit_code       # an empty file is no bundle at all
    for args in (("verify", tmp_path / "b"), ("unpack", tmp_path / "b", tmp_path / "dst", "--no-history")):
        r = cli(*args)
        assert r.returncode == want, (args, r.stderr)
        assert len(lines(r.stderr)) == 1
    (tmp_path / "b").write_bytes(b"not a bundle at all, just text")
    assert cli("verify", tmp_path / "b").returncode == 4


def test_verify_through_a_symlinked_path(tmp_path):
    env = {"RESYNC_HISTORY": str(tmp_path / "h.duckdb"), "RESYNC_HISTORY_MERGE": "inline"}
    src, real = tmp_path / "src", tmp_path / "real"
    src.mkdir()
    (src / "f").write_text("x")
    assert cli("sync", src, real, env=env).returncode == 0
    (tmp_path / "link").symlink_to(real)
    r = cli("verify", tmp_path / "link", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    assert cli("sync", src, tmp_path / "link", env=env).returncode == 0
    r = cli("verify", real, env=env)                        # and the other way round
    assert r.returncode == 0, r.stderr + r.stdout


def test_plain_resync_prints_its_help(tmp_path):
    r = cli()
    assert r.returncode == 2 and b"Usage: resync" in r.stdout and r.stderr == b""
