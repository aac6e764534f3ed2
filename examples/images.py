"""Images in and out of the examples: a built-in test picture, input loading, captioned sheets, PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

#: One tile of a contact sheet: its caption and its image.
Tile = tuple[str, Image.Image]


def sample_image(width: int, height: int) -> Image.Image:
    """A simple landscape (sky, sun, hills, a house) drawn with PIL.

    It stands in when no ``--image`` is given, so that image-to-image and ControlNet run with no
    files at all; its hard edges give a canny map some structure to follow.
    """
    image = Image.new("RGB", (width, height), (135, 185, 235))
    draw = ImageDraw.Draw(image)
    w, h = width, height
    draw.ellipse((0.70 * w, 0.08 * h, 0.88 * w, 0.26 * h), fill=(250, 215, 90))
    draw.polygon([(0, 0.70 * h), (0.35 * w, 0.45 * h), (0.75 * w, 0.72 * h), (0, h)], fill=(70, 140, 70))
    draw.polygon([(0.30 * w, h), (0.80 * w, 0.50 * h), (w, 0.62 * h), (w, h)], fill=(50, 115, 55))
    draw.rectangle((0.18 * w, 0.58 * h, 0.42 * w, 0.82 * h), fill=(200, 170, 130))
    draw.polygon([(0.15 * w, 0.58 * h), (0.30 * w, 0.44 * h), (0.45 * w, 0.58 * h)], fill=(150, 60, 50))
    draw.rectangle((0.27 * w, 0.68 * h, 0.33 * w, 0.82 * h), fill=(90, 60, 40))
    return image


def input_image(path: Path | None, width: int, height: int) -> Image.Image:
    """The ``--image`` at ``path`` as RGB, resized to ``width`` x ``height``; :func:`sample_image` if None."""
    if path is None:
        return sample_image(width, height)
    with Image.open(path) as image:
        return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


def contact_sheet(rows: Sequence[Sequence[Tile]], titles: Sequence[str] | None = None) -> Image.Image:
    """Tiles in a grid, each captioned underneath, each row optionally headed by a title.

    Every cell is as large as the largest tile, so inputs and outputs of different sizes line up.
    """
    if not rows or not all(rows):
        raise ValueError("contact_sheet needs at least one non-empty row")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"got {len(titles)} titles for {len(rows)} rows")
    tile_w = max(image.width for row in rows for _, image in row)
    tile_h = max(image.height for row in rows for _, image in row)
    font = ImageFont.load_default(size=max(10, tile_w // 24))
    line = font.size + 8
    title_h = line if titles is not None else 0
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * tile_w, len(rows) * (title_h + tile_h + line)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (title_h + tile_h + line)
        if titles is not None:
            draw.text((4, top + 4), titles[r], fill="black", font=font)
        for c, (caption, image) in enumerate(row):
            sheet.paste(image.convert("RGB"), (c * tile_w, top + title_h))
            draw.text((c * tile_w + 4, top + title_h + tile_h + 4), caption, fill="black", font=font)
    return sheet


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` to ``path`` through a temporary file, so no half-written PNG is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
