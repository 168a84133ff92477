"""Class-imbalanced subsets of a labelled dataset: rare modes for the coverage benchmark.

The law (``geometric_counts``): with K classes ranked by a permutation drawn from ``seed``, the class of
rank k = 0 .. K-1 keeps

    n_k = floor(n_base * q^k),   q = ratio^(-1 / (K - 1)),   n_base = the smallest class's size,

so the most common class keeps n_base images, each next one a factor q fewer, and the rarest
floor(n_base / ratio) (at least 1): n_0 / n_{K-1} >= ratio. Which images a class keeps is drawn with the
same seed. On scikit-learn's digits (1,797 images, 174..183 per class) ``ratio=10`` keeps 174, 134, 104,
80, 62, 48, 37, 29, 22, 17 images (q = 0.774), 707 in all; seed 0 orders the classes
4, 6, 2, 7, 3, 5, 9, 0, 8, 1 (the three rarest: 0, 8, 1).
"""

from __future__ import annotations

import math

import numpy as np

from fdistill.data.datasets import ImageDataset


def class_order(num_classes: int, seed: int = 0) -> np.ndarray:
    """The classes from most to least common: a permutation of 0 .. K-1 drawn from ``seed``."""
    return np.random.default_rng(seed).permutation(num_classes)


def geometric_counts(n_base: int, num_classes: int, ratio: float) -> np.ndarray:
    """n_k = max(1, floor(n_base * q^k)), q = ratio^(-1/(K-1)), for ranks k = 0 .. K-1 (the law above)."""
    if num_classes < 2:
        raise ValueError(f"an imbalance needs at least 2 classes, got {num_classes}")
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1 (most common / rarest class), got {ratio}")
    if n_base < ratio:
        raise ValueError(f"{n_base} images in the smallest class cannot span a ratio of {ratio}")
    q = ratio ** (-1 / (num_classes - 1))
    # the small epsilon keeps n_base * q^(K-1) = n_base / ratio from rounding down a whole image
    return np.array([max(1, math.floor(n_base * q**k + 1e-9)) for k in range(num_classes)], dtype=np.int64)


def geometric_subset(labels: np.ndarray, ratio: float = 10.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of a geometric subset of ``labels`` (the law in the module docstring), and the class
    order (most to least common). Deterministic for a seed."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(f"labels must be the classes 0 .. K-1, found {classes.tolist()}")
    n_base = int(np.bincount(labels).min())
    order = class_order(len(classes), seed)
    counts = geometric_counts(n_base, len(classes), ratio)
    rng = np.random.default_rng([seed, 1])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(order, counts, strict=True)]
    return np.sort(np.concatenate(keep)), order


def imbalanced_dataset(data: ImageDataset, ratio: float = 10.0, seed: int = 0,
                       keep_labels: bool = True) -> tuple[ImageDataset, np.ndarray]:
    """``geometric_subset`` of a labelled ImageDataset: (the subset, the class order). Without
    ``keep_labels`` the subset is unlabelled (label_dim 0), for unconditional training."""
    if data.labels is None:
        raise ValueError(f"{data.source} has no labels to subsample by")
    idx, order = geometric_subset(data.labels, ratio, seed)
    source = f"{data.source} (geometric, ratio {ratio:g}, seed {seed})"
    labels = data.labels[idx] if keep_labels else None
    return ImageDataset(np.ascontiguousarray(data.images[idx]), labels, data.label_dim if keep_labels else 0,
                        source), order
