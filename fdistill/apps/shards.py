"""Sampling many images in numbered PNG shards, resumable and split over ``torchrun`` processes.

Image i is made from ``items[i]`` (a prompt, a class) and the seed ``seed + i``. Shard k holds images
[k size, (k + 1) size) as ``folder/shard-k/<i>.png``; it is written to a temporary folder and renamed when
complete, so a stopped run continues with the shards it lacks. Rank r of N takes shards r, r + N, ...: the
images do not depend on the number of processes. ``folder/request.json`` records what the images are of
(model, seed, items, shard size), so that another request's images are replaced, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fdistill.data.datasets import to_uint8
from fdistill.data.writers import encode_png
from fdistill.training import distributed

REQUEST = "request.json"


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def claim(folder: str | Path, request: dict, items: list) -> Path:
    """Make ``folder`` hold the images of ``request`` (JSON-able; the items enter as a hash): kept when it
    already does (a stopped run continuing), emptied when it holds another request's (as a rerun of the
    command replaces its output). Rank 0 decides; every rank returns after it."""
    folder = Path(folder)
    request = {**request, "items": hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]}
    path = folder / REQUEST
    if distributed.rank() == 0:
        held = json.loads(path.read_text()) if path.is_file() else None
        if held != request:
            if folder.is_dir() and any(folder.iterdir()):
                held = held or {}
                changed = [f"{k}: {held.get(k)!r} -> {v!r}" for k, v in request.items() if held.get(k) != v]
                print(f"{folder}: replacing images of another request ({'; '.join(changed)})")
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{REQUEST}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(request, indent=1))
            os.replace(tmp, path)
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
        tmp = folder / f".shard-{k:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(a, b, batch_size):
            j = min(i + batch_size, b)
            for offset, img in enumerate(to_uint8(make(items[i:j], list(range(seed + i, seed + j))))):
                (tmp / f"{i + offset:08d}.png").write_bytes(encode_png(img))
            bar.update(j - i)
        os.rename(tmp, folder / f"shard-{k:06d}")
    bar.close()


def read_shard(shard: Path) -> tuple[list[int], np.ndarray]:
    """(image indices, uint8 (N, C, H, W)) of one shard, in index order."""
    files = sorted(shard.glob("*.png"))
    arrays = [np.asarray(Image.open(f)) for f in files]
    images = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
    return [int(f.stem) for f in files], images


def read_all(folder: Path) -> np.ndarray:
    """Every shard's images, in index order."""
    return np.concatenate([read_shard(s)[1] for s in sorted(p for p in folder.glob("shard-*") if p.is_dir())])
