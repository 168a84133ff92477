"""EDM snapshot pickles load without NVlabs/edm's code and without running anything in the file."""

import pickle

import pytest
import torch
from edm_format import write_snapshot

from fdistill.networks import edm
from fdistill.teachers.edm_pickle import load_edm_pickle

KWARGS = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13)


def test_edm_format_pickle_loads_and_matches(tmp_path, persistence_module):
    torch.manual_seed(0)
    net = edm.EDMPrecond(**KWARGS).eval()
    path = tmp_path / "network-snapshot.pkl"
    write_snapshot(path, net, persistence_module._reconstruct_persistent_obj, KWARGS)
    assert b"os.system" in path.read_bytes()  # the source text is in the file, as in EDM's pickles

    loaded, precond, kwargs = load_edm_pickle(path)
    assert precond == "EDMPrecond" and kwargs == KWARGS
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0]), torch.eye(4)[:2]
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_malicious_pickle_is_refused_without_side_effects(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_missing_network_and_file_errors(tmp_path):
    path = tmp_path / "empty.pkl"
    path.write_bytes(pickle.dumps({"loss_fn": None}))
    with pytest.raises(ValueError, match="'ema'"):
        load_edm_pickle(path)
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(tmp_path / "nope.pkl")


def test_distill_accepts_an_edm_pickle_teacher(tmp_path, persistence_module):
    """`fdistill distill --teacher x.pkl` path: the image pipeline builds its distiller from the pickle."""
    from fdistill.apps import distill, images
    from fdistill.apps.cli import DIGITS_PRESET
    from fdistill.training.loop import training_loop

    kwargs = dict(KWARGS, img_channels=1, label_dim=10, augment_dim=0)
    torch.manual_seed(0)
    net = edm.EDMPrecond(**kwargs).eval()
    write_snapshot(tmp_path / "t.pkl", net, persistence_module._reconstruct_persistent_obj, kwargs)
    cfg = images.load_config(DIGITS_PRESET, ["distill.batch_size=4", "distill.iterations=2", "disc_hidden=8"])
    d = distill.make_distiller(cfg, tmp_path / "t.pkl")
    training_loop(d, progress=False)
    assert d.iteration == 2 and d.info["network"]["model_channels"] == 8
