"""The offline-built CLIP tokenizer must give Stable Diffusion v1's ids."""

from __future__ import annotations

import html
import json

import pytest
from conftest import SHARED_DATA

from diffmem.common.t2i.tokenizer import (
    BOS_ID,
    EOS_ID,
    MODEL_MAX_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
    bytes_to_unicode,
)

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "The No Limits Business Woman Podcast",
    "Café crème — naïve façade, 100% ½ price!!",
    "Mothers influence on her young hippo",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder), SimpleTokenizer()


def open_clip_ids(simple, text: str) -> list[int]:
    return [BOS_ID] + simple.encode(text)[: MODEL_MAX_LENGTH - 2] + [EOS_ID]


def test_byte_map_is_a_bijection_onto_printables():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert m[ord("a")] == "a" and m[ord(" ")] == "Ġ"  # space maps to U+0120, as in GPT-2/CLIP


def test_special_ids_and_padding(tokenizers):
    tok, _ = tokenizers
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {49407}
    # Known ids of the OpenAI CLIP vocabulary ("a</w>" = 320, "photo</w>" = 1125, "cat</w>" = 2368).
    assert tok.convert_tokens_to_ids(["a</w>", "photo</w>", "cat</w>"]) == [320, 1125, 2368]


def test_truncation_keeps_eos_at_position_77(tokenizers):
    tok, simple = tokenizers
    text = " ".join(["memorized"] * 120)
    ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == EOS_ID
    assert ids == open_clip_ids(simple, text)


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_equal_open_clip(tokenizers, text):
    tok, simple = tokenizers
    assert tok(text).input_ids == open_clip_ids(simple, text)


@pytest.mark.skipif(not (SHARED_DATA / "sdv1_500_memorized.jsonl").exists(), reason="shared data absent")
def test_ids_equal_open_clip_on_500_memorized_prompts(tokenizers):
    """Equal on every prompt open_clip does not HTML-unescape.

    open_clip's cleaner applies html.unescape (so '&quot' becomes '"'); Stable Diffusion's transformers
    tokenizer, like the slow tokenizer + ftfy that Wen et al. used, feeds such text through unchanged. We keep
    the pipeline's behaviour, and check the exceptions are exactly the prompts html.unescape changes.
    """
    tok, simple = tokenizers
    rows = [json.loads(line) for line in open(SHARED_DATA / "sdv1_500_memorized.jsonl", encoding="utf-8")]
    assert len(rows) == 500
    differ = [r["caption"] for r in rows if tok(r["caption"]).input_ids != open_clip_ids(simple, r["caption"])]
    unescaped = [r["caption"] for r in rows if html.unescape(r["caption"]) != r["caption"]]
    assert set(differ) <= set(unescaped) and len(differ) <= 1
    for text in differ:
        assert tok(html.unescape(text)).input_ids == open_clip_ids(simple, text)


def test_curly_quotes_are_kept_as_the_pipeline_tokenizer_does(tokenizers):
    """A deliberate difference: ftfy (open_clip, old slow tokenizer + ftfy) straightens curly quotes, while
    the transformers tokenizer that diffusers pipelines load today keeps them. diffmem scores a prompt exactly
    as the pipeline would encode it for generation, so it follows the pipeline's tokenizer."""
    tok, simple = tokenizers
    curly, straight = "“quoted”", '"quoted"'
    assert tok(curly).input_ids != tok(straight).input_ids
    assert open_clip_ids(simple, curly) == tok(straight).input_ids
