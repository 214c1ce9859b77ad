"""Prefect tasks of prefect-flux-kontext: one per step of a prediction's life."""

from tasks.predictions import (
    cancel_prediction,
    create_prediction,
    download_output,
    get_replicate_client,
    retry_on_transient,
    wait_for_prediction,
)

__all__ = [
    "cancel_prediction",
    "create_prediction",
    "download_output",
    "get_replicate_client",
    "retry_on_transient",
    "wait_for_prediction",
]
