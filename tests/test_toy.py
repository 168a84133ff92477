import json

import pytest
import torch

from fdistill import cli, toy
from fdistill.metrics import mode_coverage, precision_recall

CFG = toy.load_config()
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


def test_demo_cli_reports_bad_input(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "distill.nonsense=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert cli.main(["demo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
