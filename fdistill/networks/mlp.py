"""A small EDM-preconditioned MLP denoiser for low-dimensional data (the 2-D lab)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fdistill.core.diffusion import edm_preconditioning
from fdistill.core.protocols import DenoiserDefaults
from fdistill.networks.edm import FourierEmbedding


class MLPDenoiser(DenoiserDefaults, nn.Module):
    """D(x; sigma) = c_skip x + c_out F([c_in x, emb(c_noise), label]) with EDM's Table 1 coefficients.

    ``return_features=True`` also returns ``{0: last hidden activation}``, the feature the
    discriminator head reads (the 2-D analogue of a UNet's encoder output, App. B).
    """

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 3, emb_dim: int = 32,
        label_dim: int = 0, sigma_data: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim, self.hidden, self.label_dim, self.sigma_data = dim, hidden, label_dim, sigma_data
        self.emb = FourierEmbedding(emb_dim, scale=4.0)
        layers: list[nn.Module] = []
        width = dim + emb_dim + label_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)

    def feature_channels(self) -> dict[int, int]:
        return {0: self.hidden}

    def features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> dict[int, Tensor]:
        return self.forward(x, sigma, cond, return_features=True)[1]

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, return_features: bool = False):
        sigma = sigma.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        inputs = [c_in * x, self.emb(c_noise[:, 0])]
        if self.label_dim:
            inputs.append(cond.to(x.dtype))
        feat = self.body(torch.cat(inputs, dim=1))
        d = c_skip * x + c_out * self.out(feat)
        return (d, {0: feat}) if return_features else d
