"""``--method broken``: Broken Memories' adaptive mitigation (Huang et al., KDD 2026, arXiv 2605.22050).

Each sampler step is checked against the calibrated stability region as it is taken; where a flagged trajectory
leaves it, x̂₀ is rescaled to its calibrated norm and fed back into the proposal and the update and latent norms are
clamped (:func:`common.t2i.broken_memories.mitigated_proposal`). The prompt, the guidance and x_T stay as they are,
and no UNet evaluation is added: x̂₀ comes from the step's own guided prediction.
"""

from __future__ import annotations

from functools import partial

from diffmem.common.errors import ConfigError
from diffmem.common.t2i.broken_memories import KINDS, StabilityMonitor, StabilityRegion
from diffmem.common.t2i.sampler import sample_latents
from diffmem.common.t2i.stability_calibration import check_calibration, read_calibration

CALIBRATION_FLAG = "--broken_calibration"


def broken_setup(batch) -> None:
    """Sample through a :class:`StabilityMonitor` that mitigates with the run's calibration and thresholds."""
    s, parts = batch.settings, batch.parts
    record = read_calibration(s.broken_calibration, CALIBRATION_FLAG)
    sampling = {"num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
                "scheduler": s.scheduler or parts.family.default_scheduler, "height": s.height, "width": s.width}
    check_calibration(record, sampling, s.broken_calibration, CALIBRATION_FLAG)
    try:
        monitor = StabilityMonitor(parts, s.num_inference_steps, batch.B * batch.G,
                                            StabilityRegion.from_record(record), mitigate=True,
                                            tau_mild=s.broken_tau_mild, tau_strong=s.broken_tau_strong,
                                            gamma=s.broken_gamma, mild_steps=s.broken_mild_steps)
    except ValueError as e:  # a sampler whose x̂₀ is not defined here
        raise ConfigError(f"--method broken: {e}") from None
    batch.sampler = partial(sample_latents, correction=monitor)


def broken_finish(batch) -> None:
    """Per row: each generation's flag (mild / strong / none), its first flagged step and the mitigated steps."""
    monitor = batch.sampler.keywords["correction"]
    kind = monitor.kind.view(batch.B, batch.G)
    first = monitor.first.view(batch.B, batch.G)
    active = monitor.active_steps.view(batch.B, batch.G)
    for b in range(batch.B):
        batch.details[b].update(broken_flag=[KINDS[k] for k in kind[b].tolist()],
                                broken_first_step=[int(v) if v >= 0 else None for v in first[b].tolist()],
                                broken_mitigated_steps=active[b].tolist())
