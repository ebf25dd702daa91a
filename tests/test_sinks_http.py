"""The http sink: Standard Webhooks signatures a real consumer verifies, timeouts, and key
validation at construction."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from standardwebhooks import Webhook

from receiver.errors import ConfigError
from receiver.fakes.recorder import Recorder
from receiver.sinks import build_sink
from receiver.sinkspec import SinkSpec
from receiver.webhook_signing import parse_private_key, public_key_text, sign_v1, webhook_headers

from .sinkhelpers import deliver, make_event, served

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def recorder_server() -> Iterator[tuple[Recorder, str]]:
    yield from served(Recorder())


@pytest.fixture
def recorder(recorder_server: tuple[Recorder, str]) -> Recorder:
    recorder_server[0].reset()
    return recorder_server[0]


@pytest.fixture
def urls(recorder_server: tuple[Recorder, str]) -> dict[str, str]:
    return {"http": f"{recorder_server[1]}/hooks/evaluations?token=recorder-query-secret"}


@pytest.mark.anyio
async def test_a_slow_consumer_times_out_retryably(
    recorder: Recorder, urls: dict[str, str]
) -> None:
    recorder.fail_next(200, delay=0.5)
    error = await deliver("http", urls["http"], timeout=0.05)
    assert error is not None
    assert not error.permanent
    assert "Timeout" in str(error)


@pytest.mark.anyio
async def test_an_error_body_that_echoes_the_url_is_redacted(
    recorder: Recorder, urls: dict[str, str]
) -> None:
    recorder.fail_next(400, body=f"no such hook: {urls['http']} (recorder-query-secret)")
    error = await deliver("http", urls["http"])  # `deliver` checks nothing leaked
    assert error is not None
    assert "[redacted]" in str(error)


def ed25519_forms() -> list[tuple[str, Ed25519PrivateKey, str]]:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    seed = bytes(range(32))
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return [
        ("pem", key, pem),
        ("pem-escaped-newlines", key, pem.replace("\n", "\\n")),
        ("whsk-seed", key, "whsk_" + base64.b64encode(seed).decode()),
        ("whsk-keypair", key, "whsk_" + base64.b64encode(seed + public).decode()),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("secret", "private_key"),
    [(SECRET, None), *[(None, form) for _, _, form in ed25519_forms()], (SECRET, "both")],
    ids=["v1", *[name for name, _, _ in ed25519_forms()], "v1-and-v1a"],
)
async def test_the_http_consumer_verifies_the_standard_webhooks_signature(
    recorder: Recorder, urls: dict[str, str], secret: str | None, private_key: str | None
) -> None:
    forms = ed25519_forms()
    if private_key == "both":
        private_key = forms[0][2]
    options = {"secret": secret, "private_key": private_key, "timeout": 5}
    assert await deliver("http", urls["http"], **options) is None
    (got,) = recorder.received
    event = make_event()
    assert got.path == "/hooks/evaluations"
    assert got.json() == event
    assert got.headers["content-type"] == "application/cloudevents+json; charset=utf-8"
    assert got.headers["webhook-id"] == event["id"]
    assert got.headers["webhook-timestamp"].isdigit()
    signatures = dict(s.split(",", 1) for s in got.headers["webhook-signature"].split(" "))
    assert sorted(signatures) == sorted(
        (["v1"] if secret else []) + (["v1a"] if private_key else [])
    )
    if secret:
        assert Webhook(secret).verify(got.body, got.headers) == event
    if private_key:
        content = f"{got.headers['webhook-id']}.{got.headers['webhook-timestamp']}.".encode()
        forms[0][1].public_key().verify(base64.b64decode(signatures["v1a"]), content + got.body)


@pytest.mark.anyio
async def test_an_unsigned_http_sink_still_sends_id_and_timestamp(
    recorder: Recorder, urls: dict[str, str]
) -> None:
    assert await deliver("http", urls["http"]) is None
    headers = recorder.received[0].headers
    assert headers["webhook-id"] == make_event()["id"]
    assert "webhook-signature" not in headers


def test_v1_matches_the_standard_webhooks_test_vector() -> None:
    secret = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signature = sign_v1(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = webhook_headers("msg_1", 1614265330, body)
    assert headers == {"webhook-id": "msg_1", "webhook-timestamp": "1614265330"}


def test_the_public_key_text_is_whpk_base64_of_the_raw_key() -> None:
    key = parse_private_key("whsk_" + base64.b64encode(bytes(32)).decode())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public_key_text(key) == "whpk_" + base64.b64encode(raw).decode()


def other_pems() -> dict[str, str]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    plain = serialization.NoEncryption()
    locked = serialization.BestAvailableEncryption(b"pw")
    ed = Ed25519PrivateKey.generate()
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    return {
        "ec": ec_key.private_bytes(pem, pkcs8, plain).decode(),
        "encrypted": ed.private_bytes(pem, pkcs8, locked).decode(),
    }


PEMS = other_pems()
SEED = bytes(range(32))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"secret": "hunter2-not-prefixed"}, "secret must start with whsec_"),
        ({"secret": 12345}, "secret must start with whsec_"),
        ({"secret": "whsec_***not*base64***"}, "secret is not valid base64"),
        ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "got 5"),
        ({"secret": "whsec_" + base64.b64encode(bytes(65)).decode()}, "24 to 64 bytes"),
        ({"private_key": "hunter2-raw"}, "private_key must be a PEM private key or start"),
        ({"private_key": "whsk_" + base64.b64encode(bytes(16)).decode()}, "got 16"),
        ({"private_key": "whsk_" + base64.b64encode(SEED + bytes(32)).decode()}, "public half"),
        ({"private_key": "whsk_%%%"}, "private_key is not valid base64"),
        ({"private_key": PEMS["ec"]}, "private_key must be an Ed25519 key"),
        ({"private_key": PEMS["encrypted"]}, "not a readable, unencrypted PEM"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}, "PEM"),
        ({"timeout": 0}, "timeout must be more than 0"),
        ({"timeout": -1}, "timeout must be more than 0"),
        ({"timeout": float("inf")}, "timeout must be more than 0"),
        ({"timeout": 601}, "at most 600 seconds"),
        ({"timeout": "10"}, "timeout must be a number"),
        ({"timeout": True}, "timeout must be a number"),
    ],
)
def test_a_bad_key_or_timeout_is_a_config_error_naming_sink_and_key(
    options: dict[str, Any], message: str
) -> None:
    spec = SinkSpec(
        name="billing", type="http", url="https://billing.example/hooks", options=options
    )
    with pytest.raises(ConfigError) as caught:
        build_sink(spec, httpx.AsyncClient())
    assert str(caught.value).startswith("sink 'billing': ")
    assert message in str(caught.value)
    for value in options.values():
        if isinstance(value, str) and len(value) > 8:
            assert value not in str(caught.value)
            assert value.splitlines()[1 if "\n" in value else 0][:12] not in str(caught.value)
