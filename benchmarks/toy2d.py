"""The 2-D lab benchmark: all six divergences of Table 1 and the adversarial-only ablation, over seeds.

    python benchmarks/toy2d.py                      # 5 seeds, analytic teacher, 4000 iterations (demo: 3000)
    python benchmarks/toy2d.py --seeds 3 teacher.kind=mlp

Prints a markdown table of mean ± std over seeds (modes covered, total-variation distance of mode
weights, k-NN precision/recall, mean teacher log-density, wall time) and, for every f-distill run, how
well the discriminator's ratio r = exp(logit) tracks the true p_t/q_t (Pearson correlation of log r at
several noise levels; see fdistill.apps.lab2d.ratio_check). Writes everything to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fdistill.apps import lab2d as toy

RUNS = "reverse_kl,softened_rkl,js,squared_hellinger,forward_kl,jeffreys,adversarial"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (as for `fdistill demo`)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--runs", default=RUNS, help=f"comma-separated runs (default: {RUNS})")
    p.add_argument("--iterations", type=int, default=4000, help="distillation iterations per run (demo: 3000)")
    p.add_argument("--out", default="runs/bench-toy2d")
    args = p.parse_args()
    torch.set_num_threads(2)

    cfg = toy.load_toy_config(overrides=[f"distill.iterations={args.iterations}", *args.overrides])
    runs = args.runs.split(",")
    out = Path(args.out)
    mixture = toy.build_mixture(cfg)
    mlp = toy.cached_teacher(mixture, cfg, out, progress=False)
    metrics: dict[str, list[dict]] = {r: [] for r in runs}
    ratios: dict[str, list[dict]] = {r: [] for r in runs}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for run in runs:
            m, d, _ = toy.run_one(run, mixture, mlp, cfg, seed, progress=False)
            metrics[run].append(m)
            ratios[run].append(m.pop("ratio_check"))
            print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed} {run:18s} modes {m['modes']} tv {m['tv']:.3f} "
                  f"recall {m['recall']:.3f}", flush=True)

    keys = [c[0] for c in toy.COLUMNS]
    rows = {r: {k: [m[k] for m in ms] for k in keys} for r, ms in metrics.items()}
    print(f"\n2-D lab, teacher {cfg.teacher.kind}, {cfg.distill.iterations} iterations, batch "
          f"{cfg.distill.batch_size}, {args.seeds} seeds (mean ± std)\n")
    print(toy.format_table(rows, mixture.num_modes))
    if ratios:
        sigmas = list(next(iter(ratios.values()))[0])
        print("\nDiscriminator ratio vs the true p_t/q_t: Pearson corr of log r (mean over seeds)\n")
        print("| run | " + " | ".join(f"sigma={s:g}" for s in sigmas) + " |")
        print("|---|" + "---|" * len(sigmas))
        for run, per_seed in ratios.items():
            cells = [f"{sum(x[s]['corr'] for x in per_seed) / len(per_seed):.2f}" for s in sigmas]
            print(f"| {run} | " + " | ".join(cells) + " |")
    shares = {r: [sum(m["share"][k] for m in ms) / len(ms) for k in range(mixture.num_modes)]
              for r, ms in metrics.items()}
    print("\nMean share per mode (true weights first)\n")
    print("| run | " + " | ".join(f"{w:.3f}" for w in mixture.weights.tolist()) + " | off-mode |")
    print("|---|" + "---|" * (mixture.num_modes + 1))
    for run, sh in shares.items():
        off = sum(m["off_mode"] for m in metrics[run]) / len(metrics[run])
        print(f"| {run} | " + " | ".join(f"{v:.3f}" for v in sh) + f" | {off:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"metrics": metrics, "ratio_check": ratios}, indent=1, default=str))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
