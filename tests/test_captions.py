import io
import json
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data.captions import CaptionDataWarning, open_captions
from fdistill.data.latent_shards import LatentSampler, LatentShards, LatentShardWriter
from fdistill.data.sampler import CaptionSampler, PromptSampler
from fdistill.data.tar_index import expand_braces
from fdistill.data.transforms import resize_center_crop

CAPTIONS = ["a red cat", "two dogs on a beach", "a bowl of soup, photo", "city at night", "ünïcode caption"]


def encode(img, fmt):
    """uint8 (H, W, 3) to image bytes, independent of fdistill."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def tiny_samples(n=5):
    """n (key, 20x24 image bytes, caption): PNG and JPEG alternating."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        out.append((f"s{i:03d}", ext, encode(img, fmt), CAPTIONS[i % len(CAPTIONS)]))
    return out


def add_member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path, samples, skip=()):
    """A WebDataset shard: per sample <key>.<ext> and <key>.txt, plus a .json member readers must ignore."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, ext, data, caption in samples:
            if (key, ext) not in skip:
                add_member(tf, f"{key}.{ext}", data)
            if (key, "txt") not in skip:
                add_member(tf, f"{key}.txt", caption.encode())
            add_member(tf, f"{key}.json", b"{}")
    return path


def write_folder(root, samples, skip=()):
    for i, (key, ext, data, caption) in enumerate(samples):
        sub = root / ("a" if i < 3 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        if (key, ext) not in skip:
            (sub / f"{key}.{ext}").write_bytes(data)
        if (key, "txt") not in skip:
            (sub / f"{key}.txt").write_text(caption, encoding="utf-8")
    (root / "README.md").write_text("not a sample")
    return root


@pytest.fixture
def data(tmp_path):
    samples = tiny_samples()
    shards = tmp_path / "shards"
    write_tar(shards / "shard-000000.tar", samples[:3])
    write_tar(shards / "shard-000001.tar", samples[3:])
    folder = write_folder(tmp_path / "folder", samples)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# prompts for the generator\n\n" + "\n".join(s[3] for s in samples) + "\n  \n",
                       encoding="utf-8")
    return samples, shards, folder, prompts


def read_all(ds):
    return [(img, caption) for img, caption, _ in ds]


def test_three_sources_read_the_same_pairs(data):
    samples, shards, folder, prompts = data
    expected = [resize_center_crop(Image.open(io.BytesIO(d)), 16) for _, _, d, _ in samples]
    by_tar, by_folder = open_captions(shards, 16), open_captions(folder, 16)
    one_shard = open_captions(shards / "shard-000001.tar", 16)
    assert (by_tar.kind, by_folder.kind, len(by_tar), len(by_folder), len(one_shard)) == ("tar", "folder", 5, 5, 2)
    for ds in (by_tar, by_folder):
        pairs = read_all(ds)
        assert [c for _, c in pairs] == [s[3] for s in samples]
        for (img, _), want in zip(pairs, expected):
            assert img.dtype == np.uint8 and img.shape == (3, 16, 16)
            np.testing.assert_array_equal(img, want)
        img, caption, where = ds[3]
        np.testing.assert_array_equal(img, expected[3])
        assert caption == samples[3][3] and ds.caption(3) == caption and ds.skipped == 0
    assert by_tar.where(3).endswith("shard-000001.tar:s003") and by_folder.where(3).endswith("b/c/s003.jpg")
    assert [c for _, c in read_all(one_shard)] == [s[3] for s in samples[3:]]
    p = open_captions(prompts)
    assert p.kind == "prompts" and not p.has_images and len(p) == 5
    assert [p.caption(i) for i in range(5)] == [s[3] for s in samples]
    assert p.where(0).endswith("prompts.txt:3")  # line 3: after a comment and a blank line
    with pytest.raises(ValueError, match="prompts file.*no images"):
        p[0]


def test_dataset_pickles_and_reads_after(data):
    _, shards, _, _ = data
    ds = open_captions(shards, 8)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[4][0], ds[4][0])


def test_resize_center_crop_is_exact():
    img = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    out = resize_center_crop(Image.fromarray(img), 20)  # no resize; columns 10..29 kept
    assert out.shape == (3, 20, 20)
    np.testing.assert_array_equal(out[0], np.repeat([[255] * 10 + [0] * 10], 20, axis=0))
    np.testing.assert_array_equal(out[2], np.repeat([[0] * 10 + [255] * 10], 20, axis=0))
    assert not out[1].any()
    # Downscaled: 40x20 -> 20x10 (PIL bicubic), then columns 5..14 of the resized image.
    small = resize_center_crop(Image.fromarray(img), 10)
    want = np.asarray(Image.fromarray(img).resize((20, 10), Image.Resampling.BICUBIC))[:, 5:15].transpose(2, 0, 1)
    np.testing.assert_array_equal(small, want)
    assert (small[0, :, 0] == 255).all() and (small[2, :, -1] == 255).all()
    # Portrait 7x11 -> 7x11 crop rows round((11 - 7) / 2) = 2 .. 8; a gray image comes out RGB.
    tall = np.arange(77, dtype=np.uint8).reshape(11, 7)
    out = resize_center_crop(Image.fromarray(tall), 7)
    assert out.shape == (3, 7, 7)
    np.testing.assert_array_equal(out[1], tall[2:9])


def test_corrupt_image_and_missing_caption_are_skipped(tmp_path):
    samples = tiny_samples()
    samples[1] = (samples[1][0], "jpg", b"not a jpeg at all", samples[1][3])
    shard = write_tar(tmp_path / "bad.tar", samples, skip={("s003", "txt")})
    with pytest.warns(CaptionDataWarning, match=r"bad\.tar: sample s003 has no caption"):
        ds = open_captions(shard, 8)
    assert len(ds) == 4 and ds.skipped == 1  # s003 left out when indexing
    with pytest.warns(CaptionDataWarning, match=r"bad\.tar: sample s001: cannot decode the image"):
        img, caption, where = ds[1]
    assert where.endswith("bad.tar:s002") and caption == samples[2][3] and ds.skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1][2] == where  # known bad: replaced again, not reported again
        assert [w.rsplit(":", 1)[1] for _, _, w in ds] == ["s000", "s002", "s004"]
    assert ds.skipped == 2

    with pytest.raises(ValueError, match=r"bad\.tar: sample s003 has no caption"):
        open_captions(shard, 8, on_error="raise")
    shard2 = write_tar(tmp_path / "bad2.tar", samples)
    ds = open_captions(shard2, 8, on_error="raise")
    with pytest.raises(ValueError, match=r"bad2\.tar: sample s001: cannot decode the image"):
        ds[1]


def test_folder_reports_missing_caption(tmp_path):
    samples = tiny_samples()
    folder = write_folder(tmp_path / "f", samples, skip={("s004", "txt")})
    (folder / "b" / "c" / "orphan.txt").write_text("a caption without image")  # ignored in a folder
    with pytest.warns(CaptionDataWarning, match=r"f: sample b/c/s004\.png has no caption"):
        ds = open_captions(folder, 8)
    assert len(ds) == 4 and ds.skipped == 1
    with pytest.raises(ValueError, match=r"f: sample b/c/s004\.png has no caption"):
        open_captions(folder, 8, on_error="raise")


def test_tar_sample_without_image(tmp_path):
    samples = tiny_samples(3)
    shard = write_tar(tmp_path / "x.tar", samples, skip={("s000", "png")})
    with pytest.warns(CaptionDataWarning, match=r"x\.tar: sample s000 has a caption but no image"):
        assert len(open_captions(shard, 8)) == 2


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    shard = write_tar(tmp_path / "x.tar", tiny_samples())
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.warns(CaptionDataWarning, match=r"cut\.tar: .*truncated tar"):  # the cut, a cut-off sample
        ds = open_captions(cut, 8)
    assert 0 < len(ds) < 5 and all(ds[i][1] == CAPTIONS[i] for i in range(len(ds)))
    with pytest.raises(ValueError, match=r"cut\.tar: truncated tar"):
        open_captions(cut, 8, on_error="raise")


def test_brace_patterns(data):
    assert expand_braces("d/shard-{000000..000002}.tar") == [f"d/shard-00000{i}.tar" for i in range(3)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("{a,{b,c}}", "x{0..2", "{abc}"):
        with pytest.raises(ValueError, match="brace pattern"):
            expand_braces(bad)
    samples, shards, _, _ = data
    ds = open_captions(f"{shards}/shard-{{000000..000001}}.tar", 8)
    assert len(ds) == 5 and [ds.caption(i) for i in range(5)] == [s[3] for s in samples]
    with pytest.raises(FileNotFoundError, match=r"shard-000002\.tar not found \(1 of 3"):
        open_captions(f"{shards}/shard-{{000000..000002}}.tar", 8)


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope not found; expected WebDataset"):
        open_captions(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: expected WebDataset"):
        open_captions(tmp_path / "x.csv")
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match=r"x\.tar is not a readable tar"):
        open_captions(tmp_path / "x.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no samples found in .*empty"):
        open_captions(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_error"):
        open_captions(tmp_path / "empty", on_error="ignore")


def test_caption_sampler_reproducible_resumable_and_parts(data):
    _, shards, _, prompts = data
    ds = open_captions(shards, 8)
    a, b = CaptionSampler(ds, seed=3), CaptionSampler(ds, seed=3)
    x, caps = a(6)
    assert x.dtype == torch.float32 and x.shape == (6, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert len(caps) == 6 and all(isinstance(c, str) for c in caps)
    y, caps_b = b(6)
    assert torch.equal(x, y) and caps == caps_b
    state = a.state_dict()
    want = a(4), a.sample_prompts(3)
    c = CaptionSampler(ds, seed=99)
    c.load_state_dict(pickle.loads(pickle.dumps(state)))
    got = c(4), c.sample_prompts(3)
    assert torch.equal(got[0][0], want[0][0]) and got[0][1] == want[0][1] and got[1] == want[1]
    # Data-parallel ranks draw the same n and keep their part.
    full = CaptionSampler(ds, seed=5)(5)
    parts = [CaptionSampler(ds, seed=5, threads=2)(5, part=slice(r * 2, r * 2 + 2)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0]) and sum((p[1] for p in parts), []) == full[1]
    assert sum((CaptionSampler(ds, seed=5).sample_prompts(5, slice(r, r + 1)) for r in range(5)), []) == \
        CaptionSampler(ds, seed=5).sample_prompts(5)
    # Prompts from a prompts file; a prompts file cannot give images.
    p = PromptSampler(prompts, seed=1)
    assert p.sample_prompts(4) == PromptSampler(open_captions(prompts), seed=1).sample_prompts(4)
    assert set(CaptionSampler(ds, prompts=prompts).sample_prompts(20)) <= set(CAPTIONS)
    with pytest.raises(ValueError, match="prompts file"):
        CaptionSampler(prompts)


# -- latent shards ----------------------------------------------------------------------------------
def latent_sample(i):
    g = torch.Generator().manual_seed(i)
    return (f"src.tar:{i:04d}", torch.randn(4, 3, 3, generator=g),
            {"embeds": torch.randn(7, 5, generator=g).half(), "time_ids": torch.full((6,), float(i))},
            f"caption {i}")


def test_latent_shards_round_trip(tmp_path):
    with LatentShardWriter(tmp_path / "lat", shard_size=3, source="src.tar") as w:
        for i in range(7):
            w.add(*latent_sample(i))
        assert w.written == 6 and w.done("src.tar:0005") and not w.done("src.tar:0006")
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert [(e["file"], e["samples"], e["source"]) for e in index["shards"]] == [
        ("shard-000000.safetensors", 3, "src.tar"), ("shard-000001.safetensors", 3, "src.tar"),
        ("shard-000002.safetensors", 1, "src.tar")]
    assert index["tensors"]["embeds"] == {"shape": [7, 5], "dtype": "float16"}
    ds = LatentShards(tmp_path / "lat")
    assert len(ds) == 7 and ds.cond_names == ["embeds", "time_ids"]
    for i in range(7):
        key, lat, cond, caption = latent_sample(i)
        got = ds[i]
        assert torch.equal(got[0], lat) and got[2] == caption and ds.key(i) == key
        assert got[1].keys() == cond.keys() and all(torch.equal(got[1][n], cond[n]) for n in cond)
    latents, cond, captions = ds.batch([6, 0, 1, 2, 0, -1])
    assert latents.shape == (6, 4, 3, 3) and cond["embeds"].dtype == torch.float16
    assert captions == ["caption 6", "caption 0", "caption 1", "caption 2", "caption 0", "caption 6"]
    assert cond["time_ids"][:, 0].tolist() == [6, 0, 1, 2, 0, 6]
    ds.verify()
    with pytest.raises(IndexError):
        ds[7]


def test_latent_writer_resumes_after_kill(tmp_path):
    folder = tmp_path / "lat"
    w = LatentShardWriter(folder, shard_size=3)
    for i in range(5):  # shard 0 written (0..2); 3 and 4 pending
        w.add(*latent_sample(i))
    del w  # killed: no close()
    (folder / "shard-000001.safetensors").write_bytes(b"half a shard")  # a half-written, unlisted shard
    (folder / ".shard-000001.safetensors.tmp-123").write_bytes(b"junk")
    w = LatentShardWriter(folder, shard_size=3)
    assert [w.done(latent_sample(i)[0]) for i in range(5)] == [True] * 3 + [False] * 2
    assert not (folder / ".shard-000001.safetensors.tmp-123").exists()
    with pytest.raises(ValueError, match="already written"):
        w.add(*latent_sample(0))
    for i in range(8):  # the caller skips what is done
        if not w.done(latent_sample(i)[0]):
            w.add(*latent_sample(i))
    w.close()
    ds = LatentShards(folder)
    assert [ds.key(i) for i in range(len(ds))] == [latent_sample(i)[0] for i in range(8)]
    assert torch.equal(ds[4][0], latent_sample(4)[1])
    with pytest.raises(ValueError, match=r"embeds float32 \(7, 5\).*expected.*float16"):
        LatentShardWriter(folder).add("new", torch.zeros(4, 3, 3), {"embeds": torch.zeros(7, 5),
                                                                  "time_ids": torch.zeros(6)}, "x")


def test_latent_shards_detect_corruption(tmp_path):
    folder = tmp_path / "lat"
    with LatentShardWriter(folder, shard_size=2) as w:
        for i in range(4):
            w.add(*latent_sample(i))
    shard = folder / "shard-000001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])  # truncated
    ds = LatentShards(folder)
    ds[0]
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors has \d+ bytes but index\.json records"):
        ds[2]
    shard.write_bytes(b"\xff" * len(good))  # same size, garbage header
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors is not a readable safetensors shard"):
        LatentShards(folder)[3]
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors is not a readable"):
        LatentShardWriter(folder)  # a resumed writer checks the shards it lists too
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # a data byte: only the checksum sees it
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors: sha256 differs"):
        LatentShards(folder).verify()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.safetensors is listed in .*index\.json but missing"):
        LatentShards(folder)[2]
    (folder / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON"):
        LatentShards(folder)
    (folder / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json not found"):
        LatentShards(folder)


def test_latent_sampler(tmp_path):
    with LatentShardWriter(tmp_path / "lat", shard_size=4) as w:
        for i in range(10):
            w.add(*latent_sample(i))
    ds = LatentShards(tmp_path / "lat", cache_size=1)
    a, b = LatentSampler(ds, seed=2), LatentSampler(tmp_path / "lat", seed=2)
    lat, cond = a(6)
    assert lat.dtype == torch.float32 and lat.shape == (6, 4, 3, 3) and cond["embeds"].dtype == torch.float32
    lat_b, cond_b = b(6)
    assert torch.equal(lat, lat_b) and all(torch.equal(cond[n], cond_b[n]) for n in cond)
    for i, t in enumerate(cond["time_ids"][:, 0].long().tolist()):  # latents and conditions of the same sample
        assert torch.equal(lat[i], latent_sample(t)[1])
    state = a.state_dict()
    want = a(3), a.sample_cond(2), a.sample_prompts(2)
    c = LatentSampler(ds, seed=7, dtype=None)
    c.load_state_dict(state)
    got = c(3), c.sample_cond(2), c.sample_prompts(2)
    assert torch.equal(got[0][0], want[0][0]) and got[0][1]["embeds"].dtype == torch.float16
    assert torch.equal(got[1]["time_ids"], want[1]["time_ids"]) and got[2] == want[2]
    full = LatentSampler(ds, seed=4)(5)
    parts = [LatentSampler(ds, seed=4)(5, part=slice(r * 2, r * 2 + 2)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0])
    assert torch.equal(torch.cat([p[1]["time_ids"] for p in parts]), full[1]["time_ids"])
    full = LatentSampler(ds, seed=4).sample_cond(5)["time_ids"]
    assert torch.equal(torch.cat([LatentSampler(ds, seed=4).sample_cond(5, slice(r, r + 1))["time_ids"]
                                  for r in range(5)]), full)
