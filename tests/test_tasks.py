"""The Prefect tasks: one prediction created, polled and downloaded in a flow on a real server."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

from blocks import ReplicateCredentials
from kontext.errors import APIValidationError, ServerError, ThrottledError
from tasks import (
    cancel_prediction,
    create_prediction,
    download_output,
    retry_on_transient,
    wait_for_prediction,
)
from tests.helpers import EXAMPLES

MUG = str(EXAMPLES / "images" / "mug-blue.jpg")


async def _task_runs(flow_run_id):
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name: run for run in runs}


def test_one_prediction_through_the_tasks(sandbox, tmp_path):
    credentials = ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url)

    @flow
    async def edit_one():
        prediction = await create_prediction(
            {
                "prompt": "Put the mug on a desk",
                "input_image": MUG,
                "output_format": "png",
                "aspect_ratio": "4:5",
            },
            credentials,
            label="MUG-002",
            prefer_wait=None,
        )
        prediction = await wait_for_prediction(prediction, credentials, label="MUG-002", poll_interval=0.02)
        return await download_output(prediction, tmp_path, credentials, label="MUG-002")

    state = asyncio.run(edit_one(return_state=True))
    saved = state.result()
    assert saved.path == tmp_path / "MUG-002.png"
    with Image.open(saved.path) as image:
        assert (image.format, image.size) == ("PNG", (944, 1104))
    names = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert {"create-MUG-002", "wait-MUG-002", "download-MUG-002"} <= set(names)
    assert all(run.state.is_completed() for run in names.values())
    assert sandbox.creates == 1


def test_tasks_use_a_saved_block_by_name(sandbox):
    ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save(
        "tasks-test", overwrite=True
    )

    @flow
    async def create_and_cancel():
        p = await create_prediction(
            {"prompt": "x [hang]", "input_image": MUG}, "tasks-test", prefer_wait=None
        )
        return await cancel_prediction(p, "tasks-test")

    assert asyncio.run(create_and_cancel()).status == "canceled"


def test_failed_prediction_fails_the_wait_task(sandbox):
    credentials = ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url)

    @flow
    async def failing():
        p = await create_prediction({"prompt": "x [fail]", "input_image": MUG}, credentials, prefer_wait=None)
        return await wait_for_prediction(p, credentials, poll_interval=0.02)

    state = asyncio.run(failing(return_state=True))
    assert state.is_failed() and "simulated model error" in state.message


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (ThrottledError(429, "slow down", retry_after=2), True),
        (ServerError(503, "unavailable"), True),
        (APIValidationError(422, "bad"), False),
        (ValueError("not ours"), False),
    ],
)
def test_retry_condition(exc, retried):
    class _Run:
        name = "create-X"

    @flow
    def check():
        return retry_on_transient(None, _Run(), Failed(data=exc))

    assert check() is retried
