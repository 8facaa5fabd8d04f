"""The choice lists and model-dependent defaults of the text-to-image options, in a module without torch: a CLI's
``--help`` and its argument checks run before torch is imported, and the library modules that act on a choice
take it from here."""

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # common.t2i.models.DTYPES: the weights' dtype
SCHEDULERS = ("ddim", "pipeline")  # common.t2i.models.denoiser_parts: DDIM (Wen et al.) or the pipeline's own
LATENT_MODES = ("per_prompt", "shared")  # common.t2i.noise.initial_latents: seed gen_seed + row, or gen_seed
DETECTORS = ("wen", "anisotropy", "sharpness")  # common.t2i.detection.score_prompts
WRT_CHOICES = ("prompt_embeds", "token_embeds")  # common.t2i.explain: what token significance differentiates
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet predicts (common.t2i.noise.epsilon_from_output)
# (γ_N, γ_C) of Asthana & Belagiannis's code per prediction type: SD v1 (ε-prediction) and SD 2 (v-prediction).
ANISOTROPY_WEIGHTS = {"epsilon": (1.0, 2.0), "v_prediction": (1.0, 0.1)}
