import click

from .options import human, output_file, say


@click.command("signature-tree")
@click.argument("dst", type=click.Path(file_okay=False, exists=True, readable=False))
@click.option("-o", "--output", "out", type=output_file, required=True, metavar="TREE.sig",
              help="Where to write the tree signature.")
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
def command(dst, out, verbose):
    """Describe directory DST (paths, modes, mtimes, sizes and a block
    signature of every file) for `pack --against`, so a bundle carries only
    what DST lacks. What cannot be read is reported, marked in the signature,
    and the rest is written (exit 23).

    Example: resync signature-tree /backup/photos -o photos.sig
    """
    from ..bundle.pack import signature_tree
    from ..errors import PartialReadError
    entries, size, problems = signature_tree(dst, out)
    for message in problems:
        say(f"resync: error: {message}", err=True)
    if verbose:
        say(f"signature-tree: {entries} entries, {human(size)} written to {out}", err=True)
    if problems:
        raise PartialReadError(len(problems), entries, "they are marked so in the tree signature (pack sends "
                                                       "such files whole and leaves such directories alone)")
