"""diffmem's shared library: model loading, prompts, latents, memorization metrics and samplers.

Nothing in here parses argv or reads globals; the CLIs in detect/, mitigate/ and finetune/ are thin
wrappers that build a typed config and call these functions.
"""

__version__ = "0.1.0"
