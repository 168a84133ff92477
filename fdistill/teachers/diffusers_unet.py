"""Diffusers UNets of DDPM (variance-preserving) schedules as EDM denoisers, so that they can be distilled
like any other teacher: the conversion and feature taps shared by pixel and latent UNets, and the
pixel-space ``UNet2DModel`` (Stable Diffusion's latent UNet is in ``teachers.families.stable_diffusion``).

A DDPM (Ho et al. 2020) noises data as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Dividing by
sqrt(abar_t) gives EDM's variance-exploding form x = x0 + sigma eps with

    sigma_t = sqrt((1 - abar_t) / abar_t),   x_t = x / sqrt(1 + sigma^2)   (since abar = 1 / (1 + sigma^2)),

so an eps-prediction UNet eps(x_t, t) is the EDM denoiser (Karras et al. 2022, Table 1, VP column:
c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(1 + sigma^2))

    D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)),

where t(sigma) interpolates log sigma linearly over the schedule's grid sigma_0 < ... < sigma_{T-1}
(fractional timesteps are fine for diffusers' sinusoidal embeddings). Only the *training* schedule
(``num_train_timesteps``, betas) matters; the scheduler's sampling settings (``timestep_spacing``,
``clip_sample``, ...) do not: D is not clipped.

diffusers is an optional dependency: ``pip install 'fdistill[diffusers]'``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.core.protocols import DenoiserDefaults
from fdistill.io import read_json_object
from fdistill.networks.taps import HookedTaps

INSTALL_HINT = "pip install 'fdistill[diffusers]'"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Schedule used when a bare UNet folder comes without a scheduler config: DDPM's (Ho et al. 2020),
# which is also diffusers' DDPMScheduler default and google/ddpm-cifar10-32's.
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4,
                     "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
# Zero-terminal-SNR schedules have abar_{T-1} = 0 (sigma = inf); floor it as diffusers' samplers do.
MIN_ALPHA_CUMPROD = 2.0**-24


MAX_TIMESTEPS = 100_000  # the longest training schedule accepted (DDPM teachers use 1000)
MAX_CHANNELS = 16384  # the widest block a UNet config may ask for
MAX_RESOLUTION = 4096  # the largest sample_size


def _config_error(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def check_unet_config(config, where: str = "the UNet config") -> None:
    """Refuse in one line (prefixed with ``where``, e.g. the config.json path) a UNet config that would not
    build, or would build something absurd: not a JSON object, a sample_size, channel count or block width
    that is not a positive integer within bounds. diffusers checks the rest when building."""
    if not isinstance(config, dict):
        raise _config_error(where, f"expected a JSON object of UNet settings, got a JSON {type(config).__name__}")

    def positive(name: str, value, hi: int) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= hi):
            raise _config_error(where, f"{name} must be an integer in [1, {hi}], got {value!r:.60}")

    size = config.get("sample_size")
    if size is not None:
        for v in size if isinstance(size, (list, tuple)) else [size]:
            positive("sample_size", v, MAX_RESOLUTION)
    for name in ("in_channels", "out_channels"):
        if name in config:
            positive(name, config[name], 1024)
    channels = config.get("block_out_channels")
    if channels is not None:
        if not (isinstance(channels, (list, tuple)) and channels):
            raise _config_error(where, f"block_out_channels must be a list of positive integers, got {channels!r:.60}")
        for v in channels:
            positive("block_out_channels", v, MAX_CHANNELS)
    layers = config.get("layers_per_block")
    for v in layers if isinstance(layers, (list, tuple)) else [] if layers is None else [layers]:
        positive("layers_per_block", v, 64)
    classes = config.get("num_class_embeds")
    if classes is not None:
        positive("num_class_embeds", classes, 1 << 20)
    groups = config.get("norm_num_groups")
    if groups is not None:
        positive("norm_num_groups", groups, MAX_CHANNELS)


def check_scheduler_config(config, where: str = "the scheduler config") -> None:
    """Refuse in one line a scheduler config whose training schedule cannot be built: not a JSON object,
    ``num_train_timesteps`` not an integer in [1, MAX_TIMESTEPS], betas outside (0, 1), an unknown prediction_type."""
    if not isinstance(config, dict):
        raise _config_error(where, f"expected a JSON object of scheduler settings, got a JSON {type(config).__name__}")
    steps = config.get("num_train_timesteps", 1000)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 2 <= steps <= MAX_TIMESTEPS):
        raise _config_error(where, f"num_train_timesteps must be an integer in [2, {MAX_TIMESTEPS}], got {steps!r:.60}")
    for name in ("beta_start", "beta_end"):
        v = config.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1):
            raise _config_error(where, f"{name} must be a number in (0, 1), got {v!r:.60}")
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and 2 <= len(betas) <= MAX_TIMESTEPS and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)):
        raise _config_error(where, f"trained_betas must be a list of numbers in (0, 1), at most {MAX_TIMESTEPS}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _config_error(where, f"unknown prediction_type {prediction!r:.60}; expected one of "
                            f"{', '.join(PREDICTION_TYPES)}")
    schedule = config.get("beta_schedule", "linear")
    if not isinstance(schedule, str):
        raise _config_error(where, f"beta_schedule must be a name (e.g. 'linear'), got {schedule!r:.60}")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"diffusers teachers need the optional dependency diffusers: {INSTALL_HINT}") from e
    return diffusers


def alphas_cumprod(scheduler_config: dict | None) -> Tensor:
    """abar_t, t = 0..T-1, float64, of a diffusers scheduler config (beta_schedule linear, scaled_linear,
    squaredcos_cap_v2, ... or trained_betas), computed by diffusers' own DDPMScheduler."""
    check_scheduler_config(scheduler_config or DEFAULT_SCHEDULER)
    config = {k: v for k, v in (scheduler_config or DEFAULT_SCHEDULER).items() if not k.startswith("_")}
    diffusers = _diffusers()
    quiet = logging.getLogger("diffusers.configuration_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # other schedulers' keys (PNDM's, Euler's, ...) are unknown to DDPMScheduler
    try:
        sched = diffusers.DDPMScheduler.from_config(config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:  # e.g. an unknown beta_schedule
        raise ValueError(f"the scheduler config does not build a DDPM schedule: {' '.join(str(e).split())[:300]}") \
            from None
    finally:
        quiet.setLevel(level)
    return sched.alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_CUMPROD)


class VPUNetDenoiser(DenoiserDefaults, HookedTaps):
    """A diffusers UNet of a variance-preserving (DDPM) schedule behind fdistill's denoiser interface
    ``net(x, sigma, cond)``; subclasses say how the UNet is called (``_call``) and where its taps are.

    Output conversions (x_t = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2)):

    * ``epsilon``: D = x - sigma eps (Karras et al. 2022, Table 1, VP).
    * ``v_prediction``: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Eq. 11), so
      x0 = sqrt(abar) x_t - sqrt(1 - abar) v = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v,
      which is EDM's preconditioning with sigma_data = 1.
    * ``sample``: D = the UNet's output.

    ``sigma_data`` only sets the fake score's loss weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2
    (the trainer's ``fake_score_weighting="edm"``). Following EDM's principle that the network's own
    output gets unit weight (lambda c_out^2 = 1), it defaults to 100 sigma_max for ``epsilon``
    (lambda ~ 1/sigma^2: DDPM's plain eps-MSE, the VP loss of Table 1, how the teacher was trained),
    1 for ``v_prediction`` (exact) and EDM's 0.5 for ``sample``. It is not the data's std here.

    Discriminator features are captured by hooks on the UNet's blocks (``networks.taps.HookedTaps``);
    ``features()`` stops the UNet after the last wanted block. The units FSDP shards and checkpointing
    recomputes (``blocks``) are the down, mid and up blocks.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 sigma_data: float | None = None) -> None:
        super().__init__()
        cfg = unet.config
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        size = cfg.get("sample_size")
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if size[0] is None or size[0] != size[1]:
            raise ValueError(f"the UNet's sample_size must be a square size, got {cfg.get('sample_size')!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.img_resolution = int(size[0])
        self.img_channels = int(cfg["in_channels"])
        out = int(cfg["out_channels"])
        if out not in (self.img_channels, 2 * self.img_channels):
            raise ValueError(f"out_channels {out} must be in_channels {self.img_channels} (or twice it, with a "
                             "learned variance)")
        self.learned_variance = out == 2 * self.img_channels  # extra channels: the variance, ignored

        abar = alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_CUMPROD)
        log_sigmas = (0.5 * ((1 - abar) / abar).log())  # log sigma_t, increasing in t
        if not (log_sigmas.diff() > 0).all():
            raise ValueError("the schedule's sigma_t = sqrt((1 - abar_t) / abar_t) must increase strictly with t")
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)  # float64: exact integer t on the grid
        self.sigma_min = float(log_sigmas[0].exp())
        self.sigma_max = float(log_sigmas[-1].exp())
        if sigma_data is None:
            sigma_data = {"epsilon": 100 * self.sigma_max, "v_prediction": 1.0, "sample": 0.5}[prediction_type]
        self.sigma_data = float(sigma_data)

    # -- noise level -> timestep ----------------------------------------------------------------
    def timestep(self, sigma: Tensor) -> Tensor:
        """t(sigma), float32 (B,): log sigma interpolated linearly over the grid log sigma_t, clamped to
        [0, T-1] outside [sigma_min, sigma_max]. Exact integers at the grid points (float64 arithmetic)."""
        grid = self.log_sigmas
        if sigma.device.type == "mps":  # no float64 there
            grid = grid.float()
        grid = grid.to(sigma.device)
        log_sigma = sigma.to(grid.dtype).log().reshape(-1)
        hi = torch.searchsorted(grid, log_sigma).clamp(1, len(grid) - 1)
        lo = hi - 1
        frac = ((log_sigma - grid[lo]) / (grid[hi] - grid[lo])).clamp(0, 1)
        t = (lo.to(grid.dtype) + frac).clamp(0, len(grid) - 1)
        if self.unet.config.get("time_embedding_type") == "learned":  # an nn.Embedding: integer timesteps only
            return t.round().long()
        return t.to(torch.float32)

    def blocks(self) -> list[nn.Module]:
        """The UNet's down, mid and up blocks: the units FSDP shards."""
        return [*self.unet.down_blocks, *([self.unet.mid_block] if self.unet.mid_block is not None else []),
                *self.unet.up_blocks]

    # -- what a subclass says -------------------------------------------------------------------
    def _call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The UNet's raw output for input x_t at timestep t under ``cond``."""
        raise NotImplementedError

    def _tap_output(self, name: str, module: nn.Module, output) -> Tensor:
        """The feature a tap (a block of the UNet, by name) hands the discriminator. A down block returns
        (hidden, res_samples[, ...]); res_samples holds one entry per resnet/attention layer, then the
        downsampled map: take the last full-resolution one. Any other block's output is the feature."""
        if name.startswith("down_blocks."):
            return output[1][len(module.resnets) - 1]
        return super()._tap_output(name, module, output)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, sigma: Tensor | float, cond=None, return_features: bool | str = False,
    ) -> Tensor | tuple[Tensor | None, dict[int, Tensor]]:
        """The denoised sample D(x; sigma), float32 (B, C, H, W). sigma: (B,), (B, 1, 1, 1) or a scalar
        (its own precision is used for t(sigma)). With ``return_features``: ``(D_x, {resolution:
        float32 (B, C_r, r, r)})``; with ``return_features="only"``: ``(None, features)``, stopping
        after the last wanted block."""
        x = x.to(torch.float32)
        sigma_in = torch.as_tensor(sigma, device=x.device)
        if not sigma_in.is_floating_point():
            sigma_in = sigma_in.to(torch.float32)
        sigma_in = sigma_in.reshape(-1)
        if sigma_in.shape[0] == 1 and x.shape[0] != 1:
            sigma_in = sigma_in.expand(x.shape[0])
        t = self.timestep(sigma_in)
        s = sigma_in.to(torch.float32).reshape(-1, 1, 1, 1)
        x_t = x / (1 + s**2).sqrt()

        out, features = self._run_tapped(self.unet, lambda: self._call(x_t, t, cond), x, return_features)
        if out is None:
            return None, features
        out = out.to(torch.float32)
        if self.learned_variance:
            out = out[:, : self.img_channels]
        if self.prediction_type == "epsilon":
            D_x = x - s * out
        elif self.prediction_type == "v_prediction":
            D_x = x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        else:
            D_x = out
        return (D_x, features) if return_features else D_x

    def features(self, x: Tensor, sigma: Tensor | float, cond=None) -> dict[int, Tensor]:
        """The discriminator's features alone, as ``forward(..., return_features=True)[1]``, running the
        UNet only up to the last wanted block (none of the decoder)."""
        return self.forward(x, sigma, cond, return_features="only")[1]


class DiffusersDenoiser(VPUNetDenoiser):
    """A pixel-space diffusers ``UNet2DModel`` (DDPM, e.g. google/ddpm-cifar10-32) as a denoiser.

    Class-conditional UNets (``num_class_embeds``, an ``nn.Embedding``) take one-hot labels
    (B, label_dim); class i is embedding index i. They have no null label, so an all-zero label (and
    hence classifier-free guidance) raises.

    Discriminator features: for each resolution in ``feature_resolutions`` (default: all encoder
    resolutions), the output of the last resnet/attention layer of the down block at that resolution
    (before its downsampler), as ``networks.edm`` taps the last encoder block per resolution.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 sigma_data: float | None = None) -> None:
        cfg = unet.config
        if cfg.get("time_embedding_type", "positional") not in ("positional", "learned"):
            raise NotImplementedError(f"time_embedding_type {cfg['time_embedding_type']!r} is not supported "
                                      "(only DDPM-style positional or learned timestep embeddings)")
        if unet.class_embedding is not None and not isinstance(unet.class_embedding, nn.Embedding):
            raise NotImplementedError(f"class_embed_type {cfg.get('class_embed_type')!r} is not supported "
                                      "(only num_class_embeds, an nn.Embedding of class indices)")
        super().__init__(unet, alphas_cumprod, prediction_type, sigma_data)
        self.label_dim = int(unet.class_embedding.num_embeddings) if unet.class_embedding is not None else 0
        # Encoder resolutions: down block i works at sample_size / 2^i (every block but the last downsamples).
        channels = list(cfg["block_out_channels"])
        self._taps = {self.img_resolution >> i: f"down_blocks.{i}" for i in range(len(unet.down_blocks))}
        self._tap_channels = {self.img_resolution >> i: int(channels[i]) for i in range(len(unet.down_blocks))}
        self._init_taps()

    @classmethod
    def from_configs(cls, unet_config: dict, scheduler_config: dict | None = None,
                     sigma_data: float | None = None) -> DiffusersDenoiser:
        """A randomly initialised denoiser of the given architecture and schedule (weights to be loaded)."""
        check_unet_config(unet_config)
        check_scheduler_config(scheduler_config or DEFAULT_SCHEDULER)
        unet = _diffusers().UNet2DModel.from_config(unet_config)
        sched = scheduler_config or DEFAULT_SCHEDULER
        return cls(unet, alphas_cumprod(sched), sched.get("prediction_type", "epsilon"), sigma_data)

    def _class_index(self, class_labels: Tensor | None) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise ValueError("this diffusers UNet is class-conditional: pass one-hot class_labels (it has no null "
                             "label, so unconditional evaluation and classifier-free guidance are unavailable)")
        class_labels = class_labels.reshape(-1, self.label_dim)
        if (class_labels == 0).all(dim=1).any():
            raise ValueError("an all-zero (null) class label cannot be expressed: this diffusers UNet has no "
                             "unconditional class embedding (use guidance 1)")
        return class_labels.argmax(dim=1)

    def _call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        return self.unet(x_t, t, class_labels=self._class_index(cond), return_dict=False)[0]


# -- loading ------------------------------------------------------------------------------------------
def _locate(folder: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler_config.json or None) of a pipeline folder or a bare UNet folder."""
    if (folder / "model_index.json").is_file():  # a pipeline: model_index.json, unet/, scheduler/
        index = read_json_object(folder / "model_index.json")
        unet_entry = index.get("unet")
        if unet_entry is None or not (folder / "unet" / "config.json").is_file():
            raise ValueError(f"{folder} is a diffusers pipeline without a UNet (unet/config.json); "
                             f"model_index.json lists {sorted(k for k in index if not k.startswith('_'))}")
        sched = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", sched if sched.is_file() else None
    if (folder / "config.json").is_file():  # a bare UNet; its scheduler beside it or in ../scheduler
        for sched in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
            if sched.is_file():
                return folder, sched
        return folder, None
    raise ValueError(f"{folder} is not a diffusers model folder: expected model_index.json (a pipeline with "
                     "unet/ and scheduler/) or config.json (a UNet2DModel)")


def load_diffusers_teacher(folder: str | Path) -> tuple[DiffusersDenoiser, str, dict]:
    """Load a local diffusers folder (a pipeline such as google/ddpm-cifar10-32's, or a bare UNet2DModel
    folder) as an EDM denoiser. Returns (net in eval mode, "diffusers", kwargs); ``kwargs`` (JSON: the
    UNet and scheduler configs, the folder, img_resolution, img_channels, label_dim) rebuilds the
    architecture with ``build_diffusers_network`` without reading the folder again."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {folder}")
    unet_dir, sched_path = _locate(folder)
    unet_config = read_json_object(unet_dir / "config.json")
    check_unet_config(unet_config, str(unet_dir / "config.json"))
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise NotImplementedError(f"{unet_dir} holds a {unet_config['_class_name']!r:.80}; only UNet2DModel "
                                  "(pixel-space DDPM) teachers are supported")
    if sched_path is None:
        warnings.warn(f"{folder} has no scheduler config; assuming DDPM's linear schedule (beta 1e-4..0.02, "
                      "1000 steps, epsilon prediction)", stacklevel=2)
        scheduler_config = dict(DEFAULT_SCHEDULER)
    else:
        scheduler_config = read_json_object(sched_path)
        check_scheduler_config(scheduler_config, str(sched_path))
    low_mem = importlib.util.find_spec("accelerate") is not None  # else diffusers warns and falls back
    try:
        unet = _diffusers().UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32,
                                                        low_cpu_mem_usage=low_mem)
        schedule = alphas_cumprod(scheduler_config)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{folder} is not a loadable diffusers UNet2DModel teacher: "
                         f"{' '.join(str(e).split())[:300]}") from None
    net = DiffusersDenoiser(unet, schedule, scheduler_config.get("prediction_type", "epsilon"))
    kwargs = {
        "folder": str(folder.resolve()),
        "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "scheduler_config": scheduler_config,
        "img_resolution": net.img_resolution,
        "img_channels": net.img_channels,
        "label_dim": net.label_dim,
    }
    json.dumps(kwargs)  # must be JSON (checkpoint metadata)
    return net.eval(), "diffusers", kwargs


def build_diffusers_network(kwargs: dict) -> DiffusersDenoiser:
    """The architecture described by ``load_diffusers_teacher``'s kwargs, randomly initialised (for
    ``load_state_dict``, e.g. of a distilled generator)."""
    return DiffusersDenoiser.from_configs(kwargs["unet_config"], kwargs.get("scheduler_config"),
                                          kwargs.get("sigma_data"))


__all__ = ["DiffusersDenoiser", "alphas_cumprod", "build_diffusers_network", "load_diffusers_teacher",
           "INSTALL_HINT"]
