"""The family room: everything that knows which text-to-image family a pipeline is.

- ``family``: the interface every family answers (encode, the unconditional branch, latents, the denoiser call, the
  metric space, scheduler steps, decoding) with Stable Diffusion 1/2's answers; ``sd``, ``sdxl``, ``sd3``, ``flux``,
  ``pixart``: one module per family; ``flow``: what the rectified-flow families (SD3, Flux) share.
- ``conditioning``: a batch's conditioning (sequence, pooled embedding, mask) as one batch-first object.
- ``loader``: loading a pipeline of any family from a Hub id or folder (``FAMILIES``, ``load_pipeline``).
- ``parts``: what the detectors, sampler and mitigations hold of a loaded pipeline (``DenoiserParts``).
- ``build``: Stable Diffusion 1-shaped pipelines built offline (tiny, the lab's, SD v1's size);
  ``tiny``: tiny pipelines of the other families (``diffmem build-tiny``, the tests).

No module of the arm outside this room asks which family it holds.
"""

from diffmem.common.t2i.pipelines.build import (
    ARCHS,
    BUILD_KEYS,
    SD_SCHEDULER_CONFIG,
    assemble_pipeline,
    build_components,
    build_pipeline,
    strip_build_paths,
)
from diffmem.common.t2i.pipelines.conditioning import Conditioning, as_conditioning, cat_conditionings
from diffmem.common.t2i.pipelines.family import EncodedPrompts, Family, FamilyError, TextSegment
from diffmem.common.t2i.pipelines.loader import (
    DTYPES,
    FAMILIES,
    FAMILY_LIMIT,
    ModelLoadError,
    check_pipeline_folder,
    family_class,
    family_of,
    hub_family,
    load_pipeline,
    model_family,
    parse_dtype,
)
from diffmem.common.t2i.pipelines.parts import DenoiserParts, denoiser_parts

__all__ = [
    "ARCHS", "BUILD_KEYS", "DTYPES", "FAMILIES", "FAMILY_LIMIT", "SD_SCHEDULER_CONFIG", "Conditioning",
    "DenoiserParts", "EncodedPrompts", "Family", "FamilyError", "ModelLoadError", "TextSegment", "as_conditioning",
    "assemble_pipeline", "build_components", "build_pipeline", "cat_conditionings", "check_pipeline_folder",
    "denoiser_parts", "family_class", "family_of", "hub_family", "load_pipeline", "model_family", "parse_dtype",
    "strip_build_paths",
]
