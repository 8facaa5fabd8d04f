"""Preconditioning and training losses of Karras et al. 2022 ("EDM"), Table 1, as short pure functions.

D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)). Three formulations: ``vp`` (Song et al.'s
variance preserving SDE), ``ve`` (variance exploding) and ``edm``. Every function takes σ as a tensor and
computes in its dtype (fp32 or fp64; never under reduced precision: the callers pass fp32 or fp64 tensors).

Why not diffusers' ``EDMEulerScheduler.precondition_*``: it covers the ``edm`` column only and computes in the
sample's dtype; one set of functions for the three columns keeps one mechanism, and the tests check the ``edm``
column against that scheduler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PRECONDS = ("vp", "ve", "edm")


# ------------------------------------------------------------------------------------------- VP


def vp_sigma(t: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (Karras et al. 2022, Table 1, VP schedule)."""
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """t(σ) = (sqrt(β_min² + 2β_d ln(1 + σ²)) − β_min) / β_d, the inverse of ``vp_sigma`` (Table 1)."""
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


# --------------------------------------------------------------------------- Table 1, per column


def c_skip(sigma: torch.Tensor, precond: str, sigma_data: float = 0.5) -> torch.Tensor:
    """c_skip(σ): 1 for VP and VE, σ_d²/(σ² + σ_d²) for EDM (Table 1)."""
    if precond == "edm":
        return sigma_data**2 / (sigma**2 + sigma_data**2)
    return torch.ones_like(sigma)


def c_out(sigma: torch.Tensor, precond: str, sigma_data: float = 0.5) -> torch.Tensor:
    """c_out(σ): −σ for VP, σ for VE, σ σ_d / sqrt(σ² + σ_d²) for EDM (Table 1)."""
    if precond == "vp":
        return -sigma
    if precond == "ve":
        return sigma
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, precond: str, sigma_data: float = 0.5) -> torch.Tensor:
    """c_in(σ): 1/sqrt(σ² + 1) for VP, 1 for VE, 1/sqrt(σ² + σ_d²) for EDM (Table 1)."""
    if precond == "vp":
        return 1 / (sigma**2 + 1).sqrt()
    if precond == "ve":
        return torch.ones_like(sigma)
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor, precond: str, beta_d: float = 19.9, beta_min: float = 0.1,
            M: int = 1000) -> torch.Tensor:
    """c_noise(σ): (M − 1) t(σ) for VP, ln(σ/2) for VE, ln(σ)/4 for EDM (Table 1)."""
    if precond == "vp":
        return (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)
    if precond == "ve":
        return (0.5 * sigma).log()
    return sigma.log() / 4


def loss_weight(sigma: torch.Tensor, precond: str, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ): 1/σ² for VP and VE, (σ² + σ_d²)/(σ σ_d)² for EDM (Table 1, "loss weighting")."""
    if precond == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return 1 / sigma**2


# ------------------------------------------------------------------------------- training noise


@dataclass
class Preconditioning:
    """One formulation's constants (EDM's defaults); saved with every network so that it reloads the same."""

    precond: str = "edm"
    sigma_data: float = 0.5  # EDM
    P_mean: float = -1.2  # EDM: ln σ ~ N(P_mean, P_std²)
    P_std: float = 1.2
    beta_d: float = 19.9  # VP
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5
    ve_sigma_min: float = 0.02  # VE: log-uniform σ and the network's range
    ve_sigma_max: float = 100.0

    def __post_init__(self):
        if self.precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {self.precond!r}; expected one of {', '.join(PRECONDS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sigma_min(self) -> float:
        """The smallest σ the network was trained for: σ(ε_t) for VP, σ_min for VE, 0 for EDM."""
        if self.precond == "vp":
            return float(vp_sigma(torch.tensor(self.epsilon_t, dtype=torch.float64), self.beta_d, self.beta_min))
        return self.ve_sigma_min if self.precond == "ve" else 0.0

    @property
    def sigma_max(self) -> float:
        """The largest σ the network was trained for: σ(1) for VP, σ_max for VE, ∞ for EDM."""
        if self.precond == "vp":
            return float(vp_sigma(torch.tensor(1.0, dtype=torch.float64), self.beta_d, self.beta_min))
        return self.ve_sigma_max if self.precond == "ve" else math.inf

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) at σ (Table 1)."""
        p, sd = self.precond, self.sigma_data
        return (c_skip(sigma, p, sd), c_out(sigma, p, sd), c_in(sigma, p, sd),
                c_noise(sigma, p, self.beta_d, self.beta_min, self.M))

    def training_sigma(self, draw: torch.Tensor) -> torch.Tensor:
        """σ from one draw per sample: VP t = 1 + u(ε_t − 1), u ~ U(0, 1); VE σ_min (σ_max/σ_min)^u;
        EDM exp(P_mean + P_std n), n ~ N(0, 1) (Table 1, "noise distribution"); ``draw`` is u or n."""
        if self.precond == "vp":
            return vp_sigma(1 + draw * (self.epsilon_t - 1), self.beta_d, self.beta_min)
        if self.precond == "ve":
            return self.ve_sigma_min * (self.ve_sigma_max / self.ve_sigma_min) ** draw
        return (draw * self.P_std + self.P_mean).exp()

    @property
    def draw_is_normal(self) -> bool:
        """Whether ``training_sigma`` takes a standard normal (EDM) rather than a uniform (VP, VE) draw."""
        return self.precond == "edm"

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) of this formulation."""
        return loss_weight(sigma, self.precond, self.sigma_data)


def denoising_loss(denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor,
                   pre: Preconditioning) -> torch.Tensor:
    """Per-sample λ(σ) ‖D(y + n; σ) − y‖² summed over pixels, in fp32 (Karras et al. 2022, Eq. 2 with λ)."""
    sq = (denoised.float() - clean.float()) ** 2
    return pre.weight(sigma.float().flatten()) * sq.flatten(1).sum(dim=1)
