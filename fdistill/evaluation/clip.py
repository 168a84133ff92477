"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") as
open_clip builds its ViT models, in plain torch, for the text-to-image metrics: the CLIP score and HPSv2
(Wu et al. 2023, "Human Preference Score v2", whose scorer is an open_clip ViT-H-14 fine-tuned on human
preferences and scores 100 x cosine).

``CLIP``'s parameter names and shapes are those of open_clip's ``CLIP`` class for a ViT vision tower and the
default text transformer (``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding``,
``visual.ln_pre``, ``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``, ``visual.proj``, ``token_embedding``,
``positional_embedding``, ``transformer.resblocks.{i}...``, ``ln_final``, ``text_projection``, ``logit_scale``),
so open_clip checkpoints (``open_clip_pytorch_model.bin`` / ``.safetensors``) and the HPSv2 checkpoint load with
strict=True. The architecture comes from open_clip's model-config JSON (read from the installed
``open_clip_torch`` package without importing it, or passed as a dict); configs using features this module does
not implement (timm or Hugging Face towers, attentional pooling, custom text towers, SigLIP's logit bias, ...)
are refused.

Images are uint8 (N, 1|3, H, W). ``resize_mode="shortest"`` is open_clip's evaluation transform for these
models (PIL bicubic resize of the shorter side to the input size, center crop, OpenAI mean/std);
``"longest"`` is HPSv2's (bicubic, antialiased resize of the longer side, zero padding to a square, same mean/std).
Weights are read from local files only; ``fdistill.evaluation.t2i_metrics`` finds them.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill import require_torch
from fdistill.data.transforms import pil_filter, resize_center_crop, rgb_uint8
from fdistill.evaluation.clip_tokenizer import open_clip_folder

require_torch()  # its torch.load(weights_only=True) must not load TorchScript

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED_MODELS = ("ViT-g-14", "ViT-H-14", "ViT-B-32")  # tested; other plain-ViT configs build too


# -- images ------------------------------------------------------------------------------------------
def _pil(image: Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())


def _pil_resize(image: Tensor, height: int, width: int, resample: str) -> Tensor:
    out = _pil(image).resize((width, height), pil_filter(resample))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def _center_crop(image: Tensor, height: int, width: int) -> Tensor:
    """torchvision's center_crop offsets (round half to even of the margin / 2)."""
    top = int(round((image.shape[-2] - height) / 2.0))
    left = int(round((image.shape[-1] - width) / 2.0))
    return image[..., top : top + height, left : left + width]


def resize_center_crop_batch(images: Tensor, size: int, resample: str = "bicubic") -> Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size): ``fdistill.data.transforms.resize_center_crop`` (the
    shorter side resized to ``size`` with PIL, then a center crop) on each image; open_clip's evaluation
    transform before ToTensor."""
    pil_filter(resample)  # an unknown filter is refused before any image is touched
    return torch.stack([image if image.shape[-2:] == (size, size)
                        else torch.from_numpy(resize_center_crop(_pil(image), size, resample)) for image in images])


def square_center_crop_resize(images: Tensor, size: int, resample: str = "lanczos") -> Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size): the central min(H, W) square, resized with PIL (LANCZOS by
    default). DMD2 applies this with size 256 to generated and COCO images before the CLIP preprocessing."""
    pil_filter(resample)  # an unknown filter is refused before any image is touched
    out = []
    for image in images:
        s = min(image.shape[-2:])
        image = _center_crop(image, s, s)
        out.append(image if s == size else _pil_resize(image, size, size, resample))
    return torch.stack(out)


def resize_longest_pad(images: Tensor, size: int) -> Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, size, size) in [0, 1]: HPSv2's ResizeMaxSize applied after ToTensor (the
    longer side to ``size``, the other to round(side * scale), bicubic with antialiasing on floats as torchvision
    >= 0.17 resizes tensors, then zero padding split evenly, the odd pixel right / bottom)."""
    out = []
    for image in images:
        x = image.float().div(255)
        h, w = x.shape[-2:]
        scale = size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
            ph, pw = size - nh, size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        out.append(x)
    return torch.stack(out)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# -- configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclass(frozen=True)
class CLIPTextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: CLIPTextConfig
    quick_gelu: bool = False
    name: str = "custom"


# open_clip config keys this implementation reads, and the keys it accepts only at open_clip's default value
# (any other value changes the architecture or the features).
_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "ls_init_value"}
_VISION_DEFAULTS: dict[str, Any] = {
    "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}
_VISION_IGNORED = {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj",
                   "timm_proj_bias", "timm_drop", "timm_drop_path"}  # only read by features refused above
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value"}
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None, "embed_cls": False,
    "pad_id": 0, "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "hf_model_name": None,
}
_TEXT_IGNORED = {"eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}  # unused with the above
_TOP_DEFAULTS: dict[str, Any] = {"custom_text": False, "init_logit_bias": None, "multimodal_cfg": None}


def open_clip_model_config(name: str) -> dict:
    """open_clip's model config ``model_configs/<name>.json`` from the installed open_clip_torch package (read as
    a file; open_clip is not imported)."""
    folder = open_clip_folder()
    if folder is None:
        raise FileNotFoundError(f"open_clip's model configs are needed for CLIP {name!r}: install them with "
                                "`pip install --no-deps open_clip_torch`, or pass the config as a dict")
    path = folder / "model_configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no open_clip model config {name!r} (looked for {path}); fdistill's CLIP is tested with "
                         f"{', '.join(SUPPORTED_MODELS)}")
    return json.loads(path.read_text())


def _check_keys(cfg: dict, keys: set, defaults: dict, ignored: set, where: str) -> None:
    for key, value in cfg.items():
        if key in keys or key in ignored:
            continue
        if key not in defaults:
            raise ValueError(f"{where}: unknown key {key!r}; fdistill's CLIP implements open_clip ViT configs "
                             f"(keys {sorted(keys)})")
        if value != defaults[key] and not (value in (None, "default") and defaults[key] in (None, "default")):
            raise ValueError(f"{where}: {key}={value!r} is not supported (fdistill's CLIP implements the plain "
                             f"open_clip ViT, {key}={defaults[key]!r}); models tested: {', '.join(SUPPORTED_MODELS)}")


def clip_config(model: str | dict | CLIPConfig) -> CLIPConfig:
    """A ``CLIPConfig`` from an open_clip model name (its JSON in the installed open_clip package), an open_clip
    config dict, or a ``CLIPConfig``. Refuses configs that need what this module does not implement."""
    if isinstance(model, CLIPConfig):
        return model
    name = model if isinstance(model, str) else "config"
    cfg = open_clip_model_config(model) if isinstance(model, str) else dict(model)
    top = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
    _check_keys(cfg, top, _TOP_DEFAULTS, set(), name)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"{name}: open_clip config lacks {key!r}")
    vcfg, tcfg = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    _check_keys(vcfg, _VISION_KEYS, _VISION_DEFAULTS, _VISION_IGNORED, f"{name}.vision_cfg")
    _check_keys(tcfg, _TEXT_KEYS, _TEXT_DEFAULTS, _TEXT_IGNORED, f"{name}.text_cfg")
    for key in ("layers", "image_size", "patch_size"):
        value = vcfg.get(key)
        if isinstance(value, (list, tuple)):
            if key == "layers":
                raise ValueError(f"{name}: vision layers {value} is a ResNet tower; only ViT towers are implemented")
            if len(set(value)) != 1:
                raise ValueError(f"{name}: non-square vision {key} {value} is not supported")
            vcfg[key] = value[0]
    vision = VisionConfig(**{k: vcfg[k] for k in _VISION_KEYS if k in vcfg})
    text = CLIPTextConfig(**{k: tcfg[k] for k in _TEXT_KEYS if k in tcfg})
    if vision.width % vision.head_width or text.width % text.heads:
        raise ValueError(f"{name}: width must be a multiple of the head width / number of heads")
    if vision.image_size % vision.patch_size:
        raise ValueError(f"{name}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    return CLIPConfig(int(cfg["embed_dim"]), vision, text, bool(cfg.get("quick_gelu", False)), name)


# -- the network -------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights (open_clip's ``quick_gelu``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (packed q/k/v ``in_proj_weight``
    (3 width, width) and ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + ls_1(attn(ln_1 x)), then x + ls_2(mlp(ln_2 x)) with mlp = c_fc, GELU (or
    QuickGELU), c_proj of hidden width int(width * mlp_ratio)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init_value: float | None, act: type[nn.Module]):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), causal=causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, ls_init_value: float | None,
                 act: type[nn.Module]):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act) for _ in range(layers)])

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """ViT image tower: patchify (conv1, no bias), class token, learned positional embedding, ln_pre,
    transformer, ln_post on the class token, projection ``proj`` (width, embed_dim)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, act: type[nn.Module]):
        super().__init__()
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.ls_init_value, act)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision tower takes {self.image_size}x{self.image_size} inputs, got "
                             f"{tuple(x.shape[-2:])} (use CLIP.preprocess)")
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """open_clip's CLIP for ViT configs (see the module docstring for the parameter names).

    ``encode_image`` takes uint8 images, ``encode_text`` token ids (LongTensor (N, L), L <= context_length, as
    ``fdistill.evaluation.clip_tokenizer.tokenize`` makes them) or strings; both return L2-normalised embeddings
    (N, embed_dim).
    """

    def __init__(self, config: str | dict | CLIPConfig = "ViT-B-32"):
        super().__init__()
        self.config = cfg = clip_config(config)
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        t = cfg.text
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, act)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, t.ls_init_value, act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def _param(self) -> Tensor:
        return self.visual.proj

    def preprocess(self, images: Tensor | np.ndarray, resize_mode: str = "shortest") -> Tensor:
        """uint8 (N, 1|3, H, W) -> normalised float (N, 3, S, S) on the model's device and dtype. ``"shortest"``:
        open_clip's evaluation transform; ``"longest"``: HPSv2's (see the module docstring)."""
        x = rgb_uint8(images)
        if resize_mode == "shortest":
            x = resize_center_crop_batch(x, self.image_size).float().div(255)
        elif resize_mode == "longest":
            x = resize_longest_pad(x, self.image_size)
        else:
            raise ValueError(f"resize_mode must be 'shortest' or 'longest', got {resize_mode!r}")
        p = self._param()
        return normalize(x, OPENAI_MEAN, OPENAI_STD).to(device=p.device, dtype=p.dtype)

    def image_features(self, x: Tensor) -> Tensor:
        """Preprocessed images -> unnormalised image embeddings (N, embed_dim)."""
        return self.visual(x)

    def text_features(self, tokens: Tensor) -> Tensor:
        """Token ids (N, L) -> unnormalised text embeddings (N, embed_dim), read at each row's highest id (the end
        token), after causal attention."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tokens must be (N, L <= {self.context_length}), got {tuple(tokens.shape)}")
        tokens = tokens.to(self.token_embedding.weight.device)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return x @ self.text_projection

    def encode_image(self, images: Tensor | np.ndarray, resize_mode: str = "shortest") -> Tensor:
        """uint8 images -> L2-normalised image embeddings."""
        return F.normalize(self.image_features(self.preprocess(images, resize_mode)), dim=-1)

    def encode_text(self, text: Tensor | str | Sequence[str]) -> Tensor:
        """Token ids or strings -> L2-normalised text embeddings."""
        if not isinstance(text, Tensor):
            from fdistill.evaluation.clip_tokenizer import tokenize

            text = tokenize(text, context_length=self.context_length)
        return F.normalize(self.text_features(text), dim=-1)

    def forward(self, images: Tensor, text: Tensor | str | Sequence[str]) -> Tensor:
        """Cosine similarity of each image with the text of the same index (N,)."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)


# -- loading -----------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch.save file read with weights_only=True. A checkpoint dict
    holding it under "state_dict" (as HPSv2's) is unwrapped, and a DataParallel "module." prefix removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} could not be read as a weights-only state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); OpenAI's TorchScript .pt archives are "
                             "not supported: use the open_clip/Hugging Face state dict") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_clip_weights(net: CLIP, path: str | Path) -> CLIP:
    """Loads an open_clip (or HPSv2) checkpoint into ``net`` strictly; a mismatch names the file and the config."""
    state = read_state_dict(path)
    ls = state.get("logit_scale")
    if ls is not None and ls.numel() == 1 and ls.ndim != net.logit_scale.ndim:
        state["logit_scale"] = ls.reshape(net.logit_scale.shape)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        ours = net.state_dict()
        missing = sorted(set(ours) - set(state))
        unexpected = sorted(set(state) - set(ours))
        shapes = [k for k in set(ours) & set(state) if ours[k].shape != state[k].shape]
        raise ValueError(f"{path} does not match open_clip {net.config.name}: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(shapes)} of other shape (e.g. {sorted(shapes)[:3]})") from e
    return net


def load_clip_from_file(path: str | Path, model: str | dict | CLIPConfig = "ViT-g-14",
                        device: str | torch.device = "cpu") -> CLIP:
    """open_clip ``model`` with the weights in ``path``, in eval mode without gradients."""
    net = CLIP(model)
    load_clip_weights(net, path)
    return net.to(device).eval().requires_grad_(False)
