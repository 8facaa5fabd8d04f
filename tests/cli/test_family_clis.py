"""Every text-to-image CLI end to end on every family (tiny SD 1/2, SDXL, SD3, Flux and PixArt-Σ pipelines), through
the real entry points in process; what a family does not define is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAMILY_SIZE
from conftest import call_main as _run
from conftest import read_jsonl as _rows
from PIL import Image
from sscd_standins import TinyDescriptor

from diffmem.common.t2i.pipelines.tiny import TINY_FAMILIES
from diffmem.detect import detect_mem, explain_tokens
from diffmem.mitigate import inference_mem, tradeoff

GEN = ["--num_images_per_prompt", "2", "--num_inference_steps", "3", "--seed", "1"]
PROMPTS = ["a photo of a cat", "a red house near a tree"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-data")
    (folder / "p.jsonl").write_text("".join(json.dumps({"caption": p, "label": i}) + "\n"
                                            for i, p in enumerate(PROMPTS)))
    torch.jit.script(TinyDescriptor()).save(str(folder / "sscd.pt"))
    (folder / "gt_images" / "0").mkdir(parents=True)  # row 0's ground truth: any 16 x 16 picture
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(folder / "gt_images" / "0" / "0.png")
    return folder




@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detect_explain_mitigate_and_tradeoff_on_each_family(family_dirs, data, tmp_path, capsys, family):
    model, size = family_dirs[family], FAMILY_SIZE.get(family, ())
    guidance = ("--guidance_scale", "1") if family == "flux" else ()  # the tiny Flux is schnell-like: no guidance
    code, err = _run(detect_mem.main, ["--model", model, "--data", data / "p.jsonl", "--out", tmp_path, "--run_name",
                                       "det", "--target_steps", "0-1", *GEN, *size, *guidance], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "det.jsonl")
    assert [r["row"] for r in rows] == [0, 1] and all(r["score"] > 0 for r in rows)
    assert all(len(r["text_noise_norm"][0]) == 2 for r in rows)  # two scored steps per generation
    if family in ("flux", "sdxl"):  # the JVP through a transformer with packed latents, and through added embeds
        code, err = _run(detect_mem.main, ["--model", model, "--data", data / "p.jsonl", "--out", tmp_path,
                                           "--run_name", "sharp", "--detector", "sharpness", *GEN, *size], capsys)
        assert code == 0, err

    code, err = _run(explain_tokens.main, ["--model", model, "--data", data / "p.jsonl", "--out", tmp_path / "exp",
                                           *GEN, *size, *guidance], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "exp" / "tokens.jsonl")
    encoders = [rows[0]["encoder"]] + [o["encoder"] for o in rows[0].get("other_encoders", [])]
    expected = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "pixart": ["text_encoder"],
                "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"],
                "flux": ["text_encoder_2", "text_encoder"]}[family]
    assert encoders == expected
    assert "cat" in "".join(rows[0]["tokens"]) and (tmp_path / "exp" / "heatmap.html").is_file()
    assert len(list((tmp_path / "exp" / "bars").glob("row000000*.png"))) == len(expected)

    common = ["--model", model, "--data", data / "p.jsonl", *GEN, *size, *guidance, "--sscd_model", data / "sscd.pt",
              "--skip_clip"]
    # Every method on every family is the library's test (tests/t2i/test_family_methods.py); here the CLI's path.
    for method in {"sd3": ("none", "ours"), "pixart": ("none", "ours"), "sdxl": ("none", "gni")}.get(family,
                                                                                                   ("none",)):
        extra = ["--optim_iters", "1"] if method == "ours" else []
        code, err = _run(inference_mem.main, [*common, "--out", tmp_path / method, "--method", method, *extra], capsys)
        assert code == 0, (method, err)
        rows = _rows(tmp_path / method / "results.jsonl")
        assert [r["row"] for r in rows] == [0, 1] and all((tmp_path / method / r["image"]).is_file() for r in rows)
    if family != "sd3":  # one family's sweep: tradeoff.py runs inference_mem's harness per point
        return
    code, err = _run(tradeoff.main, ["--model", model, "--data", data / "p.jsonl", *GEN, *size, *guidance,
                                     "--sscd_model", data / "sscd.pt", "--reference_model", "ViT-S-32",
                                     "--reference_model_pretrain", "none", "--out", tmp_path / "sweep", "--end", "1",
                                     "--methods", "gni:gni_scale=0.1"], capsys)
    assert code == 0, err
    points = json.loads((tmp_path / "sweep" / "tradeoff.json").read_text())["points"]
    assert [p["label"] for p in points] == ["gni_scale0.1"]


REFUSALS = [
    ("sd3", inference_mem.main, ["--method", "ren_attn"],
     "--method ren_attn needs a UNet whose cross-attention layers attend to CLIP tokens; SD3/SD3.5 has none"),
    ("pixart", inference_mem.main, ["--method", "ours", "--be_mask"],
     "--be_mask needs a UNet whose cross-attention layers attend to CLIP tokens; PixArt-α/Σ has none"),
    ("flux", inference_mem.main, ["--method", "ours", "--freeze_padding", "--guidance_scale", "1"],
     "--freeze_padding needs CLIP's BOS, end and padding tokens in its conditioning; Flux.1 has none"),
    ("flux", inference_mem.main, ["--method", "none"],
     "Flux.1-schnell is distilled to sample without guidance: pass --guidance_scale 1"),
    ("flux", inference_mem.main, ["--method", "jain_stp", "--guidance_scale", "1"],
     "--method jain_stp rescales classifier-free guidance: at --guidance_scale 1 there is none"),
    ("sd3", detect_mem.main, ["--scheduler", "ddim"],
     "--scheduler ddim: not defined for SD3/SD3.5 (it takes pipeline)"),
    ("flux", detect_mem.main, ["--detector", "anisotropy"],
     "the anisotropy detector's weights are published for epsilon and v_prediction models only, not for Flux.1 "
     "(flow): pass --anisotropy_weights"),
    ("sdxl", explain_tokens.main, ["--wrt", "token_embeds"],
     "--wrt token_embeds differentiates through one text encoder; SDXL has 2: use --wrt prompt_embeds"),
]


@pytest.mark.parametrize("family,main,extra,message", REFUSALS, ids=[f"{r[0]}-{r[2][1]}" for r in REFUSALS])
def test_what_a_family_does_not_define_is_one_line(family_dirs, data, tmp_path, capsys, family, main, extra, message):
    args = ["--model", family_dirs[family], "--data", data / "p.jsonl", *GEN, *FAMILY_SIZE.get(family, ())]
    if main is detect_mem.main:
        args += ["--out", tmp_path, "--run_name", "r"]
    elif main is explain_tokens.main:
        args += ["--out", tmp_path / "exp"]
    else:
        args += ["--out", tmp_path / "mit", "--sscd_model", data / "sscd.pt", "--skip_clip"]
    code, err = _run(main, args + extra, capsys)
    assert code == 2 and len(err) == 1 and err[0].endswith(message), err
    assert not (tmp_path / "mit" / "results.jsonl").exists() and not (tmp_path / "r.jsonl").exists()

