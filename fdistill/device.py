"""Where the work runs: the torch device and the number of CPU threads."""

from __future__ import annotations

import torch


def pick_device(device: str = "auto") -> torch.device:
    """``device`` as a torch.device; "auto" is cuda when torch sees a GPU, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but torch sees no CUDA device")
    return dev
