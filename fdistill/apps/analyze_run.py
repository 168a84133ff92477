"""``fdistill analyze-run``: why f-distill helps (Sec. 5.2, Fig. 6). For N samples of a run's generator, the
normalized weight h_bar that the run's divergence gives each one and the norm of the teacher-minus-fake
score difference there, at one noise level (and over several). With a less mode-seeking divergence h_bar
should fall where the score difference is large: low-density regions where the teacher is unreliable.

Works on any run folder fdistill wrote: the 2-D lab (`fdistill demo`), digits, CIFAR-10, Stable Diffusion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from fdistill.core.diffusion import score_from_denoiser
from fdistill.core.objective import RatioNormalizer, fdistill_weights
from fdistill.io import atomic_path, write_text
from fdistill.training import checkpoint, run
from fdistill.training.distiller import Distiller


def rebuild(run_dir: str | Path) -> Distiller:
    """The Distiller of a run folder (from its config.yaml), with its newest checkpoint loaded."""
    run_dir = Path(run_dir)
    record = run.read(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); expected a folder `fdistill "
                                "distill` or `fdistill demo` wrote")
    command = record["run"].get("command")
    if command == "demo":
        from fdistill.apps import lab2d

        cfg = lab2d.config_from_record(record)
        mixture = lab2d.build_mixture(cfg)
        mlp = lab2d.cached_teacher(mixture, cfg, run_dir.parent, progress=False)
        d = lab2d.toy_distiller(record["run"]["name"], mixture, mlp, cfg, cfg.seed)
    elif command == "distill":
        from fdistill.apps import distill, images

        d = distill.make_distiller(images.load_config(run_dir), record["run"]["teacher"])
    else:
        raise ValueError(f"{run_dir} holds a {command} run; analyze-run reads distillation runs (distill, demo)")
    d.load(checkpoint.resolve(run_dir))
    return d


@torch.no_grad()
def weights_and_score_differences(d: Distiller, n: int, sigmas: list[float], batch_size: int = 256,
                                  seed: int = 0) -> tuple[Tensor, dict[float, dict[str, Tensor]]]:
    """n samples x = G(z) of the EMA generator (with their conditions) and, at each sigma, per sample:
    ``h_bar``, Alg. 1 lines 6-9 on x + sigma eps with the n samples as the batch (one noise level, one
    bin: r_bar = r / mean r, h_bar = h(r_bar) / mean h), and ``score_diff`` = ||s_teacher - s_fake||."""
    torch.manual_seed(seed)
    z = torch.randn(n, *d.sample_shape)
    cond = d.sample_cond(n, slice(None))
    xs = []
    for i in range(0, n, batch_size):
        c = None if cond is None else cond[i:i + batch_size].to(d.device)
        xs.append(d.generate(z[i:i + batch_size].to(d.device), c, ema=True))
    x = torch.cat(xs)
    out = {}
    for sigma in sigmas:
        logits, diffs = [], []
        for i in range(0, n, batch_size):
            c = None if cond is None else cond[i:i + batch_size].to(d.device)
            xb = x[i:i + batch_size]
            s = torch.full((len(xb),), float(sigma), device=d.device)
            x_t = xb + sigma * torch.randn_like(xb)
            with d.autocast():  # the head reads the teacher's features, or the fake score's (disc_features)
                if d.disc_net is d.teacher:
                    (x0_t, feats), x0_f = d.teacher(x_t, s, c, return_features=True), d.fake_score(x_t, s, c)
                else:
                    x0_t, (x0_f, feats) = d.teacher(x_t, s, c), d.fake_score(x_t, s, c, return_features=True)
            logits.append(d.discriminator(feats).float())
            diffs.append((score_from_denoiser(x0_t.float(), x_t, s) - score_from_denoiser(x0_f.float(), x_t, s))
                         .flatten(1).norm(dim=1))
        s = torch.full((n,), float(sigma), device=d.device)
        norm = RatioNormalizer(s, num_bins=1).to(d.device).train()
        w = fdistill_weights(torch.cat(logits), s, d.divergence.h, norm, d.cfg.logit_clip, d.cfg.r_min, d.cfg.r_max)
        out[float(sigma)] = {"h_bar": w.h_bar.cpu(), "score_diff": torch.cat(diffs).cpu()}
    return x.cpu(), out


def _images(d: Distiller, x: Tensor) -> Tensor | None:
    """Generated samples as images in [-1, 1] (decoded from latents for text-to-image), None for vectors."""
    codec = getattr(getattr(d.real_data, "sd", None), "codec", None)
    if codec is not None:
        return torch.cat([codec.decode(x[i:i + 64].to(d.device)).cpu() for i in range(0, len(x), 64)])
    return x if x.ndim == 4 else None


def plot(path: Path, x: Tensor, images: Tensor | None, stats: dict[float, dict[str, Tensor]], sigma: float,
         title: str) -> None:
    """Fig. 6c (h_bar and the score difference against the samples sorted by the latter, smoothed) and the
    samples of largest and smallest h_bar (Fig. 6a/b): images as grids, 2-D points as a scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, diff = stats[sigma]["h_bar"].numpy(), stats[sigma]["score_diff"].numpy()
    order = np.argsort(diff)
    k = max(1, len(order) // 50)
    smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    ax.plot(smooth(diff[order] / diff.mean()), color="tab:red", label="||s_teacher - s_fake|| / mean")
    ax.plot(smooth(h[order]), color="tab:blue", label="h_bar")
    ax.set(xlabel="samples sorted by score difference", title=f"Fig. 6c: {title}, sigma = {sigma:g}")
    ax.legend(fontsize=8)
    side = max(1, min(6, int(np.sqrt(len(h) // 2))))  # grids of side x side samples
    low, high = np.argsort(h)[:side * side], np.argsort(h)[-side * side:][::-1]
    for ax, idx, name in ((axes[1], high, "largest h_bar"), (axes[2], low, "smallest h_bar")):
        if images is not None:
            from fdistill.data.datasets import to_uint8

            tiles = to_uint8(images[torch.as_tensor(idx.copy())])
            n, c, hh, ww = tiles.shape
            grid = tiles.reshape(side, side, c, hh, ww).transpose(0, 3, 1, 4, 2).reshape(side * hh, side * ww, c)
            ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None)
            ax.axis("off")
        else:
            pts = x.numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c=h, cmap="viridis")
            ax.scatter(pts[idx, 0], pts[idx, 1], s=14, facecolors="none", edgecolors="red")
        ax.set_title(f"{name} (Fig. 6{'a' if name.startswith('largest') else 'b'})")
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # a link planted at path is replaced, not followed
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def analyze_run(run_dir: str | Path, out: str | Path | None = None, n: int = 2048, sigma: float | None = None,
                sigmas: list[float] | None = None, seed: int = 0) -> str:
    """Fig. 6 for a run: writes ``fig6.png`` and ``fig6.json`` into ``out`` (default <run>/analysis) and
    returns a report with the Spearman rank correlation of h_bar and the score difference per sigma."""
    run_dir = Path(run_dir)
    d = rebuild(run_dir)
    support = d.sigmas.support
    sigma = float(sigma if sigma is not None else support.median())
    sigmas = sorted({sigma, *(sigmas or [float(support.quantile(q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)])})
    x, stats = weights_and_score_differences(d, n, sigmas, seed=seed)
    constant = all(float(v["h_bar"].std()) == 0 for v in stats.values())  # reverse-KL: h = 1
    rho = {s: float("nan") if constant else float(spearmanr(v["h_bar"].numpy(), v["score_diff"].numpy()).statistic)
           for s, v in stats.items()}
    out = Path(out) if out else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "fig6.png", x, _images(d, x), stats, sigma, f"{d.divergence.name}, {n} samples")
    write_text(out / "fig6.json", json.dumps({"divergence": d.divergence.name, "n": n, "sigma": sigma,
                                              "spearman": {str(s): r for s, r in rho.items()}}, indent=1))
    lines = [f"{d.divergence.name} ({d.divergence.description}), {n} generated samples of {run_dir}",
             "rank correlation (Spearman) of h_bar with ||s_teacher - s_fake||"
             + (" (h is constant for this divergence: no correlation):" if constant else ":"),
             *(f"  sigma {s:8.4g}: " + ("n/a" if np.isnan(r) else f"{r:+.3f}") for s, r in rho.items()),
             f"wrote {out / 'fig6.png'} and fig6.json"]
    return "\n".join(lines)
