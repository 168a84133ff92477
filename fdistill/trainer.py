"""Algorithm 1 (f-distill training), generic over networks.

Every network hides behind the denoiser interface ``net(x, sigma, cond, return_features=False)``
(the teacher also has ``features(x, sigma, cond)``, the discriminator's input alone):
the teacher D_phi (frozen), the fake score D_psi, and the one-step generator
G_theta(z) = D_theta(sigma_gen z; sigma_gen) (a copy of the teacher evaluated once at sigma_max).
The discriminator D_lambda is a head on the frozen teacher's features (App. B).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill import checkpoint, divergences
from fdistill.config import from_dict, to_dict
from fdistill.diffusion import SigmaSampler, append_dims, denoising_loss
from fdistill.objective import (
    RatioNormalizer,
    density_ratio,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    normalize_by_batch_mean,
    r1_penalty,
    ratio_stats,
)


@dataclass
class DistillConfig:
    """Hyper-parameters of Alg. 1. Defaults follow Table 5 (CIFAR-10 column) and NVlabs/FastGen."""

    divergence: str = "js"  # a name from fdistill.divergences, or an expression h(r) (Prop. 1)
    fdistill_weight: float = 1.0  # 0 gives the adversarial-only ablation (Sec. 5.1)
    gan_weight: float = 1e-3  # w_GAN (Alg. 1 line 12; Table 5); 0 trains the head only to estimate r
    tau: int = 5  # fake-score update frequency: student when iteration % tau == 0 (Alg. 1 line 5)
    iterations: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    lr_critic: float | None = None  # fake score and discriminator; None = lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0  # generator gradient-norm clip (FastGen)
    r1_gamma: float = 1.0  # Table 5
    logit_clip: float = 10.0
    r_min: float = 0.1  # Alg. 1 line 6
    r_max: float = 20.0
    ratio_bins: int = 10  # first-stage normalization (Sec. 4)
    ratio_binning: str = "equal_mass"  # or "linear" (FastGen)
    ratio_ema: float = 0.0
    fake_score_weighting: str = "edm"  # or "none" (FastGen's plain MSE)
    sigmas: SigmaSampler = field(default_factory=SigmaSampler)
    generator_sigma: float | None = None  # sigma the generator is evaluated at; None = sigmas.sigma_max
    ema_beta: float = 0.999  # EMA of the generator
    seed: int = 0
    log_every: int = 10  # log one whole cycle (1 student + tau-1 critic steps) every log_every cycles
    checkpoint_every: int = 0  # 0 = only at the end (when a run directory is given)

    def __post_init__(self) -> None:
        if self.tau < 2:
            raise ValueError(f"tau must be >= 2 (one student step per tau iterations, the rest critic), got {self.tau}")
        if self.fdistill_weight < 0 or self.gan_weight < 0:
            raise ValueError("fdistill_weight and gan_weight must be non-negative")
        if self.fdistill_weight == 0 and self.gan_weight == 0:
            raise ValueError("fdistill_weight and gan_weight are both 0: the generator would get no gradient")
        divergences.get(self.divergence)  # fail early on an unknown divergence


class Distiller:
    """Holds the four networks, their optimizers and the EMA; ``step()`` runs one iteration of Alg. 1.

    ``real_data(n) -> (x, cond)`` draws real samples for the GAN; ``sample_cond(n) -> cond`` draws
    the generator's conditioning (None for unconditional models).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        discriminator: nn.Module,
        real_data: Callable[[int], tuple[Tensor, Tensor | None]],
        sample_shape: tuple[int, ...],
        sample_cond: Callable[[int], Tensor | None] = lambda n: None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.real_data, self.sample_cond, self.sample_shape = real_data, sample_cond, tuple(sample_shape)
        self.divergence = divergences.get(cfg.divergence)
        self.sigmas = cfg.sigmas
        self.sigma_gen = cfg.generator_sigma or cfg.sigmas.sigma_max
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).train()
        self.generator_ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.fake_score = fake_score.to(self.device).train()
        self.discriminator = discriminator.to(self.device).train()
        self.ratio_norm = RatioNormalizer(self.sigmas.support, cfg.ratio_bins, cfg.ratio_binning, cfg.ratio_ema)
        self.ratio_norm.to(self.device)
        lr_c = cfg.lr_critic if cfg.lr_critic is not None else cfg.lr

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.opt_g = adamw(self.gen_params, cfg.lr)
        self.opt_fake = adamw(self.fake_score.parameters(), lr_c)
        self.opt_d = adamw(self.discriminator.parameters(), lr_c)
        self.iteration = 0
        self.history: list[dict] = []
        self.info: dict = {}  # saved with checkpoints, e.g. the network's constructor kwargs

    # -- sampling ------------------------------------------------------------------------------
    def generate(self, z: Tensor, cond: Tensor | None = None, ema: bool = False) -> Tensor:
        """x = G_theta(z) = D_theta(sigma_gen z; sigma_gen): one network call (Sec. 2.2)."""
        net = self.generator_ema if ema else self.generator
        sigma = torch.full((z.shape[0],), self.sigma_gen, device=z.device)
        return net(z * self.sigma_gen, sigma, cond)

    @torch.no_grad()
    def sample(self, n: int, ema: bool = True, batch_size: int = 4096) -> Tensor:
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            z = torch.randn(m, *self.sample_shape, device=self.device)
            out.append(self.generate(z, self.sample_cond(m), ema=ema))
        return torch.cat(out)

    def _noisy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x + append_dims(sigma, x.ndim) * torch.randn_like(x)

    # -- Alg. 1 --------------------------------------------------------------------------------
    def student_step(self) -> dict[str, float]:
        """Alg. 1 lines 4-12: generator update by Eq. (4) + w_GAN times the generator GAN loss."""
        cfg, n = self.cfg, self.cfg.batch_size
        z = torch.randn(n, *self.sample_shape, device=self.device)
        cond = self.sample_cond(n)
        x = self.generate(z, cond)
        sigma = self.sigmas.sample(n, self.device)
        x_t = self._noisy(x, sigma)
        # One teacher pass gives both D_teacher(x_t) and the head's features; with the GAN term on,
        # it is differentiated through its input (not its weights) into the generator.
        with torch.set_grad_enabled(cfg.gan_weight > 0):
            x0_teacher, features = self.teacher(x_t, sigma, cond, return_features=True)
            logits = self.discriminator(features)
        logs: dict[str, float] = {}
        loss = x.new_zeros(())
        if cfg.gan_weight > 0:
            loss_gan = gan_generator_loss(logits)
            loss = loss + cfg.gan_weight * loss_gan
            logs["loss_gan_g"] = float(loss_gan.detach())
        if cfg.fdistill_weight > 0:
            with torch.no_grad():
                x0_teacher = x0_teacher.detach()
                x0_fake = self.fake_score(x_t.detach(), sigma, cond)
                r = density_ratio(logits, cfg.logit_clip, cfg.r_min, cfg.r_max)
                h = normalize_by_batch_mean(self.divergence.h(self.ratio_norm(r, sigma)))
            loss_fd, _ = fdistill_loss(x, x0_teacher, x0_fake, h)
            loss = loss + cfg.fdistill_weight * loss_fd
            logs["loss_fdistill"] = float(loss_fd.detach())
            logs.update(ratio_stats(r, h, (x0_teacher - x0_fake) / append_dims(sigma, x.ndim) ** 2))
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=self.gen_params)  # no gradients into the head or the teacher
        if cfg.grad_clip:
            logs["grad_norm_g"] = float(torch.nn.utils.clip_grad_norm_(self.gen_params, cfg.grad_clip))
        self.opt_g.step()
        self._update_ema()
        return logs

    def critic_step(self) -> dict[str, float]:
        """Alg. 1 lines 13-15: fake score by denoising score matching on generated samples, and the
        discriminator head by the GAN loss (+ gamma/2 R1) on real vs generated noisy samples."""
        cfg, n = self.cfg, self.cfg.batch_size
        with torch.no_grad():
            cond = self.sample_cond(n)
            x = self.generate(torch.randn(n, *self.sample_shape, device=self.device), cond)
        sigma = self.sigmas.sample(n, self.device)
        loss_fake = x.new_zeros(())
        if cfg.fdistill_weight > 0:  # the adversarial-only ablation needs no fake score
            sigma_data = float(getattr(self.fake_score, "sigma_data", 0.5))
            loss_fake = denoising_loss(self.fake_score, x, sigma, cond, sigma_data, cfg.fake_score_weighting)

        with torch.no_grad():
            feats_fake = self.teacher.features(self._noisy(x, sigma), sigma, cond)
        x_real, cond_real = self.real_data(n)
        x_real, cond_real = x_real.to(self.device), None if cond_real is None else cond_real.to(self.device)
        sigma_real = self.sigmas.sample(n, self.device)  # real data gets its own sigma and noise
        x_real_t = self._noisy(x_real, sigma_real).requires_grad_(cfg.r1_gamma > 0)
        with torch.set_grad_enabled(cfg.r1_gamma > 0):
            feats_real = self.teacher.features(x_real_t, sigma_real, cond_real)
        logits_fake, logits_real = self.discriminator(feats_fake), self.discriminator(feats_real)
        loss_d = gan_discriminator_loss(logits_real, logits_fake)
        logs = {"loss_fake_score": float(loss_fake.detach()), "loss_gan_d": float(loss_d.detach()),
                "logit_real": float(logits_real.detach().mean()), "logit_fake": float(logits_fake.detach().mean())}
        if cfg.r1_gamma > 0:
            r1 = r1_penalty(logits_real, x_real_t)
            loss_d = loss_d + 0.5 * cfg.r1_gamma * r1
            logs["r1"] = float(r1.detach())
        self.opt_fake.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        (loss_fake + loss_d).backward()
        self.opt_fake.step()
        self.opt_d.step()
        return logs

    def step(self) -> dict[str, float]:
        student = self.iteration % self.cfg.tau == 0
        logs = self.student_step() if student else self.critic_step()
        logs = {"iteration": self.iteration, "kind": "student" if student else "critic", **logs}
        self.iteration += 1
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p, 1.0 - self.cfg.ema_beta)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    def train(self, run_dir: str | Path | None = None, progress: bool = True, desc: str = "distill",
              log_fn: Callable[[dict], None] | None = None) -> list[dict]:
        """Run until ``cfg.iterations``, logging every ``log_every`` cycles (to ``history``, to
        <run_dir>/log.jsonl and to ``log_fn``, e.g. a TensorBoard writer) and checkpointing into run_dir."""
        cfg = self.cfg
        run_dir = Path(run_dir) if run_dir else None
        log_file = None
        if run_dir:
            run_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed below
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=desc, disable=not progress, leave=False)
        try:
            while self.iteration < cfg.iterations:
                logs = self.step()
                bar.update(1)
                if (logs["iteration"] // cfg.tau) % cfg.log_every == 0:
                    bad = [k for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)]
                    if bad:
                        raise FloatingPointError(f"training diverged at iteration {logs['iteration']}: {bad} "
                                                 "not finite; try a lower lr or gan_weight")
                    self.history.append(logs)
                    if log_file:
                        log_file.write(json.dumps(logs) + "\n")
                    if log_fn:
                        log_fn(logs)
                    shown = {k: logs[k] for k in ("loss_fdistill", "loss_gan_d", "h_max") if k in logs}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
                if run_dir and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save(run_dir / "checkpoint")
        finally:
            bar.close()
            if log_file:
                log_file.close()
        if run_dir:
            self.save(run_dir / "checkpoint")
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "generator_ema": self.generator_ema, "fake_score": self.fake_score,
                "discriminator": self.discriminator, "ratio_norm": self.ratio_norm}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "fake_score": self.opt_fake, "discriminator": self.opt_d}

    def save(self, path: str | Path) -> Path:
        """Weights (safetensors), optimizer and RNG state, iteration and config: enough for exact resume."""
        meta = {"iteration": self.iteration, "config": to_dict(self.cfg), "info": self.info}
        if hasattr(self.real_data, "state_dict"):  # a data sampler with its own random stream
            meta["data_state"] = self.real_data.state_dict()
        return checkpoint.save(path, self._modules(), self._optimizers(), meta)

    def load(self, path: str | Path) -> None:
        """Resume from ``save``: the run continues with the same weights, moments and random stream."""
        meta = checkpoint.load(path, self._modules(), self._optimizers())
        saved = from_dict(DistillConfig, meta["config"])
        if saved.divergence != self.cfg.divergence:
            raise ValueError(f"checkpoint {path} was trained with divergence {saved.divergence!r}, "
                             f"not {self.cfg.divergence!r}")
        self.iteration = int(meta["iteration"])
        self.info = meta.get("info", {})
        if "data_state" in meta:
            self.real_data.load_state_dict(meta["data_state"])
