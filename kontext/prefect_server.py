"""A Prefect API server for one ``kontext run``, started before Prefect is even imported.

With no ``PREFECT_API_URL``, Prefect starts its embedded server when the flow is called: after the
CLI has imported Prefect and the flow layer (~2 s here), and after importing the server's own
modules just to start it (~2 s more), it waits ~5 s for the server process to answer. Started
first thing instead, the server's ~5 s run alongside those imports: measured ~3 s less before the
first row on these 2-core machines (README, "Performance"). It is the documented ``prefect server
start`` on a free loopback port, with Prefect's own database (the same one the embedded server
uses), without the UI, the scheduler or the late-runs service (a one-off run does not need them,
and the scheduler would otherwise schedule the database's deployments).

This module does not import Prefect; the caller decides whether to use the server once it has
imported Prefect's settings (a profile may name a server of its own).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a function for the child (between fork and exec) that asks for SIGTERM when its parent
    dies, so a killed run does not leave its server behind. Resolved here, in the parent: the child
    must not import or take locks."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_parent_death_signal


def _profile_names_a_server() -> bool:
    """Whether the active Prefect profile sets ``PREFECT_API_URL`` (``prefect config set``, or
    ``prefect cloud login``), read from the profiles file without importing Prefect."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(name, {})
    return isinstance(profile, dict) and bool(profile.get("PREFECT_API_URL"))


class EarlyPrefectServer:
    """``prefect server start`` on a free loopback port, as a child of this process."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        """`env`: the server's environment (default this process's)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--no-ui", "--no-scheduler", "--no-late-runs"]
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            preexec_fn=_parent_death_signal(),  # noqa: PLW1509
        )

    @classmethod
    def start_if_embedded(cls) -> EarlyPrefectServer | None:
        """Start one unless the environment or the active Prefect profile names a server (or
        ``KONTEXT_EARLY_SERVER=0``). Other places Prefect reads settings from (a ``prefect.toml``,
        a ``.env``) are left to the caller's check once Prefect is imported."""
        if os.environ.get("PREFECT_API_URL") or os.environ.get("KONTEXT_EARLY_SERVER") == "0":
            return None
        if _profile_names_a_server():
            return None
        try:
            return cls()
        except OSError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Whether the server answers its health check within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)  # poll interval while the server process starts
        return False

    def output(self) -> str:
        """What the server printed (for an error message when it did not start)."""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._output.close()
