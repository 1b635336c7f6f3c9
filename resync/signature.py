"""Signature stage: per-block weak sums and keyed BLAKE3 hashes of a basis file.

A signature is what the side holding the old file (the basis) sends to the side
holding the new one. Block hashes are BLAKE3 keyed with a random per-signature
salt, so nobody can prepare colliding blocks before the signature exists.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from math import isqrt

import numpy as np

from . import formats
from .errors import FileError
from .fs import MappedFile, atomic_output, write_all
from .parallel import split, thread_count

DEFAULT_STRONG_LEN = 16
MIN_DEFAULT_BLOCK = 700
MAX_DEFAULT_BLOCK = 128 << 10
_GROUP_BYTES = 1 << 20   # blocks hashed per kernel call: stays in L2 between passes


def default_block_len(file_len: int) -> int:
    """About sqrt(file length), a multiple of 8, between 700 B and 128 KiB (rsync's rule)."""
    if file_len <= MIN_DEFAULT_BLOCK * MIN_DEFAULT_BLOCK:
        return MIN_DEFAULT_BLOCK
    return max(MIN_DEFAULT_BLOCK, min(MAX_DEFAULT_BLOCK, isqrt(file_len) & ~7))


@dataclass
class Signature:
    block_len: int
    file_len: int
    strong_len: int
    salt: bytes
    file_hash: bytes
    weak: np.ndarray     # uint32[count]
    check: np.ndarray    # uint32[count]
    strong: np.ndarray   # uint8[count, strong_len]
    check_bits: int = 32  # 16: the check's weights keep their high 16 bits only, so every check's low
    #                       16 bits are 0 (a wire signature carries the high half: protocol.encodings)

    @property
    def count(self) -> int:
        return self.weak.shape[0]

    @property
    def tail_len(self) -> int:
        """Length of a short last block (0 when the basis ends on a block boundary)."""
        return self.file_len % self.block_len

    @property
    def key_words(self) -> np.ndarray:
        return np.frombuffer(self.salt, dtype="<u4").astype(np.uint32)

    def check_weights(self) -> np.ndarray:
        """The check sum's weights for this salt and block length (uint32
        [block_len]; kept: a network transfer keys every signature with one
        salt, and most small files have one block length; not to be changed)."""
        return _check_weights(int.from_bytes(self.salt[:8], "little"), self.block_len, self.check_bits)

    def header(self) -> formats.SigHeader:
        return formats.SigHeader(self.strong_len, self.block_len, self.file_len, self.count,
                                 self.salt, self.file_hash)


@functools.lru_cache(maxsize=32)
def _check_weights(seed: int, block_len: int, bits: int = 32) -> np.ndarray:
    """splitmix64 weights (kernels.weak.check_weights); with ``bits`` 16 only
    their high halves: the check sum, taken mod 2^32, then has 16 low bits of
    0 and 16 high bits that hash the window as a 16-bit sum would."""
    from .kernels.native import get
    out = np.empty(block_len, np.uint32)
    get("check_weights")(np.uint64(seed), out)
    if bits == 16:
        out &= np.uint32(0xFFFF0000)
    return out


def whole_file_hash(data: np.ndarray, threads: int = 1) -> bytes:
    import blake3
    return blake3.blake3(data, max_threads=threads).digest()


class HashInBackground:
    """BLAKE3 of a whole buffer computed on another thread (the hash releases
    the GIL). Buffers under 1 MiB are hashed at once: starting and joining a
    thread (~0.1 ms) costs more than hashing them."""

    INLINE = 1 << 20

    def __init__(self, data: np.ndarray, threads: int = 1):
        self._result: bytes | None = None
        self._error: BaseException | None = None
        self._thread = None
        if data.shape[0] < self.INLINE:
            self._result = whole_file_hash(data, 1)
            return
        self._thread = threading.Thread(target=self._run, args=(data, threads), daemon=True)
        self._thread.start()

    def _run(self, data, threads):
        try:
            self._result = whole_file_hash(data, threads)
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self) -> bytes:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def hash_blocks(data: np.ndarray, starts: np.ndarray, length: int, key: np.ndarray) -> np.ndarray:
    """Keyed BLAKE3 (32 bytes) of data[s:s+length] for each s in starts -> uint8[n, 32]."""
    from .kernels.native import HASH_WINDOWS_SCRATCH, get
    out = np.empty((starts.shape[0], 8), dtype=np.uint32)
    if starts.shape[0]:
        get("hash_windows")(data, np.ascontiguousarray(starts, np.int64), length, key, True, out,
                            np.empty(HASH_WINDOWS_SCRATCH, np.uint32))
    return out.view(np.uint8)


def compute_signature(data: np.ndarray, block_len: int | None = None,
                      strong_len: int = DEFAULT_STRONG_LEN, salt: bytes | None = None,
                      threads: int | None = None, file_hash: bool = True, check_bits: int = 32) -> Signature:
    """Signature of ``data`` (uint8 array, typically a memory map of the
    basis). ``file_hash``: also the BLAKE3 of the whole basis (the signature
    file format carries it; a network Want does not). ``check_bits``: 32, or
    16 for a wire signature (``Signature.check_bits``)."""
    from concurrent.futures import ThreadPoolExecutor

    from .kernels.native import get
    block_sums = get("block_sums")

    file_len = int(data.shape[0])
    block_len = block_len or default_block_len(file_len)
    if not formats.MIN_BLOCK_LEN <= block_len <= formats.MAX_BLOCK_LEN:
        raise ValueError(f"block length must be {formats.MIN_BLOCK_LEN}..{formats.MAX_BLOCK_LEN}")
    if not 2 <= strong_len <= formats.MAX_STRONG_LEN:     # (the file format takes 16 and up; the
        raise ValueError(f"strong hash length must be 2..{formats.MAX_STRONG_LEN}")   # network, 2 and up)
    threads = threads or thread_count()
    salt = os.urandom(32) if salt is None else salt
    count = formats.block_count(file_len, block_len)
    sig = Signature(block_len, file_len, strong_len, salt, b"",
                    np.empty(count, dtype=np.uint32), np.empty(count, dtype=np.uint32),
                    np.empty((count, strong_len), dtype=np.uint8), check_bits)
    whole = HashInBackground(data) if file_hash else None
    if count:
        weights = sig.check_weights()
        key = sig.key_words
        full = file_len // block_len
        group = max(16, _GROUP_BYTES // block_len // 16 * 16)

        def work(lo: int, hi: int) -> None:
            for g in range(lo, hi, group):
                n = min(group, hi - g)
                block_sums(data, g, n, block_len, weights, sig.weak, sig.check)
                n_full = min(n, full - g)
                starts = np.arange(g, g + n_full, dtype=np.int64) * block_len
                sig.strong[g:g + n_full] = hash_blocks(data, starts, block_len, key)[:, :strong_len]
                if n_full < n:   # the group ends with the short last block
                    tail = np.array([full * block_len], dtype=np.int64)
                    sig.strong[full] = hash_blocks(data, tail, file_len - full * block_len, key)[0, :strong_len]

        pieces = split(count, max(1, min(threads, file_len // (4 << 20) or 1)), align=group)
        if len(pieces) == 1:
            work(*pieces[0])
        else:
            with ThreadPoolExecutor(len(pieces)) as pool:
                for f in [pool.submit(work, lo, hi) for lo, hi in pieces]:
                    f.result()
    sig.file_hash = whole.result() if whole is not None else b""
    return sig


def _signature_parts(sig: Signature) -> list:
    return [formats.pack_sig_header(sig.header()), sig.weak.astype("<u4", copy=False),
            sig.check.astype("<u4", copy=False), np.ascontiguousarray(sig.strong)]


def signature_bytes(sig: Signature) -> bytes:
    """``sig`` in the signature file format."""
    return b"".join(p if isinstance(p, bytes) else p.tobytes() for p in _signature_parts(sig))


def signature_from_bytes(buf, name: str) -> Signature:
    """Parse and validate a signature held in memory (arrays are copied)."""
    header, weak, check, strong = formats.unpack_sig(buf, name)
    return Signature(header.block_len, header.file_len, header.strong_len, header.salt,
                     header.file_hash, weak.astype(np.uint32), check.astype(np.uint32), strong.copy())


def write_signature(sig: Signature, path: str | os.PathLike) -> int:
    """Write ``sig`` atomically; returns the file size."""
    body = _signature_parts(sig)
    with atomic_output(path) as fd:
        for part in body:
            write_all(fd, part)
    return formats.SIG_HEADER.size + sig.count * (8 + sig.strong_len)


def read_signature(path: str | os.PathLike, name: str | None = None) -> Signature:
    """Read and validate a signature file (arrays are copied out of the file)."""
    name = name or os.fspath(path)
    with MappedFile(path, name=name) as f:
        header, weak, check, strong = formats.unpack_sig(f.buffer, name)
        sig = Signature(header.block_len, header.file_len, header.strong_len, header.salt,
                        header.file_hash, weak.astype(np.uint32), check.astype(np.uint32),
                        strong.copy())
        del weak, check, strong
    return sig


def signature_file(basis: str, out: str, block_len: int | None = None,
                   strong_len: int = DEFAULT_STRONG_LEN) -> tuple[Signature, int]:
    with MappedFile(basis) as f:
        sig = compute_signature(f.array, block_len, strong_len)
    try:
        size = write_signature(sig, out)
    except IsADirectoryError:
        raise FileError(out, "is a directory") from None
    return sig, size
