"""One object per teacher, whatever its family: what ``teachers.open.open_teacher(path)`` returns and what
everything downstream (the distiller, sampling, export, evaluation) dispatches on, once.

A family is one adapter module holding a ``Teacher`` subclass: how to open its files (``open``), how a
checkpoint's record rebuilds it (``from_info``), which real data it trains on (``open_data``), how its students
are prepared (``prepare_students``), reloaded (``load_student``) and exported (``export``). The families:
``teachers.image_teacher`` (EDM-style image networks: fdistill's own teachers, NVlabs/edm .pkl snapshots,
diffusers pixel UNets), ``teachers.stable_diffusion`` (Stable Diffusion v1.5 / SDXL pipelines, latent and
text-conditional UNets on the VP schedule) and ``teachers.flow_matching`` (SD3 / SD3.5 and FLUX.1 dev / schnell
pipelines: rectified-flow transformers, D = x_t - t v). ``teachers.open`` picks the family.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fdistill.core.protocols import Denoiser, RealData


def one_hot(classes: list[int], label_dim: int, device: str | torch.device = "cpu") -> Tensor | None:
    """The one-hot labels of ``classes`` (None for an unconditional model, label_dim 0)."""
    if not label_dim:
        return None
    bad = [c for c in classes if not (isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                      and 0 <= c < label_dim)]
    if bad:  # a negative index would silently pick a class from the end
        raise ValueError(f"class labels must be integers in [0, {label_dim - 1}] (the model's {label_dim} classes), "
                         f"got {bad[0]!r:.40}")
    return torch.eye(label_dim, device=device)[list(classes)]


@dataclass(eq=False)
class Teacher:
    """A loaded teacher: its denoiser D(x, sigma, cond) (``core.protocols.Denoiser``), the shape of one sample
    (pixels, or latents for a latent teacher), its classes (``label_dim``) or its text encoder (``text``: prompts
    -> condition), its codec (``codec``: a VAE with encode/decode, or None for pixel teachers), the noise range
    its sampler runs over, and ``info``: the JSON-able record a checkpoint keeps to rebuild it (``from_info``)."""

    denoiser: Denoiser
    sample_shape: tuple[int, ...]
    info: dict
    source: str
    label_dim: int = 0
    text: nn.Module | None = None
    codec: nn.Module | None = None
    sigma_range: tuple[float, float] = (0.002, 80.0)  # EDM's sampler (Karras et al. 2022)
    extra: dict[str, Any] = field(default_factory=dict)

    kind = "teacher"  # the family's name (class attribute)

    @property
    def text_to_image(self) -> bool:
        return self.text is not None

    def condition(self, items: list, device: str | torch.device = "cpu"):
        """The condition of samples ``items``: class indices (one-hot labels; None when unconditional) or prompts."""
        if self.text is not None:
            return self.text(list(items))
        return one_hot(list(items), self.label_dim, device)

    def decode(self, x: Tensor) -> Tensor:
        """Samples as images in [-1, 1]: the codec's decoding for a latent teacher, else x itself."""
        return (self.codec.decode(x) if self.codec is not None else x).clamp(-1, 1)

    def to(self, device: str | torch.device) -> Teacher:
        for m in (self.denoiser, self.text, self.codec):
            if m is not None:
                m.to(device)
        return self

    # -- what each family provides ---------------------------------------------------------------------
    def open_data(self, cfg, device: torch.device, dataset=None) -> RealData:
        """The real data of ``cfg.data`` (and the generator's conditions), checked against this teacher."""
        raise NotImplementedError

    def prepare_students(self, students: list[nn.Module], cfg) -> None:
        """Make the deep copies of the denoiser (generator, fake score) trainable as ``cfg`` says."""

    def export(self, generator: nn.Module, out, sigma_gen: float | None = None) -> str:
        """Write the one-step ``generator`` (evaluated at ``sigma_gen``, default its sigma_max) as another
        library's model folder; returns the line to print."""
        raise ValueError(f"{self.source} is not a text-to-image run: --diffusers exports Stable Diffusion, SD3 and "
                         "FLUX.1 students")

    def shared_students(self, cfg) -> tuple[nn.Module, list[nn.Module]]:
        """``text.shared_base``: (the teacher's network, [generator, fake score]) sharing one copy of weights."""
        raise ValueError(f"text.shared_base needs a Stable Diffusion, SD3 or FLUX.1 teacher (LoRA on its diffusers "
                         f"network), not {self.source}")

    def student_info(self, cfg) -> dict:
        """What a checkpoint records about the students beyond ``info`` (e.g. their LoRA rank)."""
        return {}

    def student_network(self) -> nn.Module:
        """A network of the generator's architecture (weights to be loaded)."""
        return copy.deepcopy(self.denoiser)

    def load_student(self, weights: dict[str, Tensor], info: dict) -> nn.Module:
        """The generator of a checkpoint, from its weights (``info``: the checkpoint's record)."""
        net = self.student_network()
        net.load_state_dict(weights)
        return net
