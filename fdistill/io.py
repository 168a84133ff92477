"""Files fdistill writes: every one through a temporary sibling and a rename, so a reader (or a crash) never
sees a partial file and a symlink planted at the destination is replaced, not written through. Images fdistill
reads go through ``open_image``, which decodes only plain raster formats."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` (hidden, tagged with the process id): ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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
