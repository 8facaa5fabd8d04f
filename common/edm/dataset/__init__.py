"""The dataset room: EDM dataset zips and the data they are built from.

- ``edm_zip``: EDM dataset zips built from CIFAR-10, an image folder, another zip or scikit-learn's digits
  (DiffMemorize's subsets and label rules), and read back.
- ``molrg``: MoLRG, the mixture of low-rank Gaussians of Zhang et al. (ICML 2024).
"""
