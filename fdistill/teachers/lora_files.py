"""Students as LoRA files, out and in: what users load onto the base pipeline they already have
(``pipe.load_lora_weights(...)``, as DMD2's SDXL LoRA, Hyper-SD, SDXL-Lightning or Qwen-Image-Lightning are loaded).

Out (``export_lora``, ``fdistill export --lora OUT``): the EMA generator's adapter of a LoRA run (``text.lora_rank``
> 0, shared-base runs too) in the layout the family's pipeline reads: peft's ``get_peft_model_state_dict`` of the
adapter (for the UNet families also ``convert_state_dict_to_diffusers``, as diffusers' SD/SDXL LoRA training scripts
save it), written by the pipeline class's ``save_lora_weights`` with the peft ``LoraConfig`` (rank, ``lora_alpha``,
targets) as the adapter metadata, into ``pytorch_lora_weights.safetensors``; next to it ``scheduler/``, the scheduler
the ``--diffusers`` export writes for the student (its step count and noise levels, ``student_scheduler``), and a
model card README.md naming the base model, its license and the call. A fully fine-tuned student (``--lora-rank R``)
is first made a LoRA by truncated SVD of its weight difference from the teacher on the layers LoRA targets
(``extract_lora``), each layer's relative error reported, and the changed parameters no LoRA carries named.

In (``warm_start``, ``fdistill distill --init-from``): besides a fdistill run, a LoRA file for the teacher's pipeline
(read by the pipeline class's ``lora_state_dict`` and ``load_lora_into_unet`` / ``load_lora_into_transformer``, so
every format diffusers reads, kohya's included) or a diffusers UNet / transformer folder of the teacher's
architecture starts the generator and its EMA; the fake score and the discriminator start as usual. A LoRA goes into
a LoRA run's adapter (same rank) or is fused into a full run's weights; a network folder replaces a full run's.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.io import read_json_object, temp_name
from fdistill.teachers import pipeline_folders as pf

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what load_lora_weights looks for
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
EXPECTED = ("a distill run folder or checkpoint, a LoRA file for the teacher's pipeline (.safetensors, or a folder "
            f"holding {LORA_FILE}) or a diffusers UNet / transformer of the teacher's architecture (a folder with "
            "config.json and safetensors weights, e.g. a pipeline's unet/, or one .safetensors file of its weights)")
ADAPTER_KEY = re.compile(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight")  # <layer>.lora_A[.<adapter>].weight
FILE_ADAPTER = "fdistill_file"  # the peft adapter name a read LoRA file gets on the scratch network
MAX_LICENSE_IN_CARD = 4000  # characters of a license file quoted in the model card (longer: named only)


# -- the runs' adapters ----------------------------------------------------------------------------------------------
def adapter_keys(state: dict, backbone: str) -> dict[str, dict[str, str]]:
    """``{layer: {"lora_A": key, "lora_B": key}}`` of a generator's state dict: a LoRA run's (peft's keys
    ``<backbone>.<layer>.lora_A.default.weight``) or a shared-base view's (``lora.<backbone>:<layer>:lora_A:weight``);
    ``layer`` is the module's name inside the backbone, as diffusers and peft name it."""
    out: dict[str, dict[str, str]] = {}
    for key in state:
        name = key.removeprefix("lora.").replace(":", ".")
        if not name.startswith(backbone + "."):
            continue
        m = ADAPTER_KEY.fullmatch(name[len(backbone) + 1:])
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = key
    return out


def tuner_layers(network: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers in ``network`` by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in network.named_modules() if isinstance(m, BaseTunerLayer)}


# -- out: exporting a run's generator as a LoRA file ---------------------------------------------------------------
def open_run(run: str | Path):
    """(teacher, info, StudentSteps, EMA generator weights) of a text-to-image distill run or checkpoint
    (``apps.distill.read_run``; the teacher's folder must still be there)."""
    from fdistill.apps.distill import read_run
    from fdistill.teachers.latent_t2i import LatentTextToImageTeacher

    teacher, info, student, weights = read_run(run)
    if not isinstance(teacher, LatentTextToImageTeacher):
        raise ValueError(f"{run} distilled a {teacher.kind} teacher: --lora exports the students of text-to-image "
                         "pipelines (SD1.5 / SDXL, SD3, FLUX.1, SANA, Qwen-Image) only")
    return teacher, info, student, weights


def adapter_on_teacher(teacher, weights: dict[str, Tensor], info: dict, where: str) -> nn.Module:
    """The teacher's denoiser carrying the LoRA run's generator adapter (peft adapter "default", rank
    ``info["lora_rank"]``, alpha = rank as ``pipeline_folders.add_lora`` makes it), loaded from ``weights`` (a LoRA
    run's: base weights and adapter; a shared-base run's: the adapter view's). A LoRA file applies to the teacher's
    weights, so a run whose base differs from them (another teacher folder since) is refused."""
    from fdistill.networks.shared_base import lora_state_dict

    net = teacher.denoiser
    teacher.lora(net, int(info["lora_rank"]))
    if info.get("shared_base"):
        weights = lora_state_dict(weights)
    own = net.state_dict()
    differ = [k for k, v in weights.items() if ".lora_" not in k and k in own
              and not (v.shape == own[k].shape and torch.allclose(v.to(own[k].dtype), own[k], rtol=1e-6, atol=0))]
    if differ:
        raise ValueError(f"{where}: the generator's base weights differ from the teacher folder's in {len(differ)} "
                         f"tensors (e.g. {differ[0]}): a LoRA file applies to the teacher's weights; export it with "
                         "--diffusers instead")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    lost = [k for k in missing if ".lora_" in k]
    if unexpected or lost:
        raise ValueError(f"{where}: its generator weights do not fit a rank-{info['lora_rank']} adapter on the "
                         f"teacher's {teacher.backbone} (missing {lost[:2]}, unexpected {unexpected[:2]})")
    return net


def svd_lora(diff: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A [rank, in], B [out, rank], relative error) of the best rank-``rank`` approximation B A of the weight
    difference ``diff`` [out, in] (truncated SVD, Eckart-Young; the singular values split evenly between the two
    factors, zero rows where the rank exceeds the matrix's); the error is ||diff - B A||_F / ||diff||_F (0 for a
    zero difference)."""
    d = diff.detach().to(torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, d.shape[1], dtype=d.dtype, device=d.device)
    b = torch.zeros(d.shape[0], rank, dtype=d.dtype, device=d.device)
    a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
    norm = float(d.double().norm())
    error = float((d.double() - b.double() @ a.double()).norm()) / norm if norm > 0 else 0.0
    return a, b, error


def extract_lora(teacher, student: nn.Module, rank: int) -> list[str]:
    """The fully fine-tuned ``student``'s weight difference from the teacher on the layers LoRA targets (the
    family's ``lora_targets``) as a rank-``rank`` adapter (peft adapter "default") on the teacher's own denoiser, by
    truncated SVD (``svd_lora``); returns the report: each layer's relative error, a summary, and the changed
    parameters no LoRA carries (norms, biases, embeddings, untargeted layers: the file leaves them at the
    teacher's)."""
    backbone = teacher.backbone
    base, tuned = getattr(teacher.denoiser, backbone), getattr(student, backbone)
    theirs = dict(tuned.named_parameters())
    changed = [n for n, p in base.named_parameters() if n not in theirs or theirs[n].shape != p.shape
               or not torch.equal(theirs[n].to(p.dtype), p)]
    teacher.lora(teacher.denoiser, rank)
    lines, errors, norms = [], [], []
    carried = set()
    with torch.no_grad():
        for name, layer in tuner_layers(base).items():
            weight = layer.get_base_layer().weight
            if weight.dim() != 2 or name + ".weight" not in theirs:
                continue
            diff = theirs[name + ".weight"].to(weight) - weight
            a, b, error = svd_lora(diff, rank)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b / layer.scaling["default"])
            carried.add(name + ".weight")
            norm = float(diff.double().norm())
            errors.append(error)
            norms.append(norm)
            lines.append(f"  {name}: relative error {error:.3g}" + (" (unchanged)" if norm == 0 else ""))
    if not errors:
        raise ValueError(f"the teacher's {backbone} has no layer named {teacher.lora_targets} to extract a LoRA for")
    total = sum(n * n for n in norms) ** 0.5
    overall = (sum((e * n) ** 2 for e, n in zip(errors, norms)) ** 0.5 / total) if total > 0 else 0.0
    lines.insert(0, f"rank-{rank} LoRA extracted by truncated SVD from the student's weight difference on "
                    f"{len(errors)} {backbone} layers ({', '.join(teacher.lora_targets)}); relative error "
                    "||D - BA||_F / ||D||_F per layer:")
    lines.append(f"relative error: overall {overall:.3g}, largest {max(errors):.3g}, median "
                 f"{sorted(errors)[len(errors) // 2]:.3g}")
    rest = [n for n in changed if n not in carried]
    if rest:
        shown = ", ".join(rest[:12]) + (f", ... ({len(rest) - 12} more)" if len(rest) > 12 else "")
        lines.append(f"not carried by any LoRA: {len(rest)} changed parameters outside the targeted layers' weights "
                     f"(norms, biases, embeddings, other layers), left at the teacher's in the file: {shown}")
    else:
        lines.append("every changed parameter is a targeted layer's weight: nothing else is left behind")
    return lines


def license_of(folder: Path) -> tuple[str | None, list[Path]]:
    """The teacher folder's license: the ``license`` (or ``license_name``) field of its README.md front matter or
    model_index.json (None when there is none) and its LICENSE* files (regular files, or a Hugging Face snapshot's
    links into its own blobs)."""
    field = None
    index = folder / "model_index.json"
    if index.is_file():
        try:
            value = json.loads(index.read_text()).get("license")
            field = value if isinstance(value, str) else None
        except (OSError, ValueError, AttributeError):
            pass
    readme = folder / "README.md"
    if field is None and _readable(readme, folder):
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            found = dict(re.findall(r"^(license(?:_name)?):\s*(.+?)\s*$", front, re.M))
            field = found.get("license_name") or found.get("license")
            field = field.strip("\"'") if field else None
    files = sorted(p for p in folder.glob("LICEN[CS]E*") if _readable(p, folder))
    return field, files


def _readable(path: Path, folder: Path) -> bool:
    """A regular file inside ``folder`` (a symlink only as a Hugging Face snapshot's link into its own blobs)."""
    if path.is_symlink():
        return pf._hub_blob(path, folder.resolve())
    return path.is_file()


def base_model_name(folder: Path) -> str | None:
    """The hub id of a Hugging Face cache snapshot folder (``.../models--org--name/snapshots/REV``), else None."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def model_card(teacher, out: Path, rank: int, alpha, layers: int, scheduler, call: str, steps: int,
               licensed: tuple[str | None, list[Path]]) -> str:
    """The README.md of an exported LoRA: base model, what the file is, how to load and call it, the license."""
    folder = Path(teacher.info["network"]["folder"])
    hub = base_model_name(folder)
    field, files = licensed
    front = ["---", *([f"base_model: {hub}"] if hub else []), "library_name: diffusers",
             *([f"license: {'other' if ' ' in field else field}"] if field else []),
             "tags:", "- lora", "- text-to-image", "- fdistill", f"- {teacher.kind}", "---", ""]
    name = teacher.pipeline_classes[0]
    base = hub or str(folder)
    found = re.match(r"pipe\(prompt[^()]*\)", call)
    expr = found.group(0) if found else "pipe(prompt)"
    lines = [f"# {out.name}: a {steps}-step student of {base} as a LoRA", "",
             f"Distilled with fdistill (f-divergence distribution matching, Xu, Nie & Vahdat, CVPR 2025) from the "
             f"{name} folder `{folder}`{f' ({hub})' if hub else ''}: a rank-{rank} LoRA (lora_alpha {alpha}) on "
             f"{layers} layers of its {teacher.backbone} (`{LORA_FILE}`, the layout `load_lora_weights` reads), and "
             f"the {type(scheduler).__name__} that runs the student's steps (`scheduler/`).", "", "## Use", "",
             "```python", "import torch", f"from diffusers import {name}, {type(scheduler).__name__}", "",
             f'pipe = {name}.from_pretrained("{base}")', f'pipe.load_lora_weights("{out}")',
             f'pipe.scheduler = {type(scheduler).__name__}.from_pretrained("{out}", subfolder="scheduler")',
             'prompt, seed = "a photo of a cat on a bike", 0',
             f"image = {expr[:-1]}, generator=torch.Generator().manual_seed(seed)).images[0]", "```", "",
             f"`{expr}`{call[len(expr):] if found else ': ' + call}; `generator` seeded with s on the CPU draws the "
             "latent noise that `fdistill sample --seed s` draws for its first prompt.", "", "## License", ""]
    if not (field or files):
        lines.append(f"No license was found in `{folder}` (no LICENSE file, no license field): the base model's "
                     "license applies; look it up where the base model came from.")
    else:
        lines.append(f"The base model's license applies{f': {field}' if field else ''}.")
        for path in files:
            text = path.read_text(errors="replace")
            if len(text) <= MAX_LICENSE_IN_CARD:
                lines += ["", f"From `{path}` (copied as `{path.name}`):", "", "```", text.rstrip(), "```"]
            else:
                lines += ["", f"Its text: `{path.name}`, copied from `{path}`."]
    return "\n".join(front + lines) + "\n"


def check_new(out: str | Path) -> Path:
    """``out`` as the new (absent or empty) folder a LoRA export writes, else one line saying why not."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder; give a new folder for the LoRA file")
    return out


def write_lora(teacher, net: nn.Module, out: str | Path, student) -> tuple[Path, str]:
    """Write the adapter "default" of ``net`` (the teacher's denoiser carrying it) as a LoRA folder for the teacher's
    pipeline: ``pytorch_lora_weights.safetensors`` with the LoraConfig as metadata, ``scheduler/`` (the scheduler that
    runs ``student``), README.md and the teacher's LICENSE files; written whole or not at all. Returns the folder and
    the line naming the call."""
    from peft import get_peft_model_state_dict

    out = check_new(out)
    folder = Path(teacher.info["network"]["folder"])
    backbone = getattr(net, teacher.backbone)
    layers = get_peft_model_state_dict(backbone, adapter_name="default")
    if teacher.backbone == "unet":  # as diffusers' SD / SDXL LoRA training scripts save theirs (lora.down / lora.up)
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(layers)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    config = backbone.peft_config["default"].to_dict()
    config["init_lora_weights"] = True  # how the loader starts them before loading the file's: no random draws
    pipeline = teacher.lora_pipeline()
    scheduler = teacher.student_scheduler(folder, student)
    licensed = license_of(folder)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with pf.quiet():
            pipeline.save_lora_weights(tmp, **{f"{teacher.backbone}_lora_layers": layers,
                                               f"{teacher.backbone}_lora_adapter_metadata": config},
                                       weight_name=LORA_FILE, safe_serialization=True)
            scheduler.save_pretrained(tmp / "scheduler")
        name = teacher.pipeline_classes[0]
        call = teacher.pipeline_call(out, student).replace(f"{name}.from_pretrained('{out}')(", "pipe(")
        for path in licensed[1]:
            shutil.copyfile(path.resolve(), tmp / path.name)
        rank = int(config["r"])
        (tmp / "README.md").write_text(model_card(teacher, out, rank, config["lora_alpha"],
                                                  sum(1 for k in layers if ".lora_A." in k or ".lora.down." in k),
                                                  scheduler, call, student.steps, licensed))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sched = type(scheduler).__name__
    line = (f"wrote {out} (a rank-{rank} LoRA, lora_alpha {config['lora_alpha']}, for {name} {folder}; scheduler/, "
            f"README.md): pipe = {name}.from_pretrained('{folder}'); pipe.load_lora_weights('{out}'); pipe.scheduler "
            f"= {sched}.from_pretrained('{out}', subfolder='scheduler'); {call}")
    return out, line


def export_lora(run: str | Path, out: str | Path, rank: int | None = None) -> list[str]:
    """``fdistill export --checkpoint RUN --lora OUT [--lora-rank R]``: the run's EMA generator as a LoRA folder for
    the teacher's pipeline (``write_lora``). A LoRA run's own adapter; a full run's weight difference from the
    teacher extracted at rank ``rank`` (``extract_lora``, whose report comes first). Returns the lines to print."""
    check_new(out)  # before the networks are loaded
    teacher, info, student, weights = open_run(run)
    lora_rank = int(info.get("lora_rank") or 0)
    if lora_rank:
        if rank is not None:
            raise ValueError(f"{run} trained a rank-{lora_rank} LoRA (text.lora_rank): export it as it is, without "
                             "--lora-rank (which extracts a LoRA from a fully fine-tuned student)")
        report = []
        net = adapter_on_teacher(teacher, weights, info, f"checkpoint {run}")
    else:
        if rank is None:
            raise ValueError(f"{run} fine-tuned every weight (text.lora_rank=0): give --lora-rank R to extract a "
                             "rank-R LoRA from its difference to the teacher (truncated SVD), or export --diffusers")
        try:
            tuned = teacher.load_student(weights, info)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {run}: its generator weights do not fit the network its meta.info "
                             f"describes ({' '.join(str(e).split())[:300]})") from None
        report = extract_lora(teacher, tuned, rank)
        del tuned
        net = teacher.denoiser
    _, line = write_lora(teacher, net, out, student)
    return [*report, line]


# -- in: a LoRA file or a diffusers network as the generator's start ------------------------------------------------
def init_source(path: str | Path) -> tuple[str, Path]:
    """What ``--init-from`` was given: ("run", path) for a fdistill run or checkpoint, ("lora", the file),
    ("network", a diffusers model folder) or ("pipeline", a pipeline folder); anything else refused in one line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--init-from {p}: nothing is there; expected {EXPECTED}")
    if p.is_file():
        if p.suffix == ".safetensors":
            return "lora", p
        if p.suffix in PICKLES:
            raise ValueError(f"--init-from {p} is a pickle ({p.suffix}), which fdistill does not unpickle; expected a "
                             "safetensors LoRA file (as save_lora_weights writes) or safetensors network weights")
        raise ValueError(f"--init-from {p} is a {p.suffix or 'suffix-less'} file; expected {EXPECTED}")
    if (p / "state.json").is_file() or (p / "checkpoints").is_dir():
        return "run", p
    if (p / LORA_FILE).is_file():
        return "lora", p / LORA_FILE
    pickled = [q.name for q in p.iterdir() if q.suffix in PICKLES and "lora" in q.name]
    if pickled:
        raise ValueError(f"--init-from {p} holds {pickled[0]}, a pickle, which fdistill does not unpickle; expected "
                         f"{LORA_FILE}")
    if (p / "config.json").is_file():
        return "network", p
    if (p / "model_index.json").is_file():
        return "pipeline", p
    held = sorted(q.name for q in p.iterdir())[:8]
    raise ValueError(f"--init-from {p} is a folder holding {held}; expected {EXPECTED}")


def warm_start(d, path: str | Path) -> str:
    """``fdistill distill --init-from PATH``: a fdistill run (``Distiller.init_from``: generator, EMA, fake score
    and discriminator), a LoRA file (``init_from_lora``) or a diffusers network folder (``init_from_network``) as
    the generator's and its EMA's start. Returns the line to print."""
    kind, source = init_source(path)
    if kind == "run":
        d.init_from(source)
        return f"initialized generator, fake score and discriminator from {path}"
    from fdistill.teachers.latent_t2i import LatentTextToImageTeacher
    from fdistill.teachers.open import family_named
    from fdistill.training import distributed

    family = family_named(d.info.get("family", "image"), "this run")
    if not issubclass(family, LatentTextToImageTeacher):
        raise ValueError(f"--init-from {path}: a LoRA file or diffusers network starts a text-to-image pipeline's "
                         f"generator; this run's teacher is a {family.kind} teacher (give a distill run folder)")
    modules = [m for name, m in d.modules().items() if name in ("generator", "generator_ema")]
    if any(distributed.is_sharded(m) for m in modules):
        raise ValueError(f"--init-from {path}: a LoRA file or diffusers network cannot start a sharded run "
                         "(distill.fsdp over several processes); start the run with distill.fsdp=false")
    if kind == "lora" and plain_weights(source):  # a network's own weights in one file (SDXL-Lightning's UNets)
        what = init_from_network(family, modules, source, d.info)
    elif kind == "lora":
        what = init_from_lora(family, modules, source, d.info)
    else:
        folder = source / family.backbone if kind == "pipeline" else source
        if kind == "pipeline" and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {source} is a pipeline folder without {family.backbone}/config.json; "
                                    f"expected {EXPECTED}")
        what = init_from_network(family, modules, folder, d.info)
    distributed.barrier()
    return (f"initialized the generator{' and its EMA' if len(modules) > 1 else ''} from {what}; the fake score and "
            "discriminator start as usual")


def plain_weights(path: Path) -> bool:
    """Whether the safetensors file at ``path`` holds a network's weights rather than LoRA factors (no key names
    a LoRA part); an unreadable file is left to ``read_lora`` to refuse."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: read_lora says so
        return False
    return bool(keys) and not any("lora" in k for k in keys)


def read_lora(family, backbone: nn.Module, path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """The LoRA file at ``path`` for ``family``'s pipeline, as ``{layer: (A, s B)}`` (``s``: the layer's scaling,
    lora_alpha / r or what the file's metadata / network alphas make it), read by the pipeline class's own
    ``lora_state_dict`` and ``load_lora_into_<backbone>`` onto a scratch copy of ``backbone``'s architecture whose
    weights take no memory: every format ``load_lora_weights`` reads, with its conversions."""
    pipeline = family.lora_pipeline()
    prefix = family.backbone
    read = pipeline.lora_state_dict
    kwargs = dict(weight_name=path.name, use_safetensors=True, local_files_only=True, return_lora_metadata=True)
    if "return_alphas" in inspect.signature(read).parameters:
        kwargs["return_alphas"] = True
    try:
        with pf.quiet():
            got = read(str(path.parent), **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises anything on a stranger's file: one line naming it
        raise ValueError(f"--init-from {path} is not a LoRA file {pipeline.__name__}.lora_state_dict reads: "
                         f"{' '.join(str(e).split())[:240]}") from None
    state, alphas, metadata = (got[0], got[1], got[2]) if len(got) == 3 else (got[0], None, got[1])
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
        raise ValueError(f"--init-from {path} is a DoRA file; fdistill reads plain LoRA files only")
    ours = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    others = sorted({k.split(".")[0] for k in state if not k.startswith(prefix + ".")})
    if not ours:
        raise ValueError(f"--init-from {path} holds no LoRA weights for a {pipeline.__name__}'s {prefix} (its keys "
                         f"start with {others[:3]}); expected a LoRA file for the teacher's pipeline")
    if others:
        warnings.warn(f"--init-from {path}: its LoRA weights for {', '.join(others)} are left out (fdistill's text "
                      f"encoders are frozen; only the {prefix}'s are read)", stacklevel=2)
    plain = [k for k in ours if not re.search(r"lora|alpha", k)]
    if plain:
        raise ValueError(f"--init-from {path} also holds weights that are not LoRA factors (e.g. {plain[0]}); fdistill "
                         "reads the LoRA layers only")
    expected = sum(1 for k in ours if re.search(r"(lora_B|lora\.up|lora_up)(\.[^.]+)?\.weight$", k))
    if metadata:
        metadata = {k: (True if k.endswith(".init_lora_weights") else v) for k, v in metadata.items()}
    scratch = _scratch(backbone)
    load = getattr(pipeline, f"load_lora_into_{prefix}")
    call = {"state_dict": ours, prefix: scratch, "adapter_name": FILE_ADAPTER, "metadata": metadata or None}
    if "network_alphas" in inspect.signature(load).parameters:
        call["network_alphas"] = alphas or None
    try:
        with pf.quiet(), warnings.catch_warnings():  # peft: the metadata's targets name layers the file lacks (fine)
            warnings.filterwarnings("ignore", message=".*inconsistency was discovered between the PEFT config",
                                    category=RuntimeWarning)
            load(**call)
    except Exception as e:  # noqa: BLE001 - peft and diffusers raise anything on a mismatched file
        raise ValueError(f"--init-from {path} does not fit this run's {type(backbone).__name__} (expected a LoRA for "
                         f"the teacher's {pipeline.__name__}): {' '.join(str(e).split())[:240]}") from None
    layers = {}
    for name, layer in tuner_layers(scratch).items():
        if FILE_ADAPTER not in layer.lora_A:
            continue
        if layer.use_dora.get(FILE_ADAPTER) or getattr(layer, "lora_bias", {}).get(FILE_ADAPTER):
            raise ValueError(f"--init-from {path}: layer {name} is a DoRA or biased LoRA; fdistill reads plain LoRA")
        a, b = layer.lora_A[FILE_ADAPTER].weight, layer.lora_B[FILE_ADAPTER].weight
        if b.dim() == 4 and b.shape[2:] != (1, 1):
            raise ValueError(f"--init-from {path}: layer {name}'s LoRA up-projection is a {tuple(b.shape[2:])} "
                             "convolution; fdistill reads linear and 1x1-up convolution LoRA layers")
        layers[name] = (a.detach().clone(), (b * layer.scaling[FILE_ADAPTER]).detach().clone())
    if len(layers) != expected:
        raise ValueError(f"--init-from {path}: {expected - len(layers)} of its {expected} LoRA layers name modules "
                         f"this run's {type(backbone).__name__} does not have (expected a LoRA for the teacher's "
                         f"{pipeline.__name__} of this architecture)")
    return layers


def _scratch(backbone: nn.Module) -> nn.Module:
    """``backbone``'s architecture (a diffusers model built from its config) whose parameters and buffers are
    zero-stride CPU views of one zero: shapes, dtypes and module names for peft to put adapters on, no memory."""
    with torch.device("meta"), pf.quiet():
        net = type(backbone).from_config(backbone.config)
    for m in net.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False))
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)
    return net


def lora_delta(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """The weight change B A of one LoRA layer (``b`` already scaled), in the layer's weight ``shape``: a linear
    layer's [out, in], a convolution's [out, in, kh, kw] (its up-projection 1 x 1)."""
    return (b.flatten(1) @ a.flatten(1)).reshape(shape)


def init_from_lora(family, modules: list[nn.Module], path: Path, info: dict) -> str:
    """The LoRA file at ``path`` into ``modules`` (generator, EMA): a LoRA run's adapter takes its factors (ranks must
    match; the run's adapted layers the file lacks start at zero), a full run gets B A added to its weights."""
    backbone = family.backbone
    state = modules[0].state_dict()
    layers = read_lora(family, getattr(modules[0], backbone), path)
    rank = int(info.get("lora_rank") or 0)
    new = {}
    if rank:
        ours = adapter_keys(state, backbone)
        extra = sorted(set(layers) - set(ours))
        if extra:
            raise ValueError(f"--init-from {path}: its LoRA also adapts {len(extra)} layers this run's adapter "
                             f"does not (e.g. {extra[0]}; the run adapts {', '.join(family.lora_targets)}): start "
                             "a full run (text.lora_rank=0) to fuse it")
        ranks = sorted({a.shape[0] for a, _ in layers.values()})
        if ranks != [rank]:
            raise ValueError(f"--init-from {path} is a rank-{'/'.join(map(str, ranks))} LoRA, this run's adapter is "
                             f"rank {rank} (text.lora_rank): set text.lora_rank={ranks[0]}, or start a full run "
                             "(text.lora_rank=0) to fuse it")
        for layer, keys in ours.items():
            a_key, b_key = keys["lora_A"], keys["lora_B"]
            if layer in layers:  # the run's adapter scales by lora_alpha / r = 1 (pipeline_folders.add_lora)
                a, b = layers[layer]
                new[a_key], new[b_key] = a.reshape(state[a_key].shape), b.reshape(state[b_key].shape)
            else:  # not in the file: B A = 0, the base layer as it is
                new[a_key], new[b_key] = state[a_key], torch.zeros_like(state[b_key])
        how = f"loaded into the run's rank-{rank} adapter ({len(layers)} of its {len(ours)} layers)"
    else:
        for layer, (a, b) in layers.items():
            key = f"{backbone}.{layer}.weight"
            if key not in state:
                raise ValueError(f"--init-from {path}: its layer {layer} is not a weight of this run's generator")
            new[key] = state[key] + lora_delta(a.to(state[key]), b.to(state[key]), state[key].shape)
        how = f"fused into the generator's weights ({len(layers)} layers)"
    _load(modules, state, new, path)
    return f"LoRA file {path}, {how}"


def init_from_network(family, modules: list[nn.Module], folder: Path, info: dict) -> str:
    """A diffusers model folder (``config.json`` and safetensors weights) of the generator's architecture, or one
    safetensors file of its state dict (diffusers' key names), as a full run's generator weights."""
    backbone = getattr(modules[0], family.backbone)
    cls = type(backbone)
    if info.get("lora_rank"):
        raise ValueError(f"--init-from {folder}: a diffusers {cls.__name__}'s weights replace every weight, but this "
                         f"run trains a rank-{info['lora_rank']} LoRA on the teacher's weights (text.lora_rank): start "
                         "a full run (text.lora_rank=0) from it")
    if folder.is_file():
        from safetensors.torch import load_file

        return _network_weights(family, modules, load_file(folder), folder, f"the {cls.__name__} weights {folder}")
    config = read_json_object(folder / "config.json")
    named = config.get("_class_name")
    if named != cls.__name__:
        raise ValueError(f"--init-from {folder} holds a {str(named)[:60]}, this run's generator is a {cls.__name__}: "
                         f"expected a {family.backbone}/ folder of the teacher's architecture")
    with torch.device("meta"), pf.quiet():
        probe = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    ignore = {"sample_size"}  # what the run's resolution sets (stable_diffusion.load)
    theirs, ours = dict(probe.config), dict(backbone.config)
    differ = sorted(k for k in set(theirs) | set(ours) if not k.startswith("_") and k not in ignore
                    and theirs.get(k) != ours.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"--init-from {folder}: its {cls.__name__} is not the teacher's architecture ({k} is "
                         f"{theirs.get(k)!r:.60} there, {ours.get(k)!r:.60} in this run)")
    return _network_weights(family, modules, pf.load_network(cls, folder).state_dict(), folder,
                            f"the {cls.__name__} in {folder}")


def _network_weights(family, modules: list[nn.Module], weights: dict[str, Tensor], source: Path, what: str) -> str:
    """A backbone's whole state dict ``weights`` into ``modules`` (its keys exactly the backbone's)."""
    state = modules[0].state_dict()
    prefix = family.backbone + "."
    mine = {k[len(prefix):] for k in state if k.startswith(prefix)}
    if mine != set(weights):
        gone, more = sorted(mine - set(weights)), sorted(set(weights) - mine)
        raise ValueError(f"--init-from {source}: its weights do not fit this run's "
                         f"{type(getattr(modules[0], family.backbone)).__name__} (missing {gone[:2]}, unexpected "
                         f"{more[:2]}); expected the teacher's architecture")
    _load(modules, state, {prefix + k: v for k, v in weights.items()}, source)
    return what


def _load(modules: list[nn.Module], state: dict, new: dict[str, Tensor], source: Path) -> None:
    """``state`` with ``new`` in place into every module (the generator and its EMA: the same keys), strictly."""
    full = {**state, **new}
    for m in modules:
        try:
            m.load_state_dict(full, strict=True)
        except RuntimeError as e:
            raise ValueError(f"--init-from {source} does not fit this run's generator: "
                             f"{' '.join(str(e).split())[:300]}") from None
