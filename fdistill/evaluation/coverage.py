"""Mode coverage on images: class histograms of samples and how far one is from another.

A model's class histogram is the share of its samples the digits classifier assigns to each class,
p_k = #{i : argmax_c clf(x_i)_c = k} / n. Two histograms p (a student's) and t (a reference: the teacher's
samples or the training data) are compared by

- the total-variation distance  TV(p, t) = 1/2 sum_k |p_k - t_k|  (0: the same histogram; 1: disjoint);
- the rare-class recall over a set R of rare classes (the benchmark's R: the three rarest classes of the
  training data)  RR(p, t; R) = sum_{k in R} min(p_k, t_k) / sum_{k in R} t_k,  the share of the
  reference's mass on R that p reproduces: 1 when p gives every rare class at least its reference share,
  0 when p has none of them; overshooting one rare class does not make up for missing another. Undefined
  (nan) when the reference has no mass on R.

Whether two models differ on a metric over seeds is read as the separation of their seed means in units of the
pooled seed standard deviation, |mean_a - mean_b| / sqrt((s_a^2 + s_b^2) / 2) (sample standard deviations; the
study's bar: 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def predict_classes(x: Tensor, classifier=None, batch_size: int = 1024) -> Tensor:
    """The digits classifier's classes (argmax of its logits) of images x (N, 1, 8, 8) in [-1, 1]."""
    if classifier is None:
        from fdistill.evaluation.digits_classifier import load_digits_classifier

        classifier = load_digits_classifier(progress=False)
    return torch.cat([classifier(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def class_histogram(classes: Tensor | Sequence[int], num_classes: int = 10) -> Tensor:
    """p_k = share of the entries equal to k, k = 0 .. num_classes - 1 (float64, sums to 1)."""
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if len(classes) == 0:
        raise ValueError("class_histogram of no samples")
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"classes must lie in [0, {num_classes}), found {int(classes.min())}..{int(classes.max())}")
    return torch.bincount(classes, minlength=num_classes).double() / len(classes)


def _pair(p, t) -> tuple[Tensor, Tensor]:
    p, t = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"two histograms over the same classes expected, got shapes {tuple(p.shape)} and "
                         f"{tuple(t.shape)}")
    return p, t


def tv_distance(p, t) -> float:
    """TV(p, t) = 1/2 sum_k |p_k - t_k| of two class histograms."""
    p, t = _pair(p, t)
    return float(0.5 * (p - t).abs().sum())


def rarest_classes(freq, k: int = 3) -> list[int]:
    """The k classes of lowest frequency in ``freq`` (ties broken by the lower class index), rarest first."""
    freq = torch.as_tensor(freq, dtype=torch.float64)
    order = sorted(range(len(freq)), key=lambda c: (float(freq[c]), c))
    return order[:k]


def rare_class_recall(p, t, rare: Sequence[int]) -> float:
    """RR(p, t; R) = sum_{k in R} min(p_k, t_k) / sum_{k in R} t_k (nan if the reference t has no mass on R)."""
    p, t = _pair(p, t)
    rare = list(rare)
    if not rare:
        raise ValueError("rare_class_recall needs at least one rare class")
    idx = torch.tensor(rare, dtype=torch.long)
    mass = float(t[idx].sum())
    if mass == 0:
        return math.nan
    return float(torch.minimum(p[idx], t[idx]).sum()) / mass


def coverage_metrics(p, teacher, data, rare: Sequence[int]) -> dict:
    """A student's (or teacher's) histogram p against the teacher's samples and the training data:
    TV to each, the rare-class recall against each, and p's own mass on the rare classes."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return {"tv_teacher": tv_distance(p, teacher), "tv_data": tv_distance(p, data),
            "rare_recall": rare_class_recall(p, teacher, rare), "rare_recall_data": rare_class_recall(p, data, rare),
            "rare_share": float(p[torch.tensor(list(rare), dtype=torch.long)].sum())}


def separation(a: Sequence[float], b: Sequence[float]) -> float:
    """|mean(a) - mean(b)| / sqrt((s_a^2 + s_b^2) / 2), s the sample standard deviation of each model's seeds
    (module docstring); inf when both are constant and differ, nan when they are equal or a side has one seed."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    gap, pooled = float((a.mean() - b.mean()).abs()), float(((a.var() + b.var()) / 2).sqrt())
    if pooled == 0:
        return math.inf if gap > 0 else math.nan
    return gap / pooled
