"""One object per teacher, whatever its family: what ``teachers.open.open_teacher(path)`` returns and what
everything downstream (the distiller, sampling, export, evaluation) dispatches on, once.

A family is one module in ``fdistill/teachers/families/`` holding a ``Teacher`` subclass decorated with
``@register``: its name (``kind``, recorded as a checkpoint's ``info["family"]``), how it recognises a path
(``recognises``), how to open it (``open``) and how a checkpoint's record rebuilds it (``from_info``), its options
(``Options``: a dataclass, set by the config's ``teacher_options:``), which real data it trains on (``open_data``),
how its students are prepared (``prepare_students``), reloaded (``load_student``) and exported (``export``).
``teachers.open`` imports every module of that folder and asks the registered families in turn.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fdistill.core.protocols import Denoiser, RealData
from fdistill.teachers.guidance import GuidedDenoiser


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

    kind: ClassVar[str] = "teacher"  # the family's name: a checkpoint's info["family"]
    Options: ClassVar[type | None] = None  # the family's options (a dataclass), from ``teacher_options:``
    order: ClassVar[int] = 50  # families are asked in this order whether they recognise a path (catch-alls last)
    preset: ClassVar[str | None] = None  # the family's config preset (fdistill/configs/<preset>.yaml), named in errors
    video_fps: ClassVar[int | None] = None  # a text-to-video family's frame rate: its samples decode to clips

    @classmethod
    def recognises(cls, path: str | Path) -> bool:
        """Whether ``path`` holds a teacher of this family (read cheaply: a file name, a JSON field)."""
        return False

    @classmethod
    def open(cls, path: str | Path, resolution: int | None = None, options: dict | None = None) -> Teacher:
        """The teacher at ``path`` (at ``resolution`` pixels where the family can change it), with ``options``."""
        raise NotImplementedError

    @classmethod
    def from_info(cls, info: dict, where: str = "the checkpoint") -> Teacher:
        """The teacher a checkpoint's ``info`` records (``where`` names the checkpoint in errors)."""
        raise NotImplementedError

    @classmethod
    def parse_options(cls, options: dict | None) -> Any:
        """``options`` (the config's ``teacher_options:``, a mapping) as this family's ``Options``, checked in one
        place; a key the family does not know is refused naming the ones it does."""
        options = dict(options or {})
        if cls.Options is None:
            if options:
                raise ValueError(f"teacher_options {sorted(options)} given, but a {cls.kind} teacher takes none")
            return None
        known = [f.name for f in fields(cls.Options)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"teacher_options.{unknown[0]} is not an option of a {cls.kind} teacher; expected one "
                             f"of: {', '.join(known)}")
        return cls.Options(**options)

    @property
    def text_to_image(self) -> bool:
        return self.text is not None

    @property
    def video(self) -> bool:
        """Whether samples decode to clips [3, F, H, W] (at ``video_fps``) rather than images [C, H, W]."""
        return self.video_fps is not None

    def condition(self, items: list, device: str | torch.device = "cpu"):
        """The condition of samples ``items``: class indices (one-hot labels; None when unconditional) or prompts."""
        if self.text is not None:
            return self.text(list(items))
        return one_hot(list(items), self.label_dim, device)

    def guided(self, net: nn.Module, scale: float) -> nn.Module:
        """``net`` (this teacher's denoiser) guided at ``scale``: classifier-free guidance in x0 space (App. D.5),
        what the distiller and the multi-step sampler call."""
        return GuidedDenoiser(net, scale)

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

    def export(self, generator: nn.Module, out, student=None) -> str:
        """Write the ``generator`` run as ``student`` (``core.few_step.StudentSteps``, or one sigma_gen; default one
        step at its sigma_max) as another library's model folder; returns the line to print."""
        raise ValueError(f"{self.source} is a {self.kind} teacher: --diffusers exports the students of text-to-image "
                         "pipelines only")

    def shared_students(self, cfg) -> tuple[nn.Module, list[nn.Module]]:
        """``text.shared_base``: (the teacher's network, [generator, fake score]) sharing one copy of weights."""
        raise ValueError(f"text.shared_base needs a text-to-image pipeline teacher (LoRA on its diffusers network), "
                         f"not {self.source} (a {self.kind} teacher)")

    def student_info(self, cfg) -> dict:
        """What a checkpoint records about the students beyond ``info`` (e.g. their LoRA rank)."""
        return {}

    def distill_settings(self, distill):
        """(the DistillConfig a run of this teacher trains with, the student's first input: ``Distiller(
        first_input=)``): ``distill`` as given, from pure noise. A family may fix levels (Wan2.2-A14B's experts)."""
        return distill, "noise"

    def student_network(self) -> nn.Module:
        """A network of the generator's architecture (weights to be loaded)."""
        return copy.deepcopy(self.denoiser)

    def load_student(self, weights: dict[str, Tensor], info: dict) -> nn.Module:
        """The generator of a checkpoint, from its weights (``info``: the checkpoint's record)."""
        net = self.student_network()
        net.load_state_dict(weights)
        return net


FAMILIES: dict[str, type[Teacher]] = {}  # kind -> family, filled by @register as teachers.open imports the modules


def register(cls: type[Teacher]) -> type[Teacher]:
    """Class decorator: make ``cls`` a teacher family (``teachers.open`` asks it about paths and records)."""
    if cls.kind in FAMILIES and FAMILIES[cls.kind] is not cls:
        raise ValueError(f"two teacher families are named {cls.kind!r}: {FAMILIES[cls.kind].__module__} and "
                         f"{cls.__module__}")
    FAMILIES[cls.kind] = cls
    return cls
