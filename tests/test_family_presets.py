"""Every pipeline family distills, samples and exports from the CLI with its preset and only the data, the
resolution, the batch and the iterations given (tiny folders saved by diffusers, random weights), and the exported
pipeline's documented one-step call gives the image `fdistill sample` wrote."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import flow_pipelines  # noqa: E402
import qwen_pipelines  # noqa: E402
import sana_pipelines  # noqa: E402
import t2i_pipelines  # noqa: E402

from fdistill.apps import cli, images  # noqa: E402

FAMILIES = {  # family: (its preset, the tiny folder's builder)
    "sd15": ("sd15", t2i_pipelines.sd15),
    "sdxl": ("sdxl", t2i_pipelines.sdxl),
    "sd3": ("sd35", flow_pipelines.sd3),
    "flux": ("flux", flow_pipelines.flux),
    "sana": ("sana", sana_pipelines.sana),
    "qwen_image": ("qwen_image", qwen_pipelines.qwen_image),
}
RESOLUTION = {"sana": 32}  # SanaPipeline takes multiples of 32 pixels; the others run at 16
PROMPT = "a blue circle"


def test_every_family_has_a_preset_naming_roles_not_sizes():
    for preset, _ in FAMILIES.values():
        cfg = images.load_config(preset)
        assert all(isinstance(r, str) for r in cfg.disc_resolutions), preset  # "mid", not a resolution


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_runs_from_its_preset_with_only_data_resolution_batch_and_iterations(family, captioned, tmp_path,
                                                                                      capsys):
    from diffusers import DiffusionPipeline

    preset, build = FAMILIES[family]
    r = RESOLUTION.get(family, 16)
    folder, run, exported = build(tmp_path / family), tmp_path / "run", tmp_path / "exported"
    assert cli.main(["distill", "--config", preset, "--teacher", str(folder), "--out", str(run), "--no-progress",
                     f"data={captioned}", f"text.resolution={r}", "distill.batch_size=2", "distill.iterations=2"]) == 0
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--seed", "3", "--no-progress"]) == 0
    ours = np.asarray(Image.open(run / "samples" / "000000.png"))
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--diffusers", str(exported)]) == 0
    line = capsys.readouterr().out
    call = re.search(r"\(prompt, (.*?)\)", line).group(1)  # the printed call's arguments, used as printed
    kwargs = {k: yaml.safe_load(v) for k, v in (a.split("=") for a in call.split(", "))}
    pipe = DiffusionPipeline.from_pretrained(exported, local_files_only=True)
    extra = {"height": r, "width": r} if family in ("sd15", "sdxl") else {}
    theirs = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(3), **kwargs, **extra).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (r, r, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_without_a_preset_the_tap_error_names_the_familys_preset(captioned, tmp_path, capsys):
    folder = flow_pipelines.sd3(tmp_path / "sd3")
    capsys.readouterr()
    assert cli.main(["distill", "--teacher", str(folder), "--out", str(tmp_path / "run"), "--no-progress",
                     f"data={captioned}", "text.resolution=16"]) == 2  # the digits preset's taps [8, 4]
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("this sd3 teacher's preset sets them: --config sd35")
