"""Manifest checking (every row before spending), output names, results writing."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from kontext.manifest import (
    ManifestError,
    assign_output_names,
    load_manifest,
    results_frame,
    safe_stem,
    write_csv_atomic,
)
from tests.helpers import EXAMPLES

MUG = str(EXAMPLES / "images" / "mug-white.jpg")


def write(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_bundled_example_is_valid():
    manifest = load_manifest(EXAMPLES / "manifest.csv", {"output_format": "jpg"})
    assert len(manifest.rows) == 12 and not manifest.invalid_rows
    by_id = {row.id: row for row in manifest.rows}
    assert by_id["LAMP-202"].edit.output_format == "png"  # a column overrides the default
    assert by_id["MUG-001"].edit.output_format == "jpg"  # a blank cell keeps it
    assert by_id["MUG-001"].extra == {
        "aspect_ratio": "1:1",
        "output_format": "",
        "category": "kitchen",
        "title": "White ceramic mug",
    }


def test_each_bad_row_names_its_field_and_value(tmp_path):
    rows = [
        {"id": "ok", "image_url": MUG, "prompt": "fine"},
        {"id": "g", "image_url": MUG, "prompt": "x", "guidance": "abc"},
        {"id": "g2", "image_url": MUG, "prompt": "x", "guidance": "11"},
        {"id": "ar", "image_url": MUG, "prompt": "x", "aspect_ratio": "7:3"},
        {"id": "steps", "image_url": MUG, "prompt": "x", "num_inference_steps": "2.5"},
        {"id": "fast", "image_url": MUG, "prompt": "x", "go_fast": "maybe"},
        {"id": "img", "image_url": "ftp://host/a.jpg", "prompt": "x"},
        {"id": "missing", "image_url": "no/such/file.jpg", "prompt": "x"},
        {"id": "blank", "image_url": MUG, "prompt": "  "},
        {"id": "ok", "image_url": MUG, "prompt": "a repeated id"},
        {"id": "", "image_url": MUG, "prompt": "empty id"},
    ]
    manifest = load_manifest(write(tmp_path, rows))
    errors = {row.index: row.error for row in manifest.rows}
    assert errors[0] is None
    assert errors[1].startswith("guidance:") and "'abc'" in errors[1]
    assert errors[2].startswith("guidance:") and "11" in errors[2]
    assert errors[3].startswith("aspect_ratio:") and "7:3" in errors[3]
    assert errors[4].startswith("num_inference_steps:") and "2.5" in errors[4]
    assert errors[5].startswith("go_fast:") and "maybe" in errors[5]
    assert errors[6].startswith("image_url:") and "ftp" in errors[6]
    assert errors[7].startswith("image_url:") and "file.jpg" in errors[7]
    assert errors[8].startswith("prompt:")
    assert errors[9] == "id: duplicate of row 1 (got 'ok')"
    assert errors[10] == "id: must not be empty"


def test_missing_required_column_fails_the_whole_manifest(tmp_path):
    with pytest.raises(ManifestError, match="missing required column.*prompt"):
        load_manifest(write(tmp_path, [{"image_url": MUG, "caption": "x"}]))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.csv")


def test_input_image_alias_and_row_numbers_as_ids(tmp_path):
    manifest = load_manifest(
        write(tmp_path, [{"input_image": MUG, "prompt": "a"}, {"input_image": MUG, "prompt": "b"}])
    )
    assert [row.id for row in manifest.rows] == ["1", "2"]
    assert all(row.valid for row in manifest.rows)


def test_input_hash_follows_local_file_content(tmp_path):
    image = tmp_path / "p.jpg"
    image.write_bytes(Path(MUG).read_bytes())
    path = write(tmp_path, [{"id": "a", "image_url": "p.jpg", "prompt": "x"}])
    first = load_manifest(path).rows[0].input_hash
    assert load_manifest(path).rows[0].input_hash == first
    image.write_bytes(Path(EXAMPLES / "images" / "mug-blue.jpg").read_bytes())
    assert load_manifest(path).rows[0].input_hash != first


@pytest.mark.parametrize("row_id", ["../../etc/passwd", "CON", "a/b", "a\\b", ".hidden", "x" * 300, "é"])
def test_output_names_are_safe(row_id):
    stem = safe_stem(row_id, "row-1")
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".")
    assert stem.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL"}
    assert len(stem) <= 90


def test_output_names_never_collide(tmp_path):
    rows = [{"id": i, "image_url": MUG, "prompt": "x"} for i in ["a/b", "a_b", "A_B", "a b", "CON", "con"]]
    manifest = load_manifest(write(tmp_path, rows))
    names = [row.output_name.casefold() for row in manifest.rows]
    assert len(set(names)) == len(names)
    assign_output_names(manifest.rows)  # deterministic
    assert [row.output_name.casefold() for row in manifest.rows] == names


def test_results_are_spreadsheet_safe_and_atomic(tmp_path):
    results = [
        {
            "id": '=HYPERLINK("http://evil")',
            "image_url": MUG,
            "prompt": "+cmd",
            "status": "invalid",
            "error": "@SUM(1)",
            "width": None,
            "height": None,
            "predict_time_s": None,
            "note": "-2",
        },
    ]
    frame = results_frame(results, ["note"])
    target = tmp_path / "out" / "results.csv"
    write_csv_atomic(frame, target)
    with open(target, newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["id"].startswith("'=") and row["prompt"] == "'+cmd" and row["error"] == "'@SUM(1)"
    assert row["note"] == "'-2"
    assert list(row)[:4] == ["id", "image_url", "prompt", "status"] and list(row)[-1] == "note"
    assert [p.name for p in target.parent.iterdir()] == ["results.csv"]


def test_manifest_from_an_fsspec_url():
    import fsspec

    with fsspec.open("memory://catalogs/m.csv", "w") as handle:
        handle.write(f"id,image_url,prompt\nA,{MUG},make it red\n")
    manifest = load_manifest("memory://catalogs/m.csv")
    assert [row.id for row in manifest.rows] == ["A"] and manifest.rows[0].valid
