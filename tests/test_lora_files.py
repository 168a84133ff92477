"""Students as LoRA files, out and in (``fdistill.teachers.lora_files``): ``export --lora`` of a LoRA run (SD1.5, SDXL,
SD3 shared-base, FLUX.1; one-step and k-step students) loaded onto the teacher's own pipeline with
``load_lora_weights`` and the exported scheduler gives ``sample_maker``'s image to 1/255; ``--lora-rank`` extracts a
fully fine-tuned student's low-rank difference exactly and names what no LoRA carries; ``--init-from`` takes the file
back (into a LoRA run's adapter, fused into a full run) and a diffusers UNet folder; bad inputs are one-line errors.
Tiny random pipelines (tests/t2i_pipelines.py, flow_pipelines.py); the runs are made by hand (perturbed adapters,
saved as checkpoints), not trained."""

import ast
import json
import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import flow_pipelines  # noqa: E402
import qwen_pipelines  # noqa: E402
import sana_pipelines  # noqa: E402
import t2i_pipelines  # noqa: E402

from fdistill.apps import cli, distill, images  # noqa: E402
from fdistill.teachers import lora_files  # noqa: E402
from fdistill.training import checkpoint  # noqa: E402

PROMPT = "a photo of a cat on a bike"
LICENSE = "Tiny Test License: use freely, no warranty."
SD = ["disc_resolutions=[4]", "disc_hidden=8", "guidance=1.75", "distill.sigmas.schedule=scaled_linear",
      "distill.sigmas.index_range=[1, 999]"]
FLOW = ["disc_resolutions=[mid]", "disc_hidden=8", "guidance=1.0", "distill.sigmas.schedule=flow",
        "distill.sigmas.index_range=[0, 999]", "text.resolution=16", "teacher_options.max_sequence_length=8"]
COMMON = ["distill.batch_size=4", "distill.tau=2", "text.prompts=null"]
K2 = ["distill.student_steps=2", "distill.student_sampler=ode"]
FLOW32 = [*FLOW, "text.resolution=32"]  # SANA's and Qwen-Image's tiny pipelines: 32 px
CASES = {"sd15": (SD, ["text.lora_rank=2"]),  # one step at the top: DDIM
         "sdxl": (SD, ["text.lora_rank=2", *K2]),  # timesteps=[999, 499]: Euler
         "sd3": (FLOW, ["text.lora_rank=2", "text.shared_base=true"]),  # one step: Karras FlowMatchEuler
         "flux": (FLOW, ["text.lora_rank=2", *K2]),  # sigmas=[...]
         "sana": (FLOW32, ["text.lora_rank=2"]),
         "qwen": (FLOW32, ["text.lora_rank=2", *K2])}
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {"sd15": t2i_pipelines.sd15(root / "sd15"), "sdxl": t2i_pipelines.sdxl(root / "sdxl"),
           "sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux"),
           "sana": sana_pipelines.sana(root / "sana"), "qwen": qwen_pipelines.qwen_image(root / "qwen")}
    (out["sd15"] / "LICENSE.md").write_text(LICENSE)
    (out["sdxl"] / "README.md").write_text("---\nlicense: openrail++\ntags:\n- text-to-image\n---\n# tiny SDXL\n")
    return out


def _distiller(folders, captioned, family, *overrides):
    base, _ = CASES[family]
    cfg = images.load_config("digits", [f"data={captioned}", *base, *COMMON, *overrides])
    return distill.make_distiller(cfg, folders[family])


def _perturbed(d, seed=1):
    """The generator's adapters (lora_B starts at zero) made to matter; the EMA a copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in d.generator.named_parameters():
            if "lora_B" in k:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        d.generator_ema.load_state_dict(d.generator.state_dict())
    return d


def _save(d, run):
    d.save(checkpoint.checkpoint_path(run, 0))
    return run


@pytest.fixture(scope="module")
def lora_runs(folders, captioned, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            run = tmp_path_factory.mktemp(f"run-{family}")
            made[family] = _save(_perturbed(_distiller(folders, captioned, family, *CASES[family][1])), run)
        return made[family]
    return get


def _pipe_call(line):
    """The keyword arguments of the ``pipe(prompt, k=v, ...)`` the export line prints, and the scheduler class."""
    m = re.search(r"pipe\.scheduler = (\w+)\.from_pretrained\('[^']*', subfolder='scheduler'\); "
                  r"pipe\(prompt, ([^()]*)\)", line)
    assert m, line
    call = ast.parse(f"f({m.group(2)})", mode="eval").body
    return m.group(1), {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _lora_image(teacher_folder, out, line, seed=7, lora=True):
    """The teacher's own pipeline with the LoRA file and the exported scheduler, called as the line says."""
    import diffusers

    name, kwargs = _pipe_call(line)
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher_folder, local_files_only=True)
    if lora:
        pipe.load_lora_weights(out)
    pipe.scheduler = getattr(diffusers, name).from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def _sample(run, seed=7):
    net, student, teacher = distill.load_generator(run)
    return (distill.sample_maker(net, teacher, student)([PROMPT], [seed]) + 1) / 2


# -- out ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "sana", "qwen"])
def test_lora_file_on_the_teachers_pipeline_gives_fdistill_samples_image(folders, lora_runs, family, tmp_path):
    from safetensors import safe_open

    run, out = lora_runs(family), tmp_path / "lora"
    lines = lora_files.export_lora(run, out)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("LICENSE")) == [
        "README.md", "pytorch_lora_weights.safetensors", "scheduler"]
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        backbone = "unet" if family in ("sd15", "sdxl") else "transformer"
        keys = f.keys()
        assert all(k.startswith(backbone + ".") for k in keys)
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta[f"{backbone}.r"] == 2 and meta[f"{backbone}.lora_alpha"] == 2
    theirs, ours = _lora_image(folders[family], out, lines[0]), _sample(run)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1 / 255
    bare = _lora_image(folders[family], out, lines[0], lora=False)  # the LoRA is not a no-op
    assert (bare - ours).abs().max() > 2 / 255
    card = (out / "README.md").read_text()
    assert str(folders[family]) in card and "load_lora_weights" in card
    if family == "sd15":
        assert LICENSE in card and (out / "LICENSE.md").read_text() == LICENSE
        assert "timesteps" not in lines[0] and "DDIMScheduler" in lines[0]
    elif family == "sdxl":
        assert "\nlicense: openrail++\n" in card and "license applies: openrail++" in card
    else:
        assert "No license was found" in card
    if family in ("sdxl", "flux"):
        assert ("timesteps=[999, 499]" if family == "sdxl" else "sigmas=[0.999, 0.") in lines[0]


def test_export_cli_lora_and_its_one_line_errors(folders, lora_runs, tmp_path, capsys):
    run = lora_runs("sd15")
    assert cli.main(["export", "--checkpoint", str(run), "--lora", str(tmp_path / "out")]) == 0
    assert "pipe.load_lora_weights" in capsys.readouterr().out
    for args, message in (([], "give one of them"),
                          (["--lora", str(tmp_path / "a"), "--diffusers", str(tmp_path / "b")], "give only one"),
                          (["--diffusers", str(tmp_path / "c"), "--lora-rank", "2"], "goes with --lora"),
                          (["--lora", str(tmp_path / "d"), "--lora-rank", "0"], "--lora-rank must be a positive"),
                          (["--lora", str(tmp_path / "e"), "--lora-rank", "2"], "export it as it is"),
                          (["--lora", str(tmp_path / "out")], "is not an empty folder")):
        assert cli.main(["export", "--checkpoint", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_a_hub_snapshot_names_its_base_model(tmp_path):
    snapshot = tmp_path / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert lora_files.base_model_name(snapshot) == "stabilityai/sdxl-turbo"
    assert lora_files.base_model_name(tmp_path) is None


# -- --lora-rank: a full run's difference by truncated SVD ----------------------------------------------------------
def test_svd_recovers_a_low_rank_difference_and_reports_a_full_rank_ones_error():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    a, b, error = lora_files.svd_lora(low, 3)
    assert a.shape == (3, 24) and b.shape == (40, 3) and error < 1e-5
    torch.testing.assert_close(b @ a, low, rtol=1e-4, atol=1e-4)
    a, b, error = lora_files.svd_lora(low, 8)  # more rank than needed: zero rows, still exact
    assert a.shape == (8, 24) and error < 1e-5
    full = torch.randn(40, 24, generator=g)
    _, _, error = lora_files.svd_lora(full, 3)
    s = torch.linalg.svdvals(full.double())
    assert error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4) and error > 0.5
    assert lora_files.svd_lora(torch.zeros(5, 4), 2)[2] == 0.0


def _full_run(folders, captioned, run, extra=False):
    """A full run whose generator differs from the teacher by a rank-2 matrix on each attention projection (and, with
    ``extra``, in a norm's weight and a projection's bias)."""
    d = _distiller(folders, captioned, "sd15")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in d.generator.unet.named_modules():
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                out, inp = m.weight.shape
                m.weight.add_(0.2 * torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g))
        if extra:
            d.generator.unet.conv_norm_out.weight.add_(0.1)
            next(m for n, m in d.generator.unet.named_modules() if n.endswith("to_out.0")).bias.add_(0.1)
        d.generator_ema.load_state_dict(d.generator.state_dict())
    return _save(d, run)


def test_lora_rank_extracts_a_full_runs_low_rank_difference(folders, captioned, tmp_path):
    run, out = _full_run(folders, captioned, tmp_path / "run"), tmp_path / "lora"
    with pytest.raises(ValueError, match="give --lora-rank R"):
        lora_files.export_lora(run, out)
    lines = lora_files.export_lora(run, out, rank=2)
    errors = [float(m.group(1)) for line in lines for m in [re.search(r"to_\w+(?:\.0)?: relative error (\S+)", line)]
              if m]
    assert len(errors) == 32 and max(errors) < 1e-4  # 4 transformer blocks x 2 attentions x 4 projections
    assert "every changed parameter is a targeted layer's weight" in lines[-2]
    theirs, ours = _lora_image(folders["sd15"], out, lines[-1]), _sample(run)
    assert (theirs - ours).abs().max() <= 1 / 255
    extra, out2 = _full_run(folders, captioned, tmp_path / "extra", extra=True), tmp_path / "lora2"
    lines = lora_files.export_lora(extra, out2, rank=1)  # rank 1 of a rank-2 difference: a nonzero error
    errors = [float(m.group(1)) for line in lines for m in [re.search(r"to_\w+(?:\.0)?: relative error (\S+)", line)]
              if m]
    assert min(errors) > 0.01
    carried = next(line for line in lines if line.startswith("not carried by any LoRA"))
    assert "2 changed parameters" in carried and "conv_norm_out.weight" in carried and "to_out.0.bias" in carried


# -- in ---------------------------------------------------------------------------------------------------------------
def _adapters(net):
    return {k: v for k, v in net.state_dict().items() if "lora_" in k}


def test_init_from_our_own_lora_export_round_trips(folders, captioned, lora_runs, tmp_path):
    """export --lora, then --init-from it: a LoRA run's adapter (plain and shared-base) is the exported generator's;
    a full run's weights are the exported generator's fused ones."""
    for family, overrides in (("sd15", ["text.lora_rank=2"]), ("sd3", ["text.lora_rank=2", "text.shared_base=true"])):
        run, out = lora_runs(family), tmp_path / f"lora-{family}"
        lora_files.export_lora(run, out)
        exported = checkpoint.load_weights(run, "generator_ema")
        d = _distiller(folders, captioned, family, *overrides)
        source = out if family == "sd15" else out / "pytorch_lora_weights.safetensors"
        line = lora_files.warm_start(d, source)
        assert "into the run's rank-2 adapter" in line and "and its EMA" in line
        for net in (d.generator, d.generator_ema):
            got = _adapters(net)
            assert got.keys() == {k for k in exported if "lora_" in k}
            for k, v in got.items():
                torch.testing.assert_close(v, exported[k], rtol=1e-6, atol=1e-7, msg=k)
    full = _distiller(folders, captioned, "sd15")
    assert "fused into the generator's weights (32 layers)" in lora_files.warm_start(full, tmp_path / "lora-sd15")
    fused, _, _ = distill.load_generator(lora_runs("sd15"))
    for net in (full.generator, full.generator_ema):
        for k, v in fused.unet.state_dict().items():
            torch.testing.assert_close(net.unet.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert all(torch.equal(a, b) for a, b in zip(full.fake_score.state_dict().values(),
                                                  full.teacher.net.state_dict().values()))  # as usual


def test_a_partial_lora_file_leaves_the_other_layers_at_the_base(folders, captioned, lora_runs, tmp_path):
    """A file adapting only the to_q projections, with text-encoder LoRA weights too: the run's other adapted layers
    start at B A = 0; the text encoder's part is left out with a warning."""
    from safetensors.torch import load_file, save_file

    run = lora_runs("sd15")
    lora_files.export_lora(run, tmp_path / "out")
    part = {k: v for k, v in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").items() if ".to_q." in k}
    part["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"] = torch.zeros(2, 16)
    part["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight"] = torch.zeros(16, 2)
    save_file(part, tmp_path / "part.safetensors")  # no metadata: rank and alpha from the tensors
    d = _distiller(folders, captioned, "sd15", "text.lora_rank=2")
    with pytest.warns(UserWarning, match="its LoRA weights for text_encoder are left out"):
        assert "(8 of its 32 layers)" in lora_files.warm_start(d, tmp_path / "part.safetensors")
    exported = checkpoint.load_weights(run, "generator_ema")
    for k, v in _adapters(d.generator_ema).items():
        if ".to_q." in k:
            torch.testing.assert_close(v, exported[k], rtol=1e-6, atol=1e-7, msg=k)
        elif "lora_B" in k:
            assert not v.any(), k


def test_a_kohya_lora_file_with_network_alphas_is_read_as_diffusers_reads_it(folders, captioned, lora_runs, tmp_path):
    """kohya's layout (``lora_unet_<layer>.lora_down/lora_up.weight``, ``.alpha``), converted by the pipeline class's
    own lora_state_dict: alpha 4 at rank 2 scales B A by 2, fused into a full run and folded into a LoRA run's B."""
    from safetensors.torch import load_file, save_file

    lora_files.export_lora(lora_runs("sd15"), tmp_path / "out")
    ours = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    kohya = {}
    for k, v in ours.items():
        layer, part = k.removeprefix("unet.").rsplit(".lora.", 1)
        name = "lora_unet_" + layer.replace(".", "_")
        kohya[f"{name}.lora_{part.split('.')[0]}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    full, adapted = _distiller(folders, captioned, "sd15"), _distiller(folders, captioned, "sd15", "text.lora_rank=2")
    before = {k: v.clone() for k, v in full.generator.unet.state_dict().items()}
    lora_files.warm_start(full, tmp_path / "kohya.safetensors")
    lora_files.warm_start(adapted, tmp_path / "kohya.safetensors")
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    up, down = ours[f"unet.{layer}.lora.up.weight"], ours[f"unet.{layer}.lora.down.weight"]
    delta = full.generator.unet.state_dict()[f"{layer}.weight"] - before[f"{layer}.weight"]
    torch.testing.assert_close(delta, 2 * up @ down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapted.generator.unet.state_dict()[f"{layer}.lora_B.default.weight"], 2 * up)


def test_init_from_a_diffusers_unet_folder_and_through_the_cli(folders, captioned, lora_runs, tmp_path, capsys):
    import diffusers
    from safetensors.torch import save_file

    unet = diffusers.UNet2DConditionModel.from_pretrained(folders["sd15"] / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(tmp_path / "student" / "unet")
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    # a UNet folder, its weights as one file (as SDXL-Lightning ships its UNets), a pipeline folder's unet/
    for source in (tmp_path / "student" / "unet", tmp_path / "unet.safetensors", folders["sd15"]):
        d = _distiller(folders, captioned, "sd15")
        assert "UNet2DConditionModel " in lora_files.warm_start(d, source)
        want = (unet if source != folders["sd15"] else d.teacher.net.unet).state_dict()
        for k, v in want.items():
            assert torch.equal(d.generator_ema.unet.state_dict()[k], v), k
    lora_files.export_lora(lora_runs("sd15"), tmp_path / "lora")
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(folders["sd15"]), "--out", str(run), "--no-progress",
                     "--init-from", str(tmp_path / "lora"), f"data={captioned}", *SD, *COMMON, "text.lora_rank=2",
                     "distill.iterations=1"]) == 0
    assert "initialized the generator and its EMA from LoRA file" in capsys.readouterr().out


def test_bad_init_from_inputs_are_one_line_errors(folders, captioned, lora_runs, tmp_path):
    from safetensors.torch import save_file

    lora_files.export_lora(lora_runs("sdxl"), tmp_path / "sdxl-lora")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    import diffusers

    diffusers.UNet2DConditionModel.from_pretrained(folders["sdxl"] / "unet").save_pretrained(tmp_path / "xl-unet")
    lora_run = _distiller(folders, captioned, "sd15", "text.lora_rank=2")
    rank4 = _distiller(folders, captioned, "sd15", "text.lora_rank=4")
    full = _distiller(folders, captioned, "sd15")
    cases = [(full, tmp_path / "nothing", "nothing is there; expected a distill run folder"),
             (full, tmp_path / "model.bin", "is a pickle"),
             (full, tmp_path / "pickled", "a pickle"),
             (full, tmp_path / "empty", "is a folder holding []; expected"),
             (full, tmp_path / "plain.safetensors", "its weights do not fit this run's UNet2DConditionModel"),
             (full, tmp_path / "junk.safetensors", "is not a LoRA file"),
             (full, tmp_path / "sdxl-lora", "does not fit this run's UNet2DConditionModel"),
             (full, tmp_path / "xl-unet", "is not the teacher's architecture"),
             (full, folders["sd3"] / "transformer", "holds a SD3Transformer2DModel, this run's generator is a UNet2D"),
             (lora_run, folders["sd15"] / "unet", "start a full run (text.lora_rank=0)"),
             (rank4, lora_runs("sd15"), None)]  # a run: the existing warm start (whose own error names the misfit)
    for d, source, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message) if message else "does not fit") \
                as e:
            lora_files.warm_start(d, source)
        assert "\n" not in str(e.value), str(e.value)
    lora_files.export_lora(lora_runs("sd15"), tmp_path / "sd15-lora")
    with pytest.raises(ValueError, match=r"is a rank-2 LoRA, this run's adapter is rank 4 .*text.lora_rank=2"):
        lora_files.warm_start(rank4, tmp_path / "sd15-lora")
