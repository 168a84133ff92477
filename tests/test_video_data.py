"""Captioned video clips (fdistill.data.video): frame sampling and timing, resize and crop, caption pairing in
folders and tar shards, refusing corrupt / truncated / too-short clips, MP4 and PNG writers. The clips are made
here with PyAV: a red 8 x 8 square moving 2 px right per frame on black, so a frame's position tells which
source frame it is."""

import io
import os
import pickle
import re
import sys
import tarfile
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from fdistill.data.captions import CaptionDataWarning  # noqa: E402
from fdistill.data.transforms import resize_center_crop  # noqa: E402
from fdistill.data.video import (  # noqa: E402
    check_frame_count,
    import_av,
    open_videos,
    read_clip,
    resize_cover_crop,
    save_clip_grid,
    save_frame_strip,
    write_mp4,
)

H, W, N, FPS = 40, 56, 24, 24  # the test clips: 24 frames at 24 fps (1 s), 40 x 56 px
SQUARE_Y = slice(16, 24)


def square_frames(n=N, h=H, w=W) -> np.ndarray:
    """uint8 (n, h, w, 3): frame j has a red 8 x 8 square at rows 16..23, columns 2j..2j+7."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for j in range(n):
        frames[j, SQUARE_Y, 2 * j:2 * j + 8] = (255, 0, 0)
    return frames


def encode(frames: np.ndarray, fps=FPS, fmt="mp4", codec="libx264", faststart=False) -> bytes:
    """uint8 (n, h, w, 3) as a clip's bytes; libx264 with CRF 0 (lossless in yuv420p up to the color
    conversion). ``faststart``: the MP4 index (moov) before the frames (FFmpeg rewrites the file: a real one)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"clip.{fmt}")
        with av.open(path, "w", format=fmt, options={"movflags": "faststart"} if faststart else {}) as c:
            s = c.add_stream(codec, rate=fps, options={"crf": "0"} if codec == "libx264" else {})
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for a in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            c.mux(s.encode())
        with open(path, "rb") as f:
            return f.read()


def cut_at_frame(data: bytes, j: int) -> bytes:
    """A faststart MP4 cut a few bytes into the data of frame j (its index says there are more frames)."""
    with av.open(io.BytesIO(data)) as c:
        pos = next(p.pos for p in c.demux(video=0) if p.pts is not None and p.pts * p.time_base == Fraction(j, FPS))
    return data[:pos + 5]


@pytest.fixture(scope="module")
def clip_bytes() -> bytes:
    return encode(square_frames())


@pytest.fixture
def clip(tmp_path, clip_bytes):
    path = tmp_path / "square.mp4"
    path.write_bytes(clip_bytes)
    return path


def source_index(clip: torch.Tensor) -> list[int]:
    """The source frame j each frame of a native-size clip [3, F, H, W] shows: its square's left edge / 2."""
    red = (clip[0, :, 20] > 0).numpy()  # row 20 crosses the square
    assert red.any(axis=1).all()
    return [int(np.argmax(row)) // 2 for row in red]


# -- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps, frames, expected", [
    (24, 24, list(range(24))),  # same rate: every frame
    (16, 16, [(3 * k) // 2 for k in range(16)]),  # t = k/16 at 1.5 k source frames: ties go to the earlier
    (10, 10, [round(2.4 * k) for k in range(10)]),  # nearest, not the frame on screen (k=2: 4.8 -> 5, not 4)
    (30, 30, [round(0.8 * k) for k in range(30)]),  # faster than the source: frames repeat
    (16, 5, [0, 1, 3, 4, 6]),  # only the first 5 (the rest of the clip is not needed)
])
def test_sampling_takes_the_nearest_frame_at_k_over_fps(clip, fps, frames, expected):
    x = read_clip(clip, frames=frames, fps=fps, size=None)
    assert x.shape == (3, frames, H, W) and x.dtype == torch.float32
    assert source_index(x) == expected


def test_sampling_uses_the_first_frame_as_time_zero(tmp_path):
    """A stream whose timestamps start late (pts 1 s) is timed from its first frame."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=FPS, options={"crf": "0"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for j, a in enumerate(square_frames()):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = j + FPS, Fraction(1, FPS)
            c.mux(s.encode(f))
        c.mux(s.encode())
    (tmp_path / "late.mp4").write_bytes(buf.getvalue())
    assert source_index(read_clip(tmp_path / "late.mp4", frames=16, fps=16, size=None)) == [(3 * k) // 2
                                                                                            for k in range(16)]


def test_decoding_stops_after_the_last_needed_frame(tmp_path):
    """5 frames at 16 fps need source frames 0..6 (t <= 0.25 s): a clip cut inside frame 16's data reads, since
    decoding stops at the first frame after frame 6 (plus the decoder's few frames of delay); 16 frames need
    frame 22, and the same file is then refused."""
    path = tmp_path / "cut.mp4"
    path.write_bytes(cut_at_frame(encode(square_frames(), faststart=True), 16))
    assert source_index(read_clip(path, frames=5, fps=16, size=None)) == [0, 1, 3, 4, 6]
    with pytest.raises(ValueError, match=r"cut\.mp4: (is not a readable mp4 clip|is truncated: its index lists 24 "
                                         r"frames but 1\d could be read)"):
        read_clip(path, frames=16, fps=16, size=None)


def test_frame_count_rule():
    assert check_frame_count(81) == 81 and check_frame_count(1) == 1
    with pytest.raises(ValueError, match=r"frames=80; expected 4n \+ 1"):
        check_frame_count(80)


# -- resize and crop ----------------------------------------------------------------------------------
def test_resize_and_center_crop_shapes_and_values(clip):
    native = read_clip(clip, frames=16, fps=16, size=None)
    for size in [(16, 32), (32, 16), (20, 20), (40, 56), (80, 112)]:
        x = read_clip(clip, frames=16, fps=16, size=size)
        assert x.shape == (3, 16, *size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9 and x.min() < -0.9
    # (16, 32) from 40 x 56: the width limits (32/56 > 16/40): 56 -> 32, 40 -> int(32 * 40 / 56) = 22, rows 3..18
    u8 = ((native[:, 3] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(u8).resize((32, 22), Image.Resampling.BICUBIC))[3:19].transpose(2, 0, 1)
    got = ((read_clip(clip, frames=16, fps=16, size=(16, 32))[:, 3] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(got, ref)


def test_square_target_is_the_image_transform():
    """For a square size resize_cover_crop is transforms.resize_center_crop (the image data's), pixel for pixel."""
    rng = np.random.default_rng(0)
    for shape in [(40, 56), (57, 31), (30, 30)]:
        img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        assert np.array_equal(resize_cover_crop(img, 24, 24), resize_center_crop(img, 24))


# -- sources ------------------------------------------------------------------------------------------
def test_folder_pairs_clips_and_captions_by_stem(tmp_path, clip_bytes):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.mp4").write_bytes(clip_bytes)
    (tmp_path / "a.txt").write_text("a moving red square\n")
    (tmp_path / "sub" / "b.mov").write_bytes(encode(square_frames()[::-1].copy(), fmt="mov"))
    (tmp_path / "sub" / "b.txt").write_text("backwards")
    (tmp_path / "c.mp4").write_bytes(clip_bytes)  # no caption
    (tmp_path / "notes.txt").write_text("a caption without a clip: not a sample")
    with pytest.warns(CaptionDataWarning, match=r": sample c\.mp4 has no caption \(no c\.txt next to it\); skipped"):
        ds = open_videos(tmp_path, frames=9, fps=16, size=(20, 28))
    assert ds.keys == ["a.mp4", "sub/b.mov"] and ds.skipped == 1 and len(ds) == 2
    (xa, ca, wa), (xb, cb, wb) = list(ds)
    assert (ca, cb) == ("a moving red square", "backwards")
    assert wa == f"{tmp_path}:a.mp4" and wb == f"{tmp_path}:sub/b.mov"
    assert xa.shape == xb.shape == (3, 9, 20, 28)
    assert torch.equal(ds[1][0], xb) and ds.caption(0) == ca
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("only a caption")
    with pytest.raises(ValueError, match="no samples found .* expected clips"):
        open_videos(empty, frames=9)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path, clip_bytes):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "shard-000000.tar", [("s000.mp4", clip_bytes), ("s000.txt", b"first"),
                                       ("s001.txt", b"second"), ("s001.mp4", encode(square_frames(n=12)))])
    vp9 = "libvpx-vp9" in av.codecs_available  # PyPI wheels have it; else the Matroska container with H.264
    other = ("d/s002.webm", encode(square_frames(), fmt="webm", codec="libvpx-vp9")) if vp9 else \
        ("d/s002.mkv", encode(square_frames(), fmt="matroska"))
    _tar(shards / "shard-000001.tar", [other, ("d/s002.txt", b"third"), ("s003.json", b"{}")])
    pattern = str(shards / "shard-{000000..000001}.tar")
    for source in (shards, pattern):
        ds = open_videos(source, frames=16, fps=16, size=(20, 28), on_error="raise")
        assert ds.keys == ["s000", "s001", "d/s002"] and ds.kind == "tar"
        assert [ds.caption(i) for i in range(3)] == ["first", "second", "third"]
        x, caption, where = ds[0]
        assert x.shape == (3, 16, 20, 28) and caption == "first" and where.endswith("shard-000000.tar:s000")
        assert torch.equal(x, read_clip(_write(tmp_path / "s000.mp4", clip_bytes), frames=16, fps=16, size=(20, 28)))
        assert ds[2][0].shape == (3, 16, 20, 28)
        assert torch.equal(pickle.loads(pickle.dumps(ds))[0][0], x)  # as DataLoader workers get it
        with pytest.raises(ValueError, match=r"shard-000000\.tar: sample s001: is too short: 0\.500 s \(12 frames\)"):
            ds[1]
    native = open_videos(shards / "shard-000000.tar", frames=16, fps=16, size=None)[0][0]
    assert source_index(native) == [(3 * k) // 2 for k in range(16)]


def _write(path, data):
    path.write_bytes(data)
    return path


# -- bad clips ----------------------------------------------------------------------------------------
def test_bad_clips_are_refused_in_one_line_or_skipped(tmp_path, clip_bytes):
    rng = np.random.default_rng(0)
    folder = tmp_path / "clips"
    folder.mkdir()
    bad = {
        "random.mp4": (rng.bytes(3000), r"is not a readable mp4 clip \(InvalidDataError: Invalid data found "
                                         r"when processing input\); expected an MP4 / MOV video"),
        "halved.mp4": (clip_bytes[:len(clip_bytes) // 2], r"is not a readable mp4 clip"),  # index at the end: lost
        "cut.mp4": (cut_at_frame(encode(square_frames(), faststart=True), 12),
                    r"is truncated: its index lists 24 frames but \d+ could be read \(to 0\.\d+ s\); 17 frames"),
        "short.mp4": (clip_bytes, r"is too short: 1\.000 s \(24 frames\); 17 frames at 16 fps need more than "
                                  r"1\.000 s"),
        "playlist.mp4": (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
                         r"is not a readable mp4 clip"),  # no HLS demuxer: only the extension's
    }
    for name, (data, why) in bad.items():
        (folder / name).write_bytes(data)
        (folder / name.replace(".mp4", ".txt")).write_text(name)
        with pytest.raises(ValueError) as info:
            read_clip(folder / name, frames=17, fps=16, size=None)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{folder / name}: ")
        assert re.search(why, message), message
    (folder / "good.mp4").write_bytes(clip_bytes)
    (folder / "good.txt").write_text("good")
    assert read_clip(folder / "good.mp4", frames=16, fps=16, size=None).shape == (3, 16, H, W)

    strict = open_videos(folder, frames=16, fps=16, size=None, on_error="raise")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}: sample cut\.mp4: is truncated: ") as info:
        strict[0]
    assert "\n" not in str(info.value)

    ds = open_videos(folder, frames=16, fps=16, size=None, on_error="skip")
    assert len(ds) == 6 and ds.skipped == 0
    with pytest.warns(CaptionDataWarning) as warned:
        got = list(ds)
    assert [w for _, _, w in got] == [f"{folder}:good.mp4", f"{folder}:short.mp4"]  # short suffices for 16 frames
    assert ds.skipped == 4
    messages = [str(w.message) for w in warned]
    assert all("\n" not in m and m.endswith("; skipped") for m in messages)
    assert sorted(m.split(": sample ")[1].split(":")[0] for m in messages) == ["cut.mp4", "halved.mp4",
                                                                               "playlist.mp4", "random.mp4"]
    x, caption, where = ds[0]  # cut.mp4 is bad: the next valid sample stands in, as for images
    assert where == f"{folder}:good.mp4" and caption == "good" and x.shape == (3, 16, H, W)

    too_short = open_videos(folder, frames=17, fps=16, size=None, on_error="skip")
    with pytest.warns(CaptionDataWarning) as warned:
        assert [w for _, _, w in too_short] == []
    assert too_short.skipped == 6 and len(warned) == 6
    assert sum(": is too short: 1.000 s (24 frames); 17 frames" in str(w.message) for w in warned) == 2


def test_av_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install 'fdistill\[video\]'"):
        import_av()


# -- writing ------------------------------------------------------------------------------------------
def _test_clip(f=12, h=H, w=W) -> np.ndarray:
    """uint8 (f, 3, h, w): smooth color ramps with the moving square."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([xx * 4, yy * 5, (xx + yy + 8 * j) % 256]) for j in range(f)]).astype(np.uint8)
    square = square_frames(f, h, w).transpose(0, 3, 1, 2)
    return np.where(square.any(axis=1, keepdims=True), square, frames)


@pytest.mark.parametrize("codec, mean_tol, p99_tol", [("libx264", 3.0, 20), ("mpeg4", 3.0, 22)])
def test_mp4_round_trip(tmp_path, codec, mean_tol, p99_tol):
    """Lossy (yuv420p halves the chroma): measured on this clip, libx264 CRF 18 gives a mean absolute error of
    2.3 / 255 and a 99th percentile of 16 / 255; mpeg4 q 2: 2.4 and 17. The square's position survives."""
    frames = _test_clip()
    path = write_mp4(tmp_path / f"{codec}.mp4", torch.from_numpy(frames).float() / 127.5 - 1, fps=16, codec=codec)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == {"libx264": "h264"}.get(codec, codec) and s.average_rate == 16
    back = read_clip(path, frames=12, fps=16, size=None)
    assert back.shape == (3, 12, H, W)
    got = ((back.permute(1, 0, 2, 3) + 1) * 127.5).round().numpy()
    err = np.abs(got - frames)
    assert err.mean() <= mean_tol and np.percentile(err, 99) <= p99_tol, (err.mean(), np.percentile(err, 99))
    assert source_index(back) == list(range(12))
    # [3, F, H, W] (what read_clip gives) written with layout="CFHW" is the same file's content
    again = read_clip(write_mp4(tmp_path / "cfhw.mp4", back, fps=16, layout="CFHW", codec=codec), 12, 16, None)
    assert (again - back).abs().mean() < 0.03


def test_mp4_odd_size_is_padded_with_the_edge(tmp_path):
    frames = _test_clip(f=4, h=41, w=57)
    back = read_clip(write_mp4(tmp_path / "odd.mp4", frames, fps=16), frames=4, fps=16, size=None)
    assert back.shape == (3, 4, 42, 58)
    got = ((back.permute(1, 0, 2, 3) + 1) * 127.5).numpy()
    padded = np.pad(frames, ((0, 0), (0, 0), (0, 1), (0, 1)), mode="edge").astype(np.float64)
    assert np.abs(got - padded).mean() < 3.0


def test_png_strip_and_grid_are_pixel_exact(tmp_path):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (7, 3, 10, 12), dtype=np.uint8)
    path = save_frame_strip(torch.from_numpy(clip).float() / 127.5 - 1, tmp_path / "strip.png", every=3)
    png = np.asarray(Image.open(path)).transpose(2, 0, 1)
    shown = [0, 3, 6]
    assert png.shape == (3, 10, 3 * 12 + 2)  # 1 px white gap between frames
    for k, j in enumerate(shown):
        assert np.array_equal(png[:, :, k * 13:k * 13 + 12], clip[j])
    assert (png[:, :, 12] == 255).all() and (png[:, :, 25] == 255).all()
    cfhw = save_frame_strip(clip.transpose(1, 0, 2, 3), tmp_path / "cfhw.png", every=3, layout="CFHW")
    assert np.array_equal(np.asarray(Image.open(cfhw)), np.asarray(Image.open(path)))
    labelled = np.asarray(Image.open(save_frame_strip(clip, tmp_path / "labels.png", every=3, label_frames=True)))
    assert labelled.shape == (12 + 10, 38, 3) and np.array_equal(labelled[12:], png.transpose(1, 2, 0))

    other = rng.integers(0, 256, (4, 3, 10, 12), dtype=np.uint8)
    grid = np.asarray(Image.open(save_clip_grid([clip, other], tmp_path / "grid.png", every=2))).transpose(2, 0, 1)
    assert grid.shape == (3, 2 * 10 + 1, 4 * 13 - 1)  # rows: clips; columns: frames 0, 2, 4, 6
    for k in range(4):
        assert np.array_equal(grid[:, :10, k * 13:k * 13 + 12], clip[2 * k])
    for k in range(2):
        assert np.array_equal(grid[:, 11:, k * 13:k * 13 + 12], other[2 * k])
    assert (grid[:, 11:, 26:38] == 0).all() and (grid[:, 11:, 39:] == 0).all()  # the second row ends in black
    with pytest.raises(ValueError, match="share one frame size"):
        save_clip_grid([clip, clip[:, :, :8]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"expected a FCHW clip \(frames, 3, H, W\), got shape \(3, 10, 12\)"):
        save_frame_strip(clip[0], tmp_path / "bad.png")
