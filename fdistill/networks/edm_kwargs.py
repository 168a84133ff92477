"""Checks of an EDM network's constructor kwargs (NVlabs/edm's names) before anything is built from them: they
come from files (a teacher's metadata, a checkpoint's record, a pickle), so every key and range is checked."""

from __future__ import annotations

import inspect

from fdistill.networks import edm

MAX_CHANNELS = 16384  # the widest feature map a network's constructor kwargs may ask for
MAX_RESOLUTION = 4096  # the largest image side (pixels) of a network


def _unet_keys(precond: str, kwargs: dict, where: str) -> tuple[str, set[str]]:
    """(model_type, the constructor keys an EDM preconditioning class with that UNet takes)."""
    params = inspect.signature(getattr(edm, precond).__init__).parameters
    model_type = kwargs.get("model_type", params["model_type"].default)
    if not isinstance(model_type, str) or model_type not in edm.UNETS:
        raise ValueError(f"{where}.model_type must be one of {', '.join(sorted(edm.UNETS))}, got {model_type!r}")
    unet = inspect.signature(edm.UNETS[model_type].__init__).parameters
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    keys = {n for n, p in (*params.items(), *unet.items()) if p.kind in plain}
    return model_type, keys - {"self", "in_channels", "out_channels"}


def check_network_kwargs(precond: str, kwargs: dict, where: str = "network") -> None:
    """Refuse in one line what an EDM preconditioning class could not be built from: a key its constructor
    (or its UNet's) does not take, naming the valid ones, or a value out of range (``where`` prefixes the key,
    e.g. ``network.model_channels``). ``kwargs`` may lack the keys the data fills in (img_resolution, ...)."""
    if precond not in edm.PRECONDS:
        raise ValueError(f"unknown preconditioning {precond!r}; expected one of {', '.join(edm.PRECONDS)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where} must be a mapping of constructor keyword arguments, got {kwargs!r:.80}")
    from fdistill import checks

    model_type, keys = _unet_keys(precond, kwargs, where)
    unknown = sorted(set(kwargs) - keys)
    if unknown:
        raise ValueError(f"unknown {where} key {unknown[0]!r} (set to {checks.show(kwargs[unknown[0]])}) for "
                         f"{precond} with a {model_type}; valid keys: {', '.join(sorted(keys))}")

    def positive_ints(name: str, value, empty: bool) -> None:
        if not (isinstance(value, (list, tuple)) and (empty or value)
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RESOLUTION for v in value)):
            raise ValueError(f"{where}.{name} must be a list of positive integers, got {checks.show(value)}")

    bounds = {"img_resolution": (1, MAX_RESOLUTION), "img_channels": (1, 64), "label_dim": (0, 1 << 20),
              "augment_dim": (0, 1024), "model_channels": (1, MAX_CHANNELS), "channel_mult_emb": (1, 64),
              "num_blocks": (1, 64), "channel_mult_noise": (1, 64), "M": (1, 1 << 20)}
    for name, (lo, hi) in bounds.items():
        if name in kwargs:
            checks.integer(f"{where}.{name}", kwargs[name], lo, hi)
    for name in ("channel_mult", "attn_resolutions"):
        if name in kwargs:
            positive_ints(name, kwargs[name], empty=name == "attn_resolutions")
    mult = kwargs.get("channel_mult")
    width = kwargs.get("model_channels")
    if mult and width and width * max(mult) > MAX_CHANNELS:
        raise ValueError(f"{where}: model_channels x channel_mult = {width * max(mult)} channels, more than "
                         f"{MAX_CHANNELS}")
    for name in ("dropout", "label_dropout"):
        if name in kwargs:
            checks.number(f"{where}.{name}", kwargs[name], 0, 1)
    for name in ("sigma_data", "beta_d", "beta_min", "epsilon_t"):
        if name in kwargs:
            checks.number(f"{where}.{name}", kwargs[name], 0, low_open=True)
    if "use_fp16" in kwargs and not isinstance(kwargs["use_fp16"], bool):
        raise ValueError(f"{where}.use_fp16 must be true or false, got {checks.show(kwargs['use_fp16'])}")
    if "resample_filter" in kwargs and not (isinstance(kwargs["resample_filter"], (list, tuple))
                                            and kwargs["resample_filter"]
                                            and all(isinstance(v, (int, float)) for v in kwargs["resample_filter"])):
        raise ValueError(f"{where}.resample_filter must be a list of numbers, got "
                         f"{checks.show(kwargs['resample_filter'])}")
