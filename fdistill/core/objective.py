"""The f-distill objective: Eq. (4), the density ratio, its two-stage normalization (Sec. 4, Alg. 1
lines 6-9), and the auxiliary GAN losses (Sec. 3) with R1.

Statistics that span the batch (per-bin means of r, the mean of h) are all-reduced when
torch.distributed is initialized, so a data-parallel run normalizes over all ranks' samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.core.diffusion import append_dims


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over data-parallel ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def density_ratio(logits: Tensor, logit_clip: float = 10.0, r_min: float = 0.1, r_max: float = 20.0) -> Tensor:
    """r = D/(1 - D) = exp(logit), clipped (Sec. 3; Alg. 1 line 6). Detached: h is a weight, not a path.

    The logit is clamped to [-logit_clip, logit_clip] before exp, then r to [r_min, r_max]
    (FastGen's defaults: 10, 0.1, 20).
    """
    return logits.detach().float().clamp(-logit_clip, logit_clip).exp().clamp(r_min, r_max)


class RatioNormalizer(nn.Module):
    """First-stage normalization (Sec. 4; Alg. 1 line 7): r <- r / mean(r) within noise-level bins.

    Uses E_{q_t}[r_t] = 1 at every t. Bins (``binning``):
      - ``"equal_mass"`` (default): edges at quantiles of log sigma under the training sigma
        distribution, so every bin receives the same expected number of samples;
      - ``"linear"``: equal-width bins linear in sigma over ``sigma_range`` (the schedule's, default the
        support's), as NVlabs/FastGen does (most samples land in the first bin because the Karras grid is
        dense at small sigma).

    In training mode, ``forward`` divides by ema * bin_mean + (1 - ema) * (this group's bin means), the
    group being the samples of one call across all ranks (bins the group misses use bin_mean alone),
    and keeps the group's sums for ``commit``, which the trainer calls once per optimizer step:
    bin_mean <- ema * bin_mean + (1 - ema) * (the step's bin means). With ``ema`` = 0 (FastGen's default)
    r is normalized by its own group alone; FastGen uses 0.5 on ImageNet-64. In eval mode ``forward``
    divides by the stored ``bin_mean`` and records nothing. ``bin_mean`` is checkpointed.
    """

    def __init__(
        self, sigma_support: Tensor, num_bins: int = 10, binning: str = "equal_mass", ema: float = 0.0,
        sigma_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ratio EMA rate must lie in [0, 1), got {ema}")
        log_s = sigma_support.double().log().sort().values
        if binning == "equal_mass":
            # Each support point is equally likely; cut the sorted list into num_bins equal runs.
            cuts = [round(i * len(log_s) / num_bins) for i in range(1, num_bins)]
            inner = torch.stack([(log_s[c - 1] + log_s[c]) / 2 for c in cuts]) if cuts else log_s[:0]
        elif binning == "linear":  # over the schedule's whole range (FastGen: [min_t, max_t]), not just the support
            lo, hi = sigma_range if sigma_range is not None else (float(log_s[0].exp()), float(log_s[-1].exp()))
            inner = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)[1:-1].log()
        else:
            raise ValueError(f"unknown ratio binning {binning!r}; expected 'equal_mass' or 'linear'")
        self.ema = ema
        self.register_buffer("log_edges", inner.float())
        self.register_buffer("bin_mean", torch.ones(num_bins))
        self.register_buffer("step_stats", torch.zeros(2, num_bins), persistent=False)  # sums, counts

    def bin_index(self, sigma: Tensor) -> Tensor:
        return torch.bucketize(sigma.float().log(), self.log_edges)

    def forward(self, r: Tensor, sigma: Tensor) -> Tensor:
        idx = self.bin_index(sigma)
        if not self.training:
            return r / self.bin_mean[idx]
        n = len(self.bin_mean)
        sums = torch.zeros(n, device=r.device).index_add_(0, idx, r.float())
        counts = torch.zeros(n, device=r.device).index_add_(0, idx, torch.ones_like(r, dtype=torch.float32))
        stats = all_reduce_sum(torch.stack([sums, counts]))
        self.step_stats += stats
        mean = torch.where(stats[1] > 0, self.ema * self.bin_mean + (1 - self.ema) * stats[0] / stats[1].clamp_min(1),
                           self.bin_mean)
        return r / mean[idx]

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the statistics gathered since the last commit (one optimizer step) into ``bin_mean``."""
        sums, counts = self.step_stats
        step_mean = sums / counts.clamp_min(1)
        self.bin_mean.copy_(torch.where(counts > 0, self.ema * self.bin_mean + (1 - self.ema) * step_mean,
                                        self.bin_mean))
        self.step_stats.zero_()


def normalize_by_batch_mean(h: Tensor) -> Tensor:
    """Second-stage normalization (Sec. 4; Alg. 1 line 9): h_bar = h / mean(h) over the group of samples
    given, across all ranks."""
    stats = all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]))
    return h / (stats[0] / stats[1])


class Weights(NamedTuple):
    r: Tensor  # clipped density ratio (line 6)
    r_bar: Tensor  # after the first-stage normalization (line 7)
    h: Tensor  # h(r_bar) (line 8)
    h_bar: Tensor  # after the second-stage normalization (line 9)


@torch.no_grad()
def fdistill_weights(logits: Tensor, sigma: Tensor, h: Callable[[Tensor], Tensor], ratio_norm: RatioNormalizer,
                     logit_clip: float = 10.0, r_min: float = 0.1, r_max: float = 20.0) -> Weights:
    """Alg. 1 lines 6-9, the per-sample weight h_bar of Eq. (4) from the discriminator's logits:
    r = clip(exp(logit), r_min, r_max) (line 6), r_bar = r / mean r in r's noise-level bin (line 7, Sec. 4),
    h(r_bar) with h = f'' r^2 (line 8, Theorem 1), h_bar = h / mean h (line 9).

    The means run over the samples given, across all ranks: the trainer calls this once per forward
    pass, so without gradient accumulation they span the global batch (Alg. 1's B), and with
    ``micro_batch`` each accumulation pass (world size x micro_batch samples) is normalized on its own,
    as NVlabs/FastGen normalizes each forward pass.
    """
    r = density_ratio(logits, logit_clip, r_min, r_max)
    r_bar = ratio_norm(r, sigma)
    h_r = h(r_bar)
    return Weights(r, r_bar, h_r, normalize_by_batch_mean(h_r))


def fdistill_loss(
    x: Tensor, x0_teacher: Tensor, x0_fake: Tensor, h: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Eq. (4) in x0 form, returning (loss, per-sample weight w).

    Theorem 1 / Eq. (3) gives grad_theta D_f = -E[h(r) (s_p - s_q) dG/dtheta]; with scores from
    denoisers, s_p - s_q = (D_teacher - D_fake) / sigma^2, and the 1/sigma^2 is absorbed by DMD's
    per-sample weight w = 1 / mean_dims |x - D_teacher(x_t)| (x the clean generated sample). So the
    descent direction on x is g = w h (D_fake - D_teacher), and 0.5 ||x - sg(x - g)||^2 has exactly
    gradient g dx/dtheta. (Eq. (4) as printed omits Eq. (3)'s leading minus; we follow Eq. (3).)
    Since x_t = x + sigma eps, d x_t / d theta = d x / d theta, so the clean x carries the gradient.
    """
    with torch.no_grad():
        w = 1.0 / ((x.float() - x0_teacher.float()).abs().flatten(1).mean(1) + eps)
        g = append_dims(w * h.float(), x.ndim) * (x0_fake.float() - x0_teacher.float())
        target = (x.float() - g).to(x.dtype)
    return 0.5 * F.mse_loss(x, target), w


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss -log D(G(z) + sigma eps) = softplus(-logit) (Alg. 1 line 11)."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss of Sec. 3, -[log D(x_real,t) + log(1 - D(x_fake,t))], with D = sigmoid(logit)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def r1_penalty(logits_real: Tensor, x_real_t: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x logit(x_real,t)||^2; the loss adds gamma/2 times this."""
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real_t, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def approx_r1_penalty(logits_real: Tensor, logits_near: Tensor, alpha: float) -> Tensor:
    """R1 without a double backward: E (D(x + alpha n) - D(x))^2 / alpha^2, n ~ N(0, I). To first order
    D(x + alpha n) - D(x) = alpha grad_x D . n, whose square has mean alpha^2 ||grad_x D||^2, so this estimates
    ``r1_penalty`` and the same gamma/2 weights it (APT's approximate R1, as NVlabs/FastGen's
    ``gan_r1_reg_alpha``, which leaves out the 1/alpha^2)."""
    return (logits_near - logits_real).square().mean() / alpha**2


def ratio_stats(w: Weights, score_diff: Tensor) -> dict[str, Tensor]:
    """Per-step log values (0-d tensors, so nothing waits for the device): statistics of r and h_bar and
    the mean norm of the score difference s_teacher - s_fake."""
    r, h = w.r, w.h_bar
    return {
        "r_mean": r.mean(), "r_min": r.min(), "r_max": r.max(),
        "log_r_std": r.log().std() if r.numel() > 1 else r.new_zeros(()),
        "h_min": h.min(), "h_mean": h.mean(), "h_max": h.max(),
        "score_diff": score_diff.flatten(1).norm(dim=1).mean(),
    }
