"""``fdistill sample``: images from a distillation run's one-step generator or from a teacher's multi-step
sampler, for any teacher family. Class-conditional (and unconditional) models write resumable PNG shards, a
``samples.npz`` and a grid, on any number of processes; text-to-image models one PNG per prompt and a grid."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fdistill.apps import images, png_shards
from fdistill.apps.distill import load_generator, network_evaluations, sample_maker
from fdistill.data.datasets import to_float
from fdistill.teachers.open import open_teacher
from fdistill.training import checkpoint, distributed


def run_folder(given: str | Path) -> Path:
    """The run folder of ``given``: a run folder itself, or one of its ``checkpoints/<iteration>`` folders."""
    given = Path(given)
    return given if (given / "checkpoints").is_dir() else given.parent.parent


def open_model(checkpoint_dir: str | Path | None, teacher_path: str | Path | None, steps: int | None,
               guidance: float | None, device: torch.device):
    """(network, sigma_gen or None, its Teacher, steps, guidance, the record of what was sampled)."""
    if checkpoint_dir is not None:
        if steps is not None or guidance is not None:
            given = " and ".join(n for n, v in (("--steps", steps), ("--guidance", guidance)) if v is not None)
            raise ValueError(f"{given} apply to --teacher sampling; a one-step generator (--checkpoint) samples in "
                             "one network call, unguided")
        net, sigma_gen, teacher = load_generator(checkpoint_dir, device)
        return net, sigma_gen, teacher, 1, 1.0, {"checkpoint": str(checkpoint.resolve(checkpoint_dir).resolve())}
    teacher = open_teacher(teacher_path).to(device)
    steps, guidance = 18 if steps is None else steps, 1.0 if guidance is None else guidance
    record = {"teacher": str(Path(teacher_path).resolve()), "steps": steps, "guidance": guidance}
    return teacher.denoiser, None, teacher, steps, guidance, record


def sample(checkpoint_dir: str | Path | None, teacher_path: str | Path | None, out: str | Path | None,
           num: int, prompts: list[str], seed: int = 0, shard: int = 1000, batch: int = 256,
           steps: int | None = None, guidance: float | None = None, grid_size: int = 100,
           device: torch.device | str = "cpu", progress: bool = True) -> str | None:
    """Sample and write the files; returns the line to print (None on ranks other than 0)."""
    if (checkpoint_dir is None) == (teacher_path is None):
        raise ValueError("give exactly one of --checkpoint (a one-step generator: a distill run folder or one of its "
                         "checkpoints) or --teacher (multi-step sampling)")
    default = run_folder(checkpoint_dir) / "samples" if checkpoint_dir is not None else Path("runs/samples")
    out = Path(out) if out else default
    device = torch.device(device)
    t0 = time.perf_counter()
    net, sigma_gen, teacher, steps, guidance, record = open_model(checkpoint_dir, teacher_path, steps, guidance,
                                                                  device)
    make = sample_maker(net, teacher, sigma_gen, steps, guidance, device)
    nfe = network_evaluations(sigma_gen, steps)
    if teacher.text_to_image:
        return _prompted(make, teacher, prompts, out, seed, grid_size, progress, t0, nfe)
    if prompts:
        raise ValueError("--prompt/--prompts apply to text-to-image models (a Stable Diffusion teacher or its run)")
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
    from fdistill.apps import t2i

    if not prompts:
        raise ValueError("a text-to-image model needs --prompt TEXT (repeatable) or --prompts FILE")
    if distributed.world_size() > 1:
        raise ValueError("text-to-image sample runs in one process; for many prompts on several GPUs, "
                         "torchrun ... evaluate-t2i writes the images in shards")
    x = t2i.generate(make, prompts, seed, progress)
    paths = t2i.write_pngs(x, prompts, out, seed)
    grid = images.write_grid(x, 0, out / "grid.png", grid_size)
    calls = "one generator call" if nfe == 1 else f"{nfe} network calls"
    return (f"wrote {len(paths)} PNGs, prompts.txt and {grid.name} in {out}: {calls} and one VAE decode each, "
            f"{time.perf_counter() - t0:.1f} s")
