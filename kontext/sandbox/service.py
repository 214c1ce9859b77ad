"""The sandbox's state and its two ASGI apps: the API origin and the output-file origin.

Written against ASGI directly (no framework) because faults need control below a framework's
reach: a response can be cut off after its headers, the way a dropped connection looks to a client.
Prediction status is computed from the sandbox clock, so nothing runs in the background.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx

from kontext.sandbox.inputs import validate_input
from kontext.sandbox.render import RenderError, render
from kontext.sandbox.settings import SandboxConfig

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MODEL = "black-forest-labs/flux-kontext-dev"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_EXT = {"webp": "webp", "jpg": "jpg", "png": "png"}


def new_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(26))


def iso(moment: datetime | None) -> str | None:
    return (
        moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z") if moment else None
    )


def parse_duration(text: str) -> float | None:
    """``30s``, ``5m``, ``1h30m``, ``0.5s`` -> seconds (None when unparseable)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        return None
    factor = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(amount) * factor[unit] for amount, unit in parts)


@dataclass
class RecordedRequest:
    """One request as the sandbox saw it."""

    t: float
    origin: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    prediction_id: str | None = None


class Bucket:
    """A token bucket on the sandbox clock."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.tokens: float | None = None
        self.updated = clock()

    def take(self, per_minute: float | None, burst: int | None) -> tuple[bool, float, float]:
        """(allowed, remaining, seconds until a token is available)."""
        if per_minute is None:
            return True, 1e9, 0.0
        rate = per_minute / 60.0
        capacity = float(burst if burst is not None else max(1, int(rate)))
        now = self.clock()
        if self.tokens is None:
            self.tokens = capacity
        self.tokens = min(capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, math.floor(self.tokens), (capacity - self.tokens) / rate
        return False, 0.0, (1 - self.tokens) / rate


@dataclass
class StoredPrediction:
    id: str
    input: dict[str, Any]
    created: float
    created_wall: datetime
    start_delay: float
    latency: float
    hang: bool
    fail_error: str | None
    cancel_deadline: float | None = None
    final_status: str | None = None
    final_at: float | None = None
    error: str | None = None
    output: bytes | None = None
    content_type: str | None = None
    rendering: asyncio.Future[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SandboxState:
    """Everything the sandbox knows, behind one lock (tests read it from another thread)."""

    def __init__(self, config: SandboxConfig):
        self.config = config
        self.lock = threading.RLock()
        self._t0 = time.monotonic()
        self._wall0 = datetime.now(UTC)
        self.predictions: dict[str, StoredPrediction] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, tuple[bytes, str]] = {}
        self.requests: list[RecordedRequest] = []
        self.creates = 0
        self.counters: dict[str, int] = {}
        self.create_bucket = Bucket(self.clock)
        self.other_bucket = Bucket(self.clock)
        self.api_base = ""
        self.output_base = ""

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def stats(self) -> dict[str, Any]:
        """Counters by kind of call (the figures benchmarks report); no request contents."""
        with self.lock:
            requests = list(self.requests)
            creates = self.creates
        counts: dict[str, int] = {}
        for r in requests:
            if r.path == "/_sandbox/stats":
                continue
            kind = f"{r.origin} {r.method} {re.sub(r'/[a-z0-9]{26}', '/{id}', r.path)} {r.status}"
            counts[kind] = counts.get(kind, 0) + 1
        return {"creates": creates, "requests": counts}

    def wall(self, t: float) -> datetime:
        return self._wall0 + timedelta(seconds=t)

    def hit(self, kind: str, every: int | None) -> bool:
        """Count a call of `kind`; True when it is the k-th, 2k-th, ... one."""
        with self.lock:
            self.counters[kind] = self.counters.get(kind, 0) + 1
            return bool(every) and self.counters[kind] % every == 0  # type: ignore[operator]

    # ------------------------------------------------------------------ status

    def status(self, p: StoredPrediction, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        if p.final_status is not None:
            return p.final_status
        t_start = p.created + p.start_delay
        t_done = math.inf if p.hang else t_start + p.latency
        if p.cancel_deadline is not None and p.cancel_deadline < t_done and now >= p.cancel_deadline:
            self.finish(p, "aborted" if p.cancel_deadline < t_start else "canceled", p.cancel_deadline)
            return p.final_status  # type: ignore[return-value]
        if now < t_start:
            return "starting"
        if now < t_done:
            return "processing"
        if p.fail_error:
            self.finish(p, "failed", t_done, error=p.fail_error)
            return "failed"
        return "processing" if p.output is None else "succeeded"

    def due_for_render(self, p: StoredPrediction) -> bool:
        return (
            self.status(p) == "processing"
            and p.output is None
            and not p.hang
            and (self.clock() >= p.created + p.start_delay + p.latency)
        )

    def finish(self, p: StoredPrediction, status: str, at: float, *, error: str | None = None) -> None:
        p.final_status, p.final_at, p.error = status, at, error
        p.changed.set()

    def next_change(self, p: StoredPrediction) -> float | None:
        """Sandbox time of the next scheduled status change (None: only a cancel changes it)."""
        if p.final_status is not None:
            return None
        candidates = [p.created + p.start_delay]
        if not p.hang:
            candidates.append(p.created + p.start_delay + p.latency)
        if p.cancel_deadline is not None:
            candidates.append(p.cancel_deadline)
        future = [c for c in candidates if c > self.clock()]
        return min(future) if future else self.clock()

    # ------------------------------------------------------------------ output

    async def image_bytes(self, source: str) -> bytes:
        if source.startswith("data:"):
            try:
                return base64.b64decode(source.split(",", 1)[1])
            except (ValueError, IndexError):
                raise RenderError("input_image data URI is not valid base64") from None
        file_match = re.search(r"/v1/files/([a-z0-9]+)", source)
        if source.startswith(self.api_base) and file_match and file_match.group(1) in self.files:
            return self.files[file_match.group(1)]["data"]
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(source)
                response.raise_for_status()
                return response.content
        except httpx.HTTPError as exc:
            raise RenderError(f"could not fetch input_image: {exc}") from None

    async def ensure_output(self, p: StoredPrediction) -> None:
        """Render the output once when the prediction becomes due (off the event loop)."""
        if not self.due_for_render(p):
            return
        if p.rendering is None:
            p.rendering = asyncio.ensure_future(self._render(p))
        await asyncio.shield(p.rendering)

    async def _render(self, p: StoredPrediction) -> None:
        due = p.created + p.start_delay + p.latency
        try:
            data = await self.image_bytes(str(p.input["input_image"]))
            p.output, p.content_type = await asyncio.to_thread(render, data, p.input)
            self.finish(p, "succeeded", due)
        except RenderError as exc:
            self.finish(p, "failed", due, error=str(exc))

    def output_url(self, p: StoredPrediction) -> str:
        return f"{self.output_base}/outputs/{p.id}/out-0.{_EXT[p.input.get('output_format', 'webp')]}"

    def expired(self, p: StoredPrediction) -> bool:
        return p.final_at is not None and self.clock() > p.final_at + self.config.retention

    def to_json(self, p: StoredPrediction) -> dict[str, Any]:
        status = self.status(p)
        started = p.created + p.start_delay
        done = status in ("succeeded", "failed", "canceled", "aborted")
        removed = done and self.expired(p)
        base = f"{self.api_base}/v1/predictions/{p.id}"
        body: dict[str, Any] = {
            "id": p.id,
            "model": MODEL,
            "version": "hidden",
            "input": {} if removed else p.input,
            "logs": ""
            if status == "starting"
            else f"Using seed: {p.input.get('seed') or 42}\nRunning edit...\n",
            "output": self.output_url(p) if status == "succeeded" and not removed else None,
            "data_removed": removed,
            "error": p.error if status == "failed" else None,
            "status": status,
            "source": "api",
            "created_at": iso(p.created_wall),
            "urls": {
                "get": base,
                "cancel": f"{base}/cancel",
                "stream": f"{self.api_base}/v1/stream/{p.id}",
                "web": f"{self.api_base}/p/{p.id}",
            },
        }
        if p.cancel_deadline is not None:
            body["deadline"] = iso(self.wall(p.cancel_deadline))
        if status != "starting" and status not in ("aborted",):
            body["started_at"] = iso(self.wall(min(started, p.final_at or started)))
        if done and p.final_at is not None:
            body["completed_at"] = iso(self.wall(p.final_at))
            if status == "succeeded":
                body["metrics"] = {
                    "predict_time": round(p.latency, 3),
                    "total_time": round(p.final_at - p.created, 3),
                }
        return body


# ---------------------------------------------------------------------- ASGI helpers


async def read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class Responder:
    """Sends one response and records its status and headers."""

    def __init__(self, send: Send, record: RecordedRequest, extra_headers: dict[str, str] | None = None):
        self.send = send
        self.record = record
        self.extra = extra_headers or {}

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        cut: bool = False,
    ) -> None:
        all_headers = {
            **self.extra,
            **(headers or {}),
            "content-type": content_type,
            "content-length": str(len(body)),
        }
        self.record.status = status
        self.record.response_headers = dict(all_headers)
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
            }
        )
        if cut:  # half the body, then the connection is dropped
            await self.send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise ConnectionAbortedError("sandbox fault: response cut off")
        await self.send({"type": "http.response.body", "body": body})

    async def json(
        self,
        status: int,
        data: Any,
        headers: dict[str, str] | None = None,
        *,
        cut: bool = False,
        problem: bool = False,
    ) -> None:
        body = json.dumps(data).encode()
        kind = "application/problem+json" if problem else "application/json"
        await self.respond(status, body, kind, headers, cut=cut)

    async def problem(
        self,
        status: int,
        detail: str,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        data: dict[str, Any] = {"detail": detail, "status": status}
        if title:
            data = {"title": title, **data}
        await self.json(status, {**data, **extra}, headers, problem=True)


_CREATE = re.compile(r"^/v1/models/([^/]+)/([^/]+)/predictions$")
_PREDICTION = re.compile(r"^/v1/predictions/([a-z0-9]+)$")
_CANCEL = re.compile(r"^/v1/predictions/([a-z0-9]+)/cancel$")
_FILE = re.compile(r"^/v1/files/([a-z0-9]+)(/download)?$")


class _Origin:
    """One origin's ASGI app: answers lifespan, records every HTTP request, then `handle`s it."""

    origin = ""

    def __init__(self, state: SandboxState):
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record = RecordedRequest(
            self.state.clock(),
            self.origin,
            scope["method"],
            scope["path"],
            scope["query_string"].decode(),
            headers,
        )
        with self.state.lock:
            self.state.requests.append(record)
        try:
            await self.handle(scope, receive, send, headers, record)
        except ConnectionAbortedError:
            return  # a fault cut the response short; returning leaves it incomplete

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], record: RecordedRequest
    ) -> None:
        raise NotImplementedError


class ApiApp(_Origin):
    """The API origin: ``/v1/...`` under the configured path prefix."""

    origin = "api"

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], record: RecordedRequest
    ) -> None:
        st, config = self.state, self.state.config
        path = scope["path"]
        prefix = config.path_prefix.rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        elif prefix:
            await Responder(send, record).problem(404, "The requested resource could not be found.")
            return
        if path.startswith("/p/"):
            await Responder(send, record).respond(
                200, b"<html><body>sandbox prediction</body></html>", "text/html"
            )
            return
        if headers.get("authorization") != f"Bearer {config.token}":
            await Responder(send, record).problem(
                401, "You did not pass a valid authentication token", "Unauthenticated"
            )
            return
        method = scope["method"]
        is_create = method == "POST" and (bool(_CREATE.match(path)) or path == "/v1/predictions")
        bucket = st.create_bucket if is_create else st.other_bucket
        with st.lock:
            rate = config.create_rate_limit if is_create else config.other_rate_limit
            allowed, remaining, reset = bucket.take(rate, config.create_burst if is_create else None)
        limits = {
            "ratelimit-remaining": str(int(remaining)) if rate else "1000000",
            "ratelimit-reset": str(math.ceil(reset)),
        }
        out = Responder(send, record, limits)
        if not allowed:
            wait = max(1, math.ceil(reset))
            await out.problem(
                429,
                f"Request was throttled. Expected available in {wait} second{'s' if wait != 1 else ''}.",
                "Request was throttled.",
                {"retry-after": str(wait)},
                retry_after=wait,
            )
            return
        await self.route(method, path, scope, receive, headers, out, record)

    async def route(
        self,
        method: str,
        path: str,
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
        out: Responder,
        record: RecordedRequest,
    ) -> None:
        st = self.state
        if method == "POST" and (match := _CREATE.match(path)):
            if f"{match.group(1)}/{match.group(2)}" != MODEL:
                await out.problem(404, "The requested resource could not be found.")
                return
            await self.create(receive, headers, out, record, by_version=False)
        elif method == "POST" and path == "/v1/predictions":
            await self.create(receive, headers, out, record, by_version=True)
        elif method == "GET" and path == "/v1/predictions":
            await self.list(scope, out)
        elif method == "GET" and (match := _PREDICTION.match(path)):
            record.prediction_id = match.group(1)
            if st.hit("poll", st.config.poll_error_every):
                await out.problem(st.config.poll_error_status, "Service temporarily unavailable")
                return
            p = st.predictions.get(match.group(1))
            if p is None:
                await out.problem(404, "The requested resource could not be found.")
                return
            await st.ensure_output(p)
            await out.json(200, st.to_json(p), cut=st.hit("reset", st.config.reset_every_poll))
        elif method == "POST" and (match := _CANCEL.match(path)):
            record.prediction_id = match.group(1)
            p = st.predictions.get(match.group(1))
            if p is None:
                await out.problem(404, "The requested resource could not be found.")
                return
            if st.status(p) in ("starting", "processing"):
                st.finish(p, "canceled", st.clock())
            await out.json(200, st.to_json(p))
        elif method == "POST" and path == "/v1/files":
            await self.upload(receive, headers, out)
        elif method == "GET" and (match := _FILE.match(path)):
            stored = st.files.get(match.group(1))
            if stored is None:
                await out.problem(404, "The requested resource could not be found.")
            elif match.group(2):
                await out.respond(200, stored["data"], stored["meta"]["content_type"])
            else:
                await out.json(200, stored["meta"])
        else:
            await out.problem(404, "The requested resource could not be found.")

    async def create(
        self,
        receive: Receive,
        headers: dict[str, str],
        out: Responder,
        record: RecordedRequest,
        *,
        by_version: bool,
    ) -> None:
        st, config = self.state, self.state.config
        raw = await read_body(receive, 10 * 1024 * 1024)
        try:
            body = json.loads(raw or b"")
        except ValueError:
            await out.problem(400, "Request body is not valid JSON", "Bad request")
            return
        allowed_keys = {"input", "webhook", "webhook_events_filter", "stream"} | (
            {"version"} if by_version else set()
        )
        unknown = sorted(set(body) - allowed_keys) if isinstance(body, dict) else []
        if not isinstance(body, dict) or unknown:
            await out.problem(
                422,
                f"- (root): Additional property {', '.join(unknown)} is not allowed\n",
                "Input validation failed",
                invalid_fields=[
                    {
                        "type": "additional_property_not_allowed",
                        "field": "(root)",
                        "description": f"Additional property {k} is not allowed",
                    }
                    for k in unknown
                ],
            )
            return
        filled, problems = validate_input(body.get("input"))
        if problems:
            detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
            await out.problem(422, detail, "Input validation failed", invalid_fields=problems)
            return
        if config.billing_required:
            await out.problem(
                402,
                "You have insufficient credit to run this model. Go to "
                "https://replicate.com/account/billing to purchase credit.",
                "Insufficient credit",
            )
            return
        if st.hit("create_error", config.create_error_every):
            await out.problem(config.create_error_status, "Service temporarily unavailable")
            return
        p = self.new_prediction(filled, headers)
        record.prediction_id = p.id
        wait = self.prefer_wait(headers)
        if config.response_shape == "proxy":
            wait = 60
        if wait:
            await self.hold(p, wait)
        drop = st.hit("drop_create", config.drop_create_response_every)
        if config.response_shape == "proxy":
            if st.status(p) != "succeeded":
                await out.problem(500, p.error or "prediction did not finish", "Prediction failed", cut=drop)
                return
            await out.json(
                200,
                {"created": int(p.created_wall.timestamp()), "data": [{"url": st.output_url(p)}]},
                cut=drop,
            )
            return
        extra = {"preference-applied": f"wait={wait}"} if wait else {}
        await out.json(201, st.to_json(p), extra, cut=drop)

    def prefer_wait(self, headers: dict[str, str]) -> int | None:
        match = re.fullmatch(r"\s*wait(?:=(\d+))?\s*", headers.get("prefer", ""))
        if not match:
            return None
        seconds = int(match.group(1) or 60)
        return seconds if 1 <= seconds <= 60 else None

    def new_prediction(self, filled: dict[str, Any], headers: dict[str, str]) -> StoredPrediction:
        st, config = self.state, self.state.config
        prompt = str(filled.get("prompt", ""))
        fail = None
        if config.fail_prompt_substring and config.fail_prompt_substring in prompt:
            fail = "Prediction failed: simulated model error"
        elif (
            config.nsfw_prompt_substring
            and config.nsfw_prompt_substring in prompt
            and not filled.get("disable_safety_checker")
        ):
            fail = "Generated image contained NSFW content. Try running it again, or try a different prompt."
        now = st.clock()
        p = StoredPrediction(
            id=new_id(),
            input=filled,
            created=now,
            created_wall=st.wall(now),
            start_delay=config.start_delay,
            latency=config.latency,
            hang=bool(config.hang_prompt_substring and config.hang_prompt_substring in prompt),
            fail_error=fail,
        )
        cancel_after = parse_duration(headers.get("cancel-after", ""))
        if cancel_after is not None and (cancel_after >= 5 or config.allow_short_cancel_after):
            p.cancel_deadline = now + cancel_after
        with st.lock:
            st.predictions[p.id] = p
            st.creates += 1
        return p

    async def hold(self, p: StoredPrediction, seconds: float) -> None:
        """Hold a create open until the prediction is terminal or `seconds` pass."""
        st = self.state
        deadline = st.clock() + seconds
        while st.status(p) not in ("succeeded", "failed", "canceled", "aborted"):
            await st.ensure_output(p)
            now = st.clock()
            if now >= deadline or st.status(p) in ("succeeded", "failed", "canceled", "aborted"):
                break
            upcoming = st.next_change(p)
            until = deadline if upcoming is None else min(deadline, max(upcoming, now + 0.001))
            p.changed.clear()
            try:
                await asyncio.wait_for(p.changed.wait(), until - now)
            except TimeoutError:
                pass

    async def list(self, scope: Scope, out: Responder) -> None:
        st = self.state
        query = parse_qs(scope["query_string"].decode())

        def when(name: str) -> datetime | None:
            value = (query.get(name) or [None])[0]
            return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None

        after, before = when("created_after"), when("created_before")
        offset = int((query.get("cursor") or ["0"])[0])
        with st.lock:
            chosen = [
                p
                for p in st.predictions.values()
                if (after is None or p.created_wall >= after) and (before is None or p.created_wall < before)
            ]
        chosen.sort(key=lambda p: p.created, reverse=True)
        page = chosen[offset : offset + 100]

        def link(cursor: int) -> str:
            params = {k: v[0] for k, v in query.items() if k != "cursor"}
            return f"{st.api_base}/v1/predictions?{urlencode({**params, 'cursor': cursor})}"

        await out.json(
            200,
            {
                "next": link(offset + 100) if offset + 100 < len(chosen) else None,
                "previous": link(max(0, offset - 100)) if offset else None,
                "results": [st.to_json(p) for p in page],
            },
        )

    async def upload(self, receive: Receive, headers: dict[str, str], out: Responder) -> None:
        st = self.state
        raw = await read_body(receive, st.config.max_upload_bytes + 1024 * 1024)
        if raw is None:
            await out.problem(413, "File is too large (the limit is 100 MB)", "Payload too large")
            return
        content_type = headers.get("content-type", "")
        data, file_type, filename = _multipart_content(raw, content_type)
        if data is None:
            await out.problem(
                422,
                "- content: file content is required\n",
                "Input validation failed",
                invalid_fields=[
                    {"type": "required", "field": "content", "description": "content is required"}
                ],
            )
            return
        file_id = new_id()
        now = datetime.now(UTC)
        meta = {
            "id": file_id,
            "name": filename,
            "content_type": file_type or "application/octet-stream",
            "size": len(data),
            "checksums": {"sha256": hashlib.sha256(data).hexdigest()},
            "metadata": {},
            "created_at": iso(now),
            "expires_at": iso(now + timedelta(days=1)),
            "urls": {"get": f"{st.api_base}/v1/files/{file_id}"},
        }
        with st.lock:
            st.files[file_id] = {"meta": meta, "data": data}
        await out.json(201, meta)


def _multipart_content(raw: bytes, content_type: str) -> tuple[bytes | None, str | None, str | None]:
    """The ``content`` part of a multipart/form-data body: (bytes, its content type, filename)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return None, None, None
    boundary = b"--" + match.group(1).encode()
    for part in raw.split(boundary):
        head, _, body = part.partition(b"\r\n\r\n")
        if b'name="content"' not in head:
            continue
        part_type = re.search(rb"content-type:\s*([^\r\n]+)", head, re.IGNORECASE)
        filename = re.search(rb'filename="([^"]*)"', head)
        return (
            body.removesuffix(b"\r\n"),
            part_type.group(1).decode() if part_type else None,
            filename.group(1).decode() if filename else "file",
        )
    return None, None, None


class OutputApp(_Origin):
    """The output-file origin (like replicate.delivery): no auth; also serves registered inputs."""

    origin = "output"

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], record: RecordedRequest
    ) -> None:
        st = self.state
        out = Responder(send, record)
        parts = scope["path"].strip("/").split("/")
        if len(parts) == 3 and parts[0] == "outputs":
            record.prediction_id = parts[1]
            p = st.predictions.get(parts[1])
            if p is None or p.output is None or st.expired(p):
                await out.respond(404, b"Not Found", "text/plain")
                return
            if st.config.download_latency:
                await asyncio.sleep(st.config.download_latency)
            cut = st.hit("download", st.config.truncate_download_every)
            body = p.output
            if st.hit("corrupt_download", st.config.corrupt_download_every):
                body = b"<html>not an image</html>" + b"\0" * 64
            await out.respond(200, body, p.content_type or "application/octet-stream", cut=cut)
        elif scope["path"] == "/_sandbox/stats":  # for benchmarks that run the sandbox as a process
            await out.json(200, st.stats())
        elif len(parts) == 2 and parts[0] == "inputs" and parts[1] in st.inputs:
            data, kind = st.inputs[parts[1]]
            await out.respond(200, data, kind)
        else:
            await out.respond(404, b"Not Found", "text/plain")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
