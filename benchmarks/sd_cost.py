"""Cost of Algorithm 1 with Stable Diffusion v1.5 and SDXL UNets as teacher, fake score and generator (random
weights built from the architectures' configs, nothing downloaded); per-GPU weights and states for the
flow-matching transformers SD3.5-Large, SD3.5-Medium, FLUX.1-dev, SANA-1600M and Qwen-Image (--memory --flow).

    python benchmarks/sd_cost.py --memory                  # per-GPU memory model, meta device, no network run
    python benchmarks/sd_cost.py --memory --flow           # SD3.5 / FLUX / SANA / Qwen-Image weights + states
    python benchmarks/sd_cost.py --memory --flow --lora-rank 128 --precomputed-embeddings
    python benchmarks/sd_cost.py --model sd15              # time every pass on this machine (CPU, fp32)
    python benchmarks/sd_cost.py --model sdxl --batch 1 --steps 2 --warmup 1
    python benchmarks/sd_cost.py --model sd15 --passes fwd # only some passes (fwd, fwd_bwd, mid_grad, mid)
    python benchmarks/sd_cost.py --tiny --model sd15       # tiny configs, same code path (a quick check)

Timing (--model): at 512 px for SD1.5 (64x64 latent) and 1024 px for SDXL (128x128 latent), fp32, with and without
gradient checkpointing, each pass a step needs, alone: the full forward without grad; forward + backward to the
weights; forward to the mid block with grad to the input only (a forward hook on ``unet.mid_block`` stops the
forward, then ``torch.autograd.grad`` to the input, the teacher's part of the GAN term); forward to the mid block
without grad (the discriminator's features). Each pass runs in a fresh subprocess (this script with ``--pass NAME``)
so that each reports its own peak resident set (which includes building the network), under a data-segment
limit (RLIMIT_DATA) so that a pass that would not fit fails with an allocation error instead of waking the OOM
killer. Prints medians over --steps steps after --warmup steps and the student-step, critic-step and iteration
floors as sums of those passes (an iteration of Algorithm 1 is one student step and tau-1 critic steps).

Memory (--memory): bytes per GPU for the three networks' states from the parameter counts (meta device) and the
activations saved for backward, measured by summing the distinct storages that
``torch.autograd.graph.saved_tensors_hooks`` sees in one forward on the meta device at the real resolution (at
batch 1 and 2: per-sample slope and fixed intercept), with CUDA's bf16 autocast policy emulated on meta tensors;
then the largest per-GPU batch that fits 80 GB and 141 GB GPUs under data parallel and FSDP (FULL_SHARD, 8 GPUs).

Flow-matching transformers (--memory --flow): weights + optimizer states per GPU (activations not modelled) on 1 and
8 GPUs for (a) full fine-tuning of generator and fake score under FSDP (the same bytes per parameter as the UNet
model above) and (b) the shared-base LoRA mode (one frozen bf16 base, also the teacher, and two LoRA adapters on the
attention projections, optimizer states only for adapters and the discriminator head); see FLOW_ASSUMPTIONS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from diffusers import (  # noqa: E402
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

# UNet configs as on the Hugging Face hub (unet/config.json), fields left at diffusers' defaults omitted where the
# hub file has the default value. SD1.5: stable-diffusion-v1-5/stable-diffusion-v1-5 (runwayml's), 859,520,964
# parameters (the count diffusers' ModelMixin.num_parameters docstring gives for it). SDXL:
# stabilityai/stable-diffusion-xl-base-1.0, i.e. Stability-AI/generative-models configs/inference/sd_xl_base.yaml
# (model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2], transformer_depth [1, 2, 10],
# num_head_channels 64, context_dim 2048, adm_in_channels 2816, linear projections) as diffusers'
# create_unet_diffusers_config_from_ldm maps it; 2,567,463,684 parameters.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=768, attention_head_dim=8, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    mid_block_scale_factor=1, center_input_sample=False)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    mid_block_scale_factor=1, center_input_sample=False, upcast_attention=False)
# Same block types and conditioning at toy width (--tiny): 64x64 latent, 32/64 channels.
TINY_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TINY_SDXL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    unet: dict
    pixels: int  # image side; the latent side is unet["sample_size"] (VAE factor 8)
    text_dim: int  # encoder_hidden_states (B, 77, text_dim)
    pooled_dim: int | None  # SDXL's added_cond_kwargs: text_embeds (B, pooled_dim) and time_ids (B, 6)
    tau: int  # the paper's critic steps per student step
    global_batch: int  # the recipe's batch over 8 GPUs
    expected_params: int | None

    @property
    def latent(self) -> int:
        return self.unet["sample_size"]


SPECS = {
    "sd15": Spec("SD1.5", SD15_UNET, 512, 768, None, tau=10, global_batch=1024, expected_params=859_520_964),
    "sdxl": Spec("SDXL", SDXL_UNET, 1024, 2048, 1280, tau=5, global_batch=384, expected_params=2_567_463_684),
}
TINY_SPECS = {
    "sd15": Spec("tiny SD1.5-like", TINY_SD15_UNET, 512, 32, None, tau=10, global_batch=1024, expected_params=None),
    "sdxl": Spec("tiny SDXL-like", TINY_SDXL_UNET, 512, 64, 32, tau=5, global_batch=384, expected_params=None),
}
N_GPUS = 8
GPUS_GB = (80, 141)
HEADROOM = 0.9  # usable fraction of a GPU's memory (CUDA context, NCCL buffers, allocator fragmentation, workspaces)

PASSES = {  # name: what it times
    "fwd": "full forward, no grad",
    "fwd_bwd": "forward + backward to the weights",
    "mid_grad": "forward to the mid block, grad to the input only",
    "mid": "forward to the mid block, no grad",
}
GRAD_PASSES = ("fwd_bwd", "mid_grad")  # the passes gradient checkpointing changes


def build_unet(spec: Spec, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(**spec.unet)


def unet_inputs(spec: Spec, batch: int, device: str | torch.device, dtype=torch.float32):
    """Noisy latent, timesteps and conditioning keyword arguments of one call at the spec's resolution."""
    x = torch.randn(batch, 4, spec.latent, spec.latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, spec.text_dim, device=device, dtype=dtype)}
    if spec.pooled_dim is not None:  # pooled text embedding; original size, crop corner, target size
        time_ids = torch.tensor([spec.pixels, spec.pixels, 0, 0, spec.pixels, spec.pixels], dtype=dtype)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, spec.pooled_dim, device=device, dtype=dtype),
                                     "time_ids": time_ids.to(device).expand(batch, 6)}
    return x, t, cond


class _ReachedMidBlock(Exception):
    pass


def forward_to_mid(unet: UNet2DConditionModel, x, t, cond) -> torch.Tensor:
    """The mid block's output; the forward stops there (the up path never runs)."""
    features = []

    def stop(module, args, output):
        features.append(output)
        raise _ReachedMidBlock

    handle = unet.mid_block.register_forward_hook(stop)
    try:
        with contextlib.suppress(_ReachedMidBlock):
            unet(x, t, **cond)
    finally:
        handle.remove()
    return features[0]


# ----------------------------------------------------------------------------------------------------------------
# Timing: one pass per subprocess


def timeit(fn, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def run_pass(spec: Spec, name: str, checkpointing: bool, batch: int, warmup: int, steps: int) -> dict:
    """Build the network, time one pass; the result as a dict (seconds or error, peak RSS)."""
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        unet = build_unet(spec)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        build_s = time.perf_counter() - t0
        x, t, cond = unet_inputs(spec, batch, "cpu")

        def fwd():
            with torch.no_grad():
                unet(x, t, **cond)

        def fwd_bwd():
            unet.zero_grad(set_to_none=True)
            unet(x, t, **cond).sample.square().mean().backward()

        def mid_grad():  # frozen weights: only the input gets a gradient
            x_in = x.detach().requires_grad_(True)
            torch.autograd.grad(forward_to_mid(unet, x_in, t, cond).square().mean(), x_in)

        def mid():
            with torch.no_grad():
                forward_to_mid(unet, x, t, cond)

        if name == "mid_grad":
            unet.requires_grad_(False)
        fn = {"fwd": fwd, "fwd_bwd": fwd_bwd, "mid_grad": mid_grad, "mid": mid}[name]
        seconds = timeit(fn, warmup, steps)
        return {"seconds": seconds, "build_s": build_s, "peak_mb": peak_rss_mb()}
    except (RuntimeError, MemoryError) as e:
        kind = "did not fit" if is_out_of_memory(e) else "failed"
        return {"error": f"{kind}: {' '.join(str(e).split())[:200] or type(e).__name__}", "peak_mb": peak_rss_mb()}


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 8.0


def time_passes(args, spec: Spec) -> None:
    names = args.passes.split(",") if args.passes else list(PASSES)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise SystemExit(f"unknown pass(es) {unknown}; expected some of {list(PASSES)}")
    variants = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing_variants]
    jobs = [(n, c) for n in names for c in (variants if n in GRAD_PASSES else (False,))]
    limit_gb = args.mem_limit_gb or 0.9 * mem_available_gb()
    results = {}
    for name, ckpt in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--pass", name,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--mem-limit-gb", f"{limit_gb:.2f}"] + (["--checkpointing"] if ckpt else []) + \
              (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            res = json.loads(lines[-1][len("RESULT "):])
        elif proc.returncode < 0:
            sig = -proc.returncode
            res = {"error": f"{'did not fit' if sig == 9 else 'failed'}: killed by signal {sig}"}
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            res = {"error": f"failed (exit {proc.returncode}): {tail[:200]}"}
        results[name, ckpt] = res
        what = f"{res['seconds']:.3f} s (built in {res['build_s']:.1f} s)" if "seconds" in res else res["error"]
        print(f"  measured {name}{' (checkpointing)' if ckpt else ''}: {what}", flush=True)

    n_params = sum(p.numel() for p in build_unet(spec, "meta").parameters())
    print(f"\n{spec.name} UNet ({n_params:,} parameters), {spec.pixels} px ({spec.latent}x{spec.latent} latent), "
          f"batch {args.batch}, fp32, CPU ({os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} threads); "
          f"median of {args.steps} after {args.warmup} warm-up; each pass in its own process (peak RSS includes "
          f"building the network; RLIMIT_DATA {limit_gb:.1f} GiB)\n")
    print("| pass | gradient checkpointing | seconds | peak RSS MB |")
    print("|---|---|---|---|")
    for (name, ckpt), res in results.items():
        secs = f"{res['seconds']:.3f}" if "seconds" in res else res["error"].replace("|", "/")
        mb = f"{res['peak_mb']:.0f}" if "peak_mb" in res else ""
        print(f"| {name}: {PASSES[name]} | {'on' if ckpt else 'off' if name in GRAD_PASSES else 'n/a (no grad)'} "
              f"| {secs} | {mb} |")

    def secs(name, ckpt=False):
        res = results.get((name, ckpt if name in GRAD_PASSES else False), {})
        return res.get("seconds")

    print("\n| floor (sum of passes timed alone) | gradient checkpointing | seconds | seconds per sample |")
    print("|---|---|---|---|")
    student_terms = "gen fwd_bwd + teacher mid_grad + (fwd - mid: rest of the conditional teacher fwd) + " \
                    "teacher fwd (CFG unconditional half) + fake fwd"
    critic_terms = "gen fwd + fake fwd_bwd + 2 x teacher mid (discriminator's fake and real features)"
    for ckpt in variants:
        parts = {"fwd": secs("fwd"), "fwd_bwd": secs("fwd_bwd", ckpt), "mid_grad": secs("mid_grad", ckpt),
                 "mid": secs("mid")}
        missing = sorted(k for k, v in parts.items() if v is None)
        state = "on" if ckpt else "off"
        if missing:
            print(f"| student step, critic step, iteration | {state} | n/a (missing {', '.join(missing)}) | |")
            continue
        student = parts["fwd_bwd"] + parts["mid_grad"] + (parts["fwd"] - parts["mid"]) + 2 * parts["fwd"]
        critic = parts["fwd"] + parts["fwd_bwd"] + 2 * parts["mid"]
        iteration = student + (spec.tau - 1) * critic
        briefed = student - (parts["fwd"] - parts["mid"])
        for label, s in [(f"student step = {student_terms}", student),
                         ("student step without the rest of the conditional teacher fwd", briefed),
                         (f"critic step = {critic_terms}", critic),
                         (f"iteration = student + (tau - 1) x critic, tau = {spec.tau}", iteration)]:
            print(f"| {label} | {state} | {s:.3f} | {s / args.batch:.3f} |")


# ----------------------------------------------------------------------------------------------------------------
# Memory model


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on meta tensors, saving what a fused (flash / memory-efficient)
    kernel saves for backward: q, k, v, the output and the fp32 log-sum-exp; never the L x L attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("memory accounting only")


class _MetaAutocast(TorchFunctionMode):
    """CUDA's autocast policy for the ops a UNet uses, on meta tensors (torch.autocast does not apply to them):
    convolutions, linear layers and matmuls run in bf16 (inputs and weights cast), group/layer norm and softmax in
    fp32, everything else in its inputs' dtype. Attention counts as a fused kernel (_FusedAttention), also without
    autocast."""

    LOW = {F.conv2d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm}
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}

    def __init__(self, autocast: bool):
        super().__init__()
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        if self.autocast and (func in self.LOW or func in self.FP32):
            dtype = torch.bfloat16 if func in self.LOW else torch.float32

            def cast(a):
                return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclasses.dataclass
class Affine:
    """bytes = fixed + per_sample x batch"""
    per_sample: float
    fixed: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def saved_bytes(unet, spec: Spec, batch: int, *, kind: str, autocast: bool, units: set) -> tuple[int, int]:
    """One forward on the meta device: (bytes of the distinct storages saved for backward, parameters excluded;
    the most bytes saved inside one of `units`, the modules gradient checkpointing recomputes one at a time).
    kind "train": full forward, grad to the weights; "mid_grad": forward to the mid block, grad to the input."""
    dtype = next(unet.parameters()).dtype
    x, t, cond = unet_inputs(spec, batch, "meta", dtype)
    if kind == "mid_grad":
        x.requires_grad_(True)
    params = {_storage_key(p) for p in unet.parameters()}
    sizes, per_unit, current = {}, {}, [None]

    def pack(tensor):
        key = _storage_key(tensor)
        if key not in params and key not in sizes:
            sizes[key] = tensor.untyped_storage().nbytes()
            if current[0] is not None:
                per_unit[current[0]] = per_unit.get(current[0], 0) + sizes[key]
        return tensor  # meta: holding it costs nothing; keeps the storage (and its key) alive

    def enter(module, args):
        current[0] = id(module)

    def leave(module, args, output):
        current[0] = None

    handles = [h for m in units for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with _MetaAutocast(autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if kind == "train":
                unet(x, t, **cond)
            else:
                forward_to_mid(unet, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return sum(sizes.values()), max(per_unit.values(), default=0)


def measure_activations(spec: Spec) -> tuple[int, dict]:
    """Parameter count and {(network pass, checkpointing, "bytes" | "unit"): Affine} from batch-1 and batch-2
    forwards on the meta device. Network passes: "gen" (generator / fake score, grad to weights, fp32 weights,
    bf16 autocast), "gen_fp32" (the same without autocast, for reference), "teacher_bf16" / "teacher_fp32" (frozen
    teacher to the mid block, grad to the input, bf16 autocast)."""
    unet = build_unet(spec, "meta")
    n_params = sum(p.numel() for p in unet.parameters())
    units = set()

    def checkpoint_recording(module, *args):  # diffusers' default, without the RNG state (meta has none)
        units.add(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 preserve_rng_state=False)

    runs = [("gen", "train", True, torch.float32, True), ("gen_fp32", "train", False, torch.float32, True),
            ("teacher_fp32", "mid_grad", True, torch.float32, False),
            ("teacher_bf16", "mid_grad", True, torch.bfloat16, False)]
    out = {}
    for ckpt in (True, False):  # checkpointing first: it records the units for the run without
        if ckpt:
            unet.enable_gradient_checkpointing(checkpoint_recording)
        else:
            unet.disable_gradient_checkpointing()
        for label, kind, autocast, dtype, trainable in runs:
            unet.to(dtype).requires_grad_(trainable)
            b1, u1 = saved_bytes(unet, spec, 1, kind=kind, autocast=autocast, units=set() if ckpt else units)
            b2, u2 = saved_bytes(unet, spec, 2, kind=kind, autocast=autocast, units=set() if ckpt else units)
            out[label, ckpt, "bytes"] = Affine(b2 - b1, 2 * b1 - b2)
            if not ckpt:  # what one checkpointed unit saves when it is recomputed in backward
                out[label, True, "unit"] = Affine(u2 - u1, 2 * u1 - u2)
    return n_params, out


def memory_report(spec: Spec) -> None:
    t0 = time.perf_counter()
    n, act = measure_activations(spec)
    GB = 1e9
    per_gpu = spec.global_batch // N_GPUS
    check = "" if spec.expected_params is None else \
        f" ({'matches' if n == spec.expected_params else 'DOES NOT MATCH'} the known {spec.expected_params:,})"
    print(f"\n## {spec.name}: {n:,} parameters{check}; {spec.pixels} px ({spec.latent}x{spec.latent} latent); "
          f"recipe: global batch {spec.global_batch} on {N_GPUS} GPUs = {per_gpu} per GPU per step, "
          f"tau = {spec.tau} (measured in {time.perf_counter() - t0:.1f} s)\n")

    print("| saved for backward, one forward (meta device) | checkpointing | per sample GB | fixed GB |")
    print("|---|---|---|---|")
    rows = [("gen", "generator / fake score, full fwd, grad to weights, fp32 weights, bf16 autocast"),
            ("gen_fp32", "generator / fake score, full fwd, grad to weights, fp32, no autocast (reference)"),
            ("teacher_bf16", "teacher (bf16 weights, frozen) to mid block, grad to input, bf16 autocast"),
            ("teacher_fp32", "teacher (fp32 weights, frozen) to mid block, grad to input, bf16 autocast")]
    for ckpt in (False, True):
        for label, text in rows:
            a = act[label, ckpt, "bytes"]
            print(f"| {text} | {'on' if ckpt else 'off'} | {a.per_sample / GB:.3f} | {a.fixed / GB:.3f} |")
    for label, text in rows[::2]:
        a = act[label, True, "unit"]
        print(f"| {text}: largest checkpointed unit, recomputed in backward (transient) | on | "
              f"{a.per_sample / GB:.3f} | {a.fixed / GB:.3f} |")

    states = {"teacher bf16": 2 * n, "teacher fp32": 4 * n}
    common = [("generator + fake score weights (fp32 masters)", 8 * n), ("gradients (fp32, generator + fake score)",
              8 * n), ("AdamW exp_avg + exp_avg_sq (fp32, generator + fake score)", 16 * n)]
    print("\n| per-GPU state | bytes | data parallel GB | FSDP FULL_SHARD / 8 GB |")
    print("|---|---|---|---|")
    for text, b in [("teacher weights, bf16 (frozen)", 2 * n), ("teacher weights, fp32 (frozen; alternative)", 4 * n),
                    *common]:
        print(f"| {text} | {b // n} x n | {b / GB:.2f} | {b / N_GPUS / GB:.2f} |")
    for t_name, t_bytes in states.items():
        total = t_bytes + sum(b for _, b in common)
        print(f"| total states, {t_name} | {total // n} x n | {total / GB:.2f} | {total / N_GPUS / GB:.2f} |")

    def activations(batch: int, teacher: str, ckpt: bool) -> float:
        """Student step's peak: the generator's saved tensors plus the teacher's (GAN term, backward through the
        teacher into the generator), plus with checkpointing one recomputed unit."""
        total = act["gen", ckpt, "bytes"].at(batch) + act[teacher, ckpt, "bytes"].at(batch)
        if ckpt:
            total += max(act["gen", True, "unit"].at(batch), act[teacher, True, "unit"].at(batch))
        return total

    print(f"\n| per-GPU peak (student step) | checkpointing | batch 1 GB | batch {per_gpu} GB |")
    print("|---|---|---|---|")
    for teacher in ("teacher_bf16", "teacher_fp32"):
        for ckpt in (False, True):
            print(f"| activations, {teacher.replace('_', ' ')} | {'on' if ckpt else 'off'} | "
                  f"{activations(1, teacher, ckpt) / GB:.2f} | {activations(per_gpu, teacher, ckpt) / GB:.2f} |")

    print(f"\nLargest per-GPU batch that fits ({HEADROOM:.0%} of the GPU usable) -> gradient-accumulation passes "
          f"for {per_gpu} per GPU (global {spec.global_batch}):\n")
    cols = [(gb, fsdp) for gb in GPUS_GB for fsdp in (False, True)]
    print("| teacher | checkpointing | " + " | ".join(f"{gb} GB, {'FSDP' if f else 'DP'}" for gb, f in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for t_name, t_bytes in states.items():
        teacher = t_name.replace(" ", "_")
        for ckpt in (False, True):
            cells = []
            for gb, fsdp in cols:
                state = (t_bytes + sum(b for _, b in common)) / (N_GPUS if fsdp else 1)
                usable = HEADROOM * gb * GB
                b = 0
                while b < 100_000 and state + activations(b + 1, teacher, ckpt) <= usable:
                    b += 1
                if b == 0:
                    cells.append(f"does not fit: states {state / GB:.1f} GB + one sample "
                                 f"{activations(1, teacher, ckpt) / GB:.1f} GB > {usable / GB:.0f} GB")
                else:
                    micro = max(m for m in range(1, min(b, per_gpu) + 1) if per_gpu % m == 0)  # micro_batch divides
                    cells.append(f"{b} -> {per_gpu // micro} x {micro}")
            print(f"| {t_name[8:]} | {'on' if ckpt else 'off'} | " + " | ".join(cells) + " |")


MEMORY_ASSUMPTIONS = f"""Assumptions of the memory model:
- P = parameters of one UNet, counted on the meta device; the discriminator head (the presets' FastGen head:
  52M parameters for SD1.5, 131M for SDXL at 1024 px, 5-6% of P) and the text encoders / VAE (latents and
  embeddings precomputed or held elsewhere) are left out; no EMA copy of the generator (it would add 4 x P,
  / {N_GPUS} under FSDP).
- States: teacher frozen (bf16 2 x P, or fp32 4 x P); generator and fake score fp32 master weights (8 x P),
  fp32 gradients for both (8 x P; with zero_grad(set_to_none=True) only one network's are alive at a time, so
  this overcounts by 4 x P), AdamW exp_avg and exp_avg_sq for both (16 x P). Data parallel replicates all of it;
  FSDP FULL_SHARD divides it by {N_GPUS} (the transient all-gathered unit of parameters is not counted).
- Activations: bytes of the distinct storages that torch.autograd.graph.saved_tensors_hooks sees in one forward
  on the meta device (nothing allocated) at the real resolution, parameters excluded, at batch 1 and 2 (slope =
  per sample, intercept = fixed); not divided by FSDP. bf16 autocast is CUDA's policy emulated on meta tensors:
  conv / linear / matmul in bf16, group / layer norm and softmax in fp32 (their fp32 input copies are saved too),
  other ops in their inputs' dtype. The fixed part is mostly the bf16 copies of fp32 weights that autocast makes
  and backward keeps (with checkpointing, only for the layers outside checkpointed units); it is counted under
  FSDP too, though FSDP with a bf16 param_dtype gathers bf16 weights instead.
- Attention is a fused kernel (flash / memory-efficient SDPA, as on an H100 / H200 in bf16): it saves q, k, v, the
  output and an fp32 log-sum-exp, never the L x L matrix (the math fallback would add L^2 x heads per layer).
- Gradient checkpointing: diffusers' enable_gradient_checkpointing (non-reentrant torch.utils.checkpoint around
  each ResnetBlock2D and BasicTransformerBlock) on all three networks; backward recomputes one unit at a time,
  counted as the largest unit's saved tensors.
- The student step is the peak: the generator's forward (grad to its weights) plus the teacher's forward to the
  mid block with grad to its input (the GAN term) stay alive until the one backward; the no-grad forwards (CFG's
  unconditional teacher half, the fake score, the rest of the conditional teacher forward) only add their working
  set, and the critic step (fake-score fwd+bwd, same size as the generator's) is smaller. Gradient buffers of
  activations during backward, the CUDA context, NCCL buffers and fragmentation are covered by using
  {HEADROOM:.0%} of the GPU (80 GB = 80e9 bytes, 141 GB = 141e9 bytes; 1 GB = 1e9 bytes throughout).
- Checked on the --tiny configs against real CPU allocations (glibc mallinfo2 growth kept by the graph): fp32
  within 4%; the same emulation with CPU autocast's policy (norms left in bf16) against torch.autocast("cpu")
  within 4%. CUDA's policy (norms in fp32) could not be checked without a GPU.
- A cell reads "b -> k x m": at most b samples per GPU per forward fit, so the recipe's per-GPU batch needs k
  gradient-accumulation passes of m samples (m divides the per-GPU batch, as distill.micro_batch must)."""


# ----------------------------------------------------------------------------------------------------------------
# Flow-matching transformers (SD3.5, FLUX.1): weights and optimizer states per GPU


# Transformer configs as on the Hugging Face hub (transformer/config.json), diffusers 0.42.1's argument names.
# SD3.5-Large: stabilityai/stable-diffusion-3.5-large, 8,056,627,520 parameters. SD3.5-Medium:
# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: a second self-attention in blocks 0..12), 2,243,171,520.
# FLUX.1-dev: black-forest-labs/FLUX.1-dev (19 double-stream, 38 single-stream blocks, guidance embedding),
# 11,901,408,320.
SD35_LARGE_DIT = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM_DIT = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
FLUX_DEV_DIT = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# SANA 1600M 1024 px: Efficient-Large-Model/Sana_1600M_1024px_diffusers (linear-attention DiT, patch 1 on the
# DC-AE's 32-channel latents, Gemma-2 captions), 1,604,462,752. Qwen-Image: Qwen/Qwen-Image (60 double-stream
# blocks on 2x2-packed 16-channel latents, Qwen2.5-VL captions), 20,430,401,088.
SANA_1600M_DIT = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, interpolation_scale=None)
QWEN_IMAGE_DIT = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))

# Frozen text encoders' parameter counts (the hub checkpoints' encoders): T5-XXL encoder (google/t5-v1_1-xxl,
# encoder only), CLIP ViT-L/14 text model, OpenCLIP ViT-bigG/14 text model (with its text projection).
# Gemma-2-2B (SANA's, the decoder without its LM head) and Qwen2.5-VL-7B (Qwen-Image's, loaded whole: language
# model 7,070,619,136, vision tower 676,550,144, LM head), counted here on the meta device from their hub configs.
TEXT_ENCODERS = {"T5-XXL": 4_762_310_656, "CLIP-L": 123_650_304, "CLIP-bigG": 694_659_840,
                 "Gemma-2-2B": 2_614_341_888, "Qwen2.5-VL-7B": 8_292_166_656}

# LoRA targets: the joint-attention projections of every block (image stream, context stream, SD3.5-Medium's
# second attention); FLUX's single-stream blocks have to_q / to_k / to_v only (their output is proj_out).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
N_GPUS_FLOW = (1, 8)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    name: str
    cls: type
    config: dict
    text_encoders: tuple[str, ...]
    expected_params: int

    def build(self, device: str | torch.device = "meta") -> nn.Module:
        with torch.device(device):
            return self.cls(**self.config)


FLOW_SPECS = {
    "sd35l": FlowSpec("SD3.5-Large", SD3Transformer2DModel, SD35_LARGE_DIT, ("CLIP-L", "CLIP-bigG", "T5-XXL"),
                      8_056_627_520),
    "sd35m": FlowSpec("SD3.5-Medium", SD3Transformer2DModel, SD35_MEDIUM_DIT, ("CLIP-L", "CLIP-bigG", "T5-XXL"),
                      2_243_171_520),
    "flux": FlowSpec("FLUX.1-dev", FluxTransformer2DModel, FLUX_DEV_DIT, ("CLIP-L", "T5-XXL"), 11_901_408_320),
    "sana": FlowSpec("SANA-1600M", SanaTransformer2DModel, SANA_1600M_DIT, ("Gemma-2-2B",), 1_604_462_752),
    "qwen_image": FlowSpec("Qwen-Image", QwenImageTransformer2DModel, QWEN_IMAGE_DIT, ("Qwen2.5-VL-7B",),
                           20_430_401_088),
}


def dit_head(channels: int) -> nn.Sequential:
    """NVlabs/FastGen's DiT discriminator head on the middle block's image tokens (reshaped to a C x H x W map):
    4x4 conv stride 2 to C / 2, GroupNorm, LeakyReLU, 1x1 conv to one logit. fdistill/networks/heads.py has no
    DiT head (its conv heads keep a UNet feature map's width), so only this one is counted here."""
    if channels % 2:
        raise ValueError(f"DiT head width must be even, got {channels}")
    half = channels // 2
    return nn.Sequential(nn.Conv2d(channels, half, 4, stride=2, padding=1), nn.GroupNorm(32, half),
                         nn.LeakyReLU(0.2), nn.Conv2d(half, 1, 1))


def lora_params(model: nn.Module, rank: int) -> tuple[int, int]:
    """(parameters of one rank-`rank` LoRA adapter, number of adapted layers): A (r x in) + B (out x r) for every
    nn.Linear among LORA_TARGETS inside the transformer blocks, shapes read off the model."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank}")
    total = layers = 0
    for name, module in model.named_modules():
        targeted = name.startswith(BLOCK_PREFIXES) and any(name.endswith("." + t) for t in LORA_TARGETS)
        if targeted and isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
            layers += 1
    return total, layers


def flow_memory_report(rank: int, precomputed: bool) -> None:
    GB = 1e9
    rows = []
    print("\n## Flow-matching transformers: weights + optimizer states per GPU (activations not modelled)\n")
    print(f"| model | parameters P (meta) | known count | head H (DiT, C -> C/2) | LoRA rank {rank}: L per adapter "
          "(layers) | text encoders T (frozen) |")
    print("|---|---|---|---|---|---|")
    for spec in FLOW_SPECS.values():
        model = spec.build("meta")
        n = sum(p.numel() for p in model.parameters())
        width = model.config.num_attention_heads * model.config.attention_head_dim
        with torch.device("meta"):
            h = sum(p.numel() for p in dit_head(width).parameters())
        lora, layers = lora_params(model, rank)
        text = 0 if precomputed else sum(TEXT_ENCODERS[e] for e in spec.text_encoders)
        check = "matches" if n == spec.expected_params else f"DOES NOT MATCH {spec.expected_params:,}"
        enc = "precomputed: 0" if precomputed else f"{' + '.join(spec.text_encoders)} = {text:,}"
        print(f"| {spec.name} | {n:,} | {check} | {h:,} (C = {width}) | {lora:,} ({layers}) | {enc} |")
        # bytes: FSDP FULL_SHARD divides `sharded` by the GPU count; the frozen text encoders are replicated
        full = 2 * n + 2 * (4 + 4 + 8) * n + 16 * h  # teacher bf16; gen + fake: fp32 master, fp32 grad, AdamW
        shared = 2 * n + 2 * 16 * lora + 16 * h  # one frozen bf16 base; two adapters and the head: 16 B / param
        rows += [(spec.name, "full FT (FSDP)", full, 2 * text),
                 (spec.name, f"shared-base LoRA r{rank}", shared, 2 * text)]
    print("\n| model | mode | GPUs | weights+states GB per GPU | fits 80 GB? | fits 141 GB? |")
    print("|---|---|---|---|---|---|")
    for name, mode, sharded, replicated in rows:
        for gpus in N_GPUS_FLOW:
            per_gpu = sharded / gpus + replicated
            cells = []
            for gb in GPUS_GB:
                left = HEADROOM * gb * GB - per_gpu
                cells.append(f"yes ({left / GB:.0f} GB left)" if left > 0 else f"no ({-left / GB:.0f} GB over)")
            print(f"| {name} | {mode} | {gpus} | {per_gpu / GB:.1f} | " + " | ".join(cells) + " |")
    print("\n" + FLOW_ASSUMPTIONS)


FLOW_ASSUMPTIONS = f"""Assumptions (flow-matching transformers):
- Activations are not modelled: "GB left" is what remains for activations, the all-gathered FSDP unit and
  workspaces out of {HEADROOM:.0%} of the GPU (80 GB = 80e9 bytes, 141 GB = 141e9 bytes; 1 GB = 1e9 bytes).
- P: the transformer's parameters, built from the hub config on the meta device. H: the discriminator head,
  NVlabs/FastGen's DiT head on the middle block's image tokens (Conv2d(C, C/2, 4, stride 2, padding 1),
  GroupNorm, LeakyReLU, Conv2d(C/2, 1, 1); C = heads x head dim), trained: fp32 weight, grad, AdamW = 16 B / param.
- (a) full fine-tuning, as in the UNet model: teacher frozen bf16 (2 x P); generator and fake score fp32 masters
  (8 x P), fp32 gradients (8 x P), AdamW exp_avg + exp_avg_sq (16 x P); 34 x P + 16 x H, all FSDP FULL_SHARD
  sharded (1 GPU: nothing sharded). No EMA copy of the generator (it would add 4 x P / GPUs).
- (b) shared-base LoRA: one frozen bf16 base (2 x P), which is also the teacher; generator and fake score are two
  LoRA adapters on it (A: r x in, B: out x r, fp32 weight + grad + AdamW = 16 B / param each, L per adapter) on
  to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out of every block (as present);
  2 x P + 32 x L + 16 x H, sharded like (a).
- Text encoders (frozen, bf16, 2 B / param, replicated on every GPU, not sharded): T5-XXL encoder 4,762,310,656,
  CLIP-L text 123,650,304, CLIP-bigG text 694,659,840 (SD3.5: all three; FLUX.1: CLIP-L + T5-XXL); SANA:
  Gemma-2-2B 2,614,341,888; Qwen-Image: Qwen2.5-VL-7B 8,292,166,656; 0 with --precomputed-embeddings. The VAE
  (latents precomputed or decoded elsewhere) is not counted."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SPECS), help="time this model's passes (with --memory: only this model)")
    p.add_argument("--memory", action="store_true", help="print the per-GPU memory model (meta device, fast)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--passes", help=f"comma-separated subset of {','.join(PASSES)} (default: all)")
    p.add_argument("--checkpointing-variants", choices=["both", "off", "on"], default="both",
                   help="gradient checkpointing for the passes with grad: both (default), off or on")
    p.add_argument("--flow", action="store_true",
                   help="with --memory: the flow transformers' weights + states instead of the UNets")
    p.add_argument("--lora-rank", type=int, default=64, help="with --memory --flow: LoRA rank (default 64)")
    p.add_argument("--precomputed-embeddings", action="store_true",
                   help="with --memory --flow: text embeddings precomputed (text encoders not counted)")
    p.add_argument("--tiny", action="store_true", help="tiny configs with the same code path (validation)")
    p.add_argument("--mem-limit-gb", type=float, default=0.0,
                   help="data-segment limit (RLIMIT_DATA) per pass, GiB (default: 90%% of MemAvailable)")
    p.add_argument("--pass", dest="pass_name", choices=list(PASSES), help=argparse.SUPPRESS)  # child process
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()
    specs = TINY_SPECS if args.tiny else SPECS

    if args.pass_name:  # child: one pass, one JSON line
        if args.mem_limit_gb:
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        res = run_pass(specs[args.model], args.pass_name, args.checkpointing, args.batch, args.warmup, args.steps)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.lora_rank < 1:
        p.error(f"--lora-rank must be a positive integer, got {args.lora_rank}")
    if args.flow and not args.memory:
        p.error("--flow goes with --memory (the transformers are only sized, not timed)")
    if args.memory and args.flow:
        flow_memory_report(args.lora_rank, args.precomputed_embeddings)
        return
    if args.memory:
        for key in [args.model] if args.model else list(specs):
            memory_report(specs[key])
        print("\n" + MEMORY_ASSUMPTIONS)
        return
    if not args.model:
        p.error("give --model sd15|sdxl (timing) or --memory")
    time_passes(args, specs[args.model])


if __name__ == "__main__":
    main()
