"""Algorithm 1 for any teacher family, and its result: ``build_distiller`` (the Distiller for a config and a
``Teacher``), ``load_generator`` (a run's one- or few-step generator) and ``sample_maker`` (images from a generator or a
multi-step teacher). Each family's particulars sit in its ``Teacher`` (``fdistill.teachers``)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.config import from_dict
from fdistill.core import few_step
from fdistill.core.diffusion import edm_sampler
from fdistill.core.few_step import StudentSteps
from fdistill.networks.heads import Discriminator
from fdistill.networks.taps import resolve_taps
from fdistill.teachers.base import Teacher
from fdistill.teachers.open import open_teacher, teacher_from_info
from fdistill.training import checkpoint
from fdistill.training.distiller import DistillConfig, Distiller, student_steps


def build_distiller(cfg, teacher: Teacher, dataset=None, device: str | torch.device = "cpu") -> Distiller:
    """Alg. 1 for ``teacher`` (``cfg``: an ImageConfig): generator and fake score are copies of its denoiser
    (the generator evaluated once at sigma_max, ``core.diffusion.one_step``), prepared as the family says; the
    teacher is guided at ``cfg.guidance`` (App. D.5); the discriminator is conv heads on the frozen teacher's
    features at ``cfg.disc_resolutions`` (App. B); with ``cfg.text.shared_base`` the three are views of one network
(``networks.shared_base``). ``dataset`` replaces ``cfg.data`` (an opened ImageDataset)."""
    device = torch.device(device)
    data = teacher.open_data(cfg, device, dataset)  # first: a run from latent shards releases the text encoders
    distill_cfg, first_input = teacher.distill_settings(cfg.distill)  # Wan2.2-A14B's experts fix their levels
    teacher.to(device)
    net = teacher.denoiser
    try:
        taps = resolve_taps(cfg.disc_resolutions, net.encoder_resolutions, f"teacher {teacher.source}")
    except ValueError as e:
        if teacher.preset is None:
            raise
        raise ValueError(f"{e}; this {teacher.kind} teacher's preset sets them: --config {teacher.preset}") from None
    torch.manual_seed(cfg.distill.seed)
    if cfg.text.shared_base:  # generator and fake score: adapters on the teacher's own weights
        if cfg.distill.disc_features != "teacher":
            raise ValueError(f"distill.disc_features={cfg.distill.disc_features} needs a fake score of its own; "
                             "with text.shared_base the head reads the teacher's features (disc_features=teacher)")
        net.feature_resolutions = taps
        net, students = teacher.shared_students(cfg)
    else:
        students = [copy.deepcopy(net).train().requires_grad_(True) for _ in range(2)]  # generator, fake score
        teacher.prepare_students(students, cfg)
        net.feature_resolutions = taps  # the generator's own taps are never read
        students[1].feature_resolutions = taps  # the fake score's are with distill.disc_features != teacher
    disc = Discriminator.conv(net.feature_channels(), cfg.disc_hidden, cfg.disc_head)
    d = Distiller(distill_cfg, teacher.guided(net, cfg.guidance), *students, disc, real_data=data,
                  sample_shape=teacher.sample_shape, sample_cond=data.sample_cond, device=device,
                  first_input=first_input)
    d.info = {**teacher.info, "data": cfg.data, **teacher.student_info(cfg)}
    return d


def make_distiller(cfg, teacher_path: str | Path, dataset=None, device: str | torch.device = "cpu") -> Distiller:
    """``build_distiller`` for the teacher at ``teacher_path`` (a file, run folder, .pkl or diffusers folder); on a
    CUDA device a run predicted not to fit it is refused first (``fdistill.memory.check_distill``)."""
    from fdistill import memory
    from fdistill.training import distributed

    memory.check_distill(cfg, teacher_path, torch.device(device), distributed.world_size())
    return build_distiller(cfg, open_teacher(teacher_path, cfg.text.resolution, cfg.teacher_options), dataset, device)


def read_run(run: str | Path, ema: bool = True) -> tuple[Teacher, dict, StudentSteps, dict[str, Tensor]]:
    """(the teacher rebuilt from its record, the checkpoint's info, the student's levels and sampler, the (EMA)
    generator's weights) of a distill run folder or checkpoint, without building the student network."""
    meta = checkpoint.read_meta(run)
    info = meta["info"]
    if "family" not in info and "precond" not in info:
        raise ValueError(f"checkpoint {run} holds no one-step generator (its meta.info names no network): "
                         "is it a train-teacher run's? Give a distill run folder or one of its checkpoints")
    try:
        cfg = from_dict(DistillConfig, meta["config"])
    except ValueError as e:
        raise ValueError(f"checkpoint {run}: its state.json's config is not a distill config ({e})") from None
    teacher = teacher_from_info(info, str(run))
    weights = checkpoint.load_weights(run, "generator_ema" if ema else "generator", "generator")
    cfg = dataclasses.replace(cfg, sigmas=cfg.sigmas.resolve(teacher.denoiser.default_sigmas()))
    return teacher, info, student_steps(cfg), weights


def load_generator(run: str | Path, device: str | torch.device = "cpu", ema: bool = True, alone: bool = True
                   ) -> tuple[nn.Module, StudentSteps, Teacher]:
    """A distillation run's generator (from its newest checkpoint, or a checkpoint folder): (network in eval mode,
    its levels and sampler, the teacher it was distilled from: its sample shape, classes, text encoder, codec).
    ``alone``: refuse the student of Wan2.2-A14B's low-noise expert, which only continues the high expert's sampling
    (``load_expert_pair``)."""
    teacher, info, student, weights = read_run(run, ema)
    if alone and info.get("network", {}).get("expert") == "low":
        raise ValueError(f"{run} is the student of Wan2.2-A14B's low-noise expert: it continues the high-noise "
                         "expert's sampling, never from pure noise; expected the pair: --checkpoint HIGH_RUN "
                         f"--checkpoint-low {run}")
    try:
        net = teacher.load_student(weights, info)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {run}: its generator weights do not fit the network its meta.info "
                         f"describes ({' '.join(str(e).split())[:300]})") from None
    device = torch.device(device)
    return net.eval().requires_grad_(False).to(device), student, teacher.to(device)


def load_expert_pair(high: str | Path, low: str | Path, device: str | torch.device = "cpu", ema: bool = True
                     ) -> tuple[nn.Module, StudentSteps, Teacher]:
    """The students of a Wan2.2-A14B folder's two experts (``high``: the run with ``teacher_options.expert=high``,
    ``low``: with ``low``) as ``load_generator`` gives one generator: (the two networks routed at boundary_ratio as
    WanPipeline routes transformer / transformer_2, the concatenated levels k_high + k_low, the high run's teacher),
    checked to be a pair by ``WanTeacher.expert_pair``. ``run_steps`` then samples the two stages: the low student's
    first input is the high stage's output moved to its level by the sampler's step (ode: the implied noise)."""
    nets, students, teachers, sigmas = [], [], [], []
    for run in (high, low):
        meta = checkpoint.read_meta(run)
        if meta["info"].get("family") != "wan":
            raise ValueError(f"--checkpoint-low pairs the students of Wan2.2-A14B's two experts; {run} is not a Wan "
                             "run (expected two distill runs with teacher_options.expert=high and low)")
        net, student, teacher = load_generator(run, device, ema, alone=False)
        nets.append(net)
        students.append(student)
        teachers.append(teacher)
        sigmas.append(from_dict(DistillConfig, meta["config"]).sigmas)
    pair, student = teachers[0].expert_pair(teachers[1], *nets, *students, *sigmas, (str(high), str(low)))
    return pair.eval().requires_grad_(False).to(device), student, teachers[0]


def sample_maker(net: nn.Module, teacher: Teacher, student: StudentSteps | float | None = None, steps: int = 18,
                 guidance: float = 1.0, device: str | torch.device = "cpu"):
    """``make(items, seeds) -> images in [-1, 1]`` (on the CPU): sample i from z = ``seeded_noise`` of seed i and
    condition ``items[i]`` (a class, ignored by an unconditional net, or a prompt). With ``student`` (its levels,
    or one sigma_gen): the student's steps (``few_step.run_steps``; one call G(z) = D(prior_std z; sigma_gen) for
    k = 1), each sde step's noise drawn next from seed i's stream (as a diffusers pipeline's scheduler draws it
    from ``generator``); without: EDM's Heun sampler over the teacher's noise range (2 steps - 1 evaluations,
    each guided at ``guidance``). Latents are decoded by the teacher's codec."""
    net = net.to(device)
    if isinstance(student, (int, float)):
        student = StudentSteps((float(student),))
    guided = teacher.guided(net, guidance)
    sigma_min, sigma_max = teacher.sigma_range

    @torch.no_grad()
    def make(items: list, seeds: list[int]) -> Tensor:
        streams = [torch.Generator().manual_seed(s) for s in seeds]

        def noise() -> Tensor:  # the next N(0, I) of each sample's stream (seeded_noise's first draw: z)
            return torch.stack([torch.randn(teacher.sample_shape, generator=g) for g in streams]).to(device)

        z, cond = noise(), teacher.condition(items, device)
        x = few_step.run_steps(net, z, student, cond, noise) if student is not None else \
            edm_sampler(guided, z, cond, num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max)
        return teacher.decode(x).cpu()
    make.nfe = few_step.nfe(student, steps)  # network calls per sample
    return make
