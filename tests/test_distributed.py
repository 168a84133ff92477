"""Data parallelism and gradient accumulation (issue 4, section 4): 2 CPU processes over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import build
from safetensors.torch import load_file

from fdistill import cli, images
from fdistill.trainer import DistillConfig

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_two_ranks_hold_identical_weights_and_match_one_process(tmp_path):
    torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path), "32", "0", "9", "js")
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    single = build(32, None, 9, "js")
    single.train(progress=False)
    assert close(single.generator.state_dict(), r0)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()  # written once, by rank 0


def test_gradient_accumulation_matches_the_full_batch():
    """Micro-batches of 8 (4 passes) give the full batch's update. With reverse-KL h = 1, so the
    per-pass normalization statistics play no part and the two must agree to rounding."""
    full, accum = build(32, None, 7, "reverse_kl"), build(32, 8, 7, "reverse_kl")
    full.train(progress=False)
    accum.train(progress=False)
    for name in ("generator", "generator_ema", "fake_score", "discriminator"):  # not the per-pass ratio bins
        assert close(full._modules()[name].state_dict(), accum._modules()[name].state_dict()), name
    assert len(accum.micro_slices) == 4 and accum.micro_slices[-1] == slice(24, 32)


def test_batch_must_split_into_ranks_and_micro_batches():
    with pytest.raises(ValueError, match="micro_batch"):
        build(32, 5, 1, "js")
    with pytest.raises(ValueError, match="micro_batch"):
        DistillConfig(micro_batch=0)


TEACHER = {"model_type": "SongUNet", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
           "attn_resolutions": [], "dropout": 0.0, "embedding_type": "positional", "encoder_type": "standard",
           "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
           "img_resolution": 8, "img_channels": 1, "label_dim": 10}
OVERRIDES = ["distill.batch_size=8", "distill.tau=3", "disc_hidden=8", "distill.checkpoint_every=3"]


def test_torchrun_cli_and_resume_on_another_world_size(tmp_path):
    """`torchrun -m fdistill distill` on 2 processes for 6 iterations, resumed by 1 process to 9,
    ends where 1 process running 9 iterations straight ends (dropout 0, so the runs are the same)."""
    torch.manual_seed(0)
    teacher = images.save_network(images.build_network("EDMPrecond", TEACHER), "EDMPrecond", TEACHER,
                                  tmp_path / "teacher.safetensors")
    common = ["distill", "--teacher", str(teacher), "--no-progress", "--device", "cpu"]
    torchrun(2, "-m", "fdistill", *common, "--out", str(tmp_path / "a"), *OVERRIDES, "distill.iterations=6")
    assert cli.main([*common, "--out", str(tmp_path / "a"), "--resume", *OVERRIDES, "distill.iterations=9"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "b"), *OVERRIDES, "distill.iterations=9"]) == 0
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and close(a, b)
