"""diffmem's library.

``common`` itself holds what both arms use: the training loop (``trainer``), loss math (``train_loss``), seeding,
crash-safe results, jsonl reading, CLI helpers, errors, plotting, detection metrics and SSCD similarity.
The two wings build on it: ``common.t2i`` (text-to-image: Stable Diffusion pipelines, Wen et al.'s detection,
explanation and mitigation, the lab) and ``common.edm`` (unconditional EDM models). The wings never import each
other, and nothing in ``common`` imports a CLI folder (detect/, mitigate/, finetune/, data/).

Nothing in here parses argv or reads globals; the CLIs are thin wrappers that build a typed config and call
these functions.
"""

__version__ = "0.1.0"
