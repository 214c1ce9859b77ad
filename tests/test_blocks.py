"""The ReplicateCredentials block: Prefect's standard block suite, save/load, registration."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks import ReplicateCredentials
from kontext.client import ReplicateClient


class TestReplicateCredentialsStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return ReplicateCredentials

    def test_has_a_valid_image(self, block):
        try:
            urllib.request.urlopen(str(block._logo_url), timeout=5).close()
        except (urllib.error.URLError, OSError) as exc:
            pytest.skip(f"the logo URL cannot be fetched without the internet ({exc})")
        super().test_has_a_valid_image(block)


def test_save_load_and_client(sandbox):
    ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url + "/").save(
        "sandbox", overwrite=True
    )
    loaded = ReplicateCredentials.load("sandbox")
    assert loaded.base_url == sandbox.base_url
    assert loaded.api_token.get_secret_value() == sandbox.token
    assert sandbox.token not in repr(loaded) and sandbox.token not in str(loaded.model_dump())
    client = loaded.get_client(prefer_wait=3)
    assert isinstance(client, ReplicateClient) and client.prefer_wait == 3


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="base_url"):
        ReplicateCredentials(api_token="x", base_url="api.replicate.com")


def test_block_resolves_by_slug_without_an_import(sandbox):
    """`Block.load("replicate-credentials/NAME")` in a fresh process, through the entry point."""
    ReplicateCredentials(api_token=sandbox.token, base_url=sandbox.base_url).save("by-slug", overwrite=True)
    code = (
        "from prefect.blocks.core import Block\n"
        "b = Block.load('replicate-credentials/by-slug')\n"
        "print(type(b).__name__, b.base_url)\n"
    )
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ReplicateCredentials", sandbox.base_url]
