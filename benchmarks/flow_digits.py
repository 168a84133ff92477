"""Rectified-flow text-to-image on a CPU, end to end: the captioned digits of ``t2i_digits`` ("a handwritten
seven", a few phrasings per class) with a tiny rectified-flow teacher in Stable Diffusion 3's folder layout
(``StableDiffusion3Pipeline.save_pretrained``: an SD3Transformer2DModel, CLIP-L/CLIP-G stand-ins with the real
CLIP BPE vocabulary, a tiny T5 encoder with an in-memory tokenizer, t2i_digits' AutoencoderKL, a
FlowMatchEulerDiscreteScheduler of shift 1), trained by fdistill's TeacherTrainer on the rectified-flow loss
(``noise="flow"``, t logit-normal, 10% empty prompts), then distilled through the flow-matching teacher path
(``teachers.flow_matching``, ``distill.sigmas.schedule=flow``) by reverse-KL (DMD2), JS, forward-KL and
adversarial-only into one-step students evaluated at t = 0.999 (sigma = 999).

    python benchmarks/flow_digits.py                # 36.7 minutes on 2 cores; stages are cached in --out
    python benchmarks/flow_digits.py --runs js --distill-iterations 500 --seeds 3
    python benchmarks/flow_digits.py --runs js --student-steps 1,4   # and a 4-step student (t 0.999/0.749/0.5/0.25)
    python benchmarks/flow_digits.py --teacher-iterations 20 --distill-iterations 10 --num 100 --threads 1 \\
        --runs js --vae-steps 20 --out /tmp/flow-smoke   # a smoke run

Prints, for the teacher (Heun, 18 steps = 35 evaluations over the denoiser's sigma range [0.001/0.999, 999],
each guided: 70 transformer calls) and each one-step student, t2i_digits' table: digits-FID, precision, recall,
class recall, prompt accuracy, in-batch similarity (the digits classifier's feature space) and seconds per 1000
samples. Writes grids and results.json. The text encoders stay at their random initialisation.

Text length: SD3's pipeline pads both CLIP prompts to 77 tokens and T5's to 256, a 333-token text stream beside
the 16 image tokens here. The prompts are a few words, so the CLIP tokenizers are saved with
``model_max_length=16`` (``CLIP_LENGTH``; the pipeline reads it) and every load asks for 16 T5 tokens (``MSL``;
the students get ``teacher_options.max_sequence_length=16``, the checkpoints record it): 32 text tokens, which made a
teacher iteration 2x cheaper than 77 + 16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fdistill.apps import t2i  # noqa: E402
from fdistill.data.datasets import load_dataset  # noqa: E402
from fdistill.data.latent_shards import LatentSampler  # noqa: E402
from fdistill.data.writers import save_image_grid  # noqa: E402
from fdistill.evaluation.clip_tokenizer import clip_tokenizer  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.latent_t2i import TextToImageData  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402
from fdistill.training.teacher_training import FLOW_T, TeacherConfig, TeacherTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import t2i_digits as bench  # noqa: E402

MSL = 16  # T5 tokens (see the module docstring)
CLIP_LENGTH = 16  # CLIP tokens
T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581"]
T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'"
GENERATOR_T = 0.999  # the flow schedule's t_max: sigma = 999


def t5_tokenizer():
    """A unigram T5 tokenizer of single characters and word-initial characters (pad 0, eos 1, unk 2), built in
    memory (no sentencepiece file): enough to tell the prompts apart."""
    from transformers import T5Tokenizer

    vocab = [(p, 0.0) for p in T5_PIECES] + [(p, -1.0) for c in T5_CHARS for p in (c, "\u2581" + c)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_flow_pipeline(folder: Path, vae, seed: int = 0, patch_size: int = 2, heads: int = 4,
                       clip_length: int = CLIP_LENGTH) -> Path:
    """The teacher in SD3's folder layout: a 4-block MMDiT of ``heads`` heads of 16 on ``patch_size``-square
    patches of the 8 x 8 x 4 latents (by default 64 wide on a 4 x 4 token grid, 0.59M parameters); CLIP-L/G
    stand-ins 32 wide (hidden states 32 + 32 = T5's 64, pooled 32 + 32) reading ``clip_length`` tokens; a 2-layer
    T5 encoder 64 wide; the VAE with its scaling factor and shift 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=patch_size, in_channels=4, out_channels=4,
                                        num_layers=4, attention_head_dim=16, num_attention_heads=heads,
                                        joint_attention_dim=64, caption_projection_dim=16 * heads,
                                        pooled_projection_dim=64, pos_embed_max_size=8 // patch_size,
                                        qk_norm="rms_norm")
    torch.manual_seed(seed + 1)  # the text encoders do not depend on the transformer's size

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=64,
            num_attention_heads=2, num_hidden_layers=2, projection_dim=32, vocab_size=49408,
            max_position_embeddings=77))

    t5 = T5EncoderModel(T5Config(vocab_size=len(T5_PIECES) + 2 * len(T5_CHARS), d_model=64, d_kv=16, d_ff=128,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    text_encoder=clip(), tokenizer=clip_tokenizer(max_length=clip_length),
                                    text_encoder_2=clip(), tokenizer_2=clip_tokenizer(max_length=clip_length),
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def encode_latents(teacher: Path, data: Path, out: Path, batch_size: int = 256) -> None:
    """The captioned images encoded once by the teacher's VAE and text encoders (``fdistill prepare-latents``)."""
    t2i.prepare_latents(teacher, data, out, batch_size=batch_size, progress=False,
                        options={"max_sequence_length": MSL})


def train_teacher(folder: Path, data: Path, iterations: int, flow_t: str = "logit_normal") -> None:
    """fdistill's TeacherTrainer on the EDM-form transformer denoiser from the latent shards ``data``: the
    rectified-flow velocity loss (t ~ ``flow_t`` on [0.001, 0.999]), 10% empty prompts for classifier-free
    guidance; the EMA's transformer is written back into the folder."""
    pipe = fm.load_flow_pipeline(folder, max_sequence_length=MSL)
    pipe.denoiser.transformer.requires_grad_(True)
    cfg = TeacherConfig(iterations=iterations, batch_size=64, lr=5e-4, warmup=min(200, iterations // 5),
                        ema_beta=0.999, label_dropout=0.1, noise="flow", flow_t=flow_t, log_every=500)
    data = TextToImageData(pipe, LatentSampler(data, seed=0), torch.device("cpu"))
    trainer = TeacherTrainer(cfg, pipe.denoiser.train(), data)
    training_loop(trainer, progress=False)
    trainer.ema.transformer.save_pretrained(folder / "transformer")


def score(x: torch.Tensor, digits: torch.Tensor, seconds: float, prompts: list[str]) -> dict:
    """t2i_digits' scores; the in-batch similarity only when every prompt string was drawn at least twice (it
    needs pairs; --num 2000 draws each of the ~50 strings ~40 times, a smoke run's --num 100 may not)."""
    _, counts = np.unique(prompts, return_counts=True)
    return bench.score(x, digits, seconds, prompts if counts.min() >= 2 else None)


def flow_overrides(generator_t: float) -> list[str]:
    """The flow noise levels (t uniform on 1000 levels over [0.001, 0.999]), the T5 length, the generator's
    sigma."""
    if not 0 < generator_t < 1:
        raise ValueError(f"--generator-t must be in (0, 1) (rectified-flow time), got {generator_t}")
    out = ["distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]"]
    return out + [f"teacher_options.max_sequence_length={MSL}",
                  f"distill.generator_sigma={generator_t / (1 - generator_t):.9g}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="distillation config overrides (key=value) for every student")
    p.add_argument("--runs", default=bench.RUNS)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--teacher-iterations", type=int, default=6000)
    p.add_argument("--teacher-heads", type=int, default=4, help="the MMDiT's width in heads of 16")
    p.add_argument("--teacher-patch", type=int, default=2, choices=(1, 2), help="its patch size on 8 x 8 latents")
    p.add_argument("--flow-t", default="logit_normal", choices=FLOW_T, help="the teacher's training times")
    p.add_argument("--distill-iterations", type=int, default=2000)
    p.add_argument("--generator-t", type=float, default=GENERATOR_T,
                   help="the flow time the one-step generator is evaluated at (sigma = t / (1 - t))")
    p.add_argument("--num", type=int, default=2000, help="samples per model for the metrics")
    p.add_argument("--out", default="runs/bench-flow-digits")
    bench.add_student_arguments(p, "flow times linspace(t, 0, k + 1) from --generator-t")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, t_start = Path(args.out), time.perf_counter()
    extra = flow_overrides(args.generator_t)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", flush=True)

    data = bench.captioned_digits(out / "data")
    teacher, latents = out / "teacher", out / "latents"
    if not (teacher / "trained").is_file():
        vae, loss = bench.train_vae(args.vae_steps)
        say(f"VAE trained ({args.vae_steps} steps, final loss {loss:.4f})")
        save_flow_pipeline(teacher, vae, patch_size=args.teacher_patch, heads=args.teacher_heads)
        shutil.rmtree(latents, ignore_errors=True)
        encode_latents(teacher, data, latents)  # the images, encoded once
        t0 = time.perf_counter()
        train_teacher(teacher, latents, args.teacher_iterations, args.flow_t)
        (teacher / "trained").write_text("")
        say(f"teacher trained ({args.teacher_iterations} iterations, {time.perf_counter() - t0:.0f} s)")
    prompts, digits = bench.prompts_for(args.num)
    rows = {}
    pipe = fm.load_flow_pipeline(teacher, max_sequence_length=MSL)
    with torch.no_grad():  # the floor any model in the VAE's latent space stands on
        real = pipe.codec.decode(pipe.codec.encode(bench.digits_rgb(), torch.Generator().manual_seed(0)))
        rows["real digits through the VAE"] = bench.score(real, torch.as_tensor(load_dataset("digits").labels), 0.0)
    tag = ("" if args.guidance == bench.GUIDANCE else f"-cfg{args.guidance:g}") + \
        ("" if args.generator_t == GENERATOR_T else f"-t{args.generator_t:g}")
    x, seconds = bench.sample_teacher(teacher, prompts, guidance=args.guidance,
                                     load=lambda f: fm.load_flow_pipeline(f, max_sequence_length=MSL))
    teacher_row = f"teacher (35 NFE, CFG {args.guidance:g})"
    rows[teacher_row] = score(x, digits, seconds, prompts)
    save_image_grid(bench.to_digits(x[:100]), out / f"teacher{tag}.png", nrow=10, scale=4,
                    column_labels=list("0123456789"))
    say(f"teacher: {rows[teacher_row]}")
    students = bench.student_kinds(args.student_steps, args.student_input, args.student_sampler)
    bench.distill_and_score(out, teacher, latents, args, students, tag, prompts, digits, rows, {}, say, extra, score)

    print(f"\nrectified-flow text-to-image digits, {args.num} prompted samples per model, {args.teacher_iterations} "
          f"teacher iterations, {args.distill_iterations} distillation iterations (batch 64), generator at "
          f"t = {args.generator_t:g}, {args.seeds} seed(s) per student, {torch.get_num_threads()} CPU threads\n")
    print(bench.table(rows))
    (out / f"results{tag}.json").write_text(json.dumps(rows, indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; grids and results.json in {out}")


if __name__ == "__main__":
    main()
