"""A mitigation run over a prompt set: modify or optimise each prompt, generate, measure replication and alignment.

Used by ``mitigate/inference_mem.py`` (one method) and ``mitigate/tradeoff.py`` (a sweep over one loaded model).
Per prompt (dataset row i) and method:

1. the conditioning: the original prompt (``none``), a randomly augmented prompt (``rand_word_add``,
   ``rand_numb_add``, ``rand_word_repeat``; seeded by gen_seed + i, so reproducible and batch-independent), or
   the original prompt's embedding optimised by :func:`common.t2i.mitigation.prompt_embedding.optimise_prompt_embeds`
   (``ours``);
2. G generations from the same starting noise for every method (:func:`common.t2i.text_noise.initial_latents`, seed
   gen_seed + i), classifier-free-guided DDIM, VAE decode; a PNG grid per prompt;
3. SSCD similarity of each generation to the prompt's ground-truth images (max over them) and the CLIP score
   of each generation with the *original* prompt.

Rows are appended to ``results.jsonl`` per batch and ``summary.json`` is rewritten after each batch, so a killed
run keeps its work and the same call resumes it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.common.results import (
    append_results,
    bind_run_settings,
    check_rows_match,
    digest_rows,
    read_results,
    write_json_atomic,
)
from diffmem.common.similarity import (
    REPLICATION_THRESHOLDS,
    SimilarityModelError,
    SSCDModel,
    check_clip_spec,
    clip_score,
    finite_mean,
    load_clip_scorer,
    resolve_sscd_spec,
    similarity_stats,
    sscd_to_ground_truth,
    top_k_mean,
)
from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.groundtruth import GroundTruth, coverage_phrase, find_ground_truth, load_images
from diffmem.common.t2i.mitigation.bright_ending import bright_ending_masks
from diffmem.common.t2i.mitigation.methods import generate_batch

# The options of both mitigation CLIs live in the torch-free options module (the CLIs check a command line before
# importing this one); imported back so that the run's users find them here as before.
from diffmem.common.t2i.mitigation.options import (  # noqa: F401
    BASELINES,
    DEFAULT_RUNS_DIR,
    METHOD_FIELDS,
    METHOD_SETTINGS,
    METHODS,
    MitigationSettings,
    RunOptions,
    argument_groups,
    method_family_problem,
    own_fields,
)
from diffmem.common.t2i.mitigation.prompt_embedding import (
    learnable_positions,
    optimise_prompt_embeds,
    prompt_attention_mask,
    prompt_losses,
)
from diffmem.common.t2i.pipelines import FamilyError
from diffmem.common.t2i.prompt_aug import augment_prompt
from diffmem.common.t2i.sampler import decode_latents, save_grid, to_pil
from diffmem.common.t2i.text_noise import initial_latents


@dataclass
class Evaluators:
    """What measures a generation: SSCD model + ground-truth root, and a CLIP scorer (each may be None)."""

    sscd: object | None = None
    clip: object | None = None
    gt_root: Path | None = None


# --- the conditioning of one batch -----------------------------------------------------------------------

def used_prompts(prompts: list[str], rows: list[int], settings: MitigationSettings, tokenizer) -> list[str]:
    """The prompt each row is generated from: the original, or its seeded random augmentation (baselines)."""
    if settings.method not in BASELINES:
        return list(prompts)

    return [augment_prompt(p, settings.method, settings.repeat_num, aug_generator(settings.gen_seed + r),
                           tokenizer=tokenizer)
            for p, r in zip(prompts, rows)]


def aug_generator(seed: int):
    """The random source of one prompt's augmentation (a generator of its own, so batches cannot matter)."""
    import numpy as np

    return np.random.default_rng(seed)


def condition_batch(parts, uncond_embed, prompts: list[str], rows: list[int], settings: MitigationSettings) -> dict:
    """Embeddings to generate from, the prompts actually used and the mitigation loss before/after, per row."""

    used = used_prompts(prompts, rows, settings, parts.tokenizer)
    encoded = encode_prompts(parts, used)
    latents = initial_latents(rows, settings.num_images_per_prompt, parts.latent_shape, settings.gen_seed,
                              "per_prompt", parts.init_noise_sigma(settings.num_inference_steps))
    objective = dict(num_inference_steps=settings.num_inference_steps, target_steps=settings.optim_target_steps,
                     guidance_scale=settings.guidance_scale)
    out = dict(prompts_used=used, truncated=encoded.truncated, latents=latents, method_s=0.0,
               extra_unet_calls=[0] * len(rows))
    if settings.method == "ours":
        t0 = time.perf_counter()
        mask, mask_calls = None, 0
        if settings.be_mask:

            mask = bright_ending_masks(parts, encoded.embeds, uncond_embed, latents, used,
                                       num_inference_steps=settings.num_inference_steps,
                                       guidance_scale=settings.guidance_scale)
            mask_calls = 2 * settings.num_inference_steps  # the unmitigated generation the mask comes from
        # CLIP's positions: BOS fixed, padding too with --freeze_padding; a T5 sequence has no BOS: all move.
        learnable = (learnable_positions(prompt_attention_mask(parts.tokenizer, used), settings.freeze_padding)
                     if parts.family.clip_padding else torch.ones(encoded.embeds.shape[:2], dtype=torch.bool))
        res = optimise_prompt_embeds(parts, encoded.embeds, uncond_embed, latents,
                                     target_loss=settings.optim_target_loss, iters=settings.optim_iters,
                                     lr=settings.optim_lr, learnable=learnable,
                                     reduction=settings.optim_loss_reduction, mask=mask, **objective)
        # Each loss evaluation runs every generation's ε_u and ε_c up to the last target step.
        per_eval = 2 * (max(settings.optim_target_steps) + 1)
        out.update(embeds=res.embeds, loss_initial=res.initial_loss, loss_final=res.final_loss,
                   iterations=res.iterations, reached_target=res.reached_target, method_s=time.perf_counter() - t0,
                   extra_unet_calls=[mask_calls + per_eval * len(h) for h in res.loss_history])
    else:
        losses = prompt_losses(parts, encoded.embeds, uncond_embed, latents,
                               reduction=settings.optim_loss_reduction, **objective)
        out.update(embeds=encoded.embeds, loss_initial=losses, loss_final=losses, iterations=[0] * len(rows),
                   reached_target=[None] * len(rows))
    return out


# --- measuring -----------------------------------------------------------------------------------------------

def _round_list(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def measure_prompt(generated: list, prompt: str, gt: GroundTruth, evaluators: Evaluators,
                   gen_clip: torch.Tensor | None) -> dict:
    """SSCD to ground truth and CLIP metrics of one prompt's generated PIL images, as result-row fields."""
    row: dict = {"gt_status": gt.status, "gt_images": len(gt.paths)}
    gt_images = []
    if gt.ok and (evaluators.sscd is not None or evaluators.clip is not None):
        try:
            gt_images = load_images(gt.paths)
        except (OSError, ValueError) as exc:  # a corrupt file is reported like a missing folder
            row["gt_status"] = "unreadable"
            row["gt_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    if gt_images and evaluators.sscd is not None:
        per_gen = sscd_to_ground_truth(evaluators.sscd.similarity(gt_images, generated))
        row["sscd"] = _round_list(per_gen)
        row.update({f"sscd_{k}": v for k, v in similarity_stats(per_gen).items()})
        row["sscd_top3"] = top_k_mean(per_gen, 3)
    if gen_clip is not None:
        row["clip_score"] = _round_list(gen_clip)
        row["clip_score_mean"] = float(gen_clip.mean())
        if gt_images:
            # Reference alignment of the training images themselves: independent of the method, unlike the
            # reference code's CLIP score of the ground-truth image closest to the first generation.
            row["gt_clip_score"] = float(evaluators.clip.score(gt_images, prompt).mean())
    return row


# --- the run -------------------------------------------------------------------------------------------------

class MitigationFiles:
    """The files of one run folder: config.json, results.jsonl, summary.json, images/, tb/."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.config = self.out / "config.json"
        self.results = self.out / "results.jsonl"
        self.summary = self.out / "summary.json"
        self.images = self.out / "images"
        self.tensorboard = self.out / "tb"

    def prepare(self, fingerprint: dict, overwrite: bool = False, records: list | None = None) -> list[dict]:
        """Create or check the folder (settings, and each stored row's prompt against records); returns the rows
        already done (torn last line cut)."""
        if overwrite and self.out.exists():
            for p in (self.config, self.results, self.summary):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.images, ignore_errors=True)
            shutil.rmtree(self.tensorboard, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        # Settings are checked before the torn tail is cut, so a refused run leaves the folder as it was.
        done = read_results(self.results)
        if records is not None:
            check_rows_match(self.results, done, {r.row: {"prompt": r.prompt} for r in records},
                             "another --out")
        bind_run_settings(self.config, fingerprint, bool(done), "another --out")
        return read_results(self.results, repair=True)


class TensorboardTracker:
    """Per-prompt scalars and image grids, and the run summary, in a tensorboard log folder."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_row(self, row: dict, grid) -> None:
        import numpy as np

        step = row["row"]
        for key in ("loss_initial", "loss_final", "iterations", "sscd_mean", "sscd_max", "clip_score_mean"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"prompt/{key}", row[key], step)
        self.writer.add_image("generations", np.asarray(grid), step, dataformats="HWC")

    def log_summary(self, summary: dict) -> None:
        flat = {}
        for group in ("loss", "sscd", "clip"):
            for k, v in (summary.get(group) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat[f"summary/{group}_{k}"] = v
        for k, v in flat.items():
            self.writer.add_scalar(k, v, 0)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2)[:20000] + "\n```")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def run_mitigation(parts, vae, records: list, settings: MitigationSettings, out_dir: str | Path, *,
                   evaluators: Evaluators | None = None, batch_size: int = 4, overwrite: bool = False,
                   tracker: TensorboardTracker | None = None, extra_summary: dict | None = None,
                   progress: bool = True, binding: dict | None = None) -> dict:
    """Run one method over the records (resuming earlier rows in out_dir); returns the summary dict.

    binding: what else changes a row's numbers besides the settings (the model, dtype, evaluators and dataset:
    :func:`run_binding`), bound to the folder with them."""
    from tqdm.auto import tqdm


    settings.validate()
    problem = method_family_problem(settings, parts.family)
    if problem is not None:
        raise FamilyError(problem)
    evaluators = evaluators or Evaluators()
    files = MitigationFiles(out_dir)
    done = files.prepare({**settings.fingerprint(), **(binding or {})}, overwrite, records)
    selected = {r.row for r in records}
    done_rows = {r["row"] for r in done} & selected
    todo = [r for r in records if r.row not in done_rows]
    uncond = parts.unconditional()
    t0 = time.perf_counter()
    timing = dict(condition_s=0.0, generate_s=0.0, measure_s=0.0, method_s=0.0)
    bar = tqdm(total=len(todo), desc=f"mitigate[{settings.method}]", unit="prompt", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        rows, prompts = [r.row for r in batch], [r.prompt for r in batch]
        t = time.perf_counter()
        cond = condition_batch(parts, uncond, prompts, rows, settings)
        timing["condition_s"] += time.perf_counter() - t
        t = time.perf_counter()
        gen = generate_batch(parts, cond["embeds"], uncond, cond["latents"], rows, cond["prompts_used"], settings)
        images = decode_latents(vae, gen.latents)  # [B, G, 3, H, W] in [0, 1]
        generate_s = time.perf_counter() - t
        timing["generate_s"] += generate_s
        # What producing the images cost: the method's own work (ours: the optimisation), sampling and decoding;
        # not the text-noise loss reported for every method, nor SSCD/CLIP.
        seconds_per_image = (cond["method_s"] + generate_s) / (len(batch) * settings.num_images_per_prompt)
        timing["method_s"] += cond["method_s"] + generate_s
        t = time.perf_counter()
        pil = [to_pil(images[b]) for b in range(len(batch))]
        gen_clip = None
        if evaluators.clip is not None:
            feats = evaluators.clip.image_features([im for ims in pil for im in ims])
            text = evaluators.clip.text_features(prompts)
            G = settings.num_images_per_prompt
            gen_clip = [clip_score(feats[b * G:(b + 1) * G], text[b:b + 1]) for b in range(len(batch))]
        out_rows = []
        for b, rec in enumerate(batch):
            grid_path = save_grid(pil[b], files.images / f"{rec.row:05d}.png")
            row = {"row": rec.row, "index": rec.index if rec.index is not None else rec.row, "prompt": rec.prompt,
                   "prompt_used": cond["prompts_used"][b], "method": settings.method}
            if settings.method in BASELINES:
                row["repeat_num"] = settings.repeat_num
            row.update(loss_initial=cond["loss_initial"][b], loss_final=cond["loss_final"][b],
                       iterations=cond["iterations"][b], truncated=cond["truncated"][b])
            if settings.method == "ours":
                row.update(target_loss=settings.optim_target_loss, reached_target=cond["reached_target"][b],
                           be_mask=settings.be_mask)
            extra = [cond["extra_unet_calls"][b] + e for e in gen.extra_unet_calls[b]]
            row.update(extra_unet_calls=extra, extra_unet_calls_mean=sum(extra) / len(extra),
                       seconds_per_image=round(seconds_per_image, 6), first_step_norm=gen.first_step_norm[b],
                       **gen.details[b])
            gt = find_ground_truth(evaluators.gt_root, row["index"])
            row.update(measure_prompt(pil[b], rec.prompt, gt, evaluators,
                                      gen_clip[b] if gen_clip is not None else None))
            row["image"] = str(grid_path.relative_to(files.out))
            out_rows.append(row)
            if tracker is not None:
                tracker.log_row(row, pil_grid(grid_path))
        timing["measure_s"] += time.perf_counter() - t
        append_results(files.results, out_rows)
        done.extend(out_rows)
        bar.update(len(batch))
        summary = summarize(done, selected, settings, evaluators, len(done_rows), time.perf_counter() - t0,
                            timing, extra_summary)
        write_json_atomic(files.summary, summary)
    bar.close()
    summary = summarize(done, selected, settings, evaluators, len(done_rows), time.perf_counter() - t0, timing,
                        extra_summary)
    write_json_atomic(files.summary, summary)
    if tracker is not None:
        tracker.log_summary(summary)
    warning = not_updated_warning(summary)
    if warning:
        print(f"warning: {files.out}: {warning}", file=sys.stderr)
    return summary


def not_updated_warning(summary: dict) -> str | None:
    """One line when ``ours`` left prompts unoptimised because their loss was already at or below the target: legit
    (Wen et al. stop at the target, checked before each update), but their images are the unmitigated ones."""
    loss = summary.get("loss") or {}
    n = loss.get("prompts_not_updated")
    if summary.get("method") != "ours" or not n:
        return None
    return (f"--method ours made no update for {n} of {summary['counts']['prompts']} prompts: their loss was already "
            f"<= --optim_target_loss {loss['target']:g} (Wen et al. stop at the target), so their images are "
            f"unmitigated; a lower target moves them (summary.json loss.prompts_not_updated)")


def pil_grid(path: Path):
    """The saved grid, read back (what tensorboard shows is what is on disk)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def summarize(rows: list[dict], selected: set, settings: MitigationSettings, evaluators: Evaluators,
              resumed: int, elapsed: float, timing: dict, extra: dict | None = None) -> dict:
    """Run summary: settings, counts, ground-truth coverage, loss/SSCD/CLIP aggregates, timing, versions."""
    import diffusers
    import transformers

    rows = sorted((r for r in rows if r["row"] in selected), key=lambda r: r["row"])
    now = len(rows) - resumed
    without_gt = [{"row": r["row"], "index": r["index"], "status": r["gt_status"]} for r in rows
                  if r.get("gt_status") != "ok"]
    summary: dict = {
        "method": settings.method,
        "settings": asdict(settings),
        "counts": {"selected": len(selected), "prompts": len(rows), "this_run": now, "resumed": resumed,
                   "with_ground_truth": sum(r.get("gt_status") == "ok" for r in rows),
                   "without_ground_truth": len(without_gt)},
        "prompts_without_ground_truth": without_gt,
        "loss": {"reduction": settings.optim_loss_reduction, "target_steps": settings.optim_target_steps,
                 "initial_mean": finite_mean(r["loss_initial"] for r in rows),
                 "final_mean": finite_mean(r["loss_final"] for r in rows),
                 "iterations_mean": finite_mean(r["iterations"] for r in rows)},
    }
    if settings.method == "ours":
        summary["loss"]["target"] = settings.optim_target_loss
        summary["loss"]["reached_target"] = sum(bool(r.get("reached_target")) for r in rows)
        # Already at or below the target before any update: Wen et al. stop there, so these images are unmitigated.
        summary["loss"]["prompts_not_updated"] = sum(bool(r.get("reached_target")) and r.get("iterations") == 0
                                                     for r in rows)
    scored = [r for r in rows if "sscd" in r]
    if evaluators.sscd is None:
        summary["sscd"] = None
    else:
        all_gen = torch.tensor([s for r in scored for s in r["sscd"]]) if scored else None
        summary["sscd"] = {
            "model": evaluators.sscd.description, "prompts": len(scored),
            "over": coverage_phrase("SSCD", len(scored), len(rows)),  # ground truth is missing for some prompts
            "mean": finite_mean(r["sscd_mean"] for r in scored),
            "max_mean": finite_mean(r["sscd_max"] for r in scored),
            "min_mean": finite_mean(r["sscd_min"] for r in scored),
            # MemBench's per-prompt metrics averaged over prompts: max over generations × ground truth (= max_mean),
            # mean of the top-3 generations, share of generations above 0.5.
            "top3_mean": finite_mean(r.get("sscd_top3") for r in scored),
            "membench_rate_gt_0.5": finite_mean(r.get("sscd_rate_gt_0.5") for r in scored),
        }
        for th in REPLICATION_THRESHOLDS:
            # Over all scored generations, and the share of prompts with at least one replica.
            summary["sscd"][f"rate_gt_{th}"] = float((all_gen > th).float().mean()) if all_gen is not None else None
            summary["sscd"][f"prompt_rate_gt_{th}"] = (sum(r["sscd_max"] > th for r in scored) / len(scored)
                                                       if scored else None)
    if evaluators.clip is None:
        summary["clip"] = None
    else:
        clip = evaluators.clip
        summary["clip"] = {
            "model": clip.model_name, "pretrained": clip.pretrained, "calibrated": clip.calibrated,
            "mean": finite_mean(r.get("clip_score_mean") for r in rows),
            "gt_mean": finite_mean(r.get("gt_clip_score") for r in rows),
        }
        if not clip.calibrated:
            summary["clip"]["note"] = "random weights (--reference_model_pretrain none): CLIP scores are UNCALIBRATED"
    summary["cost"] = {"seconds_per_image": finite_mean(r.get("seconds_per_image") for r in rows),
                       "extra_unet_calls_per_image": finite_mean(r.get("extra_unet_calls_mean") for r in rows),
                       "first_step_norm": finite_mean(r.get("first_step_norm") for r in rows)}
    gen_time = sum(v for k, v in timing.items() if k != "method_s")
    summary["time_s"] = elapsed
    summary["timing_s"] = timing
    summary["prompts_per_s"] = now / gen_time if gen_time > 0 and now else None
    summary["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__}
    if extra:
        summary.update(extra)
    return summary


def run_binding(model_id: str, unet_id: str | None, dtype: str, evaluators: Evaluators, sscd_preprocess: str,
                dataset_rows: list, revision: str | None = None) -> dict:
    """The settings outside MitigationSettings that change a row's numbers: the model (its --revision where given,
    so runs from before the option resume) and its dtype, the SSCD model and preset and the CLIP model actually used
    (None where one is skipped), and the dataset's content."""
    sscd, clip = evaluators.sscd, evaluators.clip
    return {"model_id": model_id, "unet_id": unet_id, **({"revision": revision} if revision is not None else {}),
            "dtype": dtype,
            "sscd_model": sscd.description if sscd is not None else None,
            "sscd_preprocess": sscd_preprocess if sscd is not None else None,
            "clip_model": f"{clip.model_name}:{clip.pretrained}" if clip is not None else None,
            "dataset_sha256": digest_rows({"row": r.row, "prompt": r.prompt} for r in dataset_rows)}


# --- evaluators from command-line style specs ----------------------------------------------------------------

def check_evaluators(sscd_model: str | None, reference_model: str | None, reference_model_pretrain: str) -> None:
    """Raise SimilarityModelError (one line) for an SSCD or CLIP choice that cannot work, before loading anything.

    sscd_model None skips SSCD; reference_model None skips the CLIP score.
    """

    if sscd_model is not None:
        resolve_sscd_spec(sscd_model)
    if reference_model is not None:
        reason = check_clip_spec(reference_model, reference_model_pretrain)
        if reason:
            raise SimilarityModelError(reason)


def load_evaluators(sscd_model: str | None, sscd_preprocess: str, reference_model: str | None,
                    reference_model_pretrain: str, gt_root: Path | None, device) -> Evaluators:
    """SSCD model (None when skipped or when there is no ground truth to compare with) and CLIP scorer."""

    sscd = SSCDModel(sscd_model, device=device, preset=sscd_preprocess) if sscd_model and gt_root else None
    clip = load_clip_scorer(reference_model, reference_model_pretrain, device=device) if reference_model else None
    return Evaluators(sscd=sscd, clip=clip, gt_root=gt_root)
