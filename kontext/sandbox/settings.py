"""The sandbox's settings, fault switches included; all of them can be changed on a live instance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SandboxConfig:
    """How the sandbox behaves. Every field may be changed while it runs (tests do).

    Timing:
        latency: Seconds a prediction spends ``processing``.
        start_delay: Seconds it spends ``starting`` first.
        retention: Seconds after completion before ``output`` is removed (``data_removed``).

    Rate limits (token buckets; None means unlimited):
        create_rate_limit, create_burst: Creates a minute, and the burst allowed.
        other_rate_limit: Every other API call, a minute.

    Faults (``*_every = k`` hits the k-th, 2k-th, ... call of that kind):
        create_error_every, create_error_status: A create answers this status, creating nothing.
        poll_error_every, poll_error_status: A GET of a prediction answers this status.
        reset_every_poll: A GET of a prediction has its connection dropped mid-response.
        truncate_download_every: An output download sends half its body, then drops.
        corrupt_download_every: An output download answers bytes that are not an image.
        download_latency: Seconds an output download waits before answering.
        drop_create_response_every: A create is accepted (the prediction exists) but its
            response is dropped mid-way.
        billing_required: Creates answer 402.
        fail_prompt_substring, nsfw_prompt_substring, hang_prompt_substring: A prompt containing
            one fails, trips the safety checker (unless disabled), or never finishes.

    Shape:
        response_shape: ``replicate`` (the prediction object) or ``proxy`` (a create waits and
            answers ``{"created": ..., "data": [{"url": ...}]}``).
        path_prefix: Serve the API under a prefix, as proxies do (``/replicate``).
        allow_short_cancel_after: Accept ``Cancel-After`` below Replicate's 5 s minimum (tests).
    """

    token: str = "sandbox-token"
    latency: float = 1.0
    start_delay: float = 0.1
    retention: float = 3600.0
    create_rate_limit: float | None = None
    create_burst: int | None = None
    other_rate_limit: float | None = 3000.0
    create_error_every: int | None = None
    create_error_status: int = 503
    poll_error_every: int | None = None
    poll_error_status: int = 503
    reset_every_poll: int | None = None
    truncate_download_every: int | None = None
    corrupt_download_every: int | None = None
    download_latency: float = 0.0
    drop_create_response_every: int | None = None
    billing_required: bool = False
    fail_prompt_substring: str = "[fail]"
    nsfw_prompt_substring: str = "[nsfw]"
    hang_prompt_substring: str = "[hang]"
    response_shape: Literal["replicate", "proxy"] = "replicate"
    path_prefix: str = ""
    allow_short_cancel_after: bool = False
    max_upload_bytes: int = 100 * 1024 * 1024
