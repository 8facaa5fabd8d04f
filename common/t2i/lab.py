"""The memorization lab: a tiny text-to-image set with a known memorized subset, its VAE, and replication checks.

The recipe follows what was measured to make a tiny model memorize (docs/lab.md): every image carries its
own random caption ("a {adjective} {noun} near the {place}", LAION-like), a small subset is duplicated many
times, the rest is seen once, and the text encoder is trained jointly. Images are scikit-learn's bundled 8×8
digits upsampled to 16×16 RGB, so nothing is downloaded. Everything here is a pure function of a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.common.seeding import STREAM_VAE, derive_seed, numpy_generator, randn_per_sample, torch_generator
from diffmem.common.similarity import cosine_similarity_matrix
from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.pipelines import ARCHS, denoiser_parts
from diffmem.common.t2i.sampler import decode_latents, sample_latents
from diffmem.common.t2i.text_noise import initial_latents, text_noise_norm
from diffmem.common.training.builders import make_accelerator
from diffmem.common.training.config import TrainConfig
from diffmem.common.training.loop import LossTerms, Trainer

ADJECTIVES = (
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "tiny", "giant", "old", "young",
    "happy", "sleepy", "angry", "quiet", "noisy", "shiny", "dusty", "wooden", "frozen", "burning", "striped",
    "spotted", "fluffy", "broken", "ancient", "modern", "rusty", "glowing", "hidden", "lonely",
)
NOUNS = (
    "cat", "dog", "robot", "castle", "tree", "boat", "car", "horse", "dragon", "lamp", "clock", "guitar",
    "bicycle", "owl", "fox", "teapot", "tower", "bridge", "train", "rabbit", "whale", "kite", "piano", "hat",
    "chair", "rocket", "turtle", "violin", "candle", "umbrella", "penguin", "statue",
)
PLACES = (
    "river", "mountain", "beach", "forest", "city", "desert", "lake", "village", "garden", "station", "harbor",
    "market", "library", "valley", "island", "bridge", "church", "farm", "castle", "museum", "airport", "canyon",
    "meadow", "glacier", "volcano", "stadium", "temple", "highway", "swamp", "cliff", "bakery", "lighthouse",
)
IMAGE_SIZE = 16
# Seed streams of the lab's own draws (independent of common.seeding's training streams).
STREAM_LAB_CAPTIONS = 101
STREAM_LAB_SPLIT = 102


def lab_captions(count: int, seed: int) -> list[str]:
    """``count`` distinct captions "a {adjective} {noun} near the {place}", a pure function of seed."""
    space = len(ADJECTIVES) * len(NOUNS) * len(PLACES)
    if count > space:
        raise ValueError(f"at most {space} distinct captions, asked for {count}")
    rng = numpy_generator(seed, STREAM_LAB_CAPTIONS)
    codes = rng.choice(space, size=count, replace=False)
    out = []
    for code in codes.tolist():
        a, rest = divmod(code, len(NOUNS) * len(PLACES))
        n, p = divmod(rest, len(PLACES))
        out.append(f"a {ADJECTIVES[a]} {NOUNS[n]} near the {PLACES[p]}")
    return out


def digit_images(size: int = IMAGE_SIZE) -> np.ndarray:
    """scikit-learn's 1797 bundled 8×8 digits as [N, size, size, 3] uint8 RGB (bilinear upsampling, grey)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images  # [N, 8, 8], values 0..16
    out = np.empty((len(digits), size, size, 3), dtype=np.uint8)
    for i, d in enumerate(digits):
        im = Image.fromarray(np.round(d * (255.0 / 16.0)).astype(np.uint8), mode="L")
        out[i] = np.asarray(im.resize((size, size), Image.BILINEAR).convert("RGB"))
    return out


@dataclass(frozen=True)
class LabSplit:
    """Which digit images and captions play which role; indices are rows of :func:`digit_images`."""

    memorized: list[int]  # images duplicated ``repeats`` times in training
    seen_once: list[int]  # images seen once per pass
    memorized_captions: list[str]
    seen_once_captions: list[str]
    novel_captions: list[str]  # never trained on


def lab_split(num_images: int, num_memorized: int, num_seen_once: int, num_novel: int, seed: int) -> LabSplit:
    """A seeded choice of memorized / seen-once images and their own distinct captions, plus novel captions."""
    if num_memorized + num_seen_once > num_images:
        raise ValueError(f"{num_memorized} + {num_seen_once} images asked for, only {num_images} exist")
    order = numpy_generator(seed, STREAM_LAB_SPLIT).permutation(num_images).tolist()
    captions = lab_captions(num_memorized + num_seen_once + num_novel, seed)
    m, s = num_memorized, num_seen_once
    return LabSplit(
        memorized=order[:m], seen_once=order[m:m + s],
        memorized_captions=captions[:m], seen_once_captions=captions[m:m + s], novel_captions=captions[m + s:],
    )


def write_imagefolder(folder: str | Path, images: np.ndarray, indices: list[int], captions: list[str]) -> Path:
    """An imagefolder (``{index}.png`` + metadata.jsonl with "text") that common.t2i.text_image_data reads in this
    order."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for idx, caption in zip(indices, captions):
            name = f"{idx:04d}.png"
            Image.fromarray(images[idx]).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------- VAE


class ImageArrayDataset(torch.utils.data.Dataset):
    """[N, H, W, 3] uint8 images keyed by (epoch, position, index), as the Trainer's sampler yields them."""

    def __init__(self, images: np.ndarray, seed: int):
        self.pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, position, index = key
        return {"pixel_values": self.pixels[index], "sample_seed": derive_seed(self.seed, epoch, position)}


def collate_images(items: list[dict]) -> dict:
    """Stack a micro-batch of :class:`ImageArrayDataset` items."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "sample_seed": torch.tensor([it["sample_seed"] for it in items], dtype=torch.int64),
    }


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float) -> torch.Tensor:
    """Per-sample β-VAE loss: mean squared error + kl_weight · KL(N(μ, σ²) ‖ N(0, I)) summed over latents
    (Kingma & Welling 2014, Eq. 10; the KL term as in Rombach et al. 2022, Sec. 3 / App. G)."""
    mse = F.mse_loss(recon.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(dim=1)
    return mse + kl_weight * kl


class VAELoss:
    """batch -> LossTerms for an AutoencoderKL: reparameterised sample with per-sample noise, then :func:`vae_loss`."""

    def __init__(self, kl_weight: float = 1e-6):
        self.kl_weight = kl_weight

    def __call__(self, batch: dict, models: dict):

        vae = models["vae"]
        x = batch["pixel_values"]
        dist = vae.encode(x).latent_dist
        eps = randn_per_sample(batch["sample_seed"].tolist(), tuple(dist.mean.shape[1:]), STREAM_VAE).to(x.device)
        z = dist.mean + dist.std * eps
        recon = vae.decode(z).sample
        per_sample = vae_loss(recon, x, dist.mean, dist.logvar, self.kl_weight)
        return LossTerms(per_sample=per_sample)


def lab_vae(arch: str = "lab", seed: int = 0):
    """A randomly initialised AutoencoderKL of the lab's architecture (common.t2i.pipelines.ARCHS[arch]["vae"])."""
    from diffusers import AutoencoderKL


    spec = ARCHS[arch]["vae"]
    n_blocks = len(spec["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * n_blocks,
                         up_block_types=("UpDecoderBlock2D",) * n_blocks, **spec)


@torch.no_grad()
def vae_figures(vae, images: np.ndarray, batch_size: int = 256) -> dict:
    """Reconstruction RMSE (on [-1, 1], from the posterior mean) and the latent std that sets scaling_factor."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    sq, lat = [], []
    for chunk in pixels.split(batch_size):
        mean = vae.encode(chunk).latent_dist.mean
        sq.append((vae.decode(mean).sample - chunk).pow(2).flatten(1).mean(1))
        lat.append(mean.flatten())
    latents = torch.cat(lat)
    return {"rmse": float(torch.cat(sq).mean().sqrt()), "latent_std": float(latents.std())}


def train_vae(images: np.ndarray, output_dir: str | Path, *, steps: int, seed: int, batch_size: int = 32,
              learning_rate: float = 1e-3, kl_weight: float = 1e-6, show_progress: bool = True):
    """Train the lab's AutoencoderKL on images with the project's Trainer; returns (vae, figures).

    The saved VAE's ``scaling_factor`` is 1 / latent std, so scaled latents have unit variance (Rombach et al.
    2022, Sec. 4.3.2).
    """

    out = Path(output_dir)
    cfg = TrainConfig(output_dir=str(out), seed=seed, train_batch_size=batch_size, max_train_steps=steps,
                      learning_rate=learning_rate, lr_warmup_steps=0, checkpointing_steps=0,
                      report_to="none", show_progress=show_progress, adam_weight_decay=0.0)
    vae = lab_vae(seed=seed)
    trained = {}

    def export(models: dict, output: Path) -> None:
        trained["vae"] = models["vae"]

    trainer = Trainer(make_accelerator(cfg), cfg, {"vae": vae}, VAELoss(kl_weight), ImageArrayDataset(images, seed),
                      collate_images, export_fn=export)
    trainer.train()
    vae = trained["vae"].eval()
    figures = vae_figures(vae, images)
    vae.register_to_config(scaling_factor=1.0 / figures["latent_std"])
    vae.save_pretrained(out / "vae")
    return vae, figures


# ------------------------------------------------------------------------------------------ replication


def nearest_ratio(generated: torch.Tensor, training: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest training index, d1/d2) per generated image: pixel L2 distance to the nearest and second-nearest
    training image (Carlini et al. 2023, Sec. 4.1's ratio test on pixels). generated [N,...], training [M,...]."""
    d = torch.cdist(generated.flatten(1).double(), training.flatten(1).double())
    two = d.topk(2, dim=1, largest=False)
    return two.indices[:, 0], two.values[:, 0] / two.values[:, 1].clamp_min(1e-12)


@torch.no_grad()
def generate_images(pipe, prompts: list[str], *, num_images: int, gen_seed: int, num_inference_steps: int,
                    guidance_scale: float) -> torch.Tensor:
    """[B, G, 3, H, W] images in [0, 1] from a DDIM trajectory; row i starts from seed gen_seed + i."""

    parts = denoiser_parts(pipe)
    cond = encode_prompts(parts, prompts).embeds
    uncond = parts.unconditional()
    latents = initial_latents(list(range(len(prompts))), num_images, parts.latent_shape, gen_seed,
                              init_noise_sigma=parts.scheduler.init_noise_sigma)
    final = sample_latents(parts, cond, uncond, latents, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale)
    return decode_latents(pipe.vae, final)


def own_image_hits(copies: list[bool], nearest: list[int], own_index: list[int | None], group_size: int) -> int:
    """How many generations are copies of their own caption's image: generation k (of caption k // group_size)
    counts when it is a copy and its nearest training image is that caption's own image."""
    return sum(c and own_index[k // group_size] is not None and nearest[k] == own_index[k // group_size]
               for k, c in enumerate(copies))


def replication_figures(generated: torch.Tensor, own_index: list[int | None], training: torch.Tensor,
                        training_index: list[int], threshold: float = 1.0 / 3.0) -> dict:
    """Replication rate of generated [B, G, 3, H, W] against the training images: a generation replicates when
    d1/d2 < threshold; for captions with an own image it must also be nearest to that image."""
    B, G = generated.shape[:2]
    nearest, ratio = nearest_ratio(generated.reshape(B * G, -1), training)
    nearest = [training_index[j] for j in nearest.tolist()]
    close = [r < threshold for r in ratio.tolist()]
    return {"generations": B * G, "replication_rate": sum(close) / (B * G),
            "own_image_rate": own_image_hits(close, nearest, own_index, G) / (B * G),
            "median_ratio": float(ratio.median())}


def sscd_replication_figures(generated: torch.Tensor, training: torch.Tensor, own_index: list[int | None],
                             training_index: list[int], group_size: int,
                             thresholds: tuple[float, ...] = (0.5, 0.7)) -> dict:
    """SSCD replication of generated descriptors [N, D] against training descriptors [M, D] (both
    L2-normalised): per generation the top-1 similarity over the training set (Somepalli et al. 2023, Sec. 4),
    the rate above each threshold, and for captions with an own image (row k // group_size) the rate whose
    top-1 match above the threshold is that image."""

    top, nearest = cosine_similarity_matrix(generated, training).max(dim=1)
    nearest = [training_index[j] for j in nearest.tolist()]
    out = {"mean_top1": float(top.mean()), "median_top1": float(top.median())}
    for th in thresholds:
        above = (top > th).tolist()
        out[f"rate_gt_{th}"] = sum(above) / len(above)  # exact fractions (similarity's rate is float32)
        out[f"own_image_rate_gt_{th}"] = own_image_hits(above, nearest, own_index, group_size) / len(above)
    return out


@torch.no_grad()
def training_text_noise_norms(pipe, images: np.ndarray, split: LabSplit, *, seed: int, draws: int = 8,
                              batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-sample ‖ε(x_t, c) − ε(x_t, ∅)‖₂ at training noise levels (Wen et al. 2024, Sec. 5's mitigation
    statistic), for the memorized and seen-once images with their own captions: ``draws`` (timestep, noise)
    pairs per image, drawn from seed and the image index. Returns {"memorized": [...], "seen_once": [...]}."""
    from diffusers import DDPMScheduler


    parts = denoiser_parts(pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae = pipe.vae
    uncond = parts.unconditional()
    out = {}
    for name, indices, captions in (("memorized", split.memorized, split.memorized_captions),
                                    ("seen_once", split.seen_once, split.seen_once_captions)):
        norms = []
        for lo in range(0, len(indices), batch_size):
            idx, caps = indices[lo:lo + batch_size], captions[lo:lo + batch_size]
            pixels = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            cond = encode_prompts(parts, caps).embeds
            for d in range(draws):
                gens = [torch_generator(seed, i, d) for i in idx]
                noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
                t = torch.tensor([int(torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g))
                                  for g in gens])
                noisy = sched.add_noise(latents, noise, t)
                eps_c = parts.predict(noisy, t, cond)
                eps_u = parts.predict(noisy, t, uncond.expand(len(idx)))
                norms.append(text_noise_norm(eps_c, eps_u))
        out[name] = torch.cat(norms).numpy()
    return out
