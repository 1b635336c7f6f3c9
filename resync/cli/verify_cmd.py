import click

from .options import history_options, json_option


@click.command("verify")
@click.argument("dst", type=click.Path(file_okay=False, exists=True))
@json_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@history_options
def command(dst, as_json, quiet, history_path, no_history):
    """Re-hash DST and compare it with the manifest of the last sync into it.

    Reports missing, extra and changed entries and corrupt files (content
    differs while size and mtime agree); exit code 5 if anything differs.

    Example: resync verify /backup/photos
    """
    import json
    import os
    import sys

    from ..errors import VerificationError
    from ..store import History
    from ..verify import verify_tree

    history = History(history_path)
    history.merge(wait=5.0)
    dst = os.path.abspath(dst)
    _, rows = history.query("SELECT id, manifest_run FROM runs WHERE destination = ? AND manifest_run IS NOT NULL "
                            "ORDER BY started DESC LIMIT 1", [dst])
    if not rows:
        raise VerificationError(dst, "no recorded sync into this directory in the history")
    run_id, manifest_run = rows[0]
    _, manifest = history.query("SELECT path, kind, size, mtime_ns, mode, blake3 FROM manifests "
                                "WHERE run_id = ?", [manifest_run])
    report = verify_tree(dst, manifest)
    if as_json:
        sys.stdout.write(json.dumps({"run": run_id, **report.as_dict()}, sort_keys=True) + "\n")
    elif not quiet:
        for line in report.lines():
            click.echo(line)
    if report.problems:
        raise VerificationError(dst, f"{report.problems} differences from the manifest of run {run_id[:12]} "
                                     f"({report.summary()})")
    if not as_json:
        click.echo(f"verify: {report.checked} entries match run {run_id[:12]}", err=True)
