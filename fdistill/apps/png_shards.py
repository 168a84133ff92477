"""Sampling many images in numbered PNG shards, resumable and split over ``torchrun`` processes.

Image i is made from ``items[i]`` (a prompt, a class) and the seed ``seed + i``. Shard k holds images
[k size, (k + 1) size) as ``folder/shard-k/<i>.png``; it is written to a temporary folder and renamed when
complete, so a stopped run continues with the shards it lacks. Rank r of N takes shards r, r + N, ...: the
images do not depend on the number of processes. ``folder/request.json`` records what the images are of
(model, seed, items, shard size), so that another request's images are replaced, never mixed in; each shard
folder's ``shard.json`` lists the images fdistill writes into it (written before them). Replacing deletes only
those: files named as fdistill names them and listed there. A folder holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fdistill import io
from fdistill.data.datasets import to_uint8
from fdistill.data.writers import encode_png
from fdistill.training import distributed

REQUEST = "request.json"
MANIFEST = "shard.json"  # in each shard folder: {"images": [the PNG names fdistill writes there]}
DERIVED = ("scores.safetensors",)  # what evaluate-t2i adds to a finished shard folder
IMAGE = re.compile(r"\d{8}\.png")
SHARD = re.compile(r"shard-\d{6}")
PARTIAL = re.compile(r"\.shard-\d{6}\.tmp-\d+")  # a shard being written (or a stopped process's)
TEMP = re.compile(r"\.(.+)\.tmp-\d+")  # fdistill.io.temp_name's names (.scores.tmp-PID: older evaluate-t2i's)


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _held(folder: Path) -> dict | None:
    """The request recorded in ``folder/request.json`` when it is one of fdistill's, else None."""
    path = folder / REQUEST
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        held = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return held if isinstance(held, dict) and {"items", "seed", "shard"} <= set(held) else None


def _listed(shard: Path) -> set[str] | None:
    """The image names a shard folder's manifest lists, or None when it has no manifest of fdistill's."""
    path = shard / MANIFEST
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        names = json.loads(path.read_text()).get("images")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    ok = isinstance(names, list) and all(isinstance(n, str) and IMAGE.fullmatch(n) for n in names)
    return set(names) if ok else None


def _temp_of(name: str) -> str | None:
    """The file a temporary name is for (``.NAME.tmp-PID`` -> NAME), else None."""
    match = TEMP.fullmatch(name)
    return match[1] if match else None


def _written(folder: Path) -> tuple[list[Path], list[str]]:
    """(the shard folders and loose temporary files fdistill wrote in ``folder``, the entries it did not
    write): a shard folder is fdistill's when named ``shard-NNNNNN`` (or a partial one's name) and holding
    only its manifest, the images that lists, evaluate-t2i's scores and temporary files of those; nothing is
    fdistill's without a request.json of fdistill's, and links never are."""
    if _held(folder) is None:
        return [], [p.name for p in sorted(folder.iterdir())]
    ours, foreign = [], []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif name == REQUEST:
            continue  # replaced by the new request, last
        elif entry.is_file() and _temp_of(name) == REQUEST:
            ours.append(entry)
        elif entry.is_dir() and (SHARD.fullmatch(name) or PARTIAL.fullmatch(name)):
            listed = _listed(entry)
            inside = sorted(entry.iterdir())
            if listed is None and (inside or SHARD.fullmatch(name)):  # only a partial shard may lack it, empty
                foreign.append(name)
                continue
            known = {MANIFEST, *DERIVED, *(listed or ())}
            bad = [p.name for p in inside if p.is_symlink() or not p.is_file()
                   or not (p.name in known or _temp_of(p.name) in {*known, "scores"})]
            foreign += [f"{name}/{b}" for b in bad]
            if not bad:
                ours.append(entry)
        else:
            foreign.append(name)
    return ours, foreign


def _remove_written(paths: list[Path]) -> None:
    """Delete what ``_written`` found to be fdistill's: each shard folder first loses its finished name (so a
    stop in between leaves a partial shard, never a finished one with images missing), then its files."""
    for path in paths:
        if path.is_dir():
            if SHARD.fullmatch(path.name):
                partial = io.temp_name(path)
                os.rename(path, partial)
                path = partial
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()


def claim(folder: str | Path, request: dict, items: list) -> Path:
    """Make ``folder`` hold the images of ``request`` (JSON-able; the items enter as a hash): kept when it
    already does (a stopped run continuing); when it holds another request's images, fdistill's shards are
    deleted (as a rerun of the command replaces its output), but a folder holding anything fdistill did not
    write is refused with one line. Every rank checks; rank 0 changes the folder; every rank returns after."""
    folder = Path(folder)
    request = {**request, "items": hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]}
    advice = f"pick an empty or new --out, or remove {folder} yourself"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder of fdistill's "
                         f"images: {advice}")
    held = _held(folder) if folder.is_dir() else None
    replace = held != request and folder.is_dir() and any(folder.iterdir())
    ours: list[Path] = []
    if replace:
        ours, foreign = _written(folder)
        if foreign:
            what = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            reason = f"it has no {REQUEST} of fdistill's" if held is None else "fdistill did not write them"
            raise ValueError(f"{folder} holds {what}; {reason}, so its images are not replaced: {advice}")
    distributed.barrier()  # every rank has checked before rank 0 changes anything
    if distributed.rank() == 0 and held != request:
        if replace:
            changed = [f"{k}: {held.get(k)!r} -> {v!r}" for k, v in request.items() if held.get(k) != v]
            print(f"{folder}: replacing images of another request ({'; '.join(changed)})")
            _remove_written(ours)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_text(folder / REQUEST, json.dumps(request, indent=1))
    distributed.barrier()
    return folder


def generate_shards(make, items: list, folder: Path, shard: int, seed: int, rank: int, world: int,
                    batch_size: int = 32, progress: bool = True) -> None:
    """Image i as ``folder/shard-k/<i>.png`` for this rank's missing shards; ``make(items, seeds)`` returns
    images in [-1, 1], (B, C, H, W) with C = 1 or 3."""
    todo = [(k, a, b) for k, (a, b) in enumerate(ranges(len(items), shard))
            if k % world == rank and not (folder / f"shard-{k:06d}").is_dir()]
    bar = tqdm(total=sum(b - a for _, a, b in todo), desc="generating", disable=not progress, leave=False)
    for k, a, b in todo:
        with io.atomic_dir(folder / f"shard-{k:06d}") as tmp:  # .shard-K.tmp-PID until complete
            io.write_text(tmp / MANIFEST, json.dumps({"images": [f"{i:08d}.png" for i in range(a, b)]}))
            for i in range(a, b, batch_size):
                j = min(i + batch_size, b)
                for offset, img in enumerate(to_uint8(make(items[i:j], list(range(seed + i, seed + j))))):
                    io.write_bytes(tmp / f"{i + offset:08d}.png", encode_png(img))
                bar.update(j - i)
    bar.close()


def read_shard(shard: Path) -> tuple[list[int], np.ndarray]:
    """(image indices, uint8 (N, C, H, W)) of one shard, in index order."""
    files = sorted(shard.glob("*.png"))
    arrays = [np.asarray(io.open_image(f)) for f in files]
    images = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
    return [int(f.stem) for f in files], images


def read_all(folder: Path) -> np.ndarray:
    """Every shard's images, in index order."""
    return np.concatenate([read_shard(s)[1] for s in sorted(p for p in folder.glob("shard-*") if p.is_dir())])
