"""The Jacobian of a denoiser D(x; σ) with respect to x, its numerical rank, and where Zhang et al. evaluate it.

Zhang et al. (huijieZH/Diffusion-Model-Generalizability, ``edm/jacobian.py``) measure how many directions a
denoiser keeps: J = ∂D(x; σ)/∂x (D×D with D = C·H·W, x flattened C×H×W row-major), its singular values
s_1 ≥ … ≥ s_D, and the rank = the smallest k with √(Σ_{j≤k} s_j²) > 0.99·‖J‖_F. A model that generalises on a
mixture of low-rank Gaussians (``common.edm.dataset.molrg``) keeps about d directions at small σ (the subspace its
sample
lies on); the optimal denoiser of a finite training set keeps none near a training image (the softmax is one-hot
there, so J = Cov_w(y)/σ² → 0; ``optimal_jacobian``).

How J is computed: reverse mode over chunks of basis vectors, not one backward pass per output.
- ``method="vmap"``: ``torch.func.jacrev(chunk_size=…)``: one forward, then the VJPs of a chunk of unit rows in one
  vmapped backward. diffusers' attention runs through ``scaled_dot_product_attention``, whose CPU backward has no
  batching rule (vmap falls back to a slow loop; figures in the README's Jacobian section), so ``math_attention``
  swaps in diffusers' plain ``AttnProcessor`` (same math, baddbmm + softmax) while J is taken.
- ``method="batch"``: the chunk's rows as a real batch: x repeated B times, one forward and one ``autograd.grad``
  with the unit rows as cotangents. Valid for any denoiser whose batch rows are independent (EDM's UNet has no
  batch norm; the optimal denoiser is per-sample). No vmap, so no batching rules: torch.func's vmapped backward of
  ``torch.cdist`` (the non-matmul mode the optimal denoiser uses for exact distances) is wrong in torch 2.14
  (against ``torch.autograd.functional.jacobian``; the README gives the error), so the optimal denoiser takes this
  path.
Either way ``check_jacobian`` compares one random cotangent vᵀJ against a plain autograd VJP (one more backward):
a wrong batching rule cannot pass silently.

The rank without J (``randomized_rank``, the default of detect/jacobian.py): a block Krylov subspace of JᵀJ built
from vmapped VJPs and JVPs gives Rayleigh–Ritz values r_j ≤ s_j of J on an orthonormal Q (m columns), so
L_k = Σ_{j≤k} r_j² ≤ C_k = Σ_{j≤k} s_j² and F = ‖JQ‖_F² exactly; the rest of the energy, R = ‖J(I − QQᵀ)‖_F² =
‖J‖_F² − F, is bounded from p Gaussian probes (Hutchinson on (I − QQᵀ)JᵀJ(I − QQᵀ)) by Laurent and Massart's χ²
inequalities, with its top eigenvalue bounded from the probes' Gram matrix. Ky Fan's inequality for
JJᵀ = JQQᵀJᵀ + J(I − QQᵀ)Jᵀ gives C_k ≤ L_k + R. The rule C_k > t·‖J‖_F² (t = threshold²) is then decided for
every k at once: rank ≤ k when L_k > t(F + R_up), rank > k when C_k's upper bound stays ≤ t‖J‖_F²'s lower bound,
and the rank is returned when the two meet; the subspace grows by a block while they do not, up to a size where
the full Jacobian is cheaper (then ``None``: the caller computes J). Deterministic except the probes' bounds,
which fail with probability ≤ ``failure_probability`` over all the checks of one rank together.

Where (``evaluation_points``), for seed s with latent z (EDM's seed rule, ``common.edm.sampler``):
- ``noise``: x = σ·z at each requested σ (the state a sampler started at σ would begin from);
- ``trajectory``: the states x_0 = σ_0·z, x_1, …, x_{N−1} of EDM's deterministic Heun sampler at its own
  σ_0 > … > σ_{N−1} (σ_max first; x_N at σ = 0 is not a denoiser input), as Zhang et al. do.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.func import jvp, vjp, vmap

from diffmem.common.edm.sampler import draw_labels, draw_latents, heun_step, seed_generators
from diffmem.common.errors import DiffmemError
from diffmem.common.plotting import new_axes

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
METHODS = ("vmap", "batch")
RANK_METHODS = ("randomized", "full")
MODES = ("noise", "trajectory")


class JacobianError(DiffmemError, ValueError):
    """A Jacobian that fails its autograd check, or bad rank settings; str() is the one-line message."""


# ------------------------------------------------------------------------------------------ the math


def numerical_rank(singular_values: torch.Tensor, threshold: float = 0.99) -> int:
    """Zhang et al.'s rank: the smallest k with √(Σ_{j≤k} s_j²) > threshold·‖J‖_F (s descending); 0 when J = 0."""
    energy = torch.cumsum(singular_values.to(torch.float64) ** 2, dim=0).sqrt()
    total = energy[-1]  # ‖J‖_F
    if not total > 0:
        return 0
    return int(torch.nonzero(energy > threshold * total)[0]) + 1


def singular_values(jacobian: torch.Tensor) -> torch.Tensor:
    """s_1 ≥ … ≥ s_D of J in float64."""
    return torch.linalg.svdvals(jacobian.to(torch.float64))


def optimal_jacobian(x: torch.Tensor, sigma: float, train: torch.Tensor) -> torch.Tensor:
    """Closed form for D(x) = Σᵢ wᵢ yᵢ, w = softmax(−‖x − yᵢ‖²/2σ²): J = (Σᵢ wᵢ yᵢ yᵢᵀ − D Dᵀ)/σ² = Cov_w(y)/σ²."""
    # ∂wᵢ/∂x = wᵢ (yᵢ − D)/σ², so J = Σᵢ yᵢ (∂wᵢ/∂x)ᵀ = Σᵢ wᵢ yᵢ (yᵢ − D)ᵀ/σ²: symmetric, PSD, rank ≤ N − 1.
    y = train.reshape(len(train), -1).to(torch.float64)
    v = x.reshape(-1).to(torch.float64)
    w = torch.softmax(-((v - y) ** 2).sum(dim=1) / (2 * sigma**2), dim=0)
    mean = w @ y
    return ((y * w[:, None]).T @ y - torch.outer(mean, mean)) / sigma**2


def chi2_lower_quantile(p: int, delta: float) -> float:
    """A q with P(χ²_p ≤ q) ≤ δ by the Chernoff bound P(χ²_p ≤ zp) ≤ (z·e^{1−z})^{p/2}, 0 < z < 1 (bisection)."""
    target = math.log(delta) * 2 / p  # ln z + 1 − z must be at most this (< 0)
    lo, hi = 0.0, 1.0  # ln z + 1 − z rises from −∞ at z → 0 to 0 at z = 1
    for _ in range(100):
        mid = (lo + hi) / 2
        if math.log(mid) + 1 - mid <= target:
            lo = mid
        else:
            hi = mid
    return lo * p


def residual_top_eigenvalue_bound(gram_max: float, p: int, delta: float) -> float:
    """μ₁ ≤ λ_max(GᵀBG)/q with P ≥ 1 − δ: v₁ᵀG ~ N(0, I_p), so λ_max ≥ μ₁‖Gᵀv₁‖² ~ μ₁χ²_p (q: χ²_p's δ-quantile)."""
    q = chi2_lower_quantile(p, delta)
    return 0.0 if gram_max == 0 else gram_max / q if q > 0 else math.inf  # q = 0: δ below 2^-100's reach


def residual_energy_bounds(mean: float, top_up: float, p: int, delta: float) -> tuple[float, float]:
    """(R_lo, R_up) for R = tr B from X = (1/p)Σ gᵢᵀBgᵢ, Gaussian gᵢ, μ₁(B) ≤ top_up, each side failing w.p. ≤ δ.

    Laurent & Massart (2000), Lemma 1, with aⱼ = μⱼ/p repeated over the p probes (‖a‖₂² ≤ μ₁R/p, ‖a‖_∞ = μ₁/p):
    P(X ≤ R − 2‖a‖₂√x) ≤ e^{−x} and P(X ≥ R + 2‖a‖₂√x + 2‖a‖_∞x) ≤ e^{−x}, x = ln(1/δ), solved for √R."""
    x = math.log(1 / delta)
    c = math.sqrt(top_up * x / p)
    upper = (c + math.sqrt(c * c + mean)) ** 2
    if 2 * math.sqrt(x / p) < 1:  # the same lower tail with ‖a‖₂ ≤ R/√p, whatever μ₁
        upper = min(upper, mean / (1 - 2 * math.sqrt(x / p)))
    rest = mean - 2 * top_up * x / p
    lower = (math.sqrt(c * c + rest) - c) ** 2 if rest > 0 else 0.0
    return lower, upper


class RankInterval(NamedTuple):
    lo: int  # the rank is at least this
    hi: int  # and at most this


def rank_interval(ritz: torch.Tensor, residual_lo: float, residual_up: float, top_up: float, dim: int,
                  threshold: float = 0.99, slack: float = 0.0) -> RankInterval:
    """Bounds on Zhang et al.'s rank from Ritz values r (descending) of J on a subspace and R's bounds (module doc).

    C_k ≥ L_k; C_k ≤ L_{min(k,m)} + min(R, k·μ₁) (Ky Fan for JJᵀ = JQQᵀJᵀ + J(I − QQᵀ)Jᵀ); ‖J‖²_F = F + R. The rank
    is ≤ k when L_k > t(F + R_up) + slack and > k when L_k + (1 − t)R_up + slack ≤ tF or
    L_{min(k,m)} + k·μ₁ + slack ≤ t(F + R_lo); t = threshold². ``slack`` absorbs rounding of the products."""
    t = threshold**2
    energy = torch.cumsum(ritz.to(torch.float64) ** 2, 0)
    m = len(energy)
    captured = float(energy[-1]) if m else 0.0
    if captured == 0 and residual_up == 0:
        return RankInterval(0, 0)  # J = 0
    lk = torch.zeros(dim + 1, dtype=torch.float64)  # L_k for k = 0 … dim (constant F past m)
    lk[1:m + 1] = energy
    lk[m + 1:] = captured
    k = torch.arange(dim + 1, dtype=torch.float64)
    above = lk > t * (captured + residual_up) + slack
    hi = int(torch.nonzero(above)[0]) if bool(above.any()) else dim
    below = lk + (1 - t) * residual_up + slack <= t * captured
    below |= lk + k * top_up + slack <= t * (captured + residual_lo)
    below[0] = captured > 0 or residual_lo > 0  # C_0 = 0 ≤ t‖J‖²_F, and the rank of J ≠ 0 is ≥ 1
    lo = int(torch.nonzero(below)[-1]) + 1 if bool(below.any()) else 0
    return RankInterval(lo, hi)  # lo > hi only where a probabilistic bound failed: undecided


# ------------------------------------------------------------------------------------ computing J


@contextmanager
def math_attention(module: torch.nn.Module):
    """Within the block, diffusers ``Attention`` layers of ``module`` use the plain ``AttnProcessor`` (vmap-able)."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor
    except ImportError:  # no diffusers layers to swap
        yield
        return
    saved = [(m, m.processor) for m in module.modules() if isinstance(m, Attention)]
    try:
        for m, _ in saved:
            m.set_processor(AttnProcessor())
        yield
    finally:
        for m, processor in saved:
            m.set_processor(processor)


def flat_denoiser(denoise: Denoiser, shape: Sequence[int], sigma: torch.Tensor,
                  class_labels: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ D(v; σ) on flattened images: [D] → [D], or a batch [B, D] → [B, D] (labels repeated to B rows)."""

    def f(v: torch.Tensor) -> torch.Tensor:
        rows = v.reshape(-1, *shape)
        labels = None if class_labels is None else class_labels.expand(len(rows), *class_labels.shape[1:])
        return denoise(rows, sigma, labels).reshape(v.shape)

    return f


def jacobian_vmap(f: Callable, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """J of f at v by ``torch.func.jacrev``: one forward, chunk_size vmapped VJPs per backward."""
    from torch.func import jacrev

    return jacrev(f, chunk_size=chunk_size)(v)


def jacobian_batch(f: Callable, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """J of f at v, chunk_size rows at a time as a real batch: v repeated, one forward, one backward of unit rows."""
    dim = v.numel()
    rows = []
    for start in range(0, dim, chunk_size):
        idx = torch.arange(start, min(dim, start + chunk_size), device=v.device)
        xs = v.detach().expand(len(idx), dim).clone().requires_grad_(True)
        out = f(xs)
        basis = torch.zeros(len(idx), dim, dtype=out.dtype, device=v.device)
        basis[torch.arange(len(idx), device=v.device), idx] = 1
        (grad,) = torch.autograd.grad(out, xs, basis)
        rows.append(grad)
    return torch.cat(rows)


def check_jacobian(f: Callable, v: torch.Tensor, jacobian: torch.Tensor, rtol: float = 1e-4) -> None:
    """vᵀJ of one seeded random cotangent against a plain autograd VJP; JacobianError when they differ."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(v.numel(), generator=g, dtype=jacobian.dtype).to(v.device)
    xs = v.detach().clone().requires_grad_(True)
    out = f(xs)
    (plain,) = torch.autograd.grad(out, xs, u.to(out.dtype))
    ours = u @ jacobian
    err = float((ours - plain).abs().max())
    scale = float(plain.abs().max()) + 1e-30
    # fp32 denoisers round each VJP differently in a batch than alone: relative, not bitwise, agreement.
    if err > rtol * scale + 1e-12:
        raise JacobianError(f"the Jacobian disagrees with a plain autograd VJP (max error {err:.3g} for values up to "
                            f"{scale:.3g}): a torch.func batching rule is wrong here; use method 'batch'")


def denoiser_jacobian(denoise: Denoiser, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                      chunk_size: int = 64, method: str = "vmap", check: bool = True) -> torch.Tensor:
    """∂D(x; σ)/∂x at one image x (C×H×W) as a D×D matrix, row i = ∇ₓ D_i, in x's dtype (see the module docstring)."""
    if method not in METHODS:
        raise JacobianError(f"unknown Jacobian method {method!r}; expected one of {', '.join(METHODS)}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    f = flat_denoiser(denoise, x.shape, sigma, class_labels)
    v = x.reshape(-1)
    module = denoise if isinstance(denoise, torch.nn.Module) else torch.nn.Module()
    with math_attention(module), torch.enable_grad():
        jac = (jacobian_vmap if method == "vmap" else jacobian_batch)(f, v, chunk_size).detach()
        if check:
            check_jacobian(f, v, jac)
    return jac


# ------------------------------------------------------------------------- the rank without J


class JacobianProducts:
    """Rows J·t and Jᵀ·u of f at v for a batch of vectors [b, D], by vmapped ``torch.func`` JVPs and VJPs, in
    chunks of chunk_size; the VJPs reuse one forward (``torch.func.vjp``). float64 out."""

    def __init__(self, f: Callable, v: torch.Tensor, chunk_size: int):
        self.f, self.v, self.chunk = f, v.detach(), chunk_size
        out, self._pullback = vjp(f, self.v)
        self.out_dtype = out.dtype

    def _tangent(self, t: torch.Tensor) -> torch.Tensor:
        return jvp(self.f, (self.v,), (t,))[1]

    def jvp(self, tangents: torch.Tensor) -> torch.Tensor:
        t = tangents.to(self.v.dtype)
        return torch.cat([vmap(self._tangent)(t[i:i + self.chunk]).to(torch.float64)
                          for i in range(0, len(t), self.chunk)] or [tangents.to(torch.float64)])

    def vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        u = cotangents.to(self.out_dtype)
        return torch.cat([vmap(self._pullback)(u[i:i + self.chunk])[0].to(torch.float64)
                          for i in range(0, len(u), self.chunk)] or [cotangents.to(torch.float64)])


def check_products(products: JacobianProducts, rtol: float = 1e-4) -> None:
    """One vmapped VJP against a plain autograd VJP (the JVPs are checked against the VJPs by ``randomized_rank``'s
    adjoint test); JacobianError when a batching rule is wrong."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, products.v.numel(), generator=g, dtype=torch.float64).to(products.v.device)
    xs = products.v.clone().requires_grad_(True)
    out = products.f(xs)
    (plain,) = torch.autograd.grad(out, xs, u[0].to(out.dtype))
    err = float((products.vjp(u)[0] - plain.to(torch.float64)).abs().max())
    scale = float(plain.abs().max()) + 1e-30
    if err > rtol * scale + 1e-12:
        raise JacobianError(f"a vmapped VJP disagrees with a plain one (max error {err:.3g} for values up to "
                            f"{scale:.3g}): a torch.func batching rule is wrong here; use --method full")


def check_adjoint(omega: torch.Tensor, jt_omega: torch.Tensor, q: torch.Tensor, jq: torch.Tensor,
                  rtol: float = 1e-4) -> None:
    """ωᵢ·(J q_j) = (Jᵀωᵢ)·q_j for the first block: JVPs and VJPs of one J; JacobianError when they are not."""
    lhs, rhs = omega @ jq.T, jt_omega @ q.T
    scale = float(omega.norm(dim=1).max() * jq.norm(dim=1).max() + jt_omega.norm(dim=1).max()) + 1e-300
    err = float((lhs - rhs).abs().max())
    if err > rtol * scale:
        raise JacobianError(f"the JVPs and VJPs are not adjoint (max error {err:.3g} at scale {scale:.3g}): a "
                            "torch.func batching rule is wrong here; use --method full")


def orthonormal_rows(z: torch.Tensor, basis: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Orthonormal rows spanning z's rows minus their part in span(basis rows), twice projected; directions left
    with less than tol of z's largest row norm are dropped (the subspace already holds them)."""
    scale = float(z.norm(dim=1).max()) if len(z) else 0.0
    for _ in range(2):  # classical Gram–Schmidt twice: orthogonal to rounding
        z = z - (z @ basis.T) @ basis
    if scale == 0:
        return z[:0]
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    return vh[s > tol * scale]


class RandomizedRank(NamedTuple):
    rank: int | None  # None: not decided within the subspace budget (the caller takes the full Jacobian)
    rank_lo: int
    rank_hi: int
    subspace: int  # m, the columns of Q at the end
    fro_lo: float  # √(F + R_lo) ≤ ‖J‖_F ≤ √(F + R_up)
    fro_hi: float
    fro: float  # √(F + X): the unbiased estimate of ‖J‖²_F, square-rooted
    checks: int
    reason: str  # why it stopped undecided ("" when decided)


def randomized_rank(jvp_rows: Callable[[torch.Tensor], torch.Tensor],
                    vjp_rows: Callable[[torch.Tensor], torch.Tensor], dim: int, threshold: float = 0.99,
                    block: int = 32, probes: int = 64, max_subspace: int | None = None,
                    failure_probability: float = 1e-6, seed: int = 0, slack: float = 1e-5) -> RandomizedRank:
    """Zhang et al.'s rank of a D×D operator J given by rows ↦ J-products, by the block Krylov bounds of the module
    docstring: a rank that is wrong with probability ≤ failure_probability, or rank None with the bounds reached.

    jvp_rows(T [b, D]) = rows J tᵢ, vjp_rows(U) = rows Jᵀuᵢ. Block Krylov on JᵀJ from JᵀΩ (Ω Gaussian): per block
    b VJPs and b JVPs; p probe JVPs once. Check i's three probabilistic bounds fail w.p. ≤ δ/(3·2^i) each.
    Stops undecided when the next block would pass ``max_subspace`` (default D/8), or when, at the energy the
    last block added, even the rest of that budget could not reach t·‖J‖²_F's estimate. ``slack`` (relative to
    F + R_up) keeps a rank whose rule is within the products' rounding for the full Jacobian."""
    if not 0 < failure_probability < 1:
        raise JacobianError(f"expected 0 < failure_probability < 1, got {failure_probability}")
    if block < 1 or probes < 2:
        raise JacobianError(f"expected block >= 1 and probes >= 2, got {block} and {probes}")
    limit = max(block, dim // 8) if max_subspace is None else min(max_subspace, dim)
    gen = torch.Generator().manual_seed(seed)
    t = threshold**2
    f64 = dict(dtype=torch.float64)
    q = torch.zeros(0, dim, **f64)  # rows: the orthonormal basis Q
    w = torch.zeros(0, dim, **f64)  # rows: J q_j
    omega = torch.randn(block, dim, generator=gen, **f64)
    z = vjp_rows(omega)  # JᵀΩ: the row space first
    g = torch.randn(probes, dim, generator=gen, **f64)
    jg = None
    history: list[tuple[int, float]] = []
    check = 0
    while True:
        new = orthonormal_rows(z, q)
        if len(new) == 0 and len(q) < dim:  # an invariant subspace: go on from fresh directions
            new = orthonormal_rows(torch.randn(block, dim, generator=gen, **f64), q)
        q, w_new = torch.cat([q, new]), jvp_rows(new)
        w = torch.cat([w, w_new])
        if check == 0 and len(new):
            check_adjoint(omega, z, new, w_new)
        if jg is None:
            jg = jvp_rows(g)
        check += 1
        delta = failure_probability / (3 * 2**check)
        residual = jg - (g @ q.T) @ w  # rows J(I − QQᵀ)gᵢ
        gram_max = float(torch.linalg.matrix_norm(residual, ord=2) ** 2) if residual.abs().max() > 0 else 0.0
        mean = float(residual.square().sum()) / probes
        top_up = residual_top_eigenvalue_bound(gram_max, probes, delta)
        r_lo, r_up = residual_energy_bounds(mean, top_up, probes, delta)
        ritz = torch.linalg.svdvals(w.T)  # exact Rayleigh–Ritz values of J on span Q: r_j ≤ s_j
        captured = float(ritz.square().sum())
        bounds = rank_interval(ritz, r_lo, r_up, top_up, dim, threshold, slack * (captured + r_up))
        result = dict(rank_lo=bounds.lo, rank_hi=bounds.hi, subspace=len(q), fro_lo=math.sqrt(captured + r_lo),
                      fro_hi=math.sqrt(captured + r_up), fro=math.sqrt(captured + mean), checks=check)
        if bounds.lo == bounds.hi:
            return RandomizedRank(bounds.lo, reason="", **result)
        if bounds.lo > bounds.hi:
            return RandomizedRank(None, reason="the probes' bounds contradict each other", **result)
        history.append((len(q), captured))
        if len(q) + block > limit or len(q) >= dim:
            return RandomizedRank(None, reason=f"undecided at the subspace budget {limit}", **result)
        (m0, e0), (m1, e1) = ([(0, 0.0)] + history)[-2:]
        gap = t * (captured + mean) - captured  # energy still to capture, estimated
        if gap > 0 and e1 > e0 and m1 + gap * (m1 - m0) / (e1 - e0) > limit:
            return RandomizedRank(None, reason=f"the rank is estimated above the subspace budget {limit}", **result)
        z = vjp_rows(w_new)  # JᵀJ q for the newest block: the next Krylov block


# ------------------------------------------------------------------------------- evaluation points


@torch.no_grad()
def heun_trajectory(denoise: Denoiser, latent: torch.Tensor, sigmas: torch.Tensor,
                    class_labels: torch.Tensor | None = None) -> list[tuple[float, torch.Tensor]]:
    """(σ_i, x_i) for i < N along EDM's deterministic Heun sampler from x_0 = σ_0·z (float64), σ_max first."""

    sigmas = sigmas.to(device=latent.device, dtype=torch.float64)
    x = latent.to(torch.float64)[None] * sigmas[0]
    states = []
    for i in range(len(sigmas) - 1):
        states.append((float(sigmas[i]), x[0]))
        x = heun_step(denoise, x, sigmas[i], sigmas[i + 1], class_labels)
    return states


def noise_points(latent: torch.Tensor, sigmas: Sequence[float]) -> list[tuple[float, torch.Tensor]]:
    """(σ, σ·z) for each requested σ, float64: the state a sampler started at σ begins from."""
    z = latent.to(torch.float64)
    return [(float(s), z * s) for s in sigmas]


class JacobianRow(NamedTuple):
    seed: int
    sigma: float
    rank: int
    rank_ratio: float
    dim: int
    fro: float  # ‖J‖_F (randomized: the estimate √(F + X)): tells a vanishing Jacobian from a low-rank one
    method: str = "full"  # how the rank was decided: "full" (J and its SVD) or "randomized"
    fallback: str | None = None  # why --method randomized took the full Jacobian; None where it did not
    subspace: int | None = None  # Krylov subspace size m the randomized rank ended at (dim for full)
    rank_lo: int | None = None  # the randomized bounds on the rank (both = rank where decided; full: = rank)
    rank_hi: int | None = None
    fro_lo: float | None = None  # bounds on ‖J‖_F (full: = fro)
    fro_hi: float | None = None
    failure_probability: float = 0.0  # of a randomized rank (all its checks together); 0 for full

    def to_dict(self) -> dict:
        return self._asdict()


def rank_row(seed: int, sigma: float, jacobian: torch.Tensor, threshold: float,
             fallback: str | None = None) -> JacobianRow:
    """One result row of the full Jacobian: the rank of J at (seed, σ), rank/dim, dim and ‖J‖_F."""
    s = singular_values(jacobian)
    dim = jacobian.shape[0]
    rank = numerical_rank(s, threshold)
    fro = float(s.square().sum().sqrt())
    return JacobianRow(int(seed), float(sigma), rank, rank / dim, dim, fro, "full", fallback, dim, rank, rank,
                       fro, fro)


class RandomizedSettings(NamedTuple):
    """``randomized_rank``'s knobs (detect/jacobian.py's --block, --probes, --max_subspace, --failure_probability)."""

    block: int = 32
    probes: int = 64
    max_subspace: int | None = None
    failure_probability: float = 1e-6
    # The first check alone costs block VJPs and block + probes JVPs (a JVP ≈ 2 VJPs here): below this D the
    # full Jacobian's D VJPs are about as cheap (3×8×8 = 192 was 2–3× faster in full; docs/edm-measures.md).
    min_dim: int = 512


def probe_seed(seed: int, sigma: float) -> int:
    """The randomized rank's generator seed for (seed, σ): the same row is the same computation on a rerun."""
    return zlib.crc32(f"{int(seed)}:{float(sigma)!r}".encode())


def point_rank_row(denoise: Denoiser, seed: int, sigma: float, x: torch.Tensor, labels: torch.Tensor | None,
                   threshold: float = 0.99, rank_method: str = "randomized", chunk_size: int = 64,
                   method: str = "vmap", randomized: RandomizedSettings = RandomizedSettings()) -> JacobianRow:
    """The row of one point: the randomized rank where it decides, else (or with rank_method "full") the full J."""
    if rank_method not in RANK_METHODS:
        raise JacobianError(f"unknown rank method {rank_method!r}; expected one of {', '.join(RANK_METHODS)}")
    fallback = None
    if rank_method == "randomized" and method != "vmap":
        fallback = f"no vmapped JVP for this denoiser (Jacobian method {method!r})"
    elif rank_method == "randomized" and x.numel() < randomized.min_dim:
        fallback = f"the full Jacobian is cheaper at D = {x.numel()} < {randomized.min_dim}"
    elif rank_method == "randomized":
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        f = flat_denoiser(denoise, x.shape, sig, labels)
        module = denoise if isinstance(denoise, torch.nn.Module) else torch.nn.Module()
        with math_attention(module), torch.enable_grad():
            products = JacobianProducts(f, x.reshape(-1), chunk_size)
            check_products(products)
            got = randomized_rank(products.jvp, products.vjp, x.numel(), threshold, randomized.block,
                                  randomized.probes, randomized.max_subspace, randomized.failure_probability,
                                  probe_seed(seed, sigma))
        if got.rank is not None:
            dim = x.numel()
            return JacobianRow(int(seed), float(sigma), got.rank, got.rank / dim, dim, got.fro, "randomized", None,
                               got.subspace, got.rank_lo, got.rank_hi, got.fro_lo, got.fro_hi,
                               randomized.failure_probability)
        fallback = f"{got.reason} (rank in [{got.rank_lo}, {got.rank_hi}], subspace {got.subspace})"
    jac = denoiser_jacobian(denoise, x, sigma, labels, chunk_size, method)
    return rank_row(seed, sigma, jac, threshold, fallback)


def evaluation_points(denoise: Denoiser, seed: int, image_shape: Sequence[int], mode: str,
                      sigmas: Sequence[float] | torch.Tensor, label_dim: int = 0,
                      device="cpu") -> tuple[list[tuple[float, torch.Tensor]], torch.Tensor | None]:
    """The (σ, x) points of one seed (``noise`` or ``trajectory``) and its class label (EDM's seed rule)."""

    gens = seed_generators([seed], device)
    latent = draw_latents(gens, image_shape, device)[0]
    labels = draw_labels(gens, label_dim, device) if label_dim else None
    if mode == "trajectory":
        return heun_trajectory(denoise, latent, torch.as_tensor(sigmas, dtype=torch.float64), labels), labels
    if mode == "noise":
        return noise_points(latent, sigmas), labels
    raise JacobianError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def jacobian_rows(denoise: Denoiser, seeds: Sequence[int], image_shape: Sequence[int], mode: str,
                  sigmas: Sequence[float] | torch.Tensor, threshold: float = 0.99, label_dim: int = 0,
                  done: set | frozenset = frozenset(), chunk_size: int = 64, method: str = "vmap",
                  device="cpu", progress: bool = True, rank_method: str = "randomized",
                  randomized: RandomizedSettings = RandomizedSettings()) -> Iterator[JacobianRow]:
    """Rows for every (seed, σ) not in ``done``, one rank each (``point_rank_row``), seed by seed (lazily)."""
    from tqdm.auto import tqdm

    at = point_sigmas(mode, sigmas)
    pending = {int(s): [t for t in at if (int(s), t) not in done] for s in seeds}
    bar = tqdm(total=sum(map(len, pending.values())), desc="jacobian", unit="J", disable=not progress)
    for seed, left in pending.items():
        if not left:
            continue  # a resumed run: this seed's trajectory need not be sampled again
        points, labels = evaluation_points(denoise, seed, image_shape, mode, sigmas, label_dim, device)
        for sigma, x in points:
            if sigma in left:
                row = point_rank_row(denoise, seed, sigma, x, labels, threshold, rank_method, chunk_size, method,
                                     randomized)
                bar.update(1)
                yield row
    bar.close()


def point_sigmas(mode: str, sigmas) -> list[float]:
    """The σ's at which a seed is evaluated: the schedule without its final 0 (trajectory), or the list."""
    values = [float(s) for s in sigmas]
    return values[:-1] if mode == "trajectory" else values


# ------------------------------------------------------------------------------------------ summary


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per σ (largest first): samples, mean rank, and mean, std, min and max of rank/dim over the seeds."""
    by_sigma: dict[float, list[dict]] = {}
    for r in rows:
        by_sigma.setdefault(float(r["sigma"]), []).append(r)
    out = []
    for sigma in sorted(by_sigma, reverse=True):
        group = by_sigma[sigma]
        ratios = torch.tensor([float(r["rank_ratio"]) for r in group], dtype=torch.float64)
        out.append({"sigma": sigma, "snr": 1 / sigma, "n": len(group),
                    "rank_mean": sum(r["rank"] for r in group) / len(group),
                    "ratio_mean": float(ratios.mean()),
                    "ratio_std": float(ratios.std(unbiased=False)),
                    "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
                    "dim": int(group[0]["dim"])})
    return out


def plot_rank_curve(rows: Sequence[dict], path, title: str = "") -> None:
    """PNG of rank/dim against SNR 1/σ (log x): the mean over seeds, ±1 std shaded, min and max dotted."""

    stats = sorted(summarize(rows), key=lambda r: r["snr"])
    snr = [r["snr"] for r in stats]
    mean = [r["ratio_mean"] for r in stats]
    fig, ax = new_axes((5.5, 3.8))
    ax.fill_between(snr, [m - r["ratio_std"] for m, r in zip(mean, stats)],
                    [m + r["ratio_std"] for m, r in zip(mean, stats)], alpha=0.25, label="±1 std")
    ax.plot(snr, [r["ratio_min"] for r in stats], ":", color="gray", lw=1, label="min / max")
    ax.plot(snr, [r["ratio_max"] for r in stats], ":", color="gray", lw=1)
    n = max((r["n"] for r in stats), default=0)
    ax.plot(snr, mean, "o-", ms=3, label=f"mean over {n} seed{'s' if n != 1 else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("SNR 1/σ")
    ax.set_ylabel("rank / dim")
    ax.set_ylim(0, min(1.0, max((r["ratio_max"] for r in stats), default=1.0) * 1.1 + 0.02))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

