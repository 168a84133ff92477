"""CLIP tokenization from the real CLIP BPE vocabulary (fdistill.evaluation.clip_tokenizer)."""

import importlib.util
import sys

import pytest
import torch

from fdistill.evaluation import clip_tokenizer as text
from fdistill.evaluation.clip_tokenizer import (
    END_ID,
    START_ID,
    VOCAB_SIZE,
    clip_bpe_path,
    clip_vocab_and_merges,
    tokenize,
)

pytest.importorskip("transformers")
if text._bundled_bpe() is None:
    pytest.skip("open_clip_torch (the CLIP BPE file) is not installed: pip install --no-deps open_clip_torch",
                allow_module_level=True)


def padded(ids, length=77):
    return ids + [0] * (length - len(ids))


# Token ids of open_clip's SimpleTokenizer (= OpenAI CLIP's and Stable Diffusion's tokenizer) for these texts:
# "a</w>" 320, "photo</w>" 1125, "of</w>" 539, "cat</w>" 2368, "depicts</w>" 29340.
KNOWN = {
    "a photo of a cat": [START_ID, 320, 1125, 539, 320, 2368, END_ID],
    "A photo depicts ": [START_ID, 320, 1125, 29340, END_ID],
    "": [START_ID, END_ID],
}


@pytest.mark.parametrize("caption", list(KNOWN))
def test_known_open_clip_ids(caption):
    ids = tokenize(caption)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == padded(KNOWN[caption])


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte symbols, then the same with the end-of-word mark
    assert vocab["<|startoftext|>"] == START_ID == 49406 and vocab["<|endoftext|>"] == END_ID == 49407
    assert vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368
    assert merges[0] == ("i", "n") and vocab["in"] == 512  # the first merge is the first token after the bytes


def test_batch_cleaning_and_padding():
    ids = tokenize(["  A   PHOTO of a\tCAT ", "a photo of a cat", "fish &amp; chips", "fish & chips"])
    assert ids.shape == (4, 77)
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[2], ids[3])
    assert (ids[1, 7:] == 0).all()


def test_truncation_keeps_the_end_token():
    long = tokenize("cat " * 200)[0]
    assert long[0] == START_ID and long[-1] == END_ID and (long[1:-1] == 2368).all()
    short = tokenize("a photo of a cat", context_length=5)[0]
    assert short.tolist() == [START_ID, 320, 1125, 539, END_ID]
    exact = tokenize("cat " * 75)[0]  # 75 tokens + start + end = 77: nothing cut
    assert exact[-1] == END_ID and (exact[1:-1] == 2368).all()


def test_special_token_strings_are_tokenized_as_open_clip_does():
    assert tokenize("<|endoftext|>")[0, 1].item() != END_ID  # plain text for open_clip
    assert tokenize("<end_of_text>")[0, :4].tolist() == [START_ID, END_ID, END_ID, 0]  # open_clip's own names


def test_matches_open_clip_simple_tokenizer():
    """The same ids as open_clip's SimpleTokenizer, run from its source file (the open_clip package itself is not
    imported: its __init__ imports torchvision)."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = clip_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("_open_clip_tokenizer", None)
    texts = ["A photo depicts a man riding a horse on the beach.", "Don't STOP, it's what we'll do!",
             "Café naïve résumé straße", "東京タワー 🐱🚀", "curly “quotes” — ‘dash’ …", "3.14 $100 1e-5",
             "mojibake â€™s", "&lt;b&gt; &amp;amp;", "x" * 300, "word " * 90, "<start_of_text> hi"]
    for length in (77, 8):
        assert torch.equal(tokenize(texts, context_length=length), module.tokenize(texts, context_length=length))


def test_clip_tokenizer_in_memory_and_saved(tmp_path):
    from transformers import CLIPTokenizer

    tok = text.clip_tokenizer(max_length=77)
    assert isinstance(tok, CLIPTokenizer) and len(tok) == VOCAB_SIZE and tok.model_max_length == 77
    assert tok.bos_token_id == START_ID and tok.eos_token_id == END_ID
    assert tok("a photo of a cat")["input_ids"] == KNOWN["a photo of a cat"]
    padded_ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    assert len(padded_ids) == 77 and padded_ids[-1] == END_ID  # Stable Diffusion's tokenizer pads with the end id
    saved = text.clip_tokenizer(folder=tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / "vocab.json").is_file() and (tmp_path / "tokenizer" / "merges.txt").is_file()
    assert saved("a photo of a cat")["input_ids"] == KNOWN["a photo of a cat"]


def test_bpe_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz.*open_clip_torch"):
        clip_bpe_path(tmp_path / "nothing.txt.gz")
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        clip_bpe_path(tmp_path)  # a folder without the file
    assert clip_bpe_path(clip_bpe_path().parent) == clip_bpe_path()


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text, "_bundled_bpe", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        clip_bpe_path()


def test_saved_vocab_files_rebuild_the_same_tokenizer(tmp_path):
    """vocab.json + merges.txt alone (the classic format, as transformers 4 reads it) give the same ids."""
    import json

    from transformers import CLIPTokenizer

    text.clip_tokenizer(folder=tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and len(vocab) == VOCAB_SIZE
    rebuilt = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges[1:]])
    assert rebuilt("a photo of a cat")["input_ids"] == KNOWN["a photo of a cat"]


def test_empty_batch():
    assert tokenize([]).shape == (0, 77)
