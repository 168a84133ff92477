"""SD3.5-Medium at 512 px through fdistill's real training step, on one GPU (used by gpu_check.sh): a random
SD3.5-Medium-architecture StableDiffusion3Pipeline folder (the 2.24B MMDiT-X of the hub's config, the 16-channel
VAE; nothing downloaded) with text encoders of the real widths (CLIP-L 768, CLIP-bigG 1280, T5-XXL 4096) but one
layer each: frozen, run once per batch, they change a step's cost little and would take most of the disk. The
`sd15` preset's optimiser and head, retargeted to the flow teacher (``distill.sigmas.schedule=flow``, CFG 4),
in two modes: full fine-tuning in bf16 autocast with gradient checkpointing, and shared-base LoRA (rank 64; the
generator and fake score as adapters on the teacher's one network). Times the student and critic steps and the
peak memory of each, then sampling latency at batch 1: one step against the teacher's 18-step Heun with CFG.

    python benchmarks/gpu_sd35.py OUT [--batch 4] [--modes shared,full] [--tiny]   # --tiny: small configs
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from flow_digits import T5_CHARS, T5_PIECES, t5_tokenizer  # noqa: E402
from gpu_sd15 import captioned_images, sampling_latency, time_steps  # noqa: E402
from sd_cost import SD35_MEDIUM_DIT  # noqa: E402

from fdistill.apps import distill, images  # noqa: E402

VAE = dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=16,
           layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           sample_size=512, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
           use_post_quant_conv=False)
MODES = {"shared": ["text.lora_rank=64", "text.shared_base=true", "text.gradient_checkpointing=false"],
         "full": ["text.gradient_checkpointing=true"]}


def build(folder: Path, tiny: bool) -> Path:
    """The random SD3.5-Medium-architecture folder (--tiny: a 2-block MMDiT-X and small encoders)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fdistill.evaluation.clip_tokenizer import clip_tokenizer

    dit, vae, widths, t5 = dict(SD35_MEDIUM_DIT), dict(VAE), (768, 1280), 4096
    if tiny:
        dit.update(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                   caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                   dual_attention_layers=(0,))
        vae.update(block_out_channels=[16, 16, 32, 32], sample_size=64, norm_num_groups=8)
        widths, t5 = (16, 16), 64

    def clip(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 64),
            num_hidden_layers=1, projection_dim=width, vocab_size=49408, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the transformer stored in bf16 (4.5 GB), loaded in fp32
    try:
        transformer = SD3Transformer2DModel(**dit)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=AutoencoderKL(**vae),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(widths[0]), tokenizer=clip_tokenizer(), text_encoder_2=clip(widths[1]),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=T5EncoderModel(T5Config(
            vocab_size=len(T5_PIECES) + 2 * len(T5_CHARS), d_model=t5, d_kv=64, d_ff=t5 * 5 // 2, num_layers=1,
            num_heads=max(1, t5 // 64), decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=4, help="per-GPU batch of the timed steps")
    p.add_argument("--modes", default="shared,full", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown mode {unknown[0]!r}, expected some of {sorted(MODES)}")
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = out / "sd35m" if (out / "sd35m" / "model_index.json").is_file() else build(out / "sd35m", args.tiny)
    data = captioned_images(out / "captioned", max(16, args.batch), 64 if args.tiny else 512)
    flow = [f"data={data}", f"distill.batch_size={args.batch}", "distill.iterations=100", "disc_resolutions=[mid]",
            "guidance=4", "distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]"]
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        d = distill.make_distiller(images.load_config("sd15", flow + MODES[mode]), teacher, device=device)
        student, critic, iteration, peak = time_steps(d)
        print(f"SD3.5-Medium {64 if args.tiny else 512} px, batch {args.batch}, bf16, {mode}, {device}: "
              f"student step {student:.2f} s, critic step {critic:.2f} s, iteration at tau {d.cfg.tau}: "
              f"{iteration:.2f} s, peak {peak:.1f} GiB", flush=True)
        if mode == modes[-1]:
            sampling_latency(d, 4.0, 18)
        del d
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
