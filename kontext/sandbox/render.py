"""Makes the sandbox's output: the input image visibly edited, at the model's output size.

Tinted, the prompt written across it, cropped and resized to the aspect ratio's size (or about one
megapixel at the input's own aspect for ``match_input_image``), encoded in the requested format
and quality. Deterministic for the same inputs; identical requests are served from a small cache
so that benchmarks with thousands of identical rows measure the orchestration, not Pillow.
"""

from __future__ import annotations

import hashlib
import io
import math
import textwrap
from collections import OrderedDict
from threading import Lock
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from kontext.sandbox.inputs import SIZES

_FORMATS = {"webp": ("WEBP", "image/webp"), "jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}
_cache: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
_cache_lock = Lock()
_CACHE_SIZE = 64


class RenderError(Exception):
    """The input could not be read as an image (the prediction fails with this message)."""


def output_size(aspect_ratio: str, width: int, height: int) -> tuple[int, int]:
    if aspect_ratio in SIZES:
        return SIZES[aspect_ratio]
    scale = math.sqrt(1024 * 1024 / (width * height))
    return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)


def _tint(seed: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(seed.encode()).digest()
    return (80 + digest[0] % 150, 80 + digest[1] % 150, 80 + digest[2] % 150)


def render(image_bytes: bytes, inputs: dict[str, Any]) -> tuple[bytes, str]:
    """Return (encoded bytes, content type) of the edited image."""
    fmt = inputs.get("output_format", "webp")
    key_parts = [hashlib.sha256(image_bytes).hexdigest()] + [
        str(inputs.get(k)) for k in ("prompt", "aspect_ratio", "output_format", "output_quality", "seed")
    ]
    key = "|".join(key_parts)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        with Image.open(io.BytesIO(image_bytes)) as source:
            source.load()
            picture = source.convert("RGB")
    except Exception as exc:  # Pillow raises many kinds for bad data
        raise RenderError(f"could not read input_image as an image: {exc}") from None
    size = output_size(str(inputs.get("aspect_ratio")), *picture.size)
    picture = ImageOps.fit(picture, size, Image.Resampling.BILINEAR)
    overlay = Image.new("RGB", size, _tint(f"{inputs.get('prompt')}|{inputs.get('seed')}"))
    picture = Image.blend(picture, overlay, 0.3)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(18, size[0] // 28))
    text = "\n".join(textwrap.wrap(str(inputs.get("prompt", "")), width=40)[:6])
    draw.rectangle([0, size[1] - size[1] // 4, size[0], size[1]], fill=(0, 0, 0))
    draw.multiline_text((size[0] // 30, size[1] - size[1] // 4 + 12), text, fill=(255, 255, 255), font=font)
    pil_format, content_type = _FORMATS[fmt]
    buffer = io.BytesIO()
    options = {} if fmt == "png" else {"quality": int(inputs.get("output_quality", 80))}
    picture.save(buffer, pil_format, **options)
    result = (buffer.getvalue(), content_type)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result
