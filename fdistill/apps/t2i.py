"""Text-to-image: Algorithm 1 with a Stable Diffusion v1.5 or SDXL teacher, in its VAE's latent space.

The trainer and objective are the image pipeline's, unchanged: the generator and fake score are copies of
the teacher's UNet, the discriminator a conv head on the frozen teacher's mid-block features (App. B),
the teacher is guided at a fixed scale (Table 5: SD1.5 1.75 or 5, SDXL 8) and the students are unguided.
Real data are captioned images (encoded online by the VAE and text encoders) or latent shards written
once by ``fdistill prepare-latents``; the generator's prompts come from a prompts file or the captions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill.core.diffusion import edm_sampler, one_step, seeded_noise
from fdistill.data.captions import CaptionSampler, open_captions
from fdistill.data.conditions import TextCondition
from fdistill.data.datasets import to_float, to_uint8
from fdistill.data.latent_shards import LatentSampler, LatentShards, LatentShardWriter
from fdistill.data.writers import encode_png
from fdistill.io import write_bytes, write_text
from fdistill.networks.heads import Discriminator
from fdistill.networks.taps import resolve_taps
from fdistill.teachers.guidance import GuidedDenoiser
from fdistill.teachers.stable_diffusion import StableDiffusion, load_stable_diffusion
from fdistill.training import checkpoint
from fdistill.training.distiller import Distiller


class TextToImageData:
    """Alg. 1's real data and the generator's conditions in a teacher's latent space, with the data-sampler
    interface the Distiller expects: ``(n, part) -> (latents, TextCondition)`` and ``sample_cond(n, part)``.
    Every rank draws the same n and encodes only its own part."""

    def __init__(self, sd: StableDiffusion, sampler: CaptionSampler | LatentSampler, device: torch.device) -> None:
        self.sd, self.sampler, self.device = sd, sampler, device

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, TextCondition]:
        if isinstance(self.sampler, LatentSampler):
            latents, cond = self.sampler(n, part)
            return latents.to(self.device), TextCondition(**cond).to(self.device)
        images, captions = self.sampler(n, part)
        return self.sd.codec.encode(images.to(self.device)), self.sd.text(captions)

    def sample_cond(self, n: int, part: slice = slice(None)) -> TextCondition:
        if isinstance(self.sampler, LatentSampler):
            return TextCondition(**self.sampler.sample_cond(n, part)).to(self.device)
        return self.sd.text(self.sampler.sample_prompts(n, part))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def open_data(cfg, resolution: int, seed: int, device: torch.device) -> CaptionSampler | LatentSampler:
    """The sampler of ``cfg.data``: latent shards (a folder with index.json) or captioned images, with the
    generator's prompts from ``cfg.text.prompts`` when given."""
    if (Path(cfg.data) / "index.json").is_file():
        return LatentSampler(LatentShards(cfg.data), seed=seed, device="cpu")
    data = open_captions(cfg.data, resolution=resolution, on_error=cfg.text.on_bad_data.replace("error", "raise"))
    prompts = open_captions(cfg.text.prompts) if cfg.text.prompts else None
    return CaptionSampler(data, seed=seed, prompts=prompts, threads=cfg.text.decode_threads)


def add_lora(net: nn.Module, rank: int) -> None:
    """LoRA adapters (Hu et al. 2022) of ``rank`` on the UNet's attention projections, through peft, as DMD2's
    SDXL variant; only they are trained (the base weights are frozen)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("text.lora_rank needs the peft package: pip install peft") from None
    net.unet.requires_grad_(False)
    net.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def make_distiller(cfg, teacher_folder: str | Path, device: str | torch.device = "cpu") -> Distiller:
    """Alg. 1 for a Stable Diffusion (XL) teacher (``cfg``: an ImageConfig with its ``text`` section)."""
    device = torch.device(device)
    sd = load_stable_diffusion(teacher_folder, cfg.text.resolution).to(device)
    net = sd.denoiser
    taps = resolve_taps(cfg.disc_resolutions, net.encoder_resolutions, f"the UNet of {teacher_folder}")
    sampler = open_data(cfg, sd.kwargs["resolution"], cfg.distill.seed, device)
    torch.manual_seed(cfg.distill.seed)
    net.feature_resolutions = taps
    channels = net.feature_channels()
    generator = copy.deepcopy(net).train().requires_grad_(True)
    fake_score = copy.deepcopy(net).train().requires_grad_(True)
    for m in (generator, fake_score):
        if cfg.text.lora_rank:
            add_lora(m, cfg.text.lora_rank)
        if cfg.text.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
    teacher = GuidedDenoiser(net, cfg.guidance) if cfg.guidance != 1.0 else net
    disc = Discriminator.conv({r: channels[r] for r in taps}, cfg.disc_hidden, cfg.disc_head)
    data = TextToImageData(sd, sampler, device)
    d = Distiller(cfg.distill, teacher, generator, fake_score, disc, real_data=data, sample_shape=sd.latent_shape,
                  sample_cond=data.sample_cond, device=device)
    d.info = {"precond": "stable_diffusion", "network": sd.kwargs, "data": cfg.data, "lora_rank": cfg.text.lora_rank}
    return d


# -- using the result ---------------------------------------------------------------------------------------
def load_generator(run: str | Path, device: str | torch.device = "cpu",
                   ema: bool = True) -> tuple[nn.Module, float, StableDiffusion]:
    """A distilled text-to-image generator (the UNet with its weights from ``run``'s newest checkpoint, or
    a checkpoint folder), its sigma_gen, and the teacher folder's text encoders and VAE."""
    from fdistill.config import from_dict
    from fdistill.training.distiller import DistillConfig

    meta = checkpoint.read_meta(run)
    info, cfg = meta["info"], from_dict(DistillConfig, meta["config"])
    kwargs = info["network"]
    if not Path(kwargs["folder"]).is_dir():
        raise FileNotFoundError(f"{run} was distilled from {kwargs['folder']}, which is not there any more: its text "
                                "encoders and VAE are needed to sample (move the folder back)")
    sd = load_stable_diffusion(kwargs["folder"], kwargs["resolution"])
    generator = copy.deepcopy(sd.denoiser)
    if info.get("lora_rank"):
        add_lora(generator, info["lora_rank"])
    generator.load_state_dict(checkpoint.load_weights(run, "generator_ema" if ema else "generator", "generator"))
    if info.get("lora_rank"):  # fold the adapters into the weights: a plain UNet again
        generator.unet.fuse_lora()
        generator.unet.unload_lora()
    device = torch.device(device)
    return generator.eval().requires_grad_(False).to(device), cfg.generator_sigma or cfg.sigmas.largest, sd.to(device)


def one_step_maker(generator: nn.Module, sigma_gen: float, sd: StableDiffusion):
    """``make(prompts, seeds) -> images in [-1, 1]`` (CPU): prompt i's noise from its seed (``seeded_noise``),
    one generator call, then the VAE decoder."""
    device = next(generator.parameters()).device

    @torch.no_grad()
    def make(prompts: list[str], seeds: list[int]) -> Tensor:
        z = seeded_noise(sd.latent_shape, seeds, device)
        return sd.codec.decode(one_step(generator, z, sigma_gen, sd.text(prompts))).cpu()
    return make


def generate_images(generator: nn.Module, sigma_gen: float, sd: StableDiffusion, prompts: list[str],
                    seed: int = 0, progress: bool = False, batch_size: int = 16) -> Tensor:
    """One image per prompt, in [-1, 1] (CPU), prompt i from seed ``seed + i`` (``one_step_maker``)."""
    make = one_step_maker(generator, sigma_gen, sd)
    return torch.cat([make(prompts[i:i + batch_size], list(range(seed + i, seed + min(i + batch_size, len(prompts)))))
                      for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress,
                                    leave=False)])


def image_maker(run: str | Path, device, teacher_steps: int | None = None, guidance: float = 1.0):
    """``make(prompts, seeds) -> images in [-1, 1]`` for a text-to-image run: its one-step student, or with
    ``teacher_steps`` its teacher sampled by EDM's Heun sampler (2 steps - 1 evaluations, each guided)."""
    if teacher_steps is None:
        return one_step_maker(*load_generator(run, device))
    info = checkpoint.read_meta(run)["info"]
    sd = load_stable_diffusion(info["network"]["folder"], info["network"]["resolution"]).to(device)
    net = GuidedDenoiser(sd.denoiser, guidance) if guidance != 1.0 else sd.denoiser

    def make(prompts: list[str], seeds: list[int]) -> Tensor:
        z = seeded_noise(sd.latent_shape, seeds, device)
        latents = edm_sampler(net, z, sd.text(prompts), num_steps=teacher_steps, sigma_min=sd.denoiser.sigma_min,
                              sigma_max=sd.denoiser.sigma_max)
        return sd.codec.decode(latents).cpu()
    return make


def write_pngs(images: Tensor, prompts: list[str], out: str | Path, seed: int) -> list[Path]:
    """``out/000000.png`` ... and ``out/prompts.txt`` (index, seed, prompt per line)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        paths.append(out / f"{i:06d}.png")
        write_bytes(paths[-1], encode_png(img))  # fdistill.io: a link planted at the name is replaced
    write_text(out / "prompts.txt", "".join(f"{i:06d}\t{seed + i}\t{p}\n" for i, p in enumerate(prompts)))
    return paths


def prepare_latents(teacher_folder: str | Path, source: str | Path, out: str | Path, resolution: int | None = None,
                    batch_size: int = 16, shard_size: int = 1024, device: str | torch.device = "cpu",
                    on_error: str = "skip", progress: bool = True) -> Path:
    """Encode a captioned dataset once into latent shards (VAE latents and text embeddings), resumable: samples
    already in ``out``'s index are skipped. Training reads the folder as its data (SDXL recipes do)."""
    device = torch.device(device)
    sd = load_stable_diffusion(teacher_folder, resolution).to(device)
    data = open_captions(source, resolution=sd.kwargs["resolution"], on_error=on_error.replace("error", "raise"))
    writer = LatentShardWriter(out, shard_size=shard_size, source=str(source))
    bar = tqdm(total=len(data), initial=writer.written, desc="prepare-latents", disable=not progress)
    batch = []

    def encode() -> None:
        images = to_float(np.stack([b[0] for b in batch]))
        latents = sd.codec.encode(images.to(device)).cpu()
        cond = sd.text([b[1] for b in batch]).to("cpu")
        writer.add_batch([b[2] for b in batch], latents, cond.tensors(), [b[1] for b in batch])
        bar.update(len(batch))
        batch.clear()

    for sample in data:  # in order; a bad sample is skipped with a warning, or stops with on_error="raise"
        if not writer.done(sample[2]):
            batch.append(sample)
        if len(batch) == batch_size:
            encode()
    if batch:
        encode()
    writer.close()
    bar.close()
    return Path(out)
