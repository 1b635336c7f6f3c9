"""The ``resync`` command's entry point. Importing the CLI takes tens of
milliseconds; a Ctrl-C in that window ends with the same line and exit code
(130, errors.EXIT_INTERRUPTED) as one during the run, not with a traceback."""
import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("resync: error: interrupted\n")
        raise SystemExit(130) from None
    run()
