"""Pixel transforms shared by the training data and the evaluation networks: the check that images are uint8
(N, 1|3, H, W) (grayscale repeated to RGB) and torchvision's Resize(size) + CenterCrop(size) done with PIL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PIL_FILTERS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "lanczos": "LANCZOS", "nearest": "NEAREST"}


def rgb_uint8(images: Tensor | np.ndarray, what: str = "CLIP") -> Tensor:
    """Checks uint8 (N, 1|3, H, W) images (``what`` names the network that needs them); grayscale is repeated
    to RGB."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} needs images (N, 1|3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{what} needs uint8 images in [0, 255], got {images.dtype} "
                         "(convert with fdistill.data.to_uint8)")
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def pil_filter(resample: str):
    """The PIL resampling filter named ``resample`` (a key of ``PIL_FILTERS``)."""
    from PIL import Image

    if resample not in PIL_FILTERS:
        raise ValueError(f"resample must be one of {sorted(PIL_FILTERS)}, got {resample!r}")
    return getattr(Image.Resampling, PIL_FILTERS[resample])


def resize_center_crop(img: PILImage, size: int, resample: str = "bicubic") -> np.ndarray:
    """PIL image -> uint8 (3, size, size) RGB: the shorter side resized to ``size`` (the longer to
    int(size * long / short)) with PIL (bicubic with antialiasing by default), then the centered square (offsets
    round((side - size) / 2)), as torchvision's Resize(size) + CenterCrop(size): the captioned training images'
    transform and open_clip's evaluation transform before ToTensor."""
    resample_filter = pil_filter(resample)
    img = img.convert("RGB")
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != (w, h):
        img = img.resize(new, resample_filter)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
