import click

from .options import existing_file, human, json_option, output_file, report, verbose_option


@click.command("delta")
@click.argument("sig", type=existing_file())
@click.argument("new", type=existing_file())
@click.argument("delta", type=output_file)
@json_option
@verbose_option
def command(sig, new, delta, as_json, verbose):
    """Write to DELTA the instructions that turn the basis of SIG into NEW.

    An empty SIG file stands for an absent basis: the delta then carries all of NEW.

    Example: resync delta old.sig new.img new.delta --json
    """
    from ..delta import delta_file

    st = delta_file(sig, new, delta)
    report(st.as_dict(), as_json, verbose,
           f"delta: {human(st.target_bytes)} = {human(st.matched_bytes)} matched + "
           f"{human(st.literal_bytes)} literal -> {human(st.delta_bytes)} ({st.savings_pct:.1f}% saved)")
