"""One OpenRouter call: headers, one shared session, and error classification.

This is the one place where aiohttp and JSON errors and HTTP statuses become `pipeline.errors`
exceptions; a 200 body is read in `completions`, which finds the failures it may carry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from pipeline import __version__
from pipeline.completions import (
    RETRYABLE_STATUSES,
    Completion,
    as_dict,
    error_message,
    parse_completion,
)
from pipeline.errors import (
    AuthError,
    CreditsError,
    Kind,
    PermanentError,
    RetryableError,
    Throttle,
    TrustError,
    Unreachable,
)

if TYPE_CHECKING:
    from pipeline.config import JobConfig


class OpenRouterClient:
    """Sends chat completion bodies to `base_url` with one keep-alive session."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int,
        timeout: float,
        connect_timeout: float,
        referer: str | None = None,
        title: str | None = None,
        session_id: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.url = f"{base_url}/chat/completions"
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "User-Agent": f"prompt-pipeline/{__version__}",
        }
        if referer:
            headers["HTTP-Referer"] = referer
        if title:
            headers["X-Title"] = title
            headers["X-OpenRouter-Title"] = title
        if session_id:  # OpenRouter's sticky routing key: a header, so no request hash changes
            headers["x-session-id"] = session_id
        self._headers = headers
        self._concurrency = concurrency
        # No `sock_read`: equal to `total` it could never fire first, yet aiohttp would arm and
        # re-arm a timer for it on every request (benchmarks/run.py, client CPU per row).
        # And no rounding: aiohttp rounds a deadline over 5 s up to the loop's next whole
        # second, so a 10 s timeout would end a hung request after up to 11 s.
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, connect=connect_timeout, ceil_threshold=math.inf
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenRouterClient:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=self._concurrency, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def complete(self, body: bytes) -> Completion:
        """Send one request; return its completion or raise a `RequestError` / `JobStopped`."""
        data, generation_id = await self._post(self.url, body)
        return parse_completion(data, generation_id)

    async def post_json(self, path: str, body: bytes) -> tuple[dict[str, Any], str | None]:
        """POST `body` to `base_url + path` (`/embeddings`): the 200 answer's JSON object and
        generation id, or the `RequestError` / `JobStopped` a chat request would raise."""
        return await self._post(f"{self.base_url}{path}", body)

    async def _post(self, url: str, body: bytes) -> tuple[dict[str, Any], str | None]:
        assert self._session is not None, "use `async with OpenRouterClient(...)`"
        generation_id = None
        try:
            # Redirects are not followed: the key must never be sent to another host.
            async with self._session.post(url, data=body, allow_redirects=False) as resp:
                generation_id = resp.headers.get("X-Generation-Id")
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except aiohttp.ClientConnectorCertificateError as exc:
            raise self._untrusted(exc) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing reached the server: nothing was billed.
            raise RetryableError(Kind.CONNECTION_FAILED, str(self._unreachable(exc))) from None
        except TimeoutError:
            raise RetryableError(
                Kind.TIMEOUT,
                "no complete answer within the timeout (request.timeout / --timeout)",
                generation_id=generation_id,
            ) from None
        except aiohttp.ClientPayloadError as exc:
            raise RetryableError(
                Kind.CONNECTION_DROPPED,
                f"the connection dropped mid-answer: {_short(exc)}",
                generation_id=generation_id,
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise RetryableError(
                Kind.CONNECTION_DROPPED,
                f"the server closed the connection: {_short(exc)}",
                generation_id=generation_id,
            ) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(
                Kind.CONNECTION_ERROR, _short(exc), generation_id=generation_id
            ) from None

        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status != 200:
            raise _status_error(status, data, headers, raw, generation_id)
        if not isinstance(data, dict):
            what = "only whitespace" if not raw.strip() else "not valid JSON"
            raise RetryableError(
                Kind.INVALID_JSON,
                f"the answer was {what} ({len(raw)} bytes)",
                status=200,
                generation_id=generation_id,
            )
        return data, generation_id

    async def get_json(self, path: str, **params: str) -> Any:
        """GET `base_url + path` (e.g. `/models`, `/key`); None unless it answered 200 with JSON."""
        status, body = await self.get_status_json(path, **params)
        return body if status == 200 else None

    async def get_status_json(self, path: str, **params: str) -> tuple[int, Any]:
        """Like `get_json`, with the status (0 when no response came)."""
        try:
            return await self.fetch_json(path, params=params)
        except Unreachable:
            return 0, None

    async def fetch_json(
        self, path: str, *, params: dict[str, str] | None = None, post: bytes | None = None,
        base: str | None = None, decode: Callable[[bytes], Any] = json.loads,
    ) -> tuple[int, Any]:  # fmt: skip
        """GET `base_url + path` (POST `post` if given; another `base` for the Batch API): the
        status and the JSON body (None if not JSON). Raises `Unreachable` when no response
        came (`connected` says whether the connection was made), `TrustError` when the
        certificate does not verify."""
        assert self._session is not None, "use `async with OpenRouterClient(...)`"
        method = "GET" if post is None else "POST"
        try:
            async with self._session.request(
                method, (base or self.base_url) + path, params=params, data=post,
                allow_redirects=False,
            ) as resp:  # fmt: skip
                raw = await resp.read()
                try:
                    return resp.status, decode(raw)
                except ValueError:
                    return resp.status, None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise self._untrusted(exc) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise self._unreachable(exc) from None
        except TimeoutError:
            raise Unreachable(
                f"no answer from {self.base_url}{path} within the timeout",
                "no answer within the timeout (request.timeout / --timeout)",
                connected=True,
            ) from None
        except aiohttp.ClientError as exc:
            cause = f"the server closed the connection: {_short(exc)}"
            raise Unreachable(f"{self.base_url}{path}: {cause}", cause, connected=True) from None

    def _unreachable(self, exc: aiohttp.ClientError) -> Unreachable:
        """Why a connection to the endpoint could not be made, in a user's words."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            cause = "no connection within the connect timeout (request.connect_timeout)"
        elif isinstance(exc, aiohttp.ClientSSLError):
            cause = f"TLS handshake failed ({_short(exc.os_error)})"
        elif isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
            exc.os_error, socket.gaierror
        ):
            cause = f"host {exc.host!r} not found ({exc.os_error.strerror})"
        elif isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
            # By errno: asyncio words a refusal "Connect call failed ('127.0.0.1', 8089)".
            cause = os.strerror(exc.os_error.errno).lower()
        else:
            cause = _short(exc)
        return Unreachable(f"cannot reach {self.base_url}: {cause}", cause, connected=False)

    def _untrusted(self, exc: aiohttp.ClientConnectorCertificateError) -> TrustError:
        return TrustError(
            f"the TLS certificate of {self.url} does not verify ({_short(exc)}); fix the endpoint's "
            "certificate or the system's CA bundle (SSL_CERT_FILE): verification stays on"
        )


@contextlib.asynccontextmanager
async def connect(config: JobConfig, api_key: str) -> AsyncIterator[OpenRouterClient]:
    """A client for the job's endpoint; with `request.simulate`, a simulator started for it."""
    async with contextlib.AsyncExitStack() as stack:
        base_url = config.request.base_url
        if config.request.simulate:
            from pipeline.simulator import serve

            base_url = (await stack.enter_async_context(serve())).base_url
        req = config.request
        yield await stack.enter_async_context(
            OpenRouterClient(
                base_url, api_key, concurrency=config.limits.concurrency, timeout=req.timeout,
                connect_timeout=req.connect_timeout, referer=req.referer, title=req.title,
                session_id=session_id(config),
            )
        )  # fmt: skip


def session_id(config: JobConfig) -> str | None:
    """The job's session for OpenRouter's sticky routing, when its rows share a system prompt
    a provider may cache: every request of the job then goes to the provider that served the
    first (OpenRouter's default key includes each row's own first message, so batch rows
    would not stick). Named after what the job asks, so a resume keeps it; other endpoints
    ignore the header."""
    prompt, request = config.prompt, config.request
    shared = prompt.system or request.labels or request.response_schema
    if prompt.cache_prefix == "off" or not shared:
        return None
    return f"prompt-pipeline-{config.fingerprint_hash()}"


def _status_error(
    status: int, data: Any, headers: Any, raw: bytes, generation_id: str | None
) -> Exception:
    error = data.get("error") if isinstance(data, dict) else None
    message = (
        error_message(error)
        if isinstance(error, dict)
        else raw[:200].decode(errors="replace").strip()
    )
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status == 401:
        return AuthError(
            f"{text}. The API key was refused: check OPENROUTER_API_KEY (or request.key_file), then re-run the same command to resume."
        )
    if status == 402:
        return CreditsError(
            f"{text}. Add credits (https://openrouter.ai/settings/credits) or lower request.max_tokens, then re-run the same command to resume."
        )
    retryable = status in RETRYABLE_STATUSES or status >= 500
    if (
        status == 404
        and isinstance(error, dict)
        and (error.get("availability") or {}).get("retryable")
    ):
        retryable = True
    kind = Kind.http(status)
    if retryable:
        return RetryableError(
            kind,
            text,
            status=status,
            retry_after=_retry_after(headers),
            generation_id=generation_id,
            throttle=throttled_by(error, headers) if status == 429 else None,
        )
    return PermanentError(kind, text, status=status, generation_id=generation_id)


def throttled_by(error: Any, headers: Any) -> Throttle:
    """Whose limit a 429 is. OpenRouter's own (free-model caps, shared capacity) names an
    `openrouter_*` limit source or says in `X-RateLimit-Remaining` (a header, or repeated in
    `metadata.headers`; OpenAI's `-requests` / `-tokens` too) that nothing remains: the key is
    limited. One that names an upstream limit source, provider, its raw error or code is that
    provider throttling this request. Anything else is unknown."""
    metadata = as_dict(as_dict(error).get("metadata"))
    source = str(metadata.get("limit_source") or "")
    if source.startswith("openrouter"):
        return Throttle.KEY
    if source.startswith("upstream"):
        return Throttle.UPSTREAM
    told = [*as_dict(metadata.get("headers")).items(), *(headers.items() if headers else ())]
    if any(
        str(name).lower().startswith("x-ratelimit-remaining") and str(value).strip() == "0"
        for name, value in told
    ):
        return Throttle.KEY
    if any(metadata.get(name) for name in ("provider_name", "raw", "provider_code")):
        return Throttle.UPSTREAM
    return Throttle.UNKNOWN


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait: `Retry-After` (seconds or an HTTP date), else `X-RateLimit-Reset` (epoch ms)."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(float(value), 0.0)
        except ValueError:
            try:
                return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
            except (TypeError, ValueError):
                pass
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(float(reset) / 1000 - time.time(), 0.0)
        except ValueError:
            return None
    return None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
