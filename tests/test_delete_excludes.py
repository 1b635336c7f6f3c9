"""--delete and what it must not delete: entries the excludes protect inside a
directory the source no longer has (kept with the directories that hold
them, as rsync -a --delete keeps them), and on a case-insensitive
destination a file the source spells otherwise (README over readme: one
entry there, so deleting the old spelling would delete the new file)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

from resync.apply import name_key
from resync.bundle.pack import pack, signature_tree
from resync.bundle.unpack import unpack
from resync.errors import DeletionRefusedError, PartialTransferError

from . import mix
from .test_sync import run_cli
from .treeutil import rsync_a, snapshot
from .unprivileged import needs_setpriv, resync_as_user

EXCLUDES = ["build/", "*.log", "cache/", "/old-project/KEEP"]
EXCLUDE_ARGS = [f"--exclude={p}" for p in EXCLUDES]


def write(path: Path, data: bytes | str = b"", mtime: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))


def make_pair(root: Path, seed: int = 5) -> tuple[Path, Path]:
    """A source and an old mirror of it: the mirror still holds a project the
    source dropped, with build output, logs and caches in it (what the
    excludes keep out of the run), text, empty files, odd names, a link and
    a FIFO."""
    rnd = random.Random(seed)
    src, dst = root / "src", root / "dst"
    write(src / "keep" / "notes.txt", mix.data(1, 3000, "text"))
    write(src / "keep" / "empty")
    write(src / "docs" / "readme.md", "# docs\n")
    write(dst / "keep" / "notes.txt", mix.data(2, 2000, "text"))          # changed since
    write(dst / "stale.txt", "stale\n")
    write(dst / "cache" / "blob", mix.data(3, 5000, "random"))             # excluded as a whole
    p = dst / "old-project"
    write(p / "src" / "main.c", mix.data(4, 4000, "text"))
    write(p / "src" / "empty.h")
    write(p / "build" / "obj" / "main.o", mix.data(5, 7000, "random"))     # build/: protected
    write(p / "build" / "empty.o")
    write(p / "logs" / "run.log", mix.data(6, 1500, "text"))               # *.log: protected
    write(p / "logs" / "summary.txt", "ok\n")
    write(p / "tmp" / "cache" / "x", b"\0" * 100)                          # cache/ deep inside
    write(p / "tmp" / "scratch" / "y", "y\n")
    write(p / "KEEP", "anchored at the transfer root\n")
    write(p / "sub" / "KEEP", "not anchored here: deleted\n")
    for i in range(6):
        write(p / "misc" / mix.odd_name(rnd, i), mix.data(10 + i, rnd.choice([0, 1, 100, 5000]), mix.pick_kind(rnd)))
    write(p / "misc" / "deep" / "trace.log", "kept\n")
    os.symlink("../src/main.c", p / "misc" / "link")
    os.mkfifo(p / "misc" / "fifo")
    write(dst / "gone" / "a" / "b" / "c.txt", "nothing protected in this tree\n")
    write(dst / "gone" / "empty")
    return src, dst


def tree(root: Path) -> dict:
    return snapshot(root, times=False, root_meta=False)


def resync_items(args, src: Path, dst: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    r = run_cli("--no-history", "-i", *args, src, dst)
    return r, r.stdout.splitlines()


def kept_dirs(lines: list[str]) -> set[str]:
    prefix = "cannot delete non-empty directory: "
    return {line[len(prefix):] for line in lines if line.startswith(prefix)}


# -- excludes protect inside deleted directories ------------------------------------

def test_delete_keeps_excluded_entries_in_directories_the_source_lacks_like_rsync(tmp_path):
    src, dst = make_pair(tmp_path / "a")
    ref_src, ref = make_pair(tmp_path / "b")
    r, lines = resync_items(["--delete", *EXCLUDE_ARGS], src, dst)
    assert r.returncode == 0, r.stderr
    ref_run = rsync_a(ref_src, ref, "--delete", "-i", *EXCLUDE_ARGS)
    assert ref_run.returncode == 0, ref_run.stderr
    assert tree(dst) == tree(ref)
    assert (dst / "old-project" / "build" / "obj" / "main.o").read_bytes() == mix.data(5, 7000, "random")
    assert (dst / "old-project" / "logs" / "run.log").exists() and (dst / "old-project" / "KEEP").exists()
    assert not (dst / "old-project" / "sub").exists() and not (dst / "gone").exists()
    # the kept directories are said once each, in rsync's words
    assert kept_dirs(lines) == kept_dirs(ref_run.stdout.splitlines()) == {
        "old-project", "old-project/logs", "old-project/misc", "old-project/misc/deep", "old-project/tmp"}
    assert sum(line.startswith("cannot delete") for line in lines) == 5
    assert "*deleting   gone/" in lines and "*deleting   stale.txt" in lines
    assert "*deleting   old-project/src/" in lines and "*deleting   old-project/logs/summary.txt" in lines
    assert not any(line.startswith("*deleting   old-project/") and line.endswith(("/build/", ".log"))
                   for line in lines)
    assert "*deleting   old-project/" not in lines
    # a second run has nothing left to do
    r, lines = resync_items(["--delete", *EXCLUDE_ARGS], src, dst)
    assert r.returncode == 0 and [line for line in lines if line.startswith("*deleting")] == []


def test_dry_run_itemizes_and_counts_what_the_run_does(tmp_path):
    src, dst = make_pair(tmp_path)
    before = snapshot(dst)
    dry = run_cli("--no-history", "-i", "--json", "-n", "--delete", *EXCLUDE_ARGS, src, dst)
    assert dry.returncode == 0, dry.stderr
    assert snapshot(dst) == before
    real = run_cli("--no-history", "-i", "--json", "--delete", *EXCLUDE_ARGS, src, dst)
    assert real.returncode == 0, real.stderr
    # with --json the items go to stderr
    dry_deletions = [line for line in dry.stderr.splitlines() if line.startswith(("*deleting", "cannot"))]
    real_deletions = [line for line in real.stderr.splitlines() if line.startswith(("*deleting", "cannot"))]
    assert dry_deletions == real_deletions and "cannot delete non-empty directory: old-project" in real_deletions
    removed = set(before) - set(snapshot(dst))
    assert json.loads(dry.stdout)["deleted"] == json.loads(real.stdout)["deleted"] == len(removed)


def test_max_delete_counts_only_what_would_go(tmp_path):
    src, dst = make_pair(tmp_path)
    before = set(tree(dst))
    ref_src, ref = make_pair(tmp_path / "ref")
    assert rsync_a(ref_src, ref, "--delete", *EXCLUDE_ARGS).returncode == 0
    goes = len(before - set(tree(ref)))
    assert goes < len([p for p in before if p.startswith(("old-project", "gone", "stale"))])
    r = run_cli("--no-history", "--delete", f"--max-delete={goes - 1}", *EXCLUDE_ARGS, src, dst)
    assert r.returncode == DeletionRefusedError.exit_code
    assert f"{goes} deletions exceed --max-delete {goes - 1}" in r.stderr
    assert before <= set(tree(dst))
    r = run_cli("--no-history", "--delete", f"--max-delete={goes}", *EXCLUDE_ARGS, src, dst)
    assert r.returncode == 0, r.stderr
    assert tree(dst) == tree(ref)


def test_a_directory_that_holds_excluded_entries_is_not_replaced_by_a_file(tmp_path):
    """rsync -a --delete empties what it may of a directory a file should
    replace and then says it could not make way (exit 23); so does resync."""
    trees = []
    for side in ("mine", "ref"):
        src, dst = tmp_path / side / "src", tmp_path / side / "dst"
        write(src / "b", "now a file\n")
        write(src / "other", "x\n")
        write(dst / "b" / "a.log", "protected\n")
        write(dst / "b" / "x", "goes\n")
        write(dst / "b" / "sub" / "y", "goes\n")
        trees.append((src, dst))
    (src, dst), (ref_src, ref) = trees
    r, lines = resync_items(["--delete", "--exclude=*.log"], src, dst)
    assert r.returncode == PartialTransferError.exit_code
    assert "b: cannot replace a directory that holds excluded entries" in r.stderr
    assert "cannot delete non-empty directory: b" in lines and "*deleting   b/sub/" in lines
    assert rsync_a(ref_src, ref, "--delete", "--exclude=*.log").returncode == 23
    assert tree(dst) == tree(ref) and (dst / "b" / "a.log").read_text() == "protected\n"


@needs_setpriv
def test_a_kept_read_only_directory_gets_its_mode_back(tmp_path):
    """Without CAP_DAC_OVERRIDE a 0555 directory is opened up to empty it;
    when an excluded entry keeps it, its mode is given back."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "k", "k\n")
    write(dst / "b" / "ro" / "keep.log", "protected\n")
    write(dst / "b" / "ro" / "x", "goes\n")
    write(dst / "b" / "ro" / "inner" / "y", "goes\n")
    (dst / "b" / "ro" / "inner").chmod(0o500)
    (dst / "b" / "ro").chmod(0o555)
    (dst / "b").chmod(0o500)
    try:
        r = resync_as_user("sync", "--no-history", "-i", "--delete", "--exclude=*.log", src, dst)
        assert r.returncode == 0, r.stderr
        assert sorted(tree(dst)) == ["b", "b/ro", "b/ro/keep.log", "k"]
        assert (dst / "b").stat().st_mode & 0o777 == 0o500 and (dst / "b" / "ro").stat().st_mode & 0o777 == 0o555
        assert kept_dirs(r.stdout.splitlines()) == {"b", "b/ro"}
    finally:
        for d in (dst / "b", dst / "b" / "ro"):
            if d.exists():
                d.chmod(0o755)


# -- one entry under two spellings -------------------------------------------------

def test_names_equal_but_for_case_or_normalization_share_a_key():
    assert name_key("README") == name_key("readme") == name_key("ReadMe")
    nfc, nfd = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd and name_key(nfc) == name_key(nfd)
    assert name_key("readme") != name_key("readme.md")


def test_other_spellings_on_a_case_sensitive_destination_are_deleted(tmp_path):
    """Where the two spellings are two entries, the old one goes as usual;
    so does a second link to a kept file (one inode, two listed names)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "README", "new\n")
    write(src / unicodedata.normalize("NFC", "café.txt"), "nfc\n")
    write(src / "notes", "kept\n")
    r = run_cli("--no-history", src, dst)
    assert r.returncode == 0, r.stderr
    write(dst / "readme", "old\n")
    write(dst / unicodedata.normalize("NFD", "café.txt"), "nfd\n")
    os.link(dst / "notes", dst / "NOTES")
    r, lines = resync_items(["--delete"], src, dst)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    assert "*deleting   readme" in lines and "*deleting   NOTES" in lines
    assert not any(line.startswith("not deleting") for line in lines)


def _run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _case_insensitive(d: Path) -> bool:
    (d / "probe").write_text("p")
    try:
        return (d / "PROBE").exists()
    finally:
        (d / "probe").unlink()


@pytest.fixture(params=["tmpfs-casefold", "exfat-fuse"])
def nocase(request, tmp_path):
    """A directory on a case-insensitive file system: tmpfs with casefold
    (Linux 6.13, CONFIG_UNICODE: one inode under both spellings) or exFAT
    through FUSE (exfat-fuse, exfatprogs: each spelling gets an inode number
    of its own). Skipped where it cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("mounting a case-insensitive file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = None
    if request.param == "tmpfs-casefold":
        r = _run("mount", "-t", "tmpfs", "-o", "casefold", "tmpfs", str(mnt))
        if r.returncode:
            pytest.skip("tmpfs with casefold cannot be mounted here (needs Linux 6.13 built with CONFIG_UNICODE)")
        d = mnt / "ci"
        d.mkdir()
        _run("chattr", "+F", str(d))                  # directories fold their names only when marked
    else:
        tools = ["mkfs.exfat", "mount.exfat-fuse", "losetup"]
        if not all(shutil.which(t) for t in tools):
            pytest.skip("exFAT through FUSE needs mkfs.exfat (exfatprogs), mount.exfat-fuse (exfat-fuse), losetup")
        img = tmp_path / "exfat.img"
        with open(img, "wb") as f:
            f.truncate(32 << 20)
        r = _run("mkfs.exfat", str(img))
        if r.returncode:
            pytest.skip(f"mkfs.exfat: {r.stderr.strip()}")
        r = _run("losetup", "-f", "--show", str(img))
        if r.returncode:
            pytest.skip(f"no loop device: {r.stderr.strip()}")
        loop = r.stdout.strip()
        r = _run("mount.exfat-fuse", loop, str(mnt))
        if r.returncode:
            _run("losetup", "-d", loop)
            pytest.skip(f"mount.exfat-fuse: {r.stderr.strip()} (needs /dev/fuse)")
        d = mnt
    try:
        if not _case_insensitive(d):
            pytest.skip(f"{request.param}: names are not folded here")
        yield d
    finally:
        _run("umount", str(mnt))
        if loop is not None:
            _run("losetup", "-d", loop)


def test_a_file_the_source_spells_otherwise_survives_delete(tmp_path, nocase):
    src, dst = tmp_path / "src", nocase / "dst"
    write(src / "README", "new readme\n")
    write(src / "data" / "Report.TXT", mix.data(7, 5000, "text"))
    write(src / "data" / "empty")
    write(dst / "readme", "old readme\n")
    write(dst / "data" / "report.txt", "old report\n")
    write(dst / "data" / "stale", "goes\n")
    before = snapshot(dst)
    r, dry = resync_items(["-n", "--delete"], src, dst)
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == before
    r, lines = resync_items(["--delete"], src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "README").read_text() == "new readme\n"
    assert (dst / "data" / "Report.TXT").read_bytes() == mix.data(7, 5000, "text")
    assert not (dst / "data" / "stale").exists()
    assert "*deleting   data/stale" in lines and "*deleting   readme" not in lines
    why = "(the names differ only in case or Unicode normalization)"
    assert [line for line in lines if line.startswith("not deleting")] == [
        f"not deleting readme: this destination takes it for README {why}",
        f"not deleting data/report.txt: this destination takes it for data/Report.TXT {why}"]
    assert [line for line in dry if line.startswith(("*deleting", "not deleting"))] == \
        [line for line in lines if line.startswith(("*deleting", "not deleting"))]


def test_a_case_only_rename_in_the_source_survives_delete(tmp_path, nocase):
    src, dst = tmp_path / "src", nocase / "dst"
    write(src / "readme", "the same file, renamed\n")
    write(src / "other", "x\n")
    r = run_cli("--no-history", "--delete", src, dst)
    assert r.returncode == 0, r.stderr
    (src / "readme").rename(src / "README")
    r, lines = resync_items(["--delete"], src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "README").read_text() == "the same file, renamed\n"
    assert "*deleting   readme" not in lines


def test_unpack_keeps_a_file_the_bundle_spells_otherwise(tmp_path, nocase):
    src, dst = tmp_path / "src", nocase / "dst"
    write(src / "README", "new readme\n")
    write(src / "other", "x\n")
    write(dst / "readme", "old readme\n")
    write(dst / "stale", "goes\n")
    signature_tree(str(dst), str(tmp_path / "tree.sig"))
    pack(str(src), str(tmp_path / "x.bundle"), str(tmp_path / "tree.sig"))
    stats = unpack(str(tmp_path / "x.bundle"), str(dst))
    assert (dst / "README").read_text() == "new readme\n" and not (dst / "stale").exists()
    assert stats.deleted == 1
