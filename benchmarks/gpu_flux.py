"""FLUX.1-dev at 512 px through fdistill's real training step on one GPU, against the memory model's prediction
(used by gpu_check.sh): the peak CUDA memory of the student step and of the critic step beside what
``fdistill.memory`` predicts for them (states + that step's activations) and for the whole run.

The teacher is FLUX.1-dev's transformer (``sd_cost.FLUX_DEV_DIT``, 11,901,408,320 parameters) with random weights,
built directly on the GPU in fp32 as fdistill loads teachers (47.6 GB: never written to disk, never built on the
CPU), and the real-architecture FLUX VAE (16 latent channels), both wrapped in memory as fdistill's FLUX teacher
(``FluxDenoiser``, ``LatentPipeline``, ``FluxTeacher``) and handed to ``build_distiller``. The data are latent
shards of random latents and text conditions (T5 embeddings [512, 4096], CLIP pooled [768]) written to OUT, as
the preset's ``fdistill prepare-latents`` data: the run releases its text encoders (``ReleasedText``), so there
are none. Settings: the ``flux`` preset at 512 px: shared-base LoRA r64, bf16 autocast, and here gradient
checkpointing, micro_batch 1, a small batch (--batch), ``distill.memory_check=false`` (this measures).

Steps: one tau-cycle (a student step, tau - 1 critic steps; the first of each makes its AdamW states), then a
student step; each step's peak is reset before it. Printed for the last student and the last critic step:
seconds, torch.cuda.max_memory_allocated / max_memory_reserved (GB = 1e9 B, the model's unit), the predicted GB
of that step and of the whole run (states + the larger step's activations), and measured allocated / predicted.
On the CPU (--tiny) the peaks are n/a.

    python benchmarks/gpu_flux.py OUT [--batch 2] [--micro-batch 1]
    python benchmarks/gpu_flux.py OUT --predict-only     # the prediction alone (meta device; no GPU needed)
    python benchmarks/gpu_flux.py OUT --tiny             # a small FLUX config, the same code path (CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sd_cost import FLUX_DEV_DIT  # noqa: E402

from fdistill import memory  # noqa: E402
from fdistill.apps import distill, images  # noqa: E402
from fdistill.memory import GB  # noqa: E402

PARAMS = 11_901_408_320  # FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json)
# FLUX.1's VAE (black-forest-labs/FLUX.1-dev, vae/config.json): SD3's architecture, 16 latent channels, no quant convs
VAE = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=16,
           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False)
TINY_DIT = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], sample_size=64, norm_num_groups=8)
SHARD_SAMPLES = 8  # drawn with replacement: a few suffice for any batch


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the run is: the transformer and VAE configs, the image size, the text length, the config overrides."""

    dit: dict
    vae: dict
    resolution: int
    tiny: bool

    @property
    def name(self) -> str:
        return "tiny FLUX" if self.tiny else "FLUX.1-dev"


def setup(tiny: bool) -> Setup:
    if tiny:
        return Setup(dict(TINY_DIT), {**VAE, **TINY_VAE}, 64, True)
    return Setup(dict(FLUX_DEV_DIT), dict(VAE), 512, False)


def config(s: Setup, data: Path, batch: int, micro: int):
    """The ``flux`` preset at ``s.resolution`` with checkpointing, ``micro`` samples a pass, no memory check."""
    overrides = [f"data={data}", f"text.resolution={s.resolution}", f"distill.batch_size={batch}",
                 f"distill.micro_batch={micro}", "text.gradient_checkpointing=true", "distill.memory_check=false"]
    if s.tiny:
        overrides.append("text.lora_rank=4")
    cfg = images.load_config("flux", overrides)
    assert cfg.text.shared_base and cfg.distill.precision == "bf16" and cfg.distill.tau > 1, "the flux preset changed"
    return cfg


def options(cfg):
    """The preset's teacher options as FluxTeacher.load reads them: (embedded guidance, text tokens, tap block)."""
    from fdistill.teachers.families import flux

    opts = flux.FluxTeacher.parse_options(cfg.teacher_options)
    return (float(opts.guidance or flux.GUIDANCE), opts.max_sequence_length or flux.MAX_SEQUENCE_LENGTH,
            opts.tap_block)


def vae_params(s: Setup) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return sum(p.numel() for p in AutoencoderKL(**s.vae).parameters())


def predict(s: Setup, cfg) -> tuple[memory.Estimate, float]:
    """``fdistill.memory``'s estimate of this run (the transformer on the meta device in fp32, the fp32 VAE as
    its frozen bytes; no text encoders, released by latent shards, as ``check_distill`` counts it)."""
    t0 = time.perf_counter()
    guidance, tokens, tap = options(cfg)
    subject = memory.meta_subject("flux", dict(s.dit), s.resolution, tokens=tokens, tap_block=tap,
                                  guidance=guidance, downsample=8, frozen_bytes=4 * vae_params(s), name=s.name)
    if not s.tiny and subject.parameters() != PARAMS:
        raise SystemExit(f"FLUX.1-dev: {subject.parameters():,} parameters on the meta device, expected {PARAMS:,}")
    run = memory.Run.of_config(cfg)
    est = memory.estimate(memory.profile(subject, run), run)
    return est, time.perf_counter() - t0


def latent_shards(folder: Path, s: Setup, cfg) -> Path:
    """SHARD_SAMPLES random latents [16, r/8, r/8] with random FLUX text conditions (T5 embeds [tokens,
    joint_attention_dim], CLIP pooled [pooled_projection_dim]) as latent shards, as ``fdistill prepare-latents``
    writes them."""
    from fdistill.data.latent_shards import LatentShardWriter

    _, tokens, _ = options(cfg)
    shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    n, latent = SHARD_SAMPLES, s.resolution // 8

    def randn(*shape):
        return torch.randn(n, *shape, generator=g).half()

    cond = {"embeds": randn(tokens, s.dit["joint_attention_dim"]), "pooled": randn(s.dit["pooled_projection_dim"])}
    with LatentShardWriter(folder, shard_size=n, source="random") as w:
        w.add_batch([f"{i:04d}" for i in range(n)], randn(s.vae["latent_channels"], latent, latent), cond,
                    [f"random condition {i}" for i in range(n)])
    return folder


def build_teacher(s: Setup, cfg, device: torch.device, where: Path):
    """fdistill's FLUX teacher made in memory as ``FluxTeacher.load`` makes it from a folder, its transformer and
    VAE built on ``device`` with random weights (the default initialisation, on the GPU itself); no text
    encoders (the latent shards release them)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fdistill.teachers.families.flux import FluxDenoiser, FluxTeacher, FluxTextEncoder
    from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

    guidance, tokens, tap = options(cfg)
    torch.manual_seed(0)
    with torch.device(device):  # every parameter made (and initialised) where it will live
        transformer = FluxTransformer2DModel(**s.dit)
        codec = LatentCodec(AutoencoderKL(**s.vae), where="the FLUX VAE config")
    c = transformer.config
    denoiser = FluxDenoiser(transformer, s.resolution // codec.downsample, int(c["in_channels"]) // 4,
                            int(c["num_attention_heads"]) * int(c["attention_head_dim"]), None, tap,
                            1.0, guidance=guidance)  # FLUX.1-dev's scheduler shifts dynamically: static shift 1
    text = FluxTextEncoder([], [], tokens)
    record = FluxTeacher.record(where, FluxTeacher.kind, s.resolution, tokens, denoiser, transformer, guidance)
    return FluxTeacher._make(LatentPipeline(denoiser.eval(), text, codec, record), str(where))


def gb(x: float) -> str:
    """Bytes in GB (1e9, the model's unit), or in MB below 0.1 GB (the --tiny sizes)."""
    return f"{x / GB:.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:.2f} MB"


def print_prediction(s: Setup, cfg, est: memory.Estimate, seconds: float) -> None:
    print(f"fdistill.memory ({seconds:.1f} s on the meta device), {s.name} {s.resolution} px, "
          f"{est.run.settings()}: states {gb(est.state_bytes)}, activations: student step {gb(est.student)}, "
          f"critic step {gb(est.critic)}; whole run {gb(est.total)}", flush=True)
    for part, value in est.states.items():
        if part == "text encoders + VAE (frozen)":
            part = "VAE (frozen; the text encoders released by the latent shards)"
        print(f"  state: {part}: {gb(value)}")


def run_steps(d, tau: int) -> list[dict]:
    """One tau-cycle and the next student step, each step's time and CUDA peaks (reset before it) recorded."""
    cuda = d.device.type == "cuda"
    records = []
    for _ in range(tau + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        logs = d.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        finite = all(bool(torch.isfinite(v).all()) for v in logs.values() if isinstance(v, torch.Tensor))
        records.append({"kind": logs["kind"], "seconds": seconds, "finite": finite,
                        "allocated": torch.cuda.max_memory_allocated() if cuda else None,
                        "reserved": torch.cuda.max_memory_reserved() if cuda else None})
    return records


def report(kind: str, rec: dict, est: memory.Estimate) -> None:
    activations = est.student if kind == "student" else est.critic
    predicted = est.state_bytes + activations
    if rec["allocated"] is None:
        measured, ratio = "peak allocated n/a, reserved n/a (not on a GPU)", "n/a"
    else:
        measured = f"peak allocated {gb(rec['allocated'])}, reserved {gb(rec['reserved'])}"
        ratio = f"{rec['allocated'] / predicted:.3f}"
    print(f"  {kind} step: {rec['seconds']:.2f} s; {measured}; predicted {gb(predicted)} (states "
          f"{gb(est.state_bytes)} + activations {gb(activations)}), whole run {gb(est.total)}; "
          f"measured/predicted {ratio}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch (distill.batch_size; the preset's is 64)")
    p.add_argument("--micro-batch", type=int, default=1, help="distill.micro_batch: samples per forward pass")
    p.add_argument("--tiny", action="store_true", help="a small FLUX config at 64 px (CPU): the same code path")
    p.add_argument("--predict-only", action="store_true", help="print the memory model's prediction and stop")
    args = p.parse_args()
    if args.batch < 1 or args.micro_batch < 1 or args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a positive multiple of --micro-batch {args.micro_batch}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = setup(args.tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny and not args.predict_only:
        raise SystemExit("gpu_flux.py: no CUDA device; FLUX.1-dev at full size needs one (47.6 GB of fp32 weights): "
                         "run with --tiny or --predict-only")
    data = out / "flux-latents"
    cfg = config(s, data, args.batch, args.micro_batch)
    est, seconds = predict(s, cfg)
    print_prediction(s, cfg, est, seconds)
    if args.predict_only:
        return
    latent_shards(data, s, cfg)
    if device.type == "cuda":
        have = memory.gpu_memory(device)
        print(f"GPU {torch.cuda.get_device_name(device)}, {have / GB:.1f} GB: the model says the run "
              f"{'fits' if est.fits(have) else 'does not fit'} ({memory.HEADROOM:.0%} usable)", flush=True)
    t0 = time.perf_counter()
    teacher = build_teacher(s, cfg, device, out / "flux-in-memory")
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = sum(p.numel() for p in teacher.denoiser.transformer.parameters())
    print(f"built {s.name}'s transformer ({n:,} parameters, fp32) and VAE on {device} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    d = distill.build_distiller(cfg, teacher, device=device)
    print(f"distiller built in {time.perf_counter() - t0:.1f} s (shared-base LoRA r{cfg.text.lora_rank}: "
          f"{sum(p.numel() for p in d.gen_params):,} trainable parameters per adapter)", flush=True)
    records = run_steps(d, cfg.distill.tau)
    student = [r for r in records if r["kind"] == "student"][-1]
    critic = [r for r in records if r["kind"] == "critic"][-1]
    tau = cfg.distill.tau
    print(f"{s.name} {s.resolution} px, batch {args.batch}, micro_batch {args.micro_batch}, bf16, shared-base LoRA "
          f"r{cfg.text.lora_rank}, gradient checkpointing, {device}: student step {student['seconds']:.2f} s, "
          f"critic step {critic['seconds']:.2f} s, iteration at tau {tau}: "
          f"{(student['seconds'] + (tau - 1) * critic['seconds']) / tau:.2f} s; losses "
          f"{'finite' if all(r['finite'] for r in records) else 'NOT finite (random weights)'}", flush=True)
    report("student", student, est)
    report("critic", critic, est)
    if device.type == "cuda":
        first = {r["kind"]: r for r in reversed(records)}
        print(f"  between steps: allocated {gb(torch.cuda.memory_allocated())} (predicted states "
              f"{gb(est.state_bytes)}); the first student step's peak {gb(first['student']['allocated'])}, the first "
              f"critic step's {gb(first['critic']['allocated'])} (each makes its AdamW states)", flush=True)


if __name__ == "__main__":
    main()
