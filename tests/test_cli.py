"""One set of CLI conventions: run folders that explain themselves, folders for every --out, options that
exist where they matter and are refused where they do not, and `evaluate` that checks what it is given."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from tiny import DISTILL, TINY

from fdistill import __version__
from fdistill.apps import cli
from fdistill.training import checkpoint


def test_version_presets_and_help_show_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fdistill {__version__}"
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    presets = ["cifar10", "digits", "fastgen", "flux", "imagenet64", "qwen_image", "sana", "sd15", "sd35", "sdxl",
               "toy2d", "wan"]
    assert [line.split()[0] for line in lines] == presets
    assert all(len(line.split()) > 3 for line in lines)  # one line of description each
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 1000)" in help_text and "(default: 0)" in help_text and "(default: None)" not in help_text


def test_print_config_shows_the_resolved_config(capsys):
    assert cli.main(["distill", "--print-config", "distill.iterations=7", "--seed", "3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["distill"]["iterations"] == 7 and cfg["distill"]["seed"] == 3 and cfg["data"] == "digits"
    assert cli.main(["demo", "--print-config", "runs=[js]"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["runs"] == ["js"]


def test_overrides_anywhere_and_junk_refused(capsys):
    assert cli.main(["distill", "distill.lr=0.5", "--print-config", "distill.tau=3", "--seed", "1",
                     "disc_hidden=4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["distill"]["lr"], cfg["distill"]["tau"], cfg["disc_hidden"]) == (0.5, 3, 4)
    with pytest.raises(SystemExit):
        cli.main(["distill", "--print-config", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_run_folder_records_its_config_and_resume_needs_only_the_changes(teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["distill", "--teacher", str(teacher_path.parent), "--out", str(run), "--no-progress", "--device", "cpu"]
    assert cli.main([*base, "distill.iterations=2", "distill.divergence=fkl", *TINY, *DISTILL]) == 0  # a folder
    out = capsys.readouterr().out
    assert "divergence forward_kl (forward-KL)" in out  # the alias resolved and echoed
    assert f"wrote {run}/checkpoints/000000002" in out and "log.jsonl" in out and "Next: fdistill sample" in out
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["run"]["command"] == "distill" and record["run"]["teacher"] == str(teacher_path.parent.resolve())
    assert record["config"]["data"] == "digits" and record["config"]["disc_hidden"] == 8
    # --resume takes the teacher, data and every earlier override from the folder: only the change is typed
    assert cli.main(["distill", "--out", str(run), "--resume", "--no-progress", "--device", "cpu",
                     "distill.iterations=4"]) == 0
    assert checkpoint.read_meta(run)["iteration"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["config"]["distill"]["iterations"] == 4
    assert cli.main(["distill", "--out", str(run), "--resume", "--config", "digits"]) == 2
    assert "give changes as key=value overrides" in capsys.readouterr().err
    # a run folder is a config too: a new run with the same settings
    assert cli.main(["distill", "--config", str(run), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["distill"]["divergence"] == "fkl"


def test_train_teacher_is_a_run_like_distill(tmp_path, capsys):
    run = tmp_path / "teacher"
    base = ["train-teacher", "--out", str(run), "--no-progress", "--device", "cpu", *TINY]
    assert cli.main([*base, "teacher.iterations=2", "teacher.checkpoint_every=1", "teacher.log_every=1"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000000001", "000000002"]
    assert [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "samples.png").stat().st_size > 1000 and (run / "teacher.safetensors").is_file()
    assert "Next: fdistill distill --teacher" in capsys.readouterr().out
    assert cli.main(base) == 2
    assert "holds a train-teacher run, newest checkpoint at iteration 2" in capsys.readouterr().err
    assert cli.main(["train-teacher", "--out", str(run), "--resume", "--no-progress", "--device", "cpu",
                     "teacher.iterations=3"]) == 0
    assert "resuming" in capsys.readouterr().out and checkpoint.read_meta(run)["iteration"] == 3
    assert cli.main(["train-teacher", "--out", str(run), "--resume", "teacher.network.model_channels=4"]) == 2
    assert "teacher.network.model_channels: 8 -> 4" in capsys.readouterr().err


def test_sample_refuses_options_it_would_ignore_and_writes_a_folder(teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(run), "--no-progress",
                     "distill.iterations=2", *TINY, *DISTILL]) == 0
    assert cli.main(["sample", "--checkpoint", str(run), "--steps", "4", "--guidance", "2"]) == 2
    assert "--steps and --guidance apply to --teacher sampling" in capsys.readouterr().err
    newest = run / "checkpoints" / "000000002"
    assert cli.main(["sample", "--checkpoint", str(newest), "--num-samples", "12", "--seed", "5"]) == 0  # checkpoint
    assert (run / "samples" / "samples.npz").is_file() and (run / "samples" / "grid.png").is_file()
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "nothing is there" in capsys.readouterr().err


def test_sample_in_shards_resumes_replaces_and_equals_a_two_process_run(teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(run), "--no-progress",
                     "distill.iterations=2", *TINY, *DISTILL]) == 0
    args = ["sample", "--checkpoint", str(run), "--num-samples", "10", "--shard", "4", "--batch", "3", "--no-progress"]

    def samples(out):
        with np.load(out / "samples.npz") as f:
            return f["images"], f["labels"]

    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    images, labels = samples(tmp_path / "a")
    assert images.shape == (10, 1, 8, 8) and labels.tolist() == [i % 10 for i in range(10)]
    shards = sorted((tmp_path / "a" / "images").glob("shard-*"))
    assert [len(list(s.glob("*.png"))) for s in shards] == [4, 4, 2]
    # a stopped run continues with the shards it lacks; the others are not rewritten
    kept = shards[0].stat().st_mtime_ns
    for f in shards[1].iterdir():  # its PNGs and shard.json
        f.unlink()
    shards[1].rmdir()
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert np.array_equal(samples(tmp_path / "a")[0], images) and shards[0].stat().st_mtime_ns == kept
    # another request replaces the images instead of mixing them in
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert "replacing images of another request (seed: 0 -> 1)" in capsys.readouterr().out
    assert not np.array_equal(samples(tmp_path / "a")[0], images)
    # two torchrun processes share the shards and give the same samples as one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc, out in ((1, "one"), (2, "two")):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", "fdistill", *args, "--out", str(tmp_path / out),
                              "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    assert np.array_equal(samples(tmp_path / "one")[0], samples(tmp_path / "two")[0])


def _digits_like(n: int) -> np.ndarray:
    from fdistill.data.datasets import load_dataset

    return load_dataset("digits").images[:n]


def test_evaluate_reads_other_layouts_and_warns_about_scale_and_size(tmp_path, capsys):
    images = _digits_like(300)
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "adm.npz", arr_0=images.transpose(0, 2, 3, 1))  # ADM's NHWC arr_0
    np.savez(tmp_path / "unit.npz", images=images.astype(np.float32) / 255)  # floats in [0, 1]
    results = {}
    for name in ("a.npy", "adm.npz", "unit.npz"):
        assert cli.main(["evaluate", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")]) == 0
        captured = capsys.readouterr()
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert "FID from 300 samples is biased" in captured.err
    assert "read as NHWC" not in captured.err
    assert results["a.npy"]["fid"] == pytest.approx(results["adm.npz"]["fid"])  # the same images, either layout
    assert results["unit.npz"]["fid"] == pytest.approx(results["a.npy"]["fid"], abs=0.5)  # rescaled, not garbage
    cli.main(["evaluate", str(tmp_path / "unit.npz")])
    assert "read as [0, 1] (x 255)" in capsys.readouterr().err
    np.savez(tmp_path / "nhwc.npz", images=images.transpose(0, 2, 3, 1))
    cli.main(["evaluate", str(tmp_path / "nhwc.npz")])
    assert "read as NHWC" in capsys.readouterr().err
    np.savez(tmp_path / "odd.npz", pictures=images)
    assert cli.main(["evaluate", str(tmp_path / "odd.npz")]) == 2
    assert "no 'images' (fdistill) or 'arr_0' (ADM) array" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an array")
    assert cli.main(["evaluate", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "neither .npy nor .npz data" in err and "allow_pickle" not in err and "Traceback" not in err


def test_logging_counts_iterations_and_always_logs_the_last(teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(run), "distill.iterations=7",
                     "distill.log_every=3", *TINY, "distill.batch_size=8", "distill.tau=2"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log] == [0, 3, 6]  # every 3 iterations; 6 is also the last
    assert all("loss_gan_d" in e for e in log[1:])  # each line holds the latest value of every quantity
    out = capsys.readouterr().out  # pytest's stderr is no terminal: plain status lines replace the bar
    assert "iteration 7/7" in out

