"""The receiving side of the offline flow: check a bundle, rebuild what parity
allows, and apply it to a destination tree through the apply layer.

Everything that can refuse a bundle is checked before the destination is
touched: every stripe's shards (more than m bad in any stripe: refused), the
payload's header, footer and trailer, and -- for a bundle made against a tree
signature -- that the destination is still in the state that signature
describes. Then the bundle's manifest is compared with the destination like
any source listing (``plan.Planner``): files already as the bundle makes them
(an interrupted unpack run again) are kept. Every other file's new content is
staged and checked against its BLAKE3 (``apply.Staging.stage``, in a staging
directory inside the destination, ``.resync-tmp-unpack-*``); only when all of
them are staged and durable are they placed, links and specials made,
attributes set, the bundle's deletions done, and directory attributes set
last. A failure or kill before that leaves every destination path as it was;
stale staging directories are removed by the next unpack.
"""
from __future__ import annotations

import os
import stat
import time

from ..apply import Applier, Deletions, Dir, open_up_at
from ..content import ContentError, Options
from ..errors import UsageError, VerificationError
from ..fs import raise_os_error
from ..plan import ATTRS, DIRECTORY, TRANSFER, PlanOptions, Planner
from ..report import Report
from ..scan import Entry, open_rel_dir, walk
from . import payload as P
from .manifest import NONE
from .pack import BundleStats
from .records import BundleInfo, PayloadStream, check_health, read_bundle, record_header
from .shards import open_bundle


class UnpackStats(BundleStats):
    def __init__(self):
        super().__init__()
        self.damaged_stripes = 0
        self.repaired_shards = 0


def _mismatch(dst: str, why: str):
    raise VerificationError(dst, f"does not match the tree signature the bundle was made against "
                                 f"({why}); nothing applied")


def _check_against(dst: str, current: dict, trailer: P.Trailer) -> None:
    """Every destination path must be as the tree signature says, or already
    as the bundle makes it (a re-run after an interrupted unpack), or gone
    when the bundle deletes or replaces it."""
    new = {e.path: e for e in trailer.entries}
    deleted = set(trailer.deletions)

    def is_new(path: str, cur) -> bool:
        e = new.get(path)
        return e is not None and e.kind == cur.kind and (
            e.kind not in "fL" or (cur.size == e.size and (e.kind == "L" or cur.mtime_ns == e.mtime_ns)))

    for a in trailer.against:
        cur = current.get(a.path)
        if cur is None:
            if a.path in deleted or a.path in new:
                continue
            _mismatch(dst, f"{a.path}: missing")
        if cur.kind == a.kind and (a.kind not in "fL" or (
                cur.size == a.size and (a.kind == "L" or cur.mtime_ns == a.mtime_ns))):
            continue
        if is_new(a.path, cur):
            continue
        _mismatch(dst, f"{a.path}: changed" if cur.kind == a.kind else f"{a.path}: is a different kind of entry")
    known = {a.path for a in trailer.against}
    unlisted = tuple(a.path + "/" for a in trailer.against if a.unlisted)
    for path, cur in current.items():
        if path not in known and not is_new(path, cur) and not path.startswith(unlisted):
            _mismatch(dst, f"{path}: not in the tree signature")


def unpack(bundle: str, dst: str, on_entry=None, on_file=None) -> UnpackStats:
    """Apply ``bundle`` to directory ``dst`` (created if absent and the bundle
    was made without a tree signature)."""
    t0 = time.monotonic()
    stats = UnpackStats()
    if os.path.isdir(bundle):
        raise UsageError(f"{bundle}: is a directory, not a bundle")
    with open_bundle(bundle) as reader:
        health = check_health(reader)
        stats.stripes = len(health)
        stats.damaged_stripes = sum(1 for h in health if h.bad)
        stats.repaired_shards = sum(len(h.bad) for h in health)
        stream, info = read_bundle(reader)
        report = Report(stats, on_error=stats.messages.append, on_file=on_file, on_entry=on_entry)
        _Unpacker(stream, info, bundle, dst, report).run()
    stats.duration = time.monotonic() - t0
    return stats


class _Listed:
    """A destination entry as the planner reads an lstat result."""

    __slots__ = ("st_mode", "st_size", "st_mtime_ns", "st_uid", "st_gid", "st_rdev")

    def __init__(self, e: Entry):
        self.st_mode, self.st_size, self.st_mtime_ns = e.mode, e.size, e.mtime_ns
        self.st_uid, self.st_gid, self.st_rdev = e.uid, e.gid, e.rdev


def _as_entry(e: P.Entry) -> Entry:
    return Entry(e.path.rpartition("/")[2], e.mode, e.size, e.mtime_ns, e.uid, e.gid, e.rdev, e.kind,
                 e.mode & 0o7777)


class _Unpacker:
    def __init__(self, stream: PayloadStream, info: BundleInfo, name: str, dst: str, report: Report):
        self.stream, self.info, self.name, self.dst, self.report = stream, info, name, dst, report
        self.trailer = info.trailer
        self.manifest = {e.path: (i, e) for i, e in enumerate(self.trailer.entries)}
        self.apply = Applier(dst, report, Options(), owners=os.geteuid() == 0, workers=0, replace_trees=True)

    def run(self) -> None:
        apply, trailer, info = self.apply, self.trailer, self.info
        against = info.against_id is not None and bool(trailer.against)
        try:
            if not apply.open_root(create=not against):
                _mismatch(self.dst, "the destination does not exist")
        except NotADirectoryError:
            raise UsageError(f"{self.dst}: not a directory") from None
        try:
            current = self._list_destination()
            if info.against_id is not None:
                _check_against(self.dst, current, trailer)
            decisions = self._plan(current)
            apply.staging.begin(info.bundle_id.hex()[:16])
            staged = self._stage(decisions, current)
            apply.staging.make_durable()
            self._place(decisions, current, staged)
            apply.deleter.delete(self._deletions(current), apply.deleter.count_tree)
            apply.staging.end()                 # before the root's attributes: it changed the root's mtime
            self._finish_dirs(current)
        except BaseException:
            apply.abort()
            raise
        finally:
            apply.close()

    def _deletions(self, current: dict) -> Deletions:
        """The bundle's deletions still in the destination, children first,
        each noted with the manifest's names it may be on a case-insensitive
        destination (there the file placed under the manifest's spelling is
        the entry the bundle's tree signature listed under the old one)."""
        gone = Deletions((p.rpartition("/")[0], current[p]) for p in reversed(self.trailer.deletions)
                         if p in current)
        by_dir: dict[str, list[str]] = {}
        for rel, e in gone:
            by_dir.setdefault(rel, []).append(e.name)
        if by_dir:
            names: dict[str, list[str]] = {}
            for path in self.manifest:
                rel, _, name = path.rpartition("/")
                if rel in by_dir:
                    names.setdefault(rel, []).append(name)
            for rel, candidates in by_dir.items():
                gone.note_aliases(rel, candidates, names.get(rel, ()))
        return gone

    def _list_destination(self) -> dict:
        """path -> Entry of everything in the destination. A directory that
        cannot be listed is fine only where the tree signature could not list
        it either (nothing below it is checked or deleted); anywhere else the
        destination's state is unknown."""
        errors: list = []
        apply = self.apply
        open_up = None if apply.access.dac else (lambda pfd, name, rel: apply.access.opened.setdefault(rel, open_up_at(pfd, name)))
        current = {path: e for path, e, _ in walk(self.dst, errors, open_up)}
        unlisted = {a.path for a in self.trailer.against if a.unlisted}
        for rel, exc in errors:
            if rel not in unlisted:
                raise_os_error(os.path.join(self.dst, rel), exc)
        return current

    def _plan(self, current: dict) -> list[tuple[str, list[tuple]]]:
        """(directory, decisions) for every directory of the manifest, parents first."""
        report, manifest = self.report, self.manifest
        children: dict[str, list[Entry]] = {"": []}
        order = [""]
        for e in self.trailer.entries:
            parent = e.path.rpartition("/")[0]
            children.setdefault(parent, []).append(_as_entry(e))
            if e.kind == "d":
                children.setdefault(e.path, [])
                order.append(e.path)
        listed: dict[str, dict] = {}
        for path, e in current.items():
            listed.setdefault(path.rpartition("/")[0], {})[e.name] = _Listed(e)
        planner = Planner(PlanOptions(owners=self.apply.owners), report,
                          keep=lambda path, e: report.entry(path, e, manifest[path][1].blake3.hex()),
                          link_target=lambda path: manifest[path][1].target)
        return [(rel, planner.directory(rel, children[rel], listed.get(rel, {}))) for rel in order]

    def _stage(self, decisions, current: dict) -> dict:
        """Every new file's content, written and checked in the staging
        directory before anything else changes."""
        apply, stream, info, name = self.apply, self.stream, self.info, self.name
        staged = {}
        for rel, items in decisions:
            for d in items:
                if d[0] != TRANSFER:
                    continue
                e, prev, path = d[1], d[2], d[3]
                index, pe = self.manifest[path]
                if pe.record == NONE:
                    raise VerificationError(os.path.join(self.dst, path), "the bundle carries no content for "
                                            "it and the destination's copy differs; nothing applied")
                kind, body, length, flags = record_header(stream, info, index, pe, name)
                sparse = bool(flags & P.RECORD_SPARSE)
                if kind == P.WHOLE:
                    spec = ("bundle-whole", stream, body, info.trailer_offset, pe, name, info.version, sparse)
                else:
                    if prev is None or prev.kind != "f":
                        raise VerificationError(os.path.join(self.dst, path), "the delta's basis is missing; "
                                                                              "nothing applied")
                    spec = ("bundle-delta", stream, body, length, pe, name, apply.root_fd, rel, e.name,
                            apply.staging.fd, sparse)
                try:
                    staged[path] = apply.staging.stage(path, spec, pe.blake3, "new" if prev is None else "update")
                except ContentError as exc:
                    raise VerificationError(name, f"{path}: {exc.strerror}") from None
                except OSError as exc:
                    raise_os_error(os.path.join(self.dst, path), exc)
        return staged

    def _place(self, decisions, current: dict, staged: dict) -> None:
        """Parents first: directories, staged files, links, specials, attributes."""
        apply, report = self.apply, self.report
        for rel, items in decisions:
            if not items:
                continue
            try:
                fd = open_rel_dir(apply.root_fd, rel)
            except OSError as exc:
                report.error(rel + "/", f"cannot open destination directory: {exc.strerror or exc}")
                continue
            parent = Dir(fd, rel, stat.S_IMODE(os.fstat(fd).st_mode))
            try:
                for d in items:
                    what, e, prev, path = d[0], d[1], d[2], d[3]
                    if what == TRANSFER:
                        try:
                            apply.staging.place(staged[path], parent, e, prev, path, d[4])
                        except OSError as exc:
                            report.error(path, exc.strerror or str(exc))
                            continue
                        report.entry(path, staged[path].result.entry, staged[path].result.blake3)
                    elif what == ATTRS:
                        apply.entries.attributes(parent, e, prev, path, mtime=True)
                        report.entry(path, e, self.manifest[path][1].blake3.hex())
                    elif what == DIRECTORY:
                        if not apply.directory(parent, e, prev, path)[0]:
                            continue
                        report.entry(path, e, None)
                    else:
                        apply.entries.carry_out(parent, d)      # LINK, FIX, SPECIAL
            finally:
                parent.release()
        apply.sync_dirs()

    def _finish_dirs(self, current: dict) -> None:
        """Directory attributes from the bundle, deepest first; the root last."""
        root = self.trailer.root
        try:
            now = Entry.from_stat("", os.fstat(self.apply.root_fd))
        except OSError as exc:
            raise_os_error(self.dst, exc)
        dirs = [("", Entry("", root.mode, 0, root.mtime_ns, root.uid, root.gid, 0, "d", root.mode & 0o7777), now)]
        for e in self.trailer.entries:
            if e.kind == "d":
                prev = current.get(e.path)
                dirs.append((e.path, _as_entry(e), prev if prev is not None and prev.kind == "d" else None))
        self.apply.touched.add("")
        self.apply.finish_dirs(dirs)
