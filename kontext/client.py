"""An async client for Replicate's predictions API (or any Replicate-compatible base URL).

One `ReplicateClient` wraps one `httpx.AsyncClient` for the API origin and a second, credential-free
one for output files, which live on another origin (``replicate.delivery``) and need no token: the
``Authorization`` header is attached only to requests whose origin is the API's.

Everything HTTP lives here and nowhere else: the auth header, the base URL, ``Prefer: wait``,
``Cancel-After``, ``Retry-After``, the rate-limit headers, both response shapes, retries (by the
rules of `kontext.retry`) and verified, atomic downloads.

Example:
    ```python
    import asyncio
    from kontext.client import ReplicateClient

    async def main():
        async with ReplicateClient() as client:  # REPLICATE_API_TOKEN / REPLICATE_BASE_URL
            prediction = await client.create_prediction(
                {"prompt": "Make the mug red", "input_image": "mug.jpg", "output_format": "jpg"}
            )
            prediction = await client.wait_for_prediction(prediction, timeout=300)
            client.raise_for_status(prediction)
            saved = await client.download_output(prediction.output_urls[0], "out/mug.jpg",
                                                 expected_format="jpg")
            print(saved.path, saved.width, saved.height)

    asyncio.run(main())
    ```
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from kontext import __version__
from kontext.errors import (
    AmbiguousCreateError,
    APIError,
    APIValidationError,
    AuthenticationError,
    BillingError,
    ConfigurationError,
    DownloadError,
    IncompleteDownloadError,
    InputValidationError,
    InvalidImageError,
    NotFoundError,
    OutputExpiredError,
    PredictionAbortedError,
    PredictionCanceledError,
    PredictionFailedError,
    PredictionTimeoutError,
    ServerError,
    ThrottledError,
    TransportError,
    redact,
)
from kontext.ratelimit import RateLimiter
from kontext.retry import CallKind, RetryPolicy
from kontext.schema import MODEL, PIL_FORMATS, EditInput, Prediction, input_image_kind, local_path

logger = logging.getLogger("kontext.client")

DEFAULT_BASE_URL = "https://api.replicate.com"
#: Local files up to this size are sent inline as data: URIs; larger ones are uploaded first.
DATA_URI_LIMIT = 256 * 1024
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0, pool=None)
_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # request never left


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    url = httpx.URL(str(url))
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, port)


class _BearerForOrigin(httpx.Auth):
    """Adds the bearer token to requests for one origin only, so it can never leak elsewhere."""

    def __init__(self, token: str, origin: tuple[str, str, int | None]):
        self._token = token
        self._origin = origin

    def auth_flow(self, request: httpx.Request):  # type: ignore[override]
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._token}"
        else:
            request.headers.pop("Authorization", None)
        yield request


@dataclass(frozen=True)
class DownloadedFile:
    """A verified output file on disk."""

    path: Path
    sha256: str
    size: int
    width: int
    height: int
    format: str
    content_type: str | None


def _retry_after_seconds(response: httpx.Response, body: Mapping[str, Any] | None) -> float | None:
    """The longer of the ``Retry-After`` header (seconds or HTTP date) and the body's value."""
    waits: list[float] = []
    header = response.headers.get("retry-after")
    if header:
        try:
            waits.append(float(header))
        except ValueError:
            when = email.utils.parsedate_to_datetime(header) if header else None
            if when is not None:
                waits.append(max(0.0, (when - datetime.now(UTC)).total_seconds()))
    if body and isinstance(body.get("retry_after"), int | float):
        waits.append(float(body["retry_after"]))
    return max(waits) if waits else None


def format_cancel_after(seconds: float) -> str:
    """Format a duration for the ``Cancel-After`` header (``90`` -> ``1m30s``; minimum 5 s)."""
    seconds = max(5, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


class ReplicateClient:
    """Async client for the predictions API of one model.

    Args:
        api_token: The API token; default ``REPLICATE_API_TOKEN``.
        base_url: API base without ``/v1``; default ``REPLICATE_BASE_URL`` or
            ``https://api.replicate.com``. Proxies such as ``https://www.kkiai.com/replicate`` work.
        model: ``owner/name`` of an official model.
        prefer_wait: Seconds a create may be held open waiting for the result (``Prefer: wait=N``,
            1-60), or None to return at once. Within the window a prediction costs one call.
        timeout: httpx timeout for API calls (a create's read timeout is extended by `prefer_wait`).
        retry: The `RetryPolicy`.
        rate_limiter: A `RateLimiter` every create waits on; share one across concurrent callers.
        max_connections: Connection pool size; make it at least the number of calls in flight.
        verify: TLS verification for the API and for downloads (on by default).
        max_download_bytes: Larger outputs are refused.
        transport, download_transport: httpx transports (for tests).
    """

    def __init__(
        self,
        api_token: str | None = None,
        base_url: str | None = None,
        *,
        model: str = MODEL,
        prefer_wait: int | None = 10,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        rate_limiter: RateLimiter | None = None,
        max_connections: int = 100,
        verify: bool = True,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        download_transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        token = api_token if api_token is not None else os.environ.get("REPLICATE_API_TOKEN")
        if not token:
            raise ConfigurationError(
                "No Replicate API token: pass api_token, set REPLICATE_API_TOKEN, or use a "
                "ReplicateCredentials block."
            )
        base = (base_url or os.environ.get("REPLICATE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        base = base.removesuffix("/v1")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"base_url must be an http(s) URL, got {base!r}")
        if model.count("/") != 1:
            raise ConfigurationError(f"model must be 'owner/name', got {model!r}")
        if prefer_wait is not None and not 1 <= prefer_wait <= 60:
            raise ConfigurationError("prefer_wait must be between 1 and 60 seconds, or None")
        self._token = token
        self.base_url = base
        self.model = model
        self.prefer_wait = prefer_wait
        self.retry = retry or RetryPolicy()
        self.rate_limiter = rate_limiter
        self.max_download_bytes = max_download_bytes
        self._sleep = sleep
        self._clock = clock
        #: Where retries and other notable events are logged (a Prefect run logger in a flow).
        self.log: logging.Logger | logging.LoggerAdapter[Any] = logger
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._uploads: dict[tuple[str, int, int], str] = {}
        # Few idle connections: httpcore checks every pooled connection on each request, and a pool
        # of 128 idle keep-alives cost a quarter of the flow's CPU at 10,000 rows (B4 profile).
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(max_connections, 16)
        )
        headers = {"User-Agent": f"prefect-flux-kontext/{__version__} httpx/{httpx.__version__}"}
        self._http = httpx.AsyncClient(
            base_url=base,
            auth=_BearerForOrigin(token, _origin(base)),
            headers=headers,
            timeout=self._timeout,
            limits=limits,
            verify=verify,
            transport=transport,
        )
        # Output files live on another origin and need no credentials: a client without auth.
        self._downloads = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(60.0, connect=10.0, pool=None),
            limits=limits,
            verify=verify,
            follow_redirects=True,
            transport=download_transport,
        )

    def __repr__(self) -> str:
        return f"ReplicateClient(base_url={self.base_url!r}, model={self.model!r})"

    async def __aenter__(self) -> ReplicateClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    # ------------------------------------------------------------------ requests and errors

    def _redact(self, text: str) -> str:
        return redact(text, [self._token])

    def _error_from(self, response: httpx.Response, method: str, path: str) -> APIError:
        body: dict[str, Any] | None = None
        try:
            decoded = response.json()
            body = decoded if isinstance(decoded, dict) else None
        except ValueError:
            pass
        if body is not None:
            detail = str(body.get("detail") or body.get("title") or body)
            title = body.get("title")
            body = {k: (self._redact(v) if isinstance(v, str) else v) for k, v in body.items()}
        else:
            detail = response.text[:300] or response.reason_phrase
            title = None
        detail = self._redact(detail.strip())
        title = self._redact(str(title)) if title else None
        code = response.status_code
        kwargs: dict[str, Any] = {"title": title, "body": body, "method": method, "path": path}
        if code == 401:
            return AuthenticationError(code, detail, **kwargs)
        if code == 402:
            return BillingError(code, detail, **kwargs)
        if code == 404:
            return NotFoundError(code, detail, **kwargs)
        if code == 422:
            return APIValidationError(code, detail, **kwargs)
        if code == 429:
            return ThrottledError(code, detail, retry_after=_retry_after_seconds(response, body), **kwargs)
        if code >= 500:
            return ServerError(code, detail, **kwargs)
        return APIError(code, detail, **kwargs)

    def _observe_rate_limit(self, kind: CallKind, response: httpx.Response) -> None:
        """At zero ``ratelimit-remaining``, space the next create by one token of our own pace.

        Not by the whole ``ratelimit-reset``: that is when the server's bucket is full again
        (whole seconds), and waiting for it would idle every create for a second at a time.
        """
        if kind != "create" or self.rate_limiter is None:
            return
        try:
            remaining = float(response.headers.get("ratelimit-remaining", "1"))
        except ValueError:
            return
        if remaining < 1:
            self.rate_limiter.hold_off(self.rate_limiter.interval)

    async def _request(
        self,
        kind: CallKind,
        method: str,
        url: str,
        *,
        create_input: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one API call under the retry policy; raise a typed error when it fails for good."""
        path = urlsplit(url).path or url
        attempt = 0
        while True:
            attempt += 1
            if kind == "create" and self.rate_limiter is not None:
                await self.rate_limiter.acquire()
            sent_at = datetime.now(UTC)
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.HTTPError as exc:
                reason = self._redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
                error: Exception = TransportError(f"{method} {path}: {reason}")
                if kind == "create" and not isinstance(exc, _SENT):
                    raise AmbiguousCreateError(
                        f"create may have succeeded but its response was lost ({reason})",
                        input=create_input or {},
                        sent_at=sent_at,
                    ) from None
            else:
                self._observe_rate_limit(kind, response)
                if response.is_success:
                    return response
                error = self._error_from(response, method, path)
                if kind == "create" and isinstance(error, ServerError):
                    raise AmbiguousCreateError(
                        f"create answered {response.status_code}; a prediction may exist ({error.detail})",
                        input=create_input or {},
                        sent_at=sent_at,
                    ) from None
            if not self.retry.should_retry(kind, error, attempt):
                raise error
            delay = self.retry.delay(attempt, error)
            self.log.warning("%s %s failed (%s); retry %d in %.2fs", method, path, error, attempt, delay)
            if kind == "create" and isinstance(error, ThrottledError) and self.rate_limiter:
                self.rate_limiter.hold_off(delay)  # every create waits, not just this one
            else:
                await self._sleep(delay)

    def _prediction(self, response: httpx.Response) -> Prediction:
        try:
            return Prediction.from_api(response.json())
        except ValueError as exc:
            raise APIError(response.status_code, self._redact(f"unexpected response body: {exc}")) from None

    # ------------------------------------------------------------------ predictions

    async def prepare_input_image(self, input_image: str) -> str:
        """Return a value the API accepts for ``input_image``.

        URLs and data URIs pass through. A local file becomes a data URI when it is at most
        256 KB, and is uploaded through ``POST /v1/files`` when larger (once per file per client).
        """
        if input_image_kind(input_image) != "file":
            return input_image
        path = local_path(input_image)
        try:
            stat = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise InputValidationError(
                [("input_image", f"cannot read {str(path)!r}: {exc.strerror}")]
            ) from None
        content_type = _image_content_type(data, path)
        if len(data) <= DATA_URI_LIMIT:
            return f"data:{content_type};base64,{base64.b64encode(data).decode()}"
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._uploads:
            self._uploads[key] = await self.upload_file(data, path.name, content_type)
        return self._uploads[key]

    async def upload_file(self, data: bytes, filename: str, content_type: str) -> str:
        """Upload bytes through ``POST /v1/files``; return the URL to pass as an input."""
        response = await self._request(
            "read", "POST", "/v1/files", files={"content": (filename, data, content_type)}
        )
        body = response.json()
        url = (body.get("urls") or {}).get("get")
        if not url:
            raise APIError(response.status_code, "file upload response has no urls.get")
        return url

    async def create_prediction(
        self,
        input: EditInput | Mapping[str, Any],
        *,
        prefer_wait: int | None | type[Ellipsis] = ...,
        cancel_after: float | str | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> Prediction:
        """Create a prediction (``POST /v1/models/{owner}/{name}/predictions``).

        The input is validated first (`InputValidationError`, nothing sent). A throttled create is
        retried after the wait the API asks for; a create whose outcome is unknown (timeout,
        dropped connection, 5xx) raises `AmbiguousCreateError` instead of risking a second charge.

        Args:
            input: An `EditInput` or a mapping validated into one.
            prefer_wait: Override the client's ``Prefer: wait`` seconds (None: do not wait).
            cancel_after: Server-side deadline, seconds or a string such as ``"5m"``.
            webhook, webhook_events_filter: Passed through.
        """
        edit = input if isinstance(input, EditInput) else EditInput.parse(dict(input))
        body: dict[str, Any] = {"input": edit.to_api(await self.prepare_input_image(edit.input_image))}
        if webhook:
            body["webhook"] = webhook
        if webhook_events_filter:
            body["webhook_events_filter"] = webhook_events_filter
        wait = self.prefer_wait if prefer_wait is ... else prefer_wait
        headers = {}
        timeout = self._timeout
        if wait:
            headers["Prefer"] = f"wait={int(wait)}"
            timeout = httpx.Timeout(
                connect=self._timeout.connect,
                read=(self._timeout.read or 30.0) + wait,
                write=self._timeout.write,
                pool=self._timeout.pool,
            )
        if cancel_after is not None:
            headers["Cancel-After"] = (
                cancel_after if isinstance(cancel_after, str) else format_cancel_after(cancel_after)
            )
        response = await self._request(
            "create",
            "POST",
            f"/v1/models/{self.model}/predictions",
            json=body,
            headers=headers,
            timeout=timeout,
            create_input=body["input"],
        )
        prediction = self._prediction(response)
        logger.debug("created prediction %s (%s)", prediction.id, prediction.status)
        return prediction

    async def get_prediction(self, prediction_id: str) -> Prediction:
        """``GET /v1/predictions/{id}`` (retried on 429, 5xx and connection errors)."""
        response = await self._request("read", "GET", f"/v1/predictions/{prediction_id}")
        return self._prediction(response)

    async def cancel_prediction(self, prediction_id: str) -> Prediction:
        """``POST /v1/predictions/{id}/cancel``; returns the prediction as the API left it."""
        response = await self._request("cancel", "POST", f"/v1/predictions/{prediction_id}/cancel")
        return self._prediction(response)

    async def list_predictions(
        self,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> AsyncIterator[Prediction]:
        """Iterate over the account's predictions, newest first, following ``next`` pages."""
        params = {}
        if created_after is not None:
            params["created_after"] = created_after.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if created_before is not None:
            params["created_before"] = created_before.astimezone(UTC).isoformat().replace("+00:00", "Z")
        url: str | None = "/v1/predictions"
        query: dict[str, str] | None = params  # the next pages carry their own query string
        seen: set[str] = set()
        while url and url not in seen:
            seen.add(url)
            if url.startswith("http") and _origin(url) != _origin(self.base_url):
                raise APIError(200, "the predictions list pointed at another origin; not followed")
            response = await self._request("read", "GET", url, params=query)
            query = None
            page = response.json()
            for item in page.get("results") or []:
                yield Prediction.from_api(item)
            url = page.get("next")

    async def find_prediction(
        self,
        input: Mapping[str, Any],
        sent_at: datetime,
        *,
        window: timedelta = timedelta(minutes=5),
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> Prediction | None:
        """Find the prediction an ambiguous create made, by its input and creation time.

        Args:
            input: The ``input`` that was sent, or its `input_fingerprint`.
            sent_at: When it was sent; predictions created within `window` of it are compared.
            exclude: Prediction ids already accounted for (never adopted twice).

        Returns:
            The oldest prediction whose input matches every sent field, or None.
        """
        wanted = input_fingerprint(input)
        matches = []
        async for prediction in self.list_predictions(sent_at - window, sent_at + window):
            if prediction.id in exclude:
                continue
            have = input_fingerprint(prediction.input)
            if all(have.get(key) == value for key, value in wanted.items()):
                matches.append(prediction)
        if not matches:
            return None
        return min(matches, key=lambda p: p.created_at or datetime.max.replace(tzinfo=UTC))

    async def wait_for_prediction(
        self,
        prediction: Prediction | str,
        *,
        timeout: float | None = 600.0,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        cancel_on_timeout: bool = True,
        on_update: Callable[[Prediction], Any] | None = None,
    ) -> Prediction:
        """Poll until the prediction is terminal, backing off from `poll_interval` to the cap.

        At the deadline (`timeout` seconds from now) the prediction is canceled (unless
        `cancel_on_timeout` is False) and `PredictionTimeoutError` is raised. A terminal
        prediction is returned whatever its status: see `raise_for_status`.
        """
        current = prediction if isinstance(prediction, Prediction) else None
        if current is None:
            current = await self.get_prediction(str(prediction))
        deadline = None if timeout is None else self._clock() + timeout
        interval = poll_interval
        while not current.is_terminal:
            if current.synthetic:
                raise APIError(200, "a proxy-shaped prediction cannot be polled")
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                raise await self._timed_out(current, timeout, cancel_on_timeout)
            await self._sleep(interval if remaining is None else min(interval, remaining))
            current = await self.get_prediction(current.id)
            if on_update is not None:
                on_update(current)
            interval = min(max_poll_interval, interval * 1.5)
        return current

    async def _timed_out(
        self, prediction: Prediction, timeout: float | None, cancel: bool
    ) -> PredictionTimeoutError:
        canceled = False
        if cancel:
            try:
                prediction = await self.cancel_prediction(prediction.id)
                canceled = prediction.status in ("canceled", "aborted")
            except APIError as exc:
                self.log.warning("cancel of %s after its deadline failed: %s", prediction.id, exc)
        what = "canceled" if canceled else ("cancel failed" if cancel else "left running")
        return PredictionTimeoutError(
            f"prediction {prediction.id} did not finish within {timeout:g}s ({what}; "
            f"last status {prediction.status})",
            prediction,
            canceled=canceled,
        )

    @staticmethod
    def raise_for_status(prediction: Prediction) -> Prediction:
        """Return a succeeded prediction with an output; raise the matching error otherwise."""
        if prediction.status == "succeeded":
            if not prediction.output_urls:
                if prediction.data_removed:
                    raise OutputExpiredError(
                        f"prediction {prediction.id} succeeded but its output was removed (past retention)",
                        prediction,
                    )
                raise PredictionFailedError(f"prediction {prediction.id} has no output", prediction)
            return prediction
        reason = str(prediction.error or "").strip() or "no reason given"
        if prediction.status == "failed":
            raise PredictionFailedError(f"prediction {prediction.id} failed: {reason}", prediction)
        if prediction.status == "canceled":
            raise PredictionCanceledError(f"prediction {prediction.id} was canceled", prediction)
        if prediction.status == "aborted":
            raise PredictionAbortedError(
                f"prediction {prediction.id} was aborted before it started", prediction
            )
        raise PredictionFailedError(
            f"prediction {prediction.id} is not finished ({prediction.status})", prediction
        )

    # ------------------------------------------------------------------ downloads

    async def download_output(
        self,
        url: str,
        dest: str | os.PathLike[str],
        *,
        expected_format: str | None = None,
        max_bytes: int | None = None,
    ) -> DownloadedFile:
        """Download an output to `dest`, verified, atomically; retried when transient.

        The body streams into a temporary file beside `dest`; it must be complete (Content-Length),
        no larger than `max_bytes`, and decode fully as an image (of `expected_format`: ``webp``,
        ``jpg`` or ``png``, when given). Only then is it renamed to `dest`. On any failure the
        temporary file is removed: a partial file is never left behind.
        """
        dest = Path(dest)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._download_once(url, dest, expected_format, max_bytes)
            except (DownloadError, ServerError, TransportError) as exc:
                if not self.retry.should_retry("download", exc, attempt):
                    raise
                delay = self.retry.delay(attempt, exc)
                self.log.warning(
                    "download of %s failed (%s); retry %d in %.2fs", dest.name, exc, attempt, delay
                )
                await self._sleep(delay)

    async def _download_once(
        self, url: str, dest: Path, expected_format: str | None, max_bytes: int | None
    ) -> DownloadedFile:
        limit = max_bytes or self.max_download_bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                async with self._downloads.stream("GET", url) as response:
                    if response.status_code != 200:
                        await response.aread()
                        error = self._error_from(response, "GET", urlsplit(url).path)
                        if isinstance(error, NotFoundError):
                            raise DownloadError(f"output not found (expired?): {error}")
                        raise error
                    content_type = response.headers.get("content-type")
                    if content_type and not content_type.startswith(("image/", "application/octet-stream")):
                        raise InvalidImageError(f"output has content-type {content_type!r}, not an image")
                    declared = response.headers.get("content-length")
                    if declared is not None and int(declared) > limit:
                        raise InvalidImageError(f"output is {declared} bytes, over the {limit}-byte cap")
                    with open(tmp, "wb") as out:
                        async for chunk in response.aiter_bytes():
                            size += len(chunk)
                            if size > limit:
                                raise InvalidImageError(f"output exceeds the {limit}-byte cap")
                            digest.update(chunk)
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
            except httpx.HTTPError as exc:
                raise IncompleteDownloadError(
                    f"download of {dest.name} broke off after {size} bytes: {type(exc).__name__}"
                ) from None
            if declared is not None and size != int(declared):
                raise IncompleteDownloadError(f"download of {dest.name} ended at {size} of {declared} bytes")
            width, height, fmt = await asyncio.to_thread(_verify_image, tmp, expected_format)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return DownloadedFile(dest, digest.hexdigest(), size, width, height, fmt, content_type)


def input_fingerprint(input: Mapping[str, Any]) -> dict[str, Any]:
    """A compact stand-in for a sent input: ``input_image`` (maybe a 256 KB data URI) by its hash.

    Small enough to journal for every row, exact enough to recognise the prediction later.
    Idempotent: the fingerprint of a fingerprint is itself.
    """
    fingerprint = {key: value for key, value in input.items() if key != "input_image"}
    if "input_image" in input:
        image = str(input["input_image"]).encode()
        fingerprint["input_image_sha256"] = hashlib.sha256(image).hexdigest()
    return fingerprint


def _verify_image(path: Path, expected_format: str | None) -> tuple[int, int, str]:
    """Decode the whole image; return (width, height, format name)."""
    try:
        with Image.open(path) as image:
            image.load()
            fmt = image.format or ""
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidImageError(f"output does not decode as an image: {exc}") from None
    if expected_format is not None and fmt != PIL_FORMATS.get(expected_format, expected_format.upper()):
        raise InvalidImageError(f"output is {fmt or 'unknown'}, expected {expected_format}")
    return width, height, fmt.lower()


_MAGIC = {
    b"\xff\xd8\xff": "image/jpeg",
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}


def _image_content_type(data: bytes, path: Path) -> str:
    """The MIME type of a local input image, from its bytes; refuses what the model cannot read."""
    for magic, mime in _MAGIC.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise InputValidationError([("input_image", f"{str(path)!r} is not a jpeg, png, gif or webp file")])
