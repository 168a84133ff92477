"""Few-step students: one network G evaluated at k noise levels sigma_1 > ... > sigma_k.

The paper's generator is k = 1: G(z) = D(prior_std z; sigma_1) (Sec. 2.2, ``diffusion.one_step``). A k-step student
(DMD2's multi-step SDXL, NVlabs/FastGen's ``student_sample_steps``) starts from the same pure-noise input, predicts
x0_i = G(x_i; sigma_i) at each level, and moves to the next level by one of two samplers (EDM convention,
x = x0 + sigma eps):

* ``sde``: x_{i+1} = x0_i + sigma_{i+1} eps_i with fresh noise eps_i (DMD2's and FastGen's "sde"; what
  diffusers' LCMScheduler does, and FlowMatchEulerDiscreteScheduler with ``stochastic_sampling``);
* ``ode``: x_{i+1} = x0_i + sigma_{i+1} (x_i - x0_i) / sigma_i, the implied noise reused (DDIM with eta = 0; for
  a flow teacher the Euler step of its ODE; FastGen's "ode").

The sample is x0_k. In training (Alg. 1 with a k-step student) every sample of the batch takes the step i drawn
uniformly from the k, and Eq. (4), the ratio normalization and the GAN term apply to x0_i unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fdistill.core.diffusion import SigmaSampler, append_dims, karras_sigmas

SAMPLERS = ("sde", "ode")
INPUTS = ("backward", "forward")


@dataclass(frozen=True)
class StudentSteps:
    """A k-step student's noise levels sigma_1 > ... > sigma_k (EDM sigma) and its sampler (``SAMPLERS``)."""

    sigmas: tuple[float, ...]
    sampler: str = "sde"

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def fewer(self, j: int) -> StudentSteps:
        """The same student run in j steps: every (k / j)-th of its levels, from the first (999/749/499/249 in
        2 steps is 999/499); j must divide k, since the student knows no other levels."""
        k = self.steps
        if not (isinstance(j, int) and 1 <= j <= k and k % j == 0):
            allowed = ", ".join(str(d) for d in range(1, k + 1) if k % d == 0)
            raise ValueError(f"--student-steps {j}: this student was trained at {k} noise levels and runs in "
                             f"{allowed} of them (every k/j-th level); expected one of those")
        return StudentSteps(self.sigmas[:: k // j], self.sampler)


def default_levels(schedule: SigmaSampler, k: int, top: float | None = None, bottom: float = 0.0) -> list[float]:
    """The k levels a student takes by default on the teacher's (resolved) ``schedule``, from ``top`` (default the
    schedule's largest sigma, where the one-step generator is evaluated) down, sigma_1 = top exactly (``bottom``:
    where a flow teacher's steps would end instead of 0, e.g. an expert's boundary; other schedules take none):

    * a DDPM teacher's timesteps in trailing spacing, t_i = round((t_1 + 1)(1 - i/k)) - 1: 999/749/499/249 for
      k = 4 (DMD2's 4-step SDXL), 999/499 for k = 2;
    * a flow teacher's t = linspace(t_1, 0, k + 1)[:k] through its shift, sigma = shift t / (1 - t) (FastGen's
      default list: 0.999/0.749/0.5/0.25 unshifted; with shift 5 its Wan list 0.999/0.937/0.833/0.624);
    * an EDM teacher's Karras levels (EDM Eq. 5) of k + 1 points from top to sigma_min, the last dropped: the
      levels EDM's own sampler visits with k + 1 points, so the steps sit where EDM found a denoiser's steps
      pay most (80/17.5/2.52/0.17 for k = 4 on [0.002, 80], rho 7).
    """
    top = float(schedule.largest if top is None else top)
    if bottom and schedule.schedule != "flow":
        raise ValueError(f"levels ending above 0 (at sigma {bottom:g}) are defined for a flow schedule, not "
                         f"distill.sigmas.schedule={schedule.schedule}; expected the flow schedule or explicit "
                         "distill.student_sigmas")
    if k == 1:
        return [top]
    if schedule.schedule == "karras":
        rest = karras_sigmas(k + 1, schedule.sigma_min, top, schedule.rho)[1:k]
    elif schedule.schedule == "flow":
        t_top, t_bottom = (s / (schedule.shift + s) for s in (top, bottom))  # unshifted t: sigma = shift t / (1 - t)
        t = torch.linspace(t_top, t_bottom, k + 1, dtype=torch.float64)[1:k]
        rest = schedule.shift * t / (1 - t)
    else:  # DDPM timesteps on the ascending grid
        grid = schedule.grid.double()
        t_top = int((grid - top).abs().argmin())
        steps = [round((t_top + 1) * (1 - i / k)) - 1 for i in range(1, k)]
        rest = grid[[max(s, 0) for s in steps]]
    return [top, *(float(s) for s in rest)]


def check_levels(levels: list[float], low: float, high: float, key: str) -> None:
    """Refuse, in one line naming ``key``, levels that are not strictly decreasing or lie outside [low, high]
    (the teacher's schedule, to float32 rounding)."""
    if any(not b < a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"{key}={list(levels)} must be strictly decreasing noise levels (sigma_1 > ... > sigma_k)")
    tol = 1e-5
    outside = [s for s in levels if not low * (1 - tol) <= s <= high * (1 + tol)]
    if outside:
        raise ValueError(f"{key}={list(levels)}: {outside[0]:.6g} is outside the teacher's schedule, sigma in "
                         f"[{low:.6g}, {high:.6g}]")


def next_input(x0: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, sampler: str,
               noise: Tensor | None = None) -> Tensor:
    """x_{i+1} from x0_i = G(x_i; sigma_i) (the module docstring's samplers; per-sample sigmas of shape (B,))."""
    s_next = append_dims(sigma_next, x.ndim)
    if sampler == "sde":
        return x0 + s_next * noise
    return x0 + s_next * (x - x0) / append_dims(sigma, x.ndim)


def run_steps(net, z: Tensor, student: StudentSteps, cond=None, noise: Callable[[], Tensor] | None = None) -> Tensor:
    """The k-step sample x0_k from z ~ N(0, I): x_1 = prior_std(sigma_1) z (``diffusion.one_step``'s input), then
    the student's sampler; ``noise()`` gives each sde step's fresh N(0, I) (default ``torch.randn_like``). k = 1 is
    ``diffusion.one_step`` exactly."""
    levels = student.sigmas
    x = z * net.prior_std(levels[0])
    for i, s in enumerate(levels):
        sigma = torch.full((z.shape[0],), s, device=z.device)
        x0 = net(x, sigma, cond)
        if i + 1 == len(levels):
            return x0
        eps = (noise() if noise is not None else torch.randn_like(x)) if student.sampler == "sde" else None
        x = next_input(x0.float(), x, sigma, torch.full_like(sigma, levels[i + 1]), student.sampler, eps)


@torch.no_grad()
def simulate(net, x: Tensor, student: StudentSteps, step: Tensor, cond=None, noises: list[Tensor] | None = None,
             until: int | None = None, whole_batch: bool = False) -> Tensor:
    """Backward simulation (DMD2): the input of step ``step[b]`` (0-based) for each sample, made by running ``net``
    (the current generator, without gradient) from the first input ``x`` through steps 0..step[b]-1 with the
    student's sampler; ``noises[j]``: the sde noise after step j. ``until``: the steps run (default step.max(); give
    the global batch's, so that every rank makes the same calls). Each pass runs on the samples still moving
    (``whole_batch``: on all of them, so that every rank's calls have a batch, as FSDP's collectives need)."""
    levels = torch.tensor(student.sigmas, device=x.device)
    x = x.clone()
    until = (int(step.max()) if len(step) else 0) if until is None else until
    for j in range(until):
        moving = step > j if not whole_batch else torch.ones_like(step, dtype=torch.bool)
        if not moving.any():
            continue
        sigma = levels[j].expand(int(moving.sum()))
        x0 = net(x[moving], sigma, None if cond is None else cond[moving]).float()
        nxt = next_input(x0, x[moving], sigma, levels[j + 1].expand_as(sigma), student.sampler,
                         None if noises is None else noises[j][moving])
        x[moving & (step > j)] = nxt[(step > j)[moving]]
    return x


def forward_noised(x_real: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Forward input (FastGen's default for k > 1): real samples noised to the step's level, x_real + sigma eps."""
    return x_real + append_dims(sigma, x_real.ndim) * eps


def nfe(student: StudentSteps | None, heun_steps: int) -> int:
    """Network calls per sample: k for a k-step student, 2 steps - 1 for EDM's Heun sampler (``student`` None)."""
    return student.steps if student is not None else 2 * heun_steps - 1


def finite_positive(levels: list[float]) -> bool:
    return all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in levels)
