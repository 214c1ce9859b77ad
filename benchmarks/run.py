"""`make bench`: throughput, calls per row, scale and dry-run figures, against the sandbox.

Every figure is a ratio against a baseline measured in the same run (the rate-limit bound T*, the
official client's asyncio loop, or a stated budget); nothing here is asserted in the test suite.
The sandbox runs as its own process (as Replicate would be), our flow and the peer in processes of
their own, so each is measured alone.

    python -m benchmarks.run [--only B1,B3] [--quick]

Prints one table and writes benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PY = sys.executable
TOKEN = "bench-token"


@dataclass
class Figure:
    name: str
    ours: float
    baseline: float
    ratio: float
    target: str
    passed: bool
    unit: str
    note: str = ""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SandboxProcess:
    """`kontext sandbox` as a separate process; counters read from its stats endpoint."""

    def __init__(self, **options: Any):
        self.port, self.output_port = free_port(), free_port()
        args = [
            PY,
            "-m",
            "kontext.sandbox",
            "--port",
            str(self.port),
            "--output-port",
            str(self.output_port),
            "--token",
            TOKEN,
        ]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "sandbox API at" not in line:
            raise RuntimeError(f"sandbox did not start: {line}")
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.output_port}/_sandbox/stats") as response:
            return json.load(response)

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def write_manifest(path: Path, n: int, *, aspect_ratio: str = "1:1") -> Path:
    images = sorted((REPO / "examples" / "images").glob("*.jpg"))
    lines = ["id,image_url,prompt,aspect_ratio"]
    lines += [f"SKU-{i:06d},{images[i % len(images)]},studio shot,{aspect_ratio}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_child(
    args: list[str], env: dict[str, str], *, json_line: bool = True
) -> tuple[dict[str, Any], float]:
    """Run a measured child; returns (its JSON line, its peak RSS in MB).

    The JSON line gains ``process_seconds``: the child's wall time from start to exit, interpreter
    start-up, imports and (for ours) Prefect's start-up and shutdown included. A child that prints
    no JSON (the CLI) gives ``{"stdout": ...}`` instead; it must exit 0 either way.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    _, status, usage = os.wait4(proc.pid, 0)
    process_seconds = time.perf_counter() - started
    stdout = proc.stdout.read() if proc.stdout else ""
    stderr = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    found = [line for line in stdout.splitlines() if line.startswith("{")] if json_line else [stdout]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{args[2:4]} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    result = json.loads(found[-1]) if json_line else {"stdout": stdout}
    return {**result, "process_seconds": process_seconds}, usage.ru_maxrss / 1024


def prefect_env(home: Path) -> dict[str, str]:
    """This environment with Prefect pointed at `home` (no configured server, quiet, offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "REPLICATE_"))}
    env.update(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING"
    )
    return env


def child_env(
    sandbox: SandboxProcess, api_url: str | None = None, prefect_home: Path | None = None
) -> dict[str, str]:
    env = prefect_env(prefect_home or Path(tempfile.mkdtemp(prefix="bench-prefect-")))
    env.update(REPLICATE_API_TOKEN=TOKEN, REPLICATE_BASE_URL=sandbox.base_url)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def ours(sandbox: SandboxProcess, manifest: Path, out: Path, api_url: str | None = None, **params: Any):
    args = [PY, "-m", "benchmarks.flow_once", str(manifest), str(out), json.dumps(params)]
    return run_child(args, child_env(sandbox, api_url))


def ours_cli(
    sandbox: SandboxProcess,
    manifest: Path,
    out: Path,
    *,
    concurrency: int,
    api_url: str | None = None,
    prefect_home: Path | None = None,
    early_server: bool = True,
):
    """What a user types: `kontext run` (on a server it starts itself unless `api_url`; with
    `early_server` False, on the embedded server Prefect starts when the flow is called)."""
    args = [
        PY,
        "-m",
        "kontext.cli",
        "run",
        str(manifest),
        "--out",
        str(out),
        "--concurrency",
        str(concurrency),
    ]
    env = child_env(sandbox, api_url, prefect_home)
    if not early_server:
        env["KONTEXT_EARLY_SERVER"] = "0"
    return run_child(args, env, json_line=False)


def prepare_prefect_home() -> Path:
    """A PREFECT_HOME whose database an earlier run already created, as on any machine after its
    first run (creating and migrating it is a one-time cost, measured separately)."""
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    script = "from prefect import flow; flow(name='first-run')(lambda: None)()"
    subprocess.run([PY, "-c", script], env=prefect_env(home), check=True, capture_output=True, timeout=300)
    return home


def peer(sandbox: SandboxProcess, n: int, out: Path, concurrency: int):
    args = [PY, "-m", "benchmarks.peer", str(n), str(out), str(concurrency)]
    return run_child(args, child_env(sandbox))


def calls(stats: dict[str, Any], origin: str) -> int:
    return sum(n for kind, n in stats["requests"].items() if kind.startswith(origin + " "))


# ---------------------------------------------------------------------- the figures


def throughput_job(tmp: Path, quick: bool, name: str, **params: Any) -> tuple[int, float, dict, dict]:
    """B1's job (2 s latency, 1200 creates/min): (N, its bound T*, our result, the sandbox's stats)."""
    n, latency, rate = (200 if quick else 600), 2.0, 1200
    with SandboxProcess(
        latency=latency, start_delay=0.05, create_rate_limit=rate, create_burst=20, other_rate_limit=100000
    ) as sb:
        result, _ = ours(
            sb,
            write_manifest(tmp / f"{name}.csv", n),
            tmp / name,
            concurrency=96,
            max_creates_per_minute=rate,
            **params,
        )
        stats = sb.stats()
    return n, n / (rate / 60) + latency, result, stats


def b1_throughput(tmp: Path, quick: bool) -> list[Figure]:
    n, bound, result, _ = throughput_job(tmp, quick, "b1")
    ratio = result["flow_seconds"] / bound
    return [
        Figure(
            f"B1 throughput, N={n}, 2 s latency, 1200/min",
            result["flow_seconds"],
            bound,
            ratio,
            "<= 1.10 x T*",
            ratio <= 1.10,
            "s",
            f"counts {result['counts']}",
        )
    ]


def b2_peer(tmp: Path, quick: bool) -> list[Figure]:
    """`kontext run` against the peer script, both as whole processes (start-up included)."""
    n, latency, concurrency = (100 if quick else 300), 1.0, 16
    options = dict(
        latency=latency, start_delay=0.05, create_rate_limit=600, create_burst=10, other_rate_limit=100000
    )
    manifest = write_manifest(tmp / "b2.csv", n)
    with SandboxProcess(**options) as sb:
        peer_result, _ = peer(sb, n, tmp / "b2-peer", concurrency)
    baseline = peer_result["process_seconds"]
    note = f"peer retried {peer_result['throttled']} throttled creates"
    runs: list[tuple[str, dict[str, Any]]] = []

    def run(name: str, out: str, **kwargs: Any) -> None:
        with SandboxProcess(**options) as sb:
            result, _ = ours_cli(sb, manifest, tmp / out, concurrency=concurrency, **kwargs)
            creates = sb.stats()["creates"]
        if creates != n or f"{n} rows (succeeded: {n})" not in result["stdout"]:
            raise RuntimeError(f"{name}: {creates} creates for {n} rows:\n{result['stdout'][-2000:]}")
        runs.append((name, result))

    run(
        f"B2 vs official client, N={n}, incl. Prefect start-up",
        "b2-ours",
        prefect_home=prepare_prefect_home(),
    )
    run(
        "B2 the same, Prefect's own embedded server (KONTEXT_EARLY_SERVER=0)",
        "b2-embedded",
        prefect_home=prepare_prefect_home(),
        early_server=False,
    )
    run("B2 the same, first run on a machine (creates Prefect's DB)", "b2-first")
    from tests.helpers import PrefectServer

    with PrefectServer(Path(tempfile.mkdtemp(prefix="bench-server-"))) as server:
        run("B2 the same, on a running Prefect server", "b2-warm", api_url=server.api_url)
    return [
        Figure(
            name,
            result["process_seconds"],
            baseline,
            result["process_seconds"] / baseline,
            "<= 1.15",
            result["process_seconds"] / baseline <= 1.15,
            "s",
            note if i == 0 else "",
        )
        for i, (name, result) in enumerate(runs)
    ]


def b3_calls(tmp: Path, quick: bool) -> list[Figure]:
    n = 50 if quick else 200
    with SandboxProcess(latency=1.0, start_delay=0.05, other_rate_limit=100000) as sb:
        result, _ = ours(sb, write_manifest(tmp / "b3.csv", n), tmp / "b3", concurrency=32, prefer_wait=10)
        stats = sb.stats()
    api, downloads = calls(stats, "api") / n, calls(stats, "output") / n
    return [
        Figure(
            "B3 API calls per row (latency 1 s < Prefer: wait 10 s)",
            api,
            1.0,
            api,
            "<= 1.2",
            api <= 1.2,
            "calls",
            f"creates {stats['creates']} for {n} rows",
        ),
        Figure("B3 downloads per row", downloads, 1.0, downloads, "<= 1.0", downloads <= 1.0, "calls"),
    ]


def b4_scale(tmp: Path, quick: bool) -> list[Figure]:
    n, latency, rate = (2000 if quick else 10000), 0.2, 60000
    with SandboxProcess(
        latency=latency, start_delay=0.0, create_rate_limit=rate, create_burst=200, other_rate_limit=1000000
    ) as sb:
        result, rss = ours(
            sb, write_manifest(tmp / "b4.csv", n), tmp / "b4", concurrency=64, max_creates_per_minute=rate
        )
        stats = sb.stats()
    bound = n / (rate / 60) + latency
    per_row_ms = 1000 * (result["flow_seconds"] - bound) / n
    ok = result["counts"] == {"succeeded": n} and stats["creates"] == n and not result["server_errors"]
    return [
        Figure(
            f"B4 scale: {n} rows in one flow run",
            result["flow_seconds"],
            bound,
            result["flow_seconds"] / bound,
            "completes, no server errors",
            ok,
            "s",
            f"counts {result['counts']}, creates {stats['creates']}, server errors {result['server_errors']}",
        ),
        Figure("B4 peak RSS of the flow process", rss, 1536, rss / 1536, "< 1.5 GB", rss < 1536, "MB"),
        Figure(
            "B4 orchestration overhead per row",
            per_row_ms,
            1000 / (rate / 60),
            per_row_ms / (1000 / (rate / 60)),
            "report",
            True,
            "ms",
            "(wall - T*) / N",
        ),
    ]


def b5_dry_run(tmp: Path, quick: bool) -> list[Figure]:
    n = 20000 if quick else 100000
    manifest = write_manifest(tmp / "b5.csv", n)
    script = (
        "import json,sys,time; t=time.perf_counter(); from kontext.cli import main; "
        f"rc=main(['validate', {str(manifest)!r}]); "
        "print(json.dumps({'seconds': time.perf_counter()-t, 'rc': rc}))"
    )
    result, rss = run_child([PY, "-c", script], dict(os.environ))
    return [
        Figure(
            f"B5 dry run of {n} rows",
            result["seconds"],
            10.0,
            result["seconds"] / 10.0,
            "< 10 s",
            result["seconds"] < 10,
            "s",
        ),
        Figure(f"B5 dry run peak RSS ({n} rows)", rss, 1024, rss / 1024, "< 1 GB", rss < 1024, "MB"),
    ]


def b6_dask(tmp: Path, quick: bool) -> list[Figure]:
    """B1's job on a `DaskTaskRunner` (a temporary local cluster of 2 worker processes, 2 shards)."""
    n, bound, result, stats = throughput_job(tmp, quick, "b6", dask_workers=2, shards=2)
    ratio = result["flow_seconds"] / bound
    return [
        Figure(
            f"B6 B1's job on a local Dask cluster (2 workers), N={n}",
            result["flow_seconds"],
            bound,
            ratio,
            "report (cluster start incl.)",
            result["counts"] == {"succeeded": n} and stats["creates"] == n,
            "s",
            f"counts {result['counts']}, creates {stats['creates']}, "
            f"429s {sum(n for kind, n in stats['requests'].items() if kind.endswith(' 429'))}",
        )
    ]


def b7_startup(tmp: Path, quick: bool) -> list[Figure]:
    """Where B2's start-up goes: each piece timed as whole processes, median of 3 (1 if quick)."""
    repeats = 1 if quick else 3
    env = prefect_env(prepare_prefect_home())

    def wall(args: list[str], extra: dict[str, str] | None = None) -> float:
        return statistics.median(
            [
                run_child(args, {**env, **(extra or {})}, json_line=False)[0]["process_seconds"]
                for _ in range(repeats)
            ]
        )

    def server_ready() -> float:
        """The server `kontext run` starts early, from its start to its health check."""
        from kontext.prefect_server import EarlyPrefectServer

        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            server = EarlyPrefectServer(env)
            try:
                if not server.wait_ready():
                    raise RuntimeError(f"prefect server start did not answer:\n{server.output()}")
                times.append(time.perf_counter() - started)
            finally:
                server.stop()
        return statistics.median(times)

    python = wall([PY, "-c", "pass"])
    prefect_import = wall([PY, "-c", "import prefect"])
    flow_import = wall([PY, "-c", "import flows.edit_catalog"])
    ready = server_ready()
    manifest = write_manifest(tmp / "b7.csv", 1)
    with SandboxProcess(latency=0.05, start_delay=0.0) as sb:
        run_env = {"REPLICATE_API_TOKEN": TOKEN, "REPLICATE_BASE_URL": sb.base_url}
        cli = [PY, "-m", "kontext.cli", "run", str(manifest), "--out"]
        from tests.helpers import PrefectServer

        with PrefectServer(Path(tempfile.mkdtemp(prefix="bench-server-"))) as server:
            on_server = wall([*cli, str(tmp / "b7-server")], {**run_env, "PREFECT_API_URL": server.api_url})
        early = wall([*cli, str(tmp / "b7-early")], run_env)
        embedded = wall([*cli, str(tmp / "b7-embedded")], {**run_env, "KONTEXT_EARLY_SERVER": "0"})

    def report(name: str, seconds: float, note: str = "") -> Figure:
        return Figure(name, seconds, on_server, seconds / on_server, "report", True, "s", note)

    return [
        report("B7 python start-up alone", python),
        report("B7 import prefect", prefect_import),
        report("B7 import the flow layer (prefect, pandas, ...)", flow_import),
        report("B7 prefect server start, Popen to /health", ready, "the early server"),
        report("B7 kontext run, 1 row, running server", on_server, "baseline of this block"),
        report("B7 kontext run, 1 row, early server (default)", early),
        report("B7 kontext run, 1 row, Prefect's embedded server", embedded, "KONTEXT_EARLY_SERVER=0"),
    ]


BENCHMARKS = {
    "B1": b1_throughput,
    "B2": b2_peer,
    "B3": b3_calls,
    "B4": b4_scale,
    "B5": b5_dry_run,
    "B6": b6_dask,
    "B7": b7_startup,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller N (a smoke run, not the figures)")
    args = parser.parse_args(argv)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="kontext-bench-") as tmp:
        for key in args.only.split(","):
            started = time.perf_counter()
            try:
                figures += BENCHMARKS[key.strip()](Path(tmp), args.quick)
            except Exception as exc:  # report and go on to the next figure
                figures.append(Figure(f"{key} failed: {exc}"[:300], 0, 0, 0, "-", False, "-"))
            print(f"[{key} done in {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    header = f"{'figure':58} {'ours':>10} {'baseline':>10} {'ratio':>7}  {'target':28} result"
    print(header)
    print("-" * len(header))
    for f in figures:
        print(
            f"{f.name[:58]:58} {f.ours:>10.2f} {f.baseline:>10.2f} {f.ratio:>7.3f}  {f.target:28} "
            f"{'PASS' if f.passed else 'FAIL'}  {f.unit} {f.note}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "quick": args.quick,
        "figures": [asdict(f) for f in figures],
    }
    (RESULTS / "latest.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwritten to {RESULTS / 'latest.json'}")
    return 0 if all(f.passed for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
