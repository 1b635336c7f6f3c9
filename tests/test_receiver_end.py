"""A receiver's waits on the disk run off the event loop (Session.run_blocking,
net.workers): its end (its last files placed, deletions, directory
attributes), and in the middle of a transfer its flushes (batches of files
made durable, checkpoints). The session is fed meanwhile; its Done leaves
after the end and after the lines the end itemized; a cut, a kill or a
failure while they run leaves every path old or new and nothing staged
behind, and a killed transfer resumes from the checkpoint a flush wrote."""
from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

from resync.errors import ConnectionFailed
from resync.protocol import checkpoint as checkpoint_mod
from resync.protocol import frames as F
from resync.protocol import parity as parity_mod
from resync.protocol import receiver as receiver_mod
from resync.protocol.receiver import RECV_PREFIX, Receiver
from resync.protocol.session import Options

from . import mix
from .protopump import Channel, RemoteLines, make_pair, pump
from .treeutil import snapshot


class Worker:
    """The transport's ``blocking`` for the tests: the job on a thread of its
    own, held until ``gate`` is set (by ``poll`` once it has seen the job
    pending ``release_after`` times; None: by the test), its ``back``
    delivered by the pump (``poll``, as the loop would take it up) — and what
    was seen meanwhile."""

    def __init__(self, session, release_after: int | None = 3):
        self.session, self.release_after = session, release_after
        self.gate = threading.Event()
        self.pending: list = []
        self.threads: list[int] = []
        self.seen_while_running: list[tuple[bool, bool]] = []   # (Done sent, session finished)
        session.blocking = self.blocking

    def blocking(self, job, back) -> None:
        from concurrent.futures import Future
        future: Future = Future()

        def run() -> None:
            self.gate.wait(30)
            self.threads.append(threading.get_ident())
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
        threading.Thread(target=run, daemon=True).start()
        self.pending.append((future, back))
        return future

    def poll(self) -> bool:
        """Deliver the jobs that are over (the pump's ``cut_when``: never cuts)."""
        for item in [x for x in self.pending if x[0].done()]:
            self.pending.remove(item)
            item[1](item[0])
        for _ in self.pending:
            role = self.session.role
            self.seen_while_running.append((getattr(role, "done_sent", None), self.session.finished))
            if self.release_after is not None and len(self.seen_while_running) >= self.release_after:
                self.gate.set()
        return False


def _tree(root: Path) -> None:
    root.mkdir()
    (root / "text.txt").write_text("the quick brown fox\n" * 500)
    (root / "zeros").write_bytes(bytes(200_000))
    (root / "empty").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "repeated").write_bytes(b"block" * 40_000)
    (root / "sub" / "odd name \u00e9 [1]").write_bytes(os.urandom(3000))
    mix.write(root / "mixed", 7, 300_000, "mixed")


def _staging_left(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(RECV_PREFIX)]


def test_the_end_runs_off_the_loop_and_done_follows_it_and_its_itemized_lines(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    (dst / "stale").write_text("only at the destination\n")
    lines = RemoteLines()
    client, server = make_pair(tmp_path, True, src, dst, options=Options(delete=True, itemize=True),
                               client_report=lines)
    worker = Worker(server)
    pump(client, server, Channel(random.Random(1)), cut_when=worker.poll)
    assert server.error is None and client.error is None, (server.error, client.error)
    assert isinstance(server.role, Receiver) and server.role.done_sent
    assert worker.threads and threading.get_ident() not in worker.threads     # the end ran on another thread
    assert worker.seen_while_running and all(not done and not finished
                                             for done, finished in worker.seen_while_running)
    # the end's own lines (the deletion, the last files placed) reached the client, before its Done
    assert (F.ITEM_LINE, b"*deleting   stale") in lines.items, lines.items
    assert snapshot(src, root_meta=False) == snapshot(dst, root_meta=False)
    assert not _staging_left(dst)


def test_a_session_cut_while_its_end_runs_leaves_each_path_old_or_new_and_nothing_staged(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    (dst / "text.txt").write_text("an older text\n")
    (dst / "stale").write_text("only at the destination\n")
    before, new = snapshot(dst), snapshot(src)
    client, server = make_pair(tmp_path, True, src, dst, options=Options(delete=True))
    worker = Worker(server, release_after=None)
    # the connection is lost (both ends told) while the end waits on the disk
    pump(client, server, Channel(random.Random(2)), cut_when=lambda: bool(worker.pending))
    assert server.role.ending and not server.role.done_sent
    assert isinstance(server.error, ConnectionFailed)
    worker.gate.set()
    while worker.pending:
        worker.poll()
    for path, meta in snapshot(dst).items():            # every path old or new: the end, once begun, completes
        assert meta == before.get(path) or meta == new.get(path), path
    assert not _staging_left(dst) and server.role.ending is False


def test_an_end_that_fails_fails_the_session_tells_the_client_and_removes_what_it_staged(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    (dst / "text.txt").write_text("an older text\n")
    from resync.apply.applier import Applier

    def failing(self, dirs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(Applier, "finish_dirs", failing)
    client, server = make_pair(tmp_path, True, src, dst)
    worker = Worker(server)
    pump(client, server, Channel(random.Random(3)), cut_when=worker.poll, max_time=120)
    assert server.error is not None and "Input/output error" in str(server.error), server.error
    assert client.error is not None                      # told by the server's Error, not left waiting
    assert not _staging_left(dst)
    assert not server.role.done_sent


def _many(root: Path, rng: random.Random) -> None:
    _tree(root)
    for i in range(40):
        (root / "sub" / f"small-{i:02}.txt").write_text(f"line {i}\n" * (i * 7))
    for i in range(2):
        (root / f"large{i}").write_bytes(rng.randbytes(2_000_000) + bytes(1_000_000))


def test_flushes_in_the_middle_of_a_transfer_run_off_the_loop_and_the_tree_arrives_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(receiver_mod, "PLACE_BATCH", 4)
    monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_INTERVAL", 0.02)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _many(src, random.Random(1))
    dst.mkdir()
    (dst / "sub").mkdir()
    (dst / "sub" / "small-03.txt").write_text("an older copy\n")
    client, server = make_pair(tmp_path, True, src, dst)
    worker = Worker(server, release_after=2)            # each flush still under way for two turns of the pump
    journals = []
    real_run = checkpoint_mod.Flush.run

    def run(job):
        journals.append(job.journal is not None)
        real_run(job)
    monkeypatch.setattr(checkpoint_mod.Flush, "run", run)
    pump(client, server, Channel(random.Random(4), loss=0.05), cut_when=worker.poll, rate=50e6)
    assert server.error is None and client.error is None, (server.error, client.error)
    assert len(worker.threads) >= 4 and threading.get_ident() not in worker.threads
    assert True in journals and False in journals, journals     # checkpoints and batches of placed files
    assert snapshot(src, root_meta=False) == snapshot(dst, root_meta=False)
    assert not _staging_left(dst)


def test_a_receiver_killed_while_it_flushes_resumes_from_the_checkpoint_a_flush_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(parity_mod, "STRIPE_TARGET", 0.5)
    monkeypatch.setattr(receiver_mod, "PLACE_BATCH", 4)
    monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_INTERVAL", 0.02)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _many(src, random.Random(2))
    dst.mkdir()
    client, server = make_pair(tmp_path, True, src, dst)
    worker = Worker(server, release_after=1)
    pump(client, server, Channel(random.Random(5), loss=0.05), cut_after=3000, kill=True, rate=50e6,
         cut_when=worker.poll)
    worker.gate.set()                                   # (a real kill ends its threads too: here they finish)
    for future, _ in worker.pending:
        future.exception(30)
    kept = list(dst.glob(RECV_PREFIX + "*/checkpoint.json"))
    assert len(kept) == 1
    client, server = make_pair(tmp_path, True, src, dst)
    worker = Worker(server, release_after=1)
    pump(client, server, Channel(random.Random(6), loss=0.05), cut_when=worker.poll)
    assert server.error is None and client.error is None, (server.error, client.error)
    assert snapshot(src, root_meta=False) == snapshot(dst, root_meta=False)
    assert not _staging_left(dst)
    assert client.result["resumed_bytes"] > 0
