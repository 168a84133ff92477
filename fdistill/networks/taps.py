"""Feature taps: the bookkeeping of which intermediate activations a denoiser hands the discriminator
heads (App. B), shared by the EDM UNets and the diffusers adapters; and the one mechanism that reads them from a
wrapped network's blocks (``HookedTaps``: forward hooks, an early stop, attention with a double backward for R1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fdistill.networks.attention import twice_differentiable


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


class StopForward(Exception):
    """Raised by a feature hook once every wanted feature is captured (``features()`` skips the rest)."""


class HookedTaps(FeatureTaps):
    """Taps on named blocks of a wrapped network (a diffusers UNet or transformer), captured by transient forward
    hooks, so the module stays deep-copyable and new library versions keep working. A subclass says which block
    each tap is (``_taps``: {key: block name}) and what a block's output hands the heads (``_tap_output``)."""

    def _tap_output(self, name: str, module: nn.Module, output) -> Tensor:
        """The feature of block ``name``: its output (the first element of a tuple)."""
        return output[0] if isinstance(output, tuple) else output

    def _run_tapped(self, root: nn.Module, call: Callable[[], Tensor], x: Tensor, return_features: bool | str
                    ) -> tuple[Tensor | None, dict]:
        """``(call(), features)`` with the wanted taps of ``root``'s blocks captured as float32; with
        ``return_features="only"``: ``(None, features)``, the network stopped after its last wanted block. When
        features are taken for exact R1 (``networks.attention.double_backward``), attention runs on PyTorch's math
        kernel, the one with a double backward."""
        features: dict = {}
        wanted = self._wanted_taps(bool(return_features))
        if return_features == "only" and not wanted:
            return None, features

        def tap(name: str):
            def hook(module: nn.Module, args, output) -> None:
                features[wanted[name]] = self._tap_output(name, module, output).to(torch.float32)
                if return_features == "only" and len(features) == len(wanted):
                    raise StopForward
            return hook

        handles = [root.get_submodule(name).register_forward_hook(tap(name)) for name in wanted]
        try:
            with twice_differentiable(x) if wanted else contextlib.nullcontext():
                out = call()
        except StopForward:
            out = None
        finally:
            for h in handles:
                h.remove()
        return (None if return_features == "only" else out), features


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
