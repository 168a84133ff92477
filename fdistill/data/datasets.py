"""Reading real images for Alg. 1 (x ~ p_data) and their class labels.

Images live in memory as uint8 NCHW. ``load_dataset`` reads scikit-learn's digits, a folder of
images, an EDM dataset zip (NVlabs/edm ``dataset_tool.py``), ``.npz``/``.npy`` arrays and CIFAR-10
python batches. Nothing is resized or downloaded: a mismatch is an error that names the file.
``to_float``/``to_uint8`` convert between uint8 [0, 255] and float [-1, 1].
"""

from __future__ import annotations

import codecs
import json
import math
import pickle
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.io import open_image
from fdistill.safe_pickle import NUMPY_GLOBALS, restricted_load

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SOURCES = ("'digits', a folder of images (optionally with dataset.json), an EDM dataset .zip, "
           ".npz/.npy arrays, or a CIFAR-10 python batches folder")
LABELS_HELP = 'dataset.json with {"labels": [[filename, class], ...]}'


@dataclass
class ImageDataset:
    """Square uint8 images (N, C, H, W) with optional int64 class labels (N,)."""

    images: np.ndarray
    labels: np.ndarray | None
    label_dim: int
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.source}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.images) == 0:
            raise ValueError(f"{self.source}: no images")
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"{self.source}: images are {self.images.shape[2]}x{self.images.shape[3]}; "
                             "expected square images (H == W)")
        if self.labels is None:
            if self.label_dim != 0:
                raise ValueError(f"{self.source}: label_dim must be 0 without labels, got {self.label_dim}")
            return
        if self.labels.shape != (len(self.images),) or self.labels.dtype != np.int64:
            raise ValueError(f"{self.source}: labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                             f"{self.labels.shape}")
        if self.labels.min() < 0 or self.labels.max() >= self.label_dim:
            raise ValueError(f"{self.source}: labels must lie in [0, {self.label_dim}), "
                             f"found {self.labels.min()}..{self.labels.max()}")

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.images)


def _dataset(images: np.ndarray, labels: Iterable[int] | np.ndarray | None, source: str) -> ImageDataset:
    """ImageDataset with label_dim = max(label) + 1."""
    if labels is None:
        return ImageDataset(images, None, 0, source)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{source}: expected one integer class per image ({len(images)},), got labels of shape "
                         f"{labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative class indices, found {labels.min()}")
    labels = labels.astype(np.int64)
    return ImageDataset(images, labels, int(labels.max()) + 1 if len(labels) else 0, source)


# -- loading ------------------------------------------------------------------------------------
def load_dataset(source: str | Path, resolution: int | None = None, require_labels: bool = False) -> ImageDataset:
    """Load ``source``: ``"digits"``, an image folder, an EDM ``.zip``, ``.npz``/``.npy``, or CIFAR-10 batches.

    Raises if the images are not ``resolution`` pixels square (when given) or, with
    ``require_labels``, if the dataset has no class labels.
    """
    if str(source) == "digits":
        data = _load_digits()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"dataset {path} not found; expected {SOURCES}")
        if path.is_dir() and (path / "data_batch_1").is_file():
            data = _load_cifar10(path)
        elif path.is_dir():
            data = _load_folder(path)
        elif path.suffix.lower() == ".zip":
            data = _load_zip(path)
        elif path.suffix.lower() in (".npz", ".npy"):
            data = _load_array(path)
        else:
            raise ValueError(f"cannot read dataset {path}: expected {SOURCES}")
    if resolution is not None and data.resolution != resolution:
        raise ValueError(f"{data.source} has {data.channels}x{data.resolution}x{data.resolution} images, expected "
                         f"resolution {resolution} (fdistill does not resize; convert the data first)")
    if require_labels and data.labels is None:
        raise ValueError(f"{data.source} has no labels: class-conditional training needs {LABELS_HELP}")
    return data


def _load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16) as uint8 round(v * 255 / 16), shape (1797, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset ships with scikit-learn: pip install 'fdistill[digits]' "
                          "(or scikit-learn)") from e
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]
    return _dataset(images, d.target, "digits")


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """PNG/JPEG/... bytes to uint8 (C, H, W): mode 'L' gives C=1, everything else is converted to RGB."""
    img = open_image(data, f"image {name}")  # raster formats only: an EPS named .png would run Ghostscript
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(f"{name} is a {img.mode} (16-bit or float) image; expected 8-bit grayscale or RGB")
    img = img.convert("L" if img.mode in ("1", "L", "LA") else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _is_image(rel: str) -> bool:
    parts = rel.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and rel.lower().endswith(IMAGE_EXTENSIONS)


def _load_images(names: list[str], read: Callable[[str], bytes], source: str,
                 labels_json: bytes | None) -> ImageDataset:
    """Decode ``names`` (sorted relative paths) with ``read``; labels from EDM's dataset.json, if any."""
    if not names:
        raise ValueError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    images, first = [], None
    for name in names:
        img = _decode_image(read(name), f"{source}/{name}")
        if first is None:
            first = (name, img.shape)
        elif img.shape != first[1]:
            size = lambda s: "x".join(map(str, s))
            raise ValueError(f"images in {source} must share one size and channel count: {name} is "
                             f"{size(img.shape)} but {first[0]} is {size(first[1])} (C x H x W)")
        images.append(img)
    labels = None if labels_json is None else _labels_from_json(labels_json, names, f"{source}/dataset.json")
    return _dataset(np.stack(images), labels, source)


def _labels_from_json(raw: bytes, names: list[str], where: str) -> list[int] | None:
    """EDM's dataset.json: {"labels": [[relative/path.png, class], ...]} or {"labels": null}."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); expected {LABELS_HELP}") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f"{where} has no 'labels' entry; expected {LABELS_HELP}")
    if meta["labels"] is None:
        return None
    entries = meta["labels"]
    if not isinstance(entries, list) or not all(isinstance(e, list | tuple) and len(e) == 2 for e in entries):
        raise ValueError(f"{where}: 'labels' must be a list of [filename, class] pairs; expected {LABELS_HELP}")
    table: dict[str, int] = {}
    for fname, label in entries:
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ValueError(f"{where}: label of {fname!r} is {label!r}; expected a non-negative integer class")
        table[str(fname).replace("\\", "/")] = label
    known = set(names)
    extra = [f for f in table if f not in known]
    if extra:
        raise ValueError(f"{where} has a label for {extra[0]!r}, which is not an image in the dataset "
                         f"({len(extra)} such entries)")
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where} has no label for image {missing[0]!r} ({len(missing)} unlabeled); every image "
                         f"needs one: {LABELS_HELP}")
    return [table[n] for n in names]


def _load_folder(path: Path) -> ImageDataset:
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    names = [n for n in names if _is_image(n)]
    meta = path / "dataset.json"
    return _load_images(names, lambda n: (path / n).read_bytes(), str(path),
                        meta.read_bytes() if meta.is_file() else None)


def _load_zip(path: Path) -> ImageDataset:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable zip ({e}); expected an EDM dataset zip") from e
    with zf:
        all_names = set(zf.namelist())
        names = sorted(n for n in all_names if not n.endswith("/") and _is_image(n))
        meta = zf.read("dataset.json") if "dataset.json" in all_names else None
        return _load_images(names, zf.read, str(path), meta)


def pixels_to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Pixel values to uint8. uint8 is kept; other integers must lie in 0..255. Floats are read by
    their range: any value below 0 means [-1, 1] (round((x + 1) * 127.5)); else a maximum <= 1 means
    [0, 1] (round(x * 255)); else [0, 255] (round(x)). Values beyond those ranges are an error."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{where}: integer images must lie in 0..255, found {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8)
    if arr.dtype.kind != "f":
        raise ValueError(f"{where}: images have dtype {arr.dtype}; expected uint8 or float")
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: images contain NaN or infinite values")
    tol = 1e-3
    if lo < 0:
        if lo < -1 - tol or hi > 1 + tol:
            raise ValueError(f"{where}: float images with negative values must lie in [-1, 1], found {lo:g}..{hi:g}")
        out = (arr + 1) * 127.5
    elif hi <= 1 + tol:
        out = arr * 255
    elif hi <= 255 + tol:
        out = arr
    else:
        raise ValueError(f"{where}: float images must lie in [-1, 1], [0, 1] or [0, 255], found {lo:g}..{hi:g}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) -> (N, C, H, W) with C in {1, 3}. Where both layouts fit,
    the one with square images wins, then NCHW."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{where}: images have shape {arr.shape} (rank {arr.ndim}); expected (N, H, W), "
                         "(N, C, H, W) or (N, H, W, C)")
    n, a, b, c = arr.shape
    first, last = a in (1, 3), c in (1, 3)
    if first and last:
        first = b == c or a != b
        last = not first
    if first:
        return arr
    if last:
        return arr.transpose(0, 3, 1, 2)
    raise ValueError(f"{where}: images have shape {arr.shape}; expected 1 or 3 channels in (N, C, H, W) or "
                     "(N, H, W, C) layout")


def _load_array(path: Path) -> ImageDataset:
    """``.npy`` (images only) or ``.npz`` with ``images``/``x`` and optional ``labels``/``y``."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a numpy array file without pickle: {e}") from e
    if isinstance(loaded, np.ndarray):
        images, labels = loaded, None
    else:
        with loaded:
            keys = list(loaded.keys())
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                raise ValueError(f"{path} has no 'images' or 'x' array (found keys {keys}); expected images "
                                 "under 'images' or 'x' and optional class labels under 'labels' or 'y'")
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            images = loaded[image_key]
            labels = loaded[label_key] if label_key else None
    images = np.ascontiguousarray(to_nchw(pixels_to_uint8(images, str(path)), str(path)))
    return _dataset(images, labels, str(path))


# -- CIFAR-10 python batches --------------------------------------------------------------------
_CIFAR_GLOBALS = {**NUMPY_GLOBALS, ("_codecs", "encode"): codecs.encode}  # how protocol-2 pickles store bytes


def _unpickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return restricted_load(f, _CIFAR_GLOBALS, encoding="bytes")
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from e
        except Exception as e:
            raise ValueError(f"cannot unpickle {path}: {e}; expected a CIFAR-10 python batch") from e


def _load_cifar10(path: Path) -> ImageDataset:
    """CIFAR-10 python batches: ``data_batch_1..5``, dicts of b'data' (N, 3072) uint8 and b'labels'."""
    files = sorted(path.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
    images, labels = [], []
    for file in files:
        batch = _unpickle(file)
        if not isinstance(batch, dict):
            raise ValueError(f"{file}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"{file}: expected keys b'data' and b'labels', found {sorted(batch)}")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{file}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"]).reshape(-1))
    return _dataset(np.concatenate(images), np.concatenate(labels), str(path))


# -- pixel values ---------------------------------------------------------------------------------
def to_float(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1); float input is taken as [-1, 1] already."""
    x = torch.as_tensor(images)
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


def to_uint8(x: np.ndarray | Tensor) -> np.ndarray:
    """float images in [-1, 1] -> uint8 round((x + 1) * 127.5), clipped to [0, 255] (uint8 passes through)."""
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
