"""The real training loop at CIFAR-10 size on one GPU (CPU if there is none), as `fdistill distill`
runs it (random teacher and random images; used by gpu_check.sh). Writes the teacher and data into
OUT, then times a cycle of Algorithm 1 with the cifar10 preset and the given overrides.

    python benchmarks/gpu_smoke.py OUT [config overrides ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fdistill.apps import distill, images
from fdistill.teachers.loading import build_network, save_network


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = images.load_config("cifar10")
    kwargs = dict(cfg.teacher.network, img_resolution=32, img_channels=3, label_dim=10)
    torch.manual_seed(0)
    teacher = save_network(build_network(cfg.teacher.precond, kwargs), cfg.teacher.precond, kwargs,
                                  out / "teacher.safetensors")
    rng = np.random.default_rng(0)
    np.savez(out / "data.npz", images=rng.integers(0, 256, (1024, 3, 32, 32), dtype=np.uint8),
             labels=rng.integers(0, 10, 1024))
    cfg = images.load_config("cifar10", [f"data={out / 'data.npz'}", *overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = distill.make_distiller(cfg, teacher, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for n in (cfg.distill.tau, 2 * cfg.distill.tau):  # warm-up cycle (and compilation), then a timed one
        sync()
        t = time.perf_counter()
        while d.iteration < n:
            logs = d.step()
        sync()
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"one cycle (1 student + {cfg.distill.tau - 1} critic steps), batch {cfg.distill.batch_size}, "
          f"{' '.join(overrides)}: {seconds:.2f} s, {cfg.distill.tau * cfg.distill.batch_size / seconds:.0f} "
          f"images/s, peak {peak:.1f} GiB, {device}; last logs {logs}")


if __name__ == "__main__":
    main()
