"""The destination's record of what it applied from each (source, tree)
relayed to it (relay.guard): the last generation and its envelope's id,
one small JSON document per tree, replaced atomically and durably — read
before anything relayed is applied, so a notebook holding the DuckDB
history must never stand in its way (the applied runs themselves are in the
history, as every run is)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import HistoryError


class GuardStore:
    """``get((source, tree))`` -> relay.guard.Link or None; ``put(key, link)``.
    HistoryError (exit 3) if a record cannot be written; an unreadable one
    reads as a HistoryError too (never as "nothing applied": that would let
    a replay through)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, key: tuple[bytes, bytes]) -> Path:
        source, tree = key
        return self.directory / f"{source.hex()}-{tree.hex()}.json"

    def get(self, key):
        from ..relay.guard import Link
        path = self._path(key)
        try:
            d = json.loads(path.read_bytes())
            return Link(int(d["generation"]), bytes.fromhex(d["id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HistoryError(path, f"unreadable ({getattr(exc, 'strerror', None) or exc}): relayed generations "
                                     "of this tree are refused until it is repaired") from None

    def chains(self) -> list[dict]:
        """Every (source, tree) applied here: ``source`` (device ID), ``tree``
        (hex), ``generation``, ``id`` (hex), ``applied`` (ms)."""
        from ..identity import device_id_of_hash
        out = []
        for path in sorted(self.directory.glob("*-*.json")) if self.directory.is_dir() else []:
            try:
                d = json.loads(path.read_text())
                source_hex, tree = path.stem.split("-")
                source = device_id_of_hash(bytes.fromhex(source_hex))
            except (OSError, ValueError):
                continue
            out.append({"source": source, "tree": tree, "generation": d.get("generation"), "id": d.get("id"),
                        "applied": d.get("applied")})
        return out

    def put(self, key, link) -> None:
        from ..errors import ResyncError
        from ..fs import write_durable
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            import time
            write_durable(self._path(key), json.dumps({"generation": link.generation, "id": link.id.hex(),
                                                       "applied": int(time.time() * 1000)}).encode(), mode=0o600)
        except (OSError, ResyncError) as exc:
            raise HistoryError(self.directory, f"cannot record the generation applied: "
                                               f"{getattr(exc, 'strerror', None) or exc}") from None
