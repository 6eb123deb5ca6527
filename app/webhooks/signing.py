"""Standard Webhooks signatures: ``whsec_`` secrets and the ``webhook-id`` / ``webhook-timestamp`` /
``webhook-signature`` headers (https://www.standardwebhooks.com).

The signature is ``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")) where ``key`` is the base64
part of the secret, decoded. Receivers verify it with any Standard Webhooks library
(``standardwebhooks.Webhook(secret).verify(body, headers)``), which also refuses timestamps more than five
minutes off, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the specification asks for 24 to 64


def new_secret() -> str:
    """A fresh endpoint secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for ``body`` sent as ``message_id`` at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (each attempt is signed with its own timestamp)."""
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, message_id, timestamp, body)}
