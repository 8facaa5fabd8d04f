"""The confirm stage: full generations of the top captions (and of calibration captions), their pairwise SSCD,
and SSCD to ground truth where it is known; the verdict is made at the merge, from the stored similarities.

Worker w of W takes items j ≡ w (mod W) of the list [calibration captions…, confirmed captions…]; each caption's
row is appended once its images are saved (DIR/confirm/images/SET/ID/G.png), so a killed run resumes.
Generation g of a caption starts from the same latents as its screening generation g (seed --seed + caption seed).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.common.plotting import save_png_atomic
from diffmem.common.results import append_results
from diffmem.common.similarity import cosine_similarity_matrix
from diffmem.common.t2i.groundtruth import IMAGE_SUFFIXES, load_images
from diffmem.common.t2i.pipelines import DenoiserParts
from diffmem.common.t2i.sampler import sample_latents, to_pil
from diffmem.common.t2i.screen.captions import CaptionFileError, caption_seed, normalize_caption
from diffmem.common.t2i.screen.cliques import largest_clique, median_pairwise, pairwise_upper, square_from_upper
from diffmem.common.t2i.screen.config import ScreenConfig
from diffmem.common.t2i.screen.files import ScreenFiles
from diffmem.common.t2i.screen.score import WorkerModels
from diffmem.common.t2i.text_noise import initial_latents


def ground_truth_paths(cfg: ScreenConfig, caption: dict, gt_map: dict[str, list[Path]] | None) -> list[Path]:
    """The ground-truth image files of a caption: DIR/ROW/* or DIR/ROW.ext for its first row (--gt_dir), or the
    files --gt_map maps its url (or one of its rows) to; [] when none is known."""
    if gt_map is not None:
        keys = [caption.get("url")] + [str(r) for r in caption["rows"]]
        return next((gt_map[k] for k in keys if k is not None and k in gt_map), [])
    if cfg.gt_dir is None:
        return []
    root, row = Path(cfg.gt_dir), str(caption["rows"][0])
    if (root / row).is_dir():
        return sorted(p for p in (root / row).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p for p in (root / f"{row}{s}" for s in IMAGE_SUFFIXES) if p.is_file()]


def read_gt_map(path: str | Path) -> dict[str, list[Path]]:
    """--gt_map: .jsonl objects or .csv rows with a url (or row) and a path relative to the file."""
    path = Path(path)
    out: dict[str, list[Path]] = {}
    with open(path, encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            items = [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
        else:
            items = []
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        items.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise CaptionFileError(f"{path}:{lineno}: expected a JSON object ({exc.msg})") from None
    for where, r in items:
        key = r.get("url") if isinstance(r, dict) else None
        key = key if key is not None else (r.get("row") if isinstance(r, dict) else None)
        if key is None or not isinstance(r.get("path"), str):
            raise CaptionFileError(f"{where}: expected a url (or row) and a path")
        out.setdefault(str(key), []).append(path.parent / r["path"])
    return out


def confirm_items(calibration_ids: list[int], confirmed_ids: list[int]) -> list[tuple[str, int]]:
    return [("calibration", i) for i in calibration_ids] + [("screen", i) for i in confirmed_ids]


def generate(cfg: ScreenConfig, parts: DenoiserParts, uncond, prompts: list[str]) -> torch.Tensor:
    """Images [B, G, 3, H, W] in [0, 1] of B normalised captions, --confirm_images each, --confirm_steps steps."""
    seeds = [caption_seed(p) for p in prompts]
    latents = initial_latents(seeds, cfg.confirm_images, parts.latent_shape, cfg.gen_seed, "per_prompt",
                              parts.init_noise_sigma(cfg.confirm_steps))
    z = sample_latents(parts, parts.encode(prompts).embeds, uncond, latents, num_inference_steps=cfg.confirm_steps,
                       guidance_scale=cfg.guidance_scale)
    return parts.decode(z)


def confirm_share(cfg: ScreenConfig, files: ScreenFiles, models: WorkerModels, captions: dict[tuple[str, int], dict],
                  items: list[tuple[str, int]], worker: int, workers: int,
                  gt_map: dict[str, list[Path]] | None) -> int:
    """Generate and measure the worker's share of items not yet stored; returns how many it did now."""
    done = {(s, r["id"]) for s in ("calibration", "screen")
            for r in files.confirm_rows(s, own=files.confirm_part(s, worker))}
    todo = [it for j, it in enumerate(items) if j % workers == worker and it not in done]
    if not todo:
        return 0
    files.confirm_parts_dir.mkdir(parents=True, exist_ok=True)
    parts, sscd = models.parts, models.sscd
    uncond = parts.unconditional()
    bar = tqdm(total=len(todo), desc=f"confirm[{worker}]", unit="caption", position=worker,
               disable=not cfg.progress)
    for i in range(0, len(todo), cfg.confirm_batch_size):
        batch = todo[i:i + cfg.confirm_batch_size]
        images = generate(cfg, parts, uncond, [normalize_caption(captions[it]["caption"]) for it in batch])
        for (caption_set, cid), imgs in zip(batch, images):
            folder = files.images(caption_set, cid)
            pil = to_pil(imgs)
            paths = [save_png_atomic(im, folder / f"{g:02d}.png") for g, im in enumerate(pil)]
            emb = sscd.embed(pil)
            row = {"id": cid, "pairs": pairwise_upper(emb @ emb.T),
                   "images": [str(p.relative_to(files.out)) for p in paths]}
            gt = ground_truth_paths(cfg, captions[(caption_set, cid)], gt_map) if caption_set == "screen" else []
            if gt:
                sim = cosine_similarity_matrix(sscd.embed(load_images(gt)), emb)
                row["gt_sscd"] = sim.max(dim=0).values.double().tolist()  # per generation: its best ground truth
            append_results(files.confirm_part(caption_set, worker), [row])
        bar.update(len(batch))
    bar.close()
    return len(todo)


def verdict_row(row: dict, screen_row: dict, n_images: int, threshold: float, min_cluster: int) -> dict:
    """A confirm.jsonl row: the caption, its score, the largest near-duplicate clique and the verdict."""
    clique = largest_clique(square_from_upper(row["pairs"], n_images), threshold)
    out = {"rank": screen_row["rank"], "id": row["id"], "caption": screen_row["caption"],
           "score": screen_row["score"], "count": screen_row["count"],
           "verdict": "memorized" if len(clique) >= min_cluster else "not", "cluster_size": len(clique),
           "cluster": clique, "median_sscd": median_pairwise(row["pairs"]), "images": row["images"]}
    if "gt_sscd" in row:
        out["gt_sscd"] = max(row["gt_sscd"])
        out["gt_sscd_per_generation"] = row["gt_sscd"]
    return out
