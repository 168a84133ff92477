"""Make the legacy run fixtures under tests/data/legacy/<name>/ (read by tests/test_legacy_runs.py): for each teacher
family, a tiny teacher built by the test builders (tests/t2i_pipelines.py, tests/flow_pipelines.py; see DENOISERS for
the narrower denoisers that keep the fixtures small), a 2-iteration distillation through the public CLI
(`fdistill distill`), and what that code version wrote and sampled, so that a later version can prove it still
loads, samples, resumes and exports run folders written before it.

Each <name>/ holds
  run/config.yaml, run/log.jsonl      the run folder's record, as `fdistill distill` wrote them
  run/checkpoints/000000002/          its newest (and final) checkpoint: model.safetensors, state.safetensors,
                                      state.json (meta: iteration, config, info: the teacher family's record)
  expected.npz                        for seeds [0, 1] and items [0, 1] (classes) or ["a cat", "a dog"] (prompts),
                                      by fdistill.apps.distill.load_generator + sample_maker (`fdistill sample`'s
                                      code path): images (EMA generator, [-1, 1]), images_generator (ema=False),
                                      outputs (the EMA generator's one step before the teacher's decode and clamp),
                                      resumed_images / resumed_outputs (the same after `fdistill distill --resume`
                                      of this run folder to iteration 3), seeds, items, sigma_gen
  teacher.json                        how to rebuild the teacher folder and the data the run used (builder, seed,
                                      arguments, a digest of the teacher's tensors), the distill arguments, the
                                      absolute paths the run recorded (rewritten by the test), package versions
  teacher/                            (image family only) the teacher file itself, teacher.safetensors as
                                      `fdistill train-teacher` wrote it (kept: it is a format of its own)

Run it against any code version (the package is whatever `import fdistill` finds), from a folder that holds no
`fdistill` package (a working directory on sys.path would shadow PYTHONPATH), e.g. the code of commit 1a665cb:

    git worktree add ../fdistill-1a665cb 1a665cb
    cd /tmp && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=<repo>/../fdistill-1a665cb \\
        <repo>/.venv/bin/python <repo>/tests/data/legacy/make_fixtures.py [NAME ...] [--out DIR]

It replaces the named fixtures (default: all); the runs are deterministic on the CPU (the same files, bit for bit,
but for the temporary paths they record). tests/test_legacy_runs.py rebuilds each teacher and its data from the
fixture's teacher.json with ``build_teacher``, ``build_data`` and ``tensor_digest`` of this file: the same code."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent  # tests/data/legacy
TESTS = HERE.parent.parent  # tests/: t2i_pipelines, flow_pipelines, tiny
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ITERATIONS = 2
SEEDS = [0, 1]
CLASSES = [0, 1]
PROMPTS = ["a cat", "a dog"]

# the tiny image settings of tests/tiny.py (TINY, DISTILL), copied so that a later edit there cannot change a fixture;
# model_channels 4, not 8 (see DENOISERS below)
TINY = ["teacher.network.model_channels=4", "teacher.network.channel_mult=[1, 2]", "teacher.network.num_blocks=1",
        "teacher.network.attn_resolutions=[]", "teacher.batch_size=16", "teacher.warmup=1", "disc_hidden=8"]
DISTILL = ["distill.batch_size=8", "distill.tau=2", "distill.log_every=1"]
# a learning rate and EMA that move the students visibly in 2 iterations (so that sampling the teacher's weights,
# or the generator for its EMA, would not pass for the stored images); the other settings as the tests' runs
MOVE = ["distill.lr=1e-3", "distill.ema_beta=0.5"]
# A fixture stores the students (generator, its EMA, fake score: 3 copies of the teacher's denoiser, and the Adam
# moments of 2), so the denoisers are made narrower than the test builders' to keep tests/data/legacy near 3 MB:
# the text-to-image teachers are the test builders' folders (t2i_pipelines.sd15 / sdxl, flow_pipelines.sd3 / flux:
# their VAE, text encoders, tokenizers and scheduler) with unet/ or transformer/ replaced by the same class at these
# kwargs (same blocks and layer counts, fewer channels; the text and time widths as the builders' encoders give).
DENOISERS = {
    "sd15": dict(block_out_channels=[4, 8], layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=16, attention_head_dim=2,
                 norm_num_groups=2),
    "sdxl": dict(block_out_channels=[4, 8], layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 2],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=2,
                 transformer_layers_per_block=[1, 1], projection_class_embeddings_input_dim=6 * 2 + 16,
                 cross_attention_dim=32, norm_num_groups=2),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=8, pooled_projection_dim=32,
                pos_embed_max_size=16, qk_norm="rms_norm"),
    "flux": dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=[2, 2, 4]),
}
DENOISER_CLASS = {"sd15": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                  "flux": "FluxTransformer2DModel"}
# tests/test_diffusers_teacher.py's TINY_UNET, narrower (class-conditional, as its pipeline_dir fixture)
DDPM_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[4, 8], layers_per_block=1,
                 norm_num_groups=2, attention_head_dim=4, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D"], num_class_embeds=10)
# tests/test_t2i.py's captioned data and RUN
CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow dot", "a white cross", "a black ring"]
SD_RUN = ["disc_resolutions=[4]", "disc_hidden=8", "guidance=1.75", "distill.batch_size=4", "distill.tau=2",
          "distill.log_every=1", "distill.r1_form=approx", "distill.sigmas.schedule=scaled_linear",
          "distill.sigmas.index_range=[1, 999]", "text.prompts=null"]
# tests/test_flow_export.py's RUN (without its guidance) and test_shared_base.py's settings
FLOW_RUN = ["disc_resolutions=[mid]", "disc_hidden=8", "distill.batch_size=4", "distill.tau=2", "distill.log_every=1",
            "distill.r1_form=approx", "distill.divergence=js", "distill.sigmas.schedule=flow",
            "distill.sigmas.index_range=[0, 999]", "text.prompts=null", "text.resolution=16"]
MSL = "text.max_sequence_length=8"
CAPTIONED = {"builder": "captioned", "captions": CAPTIONS, "seed": 0, "size": [20, 24]}


def _pipeline(builder: str) -> dict:
    return {"builder": builder, "seed": 0,
            "denoiser": {"class": DENOISER_CLASS[builder], "seed": 0, "kwargs": DENOISERS[builder]}}


FIXTURES: dict[str, dict] = {
    # fdistill's own EDM teacher (SongUNet, class-conditional digits), its file stored in the fixture
    "image": {"teacher": {"builder": "train-teacher", "args": ["teacher.iterations=3", *TINY], "stored": "teacher"},
              "data": "digits", "args": [*TINY, *DISTILL, *MOVE], "items": CLASSES},
    # a diffusers DDPMPipeline folder (UNet2DModel in pixels, class-conditional) as an EDM teacher
    "diffusers": {"teacher": {"builder": "ddpm_unet", "seed": 0, "kwargs": DDPM_UNET},
                  "data": "digits", "args": ["disc_hidden=8", "distill.batch_size=4", "distill.tau=2",
                                             "distill.log_every=1", *MOVE], "items": CLASSES},
    "sd15": {"teacher": _pipeline("sd15"), "data": CAPTIONED, "args": [*SD_RUN, *MOVE], "items": PROMPTS},
    "sdxl": {"teacher": _pipeline("sdxl"), "data": CAPTIONED, "args": [*SD_RUN, *MOVE], "items": PROMPTS},
    # SD3 at the pipeline's own 256 T5 tokens (text.max_sequence_length null)
    "sd3": {"teacher": _pipeline("sd3"), "data": CAPTIONED, "args": [*FLOW_RUN, "guidance=2.0", *MOVE],
            "items": PROMPTS},
    # FLUX.1-dev-like (guidance embedding): embedded guidance 5, 8 T5 tokens
    "flux": {"teacher": _pipeline("flux"), "data": CAPTIONED,
             "args": [*FLOW_RUN, "guidance=1.0", "text.flux_guidance=5.0", MSL, *MOVE], "items": PROMPTS},
    "flux_lora": {"teacher": _pipeline("flux"), "data": CAPTIONED,
                  "args": [*FLOW_RUN, "guidance=1.0", MSL, "text.lora_rank=2", *MOVE], "items": PROMPTS},
    "sd3_shared_base": {"teacher": _pipeline("sd3"), "data": CAPTIONED,
                        "args": [*FLOW_RUN, "guidance=2.0", MSL, "text.lora_rank=2", "text.shared_base=true", *MOVE],
                        "items": PROMPTS},
}
TEXT_TO_IMAGE = {"sd15", "sdxl", "sd3", "flux"}  # teacher builders of text-to-image pipelines


def _diffusers_kwargs(kwargs: dict) -> dict:
    """JSON's lists as the tuples diffusers' constructors are usually given (either is accepted)."""
    return {k: tuple(v) if isinstance(v, list) and k != "axes_dims_rope" else v for k, v in kwargs.items()}


def build_teacher(spec: dict, root: Path, fixture: Path | None = None) -> Path:
    """The teacher of ``spec`` (a FIXTURES entry's or teacher.json's "teacher") in ``root/teacher``; returns the path
    to give `fdistill distill --teacher`. A stored teacher is copied from ``fixture/<stored>`` when ``fixture`` is
    given, else made by its builder (`fdistill train-teacher`)."""
    import torch

    folder = Path(root) / "teacher"
    builder = spec["builder"]
    if builder == "train-teacher":
        if fixture is not None:
            shutil.copytree(Path(fixture) / spec["stored"], folder)
            return folder
        from fdistill.apps import cli

        run = Path(root) / "teacher-run"
        assert cli.main(["train-teacher", "--out", str(run), "--no-progress", "--device", "cpu",
                         *spec["args"]]) == 0
        folder.mkdir(parents=True)
        shutil.copy2(run / "teacher.safetensors", folder / "teacher.safetensors")
        shutil.rmtree(run)
        return folder
    if builder == "ddpm_unet":
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        torch.manual_seed(spec["seed"])
        unet = UNet2DModel(**_diffusers_kwargs(spec["kwargs"])).eval()
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=False)).save_pretrained(folder)
        return folder
    if builder in ("sd15", "sdxl"):
        import t2i_pipelines

        getattr(t2i_pipelines, builder)(folder, seed=spec["seed"])
    elif builder in ("sd3", "flux"):
        import flow_pipelines

        getattr(flow_pipelines, builder)(folder, seed=spec["seed"])
    else:
        raise ValueError(f"unknown teacher builder {builder!r}")
    den = spec.get("denoiser")
    if den:  # the builder's unet/ or transformer/ replaced by a narrower one of the same class
        import diffusers

        sub = folder / ("unet" if den["class"].startswith("UNet") else "transformer")
        shutil.rmtree(sub)
        torch.manual_seed(den["seed"])
        getattr(diffusers, den["class"])(**_diffusers_kwargs(den["kwargs"])).save_pretrained(sub)
    return folder


def build_data(spec: str | dict, root: Path) -> str:
    """The run's ``data=``: a dataset name as is, or the captioned folder of ``spec`` made in ``root/data``."""
    if isinstance(spec, str):
        return spec
    import numpy as np
    from PIL import Image

    assert spec["builder"] == "captioned", spec
    folder = Path(root) / "data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(spec["seed"])
    for i, caption in enumerate(spec["captions"]):
        Image.fromarray(rng.integers(0, 256, (*spec["size"], 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return str(folder)


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of the .safetensors files under ``path`` (by relative
    path): the same for a bit-identical rebuild, whatever the files' metadata or layout."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*.safetensors")))
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with safe_open(str(f), "pt") as st:
            for k in sorted(st.keys()):  # noqa: SIM118
                t = st.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_expected(run: Path, items: list, seeds: list[int] = SEEDS) -> dict:
    """What `fdistill sample --checkpoint RUN` computes for ``items`` (classes or prompts) and ``seeds``: images in
    [-1, 1] of the EMA generator ("images") and of the generator ("images_generator"); the EMA generator's output
    before the teacher's decode and clamp ("outputs": latents, or pixels that the clamp may saturate); sigma_gen."""
    import torch

    from fdistill.apps.distill import load_generator, sample_maker
    from fdistill.core.diffusion import one_step, seeded_noise

    out = {}
    for key, ema in (("images", True), ("images_generator", False)):
        net, student, teacher = load_generator(run, ema=ema)
        sigma_gen = student.sigmas[0]  # a one-step student
        out[key] = sample_maker(net, teacher, student)(list(items), list(seeds)).float()
        out["sigma_gen"] = sigma_gen
        if ema:
            with torch.no_grad():
                z = seeded_noise(teacher.sample_shape, list(seeds))
                out["outputs"] = one_step(net, z, sigma_gen, teacher.condition(list(items))).float()
    return out


def resume(run: Path, iterations: int) -> None:
    """`fdistill distill --resume` of ``run`` up to ``iterations``."""
    from fdistill.apps import cli

    argv = ["distill", "--out", str(run), "--resume", "--no-progress", "--device", "cpu",
            f"distill.iterations={iterations}"]
    assert cli.main(argv) == 0, argv


def _versions() -> dict:
    import importlib.metadata as md

    import fdistill

    out = {"fdistill": fdistill.__version__, "fdistill_file": fdistill.__file__}
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["commit"] = subprocess.run(["git", "-C", str(Path(fdistill.__file__).parent), "rev-parse", "HEAD"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    return out


def make(name: str, out_root: Path) -> dict:
    """Build, distill and record fixture ``name`` into ``out_root/name``; returns its teacher.json record."""
    import numpy as np
    import torch

    from fdistill.apps import cli
    from fdistill.apps.distill import load_generator, sample_maker
    from fdistill.training import checkpoint

    spec = FIXTURES[name]
    dest = Path(out_root) / name
    with tempfile.TemporaryDirectory(prefix=f"fdistill-legacy-{name}-") as tmp:
        root = Path(tmp).resolve()
        torch.manual_seed(0)
        teacher = build_teacher(spec["teacher"], root)
        data = build_data(spec["data"], root)
        run = root / "run"
        argv = ["distill", "--teacher", str(teacher), "--out", str(run), "--no-progress", "--device", "cpu",
                f"data={data}", *spec["args"], f"distill.iterations={ITERATIONS}"]
        assert cli.main(argv) == 0, argv
        newest = checkpoint.latest(run)
        assert newest is not None and int(newest.name) == ITERATIONS, newest
        expected = sample_expected(run, spec["items"])
        # how far the stored images are from the teacher's own one-step output (what the students started from)
        _, _, t = load_generator(run)  # the teacher as the run opened it (its text settings)
        start = sample_maker(t.denoiser, t, expected["sigma_gen"])(list(spec["items"]), SEEDS)
        moved = float((expected["images"] - start).abs().max())

        if dest.exists():
            shutil.rmtree(dest)
        (dest / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy2(run / "config.yaml", dest / "run" / "config.yaml")
        shutil.copy2(run / "log.jsonl", dest / "run" / "log.jsonl")
        shutil.copytree(newest, dest / "run" / "checkpoints" / newest.name)
        if spec["teacher"].get("stored"):
            shutil.copytree(root / spec["teacher"]["stored"], dest / spec["teacher"]["stored"])
        # the fixture's run resumed for one more iteration (as the test resumes its copy): exact resume
        resumed = root / "resumed"
        shutil.copytree(dest / "run", resumed)
        resume(resumed, ITERATIONS + 1)
        assert checkpoint.latest(resumed).name == f"{ITERATIONS + 1:09d}"
        after = sample_expected(resumed, spec["items"])
        items = np.array(spec["items"]) if isinstance(spec["items"][0], str) else np.array(spec["items"], np.int64)
        np.savez_compressed(dest / "expected.npz", images=expected["images"].numpy(),
                            images_generator=expected["images_generator"].numpy(),
                            outputs=expected["outputs"].numpy(), resumed_images=after["images"].numpy(),
                            resumed_outputs=after["outputs"].numpy(), seeds=np.array(SEEDS, np.int64), items=items,
                            sigma_gen=np.float64(expected["sigma_gen"]))
        meta = checkpoint.read_meta(run)
        record = {
            "name": name,
            "teacher": {**spec["teacher"], "digest": tensor_digest(teacher)},
            "data": spec["data"],
            "distill_args": [a for a in argv[argv.index("--device") + 2:] if not a.startswith("data=")],
            "iterations": ITERATIONS,
            "checkpoint": newest.name,
            "items": spec["items"],
            "seeds": SEEDS,
            "text_to_image": spec["teacher"]["builder"] in TEXT_TO_IMAGE,
            # the absolute paths the run recorded: config.yaml's run.teacher and config.data, state.json's
            # meta.info.network.folder (text-to-image and diffusers teachers) and meta.info.data
            "recorded": {"root": str(root), "teacher": str(teacher.resolve()), "data": data,
                         "info_network_folder": meta["info"].get("network", {}).get("folder"),
                         "info_data": meta["info"].get("data")},
            "info_keys": {k: sorted(v) if isinstance(v, dict) else type(v).__name__
                          for k, v in meta["info"].items()},
            "max_abs_diff_to_teacher_one_step": moved,
            "versions": _versions(),
        }
        (dest / "teacher.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"fixtures to make (default: all of {', '.join(FIXTURES)})")
    p.add_argument("--out", default=str(HERE), help="where the fixture folders go (default: beside this script)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import fdistill

    print(f"fdistill from {fdistill.__file__}", flush=True)
    for name in args.names or list(FIXTURES):
        if name not in FIXTURES:
            p.error(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
        record = make(name, Path(args.out))
        size = sum(f.stat().st_size for f in (Path(args.out) / name).rglob("*") if f.is_file())
        print(f"{name}: {size / 1e3:.0f} kB, images moved {record['max_abs_diff_to_teacher_one_step']:.3g} from the "
              f"teacher's one step; info keys {record['info_keys']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
