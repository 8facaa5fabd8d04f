"""One flag vocabulary (docs/vocabulary.md): canonical names, the anchors' spellings as aliases that --help lists,
hyphenated forms, no abbreviations, "did you mean", and one list and one step syntax. In process: parsers only."""

from __future__ import annotations

import argparse
import importlib
import io
import pkgutil
from contextlib import redirect_stderr, redirect_stdout

import pytest

from diffmem.common import cli
from diffmem.common.errors import ConfigError
from diffmem.common.settings import first_steps, step_indices

CLI_PACKAGES = ("diffmem.detect", "diffmem.mitigate", "diffmem.finetune", "diffmem.data")
# Spellings that name one of the house concepts; each may only be an alias, never an option's canonical name.
NOT_CANONICAL = {"--output_dir", "--outdir", "--dest", "--model_id", "--pretrained_model_name_or_path", "--network",
                 "--expdir", "--dataset", "--train_data_dir", "--knn_ref", "--source", "--batch", "--train_batch_size",
                 "--gen_seed", "--threshold", "--t"}
# similarity's rpscore/mscore compare two features files, --source against --target: a pair, not a data source.
EXEMPT = {"diffmem.detect.similarity": {"--source"}}


def cli_modules() -> list[str]:
    names = []
    for package in CLI_PACKAGES:
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    return sorted(names)


def parsers_of(module_name: str) -> list[argparse.ArgumentParser]:
    """Every parser a CLI builds (subcommands' too), caught as each one parses ``--help``."""
    module = importlib.import_module(module_name)
    built: list[argparse.ArgumentParser] = []
    original = cli.ArgumentParser.parse_known_args

    def record(self, args=None, namespace=None):
        built.append(self)
        return original(self, args, namespace)

    heads = [[]]
    if module_name.endswith("similarity"):
        heads = [["features"], ["rpscore"], ["mscore"]]
    cli.ArgumentParser.parse_known_args = record
    try:
        for head in heads:
            with redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
                if hasattr(module, "parse_args"):
                    module.parse_args([*head, "--help"])
                elif hasattr(module, "parse_config"):
                    module.parse_config([*head, "--help"])
                else:
                    module.build_parser().parse_args([*head, "--help"])
    finally:
        cli.ArgumentParser.parse_known_args = original
    return built


def parse(module_name: str, argv: list[str]):
    """Parse argv with a CLI's own parser builder; (namespace-derived config, None) or (None, stderr line)."""
    module = importlib.import_module(module_name)
    builder = getattr(module, "parse_args", None) or getattr(module, "parse_config")
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            return builder(argv), None
        except SystemExit:
            return None, err.getvalue().strip()


@pytest.mark.parametrize("module_name", cli_modules())
def test_canonical_names_and_every_alias_in_help(module_name):
    for parser in parsers_of(module_name):
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.option_strings[0] not in NOT_CANONICAL - EXEMPT.get(module_name, set()), \
                f"{module_name}: {action.option_strings[0]} is an alias spelling used as the canonical name"
            shown = ", ".join(action.option_strings)
            assert shown in text, f"{module_name}: --help does not list {shown}"
        assert not parser.allow_abbrev


def test_aliases_set_the_same_setting():
    cases = [
        ("diffmem.detect.detect_mem", ["--model_id", "m", "--dataset", "d.jsonl", "--run_name", "r",
                                       "--output_dir", "o", "--gen_seed", "3"],
         dict(model_id="m", dataset="d.jsonl", output_dir="o", gen_seed=3)),
        ("diffmem.detect.detect_mem", ["--model", "m", "--data", "d.jsonl", "--run_name", "r", "--out", "o",
                                       "--seed", "3"],
         dict(model_id="m", dataset="d.jsonl", output_dir="o", gen_seed=3)),
        ("diffmem.finetune.train_text_to_image", ["--pretrained_model_name_or_path", "m", "--dataset", "imgs",
                                                  "--train_batch_size", "2", "--output_dir", "o"],
         dict(pretrained_model_name_or_path="m", train_data_dir="imgs")),
    ]
    for module_name, argv, expected in cases:
        cfg, err = parse(module_name, argv)
        assert err is None, err
        for key, value in expected.items():
            assert getattr(cfg, key) == value, (module_name, key)
    cfg, _ = parse("diffmem.finetune.train_text_to_image", ["--model", "m", "--data", "imgs", "--batch_size", "2",
                                                           "--out", "o"])
    assert (cfg.train.train_batch_size, cfg.train.output_dir) == (2, "o")


def test_the_anchors_hyphenated_spellings():
    cfg, err = parse("diffmem.detect.mem_ratio", ["--expdir", "run", "--knn-ref", "d.zip", "--save-images",
                                                  "--batch", "8"])
    assert err is None, err
    assert (str(cfg.expdir), str(cfg.knn_ref), cfg.save_images, cfg.batch) == ("run", "d.zip", True, 8)
    (cfg, mix), err = parse("diffmem.finetune.train_unconditional", ["--data", "d.zip", "--outdir", "run",
                                                                    "--batch", "64", "--batch-gpu", "16",
                                                                    "--cres=1,2", "--cbase", "32"])
    assert err is None, err
    assert (cfg.batch, cfg.batch_gpu, cfg.outdir, cfg.arch.channel_mult, cfg.arch.num_channels) == (
        64, 16, "run", [1, 2], 32)
    cfg, err = parse("diffmem.data.dataset_tool", ["--source", "digits", "--dest", "x.zip", "--max-images", "10"])
    assert err is None, err
    assert (cfg.recipe.source, str(cfg.dest), cfg.recipe.max_images) == ("digits", "x.zip", 10)


def test_no_abbreviations_and_did_you_mean():
    _, err = parse("diffmem.detect.mem_ratio", ["--expdir", "run", "--data", "d.zip", "--ou", "x"])
    assert err.endswith("unrecognized argument --ou (did you mean --out?) (see --help)") and "\n" not in err
    _, err = parse("diffmem.detect.detect_mem", ["--modle", "m", "--data", "d", "--run_name", "r"])
    assert "unrecognized argument --modle (did you mean --model?)" in err  # before "required: --model"
    _, err = parse("diffmem.detect.similarity", ["mscore", "--source", "a", "--target", "b", "--sscd-treshold", "1"])
    assert "unrecognized argument --sscd-treshold (did you mean --sscd_threshold?)" in err
    _, err = parse("diffmem.detect.generate", ["--seeds", "0", "--out", "o", "--model", "m", "--qqqqqq", "1"])
    assert err.endswith("unrecognized argument --qqqqqq (see --help)")


def test_one_list_syntax():
    base = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
    for argv in (["--target_losses", "1", "2.5"], ["--target_losses", "1,2.5"], ["--target_losses", "1",
                                                                                  "--target_losses", "2.5"]):
        cfg, err = parse("diffmem.mitigate.tradeoff", [*base, *argv])
        assert err is None and cfg.target_losses == [1.0, 2.5], (argv, err)
    cfg, _ = parse("diffmem.mitigate.tradeoff", base)
    assert cfg.target_losses == [1.0, 2.0, 3.0, 4.0]  # untouched default
    cfg, _ = parse("diffmem.detect.generate", ["--seeds", "0-3", "7", "--seeds", "9", "--out", "o", "--model", "m"])
    assert cfg.seeds == "0-3,7,9" and cfg.seed_list() == [0, 1, 2, 3, 7, 9]
    cfg, _ = parse("diffmem.detect.evaluate", ["--out", "o", "--positive", "a.jsonl", "--positive", "b.jsonl",
                                               "--fpr_targets", "0.01,0.05"])
    assert [p.name for p in cfg.positive] == ["a.jsonl", "b.jsonl"] and cfg.fpr_targets == (0.01, 0.05)
    sweep = importlib.import_module("diffmem.detect.emm").build_parser()
    assert sweep.parse_args(["--data", "digits", "--sizes", "16", "32,64", "--out", "s"]).sizes == [16, 32, 64]


def test_one_step_syntax(tmp_path):
    assert step_indices("0,5,10-12") == [0, 5, 10, 11, 12] and first_steps("3") == "0-2" and first_steps("1") == "0"
    for argv, count in ((["--target_steps", "0-9"], 10), (["--target_steps", "0", "1"], 2), (["--score_steps", "3"], 3),
                        (["--target_steps", "all"], 50), ([], 1)):
        cfg, err = parse("diffmem.detect.detect_mem", ["--model", str(tmp_path), "--data", "d", "--run_name", "r",
                                                       *argv])
        assert err is None, err
        cfg.validate()
        assert cfg.num_score_steps == count, argv
    # A resumed run binds the step count as its config has always recorded it.
    cfg, _ = parse("diffmem.detect.detect_mem", ["--model", "m", "--data", "d", "--run_name", "r"])
    assert cfg.bound_score_setting("score_steps") == "1"
    cfg, _ = parse("diffmem.detect.explain_tokens", ["--model", "m", "--prompt", "p", "--out", "o", "--target_steps",
                                                     "0", "5", "10-12"])
    assert cfg.target_steps == "0,5,10-12" and cfg.steps == [0, 5, 10, 11, 12]
    cfg, _ = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--out", "o",
                                                      "--optim_target_steps", "0-2", "4"])
    assert cfg.optim_target_steps == [0, 1, 2, 4]


def test_mitigation_out_is_the_run_folder(tmp_path):
    cfg, _ = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--out", str(tmp_path / "r1")])
    assert cfg.run_dir == tmp_path / "r1" and cfg.name == "r1"
    cfg, _ = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--run_name", "wen"])
    assert str(cfg.run_dir) == "mit_outputs/wen" and cfg.name == "wen"
    cfg, _ = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d"])
    with pytest.raises(ConfigError, match="pass --out DIR"):
        cfg.validate()
    # An old command (--out the parent, --run_name the folder) meets its earlier results: refused, not restarted.
    (tmp_path / "wen").mkdir()
    (tmp_path / "wen" / "config.json").write_text("{}")
    cfg, _ = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--out", str(tmp_path),
                                                      "--run_name", "wen"])
    with pytest.raises(ConfigError, match=r"--out is now the run folder itself; pass --out .*wen"):
        cfg.validate()


def test_emm_reserved_flags_in_every_spelling():
    from diffmem.common.edm.emm.sweep import flag_present

    for args in (["--out", "x"], ["--outdir=x"], ["--out=x"]):
        assert flag_present(args, "--outdir"), args
    assert flag_present(["--knn-ref", "z"], "--knn_ref") and flag_present(["--data", "z"], "--knn_ref")
    assert flag_present(["--max-images", "3"], "--max_images")
    assert not flag_present(["--duration", "2"], "--outdir")


# The anchors' own command lines (their READMEs and scripts), arguments as published: each parses here to the
# settings it means there.
ANCHOR_COMMANDS = [
    # Wen et al.: detect_mem.py and inference_mem.py (a baseline, then their method with its options)
    ("diffmem.detect.detect_mem", "--run_name mem --dataset examples/sdv1_500_memorized.jsonl --end 500 --gen_seed 0 "
     "--model_id CompVis/stable-diffusion-v1-4 --num_images_per_prompt 4 --guidance_scale 7.5 "
     "--num_inference_steps 50", dict(run_name="mem", end=500, gen_seed=0, num_images_per_prompt=4)),
    ("diffmem.mitigate.inference_mem", "--run_name test --dataset examples/sdv1_500_memorized.jsonl --end 500 "
     "--gen_seed 0 --model_id CompVis/stable-diffusion-v1-4 --reference_model ViT-g-14 --with_tracking "
     "--prompt_aug_style rand_word_add --repeat_num 4", dict(method="rand_word_add", repeat_num=4, run_name="test")),
    ("diffmem.mitigate.inference_mem", "--run_name ours --dataset D --model_id M --method ours --optim_target_loss 3 "
     "--optim_target_steps 0 --optim_lr 0.05 --optim_iters 10", dict(optim_target_loss=3.0, optim_target_steps=[0])),
    # the diffusers text-to-image example with Wen et al.'s mitigation flags (--flag=value, as published)
    ("diffmem.finetune.train_text_to_image", "--pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4 "
     "--dataset=mem_images --non_mem_dataset=laion --end=200 --repeats=200 --non_mem_ratio=3 --hard_threshold=2 "
     "--use_ema --resolution=512 --center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=4 "
     "--gradient_checkpointing --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1 "
     "--lr_scheduler=constant --lr_warmup_steps=0 --output_dir=sd-finetuned",
     dict(train_data_dir="mem_images", hard_threshold=2.0)),
    # NVlabs/edm: dataset_tool.py, train.py (click switches with values), generate.py
    ("diffmem.data.dataset_tool", "--source=downloads/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip "
     "--max-images=1000 --resolution=32x32", dict(dest="datasets/cifar10-32x32.zip")),
    ("diffmem.finetune.train_unconditional", "--outdir=training-runs --data=datasets/cifar10-32x32.zip --cond=1 "
     "--arch=ddpmpp --precond=vp --duration=200 --batch=512 --batch-gpu=64 --cbase=128 --cres=2,2,2 --lr=2e-4 "
     "--ema=0.5 --dropout=0.13 --xflip=0 --snap=50 --seed=1", dict(cond=True, xflip=False, batch=512, batch_gpu=64)),
    ("diffmem.detect.generate", "--outdir=out --seeds=0-63 --batch=64 --network=edm-cifar10-32x32-uncond-vp.pkl "
     "--steps=18 --S_churn=0 --solver=heun --subdirs --class=1", dict(batch=64, class_idx=1, subdirs=True)),
    # DiffMemorize: hyphenated spellings
    ("diffmem.finetune.train_unconditional", "--outdir=runs --data=d.zip --cond=0 --precond=vp --seed=1024 "
     "--duration=2000 --num-blocks=2 --num-channels=128 --skip-connections=1,1,1,1,1,1,1,1,1",
     dict(cond=False, seed=1024)),
    ("diffmem.detect.mem_ratio", "--expdir runs/x --knn-ref d.zip --seeds 0-9999 --batch 512", dict(batch=512)),
]


def flattened(cfg):
    """A parsed config's fields, nested settings dataclasses included, by name."""
    import dataclasses

    values = {}
    items = cfg if isinstance(cfg, tuple) else (cfg,)
    for item in items:
        if dataclasses.is_dataclass(item):
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                values.update(flattened(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return values


@pytest.mark.parametrize("module_name, command, expected", ANCHOR_COMMANDS,
                         ids=[f"{m.rsplit('.', 1)[1]}-{i}" for i, (m, _, _) in enumerate(ANCHOR_COMMANDS)])
def test_the_anchors_commands_parse(module_name, command, expected):
    cfg, err = parse(module_name, command.split())
    assert err is None, err
    values = flattened(cfg)
    for key, value in expected.items():
        got = values[key]
        assert (str(got) if isinstance(value, str) and not isinstance(got, str) else got) == value, key


def test_another_methods_setting_is_refused_not_ignored():
    from diffmem.common.t2i.mitigation.methods import settings_unread_by

    assert settings_unread_by("none", {"optim_target_loss", "seed", "out"}) == ["optim_target_loss"]
    assert settings_unread_by("ours", {"optim_target_loss", "optim_iters"}) == []
    # Wen et al.'s command ran their method whenever it gave a target; here it would be --method none.
    _, err = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--run_name", "r",
                                                      "--optim-target-loss", "3"])
    assert err.endswith("--optim_target_loss does not apply to --method none, which would ignore it (Wen et al.'s "
                        "inference_mem.py runs their method when given a target: add --method ours) (see --help)")
    assert "\n" not in err
    _, err = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--run_name", "r",
                                                      "--method", "jain_stp", "--han_tau", "3"])
    assert "--han_tau does not apply to --method jain_stp" in err
    cfg, err = parse("diffmem.mitigate.inference_mem", ["--model", "m", "--data", "d", "--run_name", "r",
                                                        "--method", "jain_stp", "--jain_tau", "650"])
    assert err is None and cfg.jain_tau == 650.0
