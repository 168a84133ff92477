"""What a denoiser is conditioned on besides x and sigma: one-hot class labels (a plain tensor) or text
embeddings (``TextCondition``), sliced and moved like one tensor so the trainer treats both alike; and the
settings of text-to-image runs (``TextConfig``, the ``text:`` section of a config), here so that a
class-conditional run reads them without importing the text-to-image code."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Text conditioning of a latent text-to-image network, batch first; only ``embeds`` is always there.

    ``embeds``: the text encoder's token embeddings (B, L, D): CLIP-L's last hidden state for Stable
    Diffusion v1.5 (L = 77, D = 768); for SDXL the penultimate hidden states of both encoders concatenated
    (D = 768 + 1280). ``pooled``: a vector per prompt (SDXL: the second encoder's projected embedding (B, 1280);
    SD3 and FLUX.1 have one too). ``time_ids`` (B, 6): SDXL's original size, crop corner and target size.
    ``mask`` (B, L): 1 at the prompt's tokens, 0 at padding, for encoders whose states are masked (Gemma-2 in
    SANA, Qwen2.5-VL in Qwen-Image, umT5 in Wan); absent where the pipeline passes none.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    mask: Tensor | None = None

    def _map(self, fn) -> TextCondition:
        return TextCondition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def __getitem__(self, index) -> TextCondition:
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return len(self.embeds)

    def to(self, *args, **kwargs) -> TextCondition:
        """Moved (and floating tensors cast) as ``Tensor.to``; the mask keeps its integer dtype."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        return self._map(lambda t: t.to(*args, **kwargs) if t.is_floating_point() else
                         t if device is None else t.to(device))

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
    """Text-to-image settings, used when the teacher is a text-to-image pipeline folder (a family's own settings
    are its ``teacher_options``)."""

    prompts: str | None = None  # a prompts file (one per line) for the generator; None: the data's captions
    resolution: int | None = None  # image size in pixels; None: the teacher's (512 for SD1.5, 1024 for SDXL)
    on_bad_data: str = "skip"  # a corrupt image or missing caption: "skip" (with a warning) or "error"
    gradient_checkpointing: bool = False  # recompute every pass's activations in backward (the teacher's too)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) on generator and fake score, not all weights
    decode_threads: int = 0  # threads decoding each minibatch's images (0: in the training thread)
    # with lora_rank: generator and fake score are two LoRA adapters on one frozen base that is also the teacher
    # (one copy of the weights instead of three; fdistill.networks.shared_base)
    shared_base: bool = False

    def __post_init__(self) -> None:
        if self.on_bad_data not in ("skip", "error"):
            raise ValueError(f"on_bad_data must be 'skip' or 'error', got {self.on_bad_data!r}")
        if not isinstance(self.shared_base, bool):
            raise ValueError(f"text.shared_base must be true or false, got {self.shared_base!r:.40}")
        if self.shared_base and not self.lora_rank:
            raise ValueError("text.shared_base needs text.lora_rank > 0: the generator and fake score are LoRA "
                             "adapters on the teacher's weights")
