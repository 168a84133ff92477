"""Writing images: PNG grids for people, EDM dataset zips for tools."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from fdistill.data.datasets import to_uint8
from fdistill.io import atomic_path


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (C, H, W), C in {1, 3}, to PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_edm_zip(path: str | Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """Write uint8 (N, C, H, W) images (C = 1 or 3) and optional labels as an EDM dataset zip
    (``00000/img00000000.png`` ... plus ``dataset.json``), as NVlabs/edm ``dataset_tool.py`` does."""
    path = Path(path)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"write_edm_zip({path}): expected uint8 (N, C, H, W) with C in (1, 3), got "
                         f"{images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"write_edm_zip({path}): {len(labels)} labels for {len(images)} images")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    meta = {"labels": None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "x", compression=zipfile.ZIP_STORED) as zf:
        for name, img in zip(names, images):
            zf.writestr(name, encode_png(img))
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def save_image_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1,
                    gap: int = 1, column_labels: list[str] | None = None) -> Path:
    """Save (N, C, H, W) images, float in [-1, 1] or uint8, as one PNG grid with ``nrow`` images per
    row (default ceil(sqrt(N))), ``gap`` white pixels between cells; empty cells are black. ``scale``
    enlarges pixels (nearest). ``column_labels`` (one per column, e.g. the class each column shows) are
    written in a strip above the grid."""
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_image_grid({path}): expected (N, C, H, W) images with C in (1, 3), got "
                         f"{images.shape}")
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    top = 12 if column_labels else 0
    grid = np.full((c, top + rows * (h + gap) - gap, nrow * (w + gap) - gap), 255, dtype=np.uint8)
    grid[:, top:] = 0
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        y, x = top + r * (h + gap), k * (w + gap)
        grid[:, y:y + h, x:x + w] = img
    for k in range(nrow):  # the gaps between columns stay white
        grid[:, top:, (k + 1) * (w + gap) - gap:(k + 1) * (w + gap)] = 255
    for r in range(rows):
        grid[:, top + (r + 1) * (h + gap) - gap:top + (r + 1) * (h + gap)] = 255
    out = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    if column_labels:
        draw = ImageDraw.Draw(out)
        for k, label in enumerate(column_labels[:nrow]):
            draw.text((k * (w + gap) + w // 2, top // 2), str(label), fill=0, anchor="mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # a link planted at path is replaced, not followed
        out.save(f, format="PNG")
    return path
