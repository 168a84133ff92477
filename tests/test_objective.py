import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdistill.core.diffusion import SigmaSampler
from fdistill.core.objective import (
    RatioNormalizer,
    density_ratio,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    normalize_by_batch_mean,
    r1_penalty,
)

SAMPLER = SigmaSampler()


def test_density_ratio_is_exp_logit_clipped_and_detached():
    logits = torch.tensor([-30.0, -1.0, 0.0, 1.0, 2.5, 30.0], requires_grad=True)
    r = density_ratio(logits, logit_clip=10.0, r_min=0.1, r_max=20.0)
    expected = torch.tensor([0.1, torch.e**-1, 1.0, torch.e, torch.e**2.5, 20.0])
    assert torch.allclose(r, expected) and not r.requires_grad
    # D/(1-D) with D = sigmoid(logit) is the same ratio (Sec. 3)
    d = torch.sigmoid(logits[1:5].detach())
    assert torch.allclose(density_ratio(logits[1:5]), d / (1 - d), rtol=1e-5)


def test_equal_mass_bins_split_training_sigmas_evenly():
    norm = RatioNormalizer(SAMPLER.support, num_bins=10, binning="equal_mass")
    counts = torch.bincount(norm.bin_index(SAMPLER.support), minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == len(SAMPLER.support)


def test_linear_bins_crowd_the_first_bin():
    norm = RatioNormalizer(SAMPLER.support, num_bins=10, binning="linear")
    share0 = (norm.bin_index(SAMPLER.sample(100_000)) == 0).float().mean()
    assert 0.55 < share0 < 0.75  # FastGen's equal-width bins: about 64% of samples land in bin 0
    edges = norm.log_edges.exp()
    assert torch.allclose(edges[1:] - edges[:-1], (edges[1] - edges[0]).expand(8), rtol=1e-3)


def test_first_stage_makes_each_bin_mean_one():
    norm = RatioNormalizer(SAMPLER.support, num_bins=6)
    sigma = SAMPLER.sample(4096)
    r = torch.rand(4096) * 5 * (1 + sigma.log().clamp(-3, 3).abs())  # bin-dependent scale
    out = norm(r, sigma)
    idx = norm.bin_index(sigma)
    for b in range(6):
        assert out[idx == b].mean().item() == pytest.approx(1.0, rel=1e-5)
    norm.commit()  # the step's bin means become the stored ones
    assert torch.allclose(out / r, 1 / norm.bin_mean[idx])  # a per-bin rescaling, nothing else


def test_first_stage_ema_and_eval_mode():
    norm = RatioNormalizer(SAMPLER.support, num_bins=1, ema=0.5)
    sigma = SAMPLER.sample(10)
    out = norm(torch.full((10,), 3.0), sigma)
    assert torch.allclose(out, torch.full((10,), 3.0 / 2.0))  # normalized by 0.5 * 1 + 0.5 * 3
    assert norm.bin_mean.item() == 1.0  # the EMA moves at commit, once per optimizer step
    norm.commit()
    assert norm.bin_mean.item() == pytest.approx(0.5 * 1 + 0.5 * 3)
    out = norm(torch.full((10,), 5.0), sigma)
    norm.commit()
    assert norm.bin_mean.item() == pytest.approx(0.5 * 2 + 0.5 * 5)
    assert torch.allclose(out, torch.full((10,), 5.0 / 3.5))
    norm.eval()  # eval: the stored means, nothing recorded
    out = norm(torch.full((10,), 4.0), sigma)
    norm.commit()
    assert torch.allclose(out, torch.full((10,), 4.0 / 3.5)) and norm.bin_mean.item() == pytest.approx(3.5)


def test_first_stage_ema_moves_once_per_step_over_all_passes():
    """Two passes of one optimizer step: each is normalized by its own group's mean blended with the
    stored EMA; commit folds the mean over both passes in once."""
    norm = RatioNormalizer(SAMPLER.support, num_bins=1, ema=0.5)
    sigma = SAMPLER.sample(4)
    a = norm(torch.full((4,), 3.0), sigma)
    b = norm(torch.full((4,), 7.0), sigma)
    assert torch.allclose(a, torch.full((4,), 3.0 / 2.0)) and torch.allclose(b, torch.full((4,), 7.0 / 4.0))
    norm.commit()
    assert norm.bin_mean.item() == pytest.approx(0.5 * 1 + 0.5 * 5)
    with pytest.raises(ValueError):
        RatioNormalizer(SAMPLER.support, ema=1.0)
    with pytest.raises(ValueError, match="binning"):
        RatioNormalizer(SAMPLER.support, binning="quantile")


def test_second_stage_normalizes_h_to_mean_one():
    h = torch.rand(100) * 7
    assert normalize_by_batch_mean(h).mean().item() == pytest.approx(1.0)


def test_fdistill_loss_gradient_is_weighted_score_difference():
    """d loss / d x = w h (D_fake - D_teacher) / (B d) with w = 1/mean|x - D_teacher| (Eq. 4, DMD weight)."""
    B, d = 6, 5
    x = torch.randn(B, d, requires_grad=True)
    x0_teacher, x0_fake, h = torch.randn(B, d), torch.randn(B, d), torch.rand(B) + 0.5
    loss, w = fdistill_loss(x, x0_teacher, x0_fake, h, eps=0.0)
    loss.backward()
    w_ref = 1 / (x.detach() - x0_teacher).abs().mean(1)
    assert torch.allclose(w, w_ref)
    expected = (w_ref * h)[:, None] * (x0_fake - x0_teacher) / (B * d)
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-8)
    # a descent step moves x towards the teacher's denoised output and away from the fake one
    assert ((x0_teacher - x0_fake) * -x.grad).sum() > 0


def test_fdistill_loss_zero_when_fake_equals_teacher():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    loss, _ = fdistill_loss(x, t, t.clone(), torch.ones(4))
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_gan_losses_match_log_sigmoid_forms():
    lr, lf = torch.randn(50), torch.randn(50)
    d_r, d_f = torch.sigmoid(lr), torch.sigmoid(lf)
    assert torch.allclose(gan_discriminator_loss(lr, lf), -(d_r.log().mean() + (1 - d_f).log().mean()), atol=1e-6)
    assert torch.allclose(gan_generator_loss(lf), -d_f.log().mean(), atol=1e-6)


def test_r1_of_linear_head_is_squared_weight_norm():
    a = torch.tensor([0.5, -2.0, 1.0], requires_grad=True)
    x = torch.randn(8, 3, requires_grad=True)
    r1 = r1_penalty((x * a).sum(1), x)
    assert r1.item() == pytest.approx(float(a.detach().square().sum()))
    (grad_a,) = torch.autograd.grad(r1, a)  # create_graph: the penalty is differentiable in the head
    assert torch.allclose(grad_a, 2 * a.detach())


def _worker(rank, world, init_file, r, sigma, h, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = slice(rank * len(r) // world, (rank + 1) * len(r) // world)
        norm = RatioNormalizer(SAMPLER.support, num_bins=5)
        out[rank] = (norm(r[shard], sigma[shard]), normalize_by_batch_mean(h[shard]), norm.bin_mean.clone())
    finally:
        dist.destroy_process_group()


def test_normalizations_all_reduce_across_ranks(tmp_path):
    """Two gloo ranks with half the batch each normalize exactly like one process with all of it."""
    r, sigma, h = torch.rand(64) * 4, SAMPLER.sample(64), torch.rand(64) * 3
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "store"), r, sigma, h, out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    single = RatioNormalizer(SAMPLER.support, num_bins=5)
    assert torch.allclose(torch.cat([ranks[0][0], ranks[1][0]]), single(r, sigma), rtol=1e-6)
    assert torch.allclose(torch.cat([ranks[0][1], ranks[1][1]]), normalize_by_batch_mean(h), rtol=1e-6)
    assert torch.allclose(ranks[0][2], ranks[1][2]) and torch.allclose(ranks[0][2], single.bin_mean)


def test_math_attention_kernel_only_inside_double_backward():
    """Fused attention kernels have no double backward: the math kernel runs for exact R1 (inside
    ``double_backward()``) only; the GAN term's single backward keeps the fused kernels."""
    from fdistill.networks.attention import double_backward, twice_differentiable

    x = torch.randn(3, requires_grad=True)
    with twice_differentiable(x):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    with double_backward(), twice_differentiable(x):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with double_backward(), twice_differentiable(x.detach()):  # nothing to differentiate: no change
        assert torch.backends.cuda.flash_sdp_enabled()
