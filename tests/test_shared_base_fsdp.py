"""The shared-base mode (``text.shared_base``) under FSDP2 (``distill.fsdp``) on 2 gloo CPU processes: the teacher's
one network is sharded once, adapters included; generator, EMA and fake score end where 1 process ends; checkpoints
hold the gathered adapters only, and resume on another number of ranks either way."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import flow_pipelines  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from shared_base_worker import MSL, ROLES, adapters, build  # noqa: E402
from test_distributed import torchrun  # noqa: E402

from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-shared")
    folders = {"sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux")}
    return {f: (folders[f], flow_pipelines.latent_shards(root / f"latents-{f}", fm.load_flow_pipeline(
        folders[f], 16, max_sequence_length=MSL))) for f in folders}


def assert_close(got: dict, want: dict) -> None:
    """To float rounding: a few weights whose gradients nearly cancel move by AdamW's g / (|g| + eps), where the
    summation order of 1 or 2 ranks shows (unsharded data parallelism differs from 1 process as much)."""
    assert got.keys() == want.keys() and {k.split(".")[0] for k in got} == set(ROLES)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=k)


def _worker(out: Path, family: str, pipelines, iterations: int, fsdp: str = "1", resume: str = "-", *overrides):
    folder, data = pipelines[family]
    out.mkdir()
    torchrun(2, str(HERE / "shared_base_worker.py"), str(out), str(folder), str(data), str(iterations), fsdp, resume,
             *overrides, logs=out / "logs")
    return load_file(out / "adapters.safetensors")


def test_sharded_shared_base_matches_one_process_and_resumes_on_any_ranks(pipelines, tmp_path):
    """SD3, 5 iterations (student, critic, student, critic, student) on 2 sharded ranks (the worker checks that the
    base is sharded and each optimizer holds only its adapter's shards and states) against 1 process; the 2-rank
    checkpoint at 3 resumed by 1 process, and the 1-process checkpoint at 3 by 2 sharded ranks, end there too."""
    folder, data = pipelines["sd3"]
    sharded = _worker(tmp_path / "two", "sd3", pipelines, 5)
    single = build(folder, data, 5)
    start = {k: v.clone() for k, v in adapters(single).items()}
    training_loop(single, run_dir=tmp_path / "one", progress=False)
    want = adapters(single)
    assert max((want[k] - start[k]).abs().max() for k in want if k.startswith("generator.")) > 1e-3  # it trained
    assert_close(sharded, want)

    ckpt = tmp_path / "two" / "run" / "checkpoints" / "000000003"
    saved = load_file(ckpt / "model.safetensors")  # gathered by rank 0: the adapters only, no base weights
    assert {k.split(".")[0] for k in saved} == {*ROLES, "discriminator", "ratio_norm"}
    assert all(".lora_" in k.replace(":", ".") for k in saved if k.split(".")[0] in ROLES)
    assert {k for k in saved if k.split(".")[0] in ROLES} == want.keys()
    resumed = build(folder, data, 5, True)  # one process: nothing to shard
    resumed.load(ckpt)
    assert resumed.iteration == 3
    training_loop(resumed, progress=False)
    assert_close(adapters(resumed), want)

    assert_close(_worker(tmp_path / "two-resumed", "sd3", pipelines, 5, "1",
                         str(tmp_path / "one" / "checkpoints" / "000000003")), want)


def test_sharded_shared_base_with_checkpointing_and_a_k_step_student(pipelines, tmp_path):
    """FLUX with gradient checkpointing (each unit recomputed in backward, its adapter switched on gathered
    parameters) and a 2-step student's backward simulation: 2 sharded ranks end where 1 process ends."""
    overrides = ("text.gradient_checkpointing=true", "distill.student_steps=2", "distill.student_input=backward",
                 "distill.student_sampler=sde")
    sharded = _worker(tmp_path / "two", "flux", pipelines, 3, "1", "-", *overrides)
    single = build(*pipelines["flux"], 3, False, *overrides)
    training_loop(single, progress=False)
    assert_close(sharded, adapters(single))
