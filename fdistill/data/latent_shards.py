"""Precomputed VAE latents and text conditions in safetensors shards: ``fdistill prepare-latents`` writes them
(LatentShardWriter), training reads them (LatentShards, LatentSampler).

A folder holds:

- ``shard-000000.safetensors``, ``shard-000001.safetensors``, ...: tensor ``latents`` (N, C, h, w) and any
  condition tensors (e.g. ``prompt_embeds`` (N, 77, D), ``pooled`` (N, D2), ``time_ids`` (N, 6)), all with the
  same N, and metadata ``format``, ``keys`` and ``captions`` (JSON lists, one entry per sample);
- ``index.json``: ``{"format", "version", "tensors": {name: {"shape": per-sample shape, "dtype"}},
  "shards": [{"file", "samples", "bytes", "sha256", "source", "first_key", "last_key"}, ...]}``, listing only
  completed shards, in order.

Crash safety: a shard is written under a temporary name, fsynced and renamed; then index.json is rewritten the
same way (temporary file, fsync, os.replace). Readers and a reopened writer trust index.json only, so a kill at
any instant loses at most the samples not yet in a listed shard: the writer continues after the last listed
shard (a half-written or unlisted shard file is overwritten) and ``done(key)`` tells the caller which input is
already written. One writer per folder at a time.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fdistill.io import TEMP_GLOB, atomic_path, sha256, write_text

FORMAT = "fdistill-latent-shards"
VERSION = 1
INDEX = "index.json"
LATENTS = "latents"
SHARD_NAME = "shard-{:06d}.safetensors"
WHAT = "a latent-shards folder written by LatentShardWriter (fdistill prepare-latents)"
_STORED = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # safetensors dtype codes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}; expected a torch dtype such as float16")
    return dtype


def _read_index(folder: Path) -> dict:
    """index.json of ``folder``, checked: format, version, tensors and the list of shards."""
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {WHAT}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected the index of {WHAT}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} index (no \"format\": \"{FORMAT}\"); expected {WHAT}")
    if index.get("version") != VERSION:
        raise ValueError(f"{path} has version {index.get('version')!r}; this fdistill reads version {VERSION}")
    tensors, shards = index.get("tensors"), index.get("shards")
    if not isinstance(tensors, dict) or not isinstance(shards, list):
        raise ValueError(f"{path} needs a \"tensors\" object and a \"shards\" list; expected the index of {WHAT}")
    for name, spec in tensors.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list) and "dtype" in spec):
            raise ValueError(f"{path}: tensor {name!r} needs \"shape\" (a list) and \"dtype\"")
        _torch_dtype(spec["dtype"], f"{path}: tensor {name!r}")
    if shards and LATENTS not in tensors:
        raise ValueError(f"{path}: \"tensors\" has no {LATENTS!r}; expected {WHAT}")
    for n, entry in enumerate(shards):
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and "/" not in entry["file"]
        if not (ok and all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("samples", "bytes"))):
            raise ValueError(f"{path}: shard entry {n} needs \"file\" (a name in the folder), \"samples\" and "
                             "\"bytes\" (positive integers)")
    return index


@dataclass
class _Shard:
    """An open shard: its safetensors handle (memory-mapped; slices read only their bytes), keys, captions."""

    handle: object
    keys: list[str]
    captions: list[str]


def _open_shard(folder: Path, entry: dict, tensors: dict) -> _Shard:
    """Open and check shard ``entry`` of the index: present, of the recorded size, a safetensors file with
    the index's tensors (N rows each) and N keys and captions."""
    path = folder / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {folder / INDEX} but missing; expected {WHAT}")
    size, n = path.stat().st_size, entry["samples"]
    if size != entry["bytes"]:
        raise ValueError(f"{path} has {size} bytes but {INDEX} records {entry['bytes']}: the shard is truncated "
                         "or was modified")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        meta = handle.metadata() or {}
        keys, captions = json.loads(meta.get("keys", "null")), json.loads(meta.get("captions", "null"))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors shard ({e}); it is corrupt") from e
    if meta.get("format") != FORMAT or not (isinstance(keys, list) and isinstance(captions, list)):
        raise ValueError(f"{path} has no {FORMAT} metadata (format, keys, captions); expected a shard of {WHAT}")
    if len(keys) != n or len(captions) != n:
        raise ValueError(f"{path} lists {len(keys)} keys and {len(captions)} captions; {INDEX} says {n} samples")
    names = set(handle.keys())
    for name, spec in tensors.items():
        if name not in names:
            raise ValueError(f"{path} has no tensor {name!r}; {INDEX} lists {sorted(tensors)}")
        sl = handle.get_slice(name)
        shape, dtype = list(sl.get_shape()), _STORED.get(sl.get_dtype(), sl.get_dtype())
        if shape != [n, *spec["shape"]] or dtype != spec["dtype"]:
            raise ValueError(f"{path}: tensor {name!r} is {dtype} {shape}; {INDEX} says {spec['dtype']} "
                             f"{[n, *spec['shape']]}")
    return _Shard(handle, keys, captions)


# -- writing --------------------------------------------------------------------------------------
class LatentShardWriter:
    """Writes samples (key, latents (C, h, w), condition tensors, caption) into shards of ``shard_size``.

    Resumable: reopened on a folder, it continues after the shards that index.json lists; ``done(key)`` says
    whether a sample is already written, so the caller skips that input. ``add`` refuses a key that is written
    or pending. Every sample must have the same tensors, shapes and dtypes (those of the first sample, or of
    index.json). ``source`` (e.g. the caption dataset's path) is recorded with each shard.
    """

    def __init__(self, folder: str | Path, shard_size: int = 1024, source: str = "") -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r}; expected a positive integer")
        self.folder, self.shard_size, self.source = Path(folder), shard_size, str(source)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / INDEX).exists():
            self.index = _read_index(self.folder)
        else:
            self.index = {"format": FORMAT, "version": VERSION, "tensors": {}, "shards": []}
        self._done: set[str] = set()
        for entry in self.index["shards"]:
            self._done.update(_open_shard(self.folder, entry, self.index["tensors"]).keys)
        for stale in self.folder.glob(TEMP_GLOB):  # left by a killed writer (of any process id)
            if stale.name.startswith((".shard-", f".{INDEX}.")):
                stale.unlink()
        self._pending: list[tuple[str, dict[str, Tensor], str]] = []
        self._pending_keys: set[str] = set()

    @property
    def written(self) -> int:
        """Samples in completed shards."""
        return sum(e["samples"] for e in self.index["shards"])

    def done(self, key: str) -> bool:
        """Whether sample ``key`` is in a completed shard (pending samples are not done)."""
        return key in self._done

    def _check(self, key: str, tensors: dict[str, Tensor]) -> None:
        spec = self.index["tensors"]
        where = f"{self.folder}: sample {key!r}"
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {name} is a {type(t).__name__}; expected a torch.Tensor")
        got = {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()}
        if not spec:
            if tensors[LATENTS].ndim < 1:
                raise ValueError(f"{where}: latents is a scalar; expected one sample's latents (C, h, w)")
            self.index["tensors"] = got
        elif got != spec:
            show = lambda s: ", ".join(f"{n} {v['dtype']} {tuple(v['shape'])}" for n, v in s.items())
            raise ValueError(f"{where} has tensors {show(got)}; expected {show(spec)} as the earlier samples")

    def add(self, key: str, latents: Tensor, cond: dict[str, Tensor], caption: str) -> None:
        """Add one sample: latents (C, h, w) and per-sample condition tensors (e.g. prompt_embeds (77, D)).
        Writes a shard whenever ``shard_size`` samples are pending."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.folder}: sample key {key!r}; expected a non-empty string")
        if key in self._done or key in self._pending_keys:
            raise ValueError(f"{self.folder}: sample {key!r} is already {'written' if key in self._done else 'added'};"
                             " check done(key) and skip input that is written")
        if LATENTS in cond:
            raise ValueError(f"{self.folder}: sample {key!r}: a condition may not be named {LATENTS!r}")
        if not isinstance(caption, str):
            raise TypeError(f"{self.folder}: sample {key!r}: caption is a {type(caption).__name__}; expected str")
        tensors = {LATENTS: latents, **cond}
        self._check(key, tensors)
        self._pending.append((key, {n: t.detach().to("cpu") for n, t in tensors.items()}, caption))
        self._pending_keys.add(key)
        if len(self._pending) >= self.shard_size:
            self.flush()

    def add_batch(self, keys: Sequence[str], latents: Tensor, cond: dict[str, Tensor],
                  captions: Sequence[str]) -> None:
        """``add`` for each row of a batch: latents (m, C, h, w), cond tensors (m, ...), m keys and captions."""
        m = len(keys)
        if len(latents) != m or len(captions) != m or any(len(t) != m for t in cond.values()):
            raise ValueError(f"{self.folder}: add_batch needs m keys, captions and rows of every tensor; got "
                             f"{m} keys, {len(captions)} captions, latents {tuple(latents.shape)}, "
                             + ", ".join(f"{n} {tuple(t.shape)}" for n, t in cond.items()))
        for i, key in enumerate(keys):
            self.add(key, latents[i], {n: t[i] for n, t in cond.items()}, captions[i])

    def flush(self) -> None:
        """Write the pending samples as the next shard (temporary file, fsync, rename), then index.json."""
        if not self._pending:
            return
        number = len(self.index["shards"])
        path = self.folder / SHARD_NAME.format(number)
        keys = [k for k, _, _ in self._pending]
        captions = [c for _, _, c in self._pending]
        tensors = {n: torch.stack([t[n] for _, t, _ in self._pending]).contiguous() for n in self.index["tensors"]}
        meta = {"format": FORMAT, "keys": json.dumps(keys, ensure_ascii=False),
                "captions": json.dumps(captions, ensure_ascii=False)}
        with atomic_path(path, durable=True) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
            del tensors
        entry = {"file": path.name, "samples": len(keys), "bytes": path.stat().st_size, "sha256": sha256(path),
                 "source": self.source, "first_key": keys[0], "last_key": keys[-1]}
        self._write_index({**self.index, "shards": [*self.index["shards"], entry]})
        self._done.update(keys)
        self._pending, self._pending_keys = [], set()

    def _write_index(self, index: dict) -> None:
        write_text(self.folder / INDEX, json.dumps(index, indent=1, ensure_ascii=False), durable=True)
        self.index = index

    def close(self) -> None:
        """Write the pending samples (a last, smaller shard) and make sure index.json exists."""
        self.flush()
        if not (self.folder / INDEX).exists():
            self._write_index(self.index)

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # after an error the pending samples are dropped; a rerun writes them again
            self.close()


# -- reading --------------------------------------------------------------------------------------
class LatentShards:
    """Samples of a latent-shards folder: ``len``, ``ds[i] -> (latents, cond dict, caption)`` and
    ``batch(indices)``. Shards are opened lazily (checked against index.json) and the last ``cache_size``
    stay open; rows are read from the memory-mapped files, so only the requested samples' bytes are read."""

    def __init__(self, folder: str | Path, cache_size: int = 8) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"latent shards folder {self.folder} not found; expected {WHAT}")
        self.index = _read_index(self.folder)
        self.shards: list[dict] = self.index["shards"]
        where = f"{self.folder / INDEX}"
        self.tensors = {name: (tuple(spec["shape"]), _torch_dtype(spec["dtype"], where))
                        for name, spec in self.index["tensors"].items()}
        self.cond_names = [n for n in self.tensors if n != LATENTS]
        self._ends = np.cumsum([e["samples"] for e in self.shards], dtype=np.int64)
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[int, _Shard] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __repr__(self) -> str:
        return f"LatentShards({str(self.folder)!r}, {len(self)} samples in {len(self.shards)} shards)"

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.folder}: sample {i} out of range (the folder has {n} samples)")
        i %= n
        s = int(np.searchsorted(self._ends, i, side="right"))
        return s, i - (int(self._ends[s - 1]) if s else 0)

    def _shard(self, s: int) -> _Shard:
        with self._lock:
            shard = self._cache.get(s)
            if shard is None:
                shard = self._cache[s] = _open_shard(self.folder, self.shards[s], self.index["tensors"])
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(s)
            return shard

    def key(self, i: int) -> str:
        s, r = self._locate(int(i))
        return self._shard(s).keys[r]

    def caption(self, i: int) -> str:
        s, r = self._locate(int(i))
        return self._shard(s).captions[r]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor], str]:
        latents, cond, captions = self.batch([i])
        return latents[0], {n: t[0] for n, t in cond.items()}, captions[0]

    def read(self, indices: Sequence[int], names: Sequence[str]) -> tuple[dict[str, Tensor], list[str]]:
        """Tensors ``names`` stacked for the samples ``indices`` (in that order, repeats allowed), and captions.
        Reads each shard's rows in contiguous runs."""
        indices = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor | np.ndarray) else indices)]
        unknown = [n for n in names if n not in self.tensors]
        if unknown:
            raise KeyError(f"{self.folder}: no tensor {unknown[0]!r}; the shards hold {list(self.tensors)}")
        out = {n: torch.empty((len(indices), *self.tensors[n][0]), dtype=self.tensors[n][1]) for n in names}
        captions: list[str] = [""] * len(indices)
        groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for pos, i in enumerate(indices):
            s, r = self._locate(i)
            groups[s].append((pos, r))
        for s, items in groups.items():
            shard = self._shard(s)
            rows = sorted({r for _, r in items})
            runs, start = [], 0
            for j in range(1, len(rows) + 1):
                if j == len(rows) or rows[j] != rows[j - 1] + 1:
                    runs.append((rows[start], rows[j - 1] + 1))
                    start = j
            where = {r: j for j, r in enumerate(rows)}
            dst = torch.tensor([p for p, _ in items])
            src = torch.tensor([where[r] for _, r in items])
            for n in names:
                sl = shard.handle.get_slice(n)
                out[n][dst] = torch.cat([sl[a:b] for a, b in runs])[src]
            for p, r in items:
                captions[p] = shard.captions[r]
        return out, captions

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, dict[str, Tensor], list[str]]:
        """(latents (m, C, h, w), {name: (m, ...)} condition tensors, m captions) of samples ``indices``."""
        out, captions = self.read(indices, list(self.tensors))
        latents = out.pop(LATENTS)
        return latents, out, captions

    def verify(self) -> None:
        """Check every shard's size and sha256 against index.json (reads everything); raises naming the first
        bad shard."""
        for entry in self.shards:
            _open_shard(self.folder, entry, self.index["tensors"])
            path = self.folder / entry["file"]
            if "sha256" in entry and sha256(path) != entry["sha256"]:
                raise ValueError(f"{path}: sha256 differs from the one recorded in {INDEX}: the shard is corrupt")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class LatentSampler:
    """Random minibatches of precomputed latents and conditions, the CaptionSampler of latent training: indices
    uniform with replacement from its own seeded torch.Generator; state_dict()/load_state_dict() resume exactly.
    Floating-point tensors come out as ``dtype`` (None: as stored) on ``device``."""

    def __init__(self, shards: LatentShards | str | Path, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = torch.float32) -> None:
        self.shards = shards if isinstance(shards, LatentShards) else LatentShards(shards)
        if len(self.shards) == 0:
            raise ValueError(f"{self.shards.folder} holds no samples; expected {WHAT} with at least one shard")
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, n: int) -> list[int]:
        return torch.randint(len(self.shards), (n,), generator=self.generator).tolist()

    def _to(self, t: Tensor) -> Tensor:
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, dict[str, Tensor]]:
        """Draws n samples' indices and returns the samples at positions ``part`` (data-parallel ranks draw the
        same n and keep their own part): latents (m, C, h, w) and condition tensors {name: (m, ...)}."""
        latents, cond, _ = self.shards.batch(self._draw(n)[part])
        return self._to(latents), {name: self._to(t) for name, t in cond.items()}

    def sample_cond(self, n: int, part: slice = slice(None)) -> dict[str, Tensor]:
        """Condition tensors for the generator (latents not read): n samples drawn uniformly with replacement,
        those at positions ``part`` returned."""
        out, _ = self.shards.read(self._draw(n)[part], self.shards.cond_names)
        return {name: self._to(t) for name, t in out.items()}

    def sample_prompts(self, n: int, part: slice = slice(None)) -> list[str]:
        """Captions: n samples drawn uniformly with replacement, those at positions ``part`` returned."""
        return [self.shards.caption(i) for i in self._draw(n)[part]]

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state(), "sizes": torch.tensor([len(self.shards)])}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        sizes = state.get("sizes")
        if sizes is not None and sizes.tolist() != [len(self.shards)]:
            warnings.warn(f"LatentSampler: the state was saved for {sizes.tolist()[0]} samples, {self.shards.folder}"
                          f" has {len(self.shards)}: the draws will not repeat those of the saved run", stacklevel=2)
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
