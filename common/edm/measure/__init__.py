"""The measure room: what is measured on a trained unconditional model.

- ``knn``: exact nearest neighbours in L2, chunked.
- ``mem_ratio``: Gu et al. 2023's memorization ratio, snapshot by snapshot.
- ``reproducibility``: Zhang et al. (ICML 2024)'s SSCD reproducibility and generalization scores.
- ``jacobian``: the denoiser's Jacobian and its numerical rank (Zhang et al.).
"""
