"""Data parallelism and gradient accumulation (issue 4, section 4): 2 CPU processes over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import build
from safetensors.torch import load_file

from fdistill.apps import cli
from fdistill.teachers.loading import build_network, save_network
from fdistill.training.distiller import DistillConfig
from fdistill.training.loop import training_loop

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str, logs: Path) -> None:
    """Run ``args`` under torchrun; each rank's output goes to its own file under ``logs`` and, on a
    failure, every rank's last lines are shown (the launcher's own summary hides them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(logs), "--redirects", "3", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        ranks = "\n".join(f"--- {f.relative_to(logs)}:\n" + "\n".join(f.read_text().splitlines()[-25:])
                          for f in sorted(logs.rglob("std*.log")))
        pytest.fail(f"torchrun exited {res.returncode}\n{ranks}\n--- launcher:\n{res.stderr[-2000:]}")


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_two_ranks_hold_identical_weights_and_match_one_process(tmp_path):
    torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path), "32", "0", "9", "js", logs=tmp_path / "logs")
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    single = build(32, None, 9, "js")
    training_loop(single, progress=False)
    assert close(single.generator.state_dict(), r0)
    assert (tmp_path / "run" / "checkpoints" / "000000009" / "model.safetensors").is_file()  # by rank 0


def test_fsdp_on_two_gloo_ranks_matches_one_process_and_resumes(tmp_path):
    """FSDP2 (fully_shard) on CPU with gloo: 2 sharded ranks end where 1 process ends; the checkpoint holds
    the gathered weights and optimizer states, and a plain process resumes from it."""
    torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path), "32", "0", "9", "js", "1", logs=tmp_path / "logs")
    assert not (tmp_path / "rank1.safetensors").exists()  # rank 1 holds only its shards
    single = build(32, None, 9, "js")
    training_loop(single, progress=False)
    assert close(single.generator.state_dict(), load_file(tmp_path / "rank0.safetensors"))
    resumed = build(32, None, 12, "js", fsdp=True)  # one process: nothing to shard, the same run
    resumed.load(tmp_path / "run")
    assert resumed.iteration == 9
    training_loop(resumed, progress=False)
    single.cfg.iterations = 12
    training_loop(single, progress=False)
    assert close(single.generator.state_dict(), resumed.generator.state_dict())


@pytest.mark.parametrize("fsdp,student", [("1", "4:backward"), ("0", "3:forward")])
def test_k_step_students_on_two_gloo_ranks_match_one_process(tmp_path, fsdp, student):
    """A k-step student's draws (step per sample, the backward simulation's noise, the forward input's real
    samples) are the global batch's, so 2 ranks (sharded or not) end where 1 process ends; under FSDP every rank
    runs the simulation's calls on its whole batch (the collectives need the same calls on all ranks)."""
    torchrun(2, str(HERE / "ddp_worker.py"), str(tmp_path), "32", "0", "7", "js", fsdp, student,
             logs=tmp_path / "logs")
    single = build(32, None, 7, "js", student=student)
    training_loop(single, progress=False)
    assert close(single.generator.state_dict(), load_file(tmp_path / "rank0.safetensors"))


def test_gradient_accumulation_matches_the_full_batch():
    """Micro-batches of 8 (4 passes) give the full batch's update. With reverse-KL h = 1, so the
    per-pass normalization statistics play no part and the two must agree to rounding."""
    full, accum = build(32, None, 7, "reverse_kl"), build(32, 8, 7, "reverse_kl")
    training_loop(full, progress=False)
    training_loop(accum, progress=False)
    for name in ("generator", "generator_ema", "fake_score", "discriminator"):  # not the per-pass ratio bins
        assert close(full.modules()[name].state_dict(), accum.modules()[name].state_dict()), name
    assert len(accum.passes) == 4 and accum.passes[-1] == slice(24, 32)


def test_accumulation_normalizes_each_pass_and_moves_the_ratio_ema_once(monkeypatch):
    """forward-KL (h = r, not constant) with micro_batch 8 of 32: Alg. 1 lines 7 and 9 normalize over each
    pass of 8 (so h_bar has mean 1 per pass, not only over the batch), and the ratio EMA moves once per
    optimizer step, by the bin means over all 32 samples. Without micro_batch one call spans the batch."""
    from fdistill.core import objective
    from fdistill.training import distiller

    calls = []

    def spy(logits, sigma, *args):
        w = objective.fdistill_weights(logits, sigma, *args)
        calls.append((sigma.clone(), w))
        return w

    monkeypatch.setattr(distiller, "fdistill_weights", spy)
    d = build(32, 8, 1, "forward_kl")
    d.ratio_norm.ema = 0.5
    stored = d.ratio_norm.bin_mean.clone()
    d.step()  # a student step
    assert len(calls) == 4
    sums, counts = torch.zeros_like(stored), torch.zeros_like(stored)
    for sigma, w in calls:
        assert w.h_bar.mean().item() == pytest.approx(1.0, rel=1e-5)  # line 9 over the pass
        idx = d.ratio_norm.bin_index(sigma)
        pass_mean = torch.zeros_like(stored).index_add_(0, idx, w.r) / torch.bincount(idx, minlength=len(stored))
        torch.testing.assert_close(w.r_bar, w.r / (0.5 * stored + 0.5 * pass_mean)[idx])  # line 7 over the pass
        torch.testing.assert_close(w.h_bar, w.h / w.h.mean())
        sums.index_add_(0, idx, w.r)
        counts += torch.bincount(idx, minlength=len(stored))
    seen = counts > 0
    torch.testing.assert_close(d.ratio_norm.bin_mean[seen], 0.5 * stored[seen] + 0.5 * sums[seen] / counts[seen])
    calls.clear()
    full = build(32, None, 1, "forward_kl")
    full.step()
    assert len(calls) == 1 and calls[0][1].h_bar.shape == (32,)
    assert calls[0][1].h_bar.mean().item() == pytest.approx(1.0, rel=1e-5)


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
    teacher = save_network(build_network("EDMPrecond", TEACHER), "EDMPrecond", TEACHER,
                                  tmp_path / "teacher.safetensors")
    common = ["distill", "--teacher", str(teacher), "--no-progress", "--device", "cpu"]
    torchrun(2, "-m", "fdistill", *common, "--out", str(tmp_path / "a"), *OVERRIDES, "distill.iterations=6",
             logs=tmp_path / "logs")
    assert cli.main([*common, "--out", str(tmp_path / "a"), "--resume", *OVERRIDES, "distill.iterations=9"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "b"), *OVERRIDES, "distill.iterations=9"]) == 0
    a = load_file(tmp_path / "a" / "checkpoints" / "000000009" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "000000009" / "model.safetensors")
    assert a.keys() == b.keys() and close(a, b)
