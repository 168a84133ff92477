"""The imbalanced sampler (fdistill.data.imbalance) and the class-histogram metrics (fdistill.evaluation.coverage)."""

import math

import numpy as np
import pytest
import torch

from fdistill.data.datasets import ImageDataset
from fdistill.data.imbalance import class_order, geometric_counts, geometric_subset, imbalanced_dataset
from fdistill.evaluation.coverage import (
    class_histogram,
    coverage_metrics,
    rare_class_recall,
    rarest_classes,
    separation,
    tv_distance,
)

LABELS = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # the digits' class sizes


def test_geometric_counts_follow_the_law():
    counts = geometric_counts(174, 10, 10.0)
    assert counts.tolist() == [174, 134, 104, 80, 62, 48, 37, 29, 22, 17]
    q = 10 ** (-1 / 9)
    assert all(c == math.floor(174 * q**k + 1e-9) for k, c in enumerate(counts))
    assert counts[0] / counts[-1] >= 10 and np.all(np.diff(counts) < 0)
    assert geometric_counts(100, 2, 4.0).tolist() == [100, 25]
    assert geometric_counts(50, 3, 1.0).tolist() == [50, 50, 50]  # ratio 1: balanced
    with pytest.raises(ValueError, match="ratio"):
        geometric_counts(100, 3, 0.5)
    with pytest.raises(ValueError, match="cannot span"):
        geometric_counts(5, 3, 10.0)


def test_geometric_subset_counts_order_and_determinism():
    idx, order = geometric_subset(LABELS, 10.0, seed=0)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() == class_order(10, 0).tolist()
    kept = np.bincount(LABELS[idx], minlength=10)
    assert kept[order].tolist() == geometric_counts(174, 10, 10.0).tolist()
    assert kept.max() / kept.min() >= 10
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    again, order2 = geometric_subset(LABELS, 10.0, seed=0)
    assert np.array_equal(idx, again) and np.array_equal(order, order2)
    other, order3 = geometric_subset(LABELS, 10.0, seed=1)
    assert not np.array_equal(idx, other) and not np.array_equal(order, order3)
    wide, _ = geometric_subset(LABELS, 20.0, seed=0)
    w = np.bincount(LABELS[wide], minlength=10)
    assert w.max() / w.min() >= 20


def test_imbalanced_dataset_labelled_and_unconditional():
    images = (np.arange(len(LABELS)) % 256).astype(np.uint8).reshape(-1, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    data = ImageDataset(images, LABELS.astype(np.int64), 10, "toy")
    sub, order = imbalanced_dataset(data, 10.0, seed=3)
    idx, _ = geometric_subset(LABELS, 10.0, seed=3)
    assert np.array_equal(sub.images, images[idx]) and np.array_equal(sub.labels, LABELS[idx])
    plain, _ = imbalanced_dataset(data, 10.0, seed=3, keep_labels=False)
    assert plain.labels is None and plain.label_dim == 0 and len(plain) == len(sub)
    with pytest.raises(ValueError, match="no labels"):
        imbalanced_dataset(plain)


def test_class_histogram():
    assert class_histogram([0, 0, 1, 3], 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    assert class_histogram(torch.tensor([2, 2]), 3).sum() == 1
    with pytest.raises(ValueError):
        class_histogram([0, 5], 4)
    with pytest.raises(ValueError):
        class_histogram([], 4)


def test_tv_distance_by_hand():
    assert tv_distance([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0
    assert tv_distance([1.0, 0.0], [0.0, 1.0]) == 1
    assert tv_distance([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]) == pytest.approx(0.1)  # (0.1 + 0.1 + 0) / 2
    with pytest.raises(ValueError):
        tv_distance([0.5, 0.5], [1.0, 0.0, 0.0])


def test_rare_class_recall_by_hand_and_edge_cases():
    t = [0.6, 0.25, 0.1, 0.05]
    rare = rarest_classes(t, 2)
    assert rare == [3, 2]
    assert rare_class_recall(t, t, rare) == pytest.approx(1.0)
    assert rare_class_recall([1.0, 0, 0, 0], t, rare) == 0  # mode collapse onto the common class
    # half of class 2, all of class 3: (0.05 + 0.05) / 0.15
    assert rare_class_recall([0.7, 0.2, 0.05, 0.05], t, rare) == pytest.approx(2 / 3)
    # overshooting class 3 does not make up for missing class 2: min(0.3, 0.05) / 0.15
    assert rare_class_recall([0.5, 0.2, 0.0, 0.3], t, rare) == pytest.approx(1 / 3)
    assert math.isnan(rare_class_recall([0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [2, 3]))  # no reference mass
    with pytest.raises(ValueError):
        rare_class_recall(t, t, [])
    assert rarest_classes([0.2, 0.1, 0.1, 0.6], 2) == [1, 2]  # ties: lower index first


def test_coverage_metrics():
    teacher, data = [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]
    m = coverage_metrics([0.8, 0.2, 0.0], teacher, data, [2])
    assert m["tv_teacher"] == pytest.approx(0.3) and m["tv_data"] == pytest.approx(0.2)
    assert m["rare_recall"] == 0 and m["rare_recall_data"] == 0 and m["rare_share"] == 0
    m = coverage_metrics([0.6, 0.3, 0.1], teacher, data, [2])
    assert m["rare_recall"] == pytest.approx(0.5) and m["rare_recall_data"] == pytest.approx(1.0)


def test_separation_is_the_gap_in_pooled_standard_deviations():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0]  # means 2 and 6, sample variances 1 and 4
    assert separation(a, b) == pytest.approx(4 / math.sqrt(2.5))
    assert separation(b, a) == separation(a, b)
    assert separation([1.0, 1.0], [2.0, 2.0]) == math.inf
    assert math.isnan(separation([1.0, 1.0], [1.0, 1.0])) and math.isnan(separation([1.0], [2.0, 3.0]))
