"""Stable Diffusion v1's CLIP tokenizer, built offline from the BPE file that open_clip_torch ships.

The OpenAI CLIP vocabulary is fully determined by its merges file: 256 byte symbols, the same 256 with the
end-of-word marker, one symbol per merge, then the two special tokens. Building it this way gives the exact
ids of ``openai/clip-vit-large-patch14`` (49408 tokens, BOS 49406, EOS 49407, padded with EOS to 77)
without touching a model hub.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
MODEL_MAX_LENGTH = 77
# CLIP keeps the first 48894 merges of the file (49152 - 256 - 2): with 512 byte symbols and 2 specials
# that fills the 49408-entry vocabulary exactly.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def open_clip_bpe_path() -> Path:
    """Path of the CLIP BPE merges file that ships inside open_clip_torch."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip_torch is installed without its BPE vocabulary")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) of the OpenAI CLIP tokenizer, read from the gzipped BPE file."""
    path = Path(bpe_path) if bpe_path else open_clip_bpe_path()
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path}: expected {NUM_MERGES} merges, found {len(merges)}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the layout of the Hub's CLIP tokenizers) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def build_clip_tokenizer(out_dir: str | Path):
    """A transformers ``CLIPTokenizer`` with Stable Diffusion v1's ids, saved with save_pretrained."""
    from transformers import CLIPTokenizer

    out = write_clip_tokenizer_files(out_dir)
    tok = CLIPTokenizer(
        vocab=str(out / "vocab.json"),
        merges=str(out / "merges.txt"),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tok.save_pretrained(out)
    return tok
