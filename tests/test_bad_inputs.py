"""Every careless or hostile input the CLI reads ends in one line on stderr naming the option or the file, exit
status 2, and nothing written: config values out of range, option values, malformed teacher files (EDM pickles,
safetensors, diffusers folders), checkpoint records and sample files. Each case builds its own bad file."""

import json
import pickle
import random
import struct
import sys
import zipfile

import numpy as np
import pytest
import torch
from edm_format import write_snapshot
from safetensors.torch import save_file
from tiny import DISTILL, TINY

from fdistill.apps import cli
from fdistill.teachers.loading import load_network


# -- the bad files ---------------------------------------------------------------------------------------------
class _Record:
    """Pickles as an NVlabs/edm persistence record of ``class_name`` with ``state`` (no module of its own)."""

    def __init__(self, hook, class_name, state):
        self.hook, self.class_name, self.state = hook, class_name, state

    def __reduce__(self):
        return self.hook, ({"type": "class", "version": 6, "module_src": "", "class_name": self.class_name,
                            "state": self.state},)


def _pkl(path, obj, depth=1000):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth))
    try:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    finally:
        sys.setrecursionlimit(limit)
    return path


def pkl_random(tmp, ctx):
    return _pkl_bytes(tmp / "random.pkl", random.Random(0).randbytes(512))


def pkl_underflow(tmp, ctx):
    return _pkl_bytes(tmp / "underflow.pkl", b"\x80\x04.")  # STOP on an empty stack


def pkl_truncated(tmp, ctx):
    return _pkl_bytes(tmp / "truncated.pkl", pickle.dumps({"ema": list(range(100))}, protocol=4)[:-20])


def _pkl_bytes(path, data):
    path.write_bytes(data)
    return path


def pkl_bad_args(tmp, ctx):  # _init_args that is no sequence: a TypeError while reading the constructor
    return _pkl(tmp / "args.pkl", {"ema": _Record(ctx["hook"], "EDMPrecond", {"_init_args": 5})})


def pkl_bogus_kwargs(tmp, ctx):
    path = tmp / "kwargs.pkl"
    write_snapshot(path, ctx["net"], ctx["hook"], {**ctx["kwargs"], "bogus": 1})
    return path


def pkl_mismatch(tmp, ctx):  # weights of one width, constructor of another: load_state_dict's RuntimeError
    path = tmp / "mismatch.pkl"
    write_snapshot(path, ctx["net"], ctx["hook"], {**ctx["kwargs"], "model_channels": 16})
    return path


def pkl_deep(tmp, ctx):  # submodules nested past the recursion limit
    chain = {}
    for _ in range(3000):
        chain = {"_modules": {"m": _Record(ctx["hook"], "Block", chain)}}
    state = {"_init_kwargs": dict(ctx["kwargs"]), **chain}
    return _pkl(tmp / "deep.pkl", {"ema": _Record(ctx["hook"], "EDMPrecond", state)}, depth=12000)


def _teacher_file(path, meta, tensors=None):
    save_file(tensors or {"w": torch.zeros(1)}, str(path), metadata={"fdistill": meta})
    return path


def st_bogus_kwargs(tmp, ctx):
    return _teacher_file(tmp / "bogus.safetensors", json.dumps({"precond": "EDMPrecond", "kwargs": {"bogus": 1}}))


def st_list(tmp, ctx):
    return _teacher_file(tmp / "list.safetensors", "[1, 2]")


def st_not_json(tmp, ctx):
    return _teacher_file(tmp / "notjson.safetensors", "{precond")


def st_weights(tmp, ctx):
    return _teacher_file(tmp / "weights.safetensors", json.dumps({"precond": "EDMPrecond", "kwargs": ctx["kwargs"]}))


UNET = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4}


def _unet_folder(tmp, name, config, scheduler=None):
    folder = tmp / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if scheduler is not None:
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def unet_list(tmp, ctx):
    return _unet_folder(tmp, "unet_list", [UNET])


def unet_negative(tmp, ctx):
    return _unet_folder(tmp, "unet_negative", {**UNET, "block_out_channels": [-8, 16]})


def unet_huge(tmp, ctx):
    return _unet_folder(tmp, "unet_huge", {**UNET, "block_out_channels": [8, 10**9]})


def unet_size0(tmp, ctx):
    return _unet_folder(tmp, "unet_size0", {**UNET, "sample_size": 0})


def unet_steps(tmp, ctx):
    return _unet_folder(tmp, "unet_steps", UNET, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1e9})


def _checkpoint(tmp, name, state_json):
    folder = tmp / name
    folder.mkdir()
    save_file({"generator.w": torch.zeros(1)}, str(folder / "model.safetensors"))
    save_file({"x": torch.zeros(1)}, str(folder / "state.safetensors"))
    (folder / "state.json").write_text(state_json if isinstance(state_json, str) else json.dumps(state_json))
    return folder


def ckpt_deep(tmp, ctx):
    return _checkpoint(tmp, "deep", '{"meta": ' + "[" * 100_000 + "]" * 100_000 + "}")


def ckpt_no_meta(tmp, ctx):
    return _checkpoint(tmp, "nometa", {"optimizers": {}, "rng": {}})


def ckpt_no_info(tmp, ctx):
    return _checkpoint(tmp, "noinfo", {"optimizers": {}, "rng": {}, "meta": {"iteration": 3, "config": {}}})


def ckpt_bogus_network(tmp, ctx):
    info = {"precond": "EDMPrecond", "network": {**ctx["kwargs"], "bogus": 1}}
    return _checkpoint(tmp, "network", {"optimizers": {}, "rng": {}, "meta": {"iteration": 3, "config": {},
                                                                             "info": info}})


def ckpt_bogus_config(tmp, ctx):
    info = {"precond": "EDMPrecond", "network": ctx["kwargs"]}
    return _checkpoint(tmp, "config", {"optimizers": {}, "rng": {}, "meta": {"iteration": 3, "config": {"bogus": 1},
                                                                            "info": info}})


def ckpt_teacher(tmp, ctx):  # a train-teacher checkpoint: no generator
    return _checkpoint(tmp, "teacher", {"optimizers": {}, "rng": {}, "meta": {"iteration": 3, "config": {},
                                                                             "info": {}}})


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


IMAGES = np.zeros((20, 1, 8, 8), np.uint8)


def npz_ok(tmp, ctx):
    return _npz(tmp / "ok.npz", images=IMAGES)


def npz_not_zip(tmp, ctx):
    path = tmp / "notzip.npz"
    path.write_bytes(b"PK\x03\x04" + b"not a zip archive" * 8)
    return path


def npz_huge(tmp, ctx):
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000, 3, 1000, 1000), }"
    header += " " * (118 - len(header)) + "\n"
    path = tmp / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64)
    return path


def npz_string(tmp, ctx):
    return _npz(tmp / "string.npz", images=np.full((20, 1, 8, 8), "a"))


def npz_structured(tmp, ctx):
    return _npz(tmp / "structured.npz", images=np.zeros((20, 1, 8, 8), [("a", "u1"), ("b", "f4")]))


def npz_label(value):
    def build(tmp, ctx):
        return _npz(tmp / f"label{value}.npz", images=IMAGES, labels=np.full(20, value, np.int64))
    return build


BUILDERS = {f.__name__: f for f in (
    pkl_random, pkl_underflow, pkl_truncated, pkl_bad_args, pkl_bogus_kwargs, pkl_mismatch, pkl_deep,
    st_bogus_kwargs, st_list, st_not_json, st_weights, unet_list, unet_negative, unet_huge, unet_size0, unet_steps,
    ckpt_deep, ckpt_no_meta, ckpt_no_info, ckpt_bogus_network, ckpt_bogus_config, ckpt_teacher,
    npz_ok, npz_not_zip, npz_huge, npz_string, npz_structured)}
BUILDERS.update({"npz_label99": npz_label(99), "npz_label-1": npz_label(-1), "npz_label2^40": npz_label(2**40)})


# -- the cases -------------------------------------------------------------------------------------------------
def _config(command, override, fragment):
    """A config value refused where it is built: the message names the key and the override."""
    return pytest.param([command, override], (fragment, f"(in the override {override})"), id=override[:40])


H_998 = "-" * 998 + "r"
CONFIG = [
    _config("distill", "distill.batch_size=0", "distill: batch_size must be a positive integer, got '0'"),
    _config("distill", "distill.ratio_bins=0", "distill: ratio_bins must be a positive integer"),
    _config("distill", "disc_hidden=0", "disc_hidden must be a positive integer, got '0'"),
    _config("distill", "guidance=.nan", "guidance must be a non-negative number, got 'nan'"),
    _config("distill", "distill.iterations=0", "distill: iterations must be a positive integer"),
    _config("distill", "distill.iterations=-5", "distill: iterations must be a positive integer"),
    _config("distill", "distill.ema_beta=2", "distill: ema_beta must be a number in [0, 1) or null, got '2'"),
    _config("distill", "distill.r_min=30", "distill: r_min must be below r_max"),
    _config("distill", "distill.r_min=0", "distill: r_min must be a positive number"),
    _config("distill", "distill.logit_clip=0", "distill: logit_clip must be a positive number"),
    _config("distill", "distill.grad_clip=0", "distill: grad_clip must be a positive number or null"),
    _config("distill", "distill.generator_sigma=0", "distill: generator_sigma must be a positive number or null"),
    _config("distill", "distill.checkpoint_every=-1", "distill: checkpoint_every must be a non-negative integer"),
    _config("distill", "distill.h_warmup=-1", "distill: h_warmup must be a non-negative integer"),
    _config("distill", "distill.ema_cadence=never", "distill: ema_cadence must be 'iteration' or 'student'"),
    _config("distill", "distill.gan_loss_heads=sum", "distill: gan_loss_heads must be 'per_head' or 'mean_logit'"),
    _config("distill", "distill.sigmas.num_levels=1000000000", "distill.sigmas: num_levels must be an integer in"),
    _config("distill", f"distill.divergence={H_998}", "h expression is nested too deeply"),
    _config("train-teacher", "teacher.ema_beta=5", "teacher: ema_beta must be a number in [0, 1), got '5'"),
    _config("train-teacher", "teacher.label_dropout=2", "teacher: label_dropout must be a number in [0, 1)"),
    _config("train-teacher", "teacher.P_std=-1", "teacher: P_std must be a positive number"),
    _config("train-teacher", "teacher.iterations=-1", "teacher: iterations must be a positive integer"),
    _config("train-teacher", "teacher.batch_size=0", "teacher: batch_size must be a positive integer"),
    _config("train-teacher", "teacher.log_every=0", "teacher: log_every must be a positive integer"),
    _config("train-teacher", "teacher.network.model_channels=0",
            "teacher: network.model_channels must be an integer in [1, 16384]"),
    _config("train-teacher", "teacher.network.bogus=3",
            "teacher: unknown network key 'bogus' (set to '3') for EDMPrecond with a SongUNet; valid keys: "),
]

SAMPLE = ["sample", "--teacher", "{teacher}", "--out", "{out}", "--no-progress", "--num-samples", "4"]
EVALUATE = ["evaluate", "--json", "{out}/metrics.json", "--no-progress"]
OPTIONS = [
    pytest.param([*SAMPLE, "--steps", "0"], "--steps must be an integer in [2, 1000], got 0", id="steps-0"),
    pytest.param([*SAMPLE, "--steps", "-1"], "--steps must be an integer in [2, 1000], got -1", id="steps-neg"),
    pytest.param([*SAMPLE, "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan", id="guidance-nan"),
    pytest.param([*SAMPLE, "--num-samples", "0"], "--num-samples must be a positive integer, got 0", id="num-0"),
    pytest.param([*SAMPLE, "--batch", "0"], "--batch must be a positive integer, got 0", id="sample-batch-0"),
    pytest.param([*SAMPLE, "--shard", "0"], "--shard must be a positive integer, got 0", id="shard-0"),
    pytest.param([*EVALUATE, "{npz_ok}", "--k", "0"], "--k must be a positive integer, got 0", id="k-0"),
    pytest.param([*EVALUATE, "{npz_ok}", "--k", "-3"], "--k must be a positive integer, got -3", id="k-neg"),
    pytest.param([*EVALUATE, "{npz_ok}", "--batch", "0"], "--batch must be a positive integer, got 0",
                 id="eval-batch-0"),
]

SNAPSHOT = "is not a readable NVlabs/edm network snapshot"
FILES = [
    pytest.param(["sample", "--teacher", "{pkl_random}", "--out", "{out}"], f"random.pkl {SNAPSHOT}", id="pkl-random"),
    pytest.param(["sample", "--teacher", "{pkl_underflow}", "--out", "{out}"], "unpickling stack underflow",
                 id="pkl-underflow"),
    pytest.param(["sample", "--teacher", "{pkl_truncated}", "--out", "{out}"], f"truncated.pkl {SNAPSHOT}",
                 id="pkl-truncated"),
    pytest.param(["sample", "--teacher", "{pkl_bad_args}", "--out", "{out}"], f"args.pkl {SNAPSHOT}", id="pkl-type"),
    pytest.param(["sample", "--teacher", "{pkl_bogus_kwargs}", "--out", "{out}"],
                 "unknown constructor key 'bogus'", id="pkl-kwargs"),
    pytest.param(["sample", "--teacher", "{pkl_mismatch}", "--out", "{out}"], "size mismatch", id="pkl-mismatch"),
    pytest.param(["sample", "--teacher", "{pkl_deep}", "--out", "{out}"], f"deep.pkl {SNAPSHOT}", id="pkl-deep"),
    pytest.param(["distill", "--teacher", "{pkl_random}", "--out", "{out}", *TINY, *DISTILL],
                 f"random.pkl {SNAPSHOT}", id="distill-pkl"),
    pytest.param(["sample", "--teacher", "{st_bogus_kwargs}", "--out", "{out}"],
                 "bogus.safetensors: its metadata does not describe a network fdistill can build (unknown network "
                 "key 'bogus'", id="st-kwargs"),
    pytest.param(["sample", "--teacher", "{st_list}", "--out", "{out}"],
                 "list.safetensors: its fdistill metadata is a JSON list", id="st-list"),
    pytest.param(["sample", "--teacher", "{st_not_json}", "--out", "{out}"],
                 "notjson.safetensors: its fdistill metadata is not JSON", id="st-not-json"),
    pytest.param(["sample", "--teacher", "{st_weights}", "--out", "{out}"],
                 "weights.safetensors: its weights do not fit the network", id="st-weights"),
    pytest.param(["sample", "--teacher", "{unet_list}", "--out", "{out}"],
                 "unet_list/config.json: expected a JSON object, got a JSON list", id="unet-list"),
    pytest.param(["sample", "--teacher", "{unet_negative}", "--out", "{out}"],
                 "config.json: block_out_channels must be an integer in [1, 16384], got -8", id="unet-negative"),
    pytest.param(["sample", "--teacher", "{unet_huge}", "--out", "{out}"],
                 "config.json: block_out_channels must be an integer in [1, 16384], got 1000000000", id="unet-huge"),
    pytest.param(["sample", "--teacher", "{unet_size0}", "--out", "{out}"],
                 "config.json: sample_size must be an integer in [1, 4096], got 0", id="unet-size0"),
    pytest.param(["sample", "--teacher", "{unet_steps}", "--out", "{out}"],
                 "scheduler_config.json: num_train_timesteps must be an integer in [2, 100000], got 1000000000.0",
                 id="scheduler-steps"),
    pytest.param(["sample", "--checkpoint", "{ckpt_deep}", "--out", "{out}"],
                 "deep: state.json is nested too deeply", id="ckpt-deep"),
    pytest.param(["sample", "--checkpoint", "{ckpt_no_meta}", "--out", "{out}"],
                 "nometa: state.json lacks 'meta'", id="ckpt-no-meta"),
    pytest.param(["sample", "--checkpoint", "{ckpt_no_info}", "--out", "{out}"],
                 "noinfo: state.json's meta lacks 'info'", id="ckpt-no-info"),
    pytest.param(["sample", "--checkpoint", "{ckpt_bogus_network}", "--out", "{out}"],
                 "network: state.json's meta: unknown info.network key 'bogus'", id="ckpt-network"),
    pytest.param(["sample", "--checkpoint", "{ckpt_bogus_config}", "--out", "{out}"],
                 "config: its state.json's config is not a distill config (unknown config key 'bogus'",
                 id="ckpt-config"),
    pytest.param(["sample", "--checkpoint", "{ckpt_teacher}", "--out", "{out}"],
                 "teacher holds no one-step generator", id="ckpt-teacher"),
    pytest.param([*EVALUATE, "{npz_not_zip}"], "notzip.npz as a numpy .npz/.npy file (a damaged zip archive",
                 id="npz-not-zip"),
    pytest.param([*EVALUATE, "{npz_huge}"], "huge.npz: the header of array 'images' claims shape (1000000, 3, 1000, "
                 "1000)", id="npz-huge"),
    pytest.param([*EVALUATE, "{npz_string}"], "string.npz: array 'images' has dtype <U1", id="npz-string"),
    pytest.param([*EVALUATE, "{npz_structured}"], "structured.npz: array 'images' has dtype [(", id="npz-structured"),
    pytest.param([*EVALUATE, "{npz_label99}"], "label99.npz: labels must be class indices in [0, 9] (the digits), "
                 "found 99..99", id="label-99"),
    pytest.param([*EVALUATE, "{npz_label-1}"], "label-1.npz: labels must be non-negative class indices, found -1",
                 id="label-neg"),
    pytest.param([*EVALUATE, "{npz_label2^40}"], "label1099511627776.npz: labels must be class indices in [0, 9]",
                 id="label-2^40"),
]


@pytest.fixture(scope="module")
def context(teacher_path):
    net, _, kwargs = load_network(teacher_path)
    return {"teacher": teacher_path, "net": net, "kwargs": kwargs}


@pytest.mark.parametrize("argv, fragment", [*CONFIG, *OPTIONS, *FILES])
def test_a_bad_input_ends_in_one_line_naming_it_and_writes_nothing(argv, fragment, context, persistence_module,
                                                                   tmp_path, capsys):
    files, out = tmp_path / "files", tmp_path / "out"
    files.mkdir()
    ctx = {**context, "hook": persistence_module._reconstruct_persistent_obj}
    values = {"teacher": str(context["teacher"]), "out": str(out)}
    for arg in argv:
        name = arg[1:-1] if arg.startswith("{") and arg.endswith("}") else None
        if name in BUILDERS:
            values[name] = str(BUILDERS[name](files, ctx))
    if argv[0] in ("distill", "train-teacher") and "--out" not in argv:  # a config case: the tiny run, then it
        teacher = ["--teacher", "{teacher}"] if argv[0] == "distill" else []
        argv = [argv[0], "--out", "{out}", "--no-progress", *teacher, *TINY, *argv[1:]]
    argv = [a.format(**values) if a.startswith("{") or "{out}" in a else a for a in argv]
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert lines[0].startswith(f"fdistill {argv[0]}: error: ") and all(f in lines[0] for f in fragments), lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
