"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): the family the arm was written for; its answers are the
interface's own (:class:`common.t2i.pipelines.family.Family`)."""

from __future__ import annotations

from diffmem.common.t2i.pipelines.family import Family


class SDFamily(Family):
    key = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    finetunable = True
