"""The optimal denoiser of a finite training set: D(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖² / 2σ²) yᵢ.

This is the ideal denoiser of the empirical distribution p = (1/N) Σᵢ δ(y − yᵢ) (Karras et al. 2022, Eq. 3, the
minimiser of Eq. 2; Gu et al.'s "theoretical optimum", OptimEDM; Zhang et al.'s optimal denoiser). Sampling with
it can only reproduce training images: as σ → 0 the softmax puts all weight on the nearest yᵢ.

``OptimalDenoiser`` plugs in where an ``EDMNetwork`` goes (``common.edm.sampler.generate_images`` duck-types
``net(x, sigma, class_labels)``, ``sigma_min``, ``sigma_max``, ``label_dim``, ``image_shape``). It differs from the
reference implementations in two ways that change answers, not just speed:

- Exact distances. At σ = 0.002 the log-weights are −‖x − yᵢ‖² · 125 000, so an error of 1e-5 in a squared
  distance (fp32's ‖x‖² + ‖y‖² − 2x·y on 3072 values, or ``torch.cdist`` in fp32, as OptimEDM uses) moves a
  weight by a factor e^1.25 and can pick the wrong one of two near-tied training images. Here each
  ‖x − yᵢ‖² is Σ_d (x_d − y_{i,d})² of float64 differences (``torch.cdist``'s non-matmul mode, squared): no
  cancellation, one pair at a time, so the value of a pair does not depend on which other images share its chunk.
  ``matmul=True`` uses a float64 GEMM instead (‖x‖² + ‖y‖² − 2x·y: faster, rounding ~1e-16·‖·‖², still far from
  fp32's).
- Bounded memory. The softmax over N is computed chunk by chunk with a running log-sum-exp (online softmax: a
  running max m, sum s = Σ e^(ℓᵢ − m) and weighted sum a = Σ e^(ℓᵢ − m) yᵢ, rescaled when m grows), so memory is
  B × chunk for the weights plus B × D for a; never B × N × D (Zhang et al.'s broadcast) nor B × N (OptimEDM).

The conditional variant (labels given) is the optimal denoiser of each class's empirical distribution: a sample
of class k sees only the training images labelled k.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from diffmem.common.edm.dataset.edm_zip import DatasetError, load_dataset_zip
from diffmem.common.errors import DiffmemError


class OptimalDenoiserError(DiffmemError, ValueError):
    """Bad training images, labels, σ or class labels for the optimal denoiser; str() is the one-line message."""


# ------------------------------------------------------------------------------------------ the math


def squared_distances(x: torch.Tensor, y: torch.Tensor, matmul: bool = False) -> torch.Tensor:
    """‖x_b − y_n‖² for x [B, D] and y [N, D], float64 (the exponent of Eq. 3): Σ_d (x_d − y_d)² per pair, or
    with matmul ‖x‖² + ‖y‖² − 2x·y by a float64 GEMM."""
    # Per pair (the default) there is no cancellation and a pair's value is the same whatever else is in its
    # chunk. The GEMM is faster (much more so on a GPU); its rounding, ~1e-16·(‖x‖² + ‖y‖²), depends on
    # the GEMM's blocking and so on the chunk: ~1e-10 in D at σ = 0.002 on 3×32×32 images, vs fp32's ~1e-2.
    mode = "use_mm_for_euclid_dist" if matmul else "donot_use_mm_for_euclid_dist"
    return torch.cdist(x.to(torch.float64), y.to(torch.float64), compute_mode=mode).square()


def log_weights(d2: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ℓ_bn = −‖x_b − y_n‖² / 2σ_b², the unnormalised log softmax weights of the ideal denoiser (Eq. 3)."""
    return -d2 / (2 * sigma.to(d2.dtype)[:, None] ** 2)


class SoftmaxState(NamedTuple):
    """Running log-sum-exp over the chunks seen so far: max m [B], Σ e^(ℓ − m) [B], Σ e^(ℓ − m) y [B, D]."""

    max: torch.Tensor
    total: torch.Tensor
    weighted: torch.Tensor


def empty_state(batch: int, dim: int, device) -> SoftmaxState:
    """The state before any chunk: m = −∞ (so the first chunk's rescale factor e^(m − m') is 0), sums 0."""
    f64 = dict(dtype=torch.float64, device=device)
    return SoftmaxState(torch.full((batch,), -math.inf, **f64), torch.zeros(batch, **f64),
                        torch.zeros(batch, dim, **f64))


def merge_chunk(state: SoftmaxState, logw: torch.Tensor, y: torch.Tensor) -> SoftmaxState:
    """Online softmax step: fold a chunk's log-weights ℓ [B, n] and images y [n, D] into the running sums,
    m' = max(m, max ℓ), s' = s e^(m − m') + Σ e^(ℓ − m'), a' = a e^(m − m') + Σ e^(ℓ − m') y."""
    new_max = torch.maximum(state.max, logw.max(dim=1).values)
    rescale = torch.exp(state.max - new_max)  # ≤ 1; exactly 0 on the first chunk (m = −∞, m' finite)
    w = torch.exp(logw - new_max[:, None])  # ≤ 1 and the largest is 1: no overflow, the max never underflows
    return SoftmaxState(new_max, state.total * rescale + w.sum(dim=1),
                        state.weighted * rescale[:, None] + w @ y.to(torch.float64))


def ideal_denoiser(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, chunk_size: int = 4096,
                   matmul: bool = False) -> torch.Tensor:
    """D(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖² / 2σ²) yᵢ for x [B, D], σ [B], training images y [N, D] (Eq. 3),
    accumulated over chunks of chunk_size training images; float64 [B, D]."""
    state = empty_state(x.shape[0], x.shape[1], x.device)
    for start in range(0, len(y), chunk_size):
        chunk = y[start:start + chunk_size]
        state = merge_chunk(state, log_weights(squared_distances(x, chunk, matmul), sigma), chunk)
    return state.weighted / state.total[:, None]


def images_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float64 x / 127.5 − 1 (EDM's rule, in float64 so each value is the nearest to u/127.5 − 1);
    float images are taken as already in [−1, 1] and cast."""
    return images.to(torch.float64) / 127.5 - 1 if images.dtype == torch.uint8 else images.to(torch.float64)


# ------------------------------------------------------------------------------------------ the module


class OptimalDenoiser(torch.nn.Module):
    """The ideal denoiser of a training set (Karras et al. 2022, Eq. 3), usable wherever an ``EDMNetwork`` is.

    ``images``: N×C×H×W, uint8 or float in [−1, 1]. ``labels``: [N] integer classes, or None for the
    unconditional denoiser; given, the denoiser is conditional (``label_dim`` = max label + 1) and a sample of
    class k is denoised with class k's images only. ``chunk_size``: training images per distance chunk (memory
    ≈ B × chunk float64 weights; the result does not depend on it beyond float64 rounding). ``matmul``: the
    distances by a float64 GEMM instead of per pair (faster; see ``squared_distances``).
    """

    sigma_min = 0.0  # defined for every σ > 0: the sampler's own σ range is used unclamped
    sigma_max = math.inf

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 4096,
                 matmul: bool = False):
        super().__init__()
        images = torch.as_tensor(images)
        if images.ndim != 4 or len(images) == 0:
            raise OptimalDenoiserError(f"expected training images N×C×H×W with N >= 1, got shape "
                                       f"{tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise OptimalDenoiserError(f"expected uint8 or float training images, got {images.dtype}")
        if chunk_size < 1:
            raise OptimalDenoiserError(f"expected chunk_size >= 1, got {chunk_size}")
        y = images_to_model_range(images)
        if not torch.isfinite(y).all():
            raise OptimalDenoiserError("the training images contain NaN or infinite values")
        self.chunk_size = int(chunk_size)
        self.matmul = bool(matmul)
        self._image_shape = tuple(int(s) for s in images.shape[1:])
        if labels is None:
            self._label_dim = 0
            offsets = torch.tensor([0, len(y)])
        else:
            labels = torch.as_tensor(labels)
            if labels.shape != (len(y),) or labels.is_floating_point() or labels.is_complex() or (labels < 0).any():
                raise OptimalDenoiserError(f"expected one integer label >= 0 per training image ({len(y)}), got "
                                           f"{labels.dtype} of shape {tuple(labels.shape)}")
            labels = labels.to(torch.int64)
            self._label_dim = int(labels.max()) + 1
            # Sorted by class (stably), each class's images are one contiguous slice: no copy per call.
            order = torch.argsort(labels, stable=True)
            y, labels = y[order], labels[order]
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64),
                                 torch.bincount(labels, minlength=self._label_dim).cumsum(0)])
        # Buffers, so .to(device) moves them; not persistent: the training set is the denoiser's only "weights"
        # and is already on disk.
        self.register_buffer("train_images", y.reshape(len(y), -1), persistent=False)
        self.class_offsets = offsets.tolist()  # class k's images are train_images[offsets[k]:offsets[k + 1]]

    @classmethod
    def from_dataset_zip(cls, path: str | Path, cond: bool = False, chunk_size: int = 4096,
                         matmul: bool = False) -> OptimalDenoiser:
        """The optimal denoiser of an EDM dataset zip's images (class-conditional on its labels if cond)."""

        data = load_dataset_zip(path, progress=False)
        if cond and data.labels is None:
            raise DatasetError(f"{path}: --cond needs class labels, but the zip has no dataset.json labels")
        labels = torch.from_numpy(data.labels.astype("int64")) if cond else None
        return cls(torch.from_numpy(data.images), labels, chunk_size, matmul)

    @property
    def label_dim(self) -> int:
        return self._label_dim

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    @property
    def num_images(self) -> int:
        return len(self.train_images)

    def class_images(self, k: int) -> torch.Tensor:
        """Class k's training images, flattened [n_k, D] float64 (all of them for the unconditional denoiser)."""
        lo, hi = self.class_offsets[k], self.class_offsets[k + 1]
        if lo == hi:
            raise OptimalDenoiserError(f"class {k} has no training images (labels run 0..{self.label_dim - 1})")
        return self.train_images[lo:hi]

    def check_classes(self, class_idx: int | None = None) -> None:
        """Raise unless every class a sample can get has images: class_idx, or each of 0..label_dim − 1 (EDM's
        sampler draws a seed's label uniformly from them)."""
        if not self.label_dim:
            return
        wanted = range(self.label_dim) if class_idx is None else [class_idx]
        empty = [k for k in wanted if 0 <= k < self.label_dim and self.class_offsets[k] == self.class_offsets[k + 1]]
        if empty:
            raise OptimalDenoiserError(f"class{'es' if len(empty) > 1 else ''} {', '.join(map(str, empty))} "
                                       f"{'have' if len(empty) > 1 else 'has'} no training images (labels run "
                                       f"0..{self.label_dim - 1}); pick a --class_idx that has some")

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; σ) in float64, shaped like x. σ: a scalar or one per sample ([B] or [B, 1, 1, 1]). class_labels:
        [B] class indices or [B, label_dim] one-hot; ignored by the unconditional denoiser (as EDM's nets do)."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise OptimalDenoiserError(f"expected x of shape B×{'×'.join(map(str, self.image_shape))}, got "
                                       f"{tuple(x.shape)}")
        batch = x.shape[0]
        flat = x.reshape(batch, -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise OptimalDenoiserError(f"expected one σ or one per sample ({batch}), got {sigma.numel()}")
        # Below ~1e-154, 2σ² underflows to 0 and every weight would be 0/0.
        if not bool(((sigma > 0) & (2 * sigma**2 > 0) & torch.isfinite(sigma)).all()):
            raise OptimalDenoiserError(f"expected finite σ > 1e-154, got {sigma.min().item():g}")
        if not self.label_dim:
            out = ideal_denoiser(flat, sigma, self.train_images, self.chunk_size, self.matmul)
            return out.reshape(x.shape)
        labels = self.sample_classes(class_labels, batch, x.device)
        out = flat.new_empty(flat.shape)
        for k in labels.unique().tolist():
            rows = labels == k
            out[rows] = ideal_denoiser(flat[rows], sigma[rows], self.class_images(k), self.chunk_size,
                                       self.matmul)
        return out.reshape(x.shape)

    def sample_classes(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """[B] int64 classes from class indices or one-hot rows (the form EDM's conditional networks take)."""
        if class_labels is None:
            raise OptimalDenoiserError("the conditional optimal denoiser needs class_labels")
        labels = torch.as_tensor(class_labels, device=device)
        if labels.ndim == 2:
            labels = labels.argmax(dim=1)
        labels = labels.reshape(-1).to(torch.int64)
        if labels.numel() != batch:
            raise OptimalDenoiserError(f"expected one class label per sample ({batch}), got {labels.numel()}")
        if ((labels < 0) | (labels >= self.label_dim)).any():
            raise OptimalDenoiserError(f"expected class labels in 0..{self.label_dim - 1}, got "
                                       f"{labels.min().item()}..{labels.max().item()}")
        return labels
