"""Image-caption pairs for text-to-image distillation, indexed once and read lazily (datasets are far larger
than memory). The random draws of them for the trainer (``PromptSampler``, ``CaptionSampler``) are in
``fdistill.data.sampler``; brace patterns and the tar header scan in ``fdistill.data.tar_index``.

``open_captions`` picks the reader from what the path is:

- WebDataset tar shards: a folder of ``*.tar`` files, one ``.tar`` file, or a brace pattern such as
  ``data/shard-{000000..000099}.tar``. A sample is the group of members sharing a key (the member's path up to
  the first dot of its file name): an image (jpg, jpeg, png, webp, bmp) and a ``txt`` caption. The tar headers
  are scanned once into an index of byte offsets; samples are then read at those offsets (``os.pread``) through
  a small cache of open files. Plain (uncompressed) tar only: a compressed shard cannot be read by seeking.
- a folder of images with same-named captions, searched recursively (``a/b/cat.jpg`` + ``a/b/cat.txt``);
- a prompts file (``.txt``): one prompt per line; blank lines and lines starting with ``#`` are skipped. It has
  captions but no images: it gives the generator's conditions (``sample_prompts``).

Images are converted to RGB, resized so that the shorter side is ``resolution`` (PIL bicubic, antialiased) and
center-cropped to ``resolution`` square, with the sizes and offsets of torchvision's ``Resize(resolution,
BICUBIC)`` + ``CenterCrop(resolution)`` (the Stable Diffusion 1.5 training loaders).

A sample without caption or image is found when indexing; a corrupt image or caption only when decoding. With
``on_error="skip"`` it is reported (``warnings.warn``, CaptionDataWarning, naming the shard or folder and the
key) and skipped: left out of the index, or, when found while decoding, replaced by the next valid sample so
that indices and random draws stay reproducible; ``ds.skipped`` counts them. With ``on_error="raise"`` it is a
ValueError naming the shard (or folder) and the key.
"""

from __future__ import annotations

import os
import warnings
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fdistill.data.tar_index import BRACE, OffsetReader, expand_shards, scan_tar
from fdistill.data.transforms import resize_center_crop
from fdistill.io import open_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # in order of preference when a sample has several
CAPTION_EXT = "txt"
ON_ERROR = ("skip", "raise")
SOURCES = ("WebDataset .tar shards (a folder of *.tar files, one .tar file, or a brace pattern such as "
           "data/shard-{000000..000099}.tar), a folder of images with same-named .txt captions, or a prompts "
           ".txt file (one prompt per line)")
MAX_WARNINGS = 20  # per dataset; later skipped samples are only counted (ds.skipped)


class CaptionDataWarning(UserWarning):
    """A sample skipped (on_error="skip") for a missing or unreadable image or caption."""


class _BadSample(ValueError):
    """A sample's image or caption cannot be decoded (the message says why, without naming the sample)."""


# -- decoding -------------------------------------------------------------------------------------
def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (3, resolution, resolution) RGB (``resize_center_crop``). Raises a
    ValueError for bytes that are not a readable 8-bit image."""
    try:
        img = open_image(data, "the image")  # raster formats only: an EPS named .png would run Ghostscript
    except ValueError as e:
        raise _BadSample(str(e)) from e
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise _BadSample(f"the image is {img.mode} (16-bit or float); expected an 8-bit image")
    return resize_center_crop(img, resolution)


def _decode_caption(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise _BadSample(f"the caption is not UTF-8 text ({e})") from e


def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


# -- datasets -------------------------------------------------------------------------------------
class CaptionDataset:
    """Image-caption pairs: ``len(ds)``; ``ds[i] -> (image uint8 (3, R, R) RGB, caption, where)`` with R =
    ``resolution`` and ``where`` = "<shard or folder>:<key>"; iteration in order (skipping bad samples).

    ``caption(i)`` reads only the caption; ``where(i)`` names sample i; ``skipped`` counts the samples left
    out when indexing or found bad when decoding; ``has_images`` is False for a prompts file (captions only).
    """

    kind = ""
    has_images = True

    def __init__(self, source: str, resolution: int, on_error: str) -> None:
        self.source, self.resolution, self.on_error = source, resolution, on_error
        self.keys: list[str] = []
        self._left_out = 0  # samples excluded when indexing
        self._bad: set[int] = set()  # samples found bad when decoding
        self._warned = 0

    # What each source provides: where sample i lives, and its raw caption and image bytes.
    def _container(self, i: int) -> str:
        raise NotImplementedError

    def _caption_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def _image_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        return self._left_out + len(self._bad)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples, resolution={self.resolution})"

    def where(self, i: int) -> str:
        return f"{self._container(i)}:{self.keys[i]}"

    def _problem(self, message: str) -> None:
        """A bad sample: raise ValueError(message) (on_error="raise") or warn (the first MAX_WARNINGS times)."""
        if self.on_error == "raise":
            raise ValueError(message)
        self._warned += 1
        if self._warned <= MAX_WARNINGS:
            warnings.warn(f"{message}; skipped", CaptionDataWarning, stacklevel=4)
        if self._warned == MAX_WARNINGS:
            warnings.warn(f"{self.source}: {MAX_WARNINGS} samples skipped; further ones are not reported "
                          "(ds.skipped counts them)", CaptionDataWarning, stacklevel=4)

    def _leave_out(self, container: str, key: str, why: str) -> None:
        """A sample found bad when indexing: raise, or count it and leave it out."""
        self._problem(f"{container}: sample {key} {why}")
        self._left_out += 1

    def _read(self, i: int, image: bool) -> tuple[np.ndarray | None, str] | None:
        """(image or None, caption) of sample i, or None if it is bad (after reporting it, on_error="skip")."""
        if i in self._bad:
            return None
        try:
            caption = _decode_caption(self._caption_bytes(i))
            return (decode_image(self._image_bytes(i), self.resolution) if image else None), caption
        except _BadSample as e:
            if self.on_error == "skip":
                self._bad.add(i)
            self._problem(f"{self._container(i)}: sample {self.keys[i]}: {e}")
            return None

    def _valid(self, i: int, image: bool) -> tuple[int, np.ndarray | None, str]:
        """Sample i, or the next valid one after it (wrapping around) if i is bad."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.source}: sample {i} out of range (the dataset has {n} samples)")
        i %= n
        for j in range(n):
            k = (i + j) % n
            got = self._read(k, image)
            if got is not None:
                return k, got[0], got[1]
        raise ValueError(f"{self.source}: no readable sample: all {n} failed to decode")

    def _need_images(self) -> None:
        if not self.has_images:
            raise ValueError(f"{self.source} is a prompts file: it has prompts but no images; training needs "
                             "image-caption pairs (tar shards or an image folder with .txt captions)")

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, str]:
        self._need_images()
        k, img, caption = self._valid(int(i), image=True)
        return img, caption, self.where(k)

    def caption(self, i: int) -> str:
        """Caption of sample i (of the next valid sample if its caption is unreadable), without the image."""
        return self._valid(int(i), image=False)[2]

    def __iter__(self) -> Iterator[tuple[np.ndarray, str, str]]:
        self._need_images()
        for i in range(len(self)):
            got = self._read(i, image=True)
            if got is not None:
                yield got[0], got[1], self.where(i)

    def _check_not_empty(self, looked_for: str) -> None:
        if not self.keys:
            extra = f" ({self._left_out} skipped)" if self._left_out else ""
            raise ValueError(f"no samples found in {self.source}{extra}; expected {looked_for}")


class TarCaptions(CaptionDataset):
    """WebDataset tar shards, indexed by scanning their headers: per sample the shard, the key and the byte
    offsets and sizes of its image and caption."""

    kind = "tar"

    def __init__(self, shards: Sequence[str | Path], source: str, resolution: int, on_error: str) -> None:
        super().__init__(source, resolution, on_error)
        self.shards = [str(s) for s in shards]
        table = array("q")  # per sample: shard, image offset, image size, caption offset, caption size
        for s, shard in enumerate(self.shards):
            for key, row in self._index_shard(shard):
                self.keys.append(key)
                table.extend((s, *row))
        rows = np.frombuffer(table, dtype=np.int64).reshape(-1, 5) if len(table) else np.zeros((0, 5), np.int64)
        self._shard, self._image, self._text = rows[:, 0].astype(np.int32), rows[:, 1:3], rows[:, 3:5]
        self._check_not_empty("samples with an image (" + ", ".join(IMAGE_EXTS) + ") and a .txt caption")
        self._reader = OffsetReader(self.shards)

    def _index_shard(self, shard: str) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
        """(key, (image offset, image size, caption offset, caption size)) of each good sample of ``shard``."""
        end = os.path.getsize(shard)
        for key, exts in scan_tar(shard, end, self._problem).items():
            image = next((e for e in IMAGE_EXTS if e in exts), None)
            text = exts.get(CAPTION_EXT)
            if image is None and text is None:
                continue  # e.g. only .json/.cls members: not an image-caption sample
            if image is None:
                self._leave_out(shard, key, f"has a caption but no image (no {key}.jpg/.jpeg/.png/.webp/.bmp)")
            elif text is None:
                self._leave_out(shard, key, f"has no caption (no {key}.{CAPTION_EXT} next to {key}.{image})")
            elif max(sum(exts[image]), sum(text)) > end:
                self._leave_out(shard, key, "is cut off: the shard ends inside it (truncated tar)")
            else:
                yield key, (*exts[image], *text)

    def _container(self, i: int) -> str:
        return self.shards[self._shard[i]]

    def _read_at(self, shard: int, offset: int, size: int) -> bytes:
        data = self._reader.read(shard, offset, size)
        if len(data) != size:
            raise _BadSample(f"read {len(data)} of {size} bytes: the shard changed since it was indexed")
        return data

    def _image_bytes(self, i: int) -> bytes:
        return self._read_at(int(self._shard[i]), *map(int, self._image[i]))

    def _caption_bytes(self, i: int) -> bytes:
        return self._read_at(int(self._shard[i]), *map(int, self._text[i]))


class FolderCaptions(CaptionDataset):
    """A folder of images, searched recursively, each with a same-named ``.txt`` caption next to it; the key
    of a sample is the image's path relative to the folder."""

    kind = "folder"

    def __init__(self, root: Path, resolution: int, on_error: str) -> None:
        super().__init__(str(root), resolution, on_error)
        self.root = root
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        present = set(files)
        for rel in files:
            stem, dot, ext = rel.rpartition(".")
            if not dot or "/" in ext or ext.lower() not in IMAGE_EXTS or _is_hidden(rel):
                continue
            if f"{stem}.{CAPTION_EXT}" in present:
                self.keys.append(rel)
            else:
                self._leave_out(self.source, rel, f"has no caption (no {stem}.{CAPTION_EXT} next to it)")
        self._check_not_empty(f"images ({', '.join(IMAGE_EXTS)}) with same-named .txt captions")

    def _container(self, i: int) -> str:
        return self.source

    def _image_bytes(self, i: int) -> bytes:
        return (self.root / self.keys[i]).read_bytes()

    def _caption_bytes(self, i: int) -> bytes:
        return (self.root / f"{self.keys[i].rpartition('.')[0]}.{CAPTION_EXT}").read_bytes()


class PromptCaptions(CaptionDataset):
    """A prompts file: one prompt per line (blank lines and ``#`` comment lines skipped); the key of a prompt
    is its line number. Captions only: ``ds[i]`` is an error, ``caption(i)`` gives prompt i."""

    kind = "prompts"
    has_images = False

    def __init__(self, path: Path, on_error: str) -> None:
        super().__init__(str(path), 0, on_error)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}); expected a prompts file, one prompt per line") from e
        self.prompts: list[str] = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                self.prompts.append(text)
                self.keys.append(str(number))
        self._check_not_empty("one prompt per line (blank lines and # comments are skipped)")

    def _container(self, i: int) -> str:
        return self.source

    def _caption_bytes(self, i: int) -> bytes:
        return self.prompts[i].encode()


def open_captions(source: str | Path, resolution: int = 512, on_error: str = "skip") -> CaptionDataset:
    """Image-caption pairs (or prompts) from ``source``: a folder of ``*.tar`` shards, a ``.tar`` file, a
    brace pattern of tar files, a folder of images with ``.txt`` captions, or a prompts ``.txt`` file.
    Images come out ``resolution`` pixels square; ``on_error`` is "skip" or "raise" (see the module doc)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r}; expected a positive integer (pixels)")
    text, path = str(source), Path(source)
    if not path.exists() and BRACE.search(text):
        return TarCaptions(expand_shards(text), text, resolution, on_error)
    if not path.exists():
        raise FileNotFoundError(f"caption source {path} not found; expected {SOURCES}")
    if path.is_dir():
        shards = sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith("."))
        if shards:
            return TarCaptions(shards, str(path), resolution, on_error)
        return FolderCaptions(path, resolution, on_error)
    name = path.name.lower()
    if name.endswith(".tar"):
        return TarCaptions([path], str(path), resolution, on_error)
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise ValueError(f"{path} is a compressed tar; samples are read by seeking, which needs plain .tar shards "
                         "(decompress it first)")
    if name.endswith(".txt"):
        return PromptCaptions(path, on_error)
    raise ValueError(f"cannot read captions from {path}: expected {SOURCES}")
