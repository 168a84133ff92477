"""The analytic teacher of the 2-D lab: a Gaussian mixture whose denoiser, score and density are exact
at every noise level, so the lab can compare estimated quantities with the truth."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fdistill.core.protocols import DenoiserDefaults


class GaussianMixture(DenoiserDefaults, nn.Module):
    """p_0 = sum_k w_k N(mu_k, s_k^2 I); at noise sigma, p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)."""

    def __init__(self, means: Sequence[Sequence[float]], stds: Sequence[float], weights: Sequence[float]) -> None:
        super().__init__()
        means_t = torch.as_tensor(means, dtype=torch.float32)
        stds_t = torch.as_tensor(stds, dtype=torch.float32)
        weights_t = torch.as_tensor(weights, dtype=torch.float32)
        k = means_t.shape[0]
        if means_t.ndim != 2 or stds_t.shape != (k,) or weights_t.shape != (k,):
            raise ValueError(
                f"mixture needs means (K, dim), stds (K,) and weights (K,); got {tuple(means_t.shape)}, "
                f"{tuple(stds_t.shape)}, {tuple(weights_t.shape)}"
            )
        if (stds_t <= 0).any() or (weights_t <= 0).any():
            raise ValueError("mixture stds and weights must be positive")
        self.register_buffer("means", means_t)
        self.register_buffer("stds", stds_t)
        self.register_buffer("weights", weights_t / weights_t.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def data_std(self) -> float:
        """Standard deviation of p_0 per coordinate, averaged over coordinates (a natural sigma_data)."""
        w = self.weights[:, None]
        mean = (w * self.means).sum(0)
        var = (w * ((self.means - mean) ** 2 + self.stds[:, None] ** 2)).sum(0)
        return float(var.mean().sqrt())

    def sample(self, n: int, return_modes: bool = False, generator: torch.Generator | None = None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=self.means.device)
        x = self.means[k] + self.stds[k, None] * noise
        return (x, k) if return_modes else x

    def _component_log_probs(self, x: Tensor, sigma: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        """log(w_k N(x; mu_k, v_k I)) of shape (B, K), and v_k = s_k^2 + sigma^2 of shape (B, K)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        var = self.stds[None, :] ** 2 + sigma**2
        sq = (x[:, None, :] - self.means[None]).square().sum(-1)  # not cdist: its gradient is NaN at 0
        logp = self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * (2 * math.pi * var).log()
        return logp, var

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_sigma(x), exact."""
        return self._component_log_probs(x, sigma)[0].logsumexp(1)

    def feature_channels(self) -> dict[int, int]:
        return {0: 2 * self.dim + 1 + self.num_modes}

    def features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> dict[int, Tensor]:
        return self.forward(x, sigma, cond, return_features=True)[1]

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, return_features: bool = False):
        """Exact denoiser E[x0 | x_sigma] = sum_k gamma_k (mu_k + s_k^2 / v_k (x - mu_k)).

        Features for a discriminator head: [c_in x, ln(sigma)/4, D(x)/sigma_data, gamma] (EDM scalings).
        """
        logp, var = self._component_log_probs(x, sigma)
        gamma = logp.softmax(1)
        shrink = (self.stds[None, :] ** 2 / var)[:, :, None]  # (B, K, 1)
        post_means = self.means[None] + shrink * (x[:, None, :] - self.means[None])
        d = (gamma[:, :, None] * post_means).sum(1)
        if not return_features:
            return d
        sd = self.data_std()
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        feat = torch.cat([x / (s**2 + sd**2).sqrt(), s.log() / 4, d / sd, gamma], dim=1)
        return d, {0: feat}
