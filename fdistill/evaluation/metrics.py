"""Sample-quality metrics: Fréchet distance / FID (Heusel et al. 2017), k-NN precision/recall
(Kynkäänniemi et al. 2019), class accuracy and mode coverage."""

from __future__ import annotations

import numpy as np
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


# -- Fréchet distance (FID) ----------------------------------------------------------------------
def _as_float64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64 (Heusel et al. 2017)."""
    f = _as_float64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_statistics needs a (N, d) array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) clipped to 0."""
    eigval, eigvec = np.linalg.eigh(sigma)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    A = S1^{1/2} S2 S1^{1/2} (similar to S1 S2), so two ``eigh`` calls suffice. Unlike
    ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid's route) this is faster (docs/performance.md), never
    returns complex parts, and needs no diagonal offset for singular (rank-deficient) covariances.
    Tiny negative eigenvalues (round-off) are clipped to 0 before square roots.
    """
    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got shapes {mu1.shape} and {mu2.shape}")
    d = len(mu1)
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}")
    sqrt1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    a = sqrt1 @ sigma2 @ sqrt1
    eigval = np.linalg.eigvalsh((a + a.T) / 2)
    # Eigenvalues below round-off (numpy's matrix_rank tolerance) are zero: the square root would blow
    # their ~1e-15 noise up to ~1e-8 each, enough to make the distance of singular twins negative.
    eigval[eigval <= d * np.finfo(np.float64).eps * max(eigval.max(initial=0.0), 0.0)] = 0.0
    tr_covmean = np.sqrt(eigval).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray) -> float:
    """FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets (N, d)."""
    return frechet_distance(*feature_statistics(real_feats), *feature_statistics(fake_feats))


def class_accuracy(predicted: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> float:
    """Share of correct predictions; ``predicted`` is logits (N, C) or labels (N,), ``targets`` labels (N,)
    or one-hot (N, C)."""
    pred, tgt = (x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
                 for x in (predicted, targets))
    pred = pred.argmax(1) if pred.ndim == 2 else pred
    tgt = tgt.argmax(1) if tgt.ndim == 2 else tgt
    if pred.shape != tgt.shape or pred.ndim != 1:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(tgt.shape)} do not match")
    return float((pred.long() == tgt.long()).double().mean())


def evaluate_features(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3) -> dict:
    """FID (Heusel et al. 2017) and k-NN precision/recall (Kynkäänniemi et al. 2019) in one feature space."""
    real, fake = torch.as_tensor(_as_float64(real_feats)), torch.as_tensor(_as_float64(fake_feats))
    precision, recall = precision_recall(real, fake, k=k)
    return {
        "fid": fid_from_features(real, fake),
        "precision": precision,
        "recall": recall,
        "num_real": len(real),
        "num_fake": len(fake),
    }
