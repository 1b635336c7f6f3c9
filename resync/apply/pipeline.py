"""Files written through the pipeline (local sync, the network receiver's
large files): copies run in forked workers (or inline), batch N is made
durable with one ``syncfs`` on a thread while batch N+1 is written, and
batch N-1 is renamed into place; then one fsync per directory touched."""
from __future__ import annotations

import os
import threading
from collections import deque

from ..content import write_jobs
from ..report import FileChange
from ..scan import Entry, open_rel_dir
from .tree import Dir, syncfs

_BATCH_FILES = 512               # temp files made durable with one syncfs
_BATCH_BYTES = 512 << 20
_CHUNK_FILES = 64               # small files written by one worker call
_CHUNK_BYTES = 16 << 20


class _Job:
    """One file to write: where to, from what, and how it went."""

    __slots__ = ("parent", "name", "rel", "spec", "expected", "src", "old", "code", "tmp", "result", "error",
                 "vanished")

    def __init__(self, parent: Dir, name: str, rel: str, spec: tuple, expected: bytes | None, src: Entry,
                 old: Entry | None, code: str, tmp: str):
        self.parent, self.name, self.rel, self.spec, self.expected = parent, name, rel, spec, expected
        self.src, self.old, self.code, self.tmp = src, old, code, tmp
        self.result: FileChange | None = None
        self.error = ""
        self.vanished = False


class _Batch:
    """Copies made durable together: chunks submitted to the workers, then the jobs."""

    __slots__ = ("chunks", "jobs", "thread")

    def __init__(self, chunks: list):
        self.chunks = chunks
        self.jobs: list[_Job] = []
        self.thread: threading.Thread | None = None


class _Done:
    """A finished future, for the inline executor."""

    __slots__ = ("_value", "_error")

    def __init__(self, fn, *args):
        self._value, self._error = None, None
        try:
            self._value = fn(*args)
        except BaseException as exc:   # re-raised by result(), as a Future would
            self._error = exc

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self):
        return self._error

    def add_done_callback(self, fn) -> None:
        fn(self)


class Pipeline:
    """The Applier ``a``'s pipeline: ``transfer`` a file, ``commit`` (final:
    drain), ``discard_pending`` and ``shutdown_workers`` when the run stops."""

    def __init__(self, a):
        self.a = a
        self._chunk: list[_Job] = []
        self._chunk_bytes = 0
        self._batch: list = []
        self._pipeline: deque[_Batch] = deque()
        self._batch_files = 0
        self._batch_bytes = 0
        self._pool = None

    def transfer(self, parent: Dir | None, e: Entry, prev: Entry | None, path: str, code: str, spec: tuple,
                 expected: bytes | None = None) -> None:
        """Write ``e``'s new content (``spec``, see content.py) to a temp
        file beside its final name and, with its batch, rename it into place."""
        if self.a.dry_run or parent is None:
            self.a.count_transfer(e, prev)
            self.a.report.item(f"{code} {path}")
            return
        self.a.touched.add(parent.rel)
        self.a.access.open_up(parent)                    # the worker creates its temp file there
        job = _Job(parent.acquire(), e.name, path, spec, expected, e, prev, code, self.a.temp_name())
        self._chunk.append(job)
        self._chunk_bytes += e.size
        if self.a.report.progress is not None:
            self.a.report.progress.queued(e.size)
        if len(self._chunk) >= _CHUNK_FILES or self._chunk_bytes >= _CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the jobs gathered so far to a worker."""
        if not self._chunk:
            return
        jobs, nbytes = self._chunk, self._chunk_bytes
        items = [(j.parent.rel, j.name, j.tmp, j.spec, j.expected) for j in jobs]
        fut = self._submit(write_jobs, self.a.root_fd, self.a.options, items, open_rel_dir)
        if self.a.report.progress is not None:
            progress = self.a.report.progress
            fut.add_done_callback(lambda f: [progress.done(r[1] + r[2]) for r in (
                f.result() if not f.exception() else []) if r[0] == "ok"])
        self._batch.append((fut, jobs))
        self._chunk, self._chunk_bytes = [], 0     # only now: an interrupt finds every job somewhere
        self._batch_files += len(jobs)
        self._batch_bytes += nbytes
        if self._batch_files >= _BATCH_FILES or self._batch_bytes >= _BATCH_BYTES:
            self.commit()

    def _submit(self, fn, *args):
        if not self.a.workers:
            return _Done(fn, *args)
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        from ..parallel import block_stop_signals, restore_signals
        # The first submit forks the workers: hold the stop signals off until they ignore them.
        blocked = block_stop_signals()
        try:
            return self._start_workers(blocked).submit(fn, *args)
        finally:
            restore_signals(blocked)

    def _start_workers(self, mask):
        """Copy workers: forked processes, so writing many small files is not
        serialised by the GIL (threads spent most of the run trading it).
        Forked on first use: a run with nothing to copy starts none. They are
        forked by this thread (ProcessPoolExecutor forks in ``submit`` with
        the fork context), which lives as long as the run: the parent-death
        signal they ask for is tied to it."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..content import worker_init
        self._pool = ProcessPoolExecutor(self.a.workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=worker_init, initargs=(os.getpid(), mask))
        return self._pool

    def _collect(self, jobs: list[_Job], results: list[tuple]) -> None:
        """Attach a worker's results to the jobs they belong to."""
        for job, r in zip(jobs, results):
            if r[0] == "ok":
                _, literal, matched, digest, mode, mtime_ns, uid, gid, seconds = r
                entry = Entry(job.name, mode, literal + matched, mtime_ns, uid, gid, 0, "f", mode & 0o7777)
                job.result = FileChange(job.rel, "new" if job.old is None else "update", literal + matched,
                                        literal, matched, seconds, digest, entry)
            elif r[0] == "vanished":
                job.vanished = True
            else:
                job.error = r[1]

    def commit(self, final: bool = False) -> None:
        """Move the pending copies down a three-stage pipeline, so the disk
        flush of one batch overlaps copying the next and the traversal never
        waits for it: [copying N] -> [syncfs of N-1 on a thread] -> [renames of
        N-2]. ``final``: drain everything."""
        if final:
            self.flush()
        if self._batch:
            self._pipeline.append(_Batch(self._batch))
            self._batch = []
        self._batch_files = self._batch_bytes = 0
        keep = 0 if final else 2
        while len(self._pipeline) > keep:
            batch = self._pipeline[0]        # stays listed until done: see discard_pending
            self._start_sync(batch)
            self._finish_batch(batch)
            self._pipeline.popleft()
        if final:
            self.a.sync_dirs()         # directories changed by mkdir, links and specials only
        if not final and len(self._pipeline) == 2:
            self._start_sync(self._pipeline[0])

    def _start_sync(self, batch: _Batch) -> None:
        """Wait for the batch's copies, then flush them to disk on a thread."""
        if batch.thread is not None:
            return
        for fut, jobs in batch.chunks:
            self._collect(jobs, fut.result())
            batch.jobs.extend(jobs)
        ready = [j for j in batch.jobs if j.result is not None]
        batch.thread = threading.Thread(target=self._make_durable, args=(ready,), daemon=True,
                                        name="resync-syncfs")
        batch.thread.start()

    def _make_durable(self, ready: list[_Job]) -> None:
        if not ready or syncfs(self.a.root_fd):
            return
        for j in ready:                          # no syncfs: one fsync per file
            try:
                fd = os.open(j.tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=j.parent.fd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                j.error, j.result = exc.strerror or str(exc), None

    def _finish_batch(self, batch: _Batch) -> None:
        """Rename the batch's durable temp files into place; fsync the directories."""
        batch.thread.join()
        stats, report = self.a.stats, self.a.report
        for j in batch.jobs:
            try:
                if j.result is not None:
                    if j.old is not None and j.old.kind == "d" and not self.a.make_way(j.parent, j.name, j.old, j.rel):
                        os.unlink(j.tmp, dir_fd=j.parent.fd)
                        continue
                    os.rename(j.tmp, j.name, src_dir_fd=j.parent.fd, dst_dir_fd=j.parent.fd)
                    self.a.count_transfer(j.src, j.old)
                    stats.bytes_literal += j.result.literal
                    stats.bytes_matched += j.result.matched
                    stats.bytes_written += j.result.size
                    report.item(f"{j.code} {j.rel}")
                    report.file(j.result)
                    report.entry(j.rel, j.result.entry, j.result.blake3)
                    self.a.mark_dirty(j.parent)
                elif j.vanished:
                    report.vanished(j.rel)
                    self.a.keep_old(j.rel, j.old)
                else:
                    report.error(j.rel, j.error or "transfer failed")
                    self.a.keep_old(j.rel, j.old)
            except OSError as exc:
                report.error(j.rel, exc.strerror or str(exc))
                try:
                    os.unlink(j.tmp, dir_fd=j.parent.fd)
                except OSError:
                    pass
            finally:
                j.parent.release()
        self.a.sync_dirs()

    def discard_pending(self) -> None:
        """Interrupted: remove the temp files of copies not yet renamed (the
        next run would, but an operator should not find them lying around)."""
        jobs = list(self._chunk)
        for _, chunk in self._batch:
            jobs += chunk
        for batch in self._pipeline:
            if batch.thread is not None:
                batch.thread.join()
            jobs += [j for _, chunk in batch.chunks for j in chunk]
        for job in jobs:
            try:
                os.unlink(job.tmp, dir_fd=job.parent.fd)
            except OSError:
                pass

    def shutdown_workers(self, kill: bool = False) -> None:
        """Stop the copy workers: at the end of a run, once their work is
        done; ``kill`` (an interrupted run): at once, SIGKILLed and reaped
        first, before their temp files are removed. An orderly shutdown from
        a stop signal's unwinding could hang for good — the signal may land
        inside the executor's own bookkeeping, and its manager thread then
        never hears of the shutdown (seen: SIGTERM during a copy, the run
        blocked in ProcessPoolExecutor.shutdown)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if not kill:
            pool.shutdown(wait=True)
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            try:
                p.kill()
            except (OSError, ValueError, AttributeError):
                pass
        for p in procs:
            try:
                p.join(5)
            except (OSError, ValueError, AssertionError, AttributeError):
                pass
        pool.shutdown(wait=False, cancel_futures=True)     # (its manager thread sees the workers gone, and ends)
