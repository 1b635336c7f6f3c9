"""Trust without a CA: this machine's key, device IDs, and pinned peers.

A machine is its Ed25519 key (WireGuard's "a peer is its public key"). Its
**device ID** is the SHA-256 of the 32-byte raw public key in base32 (RFC
4648, no padding: 52 characters), cut into four 13-character groups, each
followed by a Luhn mod-32 check character (56 characters), shown as eight
groups of seven joined by dashes — the layout of Syncthing's device IDs,
whose check characters catch any single mistyped character and most
transpositions. Hashing the public key, not the certificate, keeps the ID
stable when the self-signed certificate is renewed.

Files, in ``$XDG_CONFIG_HOME/resync/`` (``~/.config/resync/``), mode 0600:
``key.pem`` (PKCS#8 Ed25519 private key), ``cert.pem`` (a self-signed X.509
certificate for that key, what QUIC's TLS handshake presents), and
``known_peers`` (``HOST[:PORT] DEVICE-ID`` lines, ``#`` comments: the servers
this client trusts, as ssh's known_hosts).
"""
from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ResyncError

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"           # RFC 4648 base32


class IdentityError(ResyncError):
    """{}"""

    exit_code = 3


class BadDeviceId(ResyncError):
    """not a device ID: {}"""

    exit_code = 2


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "resync"


def _luhn32(group: str) -> str:
    """Luhn mod N check character of ``group`` over the base32 alphabet
    (the algorithm Syncthing uses for device IDs)."""
    factor, total, n = 1, 0, len(ALPHABET)
    for ch in group:
        addend = factor * ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return ALPHABET[(n - total % n) % n]


def device_id(public_key: bytes) -> str:
    """The device ID of a raw 32-byte Ed25519 public key."""
    return device_id_of_hash(hashlib.sha256(public_key).digest())


def device_id_of_hash(digest: bytes) -> str:
    """The device ID whose key's SHA-256 is ``digest`` (32 bytes): base32
    with a check character per 13, in 8 groups of 7 (Syncthing's form)."""
    raw = base64.b32encode(digest).decode().rstrip("=")     # 52 characters
    checked = "".join(raw[i:i + 13] + _luhn32(raw[i:i + 13]) for i in range(0, 52, 13))
    return "-".join(checked[i:i + 7] for i in range(0, 56, 7))


def parse_device_id(text: str) -> str:
    """``text`` as a canonical device ID (case, spaces and dashes do not
    matter; 1 and 0 read as I and O, 8 as B); BadDeviceId if it is not one or
    a check character does not match."""
    clean = "".join(text.split()).replace("-", "").upper().translate(str.maketrans("108", "IOB"))
    if len(clean) != 56 or any(ch not in ALPHABET for ch in clean):
        raise BadDeviceId(f"{text!r} (56 base32 characters expected, in groups of 7)")
    for i in range(0, 56, 14):
        group, check = clean[i:i + 13], clean[i + 13]
        if _luhn32(group) != check:
            raise BadDeviceId(f"{text!r} (check character {i // 14 + 1} does not match: mistyped?)")
    return "-".join(clean[i:i + 7] for i in range(0, 56, 7))


@dataclass
class Identity:
    """This machine's key and certificate."""
    key_path: Path
    cert_path: Path
    private_key: object                 # cryptography Ed25519PrivateKey
    certificate: object                 # cryptography x509.Certificate

    @property
    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)

    @property
    def device_id(self) -> str:
        return device_id(self.public_key)

    @property
    def cert_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start, atomically
    and durably; IdentityError (exit 3) if it cannot be."""
    from .fs import write_durable
    try:
        write_durable(path, data, mode=0o600)
    except ResyncError as exc:
        raise IdentityError(str(exc)) from None


def _self_signed(key, common_name: str):
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("resync")]), critical=False)
            .sign(key, None))


def private_key(path: Path, kind, create: bool, missing: str):
    """The PEM private key at ``path``, of class ``kind`` (cryptography's
    Ed25519PrivateKey, X25519PrivateKey: made with its ``generate`` if
    ``create`` and it does not exist, mode 0600 from the start).
    IdentityError if it is missing (``missing`` says how to make it),
    unreadable, readable by others, or not a ``kind`` key."""
    from cryptography.hazmat.primitives import serialization
    if not path.exists():
        if not create:
            raise IdentityError(f"{path}: {missing}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(path, kind.generate().private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        except OSError as exc:
            raise IdentityError(f"{path}: {exc.strerror or exc}") from None
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise IdentityError(f"{path}: readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise IdentityError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, kind):
        raise IdentityError(f"{path}: not an {kind.__name__.replace('PrivateKey', '')} key")
    return key


def load_identity(directory: Path | None = None, create: bool = False) -> Identity:
    """This machine's identity from ``directory`` (default: config_dir()),
    made there first if ``create`` and it does not exist. IdentityError if it
    cannot be read, is not an Ed25519 key, or is readable by others."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography import x509
    d = directory or config_dir()
    key_path, cert_path = d / "key.pem", d / "cert.pem"
    key = private_key(key_path, ed25519.Ed25519PrivateKey, create, "no identity yet (run `resync id` to create one)")
    cert = None
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError):
            cert = None
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if cert is None or cert.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw) != raw:
        cert = _self_signed(key, device_id(raw))        # (re)made: the ID is the key's, not the certificate's
        try:
            _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        except OSError as exc:
            raise IdentityError(f"{cert_path}: {exc.strerror or exc}") from None
    return Identity(key_path, cert_path, key, cert)


def rotate_identity(directory: Path | None = None) -> tuple[str, str, Path]:
    """Make a new key for this machine in ``directory`` (default:
    config_dir()): the old key and certificate are kept beside it as
    ``key.pem.old-STAMP`` / ``cert.pem.old-STAMP`` (mode 0600), the new ones
    take their names. Returns (old device ID, new device ID, where the old
    key went). IdentityError if there is no key yet or it cannot be moved."""
    d = directory or config_dir()
    old = load_identity(d)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = d / f"key.pem.old-{stamp}"
    try:
        os.link(old.key_path, kept)             # (the old key stays reachable whatever happens next)
        os.link(old.cert_path, d / f"cert.pem.old-{stamp}")
        os.unlink(old.key_path)
        os.unlink(old.cert_path)
    except OSError as exc:
        raise IdentityError(f"{old.key_path}: cannot set the old key aside: {exc.strerror or exc}") from None
    new = load_identity(d, create=True)
    return old.device_id, new.device_id, kept


API_KEY_FILE = "api-key"


def load_api_key(directory: Path | None = None, create: bool = False) -> str:
    """The daemon's API key (net.api) from ``directory`` (default:
    config_dir()), beside the device key: 32 random bytes as URL-safe base64
    (``secrets.token_urlsafe``), made there first if ``create``, mode 0600.
    IdentityError if it is missing (and not ``create``), unreadable, or
    readable by others."""
    import secrets
    d = directory or config_dir()
    path = d / API_KEY_FILE
    try:
        if not path.exists():
            if not create:
                raise IdentityError(f"{path}: no API key (it is made when `resync serve` first starts with "
                                    "this config directory)")
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
        st = path.stat()
        if st.st_mode & 0o077:
            raise IdentityError(f"{path}: readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        key = path.read_text().strip()
    except OSError as exc:
        raise IdentityError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise IdentityError(f"{path}: not an API key") from None
    if len(key) < 16 or not key.isascii() or not key.isprintable():
        raise IdentityError(f"{path}: not an API key (16 printable characters at least)")
    return key


def certificate_device_id(cert_der: bytes) -> str:
    """The device ID of the Ed25519 key in a DER certificate; BadDeviceId if
    the certificate does not hold an Ed25519 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = x509.load_der_x509_certificate(cert_der).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BadDeviceId("the peer's certificate does not hold an Ed25519 key")
    return device_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


# -- known peers ------------------------------------------------------------------

def known_peers_path() -> Path:
    return config_dir() / "known_peers"


def lookup_peer(address: str, path: Path | None = None) -> str | None:
    """The device ID pinned for ``address`` (``host:port``; a line for the
    bare host matches any port), or None."""
    p = path or known_peers_path()
    host = address.rsplit(":", 1)[0] if ":" in address else address
    found = None
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"{p}: {exc.strerror or exc}") from None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) != 2:
            continue
        if fields[0] == address:
            return parse_device_id(fields[1])
        if fields[0] == host:
            found = parse_device_id(fields[1])
    return found


def known_peers(path: Path | None = None) -> list[tuple[str, str]]:
    """The (HOST[:PORT], device ID) lines of ``known_peers`` (default: the
    config directory's), in the file's order; [] if there is none. A line
    whose ID is malformed is left out (lookup_peer would refuse it)."""
    p = path or known_peers_path()
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise IdentityError(f"{p}: {exc.strerror or exc}") from None
    out = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2:
            try:
                out.append((fields[0], parse_device_id(fields[1])))
            except ResyncError:
                continue
    return out


def remember_peer(address: str, peer_id: str, path: Path | None = None) -> None:
    """Append ``address peer_id`` to the known peers (--accept-new)."""
    p = path or known_peers_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(p, "a", encoding="utf-8") as f:
            f.write(f"{address} {peer_id}\n")
        os.chmod(p, 0o600)
    except OSError as exc:
        raise IdentityError(f"{p}: {exc.strerror or exc}") from None
