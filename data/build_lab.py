"""Build the memorization lab: a tiny StableDiffusionPipeline that memorizes a known subset of captioned digits.

Stages (each a real diffmem component): captioned images (common.t2i.lab) -> a small VAE trained with
common.training.loop.Trainer -> a random pipeline of arch "lab" with that VAE -> finetune/train_text_to_image.py with
--train_text_encoder (memorized images repeated, seen-once images mixed in) -> detect/detect_mem.py first-step
scores, pixel and SSCD replication rates -> the same training with --hard_threshold (Wen et al.'s mitigation; T a
quantile of the trained model's seen-once training norms), continued from the lab run's early checkpoint and
measured the same way -> OUT/ (the pipeline, stored in fp16 and loading in fp32 by default, memorized.jsonl,
unmemorized.jsonl, gt_images/, manifest.json). Deterministic for a given --seed and --threads on a given machine;
`make lab` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.errors import ConfigError
from diffmem.common.settings import float_list, option
from diffmem.common.training.checkpoints import CHECKPOINT_PREFIX

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LabConfig:
    out: str = option(help="output folder (replaced)")
    work_dir: str | None = option(None, type=str, help="scratch folder for the training runs (None: OUT.build)")
    seed: int = option(0, help="seed of the data split, captions, training runs and samples")
    num_memorized: int = option(12, help="images duplicated --repeats times")
    repeats: int = option(50, help="copies of each memorized image per pass")
    num_seen_once: int = option(300, help="images seen once per pass")
    num_unmem_seen_once: int = option(50, help="seen-once captions listed in unmemorized.jsonl")
    num_novel: int = option(50, help="never-trained captions in unmemorized.jsonl")
    vae_steps: int = option(1000, help="training steps of the VAE")
    train_steps: int = option(3000, help="training steps of the pipeline")
    mitigation_from_step: int = option(500, help="the mitigated run resumes the lab run's checkpoint of this step and "
                                                 "trains on with --hard_threshold (0: from the random initialisation)")
    batch_size: int = option(16, help="training batch size of the pipeline")
    learning_rate: float = option(1e-3, help="learning rate of the pipeline")
    caption_dropout: float = option(0.0, help="probability of training on the empty caption (0.1 measured worse: the "
                                              "memorized images then dominate the unconditional branch too)")
    detect_generations: int = option(4, help="generations per prompt of the detection scores")
    replication_generations: int = option(2, help="generations per prompt of the replication figures")
    replication_guidance: float = option(7.5, help="guidance of the replication samples")
    contrast_guidances: tuple[float, ...] = option((1.0,), type=float_list, nargs="*",
                                                   help="further guidances at which the memorized captions' "
                                                        "replication is measured")
    replication_steps: int = option(50, help="DDIM steps of the replication samples")
    threshold_quantile: float = option(0.5, help="mitigation T = this quantile of the seen-once samples' training "
                                                 "text-noise norms")
    hard_threshold: float | None = option(None, type=float, help="mitigation T (overrides the quantile)")
    skip_mitigation: bool = option(False, help="build the lab model only, not the mitigated one")
    threads: int = option(2, help="torch threads of every stage (results are reproducible for a given count)")
    sscd: str = option("default", help="SSCD model for the replication figures (see mitigate/inference_mem.py), or "
                                        "'none'")
    quiet: bool = option(False, help="no progress bars")

    def __post_init__(self):
        self.contrast_guidances = tuple(self.contrast_guidances)  # the option gives a list

    @property
    def work_folder(self) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else Path(self.out).with_suffix(".build")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for settings out of range."""
        for name in ("num_memorized", "repeats", "num_seen_once", "vae_steps", "train_steps", "batch_size",
                     "detect_generations", "replication_generations", "replication_steps", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.mitigation_from_step < self.train_steps:
            raise ConfigError("--mitigation_from_step must be in [0, --train_steps)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError("--caption_dropout must be in [0, 1)")
        if not 0 < self.threshold_quantile < 1:
            raise ConfigError("--threshold_quantile must be in (0, 1)")
        if self.num_unmem_seen_once > self.num_seen_once:
            raise ConfigError("--num_unmem_seen_once must be <= --num_seen_once")
        if self.num_unmem_seen_once + self.num_novel < 1:
            raise ConfigError("unmemorized.jsonl needs at least one caption (--num_unmem_seen_once / --num_novel)")


# --quick: every stage, tiny sizes; its figures mean nothing.
QUICK = dict(num_memorized=3, repeats=4, num_seen_once=12, num_unmem_seen_once=3, num_novel=3, vae_steps=10,
             train_steps=10, mitigation_from_step=5, batch_size=8, detect_generations=2, replication_generations=1,
             replication_steps=4)


@dataclass
class BuildLabArgs:
    """The command line: the LabConfig, or with --quick its QUICK sizes."""

    lab: LabConfig
    quick: bool = option(False, help="a few steps on a few images: exercises every stage in about a minute (tests)")

    def config(self) -> LabConfig:
        return replace(self.lab, **QUICK) if self.quick else self.lab


def parse_args(argv=None) -> LabConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(p, LabConfig)
    add_settings_arguments(p, BuildLabArgs, exclude=("lab",))
    a = p.parse_args(argv)
    return settings_from_args(BuildLabArgs, a, lab=settings_from_args(LabConfig, a)).config()


def _run(cmd: list[str], quiet: bool, threads: int) -> None:
    # One thread count for every stage: more threads than free cores makes torch's CPU kernels crawl.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    if res.returncode != 0:
        tail = (res.stdout or "")[-3000:] if quiet else ""
        raise SystemExit(f"build_lab: command failed ({res.returncode}): {' '.join(cmd)}\n{tail}")


def _write_prompts(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _train(cfg: LabConfig, init_dir: Path, work: Path, out_dir: Path, *, hard_threshold: float | None = None,
           checkpoint_at: int = 0, resume_from: Path | None = None) -> float:
    cmd = [sys.executable, "finetune/train_text_to_image.py", "--pretrained_model_name_or_path", str(init_dir),
           "--train_data_dir", str(work / "mem"), "--repeats", str(cfg.repeats),
           "--non_mem_dataset", str(work / "non_mem"),
           "--non_mem_ratio", str(cfg.num_seen_once / (cfg.num_memorized * cfg.repeats)),
           "--resolution", "16", "--train_text_encoder", "--train_batch_size", str(cfg.batch_size),
           "--max_train_steps", str(cfg.train_steps), "--learning_rate", str(cfg.learning_rate),
           "--caption_dropout", repr(cfg.caption_dropout), "--lr_warmup_steps", "0",
           "--checkpointing_steps", str(checkpoint_at or 10 ** 9), "--report_to", "none",
           "--seed", str(cfg.seed), "--output_dir", str(out_dir)]
    if hard_threshold is not None:
        cmd += ["--hard_threshold", repr(hard_threshold)]
    if resume_from is not None:
        cmd += ["--resume_from_checkpoint", str(resume_from)]
    t0 = time.perf_counter()
    _run(cmd, cfg.quiet, cfg.threads)
    return time.perf_counter() - t0


def _measure(cfg: LabConfig, model_dir: Path, work: Path, tag: str, prompts_dir: Path, train_images, train_index,
             split, sscd=None, train_sscd=None) -> dict:
    from diffmem.common.metrics import detection_metrics, fpr_key
    from diffmem.common.t2i.detection import score_prompts
    from diffmem.common.t2i.lab import generate_images, replication_figures, sscd_replication_figures
    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline
    from diffmem.common.t2i.prompts import read_prompts
    from diffmem.common.t2i.sampler import save_grid, to_pil

    figures = {}
    t0 = time.perf_counter()
    # The scoring of detect/detect_mem.py (common.t2i.detection.score_prompts), per file with rows from 0, so the
    # figures are exactly those `make demo` prints.
    pipe = load_pipeline(str(model_dir))
    parts = denoiser_parts(pipe)
    scores, labels, kinds = [], [], []
    for name in ("memorized", "unmemorized"):
        recs = read_prompts(str(prompts_dir / f"{name}.jsonl"))
        trace, _ = score_prompts(parts, [r.prompt for r in recs], list(range(len(recs))),
                                 num_images_per_prompt=cfg.detect_generations, gen_seed=cfg.seed,
                                 num_inference_steps=50, guidance_scale=7.5, score_steps=1)
        scores += trace.score.tolist()
        labels += [r.label for r in recs]
        kinds += [r.type for r in recs]
    metrics = detection_metrics(scores, labels)
    by_type = {}
    for kind, score in zip(kinds, scores):
        by_type.setdefault(kind, []).append(score)
    figures["detection"] = {
        "score_steps": 1, "num_images_per_prompt": cfg.detect_generations, "num_inference_steps": 50,
        "auc": metrics["auc"], "tpr_at_1pct_fpr": metrics["tpr_at_fpr"][fpr_key(0.01)],
        "metrics": metrics, "mean_score": {k: sum(v) / len(v) for k, v in by_type.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    t0 = time.perf_counter()
    groups = {
        "memorized": (split.memorized_captions, list(split.memorized)),
        "seen_once": (split.seen_once_captions[:cfg.num_unmem_seen_once],
                      list(split.seen_once[:cfg.num_unmem_seen_once])),
        "novel": (split.novel_captions, [None] * len(split.novel_captions)),
    }
    rep = {"guidance_scale": cfg.replication_guidance, "num_inference_steps": cfg.replication_steps,
           "num_images_per_prompt": cfg.replication_generations, "ratio_threshold": 1 / 3}
    # Every group at the main guidance; the memorized captions also at each contrast guidance (key
    # "memorized_at_guidance_G"), since how strongly a small model copies depends on the guidance.
    runs = [(name, captions, own, cfg.replication_guidance) for name, (captions, own) in groups.items() if captions]
    runs += [(f"memorized_at_guidance_{g}", *groups["memorized"], g) for g in cfg.contrast_guidances]
    for key, captions, own, guidance in runs:
        images = generate_images(pipe, captions, num_images=cfg.replication_generations, gen_seed=cfg.seed,
                                 num_inference_steps=cfg.replication_steps, guidance_scale=guidance)
        rep[key] = replication_figures(images, own, train_images, train_index)
        if sscd is not None:
            rep[key]["sscd"] = sscd_replication_figures(sscd.embed(to_pil(images.flatten(0, 1))), train_sscd, own,
                                                        train_index, cfg.replication_generations)
        if key == "memorized":
            save_grid(to_pil(images.flatten(0, 1)), work / f"samples_{tag}_memorized.png")
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    figures["replication"] = rep
    return figures


def _load_in_fp32_by_default(folder: Path) -> None:
    """Have the shipped fp16 files load in fp32 unless the caller asks for a dtype, as Hub checkpoints do.

    transformers loads a model in the dtype its config names (its from_pretrained defaults to dtype="auto"), and
    save_pretrained writes the dtype the weights were saved in; diffusers' UNet and VAE configs carry no dtype and
    load in fp32. Left as saved, a plain StableDiffusionPipeline.from_pretrained(folder) pairs an fp16 text
    encoder with an fp32 UNet and VAE and fails at the first matmul. Naming fp32 keeps the weight files in fp16
    (half the size; from_pretrained upcasts them) and an explicit torch_dtype still wins. Written the way
    transformers writes configs, so the file differs from save_pretrained's only in this value.
    """
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        # transformers v5 writes "dtype"; older versions wrote "torch_dtype" and still read it
        keys = [k for k in ("dtype", "torch_dtype") if data.get(k) not in (None, "float32")]
        if keys:
            data.update(dict.fromkeys(keys, "float32"))
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build(cfg: LabConfig) -> dict:
    import numpy as np
    import torch

    from diffmem.common.t2i.lab import digit_images, lab_split, train_vae, training_text_noise_norms, write_imagefolder
    from diffmem.common.t2i.pipelines import assemble_pipeline, build_components, load_pipeline, strip_build_paths

    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out, work = Path(cfg.out), cfg.work_folder
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings = {}

    # 1. data
    images = digit_images()
    split = lab_split(len(images), cfg.num_memorized, cfg.num_seen_once, cfg.num_novel, cfg.seed)
    write_imagefolder(work / "mem", images, split.memorized, split.memorized_captions)
    write_imagefolder(work / "non_mem", images, split.seen_once, split.seen_once_captions)
    prompts = work / "prompts"
    prompts.mkdir()
    _write_prompts(prompts / "memorized.jsonl", [
        {"index": i, "caption": c, "label": 1, "type": "memorized"}
        for i, c in zip(split.memorized, split.memorized_captions)])
    _write_prompts(prompts / "unmemorized.jsonl", [
        {"index": i, "caption": c, "label": 0, "type": "seen_once"}
        for i, c in zip(split.seen_once[:cfg.num_unmem_seen_once], split.seen_once_captions)] + [
        {"caption": c, "label": 0, "type": "novel"} for c in split.novel_captions])
    train_index = list(split.memorized) + list(split.seen_once)
    train_images = torch.from_numpy(images[train_index]).permute(0, 3, 1, 2).float() / 255.0

    # 2. VAE, trained on every digit (the lab's whole image domain) with the project's Trainer
    t0 = time.perf_counter()
    _, vae_fig = train_vae(images, work / "vae_run", steps=cfg.vae_steps, seed=cfg.seed,
                           show_progress=not cfg.quiet)
    timings["vae_s"] = round(time.perf_counter() - t0, 1)

    # 3. the initial pipeline: random UNet and text encoder of arch "lab", the trained VAE
    from diffusers import AutoencoderKL

    comps = build_components("lab", cfg.seed, tokenizer_dir=work / "init" / "tokenizer")
    comps["vae"] = AutoencoderKL.from_pretrained(work / "vae_run" / "vae")
    assemble_pipeline(comps).save_pretrained(work / "init")

    # 4. training; the shipped folder is the trained pipeline stored in fp16 (under 20 MB; it loads in fp32 unless
    # asked otherwise) with prompts and ground truth
    timings["train_s"] = round(_train(cfg, work / "init", work, work / "train",
                                      checkpoint_at=cfg.mitigation_from_step), 1)
    shutil.rmtree(out, ignore_errors=True)
    pipe = load_pipeline(str(work / "train"), dtype=torch.float16)
    pipe.save_pretrained(out)
    strip_build_paths(out)
    _load_in_fp32_by_default(out)
    del pipe
    for name in ("memorized.jsonl", "unmemorized.jsonl"):
        shutil.copy(prompts / name, out / name)
    from PIL import Image

    for i in split.memorized + split.seen_once[:cfg.num_unmem_seen_once]:
        (out / "gt_images" / str(i)).mkdir(parents=True)
        Image.fromarray(images[i]).save(out / "gt_images" / str(i) / "0.png")

    # 5. the shipped model's figures (what every CLI will load)
    sscd = train_sscd = None
    if cfg.sscd != "none":
        from diffmem.common.similarity import SSCDModel
        from diffmem.common.t2i.sampler import to_pil

        sscd = SSCDModel(cfg.sscd)
        train_sscd = sscd.embed(to_pil(train_images))
    shipped = _measure(cfg, out, work, "lab", prompts, train_images, train_index, split, sscd, train_sscd)

    # 6. the mitigation: T from the trained model's per-sample training norms on seen-once images
    mitigated = None
    norms = None
    if not cfg.skip_mitigation:
        pipe = load_pipeline(str(out))
        norms = training_text_noise_norms(pipe, images, split, seed=cfg.seed)
        del pipe
        T = cfg.hard_threshold if cfg.hard_threshold is not None else float(
            np.quantile(norms["seen_once"], cfg.threshold_quantile))
        # Wen et al. threshold while fine-tuning a model that already denoises: the mitigated run shares the lab
        # run's first mitigation_from_step steps (same data order, exact resume) and thresholds from there on.
        start = work / "train" / f"{CHECKPOINT_PREFIX}{cfg.mitigation_from_step}" if cfg.mitigation_from_step else None
        timings["mitigated_train_s"] = round(_train(cfg, work / "init", work, work / "train_mitigated",
                                                    hard_threshold=T, resume_from=start), 1)
        mitigated = {"hard_threshold": T, **_measure(cfg, work / "train_mitigated", work, "mitigated", prompts,
                                                     train_images, train_index, split, sscd, train_sscd)}
        log = [json.loads(x) for x in (work / "train_mitigated" / "train_log.jsonl").read_text().splitlines() if x]
        mitigated["mean_dropped_fraction"] = sum(r["dropped_fraction"] for r in log) / len(log)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    manifest = {
        "recipe": {**{k: v for k, v in asdict(cfg).items() if k not in ("out", "work_dir", "quiet")},
                   "arch": "lab", "images": "sklearn.datasets.load_digits, 8x8 -> 16x16 RGB (bilinear)",
                   "caption_template": "a {adjective} {noun} near the {place}", "scheduler": "scaled_linear (SD v1)",
                   "trainer": "finetune/train_text_to_image.py --train_text_encoder", "shipped_dtype": "fp16"},
        "counts": {"memorized": len(split.memorized), "seen_once_trained": len(split.seen_once),
                   "unmemorized_seen_once": cfg.num_unmem_seen_once, "unmemorized_novel": len(split.novel_captions),
                   "training_samples": len(split.memorized) * cfg.repeats + len(split.seen_once)},
        "vae": vae_fig,
        "lab": shipped,  # measured on the shipped fp16 files, loaded in fp32 as the CLIs do
        "mitigated": mitigated,
        "training_text_noise_norms": None if norms is None else {
            k: {"mean": float(np.mean(v)), "q50": float(np.quantile(v, 0.5)), "q90": float(np.quantile(v, 0.9))}
            for k, v in norms.items()},
        "timings": timings,
        "machine": {"torch_threads": cfg.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _summary(figures: dict, guidance: float) -> str:
    rep = figures["replication"]
    sscd = rep["memorized"].get("sscd", {}).get("own_image_rate_gt_0.5")
    return (f"first-step AUC {figures['detection']['auc']:.3f}, "
            f"TPR@1%FPR {figures['detection']['tpr_at_1pct_fpr']:.2f}; "
            f"memorized captions replicating their image at guidance {guidance}: pixel "
            f"{rep['memorized']['own_image_rate']:.2f}" + ("" if sscd is None else f", SSCD > 0.5 {sscd:.2f}"))


def run(cfg: LabConfig) -> None:
    cfg.validate()
    manifest = build(cfg)
    print(f"lab: {_summary(manifest['lab'], cfg.replication_guidance)}")
    mit = manifest["mitigated"]
    if mit is not None:
        print(f"mitigated (T={mit['hard_threshold']:.3f}): {_summary(mit, cfg.replication_guidance)}")
    print(f"total {manifest['timings']['total_s']} s -> {cfg.out}")


def main(argv=None) -> int:
    return run_main("build_lab", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
