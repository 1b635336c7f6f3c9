import click

from .options import say


@click.command("id")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the key lives (default: $XDG_CONFIG_HOME/resync, ~/.config/resync).")
def command(config_dir):
    """Print this machine's device ID (made once: an Ed25519 key and a
    self-signed certificate, mode 0600, in the config directory).

    Give it to the other side: a server allows clients by their IDs
    (--allow), a client pins a server's (--peer-id or known_peers).

    Example: resync id
    """
    from pathlib import Path

    from ..identity import load_identity
    identity = load_identity(Path(config_dir) if config_dir else None, create=True)
    say(identity.device_id)
