"""A pipeline of a family the text-to-image arm does not run yet (SDXL, SD3, Flux, PixArt) is one line naming the
family, from every CLI that loads one, instead of a traceback inside the UNet (or a misleading "no unet/")."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import run_cli

from diffmem.common.t2i.pipeline import OTHER_FAMILIES, ModelLoadError, check_pipeline_folder, other_family


def test_other_family_by_class_and_by_unet():
    assert other_family("StableDiffusionPipeline") is None
    assert other_family("FluxPipeline") == "FluxPipeline (Flux)"
    assert other_family(None, SimpleNamespace(addition_embed_type=None)) is None
    assert "SDXL-style" in other_family(None, SimpleNamespace(addition_embed_type="text_time"))


@pytest.mark.parametrize("class_name", sorted(OTHER_FAMILIES))
def test_a_folder_of_another_family_is_refused_before_loading(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ModelLoadError, match=f"a {class_name} .*Stable Diffusion 1.x/2.x pipelines"):
        check_pipeline_folder(tmp_path, str(tmp_path))


def test_detect_mem_on_an_sdxl_folder_is_one_line(tmp_path):
    model = tmp_path / "sdxl"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    data = tmp_path / "p.jsonl"
    data.write_text('{"caption": "a cat"}\n')
    res = run_cli("detect/detect_mem.py", "--model", model, "--data", data, "--run_name", "r", "--out", tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"detect_mem: error: {model}: a StableDiffusionXLPipeline (SDXL) pipeline; the text-to-image arm detects, "
        f"explains, mitigates and fine-tunes Stable Diffusion 1.x/2.x pipelines (StableDiffusionPipeline: one CLIP "
        f"encoder, a UNet) only"], res.stderr
