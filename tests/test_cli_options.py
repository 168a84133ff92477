"""A teacher's family options reach it wherever a teacher folder is opened from the command line: `prepare-latents`
and `sample --teacher` take `--config` and KEY=VALUE overrides as `distill` does (teacher_options.*,
text.resolution), refuse a bad option in one line, and `sample --checkpoint` refuses them (its checkpoint has its
own)."""

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402

from fdistill.apps import cli  # noqa: E402
from fdistill.data.latent_shards import LatentShards  # noqa: E402

MSL = 8  # T5 tokens: SD3's embeddings are CLIP's 77 then T5's MSL


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return flow_pipelines.sd3(tmp_path_factory.mktemp("flow") / "sd3")


def test_prepare_latents_takes_teacher_options_and_text_resolution(sd3, captioned, tmp_path, capsys):
    base = ["prepare-latents", "--teacher", str(sd3), "--data", str(captioned), "--batch", "2", "--no-progress"]
    out = tmp_path / "latents"
    assert cli.main([*base[:3], f"teacher_options.max_sequence_length={MSL}", *base[3:], "--out", str(out),
                     "text.resolution=16"]) == 0
    line = capsys.readouterr().out
    assert f"data={out} teacher_options.max_sequence_length={MSL} ..." in line  # training must use the same
    shards = LatentShards(out)
    assert len(shards) == 5 and shards.tensors["embeds"][0] == (77 + MSL, 48)
    assert shards.tensors["latents"][0] == (4, 8, 8)  # 16 pixels: 8 x 8 latents
    # --resolution wins over text.resolution: 8 pixels, 4 x 4 latents
    small = tmp_path / "small"
    assert cli.main([*base, "--out", str(small), "text.resolution=16", "--resolution", "8"]) == 0
    assert LatentShards(small).tensors["latents"][0] == (4, 4, 4)
    assert LatentShards(small).tensors["embeds"][0] == (77 + 256, 48)  # no options: the family's default
    # --config presets are read as distill reads them, the overrides over them
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"teacher_options": {"max_sequence_length": 4}}))
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "x"), "--config", str(preset), "--print-config",
                     "text.resolution=16"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["teacher_options"] == {"max_sequence_length": 4} and cfg["text"]["resolution"] == 16
    assert not (tmp_path / "x").exists()


def test_a_bad_teacher_option_fails_in_one_line_naming_it(sd3, captioned, tmp_path, capsys):
    assert cli.main(["prepare-latents", "--teacher", str(sd3), "--data", str(captioned), "--out",
                     str(tmp_path / "latents"), "teacher_options.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdistill prepare-latents: error:") and "nope" in err and err.count("\n") == 1
    assert cli.main(["sample", "--teacher", str(sd3), "--prompt", "a cat", "--out", str(tmp_path / "s"),
                     "teacher_options.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdistill sample: error:") and "nope" in err and err.count("\n") == 1


def test_sample_teacher_takes_options_and_checkpoint_refuses_them(sd3, tmp_path, capsys, monkeypatch):
    from fdistill.apps import sample

    opened = []

    def open_teacher(path, resolution=None, options=None):
        opened.append((resolution, options))
        raise ValueError("stop here")

    monkeypatch.setattr(sample, "open_teacher", open_teacher)
    assert cli.main(["sample", "--teacher", str(sd3), "--prompt", "a cat", f"teacher_options.max_sequence_length={MSL}",
                     "--out", str(tmp_path / "s"), "text.resolution=16"]) == 2
    assert cli.main(["sample", "--teacher", str(sd3), "--prompt", "a cat", "--out", str(tmp_path / "s")]) == 2
    assert opened == [(16, {"max_sequence_length": MSL}), (None, None)]  # nothing given: as before
    capsys.readouterr()
    assert cli.main(["sample", "--teacher", str(sd3), "--print-config", "teacher_options.max_sequence_length=8"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["teacher_options"] == {"max_sequence_length": MSL}
    for extra in (["teacher_options.max_sequence_length=8"], ["--config", "digits"], ["--print-config"]):
        assert cli.main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "a cat", *extra]) == 2
        err = capsys.readouterr().err
        assert "a --checkpoint's are those it was distilled with" in err and err.count("\n") == 1


def test_sample_teacher_options_reach_the_text_encoder(sd3, tmp_path, capsys):
    """End to end: sampling the SD3 teacher with a T5 length of MSL (2 Heun steps, one prompt)."""
    out = tmp_path / "samples"
    assert cli.main(["sample", "--teacher", str(sd3), "--prompt", "a red square", "--steps", "2", "--out", str(out),
                     "--no-progress", f"teacher_options.max_sequence_length={MSL}", "text.resolution=16"]) == 0
    assert "wrote 1 PNGs" in capsys.readouterr().out
    assert np.asarray(Image.open(out / "000000.png")).shape == (16, 16, 3)
