"""Files fdistill writes: every one through a temporary sibling and a rename, so a reader (or a crash) never
sees a partial file and a symlink planted at the destination is replaced, not written through. Images fdistill
reads go through ``open_image``, which decodes only plain raster formats."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


TEMP_GLOB = ".*.tmp-*"  # every name temp_name gives, of any process


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` (hidden, tagged with the process id): ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def other_temps(folder: Path) -> list[Path]:
    """The temporary names (``temp_name``) in ``folder`` that are not this process's: a stopped writer's."""
    own = f".tmp-{os.getpid()}"
    return [p for p in folder.glob(TEMP_GLOB) if not p.name.endswith(own)]


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: the writer fills ``tmp``, which then replaces ``p`` by
    ``os.replace`` (a symlink at ``p`` is replaced itself; its target is untouched). On an exception the
    temporary file is removed and ``p`` is left as it was. ``durable``: fsync the file and its folder."""
    path = Path(path)
    tmp = temp_name(path)
    tmp.unlink(missing_ok=True)  # a link planted at the temporary name is removed, not followed
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: fill(tmp)``: the folder version of ``atomic_path``. The writer fills the
    empty folder ``tmp`` (``temp_name(p)``; whatever a killed writer left there, or a link planted there, is
    removed first), which is then renamed to ``p``: ``p`` is never a partial folder. A folder already at ``p`` is
    renamed aside (``.NAME.old-PID``), the new one takes its name, then the old one is removed. On an exception the
    temporary folder is removed and ``p`` is left as it was. ``durable``: fsync the folder's entries and the
    folder before the rename and the parent after it, so a complete ``p`` survives a power loss."""
    path = Path(path)
    tmp = temp_name(path)
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if durable:
            for entry in sorted(tmp.iterdir()):
                (fsync_dir if entry.is_dir() else fsync_file)(entry)
            fsync_dir(tmp)
        if os.path.lexists(path):  # the same name again: put the old one aside first
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes, durable: bool = False) -> Path:
    with atomic_path(path, durable) as tmp, open(tmp, "xb") as f:  # "x": never through a link planted meanwhile
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    return write_bytes(path, text.encode(), durable)


# -- images fdistill reads ----------------------------------------------------------------------------------
# Raster formats decoded by Pillow itself. Without ``formats=`` PIL also opens EPS/PS (decoded by running
# Ghostscript on the file's PostScript) and a dozen rarer formats, whatever the file's name says.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def open_image(source: str | Path | bytes, name: str | None = None) -> PILImage:
    """A decoded (loaded) PIL image from a file or bytes, read only as one of ``RASTER_FORMATS``. Anything else
    (an EPS named ``.png``, a truncated or corrupt file) raises a ValueError "cannot decode NAME: ..." (NAME
    defaults to "image PATH") naming the formats accepted; nothing outside Pillow's own decoders runs."""
    import io

    from PIL import Image, UnidentifiedImageError

    name = name or ("the image" if isinstance(source, bytes) else f"image {source}")
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fp:
            img = Image.open(fp, formats=RASTER_FORMATS)
            img.load()
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot decode {name}: not an image format PIL can read as {', '.join(RASTER_FORMATS)} "
                         "(others are refused: for some, such as EPS, PIL would run an external program)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError, ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot decode {name} ({type(e).__name__}{': ' + why if why else ''})") from e
    return img


def read_json_object(path: Path) -> dict:
    """A JSON object from a file (a model folder's config), or one line saying why not."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data
