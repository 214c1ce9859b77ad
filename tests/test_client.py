"""The core client against the real sandbox server on loopback: every operation and error path."""

from __future__ import annotations

import asyncio
import io
import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from kontext.client import DATA_URI_LIMIT, ReplicateClient, format_cancel_after
from kontext.errors import (
    AmbiguousCreateError,
    APIValidationError,
    AuthenticationError,
    BillingError,
    ConfigurationError,
    IncompleteDownloadError,
    InputValidationError,
    NotFoundError,
    PredictionAbortedError,
    PredictionCanceledError,
    PredictionFailedError,
    PredictionTimeoutError,
)
from kontext.ratelimit import RateLimiter
from kontext.sandbox import Sandbox, SandboxConfig
from tests.helpers import EXAMPLES, TOKEN, make_client

MUG = str(EXAMPLES / "images" / "mug-white.jpg")


def edit(prompt: str = "Put the mug on a marble counter", **extra):
    return {"prompt": prompt, "input_image": MUG, **extra}


def run(coro):
    return asyncio.run(coro)


async def _round_trip(client: ReplicateClient, dest: Path, **inputs):
    async with client:
        prediction = await client.create_prediction(edit(**inputs))
        prediction = await client.wait_for_prediction(prediction, timeout=30, poll_interval=0.02)
        client.raise_for_status(prediction)
        return prediction, await client.download_output(
            prediction.output_urls[0], dest, expected_format=inputs.get("output_format", "webp")
        )


def test_create_wait_download_round_trip(sandbox, tmp_path):
    client = make_client(sandbox, prefer_wait=None)
    prediction, saved = run(
        _round_trip(client, tmp_path / "out.jpg", aspect_ratio="16:9", output_format="jpg")
    )
    assert prediction.status == "succeeded" and prediction.predict_time is not None
    with Image.open(saved.path) as image:
        assert (image.format, image.size) == ("JPEG", (1328, 800))
    assert (saved.width, saved.height, saved.format) == (1328, 800, "jpeg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg"]
    assert sandbox.creates == 1


def test_prefer_wait_makes_one_call_per_prediction(sandbox, tmp_path):
    client = make_client(sandbox, prefer_wait=5)
    prediction, _ = run(_round_trip(client, tmp_path / "o.webp"))
    assert prediction.status == "succeeded"
    assert sandbox.count(origin="api") == 1  # the create answered with the finished prediction


def test_wrong_token_is_an_authentication_error_without_the_token(sandbox):
    client = ReplicateClient(api_token="r8_wrong_token_value", base_url=sandbox.base_url)
    with pytest.raises(AuthenticationError) as info:
        run(client.get_prediction("abc"))
    assert info.value.status_code == 401
    assert "r8_wrong_token_value" not in str(info.value) and "r8_wrong_token_value" not in repr(client)


def test_billing_required_is_not_retried(sandbox):
    sandbox.config.billing_required = True
    with pytest.raises(BillingError):
        run(make_client(sandbox).create_prediction(edit()))
    assert sandbox.count(origin="api", method="POST") == 1 and sandbox.creates == 0


def test_client_side_validation_sends_nothing(sandbox):
    with pytest.raises(InputValidationError) as info:
        run(make_client(sandbox).create_prediction(edit(guidance=11)))
    assert info.value.fields == ["guidance"]
    assert sandbox.count(origin="api") == 0


def test_server_side_422_names_the_field(sandbox):
    async def send_bad_input():
        async with make_client(sandbox) as client:
            body = {
                "input": {"prompt": "x", "input_image": "https://img.invalid/a.jpg", "aspect_ratio": "7:3"}
            }
            await client._request("create", "POST", f"/v1/models/{client.model}/predictions", json=body)

    with pytest.raises(APIValidationError) as info:
        run(send_bad_input())
    assert info.value.fields == ["aspect_ratio"]
    assert sandbox.count(origin="api") == 1  # never retried


def test_unknown_prediction_is_not_found(sandbox):
    with pytest.raises(NotFoundError):
        run(make_client(sandbox).get_prediction("doesnotexist"))


def test_throttled_create_waits_as_asked_then_succeeds(sandbox):
    sandbox.config.create_rate_limit = 60  # one a second
    sandbox.config.create_burst = 1

    async def two_creates():
        async with make_client(sandbox, prefer_wait=None) as client:
            return [await client.create_prediction(edit()), await client.create_prediction(edit("b"))]

    first, second = run(two_creates())
    assert first.id != second.id and sandbox.creates == 2
    creates = [r for r in sandbox.requests if r.method == "POST" and r.path.endswith("/predictions")]
    throttled = [r for r in creates if r.status == 429]
    assert throttled, "the sandbox should have throttled the second create"
    retry_after = float(throttled[0].response_headers["retry-after"])
    after = next(r for r in creates if r.t > throttled[-1].t)
    assert after.t - throttled[0].t >= retry_after  # measured on the sandbox's clock


def test_throttle_with_a_shared_rate_limiter_holds_every_create(sandbox):
    sandbox.config.create_rate_limit = 120
    sandbox.config.create_burst = 1
    limiter = RateLimiter(6000)  # deliberately too generous: the 429s must still be absorbed

    async def burst():
        async with make_client(sandbox, prefer_wait=None, rate_limiter=limiter) as client:
            return await asyncio.gather(*(client.create_prediction(edit(f"p{i}")) for i in range(4)))

    predictions = run(burst())
    assert len({p.id for p in predictions}) == 4 and sandbox.creates == 4


@pytest.mark.parametrize(
    "fault",
    [
        {"poll_error_every": 2, "poll_error_status": 503},
        {"poll_error_every": 2, "poll_error_status": 429},
        {"reset_every_poll": 2},
    ],
    ids=["503", "429", "connection-reset"],
)
def test_poll_errors_are_retried(sandbox, fault):
    sandbox.config.latency = 0.3
    for name, value in fault.items():
        setattr(sandbox.config, name, value)

    async def go():
        async with make_client(sandbox, prefer_wait=None) as client:
            p = await client.create_prediction(edit())
            return await client.wait_for_prediction(p, timeout=30, poll_interval=0.02, max_poll_interval=0.05)

    assert run(go()).status == "succeeded"
    gets = [r for r in sandbox.requests if r.method == "GET" and r.origin == "api"]
    assert len(gets) >= 2 and sandbox.creates == 1


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        ("make it [fail]", PredictionFailedError, "simulated model error"),
        ("make it [nsfw]", PredictionFailedError, "NSFW"),
    ],
)
def test_failed_predictions_raise_with_the_model_error(sandbox, prompt, error, message):
    async def go():
        async with make_client(sandbox) as client:
            p = await client.wait_for_prediction(await client.create_prediction(edit(prompt)), timeout=30)
            client.raise_for_status(p)

    with pytest.raises(error, match=message):
        run(go())


def test_cancel_and_canceled(sandbox):
    async def go():
        async with make_client(sandbox, prefer_wait=None) as client:
            p = await client.create_prediction(edit("stall [hang]"))
            canceled = await client.cancel_prediction(p.id)
            client.raise_for_status(canceled)

    with pytest.raises(PredictionCanceledError):
        run(go())


def test_cancel_after_aborts_a_prediction_that_never_started(sandbox):
    sandbox.config.allow_short_cancel_after = True
    sandbox.config.start_delay = 30

    async def go():
        async with make_client(sandbox, prefer_wait=None) as client:
            p = await client.create_prediction(edit(), cancel_after="0.2s")
            p = await client.wait_for_prediction(p, timeout=30, poll_interval=0.05)
            client.raise_for_status(p)

    with pytest.raises(PredictionAbortedError):
        run(go())


def test_deadline_cancels_and_reports(sandbox):
    async def go():
        async with make_client(sandbox, prefer_wait=None) as client:
            p = await client.create_prediction(edit("never [hang]"))
            await client.wait_for_prediction(p, timeout=0.3, poll_interval=0.05)

    with pytest.raises(PredictionTimeoutError) as info:
        run(go())
    assert info.value.canceled and info.value.prediction.status == "canceled"
    assert sandbox.count(origin="api", method="POST", path_suffix="/cancel") == 1


def test_truncated_download_is_retried_and_leaves_no_partial_file(sandbox, tmp_path):
    sandbox.config.truncate_download_every = 2

    async def go():
        async with make_client(sandbox) as client:
            p = client.raise_for_status(
                await client.wait_for_prediction(await client.create_prediction(edit()), timeout=30)
            )
            first = await client.download_output(
                p.output_urls[0], tmp_path / "a.webp", expected_format="webp"
            )
            second = await client.download_output(
                p.output_urls[0], tmp_path / "b.webp", expected_format="webp"
            )
            return first, second

    first, second = run(go())
    assert first.sha256 == second.sha256
    assert sandbox.count(origin="output", method="GET") == 3  # the 2nd was cut short and retried
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.webp", "b.webp"]


def test_download_that_keeps_failing_leaves_nothing(sandbox, tmp_path):
    sandbox.config.truncate_download_every = 1

    async def go():
        async with make_client(sandbox) as client:
            p = client.raise_for_status(
                await client.wait_for_prediction(await client.create_prediction(edit()), timeout=30)
            )
            await client.download_output(p.output_urls[0], tmp_path / "a.webp")

    with pytest.raises(IncompleteDownloadError):
        run(go())
    assert list(tmp_path.iterdir()) == []


def test_proxy_response_shape(tmp_path):
    config = SandboxConfig(token=TOKEN, latency=0.05, response_shape="proxy", path_prefix="/replicate")
    with Sandbox(config) as sb:
        assert sb.base_url.endswith("/replicate")
        prediction, saved = run(_round_trip(make_client(sb), tmp_path / "p.png", output_format="png"))
    assert prediction.synthetic and prediction.status == "succeeded"
    assert saved.format == "png"


def test_large_local_file_is_uploaded_small_one_inlined(sandbox, tmp_path):
    big = tmp_path / "big.png"
    rng = random.Random(1)
    Image.frombytes("RGB", (400, 400), bytes(rng.getrandbits(8) for _ in range(400 * 400 * 3))).save(big)
    assert big.stat().st_size > DATA_URI_LIMIT

    async def go():
        async with make_client(sandbox) as client:
            small = await client.create_prediction(edit())
            large = await client.create_prediction({"prompt": "x", "input_image": str(big)})
            again = await client.create_prediction({"prompt": "y", "input_image": str(big)})
            return small, large, again

    small, large, again = run(go())
    assert small.input["input_image"].startswith("data:image/jpeg;base64,")
    assert large.input["input_image"].startswith(sandbox.base_url)
    assert again.input["input_image"] == large.input["input_image"]  # uploaded once
    assert sandbox.count(origin="api", method="POST", path_suffix="/v1/files") == 1
    assert large.status == "succeeded"


def test_lost_create_response_is_ambiguous_and_can_be_found(sandbox):
    sandbox.config.drop_create_response_every = 1

    async def go():
        async with make_client(sandbox) as client:
            with pytest.raises(AmbiguousCreateError) as info:
                await client.create_prediction(edit("lost"))
            found = await client.find_prediction(info.value.input, info.value.sent_at)
            missing = await client.find_prediction(
                {**info.value.input, "prompt": "other"}, info.value.sent_at
            )
            return found, missing

    found, missing = run(go())
    assert sandbox.creates == 1 and found is not None and found.id in sandbox.predictions
    assert missing is None
    assert sandbox.count(origin="api", method="POST", path_suffix="/predictions") == 1  # not retried


def test_token_never_leaves_the_api_origin_or_reaches_logs(sandbox, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sandbox.config.poll_error_every = 2
    sandbox.config.latency = 0.2
    run(_round_trip(make_client(sandbox, prefer_wait=None), tmp_path / "o.webp"))
    with pytest.raises(AuthenticationError) as info:
        run(ReplicateClient(api_token=TOKEN + "x", base_url=sandbox.base_url).get_prediction("x"))
    assert TOKEN not in caplog.text and TOKEN not in str(info.value)
    output_requests = [r for r in sandbox.requests if r.origin == "output"]
    assert output_requests and all("authorization" not in r.headers for r in output_requests)
    api_requests = [r for r in sandbox.requests if r.origin == "api"]
    assert all(r.headers.get("authorization", "").startswith("Bearer ") for r in api_requests)


def test_environment_fallback_and_configuration_errors(sandbox, monkeypatch):
    with pytest.raises(ConfigurationError, match="REPLICATE_API_TOKEN"):
        ReplicateClient()
    monkeypatch.setenv("REPLICATE_API_TOKEN", sandbox.token)
    monkeypatch.setenv("REPLICATE_BASE_URL", sandbox.base_url + "/v1/")
    client = ReplicateClient()
    assert client.base_url == sandbox.base_url
    with pytest.raises(NotFoundError):
        run(client.get_prediction("nope"))
    with pytest.raises(ConfigurationError):
        ReplicateClient(api_token="x", base_url="ftp://example")


def test_list_predictions_pages(sandbox):
    async def go():
        async with make_client(sandbox, prefer_wait=None) as client:
            start = datetime.now(UTC)
            for i in range(105):
                await client.create_prediction(edit(f"p{i}"))
            return [
                p async for p in client.list_predictions(created_after=start.replace(year=start.year - 1))
            ]

    listed = run(go())
    assert len(listed) == 105 and len({p.id for p in listed}) == 105


def test_cancel_after_format():
    assert format_cancel_after(1) == "5s"
    assert format_cancel_after(90) == "1m30s"
    assert format_cancel_after(5400) == "1h30m"


def test_downloaded_image_is_really_the_requested_format(sandbox, tmp_path):
    _, saved = run(
        _round_trip(make_client(sandbox), tmp_path / "x.png", output_format="png", aspect_ratio="1:1")
    )
    data = saved.path.read_bytes()
    assert Image.open(io.BytesIO(data)).size == (1024, 1024)
