"""Fine-tune a Stable Diffusion pipeline on captioned images, optionally with Wen et al.'s thresholded loss.

    accelerate launch --config_file accelerate_configs/single_gpu_fp16.yaml finetune/train_text_to_image.py \\
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --dataset mem_images/ --non_mem_dataset laion_images/ --end 200 --repeats 200 --non_mem_ratio 3 \\
        --hard_threshold 2 --output_dir out/sd-mitigated

Accepts the diffusers text-to-image example's flags plus Wen et al.'s (--dataset, --non_mem_dataset, --end,
--repeats, --non_mem_ratio, --hard_threshold, --prompt_aug_style, --repeat_num). The output folder is a full
pipeline (EMA weights with --use_ema) that ``detect/detect_mem.py --model_id`` loads; ``checkpoint-N/unet`` (and
``unet_ema``) can be passed as ``--unet_id``. Runs without ``accelerate launch`` too (one process).
"""

from __future__ import annotations

import argparse
import os

from diffmem.common.cli import ArgumentParser, run_main
from diffmem.common.errors import ConfigError
from diffmem.common.t2i.prompt_aug import STYLES

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local pipeline folder")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16 or non_ema")
    g.add_argument("--train_text_encoder", action="store_true", help="train the text encoder jointly (not with DeepSpeed)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (needs the xformers extra and a GPU); PyTorch SDPA is the default")
    g.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                   help="training target; default: the scheduler's. Also written into the saved scheduler")

    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None,
                   help="folder of xxx.jpg + xxx.txt pairs, or an imagefolder with metadata.jsonl")
    g.add_argument("--dataset", default=None, help="Wen et al.'s name for --train_data_dir (the memorized images)")
    g.add_argument("--non_mem_dataset", default=None, help="folder of non-memorized images mixed in (same layouts)")
    g.add_argument("--dataset_name", default=None, help="a 🤗 dataset (Hub name or local) instead of a folder")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--image_column", default="image", help="image column of a 🤗 dataset")
    g.add_argument("--caption_column", default="text", help="caption column of a 🤗 dataset or metadata.jsonl")
    g.add_argument("--end", type=int, default=None, help="use the first N memorized images (default: all)")
    g.add_argument("--repeats", type=int, default=1, help="repeat the memorized images R times")
    g.add_argument("--non_mem_ratio", type=float, default=0.0,
                   help="add non-memorized images up to K x the memorized sample count")
    g.add_argument("--skip_corrupt_images", action="store_true",
                   help="leave unreadable images out (listed in data_report.json) instead of stopping")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--prompt_aug_style", choices=STYLES, default=None, help="caption augmentation (Somepalli et al.)")
    g.add_argument("--repeat_num", type=int, default=1, help="insertions per caption for --prompt_aug_style")
    g.add_argument("--caption_dropout", type=float, default=0.0, help="probability of training on the empty caption")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("loss")
    g.add_argument("--hard_threshold", type=float, default=None,
                   help="drop samples with ||eps(x_t,c) - eps(x_t,empty)||_2 >= T from the loss (Wen et al.)")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (5.0 recommended)")
    g.add_argument("--noise_offset", type=float, default=0.0)

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=16, help="per process")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="multiply the LR by accumulation x batch x processes")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (needs the bnb extra and a GPU)")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: the accelerate config's")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--output_dir", default="sd-model-finetuned")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    g.add_argument("--report_to", choices=("tensorboard", "wandb", "all", "none"), default="tensorboard")
    g.add_argument("--tracker_project_name", default="diffmem-text2image")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--validation_prompts", nargs="+", default=[])
    g.add_argument("--validation_steps", type=int, default=None,
                   help="generate the validation prompts every N steps (always at the end)")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    return p


def config_from_args(args: argparse.Namespace):
    from diffmem.common.t2i.train import TextToImageConfig
    from diffmem.common.trainer import TrainConfig

    train = TrainConfig(
        output_dir=args.output_dir, seed=args.seed, train_batch_size=args.train_batch_size,
        num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        scale_lr=args.scale_lr, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm, use_8bit_adam=args.use_8bit_adam,
        use_ema=args.use_ema, ema_decay=args.ema_decay, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, resume_from_checkpoint=args.resume_from_checkpoint,
        mixed_precision=args.mixed_precision, report_to=args.report_to,
        tracker_project_name=args.tracker_project_name, logging_dir=args.logging_dir,
        dataloader_num_workers=args.dataloader_num_workers, allow_tf32=args.allow_tf32,
        validation_steps=args.validation_steps,
    )
    return TextToImageConfig(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path, train=train, revision=args.revision,
        variant=args.variant, train_data_dir=args.train_data_dir or args.dataset,
        non_mem_dataset=args.non_mem_dataset, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, image_column=args.image_column,
        caption_column=args.caption_column, end=args.end, repeats=args.repeats, non_mem_ratio=args.non_mem_ratio,
        skip_corrupt_images=args.skip_corrupt_images, resolution=args.resolution, center_crop=args.center_crop,
        random_flip=args.random_flip, prompt_aug_style=args.prompt_aug_style, repeat_num=args.repeat_num,
        caption_dropout=args.caption_dropout, train_text_encoder=args.train_text_encoder,
        gradient_checkpointing=args.gradient_checkpointing,
        enable_xformers_memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
        prediction_type=args.prediction_type, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        hard_threshold=args.hard_threshold, validation_prompts=list(args.validation_prompts),
        validation_inference_steps=args.validation_inference_steps,
        validation_guidance_scale=args.validation_guidance_scale,
    )


def validate_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments as one line, or None."""
    if args.dataset and args.train_data_dir and args.dataset != args.train_data_dir:
        return "--dataset and --train_data_dir name the same thing; pass one"
    folder = args.train_data_dir or args.dataset
    if (folder is None) == (args.dataset_name is None):
        return "expected exactly one data source: --train_data_dir/--dataset (folder) or --dataset_name"
    positive = ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps",
                "num_train_epochs", "repeats", "validation_inference_steps")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    for name in ("max_train_steps", "end", "checkpoints_total_limit", "validation_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} must be >= 1, got {value}"
    for name in ("lr_warmup_steps", "repeat_num", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            return f"--{name} must be >= 0, got {getattr(args, name)}"
    if not 0.0 <= args.caption_dropout < 1.0:
        return f"--caption_dropout must be in [0, 1), got {args.caption_dropout}"
    if args.non_mem_ratio < 0:
        return f"--non_mem_ratio must be >= 0, got {args.non_mem_ratio}"
    if args.non_mem_ratio > 0 and args.non_mem_dataset is None:
        return "--non_mem_ratio needs --non_mem_dataset"
    if args.hard_threshold is not None and args.hard_threshold < 0:
        return f"--hard_threshold must be >= 0, got {args.hard_threshold}"
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        return f"--snr_gamma must be > 0, got {args.snr_gamma}"
    if not 0.0 <= args.ema_decay <= 1.0:
        return f"--ema_decay must be in [0, 1], got {args.ema_decay}"
    if args.learning_rate <= 0:
        return f"--learning_rate must be > 0, got {args.learning_rate}"
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return f"--output_dir {args.output_dir} is a file; expected a run folder (new or one to resume)"
    if args.validation_steps is not None and not args.validation_prompts:
        return "--validation_steps needs --validation_prompts"
    return None


def run(args: argparse.Namespace) -> None:
    """Validate the arguments, train, and save the pipeline (one line of summary from the main process)."""
    problem = validate_args(args)
    if problem is not None:
        raise ConfigError(problem)
    from diffmem.common.t2i.train import train_text_to_image
    from diffmem.common.trainer import resolve_resume

    cfg = config_from_args(args)
    resolve_resume(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
    summary = train_text_to_image(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {summary.global_step} steps ({summary.samples_kept}/{summary.samples_seen} samples kept); "
              f"pipeline saved to {cfg.train.output_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main("train_text_to_image", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
