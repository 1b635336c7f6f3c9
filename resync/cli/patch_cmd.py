import click

from .options import existing_file, human, json_option, output_file, report, verbose_option


@click.command("patch")
@click.argument("basis", type=click.Path(dir_okay=False))
@click.argument("delta", type=existing_file())
@click.argument("out", type=output_file)
@json_option
@verbose_option
def command(basis, delta, out, as_json, verbose):
    """Apply DELTA to BASIS and write the result to OUT atomically.

    BASIS is checked against the signature the delta was made against, and the
    result against the delta's BLAKE3, before OUT is replaced. OUT may be BASIS.
    BASIS may be absent when the delta was made from an empty signature.

    Example: resync patch old.img new.delta new.img
    """
    from ..patch import apply_delta

    st = apply_delta(basis, delta, out)
    report(st.as_dict(), as_json, verbose,
           f"patch: {human(st.target_bytes)} written ({human(st.copied_bytes)} copied, "
           f"{human(st.literal_bytes)} literal)")
