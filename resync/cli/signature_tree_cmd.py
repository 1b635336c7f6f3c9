import click

from .options import human, output_file


@click.command("signature-tree")
@click.argument("dst", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", "out", type=output_file, required=True, metavar="TREE.sig",
              help="Where to write the tree signature.")
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
def command(dst, out, verbose):
    """Describe directory DST (paths, modes, mtimes, sizes and a block
    signature of every file) for `pack --against`, so a bundle carries only
    what DST lacks.

    Example: resync signature-tree /backup/photos -o photos.sig
    """
    from ..bundle.pack import signature_tree
    entries, size = signature_tree(dst, out)
    if verbose:
        click.echo(f"signature-tree: {entries} entries, {human(size)} written to {out}", err=True)
