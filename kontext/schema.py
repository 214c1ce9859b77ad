"""Typed models at the API's edge: the flux-kontext-dev input and the prediction object.

`EditInput` is the model's full input schema (all ten inputs, with the model's defaults, ranges and
enums). It is validated before anything is sent, so a bad value costs nothing and names its field.
`Prediction` accepts both answers a Replicate-compatible API gives: Replicate's prediction object,
and the proxy form ``{"created": ..., "data": [{"url": ...}]}``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from kontext.errors import InputValidationError

MODEL = "black-forest-labs/flux-kontext-dev"

AspectRatio = Literal[
    "match_input_image",
    "1:1",
    "16:9",
    "21:9",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "3:4",
    "4:3",
    "9:16",
    "9:21",
]
OutputFormat = Literal["webp", "jpg", "png"]

ASPECT_RATIOS: tuple[str, ...] = AspectRatio.__args__  # type: ignore[attr-defined]
OUTPUT_FORMATS: tuple[str, ...] = OutputFormat.__args__  # type: ignore[attr-defined]

#: Output size (width, height) for each fixed aspect ratio, as the model produces them.
OUTPUT_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1328, 800),
    "21:9": (1568, 672),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:5": (944, 1104),
    "5:4": (1104, 944),
    "3:4": (880, 1184),
    "4:3": (1184, 880),
    "9:16": (800, 1328),
    "9:21": (672, 1568),
}

#: Pillow's name for each output format, and the file extension we write.
PIL_FORMATS: dict[str, str] = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
EXTENSIONS: dict[str, str] = {"webp": ".webp", "jpg": ".jpg", "png": ".png"}

_INPUT_IMAGE_HELP = "an http(s) URL, a data: URI or a path to a local jpeg, png, gif or webp file"


def input_image_kind(value: str) -> Literal["url", "data", "file"]:
    """Classify an ``input_image`` value, or raise `ValueError` saying what is accepted."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be {_INPUT_IMAGE_HELP}")
    value = value.strip()
    if value.startswith("data:"):
        header = value[5:].split(",", 1)[0]
        if "," not in value or not header.startswith("image/"):
            raise ValueError("a data: URI must be of the form data:image/<type>;base64,<data>")
        return "data"
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"URL has no host: {value!r}")
        return "url"
    if parts.scheme == "file":
        return "file"
    if parts.scheme and len(parts.scheme) > 1:  # "C:" on Windows is a drive, not a scheme
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}; must be {_INPUT_IMAGE_HELP}")
    return "file"


def local_path(value: str) -> Path:
    """The local path an ``input_image`` of kind ``file`` names (plain path or file:// URL)."""
    if value.startswith("file://"):
        return Path(urlsplit(value).path)
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~someone" with no such user
        return Path(value)


class EditInput(BaseModel):
    """The input of one flux-kontext-dev prediction, validated like the model's own schema.

    Example:
        ```python
        from kontext.schema import EditInput

        edit = EditInput(
            prompt="Put the mug on a marble countertop",
            input_image="https://example.com/mug.jpg",
            aspect_ratio="1:1",
            output_format="jpg",
        )
        edit.to_api()  # the JSON object sent as "input"
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        min_length=1,
        description="Text instruction describing the edit to make to the input image.",
    )
    input_image: str = Field(description=f"The image to edit: {_INPUT_IMAGE_HELP}.")
    aspect_ratio: AspectRatio = Field("match_input_image", description="Aspect ratio of the output image.")
    num_inference_steps: int = Field(
        28, ge=4, le=50, strict=True, description="Number of inference steps (4-50)."
    )
    guidance: float = Field(2.5, ge=0, le=10, description="Prompt guidance strength (0-10).")
    seed: int | None = Field(None, strict=True, description="Random seed; None or 0 means a random seed.")
    output_format: OutputFormat = Field("webp", description="Output image format.")
    output_quality: int = Field(
        80, ge=0, le=100, strict=True, description="Output quality 0-100 (ignored for png)."
    )
    disable_safety_checker: bool = Field(
        False, strict=True, description="Disable the model's NSFW safety checker."
    )
    go_fast: bool = Field(True, strict=True, description="Run faster at a slight cost in quality.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("input_image")
    @classmethod
    def _input_image_kind(cls, value: str) -> str:
        input_image_kind(value)
        return value.strip()

    @classmethod
    def parse(cls, data: dict[str, Any]) -> EditInput:
        """Validate `data`, raising `InputValidationError` that names each bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputValidationError(validation_errors(exc)) from None

    def to_api(self, input_image: str | None = None) -> dict[str, Any]:
        """The JSON ``input`` object, optionally with `input_image` replaced (an uploaded URL)."""
        data = self.model_dump(exclude_none=True)
        if input_image is not None:
            data["input_image"] = input_image
        return data

    def input_hash(self) -> str:
        """A stable hash of every effective input: equal hashes mean the same edit."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def validation_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic's errors into ``(field, message)`` pairs with readable messages."""
    errors = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "input"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "is not an input of this model"
        elif "input" in err and err["type"] != "missing":
            message = f"{message} (got {err['input']!r})"
        errors.append((field, message))
    return errors


Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})


class Prediction(BaseModel):
    """A prediction as the API returns it (unknown extra fields are kept).

    Attributes:
        synthetic: True when the API answered in the proxy form (``{"created", "data"}``): the
            prediction is already finished and has no id the API knows, so it cannot be polled.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    status: Status
    model: str | None = None
    version: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    error: Any = None
    logs: str | None = None
    data_removed: bool = False
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    urls: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    synthetic: bool = False

    @classmethod
    def from_api(cls, data: Any) -> Prediction:
        """Parse either response shape. Raises `ValueError` for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if "id" not in data and "data" in data:
            return cls._from_proxy(data)
        return cls.model_validate(data)

    @classmethod
    def _from_proxy(cls, data: dict[str, Any]) -> Prediction:
        items = data.get("data") or []
        urls = [item["url"] for item in items if isinstance(item, dict) and item.get("url")]
        if not urls:
            raise ValueError("proxy response has no data[].url")
        created = data.get("created")
        created_at = datetime.fromtimestamp(created, UTC) if created else None
        digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:20]
        return cls(
            id=f"proxy-{digest}",
            status="succeeded",
            output=urls[0] if len(urls) == 1 else urls,
            created_at=created_at,
            completed_at=created_at,
            synthetic=True,
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def output_urls(self) -> list[str]:
        """The output as a list of URLs (this model returns one string; others return lists)."""
        if self.output is None:
            return []
        if isinstance(self.output, str):
            return [self.output]
        if isinstance(self.output, list):
            return [item for item in self.output if isinstance(item, str)]
        return []

    @property
    def predict_time(self) -> float | None:
        value = (self.metrics or {}).get("predict_time")
        return float(value) if isinstance(value, int | float) else None
