"""Captioned video clips for text-to-video teachers (Wan2.1/2.2), decoded with PyAV, and the files that show
clips to people: MP4 (H.264) and PNG frame strips and grids.

Sources (``open_videos``), as ``fdistill.data.captions``'s for images: WebDataset tar shards (a folder of
``*.tar``, one ``.tar``, or a brace pattern) whose samples hold a clip (``mp4``, ``m4v``, ``mov``, ``webm``,
``mkv``) and a ``txt`` caption under one key, read in place at their byte offsets (``tar_index``); or a folder
of clips searched recursively, each with a same-stem ``.txt`` caption. The extension picks the demuxer
(``mov`` or ``matroska``) and FFmpeg reads the bytes through a Python file object: no other demuxer is probed
and no FFmpeg protocol is used (a playlist named ``.mp4`` is refused, as ``fdistill.io.open_image`` refuses an
EPS named ``.png``).

Frame sampling: output frame k (k = 0 .. frames - 1) shows time t_k = k / fps after the clip's first frame; it
is the decoded frame whose presentation time is nearest to t_k (ties: the earlier frame; times are exact
fractions of the stream's time base). The clip must last beyond t_{frames-1}: it ends at its last frame's time
plus that frame's duration, so a 1 s clip gives at most 16 frames at 16 fps (Wan: 16 fps, 4n + 1 frames, e.g.
81 = 5 s). Frames are decoded in order and decoding stops at the first frame after the last one needed; only
the frames taken are converted and kept. Each is resized and center-cropped to (height, width) by
``resize_cover_crop`` (PIL bicubic, antialiased: torchvision's Resize + CenterCrop, as for images).

A clip that is corrupt, truncated, too short or has no video stream (or a sample without caption) is handled as
images are (``captions``'s module doc): ``on_error="raise"`` raises one ValueError line naming the shard or
folder, the sample and what was expected; ``on_error="skip"`` warns (CaptionDataWarning) and skips it,
counted in ``ds.skipped``. PyAV is imported only when a clip is read or written (``pip install
'fdistill[video]'``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fdistill.data.captions import CAPTION_EXT, ON_ERROR, CaptionDataset, _BadSample, _decode_caption, _is_hidden
from fdistill.data.datasets import to_float, to_uint8
from fdistill.data.tar_index import BRACE, OffsetReader, expand_shards, scan_tar
from fdistill.data.transforms import pil_filter
from fdistill.io import atomic_path

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# extension -> FFmpeg demuxer; in order of preference when a tar sample has several
DEMUXERS = {"mp4": "mov", "m4v": "mov", "mov": "mov", "webm": "matroska", "mkv": "matroska"}
VIDEO_EXTS = tuple(DEMUXERS)
EXPECTED = {"mov": "an MP4 / MOV video", "matroska": "a WebM / Matroska video"}
WAN_FPS = 16  # Wan2.1/2.2 are trained on 16 fps clips
WAN_FRAMES = 81  # 4n + 1: the Wan VAE keeps the first frame and compresses the others by 4 in time
SOURCES = ("WebDataset .tar shards (a folder of *.tar files, one .tar file, or a brace pattern such as "
           "data/shard-{000000..000099}.tar) of clips with .txt captions, or a folder of clips (" +
           ", ".join(VIDEO_EXTS) + ") with same-stem .txt captions")
LAYOUTS = ("FCHW", "CFHW")
MPEG4_QSCALE = 2  # the mpeg4 fallback's quantizer (1 best .. 31): about x264 CRF 18 (MP4 round trip tested)


def import_av():
    """PyAV, or an ImportError saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise ImportError("video clips are read and written with PyAV: pip install 'fdistill[video]' "
                          "(or pip install 'av>=12')") from e
    return av


def check_frame_count(frames: int, temporal: int = 4, what: str = "frames") -> int:
    """``frames`` if it is ``temporal`` n + 1 (Wan's VAE: 4n + 1, e.g. 81), else a ValueError naming ``what``."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"{what}={frames!r:.40}; expected {temporal}n + 1 frames (1, {temporal + 1}, "
                         f"{2 * temporal + 1}, ...): the video VAE keeps the first frame and compresses the others by "
                         f"{temporal} in time")
    return frames


# -- pixels -----------------------------------------------------------------------------------------
def resize_cover_crop(img: PILImage, height: int, width: int, resample: str = "bicubic") -> np.ndarray:
    """PIL image -> uint8 (3, height, width) RGB: scaled by max(height / h, width / w) so that it covers the
    target (the side that fits exactly is the target's, the other int(target * long / short)), then the centered
    (height, width) window (offsets round((side - target) / 2)). For a square target this is
    ``transforms.resize_center_crop`` (torchvision's Resize(size) + CenterCrop(size)), pixel for pixel."""
    img = img.convert("RGB")
    w, h = img.size
    fit_height = height * w >= width * h  # height / h >= width / w: scale by height / h
    new = (int(height * w / h), height) if fit_height else (width, int(width * h / w))
    if new != (w, h):
        img = img.resize(new, pil_filter(resample))
    left, top = int(round((new[0] - width) / 2.0)), int(round((new[1] - height) / 2.0))
    img = img.crop((left, top, left + width, top + height))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def _size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size={size!r}; expected (height, width) in pixels, e.g. (480, 832)")
    return int(size[0]), int(size[1])


def check_positive(name: str, value, least: int = 1) -> int:
    """``value`` if it is an integer >= ``least``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r}; expected an integer >= {least}")
    return value


def _fps(fps) -> Fraction:
    try:
        value = Fraction(fps).limit_denominator(1001) if not isinstance(fps, bool) else None
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, infinite
        value = None
    if value is None or value <= 0:
        raise ValueError(f"fps={fps!r}; expected a positive number of frames per second (Wan: 16)")
    return value


# -- decoding -----------------------------------------------------------------------------------------
class _Slice(io.RawIOBase):
    """Bytes [offset, offset + size) of file ``file`` of an OffsetReader as a read-only seekable file: a clip in a
    tar shard, read in place (never copied whole into memory)."""

    def __init__(self, reader: OffsetReader, file: int, offset: int, size: int) -> None:
        self.reader, self.file, self.offset, self.size, self.pos = reader, file, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise OSError(f"seek whence={whence}: expected SEEK_SET, SEEK_CUR or SEEK_END")
        base = (0, self.pos, self.size)[(os.SEEK_SET, os.SEEK_CUR, os.SEEK_END).index(whence)]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        data = self.reader.read(self.file, self.offset + self.pos, n) if n else b""
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _decode(fileobj, ext: str, frames: int, fps: Fraction, size: tuple[int, int] | None,
            threads: int) -> np.ndarray:
    """uint8 (F, 3, H, W) sampled as the module doc says; _BadSample (without the clip's name) if it cannot be."""
    av = import_av()
    demuxer = DEMUXERS.get(ext.lower())
    if demuxer is None:
        raise _BadSample(f"has extension .{ext}; expected a clip: " + ", ".join(VIDEO_EXTS))
    targets = [Fraction(k) / fps for k in range(frames)]
    taken: list[np.ndarray] = []
    try:
        with av.open(fileobj, "r", format=demuxer) as container:
            if not container.streams.video:
                raise _BadSample(f"has no video stream; expected a clip ({ext} file with a video track)")
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "AUTO", threads
            base, rate = stream.time_base, stream.average_rate or stream.guessed_rate
            origin = prev_t = prev = converted = None
            interval, decoded = None, 0

            def take(frame) -> None:
                nonlocal converted
                if converted is None or converted[0] is not frame:
                    img = frame.to_image()
                    arr = (np.ascontiguousarray(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
                           if size is None else resize_cover_crop(img, *size))
                    converted = (frame, arr)
                taken.append(converted[1])

            for frame in container.decode(stream):
                decoded += 1
                if frame.pts is not None and base is not None and (origin is not None or prev_t is None):
                    stamp = Fraction(frame.pts) * base
                    origin = stamp if origin is None else origin
                    t = stamp - origin
                elif prev_t is None:
                    t = Fraction(0)  # no timestamps: frames are counted at the stream's rate
                elif rate:
                    t = prev_t + 1 / Fraction(rate)
                else:
                    raise _BadSample("has frames without timestamps and no frame rate")
                if prev is not None:
                    if t <= prev_t:
                        continue  # a repeated timestamp: keep the first frame shown at it
                    while len(taken) < frames and targets[len(taken)] - prev_t <= t - targets[len(taken)]:
                        take(prev)
                    if len(taken) == frames:
                        break
                    interval = t - prev_t
                prev, prev_t = frame, t
            else:  # the clip ended: its last frame lasts until the clip's end
                if prev is None:
                    raise _BadSample(f"has no decodable frames; expected a clip of at least {frames} frames")
                duration = getattr(prev, "duration", None)
                last = (Fraction(duration) * base if duration and base is not None else
                        interval if interval is not None else 1 / Fraction(rate) if rate else Fraction(0))
                end = prev_t + last
                while len(taken) < frames and targets[len(taken)] < end:
                    take(prev)
                if len(taken) < frames:
                    need = f"{frames} frames at {float(fps):g} fps need more than {float(targets[-1]):.3f} s"
                    if (stream.frames or 0) > decoded:
                        raise _BadSample(f"is truncated: its index lists {stream.frames} frames but {decoded} could "
                                         f"be read (to {float(end):.3f} s); {need}")
                    raise _BadSample(f"is too short: {float(end):.3f} s ({decoded} frames); {need}")
    except _BadSample:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:  # FFmpeg's, or the file object's
        why = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
        raise _BadSample(f"is not a readable {ext} clip ({type(e).__name__}: {why[0] if why else ''}); expected "
                         f"{EXPECTED[demuxer]} (the extension picks FFmpeg's {demuxer} demuxer)") from e
    return np.stack(taken)


def _to_clip(frames_u8: np.ndarray) -> Tensor:
    """uint8 (F, 3, H, W) -> float [3, F, H, W] in [-1, 1] (``datasets.to_float``)."""
    return to_float(torch.from_numpy(frames_u8).permute(1, 0, 2, 3).contiguous())


def read_clip(path: str | Path, frames: int = WAN_FRAMES, fps: float = WAN_FPS,
              size: tuple[int, int] | int | None = (480, 832), threads: int = 0) -> Tensor:
    """Clip file ``path`` -> float [3, frames, H, W] in [-1, 1]: ``frames`` frames at ``fps`` from its start (the
    module doc's rule), each resized and center-cropped to ``size`` = (H, W) (None: the clip's own size).
    ``threads``: FFmpeg decoding threads (0: FFmpeg's choice). A ValueError naming the file if it cannot."""
    frames, fps_, size = check_positive("frames", frames), _fps(fps), _size(size)
    threads, path = check_positive("threads", threads, 0), Path(path)
    try:
        with open(path, "rb") as f:
            return _to_clip(_decode(f, path.suffix.lstrip("."), frames, fps_, size, threads))
    except _BadSample as e:
        raise ValueError(f"{path}: {e}") from None


# -- datasets -----------------------------------------------------------------------------------------
class VideoCaptions(CaptionDataset):
    """Clip-caption pairs: ``len(ds)``; ``ds[i] -> (clip float [3, F, H, W] in [-1, 1], caption, where)``;
    ``caption(i)``, ``where(i)``, ``skipped`` and iteration as ``captions.CaptionDataset`` (whose skip/raise
    policy and reporting this shares). ``resolution`` is (H, W), or None for the clips' own size."""

    def __init__(self, source: str, frames: int, fps: Fraction, size: tuple[int, int] | None, on_error: str,
                 threads: int) -> None:
        super().__init__(source, size, on_error)  # type: ignore[arg-type]
        self.frames, self.fps, self.threads = frames, fps, threads

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self)} clips, frames={self.frames}, "
                f"fps={float(self.fps):g}, size={self.resolution})")

    def _clip(self, i: int):
        """A binary file object of clip i (closed by the caller) and its extension."""
        raise NotImplementedError

    def _read(self, i: int, image: bool) -> tuple[Tensor | None, str] | None:
        if i in self._bad:
            return None
        try:
            caption = _decode_caption(self._caption_bytes(i))
            if not image:
                return None, caption
            fileobj, ext = self._clip(i)
            with fileobj:
                return _to_clip(_decode(fileobj, ext, self.frames, self.fps, self.resolution, self.threads)), caption
        except _BadSample as e:
            if self.on_error == "skip":
                self._bad.add(i)
            self._problem(f"{self._container(i)}: sample {self.keys[i]}: {e}")
            return None


class TarVideos(VideoCaptions):
    """WebDataset tar shards of clips and captions, indexed by scanning their headers (``tar_index``); clips are
    read in place through ``_Slice``."""

    kind = "tar"

    def __init__(self, shards: Sequence[str | Path], source: str, frames: int, fps: Fraction,
                 size: tuple[int, int] | None, on_error: str, threads: int) -> None:
        super().__init__(source, frames, fps, size, on_error, threads)
        self.shards = [str(s) for s in shards]
        rows: list[tuple[int, str, int, int, int, int]] = []  # shard, ext, clip offset, size, text offset, size
        for s, shard in enumerate(self.shards):
            end = os.path.getsize(shard)
            for key, exts in scan_tar(shard, end, self._problem).items():
                clip = next((e for e in VIDEO_EXTS if e in exts), None)
                text = exts.get(CAPTION_EXT)
                if clip is None and text is None:
                    continue  # e.g. only .json members: not a clip-caption sample
                if clip is None:
                    self._leave_out(shard, key, f"has a caption but no clip (no {key}." + "/.".join(VIDEO_EXTS) + ")")
                elif text is None:
                    self._leave_out(shard, key, f"has no caption (no {key}.{CAPTION_EXT} next to {key}.{clip})")
                elif max(sum(exts[clip]), sum(text)) > end:
                    self._leave_out(shard, key, "is cut off: the shard ends inside it (truncated tar)")
                else:
                    self.keys.append(key)
                    rows.append((s, clip, *exts[clip], *text))
        self._rows = rows
        self._check_not_empty("samples with a clip (" + ", ".join(VIDEO_EXTS) + ") and a .txt caption")
        self._reader = OffsetReader(self.shards)

    def _container(self, i: int) -> str:
        return self.shards[self._rows[i][0]]

    def _clip(self, i: int):
        s, ext, offset, size = self._rows[i][:4]
        return _Slice(self._reader, s, offset, size), ext

    def _caption_bytes(self, i: int) -> bytes:
        s, _, _, _, offset, size = self._rows[i]
        data = self._reader.read(s, offset, size)
        if len(data) != size:
            raise _BadSample(f"read {len(data)} of {size} bytes: the shard changed since it was indexed")
        return data


class FolderVideos(VideoCaptions):
    """A folder of clips, searched recursively, each with a same-stem ``.txt`` caption next to it; the key of a
    sample is the clip's path relative to the folder (as ``captions.FolderCaptions``)."""

    kind = "folder"

    def __init__(self, root: Path, frames: int, fps: Fraction, size: tuple[int, int] | None, on_error: str,
                 threads: int) -> None:
        super().__init__(str(root), frames, fps, size, on_error, threads)
        self.root = root
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        present = set(files)
        for rel in files:
            stem, dot, ext = rel.rpartition(".")
            if not dot or "/" in ext or ext.lower() not in VIDEO_EXTS or _is_hidden(rel):
                continue
            if f"{stem}.{CAPTION_EXT}" in present:
                self.keys.append(rel)
            else:
                self._leave_out(self.source, rel, f"has no caption (no {stem}.{CAPTION_EXT} next to it)")
        self._check_not_empty(f"clips ({', '.join(VIDEO_EXTS)}) with same-stem .txt captions")

    def _container(self, i: int) -> str:
        return self.source

    def _clip(self, i: int):
        try:
            return open(self.root / self.keys[i], "rb"), self.keys[i].rpartition(".")[2]
        except OSError as e:
            raise _BadSample(f"cannot be opened ({e.strerror or e})") from e

    def _caption_bytes(self, i: int) -> bytes:
        return (self.root / f"{self.keys[i].rpartition('.')[0]}.{CAPTION_EXT}").read_bytes()


def open_videos(source: str | Path, frames: int = WAN_FRAMES, fps: float = WAN_FPS,
                size: tuple[int, int] | int | None = (480, 832), on_error: str = "skip",
                threads: int = 0) -> VideoCaptions:
    """Clip-caption pairs from ``source``: a folder of ``*.tar`` shards, a ``.tar`` file, a brace pattern of tar
    files, or a folder of clips with same-stem ``.txt`` captions (``open_captions``'s rules). Clips come out
    float [3, frames, H, W] in [-1, 1] at ``fps`` with (H, W) = ``size``; ``on_error`` is "skip" or "raise"."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    frames, fps_, size = check_positive("frames", frames), _fps(fps), _size(size)
    args = (frames, fps_, size, on_error, check_positive("threads", threads, 0))
    text, path = str(source), Path(source)
    if not path.exists() and BRACE.search(text):
        return TarVideos(expand_shards(text), text, *args)
    if not path.exists():
        raise FileNotFoundError(f"video source {path} not found; expected {SOURCES}")
    if path.is_dir():
        shards = sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith("."))
        return TarVideos(shards, str(path), *args) if shards else FolderVideos(path, *args)
    name = path.name.lower()
    if name.endswith(".tar"):
        return TarVideos([path], str(path), *args)
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise ValueError(f"{path} is a compressed tar; samples are read by seeking, which needs plain .tar shards "
                         "(decompress it first)")
    raise ValueError(f"cannot read clips from {path}: expected {SOURCES}")


# -- writing --------------------------------------------------------------------------------------------
def _frames_u8(frames: Tensor | np.ndarray, layout: str, what: str) -> np.ndarray:
    """A clip in ``layout`` (FCHW or CFHW), float in [-1, 1] or uint8, -> uint8 (F, 3, H, W) (gray repeated)."""
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout={layout!r}; expected one of {LAYOUTS}")
    arr = to_uint8(frames)
    channels = 1 if layout == "FCHW" else 0
    if arr.ndim != 4 or arr.shape[channels] not in (1, 3) or arr.shape[1 - channels] == 0:
        raise ValueError(f"{what}: expected a {layout} clip ({'frames, 3' if channels else '3, frames'}, H, W), "
                         f"got shape {tuple(arr.shape)}")
    if layout == "CFHW":
        arr = arr.transpose(1, 0, 2, 3)
    return np.repeat(arr, 3, axis=1) if arr.shape[1] == 1 else arr


def mp4_codec() -> str:
    """``libx264`` (H.264) if this PyAV's FFmpeg has it (PyPI wheels do), else FFmpeg's own ``mpeg4``."""
    return "libx264" if "libx264" in import_av().codecs_available else "mpeg4"


def write_mp4(path: str | Path, frames: Tensor | np.ndarray, fps: float = WAN_FPS, layout: str = "FCHW",
              codec: str | None = None, crf: int = 18) -> Path:
    """Write a clip (``layout`` FCHW = [frames, 3, H, W], or CFHW = [3, frames, H, W] as ``read_clip`` gives;
    float in [-1, 1] or uint8) to an MP4 at ``fps``: H.264 (``libx264``, CRF ``crf``) or, without it, ``mpeg4``
    (quantizer MPEG4_QSCALE), in yuv420p. yuv420p needs even sizes: an odd height or width gets one more row or
    column repeating the last (nothing is scaled or lost). Written through a temporary file (``io.atomic_path``)."""
    path = Path(path)
    clip = _frames_u8(frames, layout, f"write_mp4({path})")
    rate = _fps(fps)
    av = import_av()
    codec = codec or mp4_codec()
    _, _, h, w = clip.shape
    pad = ((0, 0), (0, 0), (0, h % 2), (0, w % 2))
    if h % 2 or w % 2:
        clip = np.pad(clip, pad, mode="edge")
    options = ({"crf": str(crf)} if codec == "libx264" else
               {"flags": "+qscale", "global_quality": str(118 * MPEG4_QSCALE)} if codec == "mpeg4" else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "xb") as f, av.open(f, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = clip.shape[3], clip.shape[2], "yuv420p"
        for img in clip:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img.transpose(1, 2, 0)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _shown(clip: np.ndarray, every: int) -> np.ndarray:
    check_positive("every", every)
    return clip[::every]


def save_frame_strip(frames: Tensor | np.ndarray, path: str | Path, every: int = 1, layout: str = "FCHW",
                     gap: int = 1, scale: int = 1, label_frames: bool = False) -> Path:
    """One PNG row of a clip's frames 0, every, 2 every, ... (``layout`` as ``write_mp4``), ``gap`` white pixels
    between them (``writers.save_image_grid``); ``label_frames`` writes each frame's index above it."""
    from fdistill.data.writers import save_image_grid

    shown = _shown(_frames_u8(frames, layout, f"save_frame_strip({path})"), every)
    labels = [str(k * every) for k in range(len(shown))] if label_frames else None
    return save_image_grid(shown, path, nrow=len(shown), scale=scale, gap=gap, column_labels=labels)


def save_clip_grid(clips: Sequence[Tensor | np.ndarray] | Tensor | np.ndarray, path: str | Path, every: int = 1,
                   layout: str = "FCHW", gap: int = 1, scale: int = 1, label_frames: bool = False) -> Path:
    """A PNG grid of several clips, one row per clip (its frames 0, every, ...; ``layout`` per clip, a batch
    is [N, *layout]); clips share H and W; a row with fewer frames ends in black cells."""
    from fdistill.data.writers import save_image_grid

    what = f"save_clip_grid({path})"
    rows = [_shown(_frames_u8(c, layout, what), every) for c in clips]
    if not rows:
        raise ValueError(f"{what}: no clips")
    if len({r.shape[2:] for r in rows}) > 1:
        raise ValueError(f"{what}: clips must share one frame size, got (H, W) = "
                         + ", ".join(str(tuple(r.shape[2:])) for r in rows))
    n = max(len(r) for r in rows)
    cells = np.zeros((len(rows), n, *rows[0].shape[1:]), np.uint8)  # missing cells stay black
    for i, r in enumerate(rows):
        cells[i, :len(r)] = r
    labels = [str(k * every) for k in range(n)] if label_frames else None
    return save_image_grid(cells.reshape(-1, *cells.shape[2:]), path, nrow=n, scale=scale, gap=gap,
                           column_labels=labels)
