"""Manifests: read and check every row before anything is spent; write results safely.

A manifest is a CSV with one edit per row: ``image_url`` (alias ``input_image``) and ``prompt`` are
required; ``id`` (the SKU) is optional; a column named after a model input overrides the run's
default for that row (a blank cell keeps the default); any other column is carried through to the
results. Every row becomes a `ManifestRow`: either a valid `EditInput` with its ``input_hash``, or
an error that names the field and the value. A bad row never stops the others.

The results manifest has one row per input row, in input order, written atomically (temporary
file + replace) and escaped so that a spreadsheet never runs a cell as a formula.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from kontext.errors import KontextError
from kontext.schema import EXTENSIONS, EditInput, input_image_kind, local_path, validation_errors

REQUIRED_COLUMNS = ("image_url", "prompt")
COLUMN_ALIASES = {"input_image": "image_url"}
#: Model inputs a manifest column may set per row (prompt and image are columns of their own).
OVERRIDE_COLUMNS = (
    "aspect_ratio",
    "num_inference_steps",
    "guidance",
    "seed",
    "output_format",
    "output_quality",
    "disable_safety_checker",
    "go_fast",
)
RESULT_COLUMNS = (
    "id",
    "image_url",
    "prompt",
    "status",
    "prediction_id",
    "output_url",
    "output_path",
    "sha256",
    "width",
    "height",
    "error",
    "input_hash",
    "created_at",
    "completed_at",
    "predict_time_s",
)
#: Row statuses. ``pending`` marks a row not (yet) attempted: in a refresh written mid-run, or
#: after a run that stopped early (an account error); such a row costs nothing and runs next time.
STATUSES = ("succeeded", "failed", "canceled", "invalid", "skipped", "unknown", "pending")

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
_MAX_PROMPT_CHARS = 10_000


class ManifestError(KontextError):
    """The manifest as a whole cannot be used (unreadable, a required column missing)."""


@dataclass
class ManifestRow:
    """One manifest row after checking.

    Attributes:
        index: 0-based position in the manifest (results keep this order).
        id: The row's id (the SKU, or the 1-based row number when there is no id column).
        image_url: The image as written in the manifest.
        prompt: The prompt as written.
        edit: The validated model input, or None when the row is invalid.
        error: Why the row is invalid (field and value named), or None.
        input_hash: Hash of every effective input (a local image by its content), or None.
        extra: The row's other columns, carried to the results.
        output_name: A safe, unique file stem for the output.
    """

    index: int
    id: str
    image_url: str
    prompt: str
    edit: EditInput | None = None
    error: str | None = None
    input_hash: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    output_name: str = ""

    @property
    def valid(self) -> bool:
        return self.edit is not None

    @property
    def output_filename(self) -> str:
        assert self.edit is not None
        return self.output_name + EXTENSIONS[self.edit.output_format]


@dataclass
class Manifest:
    rows: list[ManifestRow]
    columns: list[str]
    source: str

    @property
    def valid_rows(self) -> list[ManifestRow]:
        return [row for row in self.rows if row.valid]

    @property
    def invalid_rows(self) -> list[ManifestRow]:
        return [row for row in self.rows if not row.valid]


def read_table(
    source: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read a CSV manifest (path or fsspec URL) as strings, blanks as empty strings."""
    try:
        frame = pd.read_csv(
            source,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            storage_options=dict(storage_options) if storage_options else None,
        )
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {source}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise ManifestError(f"cannot read manifest {source}: {exc}") from None
    frame.columns = [str(column).strip() for column in frame.columns]
    renames = {alias: target for alias, target in COLUMN_ALIASES.items() if alias in frame.columns}
    for alias, target in renames.items():
        if target in frame.columns:
            raise ManifestError(f"manifest has both {target!r} and its alias {alias!r}; keep one")
    frame = frame.rename(columns=renames)
    duplicated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicated:
        raise ManifestError(f"manifest has duplicate columns: {', '.join(duplicated)}")
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ManifestError(
            f"manifest {source} is missing required column(s): {', '.join(missing)} "
            f"(has: {', '.join(frame.columns) or 'none'})"
        )
    return frame


def load_manifest(
    source: str | os.PathLike[str],
    defaults: Mapping[str, Any] | None = None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Read and check a manifest. Raises `ManifestError` only for problems of the whole file.

    Args:
        source: CSV path or fsspec URL.
        defaults: Model inputs applied to every row unless its own column sets them.
        base_dir: Where relative local image paths are resolved (default: the manifest's folder).
    """
    frame = read_table(source, storage_options)
    if base_dir is None:
        base_dir = Path(source).parent if "://" not in str(source) else Path.cwd()
    return check_rows(frame, defaults or {}, base_dir=Path(base_dir), source=str(source))


def check_rows(
    frame: pd.DataFrame, defaults: Mapping[str, Any], *, base_dir: Path, source: str = "<frame>"
) -> Manifest:
    """Validate every row of a manifest table into `ManifestRow`s (invalid rows keep their error)."""
    columns = list(frame.columns)
    has_id = "id" in columns
    extra_columns = [c for c in columns if c not in ("id", *REQUIRED_COLUMNS)]
    file_hashes: dict[Path, str | None] = {}
    rows: list[ManifestRow] = []
    seen_ids: dict[str, int] = {}
    for index, record in enumerate(frame.to_dict("records")):
        record = {key: ("" if value is None else str(value)) for key, value in record.items()}
        row_id = record.get("id", "").strip() if has_id else str(index + 1)
        row = ManifestRow(
            index=index,
            id=row_id,
            image_url=record["image_url"].strip(),
            prompt=record["prompt"],
            extra={c: record[c] for c in extra_columns},
        )
        errors = _check_row(row, record, defaults, base_dir, file_hashes, has_id)
        if not errors and row.id in seen_ids:
            errors = [f"id: duplicate of row {seen_ids[row.id] + 1} (got {row.id!r})"]
        if errors:
            row.edit = None
            row.error = "; ".join(errors)
        else:
            seen_ids[row.id] = index
        rows.append(row)
    assign_output_names(rows)
    return Manifest(rows=rows, columns=columns, source=source)


def _check_row(
    row: ManifestRow,
    record: Mapping[str, str],
    defaults: Mapping[str, Any],
    base_dir: Path,
    file_hashes: dict[Path, str | None],
    has_id: bool,
) -> list[str]:
    errors: list[str] = []
    if has_id and not row.id:
        errors.append("id: must not be empty")
    elif any(unicodedata.category(ch).startswith("C") for ch in row.id):
        errors.append(f"id: must not contain control characters (got {row.id!r})")
    if len(row.prompt) > _MAX_PROMPT_CHARS:
        errors.append(f"prompt: longer than {_MAX_PROMPT_CHARS} characters ({len(row.prompt)})")
    data: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    data["prompt"] = row.prompt
    for name in OVERRIDE_COLUMNS:
        cell = record.get(name, "").strip()
        if cell:
            try:
                data[name] = _parse_cell(name, cell)
            except ValueError as exc:
                errors.append(f"{name}: {exc} (got {cell!r})")
    image_digest = None
    try:
        kind = input_image_kind(row.image_url)
        image = row.image_url
        if kind == "file":
            path = local_path(row.image_url)
            path = path if path.is_absolute() else base_dir / path
            image = str(path)
            if path not in file_hashes:
                file_hashes[path] = _file_digest(path)
            image_digest = file_hashes[path]
            if image_digest is None:
                raise ValueError(f"no readable image file at {str(path)!r}")
        data["input_image"] = image
    except ValueError as exc:
        errors.append(f"image_url: {exc}")
        data["input_image"] = "https://invalid.invalid/"  # placeholder so other fields are checked
    try:
        edit = EditInput.model_validate(data)
    except ValidationError as exc:
        errors.extend(f"{name}: {message}" for name, message in validation_errors(exc))
        return errors
    if errors:
        return errors
    row.edit = edit
    row.input_hash = input_hash(edit, image_digest)
    return []


def _parse_cell(name: str, cell: str) -> Any:
    """Turn a manifest cell into the type the model input wants, or raise a readable ValueError."""
    if name in ("disable_safety_checker", "go_fast"):
        lowered = cell.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("must be true or false")
    if name in ("num_inference_steps", "seed", "output_quality"):
        try:
            number = float(cell)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not number.is_integer():
            raise ValueError("must be a whole number")
        return int(number)
    if name == "guidance":
        try:
            value = float(cell)
        except ValueError:
            raise ValueError("must be a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return value
    return cell


def _file_digest(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        return None


def input_hash(edit: EditInput, image_digest: str | None = None) -> str:
    """Hash of every effective input; a local image counts by its content, not its path."""
    if image_digest is None:
        return edit.input_hash()
    return edit.model_copy(update={"input_image": f"sha256:{image_digest}"}).input_hash()


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(row_id: str, fallback: str) -> str:
    """A file stem from an id: no separators or traversal, no reserved names, at most 80 chars.

    An id that had to change gets a short hash of the original, so distinct ids stay distinct.
    """
    normal = unicodedata.normalize("NFKD", row_id).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("_", normal).strip("._ ")[:80]
    if not stem:
        stem = fallback
    if stem.split(".")[0].upper() in _RESERVED:
        stem = f"_{stem}"
    if stem != row_id:
        stem = f"{stem}-{hashlib.sha256(row_id.encode()).hexdigest()[:8]}"
    return stem


def assign_output_names(rows: Iterable[ManifestRow]) -> None:
    """Give each valid row a unique output stem (case-insensitively unique, for every filesystem)."""
    taken: set[str] = set()
    for row in rows:
        stem = safe_stem(row.id, f"row-{row.index + 1}")
        candidate, n = stem, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.casefold())
        row.output_name = candidate


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def spreadsheet_safe(value: Any) -> Any:
    """Neutralise a text cell a spreadsheet would run as a formula (``=HYPERLINK(...)``)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def results_frame(results: Sequence[Mapping[str, Any]], extra_columns: Sequence[str]) -> pd.DataFrame:
    """The results table: the fixed columns, then the input's other columns, in input order."""
    columns = list(RESULT_COLUMNS) + [c for c in extra_columns if c not in RESULT_COLUMNS]
    frame = pd.DataFrame.from_records(list(results), columns=columns)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    text_columns = [c for c in columns if c not in ("width", "height", "predict_time_s")]
    frame[text_columns] = frame[text_columns].astype(object).map(spreadsheet_safe)
    return frame


def remove_stale_temporaries(path: str | os.PathLike[str]) -> None:
    """Remove temporary files a killed `write_csv_atomic` of `path` left behind."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a CSV so that readers only ever see a complete file (temporary file + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
