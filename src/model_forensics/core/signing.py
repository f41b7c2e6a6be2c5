"""Bundle signatures: ed25519 over the content digest, with the ``cryptography`` library.

::

    private, public = generate_key("me")              # me.key (PEM, private), me.pub (PEM)
    write_signature(bundle_dir, private)              # signature.json inside the bundle
    signer = check_signature(Bundle.open(bundle_dir), trusted_key=public)

``signature.json`` holds ``{"algorithm": "ed25519", "digest": "sha256:…", "public_key":
base64 raw key, "signature": base64}``; the signed message is the digest string (UTF-8).
A signature says *who* vouches for these exact contents; the digest alone only says the
contents are the ones you were told about. Public keys may be PEM files or OpenSSH
``ssh-ed25519`` lines.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_forensics.core.errors import BundleError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from model_forensics.core.bundle import Bundle

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"


def generate_key(path: str | Path) -> tuple[Path, Path]:
    """Create an ed25519 key pair: ``PATH.key`` (private, PEM, mode 0600) and ``PATH.pub``.

    Raises:
        BundleError: either file exists already, or the directory is not writable.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    base = Path(path)
    private_path, public_path = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise BundleError(f"'{p}' already exists; choose another name (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise BundleError(f"cannot write the key pair next to '{base}': {exc.strerror}") from None
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM (PKCS8) or OpenSSH file (unencrypted)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key(path)
    try:
        key: Any = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError):
        raise BundleError(
            f"'{path}' is not an unencrypted ed25519 private key (PEM or OpenSSH); "
            "create one with `model-forensics bundle keygen NAME`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"'{path}' holds a {type(key).__name__}, not an ed25519 key; bundles are signed with ed25519")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file or an OpenSSH ``ssh-ed25519 …`` line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key(path)
    try:
        key: Any = (
            serialization.load_ssh_public_key(data)
            if data.startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError, Exception):
        raise BundleError(f"'{path}' is not an ed25519 public key (PEM or an ssh-ed25519 line)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"'{path}' holds a {type(key).__name__}, not an ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of the sha256 of the raw public key."""
    return "ed25519:" + hashlib.sha256(_raw(key)).hexdigest()[:16]


def signature_record(digest: str, key: Ed25519PrivateKey) -> dict[str, str]:
    """The ``signature.json`` content for a bundle whose content digest is ``digest``."""
    return {
        "algorithm": ALGORITHM,
        "digest": digest,
        "public_key": base64.b64encode(_raw(key.public_key())).decode(),
        "signature": base64.b64encode(key.sign(digest.encode())).decode(),
    }


def write_signature(bundle_dir: str | Path, private_key: str | Path) -> Path:
    """Sign a bundle directory in place (atomically writes ``signature.json``).

    Raises:
        BundleError: the bundle does not verify, or the key is unreadable.
    """
    import json

    from model_forensics.core.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    if bundle.source.is_file():
        raise BundleError(f"'{bundle_dir}' is an archive; sign the bundle directory, then pack it")
    record = signature_record(bundle.digest, load_private_key(private_key))
    fd, tmp = tempfile.mkstemp(prefix=".signature.", dir=bundle.path)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, bundle.path / SIGNATURE)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BundleError(f"cannot write the signature into '{bundle_dir}': {exc.strerror}") from None
    return bundle.path / SIGNATURE


def read_signature(bundle: Bundle) -> dict[str, str] | None:
    """The bundle's ``signature.json`` (checked for shape), or None when it is unsigned."""
    from model_forensics.core.bundle import _read_capped
    from model_forensics.core.manifest import parse_json

    if not (bundle.path / SIGNATURE).exists():
        return None
    record = parse_json(_read_capped(bundle.path / SIGNATURE, 0.01, bundle.source), SIGNATURE, bundle.limits)
    fields = {"algorithm", "digest", "public_key", "signature"}
    if not isinstance(record, dict) or set(record) != fields or not all(isinstance(v, str) for v in record.values()):
        raise BundleError(f"{SIGNATURE} must hold exactly {sorted(fields)} as strings; the bundle is corrupt")
    if record["algorithm"] != ALGORITHM:
        raise BundleError(f"{SIGNATURE} uses algorithm {record['algorithm']!r:.40}; only ed25519 is read")
    return record


def check_signature(bundle: Bundle, trusted_key: str | Path | None = None) -> str:
    """Check a bundle's signature against its content digest (and, with ``trusted_key``,
    that the signer is that key). Returns the signer's fingerprint.

    Raises:
        BundleError: unsigned, signed over other contents, a bad signature, or signed by
            a key other than ``trusted_key``.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    record = read_signature(bundle)
    if record is None:
        raise BundleError(f"bundle '{bundle.source}' is not signed; ask the sender to sign it (record --sign-key)")
    if record["digest"] != bundle.digest:
        raise BundleError(
            f"bundle '{bundle.source}' was signed over other contents ({record['digest'][:23]}…, now "
            f"{bundle.digest[:23]}…); it was changed after signing"
        )
    try:
        signer = Ed25519PublicKey.from_public_bytes(base64.b64decode(record["public_key"], validate=True))
        signer.verify(base64.b64decode(record["signature"], validate=True), record["digest"].encode())
    except (InvalidSignature, ValueError):
        raise BundleError(f"bundle '{bundle.source}' has an invalid signature; it was forged or damaged") from None
    if trusted_key is not None:
        trusted = load_public_key(trusted_key)
        if _raw(trusted) != _raw(signer):
            raise BundleError(
                f"bundle '{bundle.source}' is signed by {fingerprint(signer)}, not by the trusted key "
                f"{fingerprint(trusted)} ({trusted_key})"
            )
    return fingerprint(signer)


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key(path: str | Path) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > 64 * 1024:
            raise BundleError(f"'{p}' is too large to be a key file")
        return p.read_bytes().strip()
    except FileNotFoundError:
        raise BundleError(f"key file '{p}' does not exist") from None
    except OSError as exc:
        raise BundleError(f"cannot read key file '{p}': {exc.strerror}") from None
