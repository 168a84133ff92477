"""Stable Diffusion v1.5 at 512 px through fdistill's real training step, on one GPU (used by gpu_check.sh):
a random SD1.5-architecture pipeline folder (UNet 860M, CLIP-L text encoder, VAE; nothing downloaded),
the `sd15` preset at a small per-GPU batch with bf16 autocast and gradient checkpointing; times the
student and critic steps, then sampling latency at batch 1: the one-step generator (+ VAE decode) against
the teacher's 25-step Heun sampler with CFG (49 evaluations x 2), Table 4's comparison.

    python benchmarks/gpu_sd15.py OUT [--batch 8] [--tiny]     # --tiny: small configs, the same code path
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sd_cost import SD15_UNET  # noqa: E402

from fdistill.apps import distill, images  # noqa: E402
from fdistill.core.diffusion import edm_sampler, one_step  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402

VAE = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           sample_size=512, scaling_factor=0.18215)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
              pad_token_id=49407, hidden_act="quick_gelu", projection_dim=768)


def build(folder: Path, tiny: bool) -> Path:
    """A random SD1.5-architecture pipeline folder (the real configs; --tiny: small ones)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fdistill.evaluation.clip_tokenizer import clip_tokenizer

    unet_cfg, vae_cfg, clip_cfg = dict(SD15_UNET), dict(VAE), dict(CLIP_L)
    if tiny:
        unet_cfg.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, attention_head_dim=8,
                        sample_size=8, norm_num_groups=8)
        vae_cfg.update(block_out_channels=[16, 16, 32, 32], sample_size=64, norm_num_groups=8)
        clip_cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                        projection_dim=32)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_cfg), vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_cfg)), tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def captioned_images(folder: Path, n: int, res: int) -> Path:
    """``n`` flat-coloured ``res``-square images with captions: data for timing, not learning."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (res, res), (i * 13 % 256, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing number {i}")
    return folder


def time_steps(d) -> tuple[float, float, float, float]:
    """Two tau-cycles of the distiller ``d`` (the first warms up): the last student step's seconds, the median
    critic step's of the second cycle, the mean iteration at tau, and the peak GPU memory in GiB (nan on CPU)."""
    tau, device = d.cfg.tau, d.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = {"student": [], "critic": []}
    for _ in range(2 * tau):
        sync()
        t0 = time.perf_counter()
        kind = d.step()["kind"]
        sync()
        times[kind].append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    student, critic = times["student"][-1], sorted(times["critic"][-(tau - 1):])[tau // 2 - 1]
    return student, critic, (student + (tau - 1) * critic) / tau, peak


def sampling_latency(d, guidance: float, steps: int) -> None:
    """Batch-1 latency of the one-step generator against the teacher's guided Heun sampler, each + VAE decode."""
    device = d.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    generator, sigma_gen, sd = d.generator, d.sigma_gen, d.real_data.pipe
    prompt = sd.text(["a photo of a cat"])
    z = torch.randn(1, *sd.latent_shape, device=device)
    with torch.no_grad(), d.autocast():
        for name, fn in [("one-step generator + VAE decode (1 NFE)",
                          lambda: sd.codec.decode(one_step(generator.eval(), z, sigma_gen, prompt))),
                         (f"teacher, Heun {steps} steps, CFG {guidance:g} ({2 * (2 * steps - 1)} network calls) + VAE "
                          "decode", lambda: sd.codec.decode(edm_sampler(
                              GuidedDenoiser(sd.denoiser, guidance), z, prompt, num_steps=steps,
                              sigma_min=sd.denoiser.sigma_min, sigma_max=sd.denoiser.sigma_max)))]:
            fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            print(f"  sampling latency, batch 1, {name}: {time.perf_counter() - t0:.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch of the timed steps")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = out / "sd15" if (out / "sd15" / "model_index.json").is_file() else build(out / "sd15", args.tiny)
    data = captioned_images(out / "captioned", max(16, args.batch), 64 if args.tiny else 512)
    cfg = images.load_config("sd15", [f"data={data}", f"distill.batch_size={args.batch}", "distill.iterations=100",
                                      *(["disc_resolutions=[8]"] if not args.tiny else ["disc_resolutions=[1]"])])
    d = distill.make_distiller(cfg, teacher, device=device)
    student, critic, iteration, peak = time_steps(d)
    print(f"SD1.5 {64 if args.tiny else 512} px, batch {args.batch}, bf16, gradient checkpointing, {device}: "
          f"student step {student:.2f} s, critic step {critic:.2f} s, iteration at tau {cfg.distill.tau}: "
          f"{iteration:.2f} s, peak {peak:.1f} GiB")
    sampling_latency(d, 1.75, 25)


if __name__ == "__main__":
    main()
