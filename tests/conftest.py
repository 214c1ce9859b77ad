"""Shared fixtures: a Prefect test server for the session, and a fresh sandbox per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from prefect.testing.utilities import prefect_test_harness

from kontext.client import ReplicateClient
from kontext.sandbox import Sandbox, SandboxConfig
from tests.helpers import TOKEN, make_client


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One real Prefect server (temporary database) for the whole session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    monkeypatch.delenv("REPLICATE_BASE_URL", raising=False)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh Replicate-compatible sandbox on loopback, fast enough for tests."""
    with Sandbox(SandboxConfig(token=TOKEN, latency=0.05, start_delay=0.01)) as sb:
        yield sb


@pytest.fixture
def client(sandbox: Sandbox) -> ReplicateClient:
    return make_client(sandbox)


@pytest.fixture
def sandbox_env(sandbox, monkeypatch):
    """A sandbox whose credentials are in the environment, as the flow's default reads them."""
    monkeypatch.setenv("REPLICATE_API_TOKEN", sandbox.token)
    monkeypatch.setenv("REPLICATE_BASE_URL", sandbox.base_url)
    return sandbox
