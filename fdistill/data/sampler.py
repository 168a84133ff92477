"""Random minibatches of real data for Alg. 1 (line 3: x ~ p_data), with class conditioning."""

from __future__ import annotations

import torch
from torch import Tensor

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

    def sample_labels(self, n: int, part: slice = slice(None)) -> Tensor | None:
        """One-hot labels with classes uniform over [0, label_dim), for the generator: n drawn, those at
        positions ``part`` returned; None if unconditional."""
        if self.labels is None:
            return None
        return self._one_hot(torch.randint(self.dataset.label_dim, (n,), generator=self.generator)[part])

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
