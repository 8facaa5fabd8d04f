"""The screen stage: each worker scores its share of the unique captions with the chosen detector.

Worker w of W (W = shards × processes per shard) takes the unique captions not yet scored whose id ≡ w (mod W), so
the shares are disjoint whatever W was on an earlier, interrupted run, and each row is appended to the worker's own
part file once its batch is scored. A caption's latents come from its caption seed (a hash of the normalised text,
:func:`common.t2i.screen.captions.caption_seed`) plus --seed, and the prompt scored is the normalised text, so its
score depends on the text and the settings only.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from diffmem.common.results import append_results
from diffmem.common.similarity import SSCDModel
from diffmem.common.t2i.detection import anisotropy_weights_for, score_prompts
from diffmem.common.t2i.pipelines import DenoiserParts, denoiser_parts, load_pipeline, parse_dtype
from diffmem.common.t2i.screen.captions import caption_seed, normalize_caption, read_unique
from diffmem.common.t2i.screen.config import ScreenConfig
from diffmem.common.t2i.screen.files import CAPTION_SETS, ScreenFiles


def load_parts(cfg: ScreenConfig, device: torch.device) -> tuple[object, DenoiserParts]:
    """The pipeline and the parts a worker scores with (the family's scheduler resolved in cfg)."""
    pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device, cfg.revision, cfg.variant)
    parts = denoiser_parts(pipe, cfg.scheduler, cfg.height, cfg.width)
    if cfg.detector == "anisotropy":  # the weights of this family's prediction type, or one line now
        anisotropy_weights_for(parts, cfg.anisotropy_weights)
    return pipe, parts


def todo_captions(files: ScreenFiles, caption_set: str, worker: int, workers: int) -> list[dict]:
    """The worker's share of a set's unique captions that no part file holds yet."""
    if not files.captions(caption_set).exists():
        return []
    done = {r["id"] for r in files.score_rows(caption_set, own=files.part(caption_set, worker))}
    return list(read_unique(files.captions(caption_set), lambda i: i % workers == worker and i not in done))


def score_rows(cfg: ScreenConfig, parts: DenoiserParts, uncond, captions: list[dict]) -> list[dict]:
    """Score rows of a batch of unique captions: id, score, truncated."""
    prompts = [normalize_caption(c["caption"]) for c in captions]
    terms, truncated = score_prompts(
        parts, prompts, [caption_seed(p) for p in prompts], num_images_per_prompt=cfg.num_images_per_prompt,
        gen_seed=cfg.gen_seed, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        score_steps=1, latents_mode="per_prompt", uncond_embed=uncond, detector=cfg.detector,
        anisotropy_weights=cfg.anisotropy_weights)
    return [{"id": c["id"], "score": s, "truncated": t} for c, s, t in zip(captions, terms.score.tolist(), truncated)]


class WorkerModels:
    """A worker's pipeline parts and SSCD model, each loaded the first time a stage needs it."""

    def __init__(self, cfg: ScreenConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self._parts = self._sscd = None

    @property
    def parts(self) -> DenoiserParts:
        if self._parts is None:
            _, self._parts = load_parts(self.cfg, self.device)
        return self._parts

    @property
    def sscd(self) -> SSCDModel:
        if self._sscd is None:
            self._sscd = SSCDModel(self.cfg.sscd_model, device=self.device, preset=self.cfg.sscd_preprocess)
        return self._sscd


def score_share(cfg: ScreenConfig, files: ScreenFiles, models: WorkerModels, worker: int,
                workers: int) -> tuple[int, float]:
    """Score the worker's share of every set (calibration first: the threshold needs all of it); returns the
    captions scored now and the seconds spent scoring them. The model is loaded only when there is work."""
    todo = {s: todo_captions(files, s, worker, workers) for s in CAPTION_SETS}
    total = sum(map(len, todo.values()))
    if not total:
        return 0, 0.0
    parts = models.parts
    uncond = parts.unconditional()
    files.parts_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, desc=f"screen[{worker}]", unit="caption", position=worker, disable=not cfg.progress)
    t0 = time.perf_counter()
    for caption_set in ("calibration", "screen"):
        rows = todo[caption_set]
        for i in range(0, len(rows), cfg.batch_size):
            batch = rows[i:i + cfg.batch_size]
            append_results(files.part(caption_set, worker), score_rows(cfg, parts, uncond, batch))
            bar.update(len(batch))
    bar.close()
    return total, time.perf_counter() - t0
