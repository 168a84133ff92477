"""Random minibatches of real data for Alg. 1 (line 3: x ~ p_data) and of the generator's conditions: class
labels (``ImageSampler``), prompts (``PromptSampler``) and captioned images (``CaptionSampler``), each with its
own seeded torch.Generator so that a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.data.captions import CaptionDataset, open_captions
from fdistill.data.datasets import ImageDataset, to_float


class ImageSampler:
    """Random minibatches for Alg. 1's real data (x ~ p_data) with its own torch.Generator (seeded), so
    training resumes exactly: state_dict()/load_state_dict() (the generator state as a uint8 tensor).

    Draws indices uniformly with replacement; images stay uint8 on the CPU, batches go to ``device``.
    """

    def __init__(self, dataset: ImageDataset, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.dataset, self.device = dataset, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.images = torch.from_numpy(dataset.images)
        self.labels = None if dataset.labels is None else torch.from_numpy(dataset.labels)

    def _one_hot(self, labels: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(labels, self.dataset.label_dim).float().to(self.device)

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, Tensor | None]:
        """Draws n samples' indices and returns the samples at positions ``part`` (data-parallel ranks
        draw the same n and keep their own part): x float32 in [-1, 1] (m, C, H, W), one-hot labels
        (m, label_dim) or None."""
        idx = torch.randint(len(self.images), (n,), generator=self.generator)[part]
        x = to_float(self.images[idx].to(self.device))
        return x, None if self.labels is None else self._one_hot(self.labels[idx])

    def sample_cond(self, n: int, part: slice = slice(None)) -> Tensor | None:
        """One-hot labels with classes uniform over [0, label_dim), for the generator: n drawn, those at
        positions ``part`` returned; None if unconditional."""
        if self.labels is None:
            return None
        return self._one_hot(torch.randint(self.dataset.label_dim, (n,), generator=self.generator)[part])

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))


# -- text-to-image: captioned images and prompts (fdistill.data.captions) -----------------------------------
def _as_captions(source: CaptionDataset | str | Path) -> CaptionDataset:
    return source if isinstance(source, CaptionDataset) else open_captions(source)


class PromptSampler:
    """Random prompts for the generator (uniform, with replacement) from a caption dataset or a prompts file,
    with its own seeded torch.Generator: state_dict()/load_state_dict() resume the draws exactly."""

    def __init__(self, prompts: CaptionDataset | str | Path, seed: int = 0) -> None:
        self.prompts = _as_captions(prompts)
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, size: int, n: int) -> list[int]:
        return torch.randint(size, (n,), generator=self.generator).tolist()

    def sample_prompts(self, n: int, part: slice = slice(None)) -> list[str]:
        """Captions for the generator: n drawn uniformly with replacement, those at positions ``part`` returned
        (data-parallel ranks draw the same n and keep their own part)."""
        return [self.prompts.caption(i) for i in self._draw(len(self.prompts), n)[part]]

    def _sizes(self) -> list[int]:
        return [len(self.prompts)]

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state(), "sizes": torch.tensor(self._sizes())}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        sizes = state.get("sizes")
        if sizes is not None and sizes.tolist() != self._sizes():
            warnings.warn(f"{type(self).__name__}: the state was saved for datasets of {sizes.tolist()} samples, "
                          f"these have {self._sizes()}: the draws will not repeat those of the saved run",
                          stacklevel=2)
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))


class CaptionSampler(PromptSampler):
    """Random image-caption minibatches for Alg. 1's real data (x ~ p_data, with its caption), like
    ImageSampler: indices uniform with replacement from its own seeded torch.Generator, so that
    state_dict()/load_state_dict() resume exactly.

    ``prompts`` (a caption dataset or prompts file; default: ``dataset``) is where ``sample_prompts`` draws
    the generator's prompts. ``threads`` > 0 decodes each minibatch's images in that many threads.
    """

    def __init__(self, dataset: CaptionDataset | str | Path, seed: int = 0, device: str | torch.device = "cpu",
                 prompts: CaptionDataset | str | Path | None = None, threads: int = 0) -> None:
        self.dataset = _as_captions(dataset)
        self.dataset._need_images()
        super().__init__(self.dataset if prompts is None else prompts, seed)
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(threads) if threads > 0 else None

    def _map(self, fn: Callable, items: list) -> list:
        return list(self._pool.map(fn, items)) if self._pool is not None else [fn(x) for x in items]

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, list[str]]:
        """Draws n samples' indices and returns the samples at positions ``part`` (data-parallel ranks draw the
        same n and keep their own part): images float32 in [-1, 1] (m, 3, R, R) and their m captions."""
        idx = self._draw(len(self.dataset), n)[part]
        samples = self._map(self.dataset.__getitem__, idx)
        r = self.dataset.resolution
        images = (torch.from_numpy(np.stack([s[0] for s in samples])) if samples
                  else torch.empty((0, 3, r, r), dtype=torch.uint8))
        return to_float(images.to(self.device)), [s[1] for s in samples]

    def _sizes(self) -> list[int]:
        return [len(self.dataset), len(self.prompts)]
