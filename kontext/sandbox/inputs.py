"""The model's input schema as the sandbox knows it, and Replicate-style 422 ``invalid_fields``.

Deliberately independent of the client's `kontext.schema`: the sandbox is a test double, and a
bug in the client's validation must not be mirrored here.
"""

from __future__ import annotations

from typing import Any

ASPECT_RATIOS = [
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
    "match_input_image",
]

#: name -> (json type, default, constraints), as in the model version's OpenAPI input schema.
INPUT_SCHEMA: dict[str, dict[str, Any]] = {
    "prompt": {"type": "string", "required": True},
    "input_image": {"type": "uri", "required": True},
    "aspect_ratio": {"type": "string", "default": "match_input_image", "enum": ASPECT_RATIOS},
    "num_inference_steps": {"type": "integer", "default": 28, "minimum": 4, "maximum": 50},
    "guidance": {"type": "number", "default": 2.5, "minimum": 0, "maximum": 10},
    "seed": {"type": "integer"},
    "output_format": {"type": "string", "default": "webp", "enum": ["webp", "jpg", "png"]},
    "output_quality": {"type": "integer", "default": 80, "minimum": 0, "maximum": 100},
    "disable_safety_checker": {"type": "boolean", "default": False},
    "go_fast": {"type": "boolean", "default": True},
}

#: Width x height per aspect ratio, as the model produces them.
SIZES = {
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


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("string", "uri"):
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, bool)


def validate_input(data: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Return (input with defaults filled, invalid_fields). Unknown input keys are ignored."""
    if not isinstance(data, dict):
        return {}, [{"type": "type", "field": "input", "description": "input must be an object"}]
    problems: list[dict[str, str]] = []
    filled = dict(data)
    for name, rule in INPUT_SCHEMA.items():
        field = f"input.{name}"
        if name not in data:
            if rule.get("required"):
                problems.append({"type": "required", "field": field, "description": f"{name} is required"})
            elif "default" in rule:
                filled[name] = rule["default"]
            continue
        value = data[name]
        if not _type_ok(rule["type"], value):
            problems.append(
                {"type": "type", "field": field, "description": f"Invalid type. Expected: {rule['type']}"}
            )
            continue
        if "enum" in rule and value not in rule["enum"]:
            allowed = ", ".join(map(str, rule["enum"]))
            problems.append(
                {"type": "enum", "field": field, "description": f"{name} must be one of: {allowed}"}
            )
        if "minimum" in rule and value < rule["minimum"]:
            problems.append(
                {
                    "type": "number_gte",
                    "field": field,
                    "description": f"Must be greater than or equal to {rule['minimum']}",
                }
            )
        if "maximum" in rule and value > rule["maximum"]:
            problems.append(
                {
                    "type": "number_lte",
                    "field": field,
                    "description": f"Must be less than or equal to {rule['maximum']}",
                }
            )
        if rule["type"] == "uri" and not value.startswith(("http://", "https://", "data:")):
            problems.append({"type": "format", "field": field, "description": "Does not match format 'uri'"})
    return filled, problems
