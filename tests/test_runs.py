"""Runs that survive: crash-safe checkpoints, resume, a divergence guard, preemption, and a table of bad
inputs that each end in one error line."""

import copy
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import DISTILL, TINY

from fdistill import io
from fdistill.apps import cli
from fdistill.core.diffusion import SigmaSampler
from fdistill.networks.heads import Discriminator
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training import checkpoint
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import EXIT_PREEMPTED, training_loop

MIX = GaussianMixture([[2.0, -1.0], [-1.5, 1.0]], [0.4, 0.4], [0.7, 0.3])


def toy(**kw) -> Distiller:
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=16, depth=2, sigma_data=MIX.data_std())
    base = dict(iterations=6, batch_size=16, lr=1e-3, tau=3, sigmas=SigmaSampler(sigma_max=20.0), log_every=1)
    real = torch.Generator().manual_seed(1)
    return Distiller(DistillConfig(**{**base, **kw}), MIX, copy.deepcopy(net), copy.deepcopy(net),
                     Discriminator.mlp(MIX.feature_channels(), 8),
                     real_data=lambda n, part: (MIX.sample(n, generator=real)[part], None), sample_shape=(2,))


# -- checkpoints --------------------------------------------------------------------------------------------
def _save_with_a_crash_at(path: Path, d: Distiller, k: int) -> bool:
    """In a forked child, save with the k-th filesystem step replaced by an instant death (os._exit: no
    cleanup runs). True when the save completed before step k."""
    pid = os.fork()
    if pid == 0:  # the child
        steps = [0]

        def dying(fn):
            def wrapper(*args, **kwargs):
                steps[0] += 1
                if steps[0] == k:
                    os._exit(9)
                return fn(*args, **kwargs)
            return wrapper

        checkpoint.save_file = dying(checkpoint.save_file)
        io.fsync_file = dying(io.fsync_file)  # each fsync of the checkpoint writer (fdistill.io.atomic_dir)
        io.fsync_dir = dying(io.fsync_dir)
        os.rename = dying(os.rename)
        Path.write_text = dying(Path.write_text)
        checkpoint.save(path, d.modules(), d.optimizers(), {"iteration": d.iteration})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_a_crash_at_any_filesystem_step_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    d = toy()
    training_loop(d, run_dir=tmp_path, progress=False)  # iteration 6
    first = checkpoint.latest(tmp_path)
    assert first.name == "000000006"
    d.iteration = 7
    for k in range(1, 40):
        completed = _save_with_a_crash_at(checkpoint.checkpoint_path(tmp_path, 7), d, k)
        newest = checkpoint.latest(tmp_path)
        assert newest.name in ("000000006", "000000007"), k
        checkpoint.load(newest, toy().modules(), toy().optimizers())  # complete, checksums verified
        assert (first / "model.safetensors").is_file()  # the old one stays until pruned
        if completed:
            assert newest.name == "000000007" and k > 8  # the save has several steps, each one tried
            break
    else:
        pytest.fail("the save never completed")
    checkpoint.prune(tmp_path, keep=2)  # removes the crashed saves' temporary folders
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000006", "000000007"]


def test_truncated_or_corrupt_checkpoint_files_are_named(tmp_path):
    d = toy(checkpoint_every=3)
    training_loop(d, run_dir=tmp_path, progress=False)
    newest = tmp_path / "checkpoints" / "000000006"
    model = newest / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[:-10])  # truncated: --resume falls back to the previous complete checkpoint
    with pytest.warns(UserWarning, match="model.safetensors is truncated"):
        assert checkpoint.latest(tmp_path).name == "000000003"
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        checkpoint.load(newest, d.modules(), d.optimizers())
    model.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        checkpoint.load(newest, d.modules(), d.optimizers())
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        checkpoint.load_weights(tmp_path, "generator")
    model.write_bytes(data[:-10])  # truncated again; a resume continues from 3 and the next save prunes it
    d = toy(checkpoint_every=3, iterations=9, keep_checkpoints=2)
    with pytest.warns(UserWarning, match="skipping an incomplete checkpoint"):
        d.load(checkpoint.latest(tmp_path))
    training_loop(d, run_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000006", "000000009"]
    checkpoint.load(newest, d.modules(), d.optimizers())  # rewritten by the resumed run, complete


def test_checkpoints_are_named_by_iteration_and_the_newest_k_kept(tmp_path):
    training_loop(toy(iterations=10, checkpoint_every=2, keep_checkpoints=3), run_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000006", "000000008", "000000010"]
    assert checkpoint.read_meta(tmp_path)["iteration"] == 10


def test_log_holds_each_iteration_once_after_a_resume(tmp_path):
    training_loop(toy(checkpoint_every=3), run_dir=tmp_path, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "000000006")  # as if killed after logging 3-5, before checkpoint 6
    d = toy()
    d.load(tmp_path)
    assert d.iteration == 3
    training_loop(d, run_dir=tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in lines] == [0, 1, 2, 3, 4, 5]


def test_divergence_stops_naming_iteration_and_quantity_and_keeps_the_last_good_checkpoint(tmp_path):
    d = toy(iterations=9, checkpoint_every=3, log_every=100)
    step = d.step

    def poisoned():
        if d.iteration == 4:  # a critic step whose weights turn non-finite
            with torch.no_grad():
                next(d.fake_score.parameters()).fill_(float("nan"))
        return step()

    d.step = poisoned
    with pytest.raises(FloatingPointError, match="loss_fake_score is not finite at iteration 4"):
        training_loop(d, run_dir=tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["000000003"]  # 6 was never written
    checkpoint.load(tmp_path, toy().modules(), toy().optimizers())


# -- preemption ---------------------------------------------------------------------------------------------
def _start(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _wait_for_log(run: Path, lines: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        log = run / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not log in time")


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_75(teacher_path, tmp_path):
    run = tmp_path / "run"
    proc = _start(["-m", "fdistill", "distill", "--teacher", str(teacher_path), "--out", str(run), "--no-progress",
                   "--device", "cpu", "distill.iterations=100000", *TINY, *DISTILL])
    _wait_for_log(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "stopped by a signal at iteration" in err and "--resume" in err
    newest = checkpoint.latest(run)
    stopped = int(newest.name)
    assert stopped >= 3 and len((run / "log.jsonl").read_text().splitlines()) <= stopped + 1
    assert cli.main(["distill", "--out", str(run), "--resume", "--no-progress", "--device", "cpu",
                     f"distill.iterations={stopped + 2}"]) == 0
    assert checkpoint.latest(run).name == f"{stopped + 2:09d}"


def test_under_torchrun_all_ranks_stop_at_the_same_step(teacher_path, tmp_path):
    """SIGTERM reaches one rank only: both stop after the same step, and rank 0 writes the checkpoint."""
    run = tmp_path / "run"
    proc = _start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fdistill", "distill",
                   "--teacher", str(teacher_path), "--out", str(run), "--no-progress", "--device", "cpu",
                   "distill.iterations=100000", *TINY, *DISTILL])
    _wait_for_log(run, 3, proc)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "fdistill"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers
    os.kill(max(pids), signal.SIGTERM)  # one of the two ranks
    _, err = proc.communicate(timeout=180)
    stops = re.findall(r"stopped by a signal at iteration (\d+)", err)
    newest = checkpoint.latest(run)
    assert len(stops) == 2 and len(set(stops)) == 1, err  # both ranks stop after the same step
    assert newest is not None and newest.name == f"{int(stops[0]):09d}", err  # written by rank 0 at that step


# -- bad input: one error line each, nothing half-written ---------------------------------------------------
def _fails_in_one_line(capsys, argv: list[str], match: str, code: int = 2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and match in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return err


def _image_folder(path: Path, n: int, size: int = 8, channels: int = 1, labels: bool = True) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size) if channels == 1 else (size, size, channels), dtype=np.uint8)
        Image.fromarray(arr).save(path / f"{i:03d}.png")
    if labels:
        (path / "dataset.json").write_text(json.dumps({"labels": [[f"{i:03d}.png", i % 10] for i in range(n)]}))
    return path


@pytest.fixture
def distill(teacher_path, tmp_path):
    def run(*extra: str, out: str = "run", teacher: Path | None = None) -> list[str]:
        return ["distill", "--teacher", str(teacher or teacher_path), "--out", str(tmp_path / out), "--no-progress",
                "--device", "cpu", "distill.iterations=2", *TINY, *DISTILL, *extra]
    return run


def test_bad_yaml_config(distill, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("distill:\n  lr: [1, 2\n")
    _fails_in_one_line(capsys, [*distill(), "--config", str(tmp_path / "bad.yaml")], "bad.yaml is not valid YAML")
    assert not (tmp_path / "run").exists()


def test_teacher_that_is_not_safetensors_or_is_truncated(distill, teacher_path, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    _fails_in_one_line(capsys, distill(teacher=tmp_path / "junk.safetensors"), "not a readable safetensors file")
    (tmp_path / "cut.safetensors").write_bytes(teacher_path.read_bytes()[: teacher_path.stat().st_size // 2])
    _fails_in_one_line(capsys, distill(teacher=tmp_path / "cut.safetensors"), "not a readable safetensors file")
    assert not (tmp_path / "run").exists()


def test_dataset_with_a_corrupt_image_or_missing_labels(distill, tmp_path, capsys):
    folder = _image_folder(tmp_path / "data", 12)
    (folder / "005.png").write_bytes(b"\x89PNG broken")
    _fails_in_one_line(capsys, distill(f"data={folder}"), "005.png: not an image format PIL can read")
    (folder / "005.png").unlink()
    _image_folder(tmp_path / "data2", 12)
    meta = json.loads((tmp_path / "data2" / "dataset.json").read_text())
    (tmp_path / "data2" / "dataset.json").write_text(json.dumps({"labels": meta["labels"][:-2]}))
    _fails_in_one_line(capsys, distill(f"data={tmp_path / 'data2'}"), "has no label for image")


def test_resolution_or_channel_mismatch_and_too_little_data(distill, tmp_path, capsys):
    _fails_in_one_line(capsys, distill(f"data={_image_folder(tmp_path / 'big', 12, size=16)}"),
                       "big has 1x16x16 (channels x height x width)")
    _fails_in_one_line(capsys, distill(f"data={_image_folder(tmp_path / 'rgb', 12, channels=3)}"),
                       "is for 1x8x8 images but")
    _fails_in_one_line(capsys, distill(f"data={_image_folder(tmp_path / 'few', 4)}"), "fewer than the batch of 8")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(distill, tmp_path, capsys, monkeypatch):
    assert cli.main(distill("distill.checkpoint_every=1", "distill.iterations=1")) == 0
    real, calls = checkpoint.save_file, [0]

    def full_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    err = _fails_in_one_line(capsys, distill("distill.checkpoint_every=1", "distill.iterations=3", "--resume"),
                             "writing checkpoint")
    assert "No space left on device" in err and "earlier checkpoints are untouched" in err
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["000000001"]  # no temporary folder left
    checkpoint.load_weights(run, "generator")  # still complete and verified


def test_a_folder_holding_another_run_and_resuming_with_changes(distill, tmp_path, capsys):
    assert cli.main(distill()) == 0
    capsys.readouterr()
    err = _fails_in_one_line(capsys, distill(), "holds a distill run, newest checkpoint at iteration 2")
    assert "--resume" in err and "--overwrite" in err
    _fails_in_one_line(capsys, distill("disc_hidden=16", "--resume"), "disc_hidden: 8 -> 16")
    _fails_in_one_line(capsys, distill("distill.divergence=forward_kl", "--resume"),
                       "distill.divergence: 'js' -> 'forward_kl'")
    assert cli.main(distill("distill.iterations=4", "--resume")) == 0  # more iterations: allowed
    assert "resuming at iteration 2" in capsys.readouterr().out
    assert checkpoint.latest(tmp_path / "run").name == "000000004"
    assert cli.main(distill("--overwrite")) == 0
    assert checkpoint.latest(tmp_path / "run").name == "000000002"


def test_what_a_resume_may_change_is_marked_on_the_config_fields():
    """The fields marked resumable are exactly the keys the resume policy allowed when it was a list of names, and
    memory_check (a resumed run on another GPU may switch the prediction off)."""
    assert cli.resumable("distill") == {f"distill.{k}" for k in (
        "iterations", "log_every", "checkpoint_every", "keep_checkpoints", "micro_batch", "precision", "tf32",
        "channels_last", "compile", "lr", "lr_critic", "lr_stages", "memory_check")}
    assert cli.resumable("train-teacher") == {f"teacher.{k}" for k in (
        "iterations", "log_every", "checkpoint_every", "keep_checkpoints")}


def test_resumable_keys_walk_nested_dataclasses():
    from dataclasses import dataclass, field

    from fdistill.config import resumable, resumable_keys

    @dataclass
    class Inner:
        steps: int = resumable(3)
        width: int = 8

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        maybe: Inner | None = None
        name: str = resumable("a")
        size: int = 1

    assert resumable_keys(Outer) == {"inner.steps", "maybe.steps", "name"}
    assert resumable_keys(Outer, "inner") == {"inner.steps"}
    assert Outer().inner.steps == 3 and Outer().name == "a"
    with pytest.raises(KeyError, match="no field 'nope'"):
        resumable_keys(Outer, "nope")
    with pytest.raises(KeyError, match="size is a value"):
        resumable_keys(Outer, "size")


def test_resume_without_a_checkpoint_starts_at_zero(distill, tmp_path, capsys):
    assert cli.main(distill()) == 0
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    capsys.readouterr()
    assert cli.main(distill("--resume")) == 0
    assert "has no complete checkpoint: starting at iteration 0" in capsys.readouterr().out
    _fails_in_one_line(capsys, distill("--resume", out="nothing"), "nothing to resume")


def test_unknown_override_suggests_the_key_and_names_the_override(distill, capsys):
    err = _fails_in_one_line(capsys, distill("distill.iteratons=5"), "did you mean 'distill.iterations'?")
    assert "override distill.iteratons=5" in err and "digits.yaml" not in err
    err = _fails_in_one_line(capsys, distill("distill.divergence=kl"), "unknown divergence 'kl'")
    assert err.endswith("(in the override distill.divergence=kl)"), err  # not the preset's name
