"""The authors' numerics (NVlabs/FastGen): the EMA's cadence, the approximate R1's scale, the GAN loss over
several heads, FastGen's head shapes, taps named by role, and the presets' warm start."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdistill.apps import distill, images
from fdistill.core.objective import approx_r1_penalty, gan_discriminator_loss, gan_generator_loss, r1_penalty
from fdistill.networks.heads import Discriminator, FastGenHead, group_count
from fdistill.networks.mlp import MLPDenoiser
from fdistill.networks.taps import resolve_taps
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training.distiller import DistillConfig, Distiller

MIX = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [0.5, 0.5])


class TwoTaps(nn.Module):
    """The toy teacher with its one feature tapped twice, for a two-head discriminator."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x, sigma, cond=None, return_features=False):
        if not return_features:
            return self.teacher(x, sigma, cond)
        x0, f = self.teacher(x, sigma, cond, return_features=True)
        return x0, {0: f[0], 1: f[0]}

    def features(self, x, sigma, cond=None):
        return self.forward(x, sigma, cond, return_features=True)[1]


def toy(heads: int = 1, **kw) -> Distiller:
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=2, sigma_data=MIX.data_std())
    cfg = DistillConfig(batch_size=32, tau=3, lr=1e-2, r1_gamma=0.0, **kw)
    teacher = MIX if heads == 1 else TwoTaps(MIX)
    channels = MIX.feature_channels()[0]
    return Distiller(cfg, teacher, copy.deepcopy(net), copy.deepcopy(net),
                     Discriminator.mlp({k: channels for k in range(heads)}, 8),
                     real_data=lambda n, part: (MIX.sample(n)[part], None), sample_shape=(2,))


@pytest.mark.parametrize("cadence", ["iteration", "student"])
def test_the_ema_moves_after_every_iteration_or_only_after_student_steps(cadence):
    beta = 0.9
    d = toy(ema_beta=beta, ema_cadence=cadence)
    expected = [p.detach().clone() for p in d.generator_ema.parameters()]
    for _ in range(7):  # student steps at iterations 0, 3, 6
        student = d.iteration % d.cfg.tau == 0
        d.step()
        if student or cadence == "iteration":
            expected = [beta * e + (1 - beta) * p.detach() for e, p in zip(expected, d.generator.parameters())]
    for e, p in zip(expected, d.generator_ema.parameters()):
        torch.testing.assert_close(p, e)


def test_per_iteration_ema_is_beta_to_the_tau_per_generator_update():
    """FastGen's cadence: between two generator updates the EMA moves tau times towards the same weights."""
    beta, tau = 0.9, 3
    d = toy(ema_beta=beta, ema_cadence="iteration")
    before = [p.detach().clone() for p in d.generator_ema.parameters()]
    for _ in range(tau):
        d.step()
    for b, p_ema, p in zip(before, d.generator_ema.parameters(), d.generator.parameters()):
        torch.testing.assert_close(p_ema, beta**tau * b + (1 - beta**tau) * p.detach())


class SmoothHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(dim, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).squeeze(1)


def test_approximate_r1_estimates_exact_r1_on_a_smooth_head():
    """E(D(x + 0.1 n) - D(x))^2 / 0.1^2 ~ E||grad D||^2: with the 1/alpha^2, r1_gamma means the same in both forms."""
    torch.manual_seed(0)
    head = SmoothHead(8)
    x = torch.randn(20000, 8, requires_grad=True)
    exact = r1_penalty(head(x), x)
    with torch.no_grad():
        approx = approx_r1_penalty(head(x), head(x + 0.1 * torch.randn_like(x)), 0.1)
    exact = float(exact.detach())
    assert float(approx) == pytest.approx(exact, rel=0.05)


def test_the_gan_losses_average_softplus_over_heads_and_r_reads_the_mean_logit():
    logits = torch.tensor([[3.0, -3.0], [1.0, 0.0]])  # two samples, two heads
    per_head = gan_generator_loss(logits)
    assert per_head == pytest.approx(float(F.softplus(-logits).mean()))
    assert per_head != pytest.approx(float(F.softplus(-logits.mean(1)).mean()))  # differs from the mean logit's
    d = toy(gan_loss_heads="per_head")
    torch.testing.assert_close(d._gan_logits(logits), logits)
    d = toy(gan_loss_heads="mean_logit")
    torch.testing.assert_close(d._gan_logits(logits), logits.mean(1))
    assert gan_discriminator_loss(logits, -logits) == pytest.approx(2 * float(F.softplus(-logits).mean()))
    disc = Discriminator.mlp({0: 3, 1: 3}, 4)
    feats = {0: torch.randn(5, 3), 1: torch.randn(5, 3)}
    assert disc.head_logits(feats).shape == (5, 2)
    torch.testing.assert_close(disc(feats), disc.head_logits(feats).mean(1))


@pytest.mark.parametrize("mode,ndim", [("per_head", 2), ("mean_logit", 1)])
def test_both_steps_hand_the_gan_losses_per_head_logits_or_their_mean(monkeypatch, mode, ndim):
    from fdistill.training import distiller as module

    seen = []
    for name in ("gan_generator_loss", "gan_discriminator_loss"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, f=original: seen.append([t.shape for t in a]) or f(*a))
    d = toy(heads=2, gan_loss_heads=mode, gan_weight=0.1)
    d.step()  # a student step
    d.step()  # a critic step
    assert [[len(s) for s in shapes] for shapes in seen] == [[ndim], [ndim, ndim]]
    assert all(s[-1] == 2 for shapes in seen for s in shapes) == (mode == "per_head")


def test_fastgen_head_has_the_layers_and_shapes_of_fastgens_edm_head():
    """FastGen's Discriminator_EDM head at 256 channels on a 32x32 map: three [conv 4x4 s2, GroupNorm, SiLU]
    (32 -> 16 -> 8 -> 4), [conv 4x4 s4, GroupNorm, SiLU] (4 -> 1), a 1x1 conv; state-dict names net.<i>."""
    head = FastGenHead(256, 32)
    conv, norm = (256, 256, 4, 4), (256,)
    expected = {f"net.{i}.weight": conv for i in (0, 3, 6, 9)} | {f"net.{i}.bias": norm for i in (0, 3, 6, 9)}
    expected |= {f"net.{i}.{k}": norm for i in (1, 4, 7, 10) for k in ("weight", "bias")}
    expected |= {"net.12.weight": (1, 256, 1, 1), "net.12.bias": (1,)}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected
    assert [m.stride for m in head.net if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3 + [(4, 4), (1, 1)]
    assert head(torch.randn(2, 256, 32, 32)).shape == (2,)
    assert [group_count(c) for c in (8, 32, 256, 1280, 48)] == [2, 8, 32, 32, 24]
    sd15 = Discriminator.conv({8: 1280}, head="fastgen")  # FastGen's Discriminator_SD15: about 52M parameters
    assert sum(p.numel() for p in sd15.parameters()) == 2 * (1280 * 1280 * 16 + 1280) + 4 * 1280 + 1281
    for r in (4, 2, 1):  # below FastGen's 8x8: a conv over the whole map
        assert FastGenHead(8, r)(torch.randn(3, 8, r, r)).shape == (3,)


def test_taps_are_named_by_role_or_resolution():
    assert resolve_taps(["mid"], [32, 16, 8]) == [8]
    assert resolve_taps([32, "mid", 8], [32, 16, 8]) == [32, 8]
    with pytest.raises(ValueError, match="'middle'.*mid"):
        resolve_taps(["middle"], [32, 16, 8])
    with pytest.raises(ValueError, match=r"\[4\] are not encoder resolutions"):
        resolve_taps([4], [32, 16, 8])
    cfg = images.load_config("digits", ["disc_resolutions=[mid, 8]"])
    assert cfg.disc_resolutions == ["mid", 8]
    with pytest.raises(ValueError, match="disc_resolutions"):
        images.load_config("digits", ["disc_resolutions=[[1]]"])


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_text_to_image_presets_warm_start_with_reverse_kl_and_tap_the_mid_block(name):
    cfg = images.load_config(name)
    assert cfg.distill.divergence == "js" and 0 < cfg.distill.h_warmup < cfg.distill.iterations
    assert cfg.distill.h_warmup // cfg.distill.tau == 1000  # 1000 generator updates of reverse-KL first
    assert cfg.disc_resolutions == ["mid"] and cfg.disc_head == "fastgen"
    assert cfg.distill.r1_form == "approx" and cfg.distill.ema_cadence == "iteration"


def test_digits_teacher_distills_with_fastgen_heads(teacher_path):
    from tiny import TINY
    cfg = images.load_config("digits", [o for o in TINY if not o.startswith("teacher.")] +
                             ["disc_head=fastgen", "disc_resolutions=[mid, 8]", "distill.batch_size=8"])
    d = distill.make_distiller(cfg, teacher_path)
    assert sorted(d.discriminator.keys) == [4, 8] and isinstance(d.discriminator.heads["8"], FastGenHead)
    for _ in range(2):
        logs = d.step()
    assert torch.isfinite(logs["loss_gan_d"])


def test_noise_levels_are_fastgens_and_linear_bins_span_the_whole_schedule():
    """FastGen draws indices [2, 998] of its ascending 1000-point Karras grid: [1, 997] of ours (descending); its
    equal-width ratio bins span [min_t, max_t] = [0.002, 80], not just the sampled points."""
    from fdistill.core.diffusion import SigmaSampler, karras_sigmas
    from fdistill.core.objective import RatioNormalizer

    s = SigmaSampler()
    ascending = karras_sigmas(1000).flip(0).float()
    torch.testing.assert_close(s.support.sort().values, ascending[2:999])
    norm = RatioNormalizer(s.support, 10, "linear", sigma_range=(0.002, 80.0))
    torch.testing.assert_close(norm.log_edges.exp(), torch.linspace(0.002, 80.0, 11)[1:-1])
    d = toy(ratio_binning="linear")
    torch.testing.assert_close(d.ratio_norm.log_edges.exp(), torch.linspace(0.002, 80.0, 11)[1:-1])


def test_the_fastgen_overlay_reads_over_a_preset():
    cfg = images.load_config(["cifar10", "fastgen"])
    d = cfg.distill
    assert (d.r1_gamma, d.fake_score_weighting, d.ratio_binning, d.precision) == (0.0, "none", "linear", "fp32")
    assert (d.divergence, d.batch_size, cfg.disc_head) == ("forward_kl", 2048, "fastgen")  # the rest is cifar10's
