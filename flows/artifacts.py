"""What a catalog run shows in the Prefect UI: progress while it runs; results, summary, gallery after.

Artifact keys are stable per manifest (or per the flow's ``artifact_key``), so the Artifacts page
lists every run's version of the same key side by side.
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext

from kontext.schema import input_image_kind, local_path

if TYPE_CHECKING:
    from flows.edit_catalog import CatalogSummary

PRICE_PER_IMAGE_USD = 0.025
GALLERY_ROWS = 12
THUMBNAIL_PX = 160
_progress_ids: dict[str, Any] = {}


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")[:60] or "catalog"


def _done_line(results: Sequence[dict[str, Any]]) -> tuple[float, str]:
    counts = Counter(r["status"] for r in results)
    total = len(results) or 1
    done = total - counts.get("pending", 0)
    parts = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
    return 100.0 * done / total, f"{done}/{len(results)} rows done ({parts})"


async def publish_progress(key: str, results: Sequence[dict[str, Any]], started: datetime) -> None:
    """Create or update the run's progress artifact (done / total, counts by status)."""
    if FlowRunContext.get() is None:
        return
    percent, description = _done_line(results)
    run_id = str(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]
    artifact_id = _progress_ids.get(run_id)
    if artifact_id is None:
        _progress_ids[run_id] = await acreate_progress_artifact(
            percent, key=f"{artifact_key(key)}-progress", description=description
        )
    else:
        await aupdate_progress_artifact(artifact_id, percent, description=description)


async def tag_flow_run(tags: Sequence[str]) -> None:
    """Add `tags` (the model, the manifest) to the running flow run, so runs can be filtered by them."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    merged = sorted(set(context.flow_run.tags) | set(tags))
    await context.client.update_flow_run(context.flow_run.id, tags=merged)  # the run's own client


def _seconds(result: dict[str, Any]) -> float | None:
    value = result.get("predict_time_s")
    return round(float(value), 2) if isinstance(value, int | float) else None


async def publish_final_artifacts(
    key: str,
    results: Sequence[dict[str, Any]],
    summary: CatalogSummary,
    started: datetime,
    finished: datetime,
    model: str,
    images: Sequence[str | None] = (),
) -> None:
    """The results table, the markdown summary and the before/after gallery.

    `images` are the rows' input images as resolved (local paths absolute), for thumbnails.
    """
    if FlowRunContext.get() is None:
        return
    base = artifact_key(key)
    percent, description = _done_line(results)
    artifact_id = _progress_ids.pop(str(FlowRunContext.get().flow_run.id), None)  # type: ignore[union-attr]
    if artifact_id is not None:
        await aupdate_progress_artifact(artifact_id, percent, description=description)
    table = [
        {
            "id": r["id"],
            "status": r["status"],
            "prediction_id": r.get("prediction_id") or "",
            "output": Path(r["output_path"]).name if r.get("output_path") else (r.get("output_url") or ""),
            "error": r.get("error") or "",
            "seconds": _seconds(r),
        }
        for r in results
    ]
    await acreate_table_artifact(table, key=f"{base}-results", description=f"Results of {summary.manifest}")
    await acreate_markdown_artifact(
        summary_markdown(summary, started, finished, model),
        key=f"{base}-summary",
        description="Catalog run summary",
    )
    await acreate_markdown_artifact(
        gallery_markdown(results, images), key=f"{base}-gallery", description="Before / after gallery"
    )


def summary_markdown(summary: CatalogSummary, started: datetime, finished: datetime, model: str) -> str:
    counts = summary.counts
    paid = sum(counts.get(s, 0) for s in ("succeeded", "failed", "canceled", "unknown"))
    lines = [
        f"# Catalog run: {Path(summary.manifest).name}",
        "",
        f"Model `{model}` · {summary.total} rows · {(finished - started).total_seconds():.1f} s · "
        f"estimated cost ${paid * PRICE_PER_IMAGE_USD:.2f} ({paid} predictions × "
        f"${PRICE_PER_IMAGE_USD})",
        "",
        "| status | rows |",
        "|---|---|",
        *(f"| {status} | {n} |" for status, n in sorted(counts.items())),
        "",
        f"Results manifest: `{summary.results}` · outputs in `{summary.output_dir}`",
    ]
    if summary.stopped_reason:
        lines += ["", f"**Stopped early:** {summary.stopped_reason}"]
    if summary.failures:
        lines += ["", "## Rows that did not succeed", "", "| id | status | reason |", "|---|---|---|"]
        for failure in summary.failures[:200]:
            reason = str(failure.get("error") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {failure['id']} | {failure['status']} | {reason} |")
        if len(summary.failures) > 200:
            lines.append(f"| … | | {len(summary.failures) - 200} more in the results manifest |")
    return "\n".join(lines)


def thumbnail_data_uri(source: str | None) -> str | None:
    """A small JPEG data URI of a local image (or data URI), or None if it cannot be read here."""
    if not source:
        return None
    try:
        if input_image_kind(source) == "data":
            raw = base64.b64decode(source.split(",", 1)[1])
            image = Image.open(io.BytesIO(raw))
        elif input_image_kind(source) == "file":
            image = Image.open(local_path(source))
        else:
            return None
        with image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=70)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _cell(source: str | None, link: str | None, alt: str) -> str:
    uri = thumbnail_data_uri(source)
    if uri:
        return f"![{alt}]({uri})"
    if link and link.startswith(("http://", "https://")):
        return f"[{alt}]({link})"
    return "—"


def gallery_markdown(
    results: Sequence[dict[str, Any]], images: Sequence[str | None] = (), first: int = GALLERY_ROWS
) -> str:
    """Input and output thumbnails side by side: the first `first` rows and every failed row."""
    ok = ("succeeded", "skipped", "pending")
    lines = ["# Before / after", "", "| id | status | before | after |", "|---|---|---|---|"]
    for i, r in enumerate(results):
        if i >= first and r["status"] in ok:
            continue
        source = images[i] if i < len(images) else r.get("image_url")
        before = _cell(source, r.get("image_url"), f"{r['id']} before")
        after = _cell(r.get("output_path"), r.get("output_url"), f"{r['id']} after")
        status = r["status"] if not r.get("error") else f"{r['status']}: {str(r['error'])[:120]}"
        lines.append(f"| {r['id']} | {status.replace('|', '/')} | {before} | {after} |")
    return "\n".join(lines)
