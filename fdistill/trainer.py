"""Algorithm 1 (f-distill training), generic over networks.

Every network hides behind the denoiser interface ``net(x, sigma, cond, return_features=False)``
(the teacher also has ``features(x, sigma, cond)``, the discriminator's input alone):
the teacher D_phi (frozen), the fake score D_psi, and the one-step generator
G_theta(z) = D_theta(sigma_gen z; sigma_gen) (a copy of the teacher evaluated once at sigma_max).
The discriminator D_lambda is a head on the frozen teacher's features (App. B).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill import checkpoint, distributed, divergences
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
    # Scale: batch_size is the global batch (Table 5). Each of the world_size ranks takes
    # batch_size / world_size of it, in forward passes of micro_batch (None = all at once);
    # gradients accumulate over the passes and are averaged over ranks.
    micro_batch: int | None = None
    lr_stages: list[tuple[int, float]] = field(default_factory=list)  # [[iteration, lr], ...]: lr from then on
    precision: str = "fp32"  # "bf16": network passes under bf16 autocast; losses and optimizer in fp32
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (fp32 precision)
    channels_last: bool = False  # NHWC memory format for image networks
    compile: bool = False  # torch.compile the networks (in place, so checkpoint names do not change)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer or None, got {self.micro_batch}")
        if [s for s, _ in self.lr_stages] != sorted({s for s, _ in self.lr_stages}):
            raise ValueError(f"lr_stages must be [[iteration, lr], ...] with increasing iterations, "
                             f"got {self.lr_stages}")
        if self.tau < 2:
            raise ValueError(f"tau must be >= 2 (one student step per tau iterations, the rest critic), got {self.tau}")
        if self.fdistill_weight < 0 or self.gan_weight < 0:
            raise ValueError("fdistill_weight and gan_weight must be non-negative")
        if self.fdistill_weight == 0 and self.gan_weight == 0:
            raise ValueError("fdistill_weight and gan_weight are both 0: the generator would get no gradient")
        divergences.get(self.divergence)  # fail early on an unknown divergence


class Distiller:
    """Holds the four networks, their optimizers and the EMA; ``step()`` runs one iteration of Alg. 1.

    ``real_data(n, part) -> (x, cond)`` draws n real samples for the GAN and returns those at
    positions ``part`` (a slice); ``sample_cond(n) -> cond`` draws the generator's conditioning (None
    for unconditional models). Both must give every rank the same draws (own seeded streams).

    Data parallel (``fdistill.distributed``): every rank draws the random inputs of the whole global
    batch from one shared stream and keeps its own slice, so a run's samples do not depend on the
    number of ranks; gradients are averaged over ranks before each optimizer step.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: nn.Module,
        generator: nn.Module,
        fake_score: nn.Module,
        discriminator: nn.Module,
        real_data: Callable[[int, slice], tuple[Tensor, Tensor | None]],
        sample_shape: tuple[int, ...],
        sample_cond: Callable[[int], Tensor | None] = lambda n: None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.real_data, self.sample_cond, self.sample_shape = real_data, sample_cond, tuple(sample_shape)
        self.divergence = divergences.get(cfg.divergence)
        self.sigmas = cfg.sigmas
        self.sigma_gen = cfg.generator_sigma or cfg.sigmas.sigma_max
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks")
        local = cfg.batch_size // self.world
        micro = cfg.micro_batch or local
        if local % micro:
            raise ValueError(f"each rank's batch ({cfg.batch_size} / {self.world} ranks = {local}) is not a "
                             f"multiple of micro_batch {micro}")
        self.local = slice(self.rank * local, (self.rank + 1) * local)
        self.micro_slices = [slice(i, i + micro) for i in range(0, local, micro)]
        self.rng = torch.Generator(self.device).manual_seed(cfg.seed)  # shared by all ranks

        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).train()
        self.fake_score = fake_score.to(self.device).train()
        self.discriminator = discriminator.to(self.device).train()
        for m in (self.generator, self.fake_score, self.discriminator):
            distributed.broadcast_state(m)
        if self.world > 1:  # dropout masks differ between ranks
            torch.manual_seed(cfg.seed + 1 + self.rank)
        self.generator_ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.ratio_norm = RatioNormalizer(self.sigmas.support, cfg.ratio_bins, cfg.ratio_binning, cfg.ratio_ema)
        self.ratio_norm.to(self.device)
        self._set_performance_flags()
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

    def _set_performance_flags(self) -> None:
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        nets = [self.teacher, self.generator, self.fake_score, self.generator_ema]
        if cfg.channels_last and len(self.sample_shape) == 3:
            for m in nets:
                m.to(memory_format=torch.channels_last)
        if cfg.compile:  # not the small head: R1's double backward cannot pass through compiled code
            for m in nets[:3]:
                m.compile()

    def autocast(self):
        """bf16 autocast of the network passes (``precision: bf16``); nothing in fp32."""
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()

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

    # -- this rank's share of the global batch -------------------------------------------------
    def _randn(self) -> Tensor:
        shape = (self.cfg.batch_size, *self.sample_shape)
        return torch.randn(shape, generator=self.rng, device=self.device)[self.local]

    def _sigma(self) -> Tensor:
        return self.sigmas.sample(self.cfg.batch_size, self.device, self.rng)[self.local]

    def _mine(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t[self.local].to(self.device)

    def _set_lr(self) -> None:
        """Piecewise-constant learning rate (``lr_stages``, e.g. Table 5's ImageNet-64 2e-6 -> 5e-7 at
        200K); the critic's rate is scaled by the same factor."""
        cfg = self.cfg
        lr = cfg.lr
        for start, stage_lr in cfg.lr_stages:
            if self.iteration >= start:
                lr = stage_lr
        lr_c = (cfg.lr_critic if cfg.lr_critic is not None else cfg.lr) * lr / cfg.lr
        for opt, value in ((self.opt_g, lr), (self.opt_fake, lr_c), (self.opt_d, lr_c)):
            for group in opt.param_groups:
                group["lr"] = value

    # -- Alg. 1 --------------------------------------------------------------------------------
    def student_step(self) -> dict[str, float]:
        """Alg. 1 lines 4-12: generator update by Eq. (4) + w_GAN times the generator GAN loss."""
        cfg = self.cfg
        z, sigma, eps = self._randn(), self._sigma(), self._randn()
        cond = self._mine(self.sample_cond(cfg.batch_size))
        self.opt_g.zero_grad(set_to_none=True)
        parts = []
        for sl in self.micro_slices:
            c = None if cond is None else cond[sl]
            s = sigma[sl]
            with self.autocast():
                x = self.generate(z[sl], c).float()
                x_t = x + append_dims(s, x.ndim) * eps[sl]
                # One teacher pass gives both D_teacher(x_t) and the head's features; with the GAN term
                # on, it is differentiated through its input (not its weights) into the generator.
                with torch.set_grad_enabled(cfg.gan_weight > 0):
                    x0_teacher, features = self.teacher(x_t, s, c, return_features=True)
                    logits = self.discriminator(features).float()
            logs: dict[str, float] = {}
            loss = x.new_zeros(())
            if cfg.gan_weight > 0:
                loss_gan = gan_generator_loss(logits)
                loss = loss + cfg.gan_weight * loss_gan
                logs["loss_gan_g"] = float(loss_gan.detach())
            if cfg.fdistill_weight > 0:
                with torch.no_grad():
                    x0_teacher = x0_teacher.detach().float()
                    with self.autocast():
                        x0_fake = self.fake_score(x_t.detach(), s, c).float()
                    r = density_ratio(logits, cfg.logit_clip, cfg.r_min, cfg.r_max)
                    h = normalize_by_batch_mean(self.divergence.h(self.ratio_norm(r, s)))
                loss_fd, _ = fdistill_loss(x, x0_teacher, x0_fake, h)
                loss = loss + cfg.fdistill_weight * loss_fd
                logs["loss_fdistill"] = float(loss_fd.detach())
                logs.update(ratio_stats(r, h, (x0_teacher - x0_fake) / append_dims(s, x.ndim) ** 2))
            # The loss is a mean over the micro-batch; weight it to a mean over this rank's batch.
            (loss / len(self.micro_slices)).backward(inputs=self.gen_params)  # not into the head or teacher
            parts.append(logs)
        distributed.average_gradients(self.gen_params)
        logs = merge_logs(parts)
        if cfg.grad_clip:
            logs["grad_norm_g"] = float(torch.nn.utils.clip_grad_norm_(self.gen_params, cfg.grad_clip))
        self.opt_g.step()
        self._update_ema()
        return logs

    def critic_step(self) -> dict[str, float]:
        """Alg. 1 lines 13-15: fake score by denoising score matching on generated samples, and the
        discriminator head by the GAN loss (+ gamma/2 R1) on real vs generated noisy samples."""
        cfg, n = self.cfg, self.cfg.batch_size
        z, sigma, eps, eps_dsm = self._randn(), self._sigma(), self._randn(), self._randn()
        cond = self._mine(self.sample_cond(n))
        x_real, cond_real = self.real_data(n, self.local)  # only this rank's part is gathered
        x_real, cond_real = x_real.to(self.device), None if cond_real is None else cond_real.to(self.device)
        sigma_real, eps_real = self._sigma(), self._randn()  # real data gets its own sigma and noise
        sigma_data = float(getattr(self.fake_score, "sigma_data", 0.5))
        self.opt_fake.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        parts = []
        for sl in self.micro_slices:
            c = None if cond is None else cond[sl]
            cr = None if cond_real is None else cond_real[sl]
            s, sr = sigma[sl], sigma_real[sl]
            with self.autocast():
                with torch.no_grad():
                    x = self.generate(z[sl], c).float()
                    feats_fake = self.teacher.features(x + append_dims(s, x.ndim) * eps[sl], s, c)
                loss_fake = x.new_zeros(())
                if cfg.fdistill_weight > 0:  # the adversarial-only ablation needs no fake score
                    loss_fake = denoising_loss(self.fake_score, x, s, c, sigma_data, cfg.fake_score_weighting,
                                               noise=eps_dsm[sl])
                x_real_t = (x_real[sl] + append_dims(sr, x.ndim) * eps_real[sl]).requires_grad_(cfg.r1_gamma > 0)
                with torch.set_grad_enabled(cfg.r1_gamma > 0):
                    feats_real = self.teacher.features(x_real_t, sr, cr)
                logits_fake = self.discriminator(feats_fake).float()
                logits_real = self.discriminator(feats_real).float()
            loss_d = gan_discriminator_loss(logits_real, logits_fake)
            logs = {"loss_fake_score": float(loss_fake.detach()), "loss_gan_d": float(loss_d.detach()),
                    "logit_real": float(logits_real.detach().mean()),
                    "logit_fake": float(logits_fake.detach().mean())}
            if cfg.r1_gamma > 0:
                r1 = r1_penalty(logits_real, x_real_t)
                loss_d = loss_d + 0.5 * cfg.r1_gamma * r1
                logs["r1"] = float(r1.detach())
            ((loss_fake + loss_d) / len(self.micro_slices)).backward()
            parts.append(logs)
        critic_params = [*self.fake_score.parameters(), *self.discriminator.parameters()]
        distributed.average_gradients(critic_params)
        self.opt_fake.step()
        self.opt_d.step()
        return merge_logs(parts)

    def step(self) -> dict[str, float]:
        student = self.iteration % self.cfg.tau == 0
        self._set_lr()
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
        <run_dir>/log.jsonl and to ``log_fn``, e.g. a TensorBoard writer) and checkpointing into run_dir.
        With several ranks, only rank 0 shows progress, writes logs and checkpoints; logged values are
        rank 0's."""
        cfg = self.cfg
        main = self.rank == 0
        run_dir = Path(run_dir) if run_dir else None
        log_file = None
        if run_dir and main:
            run_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed below
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=desc, disable=not (progress and main),
                   leave=False)
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
                    if log_fn and main:
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

    def save(self, path: str | Path) -> Path | None:
        """Weights (safetensors), optimizer and RNG state, iteration and config: enough for exact resume.
        Written by rank 0 only (the ranks hold the same weights; this is checked first)."""
        if not all(distributed.same_on_all_ranks(m) for m in self._modules().values()):
            raise RuntimeError("data-parallel ranks hold different weights; refusing to checkpoint")
        path = Path(path)
        if self.rank == 0:
            meta = {"iteration": self.iteration, "config": to_dict(self.cfg), "info": self.info,
                    "sample_rng": self.rng.get_state()}
            if hasattr(self.real_data, "state_dict"):  # a data sampler with its own random stream
                meta["data_state"] = self.real_data.state_dict()
            checkpoint.save(path, self._modules(), self._optimizers(), meta)
        distributed.barrier()
        return path if self.rank == 0 else None

    def load(self, path: str | Path) -> None:
        """Resume from ``save``, on any number of ranks: the run continues with the same weights,
        moments and random streams (rank 0's dropout stream; other ranks reseed theirs)."""
        meta = checkpoint.load(path, self._modules(), self._optimizers(), restore_rng=self.rank == 0)
        saved = from_dict(DistillConfig, meta["config"])
        if saved.divergence != self.cfg.divergence:
            raise ValueError(f"checkpoint {path} was trained with divergence {saved.divergence!r}, "
                             f"not {self.cfg.divergence!r}")
        self.iteration = int(meta["iteration"])
        self.info = meta.get("info", {})
        if "sample_rng" in meta:
            self.rng.set_state(meta["sample_rng"].to(torch.uint8))
        if "data_state" in meta:
            self.real_data.load_state_dict(meta["data_state"])
        if self.rank > 0:
            torch.manual_seed(self.cfg.seed + 1 + self.rank + 7919 * self.iteration)


def merge_logs(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine the logs of a step's micro-batches: extremes for ``*_min``/``*_max``, else the mean."""
    out = {}
    for k in parts[0]:
        values = [p[k] for p in parts]
        out[k] = max(values) if k.endswith("_max") else min(values) if k.endswith("_min") else sum(values) / len(values)
    return out
