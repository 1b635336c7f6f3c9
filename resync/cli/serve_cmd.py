import click

from .options import history_options, rate_option


def _load_config(path: str) -> dict:
    import tomllib

    from ..errors import FileError, UsageError
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise FileError.from_os(path, exc) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


CONFIG_KEYS = {"listen", "history", "allow", "bwlimit", "min_parity", "tcp", "modules", "api", "metrics",
               "max_transfers", "history_keep_days", "bytes_per_second", "shards_per_second", "max_sessions",
               "relay", "relay_allow", "relay_cap", "relay_max_hold", "relay_routes"}
MODULE_KEYS = {"path", "read_only", "allow"}


def _check_config(config: dict, path: str) -> None:
    """Every key known and of its type: a misspelt ``readonly`` must not
    leave a module writable without a word."""
    from ..errors import UsageError

    def ids(value, where):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise UsageError(f"{path}: {where} must be a list of device IDs, e.g. allow = [\"ID\"]")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
    if "allow" in config:
        ids(config["allow"], "allow")
    if "relay_allow" in config:
        ids(config["relay_allow"], "relay_allow")
    for key in ("relay_cap", "relay_max_hold"):
        if key in config and (not isinstance(config[key], (int, float)) or isinstance(config[key], bool)
                              or config[key] < 0):
            raise UsageError(f"{path}: {key} must be a number ({'bytes' if key == 'relay_cap' else 'seconds'}, 0 "
                             "for no limit)")
    for key in ("listen", "history", "api", "metrics", "relay"):
        if key in config and not isinstance(config[key], str):
            raise UsageError(f"{path}: {key} must be a string")
    modules = config.get("modules", {})
    if not isinstance(modules, dict):
        raise UsageError(f"{path}: modules must be tables: [modules.NAME]")
    for name, m in modules.items():
        if not isinstance(m, dict):
            raise UsageError(f"{path}: modules.{name} must be a table: [modules.{name}]")
        if not name or "/" in name:
            raise UsageError(f"{path}: module name {name!r} must be non-empty, without '/'")
        unknown = sorted(set(m) - MODULE_KEYS)
        if unknown:
            raise UsageError(f"{path}: unknown key {unknown[0]!r} in [modules.{name}] "
                             f"(known: {', '.join(sorted(MODULE_KEYS))})")
        if "allow" in m:
            ids(m["allow"], f"modules.{name}.allow")
        if not isinstance(m.get("path", ""), str) or not isinstance(m.get("read_only", False), bool):
            raise UsageError(f"{path}: modules.{name}: path must be a string, read_only true or false")


def _relay(config: dict, spool: str | None, allow: tuple, cap: int | None, routes: tuple = ()):
    """The relaying settings (net.server.RelaySettings) from the flags and the
    config file, or None when the daemon does not relay."""
    import os

    from ..errors import UsageError
    from ..identity import parse_device_id
    from ..net.server import RelaySettings
    directory = spool or config.get("relay")
    if not directory:
        if allow:
            raise UsageError("--relay-allow needs --relay DIR (the spool)")
        return None
    allowed = frozenset(parse_device_id(i) for i in list(config.get("relay_allow", [])) + list(allow))
    if not allowed:
        raise UsageError("relaying: no device allowed (--relay-allow DEVICE-ID, or relay_allow = [...])")
    from ..net.relaying import parse_route
    specs = list(config.get("relay_routes", [])) + list(routes)
    if not all(isinstance(x, str) for x in specs):
        raise UsageError("relay_routes must be a list of \"DEVICE-ID=resync://HOST[:PORT][@PEER-ID]\" strings")
    return RelaySettings(os.path.abspath(directory), allowed, int(cap if cap is not None else config.get("relay_cap", 0)),
                         int(config.get("relay_max_hold", 0) * 1000), tuple(parse_route(x) for x in specs))


def _modules(config: dict, flags: tuple, read_only: tuple, allow: tuple, relaying: bool = False) -> dict:
    """Modules from the config file and the flags; every client ID checked."""
    import os

    from ..errors import UsageError
    from ..identity import parse_device_id
    from ..protocol.session import Module
    default_allow = [parse_device_id(i) for i in list(config.get("allow", [])) + list(allow)]
    out = {}
    for name, m in (config.get("modules") or {}).items():
        if not isinstance(m, dict) or "path" not in m:
            raise UsageError(f"module {name!r}: needs a path")
        ids = [parse_device_id(i) for i in m.get("allow", [])] or default_allow
        out[name] = Module(name, os.path.abspath(m["path"]), bool(m.get("read_only", False)), ids)
    for spec in flags:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "/" in name:
            raise UsageError(f"--module {spec!r}: expected NAME=PATH")
        out[name] = Module(name, os.path.abspath(path), name in read_only, default_allow)
    unknown = set(read_only) - set(out)
    if unknown:
        raise UsageError(f"--read-only {sorted(unknown)[0]!r}: no such module")
    if not out and not relaying:
        raise UsageError("nothing to serve: give --module NAME=PATH (or --relay DIR) or a --config file with "
                         "[modules]")
    for m in out.values():
        if not os.path.isdir(m.path):
            raise UsageError(f"module {m.name!r}: {m.path} is not a directory")
        if not m.allowed:
            raise UsageError(f"module {m.name!r}: no client allowed (--allow DEVICE-ID, or allow = [...])")
    return out


@click.command("serve")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Address to listen on (default 0.0.0.0:8730, or the config's listen).")
@click.option("--module", "modules", multiple=True, metavar="NAME=PATH",
              help="Offer directory PATH as module NAME; repeatable.")
@click.option("--read-only", "read_only", multiple=True, metavar="NAME",
              help="Clients may only pull from module NAME; repeatable.")
@click.option("--allow", multiple=True, metavar="DEVICE-ID",
              help="A client allowed on the modules given by --module (and on config modules without "
                   "their own allow list); repeatable.")
@click.option("--bwlimit", callback=rate_option, default=None, metavar="RATE",
              help="Bytes per second each pull may send (K/M/G suffixes); a client's --bwlimit may lower it.")
@click.option("--min-parity", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Parity shards per full stripe (128-240 data shards) at least, whatever the measured loss (default 1).")
@click.option("--max-transfers", type=click.IntRange(0), default=None, metavar="N",
              help="Transfers running at once at most; more are told the server is busy and retry (default 0: "
                   "no cap).")
@click.option("--relay", "relay_spool", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Relay sealed envelopes (docs/relay.md), kept in the spool DIR: devices given by --relay-allow "
                   "hand theirs over and collect what is held for them.")
@click.option("--relay-allow", multiple=True, metavar="DEVICE-ID",
              help="A device allowed to use the relay; repeatable.")
@click.option("--relay-cap", callback=None, type=click.IntRange(0), default=None, metavar="BYTES",
              help="Bytes the relay holds at most; more is refused as 'storage depleted' (default 0: the "
                   "disk's free space less 64 MiB).")
@click.option("--relay-route", "relay_routes", multiple=True, metavar="TO=resync://HOST[:PORT][@PEER-ID]",
              help="Where the relay hands envelopes for device TO (a device ID, or * for any other) next: a node "
                   "it calls, which must prove to be PEER-ID (default: TO itself); repeatable.")
@click.option("--no-tcp", is_flag=True,
              help="Offer QUIC only (by default TLS over TCP is offered on the same port number too).")
@click.option("--api", "api_address", default=None, metavar="HOST:PORT",
              help="Where the HTTP API listens (default 127.0.0.1:8731; every route but /health needs the "
                   "key in the config directory's api-key; docs/api.md).")
@click.option("--no-api", is_flag=True, help="No HTTP API (and no metrics).")
@click.option("--metrics", "metrics_address", default=None, metavar="HOST:PORT",
              help="Also serve /metrics alone here, without the API key (for Prometheus).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A TOML file: listen, history, history_keep_days, allow, bwlimit, min_parity, max_transfers, tcp, "
                   "api, metrics, bytes_per_second, shards_per_second, max_sessions, relay, relay_allow, "
                   "relay_cap, relay_max_hold (s), relay_routes, [modules.NAME] path / read_only / allow. SIGHUP reads it again.")
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where this server's key, API key and own transfers (sessions/) live (default: "
                   "$XDG_CONFIG_HOME/resync).")
@history_options
def command(listen, modules, read_only, allow, bwlimit, min_parity, max_transfers, relay_spool, relay_allow,
            relay_cap, relay_routes, no_tcp, api_address, no_api, metrics_address, config_path, config_dir, history_path,
            no_history):
    """Serve directories to resync clients over QUIC and TLS over TCP, in the foreground
    (for systemd or cron): one line per connection on stderr; SIGTERM stops
    it, checkpointing transfers in flight (their clients resume them); SIGHUP
    reads the config file and the modules again (transfers running go on).

    Example: resync serve --listen 0.0.0.0:8730 --module backup=/srv/backup --allow CLIENT-ID
    """
    import asyncio
    from pathlib import Path

    from ..errors import UsageError
    from ..identity import load_identity
    from ..net import DEFAULT_PORT
    from ..net.server import Settings, serve

    def settings() -> tuple[Settings, dict]:
        """The config file and the flags, checked (UsageError, FileError)."""
        config = _load_config(config_path) if config_path else {}
        if config_path:
            _check_config(config, config_path)
        relay = _relay(config, relay_spool, relay_allow, relay_cap, relay_routes)
        mods = _modules(config, modules, read_only, allow, relay is not None)
        rate = bwlimit
        if rate is None and config.get("bwlimit") is not None:
            from .options import parse_rate
            try:
                rate = parse_rate(config["bwlimit"])
            except ValueError as exc:
                raise UsageError(f"{config_path}: bwlimit {exc}") from None
        parity = min_parity
        if parity is None:
            parity = config.get("min_parity", 1)
            if not isinstance(parity, int) or isinstance(parity, bool) or not 1 <= parity <= 64:
                raise UsageError(f"{config_path}: min_parity must be a whole number from 1 to 64")
        cap = max_transfers
        if cap is None:
            cap = config.get("max_transfers", 0)
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
                raise UsageError(f"{config_path}: max_transfers must be a whole number, 0 for no cap")
        total = {}
        for key in ("bytes_per_second", "shards_per_second"):
            value = config.get(key, 0)
            if key == "bytes_per_second" and isinstance(value, str):
                from .options import parse_rate
                try:
                    value = parse_rate(value)
                except ValueError as exc:
                    raise UsageError(f"{config_path}: {key} {exc}") from None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{config_path}: {key} must be a number, 0 for no limit")
            total[key] = float(value)
        sessions = config.get("max_sessions", 4)
        if not isinstance(sessions, int) or isinstance(sessions, bool) or not 1 <= sessions <= 1000:
            raise UsageError(f"{config_path}: max_sessions must be a whole number from 1 to 1000")
        keep = config.get("history_keep_days", 0)
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or keep < 0:
            raise UsageError(f"{config_path}: history_keep_days must be a number of days, 0 to keep everything")
        return Settings(mods, rate or 0, parity, cap, float(keep), total["bytes_per_second"],
                        total["shards_per_second"], sessions, relay), config
    first, config = settings()
    host, port = _address(listen or config.get("listen") or f"0.0.0.0:{DEFAULT_PORT}",
                          "--listen" if listen else f"{config_path}: listen")
    tcp = config.get("tcp", True)
    if not isinstance(tcp, bool):
        raise UsageError(f"{config_path}: tcp must be true or false")
    identity = load_identity(Path(config_dir) if config_dir else None, create=True)
    from ..identity import config_dir as default_dir
    directory = Path(config_dir) if config_dir else default_dir()
    api = None
    if not no_api:
        from ..identity import load_api_key
        from ..net.api import DEFAULT_PORT as API_PORT
        from ..net.server import ApiOptions
        asked = api_address or config.get("api")
        api_host, api_port = _address(asked or f"127.0.0.1:{API_PORT}", "--api" if api_address else f"{config_path}: api")
        metrics = metrics_address or config.get("metrics")
        api = ApiOptions(load_api_key(directory, create=True), api_host, api_port, bool(asked), directory,
                         _address(metrics, "--metrics" if metrics_address else f"{config_path}: metrics")
                         if metrics else None)
    elif metrics_address:
        raise UsageError("--metrics needs the API (not --no-api)")
    history = None
    if not no_history:
        from ..store import default_path
        history = history_path or config.get("history") or str(default_path())
    _prepare_kernels()
    asyncio.run(serve(host, port, first, identity, history, tcp=tcp and not no_tcp, api=api,
                      reload=lambda: settings()[0], state_dir=directory))


def _address(value: str, where: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 address in brackets) as (host, port); an empty host is 0.0.0.0."""
    from ..errors import UsageError
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{where} {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _prepare_kernels() -> None:
    """Build this machine's delta kernels before listening, saying so: built
    on first use, inside a transfer, they held its first delta ~20 s with no
    word to either side."""
    import time

    from ..kernels import native
    from ..net.server import log
    if native.mode() != "native" or native.library_path().exists():
        return
    log("building the delta kernels for this machine before listening (once; ~30 s)")
    started = time.monotonic()
    status = native.status()                    # (builds it)
    log(f"kernels ready after {time.monotonic() - started:.0f} s: {status}")
