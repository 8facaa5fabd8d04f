"""The optimal denoiser of a finite training set: D(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖² / 2σ²) yᵢ.

This is the ideal denoiser of the empirical distribution p = (1/N) Σᵢ δ(y − yᵢ) (Karras et al. 2022, Eq. 3, the
minimiser of Eq. 2; Gu et al.'s "theoretical optimum", OptimEDM; Zhang et al.'s optimal denoiser). Sampling with
it can only reproduce training images: as σ → 0 the softmax puts all weight on the nearest yᵢ.

``OptimalDenoiser`` plugs in where an ``EDMNetwork`` goes (``common.edm.sampler.generate_images`` duck-types
``net(x, sigma, class_labels)``, ``sigma_min``, ``sigma_max``, ``label_dim``, ``image_shape``). It differs from the
reference implementations in two ways that change answers, not just speed:

- Exact answers. At σ = 0.002 the log-weights are −‖x − yᵢ‖² · 125 000, so an error of 1e-5 in a squared
  distance (fp32's ‖x‖² + ‖y‖² − 2x·y on 3072 values, or ``torch.cdist`` in fp32, as OptimEDM uses) moves a
  weight by a factor e^1.25 and can pick the wrong one of two near-tied training images. The float64 reference
  (``ideal_denoiser``, ``screen=False``) takes each ‖x − yᵢ‖² as Σ_d (x_d − y_{i,d})² of float64 differences
  (``torch.cdist``'s non-matmul mode, squared): no cancellation, one pair at a time; ``matmul=True`` uses a float64
  GEMM instead (‖x‖² + ‖y‖² − 2x·y: rounding ~1e-16·‖·‖², chunk-dependent, still far from fp32's).
- Faster than fp32 by default (``screened_denoiser``). A cheap GEMM gives t = ‖ỹ‖² − 2x̃·ỹ (x̃, ỹ centred on the
  training mean; ‖ỹ‖² in float64, once) for every pair with a rigorous bound on its error: for uint8 images on the CPU
  an int8 GEMM of one or two base-128 digits of x̃ with q = u − 128 (``int8_screen``, exact int32 sums, the cut
  bounded by ``int8_screen_error``), else an fp32 GEMM (``screen_error_bound``); an image whose lower bound exceeds
  the smallest upper bound by more than ``drop_margin`` = 2σ²(ln N + 40 ln 10) weighs, with all such images together,
  < 1e-40 of the nearest and is dropped; the others get float64 per-pair distances. At small σ that is a few images
  per query. Where every image can weigh (large σ) or most of a chunk's do, the chunk's log-weights and weighted sum
  come from int8 GEMMs instead, exactly: uint8 images are q = u − 128 in int8, x̃ and the weights are cut into
  base-128 int8 digits (``base128_digits``, as many as their bounds need for ≤ 1e-12 in a log-weight and in the
  weights, ``EXACT_TOL``), each digit's products summed exactly in int32; float images use a float64 GEMM there when
  its rounding bound allows, else per-pair distances. The answer equals the float64 reference to ~1e-11 or better;
  autograd (x that requires grad) runs the reference.
- Bounded memory. The softmax over N is computed chunk by chunk with a running log-sum-exp (online softmax: a
  running max m, sum s = Σ e^(ℓᵢ − m) and weighted sum a = Σ e^(ℓᵢ − m) yᵢ, rescaled when m grows), so memory is
  B × chunk for the weights plus B × D for a; never B × N × D (Zhang et al.'s broadcast) nor B × N (OptimEDM).
  The screened path keeps, per training set and device, an fp32 centred copy and the int8 q (5 bytes per pixel).

The conditional variant (labels given) is the optimal denoiser of each class's empirical distribution: a sample
of class k sees only the training images labelled k.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from diffmem.common.edm.dataset.edm_zip import DatasetError, load_dataset_zip
from diffmem.common.edm.measure.knn import FP32_UNIT_ROUNDOFF, full_fp32_matmul, gamma
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


# ------------------------------------------------------------------------------- the screened (default) path

FLOAT64_UNIT_ROUNDOFF = 2.0**-53
DROP_LOG_RATIO = 40 * math.log(10)  # dropped images weigh together at most 1e-40 of the nearest one
EXACT_TOL = 1e-12  # bound on each approximation of an exact way: x̃ cut to digits, weights cut to digits
FLOAT64_TOL = 2e-11  # bound on a dense way's float64 roundings (worst case, any summation order) in a log-weight
DIGIT_BASE = 128  # base of the int8 digits (round to nearest: the first in 0..127, the next ones in −64..64)
MAX_DIGITS = 10
INT32_SAFE_TERMS = 2**31 // (127 * 128)  # this many products of int8 digits and q = u − 128 sum exactly in int32
DENSE_SHARE = 0.25  # a chunk where more of its pairs stay candidates goes the dense way (when that is exact)
PAIR_BLOCK = 1024  # candidate pairs whose float64 differences are held at once (PAIR_BLOCK × D temporaries)
# The int8 screen of uint8 images takes one base-128 digit of x̃ (int8_screen_error: ~24 in t on 3×32×32, at about
# 1/6 of an fp32 GEMM's time), and a second one (~0.2) for a chunk where one leaves more than this many pairs per query.
SCREEN_DIGITS = 2
SCREEN_REFINE_PAIRS = 2


def drop_margin(sigma: torch.Tensor, n: int) -> torch.Tensor:
    """2σ²(ln N + 40 ln 10): an image whose squared distance exceeds the nearest one's by more weighs < e^(−ln N
    − 40 ln 10) of it in Eq. 3's softmax, so all N such images together weigh < 1e-40 of it."""
    return 2 * sigma.to(torch.float64) ** 2 * (math.log(n) + DROP_LOG_RATIO)


def screen_error_bound(norm_x: torch.Tensor, radius: float, dim: int) -> torch.Tensor:
    """Bound on |t̃ − t| for t = ‖ỹ‖² − 2x̃·ỹ, t̃ = fl32(‖ỹ‖²) − 2 fl32(x̃)·fl32(ỹ) by one fp32 GEMM (addmm), for
    ‖ỹ‖ ≤ R: γ_{D+3}(u₃₂)(R² + 2‖x̃‖R) + u₃₂R² + 2γ_{D+8}(u₆₄)(‖x̃‖ + R)² (Higham, §3.1: a sum in any order)."""
    # t̃ is a (D + 1)-term fp32 sum (fl32(‖ỹ‖²) and −2x̃_d ỹ_d, in any order, FMA or not, as any BLAS computes it):
    # ≤ γ_{D+1}Σ|terms|; rounding x̃ and ỹ to fp32 moves each product by ≤ (2u + u²)|x̃_d ỹ_d|: together
    # ≤ γ_{D+3}(‖ỹ‖² + 2Σ|x̃_d ỹ_d|) ≤ γ_{D+3}(R² + 2‖x̃‖R) (Cauchy–Schwarz), plus u₃₂R² for fl32(‖ỹ‖²). The
    # float64 term covers the centring x − c, y − c and the float64 ‖ỹ‖² (each ≤ a few u₆₄ of (‖x̃‖ + R)²),
    # twice over; the factor 1.001 the rounding of the norms the bound is evaluated with.
    fp32 = 1.001 * (gamma(dim + 3) * (radius**2 + 2 * norm_x * radius) + FP32_UNIT_ROUNDOFF * radius**2)
    return fp32 + 2 * gamma(dim + 8, FLOAT64_UNIT_ROUNDOFF) * (norm_x + radius) ** 2


def int8_screen_error(scale: torch.Tensor, q_l1: float, radius: float, digits: int) -> torch.Tensor:
    """Bound on |t̂ − t| for t = ‖ỹ‖² − (4/255)x̃·q (‖ỹ‖² − 2x̃·ỹ up to a per-query constant, for uint8 images) when
    x̃·q is taken from K base-128 int8 digits of x̃/s: the cut residual ≤ ½·128^−K per coordinate, times
    ‖q‖₁ ≤ q_l1 and s·4/255, plus float64's forming of t̂ from K exact int32 sums."""
    cut = 4 / 255 * scale * 0.5 * float(DIGIT_BASE) ** -digits * q_l1
    forming = gamma(digits + 6, FLOAT64_UNIT_ROUNDOFF) * 1.01 * (radius**2 + 4 / 255 * scale * DIGIT_BASE * q_l1)
    return cut + forming


def int8_partial(digit: torch.Tensor, chunk: ScreenedImages) -> torch.Tensor:
    """One digit [B, D] of x̃/s times q: [B, n] exact int32 sums (an int8 GEMM), as float64 (exactly)."""
    return torch._int_mm(digit, chunk.q.T).to(torch.float64)


def int8_screen(partials: list[torch.Tensor], scale: torch.Tensor, chunk: ScreenedImages) -> torch.Tensor:
    """t̂ [B, n] of int8_screen_error from the first K digits' int8_partial sums."""
    xq = sum(part * DIGIT_BASE ** -(k + 1) for k, part in enumerate(partials)) * scale[:, None]
    return chunk.sq_norms - 4 / 255 * xq


def kept_candidates(t: torch.Tensor, error: torch.Tensor, best_upper: torch.Tensor,
                    margin: torch.Tensor) -> torch.Tensor:
    """[B, n] mask of the images that can weigh: t̃ − error ≤ the smallest upper bound on t + drop_margin (t̃ fp32
    or float64, compared exactly: the threshold is rounded up to t̃'s precision)."""
    threshold = (best_upper + margin + error).to(t.dtype)
    return t <= torch.nextafter(threshold, torch.full_like(threshold, math.inf))[:, None]


def base128_digits(r: torch.Tensor, count: int) -> torch.Tensor:
    """int8 digits d_k = round(128 r_{k−1}), r_k = 128 r_{k−1} − d_k, of |r| ≤ 127/128, stacked [count, *r.shape]:
    r = Σ_{k≤K} d_k 128^−k + 128^−K r_K with |r_K| ≤ 1/2 (every step exact in float64)."""
    digits = []
    for _ in range(count):
        r = r * DIGIT_BASE
        d = torch.round(r)
        digits.append(d.to(torch.int8))
        r = r - d
    return torch.stack(digits)


def digits_for(error_at_one_digit: torch.Tensor, tol: float) -> int:
    """The fewest base-128 digits K with error_at_one_digit · 128^(1−K) ≤ tol (MAX_DIGITS + 1 when none does)."""
    worst = float(error_at_one_digit.max())
    if not math.isfinite(worst):
        return MAX_DIGITS + 1
    if worst <= tol:
        return 1
    return 1 + math.ceil(math.log(worst / tol) / math.log(DIGIT_BASE))


def power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """[B] powers of two s ≥ (128/127)·max|x_b|, so x/s is exact and |x/s| ≤ 127/128 (base128_digits' range)."""
    top = x.abs().amax(dim=1) * (DIGIT_BASE / (DIGIT_BASE - 1))
    return torch.where(top > 0, torch.exp2(torch.ceil(torch.log2(top))), torch.ones_like(top))


def int8_dot_error(scale: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on the error of ℓ' = (4x̃·q/255 − ‖ỹ‖²)/2σ² when x̃ = s·(K digits + 128^−K r), |r| ≤ ½, |q| ≤ 128:
    |x̃·q − x̂·q| ≤ s·½·128^−K·128·D, ×4/(255·2σ²): s·D/(255σ²) at K = 1, × 128^(1−K) for K digits."""
    return scale * dim / (255 * sigma.to(torch.float64) ** 2)


class ScreenedImages(NamedTuple):
    """A training set prepared once for the screened path: float64 rows y, a centre c near their mean, fp32
    ỹ = y − c, float64 ‖ỹ‖² (relative error ≤ sq_norm_error) and ‖ỹ‖, and for uint8 images the int8 q = u − 128
    (y = (2q + 1)/255), else None."""

    y: torch.Tensor
    centre: torch.Tensor
    centred32: torch.Tensor
    sq_norms: torch.Tensor
    sq_norms32: torch.Tensor
    norms: torch.Tensor
    q: torch.Tensor | None
    q_l1: torch.Tensor | None  # float64 ‖q_n‖₁ per image
    sq_norm_error: float
    y_norm_max: float  # max ‖y‖ (uncentred)
    radius: float  # max ‖ỹ‖

    def rows(self, lo: int, hi: int) -> ScreenedImages:
        return self._replace(y=self.y[lo:hi], centred32=self.centred32[lo:hi], sq_norms=self.sq_norms[lo:hi],
                             sq_norms32=self.sq_norms32[lo:hi], norms=self.norms[lo:hi],
                             q=None if self.q is None else self.q[lo:hi],
                             q_l1=None if self.q_l1 is None else self.q_l1[lo:hi])


def prepare_images(y: torch.Tensor, u: torch.Tensor | None = None, rows: int = 1024) -> ScreenedImages:
    """ScreenedImages of float64 rows y [N, D] (u: the same images as uint8 [N, D], for the int8 way)."""
    dim = y.shape[1]
    centred32 = torch.empty(y.shape, dtype=torch.float32, device=y.device)
    sq_norms = torch.empty(len(y), dtype=torch.float64, device=y.device)
    if u is None:
        centre, sq_norm_error = y.mean(dim=0), gamma(dim, FLOAT64_UNIT_ROUNDOFF)
    else:
        # The centre on the 8-bit grid, so ‖ỹ‖² = 4Σ(u − u_c)²/255² is an integer sum, rounded once.
        u_c = torch.round(u.to(torch.float64).mean(dim=0)).to(torch.int32)
        centre, sq_norm_error = u_c.to(torch.float64) / 127.5 - 1, gamma(2, FLOAT64_UNIT_ROUNDOFF)
    for lo in range(0, len(y), rows):  # small temporaries, whatever N
        part = y[lo:lo + rows] - centre
        centred32[lo:lo + rows] = part
        if u is None:
            sq_norms[lo:lo + rows] = part.square().sum(dim=1)
        else:
            sq_norms[lo:lo + rows] = (u[lo:lo + rows].to(torch.int32) - u_c).square().sum(dim=1).to(torch.float64)
    if u is not None:
        sq_norms *= 4 / 65025
    q = None if u is None else (u.to(torch.int16) - 128).to(torch.int8)
    q_l1 = None if q is None else torch.cat([q[lo:lo + rows].to(torch.int32).abs().sum(dim=1).to(torch.float64)
                                             for lo in range(0, len(q), rows)])
    y_norm_max = max(float(y[lo:lo + rows].norm(dim=1).max()) for lo in range(0, len(y), rows))
    return ScreenedImages(y, centre, centred32, sq_norms, sq_norms.float(), sq_norms.sqrt(), q, q_l1, sq_norm_error,
                          y_norm_max, float(sq_norms.max().sqrt()))


def accurate_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row Σ_d a_d b_d, each product rounded once and the sum correctly rounded (math.fsum): error ≤
    2u₆₄Σ|a_d b_d|, whatever D."""
    return torch.tensor([math.fsum(row) for row in (a * b).tolist()], dtype=torch.float64, device=a.device)


def merge_pairs(state: SoftmaxState, rows: torch.Tensor, logw: torch.Tensor, y: torch.Tensor) -> SoftmaxState:
    """merge_chunk for scattered pairs: query rows[p] gets log-weight logw[p] on image y[p] [P, D]."""
    new_max = state.max.scatter_reduce(0, rows, logw, reduce="amax")
    # A query with no pair yet keeps m = −∞: its factor is 1 (its sums are 0), not e^(−∞ + ∞).
    rescale = torch.where(new_max == state.max, torch.ones_like(new_max), torch.exp(state.max - new_max))
    w = torch.exp(logw - new_max[rows])
    return SoftmaxState(new_max, (state.total * rescale).index_add(0, rows, w),
                        (state.weighted * rescale[:, None]).index_add(0, rows, w[:, None] * y))


def merge_candidates(state: SoftmaxState, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor,
                     keep: torch.Tensor) -> SoftmaxState:
    """Fold the kept (query, image) pairs of a chunk in with float64 per-pair distances Σ_d (x_d − y_d)²."""
    rows, cols = keep.nonzero(as_tuple=True)
    for start in range(0, len(rows), PAIR_BLOCK):
        r, c = rows[start:start + PAIR_BLOCK], cols[start:start + PAIR_BLOCK]
        images = y[c]
        d2 = (x[r] - images).square().sum(dim=1)
        state = merge_pairs(state, r, -d2 / (2 * sigma[r] ** 2), images)
    return state


class DenseWay(NamedTuple):
    """How a dense chunk gets exact log-weights: int8 digits of x̃/s [K·B, D] with scales s [B], or (digits None) a
    float64 GEMM; offset [B] turns its ℓ' into ℓ = −‖x − y‖²/2σ² (None: ℓ' is used, no chunk goes another way)."""

    digits: torch.Tensor | None
    scale: torch.Tensor | None
    offset: torch.Tensor | None


def dense_way(images: ScreenedImages, xc: torch.Tensor, sigma: torch.Tensor, mixed: bool) -> DenseWay | None:
    """The dense way for these queries whose x̃ digits err by ≤ EXACT_TOL and float64 roundings by ≤ FLOAT64_TOL in
    a log-weight, or None when neither provably does. mixed: its chunks share a softmax with per-pair ones, so ℓ'
    gets the per-query offset to ℓ, computed accurately (its rounding would not cancel)."""
    dim = xc.shape[1]
    u64 = FLOAT64_UNIT_ROUNDOFF
    two_sig2 = 2 * sigma.to(torch.float64) ** 2
    r2 = images.radius**2
    offset_slack = 2 * gamma(8, u64) * (xc.square().sum(dim=1) + images.centre.square().sum() + 1) if mixed else 0
    norms_slack = images.sq_norm_error * r2 + offset_slack
    offset = None
    if mixed:  # ℓ = ℓ' − (‖x̃‖² + 2x̃·c)/2σ² (+ 2Σx̃/255 for the int8 way)
        offset = -(accurate_dot(xc, xc) + 2 * accurate_dot(xc, images.centre.expand_as(xc))) / two_sig2
    if images.q is not None and xc.device.type == "cpu" and dim <= INT32_SAFE_TERMS:
        scale = power_of_two_scale(xc)
        # Forming ℓ' from ≤ MAX_DIGITS exact int32 partial sums: ≤ MAX_DIGITS + 4 roundings of terms ≤ 2sD + ‖ỹ‖².
        forming = gamma(MAX_DIGITS + 8, u64) * (2.01 * scale * dim + r2)
        count = digits_for(int8_dot_error(scale, sigma, dim), EXACT_TOL)
        if count <= MAX_DIGITS and float(((forming + norms_slack) / two_sig2).max()) <= FLOAT64_TOL:
            digits = base128_digits(xc / scale[:, None], count).reshape(count * len(xc), dim)
            if mixed:
                offset = offset + 2 * torch.tensor([math.fsum(row) for row in xc.tolist()], dtype=torch.float64,
                                                   device=xc.device) / 255 / two_sig2
            return DenseWay(digits, scale, offset)
    # float64 GEMM x̃·y: ≤ γ_{D+2}Σ|x̃_d y_d| ≤ γ_{D+2}‖x̃‖‖y‖, doubled in ℓ'.
    bound = (2 * gamma(dim + 2, u64) * xc.norm(dim=1) * images.y_norm_max + norms_slack) / two_sig2
    return DenseWay(None, None, offset) if float(bound.max()) <= FLOAT64_TOL else None


def merge_dense(state: SoftmaxState, way: DenseWay, xc: torch.Tensor, sigma: torch.Tensor, chunk: ScreenedImages,
                n_total: int) -> SoftmaxState:
    """Fold a whole chunk in with exact log-weights ℓ' = (2x̃·ỹ − ‖ỹ‖²)/2σ² (ℓ up to a per-query constant)."""
    two_sig2 = 2 * sigma.to(torch.float64)[:, None] ** 2
    if way.digits is None:
        logw = (2 * (xc @ chunk.y.T) - chunk.sq_norms) / two_sig2  # x̃·y is x̃·ỹ + x̃·c, a per-query constant more
        return merge_chunk(state, logw if way.offset is None else logw + way.offset[:, None], chunk.y)
    batch, n = len(xc), len(chunk.q)
    # x̃·q by one int8 GEMM of all digits, each digit's sum exact in int32 (≤ INT32_SAFE_TERMS products);
    # x̃·ỹ = (2x̃·q + Σx̃)/255 − x̃·c, whose last two terms are per-query constants.
    partial = torch._int_mm(way.digits, chunk.q.T).to(torch.float64)  # torch's int8 × int8 → int32 GEMM
    count = len(way.digits) // batch
    xq = (place_values(count) @ partial.reshape(count, -1)).reshape(batch, n) * way.scale[:, None]
    logw = (4 / 255 * xq - chunk.sq_norms) / two_sig2
    if way.offset is not None:
        logw = logw + way.offset[:, None]
    new_max = torch.maximum(state.max, logw.max(dim=1).values)
    rescale = torch.exp(state.max - new_max)
    w = torch.exp(logw - new_max[:, None]) * ((DIGIT_BASE - 1) / DIGIT_BASE)  # ≤ 127/128: base128_digits' range
    # Weights cut to K digits err by ≤ ½·128^−K each; kept ≤ EXACT_TOL/2 of max(this chunk's weight, its share n/N of
    # the weight so far), all chunks' errors add up to ≤ EXACT_TOL of the total weight: D moves by ≤ 2·EXACT_TOL.
    earlier = state.total * rescale
    ref = torch.maximum(w.sum(dim=1), earlier * (n / n_total))
    # ref ≥ n/N (the largest weight so far is 1), so K ≤ 9 for N ≤ 10⁷: the cap never binds below that.
    count = min(digits_for(n / (2 * DIGIT_BASE * ref), EXACT_TOL / 2), MAX_DIGITS)
    wd = base128_digits(w, count).reshape(count * batch, n)
    # Undoing the 127/128 (chunks of other ways may share the softmax).
    place = place_values(count) * (DIGIT_BASE / (DIGIT_BASE - 1))
    wq = (place @ torch._int_mm(wd, chunk.q).to(torch.float64).reshape(count, -1)).reshape(batch, -1)
    total = place @ wd.reshape(count, batch, n).sum(dim=2, dtype=torch.int64).to(torch.float64)
    # Σ ŵ y = Σ ŵ (2q + 1)/255.
    return SoftmaxState(new_max, earlier + total, state.weighted * rescale[:, None] + (2 * wq + total[:, None]) / 255)


PLACE_VALUES = torch.tensor([DIGIT_BASE ** -k for k in range(1, MAX_DIGITS + 1)], dtype=torch.float64)


def place_values(count: int) -> torch.Tensor:
    """128^−1, …, 128^−count in float64 (exact: powers of two)."""
    return PLACE_VALUES[:count]


def screened_denoiser(x: torch.Tensor, sigma: torch.Tensor, images: ScreenedImages,
                      chunk_size: int = 4096) -> torch.Tensor:
    """D(x; σ) of Eq. 3 for x [B, D] float64, σ [B]: fp32 GEMM distances with a rigorous error bound screen the
    images, float64 computes those that can weigh (within drop_margin); float64 [B, D]."""
    n, dim = images.y.shape
    xc = x - images.centre
    norm_x = xc.norm(dim=1)
    margin = drop_margin(sigma, n)
    # No image can be dropped when margin ≥ the widest t = ‖ỹ‖² − 2x̃·ỹ can spread: R² + 4‖x̃‖R.
    dense = margin >= images.radius**2 + 4 * norm_x * images.radius
    if bool(dense.all()) or not bool(dense.any()):  # one way for the whole batch: no gathers
        return screened_rows(x, xc, sigma, norm_x, margin, images, chunk_size, screen=not bool(dense[0]))
    out = torch.empty_like(x)
    for rows, screen in ((dense, False), (~dense, True)):
        if rows.any():
            out[rows] = screened_rows(x[rows], xc[rows], sigma[rows], norm_x[rows], margin[rows], images,
                                      chunk_size, screen)
    return out


def screened_rows(x: torch.Tensor, xc: torch.Tensor, sigma: torch.Tensor, norm_x: torch.Tensor, margin: torch.Tensor,
                  images: ScreenedImages, chunk_size: int, screen: bool) -> torch.Tensor:
    """screened_denoiser for queries that share one way: screened (screen) or all dense from the start (x̃ = xc,
    ‖x̃‖ = norm_x, drop_margin = margin)."""
    n, dim = images.y.shape
    way = None if screen else dense_way(images, xc, sigma, mixed=False)
    if not screen and way is None:
        return ideal_denoiser(x, sigma, images.y, chunk_size)
    tried = not screen  # the dense way of screened queries: looked for only when a chunk needs it
    chunk_size = min(chunk_size, INT32_SAFE_TERMS)
    state = empty_state(len(x), dim, x.device)
    best = torch.full_like(norm_x, math.inf)  # smallest upper bound on t so far
    # uint8 images on the CPU are screened by an int8 GEMM of a few digits of x̃ (exact int32 sums, a rigorous
    # bound for the cut): several times faster there than the fp32 GEMM, which screens the others.
    by_int8 = screen and images.q is not None and xc.device.type == "cpu" and dim <= INT32_SAFE_TERMS
    if by_int8:
        scale = power_of_two_scale(xc)
        digits = base128_digits(xc / scale[:, None], SCREEN_DIGITS)
    elif screen:
        xc32 = xc.to(torch.float32)
    for lo in range(0, n, chunk_size):
        chunk = images.rows(lo, lo + chunk_size)
        if not screen:
            state = merge_dense(state, way, xc, sigma, chunk, n)
            continue
        if by_int8:
            q_l1, radius = float(chunk.q_l1.max()), float(chunk.norms.max())
            partials = [int8_partial(digits[0], chunk)]
            while True:  # each bound holds: best is an upper bound on t after every pass
                t = int8_screen(partials, scale, chunk)
                err = int8_screen_error(scale, q_l1, radius, len(partials))
                best = torch.minimum(best, t.min(dim=1).values + err)
                keep = kept_candidates(t, err, best, margin)
                if len(partials) == SCREEN_DIGITS or keep.sum() <= SCREEN_REFINE_PAIRS * len(xc):
                    break
                partials.append(int8_partial(digits[len(partials)], chunk))
        else:
            with full_fp32_matmul():
                t = torch.addmm(chunk.sq_norms32, xc32, chunk.centred32.T, alpha=-2)  # fp32 ‖ỹ‖² − 2x̃·ỹ
            err = screen_error_bound(norm_x, float(chunk.norms.max()), dim)
            best = torch.minimum(best, t.min(dim=1).values.to(torch.float64) + err)
            keep = kept_candidates(t, err, best, margin)
        many = keep.sum() > DENSE_SHARE * keep.numel()
        if many and not tried:
            way, tried = dense_way(images, xc, sigma, mixed=True), True
        if many and way is not None:
            state = merge_dense(state, way, xc, sigma, chunk, n)
        elif keep.any():
            state = merge_candidates(state, x, sigma, chunk.y, keep)
    return state.weighted / state.total[:, None]


def images_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float64 x / 127.5 − 1 (EDM's rule, in float64 so each value is the nearest to u/127.5 − 1);
    float images are taken as already in [−1, 1] and cast."""
    return images.to(torch.float64) / 127.5 - 1 if images.dtype == torch.uint8 else images.to(torch.float64)


def needs_derivatives(x: torch.Tensor) -> bool:
    """Whether autograd, torch.func (jvp, vjp, vmap, jacrev) or forward-mode AD differentiates through x: the
    screened path's candidate sets and integer GEMMs have no derivatives, so the float64 reference runs then."""
    return bool((torch.is_grad_enabled() and x.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(x)
                or torch.autograd.forward_ad.unpack_dual(x).tangent is not None)


# ------------------------------------------------------------------------------------------ the module


class OptimalDenoiser(torch.nn.Module):
    """The ideal denoiser of a training set (Karras et al. 2022, Eq. 3), usable wherever an ``EDMNetwork`` is.

    ``images``: N×C×H×W, uint8 or float in [−1, 1]. ``labels``: [N] integer classes, or None for the
    unconditional denoiser; given, the denoiser is conditional (``label_dim`` = max label + 1) and a sample of
    class k is denoised with class k's images only. ``chunk_size``: training images per chunk (memory ≈ B × chunk;
    the result does not depend on it beyond float64 rounding). ``screen`` (default): the screened path
    (``screened_denoiser``: fp32 screening with a rigorous bound, float64 for the images that can weigh, int8-digit
    exact GEMMs where all of them do); ``screen=False``: the float64 reference, distances per pair; ``matmul``: the
    float64 reference with its distances by a float64 GEMM (see ``squared_distances``). Where autograd needs the
    result (x requires grad), the float64 reference runs.
    """

    sigma_min = 0.0  # defined for every σ > 0: the sampler's own σ range is used unclamped
    sigma_max = math.inf

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 4096,
                 matmul: bool = False, screen: bool = True):
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
        self.screen = bool(screen)
        self._screened: dict[int, ScreenedImages] = {}  # per class, built on first use on the buffers' device
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
            images = images[order]
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64),
                                 torch.bincount(labels, minlength=self._label_dim).cumsum(0)])
        # Buffers, so .to(device) moves them; not persistent: the training set is the denoiser's only "weights"
        # and is already on disk.
        self.register_buffer("train_images", y.reshape(len(y), -1), persistent=False)
        # The screened path's exact int8 GEMMs need the images as integers (y = (2u − 255)/255).
        self.register_buffer("train_uint8", images.reshape(len(y), -1) if images.dtype == torch.uint8 else None,
                             persistent=False)
        self.class_offsets = offsets.tolist()  # class k's images are train_images[offsets[k]:offsets[k + 1]]

    @classmethod
    def from_dataset_zip(cls, path: str | Path, cond: bool = False, chunk_size: int = 4096,
                         matmul: bool = False, screen: bool = True) -> OptimalDenoiser:
        """The optimal denoiser of an EDM dataset zip's images (class-conditional on its labels if cond)."""

        data = load_dataset_zip(path, progress=False)
        if cond and data.labels is None:
            raise DatasetError(f"{path}: --cond needs class labels, but the zip has no dataset.json labels")
        labels = torch.from_numpy(data.labels.astype("int64")) if cond else None
        return cls(torch.from_numpy(data.images), labels, chunk_size, matmul, screen)

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

    def screened_images(self, k: int) -> ScreenedImages:
        """Class k's ScreenedImages (all images for the unconditional denoiser), prepared once per device."""
        cached = self._screened.get(k)
        if cached is None or cached.y.device != self.train_images.device:
            lo, hi = self.class_offsets[k], self.class_offsets[k + 1]
            u = None if self.train_uint8 is None else self.train_uint8[lo:hi]
            cached = self._screened[k] = prepare_images(self.class_images(k), u)
        return cached

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
        """D(x; σ) for flat float64 x [B, D] with class k's images (k = 0 for the unconditional denoiser)."""
        if self.matmul or not self.screen or needs_derivatives(x):
            return ideal_denoiser(x, sigma, self.class_images(k), self.chunk_size, self.matmul)
        with torch.no_grad():
            return screened_denoiser(x, sigma, self.screened_images(k), self.chunk_size)

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
            return self.denoise(flat, sigma, 0).reshape(x.shape)
        labels = self.sample_classes(class_labels, batch, x.device)
        out = flat.new_empty(flat.shape)
        for k in labels.unique().tolist():
            rows = labels == k
            out[rows] = self.denoise(flat[rows], sigma[rows], k)
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
