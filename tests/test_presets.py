"""The paper's recipes (Table 5): configs/cifar10.yaml and configs/imagenet64.yaml carry its values,
and each runs a few iterations with a tiny teacher and data in the real formats (an EDM snapshot
pickle; CIFAR-10 python batches or an EDM dataset zip)."""

import pickle

import numpy as np
import pytest
import torch
from edm_format import write_snapshot

from fdistill.apps import distill, images
from fdistill.config import PRESETS, to_dict
from fdistill.data.writers import write_edm_zip
from fdistill.networks import edm
from fdistill.training.loop import training_loop

# Table 5 (and NVlabs/FastGen where the table is silent: ratio EMA, generator EMA)
TABLE5 = {
    "cifar10": dict(batch_size=2048, tau=5, gan_weight=1e-3, iterations=60000, lr=1e-4, lr_stages=[],
                    weight_decay=1e-2, r1_gamma=1.0, divergence="forward_kl", ratio_ema=0.0),
    "imagenet64": dict(batch_size=512, tau=5, gan_weight=3e-3, iterations=380000, lr=2e-6,
                       lr_stages=[[200000, 5e-7]], weight_decay=1e-2, r1_gamma=0.0, divergence="js", ratio_ema=0.5),
}
DISC = {"cifar10": [32, 16, 8], "imagenet64": [8]}

TINY = {  # the official teachers' families, scaled down
    "cifar10": dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=8,
                    channel_mult=[1, 1, 1], num_blocks=1, attn_resolutions=[16], augment_dim=9, dropout=0.13),
    "imagenet64": dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                       model_channels=8, channel_mult=[1, 1, 1, 1], num_blocks=1, attn_resolutions=[8],
                       dropout=0.1, use_fp16=True),
}
RUN = ["distill.batch_size=4", "distill.micro_batch=2", "distill.iterations=6", "distill.log_every=1"]


@pytest.mark.parametrize("name", TABLE5)
def test_preset_carries_table5(name):
    cfg = images.load_config(PRESETS / f"{name}.yaml")
    got = to_dict(cfg.distill)
    assert {k: got[k] for k in TABLE5[name]} == TABLE5[name]
    assert cfg.disc_resolutions == DISC[name] and cfg.guidance == 1.0


def cifar_batches(root, n=6):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(2):
        batch = {b"data": rng.integers(0, 256, (n // 2, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n // 2).tolist(), b"batch_label": b"x"}
        (root / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    return root


def edm_zip(path, resolution, labels):
    images_ = np.random.default_rng(0).integers(0, 256, (len(labels), 3, resolution, resolution), dtype=np.uint8)
    return write_edm_zip(path, images_, np.array(labels))


def teacher_pickle(path, name, hook):
    torch.manual_seed(0)
    write_snapshot(path, edm.EDMPrecond(**TINY[name]).eval(), hook, TINY[name])
    return path


@pytest.mark.parametrize("name, data", [("cifar10", "batches"), ("cifar10", "zip"), ("imagenet64", "zip")])
def test_preset_runs_with_a_tiny_teacher(tmp_path, persistence_module, name, data):
    teacher = teacher_pickle(tmp_path / "teacher.pkl", name, persistence_module._reconstruct_persistent_obj)
    if data == "batches":
        path = cifar_batches(tmp_path / "cifar-10-batches-py")
    else:  # ImageNet labels of a small subset still index the teacher's 1000 classes
        path = edm_zip(tmp_path / "data.zip", TINY[name]["img_resolution"], [0, 3, 7, 5] if name == "imagenet64"
                       else [0, 9, 3, 1])
    stages = ["distill.lr_stages=[[3, 5.0e-7]]"] if name == "imagenet64" else []
    cfg = images.load_config(PRESETS / f"{name}.yaml", [f"data={path}", *RUN, *stages])
    d = distill.make_distiller(cfg, teacher)
    assert len(d.passes) == 2  # batch 4 in two accumulated passes
    history = training_loop(d, run_dir=tmp_path / "run", progress=False)
    assert d.iteration == 6 and [h["kind"] for h in history].count("student") == 2
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    assert d.sample_cond(3, slice(None)).shape == (3, TINY[name]["label_dim"])
    if name == "imagenet64":
        assert d.opt_g.param_groups[0]["lr"] == 5e-7
    net, student, teacher = distill.load_generator(tmp_path / "run")
    info = teacher.info
    res = info["network"]["img_resolution"]
    x, _ = images.generate(net, 2, (3, res, res), info["network"]["label_dim"], student)
    assert res == TINY[name]["img_resolution"] and x.shape == (2, 3, res, res) and x.isfinite().all()


def test_presets_load_by_name():
    assert images.load_config("imagenet64") == images.load_config(PRESETS / "imagenet64.yaml")
    with pytest.raises(FileNotFoundError, match="cifar10"):  # the message lists the presets
        images.load_config("no-such-preset")
