"""Text-to-image metrics: CLIP score, in-batch similarity (DINO) and HPSv2, with their weight files found locally.

- CLIP score (Radford et al. 2021 for CLIP; Hessel et al. 2021 for the "A photo depicts " prompt): the raw cosine
  between the CLIP image embedding of each sample and the text embedding of its caption with that prefix (not
  x 100, not clipped), averaged. DMD2's protocol uses open_clip ViT-g-14 (laion2b_s12b_b42k) on images first
  center-cropped and resized to 256 with LANCZOS (``pre_resize=256``).
- In-batch similarity (Caron et al. 2021 for DINO): for each prompt, the mean cosine between the DINO ViT-B/8
  features of distinct images generated for it (the off-diagonal of the Gram matrix), averaged over prompts;
  lower is more diverse.
- HPSv2 (Wu et al. 2023): 100 x cosine between image and prompt embeddings of open_clip ViT-H-14 with the
  HPS v2 checkpoint, with HPSv2's resize-and-pad preprocessing.

Weights are read from local files only. ``find_weights`` looks at an explicit path (a file, or a folder holding
the file), then an environment variable, then the cache folder; a missing file stops before any work with one
line naming the file, where to put it and where it is published.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fdistill.config import cache_dir
from fdistill.data.transforms import rgb_uint8
from fdistill.evaluation.clip import CLIP, load_clip_from_file, square_center_crop_resize
from fdistill.evaluation.dino import WEIGHTS_NAME as DINO_NAME
from fdistill.evaluation.dino import WEIGHTS_URL as DINO_URL
from fdistill.evaluation.dino import DINOViT, load_dino_from_file

CLIP_SCORE_MODEL = "ViT-g-14"
CLIP_SCORE_PREFIX = "A photo depicts "
HPS_MODEL = "ViT-H-14"
OPEN_CLIP_NAMES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
# Hugging Face repositories of the LAION open_clip weights (open_clip's pretrained.py, hf_hub entries).
OPEN_CLIP_REPOS = {
    "ViT-g-14": ("laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
    "ViT-H-14": ("laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "ViT-B-32": ("laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
}
HPS_NAMES = ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")  # v2.0 (hpsv2's default) first
HPS_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/"


@dataclass(frozen=True)
class WeightSpec:
    """A weights file to find: ``names`` (accepted file names, preferred first), the environment variable, the
    folder under the cache directory, the download URL and what it is (for messages)."""

    what: str
    names: tuple[str, ...]
    env: str
    subdir: str
    url: str


def clip_weights_spec(model: str = CLIP_SCORE_MODEL) -> WeightSpec:
    """The open_clip weights of ``model`` (LAION checkpoints for ViT-g-14 / ViT-H-14 / ViT-B-32): looked up in
    cache_dir()/open_clip/<model>/ or through $FDISTILL_CLIP."""
    tag, repo = OPEN_CLIP_REPOS.get(model, ("?", None))
    url = (f"https://huggingface.co/{repo}/resolve/main/{OPEN_CLIP_NAMES[0]}" if repo else
           "the open_clip pretrained weights of this model (see open_clip's pretrained.py)")
    return WeightSpec(f"open_clip {model} ({tag})", OPEN_CLIP_NAMES, "FDISTILL_CLIP", f"open_clip/{model}", url)


DINO_SPEC = WeightSpec("DINO ViT-B/8", (DINO_NAME,), "FDISTILL_DINO", "", DINO_URL)
HPS_SPEC = WeightSpec("HPSv2 (open_clip ViT-H-14)", HPS_NAMES, "FDISTILL_HPS", "", HPS_URL + HPS_NAMES[0])


def missing_weights_message(spec: WeightSpec, looked: list[Path]) -> str:
    where = ", ".join(str(p) for p in looked)
    folder = cache_dir() / spec.subdir if spec.subdir else cache_dir()
    return (f"{spec.what} weights not found (looked at: {where}). fdistill does not download: get {spec.names[0]} "
            f"from {spec.url} and place it in {folder}, set {spec.env}=PATH, or pass its path.")


def find_weights(spec: WeightSpec, path: str | Path | None = None) -> Path:
    """The weights file: ``path`` (a file, or a folder holding one of ``spec.names``), else ``$<spec.env>``, else
    the cache folder (``fdistill.config.cache_dir()`` / ``spec.subdir``). Raises FileNotFoundError (one line)."""
    if path is None:
        path = os.environ.get(spec.env) or None
    start = Path(path).expanduser() if path is not None else (cache_dir() / spec.subdir if spec.subdir
                                                               else cache_dir())
    looked = []
    if start.is_file():
        return start
    if start.is_dir():
        for name in spec.names:
            looked.append(start / name)
            if (start / name).is_file():
                return start / name
    else:
        looked.append(start)
    raise FileNotFoundError(missing_weights_message(spec, looked))


def _text_ready() -> None:
    """Stop before any work when CLIP text encoding cannot run (BPE file or transformers missing)."""
    from fdistill.evaluation.clip_tokenizer import clip_bpe_path

    clip_bpe_path()
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("CLIP text encoding needs the transformers package: pip install transformers") from e


def load_clip_scorer(path: str | Path | None = None, model: str = CLIP_SCORE_MODEL,
                     device: str | torch.device = "cpu") -> CLIP:
    """open_clip ``model`` (ViT-g-14 by default) with its weights found by ``find_weights``."""
    weights = find_weights(clip_weights_spec(model), path)
    _text_ready()
    return load_clip_from_file(weights, model, device)


def load_hps(path: str | Path | None = None, device: str | torch.device = "cpu") -> CLIP:
    """open_clip ViT-H-14 with the HPSv2 checkpoint (its "state_dict" entry) found by ``find_weights``."""
    weights = find_weights(HPS_SPEC, path)
    _text_ready()
    return load_clip_from_file(weights, HPS_MODEL, device)


def load_dino(path: str | Path | None = None, device: str | torch.device = "cpu") -> DINOViT:
    """DINO ViT-B/8 with ``dino_vitbase8_pretrain.pth`` found by ``find_weights``."""
    return load_dino_from_file(find_weights(DINO_SPEC, path), device=device)


# -- metrics -----------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def _check_pairs(images: Tensor, texts: Sequence[str], what: str) -> None:
    if isinstance(texts, str):
        raise ValueError(f"{what} needs one text per image (a list of strings), got a single string")
    if len(texts) != len(images):
        raise ValueError(f"{what} needs one text per image: {len(images)} images, {len(texts)} texts")
    if len(images) == 0:
        raise ValueError(f"{what} needs at least one image")


@torch.no_grad()
def image_text_cosines(model: CLIP, images: Tensor | np.ndarray, texts: Sequence[str], batch_size: int = 32,
                       resize_mode: str = "shortest") -> Tensor:
    """Cosine between the CLIP embedding of each uint8 image and of the text of the same index (N,), on the CPU."""
    images = rgb_uint8(images)
    _check_pairs(images, texts, "CLIP similarity")
    out = []
    for s in _batches(len(images), batch_size):
        img = model.encode_image(images[s], resize_mode=resize_mode)
        txt = model.encode_text(list(texts[s]))
        out.append((img.float() * txt.float()).sum(-1).cpu())
    return torch.cat(out)


def clip_score(model: CLIP, images_uint8: Tensor | np.ndarray, captions: Sequence[str],
               prefix: str = CLIP_SCORE_PREFIX, batch_size: int = 32,
               pre_resize: int | None = None) -> tuple[float, Tensor]:
    """CLIP score: (mean, per-sample) raw cosine between each image and ``prefix + caption``. With
    ``pre_resize``, images are first center-cropped to a square and resized to it with LANCZOS (DMD2 uses 256)."""
    images = rgb_uint8(images_uint8)
    _check_pairs(images, captions, "CLIP score")
    if pre_resize is not None:
        images = square_center_crop_resize(images, pre_resize, "lanczos")
    cos = image_text_cosines(model, images, [prefix + c for c in captions], batch_size)
    return cos.mean().item(), cos


def hps_score(model: CLIP, images_uint8: Tensor | np.ndarray, prompts: Sequence[str],
              batch_size: int = 32) -> tuple[float, Tensor]:
    """HPSv2: (mean, per-sample) 100 x cosine between each image (HPSv2's resize-longest-side-and-pad
    preprocessing) and its prompt, with ``model`` = ``load_hps()``."""
    cos = image_text_cosines(model, images_uint8, list(prompts), batch_size, resize_mode="longest")
    scores = 100 * cos
    return scores.mean().item(), scores


@torch.no_grad()
def dino_features(model: DINOViT, images_uint8: Tensor | np.ndarray, batch_size: int = 16,
                  image_size: int | None = None) -> Tensor:
    """L2-normalised DINO features (N, 768) of uint8 images, on the CPU (full resolution by default)."""
    images = rgb_uint8(images_uint8, what="DINO")
    return torch.cat([model(images[s], image_size=image_size).float().cpu() for s in _batches(len(images),
                                                                                                batch_size)])


def _group_indices(groups: int | Sequence[int] | Tensor, n: int) -> list[Tensor]:
    if isinstance(groups, int):
        if groups < 2 or n % groups:
            raise ValueError(f"a group size must be >= 2 and divide the number of images ({n}), got {groups}")
        return [torch.arange(i, i + groups) for i in range(0, n, groups)]
    labels = torch.as_tensor(groups)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"groups must be a group size or one label per image ({n}), got shape "
                         f"{tuple(labels.shape)}")
    out = []
    for g in torch.unique(labels, sorted=True):
        idx = torch.nonzero(labels == g).flatten()
        if len(idx) < 2:
            raise ValueError(f"group {g.item()} has {len(idx)} image; in-batch similarity needs >= 2 per prompt")
        out.append(idx)
    return out


def in_batch_similarity(features: Tensor, groups: int | Sequence[int] | Tensor) -> tuple[float, Tensor]:
    """(mean over prompts, per-prompt) mean cosine similarity between distinct images of the same prompt.

    ``features`` (N, d) are L2-normalised here; ``groups`` is either the number of consecutive images per prompt
    or a label per image (per-prompt values then come in sorted label order). Per group of n: (sum of the n x n
    cosine matrix - its diagonal) / (n (n - 1)), as Particle Guidance's evaluation computes it."""
    f = torch.nn.functional.normalize(torch.as_tensor(features).double(), dim=-1)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(f.shape)}")
    per_group = []
    for idx in _group_indices(groups, len(f)):
        g = f[idx]
        s = g @ g.T
        n = len(idx)
        per_group.append((s.sum() - s.diagonal().sum()) / (n * (n - 1)))
    sims = torch.stack(per_group)
    return sims.mean().item(), sims
