"""Scoring image samples: FID, precision/recall and class accuracy in a feature space.

On CPU the feature space is the digits classifier's ("digits-FID", ``digits_classifier``): the
same Fréchet distance and k-NN precision/recall as the standard Inception metrics, in a space a
2-core machine can afford.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.data import load_dataset, to_float
from fdistill.metrics import class_accuracy, evaluate_features


@torch.no_grad()
def evaluate_samples(x: Tensor, labels: Tensor | None = None, data: str = "digits", k: int = 3,
                     batch_size: int = 1024) -> dict:
    """FID, precision, recall (k-NN) of samples x in [-1, 1] against ``data``; class accuracy when
    integer ``labels`` (the classes the samples were generated for) are given."""
    if data != "digits":
        raise ValueError(f"no feature extractor for {data!r} on this build: evaluation currently scores "
                         "digits in the digits classifier's feature space (--data digits)")
    from fdistill.digits_classifier import load_digits_classifier

    clf = load_digits_classifier(progress=False)
    real = to_float(load_dataset(data).images)
    if tuple(x.shape[1:]) != tuple(real.shape[1:]):
        raise ValueError(f"samples have shape {tuple(x.shape[1:])}, {data} images {tuple(real.shape[1:])}")

    def batched(fn, imgs: Tensor) -> Tensor:
        return torch.cat([fn(imgs[i : i + batch_size]) for i in range(0, len(imgs), batch_size)])

    out = evaluate_features(batched(clf.features, real), batched(clf.features, x), k=k)
    if labels is not None:
        out["class_accuracy"] = class_accuracy(batched(clf, x), labels)
    return out


def evaluate_file(path: str | Path, data: str = "digits", k: int = 3) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path} (write one with `fdistill sample`)")
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f:
            raise ValueError(f"{path} has no 'images' array (keys: {sorted(f.keys())})")
        labels = torch.as_tensor(f["labels"]) if "labels" in f and f["labels"].ndim == 1 else None
        return {"samples": str(path), **evaluate_samples(to_float(f["images"]), labels, data, k)}


def format_report(res: dict) -> str:
    keys = [k for k in ("fid", "precision", "recall", "class_accuracy", "num_real", "num_fake") if k in res]
    return "\n".join(f"{k:15s} {res[k]:.4g}" if isinstance(res[k], float) else f"{k:15s} {res[k]}" for k in keys)
