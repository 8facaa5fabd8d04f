"""What every text-to-image family answers, and Stable Diffusion 1/2's answers (the ε / v-prediction CLIP UNet).

A family wraps its loaded diffusers pipeline and tells the arm how to encode prompts and the unconditional branch,
the shape of its latents, how to call its denoiser, what the output means (ε, v or a flow velocity), how to step its
scheduler and how to decode. The detectors, the sampler, the explanation and the mitigations call these and never
ask which family they hold; the only family tests of the arm are in this room.

The metric space: Wen et al.'s text-conditional difference is taken between ε predictions for the ε / v UNet
families and between velocities for the rectified-flow families (:mod:`.flow`), where the ε difference is
identically zero at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.t2i.pipelines.conditioning import Conditioning
from diffmem.common.t2i.text_noise import epsilon_from_output, score_from_epsilon


class FamilyError(DiffmemError, ValueError):
    """A setting or a method that a family does not define; the message is one line meant for the user."""


@dataclass
class EncodedPrompts:
    """A batch's conditioning and whether each prompt was cut at one of its tokenizers' lengths."""

    embeds: Conditioning
    truncated: list[bool]


@dataclass(frozen=True)
class TextSegment:
    """Where one encoder's tokens sit in ``Conditioning.embeds`` (rows, and the columns its features fill), or, for
    a pooled encoder, ``pooled`` (rows None): what token significance reports per encoder."""

    encoder: str  # the pipeline attribute of the encoder, e.g. text_encoder_2
    tokenizer: str  # the pipeline attribute of its tokenizer
    rows: tuple[int, int] | None  # [start, stop) in embeds' sequence axis; None: the pooled embedding
    cols: tuple[int, int] | None = None  # [start, stop) in embeds' feature axis; None: all


def _truncated(tokenizer, prompts: list[str], max_length: int) -> list[bool]:
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    return [n > max_length for n in lengths]


def alpha_bar(scheduler, t, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t of the scheduler's schedule: a scalar for one timestep, [N, 1, …] broadcasting over ``like`` for N."""
    t = torch.as_tensor(t)
    a = scheduler.alphas_cumprod[t.long().cpu()].float()
    return a if a.dim() == 0 else a.view(-1, *([1] * (like.dim() - 1))).to(like.device)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [0, 1], fp32 on CPU, [..., 3, H, W], from latents [..., C, h, w]: z / scaling_factor + shift_factor
    through the VAE's decoder (SD 1/2, SDXL and PixArt have no shift; SD3's and Flux's VAEs do)."""
    lead = latents.shape[:-3]
    flat = latents.reshape(-1, *latents.shape[-3:])
    vae_dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    if vae_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16; its pipeline decodes in fp32 the same way.
        vae, vae_dtype = vae.float(), torch.float32
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for chunk in flat.split(batch_size):
        z = (chunk / vae.config.scaling_factor + shift).to(device=device, dtype=vae_dtype)
        img = vae.decode(z, return_dict=False)[0]
        out.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
    images = torch.cat(out)
    return images.view(*lead, *images.shape[1:])


class Family:
    """Stable Diffusion 1.x/2.x: one CLIP encoder, a UNet predicting ε or v, DDIM by default (Wen et al.)."""

    key = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    flow = False  # the velocity metric of rectified flow (SD3, Flux), else the ε metric
    default_scheduler = "ddim"
    schedulers = ("ddim", "pipeline")
    # ren_attn, Chen et al.'s bright-ending mask and the padding freeze act on a CLIP UNet's cross-attention.
    cross_attention_unet = True
    clip_padding = True  # the conditioning's padding positions are CLIP's end tokens (Ren et al., the freeze)
    # Whether the unconditional branch was trained (classifier-free guidance means what it says).
    trained_unconditional = True
    finetunable = True  # common/t2i/train.py trains every family (the ε/v DDPM loss, or flow matching)

    def __init__(self, pipe, height: int | None = None, width: int | None = None):
        self.pipe = pipe
        factor = pipe.vae_scale_factor
        size = self.default_sample_size()
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.height = height or size[0] * factor
        self.width = width or size[1] * factor
        for name, value in (("height", self.height), ("width", self.width)):
            if value % self.size_multiple():
                raise FamilyError(f"--{name} {value}: a {self.label} image side must be a multiple of "
                                  f"{self.size_multiple()}")

    # -- the model ------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def default_sample_size(self):
        return self.denoiser.config.sample_size

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, h, w] of one latent, unpacked, at the run's resolution."""
        factor = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, self.height // factor, self.width // factor)

    def prediction_type(self, scheduler) -> str:
        return scheduler.config.get("prediction_type", "epsilon")

    # -- text -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, parts, prompts: list[str]) -> EncodedPrompts:
        """The text encoder's last hidden state of the padded, truncated ids (``StableDiffusionPipeline``'s)."""
        tok, te = parts.tokenizer, parts.text_encoder
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        device = next(te.parameters()).device
        mask = ids.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
        embeds = te(ids.input_ids.to(device), attention_mask=mask)[0]
        return EncodedPrompts(Conditioning(embeds), _truncated(tok, prompts, tok.model_max_length))

    def unconditional(self, parts) -> Conditioning:
        """The unconditional branch the family's pipeline uses with no negative prompt: encode("") here."""
        return self.encode(parts, [""]).embeds

    def text_segments(self) -> list[TextSegment]:
        """Each encoder's place in the conditioning (token significance reports them one by one)."""
        return [TextSegment("text_encoder", "tokenizer", (0, self.pipe.tokenizer.model_max_length))]

    def segment_ids(self, segment: TextSegment, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) [B, L] of a segment's tokenizer, padded as the family encodes them."""
        tok = getattr(self.pipe, segment.tokenizer)
        length = segment.rows[1] - segment.rows[0]
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    # -- the denoiser ---------------------------------------------------------------------------------------
    def predict(self, parts, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output (fp32) for latents x [N, C, h, w] (already scaled) at timestep t."""
        return parts.unet(x.to(parts.dtype), t, encoder_hidden_states=cond.embeds,
                             return_dict=False)[0].float()

    def set_timesteps(self, scheduler, num_inference_steps: int) -> None:
        scheduler.set_timesteps(num_inference_steps, device=self.device)

    def scale_model_input(self, scheduler, x: torch.Tensor, t) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)

    def metric_output(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler) -> torch.Tensor:
        """The quantity whose conditional − unconditional difference the detectors measure: ε here. t is one
        timestep or one per sample (training draws each sample's own)."""
        return epsilon_from_output(out, x_in, alpha_bar(scheduler, t, out), self.prediction_type(scheduler))

    def sharpness_field(self, out: torch.Tensor, x_in: torch.Tensor, t, scheduler) -> torch.Tensor:
        """The vector field whose Jacobian Jeon et al.'s sharpness differentiates: the score −ε/√(1−ᾱ_t) here."""
        return score_from_epsilon(self.metric_output(out, x_in, t, scheduler), alpha_bar(scheduler, t, out))

    def clean_estimate(self, out: torch.Tensor, x: torch.Tensor, t, scheduler) -> torch.Tensor:
        """x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, the clean sample a DDIM step moves towards (Song et al. 2021, Eq. 12)."""
        a = alpha_bar(scheduler, t, out)
        return (x.float() - (1 - a).sqrt() * self.metric_output(out, x, t, scheduler)) / a.sqrt()

    def clean_weight(self, scheduler, step: int) -> float:
        """The weight of x̂₀ in the sample after sampler step ``step``: √ᾱ of DDIM's previous timestep (its final
        ᾱ after the last step), x_{t−1} = √ᾱ_{t−1}·x̂₀ + √(1−ᾱ_{t−1})·ε (Song et al. 2021, Eq. 12 with η = 0)."""
        prev = int(scheduler.timesteps[step]) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        return float(a) ** 0.5

    def clean_estimate_problem(self, scheduler) -> str | None:
        """Why x̂₀ and its weight above do not describe this run's sampler, or None: they are DDIM's."""
        if type(scheduler).__name__ != "DDIMScheduler":
            return f"{self.label}: x̂₀ is defined here for --scheduler ddim only, not {type(scheduler).__name__}"
        return None

    # -- images ---------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images in [0, 1], fp32 on CPU, [..., 3, H, W], from unpacked latents [..., C, h, w]."""
        return decode_latents(self.pipe.vae, latents, batch_size)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] in the form the family's pipeline takes as ``latents=`` (packed for Flux)."""
        return latents

    def pipeline_kwargs(self) -> dict:
        """What the family's pipeline call needs so that it runs our protocol (resolution, caption handling)."""
        return dict(height=self.height, width=self.width)

    # -- what is defined --------------------------------------------------------------------------------------
    @classmethod
    def check_scheduler(cls, scheduler: str) -> None:
        """One line where the family does not define ``--scheduler`` (a class method: detect_mem asks before it
        loads the model)."""
        if scheduler not in cls.schedulers:
            raise FamilyError(f"--scheduler {scheduler}: not defined for {cls.label} (it takes "
                              f"{' or '.join(cls.schedulers)})")

    def guidance_problem(self, guidance_scale: float) -> str | None:
        """Why classifier-free guidance at this scale means nothing for this model, or None (it does here)."""
        return None if self.trained_unconditional else f"{self.label} has no trained unconditional branch"
