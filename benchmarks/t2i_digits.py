"""Text-to-image on a CPU, end to end: captioned digits ("a handwritten seven", a few phrasings per class),
a tiny text-conditional latent teacher in diffusers format (UNet2DConditionModel, a small CLIP text encoder
with the real CLIP BPE vocabulary, a tiny AutoencoderKL) trained by fdistill, then distilled through the
Stable Diffusion path by reverse-KL (DMD2), JS, forward-KL and adversarial-only.

    python benchmarks/t2i_digits.py                 # ~45 minutes on 2 cores; stages are cached in --out
    python benchmarks/t2i_digits.py --runs js --distill-iterations 500

    python benchmarks/t2i_digits.py --runs reverse_kl,js --student-steps 1,2,4 --student-input backward,forward

Prints, for the teacher (Heun, 18 steps = 35 evaluations, each guided: 70 UNet calls) and each student (one step,
or k steps from t = 500 down: timesteps 500/249 for k = 2, 500/375/249/124 for k = 4, ``few_step.default_levels``;
with k > 1 also the teacher at 2 and 4 Euler steps and through its diffusers pipeline's DDIM at 2, 4 and 35 steps):
digits-FID and precision/recall (decoded 16x16 images averaged to 8x8 gray, scored in the digits classifier's
feature space against the 1,797 real digits), prompt accuracy (the classifier agrees with the prompted digit),
seconds per 1000 samples (UNet calls and VAE decoding) and per training iteration. Writes grids and results.json.
The text encoder is frozen at its random initialisation: it only has to tell ~50 distinct prompts apart.
Then ``fdistill evaluate-t2i`` scores every model (teacher and students) on --evaluate-t2i prompts, 4 images
each, with digits-FID and random stand-in CLIP/DINO networks (labelled as such in its tables), and
``fdistill analyze-run`` draws Fig. 6 for every student (``<out>/<run>/analysis/fig6.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from fdistill.apps import distill, images, t2i  # noqa: E402
from fdistill.core import few_step  # noqa: E402
from fdistill.core.diffusion import edm_sampler  # noqa: E402
from fdistill.data.datasets import load_dataset, to_float  # noqa: E402
from fdistill.data.latent_shards import LatentSampler  # noqa: E402
from fdistill.data.writers import save_image_grid  # noqa: E402
from fdistill.evaluation.clip_tokenizer import clip_tokenizer  # noqa: E402
from fdistill.evaluation.digits_classifier import load_digits_classifier  # noqa: E402
from fdistill.evaluation.metrics import class_accuracy, evaluate_features, precision_recall  # noqa: E402
from fdistill.evaluation.t2i_metrics import in_batch_similarity  # noqa: E402
from fdistill.teachers.families.stable_diffusion import load_stable_diffusion
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.latent_t2i import TextToImageData  # noqa: E402
from fdistill.training import run as run_record  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402
from fdistill.training.teacher_training import TeacherConfig, TeacherTrainer  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASES = ["a handwritten {w}", "the digit {d}", "a drawing of the number {w}", "{w}", "a {w} written by hand"]
RUNS = "reverse_kl,js,forward_kl,adversarial"
GUIDANCE = 2.0
SIGMA_T500 = 1.61828  # sigma at timestep 500 of Stable Diffusion's scaled_linear schedule


def prompt(digit: int, rng: np.random.Generator) -> str:
    return PHRASES[rng.integers(len(PHRASES))].format(w=WORDS[digit], d=digit)


def write_captioned_digits(folder: Path, captions: list[str], done: str = "") -> Path:
    """scikit-learn's digits as 16x16 RGB PNGs (each pixel repeated 2x2) with same-named .txt ``captions`` (one per
    digit, in order), unless ``folder`` is complete (its ``done`` file, holding ``done``)."""
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(zip(load_dataset("digits").images, captions, strict=True)):
        rgb = np.repeat(np.repeat(img[0], 2, 0), 2, 1)[..., None].repeat(3, 2)
        Image.fromarray(rgb).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    (folder / "done").write_text(done)
    return folder


def captioned_digits(folder: Path) -> Path:
    """The digits captioned by ``prompt`` (``write_captioned_digits``)."""
    rng = np.random.default_rng(0)
    return write_captioned_digits(folder, [prompt(int(label), rng) for label in load_dataset("digits").labels])


def digits_rgb() -> torch.Tensor:
    x = to_float(load_dataset("digits").images)
    return F.interpolate(x, scale_factor=2, mode="nearest").repeat(1, 3, 1, 1)


def train_vae(steps: int, seed: int = 0):
    """A tiny AutoencoderKL (16x16x3 <-> 8x8x4): L1 + MSE reconstruction and a small KL term."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=16)
    x_all, opt = digits_rgb(), torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(steps):
        x = x_all[torch.randint(len(x_all), (64,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # scale latents to unit variance, as SD's scaling_factor does
        std = vae.encode(x_all[:512]).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1 / std)
    return vae.eval(), loss.item()


def save_pipeline(folder: Path, vae, unet=None, seed: int = 0) -> Path:
    """The teacher in Stable Diffusion v1.5's folder layout (StableDiffusionPipeline.save_pretrained)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if unet is None:
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=16)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                                        intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=49408, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def train_teacher(folder: Path, data: Path, iterations: int) -> None:
    """fdistill's TeacherTrainer on the latent denoiser, from the latent shards ``data``: DDPM's
    uniform-timestep loss, 10% empty prompts for classifier-free guidance."""
    sd = load_stable_diffusion(folder)
    cfg = TeacherConfig(iterations=iterations, batch_size=64, lr=5e-4, warmup=200, ema_beta=0.999,
                        label_dropout=0.1, noise="timesteps", log_every=500)
    sampler = LatentSampler(data, seed=0)
    trainer = TeacherTrainer(cfg, sd.denoiser.train(), TextToImageData(sd, sampler, torch.device("cpu")))
    training_loop(trainer, progress=False)
    trainer.ema.unet.save_pretrained(folder / "unet")


def to_digits(x: torch.Tensor) -> torch.Tensor:
    """Decoded 16x16 RGB in [-1, 1] -> the classifier's 8x8 gray."""
    return F.avg_pool2d(x.mean(1, keepdim=True), 2)


@torch.no_grad()
def score(x: torch.Tensor, digits: torch.Tensor, seconds: float, prompts: list[str] | None = None) -> dict:
    """digits-FID, precision and recall against the 1,797 real digits in the digits classifier's feature space;
    prompt accuracy; recall per prompted class (each class's samples against that class's real digits, averaged);
    and with ``prompts``, the in-batch similarity: the mean cosine between distinct samples of the same prompt
    string, in the classifier's features centred on the real digits' mean (raw SiLU features are all positive,
    which would put every cosine near 1); lower is more diverse."""
    clf = load_digits_classifier(progress=False)
    real, labels = to_float(load_dataset("digits").images), torch.as_tensor(load_dataset("digits").labels)
    fake = to_digits(x)
    f_real, f_fake = clf.features(real), clf.features(fake)
    out = evaluate_features(f_real, f_fake)
    out["class_recall"] = float(np.mean([precision_recall(f_real[labels == c], f_fake[digits == c])[1]
                                         for c in range(10) if (digits == c).sum() > 3]))
    if prompts is not None:
        _, group = np.unique(prompts, return_inverse=True)
        out["in_batch_similarity"] = in_batch_similarity(f_fake - f_real.mean(0), torch.as_tensor(group))[0]
    return {**out, "prompt_accuracy": class_accuracy(clf(fake), digits), "s_per_1000": 1000 * seconds / len(x)}


def prompts_for(n: int, seed: int = 1) -> tuple[list[str], torch.Tensor]:
    rng = np.random.default_rng(seed)
    digits = torch.arange(n) % 10
    return [prompt(int(d), rng) for d in digits], digits


@torch.no_grad()
def sample_teacher(folder: Path, prompts: list[str], steps: int = 18, guidance: float = GUIDANCE,
                   load=load_stable_diffusion, heun: bool = True) -> tuple[torch.Tensor, float]:
    """EDM's Heun sampler (``heun=False``: its Euler steps) on the guided denoiser of the pipeline ``load(folder)``
    over its sigma range."""
    sd = load(folder)
    net = GuidedDenoiser(sd.denoiser, guidance)
    t0, out = time.perf_counter(), []
    for i in range(0, len(prompts), 250):
        batch = prompts[i:i + 250]
        z = torch.randn(len(batch), *sd.latent_shape, generator=torch.Generator().manual_seed(i))
        lat = edm_sampler(net, z, sd.text(batch), num_steps=steps, sigma_min=sd.denoiser.sigma_min,
                          sigma_max=sd.denoiser.sigma_max, heun=heun)
        out.append(sd.codec.decode(lat))
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def sample_pipeline(folder: Path, prompts: list[str], steps: int, guidance: float = GUIDANCE
                    ) -> tuple[torch.Tensor, float]:
    """The teacher as a user samples its folder: ``StableDiffusionPipeline`` with the folder's own scheduler (DDIM,
    SD's settings), ``num_inference_steps=steps``, CFG ``guidance``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t0, out = time.perf_counter(), []
    for i in range(0, len(prompts), 250):
        batch = prompts[i:i + 250]
        x = pipe(batch, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                 generator=torch.Generator().manual_seed(i)).images
        out.append(x * 2 - 1)
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def sample_student(run: Path, prompts: list[str], ema: bool = True) -> tuple[torch.Tensor, float]:
    """The student's own steps (``few_step.run_steps``; one call for a one-step student), batch i's latents and sde
    noise from one stream seeded i."""
    generator, student, teacher = distill.load_generator(run, ema=ema)
    t0, out = time.perf_counter(), []
    for i in range(0, len(prompts), 250):
        batch, stream = prompts[i:i + 250], torch.Generator().manual_seed(i)
        shape = (len(batch), *teacher.sample_shape)
        z = torch.randn(shape, generator=stream)
        x = few_step.run_steps(generator, z, student, teacher.condition(batch),
                               lambda shape=shape, stream=stream: torch.randn(shape, generator=stream))
        out.append(teacher.decode(x))
    return torch.cat(out), time.perf_counter() - t0


def table(rows: dict[str, dict]) -> str:
    """The benchmark's markdown table, a row per model."""
    lines = ["| model | digits-FID | precision | recall | class recall | prompt accuracy | in-batch similarity "
             "| s / 1000 samples | s / training iteration |", "|---|---|---|---|---|---|---|---|---|"]
    def cell(r: dict, key: str, digits: int = 3) -> str:
        v = r.get(key)
        if v is None:
            return ""
        return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if isinstance(v, tuple) else f"{v:.{digits}f}"

    for name, r in rows.items():
        lines.append(f"| {name} | {cell(r, 'fid', 2)} | {cell(r, 'precision')} | {cell(r, 'recall')} "
                     f"| {cell(r, 'class_recall')} | {cell(r, 'prompt_accuracy')} | {cell(r, 'in_batch_similarity')} "
                     f"| {cell(r, 's_per_1000', 2)} | {cell(r, 's_per_iteration', 3)} |")
    return "\n".join(lines)


def student_overrides(latents: Path, run: str, iterations: int, extra: list[str] = (),
                      guidance: float = GUIDANCE) -> list[str]:
    """The benchmark's distillation settings for student ``run`` (a divergence or "adversarial"), then ``extra``."""
    # The generator at t = 500 (sigma 1.62; its input still unit-variance noise), generator lr 5e-5 and w_GAN 0.2:
    # the winners of benchmarks/t2i_ablations.py's screen (docs/text-to-image.md), against t = 999, lr 2e-4 and
    # w_GAN 0.05 before.
    overrides = [f"data={latents}", "disc_resolutions=[4]", "disc_hidden=32", f"guidance={guidance}",
                 f"distill.iterations={iterations}", "distill.batch_size=64", "distill.tau=5",
                 f"distill.generator_sigma={SIGMA_T500}", "distill.lr=5e-5", "distill.lr_critic=2e-4",
                 "distill.gan_weight=0.2", "distill.r1_gamma=0",
                 "distill.ema_beta=0.998", "distill.sigmas.schedule=scaled_linear",
                 "distill.sigmas.index_range=[1, 999]", "distill.log_every=100"]
    overrides += ["distill.fdistill_weight=0"] if run == "adversarial" else [f"distill.divergence={run}"]
    return overrides + list(extra)


def distill_student(run_dir: Path, teacher: Path, overrides: list[str]) -> tuple[float, float]:
    """Train one student into ``run_dir`` (skipped when it holds checkpoints): (seconds of training in this call,
    seconds per training iteration, kept in <run_dir>/train_seconds.json)."""
    cfg = images.load_config("digits", overrides)
    if not (run_dir / "config.yaml").is_file():  # a run folder as `fdistill distill` writes (analyze-run reads it)
        run_record.write(run_dir, "distill", cfg, teacher=str(teacher.resolve()), data=cfg.data)
    timing = run_dir / "train_seconds.json"
    if (run_dir / "checkpoints").is_dir():
        return 0.0, json.loads(timing.read_text())["per_iteration"] if timing.is_file() else float("nan")
    t0 = time.perf_counter()
    training_loop(distill.make_distiller(cfg, teacher), run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - t0
    per_iteration = seconds / cfg.distill.iterations
    timing.write_text(json.dumps({"seconds": seconds, "per_iteration": per_iteration,
                                  "threads": torch.get_num_threads()}))
    return seconds, per_iteration


def mean_std(seeds: list[dict]) -> dict:
    """One row from several seeds' rows: (mean, sample std) of each number; a single seed's row as it is."""
    if len(seeds) == 1:
        return seeds[0]
    return {k: (float(np.mean([r[k] for r in seeds])), float(np.std([r[k] for r in seeds], ddof=1)))
            for k in seeds[0] if isinstance(seeds[0][k], float)}


def student_kinds(steps: str, inputs: str, samplers: str = "ode") -> list[tuple[int, str | None, str | None]]:
    """(k, training input, sampler) of each student kind of ``--student-steps``, ``--student-input`` and
    ``--student-sampler`` (None, None for k = 1)."""
    ks = [int(k) for k in steps.split(",")]
    return [(1, None, None)] * (1 in ks) + [(k, mode, sampler) for k in ks if k > 1 for mode in inputs.split(",")
                                            for sampler in samplers.split(",")]


def add_student_arguments(p: argparse.ArgumentParser, levels: str) -> None:
    """The options every digits benchmark's students share: --seeds, --guidance and the k-step students' --student-
    steps (``levels``: what a k > 1 student's levels are), --student-input and --student-sampler."""
    p.add_argument("--seeds", type=int, default=1,
                   help="students per divergence (distill.seed 0..N-1, the teacher shared); rows give mean ± std")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="the teacher's CFG scale (sampled and distilled)")
    p.add_argument("--student-steps", default="1", metavar="K,...",
                   help=f"students of k steps for each k (k > 1: {levels})")
    p.add_argument("--student-input", default="backward", metavar="MODE,...",
                   help="the k > 1 students' training input: backward, forward or both")
    p.add_argument("--student-sampler", default="ode", metavar="SAMPLER,...",
                   help="the k > 1 students' sampler: ode (the package's default), sde or both (ode run folders end "
                        "in -ode)")


def student_plan(args, students: list, tag: str = ""):
    """(k, input mode, sampler, run, run folder name, the k-step overrides) for each kind in ``students`` and each
    of ``args.runs``: folders <run><tag>[-k<k>-<input>[-ode]]."""
    for k, mode, sampler in students:
        for run in args.runs.split(","):
            name = f"{run}{tag}" + (f"-k{k}-{mode}" if k > 1 else "") + ("-ode" if sampler == "ode" else "")
            steps = [f"distill.student_steps={k}", f"distill.student_input={mode}",
                     f"distill.student_sampler={sampler}"] if k > 1 else []
            yield k, mode, sampler, run, name, steps


def student_row(run: str, k: int, mode: str, sampler: str, seeds: int) -> str:
    """A student's row name in the tables."""
    many = f"; {seeds} seeds" if seeds > 1 else ""
    return f"{run} ({k} NFE{f', {mode} input, {sampler}' if mode else ''}{many})"


def distill_and_score(out: Path, teacher: Path, latents: Path, args, students: list, tag: str, prompts: list[str],
                      digits: torch.Tensor, rows: dict, strips: dict, say, extra: list[str] = (),
                      score_fn=score) -> list[str]:
    """Distill (or reuse) every student of each kind in ``students`` for each of ``args.runs`` and ``args.seeds``
    seeds into <out>/<run><tag>[-k<k>-<input>[-ode]][-seed<s>], and score it: a row per kind and run (mean ± std
    over seeds) in ``rows``, the first seed's first 20 samples in ``strips``. Returns the run folders of seed 0."""
    run_dirs = []
    for k, mode, sampler, run, name, steps in student_plan(args, students, tag):
        seeds = []
        for seed in range(args.seeds):
            run_dir = out / f"{name}{f'-seed{seed}' if seed else ''}"
            if getattr(args, "no_train", False) and not (run_dir / "checkpoints").is_dir():
                continue  # --no-train: only the students already distilled
            seconds, per_iteration = distill_student(run_dir, teacher, student_overrides(
                latents, run, args.distill_iterations, [*extra, *steps, *args.overrides, f"distill.seed={seed}"],
                args.guidance))
            if seconds:
                say(f"distilled {run_dir.name} in {seconds:.0f} s")
            x, seconds = sample_student(run_dir, prompts)
            seeds.append({**score_fn(x, digits, seconds, prompts), "s_per_iteration": per_iteration})
            if seed == 0:
                save_image_grid(to_digits(x[:100]), out / f"{name}.png", nrow=10, scale=4,
                                column_labels=list("0123456789"))
                strips[f"{run}, {k} NFE" + (f", {mode}, {sampler}" if mode else "")] = x[:20]
            say(f"{run_dir.name}: {seeds[-1]}")
        if seeds:
            rows[student_row(run, k, mode, sampler, len(seeds))] = mean_std(seeds)
            run_dirs.append(name)
    return run_dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="distillation config overrides (key=value) for every student")
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--teacher-iterations", type=int, default=5000)
    p.add_argument("--distill-iterations", type=int, default=1000)
    p.add_argument("--num", type=int, default=2000, help="samples per model for the metrics")
    p.add_argument("--out", default="runs/bench-t2i-digits")
    p.add_argument("--evaluate-t2i", type=int, default=250, metavar="N",
                   help="then run fdistill evaluate-t2i on each model with N prompts x 4 images (0: skip)")
    add_student_arguments(p, "levels from t = 500 down, run folders <run>-k<k>-<input>[-ode]; with k > 1 the "
                             "teacher's few-step baselines are added")
    p.add_argument("--no-analyze-run", dest="analyze_run", action="store_false",
                   help="skip fdistill analyze-run (Fig. 6) on the students")
    p.add_argument("--no-train", action="store_true",
                   help="score only the students already distilled in --out (each row: the seeds found)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, t_start = Path(args.out), time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", flush=True)

    data = captioned_digits(out / "data")
    teacher, latents = out / "teacher", out / "latents"
    if not (teacher / "trained").is_file():
        vae, loss = train_vae(args.vae_steps)
        say(f"VAE trained ({args.vae_steps} steps, final loss {loss:.4f})")
        save_pipeline(teacher, vae)
        shutil.rmtree(latents, ignore_errors=True)
        t2i.prepare_latents(teacher, data, latents, batch_size=256, progress=False)  # the images, encoded once
        train_teacher(teacher, latents, args.teacher_iterations)
        (teacher / "trained").write_text("")
        say(f"teacher trained ({args.teacher_iterations} iterations)")
    prompts, digits = prompts_for(args.num)
    rows = {}
    real = digits_rgb()
    sd = load_stable_diffusion(teacher)
    with torch.no_grad():  # the floor any model in the VAE's latent space stands on
        rows["real digits through the VAE"] = score(sd.codec.decode(sd.codec.encode(real)),
                                                    torch.as_tensor(load_dataset("digits").labels), 0.0)
    cfg_tag = "" if args.guidance == GUIDANCE else f"-cfg{args.guidance:g}"
    x, seconds = sample_teacher(teacher, prompts, guidance=args.guidance)
    teacher_row = f"teacher (35 NFE, CFG {args.guidance:g})"
    rows[teacher_row] = score(x, digits, seconds, prompts)
    save_image_grid(to_digits(x[:100]), out / f"teacher{cfg_tag}.png", nrow=10, scale=4,
                    column_labels=list("0123456789"))
    strips = {"teacher, 35 NFE": x[:20]}  # the grid of teacher and students: same prompts, same seeds
    say(f"teacher: {rows[teacher_row]}")
    if max(int(k) for k in args.student_steps.split(",")) > 1:
        # the teacher at few-step budgets: EDM's Euler steps (Heun needs an odd count) and its pipeline's DDIM
        for n in (2, 4):
            x, seconds = sample_teacher(teacher, prompts, n, args.guidance, heun=False)
            rows[f"teacher, {n} Euler steps ({n} NFE)"] = score(x, digits, seconds, prompts)
        for n in (2, 4, 35):
            x, seconds = sample_pipeline(teacher, prompts, n, args.guidance)
            rows[f"teacher, diffusers pipeline, DDIM {n} steps ({n} NFE)"] = score(x, digits, seconds, prompts)
        say("teacher baselines: " + "; ".join(f"{k}: FID {v['fid']:.2f}" for k, v in rows.items() if "teacher," in k))
    students = student_kinds(args.student_steps, args.student_input, args.student_sampler)
    run_dirs = distill_and_score(out, teacher, latents, args, students, cfg_tag, prompts, digits, rows, strips, say)
    if len(strips) > 2:
        save_image_grid(to_digits(torch.cat(list(strips.values()))), out / f"steps{cfg_tag}.png", nrow=10, scale=4,
                        column_labels=list("0123456789"))
        say(f"steps{cfg_tag}.png: two rows each of " + ", ".join(strips))

    print(f"\ntext-to-image digits, {args.num} prompted samples per model, {args.distill_iterations} distillation "
          f"iterations (batch 64), {args.seeds} seed(s) per student, {torch.get_num_threads()} CPU threads\n")
    print(table(rows))
    (out / f"results{cfg_tag}.json").write_text(json.dumps(rows, indent=1))
    if args.evaluate_t2i:
        evaluate_t2i_tables(out, run_dirs, args.evaluate_t2i, args.guidance)
    from fdistill.apps.analyze_run import analyze_run

    for run in run_dirs if args.analyze_run else []:  # Fig. 6: h_bar against the teacher-fake score difference
        print(f"\n## fdistill analyze-run {out / run}\n{analyze_run(out / run)}", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; grids and results.json in {out}")


def evaluate_t2i_tables(out: Path, runs: list[str], n_prompts: int, guidance: float = GUIDANCE) -> None:
    """``fdistill evaluate-t2i`` on every student and on the teacher (18 Heun steps, CFG 2), 4 images per
    prompt, with digits-FID and random stand-in CLIP and DINO networks (so their numbers only show that the
    pipeline runs: the output labels them as stand-ins)."""
    from fdistill.apps import cli
    from fdistill.apps.evaluate_t2i import save_stand_in
    from fdistill.evaluation.clip import CLIP
    from fdistill.evaluation.dino import DINOViT

    clip_arch = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16,
                                                 "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    dino_arch = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 32}
    torch.manual_seed(0)
    clip = save_stand_in(CLIP(clip_arch), "clip", clip_arch, out / "stand-ins" / "clip.safetensors")
    dino = save_stand_in(DINOViT(**dino_arch), "dino", dino_arch, out / "stand-ins" / "dino.safetensors")
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"{p}\n" for p in prompts_for(n_prompts, seed=2)[0]))
    common = ["--prompts", str(prompts), "--ref", "digits", "--clip", str(clip), "--dino", str(dino), "--group", "4",
              "--batch", "250", "--no-progress", "--device", "cpu"]
    jobs = [(f"teacher (35 NFE, CFG {guidance:g})", runs[0], f"teacher-cfg{guidance:g}",
             ["--teacher-steps", "18", "--guidance", f"{guidance}"])]
    jobs += [(run, run, run, []) for run in runs]
    for name, run, folder, extra in jobs:
        folder = out / "evaluate-t2i" / folder
        print(f"\n## fdistill evaluate-t2i: {name}", flush=True)
        if cli.main(["evaluate-t2i", "--checkpoint", str(out / run), "--out", str(folder), *common, *extra]) != 0:
            raise SystemExit(f"evaluate-t2i failed for {name}")


if __name__ == "__main__":
    main()
