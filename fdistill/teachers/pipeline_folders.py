"""Diffusers pipeline folders, read and written: what every pipeline family (``teachers.families``) shares. This is
where strangers' folders are read, so it is where they are refused, in one line naming the file and what was
expected: a missing component, a pickled ``.bin`` where safetensors are expected, a config of absurd size (its
parameter count, built on the meta device, compared with the memory there is before anything is allocated), a
component diffusers or transformers cannot build. Writing: the export copies only the regular files inside the
teacher's folder and swaps in the student's network and a scheduler.

Everything is read with ``HF_HUB_OFFLINE=1``: a stray hub call fails fast instead of hanging.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdistill.io import read_json_object, temp_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INSTALL_HINT = "pip install 'fdistill[t2i]'"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
# FDISTILL_MAX_TEACHER_GB overrides the memory a teacher's networks may take (see check_size).
MAX_GB_VARIABLE = "FDISTILL_MAX_TEACHER_GB"


def libraries():
    """(diffusers, transformers), or one line saying how to install them."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError(f"text-to-image teachers need diffusers and transformers: {INSTALL_HINT}; {e}") from None
    return diffusers, transformers


@contextlib.contextmanager
def quiet():
    """diffusers and transformers without their info logs and progress bars while loading local files."""
    diffusers, transformers = libraries()
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def pipeline_class(path: str | Path) -> str:
    """The ``_class_name`` that ``path``'s model_index.json names ("" when there is none or it is unreadable)."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError, RecursionError):  # unreadable: not a pipeline (its loader says why)
        return ""
    return name if isinstance(name, str) else ""


def open_folder(folder: str | Path, classes: tuple[str, ...], components: tuple[str, ...], layout: str) -> Path:
    """``folder`` checked as a pipeline of one of ``classes`` holding ``components`` (names as model_index.json's:
    ``tokenizer*``, ``scheduler``, or a network's folder with config.json and weights); ``layout`` is the sentence
    naming what was expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {folder}; expected {layout}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} lacks model_index.json; expected {layout}")
    class_name = read_json_object(folder / "model_index.json").get("_class_name")
    if not isinstance(class_name, str) or class_name not in classes:
        raise ValueError(f"{folder} holds a {str(class_name)[:80]}, not a {' or '.join(classes)}")
    for name in components:
        d = folder / name
        if name.startswith("tokenizer"):
            if any((d / f).is_file() for f in TOKENIZER_FILES):
                continue
            needed = [d / "tokenizer.json"]
        elif name == "scheduler":
            needed = [d / "scheduler_config.json"]
        else:
            needed = [d / "config.json"]
            if not _weights(d):
                needed.append(d / ("model.safetensors" if name.startswith("text_encoder")
                                   else "diffusion_pytorch_model.safetensors"))
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing[0].relative_to(folder)}; expected {layout}")
    return folder


def _weights(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return [p for p in d.iterdir()
            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".safetensors.index.json")]


def check_weights(d: Path) -> None:
    """Refuse a component whose weights are pickles only (``.bin``): loading them would unpickle a stranger's file
    (torch's restricted loader refuses most, with a long traceback); the safetensors format holds only tensors."""
    files = _weights(d)
    if files and not any(p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json") for p in files):
        raise ValueError(f"{d} holds its weights as {files[0].name}, a pickle; expected safetensors "
                         "(*.safetensors, as save_pretrained writes by default)")


def available_bytes() -> int:
    """Memory a teacher may take: ``FDISTILL_MAX_TEACHER_GB`` if set, else the machine's physical memory."""
    given = os.environ.get(MAX_GB_VARIABLE)
    if given:
        try:
            return int(float(given) * 2**30)
        except ValueError:
            raise ValueError(f"{MAX_GB_VARIABLE}={given!r:.40}: expected a number of GB") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


LAYER_KEYS = ("num_layers", "num_single_layers", "num_hidden_layers", "num_blocks")  # repeated-block counts


def _parameters(build: Callable[[Any], nn.Module], config, where: str) -> int:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in build(config).parameters())
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise ValueError(f"{where} does not describe a network that can be built: "
                         f"{' '.join(str(e).split())[:240]}") from None


def parameter_count(build: Callable[[Any], nn.Module], config, where: str) -> int:
    """The parameters the network ``build(config)`` would have, counted on the meta device (nothing allocated).
    Its repeated blocks (``LAYER_KEYS``) are built once and twice and the count extrapolated, so an absurd layer
    count costs no more than a small one. ``config``: a mapping, or a transformers config object."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)

    def with_counts(counts: dict):
        if isinstance(config, dict):
            return {**config, **counts}
        other = copy.deepcopy(config)
        for k, v in counts.items():
            setattr(other, k, v)
        return other

    layers = {k: get(k) for k in LAYER_KEYS if isinstance(get(k), int) and not isinstance(get(k), bool)}
    small = {k: min(n, 1) for k, n in layers.items()}  # one block of each list (none where the list is empty)
    base = _parameters(build, with_counts(small), where)
    total = base
    for k, n in layers.items():
        if n > 1:
            total += (n - 1) * (_parameters(build, with_counts({**small, k: 2}), where) - base)
    return total


def check_size(build: Callable[[Any], nn.Module], config, where: str, dtype: torch.dtype = torch.float32) -> None:
    """Refuse before allocating anything a network whose config implies more parameters than fit in memory
    (``parameter_count``). ``FDISTILL_MAX_TEACHER_GB`` overrides the limit (e.g. for a machine whose swap or
    offloading you trust)."""
    count = parameter_count(build, config, where)
    need = count * torch.finfo(dtype).bits // 8
    have = available_bytes()
    if need > have:
        raise ValueError(f"{where} describes a network of {count / 1e9:.2f}B parameters ({need / 2**30:.1f} GB in "
                         f"{str(dtype).removeprefix('torch.')}), more than the {have / 2**30:.1f} GB of memory here; "
                         f"set {MAX_GB_VARIABLE} to allow it")


def load_component(load: Callable[[], nn.Module], d: Path, what: str) -> nn.Module:
    """``load()`` of component folder ``d`` (a ``from_pretrained``), its weights checked first; a failure is one
    line naming the folder."""
    check_weights(d)
    try:
        with quiet():
            return load()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{d} is not a loadable {what}: {' '.join(str(e).split())[:300]}") from None


def load_network(cls, d: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers network (``cls``: a ModelMixin class) from component folder ``d``: config checked for size on the
    meta device, weights for format, then loaded with no network access."""
    config = {k: v for k, v in read_json_object(d / "config.json").items() if not k.startswith("_")}
    check_size(cls.from_config, config, str(d / "config.json"), dtype)
    low_mem = importlib.util.find_spec("accelerate") is not None
    return load_component(lambda: cls.from_pretrained(d, torch_dtype=dtype, local_files_only=True,
                                                      low_cpu_mem_usage=low_mem), d, cls.__name__)


def load_text_model(cls, d: Path) -> nn.Module:
    """A transformers text encoder (``cls``) from component folder ``d``, checked as ``load_network`` checks."""
    if (d / "config.json").is_file():
        try:
            config = cls.config_class.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{d / 'config.json'} is not a {cls.config_class.__name__}: "
                             f"{' '.join(str(e).split())[:240]}") from None
        check_size(cls, config, str(d / "config.json"))
    return load_component(lambda: cls.from_pretrained(d, local_files_only=True), d, cls.__name__)


def load_tokenizer(cls, d: Path, **kwargs):
    """A tokenizer (``cls``) from component folder ``d``."""
    try:
        with quiet():
            return cls.from_pretrained(d, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{d} is not a loadable {cls.__name__}: {' '.join(str(e).split())[:300]}") from None


def add_lora(network: nn.Module, rank: int, targets: list[str], name: str = "default") -> None:
    """LoRA adapters (Hu et al. 2022) of ``rank`` on ``network``'s projections named ``targets``, through peft;
    only they are trained (the base weights are frozen). ``name``: the peft adapter's."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("text.lora_rank needs the peft package: pip install peft") from None
    network.requires_grad_(False)
    network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets),
                        adapter_name=name)


# -- writing --------------------------------------------------------------------------------------------------------
def _hub_blob(link: Path, root: Path) -> bool:
    """Whether ``link`` is a Hugging Face cache link: ``root`` is ``<repo>/snapshots/<revision>`` and the link
    resolves to a regular file in that repository's ``blobs/`` (how huggingface_hub stores every file)."""
    if root.parent.name != "snapshots":
        return False
    target = link.resolve()
    return target.parent == (root.parent.parent / "blobs").resolve() and target.is_file() and not target.is_symlink()


def copy_regular_files(src: str | Path, dst: str | Path, leave_out: set[str] = frozenset(), _root: Path | None = None
                       ) -> Path:
    """Copy the folder tree ``src`` to the new folder ``dst`` (names in ``leave_out`` at its top skipped), only
    the regular files inside it: a symlink (to a file or a folder) or a special file is left out with a warning
    naming it, so that nothing from outside the folder ends up in what is written. The one exception: in a
    Hugging Face cache snapshot, the links into the repository's own ``blobs/`` are copied as their files."""
    src, dst = Path(src), Path(dst)
    root = _root or src.resolve()
    dst.mkdir(parents=True)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name in leave_out:
            continue
        if entry.is_symlink():
            if _hub_blob(path, root):
                shutil.copyfile(path.resolve(), dst / entry.name)
            else:
                warnings.warn(f"left out {path}: a symlink (to {os.readlink(path)}); only the regular files inside "
                              f"{root} are copied", stacklevel=2)
        elif entry.is_dir(follow_symlinks=False):
            copy_regular_files(path, dst / entry.name, _root=root)
        elif entry.is_file(follow_symlinks=False):
            shutil.copyfile(path, dst / entry.name, follow_symlinks=False)
        else:
            warnings.warn(f"left out {path}: not a regular file or folder; only the regular files inside {root} are "
                          "copied", stacklevel=2)
    return dst


def write_pipeline(teacher_folder: str | Path, out: str | Path, networks: dict[str, nn.Module], scheduler,
                   index_entries: dict | None = None) -> Path:
    """The teacher's pipeline folder copied to the new folder ``out`` with ``networks`` ({component: a diffusers
    model}) and ``scheduler`` (a diffusers scheduler) in place of the teacher's, and ``index_entries`` set in its
    model_index.json (e.g. Wan2.2's boundary_ratio), written whole or not at all."""
    teacher_folder, out = Path(teacher_folder), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder for the exported pipeline")
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    copy_regular_files(teacher_folder, tmp, leave_out={*networks, "scheduler"})
    for name, net in networks.items():
        net.save_pretrained(tmp / name, safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    index = json.loads((tmp / "model_index.json").read_text())
    index.update({**(index_entries or {}), "scheduler": ["diffusers", type(scheduler).__name__]})
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out
