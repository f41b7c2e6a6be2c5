"""ed25519 keys and signature records, with the ``cryptography`` library (no bundle
knowledge: :mod:`model_forensics.core.signing` applies them to bundles).

A signature record is ``{"algorithm": "ed25519", "digest": "sha256:…", "public_key": base64
raw key, "signature": base64}``; the signed message is the digest string (UTF-8). Public keys
may be PEM files or OpenSSH ``ssh-ed25519`` lines.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_forensics.core.errors import BundleError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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


def signer_of(record: dict[str, str], digest: str, trusted_key: str | Path | None = None, where: str = "bundle") -> str:
    """Check a signature record against a content digest (and, with ``trusted_key``, that the
    signer is that key). Returns the signer's fingerprint.

    Raises:
        BundleError: signed over other contents, a bad signature, or another signer.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if record["digest"] != digest:
        raise BundleError(
            f"{where} was signed over other contents ({record['digest'][:23]}…, now "
            f"{digest[:23]}…); it was changed after signing"
        )
    try:
        signer = Ed25519PublicKey.from_public_bytes(base64.b64decode(record["public_key"], validate=True))
        signer.verify(base64.b64decode(record["signature"], validate=True), record["digest"].encode())
    except (InvalidSignature, ValueError):
        raise BundleError(f"{where} has an invalid signature; it was forged or damaged") from None
    if trusted_key is not None:
        trusted = load_public_key(trusted_key)
        if _raw(trusted) != _raw(signer):
            raise BundleError(
                f"{where} is signed by {fingerprint(signer)}, not by the trusted key {fingerprint(trusted)} ({trusted_key})"
            )
    return fingerprint(signer)
