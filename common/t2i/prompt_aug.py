"""Caption augmentations that weaken the text-image link of duplicated training data.

Somepalli et al. 2023 ("Understanding and Mitigating Copying in Diffusion Models", Sec. 5) insert random
words or numbers into training captions; Wen et al. 2024 (Sec. 5, Table 2) use the same three styles as
training-time and inference-time baselines. The reference code draws from numpy's global RNG; here every
draw comes from the ``numpy.random.Generator`` the caller passes, so an augmented caption is a function of
(prompt, style, repeat_num, generator state) only.
"""

from __future__ import annotations

import numpy as np

from diffmem.common.t2i.options import PROMPT_AUG_STYLES as STYLES

# Wen et al. draw random words as single CLIP token ids below 49400 (the vocabulary without its special ids).
RANDOM_TOKEN_ID_LIMIT = 49400
# Somepalli et al. insert integers below 100000.
RANDOM_NUMBER_LIMIT = 100000


def insert_word(prompt: str, word: str, generator: np.random.Generator) -> str:
    """Insert ``word`` between two space-separated words, at one of the len+1 gaps uniformly (Somepalli et al., Sec.
    5)."""
    words = prompt.split(" ")
    words.insert(int(generator.integers(0, len(words) + 1)), word)
    return " ".join(words)


def augment_prompt(prompt: str, style: str, repeat_num: int, generator: np.random.Generator,
                   tokenizer=None) -> str:
    """``repeat_num`` random insertions of a token (rand_word_add), an integer (rand_numb_add) or one of the
    prompt's own words (rand_word_repeat) (Somepalli et al. 2023, Sec. 5; Wen et al. 2024, Sec. 5).

    rand_word_add decodes a uniformly drawn CLIP token id, so it needs the model's tokenizer.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt augmentation style {style!r}; expected one of {', '.join(STYLES)}")
    if repeat_num < 0:
        raise ValueError(f"repeat_num must be >= 0, got {repeat_num}")
    if style == "rand_word_add" and tokenizer is None:
        raise ValueError("rand_word_add needs the tokenizer to decode random token ids")
    # rand_word_repeat draws from the original words, not from words it has already inserted.
    own_words = prompt.split(" ")
    for _ in range(repeat_num):
        if style == "rand_numb_add":
            word = str(int(generator.integers(0, RANDOM_NUMBER_LIMIT)))
        elif style == "rand_word_add":
            word = tokenizer.decode([int(generator.integers(0, RANDOM_TOKEN_ID_LIMIT))])
        else:
            word = own_words[int(generator.integers(0, len(own_words)))]
        prompt = insert_word(prompt, word, generator)
    return prompt
