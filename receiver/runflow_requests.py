"""What may be sent to Runflow, checked against the documented limits (runflow-contract.md §4).

Pure: no I/O. The client uses it to refuse a bad request before any network call (a one-line
`BadRequest` naming the field); the fake Runflow uses the same rules to answer 422 the way
Runflow does, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import BadRequest

TASK_TYPE_MAX = 100
CLIENT_REF_MAX = 255
REFERENCE_IMAGES_MAX = 4
CALLBACK_URL_MAX = 2048
REASON_MAX = 2000
IDEMPOTENCY_KEY_MAX = 255
JOB_CLASSES = ("standard",)  # the contract's one class
OPTIONAL_TEXT = ("task_description", "generation_prompt", "evaluation_instructions", "job_class")


@dataclass(frozen=True)
class Problem:
    """One invalid field; `message` is a whole sentence that starts with the field name."""

    field: str
    message: str


@dataclass(frozen=True)
class SubmitRequest:
    """The body of `POST /v1/evaluations`. Unset (None) fields are not sent."""

    generated_image_url: str
    task_type: str
    task_description: str | None = None
    generation_prompt: str | None = None
    evaluation_instructions: str | None = None
    input_attributes: Mapping[str, Any] | None = None
    reference_images: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    run_id: str | None = None
    client_ref: str | None = None
    job_class: str | None = None
    callback_url: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubmitRequest:
        """Build from a plain mapping; an unknown key is refused, since a typo would otherwise
        be silently dropped (`client_reference` for `client_ref`)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; expected one of {', '.join(known)}")
        values = dict(data)
        images = values.get("reference_images")
        if isinstance(images, list | tuple):
            values["reference_images"] = tuple(images)
        elif images is None:
            values.pop("reference_images", None)
        values.setdefault("generated_image_url", None)
        values.setdefault("task_type", None)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The JSON body (None fields left out); values are passed through unchecked."""
        body: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "reference_images":
                if not value:
                    continue
                if isinstance(value, list | tuple):
                    value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            if value is not None:
                body[item.name] = value
        return body

    def validated_json(self, *, allow_http_callbacks: bool = False) -> dict[str, Any]:
        """`to_json()` after checking it; BadRequest naming the first bad field otherwise."""
        body = self.to_json()
        problems = submit_problems(body, allow_http_callbacks=allow_http_callbacks)
        if problems:
            raise BadRequest(problems[0].message)
        return body


def submit_problems(
    body: Mapping[str, Any], *, allow_http_callbacks: bool = False
) -> list[Problem]:
    """Every documented limit `body` breaks, in field order (empty when it is valid).

    `allow_http_callbacks` also accepts `http://` callback URLs on loopback hosts: Runflow
    itself requires HTTPS, but a local receiver under test listens on plain HTTP.
    """
    problems: list[Problem] = []

    def add(name: str, message: str) -> None:
        problems.append(Problem(name, f"{name} {message}"))

    url = body.get("generated_image_url")
    if url is None or url == "":
        add("generated_image_url", "is required")
    elif not isinstance(url, str):
        add("generated_image_url", "must be a string")
    task_type = body.get("task_type")
    if task_type is None:
        add("task_type", "is required")
    elif not isinstance(task_type, str):
        add("task_type", "must be a string")
    elif not 1 <= len(task_type) <= TASK_TYPE_MAX:
        add("task_type", f"must be 1 to {TASK_TYPE_MAX} characters")
    for name in OPTIONAL_TEXT:
        if body.get(name) is not None and not isinstance(body[name], str):
            add(name, "must be a string")
    attributes = body.get("input_attributes")
    if attributes is not None and not isinstance(attributes, Mapping):
        add("input_attributes", "must be an object")
    for problem in _reference_image_problems(body.get("reference_images")):
        add(*problem)
    run_id = body.get("run_id")
    if run_id is not None and not is_uuid(run_id):
        add("run_id", "must be a UUID")
    if isinstance(body.get("job_class"), str) and body["job_class"] not in JOB_CLASSES:
        add("job_class", f"must be one of {', '.join(JOB_CLASSES)}")
    client_ref = body.get("client_ref")
    if client_ref is not None:
        if not isinstance(client_ref, str):
            add("client_ref", "must be a string")
        elif len(client_ref) > CLIENT_REF_MAX:
            add("client_ref", f"must be at most {CLIENT_REF_MAX} characters")
    callback = body.get("callback_url")
    if callback is not None:
        if not isinstance(callback, str):
            add("callback_url", "must be a string")
        elif len(callback) > CALLBACK_URL_MAX:
            add("callback_url", f"must be at most {CALLBACK_URL_MAX} characters")
        elif not callback_url_allowed(callback, allow_http=allow_http_callbacks):
            hint = " (or http on a loopback host)" if allow_http_callbacks else ""
            add("callback_url", f"must be an https URL{hint}")
    return problems


def _reference_image_problems(images: Any) -> list[tuple[str, str]]:
    if images is None:
        return []
    if not isinstance(images, list | tuple):
        return [("reference_images", "must be a list")]
    if len(images) > REFERENCE_IMAGES_MAX:
        return [("reference_images", f"must have at most {REFERENCE_IMAGES_MAX} items")]
    problems = []
    for index, image in enumerate(images):
        name = f"reference_images[{index}]"
        if not isinstance(image, Mapping):
            problems.append((name, "must be an object"))
            continue
        if not isinstance(image.get("url"), str) or not image["url"]:
            problems.append((f"{name}.url", "is required"))
        for key in ("kind", "description"):
            if image.get(key) is not None and not isinstance(image[key], str):
                problems.append((f"{name}.{key}", "must be a string"))
    return problems


def callback_url_allowed(url: str, *, allow_http: bool = False) -> bool:
    """An absolute https URL with a host; plain http only on loopback, and only if allowed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    return allow_http and parts.scheme == "http" and is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def feedback_problems(body: Mapping[str, Any]) -> list[Problem]:
    """What is wrong with a feedback body `{is_positive, reason?}` (contract §4)."""
    if "is_positive" not in body:
        return [Problem("is_positive", "is_positive is required")]
    is_positive = body["is_positive"]
    if is_positive is not None and not isinstance(is_positive, bool):
        return [Problem("is_positive", "is_positive must be true, false or null")]
    reason = body.get("reason")
    if is_positive is None or reason is None:
        return []  # a reason that comes with a cleared rating is dropped, not refused
    if not isinstance(reason, str) or not 1 <= len(reason) <= REASON_MAX:
        return [Problem("reason", f"reason must be 1 to {REASON_MAX} characters")]
    return []


def validate_feedback(is_positive: bool | None, reason: str | None = None) -> dict[str, Any]:
    """The body to send; BadRequest when it breaks a limit. The reason is dropped when the
    rating is cleared, as Runflow would drop it."""
    body: dict[str, Any] = {"is_positive": is_positive}
    if is_positive is not None and reason is not None:
        body["reason"] = reason
    problems = feedback_problems(body)
    if problems:
        raise BadRequest(problems[0].message)
    return body


def canonical_json(body: Any) -> bytes:
    """Sorted keys, no spaces: equal requests give equal bytes, whatever their key order."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def derive_idempotency_key(body: Mapping[str, Any]) -> str:
    """`receiver-<sha256>` of the canonical body: resubmitting the same request (a retry, a
    rerun script) never creates or bills a second evaluation. Pass an explicit key to ask for
    a deliberate second evaluation of the same image."""
    return "receiver-" + hashlib.sha256(canonical_json(body)).hexdigest()


def check_idempotency_key(key: str) -> str:
    """A given key must fit in a header: 1-255 printable ASCII characters."""
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX
        or not all(" " < char <= "~" for char in key)
    ):
        raise BadRequest(
            f"idempotency_key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters "
            "without spaces"
        )
    return key
