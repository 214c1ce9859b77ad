"""The `ReplicateCredentials` block: the API token (a secret) and the base URL, in one place."""

from __future__ import annotations

from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr, field_validator

from kontext.client import DEFAULT_BASE_URL, ReplicateClient


class ReplicateCredentials(CredentialsBlock):
    """Credentials for Replicate's API, or any Replicate-compatible base URL (a proxy).

    The token is stored as a secret: the Prefect UI and API show it masked, and the client built
    from it sends it only to `base_url`'s origin, never to the host that serves output files.

    Attributes:
        api_token: A Replicate API token.
        base_url: The API base, without ``/v1``.

    Example:
        Save credentials once (or create the block in the Prefect UI):
        ```python
        from blocks import ReplicateCredentials

        ReplicateCredentials(api_token="r8_...").save("catalog")
        ```

        Load them in a flow and build a client:
        ```python
        from blocks import ReplicateCredentials

        replicate_credentials = ReplicateCredentials.load("BLOCK_NAME")
        async with replicate_credentials.get_client() as client:
            prediction = await client.get_prediction("gm3qorzdhgbfurvjtvhg6dckhu")
        ```
    """

    _block_type_name = "Replicate Credentials"
    _block_type_slug = "replicate-credentials"
    _logo_url = "https://github.com/replicate.png"  # type: ignore[assignment]
    _documentation_url = "https://replicate.com/docs/reference/http"  # type: ignore[assignment]
    _description = (
        "API token and base URL for Replicate's predictions API (or a Replicate-compatible "
        "proxy), used by the prefect-flux-kontext tasks and flows."
    )

    api_token: SecretStr = Field(
        default=...,
        title="API Token",
        description="A Replicate API token (starts with r8_), sent as a bearer token to the base URL only.",
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        title="Base URL",
        description=(
            "API base URL without /v1: https://api.replicate.com, or a Replicate-compatible "
            "proxy such as https://www.kkiai.com/replicate."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/").removesuffix("/v1")
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value

    def get_client(self, **kwargs: Any) -> ReplicateClient:
        """Build a `kontext.client.ReplicateClient` for these credentials.

        Args:
            **kwargs: Passed to `ReplicateClient` (``prefer_wait``, ``rate_limiter``, ...).
        """
        return ReplicateClient(api_token=self.api_token.get_secret_value(), base_url=self.base_url, **kwargs)
