"""The mitigation room: every inference-time mitigation of memorization, one module per paper, and the harness.

- ``options``: the mitigation CLIs' options without torch — each method's settings, the registry (what each
  ``--method`` reads, its knob, its paper), RunOptions and MitigationSettings.
- ``methods``: the registry's hooks — how each method generates a batch.
- ``run``: a mitigation run over a prompt set (generate, SSCD to ground truth, CLIP score, resume).
- ``tradeoff``: the replication–alignment trade-off: which runs a sweep makes, its points and its plot.
- ``side_by_side``: the picture of runs × prompts (each prompt's first generation, ground truth first).
- ``prompt_embedding``: Wen et al., ICLR 2024, Sec. 5 (``--method ours``): the prompt embedding optimised against
  the text-conditional noise magnitude.
- ``guidance_schedule``: Jain et al., CVPR 2025 (``jain_stp``, ``jain_dtp``, ``jain_og``).
- ``init_noise``: Han et al., NeurIPS 2025 (``han_batch``, ``han_sample``).
- ``attention_rescale``: Ren et al., ECCV 2024 (``ren_attn``).
- ``embedding_noise``: Somepalli et al., NeurIPS 2023 (``gni``).
- ``bright_ending``: Chen et al., ICLR 2025 (``ours --be_mask``).
- ``guard``: Zhao et al., ICML 2026, GUARD (``guard``).
- ``prss``: Chen et al., CVPR 2025, PRSS (``prss``).
- ``clip_pad``: the CLIP padding fix, CVPR 2026 Findings (``clip_pad``).
"""
