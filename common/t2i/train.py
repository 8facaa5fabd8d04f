"""Text-to-image fine-tuning of a pipeline of any family (SD 1/2, SDXL, SD3, Flux, PixArt), with Wen et al.'s
thresholded-loss mitigation.

The model is loaded, its captions encoded, its unconditional branch and its denoiser called through the family room
(:mod:`common.t2i.pipelines`), so this module never asks which family it trains. The ε / v UNet and DiT families
(SD 1/2, SDXL, PixArt) train on the diffusers text-to-image example's loss (VAE latents, DDPM noising, ε or v
target, optional Min-SNR-γ and noise offset); the rectified-flow families (SD3, Flux) on flow matching as
diffusers' SD3/Flux examples do (σ drawn by a weighting scheme, x_σ = (1−σ)x₀ + σε, target v = ε − x₀, the
scheme's loss weight). With ``hard_threshold`` T, each sample's text-conditional difference in the family's metric
space (‖ε(x_t, c) − ε(x_t, ∅)‖₂, or ‖v_c − v_∅‖₂ for flow) is measured at its own noisy latent and timestep (the
unconditional output under no_grad) and samples at or above T get weight 0 (Wen et al. 2024, Sec. 5). Unlike the
reference script this is a mask, so a fully dropped batch gives an exact 0 loss that still runs backward on every
process, Min-SNR weights and timesteps keep their shapes, and the dropped fraction is logged every step. With
``lora_rank`` r only LoRA adapters on the denoiser's attention projections train; the output is merged.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.common.errors import ConfigError
from diffmem.common.results import write_json_atomic
from diffmem.common.runlock import lock_run_folder
from diffmem.common.seeding import (
    STREAM_NOISE,
    STREAM_NOISE_OFFSET,
    STREAM_TIMESTEP,
    STREAM_VAE,
    randint_per_sample,
    randn_per_sample,
    torch_generator,
)
from diffmem.common.settings import option_flag
from diffmem.common.t2i.finetune_settings import (
    FLOW_DENSITY_DEFAULTS,
    FLOW_FIELDS,
    RECORDED_WHEN_GIVEN,
    TextToImageConfig,
)
from diffmem.common.t2i.pipelines import (
    FAMILIES,
    Conditioning,
    DenoiserParts,
    Family,
    ModelLoadError,
    as_conditioning,
    assemble_pipeline,
    denoiser_parts,
    family_of,
    load_pipeline,
    model_family,
)
from diffmem.common.t2i.rectified_flow import flow_sample, flow_target
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
from diffmem.common.t2i.text_noise import text_noise_norm
from diffmem.common.training.builders import make_accelerator, weight_dtype_of
from diffmem.common.training.checkpoints import bind_training_settings, bound_train_settings
from diffmem.common.training.config import TrainSetupError
from diffmem.common.training.loop import LossTerms, Trainer
from diffmem.common.training.loss import hard_threshold_keep, min_snr_weight, snr_from_alphas_cumprod

FINETUNABLE = "the trainer fine-tunes " + ", ".join(f.label for f in FAMILIES.values() if f.finetunable) + " only"


@dataclass(frozen=True)
class FlowWeighting:
    """How flow matching draws σ and weights the loss: a scheme of diffusers' SD3/Flux examples and its density's
    parameters."""

    scheme: str = "none"
    logit_mean: float = FLOW_DENSITY_DEFAULTS["logit_mean"]
    logit_std: float = FLOW_DENSITY_DEFAULTS["logit_std"]
    mode_scale: float = FLOW_DENSITY_DEFAULTS["mode_scale"]


def flow_weighting(cfg: TextToImageConfig, family: type[Family] | Family) -> FlowWeighting:
    """cfg's weighting, the family's own default scheme (its diffusers example's) where none is given."""
    given = {name: getattr(cfg, name) for name in FLOW_DENSITY_DEFAULTS if getattr(cfg, name) is not None}
    return FlowWeighting(cfg.weighting_scheme or family.timestep_weighting, **given)


def family_setting_problem(cfg: TextToImageConfig, family: type[Family]) -> str | None:
    """Why a setting means nothing for this family's loss, in one line; None when every setting applies."""
    label = family.label
    if family.flow:
        if cfg.prediction_type is not None:
            return (f"--prediction_type {cfg.prediction_type}: {label} predicts the rectified-flow velocity "
                    f"v = eps - x0; epsilon / v_prediction is a choice of the UNet and DiT families")
        if cfg.snr_gamma is not None:
            return (f"--snr_gamma: Min-SNR-gamma weights the DDPM eps/v loss; {label} trains by flow matching "
                    f"(its loss weighting: --weighting_scheme)")
        scheme = flow_weighting(cfg, family).scheme
        for name, needs in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"), ("mode_scale", "mode")):
            if getattr(cfg, name) is not None and scheme != needs:
                return f"--{name} is a parameter of --weighting_scheme {needs}; this run uses {scheme}"
    else:
        given = [name for name in FLOW_FIELDS if getattr(cfg, name) is not None]
        if given:
            return (f"--{given[0]}: sigma sampling of flow matching (SD3, Flux); {label} trains on the DDPM "
                    f"eps/v loss")
    # The encoder trains on the batch's token ids through its own forward: a family whose conditioning is the one
    # text encoder's hidden states (the interface's own encode, Stable Diffusion 1/2's); the others' pipelines
    # encode with several encoders, pooled outputs and masks, under no_grad.
    if cfg.train_text_encoder and family.encode is not Family.encode:
        return (f"--train_text_encoder trains the one text encoder of a pipeline conditioned on its hidden states "
                f"alone (Stable Diffusion 1/2); {label}'s encoders stay frozen")
    return None


def check_family_settings(cfg: TextToImageConfig) -> None:
    """One line for a model of a family the trainer does not fine-tune, or a setting its loss does not take (the
    family read from its model_index.json before anything is written); a model that cannot be read is left to the
    loader's own line."""
    model = cfg.pretrained_model_name_or_path
    try:
        family = model_family(model, cfg.revision)
    except ModelLoadError:
        return
    if not family.finetunable:
        raise ModelLoadError(f"{model}: fine-tuning a {family.label} pipeline is not built yet; {FINETUNABLE}")
    problem = family_setting_problem(cfg, family)
    if problem is not None:
        raise ConfigError(problem)


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


def flow_timesteps(sample_seeds, scheduler, weighting: FlowWeighting) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [B], σ [B]) of flow matching: u from the scheme's density (Esser et al. 2024, Sec. 3.1: logit-normal
    or mode; uniform otherwise), one draw per sample from its own timestep stream (so resume stays exact), then entry
    ⌊u·N⌋ of the scheduler's training schedule, as diffusers' SD3/Flux examples index it."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = torch.cat([compute_density_for_timestep_sampling(
        weighting.scheme, 1, logit_mean=weighting.logit_mean, logit_std=weighting.logit_std,
        mode_scale=weighting.mode_scale, generator=torch_generator(int(s), STREAM_TIMESTEP)) for s in sample_seeds])
    n = scheduler.config.num_train_timesteps
    # mode's density reaches u = 1 at its edge, one past the last entry: that draw takes the last one.
    index = (u * n).long().clamp(0, len(scheduler.timesteps) - 1)
    return scheduler.timesteps[index], scheduler.sigmas[index]


def flow_loss_weight(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """w(σ) = σ⁻² (sigma_sqrt), 2/(π(1 − 2σ + 2σ²)) (cosmap), else 1 (Esser et al. 2024, Sec. 3.1; diffusers')."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigma).float()


def scaled_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scale: float,
                   shift: float = 0.0) -> torch.Tensor:
    """x₀ = ((μ + σ·ε) − shift)·scale, a VAE posterior sample in latent space (diffusers' SD3 example's (z − s)·k)."""
    return (mean.float() + std.float() * eps - shift) * scale


class _CalledThrough:
    """The denoiser as the family's predict sees it: called through the trainer's module (DDP's gradient hooks,
    Accelerate's autocast, a LoRA wrapper), every other attribute (config, parameters) read from the bare denoiser,
    which a DDP wrapper does not forward."""

    def __init__(self, call, denoiser: torch.nn.Module):
        self._call = call
        self._denoiser = denoiser

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._denoiser, name)


class TextToImageLoss:
    """batch -> LossTerms: per-sample (Min-SNR- or flow-weighted) MSE, Wen et al.'s keep mask and the text-noise norm.

    ``parts`` are the family's (:func:`common.t2i.pipelines.denoiser_parts`); ``denoiser`` names the trained module
    in the trainer's ``models``. Given Stable Diffusion 1/2's modules instead (vae, text_encoder, tokenizer), the
    loss assembles them into their pipeline's parts at its first call. Captions are encoded by the family (frozen
    encoders, no_grad); with ``train_text_encoder`` by the trained encoder from the batch's token ids.
    """

    def __init__(self, *, vae, noise_scheduler, weight_dtype: torch.dtype, device: torch.device, unwrap,
                 parts: DenoiserParts | None = None, denoiser: str = "unet", text_encoder=None, tokenizer=None,
                 snr_gamma: float | None = None, noise_offset: float = 0.0, hard_threshold: float | None = None,
                 train_text_encoder: bool = False, weighting: FlowWeighting | None = None):
        self.vae = vae
        self.text_encoder = text_encoder if text_encoder is not None or parts is None else parts.text_encoder
        self.tokenizer = tokenizer if tokenizer is not None or parts is None else parts.tokenizer
        self.parts = parts
        self.denoiser = denoiser
        self.scheduler = noise_scheduler
        self.weight_dtype = weight_dtype
        self.device = device
        self.unwrap = unwrap
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.hard_threshold = hard_threshold
        self.train_text_encoder = train_text_encoder
        self.weighting = weighting or FlowWeighting()
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.alphas_cumprod = None
        if getattr(noise_scheduler, "alphas_cumprod", None) is not None:  # DDPM's ᾱ_t; flow matching has σ instead
            self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        self._uncond_cache = None

    def _family_parts(self, models: dict) -> DenoiserParts:
        if self.parts is None:
            pipe = assemble_pipeline(dict(unet=self.unwrap(models[self.denoiser]), vae=self.vae,
                                          text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                          scheduler=copy.deepcopy(self.scheduler)))
            self.parts = denoiser_parts(pipe, scheduler="pipeline")
        return self.parts

    def _conditioning(self, batch: dict, text_encoder) -> Conditioning:
        if self.train_text_encoder:
            return Conditioning(text_encoder(batch["input_ids"], return_dict=False)[0])
        return self.parts.encode(batch["captions"]).embeds

    def _unconditional(self, text_encoder) -> Conditioning:
        # Frozen encoders give the same unconditional branch every step; a trained one must be re-run.
        if self.train_text_encoder or self._uncond_cache is None:
            with torch.no_grad():
                if self.train_text_encoder:
                    tok = self.tokenizer
                    ids = tok([""], max_length=tok.model_max_length, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids.to(self.device)
                    # The unwrapped module: a second forward through a DDP wrapper would touch its reducer.
                    return Conditioning(self.unwrap(text_encoder)(ids, return_dict=False)[0])
                self._uncond_cache = self.parts.unconditional()
        return self._uncond_cache

    def _metric(self, out: torch.Tensor, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The family's metric output (ε, or the velocity) per sample: each sample has its own timestep."""
        return self.parts.family.metric_output(out, x, timesteps, self.scheduler)

    def __call__(self, batch: dict, models: dict) -> LossTerms:
        parts = self._family_parts(models)
        flow = parts.family.flow
        text_encoder = models.get("text_encoder", self.text_encoder)
        seeds = batch["sample_seed"].tolist()
        dev = self.device
        with torch.no_grad():
            # The VAE's own dtype: an fp16 run keeps a force_upcast VAE (SDXL's) in fp32.
            dist = self.vae.encode(batch["pixel_values"].to(dev, next(self.vae.parameters()).dtype)).latent_dist
            eps_vae = randn_per_sample(seeds, tuple(dist.mean.shape[1:]), STREAM_VAE).to(dev)
            latents = scaled_latents(dist.mean, dist.std, eps_vae, self.vae.config.scaling_factor,
                                     getattr(self.vae.config, "shift_factor", None) or 0.0)
        bsz = latents.shape[0]
        noise = randn_per_sample(seeds, tuple(latents.shape[1:]), STREAM_NOISE).to(dev)
        if self.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant shift of the noise.
            offset = randn_per_sample(seeds, (latents.shape[1], 1, 1), STREAM_NOISE_OFFSET).to(dev)
            noise = noise + self.noise_offset * offset
        if flow:
            timesteps, sigmas = flow_timesteps(seeds, self.scheduler, self.weighting)
            timesteps, sigma = timesteps.to(dev), sigmas.to(dev, torch.float32).view(bsz, 1, 1, 1)
            noisy = flow_sample(latents, noise, sigma)
            target = flow_target(latents, noise)
        else:
            timesteps = randint_per_sample(seeds, self.num_train_timesteps, STREAM_TIMESTEP).to(dev)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            prediction_type = parts.family.prediction_type(self.scheduler)
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"unsupported prediction_type {prediction_type!r}")

        if self.train_text_encoder:
            cond = self._conditioning(batch, text_encoder)
        else:
            with torch.no_grad():
                cond = self._conditioning(batch, text_encoder)
        trained = replace(parts, unet=_CalledThrough(models[self.denoiser], parts.unet))
        pred = trained.predict(noisy, timesteps, cond)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        if flow:
            # w(σ) is one number per sample, so mean(w·(v̂ − v)²) = w·mean((v̂ − v)²), diffusers' examples' loss.
            per_sample = per_sample * flow_loss_weight(self.weighting.scheme, sigma).view(bsz)
        elif self.snr_gamma is not None:
            snr = snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)
            per_sample = per_sample * min_snr_weight(snr, self.snr_gamma, prediction_type)
        stats = {"timestep": timesteps.float()}
        keep = None
        if self.hard_threshold is not None:
            with torch.no_grad():
                uncond = as_conditioning(self._unconditional(text_encoder)).expand(bsz)
                # The unwrapped module: a second forward through a DDP wrapper would touch its reducer.
                bare = replace(parts, unet=_CalledThrough(self.unwrap(models[self.denoiser]), parts.unet))
                pred_u = bare.predict(noisy, timesteps, uncond)
                norms = text_noise_norm(self._metric(pred.detach().float(), noisy, timesteps),
                                        self._metric(pred_u.float(), noisy, timesteps))
                keep = hard_threshold_keep(norms, self.hard_threshold)
            stats["text_noise_norm"] = norms
        return LossTerms(per_sample=per_sample, keep=keep, stats=stats)


class LoraDenoiser(torch.nn.Module):
    """A denoiser with LoRA adapters (peft) on its attention projections, as the trainer's module: called as the
    denoiser, its state (what a checkpoint's ``model.pt`` holds) the adapters' weights alone, the base weights being
    the pipeline's; :meth:`merge_into` folds them into a base denoiser for the output pipeline."""

    TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA examples' targets
    ADAPTER = "default"

    def __init__(self, denoiser: torch.nn.Module, rank: int, component: str):
        super().__init__()
        self.denoiser = denoiser
        self.rank = rank
        self.component = component  # the pipeline attribute of the denoiser (unet, transformer)
        self._inject(denoiser)

    def config(self):
        from peft import LoraConfig

        # α = r (scale 1) and Gaussian A, zero B: the adapted model starts as the base model (diffusers' examples).
        return LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                          target_modules=list(self.TARGETS))

    def _inject(self, denoiser: torch.nn.Module) -> None:
        # peft's own injection: PixArt's transformer has no diffusers add_adapter (PeftAdapterMixin).
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.config(), denoiser, adapter_name=self.ADAPTER)

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser)
        if destination is None:
            return state
        # Called by a wrapper's (DDP's) own state_dict: the adapters under its prefix.
        destination.update({prefix + key: value for key, value in state.items()})
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The adapters' weights; a state of other adapters raises RuntimeError in torch's words (what the resume's
        one line quotes)."""
        from peft.utils import set_peft_model_state_dict

        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
        if missing or unexpected:
            which, key = ("Missing", missing[0]) if missing else ("Unexpected", unexpected[0])
            raise RuntimeError(f'Error(s) in loading state_dict for LoRA adapters:\n\t{which} key(s) in state_dict: '
                               f'"{key}".')
        for key, value in own.items():
            if value.shape != state_dict[key].shape:
                raise RuntimeError(f"Error(s) in loading state_dict for LoRA adapters:\n\tsize mismatch for {key}: "
                                   f"copying a param with shape {state_dict[key].shape} from checkpoint, the shape "
                                   f"in current model is {value.shape}.")
        return set_peft_model_state_dict(self.denoiser, state_dict, adapter_name=self.ADAPTER)

    def merge_into(self, denoiser: torch.nn.Module) -> None:
        """W ← W + (α/r)·B·A in every adapted projection of ``denoiser`` (the base weights, fp32), which is left
        without adapters: a plain model of its class."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import set_peft_model_state_dict

        self._inject(denoiser)
        set_peft_model_state_dict(denoiser, {k: v.detach().float() for k, v in self.state_dict().items()},
                                  adapter_name=self.ADAPTER)
        for module in denoiser.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(denoiser)  # each adapted layer back to its (merged) base layer
        if hasattr(denoiser, "peft_config"):
            del denoiser.peft_config  # the injection's record of the adapters, gone with them


def collate_captions(items: list[dict]) -> dict:
    """A batch with its captions as text (TextImageCollator's, without token ids): the family encodes them with its
    own tokenizers and lengths."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]).contiguous().float(),
        "captions": [it["caption"] for it in items],
        "sample_seed": torch.tensor([it["sample_seed"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "memorized": torch.tensor([it["memorized"] for it in items], dtype=torch.bool),
    }


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
    defaults = {f.name: f.default for f in fields(TextToImageConfig)}
    settings = {k: v for k, v in asdict(cfg).items() if k not in FREE_SETTINGS
                and not (k in RECORDED_WHEN_GIVEN and v == defaults[k])}
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


def _validation_images(cfg: TextToImageConfig, accelerator, pipe, parts: DenoiserParts):
    # The family's sampling scheduler (DDIM for the ε/v families, as detection samples; the flow families' own), a
    # copy: the loss's noise schedule is another object, and sampling sets a scheduler's timesteps.
    scheduler = copy.deepcopy(parts.scheduler)
    if cfg.prediction_type is not None:
        scheduler.register_to_config(prediction_type=cfg.prediction_type)
    pipe.register_modules(scheduler=scheduler)

    def validate(step: int, models: dict):
        # The trained modules are the pipeline's own (a LoRA wrapper holds the pipeline's denoiser); registering
        # them again covers a trainer that hands back other objects.
        pipe.register_modules(**{name: m for name, m in models.items() if not isinstance(m, LoraDenoiser)})
        images = []
        for i, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.train.seed + i)
            with torch.no_grad(), accelerator.autocast():
                image = pipe(prompt, num_inference_steps=cfg.validation_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale, generator=generator,
                             **parts.family.pipeline_kwargs()).images[0]
            images.append((prompt, image))
        return images

    return validate


def _exporter(cfg: TextToImageConfig):
    def export(models: dict, output_dir: Path) -> None:
        # Reload the frozen parts from disk: the in-memory copies may have been cast to fp16/bf16 (a LoRA run's
        # base denoiser too: its adapters are merged into the fp32 weights read back here).
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)
        trained = {}
        for name, module in models.items():
            if isinstance(module, LoraDenoiser):
                module.merge_into(getattr(pipe, module.component))
                continue
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


def training_parts(pipe, resolution: int) -> DenoiserParts:
    """The family's parts at the training resolution; one line when the family cannot take that image side."""
    family = family_of(pipe)(pipe)
    multiple = family.size_multiple()
    if resolution % multiple:
        raise TrainSetupError(f"--resolution {resolution}: a {family.label} image side must be a multiple of "
                              f"{multiple}")
    return denoiser_parts(pipe, height=resolution, width=resolution)


def train_text_to_image(cfg: TextToImageConfig):
    """Fine-tune cfg.pretrained_model_name_or_path; returns the TrainSummary. Data is read and every image
    checked before any model is loaded."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

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
        parts = training_parts(pipe, cfg.resolution)
        family, denoiser = parts.family, parts.unet
        # The pipeline attribute of the denoiser (unet, transformer): the name it is checkpointed and exported under.
        name = next(n for n, m in pipe.components.items() if m is denoiser)
        if family.flow:
            # A fresh schedule of training σ's (the examples' noise_scheduler_copy): sampling never touches it.
            noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        else:
            noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            if cfg.prediction_type is not None:
                noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)

        def to_frozen(module):
            # dtype only when it changes: diffusers warns on every .to(dtype=...) of a VAE.
            module.requires_grad_(False).to(accelerator.device)
            # An fp16 run keeps a VAE that overflows in fp16 (force_upcast: SDXL's) in fp32, as its pipeline does.
            upcast = weight_dtype == torch.float16 and getattr(getattr(module, "config", None), "force_upcast", False)
            if weight_dtype != torch.float32 and not upcast:
                module.to(dtype=weight_dtype)

        text_encoder = pipe.text_encoder
        trained_names = {name, "text_encoder"} if cfg.train_text_encoder else {name}
        for module_name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and module_name not in trained_names:
                to_frozen(module)
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:
            denoiser.enable_xformers_memory_efficient_attention()
        if cfg.lora_rank:
            # The base weights frozen in the weight dtype, the adapters trained in fp32 (diffusers' LoRA examples).
            from diffusers.training_utils import cast_training_params

            to_frozen(denoiser)
            model = LoraDenoiser(denoiser, cfg.lora_rank, name)
            cast_training_params(denoiser, dtype=torch.float32)
            models = {f"{name}_lora": model}
        else:
            models = {name: denoiser}
        denoiser.train()
        if cfg.train_text_encoder:
            text_encoder.requires_grad_(True).train()
            models["text_encoder"] = text_encoder
            if cfg.gradient_checkpointing:
                text_encoder.gradient_checkpointing_enable()

        dataset = TextImageDataset(
            records,
            ImageTransformConfig(cfg.resolution, cfg.center_crop, cfg.random_flip),
            CaptionConfig(cfg.prompt_aug_style, cfg.repeat_num, cfg.caption_dropout),
            seed=cfg.train.seed, tokenizer=pipe.tokenizer, hf_dataset=hf, image_column=cfg.image_column,
        )
        loss_fn = TextToImageLoss(
            vae=pipe.vae, noise_scheduler=noise_scheduler, parts=parts, denoiser=next(iter(models)),
            weight_dtype=weight_dtype, device=accelerator.device, unwrap=accelerator.unwrap_model,
            snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset, hard_threshold=cfg.hard_threshold,
            train_text_encoder=cfg.train_text_encoder,
            weighting=flow_weighting(cfg, family) if family.flow else None,
        )
        tracker_config = {k: v for k, v in asdict(cfg).items() if k != "train"}
        trainer = Trainer(
            accelerator, cfg.train, models, loss_fn, dataset,
            # Token ids only for the trained encoder: the family encodes captions with its own tokenizers.
            TextImageCollator(pipe.tokenizer) if cfg.train_text_encoder else collate_captions,
            validate_fn=_validation_images(cfg, accelerator, pipe, parts) if cfg.validation_prompts else None,
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
    "FlowWeighting",
    "LoraDenoiser",
    "MixtureReport",
    "TextToImageConfig",
    "TextToImageLoss",
    "check_family_settings",
    "check_optional_features",
    "flow_timesteps",
    "load_training_records",
    "train_text_to_image",
]
