"""Why do the one-step text-to-image digits students lag their teacher? Short runs of one student (JS by
default) on the cached teacher of ``t2i_digits.py``, one change each against the benchmark's settings,
scored every 500 iterations on --num prompted samples (EMA generator; the raw generator at the end too).

    python benchmarks/t2i_digits.py --runs js          # once: trains and caches the teacher in --out
    python benchmarks/t2i_ablations.py --only baseline,t500 --iterations 1500 --num 500

Each variant's run folder is ``<out>/ablations/<name>`` (reused when it holds checkpoints), so variants can be
run by separate processes (``--threads 1`` each on a 2-core machine) and the table printed by a final call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fdistill.core.diffusion import one_step

sys.path.insert(0, str(Path(__file__).parent))
import t2i_digits as bench  # noqa: E402


def sigma_at(t: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of Stable Diffusion's scaled_linear betas (0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t]
    return float(((1 - abar) / abar).sqrt())


# The benchmark's settings when this screen ran (it changed them to its winners since): t = 999, lr 2e-4, w_GAN 0.05
SCREENED = ["distill.generator_sigma=null", "distill.lr=2e-4", "distill.lr_critic=null", "distill.gan_weight=0.05"]
# name -> (divergence, teacher CFG, overrides), each one change against SCREENED
VARIANTS = {
    "baseline": ("js", 2.0, []),
    "t700": ("js", 2.0, [f"distill.generator_sigma={sigma_at(700):.5f}"]),
    "t500": ("js", 2.0, [f"distill.generator_sigma={sigma_at(500):.5f}"]),
    "t399": ("js", 2.0, [f"distill.generator_sigma={sigma_at(399):.5f}"]),
    "lr5e-5": ("js", 2.0, ["distill.lr=5e-5", "distill.lr_critic=2e-4"]),
    "t500-lr5e-5": ("js", 2.0, [f"distill.generator_sigma={sigma_at(500):.5f}", "distill.lr=5e-5",
                                "distill.lr_critic=2e-4"]),
    "cfg1": ("js", 1.0, []),
    "gan0": ("js", 2.0, ["distill.gan_weight=0"]),
    "gan0.0125": ("js", 2.0, ["distill.gan_weight=0.0125"]),
    "disc-wide": ("js", 2.0, ["disc_resolutions=[8, 4]", "disc_hidden=128"]),
    "r1": ("js", 2.0, ["distill.r1_gamma=1", "distill.r1_form=approx"]),
    "fake-none": ("js", 2.0, ["distill.fake_score_weighting=none"]),
    "tau10": ("js", 2.0, ["distill.tau=10"]),
    "no-ema": ("js", 2.0, ["distill.ema_beta=null"]),
}
# second round, each one change against the first round's best (t = 500, generator lr 5e-5)
BEST = VARIANTS["t500-lr5e-5"][2]
VARIANTS.update({
    "t500-lr2e-5": ("js", 2.0, [BEST[0], "distill.lr=2e-5", "distill.lr_critic=2e-4"]),
    "best-gan0.0125": ("js", 2.0, [*BEST, "distill.gan_weight=0.0125"]),
    "best-gan0.2": ("js", 2.0, [*BEST, "distill.gan_weight=0.2"]),
    "best-r1": ("js", 2.0, [*BEST, "distill.r1_gamma=1", "distill.r1_form=approx"]),
    "best-tau10": ("js", 2.0, [*BEST, "distill.tau=10"]),
    "best-fake-none": ("js", 2.0, [*BEST, "distill.fake_score_weighting=none"]),
    "best-warm": ("js", 2.0, [*BEST, "distill.h_warmup=500"]),
})


@torch.no_grad()
def untrained(teacher: Path, prompts: list[str], sigma: float) -> torch.Tensor:
    """Decoded samples of the generator before any training: the (unguided) teacher's x0 from z at sigma."""
    sd = bench.load_stable_diffusion(teacher)
    z = torch.randn(len(prompts), *sd.latent_shape, generator=torch.Generator().manual_seed(0))
    return sd.codec.decode(one_step(sd.denoiser, z, sigma, sd.text(prompts)))


def ratio_summary(run_dir: Path) -> dict[str, float]:
    """What the ratio estimate carries over the second half of a run, from its log.jsonl: the discriminator's
    loss (2 ln 2 = 1.386 when it cannot tell real from generated), the logit gap real - fake, the spread of
    log r and the range of the normalized weights h_bar in the generator's batches (1 everywhere for
    reverse-KL)."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    half = [r for r in lines if r["iteration"] >= lines[-1]["iteration"] / 2 and "loss_gan_d" in r]
    mean = lambda key: sum(r[key] for r in half) / len(half)  # noqa: E731
    return {"loss_gan_d": mean("loss_gan_d"), "logit_gap": mean("logit_real") - mean("logit_fake"),
            "log_r_std": mean("log_r_std"), "h_min": mean("h_min"), "h_max": mean("h_max"),
            "grad_norm_g": mean("grad_norm_g")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants: " + ", ".join(VARIANTS))
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--every", type=int, default=500, help="iterations between scored checkpoints")
    p.add_argument("--num", type=int, default=500, help="prompted samples per score")
    p.add_argument("--out", default="runs/bench-t2i-digits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-only", action="store_true", help="train the variants, print nothing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    teacher, latents = out / "teacher", out / "latents"
    if not (teacher / "trained").is_file():
        raise SystemExit(f"no trained teacher in {teacher}: run benchmarks/t2i_digits.py --out {out} first")
    names = args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    prompts, digits = bench.prompts_for(args.num)
    results_file = out / "ablations" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in names:
        run, guidance, extra = VARIANTS[name]
        run_dir = out / "ablations" / name
        overrides = bench.student_overrides(latents, run, args.iterations, [
            *SCREENED, f"distill.checkpoint_every={args.every}", "distill.keep_checkpoints=100", *extra], guidance)
        t0 = time.perf_counter()
        seconds = bench.distill_student(run_dir, teacher, overrides)
        print(f"{name}: trained in {seconds:.0f} s", flush=True)
        if args.train_only:
            continue
        row = {"train_s": seconds or results.get(name, {}).get("train_s")}
        for ckpt in sorted(c for c in (run_dir / "checkpoints").iterdir() if c.name.isdigit()):
            it = int(ckpt.name)
            x, _ = bench.sample_student(ckpt, prompts)
            row[f"fid@{it}"] = bench.score(x, digits, 0.0)["fid"]
        row["final"] = bench.score(x, digits, 0.0, prompts)
        x, _ = bench.sample_student(ckpt, prompts, ema=False)
        row["final_raw_fid"] = bench.score(x, digits, 0.0)["fid"]
        row["ratio"] = ratio_summary(run_dir)
        results[name] = row
        print(f"{name}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.train_only:
        return
    for t in (999, 500):  # where the generators start: the teacher's one-step x0 from pure noise at t
        key = f"untrained generator, t = {t}"
        if key not in results:
            results[key] = {"final": bench.score(untrained(teacher, prompts, sigma_at(t)), digits, 0.0, prompts)}
    for cfg in (1.0, 2.0):
        key = f"teacher CFG {cfg:g}"
        if key not in results:
            x, _ = bench.sample_teacher(teacher, prompts, guidance=cfg)
            results[key] = {"final": bench.score(x, digits, 0.0, prompts)}
    on_disk = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results = {**on_disk, **results}  # keep the rows another process wrote meanwhile
    results_file.write_text(json.dumps(results, indent=1))
    its = sorted({int(k[4:]) for r in results.values() for k in r if k.startswith("fid@")})
    print(f"\n{args.num} prompted samples per score; EMA generator unless said\n")
    print("| variant | " + " | ".join(f"FID @{i}" for i in its) + " | precision | recall | prompt acc. "
          "| in-batch sim. | raw FID (no EMA) |")
    print("|---|" + "---|" * (len(its) + 5))
    for name, r in results.items():
        f = r["final"]
        cells = [f"{r[f'fid@{i}']:.2f}" if f"fid@{i}" in r else "" for i in its]
        if not any(cells):  # a teacher row: its one FID
            cells[-1] = f"{f['fid']:.2f}"
        raw = f"{r['final_raw_fid']:.2f}" if "final_raw_fid" in r else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {f['precision']:.3f} | {f['recall']:.3f} "
              f"| {f['prompt_accuracy']:.3f} | {f['in_batch_similarity']:.3f} | {raw} |")
    print("\nThe ratio estimate over each run's second half (log.jsonl): discriminator loss (2 ln 2 = 1.386: "
          "no signal), logit gap real - fake, std of log r, h_bar's min and max per batch, generator grad norm "
          "(before the clip at 10)\n")
    print("| variant | loss_gan_d | logit gap | log r std | h_bar min | h_bar max | grad norm |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "ratio" in r:
            q = r["ratio"]
            print(f"| {name} | {q['loss_gan_d']:.3f} | {q['logit_gap']:.2f} | {q['log_r_std']:.2f} | {q['h_min']:.2f} "
                  f"| {q['h_max']:.2f} | {q['grad_norm_g']:.1f} |")


if __name__ == "__main__":
    main()
