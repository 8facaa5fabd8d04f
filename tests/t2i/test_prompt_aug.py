"""Caption augmentations (Somepalli et al. 2023; Wen et al. 2024 baselines): exact insertions, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.common.t2i.prompt_aug import RANDOM_NUMBER_LIMIT, RANDOM_TOKEN_ID_LIMIT, augment_prompt, insert_word


class FakeTokenizer:
    """decode([id]) -> 'tok<id>', so the drawn ids can be read back from the caption."""

    def decode(self, ids):
        assert len(ids) == 1
        return f"tok{ids[0]}"


def remove_one(words: list[str], inserted: set[str]) -> list[str]:
    return [w for w in words if w not in inserted]


def test_insert_word_position_matches_an_independent_draw():
    words = "a red fox jumps".split()
    for seed in range(20):
        pos = int(np.random.default_rng(seed).integers(0, len(words) + 1))
        expected = " ".join(words[:pos] + ["NEW"] + words[pos:])
        assert insert_word("a red fox jumps", "NEW", np.random.default_rng(seed)) == expected


def test_insert_word_reaches_every_gap_including_both_ends():
    rng = np.random.default_rng(0)
    positions = {insert_word("x y", "N", rng).split().index("N") for _ in range(200)}
    assert positions == {0, 1, 2}


def test_rand_numb_add_inserts_repeat_num_integers_and_keeps_the_words_in_order():
    prompt = "an astronaut riding a horse"
    out = augment_prompt(prompt, "rand_numb_add", 3, np.random.default_rng(1))
    words = out.split()
    numbers = [w for w in words if w.isdigit()]
    assert len(words) == len(prompt.split()) + 3
    assert len(numbers) == 3 and all(0 <= int(n) < RANDOM_NUMBER_LIMIT for n in numbers)
    assert [w for w in words if not w.isdigit()] == prompt.split()


def test_rand_numb_add_numbers_are_the_generator_draws():
    # Each insertion draws the number, then the gap: replay that order with an identical generator.
    replay = np.random.default_rng(7)
    expected = "a b"
    for _ in range(2):
        number = str(int(replay.integers(0, RANDOM_NUMBER_LIMIT)))
        words = expected.split(" ")
        pos = int(replay.integers(0, len(words) + 1))
        expected = " ".join(words[:pos] + [number] + words[pos:])
    assert augment_prompt("a b", "rand_numb_add", 2, np.random.default_rng(7)) == expected


def test_rand_word_add_decodes_token_ids_below_the_special_ids():
    out = augment_prompt("a photo of a cat", "rand_word_add", 4, np.random.default_rng(2), tokenizer=FakeTokenizer())
    added = [w for w in out.split() if w.startswith("tok")]
    assert len(added) == 4
    assert all(0 <= int(w[3:]) < RANDOM_TOKEN_ID_LIMIT for w in added)
    assert remove_one(out.split(), set(added)) == "a photo of a cat".split()


def test_rand_word_add_with_the_real_clip_tokenizer(tmp_path):
    from diffmem.common.t2i.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    out = augment_prompt("a photo of a cat", "rand_word_add", 2, np.random.default_rng(3), tokenizer=tok)
    assert out != "a photo of a cat"
    assert len(tok(out).input_ids) > len(tok("a photo of a cat").input_ids)


def test_rand_word_repeat_only_inserts_the_prompts_own_words():
    prompt = "mountain lake at dawn"
    out = augment_prompt(prompt, "rand_word_repeat", 5, np.random.default_rng(4))
    words = out.split()
    assert len(words) == 4 + 5
    assert set(words) <= set(prompt.split())
    for w in prompt.split():
        assert words.count(w) >= 1


def test_same_generator_seed_same_caption_and_seeds_differ():
    outs = {augment_prompt("a b c d", "rand_numb_add", 2, np.random.default_rng(s)) for s in range(10)}
    again = {augment_prompt("a b c d", "rand_numb_add", 2, np.random.default_rng(s)) for s in range(10)}
    assert outs == again
    assert len(outs) == 10


def test_repeat_num_zero_is_identity():
    assert augment_prompt("keep me", "rand_word_repeat", 0, np.random.default_rng(0)) == "keep me"


def test_bad_style_and_missing_tokenizer_are_rejected():
    with pytest.raises(ValueError, match="unknown prompt augmentation style"):
        augment_prompt("a", "shuffle", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        augment_prompt("a", "rand_word_add", 1, np.random.default_rng(0))
