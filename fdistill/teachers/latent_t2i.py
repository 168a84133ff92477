"""What every latent text-to-image family shares (Stable Diffusion v1.5 / SDXL, SD3, FLUX.1, SANA, Qwen-Image): the
frozen VAE as a codec, the real data in latent space, and ``LatentTextToImageTeacher``, the base of their
``Teacher`` classes: opening a pipeline folder and rebuilding it from a checkpoint's record, LoRA of the students,
gradient checkpointing (of the students and the teacher), the shared-base mode, reloading a student and exporting it
as a pipeline folder.
A family says how its folder loads (``load``), how its network is adapted (``lora_targets``, ``backbone``) and how
its export is written (``export_pipeline``, ``pipeline_call``: the student's k steps as the pipeline's scheduler)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fdistill.core.few_step import StudentSteps
from fdistill.data.conditions import TextCondition
from fdistill.io import read_json_object
from fdistill.teachers import pipeline_folders
from fdistill.teachers.base import Teacher


class LatentCodec(nn.Module):
    """The frozen VAE: images in [-1, 1] <-> latents (z - shift_factor) * scaling_factor, decoded by
    z / scaling_factor + shift_factor, as the pipelines do (SD1.5 0.18215, SDXL 0.13025, no shift; SD3.5
    1.5305 / 0.0609, FLUX.1 0.3611 / 0.1159); with per-channel ``latents_mean`` / ``latents_std`` (Qwen-Image,
    Wan) the shift is the mean and the scale 1 / std. ``default_scaling``: when the VAE's config names none.
    Encoding samples the posterior as FastGen does (a DC-AE's, SANA's, is deterministic); the VAE always runs in
    fp32 (SDXL's needs it)."""

    per_channel_statistics = False  # the VAE must give latents_mean / latents_std of its channels (Qwen-Image, Wan)

    def __init__(self, vae: nn.Module, default_scaling: float = 0.18215, where: str = "the VAE config") -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        scaling = config.get("scaling_factor")
        self.scaling_factor = float(default_scaling if scaling is None else scaling)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        for name, value, positive in (("scaling_factor", self.scaling_factor, True),
                                      ("shift_factor", self.shift_factor, False)):
            if not (math.isfinite(value) and (value > 0 or not positive)):
                raise ValueError(f"{where}: {name} must be a finite{' positive' if positive else ''} number, "
                                 f"got {value!r}")
        ratio = config.get("spatial_compression_ratio") or getattr(vae, "spatial_compression_ratio", None)
        blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")  # AutoencoderDC's
        self.downsample = int(ratio or 2 ** (len(blocks) - 1))
        self.channels = int(config.get("latent_channels") or config.get("z_dim"))
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self.per_channel = mean is not None and std is not None
        if self.per_channel_statistics and not self.per_channel:
            raise ValueError(f"{where}: latents_mean and latents_std must be lists of the {self.channels} latent "
                             "channels' statistics")
        if self.per_channel:  # [C] broadcast over [B, C, (T,) H, W]
            mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
                raise ValueError(f"{where}: latents_mean and latents_std must be finite and std positive")
            if self.per_channel_statistics and not mean.shape == std.shape == (self.channels,):
                bad = "latents_mean" if mean.shape != (self.channels,) else "latents_std"
                raise ValueError(f"{where}: {bad} must hold {self.channels} numbers (z_dim), got "
                                 f"{(mean if bad == 'latents_mean' else std).numel()}")
            self.register_buffer("latents_mean", mean, persistent=False)
            self.register_buffer("latents_std", std, persistent=False)

    @classmethod
    def load(cls, vae_class, folder: Path, default_scaling: float = 1.0) -> LatentCodec:
        """The codec of pipeline folder ``folder``'s ``vae/`` (a diffusers ``vae_class``), read and checked by
        ``pipeline_folders.load_network``."""
        return cls(pipeline_folders.load_network(vae_class, folder / "vae"), default_scaling,
                   str(folder / "vae" / "config.json"))

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return self.latents_mean.to(z.device).view(shape), self.latents_std.to(z.device).view(shape)

    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        out = self.vae.encode(images)
        return out.latent if hasattr(out, "latent") else out.latent_dist.sample(generator)  # DC-AE: deterministic

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            z = self._encode(images.float(), generator)
            if self.per_channel:
                mean, std = self._stats(z)
                return (z - mean) / std
            return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            if self.per_channel:
                mean, std = self._stats(latents)
                z = latents.float() * std + mean
            else:
                z = latents.float() / self.scaling_factor + self.shift_factor
            return self._decode(z).clamp(-1, 1)


class LatentPipeline(nn.Module):
    """A loaded pipeline folder: ``denoiser``, ``text`` (prompts -> TextCondition), ``codec`` (LatentCodec);
    ``kwargs`` is the JSON record that rebuilds it (the checkpoint's ``info["network"]``)."""

    def __init__(self, denoiser: nn.Module, text: nn.Module, codec: LatentCodec, kwargs: dict) -> None:
        super().__init__()
        self.denoiser, self.text, self.codec, self.kwargs = denoiser, text, codec, kwargs

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.kwargs["resolution"] // self.codec.downsample
        return (self.codec.channels, r, r)


class ReleasedText(nn.Module):
    """Stands in for the text encoders of a run from latent shards, which hold every prompt's embeddings (``fdistill
    prepare-latents``; the null condition was encoded once at loading and is kept by the denoiser): their weights are
    dropped (T5-XXL alone is 4.76B parameters), the settings the data are checked against are kept, and encoding a
    prompt is refused in one line."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.sequence_length, self.length_setting = text.sequence_length, text.length_setting
        self.released = sum(p.numel() for p in text.parameters())

    def forward(self, prompts: list[str]) -> TextCondition:
        raise ValueError("this run reads latent shards, which hold its prompts' embeddings, so its text encoders were "
                         "released; open the teacher again to encode new prompts")


class TextToImageData:
    """Alg. 1's real data and the generator's conditions in the teacher's latent space (``core.protocols.RealData``):
    captioned images encoded online by the VAE and text encoders, or latent shards encoded once
    (``fdistill prepare-latents``). Every rank draws the same n and encodes only its own part."""

    def __init__(self, pipe: LatentPipeline, sampler, device: torch.device) -> None:
        from fdistill.data.latent_shards import LatentSampler

        self.pipe, self.sampler, self.device = pipe, sampler, device
        self.latents = isinstance(sampler, LatentSampler)  # else a CaptionSampler of images and captions

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, TextCondition]:
        if self.latents:
            latents, cond = self.sampler(n, part)
            return latents.to(self.device), TextCondition(**cond).to(self.device)
        images, captions = self.sampler(n, part)
        return self.pipe.codec.encode(images.to(self.device)), self.pipe.text(captions)

    def sample_cond(self, n: int, part: slice = slice(None)) -> TextCondition:
        if self.latents:
            return TextCondition(**self.sampler.sample_cond(n, part)).to(self.device)
        return self.pipe.text(self.sampler.sample_prompts(n, part))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class LatentTextToImageTeacher(Teacher):
    """A text-to-image pipeline folder as a teacher; ``info`` = {"family": kind, "network": the pipeline's record
    (its folder, resolution, options and network configs)}. A family subclass names its pipeline class
    (``pipeline_classes``), loads its folder (``load``), and writes its export (``export_pipeline``)."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # model_index.json's _class_name values this family reads
    backbone: ClassVar[str] = "unet"  # the denoiser's diffusers model: where LoRA and gradient checkpointing go
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    order = 10

    @classmethod
    def recognises(cls, path: str | Path) -> bool:
        return pipeline_folders.pipeline_class(path) in cls.pipeline_classes

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: Any = None) -> LatentPipeline:
        """The pipeline at ``folder`` at ``resolution`` pixels (None: the pipeline's), with ``options`` (the
        family's ``Options``, or None for its defaults)."""
        raise NotImplementedError

    @staticmethod
    def scheduler_config(folder: Path) -> tuple[dict, str]:
        """The folder's scheduler config and its path (for messages)."""
        path = folder / "scheduler" / "scheduler_config.json"
        return read_json_object(path), str(path)

    @classmethod
    def options_of(cls, record: dict) -> Any:
        """The ``Options`` a checkpoint's ``info["network"]`` was opened with (None: the defaults)."""
        return None

    @classmethod
    def open(cls, path: str | Path, resolution: int | None = None, options: dict | None = None
             ) -> LatentTextToImageTeacher:
        return cls._make(cls.load(path, resolution, cls.parse_options(options)), str(path))

    @classmethod
    def from_info(cls, info: dict, where: str = "the checkpoint") -> LatentTextToImageTeacher:
        record = info["network"]
        if not Path(record["folder"]).is_dir():
            raise FileNotFoundError(f"{where} was distilled from {record['folder']}, which is not there any more: its "
                                    "text encoders and VAE are needed to sample (move the folder back)")
        return cls._make(cls.load(record["folder"], record["resolution"], cls.options_of(record)), record["folder"])

    @classmethod
    def _make(cls, pipe: LatentPipeline, source: str) -> LatentTextToImageTeacher:
        return cls(pipe.denoiser, pipe.latent_shape, {"family": cls.kind, "network": pipe.kwargs}, source,
                   text=pipe.text, codec=pipe.codec, sigma_range=(pipe.denoiser.sigma_min, pipe.denoiser.sigma_max),
                   extra={"pipeline": pipe})

    @property
    def pipeline(self) -> LatentPipeline:
        return self.extra["pipeline"]

    def lora(self, net: nn.Module, rank: int, name: str = "default") -> None:
        """LoRA adapters of ``rank`` on the denoiser's network (``lora_targets``; ``name``: the peft adapter's)."""
        pipeline_folders.add_lora(getattr(net, self.backbone), rank, self.lora_targets, name)

    def open_data(self, cfg, device: torch.device, dataset=None) -> TextToImageData:
        """Latent shards (a folder with index.json), whose text embeddings must be as long as this teacher's (as
        its null condition and prompts are; the text encoders are then released: ``ReleasedText``), or captioned
        images; the generator's prompts from ``cfg.text.prompts`` when given."""
        from fdistill.data.captions import open_captions
        from fdistill.data.latent_shards import LatentSampler, LatentShards
        from fdistill.data.sampler import CaptionSampler

        seed = cfg.distill.seed
        if (Path(cfg.data) / "index.json").is_file():
            shards = LatentShards(cfg.data)
            got, want = shards.tensors.get("embeds", ((None,),))[0][0], self.text.sequence_length
            if got != want:
                raise ValueError(f"latent shards {cfg.data} hold {got}-token text embeddings, but this {self.kind} "
                                 f"teacher's are {want} ({self.text.length_setting}): prepare the latents with the "
                                 "same teacher_options")
            sampler = LatentSampler(shards, seed=seed, device="cpu")
            self.text = self.pipeline.text = ReleasedText(self.text)  # the shards hold every prompt's embeddings
        else:
            on_error = cfg.text.on_bad_data.replace("error", "raise")
            data = open_captions(cfg.data, resolution=self.info["network"]["resolution"], on_error=on_error)
            prompts = open_captions(cfg.text.prompts) if cfg.text.prompts else None
            sampler = CaptionSampler(data, seed=seed, prompts=prompts, threads=cfg.text.decode_threads)
        return TextToImageData(self.pipeline, sampler, device)

    def check_config(self, cfg) -> None:
        """Refuse (or warn about) settings of ``cfg`` this family cannot train with; called before the students
        are made."""

    def prepare_students(self, students: list[nn.Module], cfg) -> None:
        """Separate networks: LoRA of ``text.lora_rank`` on each student; with ``text.gradient_checkpointing`` the
        generator's, the fake score's and the frozen teacher's networks are checkpointed (``networks.attention
        .checkpoint``, recomputing on the attention kernels of the forward). Of the teacher's passes only those with
        grad are: the GAN term's (differentiated through its input into the generator) and exact R1's (a double
        backward); diffusers' UNets and transformers checkpoint only when grad is enabled, so its no-grad passes
        (the f-divergence term's, approximate R1's) run as before."""
        from fdistill.networks import attention

        self.check_config(cfg)
        for m in students:
            if cfg.text.lora_rank:
                self.lora(m, cfg.text.lora_rank)
        for m in (*students, self.denoiser):  # set either way: the teacher's network outlives one distiller
            backbone = getattr(m, self.backbone)
            if cfg.text.gradient_checkpointing:
                backbone.enable_gradient_checkpointing(attention.checkpoint)
            else:
                backbone.disable_gradient_checkpointing()

    def shared_students(self, cfg) -> tuple[nn.Module, list[nn.Module]]:
        """``text.shared_base``: the teacher and the two students as views of this teacher's one denoiser
        (``networks.shared_base``): generator and fake score are LoRA adapters of rank ``text.lora_rank``. With
        ``text.gradient_checkpointing`` every pass with grad through the one network is checkpointed (the teacher's
        too: its GAN-term and R1 passes), each unit recomputed with the adapter of the pass that ran it. Under
        ``distill.fsdp`` the distiller shards the one network, adapters included (``SharedBase.shard``)."""
        from fdistill.networks.shared_base import SharedBase

        self.check_config(cfg)
        if cfg.distill.compile:
            raise ValueError("text.shared_base cannot be combined with distill.compile: the students' parameters live "
                             "inside the teacher's network (use one or the other)")
        shared = SharedBase(self.denoiser, self.backbone, self.lora, cfg.text.lora_rank)
        if cfg.text.gradient_checkpointing:
            shared.backbone.enable_gradient_checkpointing(shared.checkpoint)
        else:  # a separate-network distiller may have checkpointed the teacher's network before
            shared.backbone.disable_gradient_checkpointing()
        return shared.teacher(), [shared.add("generator").train(), shared.add("fake_score").train()]

    def student_info(self, cfg) -> dict:
        return {"lora_rank": cfg.text.lora_rank, "shared_base": cfg.text.shared_base}

    def load_student(self, weights: dict[str, Tensor], info: dict) -> nn.Module:
        """The generator from its weights; LoRA adapters are folded into the base weights (a plain network again)."""
        net = self.student_network()
        if info.get("lora_rank"):
            self.lora(net, info["lora_rank"])
        if info.get("shared_base"):  # an adapter view's weights only: the base is the teacher's
            from fdistill.networks.shared_base import lora_state_dict

            missing, unexpected = net.load_state_dict(lora_state_dict(weights), strict=False)
            if unexpected or any(".lora_" in k for k in missing):
                raise RuntimeError(f"missing adapter weights {[k for k in missing if '.lora_' in k][:3]}, "
                                   f"unexpected {unexpected[:3]}")
        else:
            net.load_state_dict(weights)
        if info.get("lora_rank"):
            getattr(net, self.backbone).fuse_lora()
            getattr(net, self.backbone).unload_lora()
        return net

    def export(self, generator: nn.Module, out, student=None) -> str:
        """The ``generator`` run as ``student`` (``core.few_step.StudentSteps``, or one sigma_gen; default one step
        at its sigma_max) as a pipeline folder of this family (``export_pipeline``); the line names the call that
        reproduces ``fdistill sample``'s image (``pipeline_call``)."""
        student = self.export_steps(generator, student)
        out = self.export_pipeline(generator, Path(self.info["network"]["folder"]), Path(out), student)
        return f"wrote {out}: {self.pipeline_call(out, student)}"

    @staticmethod
    def export_steps(generator: nn.Module, student=None) -> StudentSteps:
        """``student`` as StudentSteps (a run's are checked by its DistillConfig): None is one step at the generator's
        sigma_max, a number one step there."""
        if isinstance(student, StudentSteps):
            return student
        sigma = float(generator.sigma_max if student is None else student)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma_gen must be a positive finite noise level, got {student!r:.40}")
        return StudentSteps((sigma,))

    def export_pipeline(self, generator: nn.Module, teacher_folder: Path, out: Path, student: StudentSteps) -> Path:
        """Write the teacher's folder with the ``generator``'s network and the scheduler that runs ``student``."""
        return pipeline_folders.write_pipeline(teacher_folder, out, {self.backbone: getattr(generator, self.backbone)},
                                               self.student_scheduler(teacher_folder, student))

    def student_scheduler(self, teacher_folder: Path, student: StudentSteps):
        """The diffusers scheduler that runs ``student`` in this family's pipeline: what ``export_pipeline`` writes,
        and what a LoRA export (``teachers.lora_files``) writes next to its file."""
        raise NotImplementedError

    @classmethod
    def lora_pipeline(cls):
        """The diffusers pipeline class whose ``save_lora_weights``, ``lora_state_dict`` and
        ``load_lora_into_<backbone>`` write and read this family's LoRA files (``teachers.lora_files``); their
        keys start with ``backbone`` ("unet" or "transformer")."""
        diffusers, _ = pipeline_folders.libraries()
        return getattr(diffusers, cls.pipeline_classes[0])

    def pipeline_call(self, folder: Path, student: StudentSteps) -> str:
        """The documented call of the exported pipeline that gives ``fdistill sample``'s image for the same seed."""
        raise NotImplementedError
