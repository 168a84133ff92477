"""The two contracts Algorithm 1 is written against: a ``Denoiser`` (every network: teacher, fake score,
generator, whatever the family) and ``RealData`` (every source of real samples and conditions). The trainer, the
distributed code, checkpoints and the noise schedule call these methods and nothing else, so a new teacher family
or data source only has to provide them; they are the whole contract, written here once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Denoiser(Protocol):
    """D(x, sigma, cond) -> x0_hat in EDM's convention (score = (D - x) / sigma^2, Sec. 2.1).

    What the rest of fdistill reads of a denoiser:

    * the denoiser itself: ``__call__`` (with the discriminator's features when asked), ``features``,
      ``prior_std`` (the one-step generator's input scale), ``null_condition`` (CFG), ``sigma_data``;
    * its noise range, ``sigma_min`` and ``sigma_max`` (the multi-step sampler's), and its own noise levels for
      distillation, ``default_sigmas()`` (used unless the config names a schedule: ``SigmaSampler.resolve``);
    * its taps (App. B): ``encoder_resolutions`` (where features can be read, keyed by the feature map's
      resolution), ``feature_resolutions`` (settable: the ones returned), ``feature_channels()``
      (``networks.taps.FeatureTaps``);
    * ``blocks()``: the units FSDP shards (``training.distributed.shard``);
    * ``img_resolution``, ``img_channels``, ``label_dim``: the shape of a sample and the number of classes.
    """

    sigma_data: float  # the data std the denoising loss weighting assumes (EDM's sigma_data)
    sigma_min: float
    sigma_max: float
    img_resolution: int
    img_channels: int
    label_dim: int

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None, return_features: bool = False
                 ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """x0_hat; with ``return_features`` also the discriminator's features {tap: (B, C, r, r)}."""

    def features(self, x: Tensor, sigma: Tensor, cond: Any = None) -> dict[int, Tensor]:
        """The discriminator's features alone (App. B): a network may stop after its last tap."""

    def prior_std(self, sigma: float) -> float:
        """The std of the one-step generator's input at ``sigma``: G(z) = D(prior_std(sigma) z; sigma)."""

    def null_condition(self, cond: Any) -> Any:
        """The unconditional condition of ``cond`` (classifier-free guidance, label dropout)."""

    def default_sigmas(self) -> dict:
        """The teacher's own distillation noise levels, as ``core.diffusion.SigmaSampler`` fields."""

    @property
    def encoder_resolutions(self) -> list[int]:
        """Every tap, highest resolution first."""

    feature_resolutions: Sequence[int]  # the taps returned with the features (settable)

    def feature_channels(self) -> dict[int, int]:
        """{tap: channels} of the features returned."""

    def blocks(self) -> list[nn.Module]:
        """The units FSDP shards (a UNet's down/mid/up blocks, a transformer's blocks)."""


@runtime_checkable
class RealData(Protocol):
    """Alg. 1 line 3's real samples and the generator's conditions. Every rank draws the same n from its own
    seeded stream and returns only the samples at positions ``part`` (a slice of the global batch)."""

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, Any]:
        """(x, cond) of n real samples, those at ``part``."""

    def sample_cond(self, n: int, part: slice = slice(None)) -> Any:
        """The conditions of n generated samples (labels, a TextCondition, or None), those at ``part``."""

    def state_dict(self) -> dict:
        """The random stream's state, checkpointed for an exact resume."""

    def load_state_dict(self, state: dict) -> None: ...


class DenoiserDefaults:
    """What most denoisers share, mixed into their classes: EDM's sigma_data = 0.5, a generator input of
    std sigma (EDM's sigma_max z), and the all-zero label as the null condition (what label dropout trains)."""

    sigma_data: float = 0.5

    def prior_std(self, sigma: float) -> float:
        return sigma

    def null_condition(self, cond: Tensor | None) -> Tensor | None:
        return None if cond is None else torch.zeros_like(cond)

    def default_sigmas(self) -> dict:
        """EDM's Karras levels (``SigmaSampler``'s defaults)."""
        return {}
