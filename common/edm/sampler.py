"""EDM's deterministic/stochastic Heun sampler (Karras et al. 2022, Algorithm 2) and EDM's per-seed image rule.

The math is short pure functions: the σ schedule (Eq. 5), the churn factor γ_i and one Heun step of Algorithm 2.
The whole loop runs in float64, as NVlabs/edm's ``generate.py`` does; the network returns fp32 and is cast.
diffusers' ``HeunDiscreteScheduler`` is not this sampler (DDPM betas, index timesteps), so it is not used;
``EDMEulerScheduler`` gives the same σ schedule in float32 (the tests compare).

Seed rule (EDM's): the image of seed s is a function of s alone. Its latents are
``torch.randn((C, H, W), generator=torch.Generator(device).manual_seed(s))`` (fp32, then float64, ×σ_0); a
conditional network's label is the next draw of the same generator, ``torch.randint(label_dim, (1,))``; the churn
noise of every step continues that generator. So everything the sampler draws for an image is the same, bit for
bit, whatever batch it was sampled in and however many processes share the seeds. The network itself rounds
fp32 differently per batch size (MKL's GEMM and convolution kernels on the CPU, cuDNN's on a GPU: a few 1e-7 in
D), so the samples agree to that rounding and a uint8 pixel right at a rounding boundary can move by one level
(how often: README, sampling section). CUDA and CPU
generators give different streams: the device is part of the rule.

Image folders (EDM's layout): ``{seed:06d}.png``, with ``subdirs`` in ``{seed - seed % 1000:06d}/``; uint8 by
EDM's rule ``(x·127.5 + 128).clip(0, 255)``; PNGs are written atomically, so a folder can be resumed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffmem.common.errors import ConfigError
from diffmem.common.settings import option

SEED_LIMIT = 1 << 32  # EDM seeds its generators with seed % 2**32; larger seeds would alias smaller ones
FOLDER_SETTINGS = "generate.json"

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
RoundSigma = Callable[[torch.Tensor], torch.Tensor]


class SamplerError(ConfigError):
    """Bad sampler settings, seeds or class index; str() is the one-line message."""


# ------------------------------------------------------------------------------------------ the math


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """t_i = (σ_max^(1/ρ) + i/(N−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < N, t_N = 0, float64 (Eq. 5)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    # N = 1 has no interior point: i/(N−1) is 0/0 there, so take the single step from σ_max.
    frac = i / (num_steps - 1) if num_steps > 1 else torch.zeros_like(i)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def churn_gamma(t_cur: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """γ_i = min(S_churn/N, √2 − 1) if S_min ≤ t_i ≤ S_max else 0 (Algorithm 2)."""
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0


def heun_step(denoise: Denoiser, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor,
              class_labels: torch.Tensor | None = None, gamma: float = 0.0, S_noise: float = 1.0,
              eps: torch.Tensor | None = None, second_order: bool = True,
              round_sigma: RoundSigma | None = None) -> torch.Tensor:
    """One step of Algorithm 2: t̂ = t + γt, x̂ = x + sqrt(t̂² − t²) S_noise ε, Euler step, 2nd-order correction
    unless t_{i+1} = 0 (or second_order is False: Zhang et al.'s Euler sampler); float64 throughout (D's output
    is cast). round_sigma (the network's; iDDPM's snaps σ to its table) rounds t̂ as EDM's sampler does."""
    t_hat = t_cur + gamma * t_cur
    if round_sigma is not None:
        t_hat = round_sigma(t_hat)
    # With γ = 0 the added term is exactly 0·ε, so x̂ = x bit for bit whether or not ε was drawn.
    x_hat = x if eps is None else x + (t_hat**2 - t_cur**2).sqrt() * S_noise * eps
    d_cur = (x_hat - denoise(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if second_order and t_next != 0:
        d_prime = (x_next - denoise(x_next, t_next, class_labels).to(torch.float64)) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def rounded_sigmas(sigmas: torch.Tensor, round_sigma: RoundSigma | None) -> torch.Tensor:
    """t_0 … t_{N−1} rounded by the network's round_sigma, t_N = 0 kept, as EDM's sampler steps (None: as given)."""
    if round_sigma is None:
        return sigmas
    return torch.cat([round_sigma(sigmas[:-1]).to(sigmas), sigmas[-1:]])


def heun_sampler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor,
                 class_labels: torch.Tensor | None = None, S_churn: float = 0.0, S_min: float = 0.0,
                 S_max: float = math.inf, S_noise: float = 1.0, noise_fn: NoiseFn | None = None,
                 second_order: bool = True, round_sigma: RoundSigma | None = None) -> torch.Tensor:
    """Algorithm 2 over σ's t_0 > … > t_N from unit latents (x_0 = latents·t_0), in float64; returns x_N.
    With second_order=False every step is the Euler step alone: N network calls, and since t_N = 0 the last
    step returns x_N = D(x_{N−1}; t_{N−1}) (Zhang et al.'s optimal-denoiser sampler: D(x; σ_min) is the output).
    round_sigma (the network's) rounds t_0 … t_{N−1} and every t̂, as EDM's sampler does; None: no rounding."""
    sigmas = rounded_sigmas(sigmas.to(device=latents.device, dtype=torch.float64), round_sigma)
    num_steps = len(sigmas) - 1
    gammas = [churn_gamma(float(t), num_steps, S_churn, S_min, S_max) for t in sigmas[:-1]]
    # When any step churns, ε is drawn at every step, as EDM does, so the per-seed streams match EDM's.
    churn = any(g > 0 for g in gammas)
    noise_fn = noise_fn or torch.randn_like
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        eps = noise_fn(x) if churn else None
        x = heun_step(denoise, x, sigmas[i], sigmas[i + 1], class_labels, gammas[i], S_noise, eps, second_order,
                      round_sigma)
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """NCHW images in [−1, 1] → uint8 NHWC by EDM's rule (x·127.5 + 128).clip(0, 255), truncated."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------ settings


SOLVERS = ("heun", "euler")  # EDM's Algorithm 2; the same steps without the 2nd-order correction


@dataclass(frozen=True)
class SamplerSettings:
    """EDM sampler settings (NVlabs/edm's defaults: 18 steps, σ ∈ [0.002, 80], ρ = 7, no churn, Heun); each field
    is also the command-line option of every CLI that samples (``add_settings_arguments``)."""

    num_steps: int = option(18, help="sampler steps N", metavar="N", flag="--steps")
    sigma_min: float = option(0.002, help="lowest σ (clamped to the network's)")
    sigma_max: float = option(80.0, help="highest σ (clamped to the network's)")
    rho: float = option(7.0, help="schedule exponent ρ (Eq. 5)")
    S_churn: float = option(0.0, help="stochasticity S_churn (0: deterministic)")
    S_min: float = option(0.0, help="churn only for σ >= S_min")
    # inf is EDM's own default (churn at every σ), so this one float option takes an infinity.
    S_max: float = option(math.inf, finite=False, help="churn only for σ <= S_max (inf: no upper bound)")
    S_noise: float = option(1.0, help="churn noise scale S_noise")
    solver: str = option("heun", choices=SOLVERS,
                         help="heun: EDM's Algorithm 2; euler: the same steps without the correction")

    def validate(self) -> None:
        """Raise SamplerError (a ConfigError) for settings the sampler cannot use."""
        if self.solver not in SOLVERS:
            raise SamplerError(f"expected --solver one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.num_steps < 1:
            raise SamplerError(f"expected --steps >= 1, got {self.num_steps}")
        if not 0 < self.sigma_min <= self.sigma_max < math.inf:
            raise SamplerError(f"expected 0 < --sigma_min <= --sigma_max < inf, got {self.sigma_min} and "
                               f"{self.sigma_max}")
        if not self.rho > 0:
            raise SamplerError(f"expected --rho > 0, got {self.rho}")
        if not (self.S_churn >= 0 and self.S_noise >= 0):
            raise SamplerError(f"expected --S_churn and --S_noise >= 0, got {self.S_churn} and {self.S_noise}")
        if not self.S_min <= self.S_max:
            raise SamplerError(f"expected --S_min <= --S_max, got {self.S_min} and {self.S_max}")

    def for_network(self, net) -> SamplerSettings:
        """The σ range clamped to the network's (σ_min = max(σ_min, net's), σ_max = min(σ_max, net's)), validated."""
        clamped = replace(self, sigma_min=max(self.sigma_min, net.sigma_min),
                          sigma_max=min(self.sigma_max, net.sigma_max))
        if clamped.sigma_min > clamped.sigma_max:
            raise SamplerError(f"--sigma_min {self.sigma_min} / --sigma_max {self.sigma_max} leave nothing of "
                               f"the network's range [{net.sigma_min:g}, {net.sigma_max:g}]")
        clamped.validate()
        return clamped

    def sigmas(self) -> torch.Tensor:
        """This schedule's t_0 … t_N (Eq. 5), float64."""
        return edm_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    def to_dict(self) -> dict:
        """JSON-safe: infinite values as the string "inf"."""
        return {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def parse_seeds(spec: str) -> list[int]:
    """EDM's seed lists: comma-separated integers and inclusive ranges, e.g. ``0-9999`` or ``1,5,7-9``."""
    seeds: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SamplerError(f"bad --seeds {spec!r}: {part.strip()!r} is not N or N-M with integers N, M >= 0")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise SamplerError(f"bad --seeds {spec!r}: range {lo}-{hi} runs backwards")
        if hi >= SEED_LIMIT:
            raise SamplerError(f"bad --seeds {spec!r}: seeds must be below 2**32, got {hi}")
        seeds.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise SamplerError(f"bad --seeds {spec!r}: seed {s} is listed more than once")
        seen.add(s)
    return seeds


def check_class_idx(class_idx: int | None, label_dim: int) -> None:
    """A fixed class must exist: only for a conditional network, 0 ≤ class_idx < label_dim."""
    if class_idx is None:
        return
    if not label_dim:
        raise SamplerError(f"--class_idx {class_idx} given, but the network is unconditional")
    if not 0 <= class_idx < label_dim:
        raise SamplerError(f"expected 0 <= --class_idx < {label_dim} (the network's classes), got {class_idx}")


# ------------------------------------------------------------------------------------- per-seed draws


def seed_generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    """One ``torch.Generator(device)`` per seed, seeded with the seed itself (EDM's rule)."""
    return [torch.Generator(device=torch.device(device)).manual_seed(int(s)) for s in seeds]


def draw_latents(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    """[B, *shape] fp32 unit normals, row i the first draw of generator i."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def draw_labels(generators: Sequence[torch.Generator], label_dim: int, device) -> torch.Tensor:
    """[B] int64 class labels, entry i the next draw ``randint(label_dim, (1,))`` of generator i."""
    return torch.cat([torch.randint(label_dim, (1,), generator=g, device=device) for g in generators])


def per_seed_noise(generators: Sequence[torch.Generator]) -> NoiseFn:
    """A noise_fn for ``heun_sampler`` whose row i continues generator i (in x's dtype, as EDM's randn_like)."""

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(x.shape[1:]), generator=g, dtype=x.dtype, device=x.device)
                            for g in generators])

    return noise


def seed_labels(seeds: Sequence[int], image_shape: Sequence[int], label_dim: int, class_idx: int | None,
                device) -> np.ndarray:
    """The label of each seed's image (the draw after its latents, or class_idx), without sampling; int64."""
    generators = seed_generators(seeds, device)
    draw_latents(generators, image_shape, device)  # advance each stream past its latents
    drawn = draw_labels(generators, label_dim, device)
    return (drawn if class_idx is None else torch.full_like(drawn, class_idx)).cpu().numpy()


# -------------------------------------------------------------------------------------------- sampling


class GeneratedBatch(NamedTuple):
    seeds: list[int]
    images: np.ndarray  # uint8 N×H×W×C
    labels: np.ndarray | None  # int64 class indices; None for an unconditional network


@torch.no_grad()
def sample_batch(net, seeds: Sequence[int], settings: SamplerSettings = SamplerSettings(),
                 class_idx: int | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 NCHW samples of these seeds (and their labels), each a function of its seed alone."""
    settings = settings.for_network(net)
    check_class_idx(class_idx, net.label_dim)
    generators = seed_generators(seeds, device)
    latents = draw_latents(generators, net.image_shape, device)
    labels = None
    if net.label_dim:
        # Drawn even when class_idx fixes the label, so that the churn noise continues the same stream.
        labels = draw_labels(generators, net.label_dim, device)
        if class_idx is not None:
            labels = torch.full_like(labels, class_idx)
    x = heun_sampler(net, latents, settings.sigmas(), labels, settings.S_churn, settings.S_min, settings.S_max,
                     settings.S_noise, per_seed_noise(generators), second_order=settings.solver == "heun",
                     round_sigma=getattr(net, "round_sigma", None))
    return x, labels


def generate_images(net, seeds: Sequence[int], batch_size: int, settings: SamplerSettings = SamplerSettings(),
                    class_idx: int | None = None, device="cpu") -> Iterator[GeneratedBatch]:
    """uint8 images of the seeds, batch_size at a time, in the given order (lazy: one batch per next())."""
    settings = settings.for_network(net)  # fail before the first batch, not inside it
    check_class_idx(class_idx, net.label_dim)
    seeds = [int(s) for s in seeds]
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        x, labels = sample_batch(net, chunk, settings, class_idx, device)
        yield GeneratedBatch(chunk, to_uint8(x), None if labels is None else labels.cpu().numpy())


def num_batches(num_seeds: int, batch_size: int) -> int:
    """Batches ``generate_images`` yields for num_seeds seeds."""
    return -(-num_seeds // batch_size)


# --------------------------------------------------------------------------------------- image folders


def image_path(outdir: str | Path, seed: int, subdirs: bool = False) -> Path:
    """``{seed:06d}.png`` in outdir, or in its ``{seed - seed % 1000:06d}/`` subfolder (EDM's layout)."""
    outdir = Path(outdir)
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write one uint8 HWC image (grayscale for 1 channel) to a temporary name, then rename it into place."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # one process owns each seed, so the name cannot collide
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: str | Path) -> np.ndarray:
    """A PNG as uint8 HWC (a grayscale PNG gets its channel axis back)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def missing_seeds(outdir: str | Path, seeds: Sequence[int], subdirs: bool = False) -> list[int]:
    """The seeds whose PNG is not in outdir yet (the ones a resumed run still has to sample)."""
    return [s for s in seeds if not image_path(outdir, s, subdirs).exists()]


def damaged_images(outdir: str | Path, seeds: Sequence[int], image_shape: tuple[int, int, int],
                   subdirs: bool = False) -> list[int]:
    """The seeds whose PNG exists but does not decode to an image of ``image_shape`` (C, H, W): a truncated
    write by another tool, a file overwritten by hand, an image of another network."""
    from PIL import Image

    c, h, w = image_shape
    bad = []
    for s in seeds:
        path = image_path(outdir, s, subdirs)
        if not path.exists():
            continue
        try:
            with Image.open(path) as im:
                im.load()  # decodes every byte: a truncated PNG fails here, not on its header
                shape = np.asarray(im).shape
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
            bad.append(s)
            continue
        if (shape + (1,) if len(shape) == 2 else shape) != (h, w, c):
            bad.append(s)
    return bad


def bind_folder_settings(outdir: str | Path, settings: dict, write: bool = True) -> None:
    """Refuse to add images to a folder whose PNGs were made with other settings; else record these."""
    outdir = Path(outdir)
    record = outdir / FOLDER_SETTINGS
    has_images = any(outdir.glob("*.png")) or any(outdir.glob("[0-9]*/*.png"))
    if record.exists() and has_images:
        old = json.loads(record.read_text())
        diff = [f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in {**old, **settings}
                if old.get(k) != settings.get(k)]
        if diff:
            raise SamplerError(f"{record}: the images here were made with {', '.join(diff)}; "
                               f"use another --out")
        return
    if write:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, record)


def write_images_npz(path: str | Path, images: np.ndarray, seeds: Sequence[int],
                     labels: np.ndarray | None = None) -> None:
    """``images`` (uint8 N×H×W×C), ``seeds`` (int64) and, if given, ``labels`` (int64) in one npz, atomically."""
    path = Path(path)
    arrays = {"images": images, "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 N×H×W×C images, each enlarged ``scale``× (nearest), tiled row by row (columns ≈ √N) with
    ``padding`` black pixels between tiles."""
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = -(-n // columns)
    step_h, step_w = h + padding, w + padding
    grid = np.zeros((rows * step_h - padding, columns * step_w - padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * step_h:r * step_h + h, q * step_w:q * step_w + w] = image
    return grid
