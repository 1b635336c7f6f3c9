import click

from .options import history_options, human, json_option, output_file, recorded, say


def _parity(ctx, param, value):
    try:
        k, m = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("expected K,M (for example 50,10)") from None
    return k, m


@click.command("pack")
@click.argument("src", type=click.Path(file_okay=False, exists=True, readable=False))
@click.option("-o", "--output", "out", type=output_file, required=True, metavar="BUNDLE",
              help="Where to write the bundle.")
@click.option("--against", type=click.Path(dir_okay=False, exists=True, readable=False), default=None, metavar="TREE.sig",
              help="Tree signature of the destination (resync signature-tree): carry only what it "
                   "lacks, as deltas, plus deletions. Without it, everything travels.")
@click.option("--parity", default="50,10", show_default=True, callback=_parity, metavar="K,M",
              help="Reed-Solomon stripes of K data and M parity shards: any M damaged or lost "
                   "shards per stripe are repaired.")
@click.option("--shard-size", type=click.IntRange(min=64), default=64 << 10, show_default=True,
              metavar="BYTES", help="Shard size (a multiple of 64; small bundles use less).")
@click.option("-S", "--sparse", is_flag=True,
              help="Store blocks of zeros as holes too (a file's own holes are never stored); "
                   "unpack writes them as holes.")
@json_option
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
@history_options
def command(src, out, against, parity, shard_size, sparse, as_json, verbose, history_path, no_history):
    """Write tree SRC as one self-verifying, self-repairing bundle file for
    offline transport (like rsync --write-batch, with parity).

    Example: resync pack photos/ --against photos.sig -o photos.bundle
    """
    import json
    import sys

    from ..bundle.pack import pack
    from ..errors import PartialTransferError, VanishedError

    k, m = parity
    stats = recorded(not no_history, history_path, "pack", src, out,
                     lambda on_entry, on_file: pack(src, out, against, k, m, shard_size,
                                                    on_entry=on_entry, on_file=on_file, sparse=sparse))
    for message in stats.messages:
        say(f"resync: error: {message}", err=True)
    if as_json:
        sys.stdout.write(json.dumps(stats.as_dict(), sort_keys=True) + "\n")
    if verbose:
        say(f"pack: {stats.files} files, {stats.dirs} dirs ({human(stats.bytes_scanned)}); "
                   f"{stats.whole_files} whole, {stats.delta_files} as deltas, {stats.unchanged} unchanged, "
                   f"{stats.deleted} deletions; payload {human(stats.payload_bytes)}, bundle "
                   f"{human(stats.bundle_bytes)} in {stats.stripes} stripes of RS({k},{m}) x "
                   f"{human(stats.shard_size)}; {stats.duration:.2f} s", err=True)
    if stats.errors:
        raise PartialTransferError(stats.errors, stats.files + stats.dirs + stats.symlinks + stats.specials,
                                   " into the bundle")
    if stats.vanished:
        raise VanishedError(stats.vanished)
