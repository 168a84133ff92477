"""Cost of Algorithm 1 with Stable Diffusion v1.5 and SDXL UNets as teacher, fake score and generator (random
weights built from the architectures' configs, nothing downloaded), and per-GPU memory of whole f-distill steps for
the UNets, the flow-matching transformers SD3.5-Medium / Large, FLUX.1-dev, SANA-1600M and Qwen-Image, and the
video transformers Wan2.1-T2V-1.3B / 14B.

    python benchmarks/sd_cost.py --memory                  # per-GPU memory of SD1.5 / SDXL (meta device)
    python benchmarks/sd_cost.py --memory --flow           # SD3.5, FLUX.1, SANA, Qwen-Image at 512 / 1024 px
    python benchmarks/sd_cost.py --memory --video          # Wan2.1 1.3B / 14B, 81 frames of 480 x 832 px
    python benchmarks/sd_cost.py --memory --family flux --gan-attention math --lora-rank 128
    python benchmarks/sd_cost.py --memory --flow --captioned-images  # text encoders kept for online encoding
    python benchmarks/sd_cost.py --memory --family flux --set disc_head=fdistill  # a config override, every row
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

Memory (--memory): ``fdistill.memory`` (the model ``fdistill distill`` checks a run against before it loads the
teacher) on each model's published config, built on the meta device, with its preset's settings (batch, precision,
head, R1, EMA) at 512 and 1024 px (the UNets at their own size; Wan at 81 frames of 480 x 832 px, WanPipeline's
default video), with and without gradient checkpointing, in the
modes that can run it (full fine-tuning replicated or FSDP; shared-base LoRA with an fp32 base, as fdistill loads
teachers, or a bf16 one): the states, the activation peaks of the student and critic steps at micro_batch 1 and
the largest micro_batch that fits 80 GB and 141 GB GPUs, then what each pass saves for backward. The text encoders
are counted as the preset's data have them: on every GPU for captioned images (SD1.5's WebDataset shards), released
for latent shards (every other preset's ``fdistill prepare-latents`` folder); --captioned-images / --latent-shards
pick one for every model, and a table gives what releasing them saves per family.
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
import textwrap
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from fdistill import memory  # noqa: E402

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
GB = 1e9

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
# umT5-XXL (Wan's, google/umt5-xxl's encoder: d_model 4096, 24 layers, 64 heads, d_ff 10240, vocabulary 256,384)
# counted on the meta device from that config.
TEXT_ENCODERS = {"T5-XXL": 4_762_310_656, "CLIP-L": 123_650_304, "CLIP-bigG": 694_659_840,
                 "Gemma-2-2B": 2_614_341_888, "Qwen2.5-VL-7B": 8_292_166_656, "umT5-XXL": 5_680_910_336}

# VAE parameters (frozen, loaded in fp32 by fdistill): diffusers' AutoencoderKL with SD's layout, 4 latent channels
# (SD1.5, SDXL: 83,653,863) or 16 without quant convs (SD3.5, FLUX.1: 83,819,683); SANA's DC-AE and Qwen-Image's VAE
# as diffusers' AutoencoderDC and AutoencoderKLQwenImage default configs (362,893,923 and 126,892,531; not checked
# against the hub files); Wan2.1's AutoencoderKLWan as its default config (base_dim 96, z_dim 16: 126,892,531).
VAES = {"sd15": 83_653_863, "sdxl": 83_653_863, "sd3": 83_819_683, "flux": 83_819_683, "sana": 362_893_923,
        "qwen_image": 126_892_531, "wan": 126_892_531}

# Wan2.1 text-to-video DiTs (WanTransformer3DModel, patches 1 x 2 x 2 on 16-channel latents, umT5 text of width
# 4096, head dim 128): Wan-AI/Wan2.1-T2V-1.3B-Diffusers (30 layers, 12 heads: width 1536, ffn 8960) and
# Wan-AI/Wan2.1-T2V-14B-Diffusers (40 layers, 40 heads: 5120, ffn 13824; diffusers' class defaults), 1,418,996,800
# and 14,288,491,584 parameters on the meta device.
WAN_1_3B_DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024)
WAN_14B_DIT = {**WAN_1_3B_DIT, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
WAN_VIDEO = (81, 480, 832)  # WanPipeline.__call__'s defaults: frames, height, width


@dataclasses.dataclass(frozen=True)
class Model:
    """A teacher of the memory tables: its family, published network config, the text encoders its pipeline loads,
    its preset (``fdistill/configs``), the resolutions and the GPU count of the rows."""
    name: str
    kind: str
    config: dict
    text_encoders: tuple[str, ...]
    preset: str
    pixels: tuple[int, ...]
    gpus: int
    expected_params: int
    video: tuple[int, int, int] | None = None  # a video model's (frames, height, width); pixels then unused

    def text_encoder_bytes(self) -> int:
        """The text encoders as stored (half precision; transformers loads with dtype="auto")."""
        return 2 * self.text_encoder_params()

    def text_encoder_params(self) -> int:
        return sum(TEXT_ENCODERS[e] for e in self.text_encoders)

    def frozen_bytes(self, text_encoders: bool) -> int:
        """The text encoders (when on the GPU) and the fp32 VAE."""
        return (self.text_encoder_bytes() if text_encoders else 0) + 4 * VAES[self.kind]


UNET_MODELS = {
    "sd15": Model("SD1.5", "sd15", SD15_UNET, ("CLIP-L",), "sd15", (512,), N_GPUS, 859_520_964),
    "sdxl": Model("SDXL", "sdxl", SDXL_UNET, ("CLIP-L", "CLIP-bigG"), "sdxl", (1024,), N_GPUS, 2_567_463_684),
}
FLOW_MODELS = {
    "sd35m": Model("SD3.5-Medium", "sd3", SD35_MEDIUM_DIT, ("CLIP-L", "CLIP-bigG", "T5-XXL"), "sd35", (512, 1024), 1,
                   2_243_171_520),
    "sd35l": Model("SD3.5-Large", "sd3", SD35_LARGE_DIT, ("CLIP-L", "CLIP-bigG", "T5-XXL"), "sd35", (512, 1024), 1,
                   8_056_627_520),
    "flux": Model("FLUX.1-dev", "flux", FLUX_DEV_DIT, ("CLIP-L", "T5-XXL"), "flux", (512, 1024), 1, 11_901_408_320),
    "sana": Model("SANA-1600M", "sana", SANA_1600M_DIT, ("Gemma-2-2B",), "sana", (1024,), N_GPUS, 1_604_462_752),
    "qwen_image": Model("Qwen-Image", "qwen_image", QWEN_IMAGE_DIT, ("Qwen2.5-VL-7B",), "qwen_image", (1024,), 1,
                        20_430_401_088),
}
VIDEO_MODELS = {
    "wan13b": Model("Wan2.1-1.3B", "wan", WAN_1_3B_DIT, ("umT5-XXL",), "wan", (0,), N_GPUS, 1_418_996_800, WAN_VIDEO),
    "wan14b": Model("Wan2.1-14B", "wan", WAN_14B_DIT, ("umT5-XXL",), "wan", (0,), N_GPUS, 14_288_491_584, WAN_VIDEO),
}


def preset_data(cfg) -> str:
    """What the preset's ``data`` are: "captioned images" (WebDataset tar shards, encoded by the VAE and text
    encoders at every step) or "latent shards" (a ``fdistill prepare-latents`` folder, whose index.json is checked
    when a run opens it: the presets name one that does not exist here)."""
    return "captioned images" if ".tar" in str(cfg.data) else "latent shards"


def data_of(model: Model, args) -> str:
    """The data the rows of ``model`` assume: --captioned-images, --latent-shards, or its preset's."""
    if args.captioned_images:
        return "captioned images"
    if args.latent_shards:
        return "latent shards"
    from fdistill.apps import images

    return preset_data(images.load_config(model.preset, []))


def modes(model: Model, args) -> list[tuple[str, list[str], torch.dtype]]:
    """(label, config overrides, weight dtype) of the rows of ``model``: its preset, and the other ways to run it."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if model.kind in ("sd15", "sdxl", "sana"):  # full fine-tuning presets: data parallel, or FSDP over the GPUs
        return [("full FT, data parallel", ["distill.fsdp=false"], fp32),
                (f"full FT, FSDP over {model.gpus}", ["distill.fsdp=true"], fp32)]
    lora = [f"text.lora_rank={args.lora_rank}", "text.shared_base=true", "distill.fsdp=false"]
    return [(f"shared-base LoRA r{args.lora_rank}, fp32 base (as fdistill loads)", lora, fp32),
            (f"shared-base LoRA r{args.lora_rank}, bf16 base (a bf16 load)", lora, bf16),
            (f"full FT, FSDP over {N_GPUS}", ["text.lora_rank=0", "text.shared_base=false", "distill.fsdp=true"],
             fp32)]


def memory_report(models: dict[str, Model], args) -> None:
    """The per-GPU memory model (``fdistill.memory``) for ``models`` at their resolutions and modes, with and
    without gradient checkpointing: states, the student / critic activation peaks at micro_batch 1, and the
    largest micro_batch that fits 80 GB and 141 GB."""
    from fdistill.apps import images

    t0 = time.perf_counter()
    rows, passes = [], []
    data = {key: data_of(model, args) for key, model in models.items()}
    for key, model in models.items():
        text = data[key] == "captioned images"  # a run from latent shards releases the text encoders
        for pixels in model.pixels:
            for label, overrides, dtype in modes(model, args):
                gpus = N_GPUS if "FSDP" in label else model.gpus
                size = [] if model.video else [f"text.resolution={pixels}"]
                cfg = images.load_config(model.preset, [*size, *overrides, *args.set])
                subject = memory.meta_subject(model.kind, dict(model.config), pixels or None, dtype=dtype,
                                              frozen_bytes=model.frozen_bytes(text), name=model.name,
                                              video=model.video)
                n = subject.parameters()
                if n != model.expected_params:
                    raise SystemExit(f"{model.name}: {n:,} parameters on the meta device, expected "
                                     f"{model.expected_params:,}")
                run = dataclasses.replace(memory.Run.of_config(cfg, gpus), gan_attention=args.gan_attention)
                prof = memory.profile(subject, run)
                shown = "{} x {} x {}".format(*model.video) if model.video else pixels
                passes.append((model.name, shown, label, prof))
                for ckpt in (False, True):
                    r = dataclasses.replace(run, checkpointing=ckpt, micro_batch=1)
                    e = memory.estimate(prof, r)
                    fit = [memory.largest_batch(prof, r, gb * GB) for gb in GPUS_GB]
                    rows.append((model.name, shown, label, gpus, ckpt, e, fit))
    print(f"\n## Per-GPU memory (fdistill.memory on the meta device, {time.perf_counter() - t0:.0f} s)\n")
    print("| model | px (video: frames x H x W) | mode | GPUs | checkpointing | states GB | activations GB at "
          "micro_batch 1 (student / critic step) | total GB at 1 | largest micro_batch, 80 GB | 141 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, pixels, label, gpus, ckpt, e, fit in rows:
        cells = [str(b) if b else "does not fit" for b in fit]
        print(f"| {name} | {pixels} | {label} | {gpus} | {'on' if ckpt else 'off'} | {e.state_bytes / GB:.1f} | "
              f"{e.activations / GB:.1f} ({e.student / GB:.1f} / {e.critic / GB:.1f}) | {e.total / GB:.1f} | "
              + " | ".join(cells) + " |")
    print("\nStates at micro_batch 1, by part (GB per GPU):\n")
    seen = set()
    kept = {m.name: data[k] == "captioned images" for k, m in models.items()}
    for name, _, label, gpus, _, e, _ in rows:
        if (name, label) in seen:
            continue
        seen.add((name, label))
        frozen = "text encoders + VAE (frozen)" if kept[name] else "VAE (frozen; text encoders released)"
        parts = "; ".join(f"{frozen if k == 'text encoders + VAE (frozen)' else k} {v / GB:.2f}"
                          for k, v in e.states.items())
        print(f"- {name}, {label}, {gpus} GPU(s): {parts}")
    print("\nText encoders (frozen, half precision as stored), per GPU: on it when the data are captioned images "
          "(encoded at every step), released from a run whose data are latent shards (`fdistill prepare-latents`; "
          "they hold every prompt's embeddings):\n")
    print("| model | text encoders | parameters | releasing them saves, GB per GPU | data in these rows | "
          "text encoders in these rows |")
    print("|---|---|---|---|---|---|")
    for key, model in models.items():
        print(f"| {model.name} | {' + '.join(model.text_encoders)} | {model.text_encoder_params():,} | "
              f"{model.text_encoder_bytes() / GB:.2f} | {data[key]} | "
              f"{'on the GPU' if kept[model.name] else 'released'} |")
    print("\n| model | px | mode | pass | saved, no checkpointing: per sample / fixed GB | kept with "
          "checkpointing | largest unit recomputed |")
    print("|---|---|---|---|---|---|---|")
    names = {"student": "generator / fake score, grad to the trained weights",
             f"teacher_{args.gan_attention}": f"teacher, grad to its input ({args.gan_attention} attention)",
             f"teacher_{args.gan_attention}_tap": "the same, to the tapped block (kept after the output is detached)",
             "head": "discriminator head on features that need grad"}
    for name, pixels, label, prof in passes:
        for key, text in names.items():
            if (key, "total") not in prof.passes:
                continue
            cells = []
            for field in ("total", "kept", "unit"):
                a = prof.passes[key, field]
                cells.append(f"{a.per_sample / GB:.3f} / {a.fixed / GB:.3f}")
            print(f"| {name} | {pixels} | {label} | {text} | " + " | ".join(cells) + " |")
    which = ", ".join(f"{m.name}: {data[k]}" for k, m in models.items())
    source = "--captioned-images" if args.captioned_images else "--latent-shards" if args.latent_shards else \
        "each preset's data"
    these = textwrap.fill(f"These rows: {which} ({source}).", 114, initial_indent="  ", subsequent_indent="  ")
    print("\n" + MEMORY_ASSUMPTIONS.format(data=these, overrides=" ".join(args.set) or "none"))


MEMORY_ASSUMPTIONS = """Assumptions (fdistill/memory.py; its docstring has the details):
- Each row is the model's preset (fdistill/configs) at that resolution and mode: its batch split over the GPUs,
  precision (bf16 autocast), head (disc_head, disc_hidden), R1 form, EMA; micro_batch is varied. Further
  overrides (--set): {overrides}. Networks are the published configs built on the meta device; fdistill loads
  teachers (and so the students' copies and the shared base) in fp32; "bf16 base" is what a bf16 load would need
  (fdistill has none today).
- Data: a run whose data are latent shards (`fdistill prepare-latents`) releases the text encoders (the shards
  hold every prompt's embeddings), as `fdistill distill`'s memory check counts it; captioned images keep them on
  every GPU for the online encoding (--captioned-images models that for every model, --latent-shards the
  opposite).
{data}
- States: frozen teacher / base in its dtype; full FT: each student's weights, gradients and two AdamW moments in
  the weights' dtype (4 x 4 B / parameter in fp32), FSDP dividing them by the GPUs; LoRA adapters and the head:
  fp32 weight, gradient and AdamW = 16 B / parameter; the fp32 VAE on every GPU, and the frozen text encoders in
  half precision (as stored) when the data above keep them.
- Activations: what autograd saves in each pass, counted on the meta device (bf16 autocast emulated with CUDA's
  policy; fused attention, as fdistill runs every pass but exact R1's double backward, which is on the math
  kernel; --gan-attention math puts the student step's GAN-term teacher pass on it too, as fdistill ran it
  before), plus twice the largest tensor an op makes; student step = generator + teacher pass (in full at the
  end of its forward, to the tap afterwards) + head; critic step = fake score + heads on fake and real features
  (+ R1). Checkpointing: every pass with grad, the teacher's GAN-term pass included (with the shared base, the
  one network; with separate networks, each of the three); exact R1 is counted in full either way.
- A GPU fits what is below {headroom:.0%} of its memory (80 GB = 80e9 bytes, 141 GB = 141e9; 1 GB = 1e9
  bytes); the rest is for what the count cannot see: the CUDA context, NCCL buffers, attention and cuBLAS
  workspaces, the caching allocator's fragmentation. Checked on the CPU against a real network
  (tests/test_memory_model.py: the saved bytes exactly, the peak of a forward + backward within 15%); not
  measured on a GPU.""".replace("{headroom:.0%}", f"{memory.HEADROOM:.0%}")


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
                   help="with --memory: the flow transformers (SD3.5, FLUX.1, SANA, Qwen-Image) instead of the UNets")
    p.add_argument("--video", action="store_true",
                   help="with --memory: the video transformers (Wan2.1 1.3B / 14B at 81 x 480 x 832)")
    p.add_argument("--family", action="append", choices=[*UNET_MODELS, *FLOW_MODELS, *VIDEO_MODELS],
                   help="with --memory: only these models (repeatable)")
    p.add_argument("--lora-rank", type=int, default=64, help="with --memory --flow: LoRA rank (default 64)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--captioned-images", action="store_true",
                      help="with --memory: every model's data are captioned images encoded at every step (text "
                           "encoders on the GPU); default: each preset's data (latent shards release them)")
    data.add_argument("--latent-shards", action="store_true",
                      help="with --memory: every model's data are latent shards (text encoders released)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --memory: a config override for every row (repeatable), e.g. disc_head=fdistill")
    p.add_argument("--gan-attention", choices=["math", "fused"], default="fused",
                   help="with --memory: the student step's teacher pass on a fused kernel (as fdistill runs it, "
                        "default) or the math one (as fdistill ran it before)")
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
    if (args.flow or args.video) and not args.memory:
        p.error("--flow and --video go with --memory (the transformers are only sized, not timed)")
    if args.memory:
        if args.tiny:
            p.error("--tiny goes with --model (the memory model is checked by tests/test_memory_model.py)")
        models = {**UNET_MODELS, **FLOW_MODELS, **VIDEO_MODELS} if args.family else \
            {**(FLOW_MODELS if args.flow else {}), **(VIDEO_MODELS if args.video else {})} or UNET_MODELS
        if args.model:
            models = {args.model: UNET_MODELS[args.model]}
        memory_report({k: m for k, m in models.items() if not args.family or k in args.family}, args)
        return
    if not args.model:
        p.error("give --model sd15|sdxl (timing) or --memory")
    time_passes(args, specs[args.model])


if __name__ == "__main__":
    main()
