"""EDM diffusion core (Karras et al. 2022, "Elucidating the Design Space..."; paper Sec. 2.1).

Every network in fdistill is a *denoiser* ``D(x, sigma, cond) -> x0_hat`` in EDM's convention:
``x = x0 + sigma * eps`` and the score is ``(D(x, sigma) - x) / sigma**2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor of shape (B,) to (B, 1, ..., 1) with ``ndim`` dimensions."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def score_from_denoiser(x0_hat: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (EDM Eq. 3)."""
    return (x0_hat - x) / append_dims(sigma, x.ndim) ** 2


def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM Table 1 preconditioning: returns (c_skip, c_out, c_in, c_noise) for D = c_skip x + c_out F(c_in x),
    c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4."""
    s2 = sigma**2 + sigma_data**2
    return sigma_data**2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4


def one_step(net, z: Tensor, sigma_gen: float, cond=None) -> Tensor:
    """The one-step generator G(z) = D(sigma_gen z; sigma_gen) (Sec. 2.2; Alg. 1 line 4): a copy of the
    teacher's denoiser evaluated once at its largest noise level on a pure-noise input, z ~ N(0, I).
    A network may scale its noise otherwise (``net.prior_std(sigma)``, e.g. sqrt(1 + sigma^2) for the
    unit-variance latents of Stable Diffusion)."""
    sigma = torch.full((z.shape[0],), sigma_gen, device=z.device)
    scale = net.prior_std(sigma_gen)
    return net(z * scale, sigma, cond)


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device: str | torch.device = "cpu") -> Tensor:
    """One z ~ N(0, I) of ``shape`` per seed, from a CPU generator seeded with it (as a diffusers pipeline
    draws latents for ``generator=torch.Generator().manual_seed(seed)``): sample i is the same whatever
    the batch, the device or the number of processes."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The EDM noise grid (EDM Eq. 5), descending from sigma_max to sigma_min, float64."""
    i = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / rho
    return (sigma_max**inv + i / (n - 1) * (sigma_min**inv - sigma_max**inv)) ** rho


def vp_sigmas(num_levels: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
              schedule: str = "scaled_linear") -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), t = 0..num_levels-1, of a DDPM schedule (Ho et al. 2020),
    ascending: abar_t = prod_{s<=t} (1 - beta_s) with betas linear in beta ("linear") or in sqrt(beta)
    ("scaled_linear", Stable Diffusion v1.5 and SDXL: 0.00085 to 0.012, sigma in [0.029, 14.6]). abar is
    computed in float32 as diffusers' schedulers compute it, so the levels are the teacher's own; sigma is
    float64."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_levels, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_levels, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unknown DDPM beta schedule {schedule!r}; expected 'linear' or 'scaled_linear'")
    abar = torch.cumprod(1 - betas, 0).double()
    return ((1 - abar) / abar).sqrt()


def flow_sigmas(num_levels: int = 1000, t_min: float = 0.001, t_max: float = 0.999, shift: float = 1.0) -> Tensor:
    """Noise levels of a rectified-flow teacher (x_t = (1 - t) x0 + t eps), ascending, float64: t on the uniform
    grid t_min..t_max of ``num_levels`` points (NVlabs/FastGen draws t in [0.001, 0.999]) mapped to EDM's
    sigma = shift t / (1 - t) (since x_t / (1 - t) = x0 + t / (1 - t) eps; a static shift s, SD3's 3, scales
    sigma by s, the same as diffusers' t -> s t / (1 + (s - 1) t))."""
    t = torch.linspace(t_min, t_max, num_levels, dtype=torch.float64)
    return shift * t / (1 - t)


MAX_LEVELS = 100_000  # the most noise levels a grid may have (DDPM teachers use 1000)


@dataclass
class SigmaSampler:
    """Noise levels for the distillation losses (Alg. 1 line 3: t ~ U{1..T}).

    An integer index uniform in ``index_range`` (inclusive) on a ``num_levels``-point grid:
    ``schedule: karras`` (default) is EDM's grid over [sigma_min, sigma_max] with ``rho``, from the largest sigma
    down (index 0 = sigma_max). The default [1, 997] of 1000 levels over [0.002, 80] with rho = 7 is FastGen's
    [2, 998] on its ascending grid (79.56 down to 0.00214; median sigma about 2.5); ``scaled_linear`` or
    ``linear`` are the timesteps of a DDPM teacher's own schedule (``beta_start``, ``beta_end``), so
    t is uniform over its timesteps as FastGen and DMD2 draw them for Stable Diffusion; ``flow`` is for
    rectified-flow teachers (SD3, FLUX.1): t uniform on a grid over [``t_min``, ``t_max``], sigma =
    ``shift`` t / (1 - t) (``flow_sigmas``), ascending like the DDPM grids (index_range [0, 999] of 1000 levels
    is FastGen's t in [0.001, 0.999]). ``teacher`` (the default of a distillation config) is the teacher's own
    schedule, ``Denoiser.default_sigmas()`` (``resolve``): Karras for EDM networks, a DDPM teacher's timesteps,
    a flow teacher's t grid with its scheduler's shift; naming any other schedule overrides it (with
    ``teacher`` the other fields are the teacher's, and one given is refused rather than ignored).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_levels: int = 1000
    index_range: tuple[int, int] = (1, 997)
    schedule: str = "karras"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    t_min: float = 0.001
    t_max: float = 0.999
    shift: float = 1.0

    def __post_init__(self) -> None:
        from fdistill import checks

        checks.choice("schedule", self.schedule, ("teacher", "karras", "scaled_linear", "linear", "flow"))
        if self.schedule == "teacher":  # resolved against the teacher (``resolve``) before it is used
            for f in fields(self):  # the teacher sets them all: a value given here would be silently ignored
                value = getattr(self, f.name)
                if f.name != "schedule" and (tuple(value) if isinstance(value, list) else value) != f.default:
                    raise ValueError(f"{f.name}={getattr(self, f.name)!r:.40} is given, but schedule is 'teacher' (the "
                                     "teacher's own levels, which set it); name the schedule (karras, scaled_linear, "
                                     "linear or flow) to set its fields")
            return
        checks.integer("num_levels", self.num_levels, 2, MAX_LEVELS)
        if self.schedule == "karras":
            checks.number("sigma_min", self.sigma_min, 0, low_open=True)
            checks.number("sigma_max", self.sigma_max, 0, low_open=True)
            checks.number("rho", self.rho, 0, low_open=True)
            checks.below("sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        elif self.schedule == "flow":
            checks.number("t_min", self.t_min, 0, 1, low_open=True, high_open=True)
            checks.number("t_max", self.t_max, 0, 1, low_open=True, high_open=True)
            checks.below("t_min", self.t_min, "t_max", self.t_max)
            checks.number("shift", self.shift, 0, low_open=True)
        else:
            checks.number("beta_start", self.beta_start, 0, 1, low_open=True, high_open=True)
            checks.number("beta_end", self.beta_end, 0, 1, low_open=True, high_open=True)
        if not (isinstance(self.index_range, (list, tuple)) and len(self.index_range) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in self.index_range)):
            raise ValueError(f"index_range must be two integers [lo, hi], got {self.index_range!r}")
        lo, hi = self.index_range
        if not 0 <= lo <= hi < self.num_levels:
            raise ValueError(f"index_range {self.index_range} must lie in [0, {self.num_levels - 1}]")
        if self.schedule == "karras":
            self._grid = karras_sigmas(self.num_levels, self.sigma_min, self.sigma_max, self.rho).float()
        elif self.schedule == "flow":
            self._grid = flow_sigmas(self.num_levels, self.t_min, self.t_max, self.shift).float()
        else:
            self._grid = vp_sigmas(self.num_levels, self.beta_start, self.beta_end, self.schedule).float()

    def resolve(self, teacher_defaults: dict) -> SigmaSampler:
        """This schedule, or for ``schedule: teacher`` the teacher's own (``teacher_defaults``: SigmaSampler fields,
        its ``default_sigmas()``; empty for EDM's Karras levels)."""
        return SigmaSampler(**teacher_defaults) if self.schedule == "teacher" else self

    @property
    def grid(self) -> Tensor:
        if self.schedule == "teacher":
            raise ValueError("distill.sigmas.schedule=teacher is resolved against a teacher (SigmaSampler.resolve) "
                             "before its levels are read")
        return self._grid

    @property
    def support(self) -> Tensor:
        """The sigma values that ``sample`` can return, each equally likely."""
        lo, hi = self.index_range
        return self.grid[lo : hi + 1]

    @property
    def largest(self) -> float:
        """The largest noise level of the schedule: where the one-step generator is evaluated by default."""
        return self.sigma_max if self.schedule == "karras" else float(self.grid.max())

    def sample(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        lo, hi = self.index_range
        idx = torch.randint(lo, hi + 1, (n,), generator=generator, device=generator.device if generator else "cpu")
        return self.grid.to(idx.device)[idx].to(device)


def edm_loss(
    net,
    x0: Tensor,
    cond: Tensor | None = None,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
) -> Tensor:
    """EDM training loss (EDM Eq. 2 with Table 1): ln sigma ~ N(P_mean, P_std^2),
    weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2. Returns the mean over elements."""
    sigma = (torch.randn(x0.shape[0], device=x0.device) * P_std + P_mean).exp()
    return denoising_loss(net, x0, sigma, cond, sigma_data, weighting="edm")


def denoising_loss(
    net, x0: Tensor, sigma: Tensor, cond: Tensor | None, sigma_data: float, weighting: str = "edm",
    noise: Tensor | None = None,
) -> Tensor:
    """Denoising score matching at given noise levels (Alg. 1 line 14 for the fake score), on
    x_t = x0 + sigma * noise (``noise`` ~ N(0, I), drawn here when not given).

    ``weighting="edm"``: lambda(sigma) as in EDM and DMD2 (1/sigma^2 + 1/sigma_data^2);
    ``"none"``: plain MSE to x0, as NVlabs/FastGen trains its fake score.
    """
    s = append_dims(sigma, x0.ndim)
    x_t = x0 + s * (torch.randn_like(x0) if noise is None else noise)
    err = (net(x_t, sigma, cond).float() - x0).square()
    if weighting == "edm":
        err = err * (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    elif weighting != "none":
        raise ValueError(f"unknown weighting {weighting!r}; expected 'edm' or 'none'")
    return err.mean()


@torch.no_grad()
def edm_sampler(
    net,
    latents: Tensor,
    cond: Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    heun: bool = True,
) -> Tensor:
    """EDM Algorithm 2: Heun's 2nd-order sampler, deterministic when S_churn = 0.

    ``latents`` ~ N(0, I); 18 steps cost 35 network evaluations (the last step is Euler); ``heun=False``: Euler
    steps only (one evaluation per step: the budget of a few-step baseline).
    Runs the ODE in float64 as EDM does and returns float32 samples.
    """
    t_steps = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    t_steps = t_steps.to(latents.device)
    x = latents.double() * t_steps[0]
    ones = torch.ones(latents.shape[0], dtype=torch.float64, device=latents.device)

    def d(x: Tensor, t: Tensor) -> Tensor:
        return net(x.float(), (t * ones).float(), cond).double()

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * torch.randn_like(x)
        dx = (x - d(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * dx
        if heun and i < num_steps - 1:
            dx2 = (x_next - d(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * dx + 0.5 * dx2)
        x = x_next
    return x.float()
