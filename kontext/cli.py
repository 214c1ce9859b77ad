"""The ``kontext`` command: run, validate, demo, sandbox.

Exit codes of ``kontext run``: 0 when every row succeeded or was skipped, 1 when some rows failed
or were invalid, 2 when the run could not start (unreadable manifest, missing column, no
credentials). ``kontext validate`` spends nothing: 0 all rows valid, 1 some invalid, 2 unusable.

The core has no Prefect import; ``run`` and ``demo`` import the flow layer when they are called.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from kontext.errors import KontextError
from kontext.manifest import Manifest, ManifestError, load_manifest
from kontext.prefect_server import EarlyPrefectServer
from kontext.schema import ASPECT_RATIOS, OUTPUT_FORMATS

PRICE_PER_IMAGE_USD = 0.025
REPO_ROOT = Path(__file__).resolve().parents[1]


def _add_model_defaults(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model input defaults (a manifest column overrides them per row)")
    group.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, default="match_input_image")
    group.add_argument("--num-inference-steps", type=int, default=28)
    group.add_argument("--guidance", type=float, default=2.5)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--output-format", choices=OUTPUT_FORMATS, default="jpg")
    group.add_argument("--output-quality", type=int, default=80)
    group.add_argument("--disable-safety-checker", action="store_true")
    group.add_argument("--no-go-fast", dest="go_fast", action="store_false")


def _model_defaults(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "aspect_ratio": args.aspect_ratio,
        "num_inference_steps": args.num_inference_steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "output_format": args.output_format,
        "output_quality": args.output_quality,
        "disable_safety_checker": args.disable_safety_checker,
        "go_fast": args.go_fast,
    }


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", help="results CSV (default OUT/results.csv)")
    parser.add_argument("--credentials", help="name of a saved ReplicateCredentials block")
    parser.add_argument("--concurrency", type=int, default=16, help="predictions in flight")
    parser.add_argument("--max-creates-per-minute", type=float, default=600)
    parser.add_argument("--prediction-timeout", type=float, default=600, help="seconds, then cancel")
    parser.add_argument("--max-failure-ratio", type=float, default=0.1)
    parser.add_argument(
        "--prefer-wait", type=int, default=10, help="seconds a create may wait for the result (0: poll)"
    )
    _add_model_defaults(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kontext", description="Edit catalog images with FLUX.1 Kontext [dev] on Replicate."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a manifest through the catalog flow")
    run.add_argument("manifest")
    run.add_argument("--out", required=True, help="output directory")
    _add_run_options(run)

    validate = commands.add_parser("validate", help="check a manifest; calls nothing, spends nothing")
    validate.add_argument("manifest")
    validate.add_argument("--price", type=float, default=PRICE_PER_IMAGE_USD, help="USD per image")
    validate.add_argument("--max-creates-per-minute", type=float, default=600)
    validate.add_argument("--show", type=int, default=10, help="errors to print")
    _add_model_defaults(validate)

    demo = commands.add_parser("demo", help="run the bundled example against a local sandbox")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--latency", type=float, default=1.5, help="sandbox seconds per prediction")

    commands.add_parser("sandbox", help="serve the local Replicate-compatible sandbox", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        from kontext.sandbox import main as sandbox_main

        return sandbox_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "run":
        return cmd_run(args)
    return cmd_demo(args)


# ---------------------------------------------------------------------- validate


def describe(manifest: Manifest, *, price: float, creates_per_minute: float, show: int) -> str:
    valid = len(manifest.valid_rows)
    lines = [
        f"{manifest.source}: {len(manifest.rows)} rows, {valid} valid, {len(manifest.invalid_rows)} invalid",
    ]
    for row in manifest.invalid_rows[:show]:
        lines.append(f"  row {row.index + 1} (id {row.id!r}): {row.error}")
    if len(manifest.invalid_rows) > show:
        lines.append(f"  ... and {len(manifest.invalid_rows) - show} more")
    minutes = valid / creates_per_minute if creates_per_minute else 0.0
    lines.append(
        f"estimated cost: {valid} predictions x ${price:.3f} = ${valid * price:.2f}; "
        f"at {creates_per_minute:g} creates/min the creates alone take at least "
        f"{math.ceil(minutes * 60)} s"
    )
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest, _model_defaults(args))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        describe(manifest, price=args.price, creates_per_minute=args.max_creates_per_minute, show=args.show)
    )
    return 1 if manifest.invalid_rows else 0


# ---------------------------------------------------------------------- run and demo


def _print_summary(summary: Any) -> None:
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(summary.counts.items()))
    print(f"{summary.total} rows ({counts})")
    for failure in summary.failures[:20]:
        print(f"  {failure['id']}: {failure['status']}: {failure['error']}")
    if len(summary.failures) > 20:
        print(f"  ... {len(summary.failures) - 20} more in {summary.results}")
    if summary.stopped_reason:
        print(f"stopped early: {summary.stopped_reason}")
    print(f"results: {summary.results}")


def _flush_to_prefect() -> None:
    """Send the logs and events Prefect still holds (it would at exit, to a stopped server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def run_flow(parameters: dict[str, Any], server: EarlyPrefectServer | None = None) -> Any:
    """Run the catalog flow and return its `CatalogSummary` (also when the run ended Failed).

    `server`, when given, was started before Prefect was imported; it is used only if Prefect's
    settings name no server (a profile may), and stopped however the run ends.
    """
    used = False
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.edit_catalog import edit_catalog

        settings: Any = contextlib.nullcontext()
        if server is not None:
            if PREFECT_API_URL.value():  # a profile names a server: the run goes there
                server.stop()
            elif server.wait_ready():
                settings = temporary_settings(updates={PREFECT_API_URL: server.api_url})
                used = True
            else:  # Prefect starts its embedded server instead, as it would have anyway
                print(f"note: the early Prefect server did not start:\n{server.output()}", file=sys.stderr)
                server.stop()
        with settings:
            state = asyncio.run(edit_catalog(**parameters, return_state=True))
    finally:
        if server is not None:
            try:
                if used and server.proc.poll() is None:
                    _flush_to_prefect()  # the run's last logs and events, while their server is up
            finally:
                server.stop()
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


def cmd_run(args: argparse.Namespace) -> int:
    if not args.credentials and not os.environ.get("REPLICATE_API_TOKEN"):
        print(
            "error: no credentials: pass --credentials BLOCK_NAME (a saved ReplicateCredentials "
            "block) or set REPLICATE_API_TOKEN (and REPLICATE_BASE_URL for a proxy).\n"
            "To try everything offline first, run: kontext demo",
            file=sys.stderr,
        )
        return 2
    server = EarlyPrefectServer.start_if_embedded()  # starts while the manifest is read
    try:
        load_manifest(args.manifest)
    except ManifestError as exc:
        if server is not None:
            server.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parameters = {
        "manifest": args.manifest,
        "output_dir": args.out,
        "results": args.results,
        "credentials": args.credentials,
        "concurrency": args.concurrency,
        "max_creates_per_minute": args.max_creates_per_minute,
        "prediction_timeout": args.prediction_timeout,
        "max_failure_ratio": args.max_failure_ratio,
        "prefer_wait": args.prefer_wait or None,
        **_model_defaults(args),
    }
    try:
        summary = run_flow(parameters, server)
    except (KontextError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0 if summary.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from kontext.sandbox import Sandbox, SandboxConfig

    manifest = REPO_ROOT / "examples" / "manifest.csv"
    if not manifest.exists():
        print(f"error: the bundled example is missing ({manifest})", file=sys.stderr)
        return 2
    server = EarlyPrefectServer.start_if_embedded()  # starts while the sandbox does
    token = "demo-" + secrets.token_hex(8)
    out = Path(args.out).resolve()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    with Sandbox(SandboxConfig(token=token, latency=args.latency)) as sandbox:
        os.environ["REPLICATE_API_TOKEN"] = token
        os.environ["REPLICATE_BASE_URL"] = sandbox.base_url
        print(
            f"Local Replicate sandbox at {sandbox.base_url} (outputs served from {sandbox.output_base_url})"
        )
        print(f"Running {manifest.relative_to(REPO_ROOT)} through the edit-catalog flow...")
        summary = run_flow({"manifest": str(manifest), "output_dir": str(out), "concurrency": 8}, server)
        creates = sandbox.creates
    _print_summary(summary)
    print(f"\nEdited images: {out}/  ({creates} predictions created this run)")
    print("Look at the run (artifacts: progress, results table, summary, before/after gallery) with")
    print("  prefect server start   # then open http://127.0.0.1:4200/runs")
    print("(the demo ran on a temporary Prefect server over Prefect's local database, the one")
    print(" `prefect server start` shows; set PREFECT_API_URL to run it on a server of yours).")
    print("Run `kontext demo` again: every row is skipped, nothing is created twice.")
    return 0 if summary.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
