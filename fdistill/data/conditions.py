"""What a denoiser is conditioned on besides x and sigma: one-hot class labels (a plain tensor) or text
embeddings (``TextCondition``), sliced and moved like one tensor so the trainer treats both alike; and the
settings of text-to-image runs (``TextConfig``, the ``text:`` section of a config), here so that a
class-conditional run reads them without importing the text-to-image code."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Text conditioning of a latent text-to-image UNet, batch first.

    ``embeds``: the text encoder's token embeddings (B, 77, D): CLIP-L's last hidden state for Stable
    Diffusion v1.5 (D = 768); for SDXL the penultimate hidden states of both encoders concatenated
    (D = 768 + 1280). SDXL also takes ``pooled``, the second encoder's projected embedding (B, 1280), and
    ``time_ids`` (B, 6): original size, crop corner and target size.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def _map(self, fn) -> TextCondition:
        return TextCondition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def __getitem__(self, index) -> TextCondition:
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return len(self.embeds)

    def to(self, *args, **kwargs) -> TextCondition:
        return self._map(lambda t: t.to(*args, **kwargs))

    def tensors(self) -> dict[str, Tensor]:
        """The tensors by name (for latent shards and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def cat(cls, parts: list[TextCondition]) -> TextCondition:
        first = parts[0]
        return cls(**{f.name: None if getattr(first, f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})


@dataclass
class TextConfig:
    """Text-to-image settings, used when the teacher is a Stable Diffusion (XL), SD3 or FLUX.1 folder."""

    prompts: str | None = None  # a prompts file (one per line) for the generator; None: the data's captions
    resolution: int | None = None  # image size in pixels; None: the teacher's (512 for SD1.5, 1024 for SDXL)
    on_bad_data: str = "skip"  # a corrupt image or missing caption: "skip" (with a warning) or "error"
    gradient_checkpointing: bool = False  # recompute the generator's and fake score's activations in backward
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) on generator and fake score, not all weights
    decode_threads: int = 0  # threads decoding each minibatch's images (0: in the training thread)
    # with lora_rank: generator and fake score are two LoRA adapters on one frozen base that is also the teacher
    # (one copy of the weights instead of three; fdistill.networks.shared_base)
    shared_base: bool = False
    # flow-matching teachers (SD3, FLUX.1) only:
    max_sequence_length: int | None = None  # T5 tokens; None: the pipeline's (SD3 256, FLUX 512)
    flux_guidance: float = 3.5  # FLUX.1-dev's embedded guidance of teacher, generator, fake score (not schnell)
    tap_block: int | None = None  # the transformer block the discriminator reads; None: the middle one

    def __post_init__(self) -> None:
        if self.on_bad_data not in ("skip", "error"):
            raise ValueError(f"on_bad_data must be 'skip' or 'error', got {self.on_bad_data!r}")
        msl = self.max_sequence_length
        if msl is not None and not (isinstance(msl, int) and not isinstance(msl, bool) and 1 <= msl <= 512):
            raise ValueError(f"text.max_sequence_length must be null or an integer in [1, 512] (T5 tokens), "
                             f"got {msl!r:.40}")
        g = self.flux_guidance
        if not (isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g > 0):
            raise ValueError(f"text.flux_guidance must be a positive number (FLUX.1-dev's embedded guidance, "
                             f"3.5 by default), got {g!r:.40}")
        if not isinstance(self.shared_base, bool):
            raise ValueError(f"text.shared_base must be true or false, got {self.shared_base!r:.40}")
        if self.shared_base and not self.lora_rank:
            raise ValueError("text.shared_base needs text.lora_rank > 0: the generator and fake score are LoRA "
                             "adapters on the teacher's weights")
        if self.shared_base and self.gradient_checkpointing:
            raise ValueError("text.shared_base cannot be combined with text.gradient_checkpointing: a pass recomputed "
                             "in backward would run with another role's adapter switched on")
        tap = self.tap_block
        if tap is not None and not (isinstance(tap, int) and not isinstance(tap, bool) and tap >= 0):
            raise ValueError(f"text.tap_block must be null (the middle block) or a block index >= 0, got {tap!r:.40}")
