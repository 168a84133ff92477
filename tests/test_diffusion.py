import copy
import math

import pytest
import torch

from fdistill.core.diffusion import (
    SigmaSampler,
    denoising_loss,
    edm_preconditioning,
    edm_sampler,
    karras_sigmas,
    score_from_denoiser,
)
from fdistill.evaluation.metrics import mode_coverage
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture

MIX = GaussianMixture([[2.0, 0.0], [-2.0, 1.0], [0.0, -3.0]], [0.3, 0.5, 0.4], [0.6, 0.3, 0.1])


def test_karras_grid_endpoints_and_rho_spacing():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    root = s ** (1 / 7)  # EDM Eq. 5: uniform in sigma^(1/rho)
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(17), rtol=1e-9)


def test_sigma_sampler_draws_only_from_index_range():
    sampler = SigmaSampler(index_range=(2, 998))
    draws = sampler.sample(20_000)
    support = sampler.support
    assert torch.isin(draws, support).all()
    assert len(support) == 997 and draws.max() <= sampler.grid[2] and draws.min() >= sampler.grid[998]
    assert 1.5 < draws.median() < 4.0  # FastGen: median sigma about 2.5
    with pytest.raises(ValueError):
        SigmaSampler(index_range=(5, 1000))


def test_edm_preconditioning_table1():
    sigma, sd = torch.tensor([0.5, 2.0]), 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sd)
    assert torch.allclose(c_skip, sd**2 / (sigma**2 + sd**2))
    assert torch.allclose(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_in, 1 / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
def test_gmm_denoiser_is_tweedie_of_its_log_density(sigma):
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    mix = copy.deepcopy(MIX).double()
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    s = torch.full((64,), sigma, dtype=torch.float64)
    assert torch.allclose(score_from_denoiser(mix(x.detach(), s), x.detach(), s), score, rtol=1e-7, atol=1e-9)


def test_gmm_log_prob_normalized():
    g = torch.linspace(-8, 8, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    p = copy.deepcopy(MIX).double().log_prob(torch.stack([xx.flatten(), yy.flatten()], 1), 0.5).exp()
    assert float(p.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=1e-4)


def test_heun_sampler_with_exact_denoiser_recovers_mixture():
    x = edm_sampler(MIX, torch.randn(4000, 2), num_steps=18)
    cov = mode_coverage(x, MIX.means, MIX.stds, MIX.weights)
    assert cov["covered"] == 3 and cov["tv"] < 0.05


def test_stochastic_sampler_runs_and_differs():
    torch.manual_seed(1)
    z = torch.randn(256, 2)
    a = edm_sampler(MIX, z, num_steps=10)
    b = edm_sampler(MIX, z, num_steps=10, S_churn=20, S_min=0.05, S_max=50)
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert mode_coverage(b, MIX.means, MIX.stds, MIX.weights)["tv"] < 0.15


def test_mlp_denoiser_interface_and_edm_training_reduces_loss():
    net = MLPDenoiser(dim=2, hidden=64, depth=2, sigma_data=MIX.data_std())
    sigma = torch.full((8,), 1.3)
    d, feats = net(torch.randn(8, 2), sigma, return_features=True)
    assert d.shape == (8, 2) and feats[0].shape == (8, 64) and net.feature_channels() == {0: 64}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sig = SigmaSampler(sigma_max=20.0).sample

    def loss(denoiser):  # same data, sigmas and noise for every denoiser
        torch.manual_seed(5)
        with torch.no_grad():
            return float(denoising_loss(denoiser, MIX.sample(8192), sig(8192), None, net.sigma_data))

    before, optimum = loss(net), loss(MIX)  # the exact denoiser attains the minimum
    for _ in range(400):
        opt.zero_grad()
        denoising_loss(net, MIX.sample(512), sig(512), None, net.sigma_data).backward()
        opt.step()
    assert optimum < before and loss(net) - optimum < 0.5 * (before - optimum)


def test_denoising_loss_weightings():
    sigma = torch.tensor([0.5, 2.0])
    zero = lambda x, s, c: torch.zeros_like(x)
    x0 = torch.ones(2, 3)
    torch.manual_seed(0)
    plain = denoising_loss(zero, x0, sigma, None, 0.5, "none")
    torch.manual_seed(0)
    edm = denoising_loss(zero, x0, sigma, None, 0.5, "edm")
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert float(plain) == pytest.approx(1.0)
    assert float(edm) == pytest.approx(float(lam.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        denoising_loss(zero, x0, sigma, None, 0.5, "bogus")
    assert math.isfinite(float(edm))


def test_the_teachers_own_schedule_is_resolved_and_refuses_fields_it_would_ignore():
    from fdistill.apps import images

    own = SigmaSampler(schedule="teacher")
    assert own.resolve({}) == SigmaSampler()  # EDM's Karras levels
    flow = own.resolve({"schedule": "flow", "shift": 3.0, "index_range": [0, 999]})
    assert flow.schedule == "flow" and flow.largest == pytest.approx(3 * 999.0)
    assert SigmaSampler(schedule="karras", sigma_max=20.0).resolve({"schedule": "flow"}).sigma_max == 20.0
    with pytest.raises(ValueError, match="sigma_max=40.0 is given, but schedule is 'teacher'") as e:
        SigmaSampler(schedule="teacher", sigma_max=40.0)
    assert "\n" not in str(e.value)
    assert images.load_config("digits").distill.sigmas.schedule == "teacher"  # the default
    given = images.load_config("digits", ["distill.sigmas.index_range=[2, 900]"]).distill.sigmas
    assert (given.schedule, given.index_range) == ("karras", (2, 900))  # a sigmas key: SigmaSampler's own defaults
    with pytest.raises(ValueError, match="index_range"):
        images.load_config("digits", ["distill.sigmas.schedule=teacher", "distill.sigmas.index_range=[2, 900]"])
    assert images.load_config("digits", ["distill.sigmas.schedule=teacher",
                                         "distill.sigmas.index_range=[1, 997]"]).distill.sigmas.schedule == "teacher"
    with pytest.raises(ValueError, match="before its levels are read"):
        own.grid
