"""One rank of a tiny shared-base text-to-image run (``text.shared_base``), for tests/test_shared_base_fsdp.py.

``python -m torch.distributed.run --standalone --nproc_per_node=N tests/shared_base_worker.py OUT FOLDER DATA
ITERS FSDP [RESUME [OVERRIDE ...]]`` (or plain ``python tests/shared_base_worker.py ...`` for one process)
distills the pipeline folder FOLDER (flow_pipelines.sd3 or .flux) from the latent shards DATA for ITERS
iterations, the three roles LoRA adapters on the teacher's one network (sharded over the ranks with FSDP=1, then
checked: ``check_sharded``), checkpointing to OUT/run every 3 iterations; with RESUME (a checkpoint folder; "-":
none) it resumes from there; OVERRIDEs are further config overrides. Rank 0 writes the gathered adapters of
generator, EMA and fake score to OUT/adapters.safetensors (``<role>.<key>``).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fdistill.apps import distill, images
from fdistill.training import distributed
from fdistill.training.distiller import Distiller
from fdistill.training.loop import training_loop

MSL = 8
ROLES = ("generator", "generator_ema", "fake_score")


def config(data, iterations: int, fsdp: bool, guidance: float = 2.0, *overrides: str):
    return images.load_config("digits", [
        f"data={data}", "disc_resolutions=[mid]", "disc_hidden=8", f"guidance={guidance}",
        "distill.batch_size=4", "distill.tau=2", "distill.log_every=1", "distill.r1_form=approx",
        f"distill.iterations={iterations}", "distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]",
        "distill.lr=1e-2", "distill.gan_weight=0.1", "distill.checkpoint_every=3", "distill.keep_checkpoints=5",
        f"distill.fsdp={str(fsdp).lower()}", "text.prompts=null", "text.resolution=16",
        f"teacher_options.max_sequence_length={MSL}", "text.lora_rank=2", "text.shared_base=true", *overrides])


def build(folder, data, iterations: int, fsdp: bool = False, *overrides: str) -> Distiller:
    """The run, its adapters started from one seeded draw on every rank (peft starts lora_B at zero: make both
    adapters matter from the first step), loaded through ``distributed.load_module_state`` (the sharded views' path)."""
    guidance = 1.0 if "flux" in Path(folder).name else 2.0
    d = distill.make_distiller(config(data, iterations, fsdp, guidance, *overrides), folder)
    g = torch.Generator().manual_seed(1)
    for name in ("generator", "fake_score"):
        view = getattr(d, name)
        state = {k: torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in k else 0.3)
                 for k, p in view.named_parameters()}
        distributed.load_module_state(view, state)
        if name == "generator" and d.generator_ema is not d.generator:
            distributed.load_module_state(d.generator_ema, state)
    return d


def check_sharded(d: Distiller) -> None:
    """The one base is sharded, adapters and all; each role's optimizer holds its own adapter's shards and their
    states, nothing else."""
    from torch.distributed.tensor import DTensor

    base = d.generator.shared.denoiser
    assert all(isinstance(p, DTensor) for p in base.parameters()), "the base is not sharded"
    in_base = {id(p) for p in base.parameters()}
    for name, opt in (("generator", d.opt_g), ("fake_score", d.opt_fake)):
        view = getattr(d, name)
        held = [p for group in opt.param_groups for p in group["params"]]
        assert held and {id(p) for p in held} == {id(p) for p in view.parameters()} <= in_base, name
        assert sum(p.to_local().numel() for p in held) < sum(p.numel() for p in held), name
        for p in held:
            assert isinstance(p, DTensor) and all(isinstance(v, DTensor) and v.to_local().shape == p.to_local().shape
                                                  for k, v in opt.state[p].items() if k != "step"), name
    assert {id(p) for p in d.generator_ema.parameters()} <= in_base


def adapters(d: Distiller) -> dict[str, torch.Tensor]:
    """The three roles' full adapter weights (gathered to rank 0 when sharded: a collective; {} on other ranks)."""
    out = {}
    for name in ROLES:
        for k, v in distributed.module_state(getattr(d, name)).items():
            out[f"{name}.{k}"] = v.contiguous()
    return out


if __name__ == "__main__":
    out, folder, data, iterations, fsdp = sys.argv[1:6]
    distributed.init_from_env("cpu")
    resume = sys.argv[6] if len(sys.argv) > 6 else "-"
    d = build(folder, data, int(iterations), fsdp == "1", *sys.argv[7:])
    if resume != "-":
        d.load(resume)
    training_loop(d, run_dir=Path(out) / "run", progress=False)
    if d.sharded:
        check_sharded(d)
    weights = adapters(d)
    if d.rank == 0:
        save_file(weights, Path(out) / "adapters.safetensors")
    distributed.shutdown()
