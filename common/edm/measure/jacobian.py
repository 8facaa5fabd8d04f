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

Where (``evaluation_points``), for seed s with latent z (EDM's seed rule, ``common.edm.sampler``):
- ``noise``: x = σ·z at each requested σ (the state a sampler started at σ would begin from);
- ``trajectory``: the states x_0 = σ_0·z, x_1, …, x_{N−1} of EDM's deterministic Heun sampler at its own
  σ_0 > … > σ_{N−1} (σ_max first; x_N at σ = 0 is not a denoiser input), as Zhang et al. do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from diffmem.common.edm.sampler import draw_labels, draw_latents, heun_step, seed_generators
from diffmem.common.errors import DiffmemError
from diffmem.common.plotting import new_axes

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
METHODS = ("vmap", "batch")
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
    fro: float  # ‖J‖_F: tells a vanishing Jacobian (rank 0 or tiny norm) from a low-rank one

    def to_dict(self) -> dict:
        return self._asdict()


def rank_row(seed: int, sigma: float, jacobian: torch.Tensor, threshold: float) -> JacobianRow:
    """One result row: the rank of J at (seed, σ), rank/dim, dim and ‖J‖_F."""
    s = singular_values(jacobian)
    dim = jacobian.shape[0]
    rank = numerical_rank(s, threshold)
    return JacobianRow(int(seed), float(sigma), rank, rank / dim, dim, float(s.square().sum().sqrt()))


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
                  device="cpu", progress: bool = True) -> Iterator[JacobianRow]:
    """Rows for every (seed, σ) not in ``done``, one Jacobian each, seed by seed (lazily: one per next())."""
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
                jac = denoiser_jacobian(denoise, x, sigma, labels, chunk_size, method)
                bar.update(1)
                yield rank_row(seed, sigma, jac, threshold)
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

