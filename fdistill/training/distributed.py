"""Data parallelism on torch.distributed: process-group setup from torchrun's environment, the two
collectives Alg. 1 needs beyond the batch statistics of ``core.objective`` (gradients, start weights),
and sharding (FSDP2, ``fully_shard``) for networks that do not fit replicated.

We average gradients ourselves instead of wrapping modules in DistributedDataParallel: the student
step runs the discriminator forward but back-propagates only into the generator
(``backward(inputs=...)``), which DDP's reducer does not allow, and gradient accumulation then
needs no ``no_sync`` bookkeeping. One all-reduce per optimizer step, in buckets.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fdistill.device import pick_device

BUCKET_ELEMENTS = 1 << 25  # 128 MB of fp32 gradients per all-reduce call


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.
    Returns this process's device: ``cuda:LOCAL_RANK`` for CUDA, else ``pick_device(device)``.

    gloo on one machine talks over the loopback interface (GLOO_SOCKET_IFNAME, unless set), so it does
    not depend on the host name resolving to a reachable address."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else dev.index or 0)
        torch.cuda.set_device(dev)
    if world > 1 and not is_initialized():
        if dev.type != "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def shutdown(clean: bool = True) -> None:
    """Leave the process group. ``clean``: every rank got here normally, so wait for the others first (a rank
    that destroys its group while another still flushes its last collective aborts the job at exit)."""
    if is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[torch.device]:
    """``init_from_env`` for the block; on leaving it, ``shutdown``, waiting for the other ranks unless one raised."""
    dev = init_from_env(device)
    try:
        yield dev
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is set on any rank (all ranks get the same answer; no communication in one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """grad <- mean over ranks, for every parameter that has a gradient (the same set on every rank,
    since all ranks run the same graph)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= BUCKET_ELEMENTS or i == len(grads) - 1:
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            for b, v in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(v.view_as(b))
            bucket, size = [], 0


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (so all start from the same weights)."""
    if world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def same_on_all_ranks(module: nn.Module) -> bool:
    """Whether every rank holds the same weights: compares a float64 checksum of each tensor (a sharded
    module holds different shards by design and passes)."""
    if world_size() == 1 or is_sharded(module):
        return True
    tensors = [*module.parameters(), *module.buffers()]
    if not tensors:
        return True
    local = torch.stack([t.detach().double().sum() + t.detach().double().square().sum() for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# -- sharded data parallel (FSDP2) -----------------------------------------------------------------------------
def _blocks(module: nn.Module) -> list[nn.Module]:
    """The units a network is sharded by: what its denoiser names (``blocks()``, the ``core.protocols.Denoiser``
    contract: a diffusers UNet's down/mid/up blocks, a transformer's blocks, an EDM UNet's encoder and decoder
    blocks), else its direct children."""
    inner = getattr(module, "net", module)  # a guided teacher
    blocks = getattr(inner, "blocks", None)
    if callable(blocks) and not isinstance(blocks, nn.Module):
        return list(blocks())
    return list(inner.children())


def shard(module: nn.Module) -> nn.Module:
    """Shard ``module``'s parameters over the ranks (PyTorch FSDP2, ``fully_shard``: each block, then the
    whole): weights, gradients and optimizer states take 1/N of the memory; gradients are averaged by the
    reduce-scatter in backward. A role of a shared base (``networks.shared_base``; also under guidance) shards the
    one base it is a view of, adapters included, the first time (its other roles then find it sharded)."""
    from torch.distributed.fsdp import fully_shard

    from fdistill.networks.shared_base import AdapterView

    view = module if isinstance(module, AdapterView) else getattr(module, "net", None)  # or a guided teacher's
    if isinstance(view, AdapterView):
        view.shared.shard(shard)
        return module
    for block in _blocks(module):
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def module_state(module: nn.Module) -> dict[str, Tensor]:
    """The full state dict (gathered on rank 0 for a sharded module: a collective, every rank calls it)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full())


def load_module_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    if not is_sharded(module):
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_full())


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full())


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state saved by ``optimizer_state``: torch's own (keyed by parameter index) or, from
    a sharded run, keyed by parameter name (which loads into sharded and plain modules alike). Into a sharded
    module, torch's own is first keyed by name (its indices number ``optimizer``'s parameters in order)."""
    by_index = all(isinstance(k, int) for k in state["state"])
    if by_index and not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if by_index:
        state = _keyed_by_name(module, optimizer, state)

    set_optimizer_state_dict(module, optimizer, state, options=_full())


def _keyed_by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """torch's optimizer state (parameters numbered in ``optimizer``'s order) keyed by ``module``'s parameter names,
    as ``optimizer_state`` writes it for a sharded module."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    if None in order or len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the optimizer state does not fit this module's parameters")
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
