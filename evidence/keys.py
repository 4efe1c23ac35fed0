"""Ed25519 key helpers: generate, save/load PEM, raw public bytes, and key ids.

It does not decide which keys are trusted; callers pin keys and pass them to verifiers.
"""

from __future__ import annotations

import hashlib
import logging
import os

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evidence.errors import EvidenceIOError, FormatError

logger = logging.getLogger(__name__)

PUBLIC_KEY_SIZE = 32
MAX_KEY_FILE_BYTES = 64 * 1024


def generate_private_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Return the Ed25519 key for a 32-byte seed (test vectors; never for real keys)."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """Return the raw 32-byte encoding of `key`."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Return the public key for its raw 32-byte encoding; FormatError if malformed."""
    if len(raw) != PUBLIC_KEY_SIZE:
        raise FormatError(f"Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise FormatError(f"invalid Ed25519 public key: {e}") from e


def key_id(key: Ed25519PublicKey) -> str:
    """Return the key id: lowercase hex SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """Return `key` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """Return `key` as SubjectPublicKeyInfo PEM."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write `key` as PEM to a new file created with mode 0600; refuse to overwrite."""
    data = private_key_pem(key)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise EvidenceIOError(os.fspath(path), f"cannot create private key file: {e}") from e
    try:
        # The umask may have narrowed the mode but can never widen it; set it explicitly anyway.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise EvidenceIOError(os.fspath(path), f"cannot write private key: {e}") from e
    finally:
        os.close(fd)
    logger.info("wrote private key %s (key id %s)", os.fspath(path), key_id(key.public_key()))


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike[str]) -> None:
    """Write `key` as PEM to `path` (mode 0644, replacing any existing file)."""
    try:
        with open(path, "wb") as f:
            f.write(public_key_pem(key))
        os.chmod(path, 0o644)
    except OSError as e:
        raise EvidenceIOError(os.fspath(path), f"cannot write public key: {e}") from e


def _read_limited(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise EvidenceIOError(os.fspath(path), f"cannot read key file: {e}") from e
    if len(data) > MAX_KEY_FILE_BYTES:
        raise FormatError(f"key file larger than {MAX_KEY_FILE_BYTES} bytes", os.fspath(path))
    return data


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    """Parse an unencrypted PEM Ed25519 private key; FormatError otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise FormatError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise FormatError("private key is not Ed25519")
    return key


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key; FormatError otherwise."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise FormatError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError("public key is not Ed25519")
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key from `path`."""
    return load_private_key_pem(_read_limited(path))


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key from `path`."""
    return load_public_key_pem(_read_limited(path))
