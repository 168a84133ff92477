"""One frozen network for teacher, generator and fake score (``text.shared_base``).

Alg. 1 holds three copies of the teacher's weights: D_phi (frozen), the generator G_theta and the fake score
D_psi. With LoRA (Hu et al. 2022) the two students differ from the teacher only by low-rank adapters, so all
three can be one base network carrying two adapters ("generator", "fake_score"; a third, "generator_ema", for
the generator's EMA): the teacher is the base with every adapter off. Each role is an ``AdapterView``: a module
that owns (registers) only its adapter's parameters and switches the base to its adapter before each pass, so
the distiller, its optimizers, EMA and checkpoints see three ordinary networks while the weights exist once and
optimizer states exist only for the adapters.

Autograd records which adapter a pass used, so switching between passes changes no gradient. Gradient
checkpointing recomputes a unit's forward in backward, after other views may have switched the base: the base's
checkpoint function (``SharedBase.checkpoint``, given to diffusers' ``enable_gradient_checkpointing``) notes the
adapter, train/eval mode and attention kernels of the pass that saved the unit and recomputes it with those.

Under FSDP2 (``distill.fsdp``) the base is sharded once (``SharedBase.shard``: its blocks, then the whole), adapters
and all, since they live inside its modules; each view then re-reads its adapter's parameters, now the sharded ones,
so each role's optimizer holds only its own adapter's shards. Compiling the views is refused with this mode.
"""

from __future__ import annotations

import contextlib
import re
import warnings

from torch import nn

from fdistill.networks import attention

LORA_PARAM = re.compile(r"\.(lora_[AB])\.([^.]+)\.")  # peft's parameter names: <layer>.lora_A.<adapter>.weight


def view_key(name: str) -> str:
    """An adapter parameter's key in its view (``...to_q.lora_A.generator.weight`` -> ``...to_q:lora_A:weight``):
    the same for every adapter, so views of different adapters load each other's weights."""
    return LORA_PARAM.sub(r".\1.", name).replace(".", ":")


def lora_state_dict(view_state: dict, adapter: str = "default") -> dict:
    """A view's state dict as the keys of the same network with one peft adapter named ``adapter``."""
    out = {}
    for key, value in view_state.items():
        name = key.removeprefix("lora.").replace(":", ".")
        out[re.sub(r"\.(lora_[AB])\.", rf".\1.{adapter}.", name)] = value
    return out


class SharedBase:
    """A denoiser whose diffusers ``backbone`` carries several peft LoRA adapters, one active per pass.

    ``add_lora(denoiser, rank, name)`` adds an adapter named ``name``. The base weights are frozen; each
    adapter's ``requires_grad`` is its view's business (peft's own switching would reset it, so it is restored).
    """

    def __init__(self, denoiser: nn.Module, backbone: str, add_lora, rank: int) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser, self.rank, self._add_lora = denoiser, rank, add_lora
        self.backbone = getattr(denoiser, backbone)
        denoiser.requires_grad_(False)
        self._tuner_layer = BaseTunerLayer
        self.active: str | None = None  # None: the teacher (every adapter off)
        self.layers: list = []  # peft's tuner layers
        self.views: list[AdapterView] = []  # the roles made by ``add`` and ``teacher``
        self.sharded = False

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{view_key: parameter}`` of adapter ``name``, in the network's order."""
        out = {}
        for full, p in self.denoiser.named_parameters():
            m = LORA_PARAM.search(full)
            if m and m.group(2) == name:
                out[view_key(full)] = p
        return out

    def add(self, name: str, like: str | None = None) -> AdapterView:
        """Adapter ``name`` (its weights copied from adapter ``like`` when given) and its view."""
        self._unsharded()
        flags = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self._add_lora(self.denoiser, self.rank, name)  # peft activates it and resets requires_grad
        for p, flag in flags:
            p.requires_grad_(flag)
        self.layers = [m for m in self.backbone.modules() if isinstance(m, self._tuner_layer)]
        self.active = "?"  # peft switched it: the next pass sets it again
        view = self._view(name)
        if like is not None:
            view.load_state_dict(AdapterView(self, like).state_dict())
        return view

    def teacher(self) -> AdapterView:
        """The base network itself (every adapter off)."""
        self._unsharded()
        return self._view(None)

    def _unsharded(self) -> None:
        if self.sharded:
            raise RuntimeError("the shared base is sharded: make every role (and the EMA's adapter) before sharding")

    def _view(self, name: str | None) -> AdapterView:
        view = AdapterView(self, name)
        self.views.append(view)
        return view

    def shard(self, shard_fn) -> None:
        """Shard the base once, adapters included (``shard_fn``: ``training.distributed.shard``, FSDP2's
        ``fully_shard`` of its blocks, then of the whole); the views then hold their adapters' sharded parameters
        (``fully_shard`` replaces each parameter by a new one, a DTensor of this rank's shard). Every rank must make
        the same passes through the base from then on (FSDP's collectives), as the distiller's steps do."""
        if self.sharded:
            return
        shard_fn(self.denoiser)
        self.sharded = True
        for view in self.views:
            view.reread()

    def _lora(self) -> list[nn.Parameter]:
        """The adapters' parameters the tuner layers now hold (under FSDP: sharded between passes, the gathered ones
        within a unit's pass or its recomputation)."""
        return [p for layer in self.layers for d in (layer.lora_A, layer.lora_B) for p in d.parameters()]

    def activate(self, name: str | None, training: bool) -> None:
        """Make adapter ``name`` (None: none) the one the next pass uses, in train or eval mode."""
        if self.denoiser.training != training:
            self.denoiser.train(training)
        if name == self.active:
            return
        lora = self._lora()
        flags = [p.requires_grad for p in lora]
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        for p, flag in zip(lora, flags):
            p.requires_grad_(flag)
        self.active = name

    def checkpoint(self, module: nn.Module, *args, **kwargs):
        """diffusers' ``gradient_checkpointing_func`` for the shared network: ``networks.attention.checkpoint`` (whose
        recomputation in backward runs on the attention kernels of the forward: exact R1's math kernel), recomputed
        with the adapter and train/eval mode that were in force when the unit ran forward."""
        state = (self.active, self.denoiser.training)
        return attention.checkpoint(module, *args, context=lambda: self._restored(state), **kwargs)

    @contextlib.contextmanager
    def _restored(self, state):
        """The base as it was in ``state`` for the block (a no-op in the forward itself); switched back afterwards."""
        adapter, training = state
        now = (self.active, self.denoiser.training)
        switch = (adapter, training) != now and adapter != "?"
        if switch:
            self.activate(adapter, training)
        try:
            yield
        finally:
            if switch and now[0] != "?":
                self.activate(*now)


_sdpa_backends, _sdpa_kernels = attention.sdpa_backends, attention.sdpa_kernels  # their former names here


class AdapterView(nn.Module):
    """One role on a ``SharedBase``: the base with adapter ``adapter`` active (None: the teacher, no adapter).
    It registers only that adapter's parameters (``lora``), not the base, so ``parameters()``, ``state_dict()``
    and ``to()`` concern the adapter alone; every other attribute is the base denoiser's."""

    def __init__(self, shared: SharedBase, adapter: str | None) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # a plain attribute: the base is not a submodule
        self.adapter = adapter
        self.reread()

    def reread(self) -> None:
        """Hold the adapter's parameters the base holds now (after sharding replaced them)."""
        self.lora = nn.ParameterDict(self.shared.adapter_params(self.adapter) if self.adapter is not None else {})

    def forward(self, *args, **kwargs):
        self.shared.activate(self.adapter, self.training)
        return self.shared.denoiser(*args, **kwargs)

    def features(self, *args, **kwargs):
        self.shared.activate(self.adapter, self.training)
        return self.shared.denoiser.features(*args, **kwargs)

    def ema_copy(self) -> AdapterView:
        """A frozen sibling adapter holding a copy of this one's weights, for the EMA (``training.ema``)."""
        return self.shared.add(f"{self.adapter}_ema", like=self.adapter).eval().requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "shared":
                raise
            return getattr(self.shared.denoiser, name)
