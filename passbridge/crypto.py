"""Secrets at rest: Fernet with key rotation (``PASSBRIDGE_SECRET_KEY`` = comma-separated keys, newest first).

When no key is configured (a laptop, ``make demo``) a key is generated once into the state dir so that
secrets are still never stored in clear text.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

if TYPE_CHECKING:
    from passbridge.settings import Settings


class SecretKeyError(RuntimeError):
    """Secrets could not be decrypted with any configured key."""


#: How long a process waits for another one to finish writing the generated key it just created.
KEY_FILE_WAIT_S = 2.0


def generated_key(state_dir: Path) -> str:
    """The key in ``<state_dir>/secret.key``, generated on first use.

    Several processes may start at once on a fresh state dir (producer and worker): the file is created
    exclusively, private from its first byte (0600), so exactly one key is ever written and every process
    reads that one, waiting briefly if the creator has not written it yet.
    """
    path = state_dir / "secret.key"
    try:
        if not path.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                pass  # another process won the race: read its key below
            else:
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(Fernet.generate_key())
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError:
                    # A full disk: an empty key file left behind would stop every later start.
                    path.unlink(missing_ok=True)
                    raise
        key = path.read_text().strip()
    except OSError as exc:
        # A read-only or full state dir: one clear error instead of a traceback (the key is never in it).
        raise SecretKeyError(
            f"no PASSBRIDGE_SECRET_KEY is set and {path} cannot be used ({exc.strerror or exc}): "
            "set PASSBRIDGE_SECRET_KEY, or PASSBRIDGE_STATE_DIR to a writable directory"
        ) from None
    deadline = time.monotonic() + KEY_FILE_WAIT_S
    while not (key := key or path.read_text().strip()):
        if time.monotonic() >= deadline:
            raise SecretKeyError(
                f"{path} is empty: delete it to generate a new key (only if nothing was encrypted with it yet) "
                "or set PASSBRIDGE_SECRET_KEY"
            )
        time.sleep(0.01)
    return key


def load_cipher(secret_key: str | None, state_dir: Path) -> MultiFernet:
    """The cipher for the configured keys, or for a generated key kept in ``<state_dir>/secret.key``."""
    if not secret_key:
        secret_key = generated_key(state_dir)
    keys = [k.strip() for k in secret_key.split(",") if k.strip()]
    try:
        return MultiFernet([Fernet(k.encode()) for k in keys])
    except ValueError as exc:
        raise SecretKeyError(
            "PASSBRIDGE_SECRET_KEY must be urlsafe-base64 Fernet keys, comma-separated"
        ) from exc


def cipher_from_settings(settings: Settings) -> MultiFernet:
    """The cipher for ``PASSBRIDGE_SECRET_KEY`` (or the generated key in the state dir)."""
    key = settings.secret_key.get_secret_value() if settings.secret_key else None
    return load_cipher(key, settings.state_dir)


def encrypt(cipher: MultiFernet, plaintext: bytes) -> str:
    """Encrypt with the newest key."""
    return cipher.encrypt(plaintext).decode()


def decrypt(cipher: MultiFernet, token: str) -> bytes:
    """Decrypt with any configured key."""
    try:
        return cipher.decrypt(token.encode())
    except InvalidToken:
        raise SecretKeyError(
            "stored secrets do not decrypt with any configured PASSBRIDGE_SECRET_KEY"
        ) from None
