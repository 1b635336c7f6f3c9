"""resync's errors. Each class's docstring is its message template and each
carries its process exit code; only ``resync.cli.main`` turns them into exits.

Exit codes (documented in README.md):
  0 success · 1 internal error · 2 usage error · 3 file error ·
  4 invalid or corrupt resync file · 5 verification failed · 6 no space left ·
  130 interrupted
"""


class ResyncError(Exception):
    """{}"""

    exit_code = 1

    def __str__(self) -> str:
        return (self.__doc__ or "{}").format(*self.args)


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


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
