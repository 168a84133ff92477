r"""Side-by-side training-step cost: fdistill against NVlabs/FastGen's own f-distill (the paper authors' library).

    python benchmarks/compare_fastgen.py --fastgen /work/fastgen --python /work/fastgen-venv/bin/python
    python benchmarks/compare_fastgen.py --fastgen /work/fastgen --python /work/fastgen-venv/bin/python \
        --batch 8 --steps 3 --warmup 1 --threads 2

Both programs train class-conditional CIFAR-10 with the DDPM++ teacher architecture (SongUNet, 55.7M
parameters), random weights (no checkpoint is read or downloaded), random "real" images, on the CPU in
fp32, with the same batch and the same number of threads (torch.set_num_threads and OMP/MKL_NUM_THREADS):

  - ours: ``fdistill.training.distiller.Distiller.student_step()`` and ``critic_step()``, built as
    ``fdistill.apps.distill.build_distiller`` builds them from the ``cifar10`` preset (teacher network,
    heads at ``disc_resolutions`` 32/16/8 of width ``disc_hidden``, the preset's DistillConfig) with
    precision fp32, batch --batch and r1_gamma 0 (the critic step without R1);
  - FastGen: its CIFAR-10 f-distill experiment config
    (``fastgen/configs/experiments/EDM/config_f_distill_cifar10.py``: ``FdistillModel``, KL, three EMAs)
    with device cpu, ``pretrained_model_path`` empty (random weights), batch --batch in one pass
    (no gradient accumulation), and one trainer iteration run exactly as ``fastgen.trainer.Trainer.run``
    runs it: ``callbacks.on_training_step_begin``, ``Trainer.preprocess_data``,
    ``Trainer.train_step`` (``single_train_step`` -> ``FdistillModel._student_update_step`` on iterations
    divisible by ``student_update_freq`` = 5, else ``DMD2Model._fake_score_discriminator_update_step``;
    backward; ``GradClipCallback``; optimizer and LR-scheduler steps; ``zero_grad``) and
    ``callbacks.on_training_step_end`` (the three ``EMACallback`` updates). Of the config's callbacks only
    ``grad_clip`` and the ``ema_*`` ones are kept: the others (wandb, gpu_stats, train_profiler,
    param_count) only log (gpu_stats and train_profiler every 100 iterations).

Each program runs in its own worker process (ours in this interpreter's environment, FastGen's in
--python) that builds its model once and then runs one step per request; the driver alternates the two
programs step by step (ours, FastGen, then FastGen, ours in the next round, ...), so only one of them
computes at any time and machine noise hits both alike. Each worker times its own step with
time.perf_counter. Reported: the median of --steps steps after --warmup warm-up steps, per step kind,
and per Alg. 1 iteration at tau = 5 (1 student step + 4 critic steps: FastGen's student_update_freq 5).
Ratio = ours / FastGen (below 1: ours is faster). Every difference in work between the two that we
found in FastGen's code is printed under the numbers.

FastGen side, offline (the commands used to build /work/fastgen-venv; checked with FastGen commit 34f30e8):

    git clone https://github.com/NVlabs/FastGen /work/fastgen
    python3.11 -m venv /work/fastgen-venv
    /work/fastgen-venv/bin/pip install torch==2.13.0       # the torch of fdistill's venv (a CPU wheel here)
    grep -v '^#\|^torch\|^timm\|^jupyter\|^$' /work/fastgen/requirements.txt \
        | sed 's/^wandb\[media\]/wandb/' > /tmp/fg-req.txt
    echo 'torch==2.13.0' > /tmp/fg-constraints.txt          # nothing may pull another torch
    /work/fastgen-venv/bin/pip install -r /tmp/fg-req.txt -c /tmp/fg-constraints.txt attrs pandas
    /work/fastgen-venv/bin/pip install --no-deps timm       # timm would pull torchvision

(attrs and pandas are imported by FastGen's configs but missing from its requirements.txt; jupyter and
wandb's [media] extra are not needed.) torchvision is not installed (it does not work beside torch 2.13.0
here): FastGen's config modules import it (fastgen/callbacks/wandb.py, fastgen/datasets/*, and timm via
fastgen/networks/DiT), but nothing on this path calls it. The FastGen worker therefore serves every
``torchvision.*`` import from an in-memory stub (an import hook, no file) whose objects record any use;
the report prints the uses during the timed steps, which must be none. The worker runs with
WANDB_MODE=disabled and HF_HUB_OFFLINE=1 in a temporary folder (FASTGEN_OUTPUT_ROOT points there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TAU = 5  # Alg. 1's fake-score update frequency; FastGen's student_update_freq in its CIFAR-10 config
KINDS = ("student", "critic")


# -- workers -------------------------------------------------------------------------------------------------
def _protocol_stdout():
    """The worker answers on its original stdout; everything else anything prints goes to stderr (the log)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _serve(proto, facts: dict, step) -> None:
    proto.write(json.dumps({"ready": True, "facts": facts}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "quit":
            break
        proto.write(json.dumps(step(cmd)) + "\n")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours_worker(args: argparse.Namespace) -> None:
    proto = _protocol_stdout()
    torch.set_num_threads(args.threads)
    import copy
    import dataclasses

    from fdistill.apps.images import load_config
    from fdistill.networks.edm import EDMPrecond
    from fdistill.networks.heads import Discriminator
    from fdistill.teachers.families.image import set_dropout
    from fdistill.training.distiller import Distiller

    torch.manual_seed(0)
    preset = load_config("cifar10")
    kwargs = dict(preset.teacher.network, img_resolution=32, img_channels=3, label_dim=10)
    net = EDMPrecond(**kwargs)  # build_distiller's construction, with random weights
    net.feature_resolutions = list(preset.disc_resolutions)
    channels = net.feature_channels()
    generator = copy.deepcopy(net).train().requires_grad_(True)
    fake_score = copy.deepcopy(net).train().requires_grad_(True)
    if preset.student_dropout is not None:  # as build_distiller does
        for m in (generator, fake_score):
            set_dropout(m, preset.student_dropout)
    disc = Discriminator.conv({r: channels[r] for r in preset.disc_resolutions}, preset.disc_hidden,
                              preset.disc_head)
    cfg = dataclasses.replace(preset.distill, batch_size=args.batch, precision="fp32", r1_gamma=0.0,
                              micro_batch=None, channels_last=False, compile=False)

    def real_data(n, part=slice(None)):
        x = torch.rand(n, 3, 32, 32) * 2 - 1
        return x[part], torch.eye(10)[torch.randint(10, (n,))][part]

    d = Distiller(cfg, net, generator, fake_score, disc, real_data, sample_shape=(3, 32, 32),
                  sample_cond=lambda n, part: real_data(n, part)[1], device="cpu")
    dropout = preset.student_dropout if preset.student_dropout is not None else kwargs.get("dropout", 0.10)
    top = str(max(preset.disc_resolutions))
    head_shapes = [f"{c.in_channels}->{c.out_channels}" for c in d.discriminator.heads[top].modules()
                   if isinstance(c, torch.nn.Conv2d)]
    facts = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params": {"generator": _count(d.generator), "teacher": _count(d.teacher),
                   "fake_score": _count(d.fake_score), "discriminator": _count(d.discriminator)},
        "emas": ["generator_ema"], "ema_beta": cfg.ema_beta, "ema_when": f"ema_cadence {cfg.ema_cadence!r}",
        "dropout": dropout,
        "disc": f"{len(d.discriminator.heads)} {preset.disc_head!r} heads at {preset.disc_resolutions} "
                f"({top}x{top} head's convs: {', '.join(head_shapes)})",
        "fake_score_weighting": cfg.fake_score_weighting, "r1_gamma": cfg.r1_gamma,
        "grad_clip": cfg.grad_clip, "divergence": cfg.divergence, "ratio_binning": cfg.ratio_binning,
        "ratio_ema": cfg.ratio_ema, "gan_weight": cfg.gan_weight, "guidance": preset.guidance,
    }

    def step(kind: str) -> dict:
        t0 = time.perf_counter()
        if kind == "student":
            d.student_step()
        else:
            d.critic_step()
        return {"seconds": time.perf_counter() - t0}

    _serve(proto, facts, step)


def _install_torchvision_stub(uses: list, phase: list) -> None:
    """Serve ``import torchvision[.x]`` from memory: any attribute is a stub class; calling one records it."""
    import importlib.abc
    import importlib.machinery
    import types

    class StubMeta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return stub(f"{cls.__qualname__}.{name}")

        def __call__(cls, *a, **k):
            uses.append((phase[0], cls.__qualname__))
            return super().__call__()

    def stub(name: str) -> type:
        return StubMeta(name, (), {"__qualname__": name})

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return stub(f"{self.__name__}.{name}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            module.__version__ = "0.0.0+stub"
            return module

        def exec_module(self, module):
            uses.append((phase[0], f"import {module.__name__}"))

    sys.meta_path.insert(0, Finder())


def build_fastgen_cifar10(fastgen: str, batch: int, seed: int, uses: list, phase: list, customize=None):
    """FastGen's CIFAR-10 f-distill model and Trainer (``config_f_distill_cifar10``), built in Trainer.run's
    order without DDP/FSDP, checkpoints and data loaders: device cpu, fp32, random weights (nothing loaded),
    one pass of ``batch`` (no accumulation), of the callbacks only ``grad_clip`` and the EMAs. torchvision
    imports are served by the recording stub (``uses``, ``phase``); ``customize(config)`` edits the config
    before the model is built. Returns (config, model, trainer, the callbacks dropped)."""
    _install_torchvision_stub(uses, phase)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(fastgen).resolve()))
    from fastgen.configs.experiments.EDM.config_f_distill_cifar10 import create_config
    from fastgen.trainer import Trainer
    from fastgen.utils import instantiate
    from omegaconf import DictConfig

    phase[0] = "setup"
    config = create_config()
    m = config.model
    m.device = "cpu"
    m.pretrained_model_path = ""  # random weights: nothing is loaded
    m.precision = "float32"
    m.precision_amp = None
    config.dataloader_train.batch_size = batch
    config.trainer.batch_size_global = None  # one pass of the batch, as ours (the config: 2048 by accumulation)
    config.trainer.grad_accum_rounds = 1
    kept = [k for k in config.trainer.callbacks if k == "grad_clip" or k.startswith("ema")]
    dropped = [k for k in config.trainer.callbacks if k not in kept]
    config.trainer.callbacks = DictConfig({k: config.trainer.callbacks[k] for k in kept})
    if customize is not None:
        customize(config)

    torch.manual_seed(seed)
    config.model_class.config = config.model  # as train.py
    model = instantiate(config.model_class)
    config.model_class.config = None
    trainer = Trainer(config)
    cb = trainer.callbacks
    cb.on_model_init_start(model)
    model.on_train_begin(is_fsdp=False)
    cb.on_model_init_end(model)
    cb.on_optimizer_init_start(model)
    model.init_optimizers()
    cb.on_optimizer_init_end(model)
    cb.on_train_begin(model, iteration=0)
    return config, model, trainer, dropped


def fastgen_worker(args: argparse.Namespace) -> None:
    proto = _protocol_stdout()
    torch.set_num_threads(args.threads)
    uses: list = []
    phase = ["import"]
    config, model, trainer, dropped = build_fastgen_cifar10(args.fastgen, args.batch, 0, uses, phase)
    cb, m = trainer.callbacks, config.model
    kept = list(config.trainer.callbacks)

    used = set()

    def next_iteration(kind: str) -> int:  # Trainer.run counts from 1; student iff it % freq == 0
        it = 1
        while it in used or (it % m.student_update_freq == 0) != (kind == "student"):
            it += 1
        used.add(it)
        return it

    def batch() -> dict:
        labels = torch.eye(10)[torch.randint(10, (args.batch,))]
        return {"real": torch.rand(args.batch, 3, 32, 32) * 2 - 1, "condition": labels,
                "neg_condition": torch.zeros_like(labels)}

    net_cfg = m.net
    disc = model.discriminator
    top = disc.in_res.index(max(disc.in_res))
    convs = [layer for layer in disc.discriminator_heads[top] if isinstance(layer, torch.nn.Conv2d)]
    head_shapes = [f"{c.in_channels}->{c.out_channels}" for c in convs]
    facts = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params": {"generator": _count(model.net), "teacher": _count(model.teacher),
                   "fake_score": _count(model.fake_score), "discriminator": _count(disc)},
        "emas": list(model.use_ema),
        "ema_betas": [float(config.trainer.callbacks[k].beta) for k in kept if k.startswith("ema")],
        "ema_when": "after every trainer iteration (student and critic)",
        "dropout": float(net_cfg.dropout), "label_dropout": float(net_cfg.label_dropout),
        "disc": f"{len(disc.discriminator_heads)} heads at {list(disc.in_res)}, width {disc.in_channels} "
                f"({disc.in_res[top]}x{disc.in_res[top]} head's convs: {', '.join(head_shapes)})",
        "fake_score_pred_type": m.fake_score_pred_type or model.teacher.net_pred_type,
        "gan_r1_reg_weight": float(m.gan_r1_reg_weight), "gan_r1_reg_alpha": float(m.gan_r1_reg_alpha),
        "grad_clip": float(config.trainer.callbacks.grad_clip.grad_norm) if "grad_clip" in kept else None,
        "f_div": m.f_distill.f_div, "ratio_normalization": bool(m.f_distill.ratio_normalization),
        "bin_num": int(m.f_distill.bin_num), "ratio_ema_rate": float(m.f_distill.ratio_ema_rate),
        "gan_loss_weight_gen": float(m.gan_loss_weight_gen), "guidance_scale": m.guidance_scale,
        "student_update_freq": int(m.student_update_freq), "time_dist": m.sample_t_cfg.time_dist_type,
        "callbacks_kept": kept, "callbacks_dropped": dropped,
        "config_batch_size_global": 2048,
    }
    phase[0] = "steps"

    def step(kind: str) -> dict:
        if kind == "stub_uses":
            return {"uses": sorted({f"{p}: {u}" for p, u in uses if not u.startswith("import ")}),
                    "imports": sorted({u[7:] for _, u in uses if u.startswith("import ")}),
                    "step_uses": [u for p, u in uses if p == "steps"]}
        it, data = next_iteration(kind), batch()
        t0 = time.perf_counter()  # Trainer.run's loop body for one iteration (grad_accum_rounds = 1)
        cb.on_training_step_begin(model, iteration=it)
        data = trainer.preprocess_data(model, data, None)
        cb.on_training_accum_step_begin(model, data, iteration=it, accum_iter=0)
        loss_map, outputs = trainer.train_step(model, model, data, it, 0)
        t1 = time.perf_counter()
        cb.on_training_step_end(model=model, data_batch=data, output_batch=outputs, loss_dict=loss_map,
                                iteration=it)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "ema_callbacks": t2 - t1, "iteration": it}

    _serve(proto, facts, step)


# -- driver --------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, python: str, extra: list[str], args: argparse.Namespace, cwd: str, log: Path):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        if name == "FastGen":
            env["FASTGEN_OUTPUT_ROOT"] = cwd
        self.name, self.log = name, log
        cmd = [python, str(Path(__file__).resolve()), "--batch", str(args.batch), "--threads", str(args.threads),
               *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True, cwd=cwd, env=env)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            sys.exit(f"the {self.name} worker died (exit {self.proc.returncode}); the end of its log {self.log}:\n"
                     f"{tail}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()


def fastgen_commit(path: str) -> str:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def differences(o: dict, f: dict) -> list[tuple[str, str, str, str]]:
    """(what, ours, FastGen, where) for every difference in work found in FastGen's code and config."""
    op, fp = o["params"], f["params"]
    same_unet = all(op[k] == fp[k] for k in ("generator", "teacher", "fake_score"))
    return [
        ("EMAs of the generator updated",
         f"{len(o['emas'])} (beta {o['ema_beta']}), {o['ema_when']}: {TAU} lerp passes over the generator per "
         f"tau = {TAU} iteration",
         f"{len(f['emas'])} ({', '.join(f['emas'])}; beta {f['ema_betas']}), {f['ema_when']}: "
         f"{len(f['emas']) * TAU} lerp passes (+ buffer copies) per tau = {TAU} iteration",
         "ours: fdistill/training/distiller.py Distiller.step -> fdistill/training/ema.py; FastGen: "
         "configs/experiments/EDM/config_f_distill_cifar10.py (use_ema, EMA_CONST_CALLBACKS), "
         "callbacks/ema.py on_training_step_end, trainer.py run loop"),
        ("dropout in generator and fake score (both in train mode)",
         f"{o['dropout']} (ImageConfig.student_dropout; the teacher network's 0.13 is not kept)"
         + (": no dropout work" if o["dropout"] == 0 else ": dropout masks in every UNet block"),
         f"{f['dropout']} (label_dropout {f['label_dropout']}): no dropout work (and the fake score is switched to "
         "eval mode for the student step)",
         "ours: fdistill/apps/images.py ImageConfig.student_dropout, "
         "fdistill/teachers/image_teacher.py prepare_students; "
         "FastGen: configs/net.py EDM_CIFAR10_Config, dmd2.py _setup_grad_requirements"),
        ("discriminator heads",
         f"{o['disc']}; per-head logits, softplus per head (DistillConfig.gan_loss_heads); "
         f"{op['discriminator'] / 1e6:.2f}M parameters",
         f"{f['disc']}; GroupNorm+SiLU after every conv but the last (8->4 stride 2, 4->1 4x4 stride 4); "
         f"per-head logits (B, 3); {fp['discriminator'] / 1e6:.2f}M parameters",
         "ours: fdistill/networks/heads.py FastGenHead, configs/cifar10.yaml disc_head; FastGen: "
         "networks/discriminators.py Discriminator_EDM, configs/discriminator.py Discriminator_EDM_CIFAR10_Config"),
        ("fake-score loss weighting",
         f"{o['fake_score_weighting']!r}: x0 error weighted by (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 "
         "(same passes; a few elementwise ops more); its own noise draw",
         f"plain unweighted MSE in {f['fake_score_pred_type']!r} space; the same eps as the fake sample fed to "
         "the discriminator",
         "ours: fdistill/core/diffusion.py denoising_loss; FastGen: methods/common_loss.py "
         "denoising_score_matching_loss, methods/distribution_matching/dmd2.py _fake_score_discriminator_update_step"),
        ("R1 on the discriminator",
         "exact R1 (gamma/2 times the squared norm of grad_x logit_real, a double backward through the teacher "
         f"encoder); gamma 1 in the preset, {o['r1_gamma']} here",
         f"approximate R1 (APT: MSE between the logits of real and real + {f['gan_r1_reg_alpha']} noise, one more "
         f"no-grad encoder pass); weight {f['gan_r1_reg_weight']} in this config, so off",
         "ours: fdistill/core/objective.py r1_penalty; FastGen: dmd2.py _compute_r1_regularization, "
         "configs/methods/config_dmd2.py gan_r1_reg_weight"),
        ("teacher forward in the student step",
         "one full pass with autograd on (gan_weight > 0), its encoder features feed the heads; backward only "
         "from the GAN loss through the encoder to the generator (x0 detached)",
         "the same: one full pass outside no_grad with feature_indices {0, 1, 2}; teacher_x0 enters the loss "
         "only under no_grad (variational_score_distillation_loss)",
         "ours: distiller.py student_step; FastGen: methods/distribution_matching/f_distill.py "
         "_student_update_step, methods/common_loss.py"),
        ("classifier-free guidance",
         f"none (guidance {o['guidance']})", f"none (guidance_scale {f['guidance_scale']})",
         "ours: configs/cifar10.yaml guidance; FastGen: configs/config.py BaseModelConfig.guidance_scale"),
        ("generator gradient clipping",
         f"clip_grad_norm_ at {o['grad_clip']} in the student step only",
         f"GradClipCallback every iteration: a non-finite scan of every generator gradient (isfinite().sum()"
         f".item() per tensor, then clip_grad_norm_ at {f['grad_clip']}); on critic iterations there are no "
         "generator gradients",
         "ours: distiller.py student_step; FastGen: callbacks/grad_clip.py, configs/callbacks.py GradClip_CALLBACK"),
        ("LR schedulers", "none inside the step (Distiller.step sets the lr)",
         "1 (student) or 2 (critic) LambdaLR steps per iteration", "FastGen: methods/model.py "
         "optimizers_schedulers_step, configs/opt.py"),
        ("density-ratio normalization",
         f"{o['ratio_binning']} bins in log sigma, ratio EMA {o['ratio_ema']}",
         f"{f['bin_num']} linear bins in sigma, ratio EMA {f['ratio_ema_rate']}",
         "ours: fdistill/core/objective.py RatioNormalizer; FastGen: f_distill.py _get_f_div_weighting_h"),
        ("divergence, GAN weight",
         f"{o['divergence']}, {o['gan_weight']}", f"{f['f_div']}, {f['gan_loss_weight_gen']} (the same)",
         "configs/cifar10.yaml; FastGen: config_f_distill_cifar10.py, config_dmd2.py"),
        ("networks (generator = teacher = fake score architecture)",
         f"{op['generator']:,} parameters each",
         f"{fp['generator']:,} / {fp['teacher']:,} / {fp['fake_score']:,}"
         + (" (the same)" if same_unet else f" ({fp['generator'] - op['generator']:+,}: FastGen's SongUNet also "
            "holds logvar_linear, 128->1, unused by f-distill)" if fp["generator"] - op["generator"] == 129
            else " (DIFFERENT: check the architectures)"),
         "SongUNet DDPM++ 128 x [2, 2, 2], 4 blocks, attention at 16, augment_dim 9 (unused), 10 classes; "
         "FastGen: networks/EDM/network.py SongUNet"),
        ("left out of the FastGen timing",
         "(ours: the steps alone; no logging or checkpoints)",
         f"callbacks {', '.join(f['callbacks_dropped'])} (logging), data loading, checkpoints, validation; "
         f"global batch {f['config_batch_size_global']} by gradient accumulation in the config, one pass of "
         "--batch here",
         "FastGen: configs/methods/config_f_distill.py create_config, trainer.py"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fastgen", help="a local NVlabs/FastGen checkout")
    p.add_argument("--python", help="a Python whose environment imports FastGen (see above)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind per program (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind per program first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["ours", "fastgen"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "ours":
        return ours_worker(args)
    if args.worker == "fastgen":
        return fastgen_worker(args)
    if not args.fastgen or not args.python:
        p.error("--fastgen and --python are required")
    if args.steps < 1:
        p.error("--steps must be at least 1")

    repo = Path(__file__).resolve().parent.parent
    tmp = tempfile.mkdtemp(prefix="compare_fastgen_")
    print(f"worker logs in {tmp}", flush=True)
    ours = Worker("ours", sys.executable, ["--worker", "ours"], args, str(repo), Path(tmp) / "ours.log")
    theirs = Worker("FastGen", args.python, ["--worker", "fastgen", "--fastgen", str(Path(args.fastgen).resolve())],
                    args, tmp, Path(tmp) / "fastgen.log")
    workers = [ours, theirs]
    try:
        facts = {w.name: w.read()["facts"] for w in workers}  # both build their models (concurrently)
        times: dict = {(w.name, k): [] for w in workers for k in KINDS}
        ema_cb: dict = {k: [] for k in KINDS}
        for r in range(args.warmup + args.steps):
            order = workers if r % 2 == 0 else workers[::-1]
            for kind in KINDS:
                for w in order:
                    out = w.ask(kind)
                    tag = "warm-up" if r < args.warmup else "timed"
                    print(f"  {tag} {kind} step, {w.name}: {out['seconds']:.3f} s", flush=True)
                    if r >= args.warmup:
                        times[(w.name, kind)].append(out["seconds"])
                        if w is theirs:
                            ema_cb[kind].append(out["ema_callbacks"])
        stub = theirs.ask("stub_uses")
    finally:
        for w in workers:
            w.close()

    med = {key: statistics.median(v) for key, v in times.items()}
    o, f = facts["ours"], facts["FastGen"]
    print(f"\nCIFAR-10 DDPM++ ({o['params']['generator'] / 1e6:.1f}M parameters), random weights, batch {args.batch}, "
          f"fp32, CPU, {args.threads} threads each (ours: torch {o['torch']}, {o['threads']} threads; FastGen: "
          f"torch {f['torch']}, {f['threads']} threads); FastGen {fastgen_commit(args.fastgen)[:12]}; median of "
          f"{args.steps} after {args.warmup} warm-up, the two programs alternating step by step\n")
    if o["torch"] != f["torch"]:
        print(f"WARNING: the two environments run different torch versions ({o['torch']} vs {f['torch']})\n")
    print("| step | ours (s) | FastGen (s) | ours / FastGen |")
    print("|---|---|---|---|")
    rows = [("student step", med[("ours", "student")], med[("FastGen", "student")]),
            ("critic step (no R1)", med[("ours", "critic")], med[("FastGen", "critic")])]
    rows.append((f"iteration at tau = {TAU} (1 student + {TAU - 1} critic)",
                 rows[0][1] + (TAU - 1) * rows[1][1], rows[0][2] + (TAU - 1) * rows[1][2]))
    for name, a, b in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
    ema_s, ema_c = statistics.median(ema_cb["student"]), statistics.median(ema_cb["critic"])
    no_ema = rows[2][2] - ema_s - (TAU - 1) * ema_c
    print(f"\nFastGen's times include its EMA callbacks ({len(f['emas'])} EMA updates after every iteration): median "
          f"{ema_s:.3f} s after a student step, {ema_c:.3f} s after a critic step; without them a FastGen iteration "
          f"at tau = {TAU} would take {no_ema:.3f} s (ours / that = {rows[2][1] / no_ema:.3f}).")
    print("All timed steps (s): " + "; ".join(f"{n} {k}: {', '.join(f'{t:.3f}' for t in times[(n, k)])}"
                                               for n in ("ours", "FastGen") for k in KINDS))
    if stub["step_uses"]:
        print(f"WARNING: FastGen used the torchvision stub during the steps: {stub['step_uses']}")
    else:
        print(f"torchvision stub (FastGen worker): imported {', '.join(stub['imports']) or 'nothing'}; "
              f"used during the steps: nothing; used at import/setup: {', '.join(stub['uses']) or 'nothing'}")

    print("\nDifferences in work between the two programs (FastGen paths under fastgen/):\n")
    print("| what | ours | FastGen | where |")
    print("|---|---|---|---|")
    for row in differences(o, f):
        print("| " + " | ".join(s.replace("|", "/") for s in row) + " |")


if __name__ == "__main__":
    main()
