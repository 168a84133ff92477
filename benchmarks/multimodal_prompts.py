"""Does the divergence change which digits a prompt that admits several gets? Text-to-image digits with
multi-modal prompts, on CPU (issue: the divergence's effect on images, item 2).

    python benchmarks/multimodal_prompts.py                  # teacher, then 6 students (~60 minutes on 2 cores)
    python benchmarks/multimodal_prompts.py --runs js,js-nogan --distill-iterations 500

The data, the pipeline and the students are ``t2i_digits``'s (16x16 digits, a tiny Stable-Diffusion-layout
teacher, one-step students at t = 500, CFG 2), except the captions and the cached teacher (<out>/teacher, its own;
``t2i_digits`` and its numbers are untouched). A digit of class c keeps its class caption ("a handwritten seven",
...) with probability 1 - q_c and gets a multi-modal caption with probability q_c = 0.5 * 10^(-c / 9) (0.5 for a
zero down to 0.05 for a nine), half of those "a handwritten digit" and half its parity, "an even digit" or "an odd
digit" (seeded, fixed). So within a multi-modal caption the classes are imbalanced: 10x from 0 to 9 under "a
handwritten digit", 7.8x from 0 to 8 under "an even digit", 7.7x from 1 to 9 under "an odd digit": rare modes for
a mode-seeking student to drop.

Students: reverse-KL (DMD2), JS and forward-KL, each with t2i_digits' GAN term (w_GAN 0.2; run ``<divergence>``) and
without (``<divergence>-nogan``, distill.gan_weight=0: the head still trains, to estimate r). One seed by default;
``--seeds N`` distills seeds 0..N-1 (folders ``<run>-seed<s>`` for s > 0) and reports mean ± std.

Metrics: for each multi-modal prompt, ``--num`` samples (fixed seeds), classified by the digits classifier: the class
histogram against the teacher's for the same prompt (total-variation distance, rare-class recall over the prompt's
two rarest classes in the captioned data), the total-variation distance to the captions' histogram and the share of
samples that fit the prompt (parity); then the mean over the three prompts. Also digits-FID / prompt accuracy on
t2i_digits' class prompts. Writes table.md, class_histograms.png (one panel per prompt, the students' histograms
averaged over seeds) and results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import t2i_digits as bench
import torch
from rare_modes import cell

from fdistill.apps import t2i
from fdistill.data.datasets import load_dataset
from fdistill.data.writers import save_image_grid
from fdistill.evaluation.coverage import class_histogram, predict_classes, rare_class_recall, tv_distance
from fdistill.evaluation.digits_classifier import load_digits_classifier
from fdistill.io import write_text

PROMPTS = {"a handwritten digit": list(range(10)), "an even digit": [0, 2, 4, 6, 8], "an odd digit": [1, 3, 5, 7, 9]}
RUNS = "reverse_kl,js,forward_kl,reverse_kl-nogan,js-nogan,forward_kl-nogan"
NOGAN = "-nogan"


def multimodal_share(c: int) -> float:
    """q_c: the probability that a digit of class c is captioned by a multi-modal prompt."""
    return 0.5 * 10 ** (-c / 9)


def captioned_digits(folder: Path) -> tuple[Path, dict[str, list[float]]]:
    """The digits as 16x16 RGB PNGs with .txt captions (module docstring), and each multi-modal prompt's class
    histogram in these captions."""
    data, rng = load_dataset("digits"), np.random.default_rng(0)
    counts = {p: np.zeros(10) for p in PROMPTS}
    captions = []
    for label in data.labels:
        c = int(label)
        if rng.random() < multimodal_share(c):
            caption = "a handwritten digit" if rng.random() < 0.5 else ("an even digit" if c % 2 == 0 else
                                                                         "an odd digit")
            counts[caption][c] += 1
        else:
            caption = bench.prompt(c, rng)
        captions.append(caption)
    mix = {p: (n / n.sum()).tolist() for p, n in counts.items()}
    bench.write_captioned_digits(folder, captions, json.dumps({p: int(n.sum()) for p, n in counts.items()}))
    return folder, mix


def seed_name(run: str, seed: int) -> str:
    """A student's folder and results key: ``run`` for seed 0, ``<run>-seed<s>`` after."""
    return f"{run}-seed{seed}" if seed else run


def histograms(x: torch.Tensor, clf) -> list[float]:
    return class_histogram(predict_classes(bench.to_digits(x), clf), 10).tolist()


def prompt_metrics(hist: list[float], teacher: list[float], mix: list[float], allowed: list[int]) -> dict:
    """A model's histogram for one prompt against the teacher's for that prompt: TV, the rare-class recall over the
    prompt's two rarest classes in the captions, and the share of samples the prompt admits."""
    rare = sorted(allowed, key=lambda c: (mix[c], c))[:2]
    return {"tv_teacher": tv_distance(hist, teacher), "rare_recall": rare_class_recall(hist, teacher, rare),
            "tv_captions": tv_distance(hist, mix), "fits_prompt": float(sum(hist[c] for c in allowed)), "rare": rare}


def plot(path: Path, hists: dict[str, dict[str, list[float]]], mix: dict[str, list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROMPTS), figsize=(5.2 * len(PROMPTS), 3.8), sharey=True)
    models = {"captions": mix, **hists}
    width, pos = 0.85 / len(models), np.arange(10)
    for ax, p in zip(axes, PROMPTS):
        for j, (name, h) in enumerate(models.items()):
            color = "black" if name == "captions" else "dimgray" if name == "teacher" else None
            ax.bar(pos + (j - (len(models) - 1) / 2) * width, h[p], width, label=name, color=color,
                   hatch="//" if name.endswith(NOGAN) else None, edgecolor="white" if name.endswith(NOGAN) else None)
        ax.set_xticks(pos, [str(c) for c in range(10)])
        ax.set(title=f'"{p}"', xlabel="digit (classifier)")
    axes[0].set_ylabel("share of samples")
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="distillation config overrides (key=value) for every student")
    p.add_argument("--runs", default=RUNS, help=f"comma-separated <divergence>[{NOGAN}] (default: {RUNS})")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--teacher-iterations", type=int, default=5000)
    p.add_argument("--distill-iterations", type=int, default=1000)
    p.add_argument("--num", type=int, default=1000, help="samples per model and multi-modal prompt")
    p.add_argument("--out", default="runs/bench-multimodal-prompts")
    p.add_argument("--seeds", type=int, default=1, help="student seeds 0..N-1 (mean ± std)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, t_start = Path(args.out), time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", flush=True)

    data, mix = captioned_digits(out / "data")
    say("captions per multi-modal prompt: " + json.loads((data / "done").read_text()).__repr__())
    teacher, latents = out / "teacher", out / "latents"
    if not (teacher / "trained").is_file():
        vae, loss = bench.train_vae(args.vae_steps)
        say(f"VAE trained ({args.vae_steps} steps, final loss {loss:.4f})")
        bench.save_pipeline(teacher, vae)
        shutil.rmtree(latents, ignore_errors=True)
        t2i.prepare_latents(teacher, data, latents, batch_size=256, progress=False)
        bench.train_teacher(teacher, latents, args.teacher_iterations)
        (teacher / "trained").write_text("")
        say(f"teacher trained ({args.teacher_iterations} iterations)")

    clf = load_digits_classifier(progress=False)
    multi = [q for q in PROMPTS for _ in range(args.num)]
    class_prompts, digits = bench.prompts_for(2000)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def record(name: str, sample) -> None:
        if name in results:
            return
        x, _ = sample(multi)
        hists = {q: histograms(x[i * args.num:(i + 1) * args.num], clf) for i, q in enumerate(PROMPTS)}
        save_image_grid(bench.to_digits(torch.cat([x[i * args.num:i * args.num + 30] for i in range(len(PROMPTS))])),
                        out / f"{name}.png", nrow=30, scale=3)
        x, seconds = sample(class_prompts)
        results[name] = {"hist": hists, **bench.score(x, digits, seconds, class_prompts)}
        write_text(results_path, json.dumps(results, indent=1))
        say(f"{name}: FID {results[name]['fid']:.2f}, " + "; ".join(
            f"{q}: {np.round(h, 3).tolist()}" for q, h in hists.items()))

    record("teacher", lambda prompts: bench.sample_teacher(teacher, prompts))
    runs = [r for r in args.runs.split(",") if r]
    for run in runs:
        divergence, gan = (run[: -len(NOGAN)], False) if run.endswith(NOGAN) else (run, True)
        for seed in range(args.seeds):
            name = seed_name(run, seed)
            extra = [*([] if gan else ["distill.gan_weight=0"]), *args.overrides, f"distill.seed={seed}"]
            seconds, _ = bench.distill_student(out / name, teacher, bench.student_overrides(
                latents, divergence, args.distill_iterations, extra))
            if seconds:
                say(f"distilled {name} in {seconds:.0f} s")
            record(name, lambda prompts, run_dir=out / name: bench.sample_student(run_dir, prompts))

    # -- report -----------------------------------------------------------------------------------------------------
    t_hist = results["teacher"]["hist"]
    for r in results.values():
        per = {q: prompt_metrics(r["hist"][q], t_hist[q], mix[q], PROMPTS[q]) for q in PROMPTS}
        r["prompts"] = per
        r["mean"] = {k: float(np.mean([m[k] for m in per.values()]))
                     for k in ("tv_teacher", "rare_recall", "tv_captions", "fits_prompt")}
    write_text(results_path, json.dumps(results, indent=1))

    by_run = {run: seeds for run in ["teacher", *runs]
              if (seeds := [results[n] for s in range(args.seeds) if (n := seed_name(run, s)) in results])}
    rows = []
    for run, seeds in by_run.items():
        cells = [str(len(seeds)), cell([r["fid"] for r in seeds], "{:.2f}"),
                 cell([r["prompt_accuracy"] for r in seeds], "{:.3f}"),
                 *(cell([r["prompts"][q]["tv_teacher"] for r in seeds], "{:.3f}") + " / "
                   + cell([r["prompts"][q]["rare_recall"] for r in seeds], "{:.2f}") for q in PROMPTS),
                 *(cell([r["mean"][k] for r in seeds], "{:.3f}") for k in ("tv_teacher", "rare_recall", "tv_captions",
                                                                          "fits_prompt"))]
        rows.append(f"| {run} | " + " | ".join(cells) + " |")
    rare = {q: prompt_metrics(mix[q], mix[q], mix[q], PROMPTS[q])["rare"] for q in PROMPTS}
    head = (f"Multi-modal prompts, CFG {bench.GUIDANCE:g}, {args.num} samples per model and prompt; one-step students "
            f"({args.distill_iterations} iterations, batch 64, seeds 0-{args.seeds - 1}); rare classes per prompt (two "
            f"rarest in the captions): {rare}; {torch.get_num_threads()} CPU thread(s)")
    lines = [head, "", "| model | seeds | digits-FID (class prompts) | prompt accuracy (class prompts) | "
             + " | ".join(f'"{q}": TV to teacher / rare recall' for q in PROMPTS)
             + " | mean TV to teacher | mean rare recall | mean TV to captions | fits the prompt |",
             "|" + "---|" * (len(PROMPTS) + 8), *rows]
    text = "\n".join(lines) + "\n"
    write_text(out / "table.md", text)
    means = {run: {q: np.mean([r["hist"][q] for r in seeds], axis=0).tolist() for q in PROMPTS}
             for run, seeds in by_run.items()}
    plot(out / "class_histograms.png", means, mix, f"class histograms per multi-modal prompt, CFG {bench.GUIDANCE:g}, "
         f"students' mean over seeds 0-{args.seeds - 1}")
    print("\n" + text)
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s ({math.ceil(total / 60)} min); {out / 'table.md'}, {out / 'class_histograms.png'}")


if __name__ == "__main__":
    main()
