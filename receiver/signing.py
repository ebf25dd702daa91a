"""Runflow callback signatures: HMAC-SHA256 over the raw body, lowercase hex (contract §1)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "runflow-signature"


def sign(body: bytes, secret: str) -> str:
    """The `Runflow-Signature` value for `body`; the whole secret (with `whsec_`) is the key."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str | None, secrets: Sequence[str]) -> int | None:
    """Index of the secret that signed `body`, or None.

    Every secret is compared, in constant time, so timing reveals neither the signature nor
    which secret matched. A malformed header (not 64 hex characters) never matches. Spaces
    and tabs around it are not part of the value (RFC 9110 §5.5; httptools keeps trailing ones).
    """
    if signature is not None:
        signature = signature.strip(" \t")
    if not signature or len(signature) != 64:
        return None
    try:
        given = bytes.fromhex(signature)
    except ValueError:
        return None
    matched = None
    for index, secret in enumerate(secrets):
        expected = hmac.new(secret.encode(), body, hashlib.sha256).digest()
        if hmac.compare_digest(expected, given) and matched is None:
            matched = index
    return matched
