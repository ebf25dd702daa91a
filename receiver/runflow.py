"""The Runflow API client. Only the configured origin is ever contacted, ids must be UUIDs
before they enter a URL, redirects are not followed, and errors are mapped per
runflow-contract.md §5 (5xx and 429 retryable; other 4xx not)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from .errors import ReceiverError
from .retry import parse_retry_after


class RunflowError(ReceiverError):
    """Runflow refused or could not be reached. `retryable` says whether trying later helps."""

    status = 502

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


def evaluation_path(evaluation_id: str) -> str:
    try:
        canonical = uuid.UUID(evaluation_id)
    except (ValueError, AttributeError, TypeError):
        raise RunflowError(f"evaluation id {evaluation_id!r} is not a UUID; not fetched") from None
    return f"/v1/evaluations/{canonical}"


class RunflowClient:
    def __init__(
        self, http: httpx.AsyncClient, *, base: str, api_key: str, org_id: str | None = None
    ) -> None:
        self._http = http
        self._base = base.rstrip("/")
        self._headers = {"authorization": f"Bearer {api_key}", "accept": "application/json"}
        if org_id:
            self._headers["x-organization-id"] = org_id

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = self._base + path
        try:
            response = await self._http.request(
                method, url, headers=self._headers, follow_redirects=False, **kwargs
            )
        except httpx.TimeoutException:
            raise RunflowError(f"Runflow {method} {path} timed out", retryable=True) from None
        except httpx.HTTPError as exc:
            raise RunflowError(
                f"Runflow {method} {path} failed: {type(exc).__name__}", retryable=True
            ) from None
        if response.is_success:
            try:
                return response.json()
            except ValueError:
                raise RunflowError(
                    f"Runflow {method} {path} answered {response.status_code} with no JSON",
                    retryable=True,
                ) from None
        raise _error(method, path, response)

    async def get_evaluation(self, evaluation_id: str, embeds: Sequence[str] = ()) -> Any:
        params = {"embed": ",".join(embeds)} if embeds else None
        return await self._request("GET", evaluation_path(evaluation_id), params=params)


def _error(method: str, path: str, response: httpx.Response) -> RunflowError:
    code = message = None
    try:
        body = response.json()
        if isinstance(body, dict):
            code, message = body.get("code"), body.get("message")
    except ValueError:
        pass
    status = response.status_code
    detail = f"{code}: {message}" if code or message else response.reason_phrase
    return RunflowError(
        f"Runflow {method} {path} answered {status} ({detail})",
        http_status=status,
        code=code if isinstance(code, str) else None,
        retryable=status == 429 or status >= 500,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )
