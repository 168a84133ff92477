"""CLIP text tokenization (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") from the real CLIP byte-level BPE vocabulary.

The vocabulary is the 16e6 BPE file ``bpe_simple_vocab_16e6.txt.gz`` that the PyPI package ``open_clip_torch``
ships inside its ``open_clip`` folder. fdistill only reads that file: ``open_clip`` itself is never imported
(importing it imports torchvision), so ``pip install --no-deps open_clip_torch`` is enough. The vocabulary is
the one Stable Diffusion's tokenizers use: 256 byte symbols, the same 256 with the end-of-word marker
``</w>``, 48,894 merges, then the start and end tokens, 49,408 ids in all (start = 49406, end = 49407).

- ``clip_tokenizer`` builds a ``transformers.CLIPTokenizer`` from it in memory (transformers >= 5, whose
  CLIPTokenizer takes ``vocab=`` and ``merges=``), for text encoders and pipelines;
- ``tokenize`` gives open_clip's token ids: start, BPE tokens, end, zero padding to ``context_length``,
  truncation keeping the end token; the text is cleaned as open_clip cleans it (ftfy when installed, HTML
  unescaping, whitespace collapsing, lower case).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGE = "open_clip_torch"  # the PyPI distribution whose ``open_clip`` folder holds BPE_FILENAME
BPE_URL = "https://github.com/mlfoundations/open_clip/raw/main/src/open_clip/" + BPE_FILENAME
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # 48,894: the first line of the file is a header
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"  # open_clip calls them <start_of_text>/<end_of_text>
START_ID, END_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # 49406, 49407
CONTEXT_LENGTH = 77


def open_clip_folder() -> Path | None:
    """The installed ``open_clip`` package's folder, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_bpe() -> Path | None:
    """open_clip's copy of the BPE file (None if open_clip is not installed)."""
    folder = open_clip_folder()
    candidate = None if folder is None else folder / BPE_FILENAME
    return candidate if candidate is not None and candidate.is_file() else None


def clip_bpe_path(path: str | Path | None = None) -> Path:
    """The CLIP BPE file: ``path`` (the .txt.gz file, or a folder holding it) if given, else the copy inside the
    installed ``open_clip`` package. Raises FileNotFoundError saying where to get it."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / BPE_FILENAME
        if p.is_file():
            return p
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {p}. It is {BPE_FILENAME} from the "
                                f"{BPE_PACKAGE} package (pip install --no-deps {BPE_PACKAGE}) or {BPE_URL}.")
    found = _bundled_bpe()
    if found is None:
        raise FileNotFoundError(f"CLIP BPE vocabulary {BPE_FILENAME} not found: install it with `pip install "
                                f"--no-deps {BPE_PACKAGE}` (the file ships inside its open_clip folder; --no-deps "
                                f"keeps pip from pulling torchvision), or download {BPE_URL} and pass its path.")
    return found


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in vocabulary order: the bytes that are printable
    Latin-1 characters map to themselves (in increasing order), the other 68 bytes to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=4)
def _read_vocab_and_merges(path: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not the CLIP BPE file {BPE_FILENAME}: expected {NUM_MERGES} merge lines "
                         "after the header")
    symbols = _byte_symbols()
    tokens = (*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START_TOKEN, END_TOKEN)
    return merges, tokens


def clip_vocab_and_merges(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary {token: id} (49,408 entries, ids in open_clip's SimpleTokenizer order; 49406 is the
    start token ``<|startoftext|>``, 49407 the end token ``<|endoftext|>``) and the ranked BPE merges."""
    merges, tokens = _read_vocab_and_merges(str(clip_bpe_path(path)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, list(merges)


def _build_tokenizer(bpe_path: str, max_length: int):
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError("the CLIP tokenizer needs the transformers package: pip install transformers") from e
    vocab, merges = clip_vocab_and_merges(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@lru_cache(maxsize=4)
def _cached_tokenizer(bpe_path: str, max_length: int):
    return _build_tokenizer(bpe_path, max_length)


def clip_tokenizer(folder: str | Path | None = None, max_length: int = CONTEXT_LENGTH,
                   bpe_path: str | Path | None = None):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary (start/end/unk/pad = ``<|startoftext|>`` /
    ``<|endoftext|>``, as Stable Diffusion's tokenizer) and ``model_max_length=max_length``.

    With ``folder``, the tokenizer is also saved there (tokenizer.json and config, plus vocab.json and merges.txt)
    and returned as loaded back from it, so a pipeline saved next to it finds a tokenizer offline.

    Its text normalisation is transformers' (NFC, whitespace collapsed, lower case), as for Stable Diffusion's
    tokenizer; ``tokenize`` below adds open_clip's ftfy / HTML clean-up and is the exact open_clip path."""
    bpe = str(clip_bpe_path(bpe_path))
    if folder is None:
        return _build_tokenizer(bpe, max_length)
    from transformers import CLIPTokenizer

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    _cached_tokenizer(bpe, max_length).save_pretrained(str(folder))
    # transformers 5 saves tokenizer.json only; the classic files keep the folder readable by older versions too
    vocab, merges = clip_vocab_and_merges(bpe)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def clean_text(text: str) -> str:
    """open_clip's default text cleaning: ftfy.fix_text (when ftfy is installed; else NFC normalisation only),
    HTML unescaping twice, whitespace collapsed to single spaces, lower case."""
    try:
        import ftfy
    except ImportError:
        text = unicodedata.normalize("NFC", text)
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


# open_clip's own names for the start/end tokens: its SimpleTokenizer maps these strings, when they occur in a
# text as a whole pre-tokenization piece, to the special ids.
_OPEN_CLIP_SPECIALS = {"<start_of_text>": START_ID, "<end_of_text>": END_ID}
_OPEN_CLIP_PIECES = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


def _encode_with_open_clip_specials(tok, text: str) -> list[int]:
    """BPE ids of a cleaned text that names open_clip's special tokens (the rare path of ``tokenize``)."""
    import regex  # a dependency of transformers

    ids: list[int] = []
    segment: list[str] = []

    def flush():
        if segment:
            ids.extend(tok(" ".join(segment), add_special_tokens=False, split_special_tokens=True,
                           verbose=False)["input_ids"])
            segment.clear()

    for piece in regex.findall(_OPEN_CLIP_PIECES, text, flags=regex.IGNORECASE):
        if piece in _OPEN_CLIP_SPECIALS:
            flush()
            ids.append(_OPEN_CLIP_SPECIALS[piece])
        else:
            segment.append(piece)
    flush()
    return ids


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             bpe_path: str | Path | None = None) -> Tensor:
    """open_clip's token ids (LongTensor (N, context_length)): start 49406, the BPE tokens, end 49407, zeros after.
    A text longer than ``context_length`` is cut and its last kept position set to the end token. The strings
    "<|startoftext|>" / "<|endoftext|>" inside a text are tokenized as plain text and "<start_of_text>" /
    "<end_of_text>" as the special ids, as open_clip does."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if len(texts) == 0:
        return torch.zeros(0, context_length, dtype=torch.long)
    tok = _cached_tokenizer(str(clip_bpe_path(bpe_path)), CONTEXT_LENGTH)  # truncation is done below
    cleaned = [clean_text(t) for t in texts]
    body = tok(cleaned, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    out = torch.zeros(len(cleaned), context_length, dtype=torch.long)
    for i, text in enumerate(cleaned):
        ids = body[i]
        if any(name in text for name in _OPEN_CLIP_SPECIALS):
            ids = _encode_with_open_clip_specials(tok, text)
        row = [START_ID, *ids[: context_length - 2], END_ID]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
