"""fdistill: one-step diffusion distillation by f-divergence distribution matching."""

__version__ = "0.1.0"

# torch.load(weights_only=True), which fdistill's loaders rely on (and diffusers' and transformers' for .bin
# files), also loads TorchScript archives, running their code, in torch < 2.6 (CVE-2025-32434).
MIN_TORCH = (2, 6)


def require_torch(version: str | None = None) -> None:
    """Refuse (ImportError, one line) a torch older than ``MIN_TORCH``; ``version`` defaults to the installed
    torch's ``__version__``."""
    import re

    if version is None:
        import torch

        version = torch.__version__
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if m is None or tuple(int(g) for g in m.groups()) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"fdistill needs torch>={need}, found torch {version}: in older torch "
                          "torch.load(weights_only=True) also loads TorchScript archives, which run code from the "
                          f"file (CVE-2025-32434); upgrade torch (pip install 'torch>={need}')")
