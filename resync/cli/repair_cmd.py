import click

from .options import output_file, say


@click.command("repair")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, readable=False))
@click.option("-o", "--output", "out", type=output_file, required=True, metavar="FIXED",
              help="Where to write the repaired bundle (may be BUNDLE itself).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def command(bundle, out, quiet):
    """Rebuild every damaged or missing shard of BUNDLE from parity and write
    the whole bundle, byte-identical to how it was packed, to FIXED. Exit 7,
    writing nothing, if a stripe has more damaged shards than parity.

    Example: resync repair photos.bundle -o photos.fixed.bundle
    """
    from ..bundle.shards import open_bundle, rewrite
    from ..fs import atomic_output

    with open_bundle(bundle) as reader:
        with atomic_output(out) as ofd:
            rebuilt = rewrite(reader, ofd)
    if not quiet:
        say(f"repair: {rebuilt} shards rebuilt; {reader.layout.stripes} stripes written to {out}",
                   err=True)
