"""resync's command line. Only this package imports click; command modules keep
their heavy imports (NumPy, Numba kernels) inside the command bodies so that
``resync --help`` starts fast and compiles nothing."""
from __future__ import annotations

import os
import signal
import sys

import click

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, OutputClosed, ResyncError, StopSignal
from .options import say
from . import (delta_cmd, history_cmd, id_cmd, pack_cmd, patch_cmd, peers_cmd, repair_cmd, serve_cmd,
               relay_cmd, signature_cmd, signature_tree_cmd, status_cmd, sync_cmd, transfer_cmd, unpack_cmd,
               verify_cmd)

_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())     # click >= 8.2
CONTEXT = dict(help_option_names=["-h", "--help"], auto_envvar_prefix="RESYNC")


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .. import __version__
    from ..kernels import native
    click.echo(f"resync {__version__}")
    click.echo(f"kernels: {native.describe()}")
    ctx.exit()


@click.group(context_settings=CONTEXT)
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and which kernels run, then exit.")
def cli() -> None:
    """resync: mirror directory trees (sync, also to and from resync://
    servers: serve, id, status, peers, transfer; relay), rsync-style file deltas (signature, delta, patch)
    and parity-protected offline bundles (signature-tree, pack, unpack,
    verify, repair).

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 file error, 4 invalid resync
    file, 5 verification failed, 6 no space, 7 damaged beyond repair, 10
    connection failed, 12 protocol error, 13 refused (trust, module, busy), 23
    partial transfer, 24 source files vanished, 25 deletion refused, 30 timed
    out, 129 hangup, 130 interrupted, 141 output closed, 143 terminated.
    """


cli.add_command(signature_cmd.command)
cli.add_command(delta_cmd.command)
cli.add_command(patch_cmd.command)
cli.add_command(sync_cmd.command)
cli.add_command(history_cmd.command)
cli.add_command(verify_cmd.command)
cli.add_command(signature_tree_cmd.command)
cli.add_command(pack_cmd.command)
cli.add_command(unpack_cmd.command)
cli.add_command(repair_cmd.command)
cli.add_command(id_cmd.command)
cli.add_command(serve_cmd.command)
cli.add_command(status_cmd.command)
cli.add_command(peers_cmd.command)
cli.add_command(transfer_cmd.group)
cli.add_command(relay_cmd.group)


def _fail(message: str, code: int) -> None:
    try:
        say(f"resync: error: {message}", err=True)
    finally:
        sys.exit(code)


def _output_closed() -> None:
    """Stdout went away: exit 141 (128 + SIGPIPE, as a shell shows a tool the
    signal killed) with one line on stderr when it can still be written."""
    error = OutputClosed()
    try:
        sys.stdout = open(os.devnull, "w")        # (the interpreter's final flush of stdout must not fail)
        say(f"resync: error: {error}", err=True)
    except OSError:
        pass
    sys.exit(error.exit_code)


def _stop(signum: int, _frame) -> None:
    """SIGTERM / SIGHUP: unwind the run like a Ctrl-C (once: a second stop
    signal must not interrupt the clean-up)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise StopSignal(signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns errors into one line on stderr plus
    the exit code documented in the README (never a traceback, unless
    RESYNC_DEBUG=1)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    # File names are bytes: print them as such (a name that is not UTF-8 would
    # otherwise stop an itemized run in a UTF-8 locale, whose stdout is strict).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        cli.main(args=argv, prog_name="resync", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except _NO_ARGS as exc:                                   # plain `resync`: the help, exit 2
        click.echo(exc.ctx.get_help())
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        # one line, like every other error: "resync: error: sync: Missing argument 'DST' (resync sync --help)"
        where = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and ctx.command_path:
            where = f" ({ctx.command_path} --help)"
        _fail(f"{exc.format_message()}{where}", exc.exit_code if exc.exit_code else EXIT_USAGE)
    except click.exceptions.Abort:
        _fail("interrupted", EXIT_INTERRUPTED)
    except StopSignal as exc:
        _fail(str(exc), exc.exit_code)
    except OutputClosed:
        _output_closed()
    except ResyncError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:                   # stdout closed (`... | head`): one line if stderr is still there
        _output_closed()
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if os.environ.get("RESYNC_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (RESYNC_DEBUG=1 shows a traceback)",
              EXIT_INTERNAL)
