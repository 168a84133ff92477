"""Algorithm 1's two steps (f-distill training), generic over networks.

Every network hides behind the denoiser interface ``net(x, sigma, cond, return_features=False)``
(the teacher also has ``features(x, sigma, cond)``, the discriminator's input alone):
the teacher D_phi (frozen), the fake score D_psi, and the one-step generator
G_theta(z) = D_theta(sigma_gen z; sigma_gen) (a copy of the teacher evaluated once at sigma_max).
The discriminator D_lambda is a head on the frozen teacher's features (App. B), or on the fake score's
(``disc_features``, a study option).
``fdistill.training.loop.training_loop`` runs the steps, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.config import from_dict, resumable, to_dict
from fdistill.core import divergences, few_step
from fdistill.core.diffusion import SigmaSampler, append_dims, denoising_loss, score_from_denoiser
from fdistill.core.objective import (
    RatioNormalizer,
    approx_r1_penalty,
    fdistill_loss,
    fdistill_weights,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
    ratio_stats,
)
from fdistill.networks.attention import double_backward
from fdistill.training import checkpoint, distributed
from fdistill.training.ema import ema_copy, ema_update


@dataclass
class DistillConfig:
    """Hyper-parameters of Alg. 1. Defaults follow Table 5 (CIFAR-10 column) and NVlabs/FastGen.

    One flat YAML section (``distill:``) in three blocks: the algorithm, scale and precision, logging and
    checkpoints. Fields made by ``fdistill.config.resumable`` are the ones ``--resume`` may change."""

    # -- the algorithm: Alg. 1 and the quantities of Table 5 ---------------------------------------------
    divergence: str = "js"  # a name from fdistill.core.divergences, or an expression h(r) (Prop. 1)
    fdistill_weight: float = 1.0  # 0 gives the adversarial-only ablation (Sec. 5.1)
    gan_weight: float = 1e-3  # w_GAN (Alg. 1 line 12; Table 5); 0 trains the head only to estimate r
    tau: int = 5  # fake-score update frequency: student when iteration % tau == 0 (Alg. 1 line 5)
    iterations: int = resumable(1000)
    batch_size: int = 64  # the global batch (Table 5), whatever the number of ranks
    lr: float = resumable(1e-4)
    lr_critic: float | None = resumable(None)  # fake score and discriminator; None = lr
    lr_stages: list[tuple[int, float]] = resumable(default_factory=list)  # [[iteration, lr], ...]: lr from then on
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0  # generator gradient-norm clip (FastGen)
    r1_gamma: float = 1.0  # Table 5
    # R1 of the discriminator's (mean) logit D on noisy real samples x: "exact", E||grad_x D||^2 (a double
    # backward); "approx", E(D(x + 0.1 n) - D(x))^2 / 0.1^2, the same quantity to first order without the
    # double backward (FastGen's form, which adds weight * E(...)^2: its weight w is r1_gamma = 0.02 w here).
    r1_form: str = "exact"
    h_warmup: int = 0  # first iterations with h = 1 (reverse-KL) while the head learns r (Sec. 5.1's warm-up)
    logit_clip: float = 10.0
    r_min: float = 0.1  # Alg. 1 line 6
    r_max: float = 20.0
    ratio_bins: int = 10  # first-stage normalization (Sec. 4)
    ratio_binning: str = "equal_mass"  # or "linear" (FastGen)
    ratio_ema: float = 0.0
    fake_score_weighting: str = "edm"  # or "none" (FastGen's plain MSE)
    sigmas: SigmaSampler = field(default_factory=lambda: SigmaSampler(schedule="teacher"))  # the teacher's own
    # The student (``core.few_step``): k = 1 is the paper's one-step generator G(z) = D(prior_std z; sigma_1).
    generator_sigma: float | None = None  # sigma_1, its first level; None = the schedule's largest
    student_steps: int | None = None  # k; None = len(student_sigmas), else 1
    # sigma_1 > ... > sigma_k (EDM sigma); None = the schedule's default levels from generator_sigma down
    # (few_step.default_levels: Stable Diffusion's timesteps 999/749/499/249 for k = 4, a flow teacher's
    # linspace(t_max, 0, k + 1) through its shift, an EDM teacher's Karras levels)
    student_sigmas: list[float] | None = None
    # Between steps: "ode", the implied noise reused (DDIM; FastGen's "ode"), or "sde", fresh noise (DMD2's and
    # FastGen's default). ode is the default here: it won on both CPU benchmarks (docs/few-step.md: 4-step JS
    # 7.03 against 16.05 digits-FID on text-to-image digits, 11.32 against 17.24 on rectified-flow digits)
    student_sampler: str = "ode"
    # A k-step student's training input at step i > 1 (i uniform in 1..k; step 1 is pure noise): "backward", the
    # current generator run without gradient from noise through steps 1..i-1 (DMD2), or "forward", real samples
    # noised to sigma_i, with their conditions (FastGen's default; needs real data)
    student_input: str = "backward"
    ema_beta: float | None = 0.999  # EMA of the generator; None: no EMA (FastGen and DMD2 for text-to-image)
    # When the EMA moves: "iteration", after every iteration, critic iterations included (NVlabs/FastGen's
    # EMACallback runs at the end of each), so its horizon is 1/(1 - ema_beta) iterations; "student": only
    # after generator updates, a tau times longer horizon.
    ema_cadence: str = "iteration"
    # The GAN losses over several heads: "per_head", softplus of each head's logit, averaged (FastGen);
    # "mean_logit", softplus of the heads' mean logit. r = exp(mean logit) either way.
    gan_loss_heads: str = "per_head"
    # Whose features the discriminator head reads (App. B: the frozen teacher's). "fake_score": the fake score's
    # features, the head's loss reaching the head only (the fake score's update stays Alg. 1 line 14's); "dmd2":
    # the fake score's features with its classification loss also training the fake score (DMD2's
    # guidance-model branch). A study option (NVlabs/FastGen issue #23 discusses the two).
    disc_features: str = "teacher"
    seed: int = 0  # the run's random streams (latents, sigmas, noise, the data's draws), shared by all ranks

    # -- scale and precision: how the steps are computed, not what they compute ----------------------------
    # Each of the world_size ranks takes batch_size / world_size of the global batch, in forward passes
    # of micro_batch (None = all at once); gradients accumulate over the passes and are averaged over ranks.
    # The two-stage normalization of h (Alg. 1 lines 7 and 9) runs over each pass's samples on all ranks
    # (world_size x micro_batch), so over the global batch when micro_batch is None; the ratio EMA is
    # updated once per step.
    micro_batch: int | None = resumable(None)
    precision: str = resumable("fp32")  # "bf16": network passes under bf16 autocast; losses and optimizer in fp32
    tf32: bool = resumable(True)  # TF32 matmuls and convolutions on CUDA (fp32 precision)
    # channels_last and compile are off by default on every device: on the CPU they were measured on, neither
    # made an iteration cheaper (docs/performance.md, "What each change bought"); benchmarks/gpu_check.sh
    # times both on a GPU.
    channels_last: bool = resumable(False)  # NHWC memory format for image networks
    compile: bool = resumable(False)  # torch.compile the networks (in place, so checkpoint names do not change)
    fsdp: bool = False  # under torchrun: shard teacher, generator (and EMA) and fake score over the ranks (FSDP2)
    # On a CUDA device, refuse before loading the teacher a run that fdistill.memory predicts not to fit the GPU
    # (naming a micro_batch / gradient checkpointing that would); false runs it anyway
    memory_check: bool = resumable(True)

    # -- logging and checkpoints -------------------------------------------------------------------------------
    log_every: int = resumable(10)  # iterations between log lines (the last iteration is always logged)
    checkpoint_every: int = resumable(0)  # iterations between checkpoints; 0 = only at the end (with a run folder)
    keep_checkpoints: int = resumable(2)  # the newest checkpoints kept in <run>/checkpoints/

    def __post_init__(self) -> None:
        from fdistill import checks

        checks.choice("precision", self.precision, ("fp32", "bf16"))
        for name in ("iterations", "batch_size", "ratio_bins", "log_every", "keep_checkpoints"):
            checks.integer(name, getattr(self, name), 1)
        for name in ("h_warmup", "checkpoint_every"):
            checks.integer(name, getattr(self, name), 0)
        checks.integer("seed", self.seed)
        checks.integer("micro_batch", self.micro_batch, 1, none=True)
        if not isinstance(self.memory_check, bool):
            raise ValueError(f"memory_check must be true or false, got {checks.show(self.memory_check)}")
        if not (isinstance(self.lr_stages, (list, tuple)) and all(
                isinstance(s, (list, tuple)) and len(s) == 2 for s in self.lr_stages)):
            raise ValueError(f"lr_stages must be [[iteration, lr], ...], got {self.lr_stages!r}")
        for start, stage_lr in self.lr_stages:
            checks.integer("an lr_stages iteration", start, 0)
            checks.number("an lr_stages lr", stage_lr, 0, low_open=True)
        if [s for s, _ in self.lr_stages] != sorted({s for s, _ in self.lr_stages}):
            raise ValueError(f"lr_stages must be [[iteration, lr], ...] with increasing iterations, "
                             f"got {self.lr_stages}")
        if not (isinstance(self.tau, int) and self.tau >= 2):
            raise ValueError(f"tau must be an integer >= 2 (one student step per tau iterations, the rest critic), "
                             f"got {checks.show(self.tau)}")
        checks.number("fdistill_weight", self.fdistill_weight, 0)
        checks.number("gan_weight", self.gan_weight, 0)
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("lr_critic", self.lr_critic, 0, low_open=True, none=True)
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for b in self.betas:
            checks.number("betas", b, 0, 1, high_open=True, what="two numbers in [0, 1)")
        checks.number("weight_decay", self.weight_decay, 0)
        checks.number("grad_clip", self.grad_clip, 0, low_open=True, none=True)
        checks.number("r1_gamma", self.r1_gamma, 0)
        checks.choice("r1_form", self.r1_form, ("exact", "approx"))
        checks.number("logit_clip", self.logit_clip, 0, low_open=True)
        checks.number("r_min", self.r_min, 0, low_open=True)
        checks.number("r_max", self.r_max, 0, low_open=True)
        checks.below("r_min", self.r_min, "r_max", self.r_max, "the clip range of the density ratio r, Alg. 1 line 6")
        checks.choice("ratio_binning", self.ratio_binning, ("equal_mass", "linear"))
        checks.number("ratio_ema", self.ratio_ema, 0, 1, high_open=True)
        checks.choice("fake_score_weighting", self.fake_score_weighting, ("edm", "none"))
        checks.number("generator_sigma", self.generator_sigma, 0, low_open=True, none=True)
        self._check_student()
        checks.number("ema_beta", self.ema_beta, 0, 1, high_open=True, none=True)
        checks.choice("ema_cadence", self.ema_cadence, ("iteration", "student"))
        checks.choice("gan_loss_heads", self.gan_loss_heads, ("per_head", "mean_logit"))
        checks.choice("disc_features", self.disc_features, DISC_FEATURES)
        if self.fdistill_weight == 0 and self.gan_weight == 0:
            raise ValueError("fdistill_weight and gan_weight are both 0: the generator would get no gradient")
        divergences.check(self.divergence)  # fail early on an unknown divergence

    def _check_student(self) -> None:
        from fdistill import checks

        checks.integer("student_steps", self.student_steps, 1, none=True)
        checks.choice("student_sampler", self.student_sampler, few_step.SAMPLERS)
        checks.choice("student_input", self.student_input, few_step.INPUTS)
        levels = self.student_sigmas
        if levels is None:
            return
        if not (isinstance(levels, (list, tuple)) and levels and few_step.finite_positive(list(levels))):
            raise ValueError(f"student_sigmas must be a list of positive noise levels sigma_1 > ... > sigma_k, got "
                             f"{levels!r:.80}")
        few_step.check_levels(list(levels), 0, math.inf, "student_sigmas")
        if self.student_steps is not None and self.student_steps != len(levels):
            raise ValueError(f"student_steps={self.student_steps} but student_sigmas has {len(levels)} levels; "
                             "give one of them (the levels set k)")
        if self.generator_sigma is not None:
            raise ValueError("generator_sigma and student_sigmas are both given; student_sigmas[0] is the first level")

    def lr_at(self, iteration: int) -> tuple[float, float]:
        """(generator lr, critic lr) at ``iteration``: piecewise constant by ``lr_stages`` (e.g. Table 5's
        ImageNet-64 2e-6 -> 5e-7 at 200K); the critic's rate (``lr_critic``, else ``lr``) keeps its ratio."""
        lr = self.lr
        for start, stage_lr in self.lr_stages:
            if iteration >= start:
                lr = stage_lr
        critic = self.lr_critic if self.lr_critic is not None else self.lr
        return lr, critic * lr / self.lr


DISC_FEATURES = ("teacher", "fake_score", "dmd2")
# The student's input at its first level: "noise", pure noise (Alg. 1's G(z)); "forward", a real sample noised to
# sigma_1 (a student continuing another's sampling; ``Distiller(first_input=...)``, set by ``apps.distill``)
FIRST_INPUTS = ("noise", "forward")
R1_NOISE = 0.1  # the approximate R1's perturbation of the real input (FastGen's gan_r1_reg_alpha)


class Distiller:
    """Holds the four networks, their optimizers and the EMA; ``step()`` runs one iteration of Alg. 1.

    ``real_data(n, part) -> (x, cond)`` draws n real samples for the GAN and returns those at
    positions ``part`` (a slice); ``sample_cond(n, part) -> cond`` draws the generator's conditioning
    likewise (one-hot labels, a TextCondition, or None for unconditional models). Both must give every
    rank the same draws (own seeded streams), so each rank computes only its own part.

    Data parallel (``fdistill.training.distributed``): every rank draws the random inputs of the whole
    global batch from one shared stream and keeps its own slice, so a run's samples do not depend on
    the number of ranks; gradients are averaged over ranks before each optimizer step.
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
        sample_cond: Callable[[int, slice], Tensor | None] = lambda n, part: None,
        device: str | torch.device = "cpu",
        first_input: str = "noise",
    ) -> None:
        defaults = getattr(teacher, "default_sigmas", dict)()  # the teacher's own noise levels (Denoiser contract)
        cfg = dataclasses.replace(cfg, sigmas=cfg.sigmas.resolve(defaults))
        self.cfg, self.device = cfg, torch.device(device)
        self.real_data, self.sample_cond, self.sample_shape = real_data, sample_cond, tuple(sample_shape)
        self.divergence = divergences.get(cfg.divergence)  # resolved once: a custom h builds its f here
        self.sigmas = cfg.sigmas
        self.student = student_steps(cfg)
        self.sigma_gen = self.student.sigmas[0]
        if first_input not in FIRST_INPUTS:
            raise ValueError(f"first_input must be one of {FIRST_INPUTS}, got {first_input!r:.40}")
        self.first_input = first_input
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks")
        local = cfg.batch_size // self.world
        micro = cfg.micro_batch or local
        if local % micro:
            raise ValueError(f"each rank's batch ({cfg.batch_size} / {self.world} ranks = {local}) is not a "
                             f"multiple of micro_batch {micro}")
        self.local = slice(self.rank * local, (self.rank + 1) * local)
        self.passes = [slice(i, i + micro) for i in range(0, local, micro)]  # gradient accumulation
        self.rng = torch.Generator(self.device).manual_seed(cfg.seed)  # shared by all ranks

        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.generator = generator.to(self.device).train()
        self.fake_score = fake_score.to(self.device).train()
        self.discriminator = discriminator.to(self.device).train()
        for m in (self.generator, self.fake_score, self.discriminator):
            distributed.broadcast_state(m)
        if self.world > 1:  # dropout masks differ between ranks
            torch.manual_seed(cfg.seed + 1 + self.rank)
        self.generator_ema = self.generator if cfg.ema_beta is None else ema_copy(self.generator)
        self.sharded = cfg.fsdp and self.world > 1
        if self.sharded and cfg.disc_features != "teacher":
            raise ValueError(f"disc_features={cfg.disc_features} is a study option for one process or data "
                             "parallel, not fsdp; use disc_features=teacher (App. B)")
        # the network whose features the head reads: the frozen teacher, or the fake score (``disc_features``)
        self.disc_net = self.teacher if cfg.disc_features == "teacher" else self.fake_score
        if self.sharded:  # weights, gradients and optimizer states split over the ranks
            for m in dict.fromkeys((self.teacher, self.generator, self.generator_ema, self.fake_score)):
                distributed.shard(m)
        grid = self.sigmas.grid
        self.ratio_norm = RatioNormalizer(self.sigmas.support, cfg.ratio_bins, cfg.ratio_binning, cfg.ratio_ema,
                                          (float(grid.min()), float(grid.max())))
        self.ratio_norm.to(self.device)
        self._set_performance_flags()

        # The fused kernel: one pass over each tensor instead of one per operation, same values to float
        # rounding and cheaper per step (docs/performance.md). Sharded (DTensor) parameters keep PyTorch's
        # default.
        fused = not self.sharded and self.device.type in ("cpu", "cuda")

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     fused=fused or None)

        lr, lr_critic = cfg.lr_at(0)
        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.opt_g = adamw(self.gen_params, lr)
        self.opt_fake = adamw(self.fake_score.parameters(), lr_critic)
        self.opt_d = adamw(self.discriminator.parameters(), lr_critic)
        self.iteration = 0
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
        """x = G_theta(z): the student's k steps (``core.few_step.run_steps``; for k = 1 one network call,
        ``core.diffusion.one_step``)."""
        return few_step.run_steps(self.generator_ema if ema else self.generator, z, self.student, cond)

    @torch.no_grad()
    def sample(self, n: int, ema: bool = True, batch_size: int = 4096) -> Tensor:
        """n samples of the (EMA) generator, latents and conditions from the global random stream."""
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            z = torch.randn(m, *self.sample_shape, device=self.device)
            cond = self.sample_cond(m, slice(None))
            out.append(self.generate(z, None if cond is None else cond.to(self.device), ema=ema))
        return torch.cat(out)

    # -- this rank's share of the global batch (Alg. 1 line 3) ---------------------------------
    def _randn(self) -> Tensor:
        shape = (self.cfg.batch_size, *self.sample_shape)
        return torch.randn(shape, generator=self.rng, device=self.device)[self.local]

    def _sigma(self) -> Tensor:
        return self.sigmas.sample(self.cfg.batch_size, self.device, self.rng)[self.local]

    def _mine(self, cond):
        return None if cond is None else cond.to(self.device)

    def _student_draws(self) -> dict | None:
        """A k-step student's random inputs of this iteration (None for k = 1, which draws nothing more): the
        step i of each sample (uniform in 0..k-1), and the sde noise of the backward simulation, or the real
        samples (with their conditions) and noise of the forward input."""
        cfg, k = self.cfg, self.student.steps
        if k == 1 and self.first_input == "noise":
            return None
        step = torch.randint(0, k, (cfg.batch_size,), generator=self.rng, device=self.device)
        draws = {"step": step[self.local], "until": int(step.max())}
        if cfg.student_input == "forward" or self.first_input == "forward":
            x_real, cond_real = self.real_data(cfg.batch_size, self.local)
            draws.update(x_real=x_real.to(self.device), cond=self._mine(cond_real), eps=self._randn())
        if cfg.student_input != "forward" and self.student.sampler == "sde":
            draws["noises"] = [self._randn() for _ in range(draws["until"])]
        return draws

    def _student_output(self, z: Tensor, cond, draws: dict | None, sl: slice) -> Tensor:
        """x0_i = G_theta(x_i; sigma_i) at each sample's step i (Alg. 1 line 4 for a k-step student): x_1 is
        pure noise, x_i for i > 1 the backward simulation or the forward-noised real sample (``few_step``). With
        ``first_input="forward"`` (a student that continues another's sampling: Wan2.2-A14B's low-noise expert,
        ``teachers.families.wan``) x_1 is the real sample noised to sigma_1 too."""
        if draws is None:
            return self.generate(z, cond)
        levels = torch.tensor(self.student.sigmas, device=self.device)
        step = draws["step"][sl]
        x = z * self.generator.prior_std(self.sigma_gen)
        if self.first_input == "forward":
            x = few_step.forward_noised(draws["x_real"][sl], levels[0].expand(len(step)), draws["eps"][sl])
        if self.cfg.student_input == "forward":
            noised = few_step.forward_noised(draws["x_real"][sl], levels[step], draws["eps"][sl])
            x = torch.where(append_dims(step, x.ndim) == 0, x, noised)
        else:
            noises = [n[sl] for n in draws["noises"]] if "noises" in draws else None
            x = few_step.simulate(self.generator, x, self.student, step, cond, noises, draws["until"],
                                  whole_batch=self.sharded)
        return self.generator(x, levels[step], cond)

    def _gan_logits(self, head_logits: Tensor) -> Tensor:
        """What the GAN losses average softplus over: each head's logit (``per_head``) or their mean."""
        return head_logits if self.cfg.gan_loss_heads == "per_head" else head_logits.mean(1)

    # -- Alg. 1 --------------------------------------------------------------------------------
    def student_step(self) -> dict[str, Tensor]:
        """Alg. 1 lines 4-12: the generator's update by Eq. (4) + w_GAN times the generator's GAN loss.
        Each pass of the loop is one gradient-accumulation slice of this rank's batch."""
        cfg = self.cfg
        z, sigma, eps = self._randn(), self._sigma(), self._randn()
        draws = self._student_draws()
        cond = draws["cond"] if draws and "cond" in draws else self._mine(self.sample_cond(cfg.batch_size, self.local))
        self.opt_g.zero_grad(set_to_none=True)
        parts = []
        for sl in self.passes:
            c = None if cond is None else cond[sl]
            s = sigma[sl]
            with self.autocast():
                x = self._student_output(z[sl], c, draws, sl).float()  # line 4: y = G(z)
                x_t = x + append_dims(s, x.ndim) * eps[sl]
                # One pass of the head's network gives both its D(x_t) and the head's features; with the GAN
                # term on, it is differentiated through its input (the weights get no gradient) into the generator.
                with torch.set_grad_enabled(cfg.gan_weight > 0):
                    x0_disc, features = self.disc_net(x_t, s, c, return_features=True)
                    head_logits = self.discriminator.head_logits(features).float()
                x0_teacher = x0_fake = None
                if self.disc_net is self.teacher:
                    x0_teacher = x0_disc
                else:
                    x0_fake = x0_disc.detach().float()
            logits = head_logits.mean(1)  # the discriminator's logit: r = exp(logit)
            logs: dict[str, Tensor] = {}
            loss = x.new_zeros(())
            if cfg.gan_weight > 0:  # line 11
                loss_gan = gan_generator_loss(self._gan_logits(head_logits))
                loss = loss + cfg.gan_weight * loss_gan
                logs["loss_gan_g"] = loss_gan.detach()
            if cfg.fdistill_weight > 0:
                with torch.no_grad(), self.autocast():
                    if x0_teacher is None:
                        x0_teacher = self.teacher(x_t.detach(), s, c)
                    if x0_fake is None:
                        x0_fake = self.fake_score(x_t.detach(), s, c).float()
                x0_teacher = x0_teacher.detach().float()
                h = self.divergence.h if self.iteration >= cfg.h_warmup else torch.ones_like
                w = fdistill_weights(logits, s, h, self.ratio_norm, cfg.logit_clip, cfg.r_min, cfg.r_max)  # 6-9
                loss_fd, _ = fdistill_loss(x, x0_teacher, x0_fake, w.h_bar)  # line 10, Eq. (4)
                loss = loss + cfg.fdistill_weight * loss_fd
                logs["loss_fdistill"] = loss_fd.detach()
                score_diff = score_from_denoiser(x0_teacher, x_t, s) - score_from_denoiser(x0_fake, x_t, s)
                logs.update(ratio_stats(w, score_diff))
            # The loss is a mean over the pass; weight it to a mean over this rank's batch. Only into the
            # generator (not the head; the teacher is frozen); sharded parameters are reached by FSDP's hooks.
            (loss / len(self.passes)).backward(inputs=None if self.sharded else self.gen_params)
            parts.append(logs)
        if not self.sharded:  # FSDP averaged the sharded gradients in backward
            distributed.average_gradients(self.gen_params)
        logs = merge_logs(parts)
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.gen_params, cfg.grad_clip)
            logs["grad_norm_g"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor if sharded
        self.opt_g.step()  # line 12
        self.ratio_norm.commit()  # the ratio EMA moves once per optimizer step
        return logs

    def critic_step(self) -> dict[str, Tensor]:
        """Alg. 1 lines 13-15: the fake score by denoising score matching on generated samples, and the
        discriminator head by the GAN loss (+ gamma/2 R1) on real vs generated noisy samples."""
        cfg, n = self.cfg, self.cfg.batch_size
        z, sigma, eps, eps_dsm = self._randn(), self._sigma(), self._randn(), self._randn()
        draws = self._student_draws()  # the generated samples come from the student step's kind of input
        cond = draws["cond"] if draws and "cond" in draws else self._mine(self.sample_cond(n, self.local))
        x_real, cond_real = self.real_data(n, self.local)  # only this rank's part is gathered
        x_real, cond_real = x_real.to(self.device), None if cond_real is None else cond_real.to(self.device)
        sigma_real, eps_real = self._sigma(), self._randn()  # real data gets its own sigma and noise
        approx_r1 = cfg.r1_gamma > 0 and cfg.r1_form == "approx"
        eps_r1 = self._randn() if approx_r1 else None
        sigma_data = float(self.fake_score.sigma_data)
        trains_features = cfg.disc_features == "dmd2"  # the head's loss reaches the fake score too
        head_only = cfg.disc_features == "fake_score"
        self.opt_fake.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        parts = []
        for sl in self.passes:
            c = None if cond is None else cond[sl]
            cr = None if cond_real is None else cond_real[sl]
            s, sr = sigma[sl], sigma_real[sl]
            with self.autocast():
                with torch.no_grad():
                    x = self._student_output(z[sl], c, draws, sl).float()  # line 4
                with torch.set_grad_enabled(trains_features):
                    feats_fake = self.disc_net.features(x + append_dims(s, x.ndim) * eps[sl], s, c)
                loss_fake = x.new_zeros(())
                if cfg.fdistill_weight > 0:  # line 14; the adversarial-only ablation needs no fake score
                    loss_fake = denoising_loss(self.fake_score, x, s, c, sigma_data, cfg.fake_score_weighting,
                                               noise=eps_dsm[sl])
                exact_r1 = cfg.r1_gamma > 0 and not approx_r1
                x_real_t = (x_real[sl] + append_dims(sr, x.ndim) * eps_real[sl]).requires_grad_(exact_r1)
                with torch.set_grad_enabled(exact_r1 or trains_features), \
                        double_backward() if exact_r1 else contextlib.nullcontext():
                    feats_real = self.disc_net.features(x_real_t, sr, cr)  # R1 differentiates it twice
                logits_fake = self.discriminator.head_logits(feats_fake).float()
                logits_real = self.discriminator.head_logits(feats_real).float()
                if approx_r1:
                    with torch.no_grad():
                        feats_near = self.disc_net.features(x_real_t + R1_NOISE * eps_r1[sl], sr, cr)
                    logits_near = self.discriminator(feats_near).float()
            loss_d = gan_discriminator_loss(self._gan_logits(logits_real), self._gan_logits(logits_fake))  # line 15
            logs = {"loss_fake_score": loss_fake.detach(), "loss_gan_d": loss_d.detach(),
                    "logit_real": logits_real.detach().mean(), "logit_fake": logits_fake.detach().mean(),
                    "disc_accuracy": disc_accuracy(logits_real.detach().mean(1), logits_fake.detach().mean(1))}
            if cfg.r1_gamma > 0:
                logit_real = logits_real.mean(1)
                r1 = approx_r1_penalty(logit_real, logits_near, R1_NOISE) if approx_r1 else \
                    r1_penalty(logit_real, x_real_t)
                loss_d = loss_d + 0.5 * cfg.r1_gamma * r1
                logs["r1"] = r1.detach()
            if head_only and exact_r1:  # R1's graph runs through the fake score: keep its update line 14's alone
                if loss_fake.requires_grad:
                    (loss_fake / len(self.passes)).backward()
                (loss_d / len(self.passes)).backward(inputs=list(self.discriminator.parameters()))
            else:
                ((loss_fake + loss_d) / len(self.passes)).backward()
            parts.append(logs)
        distributed.average_gradients([*([] if self.sharded else self.fake_score.parameters()),
                                        *self.discriminator.parameters()])
        self.opt_fake.step()
        self.opt_d.step()
        return merge_logs(parts)

    def step(self) -> dict:
        """One iteration: the student step when ``iteration % tau == 0`` (Alg. 1 line 5), else the critic
        step. Returns {"iteration", "kind", quantity: 0-d tensor, ...}."""
        student = self.iteration % self.cfg.tau == 0
        lr, lr_critic = self.cfg.lr_at(self.iteration)
        for opt, value in ((self.opt_g, lr), (self.opt_fake, lr_critic), (self.opt_d, lr_critic)):
            for group in opt.param_groups:
                group["lr"] = value
        logs = self.student_step() if student else self.critic_step()
        if self.cfg.ema_beta is not None and (student or self.cfg.ema_cadence == "iteration"):
            ema_update(self.generator_ema, self.generator, self.cfg.ema_beta)
        logs = {"iteration": self.iteration, "kind": "student" if student else "critic", **logs}
        self.iteration += 1
        return logs

    # -- checkpoints ---------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        ema = {"generator_ema": self.generator_ema} if self.generator_ema is not self.generator else {}
        return {"generator": self.generator, **ema, "fake_score": self.fake_score,
                "discriminator": self.discriminator, "ratio_norm": self.ratio_norm}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "fake_score": self.opt_fake, "discriminator": self.opt_d}

    def _optimized(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {name: (self.modules()[name], opt) for name, opt in self.optimizers().items()}

    def save(self, path: str | Path) -> Path | None:
        """Weights (safetensors), optimizer and RNG state, iteration and config: enough for exact resume.
        Written by rank 0 only (the ranks hold the same weights, checked first; sharded networks are
        gathered to rank 0)."""
        if not all(distributed.same_on_all_ranks(m) for m in self.modules().values()):
            raise RuntimeError("data-parallel ranks hold different weights; refusing to checkpoint")
        path = Path(path)
        weights = {name: distributed.module_state(m) for name, m in self.modules().items()}
        optimizers = {name: distributed.optimizer_state(m, opt) for name, (m, opt) in self._optimized().items()}
        if self.rank == 0:
            meta = {"iteration": self.iteration, "config": to_dict(self.cfg), "info": self.info,
                    "sample_rng": self.rng.get_state()}
            if hasattr(self.real_data, "state_dict"):  # a data sampler with its own random stream
                meta["data_state"] = self.real_data.state_dict()
            checkpoint.save(path, weights, optimizers, meta)
        distributed.barrier()
        return path if self.rank == 0 else None

    def init_from(self, path: str | Path) -> None:
        """Warm start (Sec. 5.1): the generator (and its EMA), fake score and discriminator of another run's
        checkpoint, e.g. a reverse-KL (DMD2) run before switching divergence; optimizers start afresh."""
        contents = checkpoint.read(path)
        for name in ("generator", "generator_ema", "fake_score", "discriminator"):
            if name in self.modules():
                source = name if name in contents.weights else "generator"  # a run without EMA
                checkpoint.load_module(contents, source, self.modules()[name], distributed.load_module_state)
        distributed.barrier()

    def load(self, path: str | Path) -> None:
        """Resume from ``save``, on any number of ranks: the run continues with the same weights,
        moments and random streams (rank 0's dropout stream; other ranks reseed theirs)."""
        contents = checkpoint.read(path)
        for name, m in self.modules().items():
            checkpoint.load_module(contents, name, m, distributed.load_module_state)
        for name, (m, opt) in self._optimized().items():
            distributed.load_optimizer_state(m, opt, contents.optimizers[name])
        if self.rank == 0:
            checkpoint.set_rng_state(contents.rng)
        meta = contents.meta
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


def disc_accuracy(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """The discriminator's balanced accuracy: real samples with logit > 0 and generated ones with logit < 0
    (0.5: it cannot tell them apart, so r = exp(logit) carries no information)."""
    return ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2


def student_steps(cfg: DistillConfig) -> few_step.StudentSteps:
    """The student's levels and sampler for ``cfg`` (its ``sigmas`` resolved against the teacher): its
    ``student_sigmas``, else ``few_step.default_levels`` of its schedule from ``generator_sigma``; a k-step
    student's levels are checked against the schedule (the one-step generator_sigma as before, not)."""
    k = cfg.student_steps or len(cfg.student_sigmas or [0])
    levels = list(cfg.student_sigmas or few_step.default_levels(cfg.sigmas, k, cfg.generator_sigma))
    if k > 1:
        grid = cfg.sigmas.grid
        key = "student_sigmas" if cfg.student_sigmas else "generator_sigma" if cfg.generator_sigma else "student_steps"
        few_step.check_levels(levels, float(grid.min()), float(grid.max()), f"distill.{key}")
    return few_step.StudentSteps(tuple(float(s) for s in levels), cfg.student_sampler)


def merge_logs(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Combine the logs of a step's passes: extremes for ``*_min``/``*_max``, else the mean."""
    out = {}
    for k in parts[0]:
        values = torch.stack([p[k].float() for p in parts])
        out[k] = values.max() if k.endswith("_max") else values.min() if k.endswith("_min") else values.mean()
    return out
