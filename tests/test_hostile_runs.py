"""Hostile and careless inputs to run folders and output folders: nothing of the user's deleted, a replaced run
kept until the new one has started, no file written through a planted link, and YAML that cannot hang the CLI.
Each refusal is exit status 2 and one line."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from tiny import DISTILL, TINY

from fdistill.apps import cli, png_shards
from fdistill.training import checkpoint
from fdistill.training.distiller import Distiller
from fdistill.training.teacher_training import TeacherTrainer


def _fails_in_one_line(capsys, argv: list[str], match: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and match in err, err
    assert len(err.splitlines()) == 1, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 4, 7: sample --out deletes only fdistill's own shards, and writes through no link ------------------------
@pytest.fixture
def sample(teacher_path, tmp_path):
    def argv(*extra: str, out: Path | None = None) -> list[str]:
        return ["sample", "--teacher", str(teacher_path), "--steps", "2", "--num-samples", "6", "--shard", "2",
                "--grid-size", "6", "--no-progress", "--device", "cpu", "--out", str(out or tmp_path / "out"), *extra]
    return argv


def test_a_foreign_out_is_refused_and_nothing_of_it_deleted(sample, tmp_path, capsys):
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    (images / "holiday.jpg").write_bytes(b"the user's photo")
    err = _fails_in_one_line(capsys, sample(), f"{images} holds holiday.jpg")
    assert "pick an empty or new --out" in err and "yourself" in err
    assert (images / "holiday.jpg").read_bytes() == b"the user's photo"
    assert sorted(p.name for p in images.iterdir()) == ["holiday.jpg"]  # no request.json, no shard added
    # a folder of shards without fdistill's request.json is not fdistill's either
    (images / "holiday.jpg").unlink()
    (images / "shard-000000").mkdir()
    (images / "shard-000000" / "00000000.png").write_bytes(b"someone's png")
    _fails_in_one_line(capsys, sample(), "it has no request.json of fdistill's")
    assert (images / "shard-000000" / "00000000.png").read_bytes() == b"someone's png"
    # nor is a link in place of images/
    shutil.rmtree(images)
    (tmp_path / "elsewhere").mkdir()
    images.symlink_to(tmp_path / "elsewhere")
    _fails_in_one_line(capsys, sample(), f"{images} is a link")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_changed_request_replaces_only_fdistills_shards(sample, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(sample()) == 0
    images = out / "images"
    first = _snapshot(images)
    assert sorted(p.name for p in images.iterdir()) == ["request.json", "shard-000000", "shard-000001", "shard-000002"]
    assert json.loads((images / "shard-000001" / "shard.json").read_text()) == {"images": ["00000002.png",
                                                                                           "00000003.png"]}
    (out / "notes.txt").write_text("mine")  # beside images/: not fdistill's to touch
    partial = images / ".shard-000007.tmp-12345"  # a stopped process's partial shard: fdistill's
    partial.mkdir()
    (partial / "shard.json").write_text(json.dumps({"images": ["00000014.png"]}))
    (partial / "00000014.png").write_bytes(b"half")
    capsys.readouterr()
    assert cli.main(sample("--seed", "1", "--num-samples", "2")) == 0
    assert "replacing images of another request (seed: 0 -> 1" in capsys.readouterr().out
    assert sorted(p.name for p in images.iterdir()) == ["request.json", "shard-000000"]
    assert _snapshot(images)["shard-000000/00000000.png"] != first["shard-000000/00000000.png"]
    assert (out / "notes.txt").read_text() == "mine"
    # a user's file inside fdistill's shard folder: the folder is refused, nothing deleted
    (images / "shard-000000" / "notes.txt").write_text("mine too")
    kept = _snapshot(images)
    err = _fails_in_one_line(capsys, sample("--seed", "2"), "shard-000000/notes.txt; fdistill did not write them")
    assert "remove" in err
    assert _snapshot(images) == kept


def test_evaluate_t2i_scores_are_fdistills_but_a_listed_name_must_be_a_shard_image(tmp_path, capsys):
    """evaluate-t2i's folder (the same claim): its per-shard scores go with the shard; a manifest listing a
    name fdistill never writes does not make that file fdistill's."""
    import torch

    def make(items, seeds):
        return torch.zeros(len(items), 3, 4, 4)

    folder = png_shards.claim(tmp_path / "images", {"checkpoint": "c", "seed": 0, "shard": 2}, ["a", "b", "c"])
    png_shards.generate_shards(make, ["a", "b", "c"], folder, 2, 0, 0, 1, progress=False)
    (folder / "shard-000000" / "scores.safetensors").write_bytes(b"scores")
    (folder / "shard-000000" / ".scores.tmp-7").write_bytes(b"half")
    png_shards.claim(folder, {"checkpoint": "c", "seed": 1, "shard": 2}, ["a", "b", "c"])
    assert [p.name for p in folder.iterdir()] == ["request.json"]
    capsys.readouterr()
    png_shards.generate_shards(make, ["a", "b", "c"], folder, 2, 0, 0, 1, progress=False)
    forged = folder / "shard-000001"
    (forged / "shard.json").write_text(json.dumps({"images": ["00000002.png", "thesis.tex"]}))
    (forged / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds shard-000001; fdistill did not write them"):
        png_shards.claim(folder, {"checkpoint": "c", "seed": 2, "shard": 2}, ["a", "b", "c"])
    assert (forged / "thesis.tex").read_text() == "years of work" and (folder / "shard-000000").is_dir()


def test_shard_writes_do_not_follow_a_planted_link(tmp_path):
    folder = png_shards.claim(tmp_path / "images", {"model": "m", "seed": 0, "shard": 2}, [0, 1])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "precious").write_text("keep")
    (folder / f".shard-000000.tmp-{os.getpid()}").symlink_to(scratch)  # where the shard is written first
    import numpy as np
    import torch

    def make(items, seeds):
        return torch.zeros(len(items), 1, 4, 4)

    png_shards.generate_shards(make, [0, 1], folder, 2, 0, 0, 1, progress=False)
    assert sorted(p.name for p in scratch.iterdir()) == ["precious"] and (scratch / "precious").read_text() == "keep"
    shard = folder / "shard-000000"
    assert shard.is_dir() and not shard.is_symlink()
    index, images = png_shards.read_shard(shard)
    assert index == [0, 1] and images.shape == (2, 1, 4, 4) and np.all(images == 128)
    # request.json planted as a link to a user's file: not fdistill's, so neither followed nor replaced
    request = folder / "request.json"
    request.unlink()
    (scratch / "mine.json").write_text("{}")
    request.symlink_to(scratch / "mine.json")
    shutil.rmtree(shard)
    with pytest.raises(ValueError, match="holds request.json; it has no request.json of fdistill's"):
        png_shards.claim(folder, {"model": "m", "seed": 1, "shard": 2}, [0, 1])
    assert (scratch / "mine.json").read_text() == "{}" and request.is_symlink()


# -- 5: --overwrite recognizes a run by its config.yaml and keeps it until the new run has started -----------
@pytest.fixture
def teacher_run(teacher_path, tmp_path):
    """A copy of the session's teacher run folder (config.yaml, log.jsonl, checkpoints/, teacher.safetensors)."""
    run = tmp_path / "run"
    shutil.copytree(teacher_path.parent, run)
    return run


def _train(out: Path, *extra: str) -> list[str]:
    return ["train-teacher", "--out", str(out), "--no-progress", "--device", "cpu", "teacher.iterations=1", *TINY,
            *extra]


def test_a_folder_with_run_files_but_no_config_is_refused_not_deleted(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "000000004").mkdir(parents=True)
    (out / "checkpoints" / "000000004" / "model.safetensors").write_bytes(b"weights")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_bytes(b"events")
    (out / "log.jsonl").write_text("{}\n")
    before = _snapshot(out)
    for extra in ((), ("--overwrite",)):
        err = _fails_in_one_line(capsys, _train(out, *extra), "holds log.jsonl, checkpoints, tensorboard but no "
                                 "config.yaml of an fdistill run")
        assert "pick an empty --out" in err
        assert _snapshot(out) == before
    # a config.yaml that is not a run record: not a run either
    (out / "config.yaml").write_text("distill:\n  lr: 0.1\n")
    _fails_in_one_line(capsys, _train(out, "--overwrite"), "is not a run record")
    assert _snapshot(out) == {**before, "config.yaml": b"distill:\n  lr: 0.1\n"}


@pytest.mark.parametrize("failing", ["data", "batch_size", "first_step"])
def test_overwrite_with_a_start_that_fails_keeps_the_old_run(teacher_run, tmp_path, capsys, monkeypatch, failing):
    before = _snapshot(teacher_run)
    assert "config.yaml" in before and any(k.startswith("checkpoints/") for k in before)
    extra, match = {"data": ([f"data={tmp_path / 'missing'}"], "missing not found"),
                    "batch_size": (["teacher.batch_size=0"], "batch_size must be a positive integer"),
                    "first_step": ([], "out of patience")}[failing]
    if failing == "first_step":  # everything opens; the first step fails: the start is undone
        def step(self):
            raise ValueError("out of patience")
        monkeypatch.setattr(TeacherTrainer, "step", step)
    _fails_in_one_line(capsys, _train(teacher_run, "--overwrite", *extra), match)
    assert _snapshot(teacher_run) == before  # the old run as it was: nothing new beside it, nothing aside
    assert sorted(p.name for p in teacher_run.iterdir()) == sorted({k.split("/")[0] for k in before})


def test_overwrite_replaces_the_old_run_once_the_new_one_has_started(teacher_run, capsys):
    old = yaml.safe_load((teacher_run / "config.yaml").read_text())["config"]["teacher"]
    assert old["iterations"] == 3
    assert cli.main(_train(teacher_run, "--overwrite", "teacher.seed=7")) == 0
    new = yaml.safe_load((teacher_run / "config.yaml").read_text())["config"]["teacher"]
    assert (new["iterations"], new["seed"]) == (1, 7)
    assert [p.name for p in (teacher_run / "checkpoints").iterdir()] == ["000000001"]
    assert not [p for p in teacher_run.iterdir() if p.name.startswith(".replaced-")]


def test_distill_overwrite_that_fails_in_its_first_step_keeps_the_old_run(teacher_path, tmp_path, capsys,
                                                                          monkeypatch):
    argv = ["distill", "--teacher", str(teacher_path), "--out", str(tmp_path / "run"), "--no-progress", "--device",
            "cpu", "distill.iterations=1", *TINY, *DISTILL]
    assert cli.main(argv) == 0
    before = _snapshot(tmp_path / "run")

    def step(self):
        raise ValueError("out of patience")

    monkeypatch.setattr(Distiller, "step", step)
    _fails_in_one_line(capsys, [*argv, "--overwrite", "disc_hidden=16"], "out of patience")
    assert _snapshot(tmp_path / "run") == before
    assert checkpoint.latest(tmp_path / "run").name == "000000001"


# -- a start that fails on its data is not a run --------------------------------------------------------------
def test_a_start_that_fails_leaves_no_config_so_the_rerun_is_accepted(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README").write_text("mine")
    missing = f"data={tmp_path / 'missing'}"
    _fails_in_one_line(capsys, _train(out, missing), "missing not found")
    assert sorted(p.name for p in out.iterdir()) == ["README"]
    _fails_in_one_line(capsys, _train(out, missing), "missing not found")  # not "holds a run": accepted

    def step(self):
        raise ValueError("out of patience")

    monkeypatch.setattr(TeacherTrainer, "step", step)  # config.yaml written, then the first step fails
    _fails_in_one_line(capsys, _train(out), "out of patience")
    assert sorted(p.name for p in out.iterdir()) == ["README"]


# -- 8: YAML that would expand, nest or weigh without bound ---------------------------------------------------
def _laughs() -> str:
    """327 characters that expand into 9^9 values once the aliases are copied."""
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "{" + ", ".join(levels) + "}"


def test_a_yaml_alias_bomb_is_refused_as_an_override_and_in_a_file(tmp_path, capsys):
    bomb = _laughs()
    for argv in (["distill", "--print-config"], ["train-teacher", "--out", str(tmp_path / "t"), "--device", "cpu"]):
        err = _fails_in_one_line(capsys, [*argv, f"teacher.network={bomb}"], "anchors and aliases")
        assert "override 'teacher.network=" in err and len(err) < 400
    (tmp_path / "bomb.yaml").write_text(f"teacher:\n  network: {bomb}\n")
    _fails_in_one_line(capsys, ["distill", "--print-config", "--config", str(tmp_path / "bomb.yaml")],
                       "bomb.yaml is not valid YAML: YAML anchors and aliases")
    # a run folder's config.yaml is read the same way (--resume, --config RUN)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"run: {{command: train-teacher}}\nconfig:\n  teacher:\n    network: {bomb}\n")
    _fails_in_one_line(capsys, ["train-teacher", "--out", str(run), "--resume"], "anchors and aliases")
    assert not (tmp_path / "t").exists()


def test_yaml_nested_too_deeply_or_too_large_is_refused(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("teacher:\n  network: {a: " + "[" * 5000 + "]" * 5000 + "}\n")
    _fails_in_one_line(capsys, ["distill", "--print-config", "--config", str(deep)], "nested more than 100 levels")
    _fails_in_one_line(capsys, ["distill", "--print-config", "teacher.network=" + "{a: " * 5000 + "1" + "}" * 5000],
                       "nested more than 100 levels")
    big = tmp_path / "big.yaml"
    big.write_text("distill:\n  iterations: 5\n" + "# padding\n" * 110_000)  # 1.1 MB, valid YAML
    _fails_in_one_line(capsys, ["distill", "--print-config", "--config", str(big)],
                       "fdistill reads YAML configs of at most 1048576 bytes")
