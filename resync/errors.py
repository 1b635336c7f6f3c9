"""resync's errors. Each class's docstring is its message template and each
carries its process exit code; only ``resync.cli.main`` turns them into exits.

Exit codes (documented in README.md):
  0 success · 1 internal error · 2 usage error · 3 file error ·
  4 invalid or corrupt resync file · 5 verification failed · 6 no space left ·
  7 damaged beyond repair (more lost shards than parity) ·
  10 connection failed or lost · 12 protocol error · 13 refused (trust:
  an unknown or changed server key, a client not allowed; no such module;
  read-only; busy) · 30 timed out ·
  23 partial transfer · 24 source files vanished · 25 deletion refused ·
  129 hangup (SIGHUP) · 130 interrupted (SIGINT) · 141 output closed (broken
  pipe) · 143 terminated (SIGTERM)
(23, 24 and 25 are rsync's codes for the same outcomes; 129, 130, 141 and 143 are
128 + the signal's number, as a shell reports a process the signal killed.)
"""


class ResyncError(Exception):
    """{}"""

    exit_code = 1

    def __str__(self) -> str:
        return (self.__doc__ or "{}").format(*self.args)


class InternalError(ResyncError):
    """internal error: {}"""

    exit_code = 1


class UsageError(ResyncError):
    """{}"""

    exit_code = 2


class FileError(ResyncError):
    """{}: {}"""

    exit_code = 3

    @classmethod
    def from_os(cls, path, exc: OSError) -> "FileError":
        return cls(path, exc.strerror or str(exc))


class FormatError(ResyncError):
    """{}: not a valid {} file: {}"""

    exit_code = 4


class VerificationError(ResyncError):
    """{}: {}"""

    exit_code = 5


class NoSpaceError(ResyncError):
    """{}: not enough space: {}"""

    exit_code = 6


class UnrecoverableError(ResyncError):
    """{}: cannot be recovered: {}"""

    exit_code = 7


class ConnectionFailed(ResyncError):
    """connection failed: {}"""

    exit_code = 10


class TimedOut(ResyncError):
    """timed out: {}"""

    exit_code = 30


class PartialTransferError(ResyncError):
    """{} of {} entries failed (messages above); the rest was transferred{}"""

    exit_code = 23


class PartialReadError(ResyncError):
    """{} of {} entries could not be read (messages above); {}"""

    exit_code = 23


class VanishedError(ResyncError):
    """{} source files vanished during the run; everything else was transferred"""

    exit_code = 24


class DeletionRefusedError(ResyncError):
    """deletion refused: {}"""

    exit_code = 25


class OutputClosed(BaseException):
    """Stdout went away (``resync sync -i ... | head``): the run stops at
    once, as a tool that SIGPIPE kills would, unwound like a Ctrl-C, and the
    CLI exits 128 + SIGPIPE's number with one line on stderr. Raised by the
    CLI's printers in place of BrokenPipeError: a BaseException, so no
    handler of a file's OSError (nor ``except Exception``) takes the closed
    output for that file's error."""

    exit_code = 141

    def __str__(self) -> str:
        return "output closed (broken pipe): stopped"


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130          # SIGINT; SIGTERM and SIGHUP: StopSignal


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived (a timeout, a service stop, a closed ssh
    session). Raised in the main thread by the CLI's handler; like a Ctrl-C it
    unwinds the run (temp files of unfinished copies removed, the history
    records a failed run), then the CLI exits 128 + the signal's number with
    one line. A BaseException, so no ``except Exception`` swallows it."""

    NAMES = {1: "hangup (SIGHUP)", 15: "terminated (SIGTERM)"}

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return self.NAMES.get(self.signum, f"stopped by signal {self.signum}")
