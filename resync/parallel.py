"""How many threads the kernels may use (they release the GIL)."""
import os


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
