"""Mitigate memorization at inference time and measure replication (Wen et al., ICLR 2024, Sec. 5).

    python mitigate/inference_mem.py --model ID_OR_DIR --data FILE_OR_DIR --out RUN_DIR
        --method none|ours|rand_word_add|rand_numb_add|rand_word_repeat|jain_stp|jain_dtp|jain_og|han_batch|
                 han_sample|ren_attn|gni [options]

``ours`` optimises each prompt's text embedding until its text-conditional noise magnitude at DDIM step(s)
--optim_target_steps is ≤ --optim_target_loss; the baselines insert --repeat_num random tokens / numbers /
own words; jain_* schedule the guidance (Jain et al. 2025), han_* adjust the initial noise (Han et al. 2025),
ren_attn masks and rescales cross-attention (Ren et al. 2024), gni adds noise to the text embedding (Somepalli
et al. 2023); see common/t2i/mitigation/methods.py. Every method starts prompt i from the same noise (seed
gen_seed + i) and records per prompt its extra UNet evaluations and seconds per image. Writes
{out}/: images/{row}.png (grid of the prompt's generations), results.jsonl (one row per prompt,
appended per batch; re-running the same command resumes), summary.json, config.json, side_by_side.png (the
first generation of each of the first 8 prompts, under a row of their first ground-truth images when there are
any; tiles of at least 256 px, tiny images enlarged with nearest neighbour; rebuilt from the images on disk at the
end of every run, a resumed one included) and, with --with_tracking, a tensorboard log in tb/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from diffmem.common.cli import (
    ArgumentParser,
    add_settings_arguments,
    add_settings_groups,
    given_settings,
    quiet_hub_logging,
    resolve_device,
    run_main,
    settings_from_args,
)
from diffmem.common.runlock import lock_run_folder
from diffmem.common.settings import option
from diffmem.common.t2i.mitigation.options import (  # torch-free: run() imports torch
    MitigationSettings,
    RunOptions,
    argument_groups,
    own_fields,
    settings_unread_by,
)
from diffmem.common.t2i.mitigation.tradeoff import run_label_of
from diffmem.common.t2i.options import shared_option


@dataclass
class InferenceMemConfig(MitigationSettings, RunOptions):
    """RunOptions, then the MitigationSettings that change the numbers, then this CLI's own options."""

    split: str = shared_option("split")
    column: str | None = shared_option("column")
    skip_clip: bool = option(False, help="do not compute CLIP scores")
    with_tracking: bool = option(False, help="tensorboard log in {out}/tb")

    def settings(self) -> MitigationSettings:
        return MitigationSettings(**{f.name: getattr(self, f.name) for f in fields(MitigationSettings)})

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        self.settings().validate()
        RunOptions.validate(self)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Inference-time memorization mitigation with SSCD/CLIP tracking "
                                   "(Wen et al. 2024).")
    add_settings_groups(p, argument_groups())
    add_settings_arguments(p, InferenceMemConfig, only=own_fields(InferenceMemConfig, MitigationSettings, RunOptions))
    return p


def parse_config(argv: list[str] | None) -> InferenceMemConfig:
    p = build_parser()
    cfg = settings_from_args(InferenceMemConfig, p.parse_args(argv))
    unread = settings_unread_by(cfg.method, given_settings(p, argv))
    if unread:
        hint = (" (Wen et al.'s inference_mem.py runs their method when given a target: add --method ours)"
                if "optim_target_loss" in unread and cfg.method == "none" else "")
        p.error(f"--{unread[0]} does not apply to --method {cfg.method}, which would ignore it{hint}")
    return cfg


def run(cfg: InferenceMemConfig) -> dict:
    """Validate inputs, load models, run the method and return the summary."""
    cfg.validate()
    from diffmem.common.t2i.groundtruth import resolve_dataset_path, resolve_gt_root
    from diffmem.common.t2i.mitigation.run import (
        TensorboardTracker,
        check_evaluators,
        load_evaluators,
        run_binding,
        run_mitigation,
    )
    from diffmem.common.t2i.mitigation.side_by_side import SIDE_BY_SIDE_FILE, write_side_by_side
    from diffmem.common.t2i.prompts import PromptFileError, read_prompts, select_rows

    # Everything the user typed is checked before any model is loaded.
    dataset = resolve_dataset_path(cfg.dataset)
    dataset_rows = read_prompts(dataset, split=cfg.split, column=cfg.column)
    records = select_rows(dataset_rows, cfg.start, cfg.end)
    if not records:
        raise PromptFileError(f"{cfg.dataset}: no rows in --start {cfg.start} --end {cfg.end}")
    gt_root = resolve_gt_root(dataset, cfg.gt_dir) if Path(str(dataset)).is_file() or cfg.gt_dir else None
    sscd_model = None if cfg.sscd_model == "none" else cfg.sscd_model
    reference_model = None if cfg.skip_clip else cfg.reference_model
    if sscd_model and gt_root is None:
        print(f"inference_mem: note: no ground-truth folder (gt_images/ next to {dataset}, or --gt_dir): "
              f"SSCD replication is not measured", file=sys.stderr)
        sscd_model = None
    check_evaluators(sscd_model, reference_model, cfg.reference_model_pretrain)
    device = resolve_device(cfg.device)
    settings = cfg.settings()
    out_dir = cfg.run_dir

    import torch

    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline, parse_dtype

    with lock_run_folder(out_dir, "--out"):
        quiet_hub_logging()
        # Evaluators first: a CLIP tag that cannot be downloaded fails before minutes of generation.
        evaluators = load_evaluators(sscd_model, cfg.sscd_preprocess, reference_model, cfg.reference_model_pretrain,
                                     gt_root, device)
        pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device, cfg.revision)
        parts = denoiser_parts(pipe, cfg.scheduler, cfg.height, cfg.width)
        tracker = TensorboardTracker(out_dir / "tb") if cfg.with_tracking else None
        extra = {"run_name": cfg.name, "dataset": str(dataset), "gt_root": str(gt_root) if gt_root else None,
                 "model": {"model_id": cfg.model_id, "unet_id": cfg.unet_id, "dtype": cfg.dtype, "device": device,
                           "source": getattr(pipe, "model_source", None)}}
        try:
            summary = run_mitigation(parts, pipe.vae, records, settings, out_dir, evaluators=evaluators,
                                     batch_size=cfg.batch_size, overwrite=cfg.overwrite, tracker=tracker,
                                     extra_summary=extra,
                                     binding=run_binding(cfg.model_id, cfg.unet_id, cfg.dtype, evaluators,
                                                         cfg.sscd_preprocess, dataset_rows, cfg.revision))
        finally:
            if tracker is not None:
                tracker.close()
        # From the files on disk, after the last row: a resumed run's picture holds every prompt.
        picture = write_side_by_side(out_dir / SIDE_BY_SIDE_FILE, records, [(run_label_of(settings), out_dir)],
                                     settings.num_images_per_prompt, gt_root,
                                     title=f"{cfg.name}: first generation of each prompt")
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sscd = summary.get("sscd") or {}
        clip = summary.get("clip") or {}

        def fmt(v):
            return "n/a" if v is None else f"{v:.3f}"

        print(f"{out_dir}: {summary['counts']['prompts']} prompts ({summary['counts']['this_run']} now, "
              f"{summary['counts']['resumed']} resumed), method {cfg.method}: "
              f"loss {fmt(summary['loss']['final_mean'])}, "
              f"SSCD mean {fmt(sscd.get('mean'))}, >0.5 {fmt(sscd.get('rate_gt_0.5'))}, "
              f"CLIP {fmt(clip.get('mean'))}{'' if clip.get('calibrated', True) else ' (UNCALIBRATED)'}, "
              f"{summary['counts']['without_ground_truth']} without ground truth")
        if picture is not None:
            print(f"{picture}: the first generations side by side")
        return summary


def main(argv: list[str] | None = None) -> int:
    return run_main("inference_mem", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
