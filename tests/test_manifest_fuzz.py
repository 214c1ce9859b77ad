"""Fuzzed manifests: never a crash, a clear error per bad row, a results CSV safe in a spreadsheet."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kontext.manifest import OVERRIDE_COLUMNS, ManifestError, check_rows, results_frame, safe_stem
from tests.helpers import EXAMPLES

MUG = str(EXAMPLES / "images" / "mug-white.jpg")
FIELDS = OVERRIDE_COLUMNS
NASTY = st.sampled_from(
    [
        "",
        " ",
        "../../etc/passwd",
        "CON",
        "con.txt",
        '=HYPERLINK("http://x","y")',
        "+1",
        "-1",
        "@SUM(A1)",
        "\t=1",
        "NaN",
        "inf",
        "-0",
        "1e400",
        "true",
        "yes",
        "ftp://x/y.jpg",
        "http://",
        "data:text/plain,x",
        "https://ex.ample/a.jpg",
        MUG,
        "日本語の説明",
        "emoji 🎉",
        "x" * 20_000,
        "\x00",
        "a\nb",
        "1:1",
        "7:3",
        "png",
        "gif",
        "28",
        "51",
        "2.5",
        "11",
        "0",
    ]
)
CELL = st.one_of(NASTY, st.text(max_size=40), st.integers(-(10**6), 10**6).map(str), st.floats().map(str))


@st.composite
def manifests(draw):
    columns = draw(
        st.lists(
            st.sampled_from(["id", "image_url", "input_image", "prompt", *FIELDS, "note"]),
            unique=True,
            max_size=8,
        )
    )
    n = draw(st.integers(0, 8))
    rows = [{c: draw(CELL) for c in columns} for _ in range(n)]
    return pd.DataFrame(rows, columns=columns, dtype=object)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_fuzzed_manifests_never_crash(frame):
    frame = frame.rename(columns={"input_image": "image_url"}).loc[:, lambda f: ~f.columns.duplicated()]
    if not {"image_url", "prompt"} <= set(frame.columns):
        return  # covered by read_table's whole-file check
    try:
        manifest = check_rows(frame.astype(str), {}, base_dir=Path("."))
    except ManifestError:
        return
    names = set()
    for row in manifest.rows:
        if row.valid:
            assert row.error is None and row.input_hash
        else:
            field = row.error.split(":", 1)[0]
            assert field in {"id", "image_url", "prompt", "input_image", *FIELDS}, row.error
        names.add(row.output_name.casefold())
        assert (
            "/" not in row.output_name and "\\" not in row.output_name and not row.output_name.startswith(".")
        )
    assert len(names) == len(manifest.rows)
    results = [
        {
            "id": r.id,
            "image_url": r.image_url,
            "prompt": r.prompt,
            "status": "invalid",
            "error": r.error,
            **r.extra,
        }
        for r in manifest.rows
    ]
    buffer = io.StringIO()
    results_frame(results, [c for c in frame.columns if c not in ("id", "image_url", "prompt")]).to_csv(
        buffer, index=False
    )
    for record in csv.reader(io.StringIO(buffer.getvalue(), newline="")):
        for cell in record:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


@given(st.text(max_size=300))
def test_any_id_gives_a_safe_file_name(row_id):
    stem = safe_stem(row_id, "row-1")
    assert stem and "/" not in stem and "\\" not in stem and not stem.startswith(".") and len(stem) <= 90
    assert stem.encode("ascii")  # plain ASCII on every filesystem
