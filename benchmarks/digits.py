"""End to end on real digits: EDM teacher (35 NFE) vs one-step students, on CPU.

    python benchmarks/digits.py                         # configs/digits.yaml; teacher trained once, cached
    python benchmarks/digits.py --runs js,forward_kl distill.iterations=500

Trains (or reuses) the class-conditional EDM teacher of configs/digits.yaml, samples it with EDM's
Heun sampler (18 steps = 35 NFE), distills one-step students (f-distill with each divergence, plus
the adversarial-only ablation) and prints digits-FID, precision, recall (k = 3) and class accuracy
in the digits classifier's feature space (fdistill.digits_classifier), with seconds per 1,000
samples. Sample grids go to <out>/*.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fdistill.apps import distill, images
from fdistill.apps.cli import DIGITS_PRESET
from fdistill.data.datasets import load_dataset
from fdistill.data.writers import save_image_grid
from fdistill.evaluation.evaluate import evaluate_samples
from fdistill.teachers.loading import load_network
from fdistill.training.loop import training_loop


def score(net, n, shape, label_dim, student=None, steps=18):
    t0 = time.perf_counter()
    x, labels = images.generate(net, n, shape, label_dim, student, steps, seed=1)
    seconds = time.perf_counter() - t0
    return x, {**evaluate_samples(x, labels.argmax(1)), "s_per_1000": 1000 * seconds / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (as for `fdistill distill`)")
    p.add_argument("--config", default=str(DIGITS_PRESET))
    p.add_argument("--runs", default="reverse_kl,js,forward_kl,adversarial")
    p.add_argument("--num", type=int, default=2000, help="samples per model for the metrics")
    p.add_argument("--out", default="runs/bench-digits")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    cfg = images.load_config(args.config, args.overrides)
    data = load_dataset(cfg.data)
    shape = (data.channels, data.resolution, data.resolution)
    t_start = time.perf_counter()

    teacher_path = out / "teacher.safetensors"
    if not teacher_path.is_file():
        t0 = time.perf_counter()
        images.train_teacher(cfg, out, progress=False)
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s", flush=True)
    teacher, _, _ = load_network(teacher_path)
    rows = {}
    x, rows["teacher (35 NFE)"] = score(teacher, args.num, shape, data.label_dim, steps=cfg.sampler_steps)
    save_image_grid(x[:100], out / "teacher.png", nrow=10, scale=4)
    print(f"[{time.perf_counter() - t_start:5.0f} s] teacher: {rows['teacher (35 NFE)']}", flush=True)

    for run in args.runs.split(","):
        run_cfg = images.load_config(args.config, args.overrides)
        if run == "adversarial":
            run_cfg.distill.fdistill_weight = 0.0
        else:
            run_cfg.distill.divergence = run
        ckpt = out / run
        if not (ckpt / "checkpoints").is_dir():
            t0 = time.perf_counter()
            training_loop(distill.make_distiller(run_cfg, teacher_path, data), run_dir=out / run, progress=False)
            print(f"[{time.perf_counter() - t_start:5.0f} s] distilled {run} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        gen, student, _ = distill.load_generator(ckpt)
        x, rows[run] = score(gen, args.num, shape, data.label_dim, student)
        save_image_grid(x[:100], out / f"{run}.png", nrow=10, scale=4)

    print(f"\ndigits, {args.num} samples per model, {cfg.distill.iterations} distillation iterations "
          f"(batch {cfg.distill.batch_size}), {torch.get_num_threads()} CPU threads\n")
    print("| model | digits-FID | precision | recall | class acc | s / 1000 samples |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} "
              f"| {r['s_per_1000']:.2f} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; grids and results.json in {out}")


if __name__ == "__main__":
    main()
