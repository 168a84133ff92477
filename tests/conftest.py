import pytest
import torch
from edm_format import install_persistence_module
from tiny import TINY

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Keep cached artefacts (the digits classifier) out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FDISTILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def persistence_module(monkeypatch):
    """A stand-in for NVlabs/edm's torch_utils.persistence (see edm_format)."""
    return install_persistence_module(monkeypatch)


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A digits teacher trained for 3 iterations by `fdistill train-teacher` (its run folder's teacher file)."""
    from fdistill.apps import cli

    out = tmp_path_factory.mktemp("teacher")
    assert cli.main(["train-teacher", "--out", str(out), "--no-progress", "teacher.iterations=3", *TINY]) == 0
    return out / "teacher.safetensors"


@pytest.fixture(scope="session")
def captioned(tmp_path_factory):
    """Five captioned random images (20 x 24 PNG + .txt): text-to-image data for the tiny pipelines."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "a blue circle", "a green stripe", "a yellow dot", "a white cross"]):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder
