"""How many threads the kernels may use (they release the GIL), and the life
of the processes resync forks (copy workers, the source lister).

A child must never outlive the run that started it: killed parents (SIGKILL
from the OOM killer, a timeout's SIGTERM, the SIGHUP of a closed ssh session)
used to leave forked children blocked for good on a pipe, holding descriptors
on the destination. So every child asks the kernel to kill it when its parent
dies (PR_SET_PDEATHSIG), and leaves the stop signals to its parent, which
cleans up (its temp files, its children) and exits with one line."""
import os
import signal

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
_PR_SET_PDEATHSIG = 1           # <linux/prctl.h>


def thread_count() -> int:
    """RESYNC_THREADS if set, else the CPUs this process may run on (max 16)."""
    env = os.environ.get("RESYNC_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def split(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Cut range(total) into at most ``parts`` contiguous [lo, hi) pieces whose
    inner boundaries are multiples of ``align``."""
    if total <= 0:
        return []
    step = -(-total // parts)
    step = -(-step // align) * align
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


def block_stop_signals() -> set:
    """Hold the stop signals off (around a fork, so that a child cannot take one
    before it ignores them); returns the previous mask for ``restore_signals``."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def restore_signals(mask) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def child_started(parent: int, mask) -> None:
    """In a child forked by process ``parent`` with the stop signals blocked
    (``mask``: the mask before): ignore the stop signals (the parent handles
    them for the whole run), die with the parent, then unblock. If the parent
    is already gone, leave at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass                    # not Linux: the pipes' EOF still ends the children
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    restore_signals(mask)
