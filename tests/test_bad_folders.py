"""Strangers' pipeline folders are refused by the shared folder loader in one line naming the file and what was
expected, before anything large is allocated: a pickled text encoder, a config of absurd size, NaN or negative
VAE scaling and scheduler shift, a missing component. One table, every existing pipeline family."""

import json
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402
import t2i_pipelines  # noqa: E402

from fdistill.apps import cli  # noqa: E402
from fdistill.teachers import pipeline_folders as pf  # noqa: E402
from fdistill.teachers.open import open_teacher  # noqa: E402

BUILDERS = {"sd15": t2i_pipelines.sd15, "sdxl": t2i_pipelines.sdxl, "sd3": flow_pipelines.sd3,
            "flux": flow_pipelines.flux}
NETWORK = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pickled_text_encoder(folder, family):
    d = folder / "text_encoder"
    weights = next(d.glob("*.safetensors"))
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    weights.unlink()
    return r"text_encoder holds its weights as pytorch_model.bin, a pickle; expected safetensors"


def _absurd_layers(folder, family):
    if NETWORK[family] == "unet":  # the UNet config check bounds its depth
        _edit_json(folder / "unet" / "config.json", layers_per_block=100_000)
        return r"unet/config.json: layers_per_block must be an integer in \[1, 64\]"
    _edit_json(folder / "transformer" / "config.json", num_layers=10_000_000)
    return r"config.json describes a network of .*B parameters .* more than the .* GB of memory here; set " \
           "FDISTILL_MAX_TEACHER_GB"


def _nan_scaling(folder, family):
    _edit_json(folder / "vae" / "config.json", scaling_factor=float("nan"))
    return r"vae/config.json: scaling_factor must be a finite positive number, got nan"


def _negative_scaling(folder, family):
    _edit_json(folder / "vae" / "config.json", scaling_factor=-0.5)
    return r"vae/config.json: scaling_factor must be a finite positive number, got -0.5"


def _bad_shift(folder, family):
    path = folder / "scheduler" / "scheduler_config.json"
    if NETWORK[family] == "unet":  # a DDPM schedule: its betas
        _edit_json(path, beta_end=float("nan"))
        return r"scheduler_config.json: beta_end must be a number in \(0, 1\), got nan"
    _edit_json(path, shift=-3.0, use_dynamic_shifting=False)
    return r"scheduler_config.json: shift must be a finite positive number, got -3.0"


def _missing_vae(folder, family):
    shutil.rmtree(folder / "vae")
    return r"lacks vae/config.json; expected a diffusers"


CASES = [_pickled_text_encoder, _absurd_layers, _nan_scaling, _negative_scaling, _bad_shift, _missing_vae]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("family", BUILDERS)
def test_a_bad_folder_is_refused_in_one_line(folders, family, case, tmp_path, capsys):
    folder = shutil.copytree(folders[family], tmp_path / family)
    match = case(folder, family)
    t0 = time.perf_counter()
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        open_teacher(folder, 16)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 30  # refused before it builds 100000 blocks
    assert cli.main(["prepare-latents", "--teacher", str(folder), "--data", str(tmp_path), "--out",
                     str(tmp_path / "latents"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and "Traceback" not in err


def test_the_parameter_count_extrapolates_repeated_blocks_exactly(folders):
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in json.loads((folders["flux"] / "transformer" / "config.json").read_text()).items()
              if not k.startswith("_")}
    config.update(num_layers=3, num_single_layers=4)
    counted = pf.parameter_count(FluxTransformer2DModel.from_config, config, "flux")
    assert counted == sum(p.numel() for p in FluxTransformer2DModel.from_config(config).parameters())


def test_the_memory_limit_can_be_raised(folders, tmp_path, monkeypatch):
    monkeypatch.setenv(pf.MAX_GB_VARIABLE, "0.0001")
    with pytest.raises(ValueError, match="more than the 0.0 GB of memory here"):
        open_teacher(folders["sd3"], 16)
    monkeypatch.setenv(pf.MAX_GB_VARIABLE, "1000")
    assert open_teacher(folders["sd3"], 16).kind == "sd3"
    monkeypatch.setenv(pf.MAX_GB_VARIABLE, "lots")
    with pytest.raises(ValueError, match="FDISTILL_MAX_TEACHER_GB='lots': expected a number of GB"):
        open_teacher(folders["sd3"], 16)
