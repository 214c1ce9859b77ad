"""Constants and small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from kontext.client import ReplicateClient
from kontext.retry import RetryPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
TOKEN = "r8_test_" + "s3cr3t" * 4
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)


IMAGES = sorted((EXAMPLES / "images").glob("*.jpg"))


def manifest(tmp_path: Path, rows: list[dict], name: str = "catalog.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_rows(n: int, **extra) -> list[dict]:
    return [
        {
            "id": f"SKU-{i:03d}",
            "image_url": str(IMAGES[i % len(IMAGES)]),
            "prompt": f"studio shot {i}",
            "title": f"Product {i}",
            **extra,
        }
        for i in range(n)
    ]


def run_flow(task_runner: Any = None, **params):
    """Run the catalog flow in this process (on `task_runner` if given); returns (final state,
    CatalogSummary)."""
    from flows.edit_catalog import edit_catalog

    catalog_flow = edit_catalog.with_options(task_runner=task_runner) if task_runner else edit_catalog
    params.setdefault("prediction_timeout", 30)
    state = asyncio.run(catalog_flow(**params, return_state=True))
    return state, state.result(raise_on_failure=False)


def read_results(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kontext.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_env(sandbox=None) -> dict[str, str]:
    """Environment for a `kontext` subprocess: the test server, and the sandbox's credentials."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATE_")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    if sandbox is not None:
        env["REPLICATE_API_TOKEN"] = sandbox.token
        env["REPLICATE_BASE_URL"] = sandbox.base_url
    return env


def make_client(sb: Any, **kwargs: Any) -> ReplicateClient:
    """A client for a sandbox, with retries fast enough for tests."""
    kwargs.setdefault("retry", FAST_RETRY)
    return ReplicateClient(api_token=sb.token, base_url=sb.base_url, **kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(api_url: str | None, home: Path, sandbox: Any = None) -> dict[str, str]:
    """Environment for a Prefect subprocess talking to `api_url` (None: no server configured, so
    Prefect's embedded one or `kontext run`'s own), without our secrets or the caller's Prefect
    and kontext settings; with `sandbox`, its credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICATE_", "PREFECT_", "KONTEXT_"))}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if sandbox is not None:
        env.update(REPLICATE_API_TOKEN=sandbox.token, REPLICATE_BASE_URL=sandbox.base_url)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
    )
    return env


class PrefectServer:
    """A real `prefect server start` on a loopback port with its own home and database."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.processes: list[Any] = []

    def env(self) -> dict[str, str]:
        return prefect_env(self.api_url, self.home)

    def spawn(self, args: list[str], log_name: str, cwd: Path = REPO_ROOT) -> Any:
        import subprocess

        log = open(self.home / log_name, "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, cwd=cwd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append((proc, log))
        return proc

    def __enter__(self) -> PrefectServer:
        import sys
        import time
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        prefect = str(Path(sys.executable).with_name("prefect"))
        self.spawn(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], "server.log"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"prefect server did not start:\n{(self.home / 'server.log').read_text()[-3000:]}")

    def __exit__(self, *exc_info: object) -> None:
        import os
        import signal
        import subprocess

        for proc, log in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        self.processes.clear()
