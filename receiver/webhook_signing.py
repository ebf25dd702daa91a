"""Standard Webhooks signatures for the requests of `http` sinks (pure).

Signed content is `{webhook-id}.{webhook-timestamp}.{body}`. `v1` is a base64 HMAC-SHA256
keyed with the base64 part of a `whsec_` secret; `v1a` a base64 Ed25519 signature. Consumers
verify with any Standard Webhooks library, or with the `whpk_` public key for `v1a`.
Key errors are ValueErrors whose text never quotes the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
PRIVATE_PREFIX = "whsk_"
PUBLIC_PREFIX = "whpk_"
SECRET_BYTES = (24, 64)  # the spec's recommended secret size


def _b64(text: str) -> bytes:
    """Strict standard base64; missing padding is tolerated, other characters are not."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("is not valid base64 after its prefix") from None


def parse_secret(value: object) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    if not isinstance(value, str) or not value.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX}")
    key = _b64(value.removeprefix(SECRET_PREFIX))
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"must decode to {low} to {high} bytes, got {len(key)}")
    return key


def parse_private_key(value: object) -> Ed25519PrivateKey:
    """An Ed25519 key from PEM (PKCS#8, unencrypted) or `whsk_<base64>` of its 32-byte seed
    or 64-byte seed+public key. An env var may hold the PEM with literal `\\n`s."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    text = value.strip()
    if text.startswith("-----BEGIN"):
        if "\n" not in text:
            text = text.replace("\\n", "\n")
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("is not a readable, unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"must be an Ed25519 key, got {type(key).__name__.lstrip('_')}")
        return key
    if not text.startswith(PRIVATE_PREFIX):
        raise ValueError(f"must be a PEM private key or start with {PRIVATE_PREFIX}")
    raw = _b64(text.removeprefix(PRIVATE_PREFIX))
    if len(raw) not in (32, 64):
        raise ValueError(f"must decode to 32 or 64 bytes, got {len(raw)}")
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if len(raw) == 64 and public_bytes(key) != raw[32:]:
        raise ValueError("has a public half that does not match its seed")
    return key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PrivateKey) -> str:
    """`whpk_<base64>`: what to hand a consumer so it can verify `v1a`."""
    return PUBLIC_PREFIX + base64.b64encode(public_bytes(key)).decode()


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign_v1(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_v1a(key: Ed25519PrivateKey, msg_id: str, timestamp: int, body: bytes) -> str:
    signature = key.sign(signed_content(msg_id, timestamp, body))
    return "v1a," + base64.b64encode(signature).decode()


def webhook_headers(
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    secret: bytes | None = None,
    private_key: Ed25519PrivateKey | None = None,
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and, with a key, `webhook-signature` (space-separated
    when both kinds are configured, so a consumer of either kind finds its own)."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    signatures = []
    if secret is not None:
        signatures.append(sign_v1(secret, msg_id, timestamp, body))
    if private_key is not None:
        signatures.append(sign_v1a(private_key, msg_id, timestamp, body))
    if signatures:
        headers["webhook-signature"] = " ".join(signatures)
    return headers
