import time

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open

from fdistill.evaluation import digits_classifier as dc
from fdistill.evaluation.metrics import (
    class_accuracy,
    evaluate_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrtm_reference(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formulation: tr sqrtm(S1 S2) with scipy."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# -- Fréchet distance ---------------------------------------------------------------------------
def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert value == pytest.approx(_sqrtm_reference(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(value, rel=1e-9)


def test_frechet_distance_handles_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    d = 32
    mu1, s1 = feature_statistics(rng.standard_normal((10, d)))  # rank 9 < 32
    mu2, s2 = feature_statistics(rng.standard_normal((12, d)) + 0.5)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    zero = np.zeros((d, d))
    assert frechet_distance(mu1, zero, mu2, s2) == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s2), rel=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu, sigma, mu, np.eye(5))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros((4, 1)), sigma, np.zeros((4, 1)), sigma)


def test_feature_statistics_are_float64_unbiased():
    x = torch.randn(50, 3)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        feature_statistics(torch.randn(1, 3))


def test_fid_same_gaussian_is_small_relative_to_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    same = fid_from_features(a, b)
    shifted = fid_from_features(a, b + 1.0)  # true FID = 8
    assert same < 0.05 and shifted == pytest.approx(8.0, rel=0.1)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(same)


def test_evaluate_features_keys():
    real, fake = torch.randn(300, 4), torch.randn(200, 4) + 3.0
    out = evaluate_features(real, fake, k=3)
    assert set(out) == {"fid", "precision", "recall", "num_real", "num_fake"}
    assert out["num_real"] == 300 and out["num_fake"] == 200
    assert out["fid"] > 30 and out["precision"] < 0.2 and out["recall"] < 0.2


def test_class_accuracy_with_labels_logits_and_one_hot():
    targets = torch.tensor([0, 1, 2, 2])
    assert class_accuracy(torch.tensor([0, 1, 1, 2]), targets) == 0.75
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() * 5 - 1
    assert class_accuracy(logits, targets) == 0.75
    assert class_accuracy(logits, torch.nn.functional.one_hot(targets, 3)) == 0.75
    assert class_accuracy(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 2]]) == 1.0
    with pytest.raises(ValueError):
        class_accuracy(torch.tensor([0, 1]), targets)


# -- digits-FID feature space -------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fdistill-cache")
    net = dc.load_digits_classifier(cache, progress=False)
    return net, cache


def test_digits_classifier_trains_caches_and_is_accurate(digits_net):
    net, cache = digits_net
    path = dc.digits_classifier_path(cache)
    assert path.is_file() and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["recipe_version"] == str(dc.RECIPE_VERSION)
    assert float(meta["heldout_accuracy"]) >= 0.95 and net.heldout_accuracy == float(meta["heldout_accuracy"])
    x, y = dc.digits_tensors()
    _, test_idx = dc.split_indices(y, seed=0)
    assert len(test_idx) == pytest.approx(0.2 * len(y), abs=10)
    with torch.no_grad():
        assert class_accuracy(net(x[test_idx]), y[test_idx]) == pytest.approx(net.heldout_accuracy, abs=1e-6)


def test_digits_classifier_second_load_uses_cache(digits_net, monkeypatch):
    net, cache = digits_net
    path = dc.digits_classifier_path(cache)
    mtime = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(dc, "train_digits_classifier", fail)
    start = time.perf_counter()
    again = dc.load_digits_classifier(cache, progress=False)
    assert time.perf_counter() - start < 2.0 and path.stat().st_mtime_ns == mtime
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_digits_classifier_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path))
    assert dc.digits_classifier_path() == tmp_path / dc.FILENAME
    assert dc.digits_classifier_path(tmp_path / "x") == tmp_path / "x" / dc.FILENAME


def test_digits_fid_separates_real_from_noise_and_from_one_class(digits_net):
    net, _ = digits_net
    x, y = dc.digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half_a, half_b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
    noise = torch.randn(len(half_b), 1, 8, 8).clamp(-1, 1)
    with torch.no_grad():
        fa, fb, fn, f3 = (net.features(t) for t in (half_a, half_b, noise, x[y == 3]))
    assert fa.shape == (len(half_a), dc.FEATURE_DIM)
    fid_real = fid_from_features(fa, fb)
    fid_noise = fid_from_features(fa, fn)
    fid_one_class = fid_from_features(fa, f3)
    assert fid_noise > 20 * fid_real and fid_one_class > 10 * fid_real
    with pytest.raises(ValueError, match="1, 8, 8"):
        net.features(torch.zeros(2, 3, 8, 8))
