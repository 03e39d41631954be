"""Envelope encryption of personal data: per-subject data keys wrapped by one master key.

A data key (32 random bytes) belongs to one subject (a persona). It never touches
the database in clear: the master key wraps it (AES-GCM, the subject's id as
associated data, so a wrapped key cannot be moved to another subject). Values in
the log are sealed with AES-GCM under a fresh 96-bit nonce; values in read models
with AES-SIV, which is deterministic, so rebuilding a read model gives the same
bytes. Each use gets its own subkey (HKDF), and every value's associated data
names where it belongs, so a ciphertext copied elsewhere does not open.
"""

from __future__ import annotations

import base64
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
KEY_BYTES = 32


class SealBroken(Exception):
    """A sealed value did not open: wrong key, moved elsewhere, or tampered with."""


def associated(*parts: str) -> bytes:
    # The unit separator cannot occur in ids or field names, so the parts cannot run into each other.
    return "\x1f".join(parts).encode()


def _subkey(key: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=purpose).derive(key)


class DataKey:
    """One subject's key: ``seal``/``open`` for the log, ``seal_fixed``/``open_fixed`` for read models."""

    def __init__(self, key: bytes) -> None:
        self._log = AESGCM(_subkey(key, b"genome-service log v1", KEY_BYTES))
        self._rows = AESSIV(_subkey(key, b"genome-service read models v1", 2 * KEY_BYTES))

    @staticmethod
    def generate() -> bytes:
        return AESGCM.generate_key(bit_length=8 * KEY_BYTES)

    def seal(self, text: str, context: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return base64.b64encode(nonce + self._log.encrypt(nonce, text.encode(), context)).decode()

    def open(self, sealed: str, context: bytes) -> str:
        raw = base64.b64decode(sealed)
        try:
            return self._log.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context).decode()
        except InvalidTag as error:
            raise SealBroken("a sealed value did not open under its key and place") from error

    def seal_fixed(self, text: str, context: bytes) -> str:
        return base64.b64encode(self._rows.encrypt(text.encode(), [context])).decode()

    def open_fixed(self, sealed: str, context: bytes) -> str:
        try:
            return self._rows.decrypt(base64.b64decode(sealed, validate=True), [context]).decode()
        except (InvalidTag, ValueError) as error:
            raise SealBroken("a sealed column value did not open under its key and place") from error


class MasterKey:
    """The key-encryption key. Losing it makes every sealed value unreadable, like shredding all keys."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a master key is {KEY_BYTES} bytes (got {len(key)})")
        self._aead = AESGCM(key)
        self._fingerprints = _subkey(key, b"genome-service request fingerprints v1", KEY_BYTES)

    @classmethod
    def from_file(cls, path: Path) -> MasterKey:
        """Read the key file, or create it (owner-only) on first use; concurrent creators agree on one."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(descriptor, base64.b64encode(AESGCM.generate_key(bit_length=8 * KEY_BYTES)))
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            try:
                os.link(temporary, path)  # fails if another process created it first: theirs wins
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
        return cls(base64.b64decode(path.read_bytes().strip(), validate=True))

    def fingerprint(self) -> hmac.HMAC:
        """A keyed hash for request fingerprints: they outlive a subject's data key in the
        append-only metadata, and a plain SHA-256 of a short body could be confirmed by
        guessing it after the body itself was shredded."""
        return hmac.new(self._fingerprints, digestmod="sha256")

    def wrap(self, key: bytes, subject: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, key, associated("data key", subject))

    def unwrap(self, wrapped: bytes, subject: str) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], associated("data key", subject))
        except InvalidTag as error:
            raise SealBroken(
                f"the data key of {subject} does not open with this master key: is GENOME_MASTER_KEY_FILE the one it was made with?"
            ) from error
