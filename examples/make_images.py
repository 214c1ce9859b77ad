"""Draw the demo's product photos (simple studio-style renders), so the repo needs no downloads.

Run from the repository root: ``python examples/make_images.py``. The images are committed; this
script documents where they came from and recreates them byte for byte (Pillow's JPEG encoder).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent / "images"
SIZE = (640, 640)

PRODUCTS = [
    ("mug-white", (236, 236, 232), "mug"),
    ("mug-blue", (52, 93, 168), "mug"),
    ("sneaker-red", (196, 44, 52), "shoe"),
    ("sneaker-black", (40, 40, 44), "shoe"),
    ("lamp-brass", (190, 150, 70), "lamp"),
    ("lamp-green", (60, 130, 90), "lamp"),
    ("backpack-olive", (104, 112, 64), "bag"),
    ("backpack-grey", (120, 124, 130), "bag"),
    ("bottle-steel", (170, 176, 184), "bottle"),
    ("bottle-pink", (226, 140, 170), "bottle"),
    ("chair-oak", (176, 128, 80), "chair"),
    ("chair-white", (230, 228, 222), "chair"),
]


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in color)  # type: ignore[return-value]


def draw(kind: str, color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", SIZE, (245, 244, 240))
    d = ImageDraw.Draw(image)
    for y in range(SIZE[1]):  # soft studio backdrop
        tone = 250 - int(30 * y / SIZE[1])
        d.line([(0, y), (SIZE[0], y)], fill=(tone, tone, tone - 4))
    shadow = Image.new("L", SIZE, 0)
    ImageDraw.Draw(shadow).ellipse([170, 500, 470, 560], fill=110)
    image.paste((120, 120, 120), mask=shadow.filter(ImageFilter.GaussianBlur(18)))
    dark, light = _shade(color, 0.7), _shade(color, 1.15)
    if kind == "mug":
        d.rounded_rectangle([200, 230, 420, 520], 24, fill=color, outline=dark, width=4)
        d.arc([380, 300, 480, 440], -90, 90, fill=dark, width=22)
        d.ellipse([200, 210, 420, 250], fill=dark)
    elif kind == "shoe":
        d.polygon(
            [(130, 470), (150, 360), (300, 330), (390, 400), (520, 430), (530, 500), (130, 500)],
            fill=color,
            outline=dark,
        )
        d.rectangle([130, 490, 530, 520], fill=(240, 240, 240), outline=(190, 190, 190))
        for x in range(230, 330, 25):
            d.line([(x, 350), (x + 30, 385)], fill=light, width=5)
    elif kind == "lamp":
        d.polygon([(230, 160), (410, 160), (460, 300), (180, 300)], fill=color, outline=dark)
        d.rectangle([310, 300, 330, 490], fill=dark)
        d.ellipse([240, 480, 400, 530], fill=dark)
    elif kind == "bag":
        d.rounded_rectangle([200, 200, 440, 520], 40, fill=color, outline=dark, width=4)
        d.rounded_rectangle([240, 360, 400, 480], 16, fill=light, outline=dark, width=3)
        d.arc([250, 130, 390, 260], 180, 360, fill=dark, width=14)
    elif kind == "bottle":
        d.rounded_rectangle([250, 220, 390, 530], 36, fill=color, outline=dark, width=4)
        d.rectangle([285, 160, 355, 225], fill=dark)
        d.rectangle([270, 300, 370, 420], fill=light)
    else:  # chair
        d.rectangle([220, 160, 420, 330], fill=color, outline=dark, width=4)
        d.rectangle([200, 330, 440, 370], fill=dark)
        for x in (210, 410):
            d.rectangle([x, 370, x + 20, 540], fill=dark)
    return image.filter(ImageFilter.SMOOTH)


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, color, kind in PRODUCTS:
        draw(kind, color).save(HERE / f"{name}.jpg", "JPEG", quality=85)


if __name__ == "__main__":
    main()
