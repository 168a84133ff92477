"""The 2-D lab: distill one-step generators of a hard Gaussian mixture and compare divergences.

``fdistill demo`` runs ``run_demo`` with ``configs/toy2d.yaml`` (a user's config is read over it, so a
file holding only ``mixture: {means, stds, weights}`` is enough); ``benchmarks/toy2d.py`` runs the
longer multi-seed comparison. Everything here is small enough for a 2-core CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fdistill import config
from fdistill.config import PRESETS, to_dict
from fdistill.core.diffusion import edm_loss, score_from_denoiser
from fdistill.core.objective import fdistill_weights
from fdistill.evaluation.metrics import mode_coverage, precision_recall
from fdistill.io import atomic_path, write_text
from fdistill.networks.heads import Discriminator
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training import run as run_folder
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import training_loop

PRESET = PRESETS / "toy2d.yaml"
ADVERSARIAL = "adversarial"  # the name the lab gives the GAN-only ablation (fdistill_weight = 0)


@dataclass
class MixtureConfig:
    means: list[list[float]]
    stds: list[float]
    weights: list[float]


@dataclass
class ToyTeacherConfig:
    """``kind="mlp"``: an MLP denoiser trained with the EDM loss on mixture samples (its score is
    wrong where data is scarce); ``kind="gmm"``: the exact analytic denoiser. The MLP is trained in
    both cases: it initializes the generator and the fake score, as the teacher's copy does for images."""

    kind: str = "gmm"
    hidden: int = 128
    depth: int = 3
    steps: int = 4000
    batch_size: int = 1024
    lr: float = 2e-3
    P_mean: float | None = None  # None: EDM's -1.2 shifted by ln(sigma_data / 0.5)
    P_std: float = 1.2

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "gmm"):
            raise ValueError(f"teacher.kind must be 'mlp' or 'gmm', got {self.kind!r}")


@dataclass
class ToyConfig:
    mixture: MixtureConfig
    teacher: ToyTeacherConfig = field(default_factory=ToyTeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    runs: list[str] = field(default_factory=lambda: ["reverse_kl", "js", "forward_kl"])  # divergences or "adversarial"
    num_eval: int = 5000
    seed: int = 0


def load_toy_config(path: str | Path = PRESET, overrides: list[str] = ()) -> ToyConfig:
    """The lab's config: ``path`` read over the ``toy2d`` preset (so a file may hold only a mixture),
    then the ``key=value`` overrides."""
    own = isinstance(path, (str, Path)) and Path(path) == PRESET
    return config.load(ToyConfig, path, overrides, base=None if own else config.load_yaml(PRESET))


def config_from_record(record: dict) -> ToyConfig:
    """The config a demo run folder recorded (its config.yaml)."""
    return config.from_dict(ToyConfig, record["config"])


def build_mixture(cfg: ToyConfig) -> GaussianMixture:
    m = cfg.mixture
    return GaussianMixture(m.means, m.stds, m.weights)


# -- teacher ------------------------------------------------------------------------------------
def train_mlp_teacher(
    mixture: GaussianMixture, cfg: ToyTeacherConfig, seed: int = 0, progress: bool = True
) -> MLPDenoiser:
    """EDM training (EDM Eq. 2) of an MLP denoiser on fresh mixture samples every step."""
    torch.manual_seed(seed)
    sigma_data = mixture.data_std()
    net = MLPDenoiser(mixture.dim, cfg.hidden, cfg.depth, sigma_data=sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    p_mean = cfg.P_mean if cfg.P_mean is not None else -1.2 + math.log(sigma_data / 0.5)
    for _ in tqdm(range(cfg.steps), desc="teacher (EDM loss)", disable=not progress, leave=False):
        loss = edm_loss(net, mixture.sample(cfg.batch_size), None, p_mean, cfg.P_std, sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def cached_teacher(mixture: GaussianMixture, cfg: ToyConfig, cache_dir: Path, progress: bool = True) -> MLPDenoiser:
    """Train the MLP teacher once per (mixture, teacher config, seed) and reuse it from cache_dir."""
    key = json.dumps({"mixture": to_dict(cfg.mixture), "teacher": to_dict(cfg.teacher), "seed": cfg.seed})
    path = Path(cache_dir) / f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"
    net = MLPDenoiser(mixture.dim, cfg.teacher.hidden, cfg.teacher.depth, sigma_data=mixture.data_std())
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False)
    net = train_mlp_teacher(mixture, cfg.teacher, cfg.seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    return net


# -- distillation -------------------------------------------------------------------------------
def toy_distiller(run: str, mixture: GaussianMixture, mlp: MLPDenoiser, cfg: ToyConfig, seed: int) -> Distiller:
    """Generator and fake score start as copies of the trained MLP; the teacher is the MLP or the GMM."""
    # dataclasses.replace runs DistillConfig's validation again, so an adversarial run with no GAN term
    # (fdistill_weight = gan_weight = 0) is refused here in one line rather than failing in backward.
    changes = {"fdistill_weight": 0.0} if run == ADVERSARIAL else {"divergence": run}
    dcfg = dataclasses.replace(copy.deepcopy(cfg.distill), seed=seed, **changes)
    torch.manual_seed(seed)
    teacher = mlp if cfg.teacher.kind == "mlp" else mixture
    generator = copy.deepcopy(mlp).requires_grad_(True).train()
    fake_score = copy.deepcopy(mlp).requires_grad_(True).train()
    disc = Discriminator.mlp((teacher if dcfg.disc_features == "teacher" else fake_score).feature_channels())
    real = torch.Generator().manual_seed(seed)
    return Distiller(dcfg, teacher, generator, fake_score, disc, sample_shape=(mixture.dim,),
                     real_data=lambda n, part: (mixture.sample(n, generator=real)[part], None))


def evaluate(samples: Tensor, mixture: GaussianMixture, reference: Tensor) -> dict:
    """Lab metrics of generated ``samples`` against the mixture (``reference``: true samples)."""
    cov = mode_coverage(samples, mixture.means, mixture.stds, mixture.weights)
    precision, recall = precision_recall(reference, samples, k=3)
    return {"modes": cov["covered"], "tv": cov["tv"], "precision": precision, "recall": recall,
            "logp": float(mixture.log_prob(samples).mean()), "share": cov["share"], "off_mode": cov["off_mode"]}


def run_one(run: str, mixture, mlp, cfg: ToyConfig, seed: int, progress: bool = True,
            run_dir: Path | None = None):
    """Distill one generator and evaluate its EMA samples. Returns (metrics, distiller, the samples scored).
    With ``run_dir``, the run is written there (config.yaml, log.jsonl, checkpoint) for ``analyze-run``."""
    t0 = time.perf_counter()
    d = toy_distiller(run, mixture, mlp, cfg, seed)
    if run_dir is not None:
        run_folder.clear(run_dir)  # a demo always starts afresh
        run_folder.write(run_dir, "demo", cfg, name=run)
    training_loop(d, run_dir=run_dir, progress=progress, desc=run)
    seconds = time.perf_counter() - t0
    torch.manual_seed(10_000 + seed)
    samples, reference = d.sample(cfg.num_eval), mixture.sample(cfg.num_eval)
    ratio = ratio_check(d, mixture)
    r_corr = sum(v["corr"] for v in ratio.values()) / len(ratio)
    metrics = {**evaluate(samples, mixture, reference), "r_corr": r_corr, "ratio_check": ratio, "seconds": seconds}
    return metrics, d, samples


COLUMNS = [("modes", "modes", "{:d}"), ("tv", "TV", "{:.3f}"), ("precision", "prec", "{:.3f}"),
           ("recall", "recall", "{:.3f}"), ("logp", "log p", "{:.2f}"), ("r_corr", "r corr", "{:.2f}"),
           ("seconds", "time s", "{:.0f}")]


def format_table(rows: dict[str, dict], num_modes: int) -> str:
    """Markdown table, one row per run; values may be floats or lists (shown as mean ± std)."""
    head = "| run | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            v = m[key]
            if isinstance(v, list):  # mean ± std over seeds
                t = torch.tensor(v, dtype=torch.float64)
                f = "{:.1f}" if fmt == "{:d}" else fmt
                cells.append(f.format(t.mean()) + (" ± " + f.format(t.std()) if len(v) > 1 else ""))
            else:
                cells.append(fmt.format(v) + (f"/{num_modes}" if key == "modes" else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def ratio_check(d: Distiller, mixture: GaussianMixture, sigmas=(0.1, 0.5, 2.0, 8.0), n: int = 4000,
                n_kde: int = 20000) -> dict[float, dict[str, float]]:
    """How well does the head estimate r_t = p_t / q_t (Sec. 3)? Compares the head's log r with the
    true log ratio: p_t is the mixture convolved with N(0, sigma^2 I) (exact), q_t is the generator's
    distribution convolved likewise, evaluated exactly for an independent set of n_kde generator samples.
    Returns, per sigma, the Pearson correlation and mean absolute error of log r (unclipped head)."""
    ref = d.sample(n_kde)
    out = {}
    for sigma in sigmas:
        s = torch.full((n,), sigma)
        x_t = d.sample(n) + sigma * torch.randn(n, mixture.dim)
        log_q = (-0.5 * torch.cdist(x_t, ref).square() / sigma**2).logsumexp(1) - math.log(n_kde) \
            - 0.5 * mixture.dim * math.log(2 * math.pi * sigma**2)
        true = mixture.log_prob(x_t, sigma) - log_q
        est = d.discriminator(d.disc_net.features(x_t, s, None))
        corr = torch.corrcoef(torch.stack([true, est]))[0, 1]
        out[sigma] = {"corr": float(corr), "mae": float((true - est).abs().mean()), "true_std": float(true.std())}
    return out


# -- pictures -----------------------------------------------------------------------------------
def _grid(mixture: GaussianMixture, n: int = 160, pad: float = 1.5):
    lo = (mixture.means - 3 * mixture.stds[:, None]).min(0).values - pad
    hi = (mixture.means + 3 * mixture.stds[:, None]).max(0).values + pad
    xs, ys = torch.linspace(float(lo[0]), float(hi[0]), n), torch.linspace(float(lo[1]), float(hi[1]), n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], 1), (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])), n


@torch.no_grad()
def score_and_weight_maps(d: Distiller, mixture: GaussianMixture, sigma: float, n_gen: int = 4096):
    """Fig. 3 on the plane at one noise level: |s_teacher - s_fake| and the weight h_bar the trainer
    would give a sample there: Alg. 1 lines 6-8 (``fdistill_weights``) with the first-stage bin means the
    trainer last used, h divided by its mean over generator samples noised to this sigma (line 9)."""
    pts, extent, n = _grid(mixture)
    s = torch.full((len(pts),), sigma)
    x0_t = d.teacher(pts, s, None)
    x0_f = d.fake_score(pts, s, None)
    diff = (score_from_denoiser(x0_t, pts, s) - score_from_denoiser(x0_f, pts, s)).norm(dim=1)
    x_gen = d.sample(n_gen) + sigma * torch.randn(n_gen, mixture.dim)
    s_gen = torch.full((n_gen,), sigma)
    norm = copy.deepcopy(d.ratio_norm).eval()  # the stored bin means, left untouched
    cfg = d.cfg

    def weights(x: Tensor, sig: Tensor):
        logits = d.discriminator(d.disc_net.features(x, sig, None))
        return fdistill_weights(logits, sig, d.divergence.h, norm, cfg.logit_clip, cfg.r_min, cfg.r_max)

    h_bar = weights(pts, s).h / weights(x_gen, s_gen).h.mean()
    return diff.reshape(n, n), h_bar.reshape(n, n), extent


def plot_demo(path: Path, mixture: GaussianMixture, samples: dict[str, Tensor], shares: dict[str, list[float]],
              fig3: tuple | None, fig3_run: str, sigma: float) -> None:
    """Top: samples over the teacher density per run. Bottom: the Fig. 3 pair and the mode shares.
    Mixtures of another dimension show their first two coordinates (or a histogram in 1-D) and no Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planar = mixture.dim == 2
    if planar:
        pts, extent, n = _grid(mixture)
        logp = mixture.log_prob(pts).reshape(n, n).clamp_min(-12).numpy()
    cols = max(len(samples), 3)
    fig = plt.figure(figsize=(3.6 * cols, 7.4))
    grid = fig.add_gridspec(2, cols)
    for i, (name, x) in enumerate(samples.items()):
        ax = fig.add_subplot(grid[0, i])
        x = x[:2000].numpy()
        if planar:
            ax.imshow(logp, origin="lower", extent=extent, cmap="Greys", alpha=0.8)
            ax.set(xlim=extent[:2], ylim=extent[2:])
        if mixture.dim == 1:
            ax.hist(x[:, 0], bins=80, color="tab:red", alpha=0.7)
        else:
            ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5)
        ax.set_title(name if planar else f"{name} (coordinates 1-2 of {mixture.dim})" if mixture.dim > 2 else name)
    if fig3 is not None:
        diff, h, _ = fig3
        gx, gy = torch.meshgrid(torch.linspace(*extent[:2], n), torch.linspace(*extent[2:], n), indexing="xy")
        gx, gy = gx.numpy(), gy.numpy()
        for i, (img, title, cmap) in enumerate([(diff.log10().numpy(), "log10 |s_teacher - s_fake|", "magma"),
                                                (h.numpy(), f"h_bar, {fig3_run}", "viridis")]):
            ax = fig.add_subplot(grid[1, i])
            im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap)
            ax.contour(gx, gy, logp, levels=6, colors="white", linewidths=0.4)
            ax.set_title(f"{title} (sigma={sigma:.2g})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(grid[1, 2:] if fig3 is not None else grid[1, :])
    k = torch.arange(mixture.num_modes).numpy()
    width = 0.8 / (len(shares) + 1)
    ax.bar(k, mixture.weights.numpy(), width, color="black", label="teacher weight")
    for j, (name, sh) in enumerate(shares.items()):
        ax.bar(k + (j + 1) * width, sh, width, label=name)
    ax.set(xlabel="mode (order of the config)", ylabel="share of samples", title="mode shares")
    ax.legend(fontsize=8)
    fig.suptitle("fdistill demo: one-step samples (red) over the teacher density"
                 + ("; bottom left: Fig. 3 pair" if fig3 is not None else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # a link planted at path is replaced, not followed
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # a link planted at path is replaced, not followed
        np.save(f, array)


def run_demo(cfg: ToyConfig, out_dir: str | Path, progress: bool = True) -> str:
    """Distill every run in cfg.runs, printing each table row as its run finishes (the adversarial-only run
    is skipped, in one printed line, when distill.gan_weight is 0: it would have no loss); returns the table.
    Writes to out_dir: demo.png, results.json,
    mixture.yaml (the teacher's means, stds and weights) and samples_<run>.npy (the cfg.num_eval one-step
    samples each run was scored on), with reference.npy (as many samples of the mixture itself), and each
    run's folder <run>/ (config.yaml, log.jsonl, checkpoint: ``fdistill analyze-run out_dir/<run>``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mixture = build_mixture(cfg)
    mlp = cached_teacher(mixture, cfg, out_dir, progress)
    teacher_seconds = time.perf_counter() - t0
    rows, samples, distillers = {}, {}, {}
    runs = list(cfg.runs)
    if ADVERSARIAL in runs and cfg.distill.gan_weight == 0:
        runs = [r for r in runs if r != ADVERSARIAL]
        print(f"skipping the '{ADVERSARIAL}' run: with distill.gan_weight=0 the adversarial-only ablation "
              "(fdistill_weight = 0) has no loss", flush=True)
    if not runs:
        raise ValueError(f"no run left to distill (runs: {cfg.runs}, distill.gan_weight=0)")
    header = format_table({}, mixture.num_modes)
    print(header, flush=True)  # each row as its run finishes: an interrupted demo keeps what it computed
    for run in runs:
        rows[run], distillers[run], samples[run] = run_one(run, mixture, mlp, cfg, cfg.seed, progress,
                                                           out_dir / _filename(run))
        _save_npy(out_dir / f"samples_{_filename(run)}.npy", samples[run].numpy())
        print(format_table({run: rows[run]}, mixture.num_modes).splitlines()[-1], flush=True)
    reference = mixture.sample(cfg.num_eval, generator=torch.Generator().manual_seed(cfg.seed))
    _save_npy(out_dir / "reference.npy", reference.numpy())
    params = {"means": mixture.means.tolist(), "stds": mixture.stds.tolist(), "weights": mixture.weights.tolist()}
    write_text(out_dir / "mixture.yaml", yaml.safe_dump(params, sort_keys=False))
    fig3_run = next((r for r in ("forward_kl", "js") if r in distillers), runs[0])
    sigma = 0.5 * mixture.data_std()
    fig3 = score_and_weight_maps(distillers[fig3_run], mixture, sigma) if mixture.dim == 2 else None
    shares = {run: m["share"] for run, m in rows.items()}
    plot_demo(out_dir / "demo.png", mixture, samples, shares, fig3, fig3_run, sigma)
    write_text(out_dir / "results.json", json.dumps({"config": to_dict(cfg), "results": rows}, indent=1))
    table = format_table(rows, mixture.num_modes)
    return (f"teacher: {cfg.teacher.kind} ({teacher_seconds:.0f} s incl. training/caching); "
            f"{cfg.distill.iterations} iterations, batch {cfg.distill.batch_size}, seed {cfg.seed}\n"
            f"{table}\nwrote {out_dir / 'demo.png'}, results.json, mixture.yaml, reference.npy and "
            f"samples_<run>.npy ({cfg.num_eval} x {mixture.dim} each) in {out_dir}")


def _filename(run: str) -> str:
    """A run name (a divergence, or an expression such as 'sqrt(r)') as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run).strip("_") or "run"
