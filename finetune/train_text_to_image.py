"""Fine-tune a text-to-image pipeline (SD 1/2, SDXL, SD3, Flux, PixArt), optionally with Wen et al.'s mitigation.

    accelerate launch --config_file accelerate_configs/single_gpu_fp16.yaml finetune/train_text_to_image.py \\
        --model CompVis/stable-diffusion-v1-4 \\
        --dataset mem_images/ --non_mem_dataset laion_images/ --end 200 --repeats 200 --non_mem_ratio 3 \\
        --hard_threshold 2 --out out/sd-mitigated

Accepts the diffusers text-to-image example's flags plus Wen et al.'s (--dataset, --non_mem_dataset, --end,
--repeats, --non_mem_ratio, --hard_threshold, --prompt_aug_style, --repeat_num), diffusers' SD3/Flux examples'
flow-matching flags (--weighting_scheme, --logit_mean, --logit_std, --mode_scale) and --lora_rank. The output folder
is a full pipeline of the input's class (EMA weights with --use_ema, LoRA adapters merged) that
``detect/detect_mem.py --model`` loads; a UNet run's ``checkpoint-N/unet`` (and ``unet_ema``) can be passed as
``--unet_id``. Runs without ``accelerate launch`` too (one process).
"""

from __future__ import annotations

import os

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.t2i.finetune_settings import TextToImageConfig
from diffmem.common.training.config import TrainConfig

# This CLI's own defaults for TrainConfig fields (the library's suit its other callers; output_dir has none).
TRAIN_DEFAULTS = {"output_dir": "sd-model-finetuned", "tracker_project_name": "diffmem-text2image"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    add_settings_arguments(g, TextToImageConfig, only=(
        "pretrained_model_name_or_path", "revision", "variant", "train_text_encoder", "lora_rank",
        "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "prediction_type"))

    g = p.add_argument_group("data")
    add_settings_arguments(g, TextToImageConfig, only=("train_data_dir",))
    add_settings_arguments(g, TextToImageConfig, only=(
        "non_mem_dataset", "dataset_name", "dataset_config_name", "cache_dir", "image_column", "caption_column", "end",
        "repeats", "non_mem_ratio", "skip_corrupt_images", "resolution", "center_crop", "random_flip",
        "prompt_aug_style", "repeat_num", "caption_dropout"))
    add_settings_arguments(g, TrainConfig, only=("dataloader_num_workers",))

    g = p.add_argument_group("loss")
    add_settings_arguments(g, TextToImageConfig, only=("hard_threshold", "snr_gamma", "noise_offset",
                                                       "weighting_scheme", "logit_mean", "logit_std", "mode_scale"))

    g = p.add_argument_group("optimization")
    add_settings_arguments(g, TrainConfig, only=(
        "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps", "learning_rate",
        "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
        "adam_epsilon", "max_grad_norm", "use_8bit_adam", "allow_tf32", "use_ema", "ema_decay", "mixed_precision",
        "seed"))

    g = p.add_argument_group("checkpoints, logging, validation")
    add_settings_arguments(g, TrainConfig, defaults=TRAIN_DEFAULTS, only=(
        "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "report_to",
        "tracker_project_name", "logging_dir", "validation_steps"))
    add_settings_arguments(g, TextToImageConfig, only=(
        "validation_prompts", "validation_inference_steps", "validation_guidance_scale"))
    return p


def parse_args(argv: list[str] | None = None) -> TextToImageConfig:
    a = build_parser().parse_args(argv)
    return settings_from_args(TextToImageConfig, a, train=settings_from_args(TrainConfig, a))


def run(cfg: TextToImageConfig) -> None:
    """Validate the arguments, train, and save the pipeline (one line of summary from the main process)."""
    cfg.validate()
    from diffmem.common.t2i.train import check_family_settings, train_text_to_image
    from diffmem.common.training.checkpoints import resolve_resume

    check_family_settings(cfg)

    resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    summary = train_text_to_image(cfg)
    if os.environ.get("RANK", "0") == "0":
        dropped = "" if cfg.hard_threshold is None else f", {summary.dropped_fraction:.1%} dropped by the threshold"
        print(f"trained {summary.global_step} steps ({summary.samples_kept}/{summary.samples_seen} samples kept"
              f"{dropped}); pipeline saved to {cfg.train.output_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main("train_text_to_image", run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
