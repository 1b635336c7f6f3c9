"""Compare a destination tree with a recorded manifest (``resync verify``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .tree import Entry, hash_under, join, list_dir, open_rel_dir


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)      # size, mtime, mode or kind differ
    corrupt: list[str] = field(default_factory=list)      # same size and mtime, other content
    unhashed: int = 0

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.changed) + len(self.corrupt)

    def summary(self) -> str:
        return (f"{len(self.missing)} missing, {len(self.extra)} extra, {len(self.changed)} changed, "
                f"{len(self.corrupt)} corrupt")

    def lines(self):
        for label, paths in (("missing", self.missing), ("extra", self.extra), ("changed", self.changed),
                             ("corrupt", self.corrupt)):
            for p in paths:
                yield f"{label:8} {p}"

    def as_dict(self) -> dict:
        return {"checked": self.checked, "missing": self.missing, "extra": self.extra,
                "changed": self.changed, "corrupt": self.corrupt, "unhashed": self.unhashed,
                "problems": self.problems}


def verify_tree(root: str, manifest: list[tuple]) -> VerifyReport:
    """manifest rows: (path, kind, size, mtime_ns, mode, blake3)."""
    expected = {row[0]: row for row in manifest}
    report = VerifyReport()
    seen: dict[str, Entry] = {}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                fd = open_rel_dir(root_fd, rel)
            except OSError:
                continue
            try:
                entries, temps, _ = list_dir(fd, None, rel, skip_temps=True)
            finally:
                os.close(fd)
            for e in entries:
                path = join(rel, e.name)
                seen[path] = e
                if e.kind == "d":
                    stack.append(path)
    finally:
        os.close(root_fd)
    to_hash = []
    for path, (_, kind, size, mtime_ns, mode, digest) in expected.items():
        e = seen.get(path)
        if e is None:
            report.missing.append(path)
            continue
        report.checked += 1
        if e.kind != kind or e.perms != mode or (kind != "d" and (e.size != size or e.mtime_ns != mtime_ns)):
            report.changed.append(path)
        elif kind == "f":
            if digest is None:
                report.unhashed += 1
            else:
                to_hash.append((path, size, mtime_ns))
    report.extra = sorted(p for p in seen if p not in expected)
    hashes = hash_under(root, to_hash)
    for path, size, mtime_ns in to_hash:
        got = hashes.get(path)
        if got is None:
            report.changed.append(path)          # changed or vanished while we looked
        elif got != expected[path][5]:
            report.corrupt.append(path)
    report.missing.sort()
    report.changed.sort()
    report.corrupt.sort()
    return report
