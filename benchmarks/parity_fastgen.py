r"""Step-level numerical parity of fdistill's Algorithm 1 with NVlabs/FastGen's own f-distill (CIFAR-10).

    python benchmarks/parity_fastgen.py --fastgen /work/fastgen --python /work/fastgen-venv/bin/python
    python benchmarks/parity_fastgen.py --fastgen /work/fastgen --python /work/fastgen-venv/bin/python \
        --batch 16 --channels 16 --iterations 10 --ema-beta 0.5

What it does (docs/parity.md has the table this printed and the name mapping):

1. A FastGen worker process (FastGen's own environment, --python; built as benchmarks/compare_fastgen.py
   describes, with the same in-memory torchvision stub, WANDB_MODE=disabled and HF_HUB_OFFLINE=1) builds
   ``FdistillModel`` from FastGen's CIFAR-10 f-distill experiment config
   (``fastgen/configs/experiments/EDM/config_f_distill_cifar10.py``: forward KL, 3 discriminator heads at
   32/16/8, student_update_freq 5, grad clip 10, AdamW, ratio bins) at a tiny width (``model_channels``
   --channels, FastGen's other network settings kept: 4 blocks per resolution, attention at 16), on the
   CPU in fp32, with random weights (``pretrained_model_path`` empty: nothing is read or downloaded).
   Teacher, generator and fake score get independent random weights (each perturbed by N(0, 0.02^2) so that
   EDM's zero-initialised output layers do something), so the VSD gradient is not zero at the first step.
2. The worker runs, with FastGen's own code and its own random draws (recorded by wrapping ``torch.randn``,
   ``torch.randn_like`` and the network's ``noise_scheduler.sample_t``):
   - one student step (iteration 5) and one critic step (iteration 1) from the same initial weights, each
     exactly as ``fastgen.trainer.Trainer.train_step`` runs it (``single_train_step``, backward,
     ``GradClipCallback``, optimizer and LR-scheduler step), recording G(z), the heads' logits, r,
     r_bar (the input of FastGen's weighting function), h_bar (``_get_f_div_weighting_h``), the losses, the
     gradients (before and after clipping) and the weights after the step;
   - --iterations iterations of the whole loop from iteration 1 (critic first; student when
     iteration % 5 == 0), with the EMA callback after every iteration (the first EMA's beta set to
     --ema-beta so that k iterations move it measurably), recording every draw, loss and the final weights.
   Everything goes to one ``torch.save`` file.
3. This process (fdistill's environment) builds ``fdistill.training.distiller.Distiller`` with identical
   weights (the name mapping below), ``DistillConfig`` switched to FastGen's settings (``FASTGEN_SETTINGS``),
   feeds it FastGen's draws (``Distiller._randn`` / ``_sigma`` / ``sample_cond`` / ``real_data`` replaced
   per step by the recorded tensors) and prints, per quantity, the largest absolute difference and the
   relative one (largest absolute difference / largest |FastGen value|). A row is "equal (rounding)" at a
   relative difference of at most 1e-5; "equal (at the fp32 floor)" when it is within 4 times the "fp32 floor",
   the relative change of the same quantity on our side alone when every t moves by one float32 ulp (FastGen
   keeps t in float64, we in float32): quantities that rounding moves by more than 1e-5 (AdamW updates of
   gradient entries near its eps, the discriminator gradient through FastGen's GroupNorm on 1x1 maps).
   ``--reuse-dump`` compares an existing ``--dump`` again without running FastGen.

Name mapping (FastGen -> fdistill): EDM networks keep NVlabs/edm's module tree on both sides
(``model.enc.32x32_conv.weight`` ... the same names), minus FastGen's ``model.logvar_linear.*`` (unused by
f-distill) and the generator's ``bins`` buffer (the ratio-bin means, ``RatioNormalizer.bin_mean`` here);
discriminator ``discriminator_heads.{i}.{layer}`` -> ``heads.{r}.net.{layer}`` with r = [32, 16, 8][i].
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_fastgen import build_fastgen_cifar10, fastgen_commit  # noqa: E402

RES = [32, 16, 8]  # FastGen's Discriminator_EDM_CIFAR10_Config all_res, feature_indices {0, 1, 2}
TOL = 1e-5  # "equal to float rounding" in fp32
PERTURB = 0.02  # std of the noise added to every random UNet weight


# -- FastGen worker ------------------------------------------------------------------------------------------
def _clone_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _grads(module: torch.nn.Module) -> dict:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


class _Recorder:
    """Records FastGen's random draws (torch.randn, torch.randn_like, noise_scheduler.sample_t) in order."""

    def __init__(self, scheduler):
        self.scheduler, self.draws, self.active = scheduler, [], False
        self._randn, self._randn_like, self._sample_t = torch.randn, torch.randn_like, scheduler.sample_t
        rec = self

        def randn(*a, **k):
            out = rec._randn(*a, **k)
            if rec.active:
                rec.draws.append(("randn", out.detach().clone()))
            return out

        def randn_like(*a, **k):
            out = rec._randn_like(*a, **k)
            if rec.active:
                rec.draws.append(("randn_like", out.detach().clone()))
            return out

        def sample_t(*a, **k):
            out = rec._sample_t(*a, **k)
            if rec.active:
                rec.draws.append(("sample_t", out.detach().clone()))
            return out

        torch.randn, torch.randn_like, scheduler.sample_t = randn, randn_like, sample_t

    @contextlib.contextmanager
    def record(self):
        self.draws, self.active = [], True
        try:
            yield self.draws
        finally:
            self.active = False


def fastgen_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    uses: list = []
    phase = ["import"]

    def tiny(config) -> None:  # width --channels, and the first EMA at --ema-beta
        config.model.net.model_channels = args.channels
        config.model.discriminator.in_channels = args.channels * max(config.model.net.channel_mult)  # 256 at 128
        config.trainer.callbacks[config.model.use_ema[0]].beta = args.ema_beta

    config, model, trainer, _ = build_fastgen_cifar10(args.fastgen, args.batch, args.seed, uses, phase, tiny)
    from omegaconf import OmegaConf

    cb, m = trainer.callbacks, config.model
    first_ema = m.use_ema[0]

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # independent random weights, none of them near zero
        for net in (model.teacher, model.net, model.fake_score):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * PERTURB)
        for name in model.use_ema:
            getattr(model, name).load_state_dict(model.net.state_dict(), strict=False)  # as _setup_ema
    nets = {"teacher": model.teacher, "net": model.net, "fake_score": model.fake_score,
            "discriminator": model.discriminator, "ema": getattr(model, first_ema)}
    init = {k: _clone_state(v) for k, v in nets.items()}

    def reset() -> None:
        for k, v in nets.items():
            v.load_state_dict(init[k])
        for mod in (model.net, model.fake_score, model.discriminator):  # as built (get_optimizer keeps these)
            mod.train().requires_grad_(True)
        model.init_optimizers()  # fresh AdamW moments and LR schedulers

    sched = model.net.noise_scheduler
    rec = _Recorder(sched)
    seen = {"logits": [], "r_bar": [], "h_bar": [], "features": []}

    def disc_rec(mod, inp, out):
        seen["logits"].append(out.detach().clone())
        seen["features"].append([f.detach().clone() for f in inp[0]])

    model.discriminator.register_forward_hook(disc_rec)
    weighting, get_h = model.f_div_weighting_function, model._get_f_div_weighting_h

    def weighting_rec(r):
        seen["r_bar"].append(r.detach().clone())
        return weighting(r)

    def get_h_rec(logits, t):
        h = get_h(logits, t)
        seen["h_bar"].append(h.detach().clone())
        return h

    model.f_div_weighting_function, model._get_f_div_weighting_h = weighting_rec, get_h_rec

    def batch() -> dict:
        labels = torch.eye(10)[torch.randint(10, (args.batch,), generator=gen)]
        real = torch.rand(args.batch, 3, 32, 32, generator=gen) * 2 - 1
        return {"real": real, "condition": labels, "neg_condition": torch.zeros_like(labels)}

    def iteration(it: int, data: dict, ema: bool) -> dict:
        """Trainer.run's loop body for one iteration (grad_accum_rounds 1), with what it computes recorded."""
        for v in seen.values():
            v.clear()
        student = it % m.student_update_freq == 0
        cb.on_training_step_begin(model, iteration=it)
        data = trainer.preprocess_data(model, data, None)
        cb.on_training_accum_step_begin(model, data, iteration=it, accum_iter=0)
        with rec.record() as draws, model.autocast():
            loss_map, outputs = model.single_train_step(data, it)
        model.grad_scaler.scale(loss_map["total_loss"]).backward()
        trained = [model.net] if student else [model.fake_score, model.discriminator]
        raw = [_grads(mod) for mod in trained]
        cb.on_optimizer_step_begin(model=model, iteration=it)  # GradClipCallback (the generator's gradients)
        clipped = _grads(model.net) if student else None
        model.optimizers_schedulers_step(it)
        model.optimizers_zero_grad(it)
        if ema:
            cb.on_training_step_end(model=model, data_batch=data, output_batch=outputs, loss_dict=loss_map,
                                    iteration=it)
        out = {"it": it, "kind": "student" if student else "critic",
               "draws": draws, "real": data["real"].clone(), "labels": data["condition"].clone(),
               "loss": {k: float(v.detach()) for k, v in loss_map.items()},
               "gen": outputs["gen_rand"].detach().clone(), "logits": list(seen["logits"])}
        if not ema:  # the heads' inputs, for the per-step rows
            out["features"] = list(seen["features"])
        if student:
            logits = seen["logits"][0].float()
            r = torch.clamp(torch.exp(torch.clamp(logits.mean(dim=1), -10.0, 10.0)),
                            m.f_distill.ratio_lower, m.f_distill.ratio_upper)  # FastGen's r, before the bins
            out.update(r=r, r_bar=seen["r_bar"][0], h_bar=seen["h_bar"][0], grad_raw=raw[0], grad_clipped=clipped,
                       after={"net": _clone_state(model.net)})
        else:
            out.update(grad_fake=raw[0], grad_disc=raw[1],
                       after={"fake_score": _clone_state(model.fake_score),
                              "discriminator": _clone_state(model.discriminator)})
        return out

    phase[0] = "steps"
    torch.manual_seed(args.seed + 1)
    student = iteration(m.student_update_freq, batch(), ema=False)
    reset()
    critic = iteration(1, batch(), ema=False)
    reset()
    torch.manual_seed(args.seed + 2)
    loop = [iteration(it, batch(), ema=True) for it in range(1, args.iterations + 1)]
    final = {k: _clone_state(nets[k]) for k in ("net", "ema", "fake_score", "discriminator")}

    # FastGen's approximate R1 on the critic step's inputs (off in its configs: gan_r1_reg_weight 0).
    reset()
    t_real, eps_real = critic["draws"][3][1], critic["draws"][4][1]
    real_t = sched.forward_process(critic["real"], eps_real, t_real)
    with torch.no_grad():
        feat = model.teacher(real_t, t_real, condition=critic["labels"], return_features_early=True,
                             feature_indices=model.discriminator.feature_indices)
        logit_real = model.discriminator(feat)
        torch.manual_seed(args.seed + 3)
        with rec.record() as r1_draws:
            ar1 = model._compute_r1_regularization(logit_real, critic["real"], t_real, condition=critic["labels"])

    net_cfg = OmegaConf.to_container(m.net)
    dump = {
        "facts": {"torch": torch.__version__,
                  "f_div": m.f_distill.f_div, "bin_num": int(m.f_distill.bin_num),
                  "ratio_ema_rate": float(m.f_distill.ratio_ema_rate),
                  "ratio_range": [float(m.f_distill.ratio_lower), float(m.f_distill.ratio_upper)],
                  "gan_loss_weight_gen": float(m.gan_loss_weight_gen),
                  "student_update_freq": int(m.student_update_freq),
                  "gan_r1_reg_weight": float(m.gan_r1_reg_weight), "gan_r1_reg_alpha": float(m.gan_r1_reg_alpha),
                  "gan_use_same_t_noise": bool(m.gan_use_same_t_noise),
                  "fake_score_pred_type": m.fake_score_pred_type or model.teacher.net_pred_type,
                  "guidance_scale": m.guidance_scale, "time_dist": m.sample_t_cfg.time_dist_type,
                  "sample_t_range": [float(m.sample_t_cfg.min_t), float(m.sample_t_cfg.max_t)],
                  "scheduler_t": [float(sched.min_t), float(sched.max_t)], "t_dtype": str(sched.t_precision),
                  "steps": [sched._min_step, sched._max_step],
                  "optimizer": {k: v for k, v in OmegaConf.to_container(m.net_optimizer).items()
                                if k not in ("_target_", "model")},
                  "grad_clip": float(config.trainer.callbacks.grad_clip.grad_norm),
                  "emas": list(m.use_ema), "ema_betas": {k: float(config.trainer.callbacks[k].beta)
                                                          for k in m.use_ema},
                  "in_res": list(model.discriminator.in_res), "disc_in_channels": int(model.discriminator.in_channels),
                  "net": {k: v for k, v in net_cfg.items() if k != "_target_"},
                  "batch": args.batch, "torchvision_step_uses": [u for p, u in uses if p == "steps"]},
        "sigmas": sched.sigmas.clone(), "init": init, "student": student, "critic": critic, "loop": loop,
        "final": final, "r1": {"value": float(ar1), "draws": r1_draws, "t_real": t_real, "eps_real": eps_real},
    }
    torch.save(dump, args.dump)


# -- our side ------------------------------------------------------------------------------------------------
FASTGEN_SETTINGS = dict(  # DistillConfig values that make Alg. 1 compute what FastGen's CIFAR-10 config does
    divergence="forward_kl", tau=5, gan_weight=1e-3, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01,
    grad_clip=10.0, r1_gamma=0.0, logit_clip=10.0, r_min=0.1, r_max=20.0, ratio_bins=10, ratio_binning="linear",
    ratio_ema=0.0, fake_score_weighting="none", ema_cadence="iteration", gan_loss_heads="per_head",
    precision="fp32", micro_batch=None, channels_last=False, compile=False, tf32=False,
)


def edm_state(fg: dict) -> dict:
    """FastGen EDMPrecond state dict -> fdistill/NVlabs-edm names (the same tree; FastGen's extras dropped)."""
    return {k: v for k, v in fg.items() if not k.startswith("model.logvar_linear.") and k != "bins"}


def disc_state(fg: dict, in_res: list[int]) -> dict:
    """``discriminator_heads.{i}.{layer}`` -> ``heads.{in_res[i]}.net.{layer}``."""
    out = {}
    for k, v in fg.items():
        _, i, rest = k.split(".", 2)
        out[f"heads.{in_res[int(i)]}.net.{rest}"] = v
    return out


def ours_name(fg_param: str, kind: str, in_res: list[int]) -> str | None:
    if kind == "disc":
        _, i, rest = fg_param.split(".", 2)
        return f"heads.{in_res[int(i)]}.net.{rest}"
    return None if fg_param.startswith("model.logvar_linear.") else fg_param


class Ours:
    """fdistill's Distiller with FastGen's weights, fed FastGen's draws."""

    def __init__(self, dump: dict, **overrides):
        from fdistill.networks.edm import EDMPrecond
        from fdistill.networks.heads import Discriminator
        from fdistill.training.distiller import DistillConfig, Distiller

        f = dump["facts"]
        self.in_res, self.dump = f["in_res"], dump
        keep = ("img_resolution", "img_channels", "label_dim", "sigma_data", "model_type", "augment_dim",
                "model_channels", "channel_mult", "channel_mult_noise", "embedding_type", "encoder_type",
                "decoder_type", "resample_filter", "dropout", "label_dropout")
        kwargs = {k: f["net"][k] for k in keep}
        kwargs.update(num_blocks=4, attn_resolutions=[16])  # FastGen's SongUNet defaults (its config omits them)

        def net(state):
            n = EDMPrecond(**kwargs)
            n.load_state_dict(edm_state(state), strict=True)
            n.feature_resolutions = RES
            return n

        init = dump["init"]
        teacher, generator, fake_score = net(init["teacher"]), net(init["net"]), net(init["fake_score"])
        channels = generator.feature_channels()
        disc = Discriminator.conv({r: channels[r] for r in RES}, head="fastgen")
        disc.load_state_dict(disc_state(init["discriminator"], self.in_res), strict=True)
        settings = dict(FASTGEN_SETTINGS, batch_size=f["batch"], ema_beta=f["ema_betas"][f["emas"][0]])
        settings.update(overrides)
        fused = settings.pop("fused_adam", True)
        self.t_ulp = settings.pop("t_ulp", False)  # every t one float32 ulp up: the floor of the comparison
        cfg = DistillConfig(**settings)
        self.feed: dict = {}
        self.d = d = Distiller(cfg, teacher, generator, fake_score, disc, real_data=lambda n, part: self.feed["real"],
                               sample_shape=(3, 32, 32), sample_cond=lambda n, part: self.feed["labels"], device="cpu")
        d._randn = lambda: self.feed["randn"].pop(0)
        d._sigma = lambda: self.feed["sigma"].pop(0)
        self.seen: dict = {}
        import fdistill.training.distiller as distiller_module

        self._module = distiller_module
        head_logits = disc.head_logits

        def head_logits_rec(features):
            out = head_logits(features)
            self.seen.setdefault("logits", []).append(out.detach().clone())
            return out

        disc.head_logits = head_logits_rec
        if not fused:  # torch's single-tensor AdamW, FastGen's (fused=False); ours is the fused kernel
            def adamw(params):
                return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

            d.opt_g, d.opt_fake = adamw(d.gen_params), adamw(d.fake_score.parameters())
            d.opt_d = adamw(d.discriminator.parameters())
        for name, opt in (("generator", d.opt_g), ("fake_score", d.opt_fake), ("discriminator", d.opt_d)):
            module = {"generator": d.generator, "fake_score": d.fake_score, "discriminator": d.discriminator}[name]
            step = opt.step

            def recorded(*a, _step=step, _name=name, _module=module, **k):
                self.seen[f"grad_{_name}"] = _grads(_module)
                return _step(*a, **k)

            opt.step = recorded

    def load_draws(self, record: dict) -> None:
        """FastGen's draws of one iteration as our step consumes them (Distiller.student_step / critic_step)."""
        draws = record["draws"]
        kinds = [k for k, _ in draws]
        if record["kind"] == "student":  # randn z, sample_t t, randn_like eps
            assert kinds == ["randn", "sample_t", "randn_like"], kinds
            z, t, eps = (v for _, v in draws)
            self.feed.update(randn=[z, eps], sigma=[self._t(t)])
        else:  # + sample_t t_real, randn_like eps_real; the fake score's DSM uses the fake sample's eps
            assert kinds == ["randn", "sample_t", "randn_like", "sample_t", "randn_like"], kinds
            z, t, eps, t_real, eps_real = (v for _, v in draws)
            self.feed.update(randn=[z, eps, eps, eps_real], sigma=[self._t(t), self._t(t_real)])
        self.feed.update(real=(record["real"], record["labels"]), labels=record["labels"])

    def _t(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return torch.nextafter(t, torch.full_like(t, float("inf"))) if self.t_ulp else t

    def run(self, record: dict, step: bool = False) -> dict:
        """Our student or critic step on FastGen's inputs (``step``: through Distiller.step, EMA included)."""
        self.load_draws(record)
        self.seen = {}
        weights, clip = self._module.fdistill_weights, torch.nn.utils.clip_grad_norm_

        def weights_rec(*a, **k):
            w = weights(*a, **k)
            self.seen["w"] = w
            return w

        def clip_rec(params, *a, **k):
            params = list(params)
            self.seen["grad_raw"] = _grads(self.d.generator)
            return clip(params, *a, **k)

        self._module.fdistill_weights, torch.nn.utils.clip_grad_norm_ = weights_rec, clip_rec
        try:
            if step:
                self.d.iteration = record["it"]
                logs = self.d.step()
                assert logs["kind"] == record["kind"], (logs["kind"], record["kind"])
            else:
                logs = self.d.student_step() if record["kind"] == "student" else self.d.critic_step()
        finally:
            self._module.fdistill_weights, torch.nn.utils.clip_grad_norm_ = weights, clip
        assert not self.feed["randn"] and not self.feed["sigma"], "our step drew a different number of tensors"
        return {"logs": logs, **self.seen}


# -- comparison ----------------------------------------------------------------------------------------------
def diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float, int]:
    a, b = torch.as_tensor(ours).double().flatten(), torch.as_tensor(theirs).double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {tuple(a.shape)}, FastGen {tuple(b.shape)}")
    d = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return d, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")), a.numel()


def flat(state: dict, fg_names: list[str], kind: str, in_res: list[int], ours: bool) -> torch.Tensor:
    """Parameters in FastGen's order, flattened; ``ours`` reads our state under the mapped names."""
    parts = []
    for n in fg_names:
        name = ours_name(n, kind, in_res)
        if name is None:
            continue
        parts.append((state[name] if ours else state[n]).flatten())
    return torch.cat(parts)


def moved(after: dict, names: list[str], kind: str, in_res: list[int], ours: bool, before_fg: dict) -> torch.Tensor:
    """Weights after minus the common initial weights (FastGen's names), flattened."""
    return flat(after, names, kind, in_res, ours) - flat(before_fg, names, kind, in_res, False)


class Table:
    """Rows of (quantity, numel, max abs diff, max rel diff, floor, status, note). ``floor``: the relative change of
    the same quantity on our side under a rounding-only change (see each row's note); a row is "equal" when its
    relative difference is at most TOL, or at most FLOOR_FACTOR times its floor."""

    def __init__(self):
        self.rows: list[tuple] = []

    def add(self, what: str, ours, theirs, note: str = "", expect_differ: bool = False,
            floor: float | None = None) -> float:
        d, rel, n = diff(ours, theirs)
        if rel <= TOL:
            status = "equal (rounding)"
        elif floor is not None and rel <= FLOOR_FACTOR * floor:
            status = "equal (at the fp32 floor)"
        else:
            status = "differs (documented)" if expect_differ else "DIFFERS"
        self.rows.append((what, n, d, rel, floor, status, note))
        return rel

    def text(self, title: str) -> str:
        lines = [f"\n{title}\n", "| quantity | numel | max abs diff | max rel diff | fp32 floor | status | note |",
                 "|---|---|---|---|---|---|---|"]
        for what, n, d, rel, floor, status, note in self.rows:
            fl = "" if floor is None else f"{floor:.1e}"
            lines.append(f"| {what} | {n} | {d:.2e} | {rel:.2e} | {fl} | {status} | {note} |")
        return "\n".join(lines)


FLOOR_FACTOR = 4  # "at the floor": within this factor of the same quantity's change under a rounding-only change


def _features(ours: Ours, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor) -> dict:
    with torch.no_grad():
        return ours.d.teacher.features(x + sigma.float().reshape(-1, 1, 1, 1) * eps, sigma.float(), labels)


def _head_logits(disc, feats: dict) -> torch.Tensor:
    return type(disc).head_logits(disc, feats)  # the class's method: Ours records the instance's calls


def ours_values(dump: dict, **overrides) -> dict:
    """Every compared quantity on our side, FastGen's inputs fed in (``fastgen_values`` has FastGen's)."""
    from fdistill.core.objective import gan_discriminator_loss

    f, init, st, cr = dump["facts"], dump["init"], dump["student"], dump["critic"]
    in_res = f["in_res"]
    g_names, f_names, d_names = list(st["grad_raw"]), list(cr["grad_fake"]), list(cr["grad_disc"])
    col = [sorted(RES).index(r) for r in in_res]  # our head columns (increasing resolution) in FastGen's order
    v = {}

    def update(state, names, kind, start):
        return moved(state, names, kind, in_res, True, init[start])

    ours = Ours(dump, **overrides)  # one student step
    with torch.no_grad():
        v["s.gen"] = ours.d.generate(st["draws"][0][1], st["labels"])
    o = ours.run(st)
    w = o["w"]
    v.update({"s.logits": o["logits"][0][:, col], "s.r": w.r, "s.r_bar": w.r_bar, "s.h_bar": w.h_bar,
              "s.vsd": o["logs"]["loss_fdistill"], "s.gan": o["logs"]["loss_gan_g"],
              "s.grad": flat(o["grad_raw"], g_names, "edm", in_res, True),
              "s.grad_clip": flat(o["grad_generator"], g_names, "edm", in_res, True),
              "s.weights": flat(ours.d.generator.state_dict(), g_names, "edm", in_res, True),
              "s.update": update(ours.d.generator.state_dict(), g_names, "edm", "net")})
    big = torch.cat([st["grad_clipped"][n].flatten() for n in g_names]).abs() > BIG_GRAD
    v["s.update_big"] = v["s.update"][big]

    ours = Ours(dump, **overrides)  # one critic step
    with torch.no_grad():
        v["c.gen"] = ours.d.generate(cr["draws"][0][1], cr["labels"])
    o = ours.run(cr)
    v.update({"c.fake_loss": o["logs"]["loss_fake_score"],
              "c.fake_grad": flat(o["grad_fake_score"], f_names, "edm", in_res, True),
              "c.logits_real": o["logits"][1][:, col], "c.logits_fake": o["logits"][0][:, col],
              "c.disc_loss": o["logs"]["loss_gan_d"],
              "c.disc_grad": flat(o["grad_discriminator"], d_names, "disc", in_res, True),
              "c.fake_update": update(ours.d.fake_score.state_dict(), f_names, "edm", "fake_score"),
              "c.disc_update": update(ours.d.discriminator.state_dict(), d_names, "disc", "discriminator")})
    fake_big = torch.cat([cr["grad_fake"][n].flatten() for n in f_names]).abs() > BIG_GRAD
    disc_big = torch.cat([cr["grad_disc"][n].flatten() for n in d_names]).abs() > BIG_GRAD
    v["c.fake_update_big"], v["c.disc_update_big"] = v["c.fake_update"][fake_big], v["c.disc_update"][disc_big]
    # our discriminator's gradient on FastGen's own features (the heads alone)
    disc = Ours(dump, **overrides).d.discriminator
    real, fake = ({r: x for r, x in zip(in_res, feats)} for feats in cr["features"])
    gan_discriminator_loss(_head_logits(disc, real), _head_logits(disc, fake)).backward()
    v["c.disc_grad_fg_features"] = flat(_grads(disc), d_names, "disc", in_res, True)

    ours = Ours(dump, **overrides)  # k iterations of the loop
    losses = []
    for rec in dump["loop"]:
        o = ours.run(rec, step=True)
        keys = ("loss_fdistill", "loss_gan_g") if rec["kind"] == "student" else ("loss_fake_score", "loss_gan_d")
        losses += [o["logs"][k] for k in keys]
    d = ours.d
    v.update({"l.losses": torch.stack(losses), "l.generator": update(d.generator.state_dict(), g_names, "edm", "net"),
              "l.fake_score": update(d.fake_score.state_dict(), f_names, "edm", "fake_score"),
              "l.discriminator": update(d.discriminator.state_dict(), d_names, "disc", "discriminator"),
              "l.ema": update(d.generator_ema.state_dict(), g_names, "edm", "ema")})
    return v


def fastgen_values(dump: dict) -> dict:
    f, init, st, cr, final = dump["facts"], dump["init"], dump["student"], dump["critic"], dump["final"]
    in_res = f["in_res"]
    g_names, f_names, d_names = list(st["grad_raw"]), list(cr["grad_fake"]), list(cr["grad_disc"])

    def update(state, names, kind, start):
        return moved(state, names, kind, in_res, False, init[start])

    v = {"s.gen": st["gen"], "s.logits": st["logits"][0], "s.r": st["r"], "s.r_bar": st["r_bar"],
         "s.h_bar": st["h_bar"], "s.vsd": st["loss"]["f_distill_loss"], "s.gan": st["loss"]["gan_loss_gen"],
         "s.grad": flat(st["grad_raw"], g_names, "edm", in_res, False),
         "s.grad_clip": flat(st["grad_clipped"], g_names, "edm", in_res, False),
         "s.weights": flat(st["after"]["net"], g_names, "edm", in_res, False),
         "s.update": update(st["after"]["net"], g_names, "edm", "net"),
         "c.gen": cr["gen"], "c.fake_loss": cr["loss"]["fake_score_loss"],
         "c.fake_grad": flat(cr["grad_fake"], f_names, "edm", in_res, False),
         "c.logits_real": cr["logits"][0], "c.logits_fake": cr["logits"][1],  # FastGen's order: real, then fake
         "c.disc_loss": cr["loss"]["gan_loss_disc"],
         "c.disc_grad": flat(cr["grad_disc"], d_names, "disc", in_res, False),
         "c.fake_update": update(cr["after"]["fake_score"], f_names, "edm", "fake_score"),
         "c.disc_update": update(cr["after"]["discriminator"], d_names, "disc", "discriminator"),
         "l.generator": update(final["net"], g_names, "edm", "net"),
         "l.fake_score": update(final["fake_score"], f_names, "edm", "fake_score"),
         "l.discriminator": update(final["discriminator"], d_names, "disc", "discriminator"),
         "l.ema": update(final["ema"], g_names, "edm", "ema")}
    v["c.disc_grad_fg_features"] = v["c.disc_grad"]
    v["l.losses"] = torch.tensor([r["loss"][k] for r in dump["loop"] for k in (
        ("f_distill_loss", "gan_loss_gen") if r["kind"] == "student" else ("fake_score_loss", "gan_loss_disc"))])
    big = torch.cat([st["grad_clipped"][n].flatten() for n in g_names]).abs() > BIG_GRAD
    v["s.update_big"] = v["s.update"][big]
    fake_big = torch.cat([cr["grad_fake"][n].flatten() for n in f_names]).abs() > BIG_GRAD
    disc_big = torch.cat([cr["grad_disc"][n].flatten() for n in d_names]).abs() > BIG_GRAD
    v["c.fake_update_big"], v["c.disc_update_big"] = v["c.fake_update"][fake_big], v["c.disc_update"][disc_big]
    return v


BIG_GRAD = 1e-6  # gradient entries 100 x AdamW's eps: their first step lr g / (|g| + eps) is insensitive to rounding
ADAM_NOTE = ("AdamW's first step is lr g / (|g| + 1e-8): gradient entries near or below 1e-8 turn rounding-level "
             "gradient differences into O(lr) update differences")
ROWS = {
    "s": [("s.gen", "G(z) = D_G(80 z; 80), the generated batch", ""),
          ("s.logits", "heads' logits of the fake sample (B, 3)", ""),
          ("s.r", "r = clip(exp(clip(mean logit, 10)), 0.1, 20)", ""),
          ("s.r_bar", "r_bar (first-stage normalization, 10 equal-width bins)",
           "FastGen divides by count + 1e-6 and by bin mean + 1e-6"),
          ("s.h_bar", "h_bar = h(r_bar) / mean h (`_get_f_div_weighting_h`)", "FastGen divides by mean h + 1e-6"),
          ("s.vsd", "VSD / f-distill loss (Eq. 4)", ""),
          ("s.gan", "generator GAN loss (softplus per head, averaged)", ""),
          ("s.grad", "generator gradient (all parameters, before clipping)", ""),
          ("s.grad_clip", "generator gradient after clipping at 10", ""),
          ("s.weights", "generator weights after the AdamW step", ""),
          ("s.update", "generator update (weights after minus before)", ADAM_NOTE),
          ("s.update_big", f"the update, entries whose gradient exceeds {BIG_GRAD:g}", "")],
    "c": [("c.gen", "G(z), the generated batch (no grad)", ""),
          ("c.fake_loss", "fake-score loss (plain x0 MSE, the fake sample's t and eps)", ""),
          ("c.fake_grad", "fake-score gradient (all parameters)", ""),
          ("c.logits_real", "heads' logits, real (B, 3)", ""),
          ("c.logits_fake", "heads' logits, fake (B, 3)", ""),
          ("c.disc_loss", "discriminator loss (softplus per head, averaged)", ""),
          ("c.disc_grad", "discriminator gradient (all parameters)",
           "rounding of the heads' inputs, amplified by GroupNorm over 4 channels of a 1x1 map (next row)"),
          ("c.disc_grad_fg_features", "our discriminator's gradient on FastGen's own features", ""),
          ("c.fake_update", "fake-score update", ADAM_NOTE),
          ("c.fake_update_big", f"the fake-score update, entries whose gradient exceeds {BIG_GRAD:g}", ""),
          ("c.disc_update", "discriminator update", ADAM_NOTE),
          ("c.disc_update_big", f"the discriminator update, entries whose gradient exceeds {BIG_GRAD:g}", "")],
    "l": [("l.losses", "every loss of the k iterations (2 per iteration)", ""),
          ("l.generator", "generator after k iterations, minus initial", ""),
          ("l.fake_score", "fake score after k iterations, minus initial", ""),
          ("l.discriminator", "discriminator after k iterations, minus initial", ""),
          ("l.ema", "generator EMA (ema_cadence iteration) after k iterations, minus initial", "")],
}


def compare(dump: dict) -> str:
    f, st, cr, loop = dump["facts"], dump["student"], dump["critic"], dump["loop"]
    ours, theirs = ours_values(dump), fastgen_values(dump)
    floor = ours_values(dump, t_ulp=True)  # every t one float32 ulp up: FastGen keeps t in float64, we in float32
    k = len(loop)
    titles = {"s": f"One student step (FastGen iteration {st['it']}), batch {f['batch']}",
              "c": f"One critic step (FastGen iteration {cr['it']}), R1 off (FastGen's gan_r1_reg_weight 0)",
              "l": f"{k} iterations of the whole loop from FastGen's iteration 1 "
                   f"({''.join('S' if r['kind'] == 'student' else 'c' for r in loop)}: c critic, S student), "
                   f"EMA beta {f['ema_betas'][f['emas'][0]]} on both sides"}
    out = []
    for section, rows in ROWS.items():
        t = Table()
        for key, label, note in rows:
            t.add(label.replace("k iterations", f"{k} iterations"), ours[key], theirs[key], note,
                  floor=diff(floor[key], ours[key])[1])
        if section == "s":
            names = list(st["grad_clipped"])
            ps = [dump["init"]["net"][n].clone().requires_grad_(True) for n in names]
            opt = torch.optim.AdamW(ps, lr=FASTGEN_SETTINGS["lr"], betas=FASTGEN_SETTINGS["betas"],
                                    weight_decay=FASTGEN_SETTINGS["weight_decay"], fused=True)
            for p, n in zip(ps, names):
                p.grad = st["grad_clipped"][n].clone()
            opt.step()
            step = torch.cat([(p.detach() - dump["init"]["net"][n]).flatten() for p, n in zip(ps, names)])
            t.add("our fused AdamW on FastGen's own clipped gradients: the update", step, theirs["s.update"],
                  "1 float32 ulp of a weight is ~3e-4 of a 1e-4 step; torch's single-tensor AdamW (FastGen's "
                  "fused=False) gives FastGen's update bit for bit", expect_differ=True)
        if section == "l":
            o = ours_values(dump, ema_cadence="student")
            t.add("the same EMA with ema_cadence student", o["l.ema"], theirs["l.ema"],
                  "the EMA moves after student steps only (ema_cadence: iteration removes it)", expect_differ=True)
        out.append(t.text(titles[section]))

    t = Table()  # what our other settings change
    o = Ours(dump, gan_loss_heads="mean_logit").run(st)
    t.add("generator GAN loss with gan_loss_heads mean_logit", o["logs"]["loss_gan_g"], st["loss"]["gan_loss_gen"],
          "softplus of the heads' mean logit (gan_loss_heads: per_head removes it)", expect_differ=True)
    o = Ours(dump, fake_score_weighting="edm").run(cr)
    t.add("fake-score loss with fake_score_weighting edm", o["logs"]["loss_fake_score"],
          cr["loss"]["fake_score_loss"], "EDM's lambda(sigma) weighting (fake_score_weighting: none removes it)",
          expect_differ=True)
    o = Ours(dump, ratio_binning="equal_mass").run(st)
    t.add("r_bar with ratio_binning equal_mass", o["w"].r_bar, st["r_bar"],
          "bins of equal mass in log sigma (ratio_binning: linear removes it)", expect_differ=True)
    out.append(t.text("The same inputs with one of our other settings (each row: the setting that causes it)"))
    out.append(r1_text(dump))
    out.append(facts_text(dump))
    return "\n".join(out)


def _misbinned(dump: dict) -> torch.Tensor:
    """FastGen's support points (float64) that fdistill's ratio_binning linear puts in another bin than FastGen."""
    from fdistill.core.diffusion import SigmaSampler
    from fdistill.core.objective import RatioNormalizer

    f = dump["facts"]
    lo, hi = f["steps"]
    support = dump["sigmas"][lo:hi + 1]
    min_t, max_t = f["scheduler_t"]
    fg = ((support - min_t) / ((max_t - min_t) / f["bin_num"])).floor().long().clamp(0, f["bin_num"] - 1)
    sampler = SigmaSampler()
    grid = sampler.grid
    ours = RatioNormalizer(sampler.support, f["bin_num"], "linear", sigma_range=(float(grid.min()), float(grid.max()))
                           ).bin_index(support.float())
    return support[ours != fg]


def facts_text(dump: dict) -> str:
    """Differences found in FastGen's code that the step rows do not exercise (support of t, bin edges)."""
    from fdistill.core.diffusion import SigmaSampler

    f = dump["facts"]
    lo, hi = f["steps"]
    fg_support = dump["sigmas"][lo:hi + 1]  # FastGen: indices [2, 998] of its ascending grid
    ours = SigmaSampler()
    fg_set, our_set = set(fg_support.float().tolist()), set(ours.support.tolist())
    only_fg, only_ours = sorted(fg_set - our_set), sorted(our_set - fg_set)
    grid_rel = ((ours.grid.double().flip(0) - dump["sigmas"]).abs() / dump["sigmas"]).max().item()
    min_t, max_t = f["scheduler_t"]
    lines = [
        "\nFacts checked outside the steps\n",
        f"- t for the losses: FastGen draws {f['time_dist']} t = its ascending Karras grid at an index uniform in "
        f"[{lo}, {hi}] ({f['t_dtype']}); fdistill's SigmaSampler indexes its descending grid over "
        f"index_range {list(ours.index_range)}. Grids equal to {grid_rel:.1e} relative (float32 against float64). "
        f"Support points only FastGen draws: {[round(v, 5) for v in only_fg]}; only fdistill: "
        f"{[round(v, 5) for v in only_ours]}.",
        f"- ratio bins: of FastGen's {len(fg_support)} support points, {len(_misbinned(dump))} "
        f"({', '.join(f'{v:.3f}' for v in _misbinned(dump).tolist())}) fall in another bin under fdistill's "
        f"ratio_binning linear (equal width over the schedule [{ours.grid.min().item():.5f}, "
        f"{ours.grid.max().item():.3f}]) than under FastGen's (width ({max_t} - {min_t}) / {f['bin_num']} from "
        f"{min_t}).",
        f"- FastGen: torch {f['torch']}; torchvision stub used during the steps: "
        f"{f['torchvision_step_uses'] or 'nothing'}.",
    ]
    return "\n".join(lines)


def r1_text(dump: dict) -> str:
    """FastGen's approximate R1 (``DMD2Model._compute_r1_regularization``; off in its configs) against ours."""
    import torch.nn.functional as F

    f, cr, r1 = dump["facts"], dump["critic"], dump["r1"]
    alpha = f["gan_r1_reg_alpha"]
    (kind, n), = r1["draws"]
    assert kind == "randn_like", kind
    ours = Ours(dump)
    col = [sorted(RES).index(r) for r in f["in_res"]]
    disc = ours.d.discriminator
    with torch.no_grad():
        real_t = _features(ours, cr["real"], r1["t_real"], cr["labels"], r1["eps_real"])
        near = ours.d.teacher.features(cr["real"] + alpha * n, r1["t_real"].float(), cr["labels"])
        theirs_on_ours = F.mse_loss(type(disc).head_logits(disc, real_t)[:, col],
                                    type(disc).head_logits(disc, near)[:, col])
    t = Table()
    t.add("FastGen's approximate R1 term, mse over heads of D(x_t, t) - D(x_0 + 0.1 n, t), with our networks",
          theirs_on_ours, r1["value"], "the ingredients agree: the difference below is the definition")
    ours = Ours(dump, r1_gamma=1.0, r1_form="approx")
    ours.load_draws(cr)
    ours.feed["randn"].append(n)
    run = ours.run
    ours.load_draws = lambda rec: None  # keep the feed above (with the R1 noise)
    o = run(cr)
    t.add("our r1_form approx penalty on the same n (the `r1` log)", o["logs"]["r1"], r1["value"],
          "ours perturbs the noisy x_t (x_t + 0.1 n), uses the heads' mean logit and divides by 0.1^2; FastGen "
          "perturbs the clean x_0 and feeds it at t; no override (R1 is off in FastGen's configs, and here)",
          expect_differ=True)
    return t.text(f"Approximate R1 (FastGen gan_r1_reg_weight {f['gan_r1_reg_weight']}, alpha {alpha}: off in "
                  "its configs) on the critic step's real batch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fastgen", help="a local NVlabs/FastGen checkout (commit 34f30e8 checked)")
    p.add_argument("--python", help="a Python whose environment imports FastGen (benchmarks/compare_fastgen.py)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=16, help="model_channels of the tiny UNets (FastGen: 128)")
    p.add_argument("--iterations", type=int, default=10, help="iterations of the whole loop for the EMA rows")
    p.add_argument("--ema-beta", type=float, default=0.5,
                   help="EMA beta on both sides (FastGen's first EMA), so k iterations move it measurably")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fastgen-commit", help="the FastGen commit to print when --fastgen is not a git checkout")
    p.add_argument("--dump", help="the worker's torch.save file (default: a temporary folder)")
    p.add_argument("--reuse-dump", action="store_true", help="compare an existing --dump without running FastGen")
    p.add_argument("--worker", choices=["fastgen"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "fastgen":
        return fastgen_worker(args)
    if not args.fastgen or not args.python:
        p.error("--fastgen and --python are required")
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="parity_fastgen_")
    dump_path = args.dump or str(Path(tmp) / "fastgen.pt")
    log = Path(tmp) / "fastgen.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               FASTGEN_OUTPUT_ROOT=tmp)
    cmd = [args.python, str(Path(__file__).resolve()), "--worker", "fastgen", "--fastgen",
           str(Path(args.fastgen).resolve()), "--batch", str(args.batch), "--channels", str(args.channels),
           "--iterations", str(args.iterations), "--ema-beta", str(args.ema_beta), "--seed", str(args.seed),
           "--dump", dump_path]
    rc = 0
    if not (args.reuse_dump and args.dump and Path(args.dump).is_file()):
        print(f"FastGen worker log: {log}", flush=True)
        with log.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, env=env).returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        sys.exit(f"the FastGen worker failed (exit {rc}); the end of its log {log}:\n{tail}")
    dump = torch.load(dump_path, weights_only=False)
    f = dump["facts"]
    commit = fastgen_commit(args.fastgen)
    commit = args.fastgen_commit if commit.startswith("unknown") and args.fastgen_commit else commit[:12]
    print(f"NVlabs/FastGen {commit} config_f_distill_cifar10 (f_div {f['f_div']}) against "
          f"fdistill's Distiller with {', '.join(f'{k}={v}' for k, v in FASTGEN_SETTINGS.items())}; "
          f"SongUNet model_channels {args.channels} x {f['net']['channel_mult']}, 4 blocks, attention at 16, "
          f"3 heads at {f['in_res']} of width {f['disc_in_channels']}, batch {args.batch}, fp32, CPU, 1 thread, "
          f"torch {torch.__version__} (FastGen side {f['torch']}). Relative = max |ours - FastGen| / max |FastGen|; "
          f"equal means relative <= {TOL:g}.")
    print(compare(dump))


if __name__ == "__main__":
    main()
