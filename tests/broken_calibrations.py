"""A Broken Memories calibration for any loaded model, for the tests that run every --method (broken reads one)."""

from __future__ import annotations

from pathlib import Path

from diffmem.common.t2i.broken_memories import calibrate
from diffmem.common.t2i.detection import score_prompts
from diffmem.common.t2i.stability_calibration import calibration_record, write_calibration


def write_broken_calibration(parts, path: Path, num_inference_steps: int, guidance_scale: float) -> str:
    """Calibrate on two prompts × two generations at these settings (the family's default scheduler); the path."""
    terms, _ = score_prompts(parts, ["a dog", "a tree at noon"], [20, 21], num_images_per_prompt=2,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, detector="broken")
    mean, std = calibrate({k: v.flatten(0, 1) for k, v in terms.norms.items()})
    settings = {"scheduler": parts.family.default_scheduler, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale}
    write_calibration(path, calibration_record(settings, {k: v.tolist() for k, v in mean.items()},
                                               {k: v.tolist() for k, v in std.items()}, 4, 2, ""))
    return str(path)
