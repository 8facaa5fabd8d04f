"""Every option of every CLI (the unconditional and the text-to-image arm's) shows its default in --help, and that
default is the settings dataclass's (written once, there)."""

from __future__ import annotations

import importlib
import re

import pytest

# (module, argv before --help, {option: the default its help must show})
CLIS = [
    ("diffmem.detect.generate", [], {"--batch_size": "64", "--chunk": "4096", "--steps": "18", "--sigma_min": "0.002",
                                     "--sigma_max": "80.0", "--rho": "7.0", "--S_max": "inf", "--solver": "heun",
                                     "--grid_scale": "1", "--npz": "False"}),
    ("diffmem.detect.mem_ratio", [], {"--batch_size": "512", "--steps": "18", "--rho": "7.0", "--check_args": "False"}),
    ("diffmem.detect.jacobian", [], {"--energy_threshold": "0.99", "--chunk": "64", "--steps": "None",
                                     "--no_progress": "True"}),
    ("diffmem.detect.similarity", ["features"], {"--preprocess": "zhang", "--batch_size": "64",
                                                 "--sscd_model": "default"}),
    ("diffmem.detect.similarity", ["rpscore"], {"--sscd_threshold": "0.6"}),
    ("diffmem.detect.similarity", ["mscore"], {"--sscd_threshold": "0.6", "--chunk": "8192"}),
    ("diffmem.data.dataset_tool", [], {"--subset": "first", "--seed": "0", "--split": "train", "--molrg_res": "4",
                                       "--molrg_classes": "2", "--molrg_dim": "7", "--molrg_per_class": "350"}),
    ("diffmem.data.convert_edm", [], {"--overwrite": "False"}),
    ("diffmem.finetune.train_unconditional", [], {"--arch": "ddpmpp", "--precond": "vp", "--dropout": "0.13",
                                                  "--duration": "200.0", "--batch_size": "512", "--lr": "0.0002",
                                                  "--optimizer": "adam", "--max_grad_norm": "0.0", "--snap": "2500.0",
                                                  "--no_progress": "True", "--num_blocks": "None",
                                                  "--checkpoints_total_limit": "2"}),
    ("diffmem.detect.emm", [], {"--mem_ratio_threshold": "0.9", "--launcher": "local", "--timeout_min": "1440",
                                "--submitit_cluster": "slurm", "--max_parallel": "1"}),
    # the text-to-image arm
    ("diffmem.detect.detect_mem", [], {"--out": "det_outputs", "--num_images_per_prompt": "4",
                                       "--guidance_scale": "7.5", "--target_steps": "0", "--batch_size": "32",
                                       "--latents": "per_prompt", "--dtype": "fp32", "--scheduler": "None",
                                       "--detector": "wen", "--anisotropy_weights": "None", "--allow_empty": "False"}),
    ("diffmem.detect.evaluate", [], {"--fpr_targets": "(0.001, 0.01, 0.03, 0.05)", "--tpr_rule": "strict",
                                     "--positive": "[]", "--compare": "False"}),
    ("diffmem.detect.explain_tokens", [], {"--target_steps": "0", "--num_inference_steps": "50", "--batch_size": "4",
                                           "--wrt": "prompt_embeds", "--device": "None"}),
    ("diffmem.mitigate.inference_mem", [], {"--method": "none", "--repeat_num": "4", "--optim_target_loss": "3.0",
                                            "--optim_target_steps": "[0]", "--optim_lr": "0.05",
                                            "--optim_loss_reduction": "mean", "--sscd_preprocess": "wen",
                                            "--reference_model": "ViT-g-14", "--device": "auto",
                                            "--out": "None", "--jain_tau": "500.0", "--han_iters": "1000",
                                            "--ren_c": "1.25", "--gni_scale": "0.1", "--split": "train"}),
    ("diffmem.mitigate.tradeoff", [], {"--target_losses": "[1.0, 2.0, 3.0, 4.0]", "--repeat_nums": "[1, 2, 4, 8]",
                                       "--baselines": "['rand_word_add']", "--methods": "None", "--sweep": "[]",
                                       "--optim_target_loss": "3.0", "--batch_size": "4", "--han_tau": "900.0"}),
    ("diffmem.finetune.train_text_to_image", [], {"--out": "sd-model-finetuned",
                                                  "--tracker_project_name": "diffmem-text2image",
                                                  "--batch_size": "16", "--learning_rate": "0.0001",
                                                  "--lr_scheduler": "constant", "--resolution": "512",
                                                  "--report_to": "tensorboard", "--mixed_precision": "None",
                                                  "--validation_inference_steps": "25", "--validation_prompts": "[]"}),
    ("diffmem.data.build_lab", [], {"--num_memorized": "12", "--repeats": "50", "--train_steps": "3000",
                                    "--contrast_guidances": "(1.0,)", "--threads": "2", "--sscd": "default",
                                    "--quick": "False"}),
]


def help_entries(text: str) -> dict[str, str]:
    """--help's option entries: the option name -> its whole help text (continuation lines joined)."""
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"  (-{1,2}[\w-]+)", line)
        if m:
            name = m.group(1)
            entries[name] = line
        elif name is not None and line.startswith("    "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("module, head, expected", CLIS, ids=[f"{m.split('.')[-1]}{''.join(' ' + h for h in head)}"
                                                              for m, head, _ in CLIS])
def test_help_shows_every_default(module, head, expected, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a default such as diffmem-text2image stays whole
    cli = importlib.import_module(module)
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([*head, "--help"]) if hasattr(cli, "parse_args") else cli.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    entries.pop("-h")
    assert entries, "no options in --help"
    # An old spelling whose value converts (detect_mem's --score_steps N) shows the option it sets instead.
    missing = [name for name, text in entries.items()
               if "(default: " not in text and "(required)" not in text and "(sets --" not in text]
    assert not missing, f"options without their default in --help: {missing}"
    # A required option has no default to show: it says so, never "(default: None)".
    required = [a for a in (cli.build_parser()._actions if hasattr(cli, "build_parser") else [])
                if a.required and a.option_strings]
    for action in required:
        text = entries[action.option_strings[0]]
        assert text.endswith("(required)") and "(default: " not in text, text
    # A default typed into a help string as well would be the second copy that drifts.
    restated = [name for name, text in entries.items() if re.search(r"\(default [^:]", text)]
    assert not restated, f"options whose help restates the default by hand: {restated}"
    for name, default in expected.items():
        assert f"(default: {default})" in entries[name], entries[name]
