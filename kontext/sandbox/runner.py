"""`Sandbox`: the two origins served by uvicorn on loopback, in a background thread; and `main`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import sys
import threading
from typing import Any

import uvicorn

from kontext.sandbox.service import ApiApp, OutputApp, RecordedRequest, SandboxState
from kontext.sandbox.settings import SandboxConfig


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Sandbox:
    """A local Replicate-compatible API (and a separate output-file origin) on loopback.

    Example:
        ```python
        from kontext.sandbox import Sandbox, SandboxConfig

        with Sandbox(SandboxConfig(token="t", latency=0.5)) as sb:
            print(sb.base_url, sb.output_base_url)   # set REPLICATE_BASE_URL=sb.base_url
        ```
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        port: int = 0,
        output_port: int = 0,
        host: str = "127.0.0.1",
    ):
        self.config = config or SandboxConfig()
        self.host = host
        self._state = SandboxState(self.config)
        self._sockets = [_bind(host, port), _bind(host, output_port)]
        self.port = self._sockets[0].getsockname()[1]
        self.output_port = self._sockets[1].getsockname()[1]
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._state.api_base = self.base_url
        self._state.output_base = self.output_base_url

    @property
    def token(self) -> str:
        return self.config.token

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{self.config.path_prefix.rstrip('/')}"

    @property
    def output_base_url(self) -> str:
        return f"http://{self.host}:{self.output_port}"

    # ------------------------------------------------------------------ observation

    def clock(self) -> float:
        return self._state.clock()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def creates(self) -> int:
        return self._state.creates

    @property
    def predictions(self) -> dict[str, dict[str, Any]]:
        with self._state.lock:
            stored = list(self._state.predictions.values())
        return {p.id: {**self._state.to_json(p)} for p in stored}

    def count(
        self,
        origin: str | None = None,
        method: str | None = None,
        path_suffix: str | None = None,
        status: int | None = None,
    ) -> int:
        return sum(
            1
            for r in self.requests
            if (origin is None or r.origin == origin)
            and (method is None or r.method == method)
            and (path_suffix is None or r.path.endswith(path_suffix))
            and (status is None or r.status == status)
        )

    def register_input(self, name: str, data: bytes, content_type: str) -> str:
        """Serve `data` at ``<output_base_url>/inputs/<name>`` (an http input_image, offline)."""
        with self._state.lock:
            self._state.inputs[name] = (data, content_type)
        return f"{self.output_base_url}/inputs/{name}"

    def reset_stats(self) -> None:
        with self._state.lock:
            self._state.requests.clear()
            self._state.counters.clear()
            self._state.creates = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Sandbox:
        apps = [ApiApp(self._state), OutputApp(self._state)]
        for app in apps:
            config = uvicorn.Config(
                app,
                log_level="critical",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=30,
                limit_concurrency=None,
            )
            self._servers.append(uvicorn.Server(config))
        self._thread = threading.Thread(target=self._serve, name="kontext-sandbox", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not all(s.started for s in self._servers):
            raise RuntimeError(f"the sandbox did not start: {self._error}")
        return self

    def _serve(self) -> None:
        async def serve_all() -> None:
            tasks = [
                asyncio.create_task(server.serve(sockets=[sock]))
                for server, sock in zip(self._servers, self._sockets, strict=True)
            ]
            while not all(server.started for server in self._servers):
                if any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.005)
            self._ready.set()
            await asyncio.gather(*tasks)

        try:
            asyncio.run(serve_all())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kontext sandbox", description="Serve a local Replicate-compatible API for flux-kontext-dev."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--output-port", type=int, default=0, help="port of the output-file origin (0: any)")
    defaults = SandboxConfig()
    for item in dataclasses.fields(SandboxConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        elif item.name in ("token", "response_shape", "path_prefix") or "substring" in item.name:
            parser.add_argument(flag, default=default)
        elif isinstance(default, int) and "every" not in item.name and "burst" not in item.name:
            parser.add_argument(flag, type=int, default=default)
        elif "every" in item.name or "burst" in item.name:
            parser.add_argument(flag, type=int, default=default)
        else:
            parser.add_argument(flag, type=float, default=default)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``kontext sandbox --port 8787 --token TOKEN [--latency S] [--create-rate-limit N] ...``"""
    args = build_parser().parse_args(argv)
    names = {item.name for item in dataclasses.fields(SandboxConfig)}
    config = SandboxConfig(**{k: v for k, v in vars(args).items() if k in names})
    sandbox = Sandbox(config, port=args.port, output_port=args.output_port, host=args.host).start()
    print(
        f"sandbox API at {sandbox.base_url} (token {config.token!r}); outputs at {sandbox.output_base_url}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    sandbox.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
