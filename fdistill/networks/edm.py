"""EDM-compatible denoisers: the preconditionings and UNets of Karras et al. 2022 ("Elucidating the
Design Space of Diffusion-Based Generative Models", NVlabs/edm ``training/networks.py``).

Constructor arguments, module tree, ``state_dict`` names/shapes and forward math follow NVlabs/edm,
so its checkpoints (e.g. ``edm-cifar10-32x32-cond-vp``, ``edm-imagenet-64x64-cond-adm``) load into
these classes with ``load_state_dict(strict=True)`` and give the same outputs.

Two additions for fdistill's denoiser interface:

* ``forward(..., return_features=True)`` returns ``(D_x, {resolution: feature map})``, the output of
  the last encoder block at each resolution in ``net.feature_resolutions`` (default: all encoder
  resolutions), tapped inside the same UNet pass; these feed the discriminator heads (App. B).
* ``net.feature_channels()`` gives ``{resolution: channels}`` for those maps without a forward pass.

One deliberate difference: the UNets accept NVlabs/edm's ``label_dropout`` (its pickles record it) but
never drop labels themselves. Label dropout for classifier-free guidance belongs to teacher training
(``fdistill.apps.images.train_teacher``), so the generator and fake score, copies of the teacher in
training mode, always see the labels they are given during distillation.

As in EDM, parameters stay float32; with ``use_fp16`` (CUDA only, unless ``force_fp32``) the UNet runs
in float16 by casting weights per layer, while the embedding path and the preconditioning stay float32
(attention runs in PyTorch's fused kernel, which accumulates its softmax in float32). ``D_x`` and the
returned features are always float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.core.diffusion import edm_preconditioning
from fdistill.core.protocols import DenoiserDefaults
from fdistill.networks.attention import twice_differentiable
from fdistill.networks.taps import FeatureTaps

# -- layers ---------------------------------------------------------------------------------------


def init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """A freshly drawn weight of ``shape`` for one of EDM's four init modes."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer; the float32 weights are cast to the input's dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True,
        init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(init_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(init_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


class Conv2d(nn.Module):
    """Square 2-D convolution with optional 2x up/downsampling by a separable FIR filter.

    ``kernel=0`` gives a parameter-free resampler. With ``fused_resample`` the downsampling is done
    after the convolution (and upsampling before it) with padding shared between the two.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
        up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False, init_mode: str = "kaiming_normal",
        init_weight: float = 1, init_bias: float = 0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        area = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * area, fan_out=out_channels * area)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(init_tensor(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(init_tensor([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in, c_out = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([c_out, 1, 1, 1]), groups=c_out, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with at most ``num_groups`` groups and at least ``min_channels_per_group`` channels each."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm-SiLU-conv twice, noise embedding injected in between) with optional
    2x up/downsampling and self-attention: the superset of the DDPM++, NCSN++ and ADM blocks.

    ``adaptive_scale`` (ADM) modulates as norm(x) * (1 + scale) + shift; otherwise (DDPM++) the
    embedding is added before the second norm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
        attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
        dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
        init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None,
    ) -> None:
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            init_qkv = init if init_attn is None else init_attn
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_qkv)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        if self.dropout and self.training:  # no mask work at all when there is no dropout
            h = F.dropout(h, p=self.dropout)
        h = self.conv1(h)
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if not self.num_heads:
            return h
        # Channels of qkv are laid out as (head, channel, {q, k, v}); attention over the H*W positions,
        # softmax(q.k / sqrt(C)) v, by PyTorch's fused kernel (EDM spells it out with einsum).
        batch, channels = h.shape[:2]
        qkv = self.qkv(self.norm2(h)).reshape(batch * self.num_heads, channels // self.num_heads, 3, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (N * heads, H * W, C / heads)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return (self.proj(attn.reshape(h.shape)) + h) * self.skip_scale


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)], f_i = max_positions^(-i / (n/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        steps = torch.arange(half, dtype=torch.float32, device=x.device)
        exponents = steps / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# -- UNets ----------------------------------------------------------------------------------------


class SongUNet(FeatureTaps):
    """DDPM++ / NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs") as
    reimplemented in EDM. DDPM++: positional embedding, standard encoder, filter [1, 1];
    NCSN++: Fourier embedding with ``channel_mult_noise=2``, residual encoder, filter [1, 3, 3, 1].
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,  # number of classes (one-hot labels), 0 = unconditional
        augment_dim: int = 0,  # augmentation-label dimensionality, 0 = no augmentation conditioning
        model_channels: int = 128,  # base channel count
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # channel multiplier per resolution
        channel_mult_emb: int = 4,  # embedding width = model_channels * channel_mult_emb
        num_blocks: int = 4,  # residual blocks per resolution
        attn_resolutions: Sequence[int] = (16,),  # resolutions with self-attention
        dropout: float = 0.10,
        label_dropout: float = 0,  # recorded, never applied: see the module docstring
        embedding_type: str = "positional",  # 'positional' (DDPM++) or 'fourier' (NCSN++)
        channel_mult_noise: int = 1,  # noise-embedding width multiplier: 1 (DDPM++), 2 (NCSN++)
        encoder_type: str = "standard",  # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++)
        decoder_type: str = "standard",  # 'standard' or 'skip'
        resample_filter: Sequence[float] = (1, 1),  # [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++)
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Noise, label and augmentation embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder and decoder; each module gets a role that tells forward() how to apply it.
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        self._roles: dict[str, dict[str, str]] = {"enc": {}, "dec": {}}

        def add(part: str, name: str, role: str, module: nn.Module) -> None:
            getattr(self, part)[name] = module
            self._roles[part][name] = role

        filt = dict(resample_filter=resample_filter)
        self._taps, self._tap_channels = {}, {}
        c = c_aux = in_channels  # channels of the main path and of the auxiliary (image) path
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                add("enc", f"{tag}_conv", "conv", Conv2d(c, model_channels, kernel=3, **init))
                c = model_channels
            else:
                add("enc", f"{tag}_down", "block", UNetBlock(c, c, down=True, **block))
                if encoder_type == "skip":
                    downsample = Conv2d(c_aux, c_aux, kernel=0, down=True, **filt)
                    add("enc", f"{tag}_aux_down", "aux_down", downsample)
                    add("enc", f"{tag}_aux_skip", "aux_skip", Conv2d(c_aux, c, kernel=1, **init))
                if encoder_type == "residual":
                    aux_res = Conv2d(c_aux, c, kernel=3, down=True, fused_resample=True, **filt, **init)
                    add("enc", f"{tag}_aux_residual", "aux_residual", aux_res)
                    c_aux = c
            for idx in range(num_blocks):
                attn = res in attn_resolutions
                add("enc", f"{tag}_block{idx}", "block",
                    UNetBlock(c, model_channels * mult, attention=attn, **block))
                c = model_channels * mult
            # The tap: the last module at this resolution that writes the main path.
            self._taps[res] = [n for n, r in self._roles["enc"].items() if r != "aux_down"][-1]
            self._tap_channels[res] = c
        enc_roles = self._roles["enc"]
        skip_channels = [self.enc[n].out_channels for n, r in enc_roles.items() if not r.startswith("aux")]

        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == len(channel_mult) - 1:
                add("dec", f"{tag}_in0", "block", UNetBlock(c, c, attention=True, **block))
                add("dec", f"{tag}_in1", "block", UNetBlock(c, c, **block))
            else:
                add("dec", f"{tag}_up", "block", UNetBlock(c, c, up=True, **block))
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                add("dec", f"{tag}_block{idx}", "skip_block",
                    UNetBlock(c + skip_channels.pop(), model_channels * mult, attention=attn, **block))
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    upsample = Conv2d(out_channels, out_channels, kernel=0, up=True, **filt)
                    add("dec", f"{tag}_aux_up", "aux_up", upsample)
                add("dec", f"{tag}_aux_norm", "aux_norm", GroupNorm(c, eps=1e-6))
                add("dec", f"{tag}_aux_conv", "aux_conv", Conv2d(c, out_channels, kernel=3, **init_zero))
        self._init_taps()

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
        augment_labels: Tensor | None = None, return_features: bool | str = False,
    ) -> Tensor | tuple[Tensor | None, dict[int, Tensor]]:
        """F(x) for noise labels (B,), one-hot labels (B, label_dim); with ``return_features`` also the
        encoder features {resolution: (B, C, r, r)} for ``feature_resolutions``; with
        ``return_features="only"``, (None, features), stopping after the last tapped encoder block."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        taps = self._wanted_taps(return_features)
        features: dict[int, Tensor] = {}
        skips: list[Tensor] = []
        aux = x
        for name, module in self.enc.items():
            role = self._roles["enc"][name]
            if role == "aux_down":
                aux = module(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + module(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if role == "block" else module(x)
                skips.append(x)
            if name in taps:
                features[taps[name]] = x
                if return_features == "only" and len(features) == len(taps):
                    return None, features  # the rest of the network is not needed

        out: Tensor | None = None
        head: Tensor | None = None
        for name, module in self.dec.items():
            role = self._roles["dec"][name]
            if role == "aux_up":
                out = module(out)
            elif role == "aux_norm":
                head = module(x)
            elif role == "aux_conv":
                head = module(F.silu(head))
                out = head if out is None else head + out
            else:
                if role == "skip_block":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return (out, features) if return_features else out


class DhariwalUNet(FeatureTaps):
    """ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") as reimplemented
    in EDM. Attention blocks have ``out_channels // 64`` heads, so none below 64 channels."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,  # number of classes (one-hot labels), 0 = unconditional
        augment_dim: int = 0,  # augmentation-label dimensionality, 0 = no augmentation conditioning
        model_channels: int = 192,  # base channel count
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # channel multiplier per resolution
        channel_mult_emb: int = 4,  # embedding width = model_channels * channel_mult_emb
        num_blocks: int = 3,  # residual blocks per resolution
        attn_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
        dropout: float = 0.10,
        label_dropout: float = 0,  # recorded, never applied: see the module docstring
    ) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                     init=init, init_zero=init_zero)

        # Noise, augmentation and label embedding.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                    init_weight=math.sqrt(label_dim))

        # Encoder.
        self.enc = nn.ModuleDict()
        self._taps, self._tap_channels = {}, {}
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels * mult, kernel=3, **init)
                c = model_channels * mult
                last = f"{res}x{res}_conv"
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
                last = f"{res}x{res}_down"
            for idx in range(num_blocks):
                last = f"{res}x{res}_block{idx}"
                attn = res in attn_resolutions
                self.enc[last] = UNetBlock(c, model_channels * mult, attention=attn, **block)
                c = model_channels * mult
            self._taps[res], self._tap_channels[res] = last, c
        skip_channels = [module.out_channels for module in self.enc.values()]

        # Decoder; '_block' modules take the matching encoder output concatenated to their input.
        self.dec = nn.ModuleDict()
        self._concat: set[str] = set()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for idx in range(num_blocks + 1):
                name = f"{res}x{res}_block{idx}"
                self.dec[name] = UNetBlock(c + skip_channels.pop(), model_channels * mult,
                                           attention=res in attn_resolutions, **block)
                self._concat.add(name)
                c = model_channels * mult
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, kernel=3, **init_zero)
        self._init_taps()

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
        augment_labels: Tensor | None = None, return_features: bool | str = False,
    ) -> Tensor | tuple[Tensor | None, dict[int, Tensor]]:
        """F(x) for noise labels (B,), one-hot labels (B, label_dim); with ``return_features`` also the
        encoder features {resolution: (B, C, r, r)} for ``feature_resolutions``; with
        ``return_features="only"``, (None, features), stopping after the last tapped encoder block."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)

        taps = self._wanted_taps(return_features)
        features: dict[int, Tensor] = {}
        skips: list[Tensor] = []
        for name, module in self.enc.items():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
            if name in taps:
                features[taps[name]] = x
                if return_features == "only" and len(features) == len(taps):
                    return None, features  # the rest of the network is not needed

        for name, module in self.dec.items():
            if name in self._concat:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))
        return (x, features) if return_features else x


UNETS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# -- preconditioning --------------------------------------------------------------------------------


class _Precond(DenoiserDefaults, nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a UNet ``self.model`` (EDM Table 1).

    Subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)``.
    """

    model: SongUNet | DhariwalUNet

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def _build_model(self, model_type: str, model_kwargs: dict) -> None:
        """``self.model``: the UNet mapping img_channels to img_channels (built last, as in EDM, so that a
        seeded construction draws the same initial weights)."""
        if model_type not in UNETS:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(UNETS)}")
        channels = self.img_channels
        self.model = UNETS[model_type](img_resolution=self.img_resolution, in_channels=channels,
                                       out_channels=channels, label_dim=self.label_dim, **model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor | float, Tensor | float, Tensor | float, Tensor]:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The UNet's encoder and decoder blocks: the units FSDP shards."""
        return [*self.model.enc.values(), *self.model.dec.values()]

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, force_fp32: bool = False,
        return_features: bool | str = False, **model_kwargs,
    ) -> Tensor | tuple[Tensor | None, dict[int, Tensor]]:
        """The denoised image D(x; sigma), float32 (B, C, H, W).

        sigma: (B,), (B, 1, 1, 1) or a scalar. class_labels: one-hot (B, label_dim); None means the
        all-zero label. model_kwargs go to the UNet (e.g. ``augment_labels``). With
        ``return_features`` returns ``(D_x, {resolution: float32 (B, C_r, r, r)})``.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_half else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with twice_differentiable(x) if return_features else contextlib.nullcontext():  # exact R1
            out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                             return_features=return_features, **model_kwargs)
        F_x, features = out if return_features else (out, None)
        if F_x is None:  # return_features == "only"
            return None, {r: f.to(torch.float32) for r, f in features.items()}
        if F_x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):  # autocast picks its own dtype
            raise RuntimeError(f"UNet returned {F_x.dtype}, expected {dtype}")
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_features:
            return D_x
        return D_x, {r: f.to(torch.float32) for r, f in features.items()}

    def features(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None,
                 **model_kwargs) -> dict[int, Tensor]:
        """The discriminator's features alone, as ``forward(..., return_features=True)[1]`` but running
        only the encoder up to the last tapped block (the critic step needs nothing else)."""
        return self.forward(x, sigma, class_labels, return_features="only", **model_kwargs)[1]

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """Noise levels are continuous: sigma as a tensor, unchanged."""
        return torch.as_tensor(sigma)

    @property
    def feature_resolutions(self) -> list[int]:
        """Encoder resolutions whose features ``return_features=True`` returns (default: all)."""
        return self.model.feature_resolutions

    @feature_resolutions.setter
    def feature_resolutions(self, resolutions: Sequence[int]) -> None:
        self.model.feature_resolutions = resolutions

    @property
    def encoder_resolutions(self) -> list[int]:
        return self.model.encoder_resolutions

    def feature_channels(self) -> dict[int, int]:
        """{resolution: channels} of the returned features, without a forward pass."""
        return self.model.feature_channels()


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip = s_d^2 / (sigma^2 + s_d^2),
    c_out = sigma s_d / sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs,
    ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self._build_model(model_type, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return edm_preconditioning(sigma, self.sigma_data)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021; Karras et al. 2022, Table 1):
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma), with
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str = "SongUNet",
        **model_kwargs,
    ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self._build_model(model_type, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[float, Tensor, Tensor, Tensor]:
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return 1, c_out, c_in, c_noise

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t) of the VP schedule."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """t(sigma), the inverse of ``sigma(t)``."""
        sigma = torch.as_tensor(sigma)
        root = (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt()
        return (root - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021; Karras et al. 2022, Table 1):
    c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        model_type: str = "SongUNet",
        **model_kwargs,
    ) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._build_model(model_type, model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[float, Tensor, float, Tensor]:
        return 1, sigma, 1, (0.5 * sigma).log()


PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")  # the preconditioning classes, by name
