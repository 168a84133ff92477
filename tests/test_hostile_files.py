"""Hostile and careless files (issue 18, items 1, 2, 3, 6, 7): nothing runs code from a file fdistill reads, and
nothing fdistill writes goes through a symlink planted where it writes. Every attack file is built here."""

import hashlib
import io
import json
import os
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image
from torch import nn

import fdistill
from fdistill.apps import cli
from fdistill.evaluation import inception
from fdistill.evaluation.inception import STATE_DICT_NAME, TORCHSCRIPT_NAME

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning",
                                        "ignore:`torch.jit.save` is deprecated:DeprecationWarning",
                                        "ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip()


# -- 1. a TorchScript file given as the Inception weights -----------------------------------------------------
class Planted(nn.Module):
    """A TorchScript archive whose ``__setstate__`` (run by torch.jit.load) creates ``marker`` through
    torch.from_file(shared=True): any file of the user's could be written the same way."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> list[str]:
        return [self.marker]

    @torch.jit.export
    def __setstate__(self, state: list[str]) -> None:
        t = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        self.marker = state[0] + str(int(t.sum()))  # used, so that the call is not dropped
        self.training = False


def planted_archive(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Planted(str(marker))).save(str(path))
    return path


def test_the_planted_archive_does_run_code_when_loaded(tmp_path):
    """The attack is real: torch.jit.load itself runs the archive's __setstate__."""
    marker = tmp_path / "ran"
    archive = planted_archive(tmp_path / "x.pt", marker)
    assert not marker.exists()  # saving did not run it
    torch.jit.load(str(archive))
    assert marker.read_bytes() == b"AAAA"


def test_an_unknown_torchscript_inception_file_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    folder = tmp_path / "weights"
    archive = planted_archive(folder / TORCHSCRIPT_NAME, marker)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setenv("FDISTILL_CACHE", str(folder))  # the cache folder holds it too
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    monkeypatch.delenv("FDISTILL_INCEPTION_SHA256", raising=False)

    def refused(load, **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert one_line(msg) and str(archive) in msg and digest in msg
        assert "safetensors" in msg and "weights_only=True" in msg and STATE_DICT_NAME in msg
        assert "FDISTILL_INCEPTION_SHA256" in msg
        assert not marker.exists()

    refused(lambda: inception.load_inception(archive))  # --inception FILE
    refused(lambda: inception.load_inception(folder))  # --inception FOLDER
    refused(inception.load_inception)  # the cache folder
    refused(inception.load_inception, **{inception.ENV_VAR: str(archive)})  # $FDISTILL_INCEPTION
    # the CLI: one line, exit 2, before the samples are read
    rc = cli.main(["evaluate", str(tmp_path / "samples.npz"), "--data", "digits", "--inception", str(archive)])
    err = capsys.readouterr().err
    assert rc == 2 and one_line(err) and digest in err and not marker.exists()


def test_only_the_accepted_digest_loads_and_a_malformed_one_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    archive = planted_archive(tmp_path / TORCHSCRIPT_NAME, marker)
    monkeypatch.setenv(inception.SHA256_ENV_VAR, "0" * 64)  # a verified copy of another file
    with pytest.raises(ValueError, match="not an accepted digest"):
        inception.load_inception(archive)
    monkeypatch.setenv(inception.SHA256_ENV_VAR, "not-a-digest")
    with pytest.raises(ValueError, match="FDISTILL_INCEPTION_SHA256='not-a-digest' is not a sha256 digest"):
        inception.load_inception(archive)
    assert not marker.exists()
    # the user vouches for this very file: it loads (and, being this file, runs its code)
    monkeypatch.setenv(inception.SHA256_ENV_VAR, hashlib.sha256(archive.read_bytes()).hexdigest().upper())
    assert inception.load_inception(archive).kind == "torchscript" and marker.exists()


def test_plain_weights_load_from_safetensors_and_junk_is_one_line(tmp_path):
    from safetensors.torch import save_file

    net = inception.FIDInceptionV3()
    path = tmp_path / "pt_inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ext = inception.load_inception(path)
    assert ext.kind == "state_dict" and torch.equal(ext.net.fc.weight, net.fc.weight)
    (tmp_path / "junk.pth").write_bytes(b"garbage, not a torch file")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for junk in ("junk.pth", "junk.safetensors"):
        with pytest.raises(ValueError) as err:
            inception.load_inception(tmp_path / junk)
        assert one_line(str(err.value)) and junk in str(err.value)


# -- 2. an EPS file named .png ------------------------------------------------------------------------------
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
0 0 moveto 8 8 lineto stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that leaves a marker whenever it runs; PIL looks for Ghostscript afresh."""
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 0\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def png_bytes(seed: int = 0, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.skipif(sys.platform.startswith("win"), reason="a shell script as gs")
def test_pil_without_formats_does_run_ghostscript(tmp_path, fake_ghostscript):
    """The danger is real: a plain Image.open of the EPS hands it to `gs`."""
    (tmp_path / "x.png").write_bytes(EPS)
    with pytest.raises(Exception), Image.open(tmp_path / "x.png") as img:  # noqa: B017 (whatever PIL raises)
        img.load()
    assert fake_ghostscript.exists()


@pytest.mark.skipif(sys.platform.startswith("win"), reason="a shell script as gs")
def test_an_eps_named_png_is_refused_by_every_image_reader(tmp_path, fake_ghostscript, monkeypatch):
    from fdistill.data.captions import CaptionDataWarning, open_captions
    from fdistill.data.datasets import load_dataset
    from fdistill.io import open_image

    # an image folder dataset
    data = tmp_path / "data"
    data.mkdir()
    (data / "000.png").write_bytes(png_bytes())
    (data / "x.png").write_bytes(EPS)
    with pytest.raises(ValueError) as err:
        load_dataset(str(data))
    assert not fake_ghostscript.exists()
    assert one_line(str(err.value)) and "x.png" in str(err.value) and "PNG, JPEG" in str(err.value)
    with pytest.raises(ValueError, match="x.png: not an image format"):
        open_image(data / "x.png")

    # captioned images: a folder and a WebDataset shard, skipped (on_error="skip") or refused ("raise")
    caps = tmp_path / "captions"
    caps.mkdir()
    for key, payload in (("a", png_bytes(1)), ("x", EPS)):
        (caps / f"{key}.png").write_bytes(payload)
        (caps / f"{key}.txt").write_text(f"caption {key}")
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for name in sorted(os.listdir(caps)):
            tf.add(caps / name, arcname=name)
    for source in (caps, shard):
        ds = open_captions(source, 8)
        with pytest.warns(CaptionDataWarning, match="x.png|sample x: cannot decode the image: not an image format"):
            got = [ds[i][2] for i in range(len(ds))]
        assert all(w.endswith(("a.png", ":a")) for w in got) and ds.skipped == 1
        with pytest.raises(ValueError) as err:
            open_captions(source, 8, on_error="raise")[1]
        assert one_line(str(err.value)) and "not an image format" in str(err.value)

    # evaluate-t2i's reference folder (COCO's val2014/)
    from fdistill.apps import evaluate_t2i

    class Extractor:
        path, kind = tmp_path / "weights.pth", "state_dict"

        def __call__(self, x):
            return x.float().flatten(1)[:, :4]

    Extractor.path.write_bytes(b"w")
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "val2014"
    ref.mkdir()
    (ref / "COCO_0.png").write_bytes(png_bytes(2))
    (ref / "COCO_1.png").write_bytes(EPS)
    with pytest.raises(ValueError) as err:
        evaluate_t2i.reference_statistics(str(ref), evaluate_t2i.Scorers(inception=Extractor()), progress=False)
    assert one_line(str(err.value)) and "COCO_1.png" in str(err.value)
    assert not fake_ghostscript.exists()


# -- 3. a torch whose weights_only loads TorchScript ----------------------------------------------------------
def test_an_affected_torch_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    for old in ("2.5.1", "2.1.0+cu121", "1.13.1", "garbage"):
        with pytest.raises(ImportError) as err:
            fdistill.require_torch(old)
        msg = str(err.value)
        assert one_line(msg) and "torch>=2.6" in msg and old in msg and "CVE-2025-32434" in msg
    for fixed in ("2.6.0", "2.13.0+cpu", "2.10.0a0+git1234", "3.0"):
        fdistill.require_torch(fixed)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ImportError, match="found torch 2.5.1"):
        fdistill.require_torch()
    rc = cli.main(["evaluate", str(tmp_path / "samples.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and one_line(err) and "torch>=2.6" in err


def test_pyproject_requires_an_unaffected_torch():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    torch_req = [d for d in project["dependencies"] if d.replace(" ", "").startswith("torch")]
    assert torch_req == ["torch>=2.6"]


# -- 6. export copies only the regular files of the teacher folder --------------------------------------------
@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import t2i_pipelines

    return t2i_pipelines.sd15(tmp_path_factory.mktemp("pipes") / "sd15")


def test_export_leaves_out_symlinks_naming_each(sd15_folder, tmp_path, monkeypatch):
    import shutil

    from fdistill.teachers.families.stable_diffusion import export_pipeline, load_stable_diffusion

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"the user's private key"
    (outside / "id_rsa").write_bytes(secret)
    teacher = tmp_path / "teacher"
    shutil.copytree(sd15_folder, teacher)
    (teacher / "tokenizer" / "notes.txt").symlink_to(outside / "id_rsa")
    (teacher / "extras").symlink_to(outside, target_is_directory=True)
    sd = load_stable_diffusion(teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_pipeline(sd.denoiser, teacher, tmp_path / "exported")
    said = [str(w.message) for w in caught if "symlink" in str(w.message)]
    assert any(str(teacher / "tokenizer" / "notes.txt") in m for m in said)
    assert any(str(teacher / "extras") in m for m in said) and len(said) == 2
    files = [p for p in out.rglob("*")]
    assert not any(p.is_symlink() for p in files)
    assert all(secret not in p.read_bytes() for p in files if p.is_file())
    assert not (out / "extras").exists() and not (out / "tokenizer" / "notes.txt").exists()
    for part in ("model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (out / part).exists(), part


def test_export_from_a_hugging_face_snapshot_copies_its_blobs(sd15_folder, tmp_path, monkeypatch):
    """huggingface_hub stores every file of a snapshot as a link into the repository's blobs/: those are part
    of the model and are copied as files; a link elsewhere is still left out."""
    from fdistill.teachers.families.stable_diffusion import export_pipeline, load_stable_diffusion

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--tiny--sd15"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    blobs.mkdir(parents=True)
    for src in sorted(p for p in sd15_folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / src.relative_to(sd15_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (tmp_path / "secret").write_bytes(b"secret")
    (snapshot / "vae" / "extra.bin").symlink_to(tmp_path / "secret")
    sd = load_stable_diffusion(snapshot)
    with pytest.warns(UserWarning, match=r"extra\.bin: a symlink"):
        out = export_pipeline(sd.denoiser, snapshot, tmp_path / "exported")
    config = out / "vae" / "config.json"
    assert config.is_file() and not config.is_symlink()
    assert config.read_bytes() == (sd15_folder / "vae" / "config.json").read_bytes()
    assert not (out / "vae" / "extra.bin").exists()


# -- 7. writes never follow a link planted in the run folder --------------------------------------------------
@pytest.fixture
def planted(tmp_path):
    """plant(folder, name): a symlink folder/name -> outside/<name>, whose target holds a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def plant(folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        target = outside / name
        target.write_bytes(b"secret " + name.encode())
        (folder / name).symlink_to(target)
        return target

    return plant


def replaced(folder: Path, name: str, target: Path) -> bool:
    """The link is gone (a regular file in its place) and the file it pointed to is untouched."""
    path = folder / name
    return path.is_file() and not path.is_symlink() and target.read_bytes() == b"secret " + name.encode()


def test_image_writers_replace_planted_links(tmp_path, planted):
    from fdistill.apps import images, t2i
    from fdistill.data.writers import save_image_grid, write_edm_zip

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    run = tmp_path / "run"
    targets = {name: planted(run, name) for name in ("samples.png", "samples.npz", "grid.png", "data.zip")}
    save_image_grid(x, run / "samples.png")  # what train-teacher writes
    images.write_samples(run, x, torch.eye(2)[[0, 1, 0, 1]])
    write_edm_zip(run / "data.zip", (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy(), None)
    for name, target in targets.items():
        assert replaced(run, name, target), name
    with np.load(run / "samples.npz") as f:
        assert f["images"].shape == (4, 3, 8, 8) and f["labels"].tolist() == [0, 1, 0, 1]
    with Image.open(run / "grid.png", formats=["PNG"]) as img:
        assert img.size[0] > 8

    samples = tmp_path / "t2i" / "samples"
    targets = {name: planted(samples, name) for name in ("prompts.txt", "000000.png")}
    t2i.write_pngs(x[:2], ["a cat", "a dog"], samples, seed=5)
    for name, target in targets.items():
        assert replaced(samples, name, target), name
    assert (samples / "prompts.txt").read_text() == "000000\t5\ta cat\n000001\t6\ta dog\n"


def test_json_and_array_outputs_replace_planted_links(tmp_path, planted, monkeypatch, capsys):
    from fdistill.apps import lab2d
    from fdistill.evaluation import evaluate

    out = tmp_path / "out"
    target = planted(out, "metrics.json")
    monkeypatch.setattr(evaluate, "evaluate_file", lambda *a, **k: {"feature_space": "digits", "fid": 1.5})
    assert cli.main(["evaluate", str(tmp_path / "samples.npz"), "--json", str(out / "metrics.json")]) == 0
    assert replaced(out, "metrics.json", target)
    assert json.loads((out / "metrics.json").read_text())["fid"] == 1.5

    target = planted(out, "reference.npy")
    lab2d._save_npy(out / "reference.npy", np.arange(3.0))
    assert replaced(out, "reference.npy", target)
    np.testing.assert_array_equal(np.load(out / "reference.npy"), np.arange(3.0))
