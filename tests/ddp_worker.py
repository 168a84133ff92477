"""One rank of a data-parallel toy run, for tests/test_distributed.py.

``python -m torch.distributed.run --standalone --nproc_per_node=N tests/ddp_worker.py OUT BATCH MICRO ITERS DIV
[FSDP [K:INPUT]]`` (or plain ``python tests/ddp_worker.py ...`` for one process) runs Alg. 1 on the 2-D mixture with
the analytic teacher and writes each rank's generator to OUT/rank<r>.safetensors (with FSDP=1 the networks are
sharded and rank 0 writes the gathered generator); K:INPUT, e.g. 4:backward, makes the student a k-step one.
"""

import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fdistill.core.diffusion import SigmaSampler
from fdistill.networks.heads import Discriminator
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training import distributed
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import training_loop

MIX = GaussianMixture([[2.0, -1.0], [-1.5, 1.0]], [0.4, 0.4], [0.7, 0.3])


def build(batch: int, micro: int | None, iterations: int, divergence: str, fsdp: bool = False,
          student: str = "") -> Distiller:
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=32, depth=2, sigma_data=MIX.data_std())
    k, mode = student.split(":") if student else (1, "backward")
    cfg = DistillConfig(divergence=divergence, iterations=iterations, batch_size=batch, micro_batch=micro, lr=1e-3,
                        tau=3, sigmas=SigmaSampler(sigma_max=20.0), log_every=1, gan_weight=0.1, fsdp=fsdp,
                        student_steps=int(k), student_input=mode, student_sampler="sde")
    real = torch.Generator().manual_seed(1)
    return Distiller(cfg, MIX, copy.deepcopy(net), copy.deepcopy(net), Discriminator.mlp(MIX.feature_channels(), 16),
                     real_data=lambda n, part: (MIX.sample(n, generator=real)[part], None), sample_shape=(2,))


if __name__ == "__main__":
    out, batch, micro, iterations, divergence = sys.argv[1:6]
    fsdp = len(sys.argv) > 6 and sys.argv[6] == "1"
    distributed.init_from_env("cpu")
    d = build(int(batch), int(micro) or None, int(iterations), divergence, fsdp, *sys.argv[7:8])
    training_loop(d, run_dir=Path(out) / "run", progress=False)
    state = distributed.module_state(d.generator)  # gathered to rank 0 when sharded
    if state:
        save_file({k: v.contiguous() for k, v in state.items()}, Path(out) / f"rank{d.rank}.safetensors")
    distributed.shutdown()
