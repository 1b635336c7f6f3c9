import click

from .options import history_options, human, json_option, recorded, say


@click.command("unpack")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, readable=False))
@click.argument("dst", type=click.Path(file_okay=False))
@json_option
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
@history_options
def command(bundle, dst, as_json, verbose, history_path, no_history):
    """Apply BUNDLE to directory DST: verify every shard, rebuild damaged
    ones from parity, check DST is in the state the bundle was made against,
    then replace files atomically. Refuses, touching nothing, when a stripe
    is damaged beyond its parity or DST has changed.

    Example: resync unpack photos.bundle /backup/photos
    """
    import json
    import sys

    from ..bundle.unpack import unpack
    from ..errors import PartialTransferError

    stats = recorded(not no_history, history_path, "unpack", bundle, dst,
                     lambda on_entry, on_file: unpack(bundle, dst, on_entry=on_entry, on_file=on_file))
    for message in stats.messages:
        say(f"resync: error: {message}", err=True)
    if as_json:
        sys.stdout.write(json.dumps(stats.as_dict(), sort_keys=True) + "\n")
    if verbose:
        say(f"unpack: {stats.files} files, {stats.dirs} dirs; {stats.files_transferred} written "
                   f"({human(stats.bytes_written)}, {human(stats.bytes_matched)} reused), {stats.created} "
                   f"created, {stats.updated} updated, {stats.deleted} deleted; {stats.repaired_shards} shards "
                   f"repaired in {stats.damaged_stripes} of {stats.stripes} stripes; {stats.duration:.2f} s",
                   err=True)
    if stats.errors:
        raise PartialTransferError(stats.errors, stats.files + stats.dirs + stats.symlinks + stats.specials, "")
