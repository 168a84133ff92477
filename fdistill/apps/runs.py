"""Run folders: what ``fdistill train-teacher`` and ``fdistill distill`` write, and how they resume. A new run
refuses a folder holding another run (unless overwritten); ``--resume`` reads ``<out>/config.yaml``, applies the
overrides and refuses changes that define the run. ``config.yaml`` is written once the run's inputs are open, and
a replaced run is deleted after the first step (``fdistill.training.run.Start``)."""

from __future__ import annotations

import time
from pathlib import Path

from fdistill.apps import distill as distillation
from fdistill.apps import images
from fdistill.config import DIGITS_PRESET, RUN_CONFIG, resumable_keys, to_dict
from fdistill.device import pick_device
from fdistill.training import checkpoint, distributed, run
from fdistill.training.loop import training_loop

# What --resume may change: the fields marked resumable (fdistill.config.resumable) in the part of the config a
# command runs; every other difference from the run's config.yaml is refused, by name.
RESUMED_PART = {"distill": "distill", "train-teacher": "teacher"}
UNUSED = {"distill": ("teacher.",), "train-teacher": ("distill.", "disc_", "guidance")}  # parts a command ignores


def resumable(command: str) -> set[str]:
    """The dotted config keys (``distill.iterations``, ...) that ``command --resume`` may change."""
    return resumable_keys(images.ImageConfig, RESUMED_PART[command])


def open_run(out: str | Path, command: str, config: list[str] | None, overrides: list[str], resume: bool = False,
             overwrite: bool = False, print_config: bool = False):
    """The run's config and, when resuming, its record: a new run refuses a folder holding another run
    (unless ``overwrite``; not checked when only printing the config); ``resume`` reads <out>/config.yaml,
    applies the overrides and refuses changes that define the run. ``config``: the --config presets, files or
    run folders (None: the digits preset)."""
    out = Path(out)
    if not resume:
        cfg = images.load_config(config or DIGITS_PRESET, overrides)
        if not print_config:
            run.refuse_existing(out, overwrite)
        return cfg, None
    if overwrite or config:
        raise ValueError(f"--resume continues the run in {out} with its own {RUN_CONFIG}; give changes as key=value "
                         "overrides (not --config), and drop --overwrite")
    record = run.read(out)
    if record is None:
        raise FileNotFoundError(f"nothing to resume in {out}: it has no {RUN_CONFIG} (start the run without --resume)")
    if record["run"].get("command") != command:
        raise ValueError(f"{out} holds a {record['run'].get('command')} run, not a {command} run")
    cfg = images.load_config(out, overrides)
    saved = to_dict(images.load_config(out))  # through the config classes: keys added since then take defaults
    run.check_resume(out, saved, to_dict(cfg), resumable(command), UNUSED[command])
    return cfg, record


def resume_point(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out`` (None, said on stdout: start at iteration 0)."""
    ckpt = checkpoint.latest(out)
    if ckpt is None:
        print(f"{out} has no complete checkpoint: starting at iteration 0")
    return ckpt


def train_teacher(cfg: images.ImageConfig, record: dict | None, out: str | Path, device: str = "auto",
                  progress: bool = True) -> str:
    """Train the teacher of ``cfg`` in run folder ``out`` (continuing it when ``record``, from ``open_run``, says
    it is resumed); returns the line saying what was written."""
    out, device = Path(out), pick_device(device)
    resume = resume_point(out) if record else None
    if resume:
        print(f"resuming {resume} (iteration {int(resume.name)})")
    t0 = time.perf_counter()
    with run.Start(out, resume=record is not None) as start:
        def started(trainer) -> None:  # the data is open and the trainer built: config.yaml, old run aside
            start.begin("train-teacher", cfg, data=cfg.data)
            start.commit_after_first_step(trainer)

        path = images.train_teacher(cfg, out, progress=progress, device=device, resume=resume, started=started)
    return (f"wrote {path} ({cfg.teacher.iterations} iterations, {time.perf_counter() - t0:.0f} s this run); "
            f"{out}/samples.png, log.jsonl, checkpoints/, config.yaml. Next: fdistill distill --teacher {out}")


def distill(cfg: images.ImageConfig, record: dict | None, out: str | Path, teacher: str | None,
            init_from: str | None = None, tensorboard: bool = False, device: str = "auto",
            progress: bool = True) -> str | None:
    """Distill ``teacher`` (with ``record``, from ``open_run``: the resumed run's own unless given) into run
    folder ``out``: single process, or one process per GPU under torchrun (data parallel, see
    fdistill.training.distributed). Returns the line saying what was written (None on ranks other than 0)."""
    given = teacher
    teacher = given or (record["run"].get("teacher") if record else None)
    if teacher is None:
        raise ValueError("distill needs --teacher (a teacher file or folder); see `fdistill distill --help`")
    if record and given and Path(given).resolve() != Path(record["run"]["teacher"]).resolve():
        raise ValueError(f"cannot resume {out} with another teacher: it was distilled from "
                         f"{record['run']['teacher']}")
    out = Path(out)
    with distributed.process_group(device) as device:
        main = distributed.rank() == 0
        d = distillation.make_distiller(cfg, teacher, device=device)
        resume = resume_point(out) if record else None
        if init_from and not resume:
            from fdistill.teachers.lora_files import warm_start

            line = warm_start(d, init_from)  # a run, a LoRA file or a diffusers network folder
            if main:
                print(line)
        if resume:
            d.load(resume)
        if tensorboard and main:
            tensorboard_writer(None)  # installed? (checked before the start)
        # config, teacher, data and warm start are open: config.yaml now, the replaced run deleted after step one
        with run.Start(out, resume=record is not None, main=main) as start:
            start.begin("distill", cfg, teacher=str(Path(teacher).resolve()), data=cfg.data)
            distributed.barrier()
            if main:
                div = d.divergence
                print(f"distill {out}: divergence {div.name} ({div.description}), teacher {teacher}, data {cfg.data}; "
                      f"{distributed.world_size()} process(es) on {device}, global batch {cfg.distill.batch_size} in "
                      f"{len(d.passes)} pass(es) of {d.passes[0].stop} per process"
                      + (f"; resuming at iteration {d.iteration}" if resume else ""))
            t0 = time.perf_counter()
            writer = tensorboard_writer(out / "tensorboard") if tensorboard and main else None

            def log_fn(logs: dict) -> None:
                for k, v in logs.items():
                    if isinstance(v, float):
                        writer.add_scalar(k, v, logs["iteration"])

            start.commit_after_first_step(d)
            training_loop(d, run_dir=out, progress=progress, desc=d.divergence.name, log_fn=log_fn if writer else None)
        if writer:
            writer.close()
        if not main:
            return None
        return (f"wrote {checkpoint.latest(out)} ({d.iteration} iterations, {time.perf_counter() - t0:.0f} s this "
                f"run), {out}/log.jsonl{', tensorboard/' if writer else ''}, config.yaml. "
                f"Next: fdistill sample --checkpoint {out}")


def tensorboard_writer(log_dir: Path | None):
    """A TensorBoard writer into ``log_dir`` (None: only check that tensorboard is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'fdistill[tensorboard]'") from None
    return SummaryWriter(str(log_dir)) if log_dir is not None else None
