"""The ``resync`` command's entry point. Importing the CLI takes tens of
milliseconds; a Ctrl-C, SIGTERM or SIGHUP in that window ends with the same
line and exit code (130, 143, 129) as one during the run, not with a
traceback (nothing has started: nothing to clean up)."""
import os
import signal
import sys

_NAMES = {signal.SIGTERM: "terminated (SIGTERM)", signal.SIGHUP: "hangup (SIGHUP)"}


def _before_main(signum, _frame) -> None:
    sys.stderr.write(f"resync: error: {_NAMES.get(signum, signum)}\n")
    os._exit(128 + signum)


def main() -> None:
    for sig in _NAMES:                          # (resync.cli.main installs the run's own handlers)
        signal.signal(sig, _before_main)
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("resync: error: interrupted\n")
        raise SystemExit(130) from None
    run()
