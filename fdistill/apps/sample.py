"""``fdistill sample``: images from a distillation run's (one- or few-step) generator or from a teacher's multi-step
sampler, for any teacher family. Class-conditional (and unconditional) models write resumable PNG shards, a
``samples.npz`` and a grid, on any number of processes; text-to-image models one PNG per prompt and a grid;
text-to-video models (Wan) one MP4 per prompt, a PNG strip of its frames and a grid of the strips."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fdistill.apps import images, png_shards
from fdistill.apps.distill import load_expert_pair, load_generator, sample_maker
from fdistill.data.captions import open_captions
from fdistill.data.datasets import to_float
from fdistill.teachers.open import open_teacher
from fdistill.training import checkpoint, distributed


def run_folder(given: str | Path) -> Path:
    """The run folder of ``given``: a run folder itself, or one of its ``checkpoints/<iteration>`` folders."""
    given = Path(given)
    return given if (given / "checkpoints").is_dir() else given.parent.parent


def read_prompts(prompts: list[str] | None, file: str | Path | None) -> list[str]:
    """The ``--prompt`` texts, then the captions of the ``--prompts`` file (or caption dataset)."""
    prompts = list(prompts or [])
    if file:
        data = open_captions(file)
        prompts += [data.caption(i) for i in range(len(data))]
    return prompts


def open_model(checkpoint_dir: str | Path | None, teacher_path: str | Path | None, steps: int | None,
               guidance: float | None, device: torch.device, teacher_config: images.ImageConfig | None = None,
               student_steps: int | None = None, checkpoint_low: str | Path | None = None):
    """(network, the student's StudentSteps or None, its Teacher, steps, guidance, the record of what was sampled).
    ``teacher_config`` (what ``--config`` and the overrides resolve to; None: neither was given) opens the teacher
    at its ``text.resolution`` with its ``teacher_options``; a checkpoint's teacher is the one it records.
    ``student_steps``: run a k-step student in fewer steps (``StudentSteps.fewer``). ``checkpoint_low``: the
    low-noise expert's run of a Wan2.2-A14B pair, ``checkpoint_dir`` the high one's (``load_expert_pair``)."""
    if checkpoint_low is not None:
        if checkpoint_dir is None:
            raise ValueError("--checkpoint-low is the low-noise expert's run of a Wan2.2-A14B pair: it goes with "
                             "--checkpoint HIGH_RUN (the high-noise expert's run)")
        if student_steps is not None:
            raise ValueError("--student-steps runs one student in fewer steps; a Wan2.2-A14B pair (--checkpoint-low) "
                             "samples in its two students' own steps")
    if checkpoint_dir is not None:
        if teacher_config is not None:
            raise ValueError("--config, --print-config and key=value overrides set a --teacher's options "
                             "(teacher_options.*, text.resolution); a --checkpoint's are those it was distilled with")
        if steps is not None or guidance is not None:
            given = " and ".join(n for n, v in (("--steps", steps), ("--guidance", guidance)) if v is not None)
            raise ValueError(f"{given} apply to --teacher sampling; a distilled student (--checkpoint) samples in its "
                             "own steps, unguided (--student-steps runs it in fewer)")
        if checkpoint_low is not None:
            net, student, teacher = load_expert_pair(checkpoint_dir, checkpoint_low, device)
        else:
            net, student, teacher = load_generator(checkpoint_dir, device)
        record = {"checkpoint": str(checkpoint.resolve(checkpoint_dir).resolve())}
        if checkpoint_low is not None:
            record["checkpoint_low"] = str(checkpoint.resolve(checkpoint_low).resolve())
        if student_steps is not None:
            student = student.fewer(student_steps)
            record["student_steps"] = student_steps
        return net, student, teacher, 1, 1.0, record
    if student_steps is not None:
        raise ValueError("--student-steps applies to a distilled student (--checkpoint); a --teacher samples in "
                         "--steps Heun steps")
    resolution, options = (None, None) if teacher_config is None else \
        (teacher_config.text.resolution, teacher_config.teacher_options)
    if (options or {}).get("expert") is not None:
        raise ValueError(f"teacher_options.expert={options['expert']} picks the expert a distill run's student "
                         "copies; a Wan2.2-A14B --teacher samples with both experts, routed by t (expected no "
                         "teacher_options.expert)")
    teacher = open_teacher(teacher_path, resolution, options).to(device)
    steps, guidance = 18 if steps is None else steps, 1.0 if guidance is None else guidance
    record = {"teacher": str(Path(teacher_path).resolve()), "steps": steps, "guidance": guidance}
    # what the samples depend on, so that a stopped run is resumed only alike
    record.update((k, v) for k, v in (("resolution", resolution), ("teacher_options", options)) if v)
    return teacher.denoiser, None, teacher, steps, guidance, record


def sample(checkpoint_dir: str | Path | None, teacher_path: str | Path | None, out: str | Path | None,
           num: int, prompts: list[str], seed: int = 0, shard: int = 1000, batch: int = 256,
           steps: int | None = None, guidance: float | None = None, grid_size: int = 100,
           device: torch.device | str = "cpu", progress: bool = True,
           teacher_config: images.ImageConfig | None = None, student_steps: int | None = None,
           checkpoint_low: str | Path | None = None) -> str | None:
    """Sample and write the files, in this process or, under torchrun, each process of the job its share;
    returns the line to print (None on ranks other than 0). ``teacher_config``, ``student_steps``,
    ``checkpoint_low``: see ``open_model``."""
    if (checkpoint_dir is None) == (teacher_path is None):
        raise ValueError("give exactly one of --checkpoint (a distilled student: a distill run folder or one of its "
                         "checkpoints) or --teacher (multi-step sampling)")
    default = run_folder(checkpoint_dir) / "samples" if checkpoint_dir is not None else Path("runs/samples")
    out = Path(out) if out else default
    with distributed.process_group(str(device)) as device:  # under torchrun: one process of the job
        t0 = time.perf_counter()
        net, student, teacher, steps, guidance, record = open_model(checkpoint_dir, teacher_path, steps, guidance,
                                                                    device, teacher_config, student_steps,
                                                                    checkpoint_low)
        make = sample_maker(net, teacher, student, steps, guidance, device)
        nfe = make.nfe
        if teacher.text_to_image:
            return _prompted(make, teacher, prompts, out, seed, grid_size, progress, t0, nfe)
        if prompts:
            raise ValueError("--prompt/--prompts apply to text-to-image and text-to-video models (a pipeline teacher "
                             "or its run)")
        classes = images.sample_classes(num, teacher.label_dim)
        rank = distributed.rank()
        folder = png_shards.claim(out / "images", {**record, "seed": seed, "shard": shard}, classes)
        png_shards.generate_shards(make, classes, folder, shard, seed, rank, distributed.world_size(), batch,
                                   progress=progress and rank == 0)
        distributed.barrier()
        if rank != 0:
            return None
        x = to_float(torch.from_numpy(png_shards.read_all(folder)))
        npz, grid = images.write_samples(out, x, teacher.condition(classes), grid_size)
        seconds = time.perf_counter() - t0
        return (f"wrote {npz}, {grid} and {folder}/shard-*/: {num} samples, {nfe} NFE each, {seconds:.1f} s "
                f"({1000 * seconds / num:.1f} s per 1000). Next: fdistill evaluate {out}")


def _prompted(make, teacher, prompts: list[str], out: Path, seed: int, grid_size: int, progress: bool, t0: float,
              nfe: int) -> str:
    """Text-to-image: one PNG per prompt and a grid; text-to-video (``teacher.video``): one MP4 per prompt at the
    family's frame rate, a PNG strip of its frames (every k-th, ``t2i.strip_every``) and a grid of the strips."""
    from fdistill.apps import t2i

    what = "text-to-video" if teacher.video else "text-to-image"
    if not prompts:
        raise ValueError(f"a {what} model needs --prompt TEXT (repeatable) or --prompts FILE")
    if distributed.world_size() > 1:
        raise ValueError(f"{what} sample runs in one process; for many prompts on several GPUs, "
                         "torchrun ... evaluate-t2i writes the images in shards")
    x = t2i.generate(make, prompts, seed, progress)
    calls = "one generator call" if nfe == 1 else f"{nfe} network calls"
    if teacher.video:
        from fdistill.data.video import save_clip_grid

        paths, every = t2i.write_videos(x, prompts, out, seed, teacher.video_fps)
        grid = save_clip_grid(x[:max(grid_size, 1)], out / "grid.png", every=every, layout="CFHW", label_frames=True)
        return (f"wrote {len(paths)} MP4s ({x.shape[2]} frames of {x.shape[3]} x {x.shape[4]} at "
                f"{teacher.video_fps} fps), their PNG frame strips (every {every} frame{'s' if every > 1 else ''}), "
                f"prompts.txt and {grid.name} in {out}: {calls} and one VAE decode each, "
                f"{time.perf_counter() - t0:.1f} s")
    paths = t2i.write_pngs(x, prompts, out, seed)
    grid = images.write_grid(x, 0, out / "grid.png", grid_size)
    return (f"wrote {len(paths)} PNGs, prompts.txt and {grid.name} in {out}: {calls} and one VAE decode each, "
            f"{time.perf_counter() - t0:.1f} s")
