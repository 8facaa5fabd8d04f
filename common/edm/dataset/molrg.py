"""MoLRG: a mixture of low-rank Gaussians, Zhang et al.'s synthetic data for the Jacobian-rank experiments.

Images are C×H×W = 3×res×res, seen as vectors of D = 3·res² values (flattened C×H×W, row-major). A seeded random
orthogonal D×D matrix Q (``random_orthogonal``: QR of a Gaussian with the signs of R's diagonal moved into Q, which
makes Q Haar-distributed) gives the class bases: class k spans columns d·k … d·(k+1) − 1 of Q, so the K classes
span mutually orthogonal d-dimensional subspaces (K·d ≤ D). A sample of class k is x = U_k g with g ~ N(0, I_d):
real-valued and noise-free, so its covariance is U_k U_kᵀ and each pixel has variance d/D on average (‖x‖² ~ χ²_d).
Samples are class-major (all of class 0, then class 1, …), labelled by class.

Zhang et al. (huijieZH/Diffusion-Model-Generalizability, ``training/dataset.py``) draw U from torch's SVD of a
Gaussian and fill H×W×3 images; the distribution is the same (Haar bases), the draws are not. Ours use
``numpy.random.default_rng(SeedSequence([seed, stream]))`` with one stream for the basis and one for the samples
(``common.edm.dataset.edm_zip.draw_generator``). The values are already the model's input (no uint8 quantisation, no
[−1, 1] rescaling): ``common.edm.dataset.edm_zip.write_float_dataset_zip`` stores them as float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from diffmem.common.edm.dataset.edm_zip import DatasetArrays, float_names
from diffmem.common.edm.dataset.recipe import draw_generator
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option

CHANNELS = 3
STREAM_BASIS = 10  # apart from common.edm.dataset.edm_zip's STREAM_* (0, 1, 2)
STREAM_SAMPLES = 11


def random_orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal dim×dim matrix (float64): Q of the QR of a Gaussian, columns signed by diag(R)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    # QR alone is not Haar: fixing diag(R) > 0 makes the factorisation unique, and then Q is (Mezzadri 2007).
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def class_bases(dim: int, classes: int, subspace_dim: int, seed: int) -> np.ndarray:
    """[K, D, d] float64: class k's orthonormal basis U_k = columns d·k … d·(k+1) − 1 of a seeded orthogonal matrix."""
    q = random_orthogonal(dim, draw_generator(seed, STREAM_BASIS))
    return np.stack([q[:, subspace_dim * k:subspace_dim * (k + 1)] for k in range(classes)])


def molrg_samples(bases: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [K·n, D] float64, labels [K·n] int64): n samples x = U_k g, g ~ N(0, I_d), per class, class-major."""
    classes, dim, d = bases.shape
    g = draw_generator(seed, STREAM_SAMPLES).standard_normal((classes, per_class, d))
    x = np.einsum("kDd,knd->knD", bases, g).reshape(classes * per_class, dim)
    return x, np.repeat(np.arange(classes, dtype=np.int64), per_class)


@dataclass(frozen=True)
class MoLRGRecipe:
    """MoLRG settings (Zhang et al.'s README: res 4, 2 classes, d = 7, 350 per class)."""

    res: int = option(4, metavar="R", help="images 3×R×R, D = 3·R²")
    classes: int = option(2, metavar="K", help="classes")
    dim: int = option(7, metavar="d", help="dimension of each class's subspace")
    per_class: int = option(350, metavar="N", help="samples per class")
    seed: int = option(0, metavar="S", help="seed of the bases and the samples")

    @property
    def ambient_dim(self) -> int:
        """D = 3·res²."""
        return CHANNELS * self.res * self.res

    def validate(self) -> None:
        """Out-of-range settings raise ConfigError (one line)."""
        for flag in ("res", "classes", "dim", "per_class"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--molrg_{flag} must be at least 1, got {getattr(self, flag)}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.classes * self.dim > self.ambient_dim:
            raise ConfigError(f"--molrg_classes {self.classes} × --molrg_dim {self.dim} = {self.classes * self.dim} "
                              f"orthogonal directions do not fit in D = 3·{self.res}² = {self.ambient_dim}")

    def to_dict(self) -> dict:
        return {"kind": "molrg", **asdict(self), "ambient_dim": self.ambient_dim}


def molrg_bases(recipe: MoLRGRecipe) -> np.ndarray:
    """The recipe's class bases [K, D, d] (float64)."""
    recipe.validate()
    return class_bases(recipe.ambient_dim, recipe.classes, recipe.dim, recipe.seed)


def molrg_dataset(recipe: MoLRGRecipe) -> DatasetArrays:
    """The recipe's samples as float32 N×3×res×res images (flattened C×H×W = the vectors), labels = class."""
    x, labels = molrg_samples(molrg_bases(recipe), recipe.per_class, recipe.seed)
    images = x.reshape(len(x), CHANNELS, recipe.res, recipe.res).astype(np.float32)
    return DatasetArrays(images, labels, float_names(len(images)))


# ------------------------------------------------------------------------------------ the ideal denoiser


def molrg_denoiser(x, sigma, bases):
    """E[x₀ | x] under the MoLRG with equal class weights (torch, float64; x [B, D], bases [K, D, d]):
    Σ_k π_k(x) U_k U_kᵀ x / (1 + σ²), π = softmax_k ‖U_kᵀ x‖² / (2σ²(1 + σ²))."""
    import torch

    # x | k ~ N(0, U_kU_kᵀ + σ²I), whose inverse is (I − U_kU_kᵀ)/σ² + U_kU_kᵀ/(1 + σ²): the log-likelihoods
    # differ only by ‖U_kᵀx‖²(1/σ² − 1/(1 + σ²))/2 (equal determinants), and E[x₀ | x, k] = U_kU_kᵀ x/(1 + σ²).
    x = x.to(torch.float64)
    u = torch.as_tensor(bases, dtype=torch.float64, device=x.device)
    s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2
    coords = torch.einsum("kDd,bD->bkd", u, x)  # U_kᵀ x
    post = torch.softmax(coords.square().sum(-1) / (2 * s2 * (1 + s2)), dim=1)  # [B, K]
    return torch.einsum("bk,kDd,bkd->bD", post, u, coords) / (1 + s2)


class MoLRGDenoiser:
    """``molrg_denoiser`` as a denoiser ``D(x, σ, class_labels)`` for images 3×res×res (unconditional; float64),
    with the attributes the sampler and ``common.edm.measure.jacobian`` read (σ range, label_dim, image_shape)."""

    sigma_min = 0.0
    sigma_max = float("inf")
    label_dim = 0

    def __init__(self, recipe: MoLRGRecipe):
        self.bases = molrg_bases(recipe)
        self.image_shape = (CHANNELS, recipe.res, recipe.res)

    def __call__(self, x, sigma, class_labels=None):
        return molrg_denoiser(x.reshape(len(x), -1), sigma, self.bases).reshape(x.shape)
