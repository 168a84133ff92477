"""``fdistill analyze``: compare f-divergences as in Sec. 4 and App. C: the mode-seeking limit, the tail
rates of f'' (Table 6) and the normalized variance of h (Fig. 5a), printed as a Table-1/Table-6 style
table, with Fig. 4 (|f'| and h) and Fig. 5a."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from fdistill.core import divergences
from fdistill.io import atomic_path


def normalized_variance(div: str | divergences.Divergence, mean_gap: float) -> float:
    """Var_q(h(p/q) / E_q[h(p/q)]) for p = N(0,1), q = N(mean_gap,1) (Sec. 4, Fig. 5a).

    Under q, log r = -g y - g^2/2 with y ~ N(0,1), so both moments are 1-D Gaussian integrals, done by the
    (spectrally accurate) trapezoid rule on y in [-(12+4g), 12+4g] in float64.
    """
    hfn = divergences.get(div).h
    g = abs(float(mean_gap))
    L = 12.0 + 4.0 * g
    y = torch.linspace(-L, L, 8001, dtype=torch.float64)
    w = torch.exp(-0.5 * y * y)
    w = w / w.sum()
    hv = hfn(torch.exp(-g * y - 0.5 * g * g))
    if not torch.isfinite(hv).all():
        raise ValueError(f"h is not finite on the ratios of N(0,1)/N({g:g},1)")
    mean = (w * hv).sum()
    if mean <= 0:
        raise ValueError("E_q[h] is zero; the normalized variance is undefined")
    return float((w * (hv / mean - 1) ** 2).sum())


def _log_slope(h, r: float, delta: float = 0.5) -> float:
    """d log h / d log r at r by a central difference (nan if h is not positive and finite there)."""
    hv = h(torch.tensor([r * math.exp(-delta), r * math.exp(delta)], dtype=torch.float64))
    if not torch.isfinite(hv).all() or (hv < 0).any():
        return math.nan
    if (hv == 0).all():
        return -math.inf if r < 1 else math.inf  # h vanishes: f'' decays faster than any power there
    return float((torch.log(hv[1]) - torch.log(hv[0])) / (2 * delta))


def tail_rates(div: str | divergences.Divergence) -> tuple[float, float]:
    """Exponents (a, b) with f''(r) ~ r^a as r -> inf and f''(r) ~ r^b as r -> 0 (Table 6), f'' = h/r^2.

    Measured at r = 1e6 and 1e-6 (falling back to 1e4 / 1e-4 where h is not finite that far out).
    """
    h = divergences.get(div).h
    big = next((v for v in (_log_slope(h, 1e6), _log_slope(h, 1e4)) if not math.isnan(v)), math.nan)
    small = next((v for v in (_log_slope(h, 1e-6), _log_slope(h, 1e-4)) if not math.isnan(v)), math.nan)
    return big - 2, small - 2


def mode_seeking_limit(div: str | divergences.Divergence) -> float:
    """lim_{r->inf} f(r)/r (Sec. 4, App. C.1.1); math.inf when it diverges.

    The limit equals f'(inf), finite iff f'' is integrable at infinity, i.e. iff the right tail rate is
    below -1 (checked with `tail_rates`). A finite limit is extrapolated from f(r)/r at r = 1e6, 1e7, 1e8
    with Aitken's delta-squared process.
    """
    d = divergences.get(div)
    a, _ = tail_rates(d)
    if not a < -1 - 1e-3:
        return math.inf
    r = torch.tensor([1e6, 1e7, 1e8], dtype=torch.float64)
    g0, g1, g2 = (d.f(r) / r).tolist()
    d1, d2 = g1 - g0, g2 - g1
    if d1 != 0 and 0 < d2 / d1 < 1:
        return g2 - d2 * d2 / (d2 - d1)
    return g2


# Short h(r) formulas for the registered divergences (Table 1; extras: chi^2).
H_FORMULAS = {
    "reverse_kl": "1", "softened_rkl": "1/(r+1)", "js": "r/(r+1)", "squared_hellinger": "sqrt(r)/4",
    "forward_kl": "r", "jeffreys": "r+1", "pearson": "2r^2", "neyman": "2/r",
}


def _fmt_rate(a: float) -> str:
    """Table 6 style: f'' ~ r^a."""
    if math.isnan(a):
        return "?"
    if math.isinf(a):
        return "0 (h=0)" if a < 0 else "inf"
    return f"r^{round(a, 2) + 0.0:g}"


def _fmt_limit(v: float) -> str:
    return "inf" if math.isinf(v) else f"{round(v, 4) + 0.0:.4g}"


def _h_trend(div: divergences.Divergence) -> str:
    """Is h increasing on r in [1e-4, 1e4]? (an increasing h down-weights low teacher density, Sec. 4)."""
    h = div.h(torch.logspace(-4, 4, 401, dtype=torch.float64))
    dh = torch.diff(h)
    tol = 1e-12 * float(h.abs().max())
    if (dh.abs() <= tol).all():
        return "no (const)"
    if (dh >= -tol).all():
        return "yes"
    return "no (decr.)" if (dh <= tol).all() else "no (non-mono)"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def analyze(out_dir: str | Path, custom: Sequence[str] = ()) -> str:
    """Tabulate every registered divergence (plus custom h expressions), write Fig. 4 and Fig. 5a PNGs.

    Columns: h(r) (Table 1), mode-seeking label (Table 1), lim f(r)/r (Sec. 4, App. C.1.1), f'' tail rates
    (Table 6), normalized variance at mean gaps 1 and 2 (Fig. 5a) and whether h is increasing.
    Returns the table followed by the paths of the two figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [(n, divergences.get(n), H_FORMULAS[n]) for n in divergences.names()]
    entries += [(expr, divergences.from_h(expr, name=expr), expr) for expr in custom]

    rows = [["name", "h(r)", "mode-seeking", "lim f(r)/r", "f'' r->inf", "f'' r->0",
             "NVar gap=1", "NVar gap=2", "h increasing"]]
    for name, div, formula in entries:
        big, small = tail_rates(div)
        rows.append([name, formula, div.mode_seeking, _fmt_limit(mode_seeking_limit(div)),
                     _fmt_rate(big), _fmt_rate(small), f"{normalized_variance(div, 1.0):.3g}",
                     f"{normalized_variance(div, 2.0):.3g}", _h_trend(div)])

    colors = plt.get_cmap("tab10")
    n_table1 = 6
    styles = ["-" if k < n_table1 else "--" if k < len(H_FORMULAS) else ":" for k in range(len(entries))]
    # Fig. 4: |f'(r)| (saturation) and h(r) (weighting), both on log-log axes.
    r = torch.logspace(-3, 3, 601, dtype=torch.float64).requires_grad_(True)
    fig, (ax_f, ax_h) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, div, _) in enumerate(entries):
        (fprime,) = torch.autograd.grad(div.f(r).sum(), r)
        x, c = r.detach().numpy(), colors(k % 10)
        ax_f.loglog(x, fprime.abs().numpy(), color=c, ls=styles[k], label=name)
        ax_h.loglog(x, div.h(r.detach()).numpy(), color=c, ls=styles[k], label=name)
    ax_f.set(xlabel="r = p/q", ylabel="|f'(r)|", title="(a) |f'(r)|", ylim=(1e-3, None))
    ax_h.set(xlabel="r = p/q", ylabel="h(r) = f''(r) r²", title="(b) weighting function h(r)")
    for ax in (ax_f, ax_h):
        ax.grid(True, which="major", alpha=0.3)
    ax_h.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig4 = out / "fig4_fprime_h.png"
    with atomic_path(fig4) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    # Fig. 5a: normalized variance Var_q(h / E_q h) for p = N(0,1), q = N(gap,1).
    gaps = torch.linspace(0.0, 3.0, 61).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, (name, div, _) in enumerate(entries):
        nv = [normalized_variance(div, g) for g in gaps]
        if max(nv) <= 1e-12:  # reverse-KL: h = 1 has no variance; nothing to draw on a log axis
            continue
        ax.semilogy(gaps[1:], nv[1:], color=colors(k % 10), ls=styles[k], label=name)
    ax.set(xlabel="mean gap between N(0,1) and N(gap,1)", ylabel="normalized variance of h",
           title="Normalized variance (reverse-KL: 0, not shown)", ylim=(1e-3, 1e5))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig5 = out / "fig5a_normalized_variance.png"
    with atomic_path(fig5) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    return f"{_table(rows)}\n\nwrote {fig4}\nwrote {fig5}"
