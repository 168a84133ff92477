import copy
import shutil

import pytest
import torch
import yaml

from fdistill.config import apply_overrides, from_dict, to_dict
from fdistill.core.diffusion import SigmaSampler
from fdistill.networks.heads import Discriminator
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import training_loop

MIX = GaussianMixture([[2.0, -1.0], [-1.5, 1.0]], [0.4, 0.4], [0.7, 0.3])


def make(cfg: DistillConfig, teacher=None, seed=0) -> Distiller:
    torch.manual_seed(seed)
    net = MLPDenoiser(2, hidden=32, depth=2, sigma_data=MIX.data_std())
    teacher = teacher if teacher is not None else copy.deepcopy(net)
    return Distiller(cfg, teacher, copy.deepcopy(net), copy.deepcopy(net),
                     Discriminator.mlp(teacher.feature_channels(), hidden=16),
                     real_data=lambda n, part: (MIX.sample(n)[part], None), sample_shape=(2,))


def small(**kw) -> DistillConfig:
    base = dict(iterations=20, batch_size=32, lr=1e-3, tau=3, sigmas=SigmaSampler(sigma_max=20.0), log_every=1)
    return DistillConfig(**{**base, **kw})


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def changed(before, m):
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_student_step_updates_only_generator_and_ema():
    d = make(small(divergence="forward_kl"), teacher=MIX)
    g, e, f, h = params(d.generator), params(d.generator_ema), params(d.fake_score), params(d.discriminator)
    logs = d.step()
    assert logs["kind"] == "student"
    assert changed(g, d.generator) and changed(e, d.generator_ema)
    assert not changed(f, d.fake_score) and not changed(h, d.discriminator)
    assert all(p.grad is None for p in d.discriminator.parameters())  # backward(inputs=...) kept it clean
    for key in ("loss_fdistill", "loss_gan_g", "h_min", "h_mean", "h_max", "r_mean", "score_diff"):
        assert key in logs
    assert logs["h_mean"] == pytest.approx(1.0, rel=1e-5)  # second-stage normalization


def test_critic_step_updates_fake_score_and_head_only():
    d = make(small())
    d.step()
    g, f, h = params(d.generator), params(d.fake_score), params(d.discriminator)
    logs = d.step()
    assert logs["kind"] == "critic" and "r1" in logs and "loss_fake_score" in logs
    assert not changed(g, d.generator) and changed(f, d.fake_score) and changed(h, d.discriminator)


def test_ttur_schedule_alg1_line5():
    d = make(small(tau=4))
    kinds = [d.step()["kind"] for _ in range(9)]
    assert kinds == ["student", "critic", "critic", "critic"] * 2 + ["student"]


def test_adversarial_only_skips_fake_score():
    d = make(small(fdistill_weight=0.0))
    f = params(d.fake_score)
    logs = [d.step() for _ in range(4)]
    assert not changed(f, d.fake_score)
    assert "loss_fdistill" not in logs[0] and "loss_gan_g" in logs[0]


def test_fdistill_term_vanishes_when_fake_score_equals_teacher():
    """At initialization (fake score = teacher copy) the f-distill gradient is exactly zero."""
    d = make(small(gan_weight=0.0, grad_clip=None))
    before = params(d.generator)
    logs = d.student_step()
    assert logs["score_diff"] == 0.0
    # AdamW with a zero gradient only applies weight decay: p <- p (1 - lr wd)
    for a, b in zip(before, d.generator.parameters()):
        assert torch.allclose(a * (1 - d.cfg.lr * d.cfg.weight_decay), b)


def test_config_validation():
    with pytest.raises(ValueError, match="tau"):
        DistillConfig(tau=1)
    with pytest.raises(ValueError, match="both 0"):
        DistillConfig(fdistill_weight=0.0, gan_weight=0.0)
    with pytest.raises(ValueError):
        DistillConfig(divergence="no_such_divergence!")


def test_config_yaml_round_trip_and_overrides():
    cfg = small(divergence="js", ratio_binning="linear", sigmas=SigmaSampler(index_range=(20, 980)))
    text = yaml.safe_dump(to_dict(cfg))
    back = from_dict(DistillConfig, yaml.safe_load(text))
    assert back == cfg and back.sigmas.index_range == (20, 980) and isinstance(back.betas, tuple)
    data = apply_overrides(to_dict(cfg), ["lr=3e-4", "sigmas.index_range=[2, 998]", "divergence=fkl"])
    assert from_dict(DistillConfig, data).lr == 3e-4 and data["sigmas"]["index_range"] == [2, 998]
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        from_dict(DistillConfig, {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="did you mean 'iterations'"):
        from_dict(DistillConfig, {"iteratons": 1})
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["lr"])


def test_resume_is_exact(tmp_path):
    """A run stopped at iteration 7 and resumed ends with the same weights as an uninterrupted run."""
    cfg = small(divergence="js", iterations=14, ratio_ema=0.5)
    full = make(cfg)
    torch.manual_seed(123)
    training_loop(full, progress=False)

    first = make(copy.deepcopy(cfg))
    first.cfg.iterations = 7
    torch.manual_seed(123)
    training_loop(first, run_dir=tmp_path / "run", progress=False)
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = make(cfg)  # same frozen teacher; the trained parts must come from the checkpoint
    with torch.no_grad():
        for p in [*resumed.generator.parameters(), *resumed.fake_score.parameters()]:
            p.add_(1.0)
    resumed.load(tmp_path / "run" / "checkpoints" / "000000007")
    assert resumed.iteration == 7
    training_loop(resumed, progress=False)

    for name, m in full.modules().items():
        other = resumed.modules()[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v, other[k]), f"{name}.{k} differs after resume"
    for name, opt in full.optimizers().items():
        a, b = opt.state_dict()["state"], resumed.optimizers()[name].state_dict()["state"]
        assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_load_rejects_other_divergence(tmp_path):
    d = make(small(divergence="js", iterations=2))
    training_loop(d, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="divergence"):
        make(small(divergence="reverse_kl")).load(tmp_path)
    with pytest.raises(FileNotFoundError):
        d.load(tmp_path / "missing")


def test_distills_a_shifted_gaussian():
    """Convergence on a small problem: the one-step generator, started from a network fitted to
    N(0, I)-like data, moves to a Gaussian teacher N(mu, s^2 I) and matches its moments."""
    target = GaussianMixture([[1.5, -1.0]], [0.5], [1.0])
    cfg = small(divergence="js", iterations=3000, batch_size=256, lr=1e-3, tau=3, gan_weight=0.0, r1_gamma=0.0,
                ema_beta=0.99)
    d = make(cfg, teacher=target, seed=1)
    training_loop(d, progress=False)
    x = d.sample(4000)
    # Over seeds 0-5 these settings end within 0.02 of the mean and 0.04 of the std.
    assert torch.allclose(x.mean(0), target.means[0], atol=0.1), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((2,), 0.5), rtol=0.15), x.std(0)


def test_lr_stages_switch_both_learning_rates():
    """Table 5's ImageNet-64 schedule in miniature: lr from iteration 4 on is 2.5e-4; the critic's rate
    keeps its ratio to the generator's."""
    d = make(small(lr=1e-3, lr_critic=2e-3, lr_stages=[[4, 2.5e-4]]))
    lrs = []
    for _ in range(6):
        d.step()
        lrs.append((d.opt_g.param_groups[0]["lr"], d.opt_fake.param_groups[0]["lr"], d.opt_d.param_groups[0]["lr"]))
    assert lrs[3] == (1e-3, 2e-3, 2e-3) and lrs[4] == lrs[5] == (2.5e-4, 5e-4, 5e-4)
    with pytest.raises(ValueError, match="lr_stages"):
        small(lr_stages=[[10, 1e-4], [5, 1e-5]])


def test_bf16_autocast_trains_with_fp32_weights():
    d = make(small(precision="bf16", iterations=6))
    history = training_loop(d, progress=False)
    assert all(p.dtype == torch.float32 for p in d.generator.parameters())
    assert history and all(v == v for logs in history for v in logs.values() if isinstance(v, float))
    with pytest.raises(ValueError, match="precision"):
        small(precision="fp16")


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile (inductor) needs a C compiler on CPU")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_networks_give_the_eager_result():
    eager, compiled = make(small(iterations=4)), make(small(iterations=4, compile=True))
    training_loop(eager, progress=False)
    training_loop(compiled, progress=False)
    for a, b in zip(eager.generator.parameters(), compiled.generator.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert eager.generator.state_dict().keys() == compiled.generator.state_dict().keys()  # checkpoints unchanged
