import pytest
import torch
from edm_format import install_persistence_module

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
