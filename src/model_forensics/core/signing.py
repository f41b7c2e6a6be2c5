"""Bundle signatures: ed25519 over the content digest (keys: :mod:`model_forensics.core.keys`).

::

    private, public = generate_key("me")              # me.key (PEM, private), me.pub (PEM)
    write_signature(bundle_dir, private)              # signature.json inside the bundle
    signer = check_signature(Bundle.open(bundle_dir), trusted_key=public)

A signature says *who* vouches for these exact contents; the digest alone only says the
contents are the ones you were told about.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from model_forensics.core.bundle import SIGNATURE, Bundle, _read_capped, shared_mode
from model_forensics.core.errors import BundleError
from model_forensics.core.keys import (
    ALGORITHM,
    fingerprint,
    generate_key,
    load_private_key,
    load_public_key,
    signature_record,
    signer_of,
)
from model_forensics.core.manifest import parse_json

__all__ = [
    "check_signature",
    "fingerprint",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "read_signature",
    "signature_record",
    "write_signature",
]


def write_signature(bundle_dir: str | Path, private_key: str | Path) -> Path:
    """Sign a bundle directory in place (atomically writes ``signature.json``).

    Raises:
        BundleError: the bundle does not verify, or the key is unreadable.
    """
    bundle = Bundle.open(bundle_dir)
    if bundle.source.is_file():
        raise BundleError(f"'{bundle_dir}' is an archive; sign the bundle directory, then pack it")
    record = signature_record(bundle.digest, load_private_key(private_key))
    fd, tmp = tempfile.mkstemp(prefix=".signature.", dir=bundle.path)
    os.fchmod(fd, shared_mode())  # readable like the bundle's other files, not mkstemp's 0600
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
    record = read_signature(bundle)
    if record is None:
        raise BundleError(f"bundle '{bundle.source}' is not signed; ask the sender to sign it (record --sign-key)")
    return signer_of(record, bundle.digest, trusted_key, where=f"bundle '{bundle.source}'")
