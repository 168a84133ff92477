"""Sample-quality metrics: k-NN precision/recall (Kynkäänniemi et al. 2019) and mode coverage."""

from __future__ import annotations

import torch
from torch import Tensor


def _kth_nn_radius(feats: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i : i + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(queries: Tensor, support: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """For each query: is it inside the k-NN ball of at least one support point?"""
    out = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], support)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k nearest neighbours.

    precision: share of fake samples inside the real manifold (union of real k-NN balls);
    recall: share of real samples inside the fake manifold.
    """
    real, fake = real.flatten(1).double(), fake.flatten(1).double()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _covered(fake, real, _kth_nn_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_nn_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def mode_coverage(
    samples: Tensor, means: Tensor, stds: Tensor, weights: Tensor, radius: float = 3.0, min_share: float = 0.25
) -> dict:
    """Assign each sample to the nearest mode within ``radius`` standard deviations (else off-mode).

    Returns the per-mode shares, the number of covered modes (a mode counts when it receives at
    least ``min_share`` of its weight), and the total-variation distance between the sample's
    mode shares (off-mode mass included) and the true weights.
    """
    z = torch.cdist(samples.double(), means.double()) / stds.double()[None, :]
    nearest = z.argmin(1)
    on_mode = z.gather(1, nearest[:, None]).squeeze(1) <= radius
    k = len(weights)
    counts = torch.bincount(nearest[on_mode], minlength=k).double()
    share = counts / len(samples)
    w = weights.double() / weights.double().sum()
    off = float((~on_mode).double().mean())
    return {
        "share": share.tolist(),
        "off_mode": off,
        "covered": int((share >= min_share * w).sum()),
        "tv": 0.5 * (float((share - w).abs().sum()) + off),
    }
