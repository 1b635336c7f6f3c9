"""resync sync: the result equals rsync -a's, on hand-made and random trees;
safety nets (--delete, symlinked parents, dry run); exit codes."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from resync.errors import DeletionRefusedError, FileError, PartialTransferError, VanishedError
from resync.sync import SyncOptions, Syncer

from . import mix
from .treeutil import rsync_a, snapshot

PY = sys.executable


def run_cli(*args):
    return subprocess.run([PY, "-m", "resync", "sync", *map(str, args)], capture_output=True, text=True)


def seconds(snap: dict) -> dict:
    # rsync leaves a directory's or link's mtime alone when it already matches
    # to the second, so against rsync compare at second resolution.
    return {k: (t, p, s, m // 10**9, d) for k, (t, p, s, m, d) in snap.items()}


def sync(src, dst, **kw) -> tuple:
    items, errors = [], []
    stats = Syncer(str(src), str(dst), SyncOptions(**kw), on_item=items.append, on_error=errors.append).run()
    return stats, items, errors


def make_tree(root: Path, rnd: random.Random, files: int = 40, depth: int = 3) -> None:
    """A random tree: nested dirs, files of varied sizes, content (the mix of
    tests/mix.py: random, text, zeros, sparse, repeated blocks, empty) and
    modes, odd names, relative and absolute symlinks, a FIFO, old and new mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    for i in range(files):
        parent = rnd.choice(dirs)
        r = rnd.random()
        if r < 0.2 and len(parent.relative_to(root).parts) < depth:
            d = parent / f"d{i}"
            d.mkdir()
            dirs.append(d)
        elif r < 0.3:
            os.symlink(rnd.choice(["../x", "/etc/hostname", f"f{i - 1}", "missing/target"]), parent / f"l{i}")
        elif r < 0.32:
            os.mkfifo(parent / f"p{i}")
        else:
            f = parent / (mix.odd_name(rnd, i) if rnd.random() < 0.15 else f"f{i}")
            mix.write(f, rnd.randrange(2**32), rnd.choice([0, 1, 100, 5000, 70_000]), mix.pick_kind(rnd))
            f.chmod(rnd.choice([0o644, 0o600, 0o755, 0o444]))
            t = rnd.randrange(1_000_000_000, 1_700_000_000) * 10**9 + rnd.randrange(10**9)
            os.utime(f, ns=(t, t))
    for d in dirs[1:]:
        d.chmod(rnd.choice([0o755, 0o700, 0o750]))


def _restamp(p: Path, rnd: random.Random) -> None:
    """A new mtime for a file just written: rsync's quick check compares whole
    seconds, so an edit within the second of the last run that keeps the size
    would be missed by the reference (not by resync, which compares to the ns)."""
    t = rnd.randrange(1_000_000_000, 1_700_000_000) * 10**9 + rnd.randrange(10**9)
    os.utime(p, ns=(t, t))


def mutate(root: Path, rnd: random.Random) -> None:
    """Edits between two runs: content changes, deletions, renames, type changes, new files."""
    entries = sorted(p for p in root.rglob("*") if not p.is_symlink() or True)
    for p in rnd.sample(entries, min(len(entries), 8)):
        if not os.path.lexists(p):
            continue
        r = rnd.random()
        if p.is_symlink() or not p.exists():
            p.unlink()
        elif p.is_file() and r < 0.4:
            perms = p.stat().st_mode & 0o7777
            p.chmod(perms | 0o600)                       # as an ordinary user, a 0444 file needs it
            data = bytearray(p.read_bytes() or b"x")
            data[rnd.randrange(len(data))] ^= 0xFF
            p.write_bytes(bytes(data) + rnd.randbytes(rnd.randrange(3)))
            p.chmod(perms)
            _restamp(p, rnd)
        elif p.is_file() and r < 0.6:
            name = os.fsencode(p.name)[:200] + b"-renamed"        # within NAME_MAX (255 bytes) however long
            if not os.path.lexists(p.with_name(os.fsdecode(name))):  # (renamed in an earlier round too)
                p.rename(p.with_name(os.fsdecode(name)))
        elif p.is_file() and r < 0.8:
            p.unlink()
            p.mkdir()                                    # file becomes a directory
            (p / "inner").write_bytes(b"inner")
        elif p.is_dir() and r < 0.5:
            import shutil
            shutil.rmtree(p)
            p.write_bytes(b"dir became a file")          # directory becomes a file
        elif p.is_dir() and not (p / "new-file").is_dir():
            mix.write(p / "new-file", rnd.randrange(2**32), 300, mix.pick_kind(rnd))
            _restamp(p / "new-file", rnd)
        elif p.is_fifo():
            p.unlink()


def test_mirrors_like_rsync_and_second_run_is_a_no_op(tmp_path):
    rnd = random.Random(7)
    src = tmp_path / "src"
    make_tree(src, rnd, files=60)
    stats, items, errors = sync(src, tmp_path / "dst")
    assert not errors and stats.errors == 0
    assert rsync_a(src, tmp_path / "ref").returncode == 0
    assert snapshot(tmp_path / "dst") == snapshot(src)           # exact, to the nanosecond
    assert seconds(snapshot(tmp_path / "dst")) == seconds(snapshot(tmp_path / "ref"))
    assert stats.files_transferred == stats.files > 0
    stats, items, errors = sync(src, tmp_path / "dst")
    assert items == [] and stats.files_transferred == 0 and stats.bytes_written == 0


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), whole=st.booleans())
@example(seed=3121, whole=False)                  # a long name renamed twice (once over NAME_MAX in mutate)
def test_random_trees_and_edits_match_rsync_delete(tmp_path_factory, seed, whole):
    tmp = tmp_path_factory.mktemp("t")
    rnd = random.Random(seed)
    src, dst, ref = tmp / "src", tmp / "dst", tmp / "ref"
    make_tree(src, rnd, files=rnd.randrange(1, 50))
    for _ in range(2):
        stats, _, errors = sync(src, dst, delete=True, whole_file=whole)
        assert not errors
        assert rsync_a(src, ref, "--delete").returncode == 0
        assert snapshot(dst) == snapshot(src)
        assert seconds(snapshot(dst)) == seconds(snapshot(ref))
        mutate(src, rnd)
        if not any(src.iterdir()):        # --delete rightly refuses an empty source
            (src / "last").write_bytes(b"x")
    assert not [p for p in dst.rglob(".resync-tmp-*")]


def test_no_whole_file_reuses_destination_blocks(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    data = bytearray(random.Random(1).randbytes(2_000_000))
    (src / "big").write_bytes(bytes(data))
    sync(src, dst)
    data[1_000_000:1_000_010] = b"0123456789"
    (src / "big").write_bytes(bytes(data))
    stats, items, errors = sync(src, dst, whole_file=False)
    assert not errors
    assert (dst / "big").read_bytes() == bytes(data)
    assert stats.bytes_matched > 1_900_000 and stats.bytes_literal < 100_000
    assert items == [">f..t...... big"]


def test_checksum_finds_same_size_same_mtime_change(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"aaaa")
    sync(src, dst)
    st = (src / "f").stat()
    (dst / "f").write_bytes(b"bbbb")
    os.utime(dst / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    stats, items, _ = sync(src, dst)
    assert items == [] and (dst / "f").read_bytes() == b"bbbb"      # quick check is fooled, like rsync's
    stats, items, _ = sync(src, dst, checksum=True)
    assert items == [">fc........ f"] and (dst / "f").read_bytes() == b"aaaa"


def test_itemize_codes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"1")
    os.symlink("d/f", src / "link")
    _, items, _ = sync(src, dst)
    assert sorted(items) == sorted(["cd+++++++++ ./", "cd+++++++++ d/", ">f+++++++++ d/f", "cL+++++++++ link -> d/f"])
    (src / "d" / "f").write_bytes(b"22")
    (src / "d" / "f").chmod(0o600)
    (src / "extra").write_bytes(b"")
    _, items, _ = sync(src, dst, delete=True)
    assert ">f.stp..... d/f" in items and ">f+++++++++ extra" in items
    (src / "extra").unlink()
    _, items, _ = sync(src, dst, delete=True)
    assert "*deleting   extra" in items


def test_dry_run_changes_nothing(tmp_path):
    rnd = random.Random(3)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, rnd, files=30)
    stats, items, _ = sync(src, dst, dry_run=True)
    assert not dst.exists() and items and stats.files_transferred == stats.files
    sync(src, dst)
    before = snapshot(dst)
    mutate(src, rnd)
    _, items, _ = sync(src, dst, dry_run=True, delete=True)
    assert items and snapshot(dst) == before


def test_excludes_use_gitignore_rules_and_protect_destination(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ["keep.txt", "a.o", "sub/b.o", "sub/keep.o", "build/x", "sub/build/y"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    dst.mkdir()
    (dst / "local.o").write_bytes(b"mine")      # excluded on the receiver too: not deleted
    stats, _, _ = sync(src, dst, excludes=["*.o", "!keep.o", "build/"], delete=True)
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert got == ["keep.txt", "local.o", "sub", "sub/keep.o"]


def test_delete_refuses_empty_source_and_max_delete(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for i in range(5):
        (dst / f"f{i}").write_bytes(b"x")
    before = snapshot(dst)
    with pytest.raises(DeletionRefusedError):
        sync(src, dst, delete=True)
    assert snapshot(dst) == before
    (src / "f0").write_bytes(b"x")
    stats, items, _ = sync(src, dst, delete=True, max_delete=3)
    assert stats.deletion_refused and stats.deleted == 0
    assert sorted(p.name for p in dst.iterdir()) == [f"f{i}" for i in range(5)]
    r = run_cli("--delete", "--max-delete", "3", src, dst)
    assert r.returncode == DeletionRefusedError.exit_code
    assert r.stderr.startswith("resync: error: deletion refused: 4 deletions exceed --max-delete 3")
    r = run_cli("--delete", "--max-delete", "4", src, dst)
    assert r.returncode == 0 and sorted(p.name for p in dst.iterdir()) == ["f0"]


def test_symlinked_destination_parent_is_never_followed(tmp_path):
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "victim").write_bytes(b"from source")
    outside.mkdir()
    (outside / "victim").write_bytes(b"sentinel")
    dst.mkdir()
    os.symlink(outside, dst / "sub")              # an attacker's link where a directory belongs
    stats, _, errors = sync(src, dst)
    assert (outside / "victim").read_bytes() == b"sentinel"
    assert list(outside.iterdir()) == [outside / "victim"]
    # the link was replaced by a real directory (a non-directory in the way is removed)
    assert (dst / "sub").is_dir() and not (dst / "sub").is_symlink()
    assert (dst / "sub" / "victim").read_bytes() == b"from source"


def test_directory_swapped_for_symlink_during_run_is_not_followed(tmp_path):
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"new")
    (src / "z").write_bytes(b"z")
    outside.mkdir()
    (outside / "f").write_bytes(b"sentinel")
    swapped = []

    def on_item(line):
        # After a/ is created and opened, replace it by a link out of the root.
        if line.startswith("cd") and line.endswith(" a/") and not swapped:
            os.rename(dst / "a", tmp_path / "moved")
            os.symlink(outside, dst / "a")
            swapped.append(True)

    Syncer(str(src), str(dst), SyncOptions(), on_item=on_item).run()
    assert swapped and (outside / "f").read_bytes() == b"sentinel"
    assert sorted(p.name for p in outside.iterdir()) == ["f"]


def file_then_link(tmp_path):
    """src with files a, b and a link z (listed after them: its item line is
    a moment when a and b are listed but not yet copied)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"file")
    (src / "b").write_bytes(b"ok")
    os.symlink("b", src / "z")
    return src, dst


def test_type_change_during_run_is_a_partial_transfer(tmp_path):
    src, dst = file_then_link(tmp_path)

    def on_item(line):
        if line.startswith("cL") and (src / "a").is_file():      # listed as a file, now a directory
            (src / "a").unlink()
            (src / "a").mkdir()

    stats = Syncer(str(src), str(dst), SyncOptions(), on_item=on_item, on_error=lambda m: None).run()
    assert stats.errors == 1 and (dst / "b").read_bytes() == b"ok"
    assert not (dst / "a").exists()
    assert not list(dst.glob(".resync-tmp-*"))


def test_vanished_source_file_is_reported_not_fatal(tmp_path):
    src, dst = file_then_link(tmp_path)
    errors = []
    stats = Syncer(str(src), str(dst), SyncOptions(), on_error=errors.append,
                   on_item=lambda line: line.startswith("cL") and (src / "a").unlink(missing_ok=True)).run()
    assert stats.vanished == 1 and stats.errors == 0 and errors == ["file has vanished: a"]
    assert (dst / "b").read_bytes() == b"ok"


def test_stale_temp_files_are_removed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    sync(src, dst)
    (dst / "d" / ".resync-tmp-dead-1").write_bytes(b"left by a killed run")
    sync(src, dst)
    assert not list(dst.rglob(".resync-tmp-*"))


def test_cli_errors_and_exit_codes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"")
    r = run_cli(src, tmp_path / "file")
    assert r.returncode == 2 and "is a file" in r.stderr
    r = run_cli(tmp_path / "missing", tmp_path / "dst")
    assert r.returncode == 2
    r = run_cli("--json", "-i", src, tmp_path / "dst")
    assert r.returncode == 0
    import json
    stats = json.loads(r.stdout)
    assert stats["files_transferred"] == 1 and stats["errors"] == 0
    assert ">f+++++++++ f" in r.stderr                      # with --json, items go to stderr
    r = run_cli("-i", src, tmp_path / "dst")
    assert r.returncode == 0 and r.stdout == ""
    assert FileError.exit_code == 3 and PartialTransferError.exit_code == 23 and VanishedError.exit_code == 24


def test_progress_counts_and_renders(tmp_path):
    import io

    from resync.progress import Progress
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * 1000 * (i + 1))
    out = io.StringIO()
    p = Progress(out, interval=0.01)
    Syncer(str(src), str(dst), SyncOptions(), progress=p).run()
    p.close()
    assert p.bytes_done == p.bytes_queued == 15000 and p.files_done == p.files_queued == 5
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "100.0%" in last and "5/5 files" in last and "14.6 KiB" in last


def test_progress_is_silent_without_a_terminal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    r = run_cli("-P", src, tmp_path / "dst")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


@pytest.mark.parametrize("entry", ["file", "link"])
def test_wide_tree_within_a_small_descriptor_limit(tmp_path, entry):
    # 1,500 sibling directories under a limit of 256 open files: descriptors
    # are opened one directory at a time, and pending work (files waiting for
    # their commit, directories changed by links) is committed before too many
    # stay open.
    import resource
    src = tmp_path / "src"
    for i in range(1500):
        d = src / f"d{i:04d}"
        d.mkdir(parents=True)
        if entry == "file":
            (d / "f").write_bytes(b"x")
        else:
            os.symlink("target", d / "l")

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    r = subprocess.run([PY, "-m", "resync", "sync", "--no-history", str(src), str(tmp_path / "dst")],
                       capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "dst") == snapshot(src)


def test_disk_full_is_reported_and_a_rerun_finishes(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        src, dst = tmp_path / "src", mnt / "dst"
        src.mkdir()
        dst.mkdir()
        (dst / "junk").write_bytes(os.urandom(500_000))   # not in the source; fills the disk
        for name in ("a", "b"):
            (src / name).write_bytes(os.urandom(300_000))
        (src / "c").write_bytes(b"small")
        r = run_cli("--no-history", src, dst)
        assert r.returncode == PartialTransferError.exit_code
        assert "No space left on device" in r.stderr
        assert not list(dst.glob(".resync-tmp-*"))
        for p in dst.iterdir():                          # what landed is complete
            if p.name != "junk":
                assert p.read_bytes() == (src / p.name).read_bytes()
        (dst / "junk").unlink()                          # the operator makes room
        r = run_cli("--no-history", src, dst)
        assert r.returncode == 0, r.stderr
        assert snapshot(dst) == snapshot(src)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_nested_source_and_destination(tmp_path):
    from resync.errors import UsageError
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (src / "sub").mkdir()
    (src / "sub" / "g").write_bytes(b"y")
    r = run_cli("--no-history", src, src)
    assert r.returncode == UsageError.exit_code and "same directory" in r.stderr
    # DST inside SRC: the copy is never copied into itself, and re-runs settle
    # (the second only updates DST's mtime: creating DST changed SRC's).
    for _ in range(3):
        stats, items, errors = sync(src, src / "backup")
        assert not errors
    assert items == []
    assert sorted(str(p.relative_to(src / "backup")) for p in (src / "backup").rglob("*")) == ["f", "sub", "sub/g"]
    # SRC inside DST with --delete would delete the source: refused, nothing touched.
    before = snapshot(tmp_path)
    r = run_cli("--no-history", "--delete", src / "sub", tmp_path)
    assert r.returncode == DeletionRefusedError.exit_code and "inside the destination" in r.stderr
    assert snapshot(tmp_path) == before


class _SilentLister:
    """A TreeLister whose child answers the first ``answers`` directories and
    then dies (0: never answers): sync must list the rest itself."""

    answers = 0

    def __init__(self, root, excludes=None, skip=None):
        from resync.scan import TreeLister
        self._real = TreeLister(root, excludes, skip)
        self._left = self.answers

    def listing(self, rel):
        if self._left <= 0:
            self._real.close()
            return None
        self._left -= 1
        return self._real.listing(rel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


@pytest.mark.parametrize("answers", [0, 1, 3])
def test_source_listed_locally_when_the_lister_cannot(tmp_path, monkeypatch, answers):
    import resync.sync
    monkeypatch.setattr(_SilentLister, "answers", answers)
    monkeypatch.setattr(resync.sync, "TreeLister", _SilentLister)
    rnd = random.Random(answers)
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    make_tree(src, rnd, files=80)
    for _ in range(3):
        stats, _, errors = sync(src, dst, delete=True, excludes=["*.tmp"])
        assert not errors
        assert rsync_a(src, ref, "--delete", "--exclude=*.tmp").returncode == 0
        assert seconds(snapshot(dst)) == seconds(snapshot(ref))
        mutate(src, rnd)
        (src / f"junk{rnd.random()}.tmp").write_bytes(b"excluded")
    # DST inside SRC, found without the lister too
    for _ in range(3):
        stats, items, errors = sync(src, src / "backup")
        assert not errors
    assert items == [] and not (src / "backup" / "backup").exists()


@pytest.mark.parametrize("new_kind", ["file", "link"])
def test_a_non_empty_directory_is_replaced_only_with_delete(tmp_path, new_kind):
    """rsync -a refuses to replace a non-empty directory by another kind of
    entry unless --delete is given; so does resync, and it says why."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "x").mkdir(parents=True)
    (src / "x" / "inner").write_text("inner")
    sync(src, dst)
    import shutil
    shutil.rmtree(src / "x")
    if new_kind == "file":
        (src / "x").write_text("now a file")
    else:
        os.symlink("elsewhere", src / "x")
    stats, items, errors = sync(src, dst)
    assert stats.errors == 1 and errors == ["x: cannot replace a non-empty directory (use --delete)"]
    assert (dst / "x" / "inner").read_text() == "inner"
    stats, items, errors = sync(src, dst, delete=True)
    assert not errors and snapshot(dst) == snapshot(src)
    assert "*deleting   x/" in items
