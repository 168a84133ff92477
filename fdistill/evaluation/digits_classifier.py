"""The "digits-FID" feature space: a small CNN classifier for scikit-learn's 8x8 digits.

Inception-v3 features (Heusel et al. 2017) mean little for 8x8 grayscale digits, so digits samples
are scored in the 128-d penultimate layer of this classifier instead (FID and precision/recall,
Kynkäänniemi et al. 2019, via ``fdistill.metrics``). The network is trained once, by this module,
with a fixed seed, and cached as safetensors; the held-out accuracy and recipe version travel in the
file's metadata. Numbers are comparable only between runs that use the same recipe version.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fdistill.config import cache_dir
from fdistill.data.datasets import load_dataset, to_float
from fdistill.io import atomic_path

RECIPE_VERSION = 1
FILENAME = f"digits_classifier-v{RECIPE_VERSION}.safetensors"
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """conv-SiLU-conv-SiLU-avgpool (8x8 -> 4x4) - conv-SiLU - linear(1024->128)-SiLU [features] - linear(128->10).

    Inputs are (N, 1, 8, 8) images in [-1, 1], as ``fdistill.data`` serves the digits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The 128-d penultimate activations: the digits-FID feature space."""
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitsClassifier expects (N, 1, 8, 8) images in [-1, 1], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(x))


def digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as float (N, 1, 8, 8) in [-1, 1] and labels (N,), exactly as ``fdistill.data``
    loads and scales them for training."""
    data = load_dataset("digits")
    return to_float(data.images), torch.from_numpy(data.labels).long()


def split_indices(labels: Tensor, seed: int = 0, held_out: float = 0.2) -> tuple[Tensor, Tensor]:
    """Stratified train / held-out split: ``held_out`` of every class, chosen with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(held_out * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _augment(x: Tensor, gen: torch.Generator, noise_std: float = 0.1) -> Tensor:
    """Random shifts of up to one pixel in each direction (background -1 fills in) plus Gaussian noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    return shifted + noise_std * torch.randn(shifted.shape, generator=gen)


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((net(x).argmax(1) == y).double().mean())


@torch.enable_grad()  # also when called under no_grad (e.g. from evaluation)
def train_digits_classifier(
    seed: int = 0, epochs: int = 16, batch_size: int = 64, lr: float = 3e-3, progress: bool = False
) -> tuple[DigitsClassifier, float]:
    """Train on a stratified 80% of the digits with shift/noise augmentation (so that generated images,
    which are never exactly on the data grid, land in familiar territory); returns (net in eval mode,
    accuracy on the held-out 20%). Adam with a one-cycle learning rate; the global RNG is left untouched."""
    x, y = digits_tensors()
    train_idx, test_idx = split_indices(y, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier()
    steps_per_epoch = -(-len(train_idx) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            net.eval()
            print(f"digits classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, "
                  f"held-out accuracy {_accuracy(net, x[test_idx], y[test_idx]):.4f} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    net.eval().requires_grad_(False)
    return net, _accuracy(net, x[test_idx], y[test_idx])


def digits_classifier_path(cache: str | Path | None = None) -> Path:
    """Cached weights: in ``cache``, else the cache folder (``config.cache_dir``); file named by recipe version."""
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / FILENAME


def load_digits_classifier(cache: str | Path | None = None, progress: bool = True) -> DigitsClassifier:
    """The digits-FID network in eval mode without gradients; trained (a few seconds) and cached on first use.

    ``net.heldout_accuracy`` holds the held-out accuracy recorded when it was trained.
    """
    path = digits_classifier_path(cache)
    if not path.is_file():
        if progress:
            print(f"training the digits-FID classifier once (recipe v{RECIPE_VERSION}), caching it at {path}",
                  flush=True)
        trained, acc = train_digits_classifier(progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"heldout_accuracy": f"{acc:.6f}", "recipe_version": str(RECIPE_VERSION), "seed": "0"}
        with atomic_path(path) as tmp:  # a concurrent reader never sees a partial file
            save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp), metadata=meta)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("recipe_version") != str(RECIPE_VERSION):
            raise ValueError(f"{path} was written by digits-classifier recipe {meta.get('recipe_version')!r}, "
                             f"expected {RECIPE_VERSION}; delete it to retrain")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    net = DigitsClassifier()
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    net.heldout_accuracy = float(meta["heldout_accuracy"])
    return net
