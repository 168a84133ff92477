import pytest
import torch

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
