"""A Wan text-to-video teacher through the command line, on a tiny random WanPipeline (tests/wan_pipelines.py) and
tiny clips made here with PyAV: prepare-latents from captioned clips (a corrupt clip skipped in one line), two
iterations of distillation from those shards, sample (MP4s that decode to the teacher's frames and size, PNG frame
strips, a grid), export of the one-step student as a WanPipeline whose call gives sample's frames for the same seed,
resume bit-exact, bad inputs refused in one line; and the memory model's count for a real WanTransformer3DModel."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import wan_pipelines as wp  # noqa: E402
from test_memory_model import saved_bytes  # noqa: E402

from fdistill import memory  # noqa: E402
from fdistill.apps import cli  # noqa: E402
from fdistill.data.latent_shards import LatentShards  # noqa: E402

L = 16  # text tokens
OPTIONS = [f"teacher_options.num_frames={wp.FRAMES}", f"teacher_options.height={wp.HEIGHT}",
           f"teacher_options.width={wp.WIDTH}", f"teacher_options.max_sequence_length={L}"]
TINY = ["distill.batch_size=2", "distill.micro_batch=null", "distill.precision=fp32", "disc_hidden=8",
        "text.gradient_checkpointing=false", "distill.log_every=1"]
CAPTIONS = ["a red square moves right", "a green square, slowly", "blue light on a wall"]
PROMPTS = ["a red cat", "waves at night"]
PNG_LEVELS = 1  # exported pipeline vs fdistill sample's PNG frames: within one uint8 level (rounding of equal floats)


def encode_clip(frames: np.ndarray, fps: int = 16) -> bytes:
    """uint8 (n, h, w, 3) as H.264 MP4 bytes (CRF 0)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        with av.open(path, "w", format="mp4") as c:
            s = c.add_stream("libx264", rate=fps, options={"crf": "0"})
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for a in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            c.mux(s.encode())
        with open(path, "rb") as f:
            return f.read()


def moving_square(n: int, color, h: int = 40, w: int = 56) -> np.ndarray:
    frames = np.zeros((n, h, w, 3), np.uint8)
    for j in range(n):
        frames[j, 12:24, 2 * j:2 * j + 12] = color
    return frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return wp.wan21(tmp_path_factory.mktemp("wan") / "wan21")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three 8-frame clips at 16 fps (0.5 s: 5 frames need > 0.25 s) with captions, and a corrupt one."""
    root = tmp_path_factory.mktemp("clips")
    for i, (caption, color) in enumerate(zip(CAPTIONS, [(255, 0, 0), (0, 255, 0), (0, 0, 255)])):
        (root / f"clip{i}.mp4").write_bytes(encode_clip(moving_square(8, color)))
        (root / f"clip{i}.txt").write_text(caption)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (root / "broken.txt").write_text("a broken clip")
    return root


def _run(args, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def prepared(folder, clips, tmp_path_factory):
    """prepare-latents through the CLI (its output captured by hand: capsys is function-scoped)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("latents") / "shards"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["prepare-latents", "--teacher", str(folder), "--data", str(clips), "--out", str(out),
                       "--batch", "2", "--no-progress", "--device", "cpu", *OPTIONS])
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_prepare_latents_encodes_clips_and_skips_a_corrupt_one_in_one_line(prepared, folder, clips):
    from fdistill.teachers.open import open_teacher

    rc, out, stdout, stderr = prepared
    assert rc == 0, stderr
    assert f"wrote {out}; train from it with `fdistill distill --config wan --teacher {folder}" in stdout
    assert "teacher_options.num_frames=5" in stdout
    lines = [line for line in stderr.splitlines() if line]
    assert len(lines) == 1 and "broken.mp4" in lines[0] and "skipped" in lines[0], stderr
    shards = LatentShards(out)
    assert len(shards) == 3 and sorted(shards.caption(i) for i in range(3)) == sorted(CAPTIONS)
    latents, cond, caption = shards[0]
    assert tuple(latents.shape) == (16, 2, 4, 6) and tuple(cond["embeds"].shape) == (L, wp.TEXT_WIDTH)
    # the latents are the VAE's encoding of the clip read at 16 fps and cropped to 32 x 48 (its mean, up to sampling)
    from fdistill.data.video import read_clip

    teacher = open_teacher(folder, None, {"num_frames": 5, "height": 32, "width": 48, "max_sequence_length": L})
    key = shards.key(0)
    clip = read_clip(clips / key.rpartition(":")[2], 5, 16, (32, 48))
    with torch.no_grad():
        decoded = teacher.codec.decode(latents[None])
        again = teacher.codec.decode(teacher.codec.encode(clip[None], torch.Generator().manual_seed(0)))
    assert decoded.shape == (1, 3, 5, 32, 48)
    assert (decoded - again).abs().mean() < 0.05  # two samples of the same clip's latent distribution


@pytest.fixture(scope="module")
def run(prepared, folder, tmp_path_factory):
    """Two iterations of ``fdistill distill --config wan`` from the prepared shards."""
    import contextlib
    import io

    _, shards, _, _ = prepared
    out = tmp_path_factory.mktemp("runs") / "wan"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["distill", "--config", "wan", "--teacher", str(folder), "--out", str(out), "--no-progress",
                       "--device", "cpu", f"data={shards}", "distill.iterations=2", "distill.checkpoint_every=1",
                       *TINY, *OPTIONS])
    assert rc == 0, stderr.getvalue()
    return out


def test_distill_two_iterations_then_sample_writes_mp4s_strips_and_a_grid(run, tmp_path, capsys):
    assert (run / "checkpoints" / "000000002").is_dir()
    out = tmp_path / "samples"
    rc, stdout, err = _run(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                            "--out", str(out), "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "wrote 2 MP4s (5 frames of 32 x 48 at 16 fps)" in stdout and "one generator call" in stdout
    for i in range(2):
        with av.open(str(out / f"{i:06d}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            rate = c.streams.video[0].average_rate
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3) and rate == 16
        strip = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert strip.shape == (12 + 32, 5 * 49 - 1, 3)  # frame labels above; every frame of 5 (k = 1)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (12 + 2 * 33 - 1, 5 * 49 - 1, 3)
    lines = (out / "prompts.txt").read_text().splitlines()
    assert lines == [f"000000\t0\t{PROMPTS[0]}", f"000001\t1\t{PROMPTS[1]}"]


def test_export_round_trip_gives_samples_frames(run, tmp_path, capsys):
    """The exported WanPipeline's one-step call (the printed one) returns fdistill sample's frames for the same
    seed: the PNG strip's pixels within PNG_LEVELS uint8 levels."""
    from diffusers import WanPipeline

    rc, stdout, err = _run(["export", "--checkpoint", str(run), "--diffusers", str(tmp_path / "exported")], capsys)
    assert rc == 0, err
    call = ("(prompt, num_inference_steps=1, guidance_scale=1, height=32, width=48, num_frames=5, "
            "max_sequence_length=16)")
    assert f"WanPipeline.from_pretrained('{tmp_path / 'exported'}'){call}" in stdout
    assert "fdistill sample's video for the same seed" in stdout and stdout.count("\n") == 1
    samples = tmp_path / "samples"
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", PROMPTS[1], "--seed", "5", "--out",
                     str(samples), "--no-progress", "--device", "cpu"]) == 0
    pipe = WanPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        frames = pipe(PROMPTS[1], num_inference_steps=1, guidance_scale=1.0, height=32, width=48, num_frames=5,
                      max_sequence_length=L, generator=torch.Generator().manual_seed(5), output_type="np").frames[0]
    strip = np.asarray(Image.open(samples / "000000.png"))[12:].astype(int)
    for j in range(5):
        ours = strip[:, j * 49:j * 49 + 48]
        theirs = np.round(frames[j] * 255).astype(int)
        assert np.abs(ours - theirs).max() <= PNG_LEVELS, j


def test_resume_is_bit_exact(run, prepared, folder, tmp_path, capsys):
    """Two iterations, then --resume to three, equal three straight (the generator's and the EMA-less weights)."""
    from fdistill.training import checkpoint

    _, shards, _, _ = prepared
    straight = tmp_path / "straight"
    base = ["distill", "--config", "wan", "--teacher", str(folder), "--no-progress", "--device", "cpu",
            f"data={shards}", *TINY, *OPTIONS]
    assert cli.main([*base, "--out", str(straight), "distill.iterations=3", "distill.checkpoint_every=1"]) == 0
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run, resumed)
    assert cli.main(["distill", "--out", str(resumed), "--resume", "--no-progress", "--device", "cpu",
                     "distill.iterations=3"]) == 0, capsys.readouterr().err
    a = checkpoint.load_weights(straight / "checkpoints" / "000000003", "generator", "generator")
    b = checkpoint.load_weights(resumed / "checkpoints" / "000000003", "generator", "generator")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(args, capsys, *expected):
    rc, _, err = _run(args, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for text in expected:
        assert text in lines[0], lines[0]


def test_bad_inputs_are_refused_in_one_line(folder, clips, prepared, run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    (images / "a.txt").write_text("a black square")
    pl = ["prepare-latents", "--teacher", str(folder), "--out", str(tmp_path / "out"), "--no-progress",
          "--device", "cpu"]
    _one_line_error([*pl, "--data", str(images), *OPTIONS], capsys, f"no samples found in {images}",
                    "expected clips (mp4")
    _one_line_error([*pl, "--data", str(clips), *OPTIONS, "teacher_options.num_frames=6"], capsys,
                    "teacher_options.num_frames=6", "4n + 1 frames")
    good = tmp_path / "good"
    good.mkdir()
    for name in ("clip0.mp4", "clip0.txt"):
        (good / name).write_bytes((clips / name).read_bytes())
    _one_line_error([*pl, "--data", str(good), *OPTIONS, "teacher_options.num_frames=9", "--on-bad-data", "error"],
                    capsys, "clip0.mp4: is too short", "9 frames at 16 fps")
    _one_line_error([*pl, "--data", str(clips), *OPTIONS, "--resolution", "32"], capsys,
                    "a Wan teacher's video size is teacher_options.height, width and num_frames")
    _one_line_error([*pl, "--data", str(clips), *OPTIONS, "--fps", "0"], capsys, "--fps must be a positive number")
    _, shards, _, _ = prepared
    _one_line_error(["distill", "--config", "wan", "--teacher", str(folder), "--out", str(tmp_path / "r"),
                     "--device", "cpu", f"data={clips}", *TINY, *OPTIONS], capsys,
                    "a Wan teacher trains on latent shards of videos")
    _one_line_error(["distill", "--config", "wan", "--teacher", str(folder), "--out", str(tmp_path / "r2"),
                     "--device", "cpu", f"data={shards}", *TINY, *OPTIONS, "teacher_options.num_frames=9"], capsys,
                    "hold latents of shape (16, 2, 4, 6), but this Wan teacher's videos are (16, 3, 4, 6)")
    _one_line_error(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--device", "cpu"], capsys,
                    "a text-to-video model needs --prompt TEXT")


# -- the memory model on a real WanTransformer3DModel -----------------------------------------------------------------


def test_memory_model_counts_what_autograd_saves_for_a_wan_transformer(folder):
    """The meta-device count of Wan's passes equals what autograd saves on the CPU for the same (tiny) network, video
    and text length; a Wan folder is sized as it loads."""
    from diffusers import WanTransformer3DModel

    from fdistill.data.conditions import TextCondition
    from fdistill.teachers.families.wan import WanDenoiser

    config = json.loads((folder / "transformer" / "config.json").read_text())
    batch, video = 2, (wp.FRAMES, wp.HEIGHT, wp.WIDTH)
    subject = memory.meta_subject("wan", dict(config), tokens=L, video=video)
    assert subject.sample_shape == (16, 2, 4, 6) and subject.feature_grid == (2, 2, 3)
    profile = memory.profile(subject, memory.Run(micro_batch=batch, precision="fp32", disc_head="fdistill",
                                                 disc_hidden=8, r1="none"))
    net = WanTransformer3DModel.from_pretrained(folder / "transformer")
    den = WanDenoiser(net, (2, 4, 6), 16, 24, None, None, 1.0)
    den.feature_resolutions = subject.denoiser.feature_resolutions
    cond = TextCondition(torch.randn(batch, L, wp.TEXT_WIDTH))
    sigma = torch.full((batch,), 1.0)

    def teacher():
        net.requires_grad_(False)
        return den(torch.randn(batch, 16, 2, 4, 6, requires_grad=True), sigma, cond, return_features=True)

    def student():
        net.requires_grad_(True)
        return den(torch.randn(batch, 16, 2, 4, 6), sigma, cond)

    for name, forward in (("teacher_fused", teacher), ("student", student)):
        got = saved_bytes(forward, den.parameters())
        assert got == pytest.approx(profile.passes[name, "total"].at(batch), rel=1e-6), name
    sized = memory.folder_subject(folder, None, {"num_frames": 5, "height": 32, "width": 48,
                                                 "max_sequence_length": L})
    assert sized.sample_shape == subject.sample_shape and sized.size == "5 frames of 32 x 48 px"
    vae = sum(p.numel() for p in __import__("diffusers").AutoencoderKLWan.from_pretrained(folder / "vae").parameters())
    assert sized.frozen_bytes >= 4 * vae  # the fp32 VAE, and the umT5 encoder as stored


def test_two_step_students_export_through_the_scheduler_config_and_others_are_refused(folder, tmp_path):
    """WanPipeline's call takes no sigmas=: a 2-step ode student's levels are the ends of the exported scheduler's
    Karras ramp, so the call with num_inference_steps=2 gives its video; levels no config reproduces, and sde
    students (WanPipeline's steps draw their noise without the generator), are refused in one line."""
    import copy

    from diffusers import WanPipeline

    from fdistill.apps.distill import sample_maker
    from fdistill.core.few_step import StudentSteps
    from fdistill.teachers.open import open_teacher

    teacher = open_teacher(folder, None, {"num_frames": 5, "height": 32, "width": 48, "max_sequence_length": L})
    student = copy.deepcopy(teacher.denoiser).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    steps = StudentSteps((999.0, 3.0), "ode")
    line = teacher.export(student, tmp_path / "two", steps)
    assert "(prompt, num_inference_steps=2, guidance_scale=1, height=32, width=48, num_frames=5" in line
    assert "gives fdistill sample's video for the same seed" in line and "\n" not in line
    pipe = WanPipeline.from_pretrained(tmp_path / "two", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        video = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, height=32, width=48, num_frames=5,
                     max_sequence_length=L, generator=torch.Generator().manual_seed(3), output_type="pt").frames
    ours = sample_maker(student, teacher, steps)([PROMPTS[0]], [3])
    torch.testing.assert_close(video.transpose(1, 2), (ours + 1) / 2, rtol=1e-4, atol=1e-4)
    for levels, sampler, match in [((999.0, 3.0), "sde", "a 2-step Wan student cannot be exported yet with its sde "
                                    "sampler: WanPipeline calls scheduler.step without its generator"),
                                   ((999.0, 3.0, 1.0), "ode", r"a 3-step Wan student cannot be exported yet: "
                                    r"WanPipeline's call takes no sigmas=, and no FlowMatchEulerDiscreteScheduler "
                                    r"config reproduces its levels t = \[0.999, 0.75, 0.5\]")]:
        with pytest.raises(ValueError, match=match) as e:
            teacher.export(student, tmp_path / sampler, StudentSteps(levels, sampler))
        assert "\n" not in str(e.value) and not (tmp_path / sampler).exists()
        with pytest.raises(ValueError, match=match):  # the scheduler a LoRA file's folder would carry
            teacher.student_scheduler(folder, StudentSteps(levels, sampler))
