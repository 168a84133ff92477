"""Does the divergence change mode coverage on images? Rare digits, with and without the GAN term, on CPU.

    python benchmarks/rare_modes.py --threads 2                      # one seed of the whole grid (8 students)
    python benchmarks/rare_modes.py --seeds 5                        # the study: mean ± std over 5 seeds
    python benchmarks/rare_modes.py --runs js,js-nogan --iterations 500 teacher.iterations=1000
    python benchmarks/rare_modes.py --seeds 5 --no-train             # the tables of what has been scored so far

Data: scikit-learn's digits subsampled by ``fdistill.data.imbalance.geometric_subset``: with the classes
ranked by a permutation drawn from ``--order-seed``, the class of rank k = 0..9 keeps
floor(174 * q^k) images, q = ratio^(-1/9) (174 = the smallest class's size), so the most common class is
``--ratio`` (default 10) times more frequent than the rarest: 174, 134, 104, 80, 62, 48, 37, 29, 22, 17 images
(707 in all) for ratio 10; order seed 0 ranks the classes 4, 6, 2, 7, 3, 5, 9, 0, 8, 1 (rarest: 0, 8, 1).

Teacher: the EDM network of configs/digits.yaml trained UNCONDITIONALLY (label_dim 0) on that subset,
cached under <out>/teacher-<hash>/ (the hash covers the teacher config and the subset), sampled with
EDM's Heun sampler (18 steps = 35 NFE). Students: one-step f-distill students by each divergence
(reverse_kl, js, squared_hellinger, forward_kl), each with the preset's GAN term (run name ``<divergence>``)
and without it (``<divergence>-nogan``: distill.gan_weight=0). Without the GAN term the discriminator head
still trains: ``Distiller.critic_step`` computes the head's GAN loss (+ R1) on real vs generated noisy
samples and steps its optimizer whatever gan_weight is, and ``student_step`` reads r = exp(logit) from it
for the weights h(r); gan_weight only scales the generator's own GAN loss, which is then left out.
A run name may end in ``-fake`` or ``-dmd2`` (``js-fake``, ``js-nogan-dmd2``): the head reads the fake score's
features instead of the frozen teacher's (distill.disc_features = fake_score: the head's loss reaches the head only;
dmd2: it also trains the fake score, as DMD2 does).

Metrics per model (``--num`` samples, sampled from fixed seeds): digits-FID, precision and recall (k = 3)
in the digits classifier's feature space against the 707 training images (``evaluate_samples(real=...)``),
and the class histogram of the samples under the digits classifier (argmax of its logits;
``fdistill.evaluation.coverage``), compared with the teacher's samples and with the training data (both
also classified by the classifier): total-variation distance TV = 1/2 sum_k |p_k - t_k|, and the rare-class
recall RR = sum_{k in R} min(p_k, t_k) / sum_{k in R} t_k over R = the three rarest classes of the training
data (the share of the reference's rare-class mass the student reproduces; against the teacher's samples
"rare recall", against the data "rare recall (data)"), and the student's own mass on R ("rare share").

Seeds: ``--seeds N`` distills every run with distill.seed = 0..N-1 (the teacher is shared) and reports
mean ± std (sample std) over seeds. Each (run, seed)'s metrics are cached in
<out>/students-<hash>/results.json (the hash covers the teacher, the distill config after overrides and
--num) as soon as it is scored, so an interrupted study continues where it stopped. Writes the markdown
table to <out>/table.md (with two more tables: the head's diagnostics per student, its loss against 2 ln 2, its
accuracy, the spread of log r, Fig. 6's std h̄ and Spearman correlation per sigma; and, with 2 or more seeds, per
metric the pair of students furthest apart in pooled seed standard deviations and the pairs above 3), the grouped
class-histogram bars (data, teacher, each student) to <out>/class_histogram.png and sample grids to
<out>/students-<hash>/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fdistill.apps import distill, images
from fdistill.apps.cli import DIGITS_PRESET
from fdistill.config import to_dict
from fdistill.core import divergences
from fdistill.data.datasets import load_dataset, to_float
from fdistill.data.imbalance import imbalanced_dataset
from fdistill.data.writers import save_image_grid
from fdistill.evaluation.coverage import (
    class_histogram,
    coverage_metrics,
    predict_classes,
    rarest_classes,
    separation,
)
from fdistill.evaluation.digits_classifier import load_digits_classifier
from fdistill.evaluation.evaluate import evaluate_samples
from fdistill.io import write_text
from fdistill.teachers.loading import load_network
from fdistill.training import checkpoint
from fdistill.training.loop import training_loop

DIVERGENCES = ("reverse_kl", "js", "squared_hellinger", "forward_kl")
RUNS = ",".join(f"{d}{s}" for s in ("", "-nogan") for d in DIVERGENCES)
NOGAN = "-nogan"
DISC_FEATURES = {"-fake": "fake_score", "-dmd2": "dmd2"}  # run suffix -> distill.disc_features
DIAG_COLUMNS = [("loss_gan_d", "head loss (2 ln 2 = 1.386: chance)", "{:.3f}"),
                ("disc_accuracy", "head accuracy", "{:.3f}"), ("log_r_std", "std log r", "{:.3f}"),
                ("h_spread", "h_max / h_min in a batch", "{:.2f}"),
                ("h_std_mid", "std h̄ (mid σ)", "{:.3f}"),
                ("spearman_mid", "Spearman h̄ vs score diff (mid σ)", "{:+.3f}"),
                ("spearman_min", "lowest σ", "{:+.3f}"), ("spearman_max", "highest σ", "{:+.3f}")]
DIAG_SAMPLES = 1024
NUM_CLASSES = 10
COLUMNS = [("fid", "digits-FID", "{:.2f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("tv_teacher", "TV to teacher", "{:.3f}"), ("tv_data", "TV to data", "{:.3f}"),
           ("rare_recall", "rare recall", "{:.3f}"), ("rare_recall_data", "rare recall (data)", "{:.3f}"),
           ("rare_share", "rare share", "{:.3f}"), ("train_s", "train s", "{:.0f}")]


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def parse_run(run: str) -> tuple[str, bool, str]:
    """'js' -> ('js', with GAN term, the teacher's features); 'js-nogan' -> without the GAN term; 'js-fake' /
    'js-nogan-dmd2' -> the head on the fake score's features (``DISC_FEATURES``)."""
    features = next((f for suffix, f in DISC_FEATURES.items() if run.endswith(suffix)), "teacher")
    run = next((run[: -len(suffix)] for suffix in DISC_FEATURES if run.endswith(suffix)), run)
    divergence, gan = (run[: -len(NOGAN)], False) if run.endswith(NOGAN) else (run, True)
    divergences.check(divergence)
    return divergence, gan, features


def student_config(cfg, run: str, seed: int):
    """``cfg`` with the student of ``run`` (divergence, GAN term, the head's features) and ``seed``."""
    divergence, gan, features = parse_run(run)
    run_cfg = copy.deepcopy(cfg)
    changes = {"divergence": divergence, "seed": seed, "disc_features": features,
               **({} if gan else {"gan_weight": 0.0})}
    run_cfg.distill = dataclasses.replace(run_cfg.distill, **changes)  # validated again
    return run_cfg


def score(net, n: int, shape, student, steps: int, real: torch.Tensor, clf) -> tuple[torch.Tensor, dict]:
    """Samples of ``net`` (its student steps; None: Heun's sampler) and their metrics (FID etc., class histogram)."""
    t0 = time.perf_counter()
    x, _ = images.generate(net, n, shape, 0, student, steps, seed=1)
    seconds = time.perf_counter() - t0
    hist = class_histogram(predict_classes(x, clf), NUM_CLASSES)
    return x, {**evaluate_samples(x, real=real), "hist": hist.tolist(), "s_per_1000": 1000 * seconds / n}


def read_log(path: Path) -> list[dict]:
    """A run's log.jsonl, each student line with h's spread in its batch, h_spread = h_max / h_min."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in lines:
        if "h_max" in r and r.get("h_min"):
            r["h_spread"] = r["h_max"] / r["h_min"]
    return lines


def head_statistics(run_dir: Path, iterations: int) -> dict:
    """From <run>/log.jsonl, over the last quarter of training: the head's loss (2 ln 2 when it cannot tell real
    from generated) and balanced accuracy, and the std of log r over the student steps' batches. Every logged line
    carries the latest critic step's values (the loop logs on the student steps of preset's tau and log_every),
    so the means are over all late lines that have the key; also h's spread in the batch, h_max / h_min."""
    late = [r for r in read_log(run_dir / "log.jsonl") if r["iteration"] >= 0.75 * iterations]
    out = {}
    for key in ("loss_gan_d", "disc_accuracy", "log_r_std", "h_spread"):
        values = [r[key] for r in late if key in r]
        out[key] = float(np.mean(values)) if values else None
    return out


def diagnostics(d, run_dir: Path) -> dict:
    """How well the head estimates r (``head_statistics``), and Fig. 6 (Sec. 5.2) for the trained student ``d``:
    from ``DIAG_SAMPLES`` generated samples at the 10/30/50/70/90% quantiles of the training sigmas
    (``analyze_run.weights_and_score_differences``), the std of h_bar and its Spearman correlation with
    ||s_teacher - s_fake|| per sigma (the paper: negative)."""
    from scipy.stats import spearmanr

    from fdistill.apps.analyze_run import weights_and_score_differences

    support = d.sigmas.support
    sigmas = sorted(float(support.quantile(q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9))
    _, stats = weights_and_score_differences(d, DIAG_SAMPLES, sigmas)
    per_sigma = {}
    for sigma, v in stats.items():
        h, diff = v["h_bar"].numpy(), v["score_diff"].numpy()
        rho = float(spearmanr(h, diff).statistic) if h.std() > 0 else float("nan")
        per_sigma[sigma] = {"h_std": float(h.std()), "spearman": rho}
    mid = sigmas[2]
    return {**head_statistics(run_dir, d.cfg.iterations), "per_sigma": {str(k): v for k, v in per_sigma.items()},
            "h_std_mid": per_sigma[mid]["h_std"], "spearman_mid": per_sigma[mid]["spearman"],
            "spearman_min": per_sigma[sigmas[0]]["spearman"], "spearman_max": per_sigma[sigmas[-1]]["spearman"]}


def cell(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    t = torch.tensor(values, dtype=torch.float64)
    spread = " ± " + fmt.replace("+", "").format(float(t.std())) if len(values) > 1 else ""
    return fmt.format(float(t.mean())) + spread


def table(rows: dict[str, list[dict]], columns=COLUMNS) -> str:
    lines = ["| model | seeds | " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for name, results in rows.items():
        cells = [cell([r.get(key) for r in results], fmt) for key, _, fmt in columns]
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEPARATED = 3.0  # the study's bar: seed means this many pooled seed standard deviations apart


def separations(rows: dict[str, list[dict]], columns=COLUMNS[:-1]) -> str:
    """Per metric, the pair of students whose seed means are furthest apart in pooled seed standard deviations
    (``coverage.separation``), and how many pairs pass ``SEPARATED``: the study's test. Empty below 2 seeds."""
    runs = [name for name, got in rows.items() if len(got) >= 2 and not name.startswith(("data", "teacher"))]
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    if not pairs:
        return ""
    lines = [f"| metric | furthest pair | their means | separation | pairs above {SEPARATED:g} of {len(pairs)} |",
             "|---|---|---|---|---|"]
    for key, name, fmt in columns:
        seps = {(a, b): separation([r[key] for r in rows[a]], [r[key] for r in rows[b]]) for a, b in pairs}
        seps = {pair: v for pair, v in seps.items() if not math.isnan(v)}
        if not seps:
            continue
        (a, b), top = max(seps.items(), key=lambda kv: kv[1])
        means = " / ".join(fmt.format(float(np.mean([r[key] for r in rows[x]]))) for x in (a, b))
        above = sorted(f"{x} – {y}" for (x, y), v in seps.items() if v > SEPARATED)
        lines.append(f"| {name} | {a} – {b} | {means} | {top:.2f} | {len(above)}"
                     + (f": {', '.join(above)}" if above else "") + " |")
    return "\n".join(lines)


def plot(path: Path, hists: dict[str, list[list[float]]], order: list[int], title: str) -> None:
    """Grouped bars: per class (most to least common in the data), the share of each model's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 1.1 * NUM_CLASSES * (len(hists) + 1) / 4)), 4.6))
    width = 0.85 / len(hists)
    pos = np.arange(NUM_CLASSES)
    for j, (name, hs) in enumerate(hists.items()):
        h = np.asarray(hs)[:, order]
        err = h.std(0, ddof=1) if len(h) > 1 else None
        color = "black" if name == "data" else "dimgray" if name.startswith("teacher") else None
        ax.bar(pos + (j - (len(hists) - 1) / 2) * width, h.mean(0), width, yerr=err, label=name, color=color,
               hatch="//" if NOGAN in name else None, edgecolor="white" if NOGAN in name else None)
    ax.set_xticks(pos, [str(c) for c in order])
    ax.set(xlabel="digit (most to least common in the training data)", ylabel="share of samples (classifier)",
           title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_head(path: Path, logs: dict[str, Path]) -> None:
    """The head over training, one line per student (``logs``: name -> its log.jsonl): its balanced accuracy on
    real vs generated (0.5: chance), the std of log r over the student step's batch, and h's spread in that batch
    (h_max / h_min after Alg. 1's normalisation; 1 for reverse-KL, whose h is constant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("disc_accuracy", "head accuracy (0.5: chance)"), ("log_r_std", "std of log r in the batch"),
              ("h_spread", "h_max / h_min in the batch")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6))
    for name, log in logs.items():
        lines = read_log(log)
        for ax, (key, _) in zip(axes, panels):
            points = [(r["iteration"], r[key]) for r in lines if key in r]
            if points:
                ax.plot(*zip(*points), label=name, lw=1, ls="--" if NOGAN in name else "-")
    for ax, (_, title) in zip(axes, panels):
        ax.set(xlabel="iteration", title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (as for `fdistill distill`)")
    p.add_argument("--config", default=str(DIGITS_PRESET))
    p.add_argument("--runs", default=RUNS, help=f"comma-separated <divergence>[{NOGAN}] (default: {RUNS})")
    p.add_argument("--seeds", type=int, default=1, help="student seeds 0..N-1 (mean ± std)")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (distill.iterations)")
    p.add_argument("--ratio", type=float, default=10.0, help="most common / rarest class in the training data")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the class order and the kept images")
    p.add_argument("--num", type=int, default=2000, help="samples per model for the metrics")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="runs/bench-rare-modes")
    p.add_argument("--no-train", action="store_true", help="report the students already scored, distill none")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        parse_run(r)  # an unknown divergence fails before anything trains
    overrides = list(args.overrides) + ([f"distill.iterations={args.iterations}"] if args.iterations else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def stamp() -> str:
        return f"[{time.perf_counter() - t_start:5.0f} s]"

    # -- the imbalanced, unlabelled training set -----------------------------------------------------
    full = load_dataset("digits")
    labelled, order = imbalanced_dataset(full, args.ratio, args.order_seed)
    counts = np.bincount(labelled.labels, minlength=NUM_CLASSES)
    cfg = images.load_config(args.config, overrides)
    data_key = digest({"ratio": args.ratio, "order_seed": args.order_seed})
    data_path = out / f"digits-geometric-{data_key}.npz"
    if not data_path.is_file():
        np.savez(data_path, images=labelled.images)  # no labels: the teacher is unconditional
    cfg.data = str(data_path)
    data = load_dataset(cfg.data)
    assert data.label_dim == 0
    shape = (data.channels, data.resolution, data.resolution)
    real = to_float(data.images)
    clf = load_digits_classifier(progress=False)
    rare = rarest_classes(counts / counts.sum(), 3)
    print(f"training data: {len(data)} digits, per class {dict(enumerate(counts.tolist()))} "
          f"(ratio {counts.max() / counts.min():.1f}); rarest {rare}", flush=True)

    # -- the teacher ------------------------------------------------------------------------------------
    teacher_dir = out / f"teacher-{digest({'teacher': to_dict(cfg.teacher), 'data': data_key})}"
    teacher_path = teacher_dir / "teacher.safetensors"
    teacher_s = None
    if not teacher_path.is_file():
        t0 = time.perf_counter()
        images.train_teacher(cfg, teacher_dir, progress=False)
        teacher_s = time.perf_counter() - t0
        print(f"{stamp()} teacher trained in {teacher_s:.0f} s ({cfg.teacher.iterations} iterations)", flush=True)

    study = out / f"students-{digest({'teacher': str(teacher_dir), 'cfg': to_dict(cfg), 'num': args.num})}"
    study.mkdir(exist_ok=True)
    results_path = study / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    mine: set[str] = set()

    def save(*keys: str) -> None:
        """Write the entries ``keys`` (and those saved before) into what is on disk: two studies of other runs may
        share the folder, each writing only the entries it computed."""
        mine.update(keys)
        on_disk = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results.update({k: v for k, v in on_disk.items() if k not in mine})
        write_text(results_path, json.dumps({**on_disk, **{k: results[k] for k in mine}}, indent=1))

    data_hist = class_histogram(predict_classes(real, clf), NUM_CLASSES)
    results["data"] = {"hist": data_hist.tolist(), "label_hist": (counts / counts.sum()).tolist(),
                       "class_order": order.tolist(), "rare": rare}
    if "teacher" not in results:
        teacher, _, _ = load_network(teacher_path)
        x, m = score(teacher, args.num, shape, None, cfg.sampler_steps, real, clf)
        results["teacher"] = {**m, "train_s": teacher_s}
        save_image_grid(x[:100], study / "teacher.png", nrow=10, scale=4)
        save("teacher")
    teacher_hist = results["teacher"]["hist"]
    for who in ("data", "teacher"):
        results[who].update(coverage_metrics(results[who]["hist"], teacher_hist, data_hist, rare))
    save("data", "teacher")
    print(f"{stamp()} teacher: FID {results['teacher']['fid']:.2f}, rare share "
          f"{results['teacher']['rare_share']:.3f} (data {results['data']['rare_share']:.3f})", flush=True)

    # -- the students -----------------------------------------------------------------------------------
    for seed in range(args.seeds):
        for run in runs:
            key = f"{run}/seed{seed}"
            if key in results or args.no_train:
                continue
            run_cfg = student_config(cfg, run, seed)
            run_dir = study / f"{run}-seed{seed}"
            if run_dir.exists():  # an interrupted student, never scored: start it afresh
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            d = distill.make_distiller(run_cfg, teacher_path, data)
            training_loop(d, run_dir=run_dir, progress=False)
            train_s = time.perf_counter() - t0
            gen, student, _ = distill.load_generator(run_dir)
            x, m = score(gen, args.num, shape, student, cfg.sampler_steps, real, clf)
            save_image_grid(x[:100], study / f"{run}-seed{seed}.png", nrow=10, scale=4)
            results[key] = {**m, **coverage_metrics(m["hist"], teacher_hist, data_hist, rare), "train_s": train_s,
                            "s_per_iteration": train_s / run_cfg.distill.iterations, "diag": diagnostics(d, run_dir)}
            save(key)
            r = results[key]
            print(f"{stamp()} {key}: {train_s:.0f} s, FID {r['fid']:.2f}, TV to teacher {r['tv_teacher']:.3f}, "
                  f"rare recall {r['rare_recall']:.3f}", flush=True)

    # -- the head's diagnostics of students scored before they were recorded ---------------------------------
    for key, r in list(results.items()):
        run_dir = study / key.replace("/", "-")
        run, _, seed = key.partition("/seed")
        if run in runs and "diag" not in r and (run_dir / "log.jsonl").is_file():
            d = distill.make_distiller(student_config(cfg, run, int(seed)), teacher_path, data)
            d.load(checkpoint.resolve(run_dir))
            r["diag"] = diagnostics(d, run_dir)
            save(key)

    # -- report -------------------------------------------------------------------------------------------
    rows = {"data (training set)": [results["data"]], "teacher (35 NFE)": [results["teacher"]]}
    hists = {"data": [results["data"]["hist"]], "teacher": [teacher_hist]}
    for run in runs:
        got = [results[f"{run}/seed{s}"] for s in range(args.seeds) if f"{run}/seed{s}" in results]
        rows[run] = got
        hists[run] = [r["hist"] for r in got]
    head = (f"Rare digits (geometric, ratio {args.ratio:g}, {len(data)} images; rarest {rare}), unconditional "
            f"teacher ({cfg.teacher.iterations} iterations); students: {cfg.distill.iterations} iterations, batch "
            f"{cfg.distill.batch_size}, gan_weight {cfg.distill.gan_weight:g} (-nogan: 0); {args.num} samples "
            f"per model; {args.seeds} seed(s), mean ± std; {torch.get_num_threads()} CPU thread(s)")
    for key, r in results.items():  # the log's part read afresh: results cached before it read every line
        log_dir = study / key.replace("/", "-")
        if "diag" in r and (log_dir / "log.jsonl").is_file():
            r["diag"].update(head_statistics(log_dir, cfg.distill.iterations))
    diag_rows = {name: [r["diag"] for r in got if "diag" in r] for name, got in rows.items() if name in runs}
    text = (head + "\n\n" + table(rows) + "\n\nThe head's ratio estimate (last quarter of training) and Fig. 6 "
            f"({DIAG_SAMPLES} samples per student, sigma at the 10/50/90% quantiles of the training levels):\n\n"
            + table(diag_rows, DIAG_COLUMNS) + "\n")
    seps = separations(rows)
    if seps:
        text += ("\nDo two students differ? Per metric, the seed means' gap in pooled seed standard deviations "
                 "(|mean_a - mean_b| / sqrt((s_a^2 + s_b^2) / 2)):\n\n" + seps + "\n")
    write_text(out / "table.md", text)
    plot(out / "class_histogram.png", hists, order.tolist(),
         f"class histograms (classifier), {cfg.distill.iterations} student iterations, {args.seeds} seed(s)")
    logs = {run: study / f"{run}-seed0" / "log.jsonl" for run in runs}
    plot_head(out / "head_over_training.png", {run: log for run, log in logs.items() if log.is_file()})
    print("\n" + text)
    print(f"total {time.perf_counter() - t_start:.0f} s; {out / 'table.md'}, {out / 'class_histogram.png'}, "
          f"{out / 'head_over_training.png'} (seed 0), "
          f"results in {results_path}")


if __name__ == "__main__":
    main()
