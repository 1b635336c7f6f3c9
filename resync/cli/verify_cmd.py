import click

from .options import history_options, json_option, say


@click.command("verify")
@click.argument("dst", type=click.Path(exists=True, readable=False))
@json_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@history_options
def command(dst, as_json, quiet, history_path, no_history):
    """Check a directory against its last recorded manifest, or a bundle's
    shards.

    A directory DST is re-hashed and compared with the manifest of the last
    sync or unpack into it: missing, extra and changed entries and corrupt
    files (content differs while size and mtime agree); exit 5 if anything
    differs.

    A bundle file has every shard checked: exit 0 if intact, 5 if damaged
    but repairable (resync repair), 7 if a stripe is damaged beyond its parity.

    Examples: resync verify /backup/photos; resync verify photos.bundle
    """
    import json
    import os
    import sys

    if not os.path.isdir(dst):
        return _verify_bundle(dst, as_json, quiet)

    from ..errors import VerificationError
    from ..store import History
    from ..store.schema import display_path, stored_path
    from ..verify import verify_tree

    history = History(history_path)
    history.merge(wait=5.0)
    dst = os.path.abspath(dst)
    # The run may have named the directory another way (through a symlink, or
    # the real path where DST is a symlink): same directory, same manifest.
    _, known = history.query("SELECT DISTINCT destination FROM runs WHERE manifest_run IS NOT NULL")
    names = [display_path(dst)] + [d for (d,) in known if d != display_path(dst) and _same_dir(d, dst)]
    _, rows = history.query("SELECT id, manifest_run FROM runs WHERE list_contains(?, destination) "
                            "AND manifest_run IS NOT NULL ORDER BY started DESC LIMIT 1", [names])
    if not rows:
        raise VerificationError(dst, "no recorded sync into this directory in the history")
    run_id, manifest_run = rows[0]
    manifest = history.rows("SELECT path, path_raw, kind, size, mtime_ns, mode, blake3 FROM manifests "
                            "WHERE run_id = ?", [manifest_run])
    report = verify_tree(dst, ((stored_path(path, raw), *rest) for path, raw, *rest in manifest))
    if as_json:
        sys.stdout.write(json.dumps({"run": run_id, **report.as_dict()}, sort_keys=True) + "\n")
    elif not quiet:
        for line in report.lines():
            say(line)
    if report.problems:
        raise VerificationError(dst, f"{report.problems} differences from the manifest of run {run_id[:12]} "
                                     f"({report.summary()})")
    if not as_json:
        say(f"verify: {report.checked} entries match run {run_id[:12]}", err=True)


def _same_dir(recorded: str, dst: str) -> bool:
    import os
    try:
        return os.path.samefile(recorded, dst)
    except (OSError, ValueError):
        return False


def _verify_bundle(path: str, as_json: bool, quiet: bool) -> None:
    import json
    import sys

    from ..bundle.shards import open_bundle
    from ..bundle.records import check_records, read_bundle
    from ..errors import UnrecoverableError, VerificationError

    with open_bundle(path) as reader:
        lay = reader.layout
        damaged = []
        for h in reader.health():
            if h.bad:
                damaged.append(h)
                if not quiet and not as_json:
                    bad = ", ".join(f"{'data' if i < lay.k else 'parity'} {i}" for i in h.bad)
                    state = "repairable" if h.repairable else "NOT repairable"
                    say(f"stripe {h.stripe}: {len(h.bad)} of {h.stored} shards bad ({bad}): {state}")
        fatal = [h for h in damaged if not h.repairable]
        if not fatal:                           # what unpack reads: trailer and every record
            stream, info = read_bundle(reader)
            check_records(stream, info, path)
        trailing = reader.trailing_bytes
    bad_shards = sum(len(h.bad) for h in damaged)
    summary = (f"{lay.stripes} stripes of RS({lay.k},{lay.m}) x {lay.shard_size} B, "
               f"{bad_shards} shards bad in {len(damaged)} stripes")
    if as_json:
        sys.stdout.write(json.dumps({
            "bundle_id": lay.bundle_id.hex(), "k": lay.k, "m": lay.m, "shard_size": lay.shard_size,
            "stripes": lay.stripes, "payload_bytes": lay.payload_len, "trailing_bytes": trailing,
            "entries": None if fatal else len(info.trailer.entries),
            "damaged": [{"stripe": h.stripe, "bad": list(h.bad), "repairable": h.repairable}
                        for h in damaged]}, sort_keys=True) + "\n")
    if fatal:
        raise UnrecoverableError(path, f"{summary}; {len(fatal)} stripes beyond repair")
    if damaged or trailing:
        extra = f", {trailing} bytes of trailing junk" if trailing else ""
        raise VerificationError(path, f"damaged but repairable ({summary}{extra}); run resync repair")
    if not quiet and not as_json:
        say(f"verify: {path}: intact ({summary}; {len(info.trailer.entries)} entries)", err=True)
