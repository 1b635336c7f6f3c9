import click

from .options import existing_file, human, json_option, output_file, report, verbose_option


@click.command("signature")
@click.argument("basis", type=existing_file())
@click.argument("sig", type=output_file)
@click.option("-b", "--block-size", type=click.IntRange(8, 1 << 20), default=None, metavar="BYTES",
              help="Block length (default: about sqrt(file length), 700 B .. 128 KiB).")
@click.option("-S", "--strong-len", type=click.IntRange(16, 32), default=16, show_default=True,
              metavar="BYTES", help="Bytes of keyed BLAKE3 kept per block.")
@json_option
@verbose_option
def command(basis, sig, block_size, strong_len, as_json, verbose):
    """Write the signature of BASIS to SIG.

    Example: resync signature old.img old.sig
    """
    from ..signature import signature_file

    s, size = signature_file(basis, sig, block_size, strong_len)
    stats = {"basis_bytes": s.file_len, "block_len": s.block_len, "blocks": s.count,
             "strong_len": s.strong_len, "signature_bytes": size}
    report(stats, as_json, verbose,
           f"signature: {human(s.file_len)} in {s.count} blocks of {s.block_len} B -> {human(size)}")
