"""A pipeline of a family the text-to-image arm does not run yet (SDXL, SD3, Flux, PixArt) is one line naming the
family, from every CLI that loads one, instead of a traceback inside the UNet (or a misleading "no unet/"); the tiny
pipelines of those families (tests/family_pipelines.py) build offline, load back as their own class and generate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import run_cli
from diffusers import DiffusionPipeline
from family_pipelines import FAMILIES, FAMILY_CLASSES, build_family_pipeline

from diffmem.common.t2i.pipeline import (
    OTHER_FAMILIES,
    ModelLoadError,
    check_pipeline_folder,
    load_pipeline,
    other_family,
)


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


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_pipeline(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_family_pipeline_loads_as_its_class_and_generates(family_dirs, family):
    folder = family_dirs[family]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == FAMILY_CLASSES[family]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == FAMILY_CLASSES[family]
    extra = {"sdxl": {}, "sd3": {}, "flux": {"max_sequence_length": 16},
             "pixart": {"use_resolution_binning": False, "max_sequence_length": 16, "clean_caption": False}}[family]
    images = pipe("a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="np", **extra).images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loader_refuses_each_real_family_pipeline_in_one_line(family_dirs, family):
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(family_dirs[family]))
    assert f"a {FAMILY_CLASSES[family]} (" in str(err.value) and "\n" not in str(err.value)


def test_an_sdxl_unet_given_as_unet_id_is_refused_after_loading(tiny_pipeline_dir, family_dirs):
    with pytest.raises(ModelLoadError, match="a UNet with added text_time embeddings .SDXL-style.; the text-to-image"):
        load_pipeline(str(tiny_pipeline_dir), unet_id=str(family_dirs["sdxl"]))
