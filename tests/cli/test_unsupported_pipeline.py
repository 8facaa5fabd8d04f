"""A pipeline folder of a family the text-to-image arm does not speak (issue 31): one line naming the pipeline class
and the families it speaks, exit 2, before any weights are read and with no results written, through a real entry
point."""

from __future__ import annotations

import json

import pytest

from diffmem.detect import detect_mem


@pytest.mark.parametrize("class_name", ["KandinskyPipeline", "TextToVideoSDPipeline"])
def test_detect_refuses_a_pipeline_of_another_family_in_one_line(tmp_path, capsys, class_name):
    model = tmp_path / "model"
    model.mkdir()
    # model_index.json as diffusers writes it; the part folders it names hold nothing (never loaded).
    (model / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "X"]}))
    (model / "unet").mkdir()
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"caption": "a photo", "index": 0}) + "\n")
    code = detect_mem.main(["--model", str(model), "--data", str(data), "--run_name", "r", "--out",
                            str(tmp_path / "out"), "--num_images_per_prompt", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{model}: a {class_name} pipeline; the text-to-image arm speaks Stable Diffusion" in err
    assert "StableDiffusionXLPipeline" in err and "FluxPipeline" in err and "PixArtSigmaPipeline" in err
    # The family is read from model_index.json before the run folder is made: nothing is written.
    assert not (tmp_path / "out").exists()
