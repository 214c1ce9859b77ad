"""Run the catalog flow once and print one JSON line of timings (a child of benchmarks.run)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

t_start = time.perf_counter()


class _ErrorCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("prefect.server") or "sqlalchemy" in record.name:
            self.count += 1


def main() -> None:
    manifest, out, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    errors = _ErrorCounter()
    logging.getLogger().addHandler(errors)
    from prefect import flow

    from flows.edit_catalog import edit_catalog

    @flow
    def warm_up() -> None:  # starts the embedded server (if any) outside the measured flow
        return None

    warm_up()
    catalog_flow = edit_catalog
    if workers := params.pop("dask_workers", None):  # a temporary local Dask cluster (B6)
        from prefect_dask import DaskTaskRunner

        cluster = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
        catalog_flow = edit_catalog.with_options(task_runner=DaskTaskRunner(cluster_kwargs=cluster))
    t_flow = time.perf_counter()
    state = asyncio.run(catalog_flow(manifest=manifest, output_dir=out, return_state=True, **params))
    flow_seconds = time.perf_counter() - t_flow
    summary = state.result(raise_on_failure=False)
    print(
        json.dumps(
            {
                "flow_seconds": flow_seconds,
                "total_seconds": time.perf_counter() - t_start,
                "counts": summary.counts,
                "server_errors": errors.count,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
