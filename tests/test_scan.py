"""TreeLister: the source listings that sync reads from a forked process equal
local listings, in the order sync visits directories, whatever it skips, and
every failure of the child leaves the caller able to list for itself."""
from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from resync import scan as tree
from resync.scan import Excludes, TreeLister, join, list_dir


def build(root: Path, rnd: random.Random) -> None:
    """Nested directories with files, links, an excluded directory, a
    non-UTF-8 name and an empty directory."""
    dirs = [root]
    root.mkdir()
    for i in range(300):
        parent = rnd.choice(dirs)
        r = rnd.random()
        if r < 0.15 and len(parent.relative_to(root).parts) < 4:
            d = parent / rnd.choice([f"d{i}", f"D{i}", f"d-{i}", f"d{i}.x"])
            d.mkdir()
            dirs.append(d)
        elif r < 0.25:
            os.symlink(f"t{i}", parent / f"l{i}")
        else:
            (parent / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 300)))
    (root / "cache").mkdir()
    (root / "cache" / "x").write_bytes(b"excluded")
    (root / "empty").mkdir()
    os.mkdir(os.fsencode(root) + b"/caf\xe9")                     # not UTF-8
    open(os.fsencode(root) + b"/caf\xe9/\xff\xfe", "wb").close()


def reference(root: Path, excludes: Excludes) -> list[tuple]:
    """(rel, entries, vanished) for every directory, in pre-order with sorted names."""
    out, stack = [], [""]
    while stack:
        rel = stack.pop()
        entries, _, vanished = list_dir(f"{root}/{rel}" if rel else str(root), excludes, rel)
        out.append((rel, entries, vanished))
        stack.extend(reversed([join(rel, e.name) for e in entries if e.kind == "d"]))
    return out


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    build(root, random.Random(3))
    return root


def test_listings_equal_local_ones_in_visit_order(source):
    excludes = Excludes(["cache/", "*.x"])
    expected = reference(source, excludes)
    assert any("\udce9" in rel for rel, _, _ in expected)            # the non-UTF-8 name got through
    assert not any(rel.startswith("cache") for rel, _, _ in expected)
    with TreeLister(str(source), excludes) as lister:
        for rel, entries, vanished in expected:
            assert lister.listing(rel) == (entries, vanished, None, None), rel
        assert lister.listing("zzz") is None                          # past the end


def test_directories_the_caller_skips_are_passed_over(source):
    expected = reference(source, Excludes([]))
    asked = [(rel, entries) for i, (rel, entries, _) in enumerate(expected) if i % 3 != 1]
    with TreeLister(str(source)) as lister:
        for rel, entries in asked:
            assert lister.listing(rel)[0] == entries, rel


def test_a_directory_not_in_the_walk_is_left_to_the_caller(source):
    expected = reference(source, Excludes([]))
    with TreeLister(str(source)) as lister:
        assert lister.listing(expected[1][0] + "/not-there") is None   # sorts before the next frame
        for rel, entries, _ in expected[2:]:
            assert lister.listing(rel)[0] == entries, rel


def test_the_destination_inside_the_source_is_named_and_never_entered(source):
    backup = source / "backup"
    (backup / "deep").mkdir(parents=True)
    st = backup.stat()
    with TreeLister(str(source), None, (st.st_dev, st.st_ino)) as lister:
        entries, _, skipped, _ = lister.listing("")
        assert skipped == "backup" and "backup" in [e.name for e in entries]
        assert lister.listing("backup") is None
        assert lister.listing("backup/deep") is None
        assert lister.listing("cache")[0] == list_dir(str(source / "cache"))[0]


@pytest.mark.parametrize("exc, kind", [(PermissionError(errno.EACCES, "Permission denied"), PermissionError),
                                       (FileNotFoundError(errno.ENOENT, "No such file or directory"),
                                        FileNotFoundError)])
def test_a_listing_error_reaches_the_caller_and_the_walk_goes_on(source, monkeypatch, exc, kind):
    expected = reference(source, Excludes([]))
    failing = expected[1][0]
    real = tree.list_dir

    def list_dir_failing(path, excludes=None, rel="", skip_temps=False):
        if rel == failing:
            raise exc
        return real(path, excludes, rel, skip_temps)

    monkeypatch.setattr(tree, "list_dir", list_dir_failing)       # inherited by the forked child
    with TreeLister(str(source)) as lister:
        for rel, entries, vanished in expected:
            if rel == failing:
                got, _, _, error = lister.listing(rel)
                assert got == [] and type(error) is kind and error.errno == exc.errno
                assert error.strerror == exc.strerror
            elif not rel.startswith(failing + "/"):
                assert lister.listing(rel) == (entries, vanished, None, None), rel


def test_a_dead_child_leaves_the_caller_to_list(source, monkeypatch):
    expected = reference(source, Excludes([]))
    dies_at = expected[len(expected) // 2][0]
    real = tree.list_dir

    def list_dir_dying(path, excludes=None, rel="", skip_temps=False):
        if rel == dies_at:
            os._exit(9)
        return real(path, excludes, rel, skip_temps)

    monkeypatch.setattr(tree, "list_dir", list_dir_dying)
    lister = TreeLister(str(source))
    pid = lister._pid
    for rel, entries, _ in expected[:len(expected) // 2]:
        assert lister.listing(rel)[0] == entries
    assert lister.listing(dies_at) is None
    assert lister.listing(expected[-1][0]) is None                 # and from then on
    with pytest.raises(ChildProcessError):                          # reaped, no zombie left
        os.waitpid(pid, os.WNOHANG)
    lister.close()


def test_closing_early_stops_the_child(tmp_path):
    root = tmp_path / "wide"
    root.mkdir()
    for i in range(5000):                     # frames of ~1.5 MB: more than the pipe holds
        (root / f"d{i:04d}").mkdir()
        (root / f"d{i:04d}" / ("x" * 250)).write_bytes(b"")
    lister = TreeLister(str(root))
    pid = lister._pid
    assert lister.listing("")[0][0].name == "d0000"
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)                   # blocked on the full pipe
    lister.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert lister.listing("d0000") is None


@pytest.mark.parametrize("way", ["openat2", "walk"])
def test_open_beneath_refuses_symlinks_either_way(tmp_path, monkeypatch, way):
    """open_beneath with openat2(2) (one call) and with the component walk:
    the same answers — a symlink anywhere on the path is ELOOP (even one to
    a directory inside the tree), a file ENOTDIR, a missing part ENOENT or
    made with ``create``; a real directory opens."""
    import errno
    import os

    from resync import scan
    if way == "walk":
        monkeypatch.setattr(scan, "_OPENAT2", None)
    elif scan._openat2() is None:
        pytest.skip("no openat2 here")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "f").write_text("x")
    (tmp_path / "a" / "in").symlink_to("b")
    (tmp_path / "out").symlink_to("/")
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = scan.open_beneath(root, "a/b")
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a" / "b"))
        os.close(fd)
        for rel, code in (("a/in", errno.ELOOP), ("a/in/x", errno.ELOOP), ("out", errno.ELOOP),
                          ("out/tmp", errno.ELOOP), ("a/f", errno.ENOTDIR), ("a/nope/c", errno.ENOENT)):
            with pytest.raises(OSError) as info:
                scan.open_beneath(root, rel)
            assert info.value.errno == code, (rel, info.value)
        os.close(scan.open_beneath(root, "a/new/deeper", create=True))
        assert (tmp_path / "a" / "new" / "deeper").is_dir()
    finally:
        os.close(root)
