"""``resync relay``: trees mirrored by sealed envelopes (docs/relay.md),
carried on a disk (sneakernet) or handed to a relay (``resync serve
--relay``) that holds them until the destination collects them."""
import click

from .daemon import with_api
from .options import say

PRIORITIES = ("critical", "high", "normal")


def _duration_ms(ctx, param, value):
    from .options import duration_option
    seconds = duration_option(ctx, param, value)
    return None if seconds is None else int(seconds * 1000)


@click.group("relay")
def group():
    """Mirror a tree to a device that is never online with this one, by sealed
    envelopes (signed here, encrypted to that device: docs/relay.md) carried
    in a directory — a removable disk, a shared folder.

    Exit codes: 0 ok, 2 usage (a bad card, a device not allowed, a path out
    of a module), 3 file error, 4 an envelope that is not whole or not this
    device's, 5 the destination changed since the generation it was built
    for was applied (nothing applied).
    """


def _is_url(text: str) -> bool:
    return text[:9].lower() == "resync://"


SPOOL_WAIT = 60.0                # s a command waits for another holding the spool


def _spool(d, directory=None):
    """This machine's own spool (envelopes waiting for a relay, or collected
    from one), or the spool ``directory`` (a relay's: refused while its
    daemon runs)."""
    from ..store.spool import Spool
    return Spool(directory or d / "relay" / "spool", lock_wait=SPOOL_WAIT if directory is None else 0)


def _call(url: str, identity, spool, peer_id, deposit: bool, collect: bool, retry_for: float) -> dict:
    """One exchange with the relay at ``url`` (relay.node.call), said on stderr when retried."""
    from ..net.url import parse_relay_url
    from ..relay.node import call
    result, _, _ = call(parse_relay_url(url), identity, spool, peer_id=peer_id, deposit=deposit, collect=collect,
                        known_peers=None, retry_for=retry_for,
                        on_retry=lambda why, wait: say(f"relay: {why}; trying again in {wait:.0f} s", err=True))
    return result


_config_option = click.option("--config-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                              help="This machine's keys and relay state (default: $XDG_CONFIG_HOME/resync).")
_peer_option = click.option("--peer-id", default=None, metavar="DEVICE-ID",
                            help="The relay's device ID (for a resync:// relay; else known_peers).")
_retry_option = click.option("--retry-for", type=click.FloatRange(0), default=60.0, show_default=True,
                             metavar="SECONDS", help="How long a lost connection to the relay is retried.")


@group.command("send")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out")
@click.option("--to", "card_text", required=True, metavar="CARD",
              help="The destination's card (`resync id --card` there), or @FILE holding it.")
@click.option("--to-id", "device", required=True, metavar="DEVICE-ID",
              help="The destination's device ID, as you have checked it with its owner: the card must be its.")
@click.option("--as", "name", required=True, metavar="MODULE[/PATH]",
              help="Where the tree goes at the destination (its module, a path in it).")
@click.option("--priority", type=click.Choice(PRIORITIES), default="normal", show_default=True)
@click.option("--ttl", callback=_duration_ms, default="30d", show_default=True, metavar="DURATION",
              help="The envelope's lifetime (relays and the destination refuse it after).")
@_config_option
@_peer_option
@_retry_option
@click.option("--json", "as_json", is_flag=True, help="What was sealed, as JSON on stdout.")
def send_cmd(src, out, card_text, device, name, priority, ttl, config_dir, peer_id, retry_for, as_json):
    """Seal the next generation of tree SRC for a device into OUT: what changed
    since the last generation sent to it, signed with this machine's key and
    encrypted to that device. OUT is a directory (made if absent: carry it
    there and run `resync relay receive`) or a relay, resync://HOST[:PORT]
    (`resync serve --relay`), which holds it until the device collects it.
    Handed to a relay, the envelope waits in this machine's spool until the
    relay has acknowledged it whole; an unreachable relay leaves it there
    (exit 10), and the next send to it hands it over too.

    Examples: resync relay send photos/ /media/usb/resync --to @site-b.card --to-id SITE-B-ID --as backup/photos

              resync relay send photos/ resync://relay.example:8730 --peer-id RELAY-ID --to @site-b.card ...
    """
    import json
    import time
    from pathlib import Path

    from ..fs import write_durable
    from ..identity import config_dir as default_dir
    from ..identity import load_identity
    from ..relay.keys import parse_card
    from ..relay.trees import Outbox
    if card_text.startswith("@"):
        try:
            card_text = Path(card_text[1:]).read_text()
        except OSError as exc:
            from ..errors import FileError
            raise FileError.from_os(card_text[1:], exc) from None
    card = parse_card(card_text, expect=device)
    module, _, path = name.strip("/").partition("/")
    d = Path(config_dir) if config_dir else default_dir()
    from ..relay.keys import load_exchange_key, make_card
    identity = load_identity(d, create=True)
    outbox = Outbox(d / "relay" / "outbox", identity, make_card(identity, load_exchange_key(d, create=True)))
    now = int(time.time() * 1000)
    if _is_url(out):
        spool = _spool(d)                       # (first: a generation is committed only once it is kept)
        sealed = outbox.seal(src, card, module, path, priority=priority, now=now, ttl=ttl, store=spool.put)
        r = _call(out, outbox.identity, spool, peer_id, deposit=True, collect=False, retry_for=retry_for)
        result = {"envelope": sealed.id.hex(), "generation": sealed.generation, "bytes": len(sealed.data),
                  "relay": out, "to": card.device_id, "as": name, "handed_over": r.get("handed_over", 0),
                  "refused": r.get("refusals", []), "waiting": len(spool.index)}
        if as_json:
            say(json.dumps(result, sort_keys=True))
        else:
            say(f"relay: generation {sealed.generation} of {src} for {card.device_id} as {name}: handed "
                f"{r.get('handed_over', 0)} envelopes to {out}; {len(spool.index)} waiting here")
            for x in r.get("refusals", []):
                say(f"relay: {x['id'][:16]} refused by the relay: {x['reason']}: {x['detail']}")
        return
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    written = []

    def store(raw: bytes) -> None:
        from ..relay.envelope import parse
        written.append(target / f"{parse(raw).id.hex()}.env")
        write_durable(written[0], raw)
    sealed = outbox.seal(src, card, module, path, priority=priority, now=now, ttl=ttl, store=store)
    file = written[0]
    result = {"envelope": sealed.id.hex(), "generation": sealed.generation, "bytes": len(sealed.data),
              "file": str(file), "to": card.device_id, "as": name}
    if as_json:
        say(json.dumps(result, sort_keys=True))
    else:
        say(f"relay: generation {sealed.generation} of {src} for {card.device_id} as {name}: {file} "
            f"({len(sealed.data)} bytes)")


@group.command("receive")
@click.argument("directory")
@click.option("--module", "modules", multiple=True, metavar="NAME=PATH",
              help="A local directory envelopes may write, as module NAME; repeatable.")
@click.option("--allow", "allowed", multiple=True, metavar="DEVICE-ID",
              help="A source allowed to write the modules; repeatable.")
@_config_option
@_peer_option
@_retry_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per envelope on stdout.")
def receive_cmd(directory, modules, allowed, config_dir, peer_id, retry_for, as_json):
    """Apply the envelopes in DIRECTORY that are sealed to this machine, in
    each tree's order: the next generation is applied (as `resync unpack`
    applies a bundle), one already applied or older is a replay (nothing
    touched), a later one waits here until the one before it arrives.
    DIRECTORY may be a relay, resync://HOST[:PORT]: what it holds for this
    machine is collected first (its mailbox), into this machine's spool.

    Examples: resync relay receive /media/usb/resync --module backup=/srv/backup --allow SITE-A-ID

              resync relay receive resync://relay.example:8730 --peer-id RELAY-ID --module backup=/srv/backup ...
    """
    import os
    import time
    from pathlib import Path

    from ..errors import ResyncError, UsageError
    from ..identity import config_dir as default_dir
    from ..identity import load_identity, parse_device_id
    from ..relay.envelope import EnvelopeError, parse
    from ..relay.guard import PARK, Chains
    from ..relay.keys import key_hash, load_exchange_key, make_card
    from ..fs import write_durable
    from ..relay.trees import Inbox, Outbox, module_places
    from ..store.guard import GuardStore
    d = Path(config_dir) if config_dir else default_dir()
    identity = load_identity(d, create=True)
    if not _is_url(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory}: not a directory (nor a relay's resync://HOST[:PORT])")
    exchange = load_exchange_key(d, create=True)
    card = make_card(identity, exchange)
    mods = {}
    for spec in modules:
        n, sep, p = spec.partition("=")
        if not sep or not n or not p or not os.path.isdir(p):
            raise UsageError(f"--module {spec!r}: expected NAME=PATH of an existing directory")
        mods[n] = os.path.abspath(p)
    who = {parse_device_id(a) for a in allowed}
    inbox = Inbox(identity, exchange, card, Chains(GuardStore(d / "relay" / "applied")),
                  module_places(mods, {n: who for n in mods}), Outbox(d / "relay" / "outbox", identity))
    parked_dir = d / "relay" / "parked"
    parked_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mine = key_hash(card.signing)
    now = int(time.time() * 1000)
    for file in sorted(parked_dir.glob("*.env")):          # a parked envelope whose lifetime ended is gone
        try:
            expired = parse(file.read_bytes()).header.expires <= now
        except (OSError, EnvelopeError):
            expired = True
        if expired:
            file.unlink(missing_ok=True)
            _said(as_json, {"file": str(file), "verdict": "expired",
                            "why": "it waited here for the generation before it past its lifetime"})
    spool = None
    if _is_url(directory):
        spool = _spool(d)
        _call(directory, identity, spool, peer_id, deposit=True, collect=True, retry_for=retry_for)
        candidates = [spool.envelopes / h.id for h in spool.due(destination=mine.hex())]
    else:
        candidates = sorted(Path(directory).rglob("*.env"))
    candidates += sorted(parked_dir.glob("*.env"))
    worst: ResyncError | None = None
    seen = set()
    for file in candidates:
        try:
            data = file.read_bytes()
            env = parse(data)
        except (OSError, EnvelopeError) as exc:
            worst = worst or EnvelopeError(f"{file}: {exc}")
            _said(as_json, {"file": str(file), "verdict": "invalid", "why": str(exc)})
            continue
        if env.header.destination != mine or env.id in seen:
            continue                            # (another device's, or the same envelope twice)
        seen.add(env.id)
        try:
            r = inbox.receive(data, now)
        except ResyncError as exc:
            from ..net.relaying import final_refusal
            worst = worst or exc
            kept = not final_refusal(exc)       # (a full disk, a module not given: kept for the next receive)
            if spool is not None and file.parent == spool.envelopes and not kept:
                spool.remove(env.id.hex(), "refused")          # (its source is told by the receipt)
            _said(as_json, {"file": str(file), "envelope": env.id.hex(), "verdict": "kept" if kept else "refused",
                            "why": str(exc)})
            continue
        if r.verdict == PARK and file.parent != parked_dir:
            write_durable(parked_dir / (env.id.hex() + ".env"), data)     # (before the spool's copy goes)
        elif r.verdict != PARK and file.parent == parked_dir:
            file.unlink(missing_ok=True)
        if spool is not None and file.parent == spool.envelopes:
            spool.remove(env.id.hex(), {"apply": "applied", "park": "parked"}.get(r.verdict, r.verdict))
        _said(as_json, {"file": str(file), "envelope": env.id.hex(), "generation": env.header.generation,
                        "verdict": r.verdict, "why": r.why, "applied": [g for g, _ in r.applied]})
    # the receipts to the sources: back on the same disk, or handed to the relay
    if inbox.receipts:
        if spool is not None:
            for raw in inbox.receipts:
                spool.put(raw)
            _call(directory, identity, spool, peer_id, deposit=True, collect=False, retry_for=retry_for)
        else:
            for raw in inbox.receipts:
                write_durable(Path(directory) / f"{parse(raw).id.hex()}.env", raw)
    # a parked copy that an apply released, or that is older than what is applied now, is done
    for name in [p.name for p in parked_dir.glob("*.env")]:
        try:
            env = parse((parked_dir / name).read_bytes())
        except (OSError, EnvelopeError):
            continue
        link = inbox.chains.store.get((key_hash(env.header.source), env.header.tree))
        if link is not None and env.header.generation <= link.generation:
            (parked_dir / name).unlink(missing_ok=True)
    if worst is not None:
        raise worst


def _said(as_json: bool, d: dict) -> None:
    import json
    if as_json:
        say(json.dumps(d, sort_keys=True))
    else:
        extra = f" (applied generations {', '.join(map(str, d['applied']))})" if d.get("applied") else ""
        say(f"relay: {d['file']}: {d['verdict']}: {d.get('why', '')}{extra}")


@group.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="The same as one JSON object on stdout.")
def status_cmd(config_dir, as_json):
    """Show the relayed trees: those sent from here (to whom, as what, the last
    generation and when), those applied here (from whom, the generation), and
    the envelopes waiting here for the generation before them.

    Example: resync relay status
    """
    import json
    import time
    from pathlib import Path

    from ..identity import config_dir as default_dir
    from ..identity import device_id_of_hash
    from ..relay.envelope import EnvelopeError, parse
    from ..relay.keys import key_hash
    from ..relay.trees import Outbox
    from ..store.guard import GuardStore
    d = Path(config_dir) if config_dir else default_dir()
    sent = Outbox(d / "relay" / "outbox", None).trees()
    applied = GuardStore(d / "relay" / "applied").chains()
    parked = []
    for file in sorted((d / "relay" / "parked").glob("*.env")):
        try:
            h = parse(file.read_bytes()).header
        except (OSError, EnvelopeError):
            continue
        parked.append({"file": str(file), "source": device_id_of_hash(key_hash(h.source)), "tree": h.tree.hex(),
                       "generation": h.generation, "expires": h.expires})
    if as_json:
        say(json.dumps({"sent": sent, "applied": applied, "parked": parked}, sort_keys=True))
        return

    def when(ms) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "?"
    say("sent from here:" if sent else "sent from here: nothing")
    for t in sent:
        rc = t.get("receipt")
        told = (f"; receipt: {rc['verdict']} generation {rc['generation']} {when(rc['at'])}"
                + (f" ({rc['why']})" if rc["verdict"] != "apply" else "")) if rc else "; no receipt yet"
        say(f"  {t.get('src')} -> {t.get('to')} as {t.get('name')}: generation {t.get('generation')} "
            f"({t.get('bytes', 0)} bytes, sealed {when(t.get('sealed'))}){told}")
    say("applied here:" if applied else "applied here: nothing")
    for c in applied:
        say(f"  from {c['source']} (tree {c['tree']}): generation {c['generation']}, applied {when(c['applied'])}")
    if parked:
        say("waiting here for the generation before them:")
        for p in parked:
            say(f"  from {p['source']} (tree {p['tree']}): generation {p['generation']}, until {when(p['expires'])}")


@group.command("export")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--spool", "spool_dir", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
              help="The spool to copy from: a relay's (`serve --relay DIR`; read only, it may be running). "
                   "Default: this machine's own.")
@click.option("--to", "device", default=None, metavar="DEVICE-ID",
              help="Only the envelopes for this device.")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="What was copied, as JSON on stdout.")
def export_cmd(out, spool_dir, device, config_dir, as_json):
    """Copy the envelopes a spool holds into directory OUT (made if absent),
    as ID.env, for a disk to carry: the same envelopes, the same ids — the
    destination applies each once, whichever way it comes first. The spool
    keeps custody of its copies.

    Example: resync relay export /media/usb/resync --spool /var/spool/resync --to SITE-B-ID
    """
    import json
    from pathlib import Path

    from ..fs import write_durable
    from ..identity import config_dir as default_dir
    from ..relay.keys import device_hash
    from ..store.spool import Spool
    d = Path(config_dir) if config_dir else default_dir()
    spool = Spool(spool_dir or d / "relay" / "spool", read_only=True)     # (no lock: it only reads)
    want = device_hash(device).hex() if device else None
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    copied, total = [], 0
    for h in sorted(spool.index.values(), key=lambda h: h.received):
        if want is not None and h.destination != want:
            continue
        file = target / f"{h.id}.env"
        if not file.exists():
            try:
                write_durable(file, spool.read(h.id))
            except FileNotFoundError:
                continue                        # (handed over meanwhile)
            copied.append(h.id)
            total += h.size
    if as_json:
        say(json.dumps({"copied": copied, "bytes": total, "to": str(target)}, sort_keys=True))
    else:
        say(f"relay: {len(copied)} envelopes ({total} bytes) copied to {target}")


@group.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("relay", required=False)
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="The spool to take them into (a relay's, while its daemon is stopped). Default: this "
                   "machine's own.")
@_config_option
@_peer_option
@_retry_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per envelope on stdout.")
def import_cmd(directory, relay, spool_dir, config_dir, peer_id, retry_for, as_json):
    """Take the envelopes in DIRECTORY (*.env, carried on a disk) into a
    spool, each verified and admitted as a relay admits it — one held or
    delivered before is a duplicate, refused —, and with RELAY
    (resync://HOST[:PORT]) hand them to that relay.

    Examples: resync relay import /media/usb/resync resync://relay.example:8730 --peer-id RELAY-ID

              resync relay import /media/usb/resync --spool /var/spool/resync   (its relay stopped)
    """
    import json
    from pathlib import Path

    from ..errors import ResyncError
    from ..identity import config_dir as default_dir
    from ..identity import load_identity
    from ..relay.envelope import EnvelopeError
    d = Path(config_dir) if config_dir else default_dir()
    if relay is not None and not _is_url(relay):
        from ..errors import UsageError
        raise UsageError(f"{relay}: expected a relay's resync://HOST[:PORT]")
    spool = _spool(d, spool_dir)
    worst = None
    for file in sorted(Path(directory).rglob("*.env")):
        try:
            held = spool.put(file.read_bytes())
            line = {"file": str(file), "envelope": held.id, "verdict": "taken"}
        except EnvelopeError as exc:
            worst = worst or exc
            line = {"file": str(file), "verdict": "invalid", "why": str(exc)}
        except ResyncError as exc:
            line = {"file": str(file), "verdict": "refused", "why": str(exc)}
        except OSError as exc:
            line = {"file": str(file), "verdict": "unreadable", "why": exc.strerror or str(exc)}
        say(json.dumps(line, sort_keys=True) if as_json else f"relay: {file}: {line['verdict']}"
            + (f": {line['why']}" if "why" in line else ""))
    if relay is not None:
        r = _call(relay, load_identity(d, create=True), spool, peer_id, deposit=True, collect=False,
                  retry_for=retry_for)
        say(json.dumps({"relay": relay, "handed_over": r.get("handed_over", 0), "refused": r.get("refusals", [])},
                       sort_keys=True) if as_json else f"relay: handed {r.get('handed_over', 0)} envelopes to {relay}")
    if worst is not None:
        raise worst


@group.command("held")
@with_api
@click.option("--json", "as_json", is_flag=True, help="The daemon's answer as JSON on stdout.")
def held_cmd(api_url, config_dir, as_json):
    """Show what the local relaying daemon (`resync serve --relay`) holds:
    envelopes and bytes per priority and per destination, the oldest, the
    stuck ones, each route's next hop and its backoff, and the envelopes
    themselves (oldest first; no names: a relay has none). Exit 10 when no
    daemon answers.

    Example: resync relay held
    """
    import json
    import time

    from .daemon import call
    _, r = call(api_url, config_dir, "/api/v1/relay")
    if as_json:
        say(json.dumps(r, sort_keys=True))
        return
    if not r.get("relaying"):
        say("relay: this daemon does not relay (resync serve --relay DIR)")
        return
    say(f"relay: {r['envelopes']} envelopes, {r['bytes']} bytes in {r['spool']}"
        + (f" (cap {r['cap']})" if r.get("cap") else "") + f"; oldest {r['oldest_seconds']:.0f} s; "
        f"stuck {r['stuck']}")
    for p, g in r["by_priority"].items():
        if g["envelopes"]:
            say(f"  {p}: {g['envelopes']} envelopes, {g['bytes']} bytes")
    for route in r["routes"]:
        to = "any other device" if route["to"] == "*" else ", ".join(route["to"])
        say(f"  route: {to} via {route['via']} ({route['peer_id']})"
            + (f": retrying in {route['next_try_in_seconds']:.0f} s after: {route['last_error']}"
               if route["last_error"] else ""))
    for h in r["held"]:
        say(f"  {h['id'][:16]} {h['priority']:8} {h['bytes']:>12} B for {h['destination']}, until "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(h['expires'] / 1000))}"
            + (", stuck" if h["stuck"] else "") + (f", {h['attempts']} failed: {h['last_error']}"
                                                   if h["attempts"] else ""))


@group.command("remove")
@with_api
@click.argument("envelope_id")
def remove_cmd(api_url, config_dir, envelope_id):
    """Give up an envelope the local relaying daemon holds (its sender is not
    told; a tombstone keeps another copy out until its expiry). Exit 2 when it
    holds no such envelope, 10 when no daemon answers.

    Example: resync relay remove 5f2c0d3a9e8b7f61d2...
    """
    from .daemon import call
    _, h = call(api_url, config_dir, f"/api/v1/relay/envelopes/{envelope_id}", "DELETE")
    say(f"relay: removed {h['id']} ({h['bytes']} bytes for {h['destination']})")
