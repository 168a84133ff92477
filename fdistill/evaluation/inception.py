"""Inception-v3 "2015-12-05" pool3 features (2048-d) for the standard FID / precision / recall.

The weights are read from a local file only (fdistill never downloads):

- NVIDIA's TorchScript ``inception-2015-12-05.pt`` (StyleGAN2-ADA, EDM, clean-fid): called as
  ``detector(x_uint8, return_features=True)``; it resizes internally. A TorchScript archive runs code stored in
  the file when it is loaded, so one is loaded only when its sha256 is an accepted digest: one recorded in
  ``PUBLISHED_TORCHSCRIPT_SHA256`` or the one in ``$FDISTILL_INCEPTION_SHA256`` (for a copy the user has
  verified). No digest is recorded yet: none was found in a source this project could check, and the file could
  not be fetched here to hash it. Any other TorchScript file is refused before ``torch.jit.load`` runs.
- pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth``, run by ``FIDInceptionV3`` below:
  Inception-v3 with the TF graph's differences from torchvision's model (3x3 average pools that ignore
  the padding, a max pool in the last block's pool branch, a 1008-class fc), fed as pytorch-fid feeds
  it: x / 255, bilinear resize to 299x299 (align_corners=False), then 2x - 1. The same tensors as a
  ``.safetensors`` file load too. Neither runs code from the file (``torch.load(weights_only=True)``).

Both take uint8 NCHW images (1 or 3 channels; grayscale is repeated to RGB) of any resolution.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill import require_torch
from fdistill.config import cache_dir
from fdistill.data.transforms import rgb_uint8

require_torch()  # torch.load(weights_only=True) must not load TorchScript

TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
STATE_DICT_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHT_NAMES = (TORCHSCRIPT_NAME, STATE_DICT_NAME)  # lookup order in a directory
ENV_VAR = "FDISTILL_INCEPTION"
SHA256_ENV_VAR = "FDISTILL_INCEPTION_SHA256"  # the digest of a TorchScript copy the user has verified
# sha256 digests of NVIDIA's published inception-2015-12-05.pt (see the module doc: none recorded yet).
PUBLISHED_TORCHSCRIPT_SHA256: frozenset[str] = frozenset()
URLS = {
    TORCHSCRIPT_NAME: "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + TORCHSCRIPT_NAME,
    STATE_DICT_NAME: "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + STATE_DICT_NAME,
}
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier: 1000 ImageNet classes + 8 unused
INPUT_SIZE = 299


# -- the network -----------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv2d without bias -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU. ``same`` pads by k // 2."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, same: bool = False):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kh // 2, kw // 2) if same else 0
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool3x3(x: Tensor, kind: str) -> Tensor:
    """The pool branch's 3x3 stride-1 pool: "avg" averages over in-image pixels only (TF semantics,
    count_include_pad=False), "max" is a max pool."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1; out 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, same=True)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, same=True)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, same=True)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool3x3(x, "avg"))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2; out 480 + cin channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, same=True)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e); out 768 channels."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), same=True)
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), same=True)
        self.branch7x7dbl_1 = ConvBN(cin, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), same=True)
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), same=True)
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), same=True)
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), same=True)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pool3x3(x, "avg"))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2; out 512 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), same=True)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), same=True)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c); out 2048 channels. ``pool`` is the
    pool branch's pool: "avg" for Mixed_7b, "max" for Mixed_7c (a quirk of the 2015-12-05 graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), same=True)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), same=True)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, same=True)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), same=True)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), same=True)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pool3x3(x, self.pool))], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF "2015-12-05" graph used for FID; parameter names and shapes are those of
    pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, so that file loads with strict=True.

    ``forward`` takes uint8 NCHW images and returns the 2048-d pool3 features (mean of Mixed_7c's output).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, same=True)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 1|3, H, W) -> float (N, 3, 299, 299) in [-1, 1], as pytorch-fid: x / 255, bilinear
        resize (align_corners=False), 2x - 1."""
        dtype = self.fc.weight.dtype
        x = rgb_uint8(images, "Inception-v3").to(device=self.fc.weight.device, dtype=dtype) / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def trunk(self, x: Tensor) -> Tensor:
        """Preprocessed (N, 3, 299, 299) -> Mixed_7c's output (N, 2048, 8, 8)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (N, 1|3, H, W) -> pool3 features (N, 2048)."""
        return self.trunk(self.preprocess(images)).mean(dim=(2, 3))

    def logits(self, features: Tensor) -> Tensor:
        """pool3 features (N, 2048) -> the 1008 class logits."""
        return self.fc(features)


# -- loading -----------------------------------------------------------------------------------------
def missing_weights_message(looked: list[Path]) -> str:
    where = ", ".join(str(p) for p in looked)
    return (f"Inception-v3 weights not found (looked at: {where}). The standard FID needs {TORCHSCRIPT_NAME} "
            f"(NVIDIA's TorchScript, used by EDM: {URLS[TORCHSCRIPT_NAME]}) or {STATE_DICT_NAME} (pytorch-fid's "
            f"state dict: {URLS[STATE_DICT_NAME]}). fdistill does not download: place one of them in "
            f"{cache_dir()}, set {ENV_VAR}=PATH, or pass --inception PATH.")


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file: ``path`` (a file, or a directory holding one of the two names), else $FDISTILL_INCEPTION,
    else the cache directory. Raises FileNotFoundError naming both files and where to put them."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    candidates = [Path(path).expanduser()] if path is not None else [cache_dir()]
    looked = []
    for p in candidates:
        if p.is_file():
            return p
        if p.is_dir():
            for name in WEIGHT_NAMES:
                looked.append(p / name)
                if (p / name).is_file():
                    return p / name
        else:
            looked.append(p)
    raise FileNotFoundError(missing_weights_message(looked))


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with code/ and constants.pkl; torch.save state dicts have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def accepted_torchscript_digests() -> frozenset[str]:
    """The sha256 digests a TorchScript Inception file may have: ``PUBLISHED_TORCHSCRIPT_SHA256`` and the
    one in $FDISTILL_INCEPTION_SHA256 (64 hex digits), if set."""
    extra = os.environ.get(SHA256_ENV_VAR, "").strip().lower()
    if not extra:
        return PUBLISHED_TORCHSCRIPT_SHA256
    if len(extra) != 64 or any(c not in "0123456789abcdef" for c in extra):
        raise ValueError(f"${SHA256_ENV_VAR}={extra!r} is not a sha256 digest; expected 64 hex digits "
                         f"(`sha256sum {TORCHSCRIPT_NAME}`)")
    return PUBLISHED_TORCHSCRIPT_SHA256 | {extra}


def check_torchscript(path: Path) -> None:
    """Refuse a TorchScript file whose sha256 is not accepted (``accepted_torchscript_digests``): loading one
    runs the code stored in it. Nothing of the file but its bytes is read."""
    from fdistill.io import sha256

    accepted = accepted_torchscript_digests()
    digest = sha256(path)
    if digest in accepted:
        return
    known = (f"the published {TORCHSCRIPT_NAME} (sha256 {', '.join(sorted(accepted))})" if accepted else
             f"the published {TORCHSCRIPT_NAME} once its digest is set in ${SHA256_ENV_VAR} (none is recorded in "
             "fdistill)")
    raise ValueError(f"Inception weights {path}: a TorchScript file with sha256 {digest}, which is not an accepted "
                     f"digest; TorchScript runs code from the file, so fdistill loads only {known}, or plain weights "
                     f"({STATE_DICT_NAME}: a state dict read with torch.load(weights_only=True), or the same tensors "
                     f"as .safetensors). If you have verified this file, set {SHA256_ENV_VAR}={digest}")


def load_state_dict_net(path: str | Path) -> FIDInceptionV3:
    """FIDInceptionV3 with pytorch-fid's weights (strict load; a file without BatchNorm's num_batches_tracked,
    as saved by torch < 0.4.1, is accepted), from the ``.pth`` (``torch.load(weights_only=True)``) or the same
    tensors as ``.safetensors``."""
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); expected the tensors of "
                             f"{STATE_DICT_NAME}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} cannot be read as plain weights with torch.load(weights_only=True) ({msg}); "
                             f"expected {STATE_DICT_NAME} or the same tensors as .safetensors") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__}); expected {STATE_DICT_NAME}")
    net = FIDInceptionV3()
    state = dict(state)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold the FID Inception-v3 weights ({STATE_DICT_NAME}): {e}") from e
    return net


class InceptionExtractor:
    """Callable: uint8 images (N, 1|3, H, W), any resolution -> pool3 features (N, d) on the CPU (d = 2048 for
    the real weights). ``kind`` is "torchscript" or "state_dict"; ``path`` the weights file."""

    def __init__(self, net: Callable, path: Path, kind: str, device: str | torch.device = "cpu"):
        self.net, self.path, self.kind, self.device = net, Path(path), kind, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        x = rgb_uint8(images, "Inception-v3").to(self.device)
        feats = self.net(x, return_features=True) if self.kind == "torchscript" else self.net(x)
        if feats.ndim != 2 or len(feats) != len(x):
            raise ValueError(f"{self.path.name} returned features of shape {tuple(feats.shape)} for {len(x)} images; "
                             "expected (N, d)")
        return feats.cpu()


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionExtractor:
    """The Inception-v3 feature extractor (see ``find_weights`` for the lookup). A TorchScript archive
    (``.pt``) is run as NVIDIA's detector; a state dict (``.pth``) by ``FIDInceptionV3``."""
    path = find_weights(path)
    device = torch.device(device)
    if _is_torchscript(path):
        check_torchscript(path)  # before torch.jit.load, which runs the file's code
        with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, yet it is how NVIDIA ships it
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
        return InceptionExtractor(net, path, "torchscript", device)
    net = load_state_dict_net(path).to(device).eval().requires_grad_(False)
    return InceptionExtractor(net, path, "state_dict", device)


def extract_features(extractor: Callable[[Tensor], Tensor], images: Tensor | np.ndarray, batch_size: int = 64,
                     progress: bool = True, desc: str = "Inception features") -> Tensor:
    """Features of uint8 images (N, C, H, W) in batches (no_grad), concatenated on the CPU."""
    from tqdm.auto import tqdm

    images = torch.as_tensor(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    with torch.no_grad(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            out.append(extractor(images[i : i + batch_size]))
            bar.update(len(out[-1]))
    return torch.cat(out)
