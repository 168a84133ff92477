import json

import numpy as np
import pytest
import torch
import yaml

from fdistill.apps import cli
from fdistill.apps import lab2d as toy
from fdistill.evaluation.metrics import mode_coverage, precision_recall

CFG = toy.load_toy_config()
MIX = toy.build_mixture(CFG)


def test_default_mixture_is_hard():
    w = MIX.weights
    assert w.max() / w.min() >= 10
    far = MIX.means.norm(dim=1) > 2 * MIX.means.norm(dim=1).min()
    assert far.sum() >= 2


def test_mode_coverage_of_true_samples_and_of_a_collapsed_generator():
    x = MIX.sample(20_000)
    cov = mode_coverage(x, MIX.means, MIX.stds, MIX.weights)
    # in 2-D, P(|x - mu| > 3 s) = exp(-4.5) = 1.1% of true samples lie off-mode
    assert cov["covered"] == MIX.num_modes and cov["tv"] < 0.025 and abs(cov["off_mode"] - 0.011) < 0.003
    heavy = MIX.means[0] + MIX.stds[0] * torch.randn(5000, 2)  # everything in the heaviest mode
    cov = mode_coverage(heavy, MIX.means, MIX.stds, MIX.weights)
    assert cov["covered"] == 1
    assert cov["tv"] == pytest.approx(1 - float(MIX.weights[0]), abs=0.01)


def test_mode_coverage_quarter_share_rule():
    means, stds, weights = torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.ones(2), torch.tensor([0.5, 0.5])
    x = torch.cat([torch.zeros(900, 2), torch.tensor([[10.0, 0.0]]).repeat(100, 1)])  # 10% < 25% of 50%
    assert mode_coverage(x, means, stds, weights)["covered"] == 1
    x = torch.cat([torch.zeros(850, 2), torch.tensor([[10.0, 0.0]]).repeat(150, 1)])  # 15% >= 12.5%
    assert mode_coverage(x, means, stds, weights)["covered"] == 2


def test_precision_recall_kynkaanniemi():
    real = torch.randn(2000, 2)
    p, r = precision_recall(real, torch.randn(2000, 2))
    assert p > 0.9 and r > 0.9
    p, r = precision_recall(real, 0.1 * torch.randn(2000, 2))  # collapsed: precise, poor recall
    assert p > 0.95 and r < 0.3
    p, r = precision_recall(real, torch.randn(2000, 2) + 20)  # disjoint
    assert p == 0 and r == 0
    with pytest.raises(ValueError):
        precision_recall(real[:3], real[:3])


def test_demo_cli_end_to_end(tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path), "--no-progress", "teacher.steps=60", "teacher.hidden=32",
                     "distill.iterations=12", "distill.batch_size=64", "runs=[reverse_kl, js, adversarial]",
                     "num_eval=300"])
    assert code == 0
    out = capsys.readouterr().out
    for name in ("reverse_kl", "js", "adversarial", "modes", "recall", "log p"):
        assert name in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"reverse_kl", "js", "adversarial"}
    assert all(0 <= r["precision"] <= 1 and 0 <= r["tv"] <= 1 for r in results.values())
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1  # cached for the next run
    for run in ("reverse_kl", "js", "adversarial"):  # the samples each run was scored on, for other metrics
        assert np.load(tmp_path / f"samples_{run}.npy").shape == (300, 2)
    assert np.load(tmp_path / "reference.npy").shape == (300, 2)
    mixture = yaml.safe_load((tmp_path / "mixture.yaml").read_text())
    assert np.allclose(mixture["means"], CFG.mixture.means) and np.isclose(sum(mixture["weights"]), 1.0)


def test_demo_reads_a_users_mixture_over_the_preset(tmp_path, capsys):
    """A file holding only a mixture is enough (the rest comes from the preset), in any dimension."""
    mine = {"mixture": {"means": [[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0]], "stds": [0.5, 0.5, 0.5],
                        "weights": [0.5, 0.3, 0.2]}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    cfg = toy.load_toy_config(tmp_path / "mine.yaml")
    assert cfg.distill.iterations == CFG.distill.iterations and cfg.distill.gan_weight == CFG.distill.gan_weight
    code = cli.main(["demo", "--config", str(tmp_path / "mine.yaml"), "--out", str(tmp_path / "run"), "--no-progress",
                     "teacher.steps=40", "teacher.hidden=32", "distill.iterations=6", "distill.batch_size=64",
                     "runs=[js]", "num_eval=200"])
    assert code == 0
    assert "/3" in capsys.readouterr().out  # modes covered out of 3
    assert np.load(tmp_path / "run" / "samples_js.npy").shape == (200, 3)
    assert (tmp_path / "run" / "demo.png").is_file()
    bad = {"mixture": {"means": [[0.0, 0.0], [1.0, 1.0]], "stds": [0.5], "weights": [0.5, 0.5]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert cli.main(["demo", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]) == 2
    assert "stds (K,)" in capsys.readouterr().err


@pytest.mark.parametrize("features", ["teacher", "fake_score"])
def test_fig3_map_shows_the_trainers_weights(features):
    """The Fig. 3 weight map is Alg. 1 lines 6-8 as the trainer computes them (the ratio clipped, divided
    by the trainer's stored bin mean, then h), divided by the mean of h over noisy generator samples; the head
    reads the network distill.disc_features names (the GMM teacher's features or the MLP fake score's)."""
    cfg = toy.load_toy_config(overrides=["teacher.hidden=32", "teacher.steps=30", "distill.iterations=10",
                                     "distill.batch_size=128", "distill.divergence=forward_kl",
                                     f"distill.disc_features={features}"])
    mixture = toy.build_mixture(cfg)
    d = toy.toy_distiller("forward_kl", mixture, toy.train_mlp_teacher(mixture, cfg.teacher, progress=False), cfg, 0)
    toy.training_loop(d, progress=False)
    sigma, before = 0.5, d.ratio_norm.bin_mean.clone()
    torch.manual_seed(0)
    diff, h_map, _ = toy.score_and_weight_maps(d, mixture, sigma, n_gen=2000)
    assert torch.equal(d.ratio_norm.bin_mean, before)  # drawing the map leaves the trainer's state alone

    def h(x):  # forward-KL: h(r) = r
        s = torch.full((len(x),), sigma)
        net = d.teacher if features == "teacher" else d.fake_score
        r = d.discriminator(net.features(x, s, None)).clamp(-10, 10).exp().clamp(0.1, 20)
        return r / before[d.ratio_norm.bin_index(s)]

    with torch.no_grad():
        torch.manual_seed(0)
        x_gen = d.sample(2000) + sigma * torch.randn(2000, 2)
        expected = h(toy._grid(mixture)[0]) / h(x_gen).mean()
    assert torch.allclose(h_map.flatten(), expected, rtol=1e-5)
    assert diff.shape == h_map.shape and float(h_map.std()) > 0


def test_demo_without_gan_term_skips_the_adversarial_run_and_prints_each_row(tmp_path, capsys):
    """distill.gan_weight=0: the adversarial-only run has no loss, so it is skipped in one printed line;
    the other rows are printed as their runs finish (and in the final table)."""
    code = cli.main(["demo", "--out", str(tmp_path), "--no-progress", "teacher.steps=30", "teacher.hidden=32",
                     "distill.iterations=6", "distill.batch_size=32", "runs=[reverse_kl, adversarial, js]",
                     "num_eval=200", "distill.gan_weight=0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipping the 'adversarial' run" in out and "gan_weight=0" in out
    rows = [line for line in out.splitlines() if line.startswith(("| reverse_kl |", "| js |"))]
    assert len(rows) == 4  # each row once as its run finished, once in the final table
    assert out.index("| reverse_kl |") < out.index("| js |")
    assert set(json.loads((tmp_path / "results.json").read_text())["results"]) == {"reverse_kl", "js"}


def test_toy_distiller_refuses_an_adversarial_run_without_gan_term():
    cfg = toy.load_toy_config(overrides=["distill.gan_weight=0", "teacher.hidden=16", "teacher.depth=1"])
    mlp = toy.MLPDenoiser(2, 16, 1, sigma_data=MIX.data_std())
    with pytest.raises(ValueError, match="both 0"):
        toy.toy_distiller(toy.ADVERSARIAL, MIX, mlp, cfg, seed=0)
