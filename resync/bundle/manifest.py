"""Binary manifests: tree entries, the tree signature file, and the checks
every path read from a file must pass.

All integers little-endian. A path is ``u16 length`` + bytes (the file
system's bytes, ``os.fsencode``), relative to the tree root, "/"-separated;
it is refused unless every component is non-empty, not "." or "..", at most
255 bytes, and free of NUL, and the whole at most 4095 bytes.

A time is ``i64 seconds | u32 nanoseconds`` since the epoch (the seconds
rounded down, the nanoseconds 0..999,999,999; 1969-12-31 23:59:59.5 is -1,
500,000,000): any time a file system stores fits, where a signed 64-bit count
of nanoseconds ends in 2262 (ext4 goes to 2446). Version 1 files, which stored
``i64 nanoseconds``, are still read.

Tree signature (``resync signature-tree``), version 2::

    header  8s "RSYNCTRE" | u16 version 2 | u16 flags 0 | u32 0
    entry   path | u8 kind | u8 flags | u32 mode | time mtime | u64 size
            | u32 signature length | signature
            (kind: 1 file, 2 dir, 3 symlink, 4 device, 5 fifo/socket; a
            signature, in resync's signature format, for files only; flags:
            bit 0 "unlisted", a directory whose contents could not be read,
            so nothing below it is described; bit 1 "unread", a file that
            could not be read, which has no signature)
    end     u64 entry count | 32s BLAKE3 of everything before it (also the
            tree signature's id); at the end so the file is written in one pass

Version 1 entries were ``path | u8 kind | u32 mode | i64 mtime_ns | u64 size |
u32 signature length | signature``.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from ..errors import FormatError

KIND_CODES = {"f": 1, "d": 2, "L": 3, "D": 4, "S": 5}
KINDS = {v: k for k, v in KIND_CODES.items()}
_TYPE_BITS = {"f": (stat.S_IFREG,), "d": (stat.S_IFDIR,), "L": (stat.S_IFLNK,),
              "D": (stat.S_IFCHR, stat.S_IFBLK), "S": (stat.S_IFIFO, stat.S_IFSOCK)}
MAX_PATH = 4095
MAX_NAME = 255
MAX_SIZE = 1 << 62
NONE = (1 << 64) - 1

TREE_MAGIC = b"RSYNCTRE"
TREE_VERSION = 2
TREE_HEADER = struct.Struct("<8sHHI")
TREE_ENTRY = struct.Struct("<BBIqIQI")
TREE_ENTRY_V1 = struct.Struct("<BIqQI")
FLAG_UNLISTED = 1
FLAG_UNREAD = 2
NS = 10**9


def split_time(ns: int) -> tuple[int, int]:
    """(seconds rounded down, nanoseconds) of a time in nanoseconds since the epoch."""
    return divmod(ns, NS)


def join_time(seconds: int, nanoseconds: int, cursor: "Cursor", path: str) -> int:
    """Nanoseconds since the epoch; a FormatError if the nanoseconds are out of range."""
    if nanoseconds >= NS:
        cursor.bad(f"{path!r}: nanoseconds {nanoseconds} out of range")
    return seconds * NS + nanoseconds


def check_path(raw: bytes) -> str | None:
    """Why ``raw`` is not an acceptable relative path, or None if it is."""
    if not raw:
        return "empty path"
    if len(raw) > MAX_PATH:
        return "path longer than 4095 bytes"
    if b"\0" in raw:
        return "NUL in path"
    if raw.startswith(b"/"):
        return "absolute path"
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            return f"path component {part.decode(errors='replace')!r} not allowed"
        if len(part) > MAX_NAME:
            return "path component longer than 255 bytes"
    return None


def mode_matches(kind: str, mode: int) -> bool:
    return stat.S_IFMT(mode) in _TYPE_BITS[kind]


class Cursor:
    """Bounded reads from a buffer: running past the end, or a value out of
    range, is a FormatError naming the file, never an exception from struct."""

    def __init__(self, buf, name: str, what: str, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.name = name
        self.what = what
        self.pos = pos
        self.end = len(buf) if end is None else end

    def bad(self, why: str):
        raise FormatError(self.name, self.what, why)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            self.bad("truncated")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        if self.pos + st.size > self.end:
            self.bad("truncated")
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def path(self) -> str:
        (n,) = self.unpack(_U16)
        raw = self.take(n)
        why = check_path(raw)
        if why:
            self.bad(why)
        return os.fsdecode(raw)

    def count(self, per_item: int, limit: int = 1 << 40) -> int:
        """A u64 count of items at least ``per_item`` bytes each: no more than fit."""
        (n,) = self.unpack(_U64)
        if n > limit or n * per_item > self.end - self.pos:
            self.bad(f"count {n} does not fit in the file")
        return n


_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


def pack_path(path: str) -> bytes:
    raw = os.fsencode(path)
    return _U16.pack(len(raw)) + raw


@dataclass(frozen=True)
class TreeEntry:
    """A path of the destination as a tree signature records it."""
    path: str
    kind: str
    mode: int
    mtime_ns: int
    size: int
    signature: bytes = b""      # the file's block signature (resync signature format)
    file_hash: bytes = b""      # the file's BLAKE3, from that signature's header
    unlisted: bool = False      # a directory whose contents could not be read
    unread: bool = False        # a file that could not be read (no signature, content unknown)


class ParentTracker:
    """Checks that entries come parents first: each path's parent is the root
    or an earlier directory entry, and no path repeats."""

    def __init__(self, cursor: Cursor):
        self.cursor = cursor
        self.dirs: set[str] = {""}
        self.seen: set[str] = set()

    def add(self, path: str, kind: str, unlisted: bool = False) -> None:
        """``unlisted``: a directory with nothing described below it."""
        if path in self.seen:
            self.cursor.bad(f"duplicate path {path!r}")
        parent = path.rpartition("/")[0]
        if parent not in self.dirs:
            self.cursor.bad(f"{path!r} comes before its directory, or its parent is not a directory "
                            "(or one whose contents are not listed)")
        self.seen.add(path)
        if kind == "d" and not unlisted:
            self.dirs.add(path)


def write_tree_signature(fd: int, entries) -> tuple[int, bytes]:
    """Write a tree signature of ``entries`` (TreeEntry, parents first) to
    ``fd``, streaming; returns (entry count, id)."""
    import blake3
    from ..fs import write_all
    h = blake3.blake3()
    out = bytearray(TREE_HEADER.pack(TREE_MAGIC, TREE_VERSION, 0, 0))
    count = 0
    for e in entries:
        out += pack_path(e.path)
        flags = (FLAG_UNLISTED if e.unlisted else 0) | (FLAG_UNREAD if e.unread else 0)
        out += TREE_ENTRY.pack(KIND_CODES[e.kind], flags, e.mode, *split_time(e.mtime_ns), e.size,
                               len(e.signature))
        out += e.signature
        count += 1
        if len(out) >= 1 << 20:
            h.update(out)
            write_all(fd, out)
            out = bytearray()
    out += _U64.pack(count)
    h.update(out)
    digest = h.digest()
    write_all(fd, bytes(out) + digest)
    return count, digest


def read_tree_signature(buf, name: str) -> tuple[bytes, list[TreeEntry]]:
    """(id, entries) of a tree signature held in ``buf``; FormatError if it is
    not one, is damaged, or names a path it must not."""
    import blake3
    from .. import formats
    what = "resync tree signature"
    if len(buf) < TREE_HEADER.size + 8 + 32:
        if bytes(buf[:8]) != TREE_MAGIC[:min(8, len(buf))]:
            raise FormatError(name, what, "bad magic")
        raise FormatError(name, what, "truncated")
    c = Cursor(buf, name, what, end=len(buf) - 32 - 8)
    magic, version, flags, _ = c.unpack(TREE_HEADER)
    if magic != TREE_MAGIC:
        c.bad("bad magic")
    if version not in (1, TREE_VERSION):
        c.bad(f"unsupported version {version}")
    digest = bytes(buf[len(buf) - 32:])
    if blake3.blake3(buf[:len(buf) - 32]).digest() != digest:
        c.bad("checksum mismatch (damaged or truncated)")
    (count,) = _U64.unpack_from(buf, c.end)
    parents = ParentTracker(c)
    entries = []
    while c.pos < c.end:
        path = c.path()
        if version == 1:
            code, mode, mtime_ns, size, sig_len = c.unpack(TREE_ENTRY_V1)
            flags = 0
        else:
            code, flags, mode, seconds, nanoseconds, size, sig_len = c.unpack(TREE_ENTRY)
            mtime_ns = join_time(seconds, nanoseconds, c, path)
        kind = KINDS.get(code)
        if kind is None or not mode_matches(kind, mode):
            c.bad(f"{path!r}: bad kind {code} or mode {mode:o}")
        if flags & ~(FLAG_UNLISTED | FLAG_UNREAD) or (flags & FLAG_UNLISTED and kind != "d") \
                or (flags & FLAG_UNREAD and kind != "f"):
            c.bad(f"{path!r}: bad flags {flags:#x}")
        unread = bool(flags & FLAG_UNREAD)
        if size > MAX_SIZE:
            c.bad(f"{path!r}: size {size} out of range")
        if (kind == "f" and not unread) != (sig_len > 0):
            c.bad(f"{path!r}: a signature must come with files (unless unread) and only with files")
        sig = c.take(sig_len)
        file_hash = b""
        if sig_len:
            header = formats.unpack_sig(sig, f"{name}: {path}")[0]
            if header.file_len != size:
                c.bad(f"{path!r}: signature is of {header.file_len} bytes, entry says {size}")
            file_hash = header.file_hash
        parents.add(path, kind, bool(flags & FLAG_UNLISTED))
        entries.append(TreeEntry(path, kind, mode, mtime_ns, size, sig, file_hash, bool(flags & FLAG_UNLISTED),
                                 unread))
    if len(entries) != count:
        c.bad(f"{len(entries)} entries, the count says {count}")
    return digest, entries
