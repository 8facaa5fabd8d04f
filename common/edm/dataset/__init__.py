"""The dataset room: EDM dataset zips and the data they are built from.

- ``edm_zip``: the zip format (NVlabs/edm's ``dataset_tool.py`` layout, float members for MoLRG), its members read
  within bounds, written atomically and read back (``load_dataset_zip``, ``ImageDataset``).
- ``sources``: what a zip is built from: CIFAR-10's python tarball, an image folder, another zip, scikit-learn's digits.
- ``recipe``: which images and labels go in: DiffMemorize's subset, intra-class mix and label rules (pure
  functions) and ``build_dataset``.
- ``molrg``: MoLRG, the mixture of low-rank Gaussians of Zhang et al. (ICML 2024).
- ``planted``: planted near-duplicates, where exact optimal-denoiser answers and fp32 ones part (tests, benches).
"""
