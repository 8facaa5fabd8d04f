"""finetune/train_text_to_image.py end to end on the tiny pipeline: launch, resume, thresholded loss, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, accelerate_launch, base_args, free_port, run_cli, run_in_process, write_images
from safetensors.torch import load_file

SCRIPT = "finetune/train_text_to_image.py"
UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def data(tmp_path):
    mem = write_images(tmp_path / "mem", [f"a memorized picture number {i}" for i in range(4)], seed=1)
    non_mem = write_images(tmp_path / "non_mem", [f"an ordinary scene {i} with trees" for i in range(6)], seed=2)
    return mem, non_mem


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_pipeline(tmp_path):
    """A model folder that exists but holds no pipeline: for checks that must answer before any model is loaded (a
    model reference that does not exist at all is refused before them)."""
    folder = tmp_path / "no-such-model"
    folder.mkdir(exist_ok=True)
    return folder


def unet_weights(folder):
    return load_file(os.path.join(folder, UNET_FILE))


def max_abs_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------- through the launcher


def test_accelerate_launch_trains_and_the_output_loads_and_detects(tiny_pipeline_dir, data, tmp_path):
    mem, non_mem = data
    (non_mem / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # skipped and reported
    out = tmp_path / "run"
    args = base_args(tiny_pipeline_dir, mem, out, "--non_mem_dataset", non_mem, "--non_mem_ratio", "1",
                     "--skip_corrupt_images", "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--checkpoints_total_limit", "1", "--use_ema", "--ema_decay", "0.5", "--learning_rate", "1e-3",
                     "--hard_threshold", "100", "--random_flip", "--validation_prompts", "a memorized picture",
                     "--validation_inference_steps", "2")
    args[args.index("--report_to") + 1] = "tensorboard"
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", SCRIPT, *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    from diffmem.common.t2i.pipelines import load_pipeline

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1 pruned checkpoint-2
    ckpt = out / "checkpoint-4"
    assert (ckpt / "unet" / UNET_FILE).is_file() and (ckpt / "unet_ema" / UNET_FILE).is_file()
    final = unet_weights(out / "unet")
    assert max_abs_diff(final, unet_weights(ckpt / "unet_ema")) == 0.0  # the export holds the EMA weights
    assert max_abs_diff(final, unet_weights(ckpt / "unet")) > 0.0
    assert max_abs_diff(final, unet_weights(tiny_pipeline_dir / "unet")) > 0.0

    # The output is what detection loads: run detect_mem on it.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"caption": c, "label": lab}) + "\n" for c, lab in
                               [("a memorized picture number 0", 1), ("an ordinary scene 2 with trees", 0)]))
    det = run_in_process("detect/detect_mem.py", "--model_id", out, "--dataset", prompts, "--run_name", "tuned",
                  "--output_dir", tmp_path / "det", "--num_images_per_prompt", "2", "--num_inference_steps", "2",
                  env=ONE_THREAD)
    assert det.returncode == 0, det.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "det" / "tuned.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["score"]) for r in rows)
    load_pipeline(str(out))
    load_pipeline(str(tiny_pipeline_dir), unet_id=str(ckpt))  # a checkpoint's unet/ plugs into the base model

    report = json.loads((out / "data_report.json").read_text())
    assert report["mem_samples"] == 4 and report["non_mem_used"] == 4 and report["total"] == 8
    assert [s["image"].split("/")[-1] for s in report["skipped_images"]] == ["001.jpg"]
    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert all(row["dropped_fraction"] == 0.0 and np.isfinite(row["train_loss"]) for row in log)
    assert all(row["text_noise_norm"] > 0 for row in log)
    assert list((out / "validation" / "step-4").glob("*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["samples_seen"] == 8 and summary["dropped_fraction"] == 0.0
    assert "samples kept, 0.0% dropped by the threshold); pipeline saved to" in res.stdout


# ---------------------------------------------------------------------------------------------- resume


def test_resume_mid_epoch_equals_the_uninterrupted_run(tiny_pipeline_dir, data, tmp_path, fresh_accelerate):
    from diffmem.finetune.train_text_to_image import main

    mem, non_mem = data
    # 6 samples, batch 2, accumulation 2: 3 micro-batches per epoch, so step 2 ends inside epoch 1.
    common = ["--non_mem_dataset", non_mem, "--non_mem_ratio", "0.5", "--gradient_accumulation_steps", "2",
              "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema", "--ema_decay", "0.9",
              "--hard_threshold", "0.9", "--snr_gamma", "5", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
              "--learning_rate", "1e-3", "--random_flip", "--prompt_aug_style", "rand_numb_add",
              "--noise_offset", "0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(base_args(tiny_pipeline_dir, mem, straight, *common)) == 0
    fresh_accelerate()
    assert main(base_args(tiny_pipeline_dir, mem, resumed, *common,
                          "--resume_from_checkpoint", straight / "checkpoint-2")) == 0

    a, b = straight / "checkpoint-4", resumed / "checkpoint-4"
    for sub in ("unet", "unet_ema"):
        assert max_abs_diff(unet_weights(a / sub), unet_weights(b / sub)) == 0.0, sub
    assert max_abs_diff(unet_weights(straight / "unet"), unet_weights(resumed / "unet")) == 0.0
    opt_a = torch.load(a / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=False)["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[k][name], opt_b[k][name]), (k, name)
    assert not list(a.glob("custom_checkpoint_*"))  # the EMA is no pickle any more
    ema_a, ema_b = (json.loads((c / "ema_state.json").read_text()) for c in (a, b))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    shadow_a, shadow_b = load_file(a / "ema_shadow.safetensors"), load_file(b / "ema_shadow.safetensors")
    assert shadow_a.keys() == shadow_b.keys() and all(k.startswith("unet.") for k in shadow_a)
    assert all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_a)
    assert read_log(straight)[2:] == read_log(resumed)
    assert 0.0 < sum(r["dropped_fraction"] for r in read_log(straight)) < 4.0  # the threshold bit sometimes


def test_resume_latest_picks_the_newest_complete_checkpoint(tmp_path):
    from diffmem.common.training.checkpoints import TRAINER_STATE, resolve_resume
    from diffmem.common.training.config import TrainSetupError

    for step, complete in ((2, True), (10, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / TRAINER_STATE).write_text("{}")
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("checkpoint-2", tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(TrainSetupError, match="checkpoint-12: not a complete diffmem checkpoint"):
        resolve_resume("checkpoint-12", tmp_path)


def test_resume_with_another_batch_size_is_refused(tiny_pipeline_dir, data, tmp_path, fresh_accelerate, capsys):
    from diffmem.finetune.train_text_to_image import main

    mem, _ = data
    out = tmp_path / "run"
    assert main(base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    fresh_accelerate()
    args = base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    args[args.index("--train_batch_size") + 1] = "1"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_text_to_image: error: ") and "train_batch_size=2 (now 1)" in err[-1]


def test_resume_with_another_learning_rate_is_refused_before_anything_is_written(
        tiny_pipeline_dir, data, tmp_path, fresh_accelerate, capsys):
    from diffmem.finetune.train_text_to_image import main

    mem, _ = data
    out = tmp_path / "run"
    first = ["--max_train_steps", "1", "--checkpointing_steps", "1", "--learning_rate", "1e-3"]
    assert main(base_args(tiny_pipeline_dir, mem, out, *first)) == 0
    recorded = json.loads((out / "training_options.json").read_text())
    assert recorded["learning_rate"] == 1e-3 and "max_train_steps" not in recorded  # constant LR: may extend
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fresh_accelerate()
    args = base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "2", "--learning_rate", "2e-3",
                     "--resume_from_checkpoint", "latest")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning_rate=0.001 (now 0.002)" in err[0]
    assert "another output folder (--out NEW_DIR)" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A new folder started from this run's checkpoint is a new run (a fork, as the lab's mitigated run): its own
    # settings are recorded there.
    fresh_accelerate()
    fork = tmp_path / "fork"
    assert main(base_args(tiny_pipeline_dir, mem, fork, "--max_train_steps", "2", "--learning_rate", "2e-3",
                          "--resume_from_checkpoint", out / "checkpoint-1")) == 0
    assert json.loads((fork / "training_options.json").read_text())["learning_rate"] == 2e-3
    # The same settings extend the run; the image count covers both sessions.
    fresh_accelerate()
    assert main(base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "2", "--learning_rate", "1e-3",
                          "--resume_from_checkpoint", "latest")) == 0
    assert json.loads((out / "train_summary.json").read_text())["samples_seen"] == 4


def test_output_dir_that_is_a_file_is_one_line(tiny_pipeline_dir, data, tmp_path, capsys):
    from diffmem.finetune.train_text_to_image import main

    (tmp_path / "f").write_text("x")
    assert main(base_args(tiny_pipeline_dir, data[0], tmp_path / "f", "--max_train_steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out " in err[0] and "is a file" in err[0]


def test_text_encoder_trained_jointly_and_prediction_type_saved(tiny_pipeline_dir, data, tmp_path, fresh_accelerate):
    from diffmem.common.t2i.pipelines import load_pipeline
    from diffmem.finetune.train_text_to_image import main

    mem, _ = data
    out = tmp_path / "run"
    assert main(base_args(tiny_pipeline_dir, mem, out, "--train_text_encoder", "--prediction_type", "v_prediction",
                          "--hard_threshold", "100", "--max_train_steps", "2", "--learning_rate", "1e-3",
                          "--gradient_checkpointing", "--checkpointing_steps", "1")) == 0
    assert (out / "checkpoint-2" / "text_encoder").is_dir()
    base, tuned = load_pipeline(str(tiny_pipeline_dir)), load_pipeline(str(out))
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    te_diff = [(a - b).abs().max().item()
               for a, b in zip(base.text_encoder.parameters(), tuned.text_encoder.parameters())]
    assert max(te_diff) > 0
    vae_diff = [(a - b).abs().max().item() for a, b in zip(base.vae.parameters(), tuned.vae.parameters())]
    assert max(vae_diff) == 0


# ------------------------------------------------------------------------------------ thresholded loss


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_threshold_mask_and_loss_against_a_hand_computation(tiny_pipe, data, tmp_path, prediction_type, snr_gamma):
    from diffusers import DDPMScheduler

    from diffmem.common.seeding import STREAM_NOISE, STREAM_TIMESTEP, STREAM_VAE, randint_per_sample, randn_per_sample
    from diffmem.common.t2i.text_image_data import (
        CaptionConfig,
        ImageTransformConfig,
        TextImageCollator,
        TextImageDataset,
        read_image_folder,
    )
    from diffmem.common.t2i.train import TextToImageLoss
    from diffmem.common.training.loss import masked_mean

    mem, non_mem = data
    recs = read_image_folder(mem) + read_image_folder(non_mem)
    ds = TextImageDataset(recs, ImageTransformConfig(16), CaptionConfig(), seed=0)
    batch = TextImageCollator(tiny_pipe.tokenizer)([ds[(0, p, p)] for p in range(8)])
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type=prediction_type)
    unet, vae, te = tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder

    def loss_with(threshold):
        fn = TextToImageLoss(vae=vae, text_encoder=te, tokenizer=tiny_pipe.tokenizer, noise_scheduler=sched,
                             weight_dtype=torch.float32, device=torch.device("cpu"), unwrap=lambda m: m,
                             snr_gamma=snr_gamma, hard_threshold=threshold)
        return fn(batch, {"unet": unet})

    # By hand, in float64 numpy where possible: the same per-sample draws, both predictions, the norms.
    seeds = batch["sample_seed"].tolist()
    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"]).latent_dist
        x0 = (dist.mean + dist.std * randn_per_sample(seeds, (4, 8, 8), STREAM_VAE)) * vae.config.scaling_factor
        noise = randn_per_sample(seeds, (4, 8, 8), STREAM_NOISE)
        t = randint_per_sample(seeds, 1000, STREAM_TIMESTEP)
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        abar = np.cumprod(1 - betas)[t.numpy()].reshape(-1, 1, 1, 1)
        xt = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * noise.numpy()
        xt_t = torch.from_numpy(xt).float()
        cond = te(batch["input_ids"])[0]
        empty = te(tiny_pipe.tokenizer([""] * 8, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
        out_c = unet(xt_t, t, cond).sample.double().numpy()
        out_u = unet(xt_t, t, empty).sample.double().numpy()
    if prediction_type == "epsilon":
        target, diff = noise.numpy(), out_c - out_u
    else:
        target = np.sqrt(abar) * noise.numpy() - np.sqrt(1 - abar) * x0.numpy()
        diff = np.sqrt(abar) * (out_c - out_u)  # ε = √ᾱ·v + √(1−ᾱ)·x_t, so x_t cancels
    norms = np.sqrt((diff.reshape(8, -1) ** 2).sum(axis=1))
    mse = ((out_c - target) ** 2).reshape(8, -1).mean(axis=1)
    if snr_gamma is not None:
        snr = abar.reshape(-1) / (1 - abar.reshape(-1))
        mse = mse * np.minimum(snr, snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)

    threshold = float(np.median(norms))
    terms = loss_with(threshold)
    np.testing.assert_allclose(terms.stats["text_noise_norm"].numpy(), norms, rtol=1e-4, atol=1e-5)
    expected_keep = norms < threshold
    assert terms.keep.tolist() == expected_keep.tolist() and 0 < expected_keep.sum() < 8
    np.testing.assert_allclose(terms.per_sample.detach().numpy(), mse, rtol=1e-4, atol=1e-6)
    loss = masked_mean(terms.per_sample, terms.keep)
    assert loss.item() == pytest.approx(mse[expected_keep].mean(), rel=1e-4)
    assert loss_with(None).keep is None


@pytest.mark.parametrize("snr_gamma, weight_decay", [(None, 0.0), (5.0, 0.1)])
def test_fully_dropped_batches_keep_the_loss_finite_and_weights_unchanged(
        tiny_pipeline_dir, data, tmp_path, fresh_accelerate, capsys, snr_gamma, weight_decay):
    from diffmem.finetune.train_text_to_image import main

    mem, _ = data
    out = tmp_path / "run"
    extra = ["--hard_threshold", "0", "--max_train_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--adam_weight_decay", weight_decay, "--checkpointing_steps", "1"]
    if snr_gamma is not None:
        extra += ["--snr_gamma", snr_gamma]
    # A run whose every sample was dropped is no silent success: one warning line at the first such step, then
    # one error line and exit 2 once it has finished; what it wrote stays.
    assert main(base_args(tiny_pipeline_dir, mem, out, *extra)) == 2
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith("warning: step")]
    assert warnings == ["warning: step 1: all 2 samples of the step were dropped by --hard_threshold 0 (text-noise "
                        "norm >= T): the loss gives it no gradient (said once; train_log.jsonl has each step's "
                        "dropped_fraction, train_summary.json the run's)"]
    [error] = [line for line in captured.err.splitlines() if "error" in line]  # beside the progress bars
    assert error.startswith("train_text_to_image: error: --hard_threshold 0 dropped every one of the run's 4 samples "
                            "(their text-noise norm >= T, mean ")
    assert error.endswith(f"): the model was never updated (weight decay aside); raise --hard_threshold above the "
                          f"samples' norms (the files in {out} are kept)")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for row in read_log(out):
        assert row["train_loss"] == 0.0 and row["dropped_fraction"] == 1.0 and row["grad_norm"] == 0.0
    before, after = unet_weights(tiny_pipeline_dir / "unet"), unet_weights(out / "unet")
    decay = (1 - 1e-3 * weight_decay) ** 2  # AdamW's decoupled decay, two steps; the Adam update is 0
    for k in before:
        torch.testing.assert_close(after[k], before[k] * decay, rtol=1e-6, atol=0)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples_kept"] == 0 and summary["samples_seen"] == 4 and summary["dropped_fraction"] == 1.0


def test_two_processes_with_one_rank_fully_dropped_do_not_hang(tiny_pipeline_dir, tmp_path):
    from diffmem.common.training.loop import epoch_permutation

    # Batch 1 per process: global micro-batch b is positions (2b, 2b+1) of the epoch order, rank 0 takes 2b.
    # Rank 0 gets the empty caption (ε(x,c) = ε(x,∅), norm 0, kept); rank 1 a real one (norm > T, dropped).
    perm = epoch_permutation(4, 0, 0)
    captions = [""] * 4
    for pos in (1, 3):
        captions[perm[pos]] = f"a red house on a hill number {pos}"
    mem = write_images(tmp_path / "mem", captions, seed=3)
    out = tmp_path / "ddp"
    args = base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "2", "--hard_threshold", "1e-3",
                     "--learning_rate", "1e-3")
    args[args.index("--train_batch_size") + 1] = "1"
    res = accelerate_launch("--config_file", "accelerate_configs/cpu.yaml", "--multi_gpu", "--num_processes", "2",
                            "--main_process_port", free_port(), SCRIPT, *args, timeout=240,
                            env={"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(out)
    assert [r["dropped_fraction"] for r in log] == [0.5, 0.5]
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in log)
    assert max_abs_diff(unet_weights(out / "unet"), unet_weights(tiny_pipeline_dir / "unet")) > 0


# ------------------------------------------------------------------------------------------ bad input


def test_corrupt_image_is_one_line_before_any_model_is_loaded(data, tmp_path):
    mem, _ = data
    (mem / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    res = run_cli(SCRIPT, *base_args(no_pipeline(tmp_path), mem, tmp_path / "out"), timeout=120, env=ONE_THREAD)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "002.jpg: cannot read image" in err[0] and "--skip_corrupt_images" in err[0]


def test_latin1_caption_is_one_line_before_any_model_is_loaded(data, tmp_path, capsys):
    from diffmem.finetune.train_text_to_image import main

    mem, _ = data
    (mem / "001.txt").write_bytes("un café".encode("latin-1"))
    assert main(base_args(no_pipeline(tmp_path), mem, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_text_to_image: error: {mem / '001.txt'}:1: not UTF-8 text (byte 0xe9 at column 7); "
                   f"re-save the file as UTF-8"]


def test_missing_extras_fail_with_one_line(data, tmp_path):
    import importlib.util

    mem, _ = data
    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers and a GPU are present")
    res = run_in_process(SCRIPT, *base_args(no_pipeline(tmp_path), mem, tmp_path / "out",
                                     "--enable_xformers_memory_efficient_attention"), timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "xformers" in err[0] and "SDPA" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--use_8bit_adam"], "--use_8bit_adam needs"),
    (["--caption_dropout", "1.5"], "--caption_dropout must be in [0, 1)"),
    (["--non_mem_ratio", "2"], "--non_mem_ratio needs --non_mem_dataset"),
    (["--dataset_name", "x"], "expected exactly one data source"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-3"], "not a complete diffmem checkpoint"),
    (["--validation_steps", "2"], "--validation_steps needs --validation_prompts"),
])
def test_bad_arguments_are_rejected_with_one_line(data, tmp_path, capsys, extra, message):
    from diffmem.finetune.train_text_to_image import main

    if extra == ["--use_8bit_adam"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mem, _ = data
    assert main(base_args(no_pipeline(tmp_path), mem, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_every_json_the_trainer_writes_lands_atomically(tiny_pipeline_dir, data, tmp_path, fresh_accelerate,
                                                        monkeypatch):
    """A kill mid-write must never leave a half JSON file that a reader takes as whole: the trainer's own files
    (options, state, summary, data report, validation captions) are renamed into place after an fsync; what
    diffusers and Accelerate write (model configs) is covered by a completion marker renamed into place after it:
    a checkpoint counts once its trainer_state.json exists, the export once train_summary.json does.
    train_log.jsonl is appended per step by design; its torn last line is dropped on resume."""
    from diffmem.common.training.checkpoints import TRAIN_SUMMARY, TRAINER_STATE
    from diffmem.finetune.train_text_to_image import main

    synced, placed = set(), {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        placed[os.path.realpath(dst)] = os.path.realpath(src) in synced
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    mem, _ = data
    out = tmp_path / "run"
    assert main(base_args(tiny_pipeline_dir, mem, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                          "--validation_prompts", "a memorized picture", "--validation_steps", "1",
                          "--validation_inference_steps", "2")) == 0
    ours = {"training_options.json", TRAINER_STATE, TRAIN_SUMMARY, "data_report.json", "captions.json"}
    files = sorted(out.rglob("*.json"))
    assert {f.name for f in files} >= ours

    def atomic(path: Path) -> bool:
        return placed.get(os.path.realpath(path), False)

    def covered(path: Path) -> bool:
        """Written before a marker that was placed atomically: its checkpoint's state, else the run's summary."""
        rel = path.relative_to(out)
        marker = out / rel.parts[0] / TRAINER_STATE if rel.parts[0].startswith("checkpoint-") else out / TRAIN_SUMMARY
        return atomic(marker) and path.stat().st_mtime_ns <= marker.stat().st_mtime_ns

    assert [f.relative_to(out).as_posix() for f in files if f.name in ours and not atomic(f)] == []
    assert [f.relative_to(out).as_posix() for f in files if not atomic(f) and not covered(f)] == []


def test_a_tampered_ema_pickle_in_a_text_to_image_checkpoint_runs_no_code(tiny_pipeline_dir, data, tmp_path,
                                                                          fresh_accelerate, capsys):
    from diffmem.finetune.train_text_to_image import main

    class Payload:
        def __reduce__(self):
            return eval, (f"open({str(tmp_path / 'PWNED')!r}, 'w').write('ran')",)

    mem, _ = data
    out = tmp_path / "run"
    common = ["--checkpointing_steps", "1", "--use_ema", "--learning_rate", "1e-3"]
    assert main(base_args(tiny_pipeline_dir, mem, out, *common, "--max_train_steps", "1")) == 0
    ckpt = out / "checkpoint-1"
    torch.save({"x": Payload()}, ckpt / "custom_checkpoint_0.pkl")  # where Accelerate kept the EMA before
    fresh_accelerate()
    capsys.readouterr()
    assert main(base_args(tiny_pipeline_dir, mem, out, *common, "--max_train_steps", "2",
                          "--resume_from_checkpoint", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("custom_checkpoint_0.pkl: refused global builtins.eval (a checkpoint file holds "
                            "tensors and plain data; pickled code is never run)"), err
    assert not (tmp_path / "PWNED").exists() and not (out / "checkpoint-2").exists()
