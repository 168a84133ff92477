"""Writing images: PNG grids for people, EDM dataset zips for tools."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from fdistill.data.datasets import to_uint8


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
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, img in zip(names, images):
            zf.writestr(name, encode_png(img))
        zf.writestr("dataset.json", json.dumps(meta))
    return path


def save_image_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save (N, C, H, W) images, float in [-1, 1] or uint8, as one PNG grid with ``nrow`` images per
    row (default ceil(sqrt(N))); empty cells are black; ``scale`` enlarges pixels (nearest)."""
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_image_grid({path}): expected (N, C, H, W) images with C in (1, 3), got "
                         f"{images.shape}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((c, rows * h, nrow * w), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(grid))
    return path
