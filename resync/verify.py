"""Compare a destination tree with a recorded manifest (``resync verify``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from .scan import hash_at, join, list_dir, open_rel_dir


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


def verify_tree(root: str, manifest: Iterable[tuple]) -> VerifyReport:
    """Compare the tree at ``root`` with manifest rows (path, kind, size,
    mtime_ns, mode, blake3 hex or None), given in any order.

    Memory: one compact record per manifest row. The tree is walked one
    directory at a time (never following symlinks, reached through O_NOFOLLOW
    descriptors) and each file is hashed when it is met."""
    expected: dict[str, tuple] = {}
    for path, kind, size, mtime_ns, mode, digest in manifest:
        expected[path] = (kind, size, mtime_ns, mode, bytes.fromhex(digest) if digest else None)
    report = VerifyReport()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    buf = bytearray(1 << 20)
    try:
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                fd = open_rel_dir(root_fd, rel)
            except OSError:
                continue
            try:
                entries, _, _ = list_dir(fd, None, rel, skip_temps=True)
                for e in entries:
                    path = join(rel, e.name)
                    if e.kind == "d":
                        stack.append(path)
                    want = expected.pop(path, None)
                    if want is None:
                        report.extra.append(path)
                        continue
                    report.checked += 1
                    kind, size, mtime_ns, mode, digest = want
                    if e.kind != kind or e.perms != mode or (kind != "d" and (e.size != size or e.mtime_ns != mtime_ns)):
                        report.changed.append(path)
                    elif kind == "f":
                        if digest is None:
                            report.unhashed += 1
                            continue
                        got = hash_at(fd, e.name, size, mtime_ns, buf)
                        if got is None:
                            report.changed.append(path)      # changed or vanished while we looked
                        elif got != digest:
                            report.corrupt.append(path)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    report.missing = sorted(expected)
    report.extra.sort()
    report.changed.sort()
    report.corrupt.sort()
    return report

