"""Text-to-video on a CPU, end to end: "moving digits", scikit-learn's digits (8x8, each pixel repeated 2x2 as in
``t2i_digits``) moving across a 32 x 32 canvas over 5 frames in one of four directions, captioned with digit and
direction ("a seven moving left", four phrasings); a tiny teacher in Wan2.1's folder layout (``WanPipeline.
save_pretrained``: an ``AutoencoderKLWan`` and a ``WanTransformer3DModel`` trained here, a random frozen umT5 with
the character tokenizer of ``flow_digits``, a UniPC flow scheduler of shift 1) loaded through ``open_teacher``;
then one-step students (reverse-KL, JS, forward-KL, adversarial-only; ``--student-steps 1,4`` adds 4-step
students) distilled through the command line.

    python benchmarks/video_digits.py                       # stages are cached in --out
    python benchmarks/video_digits.py --student-steps 1,4 --seeds 3     # and 4-step students; mean ± std
    python benchmarks/video_digits.py --clips 512 --vae-steps 20 --teacher-iterations 20 --distill-iterations 10 \\
        --num 40 --runs js,adversarial --student-steps 1,4 --threads 1 --out /tmp/video-smoke   # a smoke run

Stages, each skipped when its output is in --out:

1. ``data/``: one clip per (real digit, direction), 1,797 x 4 = 7,188 MP4s with same-stem .txt captions
   (``fdistill.data.video.write_mp4``: H.264, CRF 18, yuv420p, 16 fps; gray frames repeated to RGB). Each clip
   moves the 16 x 16 digit 8, 12 or 16 px (``TRAVELS``) along its direction, the other coordinate uniform in
   [0, 16]. The MP4 round trip's mean absolute error (0-255 scale) is measured on 64 clips, printed and kept in
   results.json (``mp4_round_trip_mae``).
2. ``teacher/``: the VAE (``AutoencoderKLWan`` base_dim 8, z_dim 8, dim_mult [1, 2, 2], both stages downsampling
   time: 4x in time as Wan's, 4x in space with ``scale_factor_spatial=4``, which WanPipeline and
   ``teachers.families.wan`` read; 5 x 32 x 32 clips -> latents 8 x 2 x 8 x 8) trained on L1 + MSE + 1e-6 KL
   from clips drawn as in stage 1 (not read back from the MP4s), its per-channel latents_mean / latents_std
   measured on 512 clips; then the folder is written with a random transformer and encoded.
3. ``latents/``: the clips and captions encoded once (``fdistill prepare-latents``, or with ``--via python`` this
   file's ``encode_clips``, which reads the same MP4 folder with ``open_videos`` and writes the same shards).
4. The transformer (4 blocks, 4 heads of 16, patches 1 x 2 x 2: a 2 x 4 x 4 token grid) trained by
   ``TeacherTrainer`` on the rectified-flow loss (``noise="flow"``, logit-normal t, 10% empty prompts), the EMA
   written back into ``teacher/transformer``.
5. Students: ``fdistill distill`` (``apps.cli.main``) per --runs x --student-steps x --seeds into
   ``<out>/<run>[-k<k>-<input>[-ode]][-seed<s>]``, with ``flow_digits``' settings (generator at t = 0.999, lr 5e-5,
   w_GAN 0.2, batch 64, tau 5; heads on the 4 x 4 token grid). With ``--via cli`` each one-step student is also
   exported (``fdistill export --diffusers`` into ``<out>/export/<run>``, its WanPipeline's one call drawn as
   ``<run>-pipeline.png``) and ``fdistill sample`` writes its clips for ``SHOWN`` prompts into
   ``<out>/<run>/samples``.

Metrics (``score``), every model on the same --num prompts (prompt i's noise from seed i's stream): per-frame
digits-FID, precision and recall (every frame of every clip cropped around its intensity centroid to 16 x 16,
averaged to 8 x 8, in the digits classifier's features, against the 1,797 real digits through the same crop),
digit accuracy (majority class over the frames), direction accuracy (the centroid's first-to-last displacement on
the prompted axis at least 1 px the prompted way), identity consistency (clips whose frames all get one class),
in-batch similarity (the mean cosine between clips of the same prompt string, per-frame centred features
concatenated), seconds per 1000 clips (network calls and VAE decoding). Rows: real clips, real clips through the
VAE (the floor), the teacher (18 Heun steps = 35 NFE, each guided at CFG 2), the students (mean ± std over
seeds). Writes ``table.md``, ``results.json`` and ``strip.png`` (``save_clip_grid``: ``STRIP`` prompts, one per
direction, the same seeds, rows teacher then students in the table's order; frames left to right).

Defaults: 2000 VAE steps (batch 32), 24000 teacher iterations, 1000 distillation iterations per student, 2000
clips per model, CFG 2, 2 threads. Measured on this project's 2-core CPU with one thread, beside another
one-thread benchmark: writing the 7,188 MP4s 21 s; the VAE 1315 s (final loss 0.079; through it, per-frame FID
5.61 and digit accuracy 0.984 against 1.41 / 0.980 for the real clips); ``fdistill prepare-latents`` 141 s; the
teacher 2607 s (0.109 s per iteration) and its scoring 128 s; each one-step student 187-220 s of distillation
(0.19-0.22 s per iteration; adversarial-only 0.12) plus about 30 s of scoring, export and CLI sampling. So one seed
from scratch takes about 85 minutes on one thread, and the students alone about 15. At 6000 teacher iterations
(the first default) the teacher had learnt the directions but not the digits (per-frame FID 127.5, digit accuracy
0.23, identity consistency 0.06); at 24000 it reaches 30.19 / 0.877 / 0.67. Trained on the clamped output of
``decode`` the VAE learnt only the black background (the ink gets no gradient once predicted below -1,
``train_vae``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fdistill.data.datasets import load_dataset, to_float  # noqa: E402
from fdistill.data.latent_shards import LatentSampler, LatentShardWriter  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402
from fdistill.training.teacher_training import TeacherConfig, TeacherTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import flow_digits as flow  # noqa: E402
import t2i_digits as bench  # noqa: E402

WORDS = bench.WORDS
DIRECTIONS = ("left", "right", "up", "down")
AXIS = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}  # (axis: 0 rows / 1 columns, sign)
PHRASES = ["a {w} moving {v}", "the digit {d} moves {v}", "a handwritten {w} going {v}", "{w}, {v}"]
CANVAS, DIGIT, FRAMES, FPS = 32, 16, 5, 16
TRAVELS = (8, 12, 16)  # px the digit moves from the first frame to the last
MSL = 32  # umT5 tokens: the longest caption is 28 with the character tokenizer (checked in ``options``)
GENERATOR_T = 0.999  # flow_digits' one-step generator time
SHOWN = 8  # prompts for `fdistill sample` per student
STRIP = 4  # clips per model in strip.png


# -- data ---------------------------------------------------------------------------------------------------------
def caption(digit: int, direction: int, rng: np.random.Generator) -> str:
    """One of ``PHRASES`` for ``digit`` moving ``DIRECTIONS[direction]``."""
    return PHRASES[rng.integers(len(PHRASES))].format(w=WORDS[digit], d=digit, v=DIRECTIONS[direction])


def place(digit16: np.ndarray, direction: int, travel: int, start: int, across: int, frames: int = FRAMES
          ) -> np.ndarray:
    """uint8 [frames, CANVAS, CANVAS]: ``digit16`` (16 x 16) moved ``travel`` px along ``DIRECTIONS[direction]``,
    frame k at round(k travel / (frames - 1)) px from ``start`` (the top-left corner's coordinate on the moving
    axis), ``across`` on the other axis; both in [0, CANVAS - DIGIT]."""
    axis, sign = AXIS[DIRECTIONS[direction]]
    out = np.zeros((frames, CANVAS, CANVAS), np.uint8)
    for k in range(frames):
        along = start + sign * int(round(k * travel / max(frames - 1, 1)))
        r, c = (along, across) if axis == 0 else (across, along)
        out[k, r:r + DIGIT, c:c + DIGIT] = digit16
    return out


def moving_digits(frames: int = FRAMES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(uint8 clips [7188, frames, 32, 32], digits, directions, captions): every real digit in every direction,
    travel drawn from ``TRAVELS``, the start so that the path stays on the canvas."""
    data, rng = load_dataset("digits"), np.random.default_rng(seed)
    clips, digits, directions, captions = [], [], [], []
    room = CANVAS - DIGIT
    for img, label in zip(data.images, data.labels):
        digit16 = np.repeat(np.repeat(img[0], 2, 0), 2, 1)
        for d in range(len(DIRECTIONS)):
            travel = int(rng.choice(TRAVELS))
            start = int(rng.integers(room - travel + 1))
            if AXIS[DIRECTIONS[d]][1] < 0:
                start += travel
            clips.append(place(digit16, d, travel, start, int(rng.integers(room + 1)), frames))
            digits.append(int(label))
            directions.append(d)
            captions.append(caption(int(label), d, rng))
    return np.stack(clips), np.array(digits), np.array(directions), captions


def clips_float(clips: np.ndarray) -> torch.Tensor:
    """uint8 gray [N, F, H, W] -> float RGB [N, 3, F, H, W] in [-1, 1] (the VAE's and WanPipeline's layout)."""
    return to_float(torch.from_numpy(clips))[:, None].expand(-1, 3, -1, -1, -1).contiguous()


def write_clip_folder(folder: Path, clips: np.ndarray, captions: list[str]) -> Path:
    """The clips as ``folder/00000.mp4`` ... (``write_mp4``, FPS) with same-stem .txt captions: the layout
    ``open_videos`` and ``fdistill prepare-latents`` read."""
    from fdistill.data.video import write_mp4

    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, (clip, text) in enumerate(zip(clips, captions)):
        write_mp4(folder / f"{i:05d}.mp4", clip[:, None], fps=FPS)
        (folder / f"{i:05d}.txt").write_text(text)
    (folder / "done").write_text("")
    return folder


def mp4_round_trip(folder: Path, clips: np.ndarray, n: int = 64) -> float:
    """The mean absolute error (0-255) of the first ``n`` clips of ``folder`` read back by ``open_videos``."""
    from fdistill.data.video import open_videos

    data = open_videos(folder, frames=clips.shape[1], fps=FPS, size=(CANVAS, CANVAS), on_error="raise")
    n = min(n, len(data))  # a smoke run's --clips may hold fewer
    read = torch.stack([data[i][0] for i in range(n)])  # [n, 3, F, H, W] in [-1, 1]
    return float(((read + 1) * 127.5 - torch.from_numpy(clips[:n]).float()[:, None]).abs().mean())


# -- the teacher --------------------------------------------------------------------------------------------------
def options(frames: int = FRAMES) -> dict:
    """The Wan teacher's ``teacher_options``: the video size, MSL text tokens, the empty negative prompt (the CFG
    null condition is WanPipeline's default, the empty prompt, which the teacher is trained on)."""
    from flow_digits import t5_tokenizer

    longest = max(len(t5_tokenizer()(caption(d, v, np.random.default_rng(p)))["input_ids"])
                  for d in range(10) for v in range(4) for p in range(8))
    assert longest <= MSL, f"captions of {longest} tokens do not fit max_sequence_length {MSL}"
    return {"num_frames": frames, "height": CANVAS, "width": CANVAS, "max_sequence_length": MSL,
            "negative_prompt": ""}


def option_overrides(frames: int = FRAMES) -> list[str]:
    """``options`` as command-line overrides."""
    return [f"teacher_options.{k}={json.dumps(v)}" for k, v in options(frames).items()]


def train_vae(clips: torch.Tensor, steps: int, batch: int = 32, seed: int = 0, say=lambda text: None):
    """A tiny AutoencoderKLWan (3 x F x 32 x 32 <-> 8 x ((F - 1) / 4 + 1) x 8 x 8) trained on L1 + MSE + 1e-6 KL
    (``t2i_digits.train_vae``'s loss) with Adam at 1e-3; latents_mean / latents_std measured per channel on
    the posterior means of 512 clips (the codec maps z to (z - mean) / std); ``say`` gets the loss every 200 steps.
    Returns (vae, final loss)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    z = 8
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4,
                           latents_mean=[0.0] * z, latents_std=[1.0] * z)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    loss, chunks = torch.zeros(()), []
    # the decoder's own outputs, one per latent frame: AutoencoderKLWan.decode clamps to [-1, 1], which passes no
    # gradient to a pixel predicted below -1 (every pixel, once the black background is learnt: the ink is lost)
    hook = vae.decoder.register_forward_hook(lambda module, args, output: chunks.append(output))
    for step in range(1, steps + 1):
        x = clips[torch.randint(len(clips), (batch,))]
        post = vae.encode(x).latent_dist
        chunks.clear()
        vae.decode(post.sample())
        rec = torch.cat(chunks, 2)
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            say(f"VAE step {step}/{steps}: loss {loss.item():.4f}")
    hook.remove()
    with torch.no_grad():
        mu = torch.cat([vae.encode(clips[i:i + 64]).latent_dist.mode() for i in range(0, 512, 64)])
    vae.register_to_config(latents_mean=mu.mean((0, 2, 3, 4)).tolist(), latents_std=mu.std((0, 2, 3, 4)).tolist())
    return vae.eval(), loss.item()


def save_wan_pipeline(folder: Path, vae, seed: int = 0, heads: int = 4, layers: int = 4) -> Path:
    """The teacher in Wan2.1's folder layout (``WanPipeline.save_pretrained``): a ``WanTransformer3DModel`` of
    ``layers`` blocks and ``heads`` heads of 16 (patches 1 x 2 x 2, ffn 4x), a random 2-layer umT5 64 wide with
    ``flow_digits``' character tokenizer, ``vae``, Wan's UniPC scheduler (flow sigmas) with flow_shift 1."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    z = vae.config.z_dim
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16,
                                        in_channels=z, out_channels=z, text_dim=64, freq_dim=64,
                                        ffn_dim=64 * heads, num_layers=layers, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    torch.manual_seed(seed + 1)  # the text encoder does not depend on the transformer's size
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(flow.T5_PIECES) + 2 * len(flow.T5_CHARS), d_model=64,
                                       d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                       eos_token_id=1))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    WanPipeline(transformer=transformer, vae=vae, text_encoder=umt5, tokenizer=flow.t5_tokenizer(),
                scheduler=scheduler).save_pretrained(folder)
    return folder


def open_wan(folder: Path, frames: int = FRAMES):
    """The teacher folder through ``fdistill.teachers.open.open_teacher`` at the benchmark's ``options``."""
    from fdistill.teachers.open import open_teacher

    return open_teacher(folder, None, options(frames))


def encode_clips(teacher: Path, data: Path, out: Path, frames: int = FRAMES, batch: int = 64) -> Path:
    """``--via python``: the clip folder encoded into latent shards by the teacher's VAE and umT5 (``open_videos``
    at FPS, ``LatentShardWriter``: the layout ``fdistill prepare-latents`` writes for images)."""
    from fdistill.data.video import open_videos

    t = open_wan(teacher, frames)
    clips = open_videos(data, frames=frames, fps=FPS, size=(CANVAS, CANVAS), on_error="raise")
    writer, pending = LatentShardWriter(out, shard_size=1024, source=str(data)), []

    def flush() -> None:
        latents = t.codec.encode(torch.stack([p[0] for p in pending]), torch.Generator().manual_seed(writer.written))
        cond = t.text([p[1] for p in pending])
        writer.add_batch([p[2] for p in pending], latents, cond.tensors(), [p[1] for p in pending])
        pending.clear()

    for sample in clips:
        if not writer.done(sample[2]):
            pending.append(sample)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    writer.close()
    return out


def prepare_latents(teacher: Path, data: Path, out: Path, via: str, threads: int, frames: int = FRAMES) -> None:
    """Stage 3: ``fdistill prepare-latents`` (``via="cli"``) or ``encode_clips`` (``via="python"``)."""
    if via == "python":
        encode_clips(teacher, data, out, frames)
        return
    from fdistill.apps import cli

    if cli.main(["prepare-latents", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--batch",
                 "64", "--on-bad-data", "error", "--device", "cpu", "--threads", str(threads), "--no-progress",
                 *option_overrides(frames)]) != 0:
        raise SystemExit("fdistill prepare-latents failed on the clip folder (--via python encodes it here)")


def train_teacher(folder: Path, latents: Path, iterations: int, frames: int = FRAMES) -> None:
    """``flow_digits.train_teacher`` on the Wan denoiser: TeacherTrainer, rectified-flow loss (logit-normal t on
    [0.001, 0.999]), 10% empty prompts, batch 64, lr 5e-4; the EMA's transformer is written back."""
    pipe = open_wan(folder, frames).pipeline
    pipe.denoiser.transformer.requires_grad_(True)
    cfg = TeacherConfig(iterations=iterations, batch_size=64, lr=5e-4, warmup=min(200, iterations // 5),
                        ema_beta=0.999, label_dropout=0.1, noise="flow", flow_t="logit_normal", log_every=500)
    from fdistill.teachers.latent_t2i import TextToImageData

    trainer = TeacherTrainer(cfg, pipe.denoiser.train(), TextToImageData(pipe, LatentSampler(latents, seed=0),
                                                                         torch.device("cpu")))
    training_loop(trainer, progress=False)
    trainer.ema.transformer.save_pretrained(folder / "transformer")


# -- metrics ------------------------------------------------------------------------------------------------------
def gray01(clips: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, H, W] in [-1, 1] -> intensity [N, F, H, W] in [0, 1] (the channels' mean)."""
    return ((clips.float().mean(1) + 1) / 2).clamp(0, 1)


def centroids(clips: torch.Tensor) -> torch.Tensor:
    """[N, F, 2]: each frame's intensity centroid (row, column) in pixels; the canvas centre for a black frame."""
    g = gray01(clips)
    h, w = g.shape[-2:]
    mass = g.sum((-2, -1))
    rows = (g.sum(-1) * torch.arange(h, dtype=g.dtype)).sum(-1)
    cols = (g.sum(-2) * torch.arange(w, dtype=g.dtype)).sum(-1)
    c = torch.stack([rows, cols], -1) / mass.clamp_min(1e-8)[..., None]
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=g.dtype)
    return torch.where((mass > 1e-3)[..., None], c, centre)


def direction_correct(clips: torch.Tensor, directions: torch.Tensor, min_shift: float = 1.0) -> torch.Tensor:
    """Per clip: whether the centroid's displacement from the first to the last frame along the prompted
    direction's axis is at least ``min_shift`` px the prompted way (``AXIS``: up = rows decreasing)."""
    c = centroids(clips)
    shift = c[:, -1] - c[:, 0]
    axis = torch.tensor([AXIS[DIRECTIONS[int(d)]][0] for d in directions])
    sign = torch.tensor([AXIS[DIRECTIONS[int(d)]][1] for d in directions], dtype=shift.dtype)
    return shift.gather(1, axis[:, None])[:, 0] * sign >= min_shift


def frame_digits(clips: torch.Tensor) -> torch.Tensor:
    """[N F, 1, 8, 8] in [-1, 1]: every frame's 16 x 16 window centred on its intensity centroid (the canvas
    padded with black, so the crop moves with the digit), averaged 2x2: ``t2i_digits.to_digits``' 8x8 gray."""
    n, _, f, h, w = clips.shape
    g = gray01(clips).reshape(n * f, h, w)
    c = centroids(clips).reshape(n * f, 2)
    half = DIGIT // 2
    padded = F.pad(g, (half, half, half, half))
    top = (c - (DIGIT - 1) / 2).round().long() + half
    idx = torch.arange(DIGIT)
    rows = (top[:, 0, None] + idx).clamp(0, h + DIGIT - 1)
    cols = (top[:, 1, None] + idx).clamp(0, w + DIGIT - 1)
    crops = padded[torch.arange(n * f)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return F.avg_pool2d(crops[:, None] * 2 - 1, 2)


def identity_consistency(classes: torch.Tensor) -> float:
    """The share of clips whose frames all get the same class (``classes`` [N, F])."""
    return float((classes == classes[:, :1]).all(1).double().mean())


def digit_accuracy(classes: torch.Tensor, digits: torch.Tensor) -> float:
    """The share of clips whose majority class over frames (ties: the smallest class) is the prompted digit."""
    return float((torch.mode(classes, 1).values == digits).double().mean())


def real_reference() -> torch.Tensor:
    """The 1,797 real digits through ``frame_digits``: each 16 x 16 digit placed on the canvas and cropped around
    its centroid (the crop commutes with whole-pixel moves, so real clips score as the real digits)."""
    data = load_dataset("digits")
    still = np.stack([place(np.repeat(np.repeat(img[0], 2, 0), 2, 1), 0, 0, 8, 8, 1) for img in data.images])
    return frame_digits(clips_float(still))


@torch.no_grad()
def score(x: torch.Tensor, digits: torch.Tensor, directions: torch.Tensor, seconds: float,
          prompts: list[str] | None = None) -> dict:
    """Per-frame digits-FID, precision and recall (every frame of every clip, ``frame_digits``, in the digits
    classifier's features against ``real_reference``); digit accuracy, direction accuracy
    (``direction_correct``), identity consistency; with ``prompts`` whose every string was drawn at least twice,
    the in-batch similarity (``t2i_metrics.in_batch_similarity``: mean cosine between clips of the same prompt of
    their frames' features, centred on the real digits' mean, concatenated over frames; lower is more diverse);
    seconds per 1000 clips."""
    from fdistill.evaluation.digits_classifier import load_digits_classifier
    from fdistill.evaluation.metrics import evaluate_features
    from fdistill.evaluation.t2i_metrics import in_batch_similarity

    clf = load_digits_classifier(progress=False)
    n, f = x.shape[0], x.shape[2]
    f_real, frames = clf.features(real_reference()), frame_digits(x)
    f_fake = clf.features(frames)
    out = {k: v for k, v in evaluate_features(f_real, f_fake).items() if not k.startswith("num_")}
    classes = clf(frames).argmax(1).reshape(n, f)
    out.update(digit_accuracy=digit_accuracy(classes, digits),
               direction_accuracy=float(direction_correct(x, directions).double().mean()),
               identity_consistency=identity_consistency(classes))
    if prompts is not None and np.unique(prompts, return_counts=True)[1].min() >= 2:
        _, group = np.unique(prompts, return_inverse=True)
        per_clip = (f_fake - f_real.mean(0)).reshape(n, -1)
        out["in_batch_similarity"] = in_batch_similarity(per_clip, torch.as_tensor(group))[0]
    return {**out, "s_per_1000": 1000 * seconds / n}


def prompts_for(n: int, seed: int = 1) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` prompts: digit i % 10, direction (i // 10) % 4, a phrasing drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    digits, directions = torch.arange(n) % 10, (torch.arange(n) // 10) % 4
    return [caption(int(d), int(v), rng) for d, v in zip(digits, directions)], digits, directions


def strip_prompts(prompts: list[str]) -> list[int]:
    """Indices of ``STRIP`` prompts for strip.png: one per direction (digits 0, 1, 2, 3 of the first rows)."""
    return [i for i in (0, 11, 22, 33) if i < len(prompts)][:STRIP]


def table(rows: dict[str, dict]) -> str:
    """The markdown table, a row per model."""
    keys = [("fid", "per-frame digits-FID", 2), ("precision", "precision", 3), ("recall", "recall", 3),
            ("digit_accuracy", "digit accuracy", 3), ("direction_accuracy", "direction accuracy", 3),
            ("identity_consistency", "identity consistency", 3), ("in_batch_similarity", "in-batch similarity", 3),
            ("s_per_1000", "s / 1000 clips", 2), ("s_per_iteration", "s / training iteration", 3)]

    def cell(v, digits: int) -> str:
        if v is None:
            return ""
        return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if isinstance(v, (tuple, list)) else f"{v:.{digits}f}"

    lines = ["| model | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r.get(k), d) for k, _, d in keys) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def target(rows: dict[str, dict], teacher: str) -> str:
    """The issue's target as one line: the best student (lowest mean per-frame FID) within 10% of the teacher's FID,
    its direction accuracy within 3 points of the teacher's."""
    def mean(v):
        return v[0] if isinstance(v, (tuple, list)) else v

    t = rows[teacher]
    students = {k: r for k, r in rows.items() if "NFE" in k and not k.startswith("teacher")}
    if not students:
        return "target: no students"
    name, best = min(students.items(), key=lambda kv: mean(kv[1]["fid"]))
    fid, gap = mean(best["fid"]), mean(best["direction_accuracy"]) - t["direction_accuracy"]
    met = fid <= 1.1 * t["fid"] and gap >= -0.03
    return (f"target {'met' if met else 'missed'}: best student {name}, per-frame FID {fid:.2f} against the teacher's "
            f"{t['fid']:.2f} (limit {1.1 * t['fid']:.2f}), direction accuracy {gap:+.3f} from the teacher's "
            f"{t['direction_accuracy']:.3f} (limit -0.030)")


# -- students -----------------------------------------------------------------------------------------------------
def student_overrides(latents: Path, run: str, iterations: int, guidance: float, generator_t: float,
                      extra: list[str] = (), frames: int = FRAMES) -> list[str]:
    """``t2i_digits.student_overrides`` (flow_digits' settings) with the flow noise levels, the generator at
    ``generator_t`` and the Wan teacher's options, then ``extra``."""
    if not 0 < generator_t < 1:
        raise ValueError(f"--generator-t must be in (0, 1) (rectified-flow time), got {generator_t}")
    wan = ["distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]",
           f"distill.generator_sigma={generator_t / (1 - generator_t):.9g}", *option_overrides(frames)]
    return bench.student_overrides(latents, run, iterations, [*wan, *extra], guidance)


def distill_cli(run_dir: Path, teacher: Path, overrides: list[str], threads: int) -> tuple[float, float]:
    """``fdistill distill`` into ``run_dir`` (skipped when it holds checkpoints; a folder without them is started
    over): (seconds in this call, seconds per iteration, kept in <run_dir>/train_seconds.json)."""
    from fdistill.apps import cli

    timing = run_dir / "train_seconds.json"
    if (run_dir / "checkpoints").is_dir():
        return 0.0, json.loads(timing.read_text())["per_iteration"] if timing.is_file() else float("nan")
    t0 = time.perf_counter()
    argv = ["distill", "--teacher", str(teacher), "--out", str(run_dir), "--device", "cpu", "--threads", str(threads),
            "--no-progress", *(["--overwrite"] if run_dir.exists() else []), *overrides]
    if cli.main(argv) != 0:
        raise SystemExit(f"fdistill distill failed for {run_dir}")
    seconds = time.perf_counter() - t0
    iterations = next(int(o.split("=")[1]) for o in reversed(overrides) if o.startswith("distill.iterations="))
    timing.write_text(json.dumps({"seconds": seconds, "per_iteration": seconds / iterations, "threads": threads}))
    return seconds, seconds / iterations


def cli_outputs(out: Path, run_dir: Path, prompts: list[str], one_step: bool, frames: int, say) -> None:
    """``fdistill sample`` on ``SHOWN`` prompts into <run_dir>/samples; for a one-step student ``fdistill export
    --diffusers`` into <out>/export/<run>, whose WanPipeline one call (guidance_scale=1) on the strip's prompts is
    drawn as <out>/<run>-pipeline.png."""
    from fdistill.apps import cli
    from fdistill.data.video import save_clip_grid

    file = out / "shown-prompts.txt"
    file.write_text("".join(f"{p}\n" for p in prompts[:SHOWN]))
    if cli.main(["sample", "--checkpoint", str(run_dir), "--prompts", str(file), "--out", str(run_dir / "samples"),
                 "--device", "cpu", "--no-progress"]) != 0:
        raise SystemExit(f"fdistill sample failed for {run_dir}")
    if not one_step:
        return
    export = out / "export" / run_dir.name
    shutil.rmtree(export, ignore_errors=True)
    if cli.main(["export", "--checkpoint", str(run_dir), "--diffusers", str(export)]) != 0:
        raise SystemExit(f"fdistill export failed for {run_dir}")
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(export, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    shown = [prompts[i] for i in strip_prompts(prompts)]
    with torch.no_grad():
        video = pipe(shown, num_inference_steps=1, guidance_scale=1.0, height=CANVAS, width=CANVAS, num_frames=frames,
                     max_sequence_length=MSL, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    save_clip_grid(video * 2 - 1, out / f"{run_dir.name}-pipeline.png", scale=4)  # [N, F, 3, H, W] in [0, 1]
    say(f"exported {export}; its pipeline's clips: {out / f'{run_dir.name}-pipeline.png'}")


def distill_and_score(out: Path, teacher: Path, latents: Path, args, prompts: list[str], digits: torch.Tensor,
                      directions: torch.Tensor, rows: dict, strips: dict, say, tag: str = "") -> None:
    """Every student of ``--student-steps`` x ``--runs`` x ``--seeds`` (run folders <out>/<run><tag>...):
    distilled (``distill_cli``) or reused, scored
    (``bench.sample_student`` on the run folder), a row per kind and run (mean ± std over seeds) in ``rows``, the
    first seed's strip clips in ``strips``; with ``--via cli`` the first seed's ``cli_outputs``."""
    students = bench.student_kinds(args.student_steps, args.student_input, args.student_sampler)
    for k, mode, sampler, run, name, steps in bench.student_plan(args, students, tag):
        seeds = []
        for seed in range(args.seeds):
            run_dir = out / f"{name}{f'-seed{seed}' if seed else ''}"
            overrides = student_overrides(latents, run, args.distill_iterations, args.guidance, args.generator_t,
                                          [*steps, *args.overrides, f"distill.seed={seed}"], args.frames)
            seconds, per_iteration = distill_cli(run_dir, teacher, overrides, args.threads)
            if seconds:
                say(f"distilled {run_dir.name} in {seconds:.0f} s")
            x, seconds = bench.sample_student(run_dir, prompts)
            seeds.append({**score(x, digits, directions, seconds, prompts), "s_per_iteration": per_iteration})
            if seed == 0:
                strips[f"{run}, {k} NFE" + (f", {mode}, {sampler}" if mode else "")] = \
                    x[strip_prompts(prompts)]
                if args.via == "cli":
                    cli_outputs(out, run_dir, prompts, k == 1, args.frames, say)
            say(f"{run_dir.name}: {seeds[-1]}")
        rows[bench.student_row(run, k, mode, sampler, len(seeds))] = bench.mean_std(seeds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="distillation config overrides (key=value) for every student")
    p.add_argument("--runs", default=bench.RUNS)
    p.add_argument("--frames", type=int, default=FRAMES, choices=(5, 9), help="frames per clip (4n + 1)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--teacher-iterations", type=int, default=24000)
    p.add_argument("--teacher-heads", type=int, default=4, help="the transformer's width in heads of 16")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--distill-iterations", type=int, default=1000)
    p.add_argument("--generator-t", type=float, default=GENERATOR_T,
                   help="the flow time the one-step generator is evaluated at (sigma = t / (1 - t))")
    p.add_argument("--num", type=int, default=2000, help="clips per model for the metrics")
    p.add_argument("--clips", type=int, default=0, help="train on this many of the 7,188 clips (0: all; smoke runs)")
    p.add_argument("--out", default="runs/bench-video-digits")
    bench.add_student_arguments(p, "flow times linspace(t, 0, k + 1) from --generator-t")
    p.add_argument("--via", default="cli", choices=("cli", "python"),
                   help="cli: fdistill prepare-latents on the MP4 folder, fdistill sample and export per student; "
                        "python: encode_clips instead, no sample/export (students are distilled by the CLI either way)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, t_start = Path(args.out), time.perf_counter()
    timing: dict[str, float] = {}

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", flush=True)

    def timed(name: str, t0: float) -> None:
        timing[name] = time.perf_counter() - t0
        say(f"{name}: {timing[name]:.0f} s")

    tag = (f"-f{args.frames}" if args.frames != FRAMES else "") + (f"-c{args.clips}" if args.clips else "")
    data, teacher, latents = out / f"data{tag}", out / f"teacher{tag}", out / f"latents{tag}"
    t0 = time.perf_counter()
    clips, clip_digits, clip_dirs, captions = moving_digits(args.frames)
    if args.clips:  # a smoke run's subset, drawn once
        keep = np.random.default_rng(0).permutation(len(clips))[:args.clips]
        clips, clip_digits, clip_dirs, captions = clips[keep], clip_digits[keep], clip_dirs[keep], \
            [captions[i] for i in keep]
    write_clip_folder(data, clips, captions)
    mae = mp4_round_trip(data, clips)
    timed("data", t0)
    say(f"{len(clips)} clips in {data}; MP4 round trip: mean absolute error {mae:.2f} / 255")
    if not (teacher / "vae-trained").is_file():
        t0 = time.perf_counter()
        vae, loss = train_vae(clips_float(clips), args.vae_steps, say=say)
        shutil.rmtree(teacher, ignore_errors=True)
        shutil.rmtree(latents, ignore_errors=True)  # encoded by another VAE
        save_wan_pipeline(teacher, vae, heads=args.teacher_heads, layers=args.teacher_layers)
        timed("vae", t0)
        (teacher / "vae-trained").write_text(json.dumps({"loss": loss, "steps": args.vae_steps,
                                                         "seconds": timing["vae"], "threads": args.threads}))
        say(f"VAE trained ({args.vae_steps} steps, final loss {loss:.4f})")
    if not (latents / "done").is_file():
        t0 = time.perf_counter()
        shutil.rmtree(latents, ignore_errors=True)
        prepare_latents(teacher, data, latents, args.via, args.threads, args.frames)
        (latents / "done").write_text(args.via)
        timed("latents", t0)
    if not (teacher / "trained").is_file():
        t0 = time.perf_counter()
        train_teacher(teacher, latents, args.teacher_iterations, args.frames)
        timed("teacher", t0)
        (teacher / "trained").write_text(json.dumps({"iterations": args.teacher_iterations,
                                                     "seconds": timing["teacher"], "threads": args.threads}))
    prompts, digits, directions = prompts_for(args.num)
    rows, wan = {}, open_wan(teacher, args.frames)
    t0 = time.perf_counter()
    real_idx = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:min(args.num, len(clips))]
    real = clips_float(clips[real_idx.numpy()])
    real_digits, real_dirs = (torch.as_tensor(a[real_idx.numpy()]) for a in (clip_digits, clip_dirs))
    rows["real clips"] = score(real, real_digits, real_dirs, 0.0)
    with torch.no_grad():  # the floor any model in the VAE's latent space stands on
        through = torch.cat([wan.codec.decode(wan.codec.encode(real[i:i + 250], torch.Generator().manual_seed(i)))
                             for i in range(0, len(real), 250)])
    rows["real clips through the VAE (the floor)"] = score(through, real_digits, real_dirs, 0.0)
    x, seconds = bench.sample_teacher(teacher, prompts, guidance=args.guidance,
                                      load=lambda f: open_wan(f, args.frames).pipeline)
    rows[f"teacher (35 NFE, CFG {args.guidance:g})"] = score(x, digits, directions, seconds, prompts)
    strips = {"teacher, 35 NFE": x[strip_prompts(prompts)]}
    timed("teacher scored", t0)
    say(f"teacher: {rows[f'teacher (35 NFE, CFG {args.guidance:g})']}")
    t0 = time.perf_counter()
    student_tag = tag + ("" if args.guidance == bench.GUIDANCE else f"-cfg{args.guidance:g}") + \
        ("" if args.generator_t == GENERATOR_T else f"-t{args.generator_t:g}")
    distill_and_score(out, teacher, latents, args, prompts, digits, directions, rows, strips, say, student_tag)
    timed("students", t0)

    from fdistill.data.video import save_clip_grid

    save_clip_grid(torch.cat(list(strips.values())), out / f"strip{tag}.png", layout="CFHW", scale=4,
                   label_frames=True)
    say(f"strip{tag}.png: {STRIP} clips each of " + ", ".join(strips))
    timing["total"] = time.perf_counter() - t_start
    head = (f"moving digits, {args.frames} frames of {CANVAS} x {CANVAS}, {args.num} prompted clips per model, "
            f"{args.vae_steps} VAE steps, {args.teacher_iterations} teacher iterations, {args.distill_iterations} "
            f"distillation iterations (batch 64), {args.seeds} seed(s) per student, {args.threads} CPU threads, "
            f"{timing['total']:.0f} s in this call")
    verdict = target(rows, f"teacher (35 NFE, CFG {args.guidance:g})")
    print(f"\n{head}\n\n{table(rows)}\n\n{verdict}")
    (out / f"table{tag}.md").write_text(f"{head}\n\n{table(rows)}\n\n{verdict}\n")
    (out / f"results{tag}.json").write_text(json.dumps({"rows": rows, "seconds": timing, "mp4_round_trip_mae": mae,
                                                        "target": verdict, "via": args.via, "args": vars(args)},
                                                       indent=1))
    print(f"\ntotal {timing['total']:.0f} s; table, strip and results.json in {out}")


if __name__ == "__main__":
    main()
