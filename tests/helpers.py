"""Constants and small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kontext.client import ReplicateClient
from kontext.retry import RetryPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
TOKEN = "r8_test_" + "s3cr3t" * 4
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)


def make_client(sb: Any, **kwargs: Any) -> ReplicateClient:
    """A client for a sandbox, with retries fast enough for tests."""
    kwargs.setdefault("retry", FAST_RETRY)
    return ReplicateClient(api_token=sb.token, base_url=sb.base_url, **kwargs)
