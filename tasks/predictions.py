"""Prefect tasks over one prediction's life: create, wait, download, cancel.

Each task is a thin wrapper over `kontext.client.ReplicateClient`; the HTTP rules live there. What
lives here is Prefect's side: run names that say what a task works on, and Prefect-level retries
declared with `retry_on_transient`, which retries only what can succeed on a second try (never
401, 402 or 422, never a create that may already have happened) and logs why it retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import task_run as runtime_task_run
from prefect.states import State

from blocks.replicate_credentials import ReplicateCredentials
from kontext.client import DownloadedFile, ReplicateClient
from kontext.errors import ThrottledError, is_transient
from kontext.schema import EXTENSIONS, EditInput, Prediction

CredentialsLike = ReplicateCredentials | str | None


async def get_replicate_client(credentials: CredentialsLike = None, **kwargs: Any) -> ReplicateClient:
    """A client from a block, a saved block's name, or (None) the environment.

    Args:
        credentials: A `ReplicateCredentials`, the name of a saved one, or None for
            ``REPLICATE_API_TOKEN`` / ``REPLICATE_BASE_URL``.
        **kwargs: Passed to `ReplicateClient`.
    """
    if isinstance(credentials, str):
        credentials = await ReplicateCredentials.aload(credentials)
    if credentials is None:
        return ReplicateClient(**kwargs)
    return credentials.get_client(**kwargs)


def retry_on_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """`retry_condition_fn` for the prediction tasks: retry transient errors only, and say why.

    Retries throttling (after the wait the API asked for), 5xx, dropped connections and truncated
    downloads; never authentication, billing or validation errors, model failures, or a create
    whose outcome is unknown.
    """
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None or not is_transient(exc):
        return False
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ThrottledError) and exc.retry_after is not None:
        reason += f" (the API asked to wait {exc.retry_after:g}s)"
    get_run_logger().warning("Retrying %s after a transient error: %s", task_run.name, reason)
    return True


def _run_name(step: str, *keys: str) -> str:
    params = runtime_task_run.parameters
    for key in keys:
        value = params.get(key)
        if isinstance(value, Prediction):
            value = value.id
        if value:
            return f"{step}-{value}"
    return step


@task(
    name="create_prediction",
    task_run_name=lambda: _run_name("create", "label"),
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_on_transient,
)
async def create_prediction(
    input: EditInput | Mapping[str, Any],
    credentials: CredentialsLike = None,
    *,
    label: str | None = None,
    prefer_wait: int | None = 10,
    cancel_after: float | str | None = None,
) -> Prediction:
    """Create a flux-kontext-dev prediction; the input is validated before anything is sent.

    A throttled create is retried after the wait the API asks for (it created nothing). A create
    whose response was lost raises `AmbiguousCreateError` and is not retried: the prediction may
    exist, and a second create could pay twice.

    Args:
        input: The model input (`EditInput` or a dict with its fields).
        credentials: A `ReplicateCredentials`, a saved block's name, or None for the environment.
        label: What the run is about (a SKU, say); names the task run ``create-<label>``.
        prefer_wait: Seconds the API may hold the create open for the result (1-60), or None.
        cancel_after: Server-side deadline (seconds or ``"5m"``): the API cancels it after that.

    Returns:
        The prediction as the API returned it (finished if it made it within `prefer_wait`).

    Example:
        ```python
        from prefect import flow
        from tasks import create_prediction, wait_for_prediction

        @flow
        async def edit_one():
            prediction = await create_prediction(
                {"prompt": "Make the mug red", "input_image": "https://example.com/mug.jpg"},
                credentials="catalog",
                label="MUG-001",
            )
            return await wait_for_prediction(prediction, credentials="catalog")
        ```
    """
    async with await get_replicate_client(credentials, prefer_wait=prefer_wait) as client:
        prediction = await client.create_prediction(input, cancel_after=cancel_after)
    get_run_logger().info("Created prediction %s (%s)", prediction.id, prediction.status)
    return prediction


@task(
    name="wait_for_prediction",
    task_run_name=lambda: _run_name("wait", "label", "prediction"),
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_transient,
)
async def wait_for_prediction(
    prediction: Prediction | str,
    credentials: CredentialsLike = None,
    *,
    label: str | None = None,
    timeout: float = 600.0,
    poll_interval: float = 0.5,
    max_poll_interval: float = 5.0,
    raise_on_failure: bool = True,
) -> Prediction:
    """Poll a prediction until it finishes, with backoff and an overall deadline.

    At the deadline the prediction is canceled and `PredictionTimeoutError` is raised. Never
    cached: a prediction's state is only ever read fresh.

    Args:
        prediction: A `Prediction` or its id.
        credentials: A `ReplicateCredentials`, a saved block's name, or None for the environment.
        label: Names the task run ``wait-<label>`` (default: the prediction id).
        timeout: Seconds to wait before canceling.
        poll_interval: First wait between polls; grows by half each poll up to `max_poll_interval`.
        raise_on_failure: Raise `PredictionFailedError` (and kin) for a failed, canceled or
            aborted prediction instead of returning it.

    Example:
        ```python
        from prefect import flow
        from tasks import wait_for_prediction

        @flow
        async def check(prediction_id: str):
            prediction = await wait_for_prediction(prediction_id, credentials="catalog", timeout=300)
            return prediction.output_urls
        ```
    """
    async with await get_replicate_client(credentials) as client:
        final = await client.wait_for_prediction(
            prediction,
            timeout=timeout,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
        )
        get_run_logger().info("Prediction %s %s", final.id, final.status)
        return client.raise_for_status(final) if raise_on_failure else final


@task(
    name="download_output",
    task_run_name=lambda: _run_name("download", "label", "prediction"),
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_on_transient,
)
async def download_output(
    prediction: Prediction,
    destination: str | Path,
    credentials: CredentialsLike = None,
    *,
    label: str | None = None,
    output_format: str | None = None,
) -> DownloadedFile:
    """Download a succeeded prediction's output, verified, atomically.

    The file streams to a temporary name, must be complete and decode as an image of
    `output_format`, and is then renamed into place; no partial file is ever left. The request
    carries no credentials: output files live on another origin.

    Args:
        prediction: A succeeded `Prediction`.
        destination: A file path, or an existing directory to save ``<label or id>.<ext>`` into.
        credentials: Used for the client's settings (TLS, size cap); the token is not sent.
        label: Names the task run and, for a directory destination, the file.
        output_format: ``webp``, ``jpg`` or ``png``; default the prediction's ``output_format``.

    Example:
        ```python
        from prefect import flow
        from tasks import create_prediction, download_output, wait_for_prediction

        @flow
        async def edit_and_save():
            prediction = await create_prediction(
                {"prompt": "Make the mug red", "input_image": "https://example.com/mug.jpg",
                 "output_format": "jpg"},
                credentials="catalog",
            )
            prediction = await wait_for_prediction(prediction, credentials="catalog")
            saved = await download_output(prediction, "out/", credentials="catalog", label="MUG-001")
            return saved.path
        ```
    """
    fmt = output_format or prediction.input.get("output_format") or None
    dest = Path(destination)
    if dest.is_dir() or str(destination).endswith(("/", "\\")):
        dest = dest / f"{label or prediction.id}{EXTENSIONS.get(fmt or '', '')}"
    async with await get_replicate_client(credentials) as client:
        url = client.raise_for_status(prediction).output_urls[0]
        saved = await client.download_output(url, dest, expected_format=fmt)
    get_run_logger().info(
        "Saved %s output to %s (%dx%d, %d bytes)",
        prediction.id,
        saved.path,
        saved.width,
        saved.height,
        saved.size,
    )
    return saved


@task(
    name="cancel_prediction",
    task_run_name=lambda: _run_name("cancel", "label", "prediction"),
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_on_transient,
)
async def cancel_prediction(
    prediction: Prediction | str,
    credentials: CredentialsLike = None,
    *,
    label: str | None = None,
) -> Prediction:
    """Cancel a prediction; a finished one is returned unchanged.

    Args:
        prediction: A `Prediction` or its id.
        credentials: A `ReplicateCredentials`, a saved block's name, or None for the environment.
        label: Names the task run ``cancel-<label>``.

    Example:
        ```python
        from prefect import flow
        from tasks import cancel_prediction

        @flow
        async def stop(prediction_id: str):
            return (await cancel_prediction(prediction_id, credentials="catalog")).status
        ```
    """
    prediction_id = prediction.id if isinstance(prediction, Prediction) else prediction
    async with await get_replicate_client(credentials) as client:
        result = await client.cancel_prediction(prediction_id)
    get_run_logger().info("Prediction %s is %s", result.id, result.status)
    return result
