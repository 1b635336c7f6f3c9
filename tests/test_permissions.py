"""Permission bits as an ordinary user, and errors that name the right path.

- Read-only directories in a destination (field case 06): sync and unpack
  give them u+rwx for the run and set their mode back, also when the run stops
  early; ``-i`` reports only what was done.
- Unreadable parts of a source or destination (field case 11): pack and
  signature-tree name what they could not read, finish the rest and exit 23; a
  bundle leaves those paths as they are at the destination.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from resync.bundle.manifest import read_tree_signature
from resync.bundle.pack import pack, signature_tree
from resync.bundle.unpack import unpack
from resync.errors import NoSpaceError

from .treeutil import snapshot
from .unprivileged import needs_setpriv, resync_as_user

pytestmark = needs_setpriv


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def unlock(tmp_path):
    """Everything under tmp_path gets u+rwx back afterwards (pytest must clean up)."""
    yield
    for dirpath, dirnames, _ in os.walk(tmp_path):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o755)
            except OSError:
                pass


def read_only_tree(src: Path) -> None:
    (src / "ro" / "deep").mkdir(parents=True)
    (src / "ro" / "f").write_text("v1")
    (src / "ro" / "old").write_text("gone soon")
    (src / "ro" / "deep" / "g").write_text("deep")
    (src / "ro" / "gone-dir" / "inner").mkdir(parents=True)
    (src / "ro" / "gone-dir" / "inner" / "x").write_text("x")
    (src / "ro" / "gone-dir" / "inner").chmod(0o555)
    (src / "ro" / "gone-dir").chmod(0o555)
    (src / "ro" / "deep").chmod(0o555)
    (src / "ro").chmod(0o555)


def edit_read_only_tree(src: Path) -> None:
    for d in ("ro", "ro/deep", "ro/gone-dir", "ro/gone-dir/inner"):
        (src / d).chmod(0o755)
    (src / "ro" / "f").write_text("version-2")
    (src / "ro" / "old").unlink()
    (src / "ro" / "deep" / "new").write_text("new")
    shutil.rmtree(src / "ro" / "gone-dir")
    (src / "ro" / "deep").chmod(0o555)
    (src / "ro").chmod(0o555)


def test_sync_updates_and_deletes_inside_read_only_directories(tmp_path, unlock):
    """As rsync -a does for the same user: the second run updates ro/f, adds
    ro/deep/new, deletes ro/old and the read-only tree ro/gone-dir, exits 0,
    and leaves ro and ro/deep 0555. Was: exit 23, nothing changed, and -i
    printed *deleting for deletions that failed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    read_only_tree(src)
    r = resync_as_user("sync", "--no-history", src, dst)
    assert r.returncode == 0, r.stderr
    edit_read_only_tree(src)
    r = resync_as_user("sync", "--no-history", "-i", "--delete", src, dst)
    assert r.returncode == 0, r.stderr
    assert "*deleting   ro/old" in r.stdout and "*deleting   ro/gone-dir/" in r.stdout
    assert snapshot(dst) == snapshot(src)
    assert mode(dst / "ro") == 0o555 and mode(dst / "ro" / "deep") == 0o555
    r = resync_as_user("sync", "--no-history", "-i", "--delete", src, dst)
    assert r.returncode == 0 and r.stdout == ""            # and a third run has nothing to do


def test_unreadable_destination_directory_of_ours_is_listed(tmp_path, unlock):
    """A destination directory this user owns but cannot read (a mode such as
    0070 copied from a source directory it reads through its group) is opened
    for the run, updated, and given the source's mode."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "f").write_text("1")
    r = resync_as_user("sync", "--no-history", src, dst)
    assert r.returncode == 0, r.stderr
    (src / "locked" / "f").write_text("22")
    (dst / "locked").chmod(0)
    r = resync_as_user("sync", "--no-history", src, dst)
    assert r.returncode == 0, r.stderr
    assert mode(dst / "locked") == mode(src / "locked")
    assert (dst / "locked" / "f").read_text() == "22"


def test_a_run_that_stops_early_gives_directories_their_mode_back(tmp_path, monkeypatch, unlock):
    from resync import sync as sync_module
    from resync.apply import access as apply_module
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    read_only_tree(src)
    assert resync_as_user("sync", "--no-history", src, dst).returncode == 0
    edit_read_only_tree(src)
    monkeypatch.setattr(apply_module, "overrides_permissions", lambda: False)   # as an ordinary user

    def stop(line):
        raise KeyboardInterrupt          # a Ctrl-C right after the first change

    with pytest.raises(KeyboardInterrupt):
        sync_module.Syncer(str(src), str(dst), sync_module.SyncOptions(delete=True), on_item=stop).run()
    assert mode(dst / "ro") == 0o555 and mode(dst / "ro" / "deep") == 0o555
    assert not list(dst.rglob(".resync-tmp-*"))


@pytest.mark.skipif(not shutil.which("chattr"), reason="chattr (e2fsprogs) is not installed")
def test_itemize_reports_only_deletions_that_happened(tmp_path):
    """A destination file that cannot be deleted (immutable, so even root
    cannot) is reported as an error, never as *deleting; the rest is deleted."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("keep", "stuck", "drop"):
        (src / name).write_text(name)
    assert resync_as_user("sync", "--no-history", src, dst).returncode == 0
    (src / "stuck").unlink()
    (src / "drop").unlink()
    if subprocess.run(["chattr", "+i", str(dst / "stuck")], capture_output=True).returncode:
        pytest.skip("this file system has no immutable flag")
    try:
        r = resync_as_user("sync", "--no-history", "-i", "--delete", "--json", src, dst)
    finally:
        subprocess.run(["chattr", "-i", str(dst / "stuck")])
    assert r.returncode == 23
    assert "*deleting   drop" in r.stderr and "deleting   stuck" not in r.stderr
    assert "stuck: Operation not permitted" in r.stderr
    import json
    assert json.loads(r.stdout)["deleted"] == 1
    assert (dst / "stuck").exists() and not (dst / "drop").exists()


def test_unpack_into_read_only_directories(tmp_path, unlock):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    read_only_tree(src)
    r = resync_as_user("pack", src, "-o", tmp_path / "full.bundle", "--no-history")
    assert r.returncode == 0, r.stderr
    r = resync_as_user("unpack", tmp_path / "full.bundle", dst, "--no-history")
    assert r.returncode == 0, r.stderr
    edit_read_only_tree(src)
    assert resync_as_user("signature-tree", dst, "-o", tmp_path / "t.sig").returncode == 0
    r = resync_as_user("pack", src, "--against", tmp_path / "t.sig", "-o", tmp_path / "d.bundle", "--no-history")
    assert r.returncode == 0, r.stderr
    r = resync_as_user("unpack", tmp_path / "d.bundle", dst, "--no-history")
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == snapshot(src)
    assert mode(dst / "ro") == 0o555


# -- unreadable sources: name the path, finish the rest, exit 23 ---------------------

def unreadable_source(src: Path) -> None:
    (src / "private").mkdir(parents=True)
    (src / "public").mkdir()
    (src / "public" / "a").write_text("a")
    (src / "private" / "s").write_text("s")
    (src / "top").write_text("top")
    (src / "secret").write_text("secret")


def lock(src: Path) -> None:
    (src / "private").chmod(0)
    (src / "secret").chmod(0)


def test_pack_and_signature_tree_name_what_they_cannot_read(tmp_path, unlock):
    """Was: "out.bundle: Permission denied", exit 3, no bundle."""
    src = tmp_path / "src"
    unreadable_source(src)
    lock(src)
    r = resync_as_user("pack", src, "-o", tmp_path / "out.bundle", "--no-history")
    assert r.returncode == 23, r.stderr
    lines = r.stderr.splitlines()
    assert "resync: error: private/: Permission denied" in lines
    assert "resync: error: secret: Permission denied" in lines
    assert "out.bundle" not in r.stderr
    unpack(str(tmp_path / "out.bundle"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "public" / "a").read_text() == "a" and (tmp_path / "dst" / "top").exists()
    assert mode(tmp_path / "dst" / "private") == 0                 # its attributes were known
    (tmp_path / "dst" / "private").chmod(0o700)
    assert not (tmp_path / "dst" / "secret").exists() and not list((tmp_path / "dst" / "private").iterdir())
    r = resync_as_user("signature-tree", src, "-o", tmp_path / "t.sig")
    assert r.returncode == 23 and "tree.sig" not in r.stderr
    assert "resync: error: private/: Permission denied" in r.stderr.splitlines()
    _, entries = read_tree_signature((tmp_path / "t.sig").read_bytes(), "t.sig")
    flags = {e.path: (e.unlisted, e.unread) for e in entries}
    assert flags["private"] == (True, False) and flags["secret"] == (False, True)
    assert flags["public/a"] == (False, False) and "private/s" not in flags


def test_a_bundle_leaves_alone_what_pack_could_not_read(tmp_path, unlock):
    """The destination holds private/s and secret; the source cannot read
    them this time (secret has changed, so its content would travel): the
    bundle neither deletes nor changes them."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    unreadable_source(src)
    pack(str(src), str(tmp_path / "full.bundle"))
    unpack(str(tmp_path / "full.bundle"), str(dst))
    signature_tree(str(dst), str(tmp_path / "t.sig"))
    (src / "public" / "b").write_text("b")
    (src / "secret").write_text("secret, changed")     # so pack would have to read it
    lock(src)
    r = resync_as_user("pack", src, "--against", tmp_path / "t.sig", "-o", tmp_path / "d.bundle", "--no-history",
                       "--json")
    assert r.returncode == 23, r.stderr
    import json
    assert json.loads(r.stdout)["deleted"] == 0
    unpack(str(tmp_path / "d.bundle"), str(dst))
    (dst / "private").chmod(0o700)                     # the bundle gave it the source's mode 0
    assert (dst / "private" / "s").read_text() == "s" and (dst / "secret").read_text() == "secret"
    assert mode(dst / "secret") == 0o644 and (dst / "public" / "b").read_text() == "b"


def test_a_destination_part_the_signature_could_not_read(tmp_path, unlock):
    """signature-tree could not list dst/private nor read dst/secret: pack
    sends secret whole and the source's private/ files; unpack accepts the
    destination's unlisted contents (it keeps private/extra) instead of
    refusing the bundle."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    unreadable_source(src)
    pack(str(src), str(tmp_path / "full.bundle"))
    unpack(str(tmp_path / "full.bundle"), str(dst))
    (dst / "private" / "extra").write_text("only at the destination")
    lock(dst)
    r = resync_as_user("signature-tree", dst, "-o", tmp_path / "t.sig")
    assert r.returncode == 23
    for p in (dst / "private", dst / "secret"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (src / "secret").write_text("a new secret")
    (src / "private" / "s").write_text("s2")
    stats = pack(str(src), str(tmp_path / "d.bundle"), str(tmp_path / "t.sig"))
    assert stats.errors == 0 and stats.deleted == 0
    unpack(str(tmp_path / "d.bundle"), str(dst))
    assert (dst / "secret").read_text() == "a new secret" and (dst / "private" / "s").read_text() == "s2"
    assert (dst / "private" / "extra").exists()


def test_a_failed_bundle_write_names_the_bundle(tmp_path, monkeypatch):
    from resync.bundle import shards
    src = tmp_path / "src"
    unreadable_source(src)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    with pytest.raises(NoSpaceError) as info:
        pack(str(src), str(tmp_path / "out.bundle"))
    assert str(info.value).startswith(str(tmp_path / "out.bundle"))
    assert not (tmp_path / "out.bundle").exists()
