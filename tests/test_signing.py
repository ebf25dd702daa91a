from __future__ import annotations

import hmac

import pytest

from receiver.signing import sign, verify

from .helpers import FIXTURES, SECRET_A, SECRET_B, SHARED_FIXTURES, SIGNATURES, fixture

SECRETS = (SECRET_A, SECRET_B)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_every_fixture_signature_verifies_with_its_secret(name: str) -> None:
    body = fixture(name)
    with_a, with_b = SIGNATURES[name]
    assert sign(body, SECRET_A) == with_a
    assert sign(body, SECRET_B) == with_b
    assert verify(body, with_a, SECRETS) == 0
    assert verify(body, with_b, SECRETS) == 1
    assert verify(body, with_b, (SECRET_A,)) is None


BODY = fixture("evaluation-completed.json")
GOOD = sign(BODY, SECRET_A)


@pytest.mark.parametrize(
    ("signature", "body", "expected"),
    [
        (GOOD, BODY, 0),
        (GOOD.upper(), BODY, 0),
        (sign(BODY, SECRET_B), BODY, 1),
        (None, BODY, None),
        ("", BODY, None),
        (GOOD[:63], BODY, None),
        (GOOD + "0", BODY, None),
        ("z" * 64, BODY, None),
        (" " * 64, BODY, None),
        (sign(fixture("evaluation-failed.json"), SECRET_A), BODY, None),
        (GOOD, BODY[:-2] + b"x}", None),
        (GOOD, BODY + b" ", None),
        (sign(BODY, "whsec_other"), BODY, None),
        (GOOD + "  ", BODY, 0),
        (f"\t{GOOD}\t", BODY, 0),
        (f"{GOOD[:32]} {GOOD[32:]}", BODY, None),
    ],
    ids=[
        "secret-a",
        "uppercase-hex",
        "secret-b",
        "missing",
        "empty",
        "63-chars",
        "65-chars",
        "non-hex",
        "spaces",
        "other-body",
        "one-byte-changed",
        "trailing-space",
        "unknown-secret",
        "header-trailing-spaces",
        "header-tabs",
        "header-space-inside",
    ],
)
def test_verify_table(signature: str | None, body: bytes, expected: int | None) -> None:
    assert verify(body, signature, SECRETS) == expected


def test_no_secrets_verifies_nothing() -> None:
    assert verify(BODY, GOOD, ()) is None


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="no ../shared beside this checkout")
def test_vendored_fixtures_match_shared() -> None:
    shared = {path.name: path.read_bytes() for path in SHARED_FIXTURES.iterdir()}
    vendored = {path.name: path.read_bytes() for path in FIXTURES.iterdir()}
    assert vendored == shared


@pytest.mark.parametrize("signed_by", [SECRET_A, SECRET_B, "whsec_other"])
def test_every_secret_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, signed_by: str
) -> None:
    """Whichever secret matches, or none: the same comparisons, each by compare_digest, so
    timing tells neither the signature nor which secret it was."""
    compared: list[int] = []
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    verify(b"{}", sign(b"{}", signed_by), [SECRET_A, SECRET_B])
    assert compared == [32, 32]
