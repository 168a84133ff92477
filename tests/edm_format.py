"""Test doubles for NVlabs/edm snapshot pickles: a stand-in for its ``torch_utils.persistence`` module and
a pickler that writes fdistill's EDM networks in that format (persistence records with ``module_src``)."""

import pickle
import sys
import types

import torch

from fdistill.networks import edm


def install_persistence_module(monkeypatch) -> types.ModuleType:
    """Register a stand-in torch_utils.persistence, so pickle can name its reconstruct hook."""
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the loader under test
        raise AssertionError("the real reconstruct hook must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


class EDMFormatPickler(pickle.Pickler):
    """Pickles fdistill's EDM modules the way NVlabs/edm's persistent classes pickle themselves:
    a call of _reconstruct_persistent_obj(meta) with the module's source text and __dict__."""

    def __init__(self, f, hook, init_kwargs):
        super().__init__(f, protocol=4)
        self.hook, self.init_kwargs = hook, init_kwargs

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__ == edm.__name__:
            state = dict(obj.__dict__)
            if isinstance(obj, edm.EDMPrecond):
                state["_init_args"], state["_init_kwargs"] = (), dict(self.init_kwargs)
            meta = dict(type="class", version=6, module_src="import os\nos.system('echo pwned')\n",
                        class_name=type(obj).__name__, state=state)
            return self.hook, (meta,)
        return NotImplemented


def write_snapshot(path, net, hook, init_kwargs):
    """An EDM training snapshot: {'ema': net, ...}, the network as a persistence record."""
    with open(path, "wb") as f:
        EDMFormatPickler(f, hook, init_kwargs).dump({"ema": net, "loss_fn": None, "augment_pipe": None,
                                                     "dataset_kwargs": {"path": "cifar10.zip"}})
