"""Feature taps: the bookkeeping of which intermediate activations a denoiser hands the discriminator
heads (App. B), shared by the EDM UNets and the diffusers adapters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class FeatureTaps(nn.Module):
    """Encoder feature taps: which encoder resolutions a denoiser returns features at (App. B).

    Subclasses fill ``self._taps`` ({resolution: where the tap is; for EDM's UNets the name of the last
    ``enc`` module that writes the main path at that resolution, i.e. ``f'{r}x{r}_block{num_blocks-1}'``})
    and ``self._tap_channels`` ({resolution: channels}), then call ``_init_taps()``.
    """

    _taps: dict[int, object]
    _tap_channels: dict[int, int]
    _feature_resolutions: list[int]

    def _init_taps(self) -> None:
        self._feature_resolutions = list(self._taps)

    @property
    def encoder_resolutions(self) -> list[int]:
        """All encoder resolutions, highest first."""
        return list(self._taps)

    @property
    def feature_resolutions(self) -> list[int]:
        """Resolutions whose features ``forward(..., return_features=True)`` returns."""
        return list(self._feature_resolutions)

    @feature_resolutions.setter
    def feature_resolutions(self, resolutions: Sequence[int]) -> None:
        resolutions = [int(r) for r in resolutions]
        bad = [r for r in resolutions if r not in self._taps]
        if bad:
            raise ValueError(f"feature_resolutions {bad} are not encoder resolutions of this network "
                             f"(available: {self.encoder_resolutions})")
        self._feature_resolutions = list(dict.fromkeys(resolutions))

    def feature_channels(self) -> dict[int, int]:
        """{resolution: channels} of the features returned for ``feature_resolutions``."""
        return {r: self._tap_channels[r] for r in self._feature_resolutions}

    def _wanted_taps(self, return_features: bool) -> dict[str, int]:
        return {self._taps[r]: r for r in self._feature_resolutions} if return_features else {}


TAP_ROLES = {"mid": "the lowest encoder resolution: the UNet's bottleneck (its mid block in diffusers' UNets)"}


def resolve_taps(requested: Sequence[int | str], encoder_resolutions: Sequence[int], teacher: str = "the teacher"
                 ) -> list[int]:
    """Discriminator taps as resolutions: numbers are kept, a role (``mid``: the lowest encoder resolution)
    is resolved against this teacher, so one preset serves the same architecture at any image size."""
    available = list(encoder_resolutions)
    out = []
    for r in requested:
        if isinstance(r, str):
            if r not in TAP_ROLES:
                raise ValueError(f"disc_resolutions: unknown tap {r!r}; expected resolutions of {teacher} "
                                 f"({available}) or one of: {', '.join(TAP_ROLES)}")
            r = min(available)
        if r not in available:
            raise ValueError(f"disc_resolutions [{r}] are not encoder resolutions of {teacher} ({available}; "
                             "'mid' names the lowest)")
        out.append(int(r))
    return list(dict.fromkeys(out))
