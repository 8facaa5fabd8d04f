"""Exact k nearest neighbours in L2 between two sets of vectors (images flattened), chunked over both sets.

The fp32 matmul form ‖x‖² + ‖y‖² − 2x·y (what ``torch.cdist`` uses by default, and faiss's flat index) loses the
small distances of near-duplicates to cancellation: on 8-bit images with planted near-duplicates it picks the wrong
nearest neighbour for a large fraction of queries. Here the fp32 matmul only *shortlists* candidates; the answer
comes from float64 on the original values, and a per-query certificate proves that the shortlist held the true
top k (the rare query without one is recomputed exactly against every reference):

1. centre both sets on the references' mean (fp32): distances are translation-invariant, and centred vectors have
   smaller norms, so the fp32 error (proportional to (‖a‖ + ‖b‖)²) is smaller;
2. fp32 approximate squared distances s̃ by the matmul form, one (query chunk × reference chunk) block at a time,
   keeping the ``shortlist`` smallest per query (TF32 and reduced-precision CPU matmuls switched off);
3. exact squared distances to those candidates in float64 on the original values, ranked by (distance, index):
   among equal distances the lowest reference index wins;
4. certificate (see ``fp32_error_bound``): the query is certified when its exact k-th distance is below the
   shortlist's cutoff minus the fp32 error bound; otherwise it is recomputed exactly against all references.

On integer inputs (uint8 images; any integers whose squared distances stay below 2**53) every squared distance is
an integer that float64 holds exactly, so the result is *the* answer, equal to any float64 brute force with the same
tie rule. On float inputs the distances are float64 sums of squared differences (equal to a float64 brute force up
to summation order).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch

FP32_UNIT_ROUNDOFF = 2.0**-24  # u of IEEE binary32, round to nearest
EXACT_LIMIT = 2.0**53  # integers below this are exact in float64


class KnnResult(NamedTuple):
    """Squared L2 distances (float64 N×k, ascending), reference indices (int64 N×k) and the number of queries that
    needed the exact fallback."""

    sqdist: np.ndarray
    index: np.ndarray
    fallbacks: int

    @property
    def distance(self) -> np.ndarray:
        """L2 distances (float64 N×k)."""
        return np.sqrt(self.sqdist)


# ------------------------------------------------------------------------------------------- the pure math


def gamma(n: int, u: float = FP32_UNIT_ROUNDOFF) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of an n-term floating-point inner product."""
    if n * u >= 1:
        return math.inf
    return n * u / (1 - n * u)


def fp32_error_bound(norm_a, norm_b, dim: int):
    """Bound on |s̃ − ‖x − y‖²| for the fp32 matmul-form squared distance s̃ of centred fp32 vectors a, b.

    Why it holds (Higham, Accuracy and Stability of Numerical Algorithms, §3.1): s̃ is a floating-point sum of the
    dim + 2 terms A, B, −2·a_i·b_i (A, B the fp32 squared norms), each product rounded at most once, in *any*
    order and with or without FMA, as any BLAS or cuBLAS fp32 kernel computes it; so it is within
    γ_{dim+2}·(A + B + 2Σ|a_i b_i|) ≤ γ_{dim+2}·(‖a‖ + ‖b‖)² of A + B − 2a·b. A and B are within 2u of ‖a‖² and ‖b‖²
    (computed in float64, then rounded to fp32), and centring in fp32 moves each coordinate by at most
    u relative, which moves ‖a − b‖² by at most ≈ 2u(‖a‖ + ‖b‖)². In all ≤ ((dim + 6)u + O(dim·u²))(‖a‖ + ‖b‖)²,
    which γ_{dim+8} covers; the factor 1.001 covers the rounding of the norms this bound is evaluated with.
    """
    return gamma(dim + 8) * 1.001 * (norm_a + norm_b) ** 2


def certified(kth_exact, cutoff, error_bound):
    """Whether the shortlist provably holds the true top k: exact k-th distance < cutoff − error (strictly).

    Every reference left out of the shortlist has s̃ ≥ cutoff (the shortlist keeps the smallest s̃), so its true
    squared distance is ≥ cutoff − error > the k-th exact distance: it cannot be in the top k, not even as a tie.
    """
    return kth_exact < cutoff - error_bound


def lexicographic_topk(sqdist: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k entries smallest by (distance, index): ties go to the lowest reference index."""
    by_index = index.argsort(dim=1, stable=True)
    sqdist, index = sqdist.gather(1, by_index), index.gather(1, by_index)
    order = sqdist.argsort(dim=1, stable=True)[:, :k]
    return sqdist.gather(1, order), index.gather(1, order)


# --------------------------------------------------------------------------------------------- precision


@contextlib.contextmanager
def full_fp32_matmul():
    """Full-precision fp32 matmuls inside (no TF32 on CUDA, no bf16/TF32 oneDNN on CPU); restores the flags."""
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ------------------------------------------------------------------------------------------ exact pieces


def as_rows(x, device) -> torch.Tensor:
    """An array or tensor as a 2-D tensor (one flattened vector per row) on device, in its own dtype."""
    t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if t.ndim == 0 or t.is_complex():
        raise ValueError(f"expected real vectors, got a {tuple(t.shape)} {t.dtype} tensor")
    return t.reshape(len(t), math.prod(t.shape[1:])).to(device)  # explicit width: -1 fails for 0 rows


def integer_gemm_is_exact(dtype: torch.dtype, dim: int) -> bool:
    """Whether float64 ‖x‖² + ‖y‖² − 2x·y is exact: integer values whose sums of squares stay below 2**53."""
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return False
    info = torch.iinfo(dtype)
    biggest = max(abs(info.min), abs(info.max))
    # Every product and partial sum is an integer of magnitude ≤ 4·dim·max², so none is ever rounded.
    return 4.0 * dim * float(biggest) ** 2 < EXACT_LIMIT


EXACT_BLOCK = 256  # 256 squares of 8-bit differences (each ≤ 255²) sum below 2**24: exact in fp32, in any order


def eight_bit(dtype: torch.dtype) -> bool:
    """uint8, int8 or bool: differences fit int16 and their squares sum exactly in fp32 blocks of EXACT_BLOCK."""
    return dtype in (torch.uint8, torch.int8, torch.bool)


def sum_of_squares_exact(diff: torch.Tensor) -> torch.Tensor:
    """float64 Σ diff² over the last axis of fp32 integer differences |d| ≤ 255, exactly (fp32 block sums, each below
    2**24, then a float64 sum of integers below 2**53)."""
    sq = diff * diff
    full = sq.shape[-1] - sq.shape[-1] % EXACT_BLOCK
    total = sq[..., :full].reshape(*sq.shape[:-1], -1, EXACT_BLOCK).sum(-1).sum(-1, dtype=torch.float64)
    if full < sq.shape[-1]:
        total += sq[..., full:].sum(-1, dtype=torch.float64)
    return total


def exact_sqdist_to_candidates(q: torch.Tensor, refs: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """float64 Σ(q − r)² of each query row to its own candidate rows refs[cand[i]] (m×L)."""
    if eight_bit(q.dtype) and eight_bit(refs.dtype):
        # The same integers as float64 would give, at a quarter of the memory traffic.
        diff = (q.to(torch.int16)[:, None, :] - refs[cand].to(torch.int16)).to(torch.float32)
        return sum_of_squares_exact(diff)
    diff = q.to(torch.float64)[:, None, :] - refs[cand].to(torch.float64)
    return (diff * diff).sum(-1)


def exact_sqdist(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float64 squared distances of every q row to every r row (m×n), exact for integer-valued inputs."""
    if integer_gemm_is_exact(q.dtype, q.shape[1]) and integer_gemm_is_exact(r.dtype, r.shape[1]):
        q64, r64 = q.to(torch.float64), r.to(torch.float64)
        return ((q64 * q64).sum(1)[:, None] + (r64 * r64).sum(1)[None, :]) - 2 * (q64 @ r64.T)
    diff = q.to(torch.float64)[:, None, :] - r.to(torch.float64)[None, :, :]
    return (diff * diff).sum(-1)


def brute_force_topk(q: torch.Tensor, refs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 top k (ties to the lowest index) of query rows against every reference, chunked."""
    dim = refs.shape[1]
    gemm = integer_gemm_is_exact(q.dtype, dim) and integer_gemm_is_exact(refs.dtype, dim)
    # Keep each float64 temporary near 32 MiB: chunk×dim for the matmul form, m×chunk×dim for differences.
    q_step = len(q) if gemm else min(len(q), 16)
    r_step = max(1, (1 << 22) // (dim if gemm else q_step * dim))
    out_d, out_i = [], []
    for qs in range(0, len(q), q_step):
        rows = q[qs : qs + q_step]
        best_d = torch.empty((len(rows), 0), dtype=torch.float64, device=q.device)
        best_i = torch.empty((len(rows), 0), dtype=torch.int64, device=q.device)
        for start in range(0, len(refs), r_step):
            d = exact_sqdist(rows, refs[start : start + r_step])
            i = torch.arange(start, start + d.shape[1], device=q.device).expand(len(rows), -1)
            best_d, best_i = lexicographic_topk(torch.cat([best_d, d], 1), torch.cat([best_i, i], 1), k)
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


# -------------------------------------------------------------------------------------------------- driver


PREP_ROWS = 1024  # rows per pass when centring or summing (small temporaries, cache-friendly)


EXACT_IN_FP32 = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.bool)


def _centred(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """fp32 x − centre, rounded once (error ≤ u·|x − centre|, as the bound assumes)."""
    if x.dtype in EXACT_IN_FP32:
        return x.to(torch.float32) - centre
    # float64, int32, int64: rounding x to fp32 first would err by u·|x|, not u·|x − centre|.
    return (x.to(torch.float64) - centre.to(torch.float64)).to(torch.float32)


def _sq_norms(a: torch.Tensor) -> torch.Tensor:
    """float64 squared norms of fp32 rows (computed in float64: relative error ~dim·2**-53, far below u)."""
    return torch.linalg.vector_norm(a, dim=1, dtype=torch.float64).square()


def reference_centre(refs: torch.Tensor) -> torch.Tensor:
    """The references' mean in float64, rounded to fp32 (any fixed vector would do; the mean minimises norms)."""
    total = torch.zeros(refs.shape[1], dtype=torch.float64, device=refs.device)
    for start in range(0, len(refs), PREP_ROWS):
        total += refs[start : start + PREP_ROWS].sum(0, dtype=torch.float64)
    return (total / len(refs)).to(torch.float32)


class CentredRefs:
    """The references centred in fp32, block by block: kept whole when they fit in cache_bytes, else recomputed."""

    def __init__(self, refs: torch.Tensor, centre: torch.Tensor, cache_bytes: int):
        self.refs, self.centre = refs, centre
        n, dim = refs.shape
        self.sq_norms = torch.empty(n, dtype=torch.float64, device=refs.device)
        # Filled in place: concatenating blocks would hold the set twice at the peak.
        self.cache = (torch.empty((n, dim), dtype=torch.float32, device=refs.device) if n * dim * 4 <= cache_bytes
                      else None)
        for start in range(0, n, PREP_ROWS):
            b = _centred(refs[start : start + PREP_ROWS], centre)
            self.sq_norms[start : start + len(b)] = _sq_norms(b)
            if self.cache is not None:
                self.cache[start : start + len(b)] = b

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[start:stop]
        return _centred(self.refs[start:stop], self.centre)


def shortlist_fp32(q: torch.Tensor, refs: CentredRefs, centre: torch.Tensor, shortlist: int,
                   ref_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate indices m×L, their fp32 s̃ m×L, the queries' float64 centred squared norms) for one query chunk."""
    a = _centred(q, centre)
    a_sq = _sq_norms(a)
    a_sq32 = a_sq.to(torch.float32)
    best_s = torch.empty((len(q), 0), dtype=torch.float32, device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
    n = len(refs.sq_norms)
    for start in range(0, n, ref_chunk):
        b = refs.block(start, min(n, start + ref_chunk))
        b_sq32 = refs.sq_norms[start : start + len(b)].to(torch.float32)
        s = torch.addmm(a_sq32[:, None] + b_sq32[None, :], a, b.T, alpha=-2)
        s, i = torch.topk(s, min(shortlist, s.shape[1]), dim=1, largest=False)
        best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        if best_s.shape[1] > shortlist:
            best_s, pos = torch.topk(best_s, shortlist, dim=1, largest=False)
            best_i = best_i.gather(1, pos)
    return best_i, best_s, a_sq


def exact_knn(queries, refs, k: int = 2, shortlist: int = 16, query_chunk: int = 2048, ref_chunk: int = 8192,
              device="cpu", progress: bool = False, desc: str = "knn", cache_bytes: int = 1 << 30) -> KnnResult:
    """The exact k nearest references of every query in L2 (ties to the lowest index), with bounded memory.

    queries, refs: arrays or tensors, one vector per leading index (images are flattened). Memory is the two sets in
    their own dtype, the centred fp32 references when they fit in cache_bytes (else one block at a time), and
    O(query_chunk·(ref_chunk + dim)) fp32 working blocks.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    q_all, r_all = as_rows(queries, device), as_rows(refs, device)
    dim = q_all.shape[1]
    if r_all.shape[1] != dim:
        raise ValueError(f"queries have {dim} values each, references {r_all.shape[1]}")
    if not 1 <= k <= len(r_all):
        raise ValueError(f"k = {k} needs 1 <= k <= the number of references ({len(r_all)})")
    if shortlist < k or query_chunk < 1 or ref_chunk < 1:
        raise ValueError(f"expected shortlist >= k and chunks >= 1, got {shortlist}, {query_chunk}, {ref_chunk}")
    out_d = np.empty((len(q_all), k), dtype=np.float64)
    out_i = np.empty((len(q_all), k), dtype=np.int64)
    fallbacks = 0
    with torch.no_grad(), full_fp32_matmul():
        centre = reference_centre(r_all)
        centred = CentredRefs(r_all, centre, cache_bytes)
        ref_norm_max = float(centred.sq_norms.max().sqrt())
        everything = shortlist >= len(r_all)  # the shortlist is the whole set: nothing left out to certify
        bar = tqdm(total=len(q_all), desc=desc, unit="img", disable=not progress, leave=False, delay=2.0)
        for start in range(0, len(q_all), query_chunk):
            q = q_all[start : start + query_chunk]
            cand, approx, a_sq = shortlist_fp32(q, centred, centre, shortlist, ref_chunk)
            # Re-rank exactly on the original values; sub-chunks keep the m×L×dim gather near 16 MiB of fp32.
            step = max(1, (1 << 22) // (cand.shape[1] * dim))
            parts = [exact_sqdist_to_candidates(q[j : j + step], r_all, cand[j : j + step])
                     for j in range(0, len(q), step)]
            best_d, best_i = lexicographic_topk(torch.cat(parts), cand, k)
            if not everything:
                bound = fp32_error_bound(a_sq.sqrt(), ref_norm_max, dim)
                cutoff = approx.max(1).values.to(torch.float64)  # the L-th smallest s̃ (the blocks need not be sorted)
                bad = ~certified(best_d[:, k - 1], cutoff, bound)
                if bad.any():
                    rows = bad.nonzero().squeeze(1)
                    exact_d, exact_i = brute_force_topk(q[rows], r_all, k)
                    best_d[rows], best_i[rows] = exact_d, exact_i
                    fallbacks += len(rows)
            out_d[start : start + len(q)] = best_d.cpu().numpy()
            out_i[start : start + len(q)] = best_i.cpu().numpy()
            bar.update(len(q))
        bar.close()
    return KnnResult(out_d, out_i, fallbacks)
