"""Text-to-image evaluation (evaluate-t2i: sharded, resumable, the same on 1 or 2 processes, stand-ins
labelled) and Fig. 6 (analyze-run) on tiny runs: the 2-D lab, digits, a tiny Stable Diffusion."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import DISTILL, TINY

from fdistill.apps import cli

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import t2i_pipelines  # noqa: E402

from fdistill.apps.evaluate_t2i import save_stand_in  # noqa: E402
from fdistill.evaluation.clip import CLIP  # noqa: E402
from fdistill.evaluation.dino import DINOViT  # noqa: E402
from fdistill.io import sha256  # noqa: E402

CLIP_TINY = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
DINO_TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 32}
RUN = ["disc_resolutions=[4]", "disc_hidden=8", "guidance=1.75", "distill.batch_size=4", "distill.tau=2",
       "distill.iterations=2", "distill.sigmas.schedule=scaled_linear", "distill.sigmas.index_range=[1, 999]",
       "distill.r1_form=approx"]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = t2i_pipelines.sd15(root / "sd15")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a thing number {i}")
    assert cli.main(["distill", "--teacher", str(pipe), "--out", str(root / "run"), "--no-progress",
                     f"data={data}", *RUN]) == 0
    (root / "prompts.txt").write_text("".join(f"a photo of object {i}\n" for i in range(6)))
    torch.manual_seed(0)
    clip = save_stand_in(CLIP(CLIP_TINY), "clip", CLIP_TINY, root / "clip.safetensors")
    dino = save_stand_in(DINOViT(**DINO_TINY), "dino", DINO_TINY, root / "dino.safetensors")
    return root, clip, dino


def evaluate_args(root, clip, dino, out, *extra):
    return ["evaluate-t2i", "--checkpoint", str(root / "run"), "--prompts", str(root / "prompts.txt"), "--ref",
            "digits", "--clip", str(clip), "--dino", str(dino), "--group", "2", "--shard", "4", "--batch", "4",
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def test_evaluate_t2i_reports_every_metric_labels_stand_ins_and_resumes(t2i_run, tmp_path, capsys, monkeypatch):
    root, clip, dino = t2i_run
    assert cli.main(evaluate_args(root, clip, dino, tmp_path / "eval")) == 0
    out = capsys.readouterr().out
    assert "random stand-in CLIP" in out and "random stand-in DINO" in out and "digits-FID" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 12 and metrics["images_per_prompt"] == 2
    assert np.isfinite(metrics["fid"]) and -1 <= metrics["clip_score"] <= 1
    assert -1 <= metrics["in_batch_similarity"] <= 1
    shards = sorted((tmp_path / "eval" / "images").glob("shard-*"))
    assert [len(list(s.glob("*.png"))) for s in shards] == [4, 4, 4]
    # a stopped evaluation resumes: nothing is generated or scored twice
    os.remove(shards[2] / "scores.safetensors")
    from fdistill.apps import evaluate_t2i, t2i

    monkeypatch.setattr(t2i, "image_maker", lambda *a, **k: pytest.fail("a finished shard was regenerated"))
    scored = []
    real_score = evaluate_t2i.score_shards

    def count(folder, *args, **kwargs):
        scored.extend(s.name for s in folder.glob("shard-*") if not (s / "scores.safetensors").is_file())
        return real_score(folder, *args, **kwargs)

    monkeypatch.setattr(evaluate_t2i, "score_shards", count)
    monkeypatch.setattr(t2i, "image_maker", lambda *a, **k: (lambda prompts, seeds: pytest.fail("regenerated")))
    assert cli.main(evaluate_args(root, clip, dino, tmp_path / "eval")) == 0
    assert scored == [shards[2].name]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["fid"] == pytest.approx(metrics["fid"]) and again["clip_score"] == pytest.approx(metrics["clip_score"])


def test_evaluate_t2i_on_two_processes_equals_one(t2i_run, tmp_path):
    root, clip, dino = t2i_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs, so the same float rounding
    for nproc, out in ((1, "one"), (2, "two")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "fdistill", *evaluate_args(root, clip, dino, tmp_path / out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("fid", "clip_score", "in_batch_similarity"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    a = np.asarray(Image.open(tmp_path / "one" / "images" / "shard-000001" / "00000005.png"))
    b = np.asarray(Image.open(tmp_path / "two" / "images" / "shard-000001" / "00000005.png"))
    assert np.array_equal(a, b)


def test_evaluate_t2i_missing_weights_stop_before_any_image(t2i_run, tmp_path, capsys, monkeypatch):
    root, clip, _ = t2i_run
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "empty"))
    args = ["evaluate-t2i", "--checkpoint", str(root / "run"), "--prompts", str(root / "prompts.txt"),
            "--clip", str(tmp_path / "nowhere"), "--out", str(tmp_path / "eval"), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "open_clip ViT-g-14" in err and "laion/CLIP-ViT-g-14" in err and "fdistill does not download" in err
    assert not (tmp_path / "eval" / "images").exists()


def test_analyze_run_on_the_2d_lab(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress", "teacher.steps=40", "teacher.hidden=16",
                     "distill.iterations=20", "distill.batch_size=128", "runs=[forward_kl, reverse_kl]",
                     "num_eval=200"]) == 0
    assert cli.main(["analyze-run", str(tmp_path / "forward_kl"), "--num-samples", "512"]) == 0
    out = capsys.readouterr().out
    assert "forward_kl" in out and "Spearman" in out
    result = json.loads((tmp_path / "forward_kl" / "analysis" / "fig6.json").read_text())
    assert len(result["spearman"]) >= 5 and all(-1 <= v <= 1 for v in result["spearman"].values())
    assert (tmp_path / "forward_kl" / "analysis" / "fig6.png").stat().st_size > 10_000
    assert cli.main(["analyze-run", str(tmp_path / "reverse_kl"), "--num-samples", "256"]) == 0
    assert "constant" in capsys.readouterr().out  # h = 1: nothing to correlate


def test_analyze_run_on_digits_and_text_to_image(teacher_path, t2i_run, tmp_path, capsys):
    run = tmp_path / "digits"
    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(run), "--no-progress",
                     "distill.iterations=2", "distill.divergence=js", *TINY, *DISTILL]) == 0
    assert cli.main(["analyze-run", str(run), "--num-samples", "64"]) == 0
    assert (run / "analysis" / "fig6.png").is_file()
    root, _, _ = t2i_run
    assert cli.main(["analyze-run", str(root / "run"), "--num-samples", "16", "--out", str(tmp_path / "sd")]) == 0
    assert (tmp_path / "sd" / "fig6.png").is_file() and "js" in capsys.readouterr().out


def test_coco_style_reference_folder_is_cropped_resized_and_cached(t2i_run, tmp_path, monkeypatch, capsys):
    """A reference folder of images of any size (as COCO val2014): center crop, LANCZOS 256, Inception
    (here a TorchScript stand-in), statistics cached for the next evaluation."""
    from test_inception import StandIn

    root, clip, _ = t2i_run
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.jit.script(StandIn()).save(str(cache / "inception-2015-12-05.pt"))
    monkeypatch.setenv("FDISTILL_CACHE", str(cache))
    monkeypatch.setenv("FDISTILL_INCEPTION_SHA256", sha256(cache / "inception-2015-12-05.pt"))  # a verified copy
    ref = tmp_path / "val2014"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (30, 30), (50, 70), (45, 45)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(ref / f"COCO_{i}.jpg")
    args = ["evaluate-t2i", "--checkpoint", str(root / "run"), "--prompts", str(root / "prompts.txt"), "--ref",
            str(ref), "--no-progress", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "Inception FID (inception-2015-12-05.pt), 256-px center crops" in capsys.readouterr().out
    stats = list((cache / "fid-stats").glob("val2014-256-*.npz"))
    assert len(stats) == 1
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())["fid"]
    assert np.isfinite(first)
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0  # the reference from the cache this time
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["fid"] == pytest.approx(first)


def test_a_few_step_student_is_distilled_sampled_evaluated_and_analyzed(t2i_run, tmp_path, capsys):
    """A 4-step Stable Diffusion student (forward input: real latents noised to each level, with their captions)
    through the CLI: sample in its 4 steps and in 2, evaluate-t2i names its NFE, analyze-run draws Fig. 6."""
    root, clip, dino = t2i_run
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(root / "sd15"), "--out", str(run), "--no-progress",
                     f"data={root / 'data'}", *RUN, "distill.student_steps=4", "distill.student_input=forward",
                     "distill.student_sampler=ode", "distill.divergence=js"]) == 0
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red thing", "--out", str(tmp_path / "s4")]) == 0
    assert "4 network calls" in capsys.readouterr().out
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red thing", "--student-steps", "2",
                     "--out", str(tmp_path / "s2")]) == 0
    assert "2 network calls" in capsys.readouterr().out
    four, two = (np.asarray(Image.open(tmp_path / s / "000000.png")) for s in ("s4", "s2"))
    assert four.shape == two.shape and not np.array_equal(four, two)
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "x", "--student-steps", "3"]) == 2
    assert "--student-steps 3: this student was trained at 4 noise levels" in capsys.readouterr().err
    args = evaluate_args(root, clip, dino, tmp_path / "eval")
    args[args.index("--checkpoint") + 1] = str(run)
    assert cli.main(args) == 0
    assert "student (4 NFE)" in capsys.readouterr().out
    assert cli.main(["analyze-run", str(run), "--num-samples", "16", "--out", str(tmp_path / "fig6")]) == 0
    assert (tmp_path / "fig6" / "fig6.png").is_file()
