"""``fdistill evaluate-t2i``: the text-to-image metrics of the paper (Table 4, App. D) for a run's (one- or few-step)
student, or its teacher with N steps and a guidance scale (the comparison row): zero-shot FID against a
reference image folder (COCO-2014 val: center crop, LANCZOS resize to 256, Inception), CLIP score (open_clip
ViT-g-14, "A photo depicts " + caption, raw cosine), in-batch similarity (DINO ViT-B/8, within each prompt's
group of images; lower is more diverse) and HPSv2 when its checkpoint is given.

Images are generated once into PNG shards of ``--shard`` images (``<out>/images/shard-000000/``, by
``fdistill.apps.png_shards``: image i from seed ``seed + i``, shards split over ``torchrun`` ranks, a stopped
run continues), then each shard is scored once into ``scores.safetensors`` beside its images: the results
equal a 1-process run's, and a resumed evaluation neither regenerates nor rescores finished shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fdistill.apps.png_shards import claim, generate_shards, read_shard
from fdistill.data.datasets import to_float
from fdistill.evaluation import t2i_metrics
from fdistill.evaluation.clip import CLIP, square_center_crop_resize
from fdistill.evaluation.dino import DINOViT
from fdistill.evaluation.metrics import feature_statistics, frechet_distance
from fdistill.io import atomic_path, open_image, write_text
from fdistill.training import distributed

STAND_IN = "fdistill_stand_in"  # safetensors metadata of a random stand-in network (tests, the CPU demo)
FID_SIZE = 256  # both sides center-cropped and LANCZOS-resized to this before Inception (DMD2's COCO protocol)


# -- scorers ------------------------------------------------------------------------------------------------
@dataclass
class Scorers:
    """The networks that score images, found before any work; ``labels`` say what each is."""

    inception: object | None = None
    clip: CLIP | None = None
    dino: DINOViT | None = None
    hps: CLIP | None = None
    digits: bool = False
    labels: dict[str, str] = field(default_factory=dict)


def _stand_in(path: Path) -> dict | None:
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[STAND_IN]) if STAND_IN in meta else None


def save_stand_in(net: torch.nn.Module, kind: str, architecture: dict, path: str | Path) -> Path:
    """A randomly initialised scorer (CLIP or DINO) as safetensors whose metadata says so and holds its
    architecture: the CPU demo and the tests score with these, and every report labels them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {STAND_IN: json.dumps({"kind": kind, "architecture": architecture})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=meta)
    return path


def _load_clip(path: Path, model: str, device) -> tuple[CLIP, str]:
    spec = _stand_in(path)
    if spec is None:
        return t2i_metrics.load_clip_scorer(path, model, device), f"open_clip {model} ({path.name})"
    t2i_metrics._text_ready()
    net = CLIP(spec["architecture"])
    net.load_state_dict(load_file(path), strict=True)
    return net.to(device).eval().requires_grad_(False), "random stand-in CLIP: not comparable with published numbers"


def _load_dino(path: Path, device) -> tuple[DINOViT, str]:
    spec = _stand_in(path)
    if spec is None:
        return t2i_metrics.load_dino(path, device), f"DINO ViT-B/8 ({path.name})"
    net = DINOViT(**spec["architecture"])
    net.load_state_dict(load_file(path), strict=True)
    return net.to(device).eval().requires_grad_(False), "random stand-in DINO: not comparable with published numbers"


def load_scorers(ref: str | None, inception: str | None, clip: str | None, clip_model: str, dino: str | None,
                 hps: str | None, device) -> Scorers:
    """Every scorer the options ask for, each missing weights file an error before any image is made.
    ``ref`` 'digits' scores FID in the digits classifier's space (the CPU demo); a folder or an .npz of
    mu/sigma in Inception space."""
    s = Scorers()
    if ref == "digits":
        s.digits, s.labels["fid"] = True, "digits-FID (the digits classifier's feature space, 8x8 gray)"
    elif ref is not None:
        from fdistill.evaluation.inception import load_inception

        s.inception = load_inception(inception, device)
        s.labels["fid"] = f"Inception FID ({s.inception.path.name}), {FID_SIZE}-px center crops"
    if clip is not None or os.environ.get("FDISTILL_CLIP"):
        s.clip, s.labels["clip_score"] = _load_clip(t2i_metrics.find_weights(
            t2i_metrics.clip_weights_spec(clip_model), clip), clip_model, device)
    if dino is not None or os.environ.get("FDISTILL_DINO"):
        s.dino, s.labels["in_batch_similarity"] = _load_dino(t2i_metrics.find_weights(t2i_metrics.DINO_SPEC, dino),
                                                             device)
    if hps is not None:
        s.hps, s.labels["hps"] = t2i_metrics.load_hps(hps, device), "HPSv2 (open_clip ViT-H-14)"
    return s


def _digits_view(images: Tensor) -> Tensor:
    """uint8 RGB images -> the digits classifier's input: 8x8 gray in [-1, 1] (area average)."""
    return F.interpolate(to_float(images).mean(1, keepdim=True), size=(8, 8), mode="area")


@torch.no_grad()
def score_shards(folder: Path, scorers: Scorers, prompts: list[str], rank: int, world: int,
                 batch_size: int = 32, progress: bool = True) -> None:
    """Per-image features and scores of this rank's shards into ``shard-k/scores.safetensors`` (once)."""
    shards = sorted(p for p in folder.glob("shard-*") if p.is_dir())
    todo = [s for i, s in enumerate(shards) if i % world == rank and not (s / "scores.safetensors").is_file()]
    for shard in tqdm(todo, desc="scoring", disable=not progress, leave=False):
        index, images_np = read_shard(shard)
        images = torch.from_numpy(images_np)
        out = {"index": torch.tensor(index)}
        if scorers.inception is not None:
            from fdistill.evaluation.inception import extract_features

            out["inception"] = extract_features(scorers.inception, square_center_crop_resize(images, FID_SIZE),
                                                batch_size, False).float()
        if scorers.digits:
            from fdistill.evaluation.digits_classifier import load_digits_classifier

            out["digits"] = load_digits_classifier(progress=False).features(_digits_view(images)).float()
        captions = [prompts[i] for i in index]
        if scorers.clip is not None:
            out["clip_score"] = t2i_metrics.clip_score(scorers.clip, images, captions, batch_size=batch_size,
                                                       pre_resize=FID_SIZE)[1].float()
        if scorers.dino is not None:
            out["dino"] = t2i_metrics.dino_features(scorers.dino, images, batch_size)
        if scorers.hps is not None:
            out["hps"] = t2i_metrics.hps_score(scorers.hps, images, captions, batch_size)[1].float()
        with atomic_path(shard / "scores.safetensors") as tmp:  # a link planted at either name is not followed
            save_file({k: v.contiguous() for k, v in out.items()}, tmp)


# -- the reference --------------------------------------------------------------------------------------------
def reference_statistics(ref: str, scorers: Scorers, batch_size: int = 32, progress: bool = True) -> tuple:
    """(mu, sigma) of the reference: an .npz with mu/sigma; 'digits' (the real digits in the classifier's
    space); or a folder of images, center-cropped and LANCZOS-resized to 256 as the samples are, whose
    Inception statistics are computed once and cached (keyed by the folder's path, size and mtime)."""
    if ref == "digits":
        from fdistill.data.datasets import load_dataset
        from fdistill.evaluation.digits_classifier import load_digits_classifier

        real = to_float(load_dataset("digits").images)
        return feature_statistics(load_digits_classifier(progress=False).features(real))
    if ref.endswith(".npz"):
        from fdistill.evaluation.evaluate import load_reference_stats

        return load_reference_stats(ref)
    from fdistill.evaluation.evaluate import reference_stats_path, save_npz
    from fdistill.evaluation.inception import extract_features

    folder = Path(ref)
    if not folder.is_dir():
        raise FileNotFoundError(f"--ref {ref}: expected a folder of reference images (e.g. COCO's val2014/), "
                                "an .npz with mu and sigma, or 'digits'")
    cache = reference_stats_path(str(folder), scorers.inception, {"center_crop_resize": FID_SIZE})
    if cache.is_file():
        with np.load(cache) as f:
            return f["mu"], f["sigma"]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if len(files) < 2:
        raise ValueError(f"--ref {ref} holds {len(files)} images; expected the reference image folder")
    feats = []
    for i in tqdm(range(0, len(files), batch_size), desc=f"Inception: {folder.name}", disable=not progress):
        batch = [np.asarray(open_image(f).convert("RGB")).transpose(2, 0, 1) for f in files[i:i + batch_size]]
        crops = torch.cat([square_center_crop_resize(torch.from_numpy(b)[None], FID_SIZE) for b in batch])
        feats.append(extract_features(scorers.inception, crops, batch_size, False).float())
    mu, sigma = feature_statistics(torch.cat(feats))
    save_npz(cache, mu=mu, sigma=sigma)
    return mu, sigma


def summarize(folder: Path, scorers: Scorers, ref_stats, group: int) -> dict:
    """The metrics over every shard's scores (in image order)."""
    parts = [load_file(s / "scores.safetensors") for s in sorted(folder.glob("shard-*"))]
    order = torch.cat([p["index"] for p in parts]).argsort()
    cat = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0] if k != "index"}
    out: dict = {"num_images": len(order), "images_per_prompt": group}
    for key in ("inception", "digits"):
        if key in cat:
            out["fid"] = frechet_distance(*ref_stats, *feature_statistics(cat[key]))
    if "clip_score" in cat:
        out["clip_score"] = float(cat["clip_score"].mean())
    if "dino" in cat and group > 1:
        out["in_batch_similarity"] = t2i_metrics.in_batch_similarity(cat["dino"], group)[0]
    if "hps" in cat:
        out["hps"] = float(cat["hps"].mean())
    out["metrics"] = dict(scorers.labels)
    return out


def evaluate(make, prompts: list[str], out: str | Path, scorers: Scorers, ref: str | None, group: int = 1,
             seed: int = 0, shard: int = 1000, batch_size: int = 32, progress: bool = True,
             model: dict | None = None) -> dict | None:
    """Generate ``group`` images per prompt (seeds ``seed + i``), score them and (on rank 0) return the
    metrics, written to ``<out>/metrics.json`` too. Ranks share the work; results do not depend on how many.
    ``model`` (JSON-able) says what makes the images, so that a stopped evaluation only continues its own."""
    out = Path(out)
    items = [p for p in prompts for _ in range(group)]
    folder = claim(out / "images", {**(model or {}), "seed": seed, "shard": shard}, items)
    rank, world = distributed.rank(), distributed.world_size()
    generate_shards(make, items, folder, shard, seed, rank, world, batch_size, progress and rank == 0)
    distributed.barrier()
    score_shards(folder, scorers, items, rank, world, batch_size, progress and rank == 0)
    distributed.barrier()
    if rank != 0:
        return None
    ref_stats = reference_statistics(ref, scorers, batch_size, progress) if ref is not None else None
    result = summarize(folder, scorers, ref_stats, group)
    write_text(out / "metrics.json", json.dumps(result, indent=1))
    return result


def format_table(result: dict, name: str) -> str:
    cols = [("fid", "FID", "{:.2f}"), ("clip_score", "CLIP score", "{:.4f}"),
            ("in_batch_similarity", "in-batch sim", "{:.4f}"), ("hps", "HPSv2", "{:.2f}")]
    shown = [c for c in cols if c[0] in result]
    lines = ["| model | " + " | ".join(c[1] for c in shown) + " | images |", "|---" * (len(shown) + 2) + "|",
             f"| {name} | " + " | ".join(c[2].format(result[c[0]]) for c in shown) + f" | {result['num_images']} |"]
    lines += [f"{k}: {v}" for k, v in result["metrics"].items()]
    return "\n".join(lines)


def evaluate_run(run: str | Path, prompts_file: str | Path, out: str | Path | None = None, ref: str | None = None,
                 num: int = 0, group: int = 1, teacher_steps: int | None = None, guidance: float | None = None,
                 inception: str | None = None, clip: str | None = None, clip_model: str = "ViT-g-14",
                 dino: str | None = None, hps: str | None = None, seed: int = 0, shard: int = 1000,
                 batch_size: int = 32, json_path: str | Path | None = None, device: str = "auto",
                 progress: bool = True) -> Iterator[str]:
    """``fdistill evaluate-t2i``: score the student of ``run`` (a distill run folder or checkpoint), or
    with ``teacher_steps`` and ``guidance`` its teacher, on the first ``num`` prompts of ``prompts_file`` (0: all),
    ``group`` images each, in the processes of the torchrun job if any. Yields the lines to print as they are
    ready (none on ranks other than 0): the table, then what was written (``<out>/metrics.json``, and after that
    line ``json_path``)."""
    from fdistill.apps import t2i
    from fdistill.data.captions import open_captions
    from fdistill.training import checkpoint

    if (teacher_steps is None) != (guidance is None):
        raise ValueError("--teacher-steps and --guidance go together: they select the teacher's comparison row")
    with distributed.process_group(device) as device:
        scorers = load_scorers(ref, inception, clip, clip_model, dino, hps, device)  # every missing file fails here
        if dino and group < 2:
            raise ValueError("in-batch similarity needs several images per prompt: --group 4, say")
        data = open_captions(prompts_file)
        prompts = [data.caption(i) for i in range(min(len(data), num or len(data)))]
        make = t2i.image_maker(run, device, teacher_steps, guidance or 1.0)
        nfe = getattr(make, "nfe", None)  # network calls per image (sample_maker's)
        name = f"teacher ({nfe} NFE, CFG {guidance})" if teacher_steps else f"student ({nfe} NFE)" if nfe else \
            "student"
        out = Path(out) if out else Path(run) / ("eval-teacher" if teacher_steps else "eval")
        model = {"checkpoint": str(checkpoint.resolve(run).resolve()), "teacher_steps": teacher_steps,
                 "guidance": guidance}
        result = evaluate(make, prompts, out, scorers, ref, group, seed, shard, batch_size, progress=progress,
                          model=model)
        if result is not None:
            result["model"] = name
            yield format_table(result, name)
            yield f"wrote {out}/metrics.json and the images in {out}/images/"
            if json_path:
                write_text(json_path, json.dumps(result, indent=1))
