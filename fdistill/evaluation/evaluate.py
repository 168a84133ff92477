"""Scoring image samples: FID, precision/recall and class accuracy in a feature space.

FID is the Fréchet distance between Gaussians fitted to real and generated features (Heusel et al. 2017);
precision/recall the k-NN manifold estimates of Kynkäänniemi et al. 2019 (k = 3). Two feature spaces:

- "inception": the standard Inception-v3 pool3 features (``fdistill.evaluation.inception``; weights from a local file).
  The reference is an EDM-style ``.npz`` with ``mu``/``sigma`` (FID only) or a dataset, whose features and
  statistics are cached in the cache directory (``$FDISTILL_CACHE`` or ~/.cache/fdistill).
- "digits": the digits classifier's features ("digits-FID", ``fdistill.evaluation.digits_classifier``),
  the same metrics in a space a 2-core CPU can afford.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.config import cache_dir
from fdistill.data.datasets import load_dataset, pixels_to_uint8, to_float, to_nchw
from fdistill.device import pick_device
from fdistill.evaluation.metrics import (
    class_accuracy,
    evaluate_features,
    feature_statistics,
    frechet_distance,
    precision_recall,
)
from fdistill.io import atomic_path, write_text

STATS_VERSION = 1  # bump when the cached reference features change meaning
SMALL_FID = 10_000  # below this many samples, FID carries a noticeable bias
DIGITS_CLASSES = 10  # the classes of the digits classifier (class accuracy)


@torch.no_grad()
def evaluate_samples(x: Tensor, labels: Tensor | None = None, data: str = "digits", k: int = 3,
                     batch_size: int = 1024, where: str = "the samples", real: Tensor | None = None) -> dict:
    """FID, precision, recall (k-NN) of samples x in [-1, 1] against ``data``; class accuracy when
    integer ``labels`` (the classes the samples were generated for) are given (``where`` names them in errors).
    ``real``: the reference images in [-1, 1] (e.g. a subset of the digits) instead of the whole ``data``."""
    _check_k_batch(k, batch_size)
    if data != "digits":
        raise ValueError(f"no feature extractor for {data!r} on this build: evaluation currently scores "
                         "digits in the digits classifier's feature space (--data digits)")
    from fdistill.evaluation.digits_classifier import load_digits_classifier

    _check_labels(labels, where)
    clf = load_digits_classifier(progress=False)
    real = to_float(load_dataset(data).images) if real is None else real
    if tuple(x.shape[1:]) != tuple(real.shape[1:]):
        raise ValueError(f"samples have shape {tuple(x.shape[1:])}, {data} images {tuple(real.shape[1:])}")

    def batched(fn, imgs: Tensor) -> Tensor:
        return torch.cat([fn(imgs[i : i + batch_size]) for i in range(0, len(imgs), batch_size)])

    out = evaluate_features(batched(clf.features, real), batched(clf.features, x), k=k)
    if labels is not None:
        out["class_accuracy"] = class_accuracy(batched(clf, x), labels)
    return out


def read_samples(path: str | Path) -> tuple[np.ndarray, Tensor | None]:
    """Generated images to score: a `fdistill sample` folder or its ``samples.npz`` (``images``, ``labels``),
    an ``.npy`` array, or ADM's ``.npz`` (``arr_0`` images, optional ``arr_1`` labels). Returns uint8 NCHW
    images and integer labels (or None). NHWC layouts and float pixels are converted with a warning naming
    the reading; an unreadable layout or range is an error saying how to convert."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"samples not found: {path} (write them with `fdistill sample`: a folder holding "
                                "samples.npz; .npy and ADM's arr_0 .npz files are read too)")
    expected = "expected a `fdistill sample` folder or its samples.npz, a .npy array or ADM's arr_0 .npz"
    labels, image_key = None, None
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":  # an .npy: its header must fit the file before np.load allocates
                f.seek(0)
                _check_header(f, path.stat().st_size, path, "the array")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            images = loaded
        else:
            with loaded:
                keys = sorted(loaded.keys())
                image_key = next((k for k in ("images", "arr_0") if k in keys), None)
                if image_key is None:
                    raise _Refused(f"{path} has no 'images' (fdistill) or 'arr_0' (ADM) array; found {keys[:8]}")
                label_key = {"images": "labels", "arr_0": "arr_1"}[image_key]
                images = _read_member(loaded, image_key, path)
                if label_key in keys:
                    labels = _read_member(loaded, label_key, path)
    except (OSError, EOFError, zipfile.BadZipFile, MemoryError, ValueError) as e:
        if isinstance(e, _Refused):
            raise
        why = "neither .npy nor .npz data; pickles are never loaded" if "pickle" in str(e) else \
            f"a damaged zip archive ({e})" if isinstance(e, zipfile.BadZipFile) else \
            "it claims more data than memory holds" if isinstance(e, MemoryError) else " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read {path} as a numpy .npz/.npy file ({why}); {expected}") from None
    if images.dtype.kind not in "uif" or images.dtype.names is not None:
        raise ValueError(f"{path}: images have dtype {images.dtype}; expected uint8 (or float) pixels")
    if images.size == 0:
        raise ValueError(f"{path}: the image array is empty (shape {images.shape})")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise ValueError(f"{path}: labels must be {len(images)} integer class indices, one per image; got "
                             f"dtype {labels.dtype} and shape {labels.shape}")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"{path}: labels must be non-negative class indices, found {labels.min()}")
        labels = torch.as_tensor(labels.astype(np.int64))
    where = str(path)
    if images.dtype != np.uint8:
        lo, hi = float(images.min()), float(images.max())
        reading = "[-1, 1]" if lo < 0 else "[0, 1] (x 255)" if hi <= 1 + 1e-3 else "[0, 255]"
        warnings.warn(f"{where}: {images.dtype} pixels in [{lo:.3g}, {hi:.3g}] read as {reading} and rounded to "
                      "uint8; save uint8 images to be sure of the scale", stacklevel=2)
    images = pixels_to_uint8(images, where)
    if image_key != "arr_0" and images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        warnings.warn(f"{where}: images of shape {images.shape} read as NHWC", stacklevel=2)
    return np.ascontiguousarray(to_nchw(images, where)), labels


class _Refused(ValueError):
    """A samples file read far enough to say what is wrong with it (the message names it)."""


def _check_header(f, size: int, path: Path, what: str) -> None:
    """Read an .npy header from ``f`` and refuse it unless its dtype is plain numbers and its shape fits the
    ``size`` bytes that hold it (a forged header may claim terabytes)."""
    from numpy.lib import format as npy

    start = f.tell()
    version = npy.read_magic(f)
    shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
    if dtype.hasobject or dtype.names is not None or dtype.kind not in "biuf":
        raise _Refused(f"{path}: {what} has dtype {dtype}; expected plain numbers (uint8 or float pixels)")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > size - (f.tell() - start):
        raise _Refused(f"{path}: the header of {what} claims shape {shape} ({claimed} bytes), but only {size} "
                       "bytes hold it (truncated or forged)")


def _read_member(npz, key: str, path: Path) -> np.ndarray:
    """Array ``key`` of an .npz, after ``_check_header`` against the bytes the archive holds for it."""
    info = npz.zip.getinfo(f"{key}.npy")
    with npz.zip.open(info) as f:
        _check_header(f, info.file_size, path, f"array {key!r}")
    return npz[key]


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (d,) and ``sigma`` (d, d) from an EDM-style reference ``.npz`` (e.g. EDM's ``fid.py ref`` output)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (an .npz with 'mu' and 'sigma')")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(f.keys())}); expected EDM-style "
                                 "reference statistics")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path} as an .npz: {e}") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def _dataset_identity(source: str) -> dict:
    """What the cached reference features depend on: the dataset's resolved path, byte size and mtime."""
    if source == "digits":
        return {"source": "digits"}
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found")
    stats = [f.stat() for f in sorted(path.rglob("*")) if f.is_file()] if path.is_dir() else [path.stat()]
    return {"source": str(path), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0), "files": len(stats)}


def reference_stats_path(data: str, extractor, preprocessing: dict | None = None) -> Path:
    """Cache file for ``data``'s features under ``extractor``: keyed by a hash of the dataset's path, size and
    mtime, the weights file's name and size, and any ``preprocessing`` of the images (e.g. a crop size)."""
    weights = extractor.path
    key = {**_dataset_identity(str(data)), "weights": weights.name, "weights_size": weights.stat().st_size,
           "kind": extractor.kind, "version": STATS_VERSION, **(preprocessing or {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(data)).name)[:40]
    name += "".join(f"-{v}" for v in (preprocessing or {}).values())  # e.g. val2014-256-<digest>.npz
    return cache_dir() / "fid-stats" / f"{name}-{digest}.npz"


def save_npz(path: Path, **arrays) -> None:
    """``np.savez`` written atomically: a concurrent reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **arrays)


def reference_features(data: str, extractor, batch_size: int = 64, progress: bool = False,
                       expect_shape: tuple[int, ...] | None = None) -> dict:
    """Real features of ``data`` (anything ``load_dataset`` reads) with their ``mu``/``sigma``, computed once and
    cached (``reference_stats_path``). ``expect_shape`` (C, H, W) is checked before any feature is computed.

    Returns a dict with features (N, d) float32, mu, sigma, shape, path and cached (bool).
    """
    from fdistill.evaluation.inception import extract_features

    path = reference_stats_path(data, extractor)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            out = {"features": torch.from_numpy(f["features"]), "mu": f["mu"], "sigma": f["sigma"],
                   "shape": tuple(int(v) for v in f["shape"])}
        _check_shape(expect_shape, out["shape"], data)
        return {**out, "path": path, "cached": True}
    images = load_dataset(data).images
    _check_shape(expect_shape, tuple(images.shape[1:]), data)
    feats = extract_features(extractor, images, batch_size, progress, desc=f"Inception: {Path(str(data)).name}")
    feats = feats.float()
    mu, sigma = feature_statistics(feats)
    save_npz(path, features=feats.numpy(), mu=mu, sigma=sigma, shape=np.array(images.shape[1:]),
             source=str(data), weights=extractor.path.name)
    return {"features": feats, "mu": mu, "sigma": sigma, "shape": tuple(images.shape[1:]), "path": path,
            "cached": False}


def _check_shape(samples: tuple[int, ...] | None, real: tuple[int, ...], data: str) -> None:
    if samples is not None and tuple(samples) != tuple(real):
        raise ValueError(f"samples are {'x'.join(map(str, samples))} images, {data} has "
                         f"{'x'.join(map(str, real))}: compare a generator with the data it was trained on")


def evaluate_inception(path: str | Path, data: str | None = None, ref: str | Path | None = None, k: int = 3,
                       inception: str | Path | None = None, batch_size: int = 64, progress: bool = False,
                       device: str = "cpu") -> dict:
    """Inception FID of the samples in ``path`` against ``ref`` (EDM ``.npz`` with mu/sigma) if given, else against
    ``data``; precision/recall (k-NN) when ``data`` provides real features. Fails on missing weights first."""
    from fdistill.evaluation.inception import extract_features, load_inception

    _check_k_batch(k, batch_size)
    device = pick_device(device)  # "auto" -> cuda if present; an unavailable cuda is an error
    extractor = load_inception(inception, device)  # before reading anything else: fail fast
    ref_stats = load_reference_stats(ref) if ref is not None else None
    if data is None and ref is None:
        data = "digits"
    path = Path(path)
    images, _ = read_samples(path)
    fake_u8 = torch.from_numpy(images)
    if fake_u8.ndim != 4 or fake_u8.shape[1] not in (1, 3):
        raise ValueError(f"{path}: images must be (N, 1|3, H, W), got shape {tuple(fake_u8.shape)}")
    if len(fake_u8) < 2:
        raise ValueError(f"{path}: FID needs at least 2 samples, got {len(fake_u8)}")
    _warn_small(len(fake_u8))
    out: dict = {"samples": str(path), "feature_space": "inception", "extractor": extractor.path.name}
    real = None
    if data is not None:
        real = reference_features(data, extractor, batch_size, progress, expect_shape=tuple(fake_u8.shape[1:]))
    fake = extract_features(extractor, fake_u8, batch_size, progress, desc="Inception: samples").double()
    mu_f, sigma_f = feature_statistics(fake)
    mu_r, sigma_r = ref_stats if ref_stats is not None else (real["mu"], real["sigma"])
    if len(mu_r) != len(mu_f):
        raise ValueError(f"reference statistics are {len(mu_r)}-d but {extractor.path.name} gives {len(mu_f)}-d "
                         "features: they come from another feature extractor")
    out["reference"] = str(data) if ref is None else str(ref) if data is None else f"{ref} (FID), {data} (P/R)"
    out["fid"] = frechet_distance(mu_r, sigma_r, mu_f, sigma_f)
    if real is not None:
        out["precision"], out["recall"] = precision_recall(real["features"], fake, k=k)
        out["num_real"] = len(real["features"])
        out["reference_stats"] = str(real["path"])
    else:
        out["note"] = "precision/recall: needs --data (real images); --ref holds only mu and sigma"
    out["num_fake"] = len(fake)
    return out


def evaluate_file(path: str | Path, data: str | None = None, k: int = 3, inception: str | Path | None = None,
                  ref: str | Path | None = None, batch_size: int = 64, progress: bool = False,
                  device: str = "cpu") -> dict:
    """Score a samples ``.npz``. Inception space when ``inception`` or ``ref`` is given or ``data`` is not
    "digits" (``evaluate_inception``); otherwise digits-FID space against scikit-learn's digits."""
    if inception is not None or ref is not None or (data is not None and data != "digits"):
        return evaluate_inception(path, data, ref, k, inception, batch_size, progress, device)
    _check_k_batch(k, batch_size)
    images, labels = read_samples(path)
    _check_labels(labels, str(path))
    _warn_small(len(images))
    return {"samples": str(path), "feature_space": "digits",
            **evaluate_samples(to_float(images), labels, "digits", k, where=str(path))}


def _check_labels(labels: Tensor | None, where: str) -> None:
    """Class accuracy's labels must be classes the digits classifier knows."""
    if labels is not None and len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < DIGITS_CLASSES):
        raise ValueError(f"{where}: labels must be class indices in [0, {DIGITS_CLASSES - 1}] (the digits), found "
                         f"{int(labels.min())}..{int(labels.max())}")


def _check_k_batch(k: int, batch_size: int) -> None:
    for name, value in (("k", k), ("batch_size", batch_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _warn_small(n: int) -> None:
    if n < SMALL_FID:
        warnings.warn(f"FID from {n} samples is biased upwards (the paper's numbers use 50,000): compare only numbers "
                      "computed from the same number of samples", stacklevel=3)


REPORT_KEYS = ("feature_space", "extractor", "reference", "fid", "precision", "recall", "class_accuracy", "num_real",
               "num_fake", "note", "reference_stats")


def format_report(res: dict) -> str:
    keys = [k for k in REPORT_KEYS if k in res]
    return "\n".join(f"{k:15s} {res[k]:.4g}" if isinstance(res[k], float) else f"{k:15s} {res[k]}" for k in keys)


def report_file(path: str | Path, data: str | None = None, k: int = 3, inception: str | Path | None = None,
                ref: str | Path | None = None, batch_size: int = 64, progress: bool = True, device: str = "auto",
                json_path: str | Path | None = None) -> Iterator[str]:
    """``fdistill evaluate``: ``evaluate_file``'s metrics. Yields the lines to print as they are ready: the report,
    then, once the metrics are also written as JSON to ``json_path`` (if given), that they were."""
    res = evaluate_file(path, data, k=k, inception=inception, ref=ref, batch_size=batch_size, progress=progress,
                        device=device)
    yield format_report(res)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_text(json_path, json.dumps(res, indent=1))
        yield f"wrote {json_path}"
