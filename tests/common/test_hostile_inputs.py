"""Hostile text and model folders are refused on one line before any work: a lone surrogate in a caption (it
passed validation and crashed the tokenizer after the model loaded), a pipeline folder without unet/ (reported as
a missing config.json of the pipeline folder), and a pickled UNet asking for a forbidden global (refused on two
lines, without the global's name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ONE_THREAD, REPO, run_cli

from diffmem.common.t2i.prompts import PromptFileError, read_prompts
from diffmem.common.t2i.text_image_data import ImageDataError, hf_dataset_records, read_image_folder

SURROGATE_LINE = '{"caption": "a cat \\ud800 on a mat"}\n'  # the JSON escape, as a hostile file holds it
EXPECTED = "caption holds a lone surrogate \\ud800 (not valid Unicode text); expected UTF-8 text"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- lone surrogates


def test_lone_surrogate():
    from diffmem.common.textfiles import lone_surrogate

    assert lone_surrogate("a \ud800 b") == "\\ud800" and lone_surrogate("a \udfff") == "\\udfff"
    assert lone_surrogate(json.loads('"\\ud83d\\ude00"')) is None  # a complete pair is one code point: valid
    assert lone_surrogate("plain é 猫") is None


def test_prompt_file_with_a_lone_surrogate_names_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "one"}\n{"caption": "two"}\n' + SURROGATE_LINE)
    with pytest.raises(PromptFileError) as exc:
        read_prompts(path)
    assert str(exc.value) == f"{path}:3: {EXPECTED}"


def test_a_surrogate_anywhere_in_a_row_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "ok", "type": ["N", "x\\udc80"]}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: type\[1\] holds a lone surrogate \\udc80"):
        read_prompts(path)
    path.write_text('{"caption": "ok", "\\ud800": 1}\n')
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: a key holds a lone surrogate \\ud800"):
        read_prompts(path)


def test_hf_dataset_caption_with_a_lone_surrogate(monkeypatch):
    import datasets

    class Rows(list):
        column_names = ["caption"]

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: Rows([{"caption": "ok"}, {"caption": "x\ud800"}]))
    with pytest.raises(PromptFileError) as exc:
        read_prompts("owner/set")
    assert str(exc.value) == f"owner/set[train]:1: {EXPECTED}"


def test_finetune_captions_with_a_lone_surrogate(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x \\ud800"}\n')
    with pytest.raises(ImageDataError) as exc:
        read_image_folder(folder)
    assert str(exc.value) == f"{folder / 'metadata.jsonl'}:1: text holds a lone surrogate \\ud800 (not valid " \
                             f"Unicode text); expected UTF-8 text"

    class Dataset(dict):
        column_names = ["image", "text"]

    with pytest.raises(ImageDataError) as exc:
        hf_dataset_records(Dataset(image=[None, None], text=["fine", ["ok", "y\udfff"]]), "image", "text", "hub/set")
    assert str(exc.value) == "hub/set[1]: caption holds a lone surrogate \\udfff (not valid Unicode text); " \
                             "expected UTF-8 text"


def test_detect_mem_refuses_the_caption_before_loading_a_model(tmp_path, capsys):
    from diffmem.detect import detect_mem

    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "one"}\n{"caption": "two"}\n' + SURROGATE_LINE)
    rc = detect_mem.main(["--model_id", str(tmp_path), "--dataset", str(path),  # a folder, though no pipeline
                          "--output_dir", str(tmp_path / "out"), "--run_name", "r"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == f"detect_mem: error: {path}:3: {EXPECTED}"


def test_command_line_prompt_with_a_bad_byte(capsys):
    from diffmem.detect import explain_tokens

    with pytest.raises(SystemExit) as exc:  # what surrogateescape makes of the byte 0xff in argv
        explain_tokens.parse_config(["--model_id", "m", "--out", "o", "--prompt", "a \udcff b"])
    assert exc.value.code == 2
    assert one_line(capsys.readouterr().err).endswith(
        "argument --prompt: the text holds the byte 0xff, which is not UTF-8; expected UTF-8 text (see --help)")


# ---------------------------------------------------------------------------------------- pipeline folders


@pytest.fixture
def pipeline_copy(tiny_pipeline_dir, tmp_path) -> Path:
    out = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, out)
    return out


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_pipeline_folder_without_a_part(pipeline_copy, part):
    from diffmem.common.t2i.pipelines import ModelLoadError, load_pipeline

    shutil.rmtree(pipeline_copy / part)
    with pytest.raises(ModelLoadError) as exc:
        load_pipeline(str(pipeline_copy))
    hint = " (or pass --unet_id)" if part == "unet" else ""
    assert str(exc.value) == (f"{pipeline_copy}: no {part}/ folder; a diffusers pipeline folder holds "
                              f"model_index.json and one folder per part it names: scheduler/, text_encoder/, "
                              f"tokenizer/, unet/, vae/{hint}")


def test_without_unet_a_unet_id_still_loads(pipeline_copy, tiny_pipeline_dir):
    from diffmem.common.t2i.pipelines import load_pipeline

    shutil.rmtree(pipeline_copy / "unet")
    assert load_pipeline(str(pipeline_copy), unet_id=str(tiny_pipeline_dir)).unet is not None


def test_a_part_without_its_config(pipeline_copy):
    from diffmem.common.t2i.pipelines import ModelLoadError, load_pipeline

    (pipeline_copy / "unet" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"pipe: no unet/config.json; a diffusers pipeline folder holds"):
        load_pipeline(str(pipeline_copy))


class Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __reduce__(self):
        import os

        return os.system, ("echo pwned > pwned.txt",)


def pickled_unet(folder: Path, extra: dict | None = None) -> dict:
    """Replace the pipeline's UNet safetensors by a torch.save pickle of its state (plus ``extra``); the state."""
    import torch
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = dict(load_file(weights))
    weights.unlink()
    torch.save({**state, **(extra or {})}, folder / "unet" / "diffusion_pytorch_model.bin")
    return state


def test_a_pickled_unet_with_a_forbidden_global_is_one_line(pipeline_copy, tmp_path):
    pickled_unet(pipeline_copy, {"payload": Evil()})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"caption": "a cat"}\n')
    # The real CLI in its own process: diffusers' log lines go to the real stderr, where the user sees them.
    res = run_cli("detect/detect_mem.py", "--model_id", pipeline_copy, "--dataset", prompts,
                  "--output_dir", tmp_path / "out", "--run_name", "r", "--batch_size", "1", env=ONE_THREAD)
    assert res.returncode == 2
    assert one_line(res.stderr) == (
        f"detect_mem: error: {pipeline_copy}/unet/diffusion_pytorch_model.bin: refused global posix.system (a "
        f"checkpoint file holds tensors and plain data; pickled code is never run)")
    assert not (REPO / "pwned.txt").exists()


def test_a_plain_pickled_unet_still_loads_quietly(pipeline_copy):
    import logging

    import torch

    from diffmem.common.t2i.pipelines import load_pipeline

    state = pickled_unet(pipeline_copy)

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(keep)
    try:
        pipe = load_pipeline(str(pipeline_copy))
    finally:
        logger.removeHandler(keep)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], state["conv_in.weight"])
    assert not [m for m in keep.messages if m.startswith("An error occurred")], keep.messages


def test_a_pickled_text_encoder_with_a_forbidden_global_names_its_file(pipeline_copy):
    # transformers' error names no file: the one torch.load was reading is found all the same.
    import torch
    from safetensors.torch import load_file

    from diffmem.common.t2i.pipelines import ModelLoadError, load_pipeline

    weights = pipeline_copy / "text_encoder" / "model.safetensors"
    state = dict(load_file(weights))
    weights.unlink()
    torch.save({**state, "payload": Evil()}, pipeline_copy / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as exc:
        load_pipeline(str(pipeline_copy))
    assert str(exc.value) == (f"{pipeline_copy}/text_encoder/pytorch_model.bin: refused global posix.system (a "
                              f"checkpoint file holds tensors and plain data; pickled code is never run)")
