"""Keys and DSSE: Ed25519 key pairs (`evaluator keygen`), the trusted keys, the signed envelope.

A payload travels in a DSSE envelope signed with Ed25519 over DSSE's pre-authentication encoding
(PAE), which binds the payload type to the signed bytes. Trusted public keys are the `*.pub` files
in `spec/keys/`, one per signer; a key's name is its file name without the suffix. This module
knows nothing of results: what is signed, and what a signed payload must hold to be accepted, is
the publication policy of `evaluator/publish.py`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evaluator.errors import UserError
from evaluator.paths import KEYS_DIR, shown

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"

_KEY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


# --- keys -------------------------------------------------------------------------------------


def keyid_of(public_key: Ed25519PublicKey) -> str:
    """The SHA-256 of the raw 32-byte public key, in hex: stable across file formats."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _create_exclusively(path: Path, data: bytes, mode: int) -> None:
    """Create a new file with `mode` from the start (O_EXCL), so it is never world-readable, even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def generate_key_pair(out_dir: Path, name: str) -> tuple[Path, Path, str]:
    """Write `NAME.key` (PKCS#8 PEM, mode 0600) and `NAME.pub` (PEM) into `out_dir`; refuse to replace either."""
    if not _KEY_NAME.match(name):
        raise UserError(
            f"key name {name!r} is not allowed: use lowercase letters, digits, '.', '_' or '-' (at most 64)"
        )
    private_path = out_dir / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    existing = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if existing:
        raise UserError(
            f"refusing to overwrite existing key file(s): {', '.join(existing)}; "
            "pick another --name or --out, or move them away yourself"
        )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _create_exclusively(private_path, private_pem, 0o600)
        _create_exclusively(public_path, public_pem, 0o644)
    except FileExistsError as exc:
        raise UserError(f"refusing to overwrite {exc.filename}: it appeared while the key was generated") from None
    return private_path, public_path, keyid_of(private_key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 private key (make one with `evaluator keygen`)")
    return key


@dataclass(frozen=True)
class TrustedKey:
    name: str
    keyid: str
    public_key: Ed25519PublicKey


def load_trusted_keys(keys_dir: Path) -> dict[str, TrustedKey]:
    """Every `*.pub` in `keys_dir`, by keyid. A key file that does not load is a configuration error."""
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        raise UserError(f"trusted-keys directory {keys_dir} does not exist")
    trusted: dict[str, TrustedKey] = {}
    for path in sorted(keys_dir.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UserError(f"trusted key {path} does not load: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UserError(f"trusted key {path} is not an Ed25519 public key")
        keyid = keyid_of(key)
        trusted.setdefault(keyid, TrustedKey(path.stem, keyid, key))
    return trusted


# --- DSSE -------------------------------------------------------------------------------------


class VerificationError(Exception):
    """Why an envelope is not trusted; one line, shown next to the envelope's path."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, as DSSE allows either; anything else raises ValueError."""
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def sign_statement(statement: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    signature = private_key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": keyid_of(private_key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }


def envelope_bytes(envelope: dict[str, Any]) -> bytes:
    return (json.dumps(envelope, indent=2) + "\n").encode("utf-8")


def _check_envelope_shape(envelope: Any) -> None:
    if not isinstance(envelope, dict):
        raise VerificationError("not a DSSE envelope: the file is not a JSON object")
    for field in ("payloadType", "payload"):
        if not isinstance(envelope.get(field), str):
            raise VerificationError(f"not a DSSE envelope: {field} is missing or not a string")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise VerificationError("not a DSSE envelope: it has no signatures")
    for entry in signatures:
        if not (isinstance(entry, dict) and isinstance(entry.get("keyid"), str) and isinstance(entry.get("sig"), str)):
            raise VerificationError("not a DSSE envelope: a signature lacks a string keyid or sig")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise VerificationError(f"payloadType is {envelope['payloadType']!r}, expected {PAYLOAD_TYPE!r}")


def _signer_of(envelope: dict[str, Any], payload: bytes, trusted: dict[str, TrustedKey]) -> str:
    """The name of a trusted key whose signature over the PAE verifies; raise with the reason otherwise."""
    message = pae(envelope["payloadType"], payload)
    mismatched = []
    unknown = []
    for entry in envelope["signatures"]:
        key = trusted.get(entry["keyid"])
        if key is None:
            unknown.append(entry["keyid"])
            continue
        try:
            key.public_key.verify(_b64decode(entry["sig"]), message)
        except (ValueError, InvalidSignature):
            mismatched.append(key.name)
            continue
        return key.name
    if mismatched:
        raise VerificationError(
            f"signature by trusted key {mismatched[0]!r} does not match the payload (payload or signature altered)"
        )
    # keyids come from the file: repr() keeps a hostile one on one line.
    keyids = ", ".join(repr(keyid[:16] + ("..." if len(keyid) > 16 else "")) for keyid in unknown)
    raise VerificationError(f"signed only by unknown key(s): keyid {keyids}")


def authenticate_envelope(envelope: Any, trusted: dict[str, TrustedKey]) -> tuple[bytes, str]:
    """A parsed envelope's payload bytes and the name of the trusted key that signed them; raise
    VerificationError for a malformed envelope, a payload that is not base64 or no trusted signature."""
    _check_envelope_shape(envelope)
    try:
        payload = _b64decode(envelope["payload"])
    except ValueError as exc:
        raise VerificationError(f"payload is not base64: {exc}") from None
    return payload, _signer_of(envelope, payload, trusted)


# --- command line -----------------------------------------------------------------------------


def _run_keygen(args: argparse.Namespace) -> int:
    private_path, public_path, keyid = generate_key_pair(Path(args.out), args.name)
    print(f"wrote private key {private_path} (mode 0600: keep it secret)")
    print(f"wrote public key  {public_path}")
    print(f"keyid {keyid}")
    print(f"To make its signatures trusted, add {public_path.name} to {shown(KEYS_DIR)}/ (one file per signer).")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    keygen = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing results",
        description=(
            "Make an Ed25519 key pair: NAME.key (private, PKCS#8 PEM, created with mode 0600) and NAME.pub "
            "(public, PEM). Existing files are never overwritten. Put NAME.pub in spec/keys/ to trust the key."
        ),
    )
    keygen.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the two key files (created if missing)"
    )
    keygen.add_argument("--name", default="signer", help="file name of the pair, without suffix (default: signer)")
    keygen.set_defaults(handler=_run_keygen)
