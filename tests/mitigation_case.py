"""The tiny mitigation case the method tests share: two prompts (one of Webster's memorized captions), their dataset
rows (which seed the latents), G generations, a few steps and the guidance scale, and the settings of a method."""

from __future__ import annotations

PROMPTS = ["The No Limits Business Woman Podcast", "a photo of a cat"]
ROWS = [3, 7]
G = 2
STEPS = 3
W = 7.5


def method_settings(method: str, steps: int = STEPS, **kw):
    """MitigationSettings of ``method`` on the shared case (gen_seed 11)."""
    from diffmem.common.t2i.mitigation.options import MitigationSettings

    return MitigationSettings(method=method, num_images_per_prompt=G, num_inference_steps=steps, guidance_scale=W,
                              gen_seed=11, **kw)
