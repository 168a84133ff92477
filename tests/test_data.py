import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data.datasets import ImageDataset, load_dataset
from fdistill.data.sampler import ImageSampler
from fdistill.data.writers import save_image_grid, write_edm_zip


def random_images(n=12, c=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8), rng.integers(0, 4, size=n).astype(np.int64)


def save_png(img, path):
    """uint8 (C, H, W) to a PNG file, independent of fdistill's writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(path)


def write_folder(root, images, labels=None, names=None):
    names = names or [f"{'a' if i % 2 else 'b'}/img{i:03d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        save_png(img, root / name)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels)]}))
    return sorted(names)


def test_digits():
    d = load_dataset("digits", resolution=8, require_labels=True)
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.uint8 and len(d) == 1797
    assert d.labels.dtype == np.int64 and set(d.labels.tolist()) == set(range(10)) and d.label_dim == 10
    assert d.images.max() == 255 and (d.resolution, d.channels) == (8, 1)


@pytest.mark.parametrize("c", [3, 1])
def test_folder_round_trip(tmp_path, c):
    images, labels = random_images(c=c)
    names = write_folder(tmp_path, images, labels)
    d = load_dataset(tmp_path)
    order = [names.index(f"{'a' if i % 2 else 'b'}/img{i:03d}.png") for i in range(len(images))]
    np.testing.assert_array_equal(d.images[order], images)
    np.testing.assert_array_equal(d.labels[order], labels)
    assert d.label_dim == labels.max() + 1 and d.channels == c


def test_folder_unlabeled_and_null_labels(tmp_path):
    images, _ = random_images(n=3, c=1)
    write_folder(tmp_path, images)
    assert load_dataset(tmp_path).labels is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    d = load_dataset(tmp_path)
    assert d.labels is None and d.label_dim == 0


def test_folder_converts_modes(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "y.png")
    d = load_dataset(tmp_path)
    assert d.images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(d.images[0], rgba[..., :3].transpose(2, 0, 1))


@pytest.mark.parametrize("c", [3, 1])
def test_edm_zip_round_trip(tmp_path, c):
    images, labels = random_images(c=c)
    path = write_edm_zip(tmp_path / "data.zip", images, labels)
    with zipfile.ZipFile(path) as zf:
        assert "00000/img00000000.png" in zf.namelist()
        assert json.loads(zf.read("dataset.json"))["labels"][1] == ["00000/img00000001.png", int(labels[1])]
    d = load_dataset(path, resolution=8)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, labels)
    unlabeled = load_dataset(write_edm_zip(tmp_path / "u.zip", images, None))
    np.testing.assert_array_equal(unlabeled.images, images)
    assert unlabeled.labels is None


def test_edm_zip_deflated(tmp_path):
    images, labels = random_images(n=4)
    src = write_edm_zip(tmp_path / "a.zip", images, labels)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    d = load_dataset(tmp_path / "b.zip")
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, labels)


def test_npz_round_trips(tmp_path):
    images, labels = random_images()
    np.savez(tmp_path / "nhwc.npz", images=images.transpose(0, 2, 3, 1), labels=labels)
    np.savez(tmp_path / "float.npz", x=images.astype(np.float32) / 127.5 - 1, y=labels)
    np.savez(tmp_path / "unit.npz", x=images.astype(np.float32) / 255)
    np.save(tmp_path / "gray.npy", images[:, 0])
    for name in ("nhwc.npz", "float.npz"):
        d = load_dataset(tmp_path / name)
        np.testing.assert_array_equal(d.images, images)
        np.testing.assert_array_equal(d.labels, labels)
    np.testing.assert_array_equal(load_dataset(tmp_path / "unit.npz").images, images)
    gray = load_dataset(tmp_path / "gray.npy")
    np.testing.assert_array_equal(gray.images, images[:, :1])
    assert gray.labels is None


# -- errors -------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*not found.*'digits', a folder of images"):
        load_dataset(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=rf"no images found in {re.escape(str(tmp_path))} \(looked for \.png, \.jpg"):
        load_dataset(tmp_path)


def test_different_sizes(tmp_path):
    save_png(np.zeros((3, 8, 8), np.uint8), tmp_path / "a.png")
    save_png(np.zeros((3, 16, 16), np.uint8), tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"must share one size.*b\.png is 3x16x16 but a\.png is 3x8x8"):
        load_dataset(tmp_path)
    (tmp_path / "b.png").unlink()
    save_png(np.zeros((1, 8, 8), np.uint8), tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"c\.png is 1x8x8 but a\.png is 3x8x8"):
        load_dataset(tmp_path)


def test_wrong_resolution(tmp_path):
    images, _ = random_images(n=2)
    path = write_edm_zip(tmp_path / "d.zip", images, None)
    with pytest.raises(ValueError, match=r"d\.zip has 3x8x8 images, expected resolution 32.*does not resize"):
        load_dataset(path, resolution=32)


def test_label_errors(tmp_path):
    images, labels = random_images(n=3)
    names = write_folder(tmp_path, images, labels)
    meta = tmp_path / "dataset.json"
    entries = [[n, 0] for n in names]
    meta.write_text(json.dumps({"labels": entries + [["ghost.png", 1]]}))
    with pytest.raises(ValueError, match=r"dataset\.json has a label for 'ghost\.png', which is not an image"):
        load_dataset(tmp_path)
    meta.write_text(json.dumps({"labels": entries[1:]}))
    with pytest.raises(ValueError, match=rf"dataset\.json has no label for image '{re.escape(names[0])}'"):
        load_dataset(tmp_path)
    meta.write_text(json.dumps({"labels": [[n, "cat"] for n in names]}))
    with pytest.raises(ValueError, match=r"dataset\.json: label of .* is 'cat'; expected a non-negative integer"):
        load_dataset(tmp_path)
    np.savez(tmp_path / "f.npz", images=images, labels=labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"f\.npz: labels must be integers"):
        load_dataset(tmp_path / "f.npz")


def test_require_labels(tmp_path):
    images, _ = random_images(n=2)
    path = write_edm_zip(tmp_path / "u.zip", images, None)
    expected = 'u.zip has no labels: class-conditional training needs dataset.json with {"labels": [[filename, class]'
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_dataset(path, require_labels=True)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 8, 8), np.uint8), target=np.zeros(2))
    with pytest.raises(ValueError, match=r"k\.npz has no 'images' or 'x' array \(found keys \['pixels', 'target'\]"):
        load_dataset(tmp_path / "k.npz")
    np.save(tmp_path / "r.npy", np.zeros((2, 8), np.uint8))
    with pytest.raises(ValueError, match=r"r\.npy: images have shape \(2, 8\) \(rank 2\); expected \(N, H, W\)"):
        load_dataset(tmp_path / "r.npy")
    np.save(tmp_path / "v.npy", np.full((2, 8, 8), 300.0))
    with pytest.raises(ValueError, match=r"v\.npy: float images must lie in"):
        load_dataset(tmp_path / "v.npy")


# -- CIFAR-10 batches ---------------------------------------------------------------------------
def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    labels = [0, 9, 3, 3, 1, 2]
    for i, protocol in zip(range(2), (2, 4)):  # Python 3 protocol 2 stores bytes via _codecs.encode
        batch = {b"data": data[3 * i:3 * i + 3], b"labels": labels[3 * i:3 * i + 3], b"batch_label": b"x"}
        (tmp_path / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=protocol))
    d = load_dataset(tmp_path, resolution=32, require_labels=True)
    np.testing.assert_array_equal(d.images, data.reshape(6, 3, 32, 32))
    assert d.labels.tolist() == labels and d.label_dim == 10


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_globals(tmp_path):
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil(marker)}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_1: refusing to unpickle global (posix|os|nt)\.system"):
        load_dataset(tmp_path)
    assert not marker.exists()


# -- sampler and grids --------------------------------------------------------------------------
def coded_dataset(n=40, classes=5):
    """Image i is constant 50 * label[i]: the pixels encode the label."""
    labels = np.arange(n, dtype=np.int64) % classes
    images = np.broadcast_to((labels * 50).astype(np.uint8)[:, None, None, None], (n, 1, 4, 4)).copy()
    return ImageDataset(images, labels, classes, "coded")


def test_sampler_batches():
    sampler = ImageSampler(coded_dataset(), seed=3)
    x, y = sampler(64)
    assert x.shape == (64, 1, 4, 4) and x.dtype == torch.float32 and y.shape == (64, 5) and y.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(y.sum(1), torch.ones(64))
    pixel_label = ((x[:, 0, 0, 0] + 1) * 127.5 / 50).round().long()
    assert torch.equal(pixel_label, y.argmax(1))
    assert torch.equal(x, x[:, :, :1, :1].expand_as(x))


def test_sampler_unconditional():
    d = coded_dataset()
    sampler = ImageSampler(ImageDataset(d.images, None, 0, "u"))
    x, y = sampler(5)
    assert x.shape == (5, 1, 4, 4) and y is None and sampler.sample_cond(5) is None


def test_sampler_seed_and_resume():
    d = coded_dataset()
    a, b = ImageSampler(d, seed=7), ImageSampler(d, seed=7)
    for _ in range(2):
        xa, ya = a(8)
        xb, yb = b(8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ImageSampler(d, seed=8)(8)[0], ImageSampler(d, seed=7)(8)[0])
    state = a.state_dict()
    assert state["generator"].dtype == torch.uint8
    x1, y1 = a(8)
    l1 = a.sample_cond(8)
    c = ImageSampler(d, seed=0)
    c.load_state_dict({k: v.clone() for k, v in state.items()})
    x2, y2 = c(8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(l1, c.sample_cond(8))


def test_sample_labels_uniform():
    labels = ImageSampler(coded_dataset(), seed=1).sample_cond(5000)
    assert labels.shape == (5000, 5) and torch.equal(labels.sum(1), torch.ones(5000))
    counts = labels.sum(0)
    assert ((counts - 1000).abs() < 120).all()


@pytest.mark.parametrize("nrow, size", [(None, (4 * 9 - 1, 3 * 9 - 1)), (5, (5 * 9 - 1, 2 * 9 - 1)),
                                        (10, (10 * 9 - 1, 8))])
def test_save_image_grid(tmp_path, nrow, size):
    x = torch.rand(10, 3, 8, 8) * 2 - 1
    path = save_image_grid(x, tmp_path / "sub" / "grid.png", nrow=nrow)
    with Image.open(path) as img:
        assert img.size == size and img.mode == "RGB"
        first = np.asarray(img)[:8, :8].transpose(2, 0, 1)
        assert (np.asarray(img)[:, 8] == 255).all()  # a one-pixel white gap between columns
    np.testing.assert_array_equal(first, ((x[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def test_save_image_grid_uint8_gray(tmp_path):
    images = coded_dataset(n=6).images
    with Image.open(save_image_grid(images, tmp_path / "g.png", nrow=3, gap=0)) as img:
        assert img.size == (12, 8) and img.mode == "L"
        grid = np.asarray(img)
    for i in range(6):  # image i sits at row i // 3, column i % 3
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[4 * r:4 * r + 4, 4 * c:4 * c + 4], images[i, 0])


def test_save_image_grid_scales_cells_and_labels_columns(tmp_path):
    images = coded_dataset(n=6).images  # 4x4 gray
    with Image.open(save_image_grid(images, tmp_path / "g.png", nrow=3, scale=2, column_labels=["0", "1", "2"])) as img:
        grid = np.asarray(img)
    assert grid.shape == (12 + 2 * 9 - 1, 3 * 9 - 1)  # a 12-pixel label strip, cells of 8 px, 1-pixel gaps
    assert (grid[:12] < 255).any()  # the labels are drawn
    np.testing.assert_array_equal(grid[12 + 9:12 + 17, 9:17], images[4, 0].repeat(2, 0).repeat(2, 1))
