"""DINO ViT-B/8 (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") image features
for the in-batch similarity of text-to-image samples (the diversity measure of Particle Guidance, Corso et al.
2024, used by the f-distill paper: mean pairwise cosine of the DINO features of the images made for one prompt).

``DINOViT``'s parameter names and shapes are those of facebookresearch/dino's ``VisionTransformer`` with
``num_classes=0`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``; LayerNorm eps 1e-6, q/k/v with bias), so the published
``dino_vitbase8_pretrain.pth`` loads with strict=True. The feature is the class token after the final norm,
L2-normalised. Inputs of another size than 224 use DINO's bicubic interpolation of the position embeddings.

Preprocessing (uint8 (N, 1|3, H, W) images): by default as the Particle Guidance evaluation feeds DINO, the
full-resolution image scaled to [0, 1] and normalised with the ImageNet mean/std; ``image_size=S`` first resizes
the shorter side to S (PIL bicubic) and center-crops S x S, which is cheaper for large images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.data.transforms import rgb_uint8
from fdistill.evaluation.clip import normalize, resize_center_crop_batch

WEIGHTS_NAME = "dino_vitbase8_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/" + WEIGHTS_NAME
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DINOViT(nn.Module):
    """DINO's ViT without a head. ``forward`` takes uint8 images and returns L2-normalised class-token features
    (N, embed_dim); ``forward_features`` takes preprocessed float images and returns the raw class token."""

    def __init__(self, patch_size: int = 8, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, img_size: int = 224):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def interpolate_pos_encoding(self, n_rows: int, n_cols: int) -> Tensor:
        """Position embeddings for an n_rows x n_cols patch grid, as DINO computes them: the learned square grid
        resized bicubically with scale factors ((n + 0.1) / sqrt(N)) (the 0.1 guards the rounding)."""
        n = self.pos_embed.shape[1] - 1
        if n_rows * n_cols == n and n_rows == n_cols:
            return self.pos_embed
        side = int(math.sqrt(n))
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((n_rows + 0.1) / math.sqrt(n), (n_cols + 0.1) / math.sqrt(n)),
                             mode="bicubic")
        if grid.shape[-2:] != (n_rows, n_cols):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, "
                               f"expected {(n_rows, n_cols)}")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def preprocess(self, images: Tensor | np.ndarray, image_size: int | None = None) -> Tensor:
        """uint8 (N, 1|3, H, W) -> ImageNet-normalised float on the model's device and dtype, at full resolution
        (``image_size=None``) or resized (shorter side) and center-cropped to ``image_size``."""
        x = rgb_uint8(images, what="DINO")
        if image_size is not None:
            x = resize_center_crop_batch(x, image_size)
        p = self.pos_embed
        return normalize(x.to(p.device).float().div(255), IMAGENET_MEAN, IMAGENET_STD).to(p.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """Preprocessed (N, 3, H, W) -> class token after the final norm (N, embed_dim)."""
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(rows, cols)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, images: Tensor | np.ndarray, image_size: int | None = None) -> Tensor:
        return F.normalize(self.forward_features(self.preprocess(images, image_size)), dim=-1)


def dino_vitb8() -> DINOViT:
    """DINO ViT-B/8: patch 8, width 768, 12 blocks of 12 heads, MLP ratio 4 (85,807,872 parameters)."""
    return DINOViT(patch_size=8, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)


def load_dino_from_file(path: str | Path, net: DINOViT | None = None,
                        device: str | torch.device = "cpu") -> DINOViT:
    """DINO ViT-B/8 (or ``net``) with the weights in ``path`` (a state dict read with weights_only=True; strict),
    in eval mode without gradients."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a weights-only state dict: {type(e).__name__}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__}); expected {WEIGHTS_NAME}")
    net = net if net is not None else dino_vitb8()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold DINO ViT weights matching {type(net).__name__} "
                         f"(patch {net.patch_size}, width {net.embed_dim}; expected {WEIGHTS_NAME}): "
                         f"{str(e).splitlines()[0]}") from e
    return net.to(device).eval().requires_grad_(False)
