"""Text-to-image fine-tuning of a Stable-Diffusion pipeline, with Wen et al.'s thresholded-loss mitigation.

The denoising loss is the diffusers text-to-image example's (VAE latents, DDPM noising, ε or v target,
optional Min-SNR-γ and noise offset). With ``hard_threshold`` T, each sample's text-conditional noise
magnitude ‖ε(x_t, c) − ε(x_t, ∅)‖₂ is measured at its own noisy latent and timestep (ε(x_t, ∅) under no_grad)
and samples at or above T get weight 0 (Wen et al. 2024, Sec. 5). Unlike the reference script this is a mask,
so a fully dropped batch gives an exact 0 loss that still runs backward on every process, Min-SNR weights and
timesteps keep their shapes, and the dropped fraction is logged every step.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.common.results import write_json_atomic
from diffmem.common.runlock import lock_run_folder
from diffmem.common.seeding import (
    STREAM_NOISE,
    STREAM_NOISE_OFFSET,
    STREAM_TIMESTEP,
    STREAM_VAE,
    randint_per_sample,
    randn_per_sample,
)
from diffmem.common.settings import option_flag
from diffmem.common.t2i.finetune_settings import TextToImageConfig
from diffmem.common.t2i.pipelines import FAMILIES, ModelLoadError, load_pipeline, model_family
from diffmem.common.t2i.text_image_data import (
    CaptionConfig,
    ImageDataError,
    ImageTransformConfig,
    MixtureReport,
    TextImageCollator,
    TextImageDataset,
    build_mixture,
    hf_dataset_records,
    read_image_folder,
)
from diffmem.common.t2i.text_noise import epsilon_from_output, text_noise_norm
from diffmem.common.training.builders import make_accelerator, weight_dtype_of
from diffmem.common.training.checkpoints import bind_training_settings, bound_train_settings
from diffmem.common.training.config import TrainSetupError
from diffmem.common.training.loop import LossTerms, Trainer
from diffmem.common.training.loss import hard_threshold_keep, min_snr_weight, snr_from_alphas_cumprod

FINETUNABLE = "the trainer fine-tunes " + ", ".join(f.label for f in FAMILIES.values() if f.finetunable) + " only"


def check_finetunable(model: str, revision: str | None = None) -> None:
    """One line for a model of a family the trainer does not fine-tune yet (read from its model_index.json before
    anything is written); a model that cannot be read is left to the loader's own line."""
    try:
        family = model_family(model, revision)
    except ModelLoadError:
        return
    if not family.finetunable:
        raise ModelLoadError(f"{model}: fine-tuning a {family.label} pipeline is not built yet; {FINETUNABLE}")

# --------------------------------------------------------------------------------------------- data


def load_training_records(cfg: TextToImageConfig, progress: bool = False):
    """(records, MixtureReport, 🤗 dataset or None) for cfg; raises ImageDataError with a one-line message."""
    on_corrupt = "skip" if cfg.skip_corrupt_images else "error"
    if cfg.dataset_name is not None:
        import datasets

        try:
            ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.cache_dir)
        except Exception as exc:  # datasets raises many types for a missing/unreadable dataset
            first = str(exc).strip().splitlines()
            raise ImageDataError(f"{cfg.dataset_name}: cannot load dataset ({type(exc).__name__}: "
                                 f"{first[0] if first else ''})") from exc
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ImageDataError(f"{cfg.dataset_name}: no 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        mem = hf_dataset_records(ds, cfg.image_column, cfg.caption_column, cfg.dataset_name)
        hf = ds
    else:
        mem = read_image_folder(cfg.train_data_dir, cfg.caption_column, memorized=True)
        hf = None
    non_mem = None
    if cfg.non_mem_dataset is not None:
        non_mem = read_image_folder(cfg.non_mem_dataset, cfg.caption_column, memorized=False)
    records, report = build_mixture(mem, non_mem, end=cfg.end, repeats=cfg.repeats,
                                    non_mem_ratio=cfg.non_mem_ratio, on_corrupt=on_corrupt, progress=progress)
    return records, report, hf


# --------------------------------------------------------------------------------------------- loss


class TextToImageLoss:
    """batch -> LossTerms: per-sample (Min-SNR-weighted) MSE, Wen et al.'s keep mask and the text-noise norm."""

    def __init__(self, *, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype: torch.dtype,
                 device: torch.device, unwrap, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 hard_threshold: float | None = None, train_text_encoder: bool = False):
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = noise_scheduler
        self.weight_dtype = weight_dtype
        self.device = device
        self.unwrap = unwrap
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.hard_threshold = hard_threshold
        self.train_text_encoder = train_text_encoder
        self.prediction_type = noise_scheduler.config.prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.uncond_ids = tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length",
                                    truncation=True, return_tensors="pt").input_ids.to(device)
        self._uncond_cache = None

    def _uncond_embedding(self, text_encoder) -> torch.Tensor:
        # A frozen encoder gives the same ε(·, ∅) conditioning every step; a trained one must be re-run.
        if self.train_text_encoder or self._uncond_cache is None:
            with torch.no_grad():
                emb = self.unwrap(text_encoder)(self.uncond_ids, return_dict=False)[0].to(self.weight_dtype)
            if self.train_text_encoder:
                return emb
            self._uncond_cache = emb
        return self._uncond_cache

    def __call__(self, batch: dict, models: dict) -> LossTerms:
        unet = models["unet"]
        text_encoder = models.get("text_encoder", self.text_encoder)
        seeds = batch["sample_seed"].tolist()
        dev, wdt = self.device, self.weight_dtype
        with torch.no_grad():
            dist = self.vae.encode(batch["pixel_values"].to(dev, wdt)).latent_dist
            eps_vae = randn_per_sample(seeds, tuple(dist.mean.shape[1:]), STREAM_VAE).to(dev)
            latents = (dist.mean.float() + dist.std.float() * eps_vae) * self.vae.config.scaling_factor
        bsz = latents.shape[0]
        noise = randn_per_sample(seeds, tuple(latents.shape[1:]), STREAM_NOISE).to(dev)
        if self.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant shift of the noise.
            offset = randn_per_sample(seeds, (latents.shape[1], 1, 1), STREAM_NOISE_OFFSET).to(dev)
            noise = noise + self.noise_offset * offset
        timesteps = randint_per_sample(seeds, self.num_train_timesteps, STREAM_TIMESTEP).to(dev)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

        if self.train_text_encoder:
            cond = text_encoder(batch["input_ids"], return_dict=False)[0]
        else:
            with torch.no_grad():
                cond = text_encoder(batch["input_ids"], return_dict=False)[0]
        noisy_in = noisy.to(wdt)
        pred = unet(noisy_in, timesteps, cond.to(wdt), return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        snr = snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)
        if self.snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(snr, self.snr_gamma, self.prediction_type)
        stats = {"timestep": timesteps.float()}
        keep = None
        if self.hard_threshold is not None:
            with torch.no_grad():
                uncond = self._uncond_embedding(text_encoder).expand(bsz, -1, -1)
                # The unwrapped module: a second forward through a DDP wrapper would touch its reducer.
                pred_u = self.unwrap(unet)(noisy_in, timesteps, uncond, return_dict=False)[0]
                a_bar = self.alphas_cumprod[timesteps].float().view(bsz, 1, 1, 1)
                eps_c = epsilon_from_output(pred.detach().float(), noisy_in.float(), a_bar, self.prediction_type)
                eps_u = epsilon_from_output(pred_u.float(), noisy_in.float(), a_bar, self.prediction_type)
                norms = text_noise_norm(eps_c, eps_u)
                keep = hard_threshold_keep(norms, self.hard_threshold)
            stats["text_noise_norm"] = norms
        return LossTerms(per_sample=per_sample, keep=keep, stats=stats)


# ------------------------------------------------------------------------------------------ the run


# Settings that change no trained weight: validation images, the download cache and activation recomputation
# (gradient checkpointing recomputes the same forward, RNG state included).
FREE_SETTINGS = ("train", "validation_prompts", "validation_inference_steps", "validation_guidance_scale", "cache_dir",
                 "gradient_checkpointing")
# LR schedules whose value at a step does not depend on the run's length: with them a run may be extended.
LENGTH_FREE_SCHEDULERS = ("constant", "constant_with_warmup")


def run_settings(cfg: TextToImageConfig) -> dict:
    """The settings a run's weights depend on (``training_options.json``), bound to its output folder once it has
    a checkpoint; the run's length only with an LR schedule shaped by it."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in FREE_SETTINGS}
    settings.update(bound_train_settings(cfg.train))
    if cfg.train.lr_scheduler not in LENGTH_FREE_SCHEDULERS:
        settings.update(max_train_steps=cfg.train.max_train_steps, num_train_epochs=cfg.train.num_train_epochs)
    return settings


def check_optional_features(cfg: TextToImageConfig) -> None:
    """One-line TrainSetupError when an optional extra is requested but missing (no model is loaded)."""
    import importlib.util

    if cfg.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            raise TrainSetupError("--enable_xformers_memory_efficient_attention needs xformers "
                                  "(pip install 'diffmem[xformers]'); PyTorch SDPA attention is the default")
        if not torch.cuda.is_available():
            raise TrainSetupError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; "
                                  "PyTorch SDPA attention is the default")
    if cfg.train.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainSetupError("--use_8bit_adam needs bitsandbytes (pip install 'diffmem[bnb]')")
        if not torch.cuda.is_available():
            raise TrainSetupError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW)")
    if cfg.train.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise TrainSetupError(f"--report_to {cfg.train.report_to} needs wandb (pip install 'diffmem[wandb]')")


def _validation_images(cfg: TextToImageConfig, accelerator, parts: dict):
    def validate(step: int, models: dict):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=models.get("text_encoder", parts["text_encoder"]),
            tokenizer=parts["tokenizer"], unet=models["unet"],
            scheduler=DDIMScheduler.from_config(parts["scheduler"].config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.train.seed + i)
            with torch.no_grad(), accelerator.autocast():
                image = pipe(prompt, num_inference_steps=cfg.validation_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale, generator=generator).images[0]
            images.append((prompt, image))
        return images

    return validate


def _exporter(cfg: TextToImageConfig):
    def export(models: dict, output_dir: Path) -> None:

        # Reload the frozen parts from disk: the in-memory copies may have been cast to fp16/bf16.
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)
        trained = {}
        for name, module in models.items():
            # DeepSpeed fp16 keeps the module itself in fp16; the pipeline is saved in fp32 like the input.
            if any(p.dtype != torch.float32 for p in module.parameters()):
                module.float()
            trained[name] = module
        pipe.register_modules(**trained)
        if cfg.prediction_type is not None:
            # Inference must read the prediction type the UNet was trained for.
            pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
        pipe.save_pretrained(output_dir)

    return export


def train_text_to_image(cfg: TextToImageConfig):
    """Fine-tune cfg.pretrained_model_name_or_path; returns the TrainSummary. Data is read and every image
    checked before any model is loaded."""
    from diffusers import DDPMScheduler


    check_optional_features(cfg)
    # Before any data is read or model loaded: a refused resume writes nothing (one line, exit 2).
    with lock_run_folder(cfg.train.output_dir, "--out"):
        bind_training_settings(cfg.train, run_settings(cfg))
        local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
        records, report, hf = load_training_records(cfg, progress=local_main and cfg.train.show_progress)

        accelerator = make_accelerator(cfg.train)
        weight_dtype = weight_dtype_of(accelerator)
        if accelerator.is_main_process:
            Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(cfg.train.output_dir) / "data_report.json", report.to_dict())
        for note in report.warnings:
            accelerator.print(f"warning: {note}")

        pipe = load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if cfg.prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        del pipe

        def to_frozen(module):
            # dtype only when it changes: diffusers warns on every .to(dtype=...) of a VAE.
            module.requires_grad_(False).to(accelerator.device)
            if weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)

        to_frozen(vae)
        models = {"unet": unet}
        if cfg.train_text_encoder:
            text_encoder.requires_grad_(True).train()
            models["text_encoder"] = text_encoder
        else:
            to_frozen(text_encoder)
        unet.train()
        if cfg.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                text_encoder.gradient_checkpointing_enable()

        dataset = TextImageDataset(
            records,
            ImageTransformConfig(cfg.resolution, cfg.center_crop, cfg.random_flip),
            CaptionConfig(cfg.prompt_aug_style, cfg.repeat_num, cfg.caption_dropout),
            seed=cfg.train.seed, tokenizer=tokenizer, hf_dataset=hf, image_column=cfg.image_column,
        )
        loss_fn = TextToImageLoss(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=noise_scheduler,
            weight_dtype=weight_dtype, device=accelerator.device, unwrap=accelerator.unwrap_model,
            snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset, hard_threshold=cfg.hard_threshold,
            train_text_encoder=cfg.train_text_encoder,
        )
        parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": noise_scheduler}
        tracker_config = {k: v for k, v in asdict(cfg).items() if k != "train"}
        trainer = Trainer(
            accelerator, cfg.train, models, loss_fn, dataset, TextImageCollator(tokenizer),
            validate_fn=_validation_images(cfg, accelerator, parts) if cfg.validation_prompts else None,
            export_fn=_exporter(cfg), tracker_config=tracker_config,
            extra_state={"data": {"total": report.total, "mem_used": report.mem_used,
                                  "non_mem_used": report.non_mem_used}},
            drop_rule=None if cfg.hard_threshold is None else f"{threshold_flag()} {cfg.hard_threshold:g} "
                                                             f"(text-noise norm >= T)",
        )
        summary = trainer.train()
    check_samples_kept(summary, cfg)
    return summary


def threshold_flag() -> str:
    """The flag of Wen et al.'s thresholded loss, as the CLI spells it."""
    return option_flag(TextToImageConfig, "hard_threshold")


def check_samples_kept(summary, cfg: TextToImageConfig) -> None:
    """TrainSetupError (one line) when the thresholded loss dropped every sample of the whole run: the loss never
    gave the model a gradient. Raised after the run has finished, so its checkpoints and files stay as written."""
    if cfg.hard_threshold is None or not summary.samples_seen or summary.samples_kept:
        return
    norm = summary.final_logs.get("text_noise_norm")
    last = f", mean {norm:.3g} at the last step" if norm is not None else ""
    raise TrainSetupError(
        f"{threshold_flag()} {cfg.hard_threshold:g} dropped every one of the run's {summary.samples_seen} samples "
        f"(their text-noise norm >= T{last}): the model was never updated (weight decay aside); raise "
        f"{threshold_flag()} above the samples' norms (the files in {cfg.train.output_dir} are kept)")


__all__ = [
    "MixtureReport",
    "TextToImageConfig",
    "TextToImageLoss",
    "check_optional_features",
    "load_training_records",
    "train_text_to_image",
]
