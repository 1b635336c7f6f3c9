import click

from .options import say


@click.command("id")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the key lives (default: $XDG_CONFIG_HOME/resync, ~/.config/resync).")
@click.option("--rotate", is_flag=True,
              help="Make a new key (the old one kept beside it as key.pem.old-STAMP); print both IDs and "
                   "what the peers must change.")
@click.option("--card", is_flag=True,
              help="Print this machine's card instead: its device key and its exchange key (X25519, made "
                   "once), signed, in one line of base64 — what a source needs to seal envelopes to it "
                   "(docs/relay.md); checked against its device ID wherever it is used.")
def command(config_dir, rotate, card):
    """Print this machine's device ID (made once: an Ed25519 key and a
    self-signed certificate, mode 0600, in the config directory).

    Give it to the other side: a server allows clients by their IDs
    (--allow), a client pins a server's (--peer-id or known_peers).

    Example: resync id
    """
    from pathlib import Path

    from ..identity import load_identity, rotate_identity
    directory = Path(config_dir) if config_dir else None
    if card and rotate:
        from ..errors import UsageError
        raise UsageError("--card and --rotate: one at a time")
    if card:
        from ..relay.keys import load_exchange_key, make_card
        say(make_card(load_identity(directory, create=True), load_exchange_key(directory, create=True)).text())
        return
    if not rotate:
        say(load_identity(directory, create=True).device_id)
        return
    old, new, kept = rotate_identity(directory)
    say(f"old device ID: {old}")
    say(f"new device ID: {new}")
    say(f"(the old key: {kept})")
    say("Tell the peers, before this machine's next transfer:")
    say(f"  servers that allow it: replace {old} by {new} in their --allow or allow = [...], then")
    say("    reload them (SIGHUP: systemctl reload resync-serve)")
    say(f"  clients that pin it as a server: replace {old} by {new} on its line of their known_peers")
    say("    (or run once with --peer-id NEW); a running `resync serve` here uses the new key after a restart")
