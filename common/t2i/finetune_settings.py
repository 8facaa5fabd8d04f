"""The settings of text-to-image fine-tuning (``finetune/train_text_to_image.py``): the model, Wen et al.'s data
mixture, the loss (with the thresholded-loss mitigation) and the validation images, beside the generic loop's
``TrainConfig``. Torch-free, so the CLI's ``--help`` and its argument checks (the model reference included) answer
before torch is imported; ``common.t2i.train`` runs them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference
from diffmem.common.settings import option, option_flag, prompt_text
from diffmem.common.t2i.options import PREDICTION_TYPES, PROMPT_AUG_STYLES
from diffmem.common.training.config import TrainConfig

# How flow matching (the rectified-flow families: SD3, Flux) draws σ and weights the loss: the choices of diffusers'
# SD3/Flux training examples (diffusers.training_utils.compute_density_for_timestep_sampling and
# compute_loss_weighting_for_sd3). logit_normal and mode shape σ's density, sigma_sqrt and cosmap weight the loss,
# none is uniform σ and an unweighted loss.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
# The density parameters' values when not given: the examples' defaults (--logit_mean 0, --logit_std 1,
# --mode_scale 1.29).
FLOW_DENSITY_DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
FLOW_FIELDS = ("weighting_scheme", *FLOW_DENSITY_DEFAULTS)
# The settings recorded in a run's training_options.json only when given: runs from before they existed resume.
RECORDED_WHEN_GIVEN = ("lora_rank", *FLOW_FIELDS)


@dataclass
class TextToImageConfig:
    """Everything ``finetune/train_text_to_image.py`` needs; ``train`` holds the generic loop settings."""

    pretrained_model_name_or_path: str = option(flag="--model", aliases=("--pretrained_model_name_or_path",
                                                                         "--model_id"),
                                                help="Hub id or local pipeline folder")
    train: TrainConfig
    revision: str | None = option(None, type=str, help="Hub revision of the pipeline")
    variant: str | None = option(None, type=str, help="weights variant, e.g. fp16 or non_ema")
    # data: a folder (flat or imagefolder) with Wen et al.'s mixture, or a 🤗 dataset
    train_data_dir: str | None = option(None, type=str, flag="--data", aliases=("--train_data_dir", "--dataset"),
                                        help="folder of xxx.jpg + xxx.txt pairs, or an imagefolder with metadata.jsonl "
                                             "(--dataset: Wen et al.'s name for it, the memorized images)")
    non_mem_dataset: str | None = option(None, type=str,
                                         help="folder of non-memorized images mixed in (same layouts)")
    dataset_name: str | None = option(None, type=str, help="a 🤗 dataset (Hub name or local) instead of a folder")
    dataset_config_name: str | None = option(None, type=str, help="configuration of --dataset_name")
    cache_dir: str | None = option(None, type=str, help="download cache of --dataset_name")
    image_column: str = option("image", help="image column of a 🤗 dataset")
    caption_column: str = option("text", help="caption column of a 🤗 dataset or metadata.jsonl")
    end: int | None = option(None, type=int, help="use the first N memorized images (None: all)")
    repeats: int = option(1, help="repeat the memorized images R times")
    non_mem_ratio: float = option(0.0, help="add non-memorized images up to K x the memorized sample count")
    skip_corrupt_images: bool = option(False, help="leave unreadable images out (listed in data_report.json) "
                                                   "instead of stopping")
    resolution: int = option(512, help="training image size")
    center_crop: bool = option(False, help="crop the centre after resizing (else a random crop)")
    random_flip: bool = option(False, help="flip images horizontally at random")
    prompt_aug_style: str | None = option(None, choices=PROMPT_AUG_STYLES,
                                          help="caption augmentation (Somepalli et al.)")
    repeat_num: int = option(1, help="insertions per caption for --prompt_aug_style")
    caption_dropout: float = option(0.0, help="probability of training on the empty caption")
    # model and loss
    train_text_encoder: bool = option(False, help="train the text encoder jointly (not with DeepSpeed)")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass (less memory)")
    lora_rank: int = option(0, help="train LoRA adapters of this rank on the denoiser's attention projections "
                                    "(to_q, to_k, to_v, to_out.0) and nothing else; 0: full fine-tuning. The output "
                                    "pipeline holds the merged weights")
    enable_xformers_memory_efficient_attention: bool = option(
        False, help="xformers attention (needs the xformers extra and a GPU); PyTorch SDPA is the default")
    prediction_type: str | None = option(None, choices=PREDICTION_TYPES,
                                         help="training target; None: the scheduler's. Also written into the saved "
                                              "scheduler")
    snr_gamma: float | None = option(None, type=float, help="Min-SNR-gamma loss weighting (5.0 recommended)")
    noise_offset: float = option(0.0, help="offset noise scale")
    hard_threshold: float | None = option(None, type=float, help="drop samples with ||eps(x_t,c) - eps(x_t,empty)||_2 "
                                                                 ">= T from the loss (Wen et al.; SD3 and Flux: the "
                                                                 "velocities' ||v_c - v_empty||_2)")
    weighting_scheme: str | None = option(None, choices=WEIGHTING_SCHEMES,
                                          help="SD3 and Flux (flow matching): the density sigma is drawn from, or "
                                               "the loss weighting, as in diffusers' SD3/Flux examples; None: the "
                                               "family's example default (SD3: logit_normal, Flux: none)")
    logit_mean: float | None = option(None, type=float, help="mean of logit(sigma) for --weighting_scheme "
                                                             "logit_normal (None: 0.0)")
    logit_std: float | None = option(None, type=float, help="standard deviation of logit(sigma) for "
                                                            "--weighting_scheme logit_normal (None: 1.0)")
    mode_scale: float | None = option(None, type=float, help="scale of --weighting_scheme mode's density "
                                                             "(None: 1.29)")
    # validation images
    validation_prompts: list[str] = option(default_factory=list, nargs="+", type=prompt_text,
                                           help="prompts of the validation images")
    validation_inference_steps: int = option(25, help="sampling steps of the validation images")
    validation_guidance_scale: float = option(7.5, help="guidance of the validation images")

    def validate(self) -> None:
        """Settings that contradict each other or are out of range raise ConfigError (one line), before any data
        or model is read."""
        t = self.train
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise ConfigError("expected exactly one data source: --data (a folder) or --dataset_name (a 🤗 dataset)")
        positive = {"train_batch_size": t.train_batch_size,
                    "gradient_accumulation_steps": t.gradient_accumulation_steps, "resolution": self.resolution,
                    "checkpointing_steps": t.checkpointing_steps, "num_train_epochs": t.num_train_epochs,
                    "repeats": self.repeats, "validation_inference_steps": self.validation_inference_steps}
        optional = {"max_train_steps": t.max_train_steps, "end": self.end,
                    "checkpoints_total_limit": t.checkpoints_total_limit, "validation_steps": t.validation_steps}
        for name, value in [*positive.items(), *((k, v) for k, v in optional.items() if v is not None)]:
            if value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        for name, value in (("lr_warmup_steps", t.lr_warmup_steps), ("repeat_num", self.repeat_num),
                            ("dataloader_num_workers", t.dataloader_num_workers), ("lora_rank", self.lora_rank)):
            if value < 0:
                raise ConfigError(f"--{name} must be >= 0, got {value}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"--caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.non_mem_ratio < 0:
            raise ConfigError(f"--non_mem_ratio must be >= 0, got {self.non_mem_ratio}")
        if self.non_mem_ratio > 0 and self.non_mem_dataset is None:
            raise ConfigError("--non_mem_ratio needs --non_mem_dataset")
        if self.hard_threshold is not None and self.hard_threshold < 0:
            raise ConfigError(f"--hard_threshold must be >= 0, got {self.hard_threshold}")
        if self.logit_std is not None and self.logit_std <= 0:
            raise ConfigError(f"--logit_std must be > 0, got {self.logit_std}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if not 0.0 <= t.ema_decay <= 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1], got {t.ema_decay}")
        if t.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {t.learning_rate}")
        if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
            raise ConfigError(f"--out {t.output_dir} is a file; expected a run folder (new or one to resume)")
        if t.validation_steps is not None and not self.validation_prompts:
            raise ConfigError("--validation_steps needs --validation_prompts")
        check_model_reference(self.pretrained_model_name_or_path,
                              option_flag(TextToImageConfig, "pretrained_model_name_or_path"), self.revision)
