"""Per-GPU memory of a distillation run, predicted before anything is allocated.

The teacher's diffusers network is built on PyTorch's meta device (from a pipeline folder's config, or from a
published config), wrapped in its family's denoiser (``teachers.families``), and the passes of Alg. 1's two steps
run on meta tensors while ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps for
backward (distinct storages, parameters excluded). Each pass runs at batch 1 and 2: bytes = fixed + per sample x
batch (``Affine``). What is counted:

- **Student step** (Alg. 1 lines 4-12): the generator's forward with grad to its trainable weights; the teacher's
  forward with grad to its input (the GAN term, through the discriminator's features into the generator), whose
  part after the tapped block is freed once its output is detached, so it counts in full only at the end of that
  forward; the discriminator head on features that need grad.
- **Critic step** (lines 13-15): the fake score's forward with grad (the generator's shape); the head on fake and
  real features; exact R1 (``r1_form: exact``) adds the teacher to its tap with grad to the input on the math
  attention kernel (its double backward), counted twice for the graph ``create_graph`` builds.
- **Gradient checkpointing**: the units diffusers checkpoints (its transformer blocks, a UNet's resnets and
  attention blocks) are recorded by a checkpointing function that runs them in place, so one forward gives both
  answers: without checkpointing, everything saved; with it, what is saved outside the units plus the units'
  inputs (which ``torch.utils.checkpoint`` keeps), plus the largest unit's saved tensors, recomputed in backward
  one unit at a time. The teacher's passes with grad are checkpointed too: with ``text.shared_base`` they run on
  the same checkpointed network; with separate networks the teacher's own network is checkpointed
  (``LatentTextToImageTeacher.prepare_students``). Exact R1 is counted in full either way: the gradient taken
  with ``create_graph`` keeps each unit's recomputed tensors for the second differentiation.
- **bf16 autocast** (``distill.precision: bf16``) is CUDA's policy emulated on meta tensors (``MetaAutocast``):
  matmuls and convolutions in bf16 (a frozen fp32 weight's bf16 copy is saved where the input needs grad), norms
  and softmax in fp32. Attention is a fused kernel (flash / memory-efficient: q, k, v, output, fp32 log-sum-exp),
  except where fdistill runs the math kernel (``networks.attention.double_backward``: the exact R1 pass), which
  saves the L x L probabilities (fp32, the math kernel upcasts).
- **States**: weights as loaded (fdistill loads teachers in fp32), the students' trainable weights, gradients and
  AdamW moments, the EMA, the head (fp32, 16 B per parameter), the frozen text encoders and VAE; FSDP divides the
  networks' states by the ranks. **Transients**: twice the largest tensor one op makes (an activation and its
  gradient in backward), the autocast cache of trainable fp32 weights, FSDP's gathered units.

What the count cannot see on a GPU (so ``HEADROOM``): the CUDA context and NCCL buffers, attention kernels'
workspaces, cuBLAS workspaces, the caching allocator's fragmentation and rounding. ``check_distill`` refuses a run
predicted not to fit (``distill.memory_check``); ``benchmarks/sd_cost.py --memory`` prints the tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

GB = 1e9
HEADROOM = 0.9  # usable fraction of a GPU's memory (CUDA context, NCCL, workspaces, fragmentation)
MARGIN = 0.1  # the stated uncertainty of a GPU prediction (see docs/text-to-image.md, "What fits")

# ---------------------------------------------------------------------------------------------------------------
# Counting what autograd saves


class FusedAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention``: saves what a fused (flash / memory-efficient) kernel saves for
    backward (q, k, v, the output, an fp32 log-sum-exp, the mask if any), never the L x L matrix. The output of
    [B, heads, L, D] is laid out [B, L, heads, D] in memory as the kernels write it (CPU's flash kernel, CUDA's
    flash and memory-efficient ones), so that a network's transpose back to [B, L, heads x D] is a view, not a copy
    (Wan's attention output, flattened before ``to_out``: tests/test_wan_cli.py)."""

    @staticmethod
    def forward(ctx, q, k, v, *mask):
        if q.dim() == 4:
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("memory accounting only")


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """PyTorch's math kernel: half inputs upcast to fp32 (``allow_fp16_bf16_reduction_math_sdp`` is off by
    default), q and k each scaled by sqrt(scale), softmax(q k^T + mask) v; saves the fp32 L x L probabilities."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    s = math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    attn = torch.matmul(q * s, (k * s).transpose(-2, -1))
    if mask is not None:
        attn = attn + (mask.to(attn.dtype) if mask.is_floating_point() else torch.zeros_like(attn))
    return torch.matmul(torch.softmax(attn, -1), v).to(dtype)


class MetaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast policy for the ops diffusion networks use, on meta tensors (``torch.autocast`` does not
    apply there): convolutions, linear layers and matmuls in bf16, norms, softmax and the fp32-list reductions in
    fp32, everything else in its inputs' dtype (``autocast=False``: nothing cast). Attention is ``FusedAttention``,
    or the math kernel (``attention="math"``). ``largest``: the bytes of the largest tensor an op returned."""

    LOW = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.addmm}
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.rsqrt,
            torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.exp, torch.Tensor.exp, F.rms_norm, torch.norm}

    def __init__(self, autocast: bool, attention: str = "fused") -> None:
        super().__init__()
        if attention not in ("fused", "math"):
            raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
        self.autocast, self.attention, self.largest = autocast, attention, 0

    def _cast(self, dtype, args, kwargs):
        def cast(a):
            return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != dtype else a

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            q, k, v = given["query"], given["key"], given["value"]
            mask = given.get("attn_mask")
            if self.autocast:  # scaled_dot_product_attention is on CUDA autocast's lower-precision list
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            if self.attention == "math":
                out = _math_attention(q, k, v, mask, kwargs.get("scale"))
                self.largest = max(self.largest, 4 * math.prod(q.shape[:-1]) * k.shape[-2])  # the fp32 scores
            else:
                out = FusedAttention.apply(q, k, v, *([mask] if isinstance(mask, Tensor) else []))
        else:
            if self.autocast and (func in self.LOW or func in self.FP32):
                args, kwargs = self._cast(torch.bfloat16 if func in self.LOW else torch.float32, args, kwargs)
            out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


@dataclasses.dataclass
class Affine:
    """bytes = fixed + per_sample x batch"""

    per_sample: float
    fixed: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    @classmethod
    def fit(cls, one: float, two: float) -> Affine:
        return cls(two - one, 2 * one - two)

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.per_sample + other.per_sample, self.fixed + other.fixed)

    def __mul__(self, k: float) -> Affine:
        return Affine(self.per_sample * k, self.fixed * k)


ZERO = Affine(0.0, 0.0)


@dataclasses.dataclass
class PassCount:
    """What one forward saves for backward, in bytes: ``total`` (no checkpointing), ``kept`` (with checkpointing:
    saved outside the checkpointed units, and the units' inputs), ``unit`` (the largest unit's saved tensors,
    recomputed in backward), ``largest`` (the largest tensor an op made); ``at_tap``: the same three counted when
    the tapped block returned (the teacher's part that outlives its detached output)."""

    total: float
    kept: float
    unit: float
    largest: float
    at_tap: tuple[float, float, float] | None = None


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _tensors(obj) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Recorder:
    """The distinct storages saved for backward, by where they were saved (outside or inside a checkpointed unit),
    and the checkpointed units' inputs."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.sizes, self.outside, self.boundary = exclude, {}, set(), {}
        self.units: list[dict[int, int]] = []
        self.depth, self.keep, self.snapshot = 0, [], None

    def pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in self.exclude:
            size = tensor.untyped_storage().nbytes()
            self.sizes.setdefault(key, size)
            if self.depth:
                self.units[-1][key] = size
            else:
                self.outside.add(key)
            self.keep.append(tensor)  # its storage (and key) stays alive while counting
        return tensor

    def checkpoint(self, module: nn.Module, *args, **kwargs):
        """A diffusers ``gradient_checkpointing_func`` that runs ``module`` in place, noting what it saves."""
        if self.depth == 0:
            self.units.append({})
            for t in _tensors((args, kwargs)):
                key = _storage_key(t)
                if key not in self.exclude:
                    self.boundary.setdefault(key, t.untyped_storage().nbytes())
                    self.keep.append(t)
        self.depth += 1
        try:
            return module(*args, **kwargs)
        finally:
            self.depth -= 1

    def counts(self) -> tuple[float, float, float]:
        total = sum(self.sizes.values())
        kept = sum(self.sizes[k] for k in self.outside) + sum(b for k, b in self.boundary.items()
                                                               if k not in self.outside)
        unit = max((sum(u.values()) for u in self.units), default=0)
        return float(total), float(kept), float(unit)

    def tap(self, module, args, output) -> None:
        self.snapshot = self.counts()


@contextlib.contextmanager
def _recording_checkpoints(network: nn.Module, recorder: _Recorder):
    """Gradient checkpointing on ``network`` (a diffusers model) with the recorder as its checkpoint function; the
    network's own checkpointing state is restored afterwards."""
    saved = [(m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
             for m in network.modules() if hasattr(m, "gradient_checkpointing")]
    if getattr(network, "_supports_gradient_checkpointing", False):
        network.enable_gradient_checkpointing(recorder.checkpoint)
    try:
        yield
    finally:
        for m, flag, func in saved:
            m.gradient_checkpointing = flag
            if func is not None:
                m._gradient_checkpointing_func = func


def count_pass(run: Callable[[], Any], networks: list[nn.Module], *, autocast: bool, attention: str = "fused",
               backbone: nn.Module | None = None, tap: nn.Module | None = None) -> PassCount:
    """What ``run()`` (one forward) saves for backward; parameters of ``networks`` excluded. ``backbone``: the
    diffusers network whose checkpointed units are recorded; ``tap``: the block whose return is snapshot."""
    params = {_storage_key(p) for m in networks for p in m.parameters()}
    recorder = _Recorder(params)
    mode = MetaAutocast(autocast, attention)
    handle = tap.register_forward_hook(recorder.tap) if tap is not None else None
    try:
        with contextlib.ExitStack() as stack:
            if backbone is not None:
                stack.enter_context(_recording_checkpoints(backbone, recorder))
            stack.enter_context(mode)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t))
            run()
    finally:
        if handle is not None:
            handle.remove()
    return PassCount(*recorder.counts(), float(mode.largest), recorder.snapshot)


# ---------------------------------------------------------------------------------------------------------------
# The teacher on the meta device


SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                "prediction_type": "epsilon"}  # SD1.5's and SDXL's scheduler (their DDPM betas)


@dataclasses.dataclass
class Subject:
    """A teacher as the memory model sees it: its family's denoiser around a diffusers network on the meta device,
    the shape of one latent, its text condition for a batch, the bytes its frozen text encoders and VAE take on the
    GPU, and its LoRA targets."""

    name: str
    kind: str
    denoiser: nn.Module
    backbone: str
    sample_shape: tuple[int, ...]
    condition: Callable[[int], Any]
    lora_targets: list[str]
    frozen_bytes: int = 0
    resolution: int = 0
    video: tuple[int, int, int] | None = None  # a video teacher's (frames, height, width) in pixels
    feature_grid: tuple[int, ...] | None = None  # the tapped features' grid beyond channels (None: r x r)

    @property
    def size(self) -> str:
        """The sample's size in words: "512 px", or "81 frames of 480 x 832 px"."""
        return f"{self.video[0]} frames of {self.video[1]} x {self.video[2]} px" if self.video else \
            f"{self.resolution} px"

    @property
    def network(self) -> nn.Module:
        return getattr(self.denoiser, self.backbone)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


def _network_class(kind: str):
    import diffusers

    return {"sd15": diffusers.UNet2DConditionModel, "sdxl": diffusers.UNet2DConditionModel,
            "sd3": diffusers.SD3Transformer2DModel, "flux": diffusers.FluxTransformer2DModel,
            "sana": diffusers.SanaTransformer2DModel, "qwen_image": diffusers.QwenImageTransformer2DModel,
            "wan": diffusers.WanTransformer3DModel}[kind]


KINDS = ("sd15", "sdxl", "sd3", "flux", "sana", "qwen_image", "wan")


def default_tokens(kind: str, max_sequence_length: int | None = None) -> int:
    """The text condition's length for ``kind`` (``max_sequence_length``: ``teacher_options``'s, None: the family's)."""
    from fdistill.teachers.families import flux, qwen_image, sana, sd3, wan

    if kind in ("sd15", "sdxl"):
        return 77
    default = {"sd3": sd3, "flux": flux, "sana": sana, "qwen_image": qwen_image, "wan": wan}[kind].MAX_SEQUENCE_LENGTH
    return (77 if kind == "sd3" else 0) + (max_sequence_length or default)


def default_resolution(kind: str, config: dict, downsample: int) -> int:
    """The family's default image size in pixels (as its ``load`` picks it)."""
    if kind in ("flux", "qwen_image"):
        return 128 * downsample
    size = config.get("sample_size") or 128
    return int(size[0] if isinstance(size, (list, tuple)) else size) * downsample


def meta_subject(kind: str, config: dict, resolution: int | None = None, *, tokens: int | None = None,
                 tap_block: int | None = None, guidance: float | None = None, downsample: int | None = None,
                 dtype: torch.dtype = torch.float32, frozen_bytes: int = 0, name: str | None = None,
                 video: tuple[int, int, int] | None = None, expand_timesteps: bool = False) -> Subject:
    """The teacher of family ``kind`` whose network has diffusers config ``config``, on the meta device in
    ``dtype`` (fdistill loads teachers in fp32), at ``resolution`` pixels (None: the family's default) with
    ``tokens`` text tokens (None: the family's default). Wan (``kind`` "wan", a video teacher): ``video`` is
    (frames, height, width) in pixels (None: WanPipeline's 81 x 480 x 832), ``resolution`` unused, latents
    [C, (frames - 1) / 4 + 1, height / downsample, width / downsample] (``families.wan``'s sample shape)."""
    from fdistill.data.conditions import TextCondition
    from fdistill.teachers.families import flux, qwen_image, sana, sd3, stable_diffusion

    if kind not in KINDS:
        raise ValueError(f"the memory model knows the families {', '.join(KINDS)}, not {kind!r}")
    if kind == "wan":
        return _wan_subject(config, video, tokens, tap_block, downsample, dtype, frozen_bytes, name, expand_timesteps)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    downsample = downsample or (32 if kind == "sana" else 8)
    resolution = resolution or default_resolution(kind, config, downsample)
    latent = resolution // downsample
    tokens = tokens or default_tokens(kind)
    cls = _network_class(kind)
    if kind in ("sd15", "sdxl"):
        config["sample_size"] = latent
    from fdistill.teachers.pipeline_folders import quiet

    with torch.device("meta"), quiet():
        network = cls.from_config(config).to(dtype)
    c = network.config
    width = 0 if kind in ("sd15", "sdxl") else int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    if kind in ("sd15", "sdxl"):
        wrapper = stable_diffusion.SDXLUNetDenoiser if kind == "sdxl" else stable_diffusion.LatentUNetDenoiser
        denoiser, channels, backbone = wrapper(network, SD_SCHEDULER), int(c["in_channels"]), "unet"
    elif kind == "sd3":
        denoiser = sd3.SD3Denoiser(network, latent, int(c["in_channels"]), width, None, tap_block, 1.0,
                                   int(c["patch_size"]))
        channels, backbone = int(c["in_channels"]), "transformer"
    elif kind == "flux":
        g = (guidance or flux.GUIDANCE) if c.get("guidance_embeds") else None
        channels, backbone = int(c["in_channels"]) // 4, "transformer"
        denoiser = flux.FluxDenoiser(network, latent, channels, width, None, tap_block, 1.0, guidance=g)
    elif kind == "sana":
        channels, backbone = int(c["in_channels"]), "transformer"
        denoiser = sana.SanaDenoiser(network, latent, channels, width, None, tap_block, 1.0, int(c["patch_size"]),
                                     timestep_scale=float(c.get("timestep_scale") or 1.0))
    else:
        channels, backbone = int(c.get("out_channels") or 16), "transformer"
        denoiser = qwen_image.QwenImageDenoiser(network, latent, channels, width, None, tap_block, 1.0)
    denoiser = denoiser.to("meta")
    denoiser.feature_resolutions = [min(denoiser.encoder_resolutions)]  # disc_resolutions: [mid], every preset's

    def condition(batch: int) -> TextCondition:
        def empty(*shape, dtype=torch.float32):
            return torch.empty(*shape, device="meta", dtype=dtype)

        if kind == "sd15":
            return TextCondition(empty(batch, 77, c["cross_attention_dim"]))
        if kind == "sdxl":
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            return TextCondition(empty(batch, 77, c["cross_attention_dim"]), empty(batch, pooled), empty(batch, 6))
        if kind in ("sd3", "flux"):
            embeds = empty(batch, tokens, c["joint_attention_dim"])
            return TextCondition(embeds, empty(batch, c["pooled_projection_dim"]))
        dim = c["caption_channels"] if kind == "sana" else c["joint_attention_dim"]
        return TextCondition(empty(batch, tokens, dim), mask=empty(batch, tokens, dtype=torch.int64))

    from fdistill.teachers.families.flux import FluxTeacher
    from fdistill.teachers.families.qwen_image import QwenImageTeacher
    from fdistill.teachers.families.sana import SanaTeacher
    from fdistill.teachers.families.sd3 import SD3Teacher
    from fdistill.teachers.families.stable_diffusion import SD15Teacher

    targets = {"sd3": SD3Teacher, "flux": FluxTeacher, "sana": SanaTeacher,
               "qwen_image": QwenImageTeacher}.get(kind, SD15Teacher).lora_targets
    return Subject(name or kind, kind, denoiser, backbone, (channels, latent, latent), condition, list(targets),
                   frozen_bytes, resolution)


def _wan_subject(config: dict, video: tuple[int, int, int] | None, tokens: int | None, tap_block: int | None,
                 downsample: int | None, dtype: torch.dtype, frozen_bytes: int, name: str | None,
                 expand_timesteps: bool) -> Subject:
    """``meta_subject`` for Wan: ``WanTransformer3DModel`` on the meta device in ``families.wan.WanDenoiser`` on
    latents of a (frames, height, width) video, umT5 states [B, tokens, text_dim] without a mask (WanPipeline's)."""
    from fdistill.data.conditions import TextCondition
    from fdistill.data.video import check_frame_count
    from fdistill.teachers.families import wan
    from fdistill.teachers.pipeline_folders import quiet

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    frames, height, width = video or (wan.NUM_FRAMES, wan.HEIGHT, wan.WIDTH)
    downsample = downsample or 8  # AutoencoderKLWan's scale_factor_spatial (Wan2.2-TI2V's VAE: 16)
    check_frame_count(frames)
    if height % (2 * downsample) or width % (2 * downsample):
        raise ValueError(f"a Wan video's height and width are multiples of {2 * downsample} pixels, got "
                         f"{height} x {width}")
    latent = ((frames - 1) // 4 + 1, height // downsample, width // downsample)
    with torch.device("meta"), quiet():
        network = _network_class("wan").from_config(config).to(dtype)
    c = network.config
    width_ = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    channels = int(c["in_channels"])
    denoiser = wan.WanDenoiser(network, latent, channels, width_, None, tap_block, 1.0, expand_timesteps).to("meta")
    denoiser.feature_resolutions = [min(denoiser.encoder_resolutions)]  # the wan preset's disc_resolutions: [mid]
    tokens = tokens or default_tokens("wan")
    pt, ph, pw = denoiser.patch_size

    def condition(batch: int) -> TextCondition:
        return TextCondition(torch.empty(batch, tokens, int(c["text_dim"]), device="meta"))

    return Subject(name or "wan", "wan", denoiser, "transformer", (channels, *latent), condition,
                   list(wan.WanTeacher.lora_targets), frozen_bytes, 0, (frames, height, width),
                   (latent[0] // pt, latent[1] // ph, latent[2] // pw))


# ---------------------------------------------------------------------------------------------------------------
# A pipeline folder's teacher, before its weights load


def _safetensors_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} from a safetensors file's header (nothing else is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def component_bytes(folder: Path, as_stored: bool) -> int:
    """The bytes a component folder's weights take once loaded: as stored in its safetensors (transformers loads
    with ``dtype="auto"``), or in fp32 (diffusers networks, as ``pipeline_folders.load_network`` loads them)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        for dtype, shape in _safetensors_tensors(file).values():
            total += math.prod(shape) * (DTYPE_BYTES.get(dtype, 4) if as_stored else 4)
    return total


def folder_subject(path: str | Path, resolution: int | None = None, options: dict | None = None,
                   text_encoders: bool = True) -> Subject | None:
    """The teacher of pipeline folder ``path`` on the meta device, its frozen components' bytes read from their
    safetensors headers (the text encoders only with ``text_encoders``: a run from latent shards releases them);
    None when it is not a pipeline folder of a family the model knows."""
    from fdistill.io import read_json_object
    from fdistill.teachers.latent_t2i import LatentTextToImageTeacher
    from fdistill.teachers.open import family_of

    path = Path(path)
    if not (path / "model_index.json").is_file():
        return None
    family = family_of(path)
    if not (isinstance(family, type) and issubclass(family, LatentTextToImageTeacher)) or family.kind not in KINDS:
        return None
    opts = family.parse_options(options)
    index = read_json_object(path / "model_index.json")
    if family.kind == "wan" and index.get("boundary_ratio") is not None and getattr(opts, "expert", None) is None:
        return None  # Wan2.2-A14B's routed pair is not distilled, one expert at a time is (``families.wan``)
    # an A14B expert's run holds that expert alone; transformer and transformer_2 share one architecture
    config = read_json_object(path / family.backbone / "config.json")
    vae = read_json_object(path / "vae" / "config.json")
    ratio = vae.get("spatial_compression_ratio") or vae.get("scale_factor_spatial")  # AutoencoderKLWan's (8; 16)
    if family.kind == "wan":
        ratio = ratio or 8
    blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0]
    downsample = int(ratio or 2 ** (len(blocks) - 1))
    frozen, networks = 0, {family.backbone, "transformer_2"}  # an A14B expert's run loads one of the two
    for name, entry in index.items():
        if name.startswith("_") or name in networks or not (path / name).is_dir():
            continue
        library = entry[0] if isinstance(entry, list) and entry else ""
        if library == "diffusers" or library == "transformers" and text_encoders:
            frozen += component_bytes(path / name, as_stored=library == "transformers")
    msl = getattr(opts, "max_sequence_length", None)
    video = {}
    if family.kind == "wan":  # AutoencoderKLWan: scale_factor_spatial (default 8); the video's size in options
        video = {"video": (opts.num_frames, opts.height, opts.width),
                 "expand_timesteps": bool(index.get("expand_timesteps", False))}
    return meta_subject(family.kind, config, resolution, tokens=default_tokens(family.kind, msl),
                        tap_block=getattr(opts, "tap_block", None), guidance=getattr(opts, "guidance", None),
                        downsample=downsample, frozen_bytes=frozen, name=path.name, **video)


# ---------------------------------------------------------------------------------------------------------------
# Profiles and predictions


@dataclasses.dataclass(frozen=True)
class Run:
    """The settings the memory of a run depends on (``Run.of_config``: a config's)."""

    micro_batch: int = 1  # samples per forward pass per GPU
    precision: str = "bf16"  # distill.precision: "bf16" autocast, or "fp32"
    lora_rank: int = 0  # 0: full fine-tuning of generator and fake score
    shared_base: bool = False
    checkpointing: bool = False
    gan: bool = True  # gan_weight > 0: the teacher pass with grad to its input in the student step
    r1: str = "approx"  # "exact" (double backward), "approx" (no grad) or "none" (r1_gamma 0)
    ema: bool = False
    ranks: int = 1  # data-parallel ranks
    fsdp: bool = False  # networks sharded over the ranks
    disc_head: str = "fastgen"
    disc_hidden: int = 64
    gan_attention: str = "fused"  # the student step's teacher pass (one backward: fdistill keeps the fused kernels)

    @classmethod
    def of_config(cls, cfg, ranks: int = 1) -> Run:
        d = cfg.distill
        local = d.batch_size // max(ranks, 1)
        r1 = "none" if not d.r1_gamma else d.r1_form
        return cls(micro_batch=d.micro_batch or local, precision=d.precision, lora_rank=cfg.text.lora_rank,
                   shared_base=cfg.text.shared_base, checkpointing=cfg.text.gradient_checkpointing,
                   gan=d.gan_weight > 0, r1=r1, ema=d.ema_beta is not None, ranks=ranks, fsdp=d.fsdp and ranks > 1,
                   disc_head=cfg.disc_head, disc_hidden=cfg.disc_hidden)

    def settings(self) -> str:
        parts = [f"micro_batch={self.micro_batch}", f"precision={self.precision}",
                 f"gradient_checkpointing={str(self.checkpointing).lower()}"]
        if self.lora_rank:
            parts.append(f"lora_rank={self.lora_rank}" + (" shared_base" if self.shared_base else ""))
        return " ".join(parts)


@dataclasses.dataclass
class Profile:
    """A teacher's passes counted for one precision, LoRA rank, head and attention choice: ``Affine`` bytes per
    network pass and checkpointing variant, and the parameter counts the states are made of."""

    subject: str
    params: int  # the network's parameters
    weight_bytes: int  # per parameter, as loaded
    lora: int  # parameters of one LoRA adapter (0 without LoRA)
    head: int  # the discriminator's parameters
    largest_unit_params: int  # the largest checkpointed / sharded unit (FSDP gathers one at a time)
    frozen_bytes: int
    passes: dict  # {(pass, "total" | "kept" | "unit" | "largest"): Affine}


def _lora(network: nn.Module, rank: int, targets: list[str]) -> None:
    from fdistill.teachers.pipeline_folders import add_lora

    add_lora(network, rank, targets)


def _head(subject: Subject, run: Run) -> nn.Module:
    from fdistill.networks.heads import Discriminator

    with torch.device("meta"):
        return Discriminator.conv(subject.denoiser.feature_channels(), run.disc_hidden, run.disc_head)


def _tap_module(subject: Subject) -> nn.Module:
    names = [subject.denoiser._taps[r] for r in subject.denoiser.feature_resolutions]
    return subject.network.get_submodule(names[-1])


def profile(subject: Subject, run: Run) -> Profile:
    """Count every pass of ``run``'s steps on ``subject`` at batch 1 and 2 (meta device; seconds for a 12B network).
    Adds LoRA adapters to the meta network when ``run.lora_rank`` (once)."""
    net, den = subject.network, subject.denoiser
    autocast = run.precision == "bf16"
    head = _head(subject, run)
    tap = _tap_module(subject)
    counts: dict[str, list[PassCount]] = {}

    def inputs(batch: int, grad: bool):
        x = torch.empty(batch, *subject.sample_shape, device="meta").requires_grad_(grad)
        return x, torch.full((batch,), 1.0, device="meta"), subject.condition(batch)

    def teacher(batch: int, attention: str) -> PassCount:
        net.requires_grad_(False)
        x, s, c = inputs(batch, True)
        with _adapters_off(net):
            return count_pass(lambda: den(x, s, c, return_features=True), [den], autocast=autocast,
                              attention=attention, backbone=net, tap=tap)

    def student(batch: int) -> PassCount:
        x, s, c = inputs(batch, False)
        return count_pass(lambda: den(x, s, c), [den], autocast=autocast, backbone=net)

    def head_pass(batch: int) -> PassCount:
        feats = {r: torch.empty(batch, ch, *(subject.feature_grid or (r, r)), device="meta").requires_grad_(True)
                 for r, ch in den.feature_channels().items()}
        return count_pass(lambda: head.head_logits(feats), [head], autocast=autocast)

    attentions = {run.gan_attention} | ({"math"} if run.r1 == "exact" else set())
    for b in (1, 2):
        for a in attentions:
            counts.setdefault(f"teacher_{a}", []).append(teacher(b, a))
        counts.setdefault("head", []).append(head_pass(b))
    lora = 0
    if run.lora_rank:
        if not any("lora_" in n for n, _ in net.named_parameters()):
            _lora(net, run.lora_rank, subject.lora_targets)
        lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        net.requires_grad_(True)
    for b in (1, 2):
        counts.setdefault("student", []).append(student(b))
    net.requires_grad_(False)

    passes = {}
    for name, (one, two) in counts.items():
        for field in ("total", "kept", "unit", "largest"):
            passes[name, field] = Affine.fit(getattr(one, field), getattr(two, field))
        if one.at_tap is not None:
            for i, field in enumerate(("total", "kept", "unit")):
                passes[name + "_tap", field] = Affine.fit(one.at_tap[i], two.at_tap[i])
    params = sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n)
    weight_bytes = next(p for n, p in net.named_parameters() if "lora_" not in n).element_size()
    units = [m for m in net.modules() if m is not net and hasattr(m, "gradient_checkpointing")] or [net]
    blocks = [b for b in den.blocks()] if hasattr(den, "blocks") else units
    largest_unit = max(sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n) for b in blocks)
    return Profile(subject.name, params, weight_bytes, lora, sum(p.numel() for p in head.parameters()),
                   largest_unit, subject.frozen_bytes, passes)


@contextlib.contextmanager
def _adapters_off(net: nn.Module):
    """The teacher's pass on a network that may carry LoRA adapters: every adapter off (as ``SharedBase``)."""
    layers = [m for m in net.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


@dataclasses.dataclass
class Estimate:
    """Predicted per-GPU bytes of a run: ``states`` (by name), the ``student`` and ``critic`` steps' activation
    peaks; ``total`` = states + the larger step."""

    run: Run
    states: dict[str, float]
    student: float
    critic: float

    @property
    def state_bytes(self) -> float:
        return sum(self.states.values())

    @property
    def activations(self) -> float:
        return max(self.student, self.critic)

    @property
    def total(self) -> float:
        return self.state_bytes + self.activations

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= HEADROOM * gpu_bytes


def states(p: Profile, run: Run) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer moments and frozen components (``Profile``'s counts)."""
    w, n, lora = p.weight_bytes, p.params, p.lora
    shard = run.ranks if run.fsdp else 1
    out = {}
    if run.lora_rank and run.shared_base:  # under FSDP the one base is sharded with its adapters
        out["frozen base (teacher; both students' base)"] = w * n / shard
        out["LoRA adapters: generator + fake score (fp32 weight, grad, AdamW)"] = 2 * 16 * lora / shard
        if run.ema:
            out["LoRA adapter: generator EMA"] = 4 * lora / shard
    elif run.lora_rank:
        out["teacher + two students' frozen bases"] = 3 * w * n / shard
        out["LoRA adapters: generator + fake score (fp32 weight, grad, AdamW)"] = 2 * 16 * lora / shard
        if run.ema:
            out["generator EMA (base + adapter)"] = (w * n + 4 * lora) / shard
    else:
        out["teacher (frozen)"] = w * n / shard
        out["generator + fake score: weights, gradients, AdamW moments"] = 2 * 4 * w * n / shard
        if run.ema:
            out["generator EMA"] = w * n / shard
    out["discriminator head (fp32 weight, grad, AdamW)"] = 16 * p.head
    out["text encoders + VAE (frozen)"] = p.frozen_bytes
    return out


def pass_peak(p: Profile, name: str, batch: int, checkpointed: bool) -> float:
    """One pass alone, forward then backward: what it saves (with checkpointing: what is kept, plus the largest
    unit recomputed), plus twice the largest tensor an op makes. What ``tests/test_memory_model.py`` measures."""
    saved = p.passes[name, "kept" if checkpointed else "total"].at(batch)
    unit = p.passes[name, "unit"].at(batch) if checkpointed else 0.0
    return saved + unit + 2 * p.passes[name, "largest"].at(batch)


def estimate(p: Profile, run: Run) -> Estimate:
    """The per-GPU peak of ``run`` from a ``Profile`` counted with the same precision, LoRA rank and head."""
    b, ck = run.micro_batch, run.checkpointing

    def get(name: str, field: str) -> float:
        return p.passes[name, field].at(b)

    def saved(name: str, checkpointed: bool) -> float:
        return get(name, "kept" if checkpointed else "total")

    def unit(name: str, checkpointed: bool) -> float:
        return get(name, "unit") if checkpointed else 0.0

    gan = f"teacher_{run.gan_attention}"
    trainable = p.lora if run.lora_rank else p.params
    # autocast keeps a bf16 copy of each trainable fp32 weight for its region; without checkpointing those copies
    # are among the saved tensors already
    cache = 2 * trainable if ck and run.precision == "bf16" and (run.lora_rank or p.weight_bytes == 4) else 0.0
    gather = 2 * p.largest_unit_params * p.weight_bytes if run.fsdp else 0.0
    transient = 2 * max(get("student", "largest"), get(gan, "largest")) + gather
    gen = saved("student", ck)
    head = get("head", "total")
    heads = head + p.passes["head", "total"].per_sample * b  # fake and real features; one autocast copy of weights
    if run.gan:
        # the teacher's network is checkpointed with the students' (shared base or not)
        end_of_teacher = gen + saved(gan, ck) + cache
        backward = gen + saved(gan + "_tap", ck) + head + max(unit("student", ck), unit(gan, ck))
        student = max(end_of_teacher, backward) + transient
    else:
        student = gen + cache + unit("student", ck) + transient
    r1 = 2 * get("teacher_math_tap", "total") if run.r1 == "exact" else 0.0
    critic = gen + cache + r1 + heads + unit("student", ck) + transient
    return Estimate(run, states(p, run), student, critic)


def largest_batch(p: Profile, run: Run, gpu_bytes: float, limit: int = 4096) -> int:
    """The most samples per forward pass that fit ``gpu_bytes`` (``HEADROOM`` of it usable); 0: not even one."""
    best = 0
    while best < limit and estimate(p, dataclasses.replace(run, micro_batch=best + 1)).fits(gpu_bytes):
        best += 1
    return best


# ---------------------------------------------------------------------------------------------------------------
# The refusal before a run that will not fit


def suggestions(p: Profile, run: Run, gpu_bytes: float, local_batch: int) -> list[tuple[Run, Estimate]]:
    """Runs that fit: the largest micro_batch dividing ``local_batch`` as the run is, then with checkpointing."""
    out = []
    for ck in dict.fromkeys((run.checkpointing, True)):
        for m in sorted((m for m in range(1, local_batch + 1) if local_batch % m == 0), reverse=True):
            r = dataclasses.replace(run, micro_batch=m, checkpointing=ck)
            e = estimate(p, r)
            if e.fits(gpu_bytes):
                out.append((r, e))
                break
    return out


def gpu_memory(device: torch.device) -> int:
    """Total memory of CUDA device ``device`` in bytes."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def check_distill(cfg, teacher_path: str | Path, device: torch.device, ranks: int = 1) -> Estimate | None:
    """Refuse, in one line, a ``distill`` run predicted not to fit the CUDA device it is on (before the teacher's
    weights load), naming settings that would; nothing for other devices, teachers the model does not know, or
    ``distill.memory_check: false``. Returns the estimate (None when not checked)."""
    device = torch.device(device)
    if device.type != "cuda" or not cfg.distill.memory_check:
        return None
    run = Run.of_config(cfg, ranks)
    try:
        shards = (Path(cfg.data) / "index.json").is_file()  # latent shards hold the prompts: no text encoders
        subject = folder_subject(teacher_path, cfg.text.resolution, cfg.teacher_options, text_encoders=not shards)
        if subject is None:
            return None
        prof = profile(subject, run)
    except Exception as e:  # the model is an aid: a folder it cannot read is the loader's to refuse, in its words
        warnings.warn(f"memory check skipped: {teacher_path} could not be sized on the meta device "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:200]})", stacklevel=2)
        return None
    have = gpu_memory(device)
    est = estimate(prof, run)
    if est.fits(have):
        return est
    local = cfg.distill.batch_size // max(ranks, 1)
    fixes = []
    for r, e in suggestions(prof, run, have, local):
        keys = [f"distill.micro_batch={r.micro_batch}"]
        if r.checkpointing != run.checkpointing:
            keys.append("text.gradient_checkpointing=true")
        fixes.append(f"{' '.join(keys)} ({e.total / GB:.1f} GB)")
    states_gb = est.state_bytes / GB
    if fixes:
        advice = "would fit: " + "; or ".join(fixes)
    else:
        ways = [] if run.lora_rank and run.shared_base else ["text.lora_rank with text.shared_base",
                                                               "FSDP over more GPUs"]
        head = 16 * prof.head / GB
        if run.disc_head == "fastgen" and head > 1:
            ways.append(f"disc_head=fdistill (the FastGen head's states are {head:.1f} GB)")
        advice = (f"nothing fits this GPU by micro_batch and checkpointing (the states alone are {states_gb:.1f} GB): "
                  f"try {', '.join(ways + ['a larger GPU'])}")
    raise ValueError(f"{subject.name} at {subject.size} with {run.settings()} is predicted to need "
                     f"{est.total / GB:.1f} GB per GPU (states {states_gb:.1f} + activations "
                     f"{est.activations / GB:.1f}), more than {HEADROOM:.0%} of this GPU's {have / GB:.1f} GB; "
                     f"{advice}; distill.memory_check=false runs it anyway (docs/text-to-image.md, What fits)")
