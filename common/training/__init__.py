"""The training room: the one Accelerate loop both wings train with.

- ``loop``: the loop, its settings, checkpoints and exact resume (``Trainer``, ``TrainConfig``).
- ``loss``: per-sample loss math: Min-SNR weights (Hang et al. 2023) and Wen et al.'s thresholded loss.
"""
